//! The worker: registers its identity, claims due jobs in batches sized to its free slots plus a
//! bounded prefetch, runs each handler in its own task under the kind's timeout, heartbeats the
//! leases of running and prefetched jobs, and settles results (batched completion; failures with
//! durable backoff; lease-lost results discarded). Two entry points share this machinery:
//!
//! - [`Worker::tick`]: claim once, run what was claimed to completion, settle, return a
//!   [`TickOutcome`]; tests drive the queue with it instead of sleeping;
//! - [`Worker::run`]: the long-running loop with `LISTEN` wake-ups, a polling fallback,
//!   maintenance (rescue, cron, worker heartbeat) and graceful shutdown: stop claiming, release
//!   prefetched jobs, let running jobs finish within the grace period, release the rest back to
//!   `available`.
//!
//! Prefetch: a claim takes up to `free slots + (prefetch - buffered)` jobs. The ones no slot
//! takes at once wait, leased to this worker and heartbeated like running jobs, in an in-memory
//! FIFO (claim order, so priority and `run_at` order hold) and start as slots free, without
//! another claim round trip. A buffered job whose lease the heartbeat found lost is never
//! started; one whose lease ran out while it waited (heartbeats failing) is released unstarted.
//!
//! Knows nothing about what jobs do: handlers come from the [`Registry`].

use std::collections::{HashMap, HashSet, VecDeque};
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::PgPool;
use tokio::sync::{Notify, Semaphore, mpsc, watch};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;
use uuid::Uuid;

use super::context::{ChainPolicy, Continuation, Lease, LeaseState};
use super::cron::cron_fire;
use super::rescue::{RescueOutcome, rescue_expired};
use super::{JobContext, JobError, Notifier, QueueError, Registry};
use crate::store::jobs::{ClaimedJob, JobFailure};
use crate::store::{self, StoreError};

/// Worker settings.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// Jobs run at once.
    pub concurrency: usize,
    /// Jobs claimed ahead of the free slots: they wait in memory, leased to this worker and
    /// heartbeated, and start as slots free without another claim. `None` (the default) and
    /// `Some(0)` disable prefetching: a claim never exceeds the free slots. Off by default
    /// because jobs a busy worker holds ahead wait for its slots even when another worker is
    /// idle; it pays off for floods of short jobs.
    pub prefetch: Option<usize>,
    /// Lease length; a job whose worker stops heartbeating is rescued this long after its last
    /// heartbeat.
    pub lease: Duration,
    /// How often leases of running jobs are extended (well under `lease`).
    pub heartbeat_interval: Duration,
    /// Polling fallback when no notification arrives.
    pub poll_interval: Duration,
    /// How often rescue, cron and the worker heartbeat run.
    pub maintenance_interval: Duration,
    /// On shutdown, how long running jobs may take before they are released.
    pub grace_period: Duration,
    /// Minimum spacing of wake-up NOTIFYs sent by this worker.
    pub notify_debounce: Duration,
    /// Most results settled in one statement.
    pub settle_batch: usize,
    /// While some of its slots are busy, the worker claims at most once per this interval, so
    /// slots that free up one by one are refilled by one claim instead of one claim each. An
    /// idle worker claims at once.
    pub claim_cooldown: Duration,
}

impl WorkerConfig {
    /// Slots: jobs run at once (at least one).
    pub fn slots(&self) -> usize {
        self.concurrency.max(1)
    }

    /// Jobs claimed ahead of the free slots (`prefetch`, else none).
    pub fn prefetch_limit(&self) -> usize {
        self.prefetch.unwrap_or(0)
    }
}

impl Default for WorkerConfig {
    fn default() -> Self {
        WorkerConfig {
            concurrency: 10,
            prefetch: None,
            lease: Duration::from_secs(30),
            heartbeat_interval: Duration::from_secs(10),
            poll_interval: Duration::from_secs(2),
            maintenance_interval: Duration::from_secs(5),
            grace_period: Duration::from_secs(30),
            notify_debounce: Duration::from_millis(20),
            settle_batch: 1000,
            claim_cooldown: Duration::from_millis(2),
        }
    }
}

/// What one [`Worker::tick`] (or one settle batch) did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TickOutcome {
    /// Jobs claimed (started at once or prefetched).
    pub claimed: usize,
    /// Jobs completed.
    pub completed: usize,
    /// Jobs sent back to `retryable` with backoff.
    pub retried: usize,
    /// Jobs moved to `dead` (permanent error, unknown kind, or attempts exhausted).
    pub dead: usize,
    /// Jobs snoozed.
    pub snoozed: usize,
    /// Jobs whose lease was lost: results discarded, or prefetched jobs dropped unstarted.
    pub lease_lost: usize,
    /// Jobs released back to `available` unfinished: at shutdown, or prefetched jobs whose
    /// lease ran out before a slot freed.
    pub released: usize,
}

impl TickOutcome {
    fn add(&mut self, o: TickOutcome) {
        self.claimed += o.claimed;
        self.completed += o.completed;
        self.retried += o.retried;
        self.dead += o.dead;
        self.snoozed += o.snoozed;
        self.lease_lost += o.lease_lost;
        self.released += o.released;
    }
}

/// What one maintenance pass did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MaintenanceOutcome {
    /// The rescue pass.
    pub rescue: RescueOutcome,
    /// Cron ticks this worker fired.
    pub cron_fired: Vec<(String, DateTime<Utc>)>,
}

enum Ending {
    Done(Result<(), JobError>),
    Released,
    /// A job the worker did not start, released to `available` for this reason: a continuation
    /// or a prefetched job at shutdown, or a prefetched job whose lease ran out while it waited.
    NotStarted(&'static str),
}

const RELEASED_AT_SHUTDOWN: &str = "released at worker shutdown before it started";
const RELEASED_EXPIRED: &str =
    "released before it started: its lease ran out while it waited for a free slot";

/// A claim running in the background of [`Worker::run`].
type ClaimTask = JoinHandle<Result<Vec<Claimed>, QueueError>>;

/// A claimed job and the lease state the heartbeat keeps for it from the claim on.
struct Claimed {
    job: ClaimedJob,
    state: Arc<LeaseState>,
}

/// Jobs given back unstarted for one reason, settled in one statement.
#[derive(Default)]
struct Unstarted {
    reason: &'static str,
    ids: Vec<i64>,
    tokens: Vec<Uuid>,
    /// Claimed for the first time: they go back as never attempted.
    never_held: Vec<bool>,
}

struct Finished {
    id: i64,
    token: Uuid,
    kind: String,
    attempt: i32,
    /// No worker had held the job before this claim (see `ClaimedJob::first_claim`).
    first_claim: bool,
    state: Arc<LeaseState>,
    ending: Ending,
}

/// How far ahead a worker keeps a timer of its own for a job it scheduled.
const LOCAL_TIMER_HORIZON: Duration = Duration::from_secs(120);
/// How many such timers a worker keeps at most.
const LOCAL_TIMERS: usize = 4096;

struct Inner {
    pool: PgPool,
    registry: Registry,
    config: WorkerConfig,
    id: Uuid,
    /// Jobs leased to this worker, running or prefetched (waiting for a slot): what the
    /// heartbeat renews.
    running: Mutex<HashMap<i64, (Uuid, Arc<LeaseState>)>>,
    wake: Notify,
    /// When jobs this worker scheduled for later (follow-up jobs, retries, snoozes) become due:
    /// an idle worker claims again then instead of waiting for its next poll. Bounded; a job
    /// further ahead than [`LOCAL_TIMER_HORIZON`] or past the bound is left to the polls.
    due_timers: Mutex<std::collections::BinaryHeap<std::cmp::Reverse<Instant>>>,
    /// A timer was added: the claim loop looks at its timers again.
    timer_added: Notify,
    slot_freed: Notify,
    notifier: Notifier,
    abort: watch::Sender<bool>,
    /// Set once the worker stops claiming (graceful shutdown).
    stopping: AtomicBool,
    chain: Arc<ChainPolicy>,
    /// The kinds this worker has handlers for: the only ones it claims.
    kinds: Vec<String>,
}

/// A registered worker. Cheap to clone.
#[derive(Clone)]
pub struct Worker {
    inner: Arc<Inner>,
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .map(|s| s.trim().to_owned())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown".to_owned())
}

impl Worker {
    /// Records the worker's identity (host, pid, start time, concurrency, kinds) and returns it
    /// ready to [`tick`](Worker::tick) or [`run`](Worker::run).
    pub async fn start(
        pool: PgPool,
        registry: Registry,
        config: WorkerConfig,
    ) -> Result<Worker, QueueError> {
        let id = Uuid::new_v4();
        let kinds = registry.kinds();
        let mut conn = pool.acquire().await?;
        store::queue_workers::worker_register(
            &mut conn,
            &store::queue_workers::NewWorker {
                id,
                host: &host_name(),
                pid: i32::try_from(std::process::id()).unwrap_or(i32::MAX),
                version: crate::VERSION,
                concurrency: i32::try_from(config.concurrency.max(1)).unwrap_or(i32::MAX),
                kinds: &kinds,
            },
        )
        .await?;
        drop(conn);
        let notifier = Notifier::spawn(pool.clone(), config.notify_debounce);
        let (abort, _) = watch::channel(false);
        let chain = Arc::new(ChainPolicy {
            worker: id,
            lease: config.lease,
            kinds: kinds.iter().cloned().collect(),
        });
        tracing::info!(worker = %id, concurrency = config.concurrency, ?kinds, "worker registered");
        Ok(Worker {
            inner: Arc::new(Inner {
                pool,
                registry,
                config,
                id,
                running: Mutex::new(HashMap::new()),
                wake: Notify::new(),
                due_timers: Mutex::new(std::collections::BinaryHeap::new()),
                timer_added: Notify::new(),
                slot_freed: Notify::new(),
                notifier,
                abort,
                stopping: AtomicBool::new(false),
                chain,
                kinds,
            }),
        })
    }

    /// This worker's id (`queue_workers.id`, `jobs.locked_by`).
    pub fn id(&self) -> Uuid {
        self.inner.id
    }

    /// The worker's debounced wake-up sender.
    pub fn notifier(&self) -> Notifier {
        self.inner.notifier.clone()
    }

    /// Claims up to `concurrency + prefetch` due jobs in one statement and runs them all to the
    /// end, at most `concurrency` at once: the others wait in claim order, their leases
    /// heartbeated with the running ones, and each starts when a slot frees (a continuation keeps
    /// its parent's slot). Then settles the results and reports what happened. Nothing stays
    /// buffered between ticks: when `tick` returns, every job it claimed has run, or was dropped
    /// unstarted because a heartbeat found its lease lost (`lease_lost`), or was released
    /// unstarted because its lease ran out before a slot freed (`released`).
    pub async fn tick(&self) -> Result<TickOutcome, QueueError> {
        let inner = &self.inner;
        let slots = inner.config.slots();
        let mut buffer: VecDeque<Claimed> = inner
            .claim(slots + inner.config.prefetch_limit())
            .await?
            .into();
        let claimed = buffer.len();
        let mut set = JoinSet::new();
        while set.len() < slots
            && let Some(c) = buffer.pop_front()
        {
            set.spawn(execute(inner.clone(), c.job, c.state));
        }
        let mut finished = Vec::with_capacity(claimed);
        let mut heartbeat = tokio::time::interval(inner.config.heartbeat_interval);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        heartbeat.tick().await;
        loop {
            tokio::select! {
                next = set.join_next() => {
                    match next {
                        None if buffer.is_empty() => break,
                        None => {}
                        Some(Ok(f)) => {
                            let next = f
                                .state
                                .take_continuation()
                                .map(|c| inner.track_continuation(c, &f.state));
                            finished.push(f);
                            if let Some((job, state)) = next {
                                set.spawn(execute(inner.clone(), job, state));
                                continue;
                            }
                        }
                        Some(Err(e)) => tracing::error!(error = %e, "job task failed"),
                    }
                    // A slot is free: the next buffered job takes it.
                    if let Some(c) = buffer.pop_front() {
                        set.spawn(execute(inner.clone(), c.job, c.state));
                    }
                }
                _ = heartbeat.tick() => {
                    if let Err(e) = inner.heartbeat().await {
                        tracing::warn!(error = %e, "lease heartbeat failed");
                    }
                }
            }
        }
        let mut outcome = inner.settle(finished).await?;
        outcome.claimed = claimed;
        Ok(outcome)
    }

    /// Extends the leases of this worker's running jobs now; returns how many were found lost.
    pub async fn heartbeat(&self) -> Result<usize, QueueError> {
        self.inner.heartbeat().await
    }

    /// One maintenance pass at `now`: worker heartbeat, rescue of expired leases, due cron ticks.
    pub async fn maintain_at(&self, now: DateTime<Utc>) -> Result<MaintenanceOutcome, QueueError> {
        let inner = &self.inner;
        let mut conn = inner.pool.acquire().await?;
        store::queue_workers::worker_heartbeat(&mut conn, inner.id).await?;
        drop(conn);
        let rescue = rescue_expired(&inner.pool, &inner.registry).await?;
        let cron_fired = cron_fire(&inner.pool, inner.registry.cron_entries(), now).await?;
        if rescue.retried > 0 || !cron_fired.is_empty() {
            inner.notifier.notify();
            inner.wake.notify_one();
        }
        Ok(MaintenanceOutcome { rescue, cron_fired })
    }

    /// [`maintain_at`](Worker::maintain_at) with the current time.
    pub async fn maintain(&self) -> Result<MaintenanceOutcome, QueueError> {
        self.maintain_at(Utc::now()).await
    }

    /// Runs until `shutdown` resolves, then shuts down gracefully: stops claiming, releases
    /// prefetched jobs that have not started to `available`, lets running jobs finish within the
    /// grace period, releases the rest to `available`, and records the worker as stopped.
    /// Returns the totals of everything claimed and settled.
    ///
    /// Free slots take buffered (prefetched) jobs first, in claim order. A claim asks for
    /// `free slots + (prefetch - buffered)` jobs and runs in the background, so buffered jobs
    /// keep starting while it is in flight; the worker claims while a slot is free or the buffer
    /// is down to half of `prefetch`, at most once per `claim_cooldown` unless it is idle, and
    /// after a claim that came back short it waits for a wake-up or the poll interval.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<TickOutcome, QueueError> {
        let inner = self.inner.clone();
        let (done_tx, done_rx) = mpsc::unbounded_channel::<Finished>();
        let (stop_tx, stop_rx) = watch::channel(false);
        let settler = tokio::spawn(settle_loop(inner.clone(), done_rx));
        let background = [
            tokio::spawn(listen_loop(inner.clone(), stop_rx.clone())),
            tokio::spawn(maintenance_loop(self.clone(), stop_rx.clone())),
        ];
        let heartbeat = tokio::spawn(heartbeat_loop(inner.clone(), stop_rx.clone()));
        let concurrency = inner.config.slots();
        let prefetch = inner.config.prefetch_limit();
        let slots = Arc::new(Semaphore::new(concurrency));
        let mut tasks = JoinSet::new();
        let mut buffer: VecDeque<Claimed> = VecDeque::new();
        // The claim in flight and how many jobs it asked for.
        let mut claiming: Option<(usize, ClaimTask)> = None;
        let mut claimed_total = 0usize;
        // The last claim came back short (or failed): wait for a wake-up or the poll interval.
        let mut drained = false;
        let mut last_claim = Instant::now() - inner.config.claim_cooldown;
        tokio::pin!(shutdown);
        tracing::info!(worker = %inner.id, concurrency, prefetch, "worker running");
        loop {
            while tasks.try_join_next().is_some() {}
            while !buffer.is_empty() {
                let Ok(permit) = slots.clone().try_acquire_owned() else {
                    break;
                };
                if let Some(c) = buffer.pop_front() {
                    start_chain(&mut tasks, &inner, &done_tx, c, permit);
                }
            }
            let free = slots.available_permits();
            let want = free + prefetch.saturating_sub(buffer.len());
            let refill = want > 0 && (free > 0 || buffer.len() * 2 <= prefetch);
            let may_claim = claiming.is_none() && !drained && refill;
            let claim_at = if free == concurrency {
                Instant::now()
            } else {
                last_claim + inner.config.claim_cooldown
            };
            if may_claim && claim_at <= Instant::now() {
                last_claim = Instant::now();
                let claimer = inner.clone();
                claiming = Some((want, tokio::spawn(async move { claimer.claim(want).await })));
            }
            let cooling = may_claim && claiming.is_none();
            // A job this worker scheduled for later becomes due: claim then, not at the poll.
            let timer = if drained {
                inner.next_timer(Instant::now())
            } else {
                None
            };
            tokio::select! {
                biased;
                _ = &mut shutdown => break,
                joined = async {
                    match claiming.as_mut() {
                        Some((_, handle)) => handle.await,
                        None => std::future::pending().await,
                    }
                }, if claiming.is_some() => {
                    let asked = claiming.take().map_or(0, |(asked, _)| asked);
                    match joined {
                        Ok(Ok(jobs)) => {
                            drained = jobs.len() < asked;
                            claimed_total += jobs.len();
                            buffer.extend(jobs);
                        }
                        Ok(Err(e)) => {
                            tracing::warn!(error = %e, "claiming jobs failed; retrying after the poll interval");
                            drained = true;
                        }
                        Err(e) => {
                            tracing::error!(error = %e, "claim task failed; retrying after the poll interval");
                            drained = true;
                        }
                    }
                }
                _ = inner.slot_freed.notified() => {}
                _ = tokio::time::sleep_until(claim_at), if cooling => {}
                _ = inner.wake.notified(), if drained => drained = false,
                _ = tokio::time::sleep_until(timer.unwrap_or_else(Instant::now)), if timer.is_some() => {
                    drained = false;
                }
                _ = inner.timer_added.notified() => {}
                _ = tokio::time::sleep(inner.config.poll_interval), if drained => drained = false,
            }
        }
        inner.stopping.store(true, Ordering::SeqCst);
        // A claim in flight is seen through: its jobs are leased to this worker.
        if let Some((_, handle)) = claiming.take() {
            match handle.await {
                Ok(Ok(jobs)) => {
                    claimed_total += jobs.len();
                    buffer.extend(jobs);
                }
                Ok(Err(e)) => tracing::warn!(error = %e, "claiming jobs failed"),
                Err(e) => tracing::error!(error = %e, "claim task failed"),
            }
        }
        let unstarted = buffer.len();
        for c in buffer.drain(..) {
            inner.untrack(c.job.id);
            let _ = done_tx.send(not_started(c.job, c.state, RELEASED_AT_SHUTDOWN));
        }
        tracing::info!(
            worker = %inner.id,
            running = tasks.len(),
            released = unstarted,
            "stopping: no more claims; prefetched jobs released"
        );
        let graceful = tokio::time::timeout(inner.config.grace_period, async {
            while tasks.join_next().await.is_some() {}
        })
        .await;
        if graceful.is_err() {
            tracing::warn!(
                worker = %inner.id,
                remaining = tasks.len(),
                "grace period over; releasing unfinished jobs"
            );
            let _ = inner.abort.send(true);
            while tasks.join_next().await.is_some() {}
        }
        let _ = stop_tx.send(true);
        drop(done_tx);
        let mut totals = settler.await.unwrap_or_default();
        totals.claimed = claimed_total;
        let _ = heartbeat.await;
        for task in background {
            let _ = task.await;
        }
        let mut conn = inner.pool.acquire().await?;
        store::queue_workers::worker_stop(&mut conn, inner.id).await?;
        tracing::info!(worker = %inner.id, ?totals, "worker stopped");
        Ok(totals)
    }
}

/// Starts a claimed job (and the continuations it hands over) in the slot `permit` holds.
fn start_chain(
    tasks: &mut JoinSet<()>,
    inner: &Arc<Inner>,
    done: &mpsc::UnboundedSender<Finished>,
    claimed: Claimed,
    permit: tokio::sync::OwnedSemaphorePermit,
) {
    let inner = inner.clone();
    let done = done.clone();
    tasks.spawn(async move {
        run_chain(&inner, claimed, &done).await;
        drop(permit);
        inner.slot_freed.notify_one();
    });
}

fn not_started(job: ClaimedJob, state: Arc<LeaseState>, reason: &'static str) -> Finished {
    finished(job, state, Ending::NotStarted(reason))
}

fn finished(job: ClaimedJob, state: Arc<LeaseState>, ending: Ending) -> Finished {
    Finished {
        id: job.id,
        token: job.lease_token,
        kind: job.kind,
        attempt: job.attempt,
        first_claim: job.first_claim,
        state,
        ending,
    }
}

impl Inner {
    /// Claims up to `limit` due jobs; the heartbeat covers each from here on.
    async fn claim(&self, limit: usize) -> Result<Vec<Claimed>, QueueError> {
        let mut conn = self.pool.acquire().await?;
        let sent = Instant::now();
        let jobs = store::jobs::job_claim(
            &mut conn,
            self.id,
            i64::try_from(limit).unwrap_or(i64::MAX),
            self.config.lease,
            Some(&self.kinds),
        )
        .await?;
        drop(conn);
        let expires = sent + self.config.lease;
        Ok(jobs
            .into_iter()
            .map(|job| {
                let state = self.track(&job, Some(expires));
                Claimed { job, state }
            })
            .collect())
    }

    /// Registers a job leased to this worker with the heartbeat.
    fn track(&self, job: &ClaimedJob, expires: Option<Instant>) -> Arc<LeaseState> {
        let state = Arc::new(LeaseState::default());
        if let Some(at) = expires {
            state.set_expires(at);
        }
        let mut running = self.running.lock().unwrap_or_else(|p| p.into_inner());
        running.insert(job.id, (job.lease_token, state.clone()));
        state
    }

    /// Registers a continuation with the heartbeat, with the lease it was inserted with and
    /// what the job it continues (`from`) passed on to it.
    fn track_continuation(
        &self,
        c: Continuation,
        from: &LeaseState,
    ) -> (ClaimedJob, Arc<LeaseState>) {
        let state = self.track(&c.job, Some(c.expires));
        state.receive_handoff(from);
        (c.job, state)
    }

    fn untrack(&self, id: i64) {
        let mut running = self.running.lock().unwrap_or_else(|p| p.into_inner());
        running.remove(&id);
    }

    async fn heartbeat(&self) -> Result<usize, QueueError> {
        let (ids, tokens): (Vec<i64>, Vec<Uuid>) = {
            let running = self.running.lock().unwrap_or_else(|p| p.into_inner());
            running.iter().map(|(id, (token, _))| (*id, *token)).unzip()
        };
        if ids.is_empty() {
            return Ok(0);
        }
        let mut conn = self.pool.acquire().await?;
        let sent = Instant::now();
        let held = store::jobs::job_heartbeat(&mut conn, &ids, &tokens, self.config.lease).await?;
        drop(conn);
        let held: HashSet<i64> = held.into_iter().collect();
        let expires = sent + self.config.lease;
        let running = self.running.lock().unwrap_or_else(|p| p.into_inner());
        let mut lost = 0;
        for (id, token) in ids.iter().zip(&tokens) {
            // The same attempt only: the job may have finished and been claimed again meanwhile.
            let Some((_, state)) = running.get(id).filter(|(t, _)| t == token) else {
                continue;
            };
            if held.contains(id) {
                state.set_expires(expires);
            } else if !state.settled.load(Ordering::SeqCst)
                && !state.completing.load(Ordering::SeqCst)
            {
                tracing::warn!(
                    job = id,
                    "lease lost (rescued or cancelled); stopping the handler, or not starting it"
                );
                state.mark_lost();
                lost += 1;
            }
        }
        Ok(lost)
    }

    /// Sets a timer of this worker's own for a job it scheduled `delay` from now (a little
    /// after, so that the database finds it due).
    fn wake_at(&self, delay: Duration) {
        if delay > LOCAL_TIMER_HORIZON {
            return;
        }
        let mut timers = self.due_timers.lock().unwrap_or_else(|p| p.into_inner());
        if timers.len() < LOCAL_TIMERS {
            timers.push(std::cmp::Reverse(
                Instant::now() + delay + Duration::from_millis(5),
            ));
            drop(timers);
            self.timer_added.notify_one();
        }
    }

    /// The earliest timer set by [`wake_at`](Self::wake_at); those already due are dropped
    /// (`now` is when the worker claims next).
    fn next_timer(&self, now: Instant) -> Option<Instant> {
        let mut timers = self.due_timers.lock().unwrap_or_else(|p| p.into_inner());
        let mut due = false;
        while timers.peek().is_some_and(|t| t.0 <= now) {
            timers.pop();
            due = true;
        }
        if due {
            Some(now)
        } else {
            timers.peek().map(|t| t.0)
        }
    }

    /// Applies the results of finished attempts.
    async fn settle(&self, batch: Vec<Finished>) -> Result<TickOutcome, QueueError> {
        let mut out = TickOutcome::default();
        let mut complete = (Vec::new(), Vec::new());
        let mut release = (Vec::new(), Vec::new());
        let mut unstarted: Vec<Unstarted> = Vec::new();
        let mut wake = false;
        let mut conn = self.pool.acquire().await?;
        for f in batch {
            wake |= f.state.enqueued.load(Ordering::SeqCst);
            let due_later = *f.state.due_later.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(at) = due_later {
                self.wake_at((at - Utc::now()).to_std().unwrap_or_default());
            }
            if f.state.settled.load(Ordering::SeqCst) {
                if let Ending::Done(Err(e)) = &f.ending {
                    tracing::warn!(job = f.id, error = %e, "handler failed after completing its job; the completion stands");
                }
                out.completed += 1;
                continue;
            }
            let result = match f.ending {
                Ending::Released => {
                    release.0.push(f.id);
                    release.1.push(f.token);
                    continue;
                }
                Ending::NotStarted(reason) => {
                    let group = match unstarted.iter().position(|u| u.reason == reason) {
                        Some(i) => &mut unstarted[i],
                        None => {
                            unstarted.push(Unstarted {
                                reason,
                                ..Unstarted::default()
                            });
                            unstarted.last_mut().expect("just pushed")
                        }
                    };
                    group.ids.push(f.id);
                    group.tokens.push(f.token);
                    group.never_held.push(f.first_claim);
                    continue;
                }
                Ending::Done(result) => result,
            };
            let (error, retry_in) = match result {
                Ok(()) => {
                    complete.0.push(f.id);
                    complete.1.push(f.token);
                    continue;
                }
                Err(JobError::LeaseLost) => {
                    out.lease_lost += 1;
                    continue;
                }
                Err(JobError::Snooze(delay)) => {
                    if store::jobs::job_snooze(&mut conn, f.id, f.token, delay).await? {
                        self.wake_at(delay);
                        out.snoozed += 1;
                    } else {
                        out.lease_lost += 1;
                    }
                    continue;
                }
                Err(e @ JobError::Permanent(_)) => (e.to_string(), None),
                Err(e @ (JobError::Retryable(_) | JobError::Store(_))) => {
                    let delay = self.registry.options(&f.kind).backoff.delay(f.attempt);
                    (e.to_string(), Some(delay))
                }
            };
            let failure = JobFailure {
                id: f.id,
                token: f.token,
                error: &error,
                retry_in,
            };
            match store::jobs::job_fail(&mut conn, &failure).await?.as_deref() {
                Some("retryable") => {
                    tracing::info!(job = f.id, kind = %f.kind, attempt = f.attempt, %error, "job failed; will retry");
                    out.retried += 1;
                    // A retry after a backoff is found by the polls once due; only one due
                    // now is worth a wake-up.
                    wake |= retry_in.is_some_and(|delay| delay.is_zero());
                    if let Some(delay) = retry_in.filter(|d| !d.is_zero()) {
                        self.wake_at(delay);
                    }
                }
                Some(_) => {
                    tracing::warn!(job = f.id, kind = %f.kind, attempt = f.attempt, %error, "job is dead");
                    out.dead += 1;
                }
                None => out.lease_lost += 1,
            }
        }
        let done = store::jobs::job_complete_many(&mut conn, &complete.0, &complete.1).await?;
        out.completed += done.len();
        out.lease_lost += complete.0.len() - done.len();
        let released = store::jobs::job_release_many(
            &mut conn,
            &release.0,
            &release.1,
            &vec![false; release.0.len()],
            "released at worker shutdown (grace period over)",
        )
        .await?;
        out.released += released.len();
        out.lease_lost += release.0.len() - released.len();
        for u in unstarted {
            let returned = store::jobs::job_release_many(
                &mut conn,
                &u.ids,
                &u.tokens,
                &u.never_held,
                u.reason,
            )
            .await?;
            out.released += returned.len();
            out.lease_lost += u.ids.len() - returned.len();
        }
        if wake || out.released > 0 {
            self.notifier.notify();
            self.wake.notify_one();
        }
        Ok(out)
    }
}

/// Runs one claimed job unless its lease is already known to be lost (`LeaseLost`, not started)
/// or ran out by the worker's clock while it waited for a slot (released unstarted); then stops
/// tracking it.
async fn execute(inner: Arc<Inner>, job: ClaimedJob, state: Arc<LeaseState>) -> Finished {
    let ending = if state.is_lost() {
        tracing::info!(
            job = job.id,
            "a prefetched job's lease was lost; not starting it"
        );
        Ending::Done(Err(JobError::LeaseLost))
    } else if state.expired(Instant::now()) {
        tracing::warn!(
            job = job.id,
            "a prefetched job's lease ran out before a slot freed; releasing it unstarted"
        );
        Ending::NotStarted(RELEASED_EXPIRED)
    } else {
        run_handler(&inner, &job, &state).await
    };
    inner.untrack(job.id);
    finished(job, state, ending)
}

/// Looks up the job's handler, runs it in its own task (a panic fails the attempt, not the
/// worker) under the timeout, and stops early when the lease is lost or the worker aborts at the
/// end of its grace period.
async fn run_handler(inner: &Arc<Inner>, job: &ClaimedJob, state: &Arc<LeaseState>) -> Ending {
    match inner.registry.handler(&job.kind) {
        None => Ending::Done(Err(JobError::Permanent(format!(
            "no handler is registered for job kind `{}` on this worker (it runs: {})",
            job.kind,
            inner.registry.kinds().join(", ")
        )))),
        Some((handler, options)) => {
            let timeout = job
                .timeout_seconds
                .and_then(|s| u64::try_from(s).ok())
                .map(Duration::from_secs)
                .unwrap_or(options.timeout);
            let ctx = JobContext {
                id: job.id,
                kind: job.kind.clone(),
                payload: job.payload.clone(),
                attempt: job.attempt,
                max_attempts: job.max_attempts,
                unique_key: job.unique_key.clone(),
                first_claim: job.first_claim,
                lease: Lease::new(
                    inner.pool.clone(),
                    job.id,
                    job.lease_token,
                    state.clone(),
                    Some(inner.chain.clone()),
                ),
            };
            let mut task = tokio::spawn(handler(ctx));
            let mut abort = inner.abort.subscribe();
            let ending = tokio::select! {
                joined = tokio::time::timeout(timeout, &mut task) => match joined {
                    Ok(Ok(result)) => Ending::Done(result),
                    Ok(Err(e)) if e.is_panic() => Ending::Done(Err(JobError::Retryable(
                        format!("handler panicked: {}", panic_message(e))))),
                    Ok(Err(e)) => Ending::Done(Err(JobError::Retryable(format!("handler task failed: {e}")))),
                    Err(_) => Ending::Done(Err(JobError::Retryable(format!(
                        "handler timed out after {} s", timeout.as_secs_f64())))),
                },
                _ = state.wait_lost() => Ending::Done(Err(JobError::LeaseLost)),
                _ = flag_set(&mut abort) => Ending::Released,
            };
            task.abort();
            ending
        }
    }
}

/// Runs a claimed job and then, in the same slot, every continuation it hands over (see
/// `GuardedTx::enqueue_next`). Once the worker stops claiming, a continuation is released to
/// `available` instead of started, so another worker takes it at once.
async fn run_chain(inner: &Arc<Inner>, first: Claimed, done: &mpsc::UnboundedSender<Finished>) {
    let mut next = Some((first.job, first.state));
    while let Some((job, state)) = next.take() {
        let finished = execute(inner.clone(), job, state).await;
        let continuation = finished.state.take_continuation();
        let previous = finished.state.clone();
        let _ = done.send(finished);
        if let Some(c) = continuation {
            if inner.stopping.load(Ordering::SeqCst) || *inner.abort.borrow() {
                let state = Arc::new(LeaseState::default());
                let _ = done.send(not_started(c.job, state, RELEASED_AT_SHUTDOWN));
            } else {
                next = Some(inner.track_continuation(c, &previous));
            }
        }
    }
}

fn panic_message(e: tokio::task::JoinError) -> String {
    let payload = e.into_panic();
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".to_owned()
    }
}

async fn settle_loop(inner: Arc<Inner>, mut rx: mpsc::UnboundedReceiver<Finished>) -> TickOutcome {
    let mut totals = TickOutcome::default();
    let max = inner.config.settle_batch.max(1);
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        while batch.len() < max {
            match rx.try_recv() {
                Ok(f) => batch.push(f),
                Err(_) => break,
            }
        }
        let n = batch.len();
        match inner.settle(batch).await {
            Ok(o) => totals.add(o),
            // The jobs stay running with their leases; the rescuer returns them after expiry.
            Err(e) => tracing::error!(error = %e, jobs = n, "settling job results failed"),
        }
    }
    totals
}

async fn heartbeat_loop(inner: Arc<Inner>, mut stop: watch::Receiver<bool>) {
    let mut interval = tokio::time::interval(inner.config.heartbeat_interval);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = flag_set(&mut stop) => return,
            _ = interval.tick() => {
                if let Err(e) = inner.heartbeat().await {
                    tracing::warn!(error = %e, "lease heartbeat failed");
                }
            }
        }
    }
}

async fn maintenance_loop(worker: Worker, mut stop: watch::Receiver<bool>) {
    let mut interval = tokio::time::interval(worker.inner.config.maintenance_interval);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = flag_set(&mut stop) => return,
            _ = interval.tick() => {
                if let Err(e) = worker.maintain().await {
                    tracing::warn!(error = %e, "queue maintenance failed");
                }
            }
        }
    }
}

async fn listen_loop(inner: Arc<Inner>, mut stop: watch::Receiver<bool>) {
    loop {
        let forwards = inner.registry.forwards();
        let extra: Vec<&str> = forwards.keys().map(String::as_str).collect();
        let mut listener = match store::jobs::job_listener(&inner.pool, &extra).await {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %e, "cannot LISTEN for job wake-ups; polling only for now");
                tokio::select! {
                    _ = flag_set(&mut stop) => return,
                    _ = tokio::time::sleep(inner.config.poll_interval) => continue,
                }
            }
        };
        loop {
            tokio::select! {
                _ = flag_set(&mut stop) => return,
                received = listener.recv() => match received {
                    Ok(n) => match forwards.get(n.channel()) {
                        // No subscriber at the moment is fine.
                        Some(to) => { let _ = to.send(n.payload().to_owned()); }
                        None => inner.wake.notify_one(),
                    },
                    Err(e) => {
                        tracing::warn!(error = %StoreError::from(e), "job wake-up listener failed; reconnecting");
                        break;
                    }
                },
            }
        }
    }
}

/// Resolves once the watched flag is true (or its sender is gone).
async fn flag_set(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|set| *set).await;
}
