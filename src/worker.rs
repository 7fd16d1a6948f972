//! The worker process: connects to the database and runs the job loop until shutdown.

use std::future::Future;

use sqlx::PgPool;

/// Runs until `shutdown` resolves. Verifies the database connection first so that a
/// misconfigured worker fails at start instead of idling silently.
pub async fn run(pool: PgPool, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    sqlx::query("SELECT 1").execute(&pool).await?;
    // Poll the shutdown future once before announcing the start, so that its signal handlers are
    // installed by then: a SIGTERM right after "worker started" must stop us cleanly.
    let shutdown = std::pin::pin!(shutdown);
    let mut shutdown = shutdown;
    tokio::select! {
        biased;
        () = &mut shutdown => {
            tracing::info!("worker stopped before it started");
            return Ok(());
        }
        () = std::future::ready(()) => {}
    }
    tracing::info!("worker started");
    shutdown.await;
    tracing::info!("worker stopped");
    Ok(())
}
