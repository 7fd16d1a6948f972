//! Queue benchmark: prints figures, asserts nothing.
//!
//! 1. Burn-down: enqueue `BENCH_JOBS` (default 100,000) no-op jobs, then time one worker process's
//!    runtime (`Worker::run`, concurrency `BENCH_CONCURRENCY`, default 200; prefetch
//!    `BENCH_PREFETCH`, default the concurrency, 0 disables it) until every job is completed in
//!    the database: jobs/s.
//! 2. Pickup latency: an idle worker; `BENCH_LATENCY_SAMPLES` (default 500) times, enqueue one
//!    job, commit, `Notifier::notify()`, and measure commit -> handler start: p50/p99.
//!
//! Runs against `DATABASE_URL` when set (a fresh database is created on that server), else a
//! private cluster under `target/bench-pg`. `cargo bench --bench queue`; see
//! `scripts/bench-queue.sh` for the peer queues on the same server.
//! Without `--bench` (as under `cargo test --all-targets`) it does a smoke run of 200 jobs and 5
//! latency samples.

mod common;

use common::{env_usize, percentile, with_database};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use aiops::queue::{self, KindOptions, NewJob, Registry, Worker, WorkerConfig};
use aiops::startup::embedded_pg::EmbeddedPostgres;
use serde_json::json;
use sqlx::ConnectOptions;
use sqlx::postgres::PgConnectOptions;
use tokio::sync::mpsc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    if std::env::args().any(|a| a == "--list") {
        return Ok(());
    }
    // `cargo bench` passes --bench; `cargo test --all-targets` does not: a smoke run then.
    let full = std::env::args().any(|a| a == "--bench");
    let jobs = env_usize("BENCH_JOBS", if full { 100_000 } else { 200 });
    let concurrency = env_usize("BENCH_CONCURRENCY", 200);
    let prefetch = env_usize("BENCH_PREFETCH", concurrency);
    let samples = env_usize("BENCH_LATENCY_SAMPLES", if full { 500 } else { 5 });

    let mut embedded = None;
    let server = match std::env::var("DATABASE_URL") {
        Ok(url) if !url.is_empty() => url,
        _ => {
            let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench-pg");
            std::fs::create_dir_all(&dir)?;
            let pg = EmbeddedPostgres::start(&dir, None).await?;
            let url = pg.url();
            embedded = Some(pg);
            url
        }
    };
    let name = format!("aiops_bench_{}", uuid::Uuid::new_v4().simple());
    let mut admin = server.parse::<PgConnectOptions>()?.connect().await?;
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&mut admin)
        .await?;
    let url = with_database(&server, &name);
    let pool = aiops::store::connect(&url, 20).await?;
    aiops::store::migrate(&pool).await?;

    // 1. Burn-down.
    let enqueue_started = Instant::now();
    for chunk in (0..jobs).collect::<Vec<_>>().chunks(10_000) {
        let batch: Vec<NewJob> = chunk
            .iter()
            .map(|i| NewJob::new("bench.noop", json!({ "i": i })))
            .collect();
        let mut conn = pool.acquire().await?;
        queue::enqueue_many(&mut conn, &batch).await?;
    }
    let enqueue_secs = enqueue_started.elapsed().as_secs_f64();
    let ran = Arc::new(AtomicUsize::new(0));
    let mut registry = Registry::new();
    {
        let ran = ran.clone();
        registry.register("bench.noop", KindOptions::default(), move |_| {
            ran.fetch_add(1, Ordering::Relaxed);
            async { Ok(()) }
        });
    }
    let config = WorkerConfig {
        concurrency,
        prefetch: Some(prefetch),
        ..WorkerConfig::default()
    };
    let worker = Worker::start(pool.clone(), registry, config.clone()).await?;
    let (stop, mut stopped) = tokio::sync::watch::channel(false);
    let started = Instant::now();
    let run = tokio::spawn(worker.run(async move {
        let _ = stopped.wait_for(|s| *s).await;
    }));
    loop {
        if ran.load(Ordering::Relaxed) >= jobs {
            let done: i64 =
                sqlx::query_scalar("SELECT count(*) FROM jobs WHERE state = 'completed'")
                    .fetch_one(&pool)
                    .await?;
            if done as usize >= jobs {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let burn_secs = started.elapsed().as_secs_f64();
    let _ = stop.send(true);
    run.await??;

    // 2. Pickup latency on an idle worker.
    let (started_tx, mut started_rx) = mpsc::unbounded_channel::<Instant>();
    let mut registry = Registry::new();
    registry.register("bench.ping", KindOptions::default(), move |_| {
        let _ = started_tx.send(Instant::now());
        async { Ok(()) }
    });
    let latency_worker = Worker::start(pool.clone(), registry, config.clone()).await?;
    let notifier = latency_worker.notifier();
    let (stop, mut stopped) = tokio::sync::watch::channel(false);
    let run = tokio::spawn(latency_worker.run(async move {
        let _ = stopped.wait_for(|s| *s).await;
    }));
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut latencies = Vec::with_capacity(samples);
    for _ in 0..samples {
        let mut tx = pool.begin().await?;
        queue::enqueue(&mut tx, &NewJob::new("bench.ping", json!({}))).await?;
        tx.commit().await?;
        let committed = Instant::now();
        notifier.notify();
        let began = tokio::time::timeout(Duration::from_secs(10), started_rx.recv())
            .await?
            .ok_or_else(|| anyhow::anyhow!("latency worker stopped"))?;
        latencies.push(began.saturating_duration_since(committed));
        // Let the notifier's debounce window pass so every sample is an idle wake-up.
        tokio::time::sleep(config.notify_debounce + Duration::from_millis(5)).await;
    }
    let _ = stop.send(true);
    run.await??;
    latencies.sort();

    println!(
        "aiops queue benchmark (PostgreSQL {})",
        server_version(&pool).await?
    );
    println!(
        "  enqueue   {jobs} jobs via unnest batches of 10,000: {:.0} jobs/s",
        jobs as f64 / enqueue_secs
    );
    println!(
        "  burn-down {jobs} no-op jobs, 1 worker, concurrency {concurrency}, prefetch {prefetch}: {burn_secs:.2} s = {:.0} jobs/s",
        jobs as f64 / burn_secs
    );
    println!(
        "  pickup latency (idle worker, commit -> handler start, {samples} samples): p50 {:.2} ms, p99 {:.2} ms",
        percentile(&latencies, 0.50).as_secs_f64() * 1000.0,
        percentile(&latencies, 0.99).as_secs_f64() * 1000.0,
    );

    pool.close().await;
    sqlx::query(sqlx::AssertSqlSafe(format!("DROP DATABASE {name}")))
        .execute(&mut admin)
        .await?;
    if let Some(pg) = embedded {
        pg.stop().await?;
    }
    Ok(())
}

async fn server_version(pool: &sqlx::PgPool) -> anyhow::Result<String> {
    Ok(sqlx::query_scalar("SHOW server_version")
        .fetch_one(pool)
        .await?)
}
