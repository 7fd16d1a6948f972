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
        let e = StoreError::classify(e);
        if e.is_server_gone() {
            stale::note_connection_lost();
        }
        e
    }
}

impl StoreError {
    fn classify(e: sqlx::Error) -> Self {
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

    /// Whether the database connection was lost or refused (the server restarting, crashed or
    /// unreachable), as opposed to a statement the server refused: the same work can succeed on a
    /// new connection once the server is back.
    pub fn is_connection_lost(&self) -> bool {
        self.is_server_gone() || matches!(self, StoreError::Database(sqlx::Error::PoolTimedOut))
    }

    /// A connection broke or was refused by the server. Unlike a pool timeout, which may be
    /// load, this says the server went away: connections opened before are suspect.
    fn is_server_gone(&self) -> bool {
        match self {
            StoreError::Database(sqlx::Error::Io(_) | sqlx::Error::Tls(_)) => true,
            // connection_exception (08...), admin_shutdown, crash_shutdown, cannot_connect_now.
            StoreError::Database(sqlx::Error::Database(db)) => db.code().is_some_and(|c| {
                c.starts_with("08") || matches!(c.as_ref(), "57P01" | "57P02" | "57P03")
            }),
            _ => false,
        }
    }
}

/// When this process last saw a database connection lost or refused, so that pooled
/// connections opened before then (most likely broken by the same restart) are dropped instead
/// of failing one operation each.
mod stale {
    use std::sync::OnceLock;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::{Duration, Instant};

    /// Milliseconds since [`clock`]'s start, plus one, of the last loss; 0: none yet.
    static LOST_AT_MS: AtomicU64 = AtomicU64::new(0);

    fn clock() -> &'static Instant {
        static START: OnceLock<Instant> = OnceLock::new();
        START.get_or_init(Instant::now)
    }

    fn now_ms() -> u64 {
        u64::try_from(clock().elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    pub(super) fn note_connection_lost() {
        LOST_AT_MS.fetch_max(now_ms().saturating_add(1), Ordering::Relaxed);
    }

    /// Whether a pooled connection `age` old was opened before (or in the same millisecond as)
    /// the last loss.
    pub(super) fn opened_before_last_loss(age: Duration) -> bool {
        let lost = LOST_AT_MS.load(Ordering::Relaxed);
        let age_ms = u64::try_from(age.as_millis()).unwrap_or(u64::MAX);
        lost != 0 && now_ms().saturating_sub(age_ms) < lost
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
        // After a connection was lost, the idle ones opened before are not handed out: a
        // database restart costs one failed operation in this process, not one per pooled
        // connection.
        .before_acquire(|_conn, meta| {
            Box::pin(async move { Ok(!stale::opened_before_last_loss(meta.age)) })
        })
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
pub async fn migrations_current(pool: &PgPool) -> StoreResult<bool> {
    // A database never migrated has no migration table: reachable, and not current.
    let migrated: bool = sqlx::query_scalar("SELECT to_regclass('_sqlx_migrations') IS NOT NULL")
        .fetch_one(pool)
        .await?;
    if !migrated {
        return Ok(false);
    }
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

/// Refuses to go on against a database whose schema is not current (never migrated, or
/// missing migrations of this build): every request or job would fail on it.
pub async fn require_current_schema(pool: &PgPool) -> anyhow::Result<()> {
    match migrations_current(pool).await {
        Ok(true) => Ok(()),
        Ok(false) => anyhow::bail!(
            "the database schema is not current; run `aiops migrate` first (or `aiops serve \
             --migrate`)"
        ),
        Err(e) => {
            anyhow::bail!("cannot read the applied migrations ({e}); run `aiops migrate` first")
        }
    }
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

/// A read-only transaction that sees one snapshot of the database, for a list page and its
/// total: counted in the same snapshot, the total agrees with the page even while rows are
/// written. Dropping it ends it.
pub async fn read_snapshot(
    pool: &sqlx::PgPool,
) -> StoreResult<sqlx::Transaction<'static, sqlx::Postgres>> {
    Ok(pool
        .begin_with("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        .await?)
}
