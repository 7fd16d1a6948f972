//! What a running handler gets: the job ([`JobContext`]), its [`Lease`], and [`GuardedTx`], the
//! lease-fenced transaction in which a handler writes its own rows (checkpoints), enqueues
//! follow-up jobs and completes the job, all or nothing.
//!
//! Fencing: [`Lease::guarded_tx`] opens a transaction and locks the job row `FOR UPDATE` only if
//! `lease_token` still matches and the job is still `running`. While that lock is held no rescuer
//! or admin can take the job (they skip or wait for the row), so whatever commits in the guarded
//! transaction was written by the lease holder. A worker whose lease was rescued gets
//! [`JobError::LeaseLost`] and writes nothing.

use std::any::Any;
use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde_json::Value;
use sqlx::{PgConnection, PgPool, Postgres, Transaction};
use tokio::sync::Notify;
use uuid::Uuid;

use super::{JobError, NewJob};
use crate::store;
use crate::store::jobs::ClaimedJob;

/// A value a handler passes on in memory to its continuation.
type Handoff = Box<dyn Any + Send>;

/// Shared between a running attempt and the worker that runs it.
#[derive(Debug, Default)]
pub(crate) struct LeaseState {
    lost: AtomicBool,
    lost_notify: Notify,
    /// The handler completed the job itself (in a guarded transaction).
    pub(crate) settled: AtomicBool,
    /// The handler's guarded completion is committing: a heartbeat that no longer finds the
    /// job running is seeing that completion, not a lost lease.
    pub(crate) completing: AtomicBool,
    /// The handler enqueued a job that is due now: wake workers after settling. Jobs scheduled
    /// for later wake nobody; the workers' polls find them once they are due.
    pub(crate) enqueued: AtomicBool,
    /// The earliest `run_at` of the jobs the handler enqueued for later: this worker sets a
    /// timer of its own for it after settling, so a short delay (a step retry) is kept to
    /// without waiting for a poll.
    pub(crate) due_later: Mutex<Option<chrono::DateTime<chrono::Utc>>>,
    /// A job this attempt enqueued already claimed by the same worker, committed: the worker
    /// runs it next in the same slot.
    pub(crate) continuation: Mutex<Option<Continuation>>,
    /// What the handler passes on in memory to its continuation ([`Lease::pass_on`]).
    handoff_out: Mutex<Option<Handoff>>,
    /// What the job this one continues passed on ([`JobContext::take_handoff`]).
    handoff_in: Mutex<Option<Handoff>>,
    /// This attempt continues, in the same slot, the job that enqueued it
    /// ([`JobContext::continued_in_slot`]).
    continued: AtomicBool,
    /// When the job's lease runs out as far as the worker knows: the claim (or, for a
    /// continuation, the statement that inserted it) or the last successful heartbeat was sent,
    /// plus the lease. A prefetched job or a continuation is not started after it.
    pub(crate) expires: Mutex<Option<tokio::time::Instant>>,
}

impl LeaseState {
    pub(crate) fn mark_lost(&self) {
        self.lost.store(true, Ordering::SeqCst);
        self.lost_notify.notify_waiters();
    }

    pub(crate) fn is_lost(&self) -> bool {
        self.lost.load(Ordering::SeqCst)
    }

    pub(crate) fn set_expires(&self, at: tokio::time::Instant) {
        *self.expires.lock().unwrap_or_else(|p| p.into_inner()) = Some(at);
    }

    /// Whether the lease ran out by the worker's own clock (heartbeats failed meanwhile).
    pub(crate) fn expired(&self, now: tokio::time::Instant) -> bool {
        self.expires
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some_and(|at| at <= now)
    }

    /// Runs the write that completes the job with `completing` set, so that a heartbeat which
    /// meanwhile finds the lease gone takes it for this completion, not a lost lease. A write
    /// that fails (the connection broke) completed nothing: the flag is cleared again, and a
    /// heartbeat may judge the lease once more.
    pub(crate) async fn completing<T>(
        &self,
        write: impl std::future::Future<Output = Result<T, JobError>>,
    ) -> Result<T, JobError> {
        self.completing.store(true, Ordering::SeqCst);
        let result = write.await;
        if result.is_err() {
            self.completing.store(false, Ordering::SeqCst);
        }
        result
    }

    /// Moves what `from` passed on to its continuation into this state, the continuation's.
    pub(crate) fn receive_handoff(&self, from: &LeaseState) {
        self.continued.store(true, Ordering::SeqCst);
        let handoff = from
            .handoff_out
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        *self.handoff_in.lock().unwrap_or_else(|p| p.into_inner()) = handoff;
    }

    pub(crate) fn take_continuation(&self) -> Option<Continuation> {
        self.continuation
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
    }

    pub(crate) async fn wait_lost(&self) {
        loop {
            let notified = self.lost_notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.is_lost() {
                return;
            }
            notified.await;
        }
    }
}

/// A job a handler inserted already claimed by this worker, and when its lease runs out as far
/// as the worker knows: the lease runs from the statement that inserted it, so from a moment
/// no later than that statement's start, until its first heartbeat renews it.
#[derive(Debug)]
pub(crate) struct Continuation {
    pub(crate) job: ClaimedJob,
    pub(crate) expires: tokio::time::Instant,
}

/// What a worker allows its handlers to hand over as a continuation (see
/// [`GuardedTx::enqueue_next`]).
#[derive(Debug)]
pub(crate) struct ChainPolicy {
    /// The worker that will run the continuation.
    pub(crate) worker: Uuid,
    /// Lease length of the continuation.
    pub(crate) lease: Duration,
    /// Kinds this worker has handlers for.
    pub(crate) kinds: HashSet<String>,
}

/// The claim a handler holds on its job: id and lease token.
#[derive(Debug, Clone)]
pub struct Lease {
    pool: PgPool,
    id: i64,
    token: Uuid,
    pub(crate) state: Arc<LeaseState>,
    chain: Option<Arc<ChainPolicy>>,
}

impl Lease {
    pub(crate) fn new(
        pool: PgPool,
        id: i64,
        token: Uuid,
        state: Arc<LeaseState>,
        chain: Option<Arc<ChainPolicy>>,
    ) -> Lease {
        Lease {
            pool,
            id,
            token,
            state,
            chain,
        }
    }

    /// The job id.
    pub fn job_id(&self) -> i64 {
        self.id
    }

    /// This attempt's lease token.
    pub fn token(&self) -> Uuid {
        self.token
    }

    /// Whether the worker has learnt (at a heartbeat or a guarded write) that the lease is lost.
    pub fn is_lost(&self) -> bool {
        self.state.is_lost()
    }

    /// Tells the worker that the handler's own statements scheduled a job due at `at` (one not
    /// enqueued through [`GuardedTx::enqueue`], which does this itself): once this job is
    /// settled the worker sets a timer of its own for it, as for a snooze, instead of leaving
    /// it to the next poll.
    pub fn note_due_later(&self, at: chrono::DateTime<chrono::Utc>) {
        let mut due = self
            .state
            .due_later
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        *due = Some(due.map_or(at, |d| d.min(at)));
    }

    /// Whether the lease may still be held: not known lost, and not run out by the worker's own
    /// clock (the last heartbeat that reached the database plus the lease duration).
    pub fn may_be_held(&self) -> bool {
        !self.is_lost() && !self.state.expired(tokio::time::Instant::now())
    }

    /// Resolves once the lease is known to be lost; long handlers can `select!` on it to stop
    /// early.
    pub async fn lost(&self) {
        self.state.wait_lost().await
    }

    /// Opens a transaction fenced by this lease: the job row is locked `FOR UPDATE` if the lease
    /// is still held, else [`JobError::LeaseLost`]. Write checkpoint rows through
    /// [`GuardedTx::conn`], then [`GuardedTx::complete`] or [`GuardedTx::commit`].
    pub async fn guarded_tx(&self) -> Result<GuardedTx, JobError> {
        // `now()` in the transaction, which a continuation's lease runs from, is no earlier.
        let begun = tokio::time::Instant::now();
        let mut tx = self.pool.begin().await?;
        if !store::jobs::job_lock_leased(&mut tx, self.id, self.token).await? {
            tx.rollback().await?;
            self.state.mark_lost();
            return Err(JobError::LeaseLost);
        }
        Ok(GuardedTx {
            tx,
            lease: self.clone(),
            continuation: None,
            begun,
        })
    }
}

/// A transaction that holds the job row locked under a live lease. Dropping it rolls back.
pub struct GuardedTx {
    tx: Transaction<'static, Postgres>,
    lease: Lease,
    continuation: Option<Continuation>,
    /// When the transaction was begun, as far as the worker knows.
    begun: tokio::time::Instant,
}

impl GuardedTx {
    /// The connection, for the handler's own statements (checkpoint rows).
    pub fn conn(&mut self) -> &mut PgConnection {
        &mut self.tx
    }

    /// Enqueues a follow-up job in this transaction; `None` when de-duplicated. Workers are woken
    /// after the commit when it is due now.
    pub async fn enqueue(&mut self, job: &NewJob) -> Result<Option<i64>, JobError> {
        let id = store::jobs::job_enqueue(&mut self.tx, job).await?;
        self.note_due(std::slice::from_ref(job));
        Ok(id)
    }

    /// Enqueues follow-up jobs in one statement in this transaction.
    pub async fn enqueue_many(&mut self, jobs: &[NewJob]) -> Result<Vec<i64>, JobError> {
        let ids = store::jobs::job_enqueue_many(&mut self.tx, jobs).await?;
        self.note_due(jobs);
        Ok(ids)
    }

    /// Notes when jobs enqueued by this transaction become due: now (wake the workers after the
    /// commit) or later (this worker's own timer).
    fn note_due(&self, jobs: &[NewJob]) {
        let now = chrono::Utc::now();
        if jobs.iter().any(|job| job.is_due_at(now)) {
            self.wake_after_commit();
        }
        if let Some(later) = jobs
            .iter()
            .filter_map(|job| job.run_at)
            .filter(|at| *at > now)
            .min()
        {
            self.lease.note_due_later(later);
        }
    }

    /// Wakes the workers once this transaction has committed (the job is settled), for a job
    /// due now that it enqueued with statements of its own (not [`enqueue`](Self::enqueue)),
    /// such as the start job of an execution it created. A `NOTIFY` inside the transaction
    /// would hold PostgreSQL's global notification lock through the commit's WAL flush.
    pub fn wake_after_commit(&self) {
        self.lease.state.enqueued.store(true, Ordering::SeqCst);
    }

    /// Enqueues the job that continues this one. When the worker runs its kind, the job is
    /// inserted already claimed by this worker and runs in the same slot as soon as this
    /// transaction commits and the handler returns: no claim, no wake-up, no wait. Otherwise
    /// (unknown kind, scheduled for later, a continuation already chosen) it is an ordinary
    /// enqueue. `None` when de-duplicated by its unique key.
    pub async fn enqueue_next(&mut self, job: &NewJob) -> Result<Option<i64>, JobError> {
        let (worker, lease) = match self.lease.continuation_claim(job) {
            Some(c) if self.continuation.is_none() => (c.worker, c.lease),
            _ => return self.enqueue(job).await,
        };
        let claimed = store::jobs::job_enqueue_claimed(&mut self.tx, job, worker, lease).await?;
        let id = claimed.as_ref().map(|c| c.id);
        self.continuation = claimed.map(|job| Continuation {
            job,
            expires: self.begun + lease,
        });
        Ok(id)
    }

    /// Commits the handler's writes; the job stays running under the same lease (a checkpoint).
    pub async fn commit(self) -> Result<(), JobError> {
        self.tx.commit().await?;
        self.lease.hand_over(self.continuation);
        Ok(())
    }

    /// Marks the job completed and commits it together with everything written in this
    /// transaction.
    pub async fn complete(mut self) -> Result<(), JobError> {
        let state = self.lease.state.clone();
        let done = state
            .completing(async {
                let done = store::jobs::job_complete(&mut self.tx, self.lease.id, self.lease.token)
                    .await?;
                if done {
                    self.tx.commit().await?;
                }
                Ok(done)
            })
            .await?;
        if !done {
            self.lease.state.mark_lost();
            return Err(JobError::LeaseLost);
        }
        self.lease.state.settled.store(true, Ordering::SeqCst);
        self.lease.hand_over(self.continuation);
        Ok(())
    }
}

impl Lease {
    /// The worker and lease a continuation of `job`'s kind would be claimed with, when this
    /// worker may run `job` next in the same slot: it handles the kind and `job` is due now.
    fn continuation_claim(&self, job: &NewJob) -> Option<&ChainPolicy> {
        self.chain.as_deref().filter(|c| {
            job.run_at.is_none_or(|at| at <= chrono::Utc::now()) && c.kinds.contains(&job.kind)
        })
    }

    /// Passes `value` on in memory to the continuation this attempt hands over
    /// ([`Lease::complete_continuing`], [`GuardedTx::enqueue_next`]): the continuation's handler
    /// gets it from [`JobContext::take_handoff`]. It is dropped when no continuation runs next
    /// in this slot, and never reaches a retry or another worker, so it can only spare the
    /// continuation work it would otherwise do itself (reads it would repeat), never carry
    /// state that is not also in the database.
    pub fn pass_on<T: Any + Send>(&self, value: T) {
        *self
            .state
            .handoff_out
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(Box::new(value));
    }

    /// Whether [`Lease::complete_continuing`] can hand `next` over to this worker.
    pub fn can_continue_with(&self, next: &NewJob) -> bool {
        self.continuation_claim(next).is_some()
    }

    /// Completes the job, inserts `next` claimed by this worker (when the handler's `go` has a
    /// row) and makes the handler's own `writes`, all in one statement committed on its own
    /// (see [`store::jobs::job_complete_continuing`]): the fence, the writes, the continuation
    /// and the completion cost one round trip and one commit instead of a transaction's
    /// worth. The continuation runs next in the same slot, as with
    /// [`GuardedTx::enqueue_next`]. Only when [`Lease::can_continue_with`] holds; otherwise
    /// (or on [`JobError::LeaseLost`]) nothing is written.
    pub async fn complete_continuing<'q, B>(
        &self,
        next: &'q NewJob,
        writes: store::jobs::HandlerWrites<B>,
    ) -> Result<(), JobError>
    where
        B: FnOnce(store::jobs::ContinuingQuery<'q>) -> store::jobs::ContinuingQuery<'q>,
    {
        let Some(chain) = self.continuation_claim(next) else {
            return Err(JobError::Permanent(format!(
                "job {}: a {} job cannot continue it on this worker",
                self.id, next.kind
            )));
        };
        let mut conn = self.pool.acquire().await?;
        let sent = tokio::time::Instant::now();
        let done = self
            .state
            .completing(async {
                Ok(store::jobs::job_complete_continuing(
                    &mut conn,
                    self.id,
                    self.token,
                    next,
                    chain.worker,
                    chain.lease,
                    writes,
                )
                .await?)
            })
            .await?;
        let Some(continuation) = done else {
            self.state.mark_lost();
            return Err(JobError::LeaseLost);
        };
        self.state.settled.store(true, Ordering::SeqCst);
        self.hand_over(continuation.map(|job| Continuation {
            job,
            expires: sent + chain.lease,
        }));
        Ok(())
    }

    /// Completes the job together with the handler's last `writes`, in one statement committed
    /// on its own (see [`store::jobs::job_complete_with`]): the fence, the writes and the
    /// completion cost one round trip and one commit instead of a transaction's worth. Without
    /// the lease nothing is written ([`JobError::LeaseLost`]).
    pub async fn complete_with<'q, B>(
        &self,
        writes: store::jobs::FinalWrites<B>,
    ) -> Result<(), JobError>
    where
        B: FnOnce(store::jobs::FinalQuery<'q>) -> store::jobs::FinalQuery<'q>,
    {
        let mut conn = self.pool.acquire().await?;
        let done = self
            .state
            .completing(async {
                Ok(store::jobs::job_complete_with(&mut conn, self.id, self.token, writes).await?)
            })
            .await?;
        if !done {
            self.state.mark_lost();
            return Err(JobError::LeaseLost);
        }
        self.state.settled.store(true, Ordering::SeqCst);
        Ok(())
    }

    fn hand_over(&self, continuation: Option<Continuation>) {
        if let Some(job) = continuation {
            *self
                .state
                .continuation
                .lock()
                .unwrap_or_else(|p| p.into_inner()) = Some(job);
        }
    }
}

/// One attempt of one job, as its handler sees it.
#[derive(Debug, Clone)]
pub struct JobContext {
    /// Job id.
    pub id: i64,
    /// Job kind.
    pub kind: String,
    /// Handler arguments.
    pub payload: Value,
    /// This attempt's number, from 1.
    pub attempt: i32,
    /// Attempt budget.
    pub max_attempts: i32,
    /// De-duplication key the job was enqueued with.
    pub unique_key: Option<String>,
    /// No worker held the job before this claim: false after a graceful release or an admin's
    /// retry, which start again at attempt 1.
    pub first_claim: bool,
    pub(crate) lease: Lease,
}

impl JobContext {
    /// The lease: fenced writes go through [`Lease::guarded_tx`].
    pub fn lease(&self) -> &Lease {
        &self.lease
    }

    /// Whether this attempt runs in the same slot right after the job that enqueued it (a
    /// continuation), rather than from a claim.
    pub fn continued_in_slot(&self) -> bool {
        self.lease.state.continued.load(Ordering::SeqCst)
    }

    /// What the job this one continues passed on with [`Lease::pass_on`], if it is a `T`: only
    /// for a continuation started in the same slot right after that job; taken once.
    pub fn take_handoff<T: Any + Send>(&self) -> Option<T> {
        let handoff = self
            .lease
            .state
            .handoff_in
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()?;
        handoff.downcast::<T>().ok().map(|b| *b)
    }

    /// The pool, for reads and idempotent work that needs no fencing.
    pub fn pool(&self) -> &PgPool {
        &self.lease.pool
    }

    /// The payload as `T`; a payload that does not parse is a permanent error (retrying cannot
    /// fix it).
    pub fn payload_as<T: DeserializeOwned>(&self) -> Result<T, JobError> {
        serde_json::from_value(self.payload.clone()).map_err(|e| {
            JobError::Permanent(format!("job {} ({}): bad payload: {e}", self.id, self.kind))
        })
    }
}
