//! Rescue: running jobs whose lease expired (their worker crashed, hung or lost the database)
//! go back to `retryable` with the kind's backoff, or to `dead` when the interrupted attempt was
//! the last. Clearing the lease token fences the old worker out. One rescuer acts at a time
//! across all hosts: the pass runs under a transaction-scoped advisory lock, and a worker that
//! cannot take it skips the pass.

use sqlx::PgPool;

use super::{QueueError, Registry};
use crate::store;

/// The advisory lock name.
pub const RESCUE_LOCK: &str = "aiops.queue.rescue";

/// Jobs looked at per pass.
const BATCH: i64 = 1000;

/// What one rescue pass did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RescueOutcome {
    /// Another worker held the rescue lock; this pass did nothing.
    pub skipped: bool,
    /// Jobs sent back to `retryable`.
    pub retried: usize,
    /// Jobs moved to `dead` (attempts exhausted).
    pub dead: usize,
}

/// One rescue pass.
pub async fn rescue_expired(
    pool: &PgPool,
    registry: &Registry,
) -> Result<RescueOutcome, QueueError> {
    let mut tx = pool.begin().await?;
    if !store::queue_workers::queue_try_lock(&mut tx, RESCUE_LOCK).await? {
        tx.rollback().await?;
        return Ok(RescueOutcome {
            skipped: true,
            ..RescueOutcome::default()
        });
    }
    let expired = store::jobs::job_rescue_expired(&mut tx, BATCH).await?;
    let ids: Vec<i64> = expired.iter().map(|j| j.id).collect();
    let delays: Vec<_> = expired
        .iter()
        .map(|j| registry.options(&j.kind).backoff.delay(j.attempt))
        .collect();
    let moved = store::jobs::job_rescue_apply(&mut tx, &ids, &delays).await?;
    tx.commit().await?;
    let mut outcome = RescueOutcome::default();
    for (id, state) in moved {
        if state == "dead" {
            outcome.dead += 1;
        } else {
            outcome.retried += 1;
        }
        tracing::warn!(job = id, new_state = %state, "rescued a job whose lease expired");
    }
    Ok(outcome)
}
