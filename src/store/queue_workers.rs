//! `queue_workers` and `queue_cron`: who runs jobs (identity, liveness, shutdown) and which cron
//! tick each schedule last fired. Knows nothing about handlers or cron expressions; the `queue`
//! module decides what a tick is.

use chrono::{DateTime, Utc};
use sqlx::PgConnection;
use uuid::Uuid;

use super::StoreResult;

/// A worker process as recorded at start.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct WorkerRow {
    /// Worker id (also `jobs.locked_by`).
    pub id: Uuid,
    /// Host name.
    pub host: String,
    /// Operating-system process id.
    pub pid: i32,
    /// Version of the binary.
    pub version: String,
    /// Jobs it runs at once.
    pub concurrency: i32,
    /// Kinds it has handlers for.
    pub kinds: Vec<String>,
    /// Start time.
    pub started_at: DateTime<Utc>,
    /// Last heartbeat.
    pub last_seen_at: DateTime<Utc>,
    /// Clean shutdown time; `None` while running or after a crash.
    pub stopped_at: Option<DateTime<Utc>>,
}

/// Identity of a starting worker.
#[derive(Debug, Clone)]
pub struct NewWorker<'a> {
    /// Fresh id.
    pub id: Uuid,
    /// Host name.
    pub host: &'a str,
    /// Process id.
    pub pid: i32,
    /// Binary version.
    pub version: &'a str,
    /// Slots.
    pub concurrency: i32,
    /// Registered kinds.
    pub kinds: &'a [String],
}

/// Records a starting worker.
pub async fn worker_register(conn: &mut PgConnection, w: &NewWorker<'_>) -> StoreResult<()> {
    sqlx::query(
        "INSERT INTO queue_workers (id, host, pid, version, concurrency, kinds) \
         VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(w.id)
    .bind(w.host)
    .bind(w.pid)
    .bind(w.version)
    .bind(w.concurrency)
    .bind(w.kinds)
    .execute(conn)
    .await?;
    Ok(())
}

/// Marks a worker alive now.
pub async fn worker_heartbeat(conn: &mut PgConnection, id: Uuid) -> StoreResult<()> {
    sqlx::query("UPDATE queue_workers SET last_seen_at = now() WHERE id = $1")
        .bind(id)
        .execute(conn)
        .await?;
    Ok(())
}

/// Marks a worker cleanly stopped.
pub async fn worker_stop(conn: &mut PgConnection, id: Uuid) -> StoreResult<()> {
    sqlx::query("UPDATE queue_workers SET stopped_at = now(), last_seen_at = now() WHERE id = $1")
        .bind(id)
        .execute(conn)
        .await?;
    Ok(())
}

/// Workers, most recently seen first, with the total.
pub async fn worker_list(
    conn: &mut PgConnection,
    limit: i64,
    offset: i64,
) -> StoreResult<(Vec<WorkerRow>, i64)> {
    let rows = sqlx::query_as::<_, WorkerRow>(
        "SELECT id, host, pid, version, concurrency, kinds, started_at, last_seen_at, stopped_at \
         FROM queue_workers ORDER BY last_seen_at DESC, id LIMIT $1 OFFSET $2",
    )
    .bind(limit)
    .bind(offset)
    .fetch_all(&mut *conn)
    .await?;
    let total: i64 = sqlx::query_scalar("SELECT count(*) FROM queue_workers")
        .fetch_one(conn)
        .await?;
    Ok((rows, total))
}

/// Deletes worker rows not seen since `before`. Returns how many were deleted.
pub async fn worker_prune(conn: &mut PgConnection, before: DateTime<Utc>) -> StoreResult<u64> {
    let done = sqlx::query("DELETE FROM queue_workers WHERE last_seen_at < $1")
        .bind(before)
        .execute(conn)
        .await?;
    Ok(done.rows_affected())
}

/// Makes sure a schedule has its row; a new row starts at `first_tick` (ticks at or before it
/// never fire). An existing row keeps its last tick and takes the new expression.
pub async fn cron_ensure(
    conn: &mut PgConnection,
    name: &str,
    schedule: &str,
    first_tick: DateTime<Utc>,
) -> StoreResult<DateTime<Utc>> {
    Ok(sqlx::query_scalar(
        "INSERT INTO queue_cron (name, schedule, last_tick) VALUES ($1, $2, $3) \
         ON CONFLICT (name) DO UPDATE SET schedule = EXCLUDED.schedule \
         RETURNING last_tick",
    )
    .bind(name)
    .bind(schedule)
    .bind(first_tick)
    .fetch_one(conn)
    .await?)
}

/// Compare-and-set: advances the schedule's last tick to `tick` if it is still earlier. `true`
/// means this caller won the tick and must enqueue its job in the same transaction.
pub async fn cron_advance(
    conn: &mut PgConnection,
    name: &str,
    tick: DateTime<Utc>,
) -> StoreResult<bool> {
    let done = sqlx::query(
        "UPDATE queue_cron SET last_tick = $2, fired_at = now() \
         WHERE name = $1 AND last_tick < $2",
    )
    .bind(name)
    .bind(tick)
    .execute(conn)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// Takes a transaction-scoped advisory lock named `name` if nobody holds it. `false` means
/// another session holds it (another worker is doing the same chore right now).
pub async fn queue_try_lock(conn: &mut PgConnection, name: &str) -> StoreResult<bool> {
    Ok(
        sqlx::query_scalar("SELECT pg_try_advisory_xact_lock(hashtext($1))")
            .bind(name)
            .fetch_one(conn)
            .await?,
    )
}
