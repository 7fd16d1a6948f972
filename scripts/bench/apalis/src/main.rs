//! Peer benchmark: apalis-postgres 1.0 on the same PostgreSQL as `cargo bench --bench queue`.
//! Prints figures, asserts nothing.
//!
//! 1. Burn-down: enqueue `BENCH_JOBS` (default 100,000) no-op jobs with `push_bulk` in batches of
//!    10,000, then time one worker (fetch batch `BENCH_APALIS_BATCH`, default 100; concurrency
//!    `BENCH_CONCURRENCY`, default 24; otherwise the crate's defaults) until every job is `Done`
//!    in the database: jobs/s.
//! 2. Pickup latency: an idle worker; `BENCH_LATENCY_SAMPLES` (default 500) times, push one job
//!    (its own transaction) and measure commit -> handler start: p50/p99.
//!
//! Workers wake on apalis' LISTEN/NOTIFY (`Pubsub`) with a 2 s polling fallback, as our queue and
//! graphile-worker do in their benchmarks. Without it a pickup here once waited over 10 s: a
//! notification that arrives while a fetch is in flight starts no second fetch, and the next one
//! comes with the worker's heartbeat (30 s).
//!
//! Usage: `APALIS_DATABASE_URL=postgres://... apalis-queue-bench` (an empty database; the
//! migrations create the `apalis` schema). Run by `scripts/bench-queue.sh`.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use apalis::prelude::*;
use apalis_postgres::{Config, PgPool, PostgresStorage, Pubsub};
use tokio::sync::mpsc;

type BoxResult<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

const ENQUEUE_CHUNK: usize = 10_000;
const POLL_INTERVAL: Duration = Duration::from_secs(2);

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

async fn noop(_: u64, ran: Data<Arc<AtomicUsize>>) -> Result<(), BoxDynError> {
    ran.fetch_add(1, Ordering::Relaxed);
    Ok(())
}

async fn ping(_: u64, started: Data<mpsc::UnboundedSender<Instant>>) -> Result<(), BoxDynError> {
    let _ = started.send(Instant::now());
    Ok(())
}

fn storage(pool: &PgPool, queue: &str, batch: usize) -> PostgresStorage<u64> {
    PostgresStorage::new(pool).with_config(Config::default().queue(queue).batch_size(batch))
}

/// A worker's backend: the storage, woken by NOTIFY or else every `POLL_INTERVAL`.
fn backend(pool: &PgPool, queue: &str, batch: usize) -> PollWith<PostgresStorage<u64>, Strategy> {
    let wake = Strategy::new()
        .stream(Pubsub::new(pool.clone(), queue.to_owned()))
        .interval(POLL_INTERVAL);
    PollWith::new(storage(pool, queue, batch), wake)
}

async fn done_count(pool: &PgPool, queue: &str) -> BoxResult<i64> {
    Ok(sqlx::query_scalar(
        "SELECT count(*) FROM apalis.jobs WHERE job_type = $1 AND status = 'Done'",
    )
    .bind(queue)
    .fetch_one(pool)
    .await?)
}

#[tokio::main]
async fn main() -> BoxResult<()> {
    let url = std::env::var("APALIS_DATABASE_URL")
        .map_err(|_| "APALIS_DATABASE_URL must name an empty database")?;
    let jobs = env_usize("BENCH_JOBS", 100_000);
    let concurrency = env_usize("BENCH_CONCURRENCY", 24);
    let batch = env_usize("BENCH_APALIS_BATCH", 100);
    let samples = env_usize("BENCH_LATENCY_SAMPLES", 500);

    let pool = PgPool::connect(&url).await?;
    PostgresStorage::setup(&pool).await?;

    // 1. Burn-down.
    let queue = "bench-noop";
    let mut sink = storage(&pool, queue, batch);
    let enqueue_started = Instant::now();
    let mut next = 0u64;
    while (next as usize) < jobs {
        let end = (next as usize + ENQUEUE_CHUNK).min(jobs) as u64;
        sink.push_bulk((next..end).collect()).await?;
        next = end;
    }
    let enqueue_secs = enqueue_started.elapsed().as_secs_f64();

    let ran = Arc::new(AtomicUsize::new(0));
    let ctx = WorkerContext::new("apalis-bench-burn-down");
    let worker = WorkerBuilder::new(&ctx)
        .backend(backend(&pool, queue, batch))
        .data(ran.clone())
        .concurrency(concurrency)
        .build(noop);
    let started = Instant::now();
    let run = tokio::spawn(worker.run());
    loop {
        if ran.load(Ordering::Relaxed) >= jobs && done_count(&pool, queue).await? as usize >= jobs {
            break;
        }
        if run.is_finished() {
            return Err(
                format!("worker stopped after {} jobs", ran.load(Ordering::Relaxed)).into(),
            );
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let burn_secs = started.elapsed().as_secs_f64();
    ctx.stop()?;
    run.await??;

    // 2. Pickup latency on an idle worker.
    let queue = "bench-ping";
    let mut sink = storage(&pool, queue, batch);
    let (started_tx, mut started_rx) = mpsc::unbounded_channel::<Instant>();
    let ctx = WorkerContext::new("apalis-bench-latency");
    let worker = WorkerBuilder::new(&ctx)
        .backend(backend(&pool, queue, batch))
        .data(started_tx)
        .concurrency(concurrency)
        .build(ping);
    let run = tokio::spawn(worker.run());
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut latencies = Vec::with_capacity(samples);
    for _ in 0..samples {
        sink.push(0).await?;
        let committed = Instant::now();
        let began = tokio::time::timeout(Duration::from_secs(10), started_rx.recv())
            .await
            .map_err(|_| "no pickup within 10 s")?
            .ok_or("latency worker stopped")?;
        latencies.push(began.saturating_duration_since(committed));
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    ctx.stop()?;
    run.await??;
    latencies.sort();

    let version: String = sqlx::query_scalar("SHOW server_version")
        .fetch_one(&pool)
        .await?;
    println!(
        "apalis-postgres 1.0 (batch {batch}, concurrency {concurrency}, PostgreSQL {version})"
    );
    println!(
        "  enqueue   {jobs} jobs via push_bulk batches of 10,000: {:.0} jobs/s",
        jobs as f64 / enqueue_secs
    );
    println!(
        "  burn-down {jobs} no-op jobs: {burn_secs:.2} s = {:.0} jobs/s",
        jobs as f64 / burn_secs
    );
    println!(
        "  pickup latency (idle, {samples} samples): p50 {:.2} ms, p99 {:.2} ms",
        percentile(&latencies, 0.50).as_secs_f64() * 1000.0,
        percentile(&latencies, 0.99).as_secs_f64() * 1000.0,
    );
    pool.close().await;
    Ok(())
}
