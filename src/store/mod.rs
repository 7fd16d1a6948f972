//! All SQL lives here, one file per table group, with noun_verb function names (`user_create`,
//! `token_lookup`). Functions take `&mut PgConnection` (a transaction or a pooled connection) so
//! callers decide the transaction boundary; nothing here knows about HTTP.

pub mod alert_rules;
pub mod alerts;
pub mod audit;
pub mod blackouts;
pub mod breakers;
pub mod executions;
pub mod jobs;
pub mod login_attempts;
pub mod queue_workers;
pub mod runbooks;
pub mod secrets;
pub mod servers;
pub mod stats;
pub mod system_config;
pub mod tokens;
pub mod users;
pub mod webhook_tokens;

use std::time::Duration;

use sqlx::migrate::Migrator;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, PgPool};

/// The migrations under `migrations/`, embedded in the binary.
pub static MIGRATOR: Migrator = sqlx::migrate!("./migrations");

/// A database operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A unique constraint refused the write; carries the constraint name.
    #[error("conflicts with an existing row ({0})")]
    Conflict(String),
    /// A foreign key refused the write; carries the constraint name.
    #[error("refers to a row that does not exist ({0})")]
    ForeignKey(String),
    /// A CHECK constraint refused the write; carries the constraint name.
    #[error("violates constraint {0}")]
    Check(String),
    /// Anything else: connection loss, timeouts, bugs.
    #[error("database error: {0}")]
    Database(#[source] sqlx::Error),
}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        if let sqlx::Error::Database(db) = &e {
            let constraint = db.constraint().unwrap_or_default().to_owned();
            match db.code().as_deref() {
                Some("23505") => return StoreError::Conflict(constraint),
                Some("23503") => return StoreError::ForeignKey(constraint),
                Some("23514") => return StoreError::Check(constraint),
                _ => {}
            }
        }
        StoreError::Database(e)
    }
}

impl StoreError {
    /// Whether the database connection was lost or refused (the server restarting, crashed or
    /// unreachable), as opposed to a statement the server refused: the same work can succeed on a
    /// new connection once the server is back.
    pub fn is_connection_lost(&self) -> bool {
        match self {
            StoreError::Database(
                sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::Tls(_),
            ) => true,
            // connection_exception (08...), admin_shutdown, crash_shutdown, cannot_connect_now.
            StoreError::Database(sqlx::Error::Database(db)) => db.code().is_some_and(|c| {
                c.starts_with("08") || matches!(c.as_ref(), "57P01" | "57P02" | "57P03")
            }),
            _ => false,
        }
    }
}

/// Result alias for store functions.
pub type StoreResult<T> = Result<T, StoreError>;

/// Opens a pool. Statement logging is at debug level so that normal logs stay quiet.
pub async fn connect(url: &str, max_connections: u32) -> Result<PgPool, sqlx::Error> {
    let options: PgConnectOptions = url.parse()?;
    let options = options
        .log_statements(tracing::log::LevelFilter::Debug)
        .log_slow_statements(tracing::log::LevelFilter::Warn, Duration::from_secs(2))
        .application_name("aiops")
        .statement_cache_capacity(500);
    // No ping before every checkout: it is a round trip (and a transaction) per use. A
    // connection broken by a database restart fails the one operation that finds it (the queue
    // retries, the API answers 5xx) and is then dropped from the pool.
    PgPoolOptions::new()
        .max_connections(max_connections)
        .test_before_acquire(false)
        .acquire_timeout(Duration::from_secs(10))
        .connect_with(options)
        .await
}

/// Applies every pending migration. Safe to run from several processes at once: sqlx takes an
/// advisory lock around the whole run.
pub async fn migrate(pool: &PgPool) -> Result<(), sqlx::migrate::MigrateError> {
    MIGRATOR.run(pool).await
}

/// Whether the database is reachable and every embedded migration has been applied successfully.
pub async fn migrations_current(pool: &PgPool) -> Result<bool, sqlx::Error> {
    let applied: Vec<(i64,)> =
        sqlx::query_as("SELECT version FROM _sqlx_migrations WHERE success ORDER BY version")
            .fetch_all(pool)
            .await?;
    let applied: std::collections::HashSet<i64> = applied.into_iter().map(|(v,)| v).collect();
    Ok(MIGRATOR
        .iter()
        .filter(|m| m.migration_type.is_up_migration())
        .all(|m| applied.contains(&m.version)))
}

/// Lets the current transaction commit without waiting for its WAL flush
/// (`synchronous_commit = off` for this transaction only). Only for writes whose loss in a
/// database server crash is harmless because the work is redone; a later durable commit
/// flushes them too.
pub async fn relax_commit_durability(conn: &mut sqlx::PgConnection) -> StoreResult<()> {
    sqlx::query("SET LOCAL synchronous_commit = off")
        .execute(conn)
        .await?;
    Ok(())
}
