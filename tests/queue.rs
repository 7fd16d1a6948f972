//! The durable job queue against real PostgreSQL: concurrent claimers, a worker process killed
//! with SIGKILL, fencing of a stalled handler, durable backoff across restarts, attempts and
//! permanent errors, unique keys, cron with three workers, graceful shutdown, prefetch (jobs
//! claimed ahead of free slots: leases, shutdown, cancels), and the claim's use of its partial
//! index. Workers are driven with `tick()`/`maintain_at()`; where a real process
//! or timer must act, tests poll a condition with a deadline.

mod common;

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aiops::queue::{
    self, Backoff, JobContext, JobError, KindOptions, NewJob, Registry, Worker, WorkerConfig,
};
use aiops::store::jobs::{self, JobRow};
use chrono::Utc;
use serde_json::json;
use sqlx::PgPool;
use tokio::sync::{Notify, mpsc};

fn fast_backoff() -> KindOptions {
    KindOptions {
        timeout: Duration::from_secs(30),
        backoff: Backoff {
            base: Duration::from_millis(200),
            max: Duration::from_millis(200),
            jitter: 0.0,
        },
    }
}

fn config(concurrency: usize) -> WorkerConfig {
    WorkerConfig {
        concurrency,
        ..WorkerConfig::default()
    }
}

async fn enqueue(pool: &PgPool, job: NewJob) -> Option<i64> {
    let mut conn = pool.acquire().await.unwrap();
    queue::enqueue(&mut conn, &job).await.unwrap()
}

async fn job(pool: &PgPool, id: i64) -> JobRow {
    let mut conn = pool.acquire().await.unwrap();
    jobs::job_get(&mut conn, id).await.unwrap().unwrap()
}

/// Polls `check` until it returns `Some` or the deadline passes.
async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn many_claimers_on_several_pools_never_double_claim_or_lose_a_job() {
    let url = common::fresh_database_url().await;
    let first = aiops::store::connect(&url, 10).await.unwrap();
    aiops::store::migrate(&first).await.unwrap();
    const JOBS: usize = 5000;
    let batch: Vec<NewJob> = (0..JOBS)
        .map(|i| NewJob::new("noop", json!({ "i": i })).with_priority((i % 3) as i16))
        .collect();
    let mut conn = first.acquire().await.unwrap();
    let ids = queue::enqueue_many(&mut conn, &batch).await.unwrap();
    drop(conn);
    assert_eq!(ids.len(), JOBS);

    // Four pools (as four processes would have), eight claimers each.
    let mut pools = vec![first.clone()];
    for _ in 0..3 {
        pools.push(aiops::store::connect(&url, 8).await.unwrap());
    }
    let claimed = Arc::new(Mutex::new(Vec::<(i64, uuid::Uuid)>::new()));
    let mut tasks = Vec::new();
    for (p, pool) in pools.iter().enumerate() {
        for c in 0..8 {
            let pool = pool.clone();
            let claimed = claimed.clone();
            tasks.push(tokio::spawn(async move {
                let worker = uuid::Uuid::new_v4();
                let limit = 1 + ((p * 8 + c) % 25) as i64;
                loop {
                    let mut conn = pool.acquire().await.unwrap();
                    let got =
                        jobs::job_claim(&mut conn, worker, limit, Duration::from_secs(60), None)
                            .await
                            .unwrap();
                    if got.is_empty() {
                        break;
                    }
                    let ids: Vec<i64> = got.iter().map(|j| j.id).collect();
                    let tokens: Vec<uuid::Uuid> = got.iter().map(|j| j.lease_token).collect();
                    claimed
                        .lock()
                        .unwrap()
                        .extend(ids.iter().copied().zip(tokens.iter().copied()));
                    let done = jobs::job_complete_many(&mut conn, &ids, &tokens)
                        .await
                        .unwrap();
                    assert_eq!(
                        done.len(),
                        ids.len(),
                        "a claimed job could not be completed"
                    );
                }
            }));
        }
    }
    for t in tasks {
        t.await.unwrap();
    }
    let claimed = claimed.lock().unwrap().clone();
    let distinct: HashSet<i64> = claimed.iter().map(|(id, _)| *id).collect();
    assert_eq!(
        claimed.len(),
        JOBS,
        "every job claimed exactly once in total"
    );
    assert_eq!(distinct.len(), JOBS, "no job claimed twice");
    assert_eq!(
        distinct,
        ids.into_iter().collect::<HashSet<_>>(),
        "none lost"
    );
    let (completed, max_attempt): (i64, i32) = sqlx::query_as(
        "SELECT count(*) FILTER (WHERE state = 'completed'), max(attempt) FROM jobs",
    )
    .fetch_one(&first)
    .await
    .unwrap();
    assert_eq!(completed, JOBS as i64);
    assert_eq!(max_attempt, 1);
}

#[tokio::test]
async fn claim_uses_the_partial_index() {
    let pool = common::fresh_pool().await;
    sqlx::query(
        "INSERT INTO jobs (kind, state, finished_at) \
         SELECT 'noop', 'completed', now() FROM generate_series(1, 20000)",
    )
    .execute(&pool)
    .await
    .unwrap();
    sqlx::query("INSERT INTO jobs (kind) SELECT 'noop' FROM generate_series(1, 200)")
        .execute(&pool)
        .await
        .unwrap();
    sqlx::query("ANALYZE jobs").execute(&pool).await.unwrap();
    let plan: Vec<String> =
        sqlx::query_scalar(sqlx::AssertSqlSafe(format!("EXPLAIN {}", jobs::CLAIM_SQL)))
            .bind(uuid::Uuid::new_v4())
            .bind(50_i64)
            .bind(30_000_i64)
            .bind(vec!["noop".to_owned(), "other".to_owned()])
            .fetch_all(&pool)
            .await
            .unwrap();
    let plan = plan.join("\n");
    assert!(
        plan.contains("jobs_claimable_idx"),
        "claim does not use the partial index:\n{plan}"
    );
    assert!(
        !plan.contains("Seq Scan on jobs"),
        "claim scans the table:\n{plan}"
    );
}

#[tokio::test]
async fn unique_keys_deduplicate_while_unfinished() {
    let pool = common::fresh_pool().await;
    let registry = {
        let mut r = Registry::new();
        r.register("noop", KindOptions::default(), |_| async { Ok(()) });
        r
    };
    let first = enqueue(&pool, NewJob::new("noop", json!({})).with_unique_key("k1")).await;
    assert!(first.is_some());
    assert_eq!(
        enqueue(&pool, NewJob::new("noop", json!({})).with_unique_key("k1")).await,
        None
    );
    // Bulk: duplicates of an existing key and within the batch are skipped.
    let mut conn = pool.acquire().await.unwrap();
    let ids = queue::enqueue_many(
        &mut conn,
        &[
            NewJob::new("noop", json!({})).with_unique_key("k1"),
            NewJob::new("noop", json!({})).with_unique_key("k2"),
            NewJob::new("noop", json!({})).with_unique_key("k2"),
            NewJob::new("noop", json!({})),
        ],
    )
    .await
    .unwrap();
    drop(conn);
    assert_eq!(ids.len(), 2, "k2 once and the keyless job");
    // Once the job finished, the key is free again.
    let worker = Worker::start(pool.clone(), registry, config(10))
        .await
        .unwrap();
    let outcome = worker.tick().await.unwrap();
    assert_eq!(outcome.completed, 3);
    assert!(
        enqueue(&pool, NewJob::new("noop", json!({})).with_unique_key("k1"))
            .await
            .is_some()
    );
}

#[tokio::test]
async fn retryable_errors_back_off_durably_across_a_worker_restart() {
    let url = common::fresh_database_url().await;
    let pool = aiops::store::connect(&url, 4).await.unwrap();
    aiops::store::migrate(&pool).await.unwrap();
    let make_registry = || {
        let mut r = Registry::new();
        r.register("flaky", fast_backoff(), |ctx: JobContext| async move {
            if ctx.attempt == 1 {
                Err(JobError::retryable("first attempt fails"))
            } else {
                Ok(())
            }
        });
        r
    };
    let id = enqueue(&pool, NewJob::new("flaky", json!({})))
        .await
        .unwrap();
    let first = Worker::start(pool.clone(), make_registry(), config(4))
        .await
        .unwrap();
    let outcome = first.tick().await.unwrap();
    assert_eq!((outcome.claimed, outcome.retried), (1, 1));
    let row = job(&pool, id).await;
    assert_eq!(row.state, "retryable");
    assert_eq!(row.last_error.as_deref(), Some("first attempt fails"));
    let delay = row.run_at - row.attempted_at.unwrap();
    assert!(
        delay >= chrono::TimeDelta::milliseconds(190),
        "backoff written to run_at: {delay}"
    );
    drop(first);
    pool.close().await;

    // A new worker on a new pool (a restarted process) does not run it before run_at ...
    let pool = aiops::store::connect(&url, 4).await.unwrap();
    let second = Worker::start(pool.clone(), make_registry(), config(4))
        .await
        .unwrap();
    let early = second.tick().await.unwrap();
    if Utc::now() < row.run_at {
        assert_eq!(early.claimed, 0, "claimed before run_at");
    }
    // ... and runs it once run_at has passed.
    let started = Utc::now();
    eventually("the retry runs", Duration::from_secs(10), || async {
        let o = second.tick().await.unwrap();
        (o.completed == 1).then_some(())
    })
    .await;
    let row = job(&pool, id).await;
    assert_eq!((row.state.as_str(), row.attempt), ("completed", 2));
    assert!(row.attempted_at.unwrap() >= row.run_at);
    assert!(started <= row.finished_at.unwrap());
    assert_eq!(row.errors.as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn max_attempts_leads_to_dead_and_permanent_errors_do_not_retry() {
    let pool = common::fresh_pool().await;
    let mut registry = Registry::new();
    let no_backoff = KindOptions {
        backoff: Backoff {
            base: Duration::ZERO,
            max: Duration::ZERO,
            jitter: 0.0,
        },
        ..KindOptions::default()
    };
    registry.register("always_fails", no_backoff, |ctx: JobContext| async move {
        Err(JobError::Retryable(format!("boom {}", ctx.attempt)))
    });
    registry.register("bad_input", no_backoff, |_| async {
        Err(JobError::permanent("payload names no server"))
    });
    let worker = Worker::start(pool.clone(), registry, config(10))
        .await
        .unwrap();
    let failing = enqueue(
        &pool,
        NewJob::new("always_fails", json!({})).with_max_attempts(3),
    )
    .await
    .unwrap();
    let permanent = enqueue(
        &pool,
        NewJob::new("bad_input", json!({})).with_max_attempts(5),
    )
    .await
    .unwrap();
    let unknown = enqueue(&pool, NewJob::new("no.such.kind", json!({})))
        .await
        .unwrap();

    let first = worker.tick().await.unwrap();
    assert_eq!((first.claimed, first.retried, first.dead), (2, 1, 1));
    for _ in 0..2 {
        let o = worker.tick().await.unwrap();
        assert_eq!(o.claimed, 1);
    }
    assert_eq!(
        worker.tick().await.unwrap().claimed,
        0,
        "nothing left to run"
    );

    let row = job(&pool, failing).await;
    assert_eq!((row.state.as_str(), row.attempt), ("dead", 3));
    assert_eq!(row.last_error.as_deref(), Some("boom 3"));
    assert_eq!(row.errors.as_array().unwrap().len(), 3);
    assert!(row.finished_at.is_some());

    let row = job(&pool, permanent).await;
    assert_eq!(
        (row.state.as_str(), row.attempt),
        ("dead", 1),
        "permanent: one attempt only"
    );
    assert!(row.last_error.unwrap().contains("payload names no server"));

    // A kind this worker has no handler for is not claimed: it waits for a worker that runs it
    // (a newer version during a rolling upgrade), which then does.
    let row = job(&pool, unknown).await;
    assert_eq!(
        (row.state.as_str(), row.attempt),
        ("available", 0),
        "a kind this worker does not run is left to others"
    );
    let mut newer = Registry::new();
    newer.register("no.such.kind", KindOptions::default(), |_| async { Ok(()) });
    let newer = Worker::start(pool.clone(), newer, config(10))
        .await
        .unwrap();
    assert_eq!(newer.tick().await.unwrap().claimed, 1);
    let row = job(&pool, unknown).await;
    assert_eq!((row.state.as_str(), row.attempt), ("completed", 1));
}

#[tokio::test]
async fn handler_timeout_and_panic_fail_the_attempt_not_the_worker() {
    let pool = common::fresh_pool().await;
    let mut registry = Registry::new();
    registry.register(
        "slow",
        KindOptions {
            timeout: Duration::from_millis(100),
            ..fast_backoff()
        },
        |_| async {
            tokio::time::sleep(Duration::from_secs(30)).await;
            Ok(())
        },
    );
    registry.register("panics", fast_backoff(), |_| async {
        panic!("handler bug")
    });
    let worker = Worker::start(pool.clone(), registry, config(10))
        .await
        .unwrap();
    let slow = enqueue(&pool, NewJob::new("slow", json!({})))
        .await
        .unwrap();
    let panics = enqueue(&pool, NewJob::new("panics", json!({})))
        .await
        .unwrap();
    let o = worker.tick().await.unwrap();
    assert_eq!((o.claimed, o.retried), (2, 2));
    assert!(
        job(&pool, slow)
            .await
            .last_error
            .unwrap()
            .contains("timed out")
    );
    assert!(
        job(&pool, panics)
            .await
            .last_error
            .unwrap()
            .contains("handler bug")
    );
}

/// The engine's pattern: checkpoint rows, the next job and the completion commit together.
#[tokio::test]
async fn handler_writes_checkpoint_and_enqueues_next_job_in_the_fenced_transaction() {
    let pool = common::fresh_pool().await;
    sqlx::query("CREATE TABLE checkpoints (job_id bigint PRIMARY KEY, note text)")
        .execute(&pool)
        .await
        .unwrap();
    let mut registry = Registry::new();
    registry.register(
        "step",
        KindOptions::default(),
        |ctx: JobContext| async move {
            let mut tx = ctx.lease().guarded_tx().await?;
            sqlx::query("INSERT INTO checkpoints (job_id, note) VALUES ($1, 'step done')")
                .bind(ctx.id)
                .execute(tx.conn())
                .await?;
            let n = ctx.payload["n"].as_i64().unwrap_or(0);
            if n < 2 {
                tx.enqueue(&NewJob::new("step", json!({ "n": n + 1 })))
                    .await?;
            }
            tx.complete().await
        },
    );
    let worker = Worker::start(pool.clone(), registry, config(4))
        .await
        .unwrap();
    enqueue(&pool, NewJob::new("step", json!({ "n": 0 })))
        .await
        .unwrap();
    for _ in 0..3 {
        let o = worker.tick().await.unwrap();
        assert_eq!((o.claimed, o.completed), (1, 1));
    }
    assert_eq!(worker.tick().await.unwrap().claimed, 0);
    let checkpoints: i64 = sqlx::query_scalar("SELECT count(*) FROM checkpoints")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(checkpoints, 3);
}

#[tokio::test]
async fn a_stalled_handler_whose_lease_was_rescued_cannot_complete_or_write() {
    let pool = common::fresh_pool().await;
    sqlx::query("CREATE TABLE checkpoints (job_id bigint, attempt int, note text)")
        .execute(&pool)
        .await
        .unwrap();
    let release = Arc::new(Notify::new());
    let stale_result = Arc::new(Mutex::new(None::<String>));
    let mut registry = Registry::new();
    {
        let release = release.clone();
        let stale_result = stale_result.clone();
        registry.register("step", fast_backoff(), move |ctx: JobContext| {
            let release = release.clone();
            let stale_result = stale_result.clone();
            async move {
                if ctx.attempt == 1 {
                    // Stall (a hung SSH command, a GC pause) until the test lets go.
                    release.notified().await;
                }
                let result = async {
                    let mut tx = ctx.lease().guarded_tx().await?;
                    sqlx::query("INSERT INTO checkpoints VALUES ($1, $2, 'written')")
                        .bind(ctx.id)
                        .bind(ctx.attempt)
                        .execute(tx.conn())
                        .await?;
                    tx.complete().await
                }
                .await;
                if ctx.attempt == 1 {
                    *stale_result.lock().unwrap() = Some(format!("{result:?}"));
                }
                result
            }
        });
    }
    // Heartbeats far apart: the stalled worker does not notice the rescue by itself.
    let stale_config = WorkerConfig {
        lease: Duration::from_millis(300),
        heartbeat_interval: Duration::from_secs(3600),
        ..config(1)
    };
    let stale = Worker::start(pool.clone(), registry.clone(), stale_config)
        .await
        .unwrap();
    let id = enqueue(&pool, NewJob::new("step", json!({})))
        .await
        .unwrap();
    let stale_tick = tokio::spawn({
        let stale = stale.clone();
        async move { stale.tick().await.unwrap() }
    });
    // The lease expires; another worker rescues the job and runs it to completion.
    let rescuer = Worker::start(pool.clone(), registry, config(1))
        .await
        .unwrap();
    eventually("the lease is rescued", Duration::from_secs(10), || async {
        let m = rescuer.maintain().await.unwrap();
        (m.rescue.retried == 1).then_some(())
    })
    .await;
    eventually(
        "the second attempt completes",
        Duration::from_secs(10),
        || async { (rescuer.tick().await.unwrap().completed == 1).then_some(()) },
    )
    .await;
    // Now the stalled handler wakes up and tries to write and complete.
    release.notify_one();
    let stale_outcome = stale_tick.await.unwrap();
    assert_eq!(stale_outcome.lease_lost, 1);
    assert_eq!(stale_outcome.completed, 0);
    assert!(
        stale_result
            .lock()
            .unwrap()
            .as_deref()
            .unwrap()
            .contains("LeaseLost")
    );
    let rows: Vec<(i32,)> = sqlx::query_as("SELECT attempt FROM checkpoints WHERE job_id = $1")
        .bind(id)
        .fetch_all(&pool)
        .await
        .unwrap();
    assert_eq!(rows, vec![(2,)], "only the lease holder's write exists");
    let row = job(&pool, id).await;
    assert_eq!((row.state.as_str(), row.attempt), ("completed", 2));
    assert_eq!(row.locked_by, Some(rescuer.id()));

    // The plain completion path is fenced too: a stale token completes nothing.
    let mut conn = pool.acquire().await.unwrap();
    assert!(
        !jobs::job_complete(&mut conn, id, uuid::Uuid::new_v4())
            .await
            .unwrap()
    );
}

#[tokio::test]
async fn heartbeats_keep_a_long_job_from_being_rescued() {
    let pool = common::fresh_pool().await;
    let mut registry = Registry::new();
    registry.register("long", KindOptions::default(), |_| async {
        tokio::time::sleep(Duration::from_millis(1200)).await;
        Ok(())
    });
    let cfg = WorkerConfig {
        lease: Duration::from_millis(400),
        heartbeat_interval: Duration::from_millis(100),
        ..config(1)
    };
    let worker = Worker::start(pool.clone(), registry.clone(), cfg)
        .await
        .unwrap();
    let id = enqueue(&pool, NewJob::new("long", json!({})))
        .await
        .unwrap();
    let run = tokio::spawn({
        let worker = worker.clone();
        async move { worker.tick().await.unwrap() }
    });
    let other = Worker::start(pool.clone(), registry, config(1))
        .await
        .unwrap();
    let until = Instant::now() + Duration::from_millis(1000);
    while Instant::now() < until {
        let m = other.maintain().await.unwrap();
        assert_eq!(
            m.rescue.retried + m.rescue.dead,
            0,
            "a live lease was rescued"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(run.await.unwrap().completed, 1);
    assert_eq!(job(&pool, id).await.attempt, 1);
}

#[tokio::test]
async fn cron_fires_exactly_once_per_tick_with_three_workers() {
    let url = common::fresh_database_url().await;
    let mut workers = Vec::new();
    for i in 0..3 {
        let pool = aiops::store::connect(&url, 4).await.unwrap();
        if i == 0 {
            aiops::store::migrate(&pool).await.unwrap();
        }
        let mut registry = Registry::new();
        registry.register("report", KindOptions::default(), |_| async { Ok(()) });
        registry
            .cron(
                "every-second",
                "* * * * * *",
                NewJob::new("report", json!({})),
            )
            .unwrap();
        workers.push(Worker::start(pool, registry, config(2)).await.unwrap());
    }
    let t0: chrono::DateTime<Utc> = "2030-01-01T00:00:00.500Z".parse().unwrap();
    let mut fired_total = 0;
    for step in 0..6 {
        // All three workers race on the same instant; each instant has one due tick
        // (the first instant only creates the schedule's row).
        let now = t0 + chrono::TimeDelta::seconds(step);
        let mut handles = Vec::new();
        for w in &workers {
            for _ in 0..2 {
                let w = w.clone();
                handles.push(tokio::spawn(
                    async move { w.maintain_at(now).await.unwrap() },
                ));
            }
        }
        let mut fired = 0;
        for h in handles {
            fired += h.await.unwrap().cron_fired.len();
        }
        assert_eq!(fired, usize::from(step > 0), "step {step}");
        fired_total += fired;
    }
    let pool = aiops::store::connect(&url, 2).await.unwrap();
    let keys: Vec<String> = sqlx::query_scalar("SELECT unique_key FROM jobs ORDER BY id")
        .fetch_all(&pool)
        .await
        .unwrap();
    assert_eq!(keys.len(), fired_total);
    assert_eq!(keys.len(), 5);
    assert_eq!(
        keys.iter().collect::<HashSet<_>>().len(),
        5,
        "one job per tick: {keys:?}"
    );

    // Real time: the three run loops fire every passing tick once.
    let (stop, _) = tokio::sync::watch::channel(false);
    let mut loops = Vec::new();
    for w in workers {
        let mut rx = stop.subscribe();
        loops.push(tokio::spawn(w.run(async move {
            let _ = rx.wait_for(|s| *s).await;
        })));
    }
    let _ = loops;
    let started = Utc::now();
    eventually(
        "three real ticks fired",
        Duration::from_secs(15),
        || async {
            let n: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM jobs WHERE kind = 'report' AND run_at >= $1",
            )
            .bind(started)
            .fetch_one(&pool)
            .await
            .unwrap();
            (n >= 3).then_some(())
        },
    )
    .await;
    let dupes: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM (SELECT run_at FROM jobs GROUP BY run_at HAVING count(*) > 1) d",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(dupes, 0);
    let _ = stop.send(true);
}

#[tokio::test]
async fn graceful_shutdown_finishes_quick_jobs_and_releases_the_rest() {
    let pool = common::fresh_pool().await;
    let started = Arc::new(Notify::new());
    let quick_started = Arc::new(Notify::new());
    let mut registry = Registry::new();
    {
        let quick_started = quick_started.clone();
        registry.register("quick", KindOptions::default(), move |_| {
            let quick_started = quick_started.clone();
            async move {
                quick_started.notify_one();
                tokio::time::sleep(Duration::from_millis(50)).await;
                Ok(())
            }
        });
    }
    {
        let started = started.clone();
        registry.register("endless", KindOptions::default(), move |_| {
            let started = started.clone();
            async move {
                started.notify_one();
                std::future::pending::<()>().await;
                Ok(())
            }
        });
    }
    let cfg = WorkerConfig {
        grace_period: Duration::from_millis(1000),
        poll_interval: Duration::from_millis(50),
        ..config(4)
    };
    let endless = enqueue(&pool, NewJob::new("endless", json!({})))
        .await
        .unwrap();
    let worker = Worker::start(pool.clone(), registry, cfg).await.unwrap();
    let worker_id = worker.id();
    let (stop, mut rx) = tokio::sync::watch::channel(false);
    let run = tokio::spawn(worker.run(async move {
        let _ = rx.wait_for(|s| *s).await;
    }));
    tokio::time::timeout(Duration::from_secs(10), started.notified())
        .await
        .expect("the endless job starts");
    let quick = enqueue(&pool, NewJob::new("quick", json!({})))
        .await
        .unwrap();
    // Its handler has started: a job that is claimed but not yet started would be released.
    tokio::time::timeout(Duration::from_secs(10), quick_started.notified())
        .await
        .expect("the quick job starts");
    stop.send(true).unwrap();
    let totals = run.await.unwrap().unwrap();
    assert_eq!(totals.released, 1);
    assert_eq!(
        job(&pool, quick).await.state,
        "completed",
        "finished within the grace period"
    );
    let row = job(&pool, endless).await;
    assert_eq!((row.state.as_str(), row.attempt), ("available", 0));
    assert!(row.lease_token.is_none());
    assert!(
        row.errors
            .to_string()
            .contains("released at worker shutdown")
    );
    let stopped: Option<chrono::DateTime<Utc>> =
        sqlx::query_scalar("SELECT stopped_at FROM queue_workers WHERE id = $1")
            .bind(worker_id)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert!(stopped.is_some(), "the worker is recorded as stopped");
}

#[tokio::test]
async fn a_worker_process_killed_mid_job_is_rescued_and_finished_by_another_process() {
    let url = common::fresh_database_url().await;
    let pool = aiops::store::connect(&url, 4).await.unwrap();
    aiops::store::migrate(&pool).await.unwrap();
    // Attempt 1 sleeps ten minutes (it will be killed); attempt 2 finishes at once.
    let id = enqueue(
        &pool,
        NewJob::new("test.sleep", json!({ "sleep_ms": [600000, 0] })),
    )
    .await
    .unwrap();
    let spawn_worker = || {
        tokio::process::Command::new(env!("CARGO_BIN_EXE_aiops"))
            .args([
                "worker",
                "--test-kinds",
                "--concurrency",
                "2",
                "--lease-seconds",
                "1.5",
                "--poll-ms",
                "100",
                "--maintenance-ms",
                "200",
            ])
            .env("DATABASE_URL", &url)
            .env("AIOPS_LOG", "warn")
            .kill_on_drop(true)
            .spawn()
            .expect("start a worker process")
    };
    let mut first = spawn_worker();
    let first_pid = first.id().unwrap() as i32;
    let first_worker: uuid::Uuid = eventually(
        "the first process runs the job",
        Duration::from_secs(30),
        || async {
            let row = job(&pool, id).await;
            (row.state == "running").then(|| row.locked_by.unwrap())
        },
    )
    .await;
    let pid: i32 = sqlx::query_scalar("SELECT pid FROM queue_workers WHERE id = $1")
        .bind(first_worker)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(pid, first_pid, "worker identity records the process id");
    // SIGKILL: no shutdown code runs, the lease is simply no longer renewed.
    let status = std::process::Command::new("kill")
        .args(["-KILL", &first_pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    first.wait().await.unwrap();
    assert_eq!(
        job(&pool, id).await.state,
        "running",
        "still leased to the dead process"
    );

    let mut second = spawn_worker();
    let second_pid = second.id().unwrap() as i32;
    let row = eventually(
        "another process completes the job",
        Duration::from_secs(30),
        || async {
            let row = job(&pool, id).await;
            (row.state == "completed").then_some(row)
        },
    )
    .await;
    assert_eq!(row.attempt, 2);
    assert!(row.errors.to_string().contains("lease expired"));
    let finisher_pid: i32 = sqlx::query_scalar("SELECT pid FROM queue_workers WHERE id = $1")
        .bind(row.locked_by.unwrap())
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(finisher_pid, second_pid);
    // SIGTERM: the second process stops cleanly and records it.
    std::process::Command::new("kill")
        .args(["-TERM", &second_pid.to_string()])
        .status()
        .unwrap();
    let exit = tokio::time::timeout(Duration::from_secs(30), second.wait())
        .await
        .expect("the worker exits after SIGTERM")
        .unwrap();
    assert!(exit.success(), "{exit:?}");
    let stopped: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM queue_workers WHERE pid = $1 AND stopped_at IS NOT NULL",
    )
    .bind(second_pid)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(stopped, 1);
}

/// Starts a worker with `registry`, enqueues `kind` with `n` = 0 and checks that one claim ran
/// the chain of five (`n` 0 to 4, each logged in `chain_log`), every job completed in its
/// first attempt by that worker.
async fn chain_runs_in_one_slot(pool: &PgPool, registry: Registry, kind: &str) -> Worker {
    let worker = Worker::start(pool.clone(), registry, config(2))
        .await
        .unwrap();
    enqueue(pool, NewJob::new(kind, json!({ "n": 0 })))
        .await
        .unwrap();
    let o = worker.tick().await.unwrap();
    assert_eq!(
        (o.claimed, o.completed),
        (1, 5),
        "one claim ran the whole chain"
    );
    let rows: Vec<(String, i32, Option<uuid::Uuid>)> =
        sqlx::query_as("SELECT state, attempt, locked_by FROM jobs ORDER BY id")
            .fetch_all(pool)
            .await
            .unwrap();
    assert_eq!(
        rows,
        vec![("completed".to_owned(), 1, Some(worker.id())); 5]
    );
    let logged: Vec<i32> = sqlx::query_scalar("SELECT n FROM chain_log ORDER BY job_id")
        .fetch_all(pool)
        .await
        .unwrap();
    assert_eq!(logged, vec![0, 1, 2, 3, 4]);
    worker
}

/// A fresh database with the `chain_log (job_id, n)` table chained handlers write to.
async fn pool_with_chain_log() -> PgPool {
    let pool = common::fresh_pool().await;
    sqlx::query("CREATE TABLE chain_log (job_id bigint PRIMARY KEY, n int)")
        .execute(&pool)
        .await
        .unwrap();
    pool
}

#[tokio::test]
async fn continuations_run_in_the_same_slot_without_a_claim() {
    let pool = pool_with_chain_log().await;
    let mut registry = Registry::new();
    registry.register(
        "chain",
        KindOptions::default(),
        |ctx: JobContext| async move {
            let mut tx = ctx.lease().guarded_tx().await?;
            let n = ctx.payload["n"].as_i64().unwrap_or(0);
            sqlx::query("INSERT INTO chain_log (job_id, n) VALUES ($1, $2)")
                .bind(ctx.id)
                .bind(n as i32)
                .execute(tx.conn())
                .await?;
            if n < 4 {
                tx.enqueue_next(&NewJob::new("chain", json!({ "n": n + 1 })))
                    .await?;
            }
            tx.complete().await
        },
    );
    let worker = chain_runs_in_one_slot(&pool, registry, "chain").await;
    assert_eq!(worker.tick().await.unwrap().claimed, 0, "nothing was left");
}

/// The handler's writes of `complete_continuing`: a `chain_log` row for job `$11` with `n` =
/// `$12`, and a continuation while `n` < 4.
fn chain_log_writes<'q>(
    job_id: i64,
    n: i32,
) -> jobs::HandlerWrites<impl FnOnce(jobs::ContinuingQuery<'q>) -> jobs::ContinuingQuery<'q>> {
    jobs::HandlerWrites {
        before: "w AS (INSERT INTO chain_log (job_id, n) SELECT $11, $12 \
                       WHERE EXISTS (SELECT 1 FROM fence)), \
                 go AS (SELECT 1 WHERE $12 < 4),",
        after: "",
        bind: move |q: jobs::ContinuingQuery<'q>| q.bind(job_id).bind(n),
    }
}

#[tokio::test]
async fn one_statement_completion_continues_in_the_same_slot_and_is_fenced() {
    let pool = pool_with_chain_log().await;
    let mut registry = Registry::new();
    registry.register(
        "chain1",
        KindOptions::default(),
        |ctx: JobContext| async move {
            let n = ctx.payload["n"].as_i64().unwrap_or(0) as i32;
            let next = NewJob::new("chain1", json!({ "n": n + 1 }));
            assert!(ctx.lease().can_continue_with(&next));
            ctx.lease()
                .complete_continuing(&next, chain_log_writes(ctx.id, n))
                .await
        },
    );
    let worker = chain_runs_in_one_slot(&pool, registry, "chain1").await;

    // Without the lease (another token: the job was rescued and claimed again), the statement
    // writes nothing: no completion, no continuation, none of the handler's rows.
    let id = enqueue(&pool, NewJob::new("chain1", json!({ "n": 0 })))
        .await
        .unwrap();
    let mut conn = pool.acquire().await.unwrap();
    let claimed = jobs::job_claim(&mut conn, worker.id(), 1, Duration::from_secs(60), None)
        .await
        .unwrap();
    assert_eq!(claimed[0].id, id);
    let next = NewJob::new("chain1", json!({ "n": 1 }));
    let done = jobs::job_complete_continuing(
        &mut conn,
        id,
        uuid::Uuid::new_v4(),
        &next,
        worker.id(),
        Duration::from_secs(60),
        chain_log_writes(id, 0),
    )
    .await
    .unwrap();
    assert!(done.is_none(), "completed without the lease");
    assert_eq!(job(&pool, id).await.state, "running");
    let (jobs_count, log_count): (i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM jobs), (SELECT count(*) FROM chain_log WHERE job_id = $1)",
    )
    .bind(id)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!((jobs_count, log_count), (6, 0));
    // With it: completed, and the continuation comes back claimed by the worker.
    let done = jobs::job_complete_continuing(
        &mut conn,
        id,
        claimed[0].lease_token,
        &next,
        worker.id(),
        Duration::from_secs(60),
        chain_log_writes(id, 0),
    )
    .await
    .unwrap()
    .expect("the lease was held");
    let continuation = done.expect("a continuation");
    assert_eq!(job(&pool, id).await.state, "completed");
    let row = job(&pool, continuation.id).await;
    assert_eq!(
        (row.state.as_str(), row.locked_by),
        ("running", Some(worker.id()))
    );
}

/// What each `pass` job got from `take_handoff`: (n, first take, second take).
type Handed = Arc<Mutex<Vec<(i32, Option<i32>, Option<i32>)>>>;

#[tokio::test]
async fn a_continuation_gets_what_its_job_passed_on_and_nothing_else_does() {
    let pool = pool_with_chain_log().await;
    let handed: Handed = Arc::default();
    let mut registry = Registry::new();
    let seen = handed.clone();
    registry.register("pass", KindOptions::default(), move |ctx: JobContext| {
        let seen = seen.clone();
        async move {
            let n = ctx.payload["n"].as_i64().unwrap_or(0) as i32;
            let first = ctx.take_handoff::<i32>();
            let second = ctx.take_handoff::<i32>();
            seen.lock().unwrap().push((n, first, second));
            // Job 2 passes on a value of another type: its continuation gets no i32.
            if n == 2 {
                ctx.lease().pass_on(format!("{n}"));
            } else {
                ctx.lease().pass_on(n);
            }
            let next = NewJob::new("pass", json!({ "n": n + 1 }));
            if n % 2 == 0 {
                // One statement: completion and continuation.
                ctx.lease()
                    .complete_continuing(&next, chain_log_writes(ctx.id, n))
                    .await
            } else {
                // A guarded transaction.
                let mut tx = ctx.lease().guarded_tx().await?;
                sqlx::query("INSERT INTO chain_log (job_id, n) VALUES ($1, $2)")
                    .bind(ctx.id)
                    .bind(n)
                    .execute(tx.conn())
                    .await?;
                tx.enqueue_next(&next).await?;
                tx.complete().await
            }
        }
    });
    let worker = chain_runs_in_one_slot(&pool, registry, "pass").await;
    assert_eq!(
        *handed.lock().unwrap(),
        vec![
            (0, None, None),
            (1, Some(0), None),
            (2, Some(1), None),
            (3, None, None),
            (4, Some(3), None),
        ],
        "each continuation got its job's value once; the claimed job and the one after \
         a value of another type got none"
    );
    // Job 4 passed a value on but had no continuation: a job started by a claim gets nothing.
    handed.lock().unwrap().clear();
    enqueue(&pool, NewJob::new("pass", json!({ "n": 4 })))
        .await
        .unwrap();
    assert_eq!(worker.tick().await.unwrap().claimed, 1);
    assert_eq!(*handed.lock().unwrap(), vec![(4, None, None)]);
}

#[tokio::test]
async fn a_continuations_lease_runs_from_the_statement_that_inserted_it() {
    let pool = pool_with_chain_log().await;
    // (n, may be held when the handler starts, may be held after longer than the lease)
    let seen: Arc<Mutex<Vec<(i32, bool, bool)>>> = Arc::default();
    let log = seen.clone();
    let mut registry = Registry::new();
    registry.register("lease", KindOptions::default(), move |ctx: JobContext| {
        let log = log.clone();
        async move {
            let n = ctx.payload["n"].as_i64().unwrap_or(0) as i32;
            if n > 0 {
                let at_start = ctx.lease().may_be_held();
                tokio::time::sleep(Duration::from_millis(700)).await;
                log.lock()
                    .unwrap()
                    .push((n, at_start, ctx.lease().may_be_held()));
            }
            let next = NewJob::new("lease", json!({ "n": n + 1 }));
            match n {
                // Job 1 is inserted by a guarded transaction.
                0 => {
                    let mut tx = ctx.lease().guarded_tx().await?;
                    tx.enqueue_next(&next).await?;
                    tx.complete().await
                }
                // Job 2 by the one-statement completion.
                1 => {
                    ctx.lease()
                        .complete_continuing(&next, chain_log_writes(ctx.id, n))
                        .await
                }
                _ => Ok(()),
            }
        }
    });
    // No heartbeat renews a lease during the test.
    let worker = Worker::start(
        pool.clone(),
        registry,
        WorkerConfig {
            concurrency: 1,
            lease: Duration::from_millis(400),
            heartbeat_interval: Duration::from_secs(60),
            ..WorkerConfig::default()
        },
    )
    .await
    .unwrap();
    enqueue(&pool, NewJob::new("lease", json!({ "n": 0 })))
        .await
        .unwrap();
    let o = worker.tick().await.unwrap();
    assert_eq!((o.claimed, o.completed), (1, 3), "one claim ran the chain");
    assert_eq!(
        *seen.lock().unwrap(),
        vec![(1, true, false), (2, true, false)],
        "without a heartbeat, a continuation's lease runs out one lease after its insert"
    );
}

#[tokio::test]
async fn a_continuation_left_by_a_dead_worker_is_rescued_like_any_lease() {
    let pool = common::fresh_pool().await;
    let mut registry = Registry::new();
    registry.register("next", fast_backoff(), |_| async { Ok(()) });
    // A worker handed over a continuation and died before starting it.
    let dead_worker = uuid::Uuid::new_v4();
    let mut tx = pool.begin().await.unwrap();
    let cont = jobs::job_enqueue_claimed(
        &mut tx,
        &NewJob::new("next", json!({})),
        dead_worker,
        Duration::from_millis(200),
    )
    .await
    .unwrap()
    .unwrap();
    tx.commit().await.unwrap();
    let row = job(&pool, cont.id).await;
    assert_eq!(
        (row.state.as_str(), row.attempt, row.locked_by),
        ("running", 1, Some(dead_worker))
    );
    let worker = Worker::start(pool.clone(), registry, config(1))
        .await
        .unwrap();
    assert_eq!(worker.tick().await.unwrap().claimed, 0, "its lease is live");
    eventually(
        "the expired continuation is rescued",
        Duration::from_secs(10),
        || async { (worker.maintain().await.unwrap().rescue.retried == 1).then_some(()) },
    )
    .await;
    eventually(
        "another worker completes it",
        Duration::from_secs(10),
        || async { (worker.tick().await.unwrap().completed == 1).then_some(()) },
    )
    .await;
    let row = job(&pool, cont.id).await;
    assert_eq!(
        (row.state.as_str(), row.attempt, row.locked_by),
        ("completed", 2, Some(worker.id()))
    );
}

#[tokio::test]
async fn shutdown_releases_a_continuation_instead_of_starting_it() {
    let pool = common::fresh_pool().await;
    let started = Arc::new(Notify::new());
    let proceed = Arc::new(Notify::new());
    let second_ran = Arc::new(Mutex::new(false));
    let mut registry = Registry::new();
    {
        let (started, proceed) = (started.clone(), proceed.clone());
        registry.register("first", KindOptions::default(), move |ctx: JobContext| {
            let (started, proceed) = (started.clone(), proceed.clone());
            async move {
                started.notify_one();
                proceed.notified().await;
                let mut tx = ctx.lease().guarded_tx().await?;
                tx.enqueue_next(&NewJob::new("second", json!({}))).await?;
                tx.complete().await
            }
        });
    }
    {
        let second_ran = second_ran.clone();
        registry.register("second", KindOptions::default(), move |_| {
            let second_ran = second_ran.clone();
            async move {
                *second_ran.lock().unwrap() = true;
                Ok(())
            }
        });
    }
    let cfg = WorkerConfig {
        grace_period: Duration::from_secs(10),
        poll_interval: Duration::from_millis(50),
        ..config(2)
    };
    let first = enqueue(&pool, NewJob::new("first", json!({})))
        .await
        .unwrap();
    let worker = Worker::start(pool.clone(), registry, cfg).await.unwrap();
    let (stop, mut rx) = tokio::sync::watch::channel(false);
    let run = tokio::spawn(worker.run(async move {
        let _ = rx.wait_for(|s| *s).await;
    }));
    tokio::time::timeout(Duration::from_secs(10), started.notified())
        .await
        .expect("the first job starts");
    stop.send(true).unwrap();
    // Let the worker stop claiming before the running job hands over its continuation.
    tokio::time::sleep(Duration::from_millis(300)).await;
    proceed.notify_one();
    let totals = run.await.unwrap().unwrap();
    assert_eq!((totals.completed, totals.released), (1, 1));
    assert!(
        !*second_ran.lock().unwrap(),
        "the continuation never started"
    );
    assert_eq!(job(&pool, first).await.state, "completed");
    let (state, attempt, errors): (String, i32, serde_json::Value) =
        sqlx::query_as("SELECT state, attempt, errors FROM jobs WHERE kind = 'second'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!((state.as_str(), attempt), ("available", 0));
    assert!(errors.to_string().contains("before it started"), "{errors}");
}

/// Kind `gated`: reports each start (job id) on `started` as the worker calls the handler; a job
/// with `"block": true` then waits for `gate`.
fn gated_registry(gate: Arc<Notify>, started: mpsc::UnboundedSender<i64>) -> Registry {
    let mut registry = Registry::new();
    registry.register("gated", fast_backoff(), move |ctx: JobContext| {
        let _ = started.send(ctx.id);
        let gate = gate.clone();
        async move {
            if ctx.payload["block"] == json!(true) {
                gate.notified().await;
            }
            Ok(())
        }
    });
    registry
}

/// A job that holds its slot until the test opens the gate; runs before priority-0 jobs.
fn blocker() -> NewJob {
    NewJob::new("gated", json!({ "block": true })).with_priority(-1)
}

async fn next_start(started: &mut mpsc::UnboundedReceiver<i64>) -> i64 {
    tokio::time::timeout(Duration::from_secs(10), started.recv())
        .await
        .expect("a job starts")
        .unwrap()
}

/// Kind `count`: records each run's job id and the highest number of runs at once; each run
/// holds its slot for `hold` (or just yields).
fn counting_registry(
    hold: Duration,
) -> (
    Registry,
    Arc<Mutex<Vec<i64>>>,
    Arc<std::sync::atomic::AtomicUsize>,
) {
    let runs = Arc::new(Mutex::new(Vec::<i64>::new()));
    let active = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let peak = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut registry = Registry::new();
    {
        let (runs, active, peak) = (runs.clone(), active.clone(), peak.clone());
        registry.register("count", KindOptions::default(), move |ctx: JobContext| {
            let (runs, active, peak) = (runs.clone(), active.clone(), peak.clone());
            async move {
                use std::sync::atomic::Ordering::SeqCst;
                let now = active.fetch_add(1, SeqCst) + 1;
                peak.fetch_max(now, SeqCst);
                runs.lock().unwrap().push(ctx.id);
                if hold.is_zero() {
                    tokio::task::yield_now().await;
                } else {
                    tokio::time::sleep(hold).await;
                }
                active.fetch_sub(1, SeqCst);
                Ok(())
            }
        });
    }
    (registry, runs, peak)
}

/// A worker of `cfg` running only the `gated` kind: the gate that releases blocking jobs, and the
/// stream of job ids as they start.
async fn gated_worker(
    pool: &PgPool,
    cfg: WorkerConfig,
) -> (Worker, Arc<Notify>, mpsc::UnboundedReceiver<i64>) {
    let gate = Arc::new(Notify::new());
    let (tx, started) = mpsc::unbounded_channel();
    let worker = Worker::start(pool.clone(), gated_registry(gate.clone(), tx), cfg)
        .await
        .unwrap();
    (worker, gate, started)
}

/// One `tick()` of `worker`, running in the background.
fn spawn_tick(worker: &Worker) -> tokio::task::JoinHandle<aiops::queue::TickOutcome> {
    let worker = worker.clone();
    tokio::spawn(async move { worker.tick().await.unwrap() })
}

fn drain(started: &mut mpsc::UnboundedReceiver<i64>) -> Vec<i64> {
    let mut ids = Vec::new();
    while let Ok(id) = started.try_recv() {
        ids.push(id);
    }
    ids
}

#[tokio::test]
async fn prefetch_claims_ahead_in_one_claim_and_runs_each_job_once_within_the_concurrency() {
    let pool = common::fresh_pool().await;
    // Long enough for the slots to overlap.
    let (registry, runs, peak) = counting_registry(Duration::from_millis(20));
    let mut conn = pool.acquire().await.unwrap();
    let batch: Vec<NewJob> = (0..15)
        .map(|i| NewJob::new("count", json!({ "i": i })).with_priority(i % 3))
        .collect();
    let ids = queue::enqueue_many(&mut conn, &batch).await.unwrap();
    drop(conn);
    let cfg = WorkerConfig {
        prefetch: Some(10),
        ..config(2)
    };
    let worker = Worker::start(pool.clone(), registry, cfg).await.unwrap();

    let o = worker.tick().await.unwrap();
    assert_eq!(
        (o.claimed, o.completed, o.lease_lost, o.released),
        (12, 12, 0, 0),
        "one claim took concurrency + prefetch jobs and ran them all"
    );
    let peak = peak.load(std::sync::atomic::Ordering::SeqCst);
    assert!(
        (1..=2).contains(&peak),
        "at most `concurrency` jobs at once: {peak}"
    );
    let ran = runs.lock().unwrap().clone();
    assert_eq!(ran.len(), 12);
    assert_eq!(
        ran.iter().collect::<HashSet<_>>().len(),
        12,
        "each job ran once"
    );
    // Priority order: the claim took the twelve most urgent jobs.
    let left: Vec<(i64, i16)> =
        sqlx::query_as("SELECT id, priority FROM jobs WHERE state = 'available' ORDER BY id")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(left.len(), 3);
    assert!(left.iter().all(|(_, p)| *p == 2), "{left:?}");
    let rows: Vec<(String, i32, Option<uuid::Uuid>)> = sqlx::query_as(
        "SELECT state, attempt, locked_by FROM jobs WHERE id = ANY($1) AND state <> 'available'",
    )
    .bind(&ids)
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(rows.len(), 12);
    for row in &rows {
        assert_eq!(
            (row.0.as_str(), row.1, row.2),
            ("completed", 1, Some(worker.id()))
        );
    }
    let o = worker.tick().await.unwrap();
    assert_eq!((o.claimed, o.completed), (3, 3));
    assert_eq!(runs.lock().unwrap().len(), 15, "none lost, none twice");
    assert_eq!(worker.tick().await.unwrap().claimed, 0);
}

#[tokio::test]
async fn prefetched_jobs_start_in_priority_order_as_the_slot_frees() {
    let pool = common::fresh_pool().await;
    let cfg = WorkerConfig {
        prefetch: Some(4),
        ..config(1)
    };
    let (worker, gate, mut started) = gated_worker(&pool, cfg).await;
    let mut expected = Vec::new();
    let first = enqueue(&pool, blocker()).await.unwrap();
    for priority in [3, 1, 2, 1] {
        let id = enqueue(
            &pool,
            NewJob::new("gated", json!({})).with_priority(priority),
        )
        .await
        .unwrap();
        expected.push((priority, id));
    }
    expected.sort();
    let tick = spawn_tick(&worker);
    assert_eq!(next_start(&mut started).await, first);
    gate.notify_one();
    let o = tick.await.unwrap();
    assert_eq!((o.claimed, o.completed), (5, 5));
    let order = drain(&mut started);
    assert_eq!(
        order,
        expected.iter().map(|(_, id)| *id).collect::<Vec<_>>(),
        "buffered jobs start in (priority, run_at, id) order"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_run_loop_with_prefetch_runs_every_job_once_within_the_concurrency() {
    let pool = common::fresh_pool().await;
    const JOBS: usize = 300;
    let (registry, runs, peak) = counting_registry(Duration::ZERO);
    let mut conn = pool.acquire().await.unwrap();
    let batch: Vec<NewJob> = (0..JOBS)
        .map(|i| NewJob::new("count", json!({ "i": i })))
        .collect();
    let ids = queue::enqueue_many(&mut conn, &batch).await.unwrap();
    drop(conn);
    let cfg = WorkerConfig {
        prefetch: Some(10),
        poll_interval: Duration::from_millis(50),
        ..config(2)
    };
    let worker = Worker::start(pool.clone(), registry, cfg).await.unwrap();
    let (stop, mut rx) = tokio::sync::watch::channel(false);
    let run = tokio::spawn(worker.run(async move {
        let _ = rx.wait_for(|s| *s).await;
    }));
    eventually("every job completed", Duration::from_secs(60), || async {
        let done: i64 = sqlx::query_scalar("SELECT count(*) FROM jobs WHERE state = 'completed'")
            .fetch_one(&pool)
            .await
            .unwrap();
        (done as usize == JOBS).then_some(())
    })
    .await;
    stop.send(true).unwrap();
    let totals = run.await.unwrap().unwrap();
    assert_eq!(
        (
            totals.claimed,
            totals.completed,
            totals.released,
            totals.lease_lost
        ),
        (JOBS, JOBS, 0, 0),
        "{totals:?}"
    );
    let ran = runs.lock().unwrap().clone();
    assert_eq!(ran.len(), JOBS, "each job ran once");
    assert_eq!(
        ran.into_iter().collect::<HashSet<_>>(),
        ids.into_iter().collect::<HashSet<_>>(),
        "none lost"
    );
    let peak = peak.load(std::sync::atomic::Ordering::SeqCst);
    assert!(peak <= 2, "at most `concurrency` jobs at once: {peak}");
    let max_attempt: i32 = sqlx::query_scalar("SELECT max(attempt) FROM jobs")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(max_attempt, 1);
}

#[tokio::test]
async fn prefetched_jobs_keep_their_leases_while_the_slots_are_busy() {
    let pool = common::fresh_pool().await;
    let gate = Arc::new(Notify::new());
    let (tx, mut started) = mpsc::unbounded_channel();
    let lease = Duration::from_millis(300);
    let cfg = WorkerConfig {
        prefetch: Some(3),
        lease,
        heartbeat_interval: Duration::from_millis(100),
        ..config(1)
    };
    let registry = gated_registry(gate.clone(), tx);
    let worker = Worker::start(pool.clone(), registry.clone(), cfg)
        .await
        .unwrap();
    let first = enqueue(&pool, blocker()).await.unwrap();
    let mut buffered = Vec::new();
    for _ in 0..3 {
        buffered.push(
            enqueue(&pool, NewJob::new("gated", json!({})))
                .await
                .unwrap(),
        );
    }
    let tick = spawn_tick(&worker);
    assert_eq!(next_start(&mut started).await, first);
    // Another worker tries to rescue all along; the prefetched jobs wait through four lease
    // periods, renewed by the heartbeat, and nobody takes them.
    let rescuer = Worker::start(pool.clone(), registry, config(1))
        .await
        .unwrap();
    eventually(
        "the prefetched leases were renewed past four lease periods",
        Duration::from_secs(20),
        || async {
            let m = rescuer.maintain().await.unwrap();
            assert_eq!(
                m.rescue.retried + m.rescue.dead,
                0,
                "a prefetched lease was rescued"
            );
            let renewed: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM jobs WHERE id = ANY($1) AND state = 'running' \
                 AND attempt = 1 AND locked_by = $2 \
                 AND lease_expires_at > attempted_at + 4 * $3::bigint * interval '1 ms'",
            )
            .bind(&buffered)
            .bind(worker.id())
            .bind(lease.as_millis() as i64)
            .fetch_one(&pool)
            .await
            .unwrap();
            (renewed == 3).then_some(())
        },
    )
    .await;
    assert!(
        drain(&mut started).is_empty(),
        "none started while the slot was busy"
    );
    gate.notify_one();
    let o = tick.await.unwrap();
    assert_eq!(
        (o.claimed, o.completed, o.lease_lost, o.released),
        (4, 4, 0, 0)
    );
    assert_eq!(drain(&mut started), buffered);
    for id in buffered {
        let row = job(&pool, id).await;
        assert_eq!((row.state.as_str(), row.attempt), ("completed", 1));
        assert_eq!(row.errors.as_array().unwrap().len(), 0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_releases_prefetched_jobs_unstarted_and_another_worker_runs_them() {
    let pool = common::fresh_pool().await;
    let cfg = WorkerConfig {
        prefetch: Some(5),
        poll_interval: Duration::from_millis(50),
        grace_period: Duration::from_secs(30),
        ..config(1)
    };
    let first = enqueue(&pool, blocker()).await.unwrap();
    let mut buffered = Vec::new();
    for _ in 0..5 {
        buffered.push(
            enqueue(&pool, NewJob::new("gated", json!({})))
                .await
                .unwrap(),
        );
    }
    let (worker, gate, mut started) = gated_worker(&pool, cfg).await;
    let worker_id = worker.id();
    let (stop, mut rx) = tokio::sync::watch::channel(false);
    let run = tokio::spawn(worker.run(async move {
        let _ = rx.wait_for(|s| *s).await;
    }));
    assert_eq!(next_start(&mut started).await, first);
    eventually(
        "the worker prefetched the other five",
        Duration::from_secs(10),
        || async {
            let n: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM jobs WHERE id = ANY($1) AND state = 'running' \
                 AND locked_by = $2",
            )
            .bind(&buffered)
            .bind(worker_id)
            .fetch_one(&pool)
            .await
            .unwrap();
            (n == 5).then_some(())
        },
    )
    .await;
    stop.send(true).unwrap();
    // Released at once, while the running job still holds its slot.
    eventually(
        "the prefetched jobs are back in available",
        Duration::from_secs(10),
        || async {
            let n: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM jobs WHERE id = ANY($1) AND state = 'available'",
            )
            .bind(&buffered)
            .fetch_one(&pool)
            .await
            .unwrap();
            (n == 5).then_some(())
        },
    )
    .await;
    assert_eq!(job(&pool, first).await.state, "running");
    gate.notify_one();
    let totals = run.await.unwrap().unwrap();
    assert_eq!(
        (
            totals.claimed,
            totals.completed,
            totals.released,
            totals.lease_lost
        ),
        (6, 1, 5, 0),
        "{totals:?}"
    );
    assert!(drain(&mut started).is_empty(), "no prefetched job started");
    for id in &buffered {
        let row = job(&pool, *id).await;
        assert_eq!(
            (row.state.as_str(), row.attempt),
            ("available", 0),
            "attempt not counted"
        );
        assert!(row.lease_token.is_none());
        assert!(
            row.errors.to_string().contains("before it started"),
            "{}",
            row.errors
        );
    }
    assert_eq!(job(&pool, first).await.state, "completed");

    let (tx, mut started) = mpsc::unbounded_channel();
    let cfg = WorkerConfig {
        prefetch: Some(3),
        ..config(2)
    };
    let other = Worker::start(pool.clone(), gated_registry(gate, tx), cfg)
        .await
        .unwrap();
    let o = other.tick().await.unwrap();
    assert_eq!((o.claimed, o.completed), (5, 5));
    let mut ran = drain(&mut started);
    ran.sort();
    assert_eq!(ran, buffered);
    for id in buffered {
        let row = job(&pool, id).await;
        assert_eq!(
            (row.state.as_str(), row.attempt, row.locked_by),
            ("completed", 1, Some(other.id()))
        );
    }
}

#[tokio::test]
async fn a_cancelled_prefetched_job_is_never_started() {
    let pool = common::fresh_pool().await;
    let cfg = WorkerConfig {
        prefetch: Some(2),
        // Only the test's own heartbeat call runs.
        heartbeat_interval: Duration::from_secs(3600),
        ..config(1)
    };
    let (worker, gate, mut started) = gated_worker(&pool, cfg).await;
    let first = enqueue(&pool, blocker()).await.unwrap();
    let cancelled = enqueue(&pool, NewJob::new("gated", json!({})))
        .await
        .unwrap();
    let kept = enqueue(&pool, NewJob::new("gated", json!({})))
        .await
        .unwrap();
    let tick = spawn_tick(&worker);
    assert_eq!(next_start(&mut started).await, first);
    assert_eq!(job(&pool, cancelled).await.state, "running", "prefetched");
    let mut conn = pool.acquire().await.unwrap();
    let row = jobs::job_cancel(&mut conn, cancelled)
        .await
        .unwrap()
        .unwrap();
    drop(conn);
    assert_eq!(row.state, "cancelled");
    assert_eq!(
        worker.heartbeat().await.unwrap(),
        1,
        "the heartbeat finds it"
    );
    gate.notify_one();
    let o = tick.await.unwrap();
    assert_eq!(
        (o.claimed, o.completed, o.lease_lost, o.released),
        (3, 2, 1, 0)
    );
    assert_eq!(
        drain(&mut started),
        vec![kept],
        "the cancelled job never ran"
    );
    let row = job(&pool, cancelled).await;
    assert_eq!((row.state.as_str(), row.attempt), ("cancelled", 1));
    assert_eq!(job(&pool, kept).await.state, "completed");
}

#[tokio::test]
async fn a_prefetched_job_whose_lease_ran_out_is_released_instead_of_started() {
    let pool = common::fresh_pool().await;
    let cfg = WorkerConfig {
        prefetch: Some(1),
        lease: Duration::from_millis(300),
        // Heartbeats stop (as when the database is unreachable for a while).
        heartbeat_interval: Duration::from_secs(3600),
        ..config(1)
    };
    let (worker, gate, mut started) = gated_worker(&pool, cfg).await;
    let first = enqueue(&pool, blocker()).await.unwrap();
    let waiting = enqueue(&pool, NewJob::new("gated", json!({})))
        .await
        .unwrap();
    let tick = spawn_tick(&worker);
    assert_eq!(next_start(&mut started).await, first);
    eventually(
        "the prefetched lease expired",
        Duration::from_secs(10),
        || async {
            let expired: bool = sqlx::query_scalar(
                "SELECT state = 'running' AND lease_expires_at < now() FROM jobs WHERE id = $1",
            )
            .bind(waiting)
            .fetch_one(&pool)
            .await
            .unwrap();
            expired.then_some(())
        },
    )
    .await;
    gate.notify_one();
    let o = tick.await.unwrap();
    assert_eq!(
        (o.claimed, o.completed, o.released, o.lease_lost),
        (2, 1, 1, 0)
    );
    assert!(drain(&mut started).is_empty(), "it was not started");
    let row = job(&pool, waiting).await;
    assert_eq!((row.state.as_str(), row.attempt), ("available", 0));
    assert!(
        row.errors.to_string().contains("lease ran out"),
        "{}",
        row.errors
    );
    let o = worker.tick().await.unwrap();
    assert_eq!((o.claimed, o.completed), (1, 1));
    assert_eq!(drain(&mut started), vec![waiting]);
}
