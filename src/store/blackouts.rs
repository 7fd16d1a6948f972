//! `blackout_windows`: maintenance periods during which runbooks do not run, and the lookup the
//! execution gate and the check endpoint share.

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::PgConnection;
use uuid::Uuid;

use super::StoreResult;
use crate::domain::blackout::{
    InvalidWindow, Occurrence, Recurrence, RunbookFacts, RunbookSelector, ServerFacts,
    ServerSelector, Window, parse_pattern,
};

/// A row of `blackout_windows`.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct BlackoutRow {
    /// Id.
    pub id: Uuid,
    /// Name.
    pub name: String,
    /// Purpose.
    pub description: Option<String>,
    /// Start of the first occurrence.
    pub start_time: DateTime<Utc>,
    /// End of the first occurrence.
    pub end_time: DateTime<Utc>,
    /// none, daily, weekly, monthly, cron.
    pub recurrence: String,
    /// `{timezone, cron, until}`.
    pub recurrence_pattern: Option<Value>,
    /// Server selector.
    pub affected_servers: Value,
    /// Runbook selector.
    pub affected_runbooks: Value,
    /// Creator.
    pub created_by: Option<Uuid>,
    /// Creation time.
    pub created_at: DateTime<Utc>,
    /// Last change.
    pub updated_at: DateTime<Utc>,
    /// Whether the window is in force.
    pub enabled: bool,
}

impl BlackoutRow {
    /// The domain window; fails only for rows written around the API.
    pub fn to_window(&self) -> Result<Window, InvalidWindow> {
        let recurrence: Recurrence = self.recurrence.parse()?;
        Ok(Window {
            id: self.id,
            name: self.name.clone(),
            start_time: self.start_time,
            end_time: self.end_time,
            recurrence,
            pattern: parse_pattern(recurrence, self.recurrence_pattern.as_ref())?,
            servers: ServerSelector::parse(&self.affected_servers)?,
            runbooks: RunbookSelector::parse(&self.affected_runbooks)?,
            enabled: self.enabled,
        })
    }
}

/// Fields of a window, for create and replace.
#[derive(Debug, Clone)]
pub struct BlackoutFields<'a> {
    /// Name.
    pub name: &'a str,
    /// Purpose.
    pub description: Option<&'a str>,
    /// Start of the first occurrence.
    pub start_time: DateTime<Utc>,
    /// End of the first occurrence.
    pub end_time: DateTime<Utc>,
    /// Recurrence name.
    pub recurrence: &'a str,
    /// Pattern JSON.
    pub recurrence_pattern: Option<&'a Value>,
    /// Server selector JSON.
    pub affected_servers: &'a Value,
    /// Runbook selector JSON.
    pub affected_runbooks: &'a Value,
    /// In force.
    pub enabled: bool,
}

/// Inserts a window.
pub async fn blackout_create(
    conn: &mut PgConnection,
    fields: &BlackoutFields<'_>,
    created_by: Option<Uuid>,
) -> StoreResult<BlackoutRow> {
    Ok(sqlx::query_as::<_, BlackoutRow>(
        "INSERT INTO blackout_windows (name, description, start_time, end_time, recurrence, \
           recurrence_pattern, affected_servers, affected_runbooks, enabled, created_by) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) RETURNING *",
    )
    .bind(fields.name)
    .bind(fields.description)
    .bind(fields.start_time)
    .bind(fields.end_time)
    .bind(fields.recurrence)
    .bind(fields.recurrence_pattern)
    .bind(fields.affected_servers)
    .bind(fields.affected_runbooks)
    .bind(fields.enabled)
    .bind(created_by)
    .fetch_one(conn)
    .await?)
}

/// Replaces a window's fields; `None` when it does not exist.
pub async fn blackout_update(
    conn: &mut PgConnection,
    id: Uuid,
    fields: &BlackoutFields<'_>,
) -> StoreResult<Option<BlackoutRow>> {
    Ok(sqlx::query_as::<_, BlackoutRow>(
        "UPDATE blackout_windows SET name = $2, description = $3, start_time = $4, end_time = $5, \
           recurrence = $6, recurrence_pattern = $7, affected_servers = $8, \
           affected_runbooks = $9, enabled = $10 \
         WHERE id = $1 RETURNING *",
    )
    .bind(id)
    .bind(fields.name)
    .bind(fields.description)
    .bind(fields.start_time)
    .bind(fields.end_time)
    .bind(fields.recurrence)
    .bind(fields.recurrence_pattern)
    .bind(fields.affected_servers)
    .bind(fields.affected_runbooks)
    .bind(fields.enabled)
    .fetch_optional(conn)
    .await?)
}

/// Fetches one window.
pub async fn blackout_get(conn: &mut PgConnection, id: Uuid) -> StoreResult<Option<BlackoutRow>> {
    Ok(
        sqlx::query_as::<_, BlackoutRow>("SELECT * FROM blackout_windows WHERE id = $1")
            .bind(id)
            .fetch_optional(conn)
            .await?,
    )
}

/// Fetches one window and locks it for the rest of the transaction.
pub async fn blackout_lock(conn: &mut PgConnection, id: Uuid) -> StoreResult<Option<BlackoutRow>> {
    Ok(
        sqlx::query_as::<_, BlackoutRow>("SELECT * FROM blackout_windows WHERE id = $1 FOR UPDATE")
            .bind(id)
            .fetch_optional(conn)
            .await?,
    )
}

/// Lists windows by start time, optionally only enabled or disabled ones.
pub async fn blackout_list(
    conn: &mut PgConnection,
    enabled: Option<bool>,
    limit: i64,
    offset: i64,
) -> StoreResult<(Vec<BlackoutRow>, i64)> {
    let rows = sqlx::query_as::<_, BlackoutRow>(
        "SELECT * FROM blackout_windows WHERE ($1::boolean IS NULL OR enabled = $1) \
         ORDER BY start_time, id LIMIT $2 OFFSET $3",
    )
    .bind(enabled)
    .bind(limit)
    .bind(offset)
    .fetch_all(&mut *conn)
    .await?;
    let total = sqlx::query_scalar(
        "SELECT count(*) FROM blackout_windows WHERE ($1::boolean IS NULL OR enabled = $1)",
    )
    .bind(enabled)
    .fetch_one(conn)
    .await?;
    Ok((rows, total))
}

/// Deletes a window; returns its name, or `None` when there was no such window.
pub async fn blackout_delete(conn: &mut PgConnection, id: Uuid) -> StoreResult<Option<String>> {
    Ok(
        sqlx::query_scalar("DELETE FROM blackout_windows WHERE id = $1 RETURNING name")
            .bind(id)
            .fetch_optional(conn)
            .await?,
    )
}

/// The 0-based position of the first of `runbook_ids` that no runbook has, and of the first of
/// `server_ids` that no server has.
pub async fn blackout_missing_references(
    conn: &mut PgConnection,
    runbook_ids: &[Uuid],
    server_ids: &[Uuid],
) -> StoreResult<(Option<usize>, Option<usize>)> {
    let (runbook, server): (Option<i64>, Option<i64>) = sqlx::query_as(
        "SELECT (SELECT min(n) FROM unnest($1::uuid[]) WITH ORDINALITY AS t(id, n) \
                 WHERE NOT EXISTS (SELECT 1 FROM runbooks r WHERE r.id = t.id)), \
                (SELECT min(n) FROM unnest($2::uuid[]) WITH ORDINALITY AS t(id, n) \
                 WHERE NOT EXISTS (SELECT 1 FROM server_credentials s WHERE s.id = t.id))",
    )
    .bind(runbook_ids)
    .bind(server_ids)
    .fetch_one(conn)
    .await?;
    let position = |n: Option<i64>| n.and_then(|n| usize::try_from(n - 1).ok());
    Ok((position(runbook), position(server)))
}

/// The facts about a runbook that windows select on.
pub async fn blackout_runbook_facts(
    conn: &mut PgConnection,
    runbook_id: Uuid,
) -> StoreResult<Option<RunbookFacts>> {
    let row: Option<(Uuid, Option<String>)> =
        sqlx::query_as("SELECT id, category FROM runbooks WHERE id = $1")
            .bind(runbook_id)
            .fetch_optional(conn)
            .await?;
    Ok(row.map(|(id, category)| RunbookFacts { id, category }))
}

/// The facts about a server that windows select on.
pub async fn blackout_server_facts(
    conn: &mut PgConnection,
    server_id: Uuid,
) -> StoreResult<Option<ServerFacts>> {
    let row: Option<(Uuid, Option<Value>, Option<String>, String)> =
        sqlx::query_as("SELECT id, tags, environment, name FROM server_credentials WHERE id = $1")
            .bind(server_id)
            .fetch_optional(conn)
            .await?;
    Ok(row.map(|(id, tags, environment, name)| server_facts(id, tags, environment, Some(name))))
}

/// A server's selector facts from its `server_credentials` columns (`tags` NULL reads as none).
pub(crate) fn server_facts(
    id: Uuid,
    tags: Option<Value>,
    environment: Option<String>,
    name: Option<String>,
) -> ServerFacts {
    ServerFacts {
        id,
        tags: tags.unwrap_or(Value::Null),
        environment,
        name,
    }
}

/// The selector facts of every server, by name (fan-out by tags).
pub async fn blackout_all_server_facts(conn: &mut PgConnection) -> StoreResult<Vec<ServerFacts>> {
    let rows: Vec<(Uuid, Option<Value>, Option<String>, String)> =
        sqlx::query_as("SELECT id, tags, environment, name FROM server_credentials ORDER BY name")
            .fetch_all(conn)
            .await?;
    Ok(rows
        .into_iter()
        .map(|(id, tags, environment, name)| server_facts(id, tags, environment, Some(name)))
        .collect())
}

/// Every enabled window covering the runbook (and server, when given) that is active at `now`,
/// with its current occurrence. Rows that fail to parse are skipped with a warning.
pub async fn blackout_active_for(
    conn: &mut PgConnection,
    runbook: Option<&RunbookFacts>,
    server: Option<&ServerFacts>,
    now: DateTime<Utc>,
) -> StoreResult<Vec<(Window, Occurrence)>> {
    let rows = sqlx::query_as::<_, BlackoutRow>(
        "SELECT * FROM blackout_windows WHERE enabled AND start_time <= $1 ORDER BY start_time, id",
    )
    .bind(now)
    .fetch_all(conn)
    .await?;
    let mut active = Vec::new();
    for row in rows {
        match row.to_window() {
            Ok(window) => {
                if window.covers(runbook, server)
                    && let Some(occurrence) = window.active_at(now)
                {
                    active.push((window, occurrence));
                }
            }
            Err(e) => {
                tracing::warn!(window = %row.id, error = %e, "skipping an invalid blackout window")
            }
        }
    }
    Ok(active)
}
