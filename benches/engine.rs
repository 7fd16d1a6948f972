//! Execution engine benchmark: prints figures, asserts nothing.
//!
//! 1. Throughput: `BENCH_EXECUTIONS` (default 1,000) executions of a runbook of `BENCH_STEPS`
//!    (default 5) no-op local steps (`true`), run by 2 `aiops worker` processes (the real binary,
//!    default settings, concurrency `BENCH_CONCURRENCY`, default 10, each). The executions are
//!    created in one transaction once both workers are registered; the clock runs from that
//!    commit until every execution is `completed`: wall time, executions/s, steps/s, and
//!    transactions per step (`pg_stat_database.xact_commit` delta of the benchmark database,
//!    read from a connection to another database after the workers have exited so their
//!    statistics are flushed, minus the benchmark's own transactions, divided by the steps
//!    completed), and CPU time per step over the same interval from `/proc/<pid>/stat` (the
//!    database on this host): the two worker processes (with their lifeline processes), the
//!    commands they ran (their reaped
//!    children), and the database backends serving the benchmark database (the benchmark's own
//!    connection excluded).
//! 2. Latency: the real HTTP API (`startup::Application` on port 0) and 2 fresh idle worker
//!    processes; `BENCH_LATENCY_SAMPLES` (default 200) times, one at a time, a 3-step no-op
//!    runbook is started with `POST /api/v1/executions` and the clock runs from sending the
//!    request until the execution's status reads `completed` (woken by LISTEN on
//!    `aiops_execution_control`, which every end of an execution notifies, confirmed by reading
//!    the row): p50, p99.
//!
//! 3. For scale: the CPU time of one `sh -c true` process started by the benchmark itself (the
//!    mean of 500), the least any step's command costs on the host.
//!
//! Runs against `DATABASE_URL` when set (a fresh database is created on that server), else a
//! private cluster under `target/bench-pg`. `cargo bench --bench engine`; see
//! `scripts/bench-engine.sh` for graphile-worker chained jobs on the same server.
//! Without `--bench` (as under `cargo test --all-targets`) it does a smoke run of 5 executions
//! and 5 latency samples.

mod common;

use common::{env_usize, percentile, with_database};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use aiops::startup::embedded_pg::EmbeddedPostgres;
use anyhow::{Context, bail};
use serde_json::json;
use sqlx::postgres::{PgConnectOptions, PgListener};
use sqlx::{ConnectOptions, Connection, PgConnection};
use tokio::process::{Child, Command};

/// The throughput runbook: `steps` no-op local steps (`true`).
fn throughput_runbook(steps: usize) -> String {
    let mut yaml = format!("name: bench-{steps}-noop\nmode: auto\nsteps:\n");
    for i in 1..=steps {
        yaml.push_str(&format!("  - {{ name: s{i}, command: \"true\" }}\n"));
    }
    yaml
}

const LATENCY_RUNBOOK: &str = r#"
name: bench-three-noop
mode: auto
steps:
  - { name: s1, command: "true" }
  - { name: s2, command: "true" }
  - { name: s3, command: "true" }
"#;

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Counts the queries the benchmark itself sends to the benchmark database, so they can be
/// taken out of the transaction count.
struct Counted {
    conn: PgConnection,
    queries: u64,
}

impl Counted {
    async fn scalar(&mut self, sql: &'static str) -> anyhow::Result<i64> {
        self.queries += 1;
        Ok(sqlx::query_scalar(sql).fetch_one(&mut self.conn).await?)
    }
}

fn spawn_worker(url: &str, concurrency: usize) -> anyhow::Result<Child> {
    Command::new(env!("CARGO_BIN_EXE_aiops"))
        .args(["worker", "--concurrency", &concurrency.to_string()])
        .env("DATABASE_URL", url)
        .env("AIOPS_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .context("cannot start `aiops worker`")
}

/// SIGTERM (graceful stop), then waits for the process to exit.
async fn stop_worker(mut child: Child) -> anyhow::Result<()> {
    if let Some(pid) = child.id() {
        let _ = Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .await;
    }
    match tokio::time::timeout(Duration::from_secs(60), child.wait()).await {
        Ok(status) => {
            status?;
        }
        Err(_) => {
            child.start_kill()?;
            child.wait().await?;
        }
    }
    Ok(())
}

/// Waits until `n` workers are registered and running.
async fn wait_for_workers(watch: &mut Counted, n: i64) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let running = watch
            .scalar("SELECT count(*) FROM queue_workers WHERE stopped_at IS NULL")
            .await?;
        if running >= n {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{n} workers did not register within 60 s");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn xact_commit(admin: &mut PgConnection, db: &str) -> anyhow::Result<i64> {
    Ok(
        sqlx::query_scalar("SELECT xact_commit FROM pg_stat_database WHERE datname = $1")
            .bind(db)
            .fetch_one(admin)
            .await?,
    )
}

/// Waits until no backend is connected to `db` (their statistics are flushed when they exit).
async fn wait_for_no_backends(admin: &mut PgConnection, db: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let n: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity \
             WHERE datname = $1 AND backend_type = 'client backend'",
        )
        .bind(db)
        .fetch_one(&mut *admin)
        .await?;
        if n == 0 {
            // Exiting backends flush their statistics just before they leave pg_stat_activity.
            tokio::time::sleep(Duration::from_millis(200)).await;
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("backends of {db} did not exit");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn apply_runbook(conn: &mut PgConnection, yaml: &str) -> anyhow::Result<uuid::Uuid> {
    let doc = aiops::domain::runbook::parse_yaml(yaml)
        .map_err(|e| anyhow::anyhow!("benchmark runbook does not parse: {e:?}"))?;
    let out = aiops::store::runbooks::runbook_apply(conn, &doc, None, None).await?;
    Ok(out.id)
}

/// CPU seconds (user + system) of a process and of its reaped children, from `/proc`.
fn cpu_of(pid: u32) -> (f64, f64) {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return (0.0, 0.0);
    };
    // Fields after the command name (which may contain spaces) in parentheses.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<f64> = rest
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0.0))
        .collect();
    // utime, stime, cutime, cstime are fields 14..=17; `rest` starts at field 3.
    let tick = 100.0; // USER_HZ on Linux
    let at = |i: usize| f.get(i - 3).copied().unwrap_or(0.0) / tick;
    (at(14) + at(15), at(16) + at(17))
}

/// CPU seconds per `sh -c true` process, `runs` of them started one after another by this
/// process: the least a step's command process costs on this host, whatever the engine does.
fn shell_start_cpu(runs: usize) -> anyhow::Result<f64> {
    let before = cpu_of(std::process::id()).1;
    for _ in 0..runs {
        let status = std::process::Command::new("sh")
            .args(["-c", "true"])
            .status()
            .context("starting sh -c true")?;
        if !status.success() {
            bail!("sh -c true failed: {status}");
        }
    }
    Ok((cpu_of(std::process::id()).1 - before) / runs.max(1) as f64)
}

/// The live children of process `pid`.
fn live_children(pid: u32) -> impl Iterator<Item = u32> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
        .flatten()
        .flat_map(|task| {
            std::fs::read_to_string(task.path().join("children"))
                .unwrap_or_default()
                .split_whitespace()
                .filter_map(|c| c.parse().ok())
                .collect::<Vec<u32>>()
        })
}

/// CPU seconds so far: workers (with their lifeline processes), their commands, database
/// backends of `db` except `skip`, and the lifeline processes alone.
async fn cpu_now(
    admin: &mut PgConnection,
    db: &str,
    skip: i32,
    workers: &[u32],
) -> anyhow::Result<(f64, f64, f64, f64)> {
    let (mut own, mut children, mut lifelines) = (0.0, 0.0, 0.0);
    for pid in workers {
        let (o, c) = cpu_of(*pid);
        own += o;
        children += c;
        // Its live children: the lifeline process (counted as the worker's own work), and no
        // command once every execution has completed.
        lifelines += live_children(*pid)
            .map(|child| cpu_of(child).0)
            .sum::<f64>();
    }
    own += lifelines;
    let backends: Vec<i32> = sqlx::query_scalar(
        "SELECT pid FROM pg_stat_activity WHERE datname = $1 AND pid <> $2 \
           AND backend_type = 'client backend'",
    )
    .bind(db)
    .bind(skip)
    .fetch_all(admin)
    .await?;
    let database = backends
        .iter()
        .map(|pid| cpu_of(u32::try_from(*pid).unwrap_or(0)).0)
        .sum();
    Ok((own, children, database, lifelines))
}

struct Throughput {
    cpu: (f64, f64, f64, f64),
    executions: usize,
    steps: i64,
    wall: Duration,
    transactions: i64,
    own: u64,
    jobs: i64,
}

async fn throughput(
    admin: &mut PgConnection,
    url: &str,
    db: &str,
    executions: usize,
    steps: usize,
    concurrency: usize,
) -> anyhow::Result<Throughput> {
    let mut conn = url.parse::<PgConnectOptions>()?.connect().await?;
    let runbook = apply_runbook(&mut conn, &throughput_runbook(steps)).await?;
    conn.close().await?;
    wait_for_no_backends(admin, db).await?;

    // Everything from here to the final read is counted, worker start-up and shutdown included.
    let before = xact_commit(admin, db).await?;
    let workers = [
        spawn_worker(url, concurrency)?,
        spawn_worker(url, concurrency)?,
    ];
    let mut watch = Counted {
        conn: url.parse::<PgConnectOptions>()?.connect().await?,
        queries: 0,
    };
    wait_for_workers(&mut watch, 2).await?;
    let worker_pids: Vec<u32> = workers.iter().filter_map(Child::id).collect();
    let watch_pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(&mut watch.conn)
        .await?;
    watch.queries += 1;
    let cpu_before = cpu_now(admin, db, watch_pid, &worker_pids).await?;

    let request = aiops::engine::StartRequest {
        runbook_id: runbook,
        server_id: None,
        variables: serde_json::Map::new(),
        initiated_by: None,
        alert_id: None,
        trigger_id: None,
        batch: None,
    };
    let mut tx = watch.conn.begin().await?;
    for _ in 0..executions {
        aiops::engine::create_execution(&mut tx, &request, None).await?;
    }
    tx.commit().await?;
    // Wake the workers, as the API does once its transaction has committed.
    aiops::store::jobs::job_notify(&mut watch.conn).await?;
    watch.queries += 2;
    let started = Instant::now();
    let deadline = started + Duration::from_secs(600);
    loop {
        let completed = watch
            .scalar("SELECT count(*) FROM runbook_executions WHERE status = 'completed'")
            .await?;
        if completed as usize >= executions {
            break;
        }
        if Instant::now() > deadline {
            bail!("only {completed} of {executions} executions completed within 600 s");
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let wall = started.elapsed();
    let cpu_after = cpu_now(admin, db, watch_pid, &worker_pids).await?;
    let other = watch
        .scalar(
            "SELECT count(*) FROM runbook_executions \
             WHERE status IN ('failed', 'cancelled', 'timeout')",
        )
        .await?;
    if other > 0 {
        bail!("{other} executions did not complete");
    }
    let steps = watch
        .scalar("SELECT count(*) FROM step_executions WHERE phase = 'run' AND status = 'completed'")
        .await?;
    let jobs = watch
        .scalar("SELECT count(*) FROM jobs WHERE kind LIKE 'execution.%'")
        .await?;
    for worker in workers {
        stop_worker(worker).await?;
    }
    let own = watch.queries;
    watch.conn.close().await?;
    wait_for_no_backends(admin, db).await?;
    let after = xact_commit(admin, db).await?;
    Ok(Throughput {
        cpu: (
            cpu_after.0 - cpu_before.0,
            cpu_after.1 - cpu_before.1,
            cpu_after.2 - cpu_before.2,
            cpu_after.3 - cpu_before.3,
        ),
        executions,
        steps,
        wall,
        transactions: after - before,
        own,
        jobs,
    })
}

async fn latency(url: &str, samples: usize, concurrency: usize) -> anyhow::Result<Latency> {
    let pool = aiops::store::connect(url, 10).await?;
    let config = Arc::new(aiops::config::Config {
        listen: "127.0.0.1:0".parse()?,
        ..aiops::config::Config::default()
    });
    let app = aiops::startup::Application::build(config, pool.clone()).await?;
    let addr = app.local_addr();
    let (stop_api, api_stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(app.run_until(async move {
        let _ = api_stopped.await;
    }));

    // An admin with a session token straight in the database (no password round trip).
    let token = aiops::crypto::token::generate();
    {
        let mut conn = pool.acquire().await?;
        let user = aiops::store::users::user_create(
            &mut conn,
            &aiops::store::users::NewUser {
                username: "bench-admin",
                email: "bench-admin@example.test",
                full_name: None,
                password_hash: "not-a-valid-hash",
                role: "admin",
                is_active: true,
            },
        )
        .await?;
        aiops::store::tokens::token_insert(
            &mut conn,
            &aiops::store::tokens::NewTokenRow {
                user_id: user.id,
                kind: "session",
                name: None,
                token_hash: &token.hash,
                expires_at: Some(chrono::Utc::now() + chrono::Duration::hours(2)),
                created_with: None,
            },
        )
        .await?;
    }
    let client = reqwest::Client::new();
    let api = |path: &str| format!("http://{addr}/api/v1{path}");
    let imported: serde_json::Value = client
        .post(api("/runbooks/import"))
        .bearer_auth(&token.secret)
        .json(&json!({ "yaml": LATENCY_RUNBOOK }))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    let runbook = imported["runbook"]["id"]
        .as_str()
        .context("import answered without a runbook id")?
        .to_owned();

    let workers = [
        spawn_worker(url, concurrency)?,
        spawn_worker(url, concurrency)?,
    ];
    let mut watch = Counted {
        conn: url.parse::<PgConnectOptions>()?.connect().await?,
        queries: 0,
    };
    wait_for_workers(&mut watch, 2).await?;
    let mut listener = PgListener::connect_with(&pool).await?;
    listener.listen(aiops::engine::CONTROL_CHANNEL).await?;
    // Let both workers settle into their idle wait.
    tokio::time::sleep(Duration::from_millis(500)).await;

    let body = json!({ "runbook_id": runbook });
    let mut to_created = Vec::with_capacity(samples);
    let mut to_completed = Vec::with_capacity(samples);
    for _ in 0..samples {
        let sent = Instant::now();
        let created: serde_json::Value = client
            .post(api("/executions"))
            .bearer_auth(&token.secret)
            .json(&body)
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        to_created.push(sent.elapsed());
        let id: uuid::Uuid = created["execution_ids"][0]
            .as_str()
            .context("start answered without an execution id")?
            .parse()?;
        let deadline = sent + Duration::from_secs(30);
        loop {
            let status: String =
                sqlx::query_scalar("SELECT status::text FROM runbook_executions WHERE id = $1")
                    .bind(id)
                    .fetch_one(&mut watch.conn)
                    .await?;
            match status.as_str() {
                "completed" => {
                    to_completed.push(sent.elapsed());
                    break;
                }
                "failed" | "cancelled" | "timeout" => bail!("execution {id} ended {status}"),
                _ => {}
            }
            if Instant::now() > deadline {
                bail!("execution {id} did not complete within 30 s");
            }
            // Wake when this execution ends (or re-check after 100 ms).
            let wait_until = tokio::time::Instant::now() + Duration::from_millis(100);
            while let Ok(n) = tokio::time::timeout_at(wait_until, listener.recv()).await {
                if n?.payload() == id.to_string() {
                    break;
                }
            }
        }
        // Leave the workers idle (past the wake-up debounce) before the next sample.
        tokio::time::sleep(Duration::from_millis(50)).await;
        while listener.next_buffered().is_some() {}
    }
    for worker in workers {
        stop_worker(worker).await?;
    }
    // Where the time goes, from the queue's own timestamps (`now()` is the start of each
    // transaction): enqueueing transaction -> claim, and claim -> completing transaction.
    let breakdown: Vec<(String, i64, f64, f64)> = sqlx::query_as(
        "SELECT kind, count(*), \
             percentile_cont(0.5) WITHIN GROUP \
                 (ORDER BY extract(epoch FROM attempted_at - created_at) * 1000), \
             percentile_cont(0.5) WITHIN GROUP \
                 (ORDER BY extract(epoch FROM finished_at - attempted_at) * 1000) \
         FROM jobs WHERE state = 'completed' AND kind IN ('execution.start', 'execution.step') \
         GROUP BY kind ORDER BY kind DESC",
    )
    .fetch_all(&mut watch.conn)
    .await?;
    drop(listener);
    watch.conn.close().await?;
    let _ = stop_api.send(());
    server.await??;
    pool.close().await;
    to_created.sort();
    to_completed.sort();
    Ok(Latency {
        to_created,
        to_completed,
        breakdown,
    })
}

struct Latency {
    to_created: Vec<Duration>,
    to_completed: Vec<Duration>,
    breakdown: Vec<(String, i64, f64, f64)>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    if std::env::args().any(|a| a == "--list") {
        return Ok(());
    }
    // `cargo bench` passes --bench; `cargo test --all-targets` does not: a smoke run then.
    let full = std::env::args().any(|a| a == "--bench");
    let executions = env_usize("BENCH_EXECUTIONS", if full { 1_000 } else { 5 });
    let samples = env_usize("BENCH_LATENCY_SAMPLES", if full { 200 } else { 5 });
    let concurrency = env_usize("BENCH_CONCURRENCY", 10);
    let steps = env_usize("BENCH_STEPS", 5).max(1);

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
    let mut admin = server.parse::<PgConnectOptions>()?.connect().await?;
    let version: String = sqlx::query_scalar("SHOW server_version")
        .fetch_one(&mut admin)
        .await?;
    let mut databases = Vec::new();
    let mut fresh = async |admin: &mut PgConnection| -> anyhow::Result<(String, String)> {
        let name = format!("aiops_bench_{}", uuid::Uuid::new_v4().simple());
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&mut *admin)
            .await?;
        let url = with_database(&server, &name);
        let pool = aiops::store::connect(&url, 2).await?;
        aiops::store::migrate(&pool).await?;
        pool.close().await;
        databases.push(name.clone());
        Ok((name, url))
    };

    let shell_runs = if full { 500 } else { 20 };
    let shell_cpu = shell_start_cpu(shell_runs)?;
    let (db, url) = fresh(&mut admin).await?;
    let t = throughput(&mut admin, &url, &db, executions, steps, concurrency).await?;
    let (_, url) = fresh(&mut admin).await?;
    let l = latency(&url, samples, concurrency).await?;
    let (created, completed) = (&l.to_created, &l.to_completed);

    let secs = t.wall.as_secs_f64();
    let per_step = (t.transactions - t.own as i64) as f64 / t.steps.max(1) as f64;
    println!("aiops execution engine benchmark (PostgreSQL {version})");
    println!(
        "  throughput: {} executions x {steps} no-op local steps, 2 `aiops worker` processes (concurrency {concurrency} each)",
        t.executions
    );
    println!(
        "    wall {secs:.2} s = {:.1} executions/s, {:.1} steps/s ({} steps, {} engine jobs)",
        t.executions as f64 / secs,
        t.steps as f64 / secs,
        t.steps,
        t.jobs
    );
    println!(
        "    transactions per step: {per_step:.2} ({} commits in the database, minus {} of the benchmark's own)",
        t.transactions, t.own
    );
    let per = |cpu: f64| cpu * 1000.0 / t.steps.max(1) as f64;
    println!(
        "    CPU per step: workers {:.2} ms (their lifeline processes {:.3} ms of it), their commands {:.2} ms, database backends {:.2} ms (total {:.2} ms)",
        per(t.cpu.0),
        per(t.cpu.3),
        per(t.cpu.1),
        per(t.cpu.2),
        per(t.cpu.0 + t.cpu.1 + t.cpu.2)
    );
    println!(
        "    for scale: one `sh -c true` process started by this benchmark costs {:.2} ms of CPU on this host (mean of {shell_runs})",
        shell_cpu * 1000.0
    );
    println!(
        "  latency: 3-step no-op runbook, POST /api/v1/executions -> status completed, 2 idle `aiops worker` processes, {samples} samples"
    );
    println!(
        "    p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms (API answer alone: p50 {:.2} ms, p99 {:.2} ms)",
        ms(percentile(completed, 0.50)),
        ms(percentile(completed, 0.99)),
        ms(completed.last().copied().unwrap_or_default()),
        ms(percentile(created, 0.50)),
        ms(percentile(created, 0.99)),
    );
    for (kind, n, pickup, run) in &l.breakdown {
        println!(
            "    {kind} ({n} jobs): median enqueue -> claim {pickup:.2} ms, claim -> completed {run:.2} ms"
        );
    }

    for name in databases {
        sqlx::query(sqlx::AssertSqlSafe(format!("DROP DATABASE {name}")))
            .execute(&mut admin)
            .await?;
    }
    admin.close().await?;
    if let Some(pg) = embedded {
        pg.stop().await?;
    }
    Ok(())
}
