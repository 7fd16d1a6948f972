//! `execution.dead_jobs`: a run whose step, rollback or start job died (its attempts exhausted:
//! a command that crashed or got its worker killed on every attempt, a handler that kept
//! failing) would wait for its deadline, or for ever, with an attempt row left `running` and a
//! live stream that never ends. Once a minute such runs are ended: the attempt rows are closed
//! as interrupted, a running run fails as a failed step makes it fail (rollback, runbook retry
//! and circuit breaker included), and one not started yet is cancelled.

use serde_json::json;

use crate::queue::{JobContext, JobError, KindOptions, NewJob, QueueError, Registry};
use crate::store;

use super::control::{cancel, finish_run};
use super::{Engine, EngineError};
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
        store::executions::executions_with_dead_jobs(&mut conn).await?
    };
    for (id, kind, last_error) in found {
        let mut g = ctx.lease().guarded_tx().await?;
        let Some(row) = store::executions::execution_lock(g.conn(), id).await? else {
            continue;
        };
        let reason = format!(
            "its {kind} job died after its last attempt ({})",
            last_error.as_deref().unwrap_or("no error recorded")
        );
        tracing::warn!(execution = %id, %kind, "ending a run whose job died");
        match row.status.as_str() {
            "running" => {
                store::executions::steps_close_dead(
                    g.conn(),
                    id,
                    &format!("interrupted: {reason}"),
                )
                .await?;
                finish_run(engine, &mut g, &row, Event::RunFailed(reason)).await?;
            }
            "pending" | "approved" => match cancel(g.conn(), id, None, &reason).await {
                Ok(()) | Err(EngineError::Conflict(_)) => {}
                Err(e) => return Err(e.into()),
            },
            _ => {}
        }
        g.commit().await?;
    }
    ctx.lease().guarded_tx().await?.complete().await
}
