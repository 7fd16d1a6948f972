//! `execution.events_prune`: the live event log (`execution_events`) is bounded. Events older
//! than the worker's retention period are deleted in batches, every ten minutes. The durable
//! record of a run (`runbook_executions`, `step_executions` with the captured, masked output)
//! is kept; only the stream's copy goes.

use std::time::Duration;

use serde_json::json;

use crate::queue::prune::delete_in_batches;
use crate::queue::{JobContext, JobError, KindOptions, NewJob, QueueError, Registry};
use crate::store;

/// The job kind.
pub const KIND: &str = "execution.events_prune";

/// Rows deleted per statement.
const BATCH: i64 = 5000;

/// Registers the handler and its schedule (every ten minutes, five minutes after the queue's
/// own pruning).
pub(crate) fn register(registry: &mut Registry, retention: Duration) -> Result<(), QueueError> {
    registry.register(KIND, KindOptions::default(), move |ctx| {
        prune(ctx, retention)
    });
    registry.cron(
        KIND,
        "0 5-55/10 * * * *",
        NewJob::new(KIND, json!({})).with_max_attempts(3),
    )
}

async fn prune(ctx: JobContext, retention: Duration) -> Result<(), JobError> {
    let cutoff = chrono::Utc::now()
        - chrono::TimeDelta::from_std(retention).unwrap_or(chrono::TimeDelta::days(7));
    let mut conn = ctx.pool().acquire().await?;
    let events = delete_in_batches(&ctx, &mut conn, BATCH, |conn, batch| {
        Box::pin(store::executions::event_prune(conn, cutoff, batch))
    })
    .await?;
    tracing::info!(events, "pruned live execution events");
    Ok(())
}
