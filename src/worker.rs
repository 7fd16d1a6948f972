//! The worker process: builds the job-kind registry (internal kinds such as pruning; engine kinds
//! as they are written; test kinds only when asked for) and runs the queue's [`Worker`] until
//! shutdown. Knows nothing about how jobs are claimed or fenced: that is `queue`.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use sqlx::PgPool;

use crate::engine::targets::LocalOnly;
use crate::engine::{self, Engine, EngineSettings, TargetResolver};
use crate::exec::StepExecutor;
use crate::exec::lifeline::Lifeline;
use crate::exec::local::LocalExecutor;
use crate::queue::{self, JobContext, JobError, KindOptions, Registry, Worker, WorkerConfig};

/// How to run the worker.
#[derive(Clone)]
pub struct WorkerOptions {
    /// Queue settings (concurrency, lease, intervals, grace period).
    pub queue: WorkerConfig,
    /// Finished jobs, stale worker rows and live execution events older than this are pruned.
    pub retention: Duration,
    /// Also register the `test.*` kinds used by the queue's process-level tests.
    pub test_kinds: bool,
    /// Resolves execution targets (servers) to executors.
    pub targets: Arc<dyn TargetResolver>,
    /// The SSH executor, when this worker runs commands on managed servers.
    pub ssh: Option<Arc<dyn StepExecutor>>,
    /// Opens server credentials and executions' secret variables.
    pub keyring: Option<Arc<crate::crypto::secrets::Keyring>>,
    /// Execution engine tunables (output caps, cancel fallback poll).
    pub engine: EngineSettings,
    /// Variables of the worker's environment that local commands get besides the host basics
    /// (see [`crate::exec::local::HOST_ENV`]).
    pub local_env_passthrough: Vec<String>,
    /// Kills local commands' process groups if this process dies without doing so itself
    /// (see [`crate::exec::lifeline`]).
    pub lifeline: Option<Arc<Lifeline>>,
    /// The login throttling window (`AIOPS_LOGIN_WINDOW_SECONDS`): login attempts are kept at
    /// least this long, whatever the retention, or pruning would lift a lockout.
    pub login_window: Duration,
}

impl std::fmt::Debug for WorkerOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerOptions")
            .field("queue", &self.queue)
            .field("retention", &self.retention)
            .field("test_kinds", &self.test_kinds)
            .field("ssh", &self.ssh.is_some())
            .field("keyring", &self.keyring)
            .field("local_env_passthrough", &self.local_env_passthrough)
            .field("lifeline", &self.lifeline.as_ref().map(|l| l.pid()))
            .finish()
    }
}

impl Default for WorkerOptions {
    fn default() -> Self {
        WorkerOptions {
            queue: WorkerConfig::default(),
            retention: Duration::from_secs(7 * 24 * 3600),
            test_kinds: false,
            targets: Arc::new(LocalOnly),
            ssh: None,
            keyring: None,
            engine: EngineSettings::default(),
            local_env_passthrough: Vec::new(),
            lifeline: None,
            login_window: Duration::from_secs(15 * 60),
        }
    }
}

impl WorkerOptions {
    /// Lets this worker run steps on managed servers over SSH, opening their credentials (and
    /// executions' secret variables) with the configured keyring.
    pub fn with_ssh(
        mut self,
        pool: &PgPool,
        config: &crate::config::Config,
    ) -> anyhow::Result<Self> {
        self = self.with_keyring(config)?;
        self.targets = Arc::new(crate::engine::targets::DatabaseTargets {
            keyring: self.keyring.clone(),
            connect_timeout: config.ssh_connect_timeout,
        });
        self.ssh = Some(Arc::new(crate::exec::ssh::SshExecutor::new(Arc::new(
            crate::servers::PgHostKeyPinner { pool: pool.clone() },
        ))));
        Ok(self)
    }
}

impl WorkerOptions {
    /// Keeps login attempts at least as long as the API's throttling window reads them.
    pub fn with_login_window(mut self, window: Duration) -> Self {
        self.login_window = window;
        self
    }

    /// Starts the lifeline process, so that the commands this worker runs on its own host die
    /// with it even when it is killed with SIGKILL. A lifeline that cannot start is logged and
    /// the worker runs without one.
    pub fn with_lifeline(mut self) -> Self {
        match Lifeline::spawn() {
            Ok(lifeline) => self.lifeline = Some(Arc::new(lifeline)),
            Err(e) => tracing::warn!(error = %e,
                "cannot start the lifeline process; local commands will outlive this worker if it is killed"),
        }
        self
    }

    /// Loads the configured keyring (secret variables; server credentials with
    /// [`with_ssh`](WorkerOptions::with_ssh)).
    pub fn with_keyring(mut self, config: &crate::config::Config) -> anyhow::Result<Self> {
        self.keyring = crate::crypto::secrets::Keyring::from_config(config)
            .context("cannot load the secret key")?
            .map(Arc::new);
        Ok(self)
    }
}

/// The registry every worker process runs: internal queue kinds and the execution engine.
pub fn registry(options: &WorkerOptions, pool: &PgPool) -> anyhow::Result<Registry> {
    let mut registry = Registry::new();
    queue::prune::register(&mut registry, options.retention)?;
    // Throttling reads the last login window: attempts within it are never pruned.
    register_login_attempts_prune(&mut registry, options.retention.max(options.login_window))?;
    let mut local = LocalExecutor::from_host(&options.local_env_passthrough);
    if let Some(lifeline) = &options.lifeline {
        local = local.with_lifeline(lifeline.clone());
    }
    let engine = Arc::new(Engine {
        pool: pool.clone(),
        targets: options.targets.clone(),
        local: Arc::new(local),
        ssh: options.ssh.clone(),
        keyring: options.keyring.clone(),
        ended: tokio::sync::broadcast::channel(256).0,
        settings: options.engine.clone(),
        alert_matching: Default::default(),
    });
    engine::register(&mut registry, engine, options.retention)?;
    if options.test_kinds {
        register_test_kinds(&mut registry);
    }
    Ok(registry)
}

/// Job kind: deletes login attempts older than the retention period or the login window,
/// whichever is longer (throttling reads the last login window; the rest is kept that long for
/// investigations), every ten minutes.
pub const KIND_LOGIN_ATTEMPTS_PRUNE: &str = "auth.login_attempts_prune";

fn register_login_attempts_prune(
    registry: &mut Registry,
    retention: Duration,
) -> Result<(), queue::QueueError> {
    registry.register(
        KIND_LOGIN_ATTEMPTS_PRUNE,
        KindOptions::default(),
        move |ctx: JobContext| async move {
            let mut conn = ctx.pool().acquire().await?;
            let attempts =
                crate::store::login_attempts::login_attempt_prune(&mut conn, retention).await?;
            tracing::info!(attempts, "pruned old login attempts");
            Ok(())
        },
    );
    registry.cron(
        KIND_LOGIN_ATTEMPTS_PRUNE,
        "0 7-57/10 * * * *",
        queue::NewJob::new(KIND_LOGIN_ATTEMPTS_PRUNE, serde_json::json!({})).with_max_attempts(3),
    )
}

/// Runs until `shutdown` resolves, then stops gracefully (see [`Worker::run`]).
pub async fn run(
    pool: PgPool,
    options: WorkerOptions,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    crate::store::require_current_schema(&pool).await?;
    let registry = registry(&options, &pool)?;
    let worker = Worker::start(pool, registry, options.queue)
        .await
        .context("cannot register the worker")?;
    tracing::info!(worker = %worker.id(), "worker started");
    let totals = worker.run(shutdown).await.context("worker failed")?;
    if let Some(ssh) = &options.ssh {
        // Commands of steps given up at the end of the grace period are being killed.
        ssh.settle().await;
    }
    tracing::info!(?totals, "worker stopped");
    Ok(())
}

/// `test.sleep`: sleeps `payload.sleep_ms[attempt - 1]` milliseconds (the last entry for later
/// attempts), then completes in a lease-guarded transaction. Lets process-level tests hold a job
/// mid-run in a real worker process and kill it there.
fn register_test_kinds(registry: &mut Registry) {
    let options = KindOptions {
        timeout: Duration::from_secs(600),
        backoff: queue::Backoff {
            base: Duration::from_millis(100),
            max: Duration::from_millis(100),
            jitter: 0.0,
        },
    };
    registry.register("test.sleep", options, |ctx: JobContext| async move {
        let plan: Vec<u64> = ctx
            .payload
            .get("sleep_ms")
            .and_then(|v| serde_json::from_value(v.clone()).ok())
            .unwrap_or_default();
        let index = usize::try_from(ctx.attempt - 1).unwrap_or(0);
        let ms = plan.get(index).or(plan.last()).copied().unwrap_or(0);
        tokio::time::sleep(Duration::from_millis(ms)).await;
        let tx = ctx.lease().guarded_tx().await?;
        tx.complete().await?;
        Ok::<(), JobError>(())
    });
}
