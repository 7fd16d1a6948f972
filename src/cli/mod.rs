//! Command-line entry points. Thin: each subcommand loads configuration, sets up logging and
//! calls into `startup`, `store`, `api` or `worker`.

/// `print!` for the commands that print and end: when the reader has gone away
/// (`aiops runbook export | head`) the process ends quietly with the status a shell gives a
/// program stopped by SIGPIPE, instead of panicking on the broken pipe.
macro_rules! out {
    ($($arg:tt)*) => {
        $crate::cli::write_out(format_args!($($arg)*))
    };
}

/// `println!` counterpart of [`out!`].
macro_rules! outln {
    () => {
        $crate::cli::write_out(format_args!("\n"))
    };
    ($($arg:tt)*) => {
        $crate::cli::write_out(format_args!("{}\n", format_args!($($arg)*)))
    };
}

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand};

use crate::config::{Config, LogFormat};
use crate::startup::{self, Application, embedded_pg::EmbeddedPostgres};
use crate::{store, telemetry};

/// aiops: auto-remediation for Prometheus Alertmanager alerts, as durable runbook workflows in
/// PostgreSQL.
#[derive(Debug, Parser)]
#[command(name = "aiops", version, about, long_about = None)]
pub struct Cli {
    /// YAML configuration file (also AIOPS_CONFIG). Environment variables override it.
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// What to run.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run everything in one process: API, webhook and a worker. Without DATABASE_URL it creates
    /// (first run) or reuses a private PostgreSQL cluster under the data directory, and stops it
    /// on exit. Creates and prints the first admin on first start.
    Up,
    /// Run the HTTP API only (stateless; run several behind a load balancer).
    Serve {
        /// Apply pending migrations before serving.
        #[arg(long)]
        migrate: bool,
    },
    /// Run a worker that claims and runs jobs (stateless; run several on any hosts).
    Worker(WorkerArgs),
    /// The companion process a worker starts: kills the worker's local commands when the
    /// worker dies (reads `+pgid` / `-pgid` lines on stdin until end of file).
    #[command(hide = true)]
    Lifeline,
    /// Apply pending database migrations and exit.
    Migrate,
    /// Print the OpenAPI document of this build (the one committed under openapi/).
    Openapi,
    /// Generate secret keys and rotate stored secrets to the current key.
    Secrets {
        /// What to do.
        #[command(subcommand)]
        command: secrets::SecretsCommand,
    },
    /// Runbooks as code: validate, apply, export, diff and dry-run YAML files.
    Runbook {
        /// What to do.
        #[command(subcommand)]
        command: runbook::RunbookCommand,
    },
    /// Manage user accounts directly in the database.
    User {
        /// What to do.
        #[command(subcommand)]
        command: user::UserCommand,
    },
}

/// Worker settings (each also readable from the environment variable named in its help).
#[derive(Debug, Clone, clap::Args)]
pub struct WorkerArgs {
    /// Jobs run at once.
    #[arg(long, env = "AIOPS_WORKER_CONCURRENCY", default_value_t = 10)]
    pub concurrency: usize,
    /// Jobs claimed ahead of the free slots: they wait in the worker, leased and heartbeated,
    /// and start as slots free without another claim round trip. Default 0 (off): jobs a busy
    /// worker holds ahead wait for its slots even when another worker is idle, so use it for
    /// floods of short jobs.
    #[arg(long, env = "AIOPS_WORKER_PREFETCH")]
    pub prefetch: Option<usize>,
    /// Lease length in seconds: a job whose worker dies is rescued this long after its last
    /// heartbeat (heartbeats run every third of it).
    #[arg(long, env = "AIOPS_WORKER_LEASE_SECONDS", default_value_t = 30.0)]
    pub lease_seconds: f64,
    /// Polling fallback in milliseconds when no wake-up notification arrives.
    #[arg(long, env = "AIOPS_WORKER_POLL_MS", default_value_t = 2000)]
    pub poll_ms: u64,
    /// How often rescue, cron and the worker heartbeat run, in milliseconds.
    #[arg(long, env = "AIOPS_WORKER_MAINTENANCE_MS", default_value_t = 5000)]
    pub maintenance_ms: u64,
    /// On SIGTERM, seconds running jobs may take before they are released to other workers.
    #[arg(long, env = "AIOPS_WORKER_GRACE_SECONDS", default_value_t = 30.0)]
    pub grace_seconds: f64,
    /// Finished jobs are deleted this many hours after they finished.
    #[arg(long, env = "AIOPS_JOB_RETENTION_HOURS", default_value_t = 168)]
    pub retention_hours: u64,
    /// Variables of this process's environment that commands run on the worker's own host get,
    /// comma-separated (for example `HTTP_PROXY,NO_PROXY`). Without it they get only `PATH`,
    /// `HOME`, `USER`, `LOGNAME`, `SHELL`, the locale, `TZ` and `TMPDIR`, never the database URL
    /// or the secret key.
    #[arg(long, env = "AIOPS_LOCAL_ENV_PASSTHROUGH", value_delimiter = ',')]
    pub local_env_passthrough: Vec<String>,
    /// Register the `test.*` job kinds (for the queue's process-level tests only).
    #[arg(long, hide = true, env = "AIOPS_WORKER_TEST_KINDS")]
    pub test_kinds: bool,
}

impl WorkerArgs {
    /// The defaults, overridden by the environment (for `aiops up`, which has no worker flags).
    pub fn from_env() -> anyhow::Result<WorkerArgs> {
        use clap::{Args, FromArgMatches};
        let matches = WorkerArgs::augment_args(clap::Command::new("worker"))
            .try_get_matches_from(["worker"])?;
        Ok(WorkerArgs::from_arg_matches(&matches)?)
    }

    /// The worker options these arguments describe.
    pub fn options(&self) -> anyhow::Result<crate::worker::WorkerOptions> {
        let secs = |name: &str, v: f64| {
            std::time::Duration::try_from_secs_f64(v)
                .ok()
                .filter(|d| !d.is_zero())
                .with_context(|| format!("--{name} must be a positive number of seconds"))
        };
        let lease = secs("lease-seconds", self.lease_seconds)?;
        // Heartbeats run every third of the lease: below a second they would swamp the
        // database, and a lease of a day would leave a dead worker's jobs that long.
        anyhow::ensure!(
            (1.0..=86_400.0).contains(&self.lease_seconds),
            "--lease-seconds must be 1 to 86400"
        );
        anyhow::ensure!(
            (1..=10_000).contains(&self.concurrency),
            "--concurrency must be 1 to 10000"
        );
        anyhow::ensure!(
            (1..=24 * 366 * 10).contains(&self.retention_hours),
            "--retention-hours must be 1 to 87840 (10 years)"
        );
        let queue = crate::queue::WorkerConfig {
            concurrency: self.concurrency,
            prefetch: self.prefetch,
            lease,
            heartbeat_interval: lease / 3,
            poll_interval: std::time::Duration::from_millis(self.poll_ms.max(10)),
            maintenance_interval: std::time::Duration::from_millis(self.maintenance_ms.max(10)),
            grace_period: std::time::Duration::try_from_secs_f64(self.grace_seconds)
                .context("--grace-seconds must be a non-negative number")?,
            ..crate::queue::WorkerConfig::default()
        };
        let passthrough: Vec<String> = self
            .local_env_passthrough
            .iter()
            .map(|n| n.trim().to_owned())
            .filter(|n| !n.is_empty())
            .collect();
        if let Some(bad) = passthrough.iter().find(|n| !crate::exec::is_env_name(n)) {
            anyhow::bail!(
                "--local-env-passthrough: `{bad}` is not a variable name ([A-Za-z_][A-Za-z0-9_]*)"
            );
        }
        Ok(crate::worker::WorkerOptions {
            queue,
            retention: std::time::Duration::from_secs(self.retention_hours * 3600),
            test_kinds: self.test_kinds,
            local_env_passthrough: passthrough,
            ..crate::worker::WorkerOptions::default()
        })
    }
}

pub mod runbook;
pub mod secrets;
mod user;

/// Connections a worker of `concurrency` needs at least.
fn worker_connections(concurrency: usize) -> u32 {
    u32::try_from(concurrency)
        .unwrap_or(u32::MAX)
        .saturating_add(6)
}

/// Writes to standard output; a reader that went away ends the process (status 141, as a
/// shell reports SIGPIPE); any other failure to write is reported and ends it too.
pub(crate) fn write_out(args: std::fmt::Arguments<'_>) {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    if let Err(e) = stdout.write_fmt(args).and_then(|()| stdout.flush()) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(141);
        }
        eprintln!("error: cannot write to standard output: {e}");
        std::process::exit(1);
    }
}

/// An error and its causes on one line, each said once (a cause whose text its wrapper already
/// carries is left out), a database refusal by its message alone, and what to do about a
/// database that was never migrated.
fn error_text(e: &anyhow::Error) -> String {
    let db = e
        .chain()
        .find_map(|cause| match cause.downcast_ref::<sqlx::Error>() {
            Some(sqlx::Error::Database(d)) => Some(d),
            _ => None,
        });
    let mut parts: Vec<String> = Vec::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if parts.last().is_some_and(|p| p.contains(&text)) {
            continue;
        }
        if let Some(d) = db
            && text.contains(d.message())
        {
            parts.push(format!("the database refused: {}", d.message()));
            break;
        }
        parts.push(text);
    }
    let mut text = parts.join(": ");
    if db.is_some_and(|d| d.code().as_deref() == Some("42P01")) {
        text.push_str("\nhint: this database has no aiops tables yet; run `aiops migrate` first");
    }
    text
}

/// Parses the command line and runs it; the process exit code reflects success.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Openapi => {
            out!("{}", crate::api::spec_json());
            return ExitCode::SUCCESS;
        }
        Command::Lifeline => {
            crate::exec::lifeline::outlast_stop_signals();
            let ended = crate::exec::lifeline::serve(std::io::stdin().lock());
            if ended > 0 {
                eprintln!(
                    "aiops lifeline: the worker died; ended {ended} process group(s) of its local commands"
                );
            }
            return ExitCode::SUCCESS;
        }
        _ => {}
    }
    let config = match Config::load(cli.config.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    telemetry::init(config.log_format, &config.log_level);
    if matches!(cli.command, Command::Up | Command::Worker(_)) {
        keep_out_local_commands();
    }
    // A service's log may be read by a collector that takes one JSON object per line: its
    // fatal error is such a line too. The commands people type keep their plain message.
    let fatal_in_log = config.log_format == LogFormat::Json
        && matches!(
            cli.command,
            Command::Up | Command::Serve { .. } | Command::Worker(_) | Command::Migrate
        );
    let fatal = |message: &str| {
        if fatal_in_log && tracing::enabled!(tracing::Level::ERROR) {
            tracing::error!(error = message, "stopped by a fatal error");
        } else {
            eprintln!("error: {message}");
        }
        ExitCode::FAILURE
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return fatal(&format!("cannot start the async runtime: {e}")),
    };
    match runtime.block_on(run(cli.command, config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.is::<runbook::Differences>() => ExitCode::FAILURE,
        Err(e) => fatal(&error_text(&e)),
    }
}

/// Makes this process non-dumpable before it starts any command: the commands
/// of runs on the worker's own host run as this process's user, and this keeps them (unless
/// they run as root) from reading its environment (`DATABASE_URL`, `AIOPS_SECRET_KEY`) or its
/// memory through `/proc/<pid>/environ` and `/proc/<pid>/mem`. Commands are new programs, so
/// they are dumpable again and their own steps still work as before.
fn keep_out_local_commands() {
    use rustix::process::{DumpableBehavior, set_dumpable_behavior};
    if let Err(e) = set_dumpable_behavior(DumpableBehavior::NotDumpable) {
        tracing::warn!(error = %e, "cannot make this process non-dumpable");
    }
}

async fn connect(config: &Config) -> anyhow::Result<sqlx::PgPool> {
    connect_at_least(config, 0).await
}

/// A pool of `db_max_connections`, raised to `at_least` (a worker needs one connection per
/// running job, which holds a transaction at its checkpoints, plus its claims, settling,
/// heartbeats and its LISTEN connection).
async fn connect_at_least(config: &Config, at_least: u32) -> anyhow::Result<sqlx::PgPool> {
    let url = config.database_url.as_deref().context(
        "DATABASE_URL is not set (only `aiops up` starts an embedded database by itself)",
    )?;
    match store::connect(url, config.db_max_connections.max(at_least)).await {
        Ok(pool) => Ok(pool),
        // The pool retries until its timeout and then says only that: one more attempt of
        // its own says why (connection refused at an address, a name that does not resolve).
        Err(sqlx::Error::PoolTimedOut) => {
            use sqlx::ConnectOptions;
            let cause = match url.parse::<sqlx::postgres::PgConnectOptions>() {
                Ok(options) => {
                    // Where it tried (never the password).
                    let at = format!("{}:{}", options.get_host(), options.get_port());
                    match options.connect().await {
                        Ok(_) => format!("{at}: the server accepted no connection for 10 s"),
                        Err(e) => format!("{at}: {e}"),
                    }
                }
                Err(e) => e.to_string(),
            };
            anyhow::bail!("cannot connect to the database at {cause}")
        }
        Err(e) => Err(anyhow::Error::new(e).context("cannot connect to the database")),
    }
}

async fn run(command: Command, config: Config) -> anyhow::Result<()> {
    match command {
        Command::Up => up(config).await,
        Command::Serve { migrate } => {
            let pool = connect(&config).await?;
            if migrate {
                store::migrate(&pool).await.context("migration failed")?;
            }
            // Without its schema every request would answer 500.
            store::require_current_schema(&pool).await?;
            let app = Application::build(Arc::new(config), pool).await?;
            tracing::info!(addr = %app.local_addr(), "API listening");
            app.run_until(startup::shutdown_signal()).await?;
            Ok(())
        }
        Command::Worker(args) => {
            let pool = connect_at_least(&config, worker_connections(args.concurrency)).await?;
            let options = args
                .options()?
                .with_ssh(&pool, &config)?
                .with_login_window(config.login_window)
                .with_lifeline();
            crate::worker::run(pool, options, startup::shutdown_signal()).await
        }
        Command::Migrate => {
            let pool = connect(&config).await?;
            store::migrate(&pool).await.context("migration failed")?;
            outln!("migrations applied");
            Ok(())
        }
        Command::Openapi | Command::Lifeline => {
            unreachable!("answered before the configuration is loaded")
        }
        Command::Secrets { command } => match command {
            secrets::SecretsCommand::GenerateKey { .. } => {
                secrets::run(command, &config, None).await
            }
            secrets::SecretsCommand::Rotate => {
                let pool = connect(&config).await?;
                secrets::run(command, &config, Some(&pool)).await
            }
        },
        Command::Runbook { command } => runbook::run(command, &config).await,
        Command::User { command } => {
            let pool = connect(&config).await?;
            user::run(command, &pool).await
        }
    }
}

async fn up(mut config: Config) -> anyhow::Result<()> {
    // One `up` per data directory: a second would adopt the first's database and stop it when
    // it exits. The lock is held until this process ends.
    let _lock = lock_data_dir(&config.data_dir)?;
    // SIGTERM and SIGINT are handled from here on: one that comes while the platform starts
    // (initdb, migrations) takes effect once the current step is done, and the embedded
    // PostgreSQL is stopped as on any other stop, instead of the signal killing this process
    // and leaving the server running.
    let (signalled, stop_signal) = tokio::sync::watch::channel(false);
    let shutdown = startup::shutdown_signal();
    tokio::spawn(async move {
        shutdown.await;
        let _ = signalled.send(true);
    });
    // The worker's settings come from the environment: refused before anything starts.
    let worker_args = WorkerArgs::from_env()
        .and_then(|args| args.options().map(|_| args))
        .context(
            "worker settings from the AIOPS_WORKER_* environment variables (see `aiops worker \
             --help` for what each takes)",
        )?;
    ensure_local_secret_key(&mut config)?;
    let embedded = match config.database_url {
        Some(_) => None,
        None => {
            let pg = EmbeddedPostgres::start(&config.data_dir, config.postgres_bin_dir.as_deref())
                .await?;
            tracing::info!(pgdata = %pg.pgdata().display(), "embedded PostgreSQL running");
            config.database_url = Some(pg.url());
            Some(pg)
        }
    };
    // The embedded server is watched while the platform runs, and started again if it dies.
    let (stop_supervising, supervising) = tokio::sync::watch::channel(false);
    let supervisor = embedded.map(|pg| tokio::spawn(supervise_embedded(pg, supervising)));
    let result = up_with_database(config, worker_args, stop_signal).await;
    let _ = stop_supervising.send(true);
    let embedded = match supervisor {
        Some(task) => Some(
            task.await
                .context("embedded PostgreSQL supervisor panicked")?,
        ),
        None => None,
    };
    if let Some(pg) = embedded {
        if let Err(e) = pg.stop().await {
            tracing::error!(error = %e, "stopping the embedded PostgreSQL failed");
        } else {
            tracing::info!("embedded PostgreSQL stopped");
        }
    }
    result
}

/// Takes `<data_dir>/aiops.lock` for this process, or says which data directory another
/// `aiops up` holds.
fn lock_data_dir(data_dir: &std::path::Path) -> anyhow::Result<std::fs::File> {
    std::fs::create_dir_all(data_dir)
        .with_context(|| format!("cannot create data directory {}", data_dir.display()))?;
    let path = data_dir.join("aiops.lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => anyhow::bail!(
            "another `aiops up` is running on data directory {} (it holds {}); stop it first",
            data_dir.display(),
            path.display()
        ),
        Err(std::fs::TryLockError::Error(e)) => {
            Err(e).with_context(|| format!("cannot lock {}", path.display()))
        }
    }
}

/// How often `aiops up` checks that its embedded PostgreSQL is running.
const EMBEDDED_PG_CHECK: std::time::Duration = std::time::Duration::from_secs(2);

/// Keeps the embedded cluster running until `stop` is set, then hands it back to be stopped:
/// a server that died (crashed, or killed by the OOM killer) is started again, and PostgreSQL's
/// crash recovery brings it back to its last commit. The first operation that finds a pooled
/// connection broken by the restart fails (the queue retries; the API answers 503); the pool
/// then replaces every connection opened before it.
async fn supervise_embedded(
    pg: EmbeddedPostgres,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> EmbeddedPostgres {
    let mut tick = tokio::time::interval(EMBEDDED_PG_CHECK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = async { stop.wait_for(|stopped| *stopped).await.map(|_| ()) } => return pg,
            _ = tick.tick() => match pg.restart_if_stopped().await {
                Ok(false) => {}
                Ok(true) => tracing::warn!(
                    pgdata = %pg.pgdata().display(),
                    "the embedded PostgreSQL was not running; started it again (crash recovery)"
                ),
                Err(e) => tracing::error!(
                    error = %e,
                    "the embedded PostgreSQL is not running and could not be started; retrying"
                ),
            },
        }
    }
}

/// `aiops up` is a whole platform on one machine: without a configured secret key it uses
/// `<data_dir>/secret.key`, generated (mode 0600) on the first start and reused afterwards, so
/// server credentials and secret variables can be stored from the start.
fn ensure_local_secret_key(config: &mut Config) -> anyhow::Result<()> {
    if config.secret_key.is_some() || config.secret_key_file.is_some() {
        return Ok(());
    }
    let path = config.data_dir.join("secret.key");
    if !path.exists() {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::create_dir_all(&config.data_dir)
            .with_context(|| format!("cannot create {}", config.data_dir.display()))?;
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .with_context(|| format!("cannot create {}", path.display()))?;
        writeln!(
            file,
            "# aiops secret key (generated by `aiops up`); back it up with the database\nlocal:{}",
            crate::crypto::secrets::generate_key_hex()
        )?;
        tracing::info!(path = %path.display(), "generated the secret key");
    }
    config.secret_key_file = Some(path);
    Ok(())
}

/// The platform on its database until `stop` is set (by SIGTERM or SIGINT); a stop that comes
/// while it starts ends it once the current start-up step is done.
async fn up_with_database(
    config: Config,
    worker_args: WorkerArgs,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let stopping = |stop: &tokio::sync::watch::Receiver<bool>| *stop.borrow();
    if stopping(&stop) {
        return Ok(());
    }
    // The API and the worker share the pool: the API's share plus what the worker needs.
    let pool = connect_at_least(
        &config,
        config
            .db_max_connections
            .saturating_add(worker_connections(worker_args.concurrency)),
    )
    .await?;
    store::migrate(&pool).await.context("migration failed")?;
    if stopping(&stop) {
        return Ok(());
    }
    runbook::apply_workflows_at_start(&pool, &config.workflows_dir).await?;
    if let Some(admin) = startup::ensure_first_admin(&pool).await? {
        outln!("First admin created. Save these credentials now; they are not shown again:");
        outln!("  username: {}", admin.username);
        outln!("  password: {}", admin.password);
    }
    if stopping(&stop) {
        return Ok(());
    }
    let config = Arc::new(config);
    let app = Application::build(config.clone(), pool.clone()).await?;
    outln!("aiops is up: http://{}/docs", app.local_addr());
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let wait_stop = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stopped| *stopped).await;
    };
    let server = tokio::spawn(app.run_until(wait_stop(stop_rx.clone())));
    let worker = tokio::spawn(crate::worker::run(
        pool.clone(),
        worker_args
            .options()?
            .with_ssh(&pool, &config)?
            .with_login_window(config.login_window)
            .with_lifeline(),
        wait_stop(stop_rx),
    ));
    let _ = stop.wait_for(|stopped| *stopped).await;
    let _ = stop_tx.send(true);
    server.await.context("API task panicked")??;
    worker.await.context("worker task panicked")??;
    pool.close().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn worker(args: &[&str]) -> anyhow::Result<crate::worker::WorkerOptions> {
        use clap::{Args, FromArgMatches};
        let matches = WorkerArgs::augment_args(clap::Command::new("worker"))
            .try_get_matches_from(std::iter::once("worker").chain(args.iter().copied()))?;
        WorkerArgs::from_arg_matches(&matches)?.options()
    }

    #[test]
    fn worker_settings_that_cannot_work_are_refused() {
        assert!(worker(&[]).is_ok());
        assert!(worker(&["--lease-seconds", "1.5"]).is_ok());
        for bad in [
            &["--lease-seconds", "0.000000002"][..],
            &["--lease-seconds", "100000"],
            &["--concurrency", "0"],
            &["--concurrency", "4294967295"],
            &["--retention-hours", "18446744073709551615"],
            &["--retention-hours", "0"],
        ] {
            assert!(worker(bad).is_err(), "{bad:?}");
        }
    }
}
