//! The queue's background chores against real PostgreSQL: wake-ups (NOTIFY after commit, and the
//! polling fallback), rescue of expired leases (one rescuer at a time under the advisory lock;
//! retry with backoff, or dead after the last attempt), and pruning of finished jobs and stale
//! worker rows. Workers are driven with `tick()`/`maintain_at()`; the run loop is only used where
//! the wake-up path itself is under test, and then the test waits on a channel or polls the
//! database with a deadline.

mod common;

use std::collections::HashSet;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use aiops::queue::rescue::{RESCUE_LOCK, RescueOutcome, rescue_expired};
use aiops::queue::{
    self, Backoff, JobContext, JobError, KindOptions, NewJob, Notifier, Registry, TickOutcome,
    Worker, WorkerConfig,
};
use aiops::store::jobs::{self, JobRow};
use aiops::store::queue_workers;
use chrono::{TimeDelta, Utc};
use serde_json::json;
use sqlx::PgPool;
use sqlx::postgres::PgListener;
use tokio::sync::{Barrier, mpsc, watch};
use tokio::task::JoinHandle;

/// Polls `check` until it returns `Some` or the deadline passes.
async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn enqueue(pool: &PgPool, job: NewJob) -> i64 {
    let mut conn = pool.acquire().await.unwrap();
    queue::enqueue(&mut conn, &job).await.unwrap().unwrap()
}

async fn job(pool: &PgPool, id: i64) -> JobRow {
    let mut conn = pool.acquire().await.unwrap();
    jobs::job_get(&mut conn, id).await.unwrap().unwrap()
}

async fn state_of(pool: &PgPool, id: i64) -> String {
    job(pool, id).await.state
}

fn fixed_backoff(delay: Duration) -> KindOptions {
    KindOptions {
        timeout: Duration::from_secs(30),
        backoff: Backoff {
            base: delay,
            max: delay,
            jitter: 0.0,
        },
    }
}

/// A registry whose `ping` handler reports each job id it starts on `tx`.
fn ping_registry(tx: mpsc::UnboundedSender<i64>) -> Registry {
    let mut registry = Registry::new();
    registry.register("ping", KindOptions::default(), move |ctx| {
        let _ = tx.send(ctx.id);
        async { Ok(()) }
    });
    registry
}

/// Starts `worker.run` in the background; send `true` on the returned sender to stop it.
fn run_in_background(worker: Worker) -> (watch::Sender<bool>, JoinHandle<TickOutcome>) {
    let (stop, mut stopped) = watch::channel(false);
    let handle = tokio::spawn(async move {
        worker
            .run(async move {
                let _ = stopped.wait_for(|s| *s).await;
            })
            .await
            .unwrap()
    });
    (stop, handle)
}

/// Sessions of this database that have run `LISTEN` on the wake-up channel.
async fn listeners(pool: &PgPool) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_activity \
         WHERE datname = current_database() AND query LIKE 'LISTEN %'",
    )
    .fetch_one(pool)
    .await
    .unwrap()
}

/// Waits until a worker's run loop is idle: the warm-up job (enqueued before `run`, so its first
/// claim finds it) has run and completed, after which the loop waits for a wake-up or its poll;
/// and its listener is `LISTEN`ing.
async fn wait_idle(pool: &PgPool, started: &mut mpsc::UnboundedReceiver<i64>, warm: i64) {
    let got = tokio::time::timeout(Duration::from_secs(10), started.recv())
        .await
        .expect("the warm-up job starts")
        .unwrap();
    assert_eq!(got, warm);
    eventually(
        "the warm-up job completed",
        Duration::from_secs(10),
        || async { (state_of(pool, warm).await == "completed").then_some(()) },
    )
    .await;
    eventually(
        "the worker LISTENs for wake-ups",
        Duration::from_secs(10),
        || async { (listeners(pool).await == 1).then_some(()) },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_notification_after_commit_wakes_an_idle_worker_long_before_its_poll() {
    let url = common::fresh_database_url().await;
    let pool = aiops::store::connect(&url, 10).await.unwrap();
    aiops::store::migrate(&pool).await.unwrap();
    let (tx, mut started) = mpsc::unbounded_channel();
    let poll_interval = Duration::from_secs(30);
    let config = WorkerConfig {
        concurrency: 4,
        poll_interval,
        // Maintenance wakes the loop only when it rescued or fired something; keep it out of
        // the way all the same.
        maintenance_interval: Duration::from_secs(60),
        ..WorkerConfig::default()
    };
    let worker = Worker::start(pool.clone(), ping_registry(tx), config)
        .await
        .unwrap();
    let warm = enqueue(&pool, NewJob::new("ping", json!({ "warm": true }))).await;
    let (stop, handle) = run_in_background(worker);
    wait_idle(&pool, &mut started, warm).await;

    // Another process enqueues, commits, then notifies.
    let other = aiops::store::connect(&url, 2).await.unwrap();
    let notifier = Notifier::spawn(other.clone(), Duration::from_millis(20));
    let mut txn = other.begin().await.unwrap();
    let id = queue::enqueue(&mut txn, &NewJob::new("ping", json!({})))
        .await
        .unwrap()
        .unwrap();
    txn.commit().await.unwrap();
    let committed = Instant::now();
    notifier.notify();

    // Generous: a correctness check (the NOTIFY path works), not a latency benchmark.
    let bound = Duration::from_secs(5);
    assert!(bound < poll_interval / 2);
    let got = tokio::time::timeout(bound, started.recv())
        .await
        .expect("the notified job started well before the poll interval")
        .unwrap();
    assert_eq!(got, id);
    eventually("the notified job completed", bound, || async {
        (state_of(&pool, id).await == "completed").then_some(())
    })
    .await;
    let took = committed.elapsed();
    assert!(
        took < bound,
        "commit -> completed took {took:?} with a {poll_interval:?} poll"
    );

    stop.send(true).unwrap();
    let totals = handle.await.unwrap();
    assert_eq!(totals.completed, 2, "{totals:?}");
}

/// Debounce of the wake-up tests' workers.
const WAKE_DEBOUNCE: Duration = Duration::from_millis(20);

/// A one-slot worker driven by `tick()`, and a connection listening on the wake-up channel.
async fn worker_and_listener(pool: &PgPool, registry: Registry) -> (Worker, PgListener) {
    let config = WorkerConfig {
        concurrency: 1,
        notify_debounce: WAKE_DEBOUNCE,
        ..WorkerConfig::default()
    };
    let worker = Worker::start(pool.clone(), registry, config).await.unwrap();
    let mut listener = PgListener::connect_with(pool).await.unwrap();
    listener.listen(queue::CHANNEL).await.unwrap();
    (worker, listener)
}

/// Asserts that no wake-up arrives within many debounce windows.
async fn no_wake_up(listener: &mut PgListener, what: &str) {
    let woken = tokio::time::timeout(WAKE_DEBOUNCE * 25, listener.recv()).await;
    assert!(woken.is_err(), "{what} sent a wake-up: {woken:?}");
}

/// Waits for a wake-up.
async fn wake_up(listener: &mut PgListener, what: &str) {
    let woken = tokio::time::timeout(Duration::from_secs(5), listener.recv())
        .await
        .unwrap_or_else(|_| panic!("{what} sends a wake-up"))
        .unwrap();
    assert_eq!(woken.channel(), queue::CHANNEL);
}

/// A handler that enqueues `ping` in its guarded transaction, due at once or an hour from now.
async fn enqueue_ping(ctx: JobContext, later: bool) -> Result<(), JobError> {
    let mut next = NewJob::new("ping", json!({}));
    if later {
        next = next.with_run_at(Utc::now() + TimeDelta::hours(1));
    }
    let mut tx = ctx.lease().guarded_tx().await?;
    tx.enqueue(&next).await?;
    tx.complete().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_a_follow_up_job_that_is_due_now_sends_a_wake_up() {
    let pool = common::fresh_pool().await;
    let mut registry = Registry::new();
    registry.register("ping", KindOptions::default(), |_| async { Ok(()) });
    registry.register("schedule_later", KindOptions::default(), |ctx| {
        enqueue_ping(ctx, true)
    });
    registry.register("schedule_now", KindOptions::default(), |ctx| {
        enqueue_ping(ctx, false)
    });
    let (worker, mut listener) = worker_and_listener(&pool, registry).await;

    // A timer for later: committed, and nobody is woken for it.
    enqueue(&pool, NewJob::new("schedule_later", json!({}))).await;
    let out = worker.tick().await.unwrap();
    assert_eq!(out.completed, 1, "{out:?}");
    let scheduled: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM jobs WHERE kind = 'ping' AND state = 'available' \
         AND run_at > now() + interval '50 minutes'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(scheduled, 1);
    no_wake_up(&mut listener, "a job scheduled an hour ahead").await;

    // A job due now: the same path wakes the workers after the commit.
    enqueue(&pool, NewJob::new("schedule_now", json!({}))).await;
    let out = worker.tick().await.unwrap();
    assert_eq!(out.completed, 1, "{out:?}");
    wake_up(&mut listener, "a follow-up job due now").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_a_retry_that_is_due_now_sends_a_wake_up() {
    let pool = common::fresh_pool().await;
    let mut registry = Registry::new();
    let fail = |_| async { Err(JobError::Retryable("try again".into())) };
    registry.register(
        "retry_later",
        fixed_backoff(Duration::from_secs(3600)),
        fail,
    );
    registry.register("retry_now", fixed_backoff(Duration::ZERO), fail);
    let (worker, mut listener) = worker_and_listener(&pool, registry).await;

    let later = enqueue(&pool, NewJob::new("retry_later", json!({}))).await;
    let out = worker.tick().await.unwrap();
    assert_eq!(out.retried, 1, "{out:?}");
    let retried = job(&pool, later).await;
    assert_eq!(retried.state, "retryable");
    assert!(retried.run_at > Utc::now() + TimeDelta::minutes(50));
    no_wake_up(&mut listener, "a retry an hour ahead").await;

    enqueue(&pool, NewJob::new("retry_now", json!({}))).await;
    let out = worker.tick().await.unwrap();
    assert_eq!(out.retried, 1, "{out:?}");
    wake_up(&mut listener, "a retry due now").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_worker_finds_unnotified_work_by_polling() {
    let pool = common::fresh_pool().await;
    let (tx, mut started) = mpsc::unbounded_channel();
    let config = WorkerConfig {
        concurrency: 4,
        poll_interval: Duration::from_millis(200),
        maintenance_interval: Duration::from_secs(60),
        ..WorkerConfig::default()
    };
    let worker = Worker::start(pool.clone(), ping_registry(tx), config)
        .await
        .unwrap();
    let warm = enqueue(&pool, NewJob::new("ping", json!({ "warm": true }))).await;
    let (stop, handle) = run_in_background(worker);
    wait_idle(&pool, &mut started, warm).await;

    // Enqueued and committed with no NOTIFY at all: only the poll can find these.
    let mut ids = HashSet::new();
    for _ in 0..3 {
        ids.insert(enqueue(&pool, NewJob::new("ping", json!({}))).await);
        let got = tokio::time::timeout(Duration::from_secs(10), started.recv())
            .await
            .expect("an unnotified job is found by the polling fallback")
            .unwrap();
        assert!(ids.contains(&got));
    }
    for id in &ids {
        eventually(
            "the polled job completed",
            Duration::from_secs(10),
            || async { (state_of(&pool, *id).await == "completed").then_some(()) },
        )
        .await;
    }
    stop.send(true).unwrap();
    handle.await.unwrap();
}

/// Claims every due job for a worker that then "crashes" (never heartbeats) with a 1 ms lease,
/// and waits until every one of those leases has expired by the database clock.
async fn claim_and_abandon(pool: &PgPool, expected: usize) -> uuid::Uuid {
    let crashed = uuid::Uuid::new_v4();
    let mut conn = pool.acquire().await.unwrap();
    let mut claimed = 0;
    loop {
        let got = jobs::job_claim(&mut conn, crashed, 1000, Duration::from_millis(1), None)
            .await
            .unwrap();
        if got.is_empty() {
            break;
        }
        claimed += got.len();
    }
    assert_eq!(claimed, expected);
    drop(conn);
    eventually(
        "every abandoned lease expired",
        Duration::from_secs(10),
        || async {
            let live: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM jobs WHERE state = 'running' AND lease_expires_at >= now()",
            )
            .fetch_one(pool)
            .await
            .unwrap();
            (live == 0).then_some(())
        },
    )
    .await;
    crashed
}

async fn running(pool: &PgPool) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM jobs WHERE state = 'running'")
        .fetch_one(pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn while_one_session_holds_the_rescue_lock_no_other_rescue_acts() {
    let pool = common::fresh_pool().await;
    let mut registry = Registry::new();
    registry.register("slow", fixed_backoff(Duration::from_secs(60)), |_| async {
        Ok(())
    });
    let batch: Vec<NewJob> = (0..50)
        .map(|i| NewJob::new("slow", json!({ "i": i })))
        .collect();
    let mut conn = pool.acquire().await.unwrap();
    queue::enqueue_many(&mut conn, &batch).await.unwrap();
    drop(conn);
    claim_and_abandon(&pool, 50).await;

    // Another host's rescuer is mid-pass: it holds the lock in its transaction.
    let mut holder = pool.begin().await.unwrap();
    assert!(
        queue_workers::queue_try_lock(&mut holder, RESCUE_LOCK)
            .await
            .unwrap()
    );

    let skipped = rescue_expired(&pool, &registry).await.unwrap();
    assert_eq!(
        skipped,
        RescueOutcome {
            skipped: true,
            retried: 0,
            dead: 0
        }
    );
    let worker = Worker::start(pool.clone(), registry.clone(), WorkerConfig::default())
        .await
        .unwrap();
    let pass = worker.maintain_at(Utc::now()).await.unwrap();
    assert!(pass.rescue.skipped, "{pass:?}");
    assert_eq!(pass.rescue.retried + pass.rescue.dead, 0);
    assert_eq!(
        running(&pool).await,
        50,
        "nothing moved while the lock was held"
    );

    // The lock goes with the holder's transaction; the next pass rescues everything once.
    holder.rollback().await.unwrap();
    let pass = worker.maintain_at(Utc::now()).await.unwrap();
    assert_eq!(
        pass.rescue,
        RescueOutcome {
            skipped: false,
            retried: 50,
            dead: 0
        }
    );
    assert_eq!(running(&pool).await, 0);
    let again = rescue_expired(&pool, &registry).await.unwrap();
    assert_eq!(again, RescueOutcome::default(), "nothing left to rescue");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_rescuers_rescue_every_expired_job_exactly_once() {
    let url = common::fresh_database_url().await;
    let first = aiops::store::connect(&url, 10).await.unwrap();
    aiops::store::migrate(&first).await.unwrap();
    let mut registry = Registry::new();
    registry.register("slow", fixed_backoff(Duration::from_secs(600)), |_| async {
        Ok(())
    });
    // More than three rescue batches' worth; every seventh job was on its last attempt.
    const JOBS: usize = 3500;
    let batch: Vec<NewJob> = (0..JOBS)
        .map(|i| {
            NewJob::new("slow", json!({ "i": i })).with_max_attempts(if i % 7 == 0 { 1 } else { 5 })
        })
        .collect();
    let mut conn = first.acquire().await.unwrap();
    let ids = queue::enqueue_many(&mut conn, &batch).await.unwrap();
    drop(conn);
    assert_eq!(ids.len(), JOBS);
    let last_attempt = (0..JOBS).filter(|i| i % 7 == 0).count();
    let crashed = claim_and_abandon(&first, JOBS).await;

    // Four pools (four hosts), two workers on each, all maintaining at once.
    const RESCUERS: usize = 8;
    let barrier = Arc::new(Barrier::new(RESCUERS));
    let mut tasks = Vec::new();
    for p in 0..4 {
        let pool = if p == 0 {
            first.clone()
        } else {
            aiops::store::connect(&url, 4).await.unwrap()
        };
        for _ in 0..RESCUERS / 4 {
            let worker = Worker::start(pool.clone(), registry.clone(), WorkerConfig::default())
                .await
                .unwrap();
            let pool = pool.clone();
            let barrier = barrier.clone();
            tasks.push(tokio::spawn(async move {
                barrier.wait().await;
                let mut mine = RescueOutcome::default();
                let mut skipped = 0;
                let deadline = Instant::now() + Duration::from_secs(60);
                while running(&pool).await > 0 {
                    assert!(Instant::now() < deadline, "rescue did not finish");
                    let pass = worker.maintain_at(Utc::now()).await.unwrap().rescue;
                    if pass.skipped {
                        // Another rescuer holds the lock: poll again shortly.
                        skipped += 1;
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    mine.retried += pass.retried;
                    mine.dead += pass.dead;
                }
                (mine, skipped)
            }));
        }
    }
    let (mut retried, mut dead, mut skipped) = (0, 0, 0);
    for t in tasks {
        let (o, s) = t.await.unwrap();
        retried += o.retried;
        dead += o.dead;
        skipped += s;
    }
    // Each job counted by exactly one rescuer: a double move would push a sum past its count.
    assert_eq!(dead, last_attempt, "skipped passes: {skipped}");
    assert_eq!(retried, JOBS - last_attempt);

    #[derive(sqlx::FromRow)]
    struct Rescued {
        id: i64,
        state: String,
        attempt: i32,
        max_attempts: i32,
        rescues: i64,
        errors: i32,
        lease_cleared: bool,
        run_at_future: bool,
        worker: Option<String>,
    }
    let rows: Vec<Rescued> = sqlx::query_as(
        "SELECT id, state, attempt, max_attempts, \
             (SELECT count(*) FROM jsonb_array_elements(errors) e \
              WHERE e->>'error' = 'lease expired') AS rescues, \
             jsonb_array_length(errors) AS errors, \
             (lease_token IS NULL AND lease_expires_at IS NULL) AS lease_cleared, \
             run_at > now() + interval '500 seconds' AS run_at_future, \
             errors->0->>'worker' AS worker \
         FROM jobs ORDER BY id",
    )
    .fetch_all(&first)
    .await
    .unwrap();
    assert_eq!(rows.len(), JOBS);
    assert_eq!(
        rows.iter().map(|r| r.id).collect::<HashSet<_>>(),
        ids.iter().copied().collect::<HashSet<_>>()
    );
    for r in &rows {
        assert_eq!(r.attempt, 1, "job {}: the rescue spends no attempt", r.id);
        assert_eq!(r.rescues, 1, "job {}: rescued once", r.id);
        assert_eq!(r.errors, 1, "job {}: one entry in its error history", r.id);
        assert!(r.lease_cleared, "job {}: lease cleared", r.id);
        assert_eq!(r.worker.as_deref(), Some(crashed.to_string().as_str()));
        if r.max_attempts == 1 {
            assert_eq!(r.state, "dead", "job {}", r.id);
        } else {
            assert_eq!(r.state, "retryable", "job {}", r.id);
            assert!(r.run_at_future, "job {}: backoff written to run_at", r.id);
        }
    }
}

#[tokio::test]
async fn an_expired_last_attempt_goes_dead_and_an_earlier_one_backs_off() {
    let pool = common::fresh_pool().await;
    let mut registry = Registry::new();
    registry.register("slow", fixed_backoff(Duration::from_secs(30)), |_| async {
        Ok(())
    });
    // Backs off by zero, so its second (last) attempt can be claimed at once.
    registry.register("eager", fixed_backoff(Duration::ZERO), |_| async { Ok(()) });
    let worker = Worker::start(pool.clone(), registry, WorkerConfig::default())
        .await
        .unwrap();

    let only = enqueue(&pool, NewJob::new("slow", json!({})).with_max_attempts(1)).await;
    let spare = enqueue(&pool, NewJob::new("slow", json!({})).with_max_attempts(3)).await;
    let twice = enqueue(&pool, NewJob::new("eager", json!({})).with_max_attempts(2)).await;
    claim_and_abandon(&pool, 3).await;

    let before_rescue: chrono::DateTime<Utc> = sqlx::query_scalar("SELECT now()")
        .fetch_one(&pool)
        .await
        .unwrap();
    let pass = worker.maintain_at(Utc::now()).await.unwrap().rescue;
    assert_eq!(
        pass,
        RescueOutcome {
            skipped: false,
            retried: 2,
            dead: 1
        }
    );

    // Its only attempt's lease expired: dead, not available, with a clear reason.
    let dead = job(&pool, only).await;
    assert_eq!(dead.state, "dead");
    assert_eq!(dead.attempt, 1);
    assert!(dead.finished_at.is_some());
    assert!(dead.lease_token.is_none() && dead.lease_expires_at.is_none());
    let reason = dead.last_error.as_deref().unwrap_or_default();
    assert!(
        reason.contains("lease expired") && reason.contains("heartbeat"),
        "{reason}"
    );

    // Attempts left: back to retryable, due only after the kind's backoff.
    let back = job(&pool, spare).await;
    assert_eq!(back.state, "retryable");
    assert_eq!(back.attempt, 1);
    assert!(back.finished_at.is_none());
    assert!(back.lease_token.is_none());
    assert!(
        back.run_at >= before_rescue + TimeDelta::seconds(29),
        "run_at {} is not ~30 s after the rescue at {before_rescue}",
        back.run_at
    );
    assert!(back.last_error.unwrap().contains("lease expired"));
    assert_eq!(back.errors.as_array().unwrap().len(), 1);

    // Nothing is claimable now except the zero-backoff job (its second, last, attempt).
    let mut conn = pool.acquire().await.unwrap();
    let second = jobs::job_claim(
        &mut conn,
        uuid::Uuid::new_v4(),
        10,
        Duration::from_millis(1),
        None,
    )
    .await
    .unwrap();
    drop(conn);
    assert_eq!(second.iter().map(|j| j.id).collect::<Vec<_>>(), vec![twice]);
    assert_eq!(second[0].attempt, 2);
    eventually(
        "the second lease expired",
        Duration::from_secs(10),
        || async {
            let expired: bool =
                sqlx::query_scalar("SELECT lease_expires_at < now() FROM jobs WHERE id = $1")
                    .bind(twice)
                    .fetch_one(&pool)
                    .await
                    .unwrap();
            expired.then_some(())
        },
    )
    .await;
    let pass = worker.maintain_at(Utc::now()).await.unwrap().rescue;
    assert_eq!(
        pass,
        RescueOutcome {
            skipped: false,
            retried: 0,
            dead: 1
        }
    );
    let twice = job(&pool, twice).await;
    assert_eq!(twice.state, "dead");
    assert_eq!(twice.attempt, 2);
    assert!(twice.last_error.unwrap().contains("lease expired"));
    let history = twice.errors.as_array().unwrap();
    assert_eq!(history.len(), 2, "{history:?}");
    assert_eq!(history[0]["attempt"], 1);
    assert_eq!(history[1]["attempt"], 2);
    // The dead jobs are not claimable.
    assert_eq!(worker.tick().await.unwrap(), TickOutcome::default());
}

#[tokio::test]
async fn pruning_deletes_old_finished_jobs_and_stale_workers_and_keeps_the_rest() {
    let pool = common::fresh_pool().await;
    let retention = Duration::from_secs(3600);
    let mut registry = Registry::new();
    queue::prune::register(&mut registry, retention).unwrap();
    let worker = Worker::start(pool.clone(), registry, WorkerConfig::default())
        .await
        .unwrap();

    // (state, age of finished_at / created_at, run_at) -> expected to survive?
    let fixtures: [(&str, &str, bool); 10] = [
        ("completed", "2 hours", false),
        ("dead", "2 hours", false),
        ("cancelled", "3 days", false),
        ("completed", "10 minutes", true),
        ("dead", "50 minutes", true),
        ("cancelled", "1 minute", true),
        // Unfinished jobs of any age stay (not due, so the worker's claim leaves them alone).
        ("available", "30 days", true),
        ("retryable", "30 days", true),
        ("running", "30 days", true),
        ("available", "1 minute", true),
    ];
    let mut expected_kept = HashSet::new();
    let mut expected_gone = HashSet::new();
    for (state, age, kept) in fixtures {
        let id: i64 = sqlx::query_scalar(
            "INSERT INTO jobs (kind, state, created_at, run_at, attempt, finished_at, \
                               lease_token, lease_expires_at) \
             VALUES ('fixture', $1, now() - $2::interval, now() + interval '1 day', \
                     CASE WHEN $1 = 'available' THEN 0 ELSE 1 END, \
                     CASE WHEN $1 IN ('completed', 'dead', 'cancelled') \
                          THEN now() - $2::interval END, \
                     CASE WHEN $1 = 'running' THEN gen_random_uuid() END, \
                     CASE WHEN $1 = 'running' THEN now() + interval '1 hour' END) \
             RETURNING id",
        )
        .bind(state)
        .bind(age)
        .fetch_one(&pool)
        .await
        .unwrap();
        if kept {
            expected_kept.insert(id);
        } else {
            expected_gone.insert(id);
        }
    }
    // More old completed jobs than one delete batch: the pass keeps going.
    let bulk: Vec<i64> = sqlx::query_scalar(
        "INSERT INTO jobs (kind, state, created_at, finished_at) \
         SELECT 'fixture', 'completed', now() - interval '1 day', now() - interval '1 day' \
         FROM generate_series(1, 12000) RETURNING id",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    expected_gone.extend(bulk);

    let stale = uuid::Uuid::new_v4();
    let recent = uuid::Uuid::new_v4();
    for (id, seen) in [(stale, "2 hours"), (recent, "5 minutes")] {
        sqlx::query(
            "INSERT INTO queue_workers (id, host, pid, version, concurrency, started_at, \
                                        last_seen_at) \
             VALUES ($1, 'old-host', 1, '0', 1, now() - interval '3 days', now() - $2::interval)",
        )
        .bind(id)
        .bind(seen)
        .execute(&pool)
        .await
        .unwrap();
    }

    // The schedule fires the prune job (every ten minutes); the worker runs it.
    let t0 = Utc::now() - TimeDelta::minutes(25);
    let first = worker.maintain_at(t0).await.unwrap();
    assert!(first.cron_fired.is_empty(), "{first:?}");
    let fired = worker.maintain_at(Utc::now()).await.unwrap();
    assert_eq!(fired.cron_fired.len(), 1, "{fired:?}");
    assert_eq!(fired.cron_fired[0].0, queue::prune::KIND);
    let outcome = worker.tick().await.unwrap();
    assert_eq!(
        outcome,
        TickOutcome {
            claimed: 1,
            completed: 1,
            ..TickOutcome::default()
        }
    );

    let left: HashSet<i64> = sqlx::query_scalar("SELECT id FROM jobs WHERE kind = 'fixture'")
        .fetch_all(&pool)
        .await
        .unwrap()
        .into_iter()
        .collect();
    assert_eq!(left, expected_kept);
    assert!(left.is_disjoint(&expected_gone));
    let prune_jobs: Vec<String> = sqlx::query_scalar("SELECT state FROM jobs WHERE kind = $1")
        .bind(queue::prune::KIND)
        .fetch_all(&pool)
        .await
        .unwrap();
    assert_eq!(
        prune_jobs,
        vec!["completed"],
        "the prune job itself is recent"
    );
    let workers: HashSet<uuid::Uuid> = sqlx::query_scalar("SELECT id FROM queue_workers")
        .fetch_all(&pool)
        .await
        .unwrap()
        .into_iter()
        .collect();
    assert_eq!(workers, HashSet::from([recent, worker.id()]));
}

/// A job a worker schedules a little later (a follow-up with `run_at`, or a retry after its
/// backoff) runs when it is due, not at the worker's next poll: the worker keeps a timer of its
/// own for it. Nothing else wakes this worker: its poll interval is a minute.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_scheduled_shortly_runs_when_due_without_waiting_for_the_poll() {
    let pool = common::fresh_pool().await;
    let (tx, mut started) = mpsc::unbounded_channel();
    let mut registry = ping_registry(tx.clone());
    registry.register("schedule_soon", KindOptions::default(), |ctx| async move {
        let mut g = ctx.lease().guarded_tx().await?;
        g.enqueue(
            &NewJob::new("ping", json!({ "soon": true }))
                .with_run_at(Utc::now() + TimeDelta::milliseconds(800)),
        )
        .await?;
        g.complete().await
    });
    let attempts = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let seen = attempts.clone();
    let retried = tx.clone();
    registry.register(
        "fails_once",
        fixed_backoff(Duration::from_millis(800)),
        move |ctx| {
            let first = seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 0;
            let _ = retried.send(ctx.id);
            async move {
                if first {
                    Err(JobError::Retryable("once".into()))
                } else {
                    Ok(())
                }
            }
        },
    );
    let config = WorkerConfig {
        concurrency: 2,
        poll_interval: Duration::from_secs(60),
        maintenance_interval: Duration::from_secs(60),
        ..WorkerConfig::default()
    };
    let worker = Worker::start(pool.clone(), registry, config).await.unwrap();
    let warm = enqueue(&pool, NewJob::new("ping", json!({ "warm": true }))).await;
    let (stop, handle) = run_in_background(worker);
    wait_idle(&pool, &mut started, warm).await;

    // A follow-up due in 0.8 s.
    let begun = std::time::Instant::now();
    enqueue(&pool, NewJob::new("schedule_soon", json!({}))).await;
    sqlx::query("SELECT pg_notify('aiops_jobs', '')")
        .execute(&pool)
        .await
        .unwrap();
    let ping = tokio::time::timeout(Duration::from_secs(20), started.recv())
        .await
        .expect("the follow-up runs long before the next poll")
        .unwrap();
    assert_ne!(ping, warm);
    let waited = begun.elapsed();
    assert!(
        waited >= Duration::from_millis(800),
        "ran before it was due: {waited:?}"
    );

    // A retry due in 0.8 s after its first attempt failed.
    let flaky = enqueue(&pool, NewJob::new("fails_once", json!({}))).await;
    sqlx::query("SELECT pg_notify('aiops_jobs', '')")
        .execute(&pool)
        .await
        .unwrap();
    for _ in 0..2 {
        let got = tokio::time::timeout(Duration::from_secs(20), started.recv())
            .await
            .expect("the retry runs long before the next poll")
            .unwrap();
        assert_eq!(got, flaky);
    }
    eventually("the retry completed", Duration::from_secs(10), || async {
        (state_of(&pool, flaky).await == "completed").then_some(())
    })
    .await;
    stop.send(true).unwrap();
    handle.await.unwrap();
}
