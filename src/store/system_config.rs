//! `system_config`: global key/value settings with JSON values.

use chrono::{DateTime, Utc};
use sqlx::PgConnection;
use uuid::Uuid;

use super::StoreResult;

/// A row of `system_config`.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ConfigRow {
    /// Key.
    pub key: String,
    /// Value.
    pub value_json: serde_json::Value,
    /// Last change (maintained by the database).
    pub updated_at: DateTime<Utc>,
    /// Who made the last change.
    pub updated_by: Option<Uuid>,
}

/// Fetches one key.
pub async fn config_get(conn: &mut PgConnection, key: &str) -> StoreResult<Option<ConfigRow>> {
    Ok(sqlx::query_as::<_, ConfigRow>(
        "SELECT key, value_json, updated_at, updated_by FROM system_config WHERE key = $1",
    )
    .bind(key)
    .fetch_optional(conn)
    .await?)
}

/// Lists every key in order.
pub async fn config_list(conn: &mut PgConnection) -> StoreResult<Vec<ConfigRow>> {
    Ok(sqlx::query_as::<_, ConfigRow>(
        "SELECT key, value_json, updated_at, updated_by FROM system_config ORDER BY key",
    )
    .fetch_all(conn)
    .await?)
}

/// Inserts or replaces a key; returns the row and the previous value, if any.
pub async fn config_put(
    conn: &mut PgConnection,
    key: &str,
    value: &serde_json::Value,
    updated_by: Option<Uuid>,
) -> StoreResult<(ConfigRow, Option<serde_json::Value>)> {
    let previous: Option<serde_json::Value> =
        sqlx::query_scalar("SELECT value_json FROM system_config WHERE key = $1 FOR UPDATE")
            .bind(key)
            .fetch_optional(&mut *conn)
            .await?;
    let row = sqlx::query_as::<_, ConfigRow>(
        "INSERT INTO system_config (key, value_json, updated_by) VALUES ($1, $2, $3) \
         ON CONFLICT (key) DO UPDATE SET value_json = EXCLUDED.value_json, \
           updated_by = EXCLUDED.updated_by \
         RETURNING key, value_json, updated_at, updated_by",
    )
    .bind(key)
    .bind(value)
    .bind(updated_by)
    .fetch_one(conn)
    .await?;
    Ok((row, previous))
}

/// Deletes a key; returns the value it held, `None` when there was none.
pub async fn config_delete(
    conn: &mut PgConnection,
    key: &str,
) -> StoreResult<Option<serde_json::Value>> {
    Ok(
        sqlx::query_scalar("DELETE FROM system_config WHERE key = $1 RETURNING value_json")
            .bind(key)
            .fetch_optional(conn)
            .await?,
    )
}
