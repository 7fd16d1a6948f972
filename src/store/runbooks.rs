//! `runbooks`, `runbook_steps`, `runbook_triggers` and `runbook_versions`: runbook documents,
//! saved whole (the runbook row, its steps and its triggers) with a version row per change.
//!
//! [`runbook_save`] is the one write path: it compares the canonical YAML with the current
//! version's, and only when they differ rewrites the rows, bumps `version` and appends a
//! `runbook_versions` row, so applying the same document twice writes nothing. Steps and triggers
//! are matched by name so their ids (referenced by executions) survive edits. Callers own the
//! transaction and must lock the runbook first ([`runbook_lock`], [`runbook_lock_by_name`]).

use std::collections::HashMap;

use chrono::{DateTime, NaiveTime, Utc};
use sqlx::PgConnection;
use uuid::Uuid;

use super::StoreResult;
use crate::domain::runbook::{
    ExecutionMode, RunbookDocument, RunbookStatus, StepDocument, TargetOs, TriggerDocument,
    canonicalize, change_summary, format_time_of_day, parse_time_of_day, string_map,
    to_canonical_yaml,
};

const RUNBOOK_COLUMNS: &str = "id, name, description, category, mode::text AS mode, \
     status::text AS status, target_os::text AS target_os, version, timeout_seconds, max_retries, \
     retry_delay_seconds, rate_limit_count, rate_limit_window_seconds, requires_approval, \
     approval_roles, allowed_servers, environment_vars, config, created_by, created_at, updated_at";

const STEP_COLUMNS: &str = "id, step_order, name, description, command, expected_exit_codes, \
     timeout_seconds, continue_on_failure, condition, rollback_command, retry_count, \
     retry_delay_seconds, capture_output, sensitive";

const TRIGGER_COLUMNS: &str = "id, name, priority, alert_name_pattern, severity_pattern, \
     source_pattern, labels_match, time_window_start, time_window_end, enabled, cooldown_seconds, \
     cooldown_per_instance, last_triggered_at";

/// A row of `runbooks`.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct RunbookRow {
    /// Primary key.
    pub id: Uuid,
    /// Unique name.
    pub name: String,
    /// Description.
    pub description: Option<String>,
    /// Category.
    pub category: Option<String>,
    /// auto, semi_auto or manual.
    pub mode: String,
    /// active, disabled or draft.
    pub status: String,
    /// linux or windows.
    pub target_os: String,
    /// Current version.
    pub version: i32,
    /// Whole-run limit.
    pub timeout_seconds: i32,
    /// Run retries.
    pub max_retries: i32,
    /// Seconds between run retries.
    pub retry_delay_seconds: i32,
    /// Runs per window.
    pub rate_limit_count: Option<i32>,
    /// Window length.
    pub rate_limit_window_seconds: Option<i32>,
    /// Needs approval.
    pub requires_approval: bool,
    /// Who may approve.
    pub approval_roles: Vec<String>,
    /// Server restrictions.
    pub allowed_servers: serde_json::Value,
    /// Variable templates.
    pub environment_vars: serde_json::Value,
    /// Extra configuration.
    pub config: serde_json::Value,
    /// Author.
    pub created_by: Option<Uuid>,
    /// Creation time.
    pub created_at: DateTime<Utc>,
    /// Last change.
    pub updated_at: DateTime<Utc>,
}

/// A row of `runbook_steps`.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct StepRow {
    /// Primary key.
    pub id: Uuid,
    /// Position.
    pub step_order: i32,
    /// Name.
    pub name: String,
    /// Description.
    pub description: Option<String>,
    /// Command template.
    pub command: String,
    /// Success codes.
    pub expected_exit_codes: Vec<i32>,
    /// Step limit.
    pub timeout_seconds: i32,
    /// Continue after failure.
    pub continue_on_failure: bool,
    /// Condition expression.
    pub condition: Option<String>,
    /// Rollback template.
    pub rollback_command: Option<String>,
    /// Retries.
    pub retry_count: i32,
    /// Seconds between retries.
    pub retry_delay_seconds: i32,
    /// Keep output.
    pub capture_output: bool,
    /// Mask output.
    pub sensitive: bool,
}

/// A row of `runbook_triggers`.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct TriggerRow {
    /// Primary key.
    pub id: Uuid,
    /// Name.
    pub name: String,
    /// Lower wins.
    pub priority: i32,
    /// Alert name pattern.
    pub alert_name_pattern: String,
    /// Severity pattern.
    pub severity_pattern: Option<String>,
    /// Source pattern.
    pub source_pattern: Option<String>,
    /// Label patterns.
    pub labels_match: serde_json::Value,
    /// Window start.
    pub time_window_start: Option<NaiveTime>,
    /// Window end.
    pub time_window_end: Option<NaiveTime>,
    /// Considered at all.
    pub enabled: bool,
    /// Seconds between firings.
    pub cooldown_seconds: i32,
    /// Cooldown counted per alerting instance.
    pub cooldown_per_instance: bool,
    /// Last firing.
    pub last_triggered_at: Option<DateTime<Utc>>,
}

impl TriggerRow {
    /// The trigger as the runbook document writes it.
    pub fn document(&self) -> TriggerDocument {
        TriggerDocument {
            name: self.name.clone(),
            priority: self.priority,
            alert_name_pattern: self.alert_name_pattern.clone(),
            severity_pattern: self.severity_pattern.clone(),
            source_pattern: self.source_pattern.clone(),
            labels_match: string_map(&self.labels_match),
            time_window_start: self.time_window_start.map(format_time_of_day),
            time_window_end: self.time_window_end.map(format_time_of_day),
            enabled: self.enabled,
            cooldown_seconds: self.cooldown_seconds,
            cooldown_per_instance: self.cooldown_per_instance,
        }
    }
}

/// A row of `runbook_versions`.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct VersionRow {
    /// Primary key.
    pub id: Uuid,
    /// The runbook.
    pub runbook_id: Uuid,
    /// Version number.
    pub version: i32,
    /// Canonical YAML of that version.
    pub yaml_content: String,
    /// What changed.
    pub change_summary: Option<String>,
    /// Who made it.
    pub created_by: Option<Uuid>,
    /// When.
    pub created_at: DateTime<Utc>,
}

/// A runbook with its steps and triggers as stored.
#[derive(Debug, Clone)]
pub struct StoredRunbook {
    /// The runbook row.
    pub row: RunbookRow,
    /// Steps by order.
    pub steps: Vec<StepRow>,
    /// Triggers by priority, then name.
    pub triggers: Vec<TriggerRow>,
}

impl StoredRunbook {
    /// The document the rows express (canonical form).
    pub fn document(&self) -> RunbookDocument {
        let r = &self.row;
        let doc = RunbookDocument {
            name: r.name.clone(),
            description: r.description.clone(),
            category: r.category.clone(),
            mode: ExecutionMode::parse(&r.mode).unwrap_or_default(),
            status: RunbookStatus::parse(&r.status).unwrap_or_default(),
            target_os: TargetOs::parse(&r.target_os).unwrap_or_default(),
            timeout_seconds: r.timeout_seconds,
            max_retries: r.max_retries,
            retry_delay_seconds: r.retry_delay_seconds,
            rate_limit_count: r.rate_limit_count,
            rate_limit_window_seconds: r.rate_limit_window_seconds,
            requires_approval: r.requires_approval,
            approval_roles: r.approval_roles.clone(),
            allowed_servers: r.allowed_servers.clone(),
            environment_vars: string_map(&r.environment_vars),
            config: r.config.clone(),
            steps: self
                .steps
                .iter()
                .map(|s| StepDocument {
                    order: Some(s.step_order),
                    name: s.name.clone(),
                    description: s.description.clone(),
                    command: s.command.clone(),
                    expected_exit_codes: s.expected_exit_codes.clone(),
                    timeout_seconds: s.timeout_seconds,
                    continue_on_failure: s.continue_on_failure,
                    condition: s.condition.clone(),
                    rollback_command: s.rollback_command.clone(),
                    retry_count: s.retry_count,
                    retry_delay_seconds: s.retry_delay_seconds,
                    capture_output: s.capture_output,
                    sensitive: s.sensitive,
                })
                .collect(),
            triggers: self.triggers.iter().map(TriggerRow::document).collect(),
        };
        canonicalize(&doc)
    }
}

/// Fetches a runbook row.
pub async fn runbook_get(conn: &mut PgConnection, id: Uuid) -> StoreResult<Option<RunbookRow>> {
    Ok(sqlx::query_as::<_, RunbookRow>(sqlx::AssertSqlSafe(format!(
        "SELECT {RUNBOOK_COLUMNS} FROM runbooks WHERE id = $1"
    )))
    .bind(id)
    .fetch_optional(conn)
    .await?)
}

/// Fetches and locks a runbook row for a change.
pub async fn runbook_lock(conn: &mut PgConnection, id: Uuid) -> StoreResult<Option<RunbookRow>> {
    Ok(sqlx::query_as::<_, RunbookRow>(sqlx::AssertSqlSafe(format!(
        "SELECT {RUNBOOK_COLUMNS} FROM runbooks WHERE id = $1 FOR UPDATE"
    )))
    .bind(id)
    .fetch_optional(conn)
    .await?)
}

/// Fetches and locks a runbook row by name for a change.
pub async fn runbook_lock_by_name(
    conn: &mut PgConnection,
    name: &str,
) -> StoreResult<Option<RunbookRow>> {
    Ok(sqlx::query_as::<_, RunbookRow>(sqlx::AssertSqlSafe(format!(
        "SELECT {RUNBOOK_COLUMNS} FROM runbooks WHERE lower(name) = lower($1) FOR UPDATE"
    )))
    .bind(name)
    .fetch_optional(conn)
    .await?)
}

/// Fetches a runbook by name (in any case: names are unique regardless of case).
pub async fn runbook_get_by_name(
    conn: &mut PgConnection,
    name: &str,
) -> StoreResult<Option<RunbookRow>> {
    Ok(sqlx::query_as::<_, RunbookRow>(sqlx::AssertSqlSafe(format!(
        "SELECT {RUNBOOK_COLUMNS} FROM runbooks WHERE lower(name) = lower($1)"
    )))
    .bind(name)
    .fetch_optional(conn)
    .await?)
}

/// The steps of a runbook, by order.
pub async fn runbook_steps_list(
    conn: &mut PgConnection,
    runbook_id: Uuid,
) -> StoreResult<Vec<StepRow>> {
    Ok(sqlx::query_as::<_, StepRow>(sqlx::AssertSqlSafe(format!(
        "SELECT {STEP_COLUMNS} FROM runbook_steps WHERE runbook_id = $1 ORDER BY step_order"
    )))
    .bind(runbook_id)
    .fetch_all(conn)
    .await?)
}

/// The triggers of a runbook, in document order (insertion order is kept by `position`-free
/// ordering on priority then name, which is also the order matching considers them in).
pub async fn runbook_triggers_list(
    conn: &mut PgConnection,
    runbook_id: Uuid,
) -> StoreResult<Vec<TriggerRow>> {
    Ok(sqlx::query_as::<_, TriggerRow>(sqlx::AssertSqlSafe(format!(
        "SELECT {TRIGGER_COLUMNS} FROM runbook_triggers WHERE runbook_id = $1 \
         ORDER BY priority, name"
    )))
    .bind(runbook_id)
    .fetch_all(conn)
    .await?)
}

/// The runbooks of `rows` with their steps and triggers, in the order of `rows`: two queries
/// for the whole page, not two per runbook.
pub async fn runbooks_with_parts(
    conn: &mut PgConnection,
    rows: Vec<RunbookRow>,
) -> StoreResult<Vec<StoredRunbook>> {
    let ids: Vec<Uuid> = rows.iter().map(|r| r.id).collect();
    let mut steps: HashMap<Uuid, Vec<StepRow>> = by_runbook(
        conn,
        format!(
            "SELECT runbook_id, {STEP_COLUMNS} FROM runbook_steps WHERE runbook_id = ANY($1) \
             ORDER BY runbook_id, step_order"
        ),
        &ids,
    )
    .await?;
    let mut triggers: HashMap<Uuid, Vec<TriggerRow>> = by_runbook(
        conn,
        format!(
            "SELECT runbook_id, {TRIGGER_COLUMNS} FROM runbook_triggers \
             WHERE runbook_id = ANY($1) ORDER BY runbook_id, priority, name"
        ),
        &ids,
    )
    .await?;
    Ok(rows
        .into_iter()
        .map(|row| StoredRunbook {
            steps: steps.remove(&row.id).unwrap_or_default(),
            triggers: triggers.remove(&row.id).unwrap_or_default(),
            row,
        })
        .collect())
}

/// The rows `sql` selects for the runbooks `ids` (bound as `$1`; each row has a `runbook_id`
/// column besides `T`'s), grouped by runbook in the order selected.
async fn by_runbook<T>(
    conn: &mut PgConnection,
    sql: String,
    ids: &[Uuid],
) -> StoreResult<HashMap<Uuid, Vec<T>>>
where
    T: for<'r> sqlx::FromRow<'r, sqlx::postgres::PgRow>,
{
    use sqlx::Row;
    let mut grouped: HashMap<Uuid, Vec<T>> = HashMap::new();
    for row in sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(ids)
        .fetch_all(conn)
        .await?
    {
        grouped
            .entry(row.try_get("runbook_id")?)
            .or_default()
            .push(T::from_row(&row)?);
    }
    Ok(grouped)
}

/// A runbook with its steps and triggers.
pub async fn runbook_load(conn: &mut PgConnection, id: Uuid) -> StoreResult<Option<StoredRunbook>> {
    let Some(row) = runbook_get(conn, id).await? else {
        return Ok(None);
    };
    let steps = runbook_steps_list(conn, id).await?;
    let triggers = runbook_triggers_list(conn, id).await?;
    Ok(Some(StoredRunbook {
        row,
        steps,
        triggers,
    }))
}

/// Filters of [`runbook_list`]; `None` means any.
#[derive(Debug, Clone, Default)]
pub struct RunbookFilter<'a> {
    /// Exact category.
    pub category: Option<&'a str>,
    /// active, disabled or draft.
    pub status: Option<&'a str>,
    /// auto, semi_auto or manual.
    pub mode: Option<&'a str>,
    /// linux or windows.
    pub target_os: Option<&'a str>,
    /// Text the name or the description contains, ignoring case.
    pub search: Option<&'a str>,
}

/// Lists runbooks by name, filtered and paginated; returns the page and the filtered total.
pub async fn runbook_list(
    conn: &mut PgConnection,
    filter: &RunbookFilter<'_>,
    limit: i64,
    offset: i64,
) -> StoreResult<(Vec<RunbookRow>, i64)> {
    const WHERE: &str = "WHERE ($1::text IS NULL OR category = $1) \
         AND ($2::text IS NULL OR status::text = $2) AND ($3::text IS NULL OR mode::text = $3) \
         AND ($4::text IS NULL OR target_os::text = $4) \
         AND ($5::text IS NULL OR strpos(lower(name), lower($5)) > 0 \
              OR strpos(lower(coalesce(description, '')), lower($5)) > 0)";
    let rows = sqlx::query_as::<_, RunbookRow>(sqlx::AssertSqlSafe(format!(
        "SELECT {RUNBOOK_COLUMNS} FROM runbooks {WHERE} ORDER BY name LIMIT $6 OFFSET $7"
    )))
    .bind(filter.category)
    .bind(filter.status)
    .bind(filter.mode)
    .bind(filter.target_os)
    .bind(filter.search)
    .bind(limit)
    .bind(offset)
    .fetch_all(&mut *conn)
    .await?;
    let total: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT count(*) FROM runbooks {WHERE}"
    )))
    .bind(filter.category)
    .bind(filter.status)
    .bind(filter.mode)
    .bind(filter.target_os)
    .bind(filter.search)
    .fetch_one(conn)
    .await?;
    Ok((rows, total))
}

/// Every runbook's id and name, by name (for `apply --prune`).
pub async fn runbook_names(conn: &mut PgConnection) -> StoreResult<Vec<(Uuid, String)>> {
    Ok(
        sqlx::query_as::<_, (Uuid, String)>("SELECT id, name FROM runbooks ORDER BY name")
            .fetch_all(conn)
            .await?,
    )
}

/// Deletes a runbook; its steps, triggers and versions go with it, its executions stay (their
/// `runbook_id` becomes NULL). Returns whether it existed.
pub async fn runbook_delete(conn: &mut PgConnection, id: Uuid) -> StoreResult<bool> {
    let done = sqlx::query("DELETE FROM runbooks WHERE id = $1")
        .bind(id)
        .execute(conn)
        .await?;
    Ok(done.rows_affected() > 0)
}

/// What [`runbook_save`] did.
#[derive(Debug, Clone)]
pub struct SaveOutcome {
    /// The runbook.
    pub id: Uuid,
    /// Its version after the save.
    pub version: i32,
    /// Whether the runbook was created.
    pub created: bool,
    /// Whether anything changed (false: same canonical YAML, nothing written).
    pub changed: bool,
    /// The change summary written (None when nothing changed).
    pub change_summary: Option<String>,
}

/// Saves a (validated) document as a new runbook (`existing` = None) or over the locked
/// `existing` one. Writes nothing when the canonical YAML equals the current version's.
pub async fn runbook_save(
    conn: &mut PgConnection,
    existing: Option<&RunbookRow>,
    doc: &RunbookDocument,
    summary: Option<&str>,
    user: Option<Uuid>,
) -> StoreResult<SaveOutcome> {
    let doc = canonicalize(doc);
    let yaml = to_canonical_yaml(&doc);
    let (id, version, created, generated) = match existing {
        Some(row) => {
            let current = runbook_version_get(conn, row.id, row.version).await?;
            let old_doc = match &current {
                Some(v) if v.yaml_content == yaml => {
                    return Ok(SaveOutcome {
                        id: row.id,
                        version: row.version,
                        created: false,
                        changed: false,
                        change_summary: None,
                    });
                }
                _ => runbook_load(conn, row.id).await?.map(|s| s.document()),
            };
            let generated = match &old_doc {
                Some(old) => change_summary(old, &doc),
                None => "updated".to_owned(),
            };
            let version = row.version + 1;
            runbook_row_update(conn, row.id, &doc, version).await?;
            (row.id, version, false, generated)
        }
        None => {
            let id = runbook_row_insert(conn, &doc, user).await?;
            (id, 1, true, "created".to_owned())
        }
    };
    steps_replace(conn, id, &doc).await?;
    triggers_replace(conn, id, &doc).await?;
    let summary = summary
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .unwrap_or(generated);
    sqlx::query(
        "INSERT INTO runbook_versions (runbook_id, version, yaml_content, change_summary, created_by) \
         VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(id)
    .bind(version)
    .bind(&yaml)
    .bind(&summary)
    .bind(user)
    .execute(conn)
    .await?;
    Ok(SaveOutcome {
        id,
        version,
        created,
        changed: true,
        change_summary: Some(summary),
    })
}

async fn runbook_row_insert(
    conn: &mut PgConnection,
    doc: &RunbookDocument,
    user: Option<Uuid>,
) -> StoreResult<Uuid> {
    Ok(sqlx::query_scalar(
        "INSERT INTO runbooks (name, description, category, mode, status, target_os, version, \
         timeout_seconds, max_retries, retry_delay_seconds, rate_limit_count, \
         rate_limit_window_seconds, requires_approval, approval_roles, allowed_servers, \
         environment_vars, config, created_by) \
         VALUES ($1, $2, $3, $4::execution_mode, $5::runbook_status, $6::os_type, 1, $7, $8, $9, \
         $10, $11, $12, $13, $14, $15, $16, $17) RETURNING id",
    )
    .bind(&doc.name)
    .bind(&doc.description)
    .bind(&doc.category)
    .bind(doc.mode.as_str())
    .bind(doc.status.as_str())
    .bind(doc.target_os.as_str())
    .bind(doc.timeout_seconds)
    .bind(doc.max_retries)
    .bind(doc.retry_delay_seconds)
    .bind(doc.rate_limit_count)
    .bind(doc.rate_limit_window_seconds)
    .bind(doc.requires_approval)
    .bind(&doc.approval_roles)
    .bind(&doc.allowed_servers)
    .bind(serde_json::to_value(&doc.environment_vars).unwrap_or_default())
    .bind(&doc.config)
    .bind(user)
    .fetch_one(conn)
    .await?)
}

async fn runbook_row_update(
    conn: &mut PgConnection,
    id: Uuid,
    doc: &RunbookDocument,
    version: i32,
) -> StoreResult<()> {
    sqlx::query(
        "UPDATE runbooks SET name = $2, description = $3, category = $4, \
         mode = $5::execution_mode, status = $6::runbook_status, target_os = $7::os_type, \
         version = $8, timeout_seconds = $9, max_retries = $10, retry_delay_seconds = $11, \
         rate_limit_count = $12, rate_limit_window_seconds = $13, requires_approval = $14, \
         approval_roles = $15, allowed_servers = $16, environment_vars = $17, config = $18, \
         updated_at = now() WHERE id = $1",
    )
    .bind(id)
    .bind(&doc.name)
    .bind(&doc.description)
    .bind(&doc.category)
    .bind(doc.mode.as_str())
    .bind(doc.status.as_str())
    .bind(doc.target_os.as_str())
    .bind(version)
    .bind(doc.timeout_seconds)
    .bind(doc.max_retries)
    .bind(doc.retry_delay_seconds)
    .bind(doc.rate_limit_count)
    .bind(doc.rate_limit_window_seconds)
    .bind(doc.requires_approval)
    .bind(&doc.approval_roles)
    .bind(&doc.allowed_servers)
    .bind(serde_json::to_value(&doc.environment_vars).unwrap_or_default())
    .bind(&doc.config)
    .execute(conn)
    .await?;
    Ok(())
}

/// Rewrites the steps, keeping the id of every step whose name survives.
async fn steps_replace(
    conn: &mut PgConnection,
    runbook_id: Uuid,
    doc: &RunbookDocument,
) -> StoreResult<()> {
    let names: Vec<String> = doc.steps.iter().map(|s| s.name.clone()).collect();
    sqlx::query("DELETE FROM runbook_steps WHERE runbook_id = $1 AND NOT (name = ANY($2))")
        .bind(runbook_id)
        .bind(&names)
        .execute(&mut *conn)
        .await?;
    // Move the survivors out of the way of the unique (runbook_id, step_order) before renumbering.
    sqlx::query("UPDATE runbook_steps SET step_order = -step_order - 1 WHERE runbook_id = $1")
        .bind(runbook_id)
        .execute(&mut *conn)
        .await?;
    let existing: HashMap<String, Uuid> = runbook_steps_list(conn, runbook_id)
        .await?
        .into_iter()
        .map(|s| (s.name, s.id))
        .collect();
    for (i, step) in doc.steps.iter().enumerate() {
        let order = step.effective_order(i);
        match existing.get(&step.name) {
            Some(id) => {
                sqlx::query(
                    "UPDATE runbook_steps SET step_order = $2, description = $3, command = $4, \
                     expected_exit_codes = $5, timeout_seconds = $6, continue_on_failure = $7, \
                     condition = $8, rollback_command = $9, retry_count = $10, \
                     retry_delay_seconds = $11, capture_output = $12, sensitive = $13 WHERE id = $1",
                )
                .bind(id)
                .bind(order)
                .bind(&step.description)
                .bind(&step.command)
                .bind(&step.expected_exit_codes)
                .bind(step.timeout_seconds)
                .bind(step.continue_on_failure)
                .bind(&step.condition)
                .bind(&step.rollback_command)
                .bind(step.retry_count)
                .bind(step.retry_delay_seconds)
                .bind(step.capture_output)
                .bind(step.sensitive)
                .execute(&mut *conn)
                .await?;
            }
            None => {
                sqlx::query(
                    "INSERT INTO runbook_steps (runbook_id, step_order, name, description, command, \
                     expected_exit_codes, timeout_seconds, continue_on_failure, condition, \
                     rollback_command, retry_count, retry_delay_seconds, capture_output, sensitive) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)",
                )
                .bind(runbook_id)
                .bind(order)
                .bind(&step.name)
                .bind(&step.description)
                .bind(&step.command)
                .bind(&step.expected_exit_codes)
                .bind(step.timeout_seconds)
                .bind(step.continue_on_failure)
                .bind(&step.condition)
                .bind(&step.rollback_command)
                .bind(step.retry_count)
                .bind(step.retry_delay_seconds)
                .bind(step.capture_output)
                .bind(step.sensitive)
                .execute(&mut *conn)
                .await?;
            }
        }
    }
    Ok(())
}

/// Rewrites the triggers, keeping the id and `last_triggered_at` of every trigger whose name
/// survives (so cooldowns and execution links hold across edits).
async fn triggers_replace(
    conn: &mut PgConnection,
    runbook_id: Uuid,
    doc: &RunbookDocument,
) -> StoreResult<()> {
    let names: Vec<String> = doc.triggers.iter().map(|t| t.name.clone()).collect();
    sqlx::query("DELETE FROM runbook_triggers WHERE runbook_id = $1 AND NOT (name = ANY($2))")
        .bind(runbook_id)
        .bind(&names)
        .execute(&mut *conn)
        .await?;
    for t in &doc.triggers {
        let start = t.time_window_start.as_deref().and_then(parse_time_of_day);
        let end = t.time_window_end.as_deref().and_then(parse_time_of_day);
        let labels = serde_json::to_value(&t.labels_match).unwrap_or_default();
        let updated = sqlx::query(
            "UPDATE runbook_triggers SET priority = $3, alert_name_pattern = $4, \
             severity_pattern = $5, source_pattern = $6, labels_match = $7, \
             time_window_start = $8, time_window_end = $9, enabled = $10, cooldown_seconds = $11, \
             cooldown_per_instance = $12 WHERE runbook_id = $1 AND name = $2",
        )
        .bind(runbook_id)
        .bind(&t.name)
        .bind(t.priority)
        .bind(&t.alert_name_pattern)
        .bind(&t.severity_pattern)
        .bind(&t.source_pattern)
        .bind(&labels)
        .bind(start)
        .bind(end)
        .bind(t.enabled)
        .bind(t.cooldown_seconds)
        .bind(t.cooldown_per_instance)
        .execute(&mut *conn)
        .await?;
        if updated.rows_affected() == 0 {
            sqlx::query(
                "INSERT INTO runbook_triggers (runbook_id, name, priority, alert_name_pattern, \
                 severity_pattern, source_pattern, labels_match, time_window_start, \
                 time_window_end, enabled, cooldown_seconds, cooldown_per_instance) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)",
            )
            .bind(runbook_id)
            .bind(&t.name)
            .bind(t.priority)
            .bind(&t.alert_name_pattern)
            .bind(&t.severity_pattern)
            .bind(&t.source_pattern)
            .bind(&labels)
            .bind(start)
            .bind(end)
            .bind(t.enabled)
            .bind(t.cooldown_seconds)
            .bind(t.cooldown_per_instance)
            .execute(&mut *conn)
            .await?;
        }
    }
    Ok(())
}

/// One version of a runbook.
pub async fn runbook_version_get(
    conn: &mut PgConnection,
    runbook_id: Uuid,
    version: i32,
) -> StoreResult<Option<VersionRow>> {
    Ok(sqlx::query_as::<_, VersionRow>(
        "SELECT id, runbook_id, version, yaml_content, change_summary, created_by, created_at \
         FROM runbook_versions WHERE runbook_id = $1 AND version = $2",
    )
    .bind(runbook_id)
    .bind(version)
    .fetch_optional(conn)
    .await?)
}

/// The versions of a runbook, newest first, paginated; returns the page and the total.
pub async fn runbook_versions_list(
    conn: &mut PgConnection,
    runbook_id: Uuid,
    limit: i64,
    offset: i64,
) -> StoreResult<(Vec<VersionRow>, i64)> {
    let rows = sqlx::query_as::<_, VersionRow>(
        "SELECT id, runbook_id, version, yaml_content, change_summary, created_by, created_at \
         FROM runbook_versions WHERE runbook_id = $1 ORDER BY version DESC LIMIT $2 OFFSET $3",
    )
    .bind(runbook_id)
    .bind(limit)
    .bind(offset)
    .fetch_all(&mut *conn)
    .await?;
    let total: i64 =
        sqlx::query_scalar("SELECT count(*) FROM runbook_versions WHERE runbook_id = $1")
            .bind(runbook_id)
            .fetch_one(conn)
            .await?;
    Ok((rows, total))
}

/// A server as templates see it (`server.*`): no secrets. For dry runs by server id.
pub async fn runbook_server_context(
    conn: &mut PgConnection,
    server_id: Uuid,
) -> StoreResult<Option<serde_json::Value>> {
    Ok(sqlx::query_scalar(
        "SELECT jsonb_build_object('id', id, 'name', name, 'hostname', hostname, 'port', port, \
         'username', username, 'os_type', os_type, 'protocol', protocol, \
         'environment', environment, 'tags', tags) FROM server_credentials WHERE id = $1",
    )
    .bind(server_id)
    .fetch_optional(conn)
    .await?)
}

/// Takes the transaction-long lock of a runbook name (any case).
async fn lock_name(conn: &mut PgConnection, name: &str) -> StoreResult<()> {
    sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended('runbook-name:' || lower($1), 0))")
        .bind(name)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// Takes the locks of several runbook names (those [`runbook_apply`] takes one by one) in one
/// order, by their lower-case form: transactions that lock overlapping sets this way wait for
/// each other instead of deadlocking.
pub async fn runbook_lock_names(
    conn: &mut PgConnection,
    mut names: Vec<String>,
) -> StoreResult<()> {
    names.sort_by_cached_key(|name| name.to_lowercase());
    names.dedup_by(|a, b| a.to_lowercase() == b.to_lowercase());
    for name in &names {
        lock_name(conn, name).await?;
    }
    Ok(())
}

/// Creates or updates the runbook named like `doc` (locking it first), through
/// [`runbook_save`]. Two applies of a brand-new name racing each other: the loser gets
/// `StoreError::Conflict`.
pub async fn runbook_apply(
    conn: &mut PgConnection,
    doc: &RunbookDocument,
    summary: Option<&str>,
    user: Option<Uuid>,
) -> StoreResult<SaveOutcome> {
    // Applies of one name (in any case: names are unique regardless of case) take turns, so
    // that two applies of a runbook not stored yet make one create and one "unchanged", not a
    // create and a conflict; the row lock alone cannot order them while there is no row.
    lock_name(conn, &doc.name).await?;
    let existing = runbook_lock_by_name(conn, &doc.name).await?;
    runbook_save(conn, existing.as_ref(), doc, summary, user).await
}
