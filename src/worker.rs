//! The worker process: connects to the database and runs the job loop until shutdown.

use std::future::Future;

use sqlx::PgPool;

/// Runs until `shutdown` resolves. Verifies the database connection first so that a
/// misconfigured worker fails at start instead of idling silently.
pub async fn run(pool: PgPool, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    sqlx::query("SELECT 1").execute(&pool).await?;
    tracing::info!("worker started");
    shutdown.await;
    tracing::info!("worker stopped");
    Ok(())
}
