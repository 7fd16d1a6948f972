//! The `execution_stats` view.

use chrono::{DateTime, Utc};
use sqlx::PgConnection;
use uuid::Uuid;

use super::StoreResult;

/// A row of `execution_stats`.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct StatsRow {
    /// Runbook.
    pub runbook_id: Uuid,
    /// Its name.
    pub runbook_name: String,
    /// Executions of any status.
    pub total_executions: i64,
    /// Completed executions.
    pub successful: i64,
    /// Failed executions.
    pub failed: i64,
    /// Mean duration of executions that recorded one.
    pub avg_duration_ms: Option<f64>,
    /// Most recent start.
    pub last_execution: Option<DateTime<Utc>>,
}

/// Every runbook's statistics, by name.
pub async fn stats_list(conn: &mut PgConnection) -> StoreResult<Vec<StatsRow>> {
    Ok(sqlx::query_as::<_, StatsRow>(
        "SELECT runbook_id, runbook_name, total_executions, successful, failed, \
           avg_duration_ms::float8 AS avg_duration_ms, last_execution \
         FROM execution_stats ORDER BY runbook_name",
    )
    .fetch_all(conn)
    .await?)
}

/// One runbook's statistics.
pub async fn stats_get(conn: &mut PgConnection, runbook_id: Uuid) -> StoreResult<Option<StatsRow>> {
    Ok(sqlx::query_as::<_, StatsRow>(
        "SELECT runbook_id, runbook_name, total_executions, successful, failed, \
           avg_duration_ms::float8 AS avg_duration_ms, last_execution \
         FROM execution_stats WHERE runbook_id = $1",
    )
    .bind(runbook_id)
    .fetch_optional(conn)
    .await?)
}
