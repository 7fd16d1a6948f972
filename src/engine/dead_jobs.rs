//! `execution.dead_jobs`: a run whose step, rollback or start job died (its attempts exhausted:
//! a command that crashed or got its worker killed on every attempt, a handler that kept
//! failing) would wait for its deadline, or for ever, with an attempt row left `running` and a
//! live stream that never ends. Once a minute each such death is handled once (`job_died` in
//! the run's log): the attempt rows are closed as interrupted; a step's fails its running run as
//! a failed step does (rollback, runbook retry and circuit breaker included); a start job's
//! cancels the run not started yet; a rollback's counts as that rollback failing: the rollbacks
//! left still run, then the retry the run waits for, whatever the run's status.

use serde_json::json;

use crate::queue::{JobContext, JobError, KindOptions, NewJob, QueueError, Registry};
use crate::store;

use super::control::{cancel, finish_run, log, snapshot_of};
use super::rollback::after_rollback;
use super::{Engine, EngineError, KIND_ROLLBACK, KIND_START, KIND_STEP, RollbackPayload};
use crate::domain::execution::Event;

/// The job kind.
pub const KIND: &str = "execution.dead_jobs";

/// Registers the handler and its schedule (every minute).
pub(crate) fn register(
    registry: &mut Registry,
    engine: std::sync::Arc<Engine>,
) -> Result<(), QueueError> {
    registry.register(KIND, KindOptions::default(), move |ctx| {
        let engine = engine.clone();
        async move { handle(&engine, ctx).await }
    });
    registry.cron(
        KIND,
        "30 * * * * *",
        NewJob::new(KIND, json!({})).with_max_attempts(3),
    )
}

async fn handle(engine: &Engine, ctx: JobContext) -> Result<(), JobError> {
    let found = {
        let mut conn = ctx.pool().acquire().await.map_err(EngineError::from)?;
        store::executions::dead_jobs_unhandled(&mut conn).await?
    };
    for dead in found {
        let mut g = ctx.lease().guarded_tx().await?;
        let Some(row) = store::executions::execution_lock(g.conn(), dead.execution_id).await?
        else {
            continue;
        };
        let reason = format!(
            "its {} job died after its last attempt ({})",
            dead.kind,
            dead.last_error.as_deref().unwrap_or("no error recorded")
        );
        tracing::warn!(execution = %row.id, job = dead.job_id, kind = %dead.kind, "a job of a run died");
        // Recorded first: the death is handled once, and the log says why the run ended.
        log(
            g.conn(),
            row.id,
            "job_died",
            json!({ "job": dead.job_id, "kind": dead.kind, "error": dead.last_error }),
        )
        .await?;
        store::executions::steps_close_dead(g.conn(), row.id, &format!("interrupted: {reason}"))
            .await?;
        match (dead.kind.as_str(), row.status.as_str()) {
            (KIND_STEP, "running") => {
                finish_run(engine, &mut g, &row, Event::RunFailed(reason)).await?;
            }
            (KIND_START, "pending" | "approved") => {
                match cancel(g.conn(), row.id, None, &reason).await {
                    Ok(()) | Err(EngineError::Conflict(_)) => {}
                    Err(e) => return Err(e.into()),
                }
            }
            (KIND_ROLLBACK, _) => {
                // As a rollback that failed: the ones left still run, then what the run waits
                // for (its retry) follows.
                let p: RollbackPayload = serde_json::from_value(dead.payload.clone())
                    .map_err(|e| JobError::Permanent(format!("rollback payload: {e}")))?;
                let snapshot = snapshot_of(&row)?;
                let rest = p.remaining.get(1..).unwrap_or_default().to_vec();
                after_rollback(&mut g, row.id, &snapshot, &p, &rest, false).await?;
            }
            _ => {}
        }
        g.commit().await?;
    }
    ctx.lease().guarded_tx().await?.complete().await
}
