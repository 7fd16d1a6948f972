//! The internal `queue.prune` job kind and its cron schedule: deletes finished jobs (completed,
//! dead, cancelled) and worker rows not seen for the retention period, in bounded batches.

use std::time::Duration;

use serde_json::json;

use super::{JobContext, JobError, KindOptions, NewJob, QueueError, Registry};
use crate::store;

/// The job kind.
pub const KIND: &str = "queue.prune";

/// Rows deleted per statement.
const BATCH: i64 = 5000;

/// Registers the `queue.prune` handler and a schedule running it every ten minutes.
pub fn register(registry: &mut Registry, retention: Duration) -> Result<(), QueueError> {
    registry.register(KIND, KindOptions::default(), move |ctx| {
        prune(ctx, retention)
    });
    registry.cron(
        KIND,
        "0 */10 * * * *",
        NewJob::new(KIND, json!({})).with_max_attempts(3),
    )
}

async fn prune(ctx: JobContext, retention: Duration) -> Result<(), JobError> {
    let mut conn = ctx.pool().acquire().await?;
    let mut jobs = 0;
    // Bounded so that one run cannot hold a slot for ever; the next tick continues.
    for _ in 0..200 {
        let deleted = store::jobs::job_prune(&mut conn, retention, BATCH).await?;
        jobs += deleted;
        if deleted < BATCH as u64 || ctx.lease().is_lost() {
            break;
        }
    }
    let cutoff = chrono::Utc::now()
        - chrono::TimeDelta::from_std(retention).unwrap_or(chrono::TimeDelta::days(7));
    let workers = store::queue_workers::worker_prune(&mut conn, cutoff).await?;
    tracing::info!(jobs, workers, "pruned finished jobs and stale workers");
    Ok(())
}
