//! The runbook as an execution sees it: copied from the database when the execution is created
//! and stored on the execution row, so every step of every attempt on every worker runs the same
//! definition even when the runbook is edited mid-run.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use sqlx::PgConnection;
use uuid::Uuid;

use crate::store::StoreResult;

/// One step of the snapshot.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StepSnapshot {
    /// Step definition id.
    pub id: Uuid,
    /// Position (`step_order`).
    pub step_order: i32,
    /// Name.
    pub name: String,
    /// Command template.
    pub command: String,
    /// Exit codes that count as success.
    pub expected_exit_codes: Vec<i32>,
    /// Step timeout.
    pub timeout_seconds: i32,
    /// Carry on after this step fails.
    pub continue_on_failure: bool,
    /// Condition expression; the step is skipped when false.
    pub condition: Option<String>,
    /// Undo command template.
    pub rollback_command: Option<String>,
    /// Step-level retries.
    pub retry_count: i32,
    /// Delay between step retries.
    pub retry_delay_seconds: i32,
    /// Make stdout/exit code available to later steps.
    pub capture_output: bool,
    /// Mask this step's output everywhere.
    pub sensitive: bool,
}

/// The runbook part of an execution.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunbookSnapshot {
    /// Runbook id.
    pub id: Uuid,
    /// Name.
    pub name: String,
    /// Version.
    pub version: i32,
    /// Category.
    pub category: Option<String>,
    /// Mode label.
    pub mode: String,
    /// `linux` or `windows`.
    pub target_os: String,
    /// Runbook timeout.
    pub timeout_seconds: i32,
    /// Runbook-level retries.
    pub max_retries: i32,
    /// Delay between runbook-level retries.
    pub retry_delay_seconds: i32,
    /// Executions allowed per window.
    pub rate_limit_count: Option<i32>,
    /// The window.
    pub rate_limit_window_seconds: Option<i32>,
    /// Approval needed regardless of mode.
    pub requires_approval: bool,
    /// Roles that may approve.
    pub approval_roles: Vec<String>,
    /// Variables (templates).
    pub environment_vars: BTreeMap<String, String>,
    /// Free-form configuration (`approval_timeout_seconds`, `secret_vars`).
    pub config: Value,
    /// Which servers it may run on (`domain::targeting`; empty: any server).
    #[serde(default)]
    pub allowed_servers: Value,
    /// Steps in order.
    pub steps: Vec<StepSnapshot>,
}

impl RunbookSnapshot {
    /// Whether a run needs an approval first (semi_auto mode or requires_approval).
    pub fn needs_approval(&self) -> bool {
        self.mode == "semi_auto" || self.requires_approval
    }

    /// How long an approval request stays open (runbook config `approval_timeout_seconds`,
    /// default one hour).
    pub fn approval_timeout(&self) -> chrono::Duration {
        // Validation keeps it within bounds; a runbook stored before that check is held to
        // them too.
        let seconds = self.config["approval_timeout_seconds"]
            .as_i64()
            .filter(|s| *s > 0)
            .map_or(3600, |s| {
                s.min(crate::domain::runbook::MAX_APPROVAL_TIMEOUT_SECONDS)
            });
        chrono::Duration::seconds(seconds)
    }

    /// Whether the runbook may run on a server, by `domain::targeting` (the one rule for
    /// `allowed_servers`). A run on the worker's own host (`None`) is allowed only when
    /// `allowed_servers` restricts nothing: a runbook limited to some servers never runs
    /// anywhere else.
    pub fn allows_server(
        &self,
        server: Option<&crate::domain::blackout::ServerFacts>,
    ) -> Result<bool, String> {
        let allowed = crate::domain::targeting::AllowedServers::parse(&self.allowed_servers)
            .map_err(|e| format!("allowed_servers: {e}"))?;
        Ok(match server {
            None => allowed.allows_all(),
            Some(s) => allowed.allows(&crate::domain::targeting::ServerTraits {
                id: s.id,
                tags: &s.tags,
                environment: s.environment.as_deref(),
            }),
        })
    }

    /// Names of variables whose values are secrets (runbook config `secret_vars`).
    pub fn secret_var_names(&self) -> Vec<String> {
        self.config["secret_vars"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    }
}

#[derive(sqlx::FromRow)]
struct RunbookRow {
    id: Uuid,
    name: String,
    version: i32,
    category: Option<String>,
    mode: String,
    status: String,
    target_os: String,
    timeout_seconds: i32,
    max_retries: i32,
    retry_delay_seconds: i32,
    rate_limit_count: Option<i32>,
    rate_limit_window_seconds: Option<i32>,
    requires_approval: bool,
    approval_roles: Vec<String>,
    environment_vars: Option<Value>,
    config: Option<Value>,
    allowed_servers: Option<Value>,
}

#[derive(sqlx::FromRow)]
struct StepRow {
    id: Uuid,
    step_order: i32,
    name: String,
    command: String,
    expected_exit_codes: Vec<i32>,
    timeout_seconds: i32,
    continue_on_failure: bool,
    condition: Option<String>,
    rollback_command: Option<String>,
    retry_count: i32,
    retry_delay_seconds: i32,
    capture_output: bool,
    sensitive: bool,
}

/// Loads a runbook with its steps; also returns its current status label.
pub async fn snapshot_load(
    conn: &mut PgConnection,
    runbook_id: Uuid,
) -> StoreResult<Option<(RunbookSnapshot, String)>> {
    let Some(rb) = sqlx::query_as::<_, RunbookRow>(
        "SELECT id, name, version, category, mode::text AS mode, status::text AS status, \
           target_os::text AS target_os, timeout_seconds, max_retries, retry_delay_seconds, \
           rate_limit_count, rate_limit_window_seconds, requires_approval, \
           approval_roles::text[] AS approval_roles, environment_vars, config, allowed_servers \
         FROM runbooks WHERE id = $1",
    )
    .bind(runbook_id)
    .fetch_optional(&mut *conn)
    .await?
    else {
        return Ok(None);
    };
    let steps = sqlx::query_as::<_, StepRow>(
        "SELECT id, step_order, name, command, expected_exit_codes, timeout_seconds, \
           continue_on_failure, condition, rollback_command, retry_count, retry_delay_seconds, \
           capture_output, sensitive \
         FROM runbook_steps WHERE runbook_id = $1 ORDER BY step_order",
    )
    .bind(runbook_id)
    .fetch_all(conn)
    .await?;
    let environment_vars = match rb.environment_vars {
        Some(Value::Object(map)) => map
            .into_iter()
            .map(|(k, v)| {
                let text = match v {
                    Value::String(s) => s,
                    other => other.to_string(),
                };
                (k, text)
            })
            .collect(),
        _ => BTreeMap::new(),
    };
    Ok(Some((
        RunbookSnapshot {
            id: rb.id,
            name: rb.name,
            version: rb.version,
            category: rb.category,
            mode: rb.mode,
            target_os: rb.target_os,
            timeout_seconds: rb.timeout_seconds,
            max_retries: rb.max_retries,
            retry_delay_seconds: rb.retry_delay_seconds,
            rate_limit_count: rb.rate_limit_count,
            rate_limit_window_seconds: rb.rate_limit_window_seconds,
            requires_approval: rb.requires_approval,
            approval_roles: rb.approval_roles,
            environment_vars,
            config: rb.config.unwrap_or(Value::Null),
            allowed_servers: rb.allowed_servers.unwrap_or(Value::Null),
            steps: steps
                .into_iter()
                .map(|s| StepSnapshot {
                    id: s.id,
                    step_order: s.step_order,
                    name: s.name,
                    command: s.command,
                    expected_exit_codes: s.expected_exit_codes,
                    timeout_seconds: s.timeout_seconds,
                    continue_on_failure: s.continue_on_failure,
                    condition: s.condition,
                    rollback_command: s.rollback_command,
                    retry_count: s.retry_count,
                    retry_delay_seconds: s.retry_delay_seconds,
                    capture_output: s.capture_output,
                    sensitive: s.sensitive,
                })
                .collect(),
        },
        rb.status,
    )))
}

/// What the start gates read of a runbook as it is now, not as its snapshot was: its status
/// label and its category (`None` when it was deleted).
pub async fn runbook_gate_facts(
    conn: &mut PgConnection,
    runbook_id: Uuid,
) -> StoreResult<Option<(String, Option<String>)>> {
    Ok(
        sqlx::query_as("SELECT status::text, category FROM runbooks WHERE id = $1")
            .bind(runbook_id)
            .fetch_optional(conn)
            .await?,
    )
}
