//! Creating executions and every status change that does not run a command: approve, reject,
//! cancel, approval expiry, the runbook deadline, and the end of a run (success, failure with
//! rollback and retry, timeout). Each change applies `domain::execution::transition` to the
//! status it read under a row lock, then a compare-and-set update.

use chrono::Utc;
use serde_json::{Value, json};
use sqlx::PgConnection;
use uuid::Uuid;

use crate::domain::execution::{Effect, Event, State, Status, transition};
use crate::queue::{GuardedTx, JobContext, JobError, NewJob};
use crate::store::{
    self,
    executions::{ExecutionEnd, ExecutionRow, StepResult},
};

use super::snapshot::{RunbookSnapshot, snapshot_load};
use super::{
    Engine, EngineError, ExecutionPayload, KIND_APPROVAL_EXPIRY, KIND_DEADLINE, KIND_ROLLBACK,
    RollbackPayload, start_job, step_job,
};

/// A request to run a runbook.
#[derive(Debug, Clone)]
pub struct StartRequest {
    /// Runbook.
    pub runbook_id: Uuid,
    /// Target server (`None`: the worker's own host).
    pub server_id: Option<Uuid>,
    /// Variables (override the runbook's environment_vars of the same name).
    pub variables: serde_json::Map<String, Value>,
    /// Who asked (manual runs).
    pub initiated_by: Option<Uuid>,
    /// Triggering alert.
    pub alert_id: Option<Uuid>,
    /// Triggering trigger.
    pub trigger_id: Option<Uuid>,
    /// Fan-out batch and its concurrency.
    pub batch: Option<(Uuid, i32)>,
}

/// Checks the variables given at start: each is one the runbook declares in `environment_vars`
/// or lists in `config.secret_vars` (whoever starts a run cannot hand its commands an
/// environment variable the runbook's author did not choose, such as `PERL5OPT` or
/// `LD_PRELOAD`), and a string, number or boolean (`null` leaves it out, so the runbook's value
/// stays). Returns them as stored, each value as text.
fn start_variables(
    snapshot: &RunbookSnapshot,
    given: &serde_json::Map<String, Value>,
) -> Result<serde_json::Map<String, Value>, EngineError> {
    let mut out = serde_json::Map::new();
    let secret_names = snapshot.secret_var_names();
    for (name, value) in given {
        let refuse = |reason: &str| EngineError::Invalid {
            field: format!("variables.{name}"),
            reason: reason.to_owned(),
        };
        if !crate::domain::runbook::valid_identifier(name) {
            return Err(refuse(
                "must be a name of letters, digits and '_' not starting with a digit",
            ));
        }
        if crate::domain::runbook::RESERVED_CONTEXT_NAMES.contains(&name.as_str()) {
            return Err(refuse(
                "is a reserved template name (alert, server, vars, steps, execution)",
            ));
        }
        if !snapshot.environment_vars.contains_key(name) && !secret_names.contains(name) {
            return Err(refuse(
                "is not a variable of the runbook; a run takes at start only the variables its \
                 runbook declares in environment_vars or lists in config.secret_vars",
            ));
        }
        let text = match value {
            Value::Null => continue,
            Value::String(s) => s.clone(),
            Value::Number(n) => number_text(n).ok_or_else(|| {
                refuse(
                    "is a whole number beyond 2^53, which JSON numbers do not keep exactly; \
                     give it as a string",
                )
            })?,
            Value::Bool(_) => value.to_string(),
            Value::Array(_) | Value::Object(_) => {
                return Err(refuse("must be a string, a number or a boolean"));
            }
        };
        // A secret is masked wherever it appears; two characters or fewer would mask ordinary
        // text, so they are not masked at all, and such a secret would show.
        if !text.is_empty()
            && text.trim().chars().count() < 3
            && (crate::domain::runbook::is_secret_name(name) || secret_names.contains(name))
        {
            return Err(refuse(
                "is a secret too short to be masked in output (at least 3 characters)",
            ));
        }
        out.insert(name.clone(), Value::String(text));
    }
    Ok(out)
}

/// A number as a command sees it: integers as integers (`1e3` is `1000`, not `1000.0`), other
/// values in the shortest form that reads back as the same double (`0.1`). Numbers are read as
/// doubles, so digits beyond about 16 significant ones are rounded (the README says to give
/// such values as strings). `None` for a whole number beyond 2^53 read as a double (such as
/// `100000000000000000000`), whose digits would be made up.
fn number_text(n: &serde_json::Number) -> Option<String> {
    if n.is_i64() || n.is_u64() {
        return Some(n.to_string());
    }
    let f = n.as_f64()?;
    const EXACT: f64 = 9_007_199_254_740_992.0; // 2^53
    if !f.is_finite() || f.abs() >= EXACT {
        return None;
    }
    if f.fract() == 0.0 {
        // Whole and below 2^53: exactly an integer (`-0` is `0`).
        return Some(format!("{}", f as i64));
    }
    Some(format!("{f}"))
}

/// Creates a pending execution and enqueues its start job, in the caller's transaction. Secret
/// variables are sealed with `keyring` (see [`super::secret_vars`]). The caller wakes the
/// workers once the transaction has committed (the API's `job_notifier`, a handler's
/// [`GuardedTx::wake_after_commit`]); a `NOTIFY` inside it would hold PostgreSQL's global
/// notification lock through the commit.
pub async fn create_execution(
    conn: &mut PgConnection,
    req: &StartRequest,
    keyring: Option<&crate::crypto::secrets::Keyring>,
) -> Result<Uuid, EngineError> {
    let (snapshot, _status) = snapshot_load(conn, req.runbook_id).await?.ok_or_else(|| {
        EngineError::UnknownReference {
            field: "runbook_id".into(),
            what: format!("runbook {}", req.runbook_id),
        }
    })?;
    if snapshot.steps.is_empty() {
        return Err(EngineError::Invalid {
            field: "runbook_id".into(),
            reason: "the runbook has no steps".into(),
        });
    }
    if snapshot.target_os == "windows" {
        // Its commands are quoted and checked by PowerShell rules; the worker's host and SSH
        // servers run them with /bin/sh, where that quoting does not hold.
        return Err(EngineError::Invalid {
            field: "runbook_id".into(),
            reason: format!(
                "runbook {} targets windows, which needs a WinRM executor; this deployment runs \
                 commands on the worker's host and over SSH with /bin/sh only",
                snapshot.name
            ),
        });
    }
    if let Some(server_id) = req.server_id {
        let facts = store::blackouts::blackout_server_facts(conn, server_id)
            .await?
            .ok_or_else(|| EngineError::UnknownReference {
                field: "server_id".into(),
                what: format!("server {server_id}"),
            })?;
        let allowed =
            snapshot
                .allows_server(Some(&facts))
                .map_err(|reason| EngineError::Invalid {
                    field: "runbook_id".into(),
                    reason,
                })?;
        if !allowed {
            return Err(EngineError::Invalid {
                field: "server_id".into(),
                reason: format!(
                    "runbook {} may not run on this server (allowed_servers)",
                    snapshot.name
                ),
            });
        }
    } else if !snapshot
        .allows_server(None)
        .map_err(|reason| EngineError::Invalid {
            field: "runbook_id".into(),
            reason,
        })?
    {
        return Err(EngineError::Invalid {
            field: "server_id".into(),
            reason: format!(
                "runbook {} runs only on the servers its allowed_servers selects; give one of \
                 them (without a server a run would take the worker's own host)",
                snapshot.name
            ),
        });
    }
    let snapshot_json = serde_json::to_value(&snapshot).map_err(|e| EngineError::Invalid {
        field: "runbook_id".into(),
        reason: e.to_string(),
    })?;
    let variables = start_variables(&snapshot, &req.variables)?;
    let id = Uuid::new_v4();
    let (stored_vars, sealed) = super::secret_vars::seal(id, &snapshot, &variables, keyring)?;
    let context = Value::Object(stored_vars);
    let created = log_entry("created", json!({ "runbook_version": snapshot.version }));
    let id = store::executions::execution_create(
        conn,
        &store::executions::NewExecution {
            id,
            secret_vars_encrypted: sealed.as_deref(),
            runbook_id: req.runbook_id,
            runbook_version: snapshot.version,
            server_id: req.server_id,
            alert_id: req.alert_id,
            trigger_id: req.trigger_id,
            mode: &snapshot.mode,
            initiated_by: req.initiated_by,
            context_vars: &context,
            runbook_snapshot: &snapshot_json,
            max_attempts: snapshot.max_retries.clamp(0, i32::MAX - 1) + 1,
            batch_id: req.batch.map(|b| b.0),
            batch_concurrency: req.batch.map(|b| b.1),
            log_entry: &created,
        },
    )
    .await?;
    store::jobs::job_enqueue(conn, &start_job(id)).await?;
    Ok(id)
}

/// Appends to `execution_log` and the live stream.
pub(crate) async fn log(
    conn: &mut PgConnection,
    id: Uuid,
    event: &str,
    details: Value,
) -> Result<(), EngineError> {
    store::executions::execution_log_append(conn, id, &[log_entry(event, details)]).await?;
    Ok(())
}

/// One `execution_log` entry.
pub(crate) fn log_entry(event: &str, details: Value) -> Value {
    json!({ "at": Utc::now(), "event": event, "details": details })
}

pub(crate) fn state_of(row: &ExecutionRow) -> State {
    State {
        status: row.status.parse().unwrap_or(Status::Failed),
        attempt: u32::try_from(row.attempt).unwrap_or(0),
        max_attempts: u32::try_from(row.max_attempts).unwrap_or(1),
    }
}

pub(crate) fn snapshot_of(row: &ExecutionRow) -> Result<RunbookSnapshot, EngineError> {
    serde_json::from_value(row.runbook_snapshot.clone()).map_err(|e| EngineError::Invalid {
        field: "runbook_snapshot".into(),
        reason: e.to_string(),
    })
}

/// Ends an execution with a gate refusal (cancelled, with the gate and reason recorded).
pub(crate) async fn refuse(
    conn: &mut PgConnection,
    row: &ExecutionRow,
    gate: &str,
    reason: &str,
) -> Result<bool, EngineError> {
    if transition(state_of(row), &Event::GateRefused(reason.to_owned())).is_err() {
        return Ok(false);
    }
    let done = store::executions::execution_finish(
        conn,
        row.id,
        &ExecutionEnd {
            from: &["pending", "approved"],
            to: "cancelled",
            error_message: Some(&format!("refused by {gate}: {reason}")),
            refused_by: Some(gate),
            log: &[log_entry(
                "refused",
                json!({ "gate": gate, "reason": reason }),
            )],
            ..ExecutionEnd::default()
        },
    )
    .await?;
    // A trigger's cooldown counts runs, not refusals: the alert that comes after the blackout
    // (or the open breaker, the rate limit) may start the runbook.
    if done && let Some(trigger_id) = row.trigger_id {
        store::alerts::trigger_cooldown_release(conn, trigger_id, row.id, GATE_REFUSALS).await?;
    }
    Ok(done)
}

/// The `refused_by` values of the start gates (an approval's rejection or expiry is a person's
/// decision, not a gate's).
pub(crate) const GATE_REFUSALS: &[&str] = &[
    "runbook_inactive",
    "target",
    "blackout",
    "circuit_breaker",
    "rate_limit",
];

/// Approves a pending execution on behalf of a user holding one of the runbook's approval
/// roles, and enqueues its start job; the caller wakes the workers after the commit.
pub async fn approve(
    conn: &mut PgConnection,
    execution_id: Uuid,
    user_id: Uuid,
    user_role: &str,
) -> Result<(), EngineError> {
    let row = lock_awaiting_approval(conn, execution_id, user_role).await?;
    transition(state_of(&row), &Event::Approved)
        .map_err(|e| EngineError::Conflict(e.to_string()))?;
    if !store::executions::execution_approve(conn, execution_id, user_id).await? {
        return Err(EngineError::Conflict(
            "the approval request expired or was already decided".into(),
        ));
    }
    log(conn, execution_id, "approved", json!({ "by": user_id })).await?;
    store::jobs::job_cancel_pending(conn, &approval_expiry_key(execution_id)).await?;
    store::jobs::job_enqueue(conn, &start_job(execution_id)).await?;
    Ok(())
}

/// Locks an execution that waits for approval, for a user whose role may decide on it.
async fn lock_awaiting_approval(
    conn: &mut PgConnection,
    execution_id: Uuid,
    user_role: &str,
) -> Result<ExecutionRow, EngineError> {
    let row = store::executions::execution_lock(conn, execution_id)
        .await?
        .ok_or_else(|| EngineError::NotFound(format!("execution {execution_id}")))?;
    check_approver(&row, user_role)?;
    if !row.awaiting_approval {
        return Err(EngineError::Conflict(format!(
            "execution {execution_id} is {} and not waiting for approval",
            row.status
        )));
    }
    Ok(row)
}

fn check_approver(row: &ExecutionRow, user_role: &str) -> Result<(), EngineError> {
    let snapshot = snapshot_of(row)?;
    if snapshot.approval_roles.iter().any(|r| r == user_role) {
        Ok(())
    } else {
        Err(EngineError::Forbidden(format!(
            "only the roles {:?} may approve or reject runs of {}; you are {user_role}",
            snapshot.approval_roles, snapshot.name
        )))
    }
}

/// Rejects a pending execution.
pub async fn reject(
    conn: &mut PgConnection,
    execution_id: Uuid,
    user_id: Uuid,
    user_role: &str,
    reason: Option<&str>,
) -> Result<(), EngineError> {
    let row = lock_awaiting_approval(conn, execution_id, user_role).await?;
    let message = format!("rejected: {}", reason.unwrap_or("no reason given"));
    transition(state_of(&row), &Event::Rejected(message.clone()))
        .map_err(|e| EngineError::Conflict(e.to_string()))?;
    store::executions::execution_finish(
        conn,
        execution_id,
        &ExecutionEnd {
            from: &["pending"],
            to: "cancelled",
            error_message: Some(&message),
            refused_by: Some("approval_rejected"),
            log: &[log_entry(
                "rejected",
                json!({ "by": user_id, "reason": reason }),
            )],
            ..ExecutionEnd::default()
        },
    )
    .await?;
    store::executions::execution_request_cancel(conn, execution_id, Some(user_id)).await?;
    store::jobs::job_cancel_pending(conn, &approval_expiry_key(execution_id)).await?;
    Ok(())
}

/// Deletes a runbook (its row locked by the caller) and cancels, in the same transaction, the
/// runs of it that wait for approval: approved, they would run a runbook that is gone. Returns
/// the ids of the runs cancelled. Used by the API's delete and by `aiops runbook apply --prune`.
pub async fn delete_runbook(
    conn: &mut PgConnection,
    runbook_id: Uuid,
    name: &str,
    user_id: Option<Uuid>,
) -> Result<Vec<Uuid>, EngineError> {
    let waiting = store::alerts::runbook_executions_awaiting_approval(conn, runbook_id).await?;
    let reason = format!("runbook {name} was deleted while the run waited for approval");
    for execution_id in &waiting {
        match cancel(conn, *execution_id, user_id, &reason).await {
            Ok(()) | Err(EngineError::Conflict(_)) => {}
            Err(e) => return Err(e),
        }
    }
    store::runbooks::runbook_delete(conn, runbook_id).await?;
    Ok(waiting)
}

/// Cancels an execution that has not finished; a running step notices within its poll interval
/// and kills its command.
pub async fn cancel(
    conn: &mut PgConnection,
    execution_id: Uuid,
    user_id: Option<Uuid>,
    reason: &str,
) -> Result<(), EngineError> {
    let row = store::executions::execution_lock(conn, execution_id)
        .await?
        .ok_or_else(|| EngineError::NotFound(format!("execution {execution_id}")))?;
    let t = transition(state_of(&row), &Event::CancelRequested(reason.to_owned()))
        .map_err(|e| EngineError::Conflict(e.to_string()))?;
    store::executions::execution_request_cancel(conn, execution_id, user_id).await?;
    // A run that started says how far it got, as a run that failed or timed out does.
    let summary = match row.started_at {
        Some(_) => Some(run_summary(conn, &row, false).await?),
        None => None,
    };
    store::executions::execution_finish(
        conn,
        execution_id,
        &ExecutionEnd {
            from: &["pending", "approved", "running"],
            to: t.next.status.as_str(),
            error_message: Some(reason),
            output_summary: summary.as_deref(),
            log: &[log_entry(
                "cancelled",
                json!({ "by": user_id, "reason": reason }),
            )],
            cancel_pending_job: Some(&deadline_key(execution_id)),
            ..ExecutionEnd::default()
        },
    )
    .await?;
    // A run cancelled while it waited for approval no longer needs the approval's timer.
    if row.awaiting_approval {
        store::jobs::job_cancel_pending(conn, &approval_expiry_key(execution_id)).await?;
    }
    Ok(())
}

/// `execution.approval_expiry`: cancels the execution if it still waits for approval.
pub async fn handle_approval_expiry(engine: &Engine, ctx: JobContext) -> Result<(), JobError> {
    let p: ExecutionPayload = ctx.payload_as()?;
    let mut g = ctx.lease().guarded_tx().await?;
    if let Some(row) = store::executions::execution_lock(g.conn(), p.execution_id).await?
        && row.awaiting_approval
        && row.approval_expires_at.is_some_and(|t| t <= Utc::now())
        && transition(state_of(&row), &Event::ApprovalExpired).is_ok()
    {
        store::executions::execution_finish(
            g.conn(),
            row.id,
            &ExecutionEnd {
                from: &["pending"],
                to: "cancelled",
                error_message: Some("approval expired"),
                refused_by: Some("approval_expired"),
                log: &[log_entry("approval_expired", json!({}))],
                ..ExecutionEnd::default()
            },
        )
        .await?;
    }
    let _ = engine;
    g.complete().await
}

/// The job that expires an approval request.
pub(crate) fn approval_expiry_job(execution_id: Uuid, at: chrono::DateTime<Utc>) -> NewJob {
    let mut job = NewJob::new(
        KIND_APPROVAL_EXPIRY,
        json!(ExecutionPayload { execution_id }),
    );
    job.run_at = Some(at);
    job.unique_key = Some(approval_expiry_key(execution_id));
    job
}

/// The unique key of an execution's approval expiry job, which deciding the approval cancels.
fn approval_expiry_key(execution_id: Uuid) -> String {
    format!("execution:{execution_id}:approval_expiry")
}

fn deadline_key(execution_id: Uuid) -> String {
    format!("execution:{execution_id}:deadline")
}

/// The job that enforces the runbook timeout.
pub(crate) fn deadline_job(execution_id: Uuid, at: chrono::DateTime<Utc>) -> NewJob {
    let mut job = NewJob::new(KIND_DEADLINE, json!(ExecutionPayload { execution_id }));
    job.run_at = Some(at);
    job.unique_key = Some(deadline_key(execution_id));
    job
}

/// `execution.deadline`: the runbook's timeout passed; a still-running execution times out,
/// its running command is killed (the step notices the status) and completed steps roll back.
pub async fn handle_deadline(engine: &Engine, ctx: JobContext) -> Result<(), JobError> {
    let p: ExecutionPayload = ctx.payload_as()?;
    let mut g = ctx.lease().guarded_tx().await?;
    if let Some(row) = store::executions::execution_lock(g.conn(), p.execution_id).await?
        && row.status == "running"
    {
        let snapshot = snapshot_of(&row)?;
        let deadline = row
            .started_at
            .map(|s| s + chrono::Duration::seconds(i64::from(snapshot.timeout_seconds)));
        if deadline.is_some_and(|d| d <= Utc::now()) {
            finish_run(engine, &mut g, &row, Event::TimedOut).await?;
        }
    }
    g.complete().await
}

/// Applies the end of a run (success, failure, timeout) to a locked execution row: status,
/// rollback, runbook-level retry, circuit breaker. Returns whether anything changed.
pub(crate) async fn finish_run(
    _engine: &Engine,
    g: &mut GuardedTx,
    row: &ExecutionRow,
    event: Event,
) -> Result<bool, JobError> {
    end_run(g, row, event, false).await
}

/// Ends a run whose failed attempt has been rolled back already and whose next attempt could
/// begin only after the runbook deadline ([`begin_attempt`] said so): it fails now, saying why
/// it is not retried, and nothing is rolled back again.
pub(crate) async fn fail_unretried(g: &mut GuardedTx, row: &ExecutionRow) -> Result<(), JobError> {
    let reason = format!("attempt {} failed", row.attempt);
    end_run(g, row, Event::RunFailed(reason), true).await?;
    Ok(())
}

/// [`finish_run`]; `rolled_back` when the attempt's rollbacks have run already.
async fn end_run(
    g: &mut GuardedTx,
    row: &ExecutionRow,
    event: Event,
    rolled_back: bool,
) -> Result<bool, JobError> {
    let snapshot = snapshot_of(row)?;
    let mut state = state_of(row);
    // A runbook-level retry that could begin only after the runbook deadline would wait there
    // and end as a timeout: the run fails now, saying why it is not retried.
    let event = match event {
        Event::RunFailed(reason) if state.attempt < state.max_attempts => {
            let deadline = row.started_at.map(|started| {
                started + chrono::Duration::seconds(i64::from(snapshot.timeout_seconds))
            });
            let retry_at =
                Utc::now() + chrono::Duration::seconds(i64::from(snapshot.retry_delay_seconds));
            if deadline.is_some_and(|deadline| retry_at >= deadline) {
                state.max_attempts = state.attempt;
                Event::RunFailed(format!(
                    "{reason}; not retried: after the retry delay ({} s) the runbook timeout \
                     ({} s from the start) would have passed",
                    snapshot.retry_delay_seconds, snapshot.timeout_seconds
                ))
            } else {
                Event::RunFailed(reason)
            }
        }
        other => other,
    };
    let Ok(t) = transition(state, &event) else {
        return Ok(false);
    };
    let summary = run_summary(g.conn(), row, matches!(event, Event::TimedOut)).await?;
    let mut rollback_then: Option<Option<i32>> = None;
    // Log entries of this end, appended with the status change (one new version of the row),
    // or on their own when the execution goes on running.
    let mut entries = Vec::new();
    let mut finish: Option<Option<&str>> = None;
    for effect in &t.effects {
        match effect {
            Effect::Finish(reason) => finish = Some(reason.as_deref()),
            Effect::Rollback => rollback_then = Some(None),
            Effect::ScheduleRetry { attempt } => rollback_then = Some(Some(*attempt as i32)),
            Effect::RecordOutcome { success: true }
                if store::breakers::breaker_peek(g.conn(), snapshot.id)
                    .await?
                    .is_some_and(|(state, failures)| state == "closed" && failures == 0) =>
            {
                // A success leaves a closed breaker without failures as it is: no row lock.
                entries.push(breaker_entry("closed", 0));
            }
            Effect::RecordOutcome { success } => {
                if let Some(mut b) = store::breakers::breaker_lock(g.conn(), snapshot.id).await? {
                    let mut breaker = b.breaker();
                    if *success {
                        breaker.record_success(b.read_at);
                    } else {
                        breaker.record_failure(b.read_at);
                    }
                    store::breakers::breaker_save(g.conn(), snapshot.id, &breaker).await?;
                    b.state = breaker.state.as_str().to_owned();
                    entries.push(breaker_entry(&b.state, breaker.failure_count));
                }
            }
            Effect::KillRunning
            | Effect::EnqueueStart
            | Effect::AwaitApproval
            | Effect::StartRun { .. } => {}
        }
    }
    entries.push(outcome_entry(&event, t.next.status, row, &summary));
    match finish {
        Some(reason) => {
            store::executions::execution_finish(
                g.conn(),
                row.id,
                &ExecutionEnd {
                    from: &["running"],
                    to: t.next.status.as_str(),
                    error_message: reason,
                    output_summary: Some(&summary),
                    log: &entries,
                    // The runbook deadline's timer is no longer needed.
                    cancel_pending_job: Some(&deadline_key(row.id)),
                    ..ExecutionEnd::default()
                },
            )
            .await?;
        }
        None => store::executions::execution_log_append(g.conn(), row.id, &entries).await?,
    }
    if let Some(then_attempt) = rollback_then.filter(|_| !rolled_back) {
        start_rollback(g, row, &snapshot, then_attempt).await?;
    }
    Ok(true)
}

/// Enqueues the rollback of the attempt's completed steps, newest first; then the next attempt
/// when `then_attempt` is set.
async fn start_rollback(
    g: &mut GuardedTx,
    row: &ExecutionRow,
    snapshot: &RunbookSnapshot,
    then_attempt: Option<i32>,
) -> Result<(), JobError> {
    let done = store::executions::step_completed_runs(g.conn(), row.id, row.attempt).await?;
    let mut remaining: Vec<usize> = done
        .iter()
        .filter(|r| r.status == "completed" && !r.skipped)
        .filter_map(|r| {
            snapshot
                .steps
                .iter()
                .position(|s| s.step_order == r.step_order)
        })
        .filter(|i| snapshot.steps[*i].rollback_command.is_some())
        .collect();
    remaining.sort_unstable();
    remaining.reverse();
    if remaining.is_empty() {
        if let Some(attempt) = then_attempt {
            // The end of the run checked the deadline a moment ago.
            begin_attempt(g, row, snapshot, attempt, false).await?;
        }
        return Ok(());
    }
    let mut job = NewJob::new(
        KIND_ROLLBACK,
        json!(RollbackPayload {
            execution_id: row.id,
            attempt: row.attempt,
            remaining: remaining.clone(),
            then_attempt,
        }),
    );
    job.unique_key = Some(format!(
        "execution:{}:rollback:{}:{}",
        row.id,
        row.attempt,
        remaining.len()
    ));
    job.max_attempts = 10;
    g.enqueue(&job).await?;
    Ok(())
}

/// Moves to the next runbook-level attempt and enqueues its first step after the retry delay.
/// With `check_deadline` (after the attempt's rollbacks, which take their time), returns false
/// and schedules nothing when the attempt could begin only after the runbook deadline: the
/// caller then ends the run ([`fail_unretried`]).
pub(crate) async fn begin_attempt(
    g: &mut GuardedTx,
    row: &ExecutionRow,
    snapshot: &RunbookSnapshot,
    attempt: i32,
    check_deadline: bool,
) -> Result<bool, JobError> {
    let begins = Utc::now() + chrono::Duration::seconds(i64::from(snapshot.retry_delay_seconds));
    let deadline = row
        .started_at
        .map(|started| started + chrono::Duration::seconds(i64::from(snapshot.timeout_seconds)));
    if check_deadline && deadline.is_some_and(|deadline| begins >= deadline) {
        return Ok(false);
    }
    if !store::executions::execution_next_attempt(g.conn(), row.id, attempt).await? {
        return Ok(true);
    }
    let mut job = step_job(row.id, attempt, 0, 0);
    job.payload["begins_attempt"] = json!(true);
    job.run_at = Some(begins);
    g.enqueue(&job).await?;
    log(
        g.conn(),
        row.id,
        "retry_scheduled",
        json!({ "attempt": attempt, "delay_seconds": snapshot.retry_delay_seconds }),
    )
    .await?;
    Ok(true)
}

/// The log entry of the breaker's state after a run's outcome was counted.
fn breaker_entry(state: &str, failures: i32) -> Value {
    log_entry(
        "circuit_breaker",
        json!({ "state": state, "failures": failures }),
    )
}

/// The log entry of how run attempt `row.attempt` ended (`event`, leading to `next`).
fn outcome_entry(event: &Event, next: Status, row: &ExecutionRow, summary: &str) -> Value {
    log_entry(
        match event {
            Event::RunSucceeded => "completed",
            Event::TimedOut => "timed_out",
            Event::RunFailed(_) if next == Status::Running => "attempt_failed",
            _ => "failed",
        },
        json!({ "attempt": row.attempt, "summary": summary }),
    )
}

/// A one-line summary of an attempt's steps.
/// At the runbook deadline (`deadline`), a step still running is being stopped by it: its row
/// is recorded after this end commits, and it counts as a failed attempt now.
async fn run_summary(
    conn: &mut PgConnection,
    row: &ExecutionRow,
    deadline: bool,
) -> Result<String, EngineError> {
    let mut steps = store::executions::step_list(conn, row.id).await?;
    if deadline {
        for step in steps.iter_mut().filter(|s| s.status == "running") {
            step.status = "timeout".to_owned();
        }
    }
    Ok(summarize(&steps, row, None))
}

/// The run's summary from its step rows; `last`, when given, is the result of a step row whose
/// end is written in the same statement as the summary (the row read still says `running`).
/// A run attempt that ended while waiting to begin (a cancel or the deadline during the delay
/// before a runbook retry) is summarized with the attempt before it, which did run.
fn summarize(
    steps: &[store::executions::StepRow],
    row: &ExecutionRow,
    last: Option<(Uuid, &StepResult<'_>)>,
) -> String {
    let counts = |attempt: i32| {
        let this: Vec<(&str, bool)> = steps
            .iter()
            .filter(|s| s.phase == "run" && s.run_attempt == attempt && !s.interrupted)
            .map(|s| match last {
                Some((id, r)) if id == s.id => (r.status, r.skipped),
                _ => (s.status.as_str(), s.skipped),
            })
            .collect();
        let completed = this
            .iter()
            .filter(|(status, skipped)| *status == "completed" && !skipped)
            .count();
        let skipped = this.iter().filter(|(_, skipped)| *skipped).count();
        // A step attempt its own timeout stopped failed too.
        let failed = this
            .iter()
            .filter(|(status, _)| matches!(*status, "failed" | "timeout"))
            .count();
        format!("{completed} step(s) completed, {skipped} skipped, {failed} failed attempt(s)")
    };
    let begun = steps
        .iter()
        .any(|s| s.phase == "run" && s.run_attempt == row.attempt);
    if !begun && row.attempt > 1 {
        return format!(
            "attempt {} of {} had not begun; attempt {}: {}",
            row.attempt,
            row.max_attempts,
            row.attempt - 1,
            counts(row.attempt - 1)
        );
    }
    format!(
        "attempt {} of {}: {}",
        row.attempt,
        row.max_attempts,
        counts(row.attempt)
    )
}

/// The end of a run whose last step succeeded, to write in one statement with that step's
/// result and its job's completion ([`store::executions::step_end_run_writes`]).
pub(crate) struct SuccessEnd {
    pub(crate) to: &'static str,
    pub(crate) reason: Option<String>,
    pub(crate) summary: String,
    pub(crate) log: Value,
    pub(crate) deadline_key: String,
}

impl SuccessEnd {
    pub(crate) fn as_run_end(&self, row: &ExecutionRow) -> store::executions::RunEnd<'_> {
        store::executions::RunEnd {
            execution_id: row.id,
            attempt: row.attempt,
            to: self.to,
            error_message: self.reason.as_deref(),
            output_summary: &self.summary,
            log: &self.log,
            cancel_pending_job: &self.deadline_key,
        }
    }
}

/// Decides, without locking anything, how run attempt `row.attempt` of a run of runbook
/// `runbook_id` ends now that its last step (attempt row `last.0`) ended with `last.1`: what
/// [`finish_run`] would write for [`Event::RunSucceeded`], valid as long as the execution is
/// still running in this attempt (the statement that writes it checks that). `None` when ending
/// needs more than the execution row, so [`finish_run`] must decide under the row locks: a
/// circuit breaker in any state but closed without failures (its counters change), or a
/// transition with other effects.
pub(crate) async fn plan_success_end(
    conn: &mut PgConnection,
    row: &ExecutionRow,
    runbook_id: Uuid,
    last: (Uuid, &StepResult<'_>),
) -> Result<Option<SuccessEnd>, JobError> {
    let Ok(t) = transition(state_of(row), &Event::RunSucceeded) else {
        return Ok(None);
    };
    let mut entries = Vec::new();
    let mut reason = None;
    for effect in &t.effects {
        match effect {
            Effect::Finish(r) => reason = Some(r.clone()),
            Effect::RecordOutcome { success: true } => {
                match store::breakers::breaker_peek(conn, runbook_id).await? {
                    // No breaker row: nothing to count (as `breaker_lock` finds nothing).
                    None => {}
                    Some((state, 0)) if state == "closed" => {
                        entries.push(breaker_entry("closed", 0))
                    }
                    Some(_) => return Ok(None),
                }
            }
            _ => return Ok(None),
        }
    }
    let Some(reason) = reason else {
        return Ok(None);
    };
    let steps = store::executions::step_list(conn, row.id).await?;
    let summary = summarize(&steps, row, Some(last));
    entries.push(outcome_entry(
        &Event::RunSucceeded,
        t.next.status,
        row,
        &summary,
    ));
    Ok(Some(SuccessEnd {
        to: t.next.status.as_str(),
        reason,
        summary,
        log: Value::Array(entries),
        deadline_key: deadline_key(row.id),
    }))
}
