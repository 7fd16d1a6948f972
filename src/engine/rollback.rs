//! `execution.rollback`: runs the rollback command of one completed step (newest first), records
//! it as its own `step_executions` row (phase `rollback`), and enqueues the rest. A failed
//! rollback is recorded and the remaining ones still run: undoing as much as possible beats
//! stopping half-way. After the last one, a runbook-level retry starts its next attempt.
//! Rollbacks begin only once the step a timeout or cancel stopped has been recorded (its command
//! is gone), or after a bounded wait when its worker died.

use chrono::Utc;
use serde_json::json;

use crate::exec::CommandRequest;
use crate::queue::{JobContext, JobError, NewJob};
use crate::store::{self, executions::StepResult, executions::StepSlot};

use super::control::{begin_attempt, fail_unretried, log, snapshot_of};
use super::runner::{RenderInputs, render_inputs, stream_output, watch_execution};
use super::{Engine, EngineError, KIND_ROLLBACK, RollbackPayload};

/// How long rollbacks wait for the worker of a stopped step to record it (its command's kill
/// grace and the write); a worker that died never does.
const STOPPED_STEP_WAIT_SECONDS: i32 = 30;

/// Handles `execution.rollback`.
pub async fn handle(engine: &Engine, ctx: JobContext) -> Result<(), JobError> {
    let p: RollbackPayload = ctx.payload_as()?;
    let pool = ctx.pool().clone();
    let row = {
        let mut conn = pool.acquire().await.map_err(EngineError::from)?;
        store::executions::execution_get(&mut conn, p.execution_id).await?
    };
    let Some(row) = row else {
        return ctx.lease().guarded_tx().await?.complete().await;
    };
    // A cancelled run does not roll back: a cancel that came while the rollbacks before a
    // runbook retry ran stops the rest of them.
    if row.status == "cancelled" {
        let mut g = ctx.lease().guarded_tx().await?;
        log_stopped(g.conn(), row.id).await?;
        return g.complete().await;
    }
    // The step a timeout or cancel stopped may still be dying on its worker (its kill grace):
    // nothing is undone while its command may still be doing what the rollback undoes.
    {
        let mut conn = pool.acquire().await.map_err(EngineError::from)?;
        if store::executions::stopped_step_unrecorded(
            &mut conn,
            row.id,
            p.attempt,
            STOPPED_STEP_WAIT_SECONDS,
        )
        .await?
        {
            return Err(JobError::Snooze(std::time::Duration::from_millis(250)));
        }
    }
    let snapshot = snapshot_of(&row)?;
    let Some((&index, rest)) = p.remaining.split_first() else {
        return ctx.lease().guarded_tx().await?.complete().await;
    };
    let step = snapshot
        .steps
        .get(index)
        .cloned()
        .ok_or_else(|| JobError::Permanent(format!("step index {index} out of range")))?;
    let slot = StepSlot {
        execution_id: row.id,
        phase: "rollback",
        run_attempt: p.attempt,
        step_order: step.step_order,
    };
    let mut g = ctx.lease().guarded_tx().await?;
    let resolved = super::targets::resolve_for(
        engine.targets.as_ref(),
        g.conn(),
        row.server_id,
        &snapshot.target_os,
    )
    .await;
    let (already, interrupted, attempts) =
        store::executions::step_slot_prepare(g.conn(), slot).await?;
    if !interrupted.is_empty() {
        // A rollback whose worker died is run again; the interrupted attempt stays recorded.
        log(
            g.conn(),
            row.id,
            "rollback_interrupted",
            json!({ "step": step.name, "step_order": step.step_order,
                    "attempts": interrupted.len() }),
        )
        .await?;
    }
    if !already {
        let retry = i32::try_from(attempts).unwrap_or(0);
        let (target, secrets, server, target_error) = match resolved {
            Ok(r) => (Some(r.target), r.secrets, r.server, None),
            Err(e) => (None, Vec::new(), json!({ "error": e }), Some(e)),
        };
        // The same variables, alert, server and captured outputs the run's steps rendered with.
        let RenderInputs {
            renderer,
            tctx,
            vars,
            masker,
            env,
        } = render_inputs(
            engine,
            g.conn(),
            &row,
            &snapshot,
            (p.attempt, snapshot.steps.len()),
            server,
            secrets,
        )
        .await?;
        let rendered = vars.and_then(|v| {
            renderer
                .render_command(
                    step.rollback_command.as_deref().unwrap_or("true"),
                    &tctx,
                    &v,
                )
                .map_err(|e| masker.mask(&format!("rollback_command: {e}")))
        });
        let masked = rendered.as_ref().ok().map(|c| masker.mask(c));
        let step_row = store::executions::step_start(
            g.conn(),
            None,
            slot,
            Some(step.id),
            &step.name,
            retry,
            masked.as_deref(),
            Some(
                &json!({ "step": step.name, "step_order": step.step_order, "phase": "rollback",
                         "status": "running", "attempt": p.attempt })
                .to_string(),
            ),
        )
        .await?;
        g.commit().await?;

        let result = match (rendered, target) {
            (Err(e), _) => Err(e),
            (Ok(_), None) => Err(target_error
                .map(|e| masker.mask(&e))
                .unwrap_or_else(|| "no target for the server".to_owned())),
            (Ok(command), Some(target)) => {
                let executor = match target {
                    crate::exec::Target::Local => Some(engine.local.clone()),
                    _ => engine.ssh.clone(),
                };
                match executor {
                    None => Err(format!("no executor for {} targets", target.kind())),
                    Some(ex) => {
                        // Its output reaches the live stream as a step's does.
                        let (tx, rx) = tokio::sync::mpsc::channel(64);
                        let streamer = tokio::spawn(stream_output(
                            pool.clone(),
                            row.id,
                            step_row,
                            rx,
                            std::sync::Arc::new(masker.clone()),
                            step.sensitive,
                            engine.settings.stream_limit_bytes,
                        ));
                        let req = CommandRequest {
                            command,
                            env,
                            timeout: std::time::Duration::from_secs(
                                u64::try_from(step.timeout_seconds).unwrap_or(60),
                            ),
                            output_limit_bytes: engine.settings.output_limit_bytes,
                        };
                        // Only a cancel stops a rollback: one before a runbook retry runs
                        // while its execution is still running, and a cancel of it asks for
                        // nothing more on the host. (A final rollback runs after the end.)
                        let cancel = crate::exec::CancellationToken::new();
                        let _stop_watcher = cancel.clone().drop_guard();
                        let watcher =
                            watch_execution(engine, &ctx, row.id, None, &cancel, |status, _| {
                                status == "cancelled"
                            });
                        let ran = ex
                            .run(&target, &req, cancel.clone(), tx)
                            .await
                            .map_err(|e| e.to_string());
                        cancel.cancel();
                        let _ = watcher.await;
                        let _ = streamer.await;
                        ran
                    }
                }
            }
        };
        g = ctx.lease().guarded_tx().await?;
        let exit_signal = result.as_ref().ok().and_then(|o| o.exit_signal.clone());
        let truncated = result.as_ref().is_ok_and(|o| o.truncated);
        let (status, exit_code, stdout, stderr, error) = match result {
            Ok(o) if o.exit_code == Some(0) => (
                "completed",
                o.exit_code,
                Some(masker.mask(&o.stdout)),
                Some(masker.mask(&o.stderr)),
                None,
            ),
            Ok(o) => (
                if o.timed_out {
                    "timeout"
                } else if o.cancelled {
                    "cancelled"
                } else {
                    "failed"
                },
                o.exit_code,
                Some(masker.mask(&o.stdout)),
                Some(masker.mask(&o.stderr)),
                Some(if let Some(e) = &o.kill_error {
                    format!(
                        "rollback {}; killing it failed ({e}); it may still be running",
                        if o.timed_out {
                            "timed out"
                        } else {
                            "was stopped"
                        }
                    )
                } else if o.timed_out {
                    "rollback timed out".to_owned()
                } else if o.cancelled {
                    "rollback stopped: the run was cancelled".to_owned()
                } else {
                    match (o.exit_code, &o.exit_signal) {
                        (Some(code), _) => format!("rollback exited with code {code}"),
                        (None, Some(signal)) => format!("rollback was killed by signal {signal}"),
                        (None, None) => match &o.lost {
                            Some(why) => format!("rollback ended without an exit status: {why}"),
                            None => "rollback ended without an exit status".to_owned(),
                        },
                    }
                }),
            ),
            Err(e) => ("failed", None, None, None, Some(masker.mask(&e))),
        };
        let (stdout, stderr) = if step.sensitive {
            (
                Some("[output of a sensitive step is masked]".to_owned()),
                Some(String::new()),
            )
        } else {
            (stdout, stderr)
        };
        store::executions::step_finish(
            g.conn(),
            step_row,
            &StepResult {
                status,
                exit_code,
                exit_signal: exit_signal.as_deref(),
                stdout: stdout.as_deref(),
                stderr: stderr.as_deref(),
                truncated,
                error_message: error.as_deref(),
                ..StepResult::default()
            },
            Some(
                &json!({ "step": step.name, "phase": "rollback", "status": status,
                         "exit_code": exit_code, "error": error })
                .to_string(),
            ),
        )
        .await?;
        log(
            g.conn(),
            row.id,
            "rollback_step",
            json!({ "step": step.name, "status": status, "error": error }),
        )
        .await?;
    }
    after_rollback(&mut g, row.id, &snapshot, &p, rest, true).await?;
    g.complete().await
}

/// What follows one rollback, done or given up on (its job died): the rollbacks left (`rest`),
/// then the retry the run waits for (`p.then_attempt`), or the end of the rollbacks. A cancel
/// of the run during its rollbacks before a retry stops the ones left. `in_slot`: the next
/// rollback may continue in this job's worker slot.
pub(crate) async fn after_rollback(
    g: &mut crate::queue::GuardedTx,
    execution_id: uuid::Uuid,
    snapshot: &super::snapshot::RunbookSnapshot,
    p: &RollbackPayload,
    rest: &[usize],
    in_slot: bool,
) -> Result<(), JobError> {
    let stopped = p.then_attempt.is_some()
        && store::executions::execution_status(g.conn(), execution_id)
            .await?
            .is_some_and(|(status, _)| status == "cancelled");
    if stopped {
        log_stopped(g.conn(), execution_id).await?;
    } else if !rest.is_empty() {
        let mut job = NewJob::new(
            KIND_ROLLBACK,
            json!(RollbackPayload {
                execution_id,
                attempt: p.attempt,
                remaining: rest.to_vec(),
                then_attempt: p.then_attempt,
            }),
        );
        job.unique_key = Some(format!(
            "execution:{execution_id}:rollback:{}:{}",
            p.attempt,
            rest.len()
        ));
        job.max_attempts = 10;
        if in_slot {
            g.enqueue_next(&job).await?;
        } else {
            g.enqueue(&job).await?;
        }
    } else if let Some(next) = p.then_attempt
        && let Some(current) = store::executions::execution_lock(g.conn(), execution_id).await?
        && current.status == "running"
    {
        // The rollbacks took their time: the retry may now begin only after the deadline.
        if !begin_attempt(g, &current, snapshot, next, true).await? {
            fail_unretried(g, &current).await?;
        }
    } else {
        log(
            g.conn(),
            execution_id,
            "rollback_finished",
            json!({ "at": Utc::now() }),
        )
        .await?;
    }
    Ok(())
}

/// Records that the rollbacks left were not run because the run was cancelled.
async fn log_stopped(conn: &mut sqlx::PgConnection, id: uuid::Uuid) -> Result<(), JobError> {
    log(
        conn,
        id,
        "rollback_stopped",
        json!({ "reason": "the run was cancelled" }),
    )
    .await?;
    Ok(())
}
