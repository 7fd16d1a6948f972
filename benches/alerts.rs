//! Alert intake benchmark: prints figures, asserts nothing.
//!
//! The real HTTP server (port 0) and a real worker runtime in this process, against a fresh
//! database. One webhook token, one runbook with a trigger that most alerts do not match (so
//! matching evaluates it), one auto_analyze rule.
//!
//! 1. Ingestion: `BENCH_PAYLOADS` (default 3,000) webhook requests of 1, of 10 and of 100 new
//!    alerts each, `BENCH_CLIENTS` (default 32) at a time; every 200 means the alerts and their
//!    processing jobs were committed. Prints payloads/s, alerts/s, p50/p99 request latency.
//! 2. Matching: a worker (`BENCH_WORKER_CONCURRENCY`, default 16) burns down the processing
//!    backlog of phase 1: alerts/s matched.
//! 3. Steady load: `BENCH_RATE` alerts/s (default 1,000) as 10-alert payloads for
//!    `BENCH_STEADY_SECONDS` (default 10) while the worker matches them: p50/p99 request
//!    latency, and p50/p99 from storing an alert to matching it (database timestamps).
//!
//! Runs against `DATABASE_URL` when set (a fresh database is created on that server), else a
//! private cluster under `target/bench-pg`. `cargo bench --bench alerts`.
//! Without `--bench` (as under `cargo test --all-targets`) it does a smoke run (30 payloads, 1 s
//! of 100 alerts/s).

mod common;

use common::{env_usize, percentile, with_database};
use std::sync::Arc;
use std::time::{Duration, Instant};

use aiops::startup::Application;
use aiops::startup::embedded_pg::EmbeddedPostgres;
use serde_json::{Value, json};
use sqlx::ConnectOptions;
use sqlx::postgres::PgConnectOptions;

fn payload(tag: &str, first: usize, size: usize) -> Value {
    let alerts: Vec<Value> = (first..first + size)
        .map(|n| {
            json!({
                "status": "firing",
                "labels": {
                    "alertname": format!("Bench{}", n % 13), "instance": format!("10.2.{}.{}:9100", (n / 250) % 250, n % 250),
                    "severity": if n % 3 == 0 { "critical" } else { "warning" }, "job": "node",
                    "run": tag, "n": n.to_string(),
                },
                "annotations": { "summary": "benchmark alert" },
                "startsAt": "2030-01-01T00:00:00.000Z",
                "endsAt": "0001-01-01T00:00:00Z",
                "generatorURL": "http://prometheus-bench:9090/graph?g0.expr=up",
            })
        })
        .collect();
    json!({
        "version": "4", "groupKey": "{}:{}", "truncatedAlerts": 0, "status": "firing",
        "receiver": "aiops", "groupLabels": {}, "commonLabels": {}, "commonAnnotations": {},
        "externalURL": "http://alertmanager:9093", "alerts": alerts,
    })
}

struct Target {
    client: reqwest::Client,
    url: String,
    token: String,
}

impl Target {
    async fn post(&self, body: &Value) -> Duration {
        let t = Instant::now();
        let resp = self
            .client
            .post(&self.url)
            .bearer_auth(&self.token)
            .json(body)
            .send()
            .await
            .expect("send");
        assert_eq!(
            resp.status(),
            200,
            "webhook refused: {:?}",
            resp.text().await
        );
        t.elapsed()
    }
}

async fn unprocessed(pool: &sqlx::PgPool) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM alerts WHERE processed_at IS NULL")
        .fetch_one(pool)
        .await
        .expect("count")
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    if std::env::args().any(|a| a == "--list") {
        return Ok(());
    }
    // `cargo bench` passes --bench; `cargo test --all-targets` does not: a smoke run then.
    let full = std::env::args().any(|a| a == "--bench");
    let payloads = env_usize("BENCH_PAYLOADS", if full { 3_000 } else { 30 });
    let clients = env_usize("BENCH_CLIENTS", 32);
    let worker_concurrency = env_usize("BENCH_WORKER_CONCURRENCY", 16);
    let rate = env_usize("BENCH_RATE", if full { 1_000 } else { 100 });
    let steady_seconds = env_usize("BENCH_STEADY_SECONDS", if full { 10 } else { 1 });

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

    let token = aiops::crypto::token::generate();
    {
        let mut conn = pool.acquire().await?;
        aiops::store::webhook_tokens::webhook_token_create(&mut conn, "bench", &token.hash, None)
            .await?;
        let doc = aiops::domain::runbook::parse_yaml(
            "name: bench-restart\nmode: semi_auto\nsteps:\n  - name: s\n    command: \"true\"\n\
             triggers:\n  - name: t\n    alert_name_pattern: \"re:BenchNever.*\"\n    \
             severity_pattern: critical\n    cooldown_seconds: 600\n",
        )?;
        aiops::store::runbooks::runbook_apply(&mut conn, &doc, None, None).await?;
        sqlx::query(
            "INSERT INTO auto_analyze_rules (name, priority, alert_name_pattern, severity_pattern, \
             action) VALUES ('bench', 10, 'Bench1*', 'critical', 'manual')",
        )
        .execute(&mut *conn)
        .await?;
    }
    let config = Arc::new(aiops::config::Config {
        listen: "127.0.0.1:0".parse()?,
        max_body_bytes: 4 * 1024 * 1024,
        ..aiops::config::Config::default()
    });
    let app = Application::build(config, pool.clone()).await?;
    let addr = app.local_addr();
    tokio::spawn(app.run_until(std::future::pending()));
    let target = Arc::new(Target {
        client: reqwest::Client::new(),
        url: format!("http://{addr}/api/v1/webhooks/alertmanager"),
        token: token.secret.clone(),
    });

    // 1. Ingestion, no worker running.
    let mut next = 0usize;
    for size in [1usize, 10, 100] {
        let count = if size == 100 { payloads / 10 } else { payloads };
        let bodies: Vec<Value> = (0..count)
            .map(|i| payload(&format!("s{size}"), next + i * size, size))
            .collect();
        next += count * size;
        let bodies = Arc::new(bodies);
        let cursor = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let started = Instant::now();
        let mut tasks = Vec::new();
        for _ in 0..clients {
            let (target, bodies, cursor) = (target.clone(), bodies.clone(), cursor.clone());
            tasks.push(tokio::spawn(async move {
                let mut lat = Vec::new();
                loop {
                    let i = cursor.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let Some(body) = bodies.get(i) else { break };
                    lat.push(target.post(body).await);
                }
                lat
            }));
        }
        let mut lat = Vec::new();
        for t in tasks {
            lat.extend(t.await?);
        }
        let secs = started.elapsed().as_secs_f64();
        lat.sort();
        println!(
            "ingest {size:>3}-alert payloads: {count} payloads, {} alerts in {secs:.2} s = \
             {:.0} payloads/s, {:.0} alerts/s stored; latency p50 {:?} p99 {:?} ({clients} clients)",
            count * size,
            count as f64 / secs,
            (count * size) as f64 / secs,
            percentile(&lat, 0.5),
            percentile(&lat, 0.99),
        );
    }

    // 2. Matching: burn down the backlog.
    let backlog = unprocessed(&pool).await;
    let options = aiops::worker::WorkerOptions {
        queue: aiops::queue::WorkerConfig {
            concurrency: worker_concurrency,
            ..aiops::queue::WorkerConfig::default()
        },
        ..aiops::worker::WorkerOptions::default()
    };
    let registry = aiops::worker::registry(&options, &pool)?;
    let worker = aiops::queue::Worker::start(pool.clone(), registry, options.queue).await?;
    let (stop, mut stopped) = tokio::sync::watch::channel(false);
    let run = tokio::spawn(worker.run(async move {
        let _ = stopped.wait_for(|s| *s).await;
    }));
    let started = Instant::now();
    while unprocessed(&pool).await > 0 {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let secs = started.elapsed().as_secs_f64();
    println!(
        "match: {backlog} alerts processed (rules + triggers) in {secs:.2} s = {:.0} alerts/s \
         (worker concurrency {worker_concurrency})",
        backlog as f64 / secs
    );

    // 3. Steady load with the worker matching concurrently.
    let per_payload = 10usize;
    let interval = Duration::from_secs_f64(per_payload as f64 / rate as f64);
    let total = rate * steady_seconds / per_payload;
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let (lat_tx, mut lat_rx) = tokio::sync::mpsc::unbounded_channel();
    let started = Instant::now();
    for i in 0..total {
        ticker.tick().await;
        let body = payload("steady", next + i * per_payload, per_payload);
        let (target, lat_tx) = (target.clone(), lat_tx.clone());
        tokio::spawn(async move {
            let _ = lat_tx.send(target.post(&body).await);
        });
    }
    drop(lat_tx);
    let mut lat = Vec::new();
    while let Some(l) = lat_rx.recv().await {
        lat.push(l);
    }
    let secs = started.elapsed().as_secs_f64();
    lat.sort();
    let drain = Instant::now();
    while unprocessed(&pool).await > 0 {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let drained = drain.elapsed().as_secs_f64();
    // Stored -> matched per alert: from the start of the webhook's transaction (`timestamp`) to
    // the start of the processing transaction that recorded it (`processed_at`).
    let mut matched: Vec<Duration> = sqlx::query_scalar::<_, f64>(
        "SELECT extract(epoch FROM processed_at - \"timestamp\")::float8 FROM alerts \
         WHERE labels_json->>'run' = 'steady'",
    )
    .fetch_all(&pool)
    .await?
    .into_iter()
    .map(|s| Duration::from_secs_f64(s.max(0.0)))
    .collect();
    matched.sort();
    println!(
        "steady {rate} alerts/s as {per_payload}-alert payloads for {steady_seconds} s: {} \
         requests in {secs:.2} s, latency p50 {:?} p99 {:?} max {:?}; matching backlog drained \
         {drained:.2} s after the last request",
        lat.len(),
        percentile(&lat, 0.5),
        percentile(&lat, 0.99),
        lat.last().copied().unwrap_or_default(),
    );
    println!(
        "steady stored -> matched ({} alerts): p50 {:?} p99 {:?} max {:?}",
        matched.len(),
        percentile(&matched, 0.5),
        percentile(&matched, 0.99),
        matched.last().copied().unwrap_or_default(),
    );

    let _ = stop.send(true);
    run.await??;
    pool.close().await;
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "DROP DATABASE {name} WITH (FORCE)"
    )))
    .execute(&mut admin)
    .await?;
    drop(embedded);
    Ok(())
}
