//! `auto_analyze_rules`: what to do with an alert before triggers (analyse, ignore, leave to a
//! human), first match in priority order. Matching itself is `domain::alert::rule_matches`.

use chrono::{DateTime, Utc};
use sqlx::PgConnection;
use uuid::Uuid;

use super::StoreResult;

/// A row of `auto_analyze_rules`.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct RuleRow {
    /// Id.
    pub id: Uuid,
    /// Name.
    pub name: String,
    /// Lower first.
    pub priority: i32,
    /// Glob on the alert name.
    pub alert_name_pattern: String,
    /// Glob on the severity.
    pub severity_pattern: String,
    /// auto_analyze, ignore or manual.
    pub action: String,
    /// Considered at all.
    pub enabled: bool,
    /// Creation.
    pub created_at: DateTime<Utc>,
    /// Last change.
    pub updated_at: DateTime<Utc>,
}

/// Fields of a rule.
#[derive(Debug, Clone)]
pub struct RuleFields<'a> {
    /// Name.
    pub name: &'a str,
    /// Priority.
    pub priority: i32,
    /// Name glob.
    pub alert_name_pattern: &'a str,
    /// Severity glob.
    pub severity_pattern: &'a str,
    /// Action.
    pub action: &'a str,
    /// Enabled.
    pub enabled: bool,
}

const COLUMNS: &str = "id, name, priority, alert_name_pattern, severity_pattern, action, enabled, \
     created_at, updated_at";

/// Creates a rule.
pub async fn rule_create(conn: &mut PgConnection, f: &RuleFields<'_>) -> StoreResult<RuleRow> {
    Ok(sqlx::query_as::<_, RuleRow>(sqlx::AssertSqlSafe(format!(
        "INSERT INTO auto_analyze_rules (name, priority, alert_name_pattern, severity_pattern, \
           action, enabled) VALUES ($1, $2, $3, $4, $5, $6) RETURNING {COLUMNS}"
    )))
    .bind(f.name)
    .bind(f.priority)
    .bind(f.alert_name_pattern)
    .bind(f.severity_pattern)
    .bind(f.action)
    .bind(f.enabled)
    .fetch_one(conn)
    .await?)
}

/// Replaces a rule's fields.
pub async fn rule_update(
    conn: &mut PgConnection,
    id: Uuid,
    f: &RuleFields<'_>,
) -> StoreResult<Option<RuleRow>> {
    Ok(sqlx::query_as::<_, RuleRow>(sqlx::AssertSqlSafe(format!(
        "UPDATE auto_analyze_rules SET name = $2, priority = $3, alert_name_pattern = $4, \
           severity_pattern = $5, action = $6, enabled = $7 WHERE id = $1 RETURNING {COLUMNS}"
    )))
    .bind(id)
    .bind(f.name)
    .bind(f.priority)
    .bind(f.alert_name_pattern)
    .bind(f.severity_pattern)
    .bind(f.action)
    .bind(f.enabled)
    .fetch_optional(conn)
    .await?)
}

/// Fetches a rule.
pub async fn rule_get(conn: &mut PgConnection, id: Uuid) -> StoreResult<Option<RuleRow>> {
    Ok(sqlx::query_as::<_, RuleRow>(sqlx::AssertSqlSafe(format!(
        "SELECT {COLUMNS} FROM auto_analyze_rules WHERE id = $1"
    )))
    .bind(id)
    .fetch_optional(conn)
    .await?)
}

/// Deletes a rule.
pub async fn rule_delete(conn: &mut PgConnection, id: Uuid) -> StoreResult<Option<RuleRow>> {
    Ok(sqlx::query_as::<_, RuleRow>(sqlx::AssertSqlSafe(format!(
        "DELETE FROM auto_analyze_rules WHERE id = $1 RETURNING {COLUMNS}"
    )))
    .bind(id)
    .fetch_optional(conn)
    .await?)
}

/// Every rule in evaluation order (priority, then creation, then id), optionally only enabled.
pub async fn rule_list(conn: &mut PgConnection, only_enabled: bool) -> StoreResult<Vec<RuleRow>> {
    Ok(sqlx::query_as::<_, RuleRow>(sqlx::AssertSqlSafe(format!(
        "SELECT {COLUMNS} FROM auto_analyze_rules WHERE (NOT $1 OR enabled) \
         ORDER BY priority, created_at, id"
    )))
    .bind(only_enabled)
    .fetch_all(conn)
    .await?)
}
