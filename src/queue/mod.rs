//! The durable job queue: our own `FOR UPDATE SKIP LOCKED` queue on PostgreSQL with leases,
//! fencing, rescue, durable backoff, cron and wake-ups. One component per concern:
//!
//! - [`registry`]: handlers by job kind, per-kind timeout and backoff, cron schedules;
//! - [`context`]: what a running handler gets ([`JobContext`], [`Lease`], [`GuardedTx`]), the
//!   only way a handler writes, fenced by its lease token;
//! - [`executor`]: the [`Worker`]: claim, run, heartbeat, settle, `tick()`, the run loop and
//!   graceful shutdown;
//! - [`rescue`]: returns expired leases (one rescuer at a time, advisory lock);
//! - [`cron`]: enqueues one job per schedule tick across any number of workers;
//! - [`notify`]: debounced `NOTIFY` after commit; the executor `LISTEN`s and polls as a fallback;
//! - [`backoff`]: retry delays (exponential with jitter);
//! - [`prune`]: the internal `queue.prune` kind that deletes finished jobs after retention.
//!
//! All SQL is in `store::jobs` and `store::queue_workers`. This module knows nothing about
//! runbooks, alerts or HTTP: engine handlers register with it by kind.

pub mod backoff;
pub mod context;
pub mod cron;
pub mod executor;
pub mod notify;
pub mod prune;
pub mod registry;
pub mod rescue;

use std::time::Duration;

pub use crate::store::jobs::NewJob;
pub use backoff::Backoff;
pub use context::{GuardedTx, JobContext, Lease};
pub use executor::{TickOutcome, Worker, WorkerConfig};
pub use notify::Notifier;
pub use registry::{KindOptions, Registry};

use crate::store::{self, StoreError};

/// The NOTIFY channel that wakes idle workers.
pub const CHANNEL: &str = "aiops_jobs";

/// How a handler's attempt ended, when it did not succeed.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    /// Try again later (after the kind's backoff) while attempts remain.
    #[error("{0}")]
    Retryable(String),
    /// Never try again: the job goes dead at once.
    #[error("permanent failure: {0}")]
    Permanent(String),
    /// Put the job back for this long without spending an attempt.
    #[error("snoozed for {0:?}")]
    Snooze(Duration),
    /// The lease was lost (rescued after expiry, or cancelled): nothing this attempt writes may
    /// commit, and its result is discarded.
    #[error("the job's lease was lost (rescued or cancelled); this attempt's writes are discarded")]
    LeaseLost,
    /// A database error; retryable.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl JobError {
    /// Whether this is a lost or refused database connection (see
    /// [`StoreError::is_connection_lost`]).
    pub fn is_connection_lost(&self) -> bool {
        matches!(self, JobError::Store(e) if e.is_connection_lost())
    }

    /// A retryable error from anything displayable.
    pub fn retryable(e: impl std::fmt::Display) -> JobError {
        JobError::Retryable(e.to_string())
    }

    /// A permanent error from anything displayable.
    pub fn permanent(e: impl std::fmt::Display) -> JobError {
        JobError::Permanent(e.to_string())
    }
}

impl From<sqlx::Error> for JobError {
    fn from(e: sqlx::Error) -> Self {
        JobError::Store(e.into())
    }
}

/// The queue machinery itself failed (not a job).
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    /// A database operation failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A cron expression does not parse.
    #[error("cron schedule {name}: invalid expression `{expr}`: {message}")]
    Cron {
        /// Schedule name.
        name: String,
        /// The expression.
        expr: String,
        /// The parser's message.
        message: String,
    },
}

impl From<sqlx::Error> for QueueError {
    fn from(e: sqlx::Error) -> Self {
        QueueError::Store(e.into())
    }
}

/// Enqueues one job in the caller's transaction; `None` when de-duplicated by its unique key.
/// Call [`Notifier::notify`] after the transaction commits to wake idle workers at once
/// (otherwise they find the job at their next poll).
pub async fn enqueue(
    conn: &mut sqlx::PgConnection,
    job: &NewJob,
) -> Result<Option<i64>, StoreError> {
    store::jobs::job_enqueue(conn, job).await
}

/// Enqueues many jobs in one statement in the caller's transaction; returns the inserted ids.
pub async fn enqueue_many(
    conn: &mut sqlx::PgConnection,
    jobs: &[NewJob],
) -> Result<Vec<i64>, StoreError> {
    store::jobs::job_enqueue_many(conn, jobs).await
}
