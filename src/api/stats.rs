//! Execution statistics from the `execution_stats` view.

use chrono::{DateTime, Utc};
use poem::Request;
use poem_openapi::{Object, OpenApi, param::Path, payload::Json};
use uuid::Uuid;

use crate::domain::Role;
use crate::store::{self, stats::StatsRow};

use super::Tag;
use super::context::{AppState, BearerAuth};
use super::error::ApiError;

/// One runbook's execution statistics.
#[derive(Debug, Object)]
pub struct RunbookStats {
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
    /// Mean duration in milliseconds.
    #[oai(skip_serializing_if_is_none)]
    pub avg_duration_ms: Option<f64>,
    /// Most recent start.
    #[oai(skip_serializing_if_is_none)]
    pub last_execution: Option<DateTime<Utc>>,
}

impl From<StatsRow> for RunbookStats {
    fn from(r: StatsRow) -> Self {
        RunbookStats {
            runbook_id: r.runbook_id,
            runbook_name: r.runbook_name,
            total_executions: r.total_executions,
            successful: r.successful,
            failed: r.failed,
            avg_duration_ms: r.avg_duration_ms,
            last_execution: r.last_execution,
        }
    }
}

/// Statistics of every runbook and their sum.
#[derive(Debug, Object)]
pub struct ExecutionStats {
    /// Per runbook, by name.
    pub runbooks: Vec<RunbookStats>,
    /// Executions of any status of the runbooks listed (runs of a deleted runbook stay in the
    /// executions list, unlinked, and count here no more).
    pub total_executions: i64,
    /// Completed executions of the runbooks listed.
    pub successful: i64,
    /// Failed executions of the runbooks listed.
    pub failed: i64,
}

/// Statistics endpoints.
pub struct StatsApi {
    /// Shared state.
    pub state: AppState,
}

#[OpenApi(prefix_path = "/stats", tag = "Tag::Stats")]
impl StatsApi {
    /// Execution statistics for every runbook, with totals. They come from the
    /// `execution_stats` view, one row per existing runbook: runs of a deleted runbook are not
    /// counted.
    ///
    /// Least role: viewer.
    #[oai(path = "/executions", method = "get", operation_id = "stats_list")]
    async fn stats_list(
        &self,
        req: &Request,
        auth: BearerAuth,
    ) -> Result<Json<ExecutionStats>, ApiError> {
        self.state.authorize(req, &auth, Role::Viewer).await?;
        let mut conn = self.state.pool.acquire().await?;
        let rows = store::stats::stats_list(&mut conn).await?;
        let total_executions = rows.iter().map(|r| r.total_executions).sum();
        let successful = rows.iter().map(|r| r.successful).sum();
        let failed = rows.iter().map(|r| r.failed).sum();
        Ok(Json(ExecutionStats {
            runbooks: rows.into_iter().map(Into::into).collect(),
            total_executions,
            successful,
            failed,
        }))
    }

    /// Execution statistics for one runbook.
    ///
    /// Least role: viewer.
    #[oai(
        path = "/executions/:runbook_id",
        method = "get",
        operation_id = "stats_get"
    )]
    async fn stats_get(
        &self,
        req: &Request,
        auth: BearerAuth,
        /// Runbook id.
        runbook_id: Path<Uuid>,
    ) -> Result<Json<RunbookStats>, ApiError> {
        self.state.authorize(req, &auth, Role::Viewer).await?;
        let mut conn = self.state.pool.acquire().await?;
        let row = store::stats::stats_get(&mut conn, runbook_id.0)
            .await?
            .ok_or_else(|| ApiError::not_found("runbook", runbook_id.0))?;
        Ok(Json(row.into()))
    }
}
