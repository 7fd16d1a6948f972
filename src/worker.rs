//! The worker process: builds the job-kind registry (internal kinds such as pruning; engine kinds
//! as they are written; test kinds only when asked for) and runs the queue's [`Worker`] until
//! shutdown. Knows nothing about how jobs are claimed or fenced: that is `queue`.

use std::future::Future;
use std::time::Duration;

use anyhow::Context;
use sqlx::PgPool;

use crate::queue::{self, JobContext, JobError, KindOptions, Registry, Worker, WorkerConfig};

/// How to run the worker.
#[derive(Debug, Clone)]
pub struct WorkerOptions {
    /// Queue settings (concurrency, lease, intervals, grace period).
    pub queue: WorkerConfig,
    /// Finished jobs and stale worker rows older than this are pruned.
    pub retention: Duration,
    /// Also register the `test.*` kinds used by the queue's process-level tests.
    pub test_kinds: bool,
}

impl Default for WorkerOptions {
    fn default() -> Self {
        WorkerOptions {
            queue: WorkerConfig::default(),
            retention: Duration::from_secs(7 * 24 * 3600),
            test_kinds: false,
        }
    }
}

/// The registry every worker process runs.
pub fn registry(options: &WorkerOptions) -> anyhow::Result<Registry> {
    let mut registry = Registry::new();
    queue::prune::register(&mut registry, options.retention)?;
    if options.test_kinds {
        register_test_kinds(&mut registry);
    }
    Ok(registry)
}

/// Runs until `shutdown` resolves, then stops gracefully (see [`Worker::run`]).
pub async fn run(
    pool: PgPool,
    options: WorkerOptions,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    match crate::store::migrations_current(&pool).await {
        Ok(true) => {}
        Ok(false) => anyhow::bail!("the database schema is not current; run `aiops migrate` first"),
        Err(e) => {
            anyhow::bail!("cannot read the applied migrations ({e}); run `aiops migrate` first")
        }
    }
    let registry = registry(&options)?;
    let worker = Worker::start(pool, registry, options.queue)
        .await
        .context("cannot register the worker")?;
    tracing::info!(worker = %worker.id(), "worker started");
    let totals = worker.run(shutdown).await.context("worker failed")?;
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
