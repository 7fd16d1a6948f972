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

/// Calls `delete_batch` (which deletes at most `batch` rows and says how many) until a batch
/// comes back short, the job's lease is lost, or 200 batches ran (so one run cannot hold a slot
/// for ever; the next tick continues). Returns the rows deleted.
pub async fn delete_in_batches(
    ctx: &JobContext,
    conn: &mut sqlx::PgConnection,
    batch: i64,
    mut delete_batch: impl for<'c> FnMut(
        &'c mut sqlx::PgConnection,
        i64,
    )
        -> futures_util::future::BoxFuture<'c, store::StoreResult<u64>>,
) -> Result<u64, JobError> {
    let mut total = 0;
    for _ in 0..200 {
        let deleted = delete_batch(conn, batch).await?;
        total += deleted;
        if deleted < u64::try_from(batch).unwrap_or(0) || ctx.lease().is_lost() {
            break;
        }
    }
    Ok(total)
}

async fn prune(ctx: JobContext, retention: Duration) -> Result<(), JobError> {
    let mut conn = ctx.pool().acquire().await?;
    let jobs = delete_in_batches(&ctx, &mut conn, BATCH, |conn, batch| {
        Box::pin(store::jobs::job_prune(conn, retention, batch))
    })
    .await?;
    let cutoff = chrono::Utc::now()
        - chrono::TimeDelta::from_std(retention).unwrap_or(chrono::TimeDelta::days(7));
    let workers = store::queue_workers::worker_prune(&mut conn, cutoff).await?;
    tracing::info!(jobs, workers, "pruned finished jobs and stale workers");
    Ok(())
}
