//! `circuit_breakers`: one row per runbook, created with it (a trigger on `runbooks`), read
//! `FOR UPDATE` by the transaction that admits an execution or records its outcome unless
//! [`breaker_peek`] shows a closed breaker with nothing to change (the common case, which then
//! takes no row lock, so runs of one runbook do not queue behind each other).

use chrono::{DateTime, Utc};
use sqlx::PgConnection;
use uuid::Uuid;

use super::StoreResult;
use crate::domain::circuit::{Breaker, CircuitState};

/// A row of `circuit_breakers`, with the runbook's name for listings.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct BreakerRow {
    /// Id.
    pub id: Uuid,
    /// The runbook.
    pub runbook_id: Uuid,
    /// The runbook's name.
    pub runbook_name: String,
    /// closed, open, half_open.
    pub state: String,
    /// Consecutive failures.
    pub failure_count: i32,
    /// Consecutive successes while half_open.
    pub success_count: i32,
    /// Most recent failure.
    pub last_failure_at: Option<DateTime<Utc>>,
    /// When it opened.
    pub opened_at: Option<DateTime<Utc>>,
    /// When it became half_open.
    pub half_open_at: Option<DateTime<Utc>>,
    /// Failures before opening.
    pub failure_threshold: i32,
    /// Successes before closing.
    pub success_threshold: i32,
    /// Seconds in open before half_open.
    pub reset_timeout_seconds: i32,
    /// Last change.
    pub updated_at: DateTime<Utc>,
    /// The database's clock as of the reading transaction's start: the clock `updated_at` and
    /// the reset timeout are read against, so every time the domain breaker sets comes from it.
    pub read_at: DateTime<Utc>,
}

/// `SELECT` of [`BreakerRow`]s (breaker `b`, runbook `r`) with these expressions for `state`,
/// `success_count` and `half_open_at`, followed by the rest of the statement.
macro_rules! select_breaker_with {
    ($state:expr, $success_count:expr, $half_open_at:expr; $($tail:expr),+) => {
        concat!(
            "SELECT b.id, b.runbook_id, r.name AS runbook_name, ", $state, " AS state, \
               b.failure_count, ", $success_count, " AS success_count, b.last_failure_at, \
               b.opened_at, ", $half_open_at, " AS half_open_at, b.failure_threshold, \
               b.success_threshold, b.reset_timeout_seconds, b.updated_at, now() AS read_at \
             FROM circuit_breakers b JOIN runbooks r ON r.id = b.runbook_id ",
            $($tail),+
        )
    };
}

/// `SELECT` of [`BreakerRow`]s as stored, followed by `$tail`.
macro_rules! select_breaker {
    ($tail:literal) => {
        select_breaker_with!("b.state::text", "b.success_count", "b.half_open_at"; $tail)
    };
}

/// Whether an open breaker's reset timeout has passed (breaker `b`): the next run asking to be
/// admitted moves it to half_open (`domain::circuit::Breaker::admit`).
macro_rules! reset_elapsed {
    () => {
        "(b.state = 'open' AND b.opened_at + make_interval(secs => b.reset_timeout_seconds) <= now())"
    };
}

/// The state a breaker is in as of now (breaker `b`): an open one whose reset timeout has
/// passed is half_open, though the stored row changes only when the next run is admitted.
macro_rules! state_as_of_now {
    () => {
        concat!(
            "CASE WHEN ",
            reset_elapsed!(),
            " THEN 'half_open' ELSE b.state::text END"
        )
    };
}

/// `SELECT` of [`BreakerRow`]s as of now (see [`state_as_of_now!`]; counters and `half_open_at`
/// as the move to half_open sets them) followed by `$tail`.
macro_rules! select_breaker_as_of_now {
    ($($tail:expr),+) => {
        select_breaker_with!(
            state_as_of_now!(),
            concat!("CASE WHEN ", reset_elapsed!(), " THEN 0 ELSE b.success_count END"),
            concat!(
                "CASE WHEN ",
                reset_elapsed!(),
                " THEN b.opened_at + make_interval(secs => b.reset_timeout_seconds) \
                   ELSE b.half_open_at END"
            );
            $($tail),+
        )
    };
}

impl BreakerRow {
    /// The domain breaker.
    pub fn breaker(&self) -> Breaker {
        Breaker {
            state: CircuitState::parse(&self.state),
            failure_count: self.failure_count,
            success_count: self.success_count,
            last_failure_at: self.last_failure_at,
            opened_at: self.opened_at,
            half_open_at: self.half_open_at,
            failure_threshold: self.failure_threshold,
            success_threshold: self.success_threshold,
            reset_timeout: chrono::Duration::seconds(i64::from(self.reset_timeout_seconds)),
        }
    }
}

/// Locks the runbook's breaker for the rest of the transaction. `None` when the runbook does not
/// exist (every runbook has one: the `runbooks_create_breaker` trigger inserts it).
pub async fn breaker_lock(
    conn: &mut PgConnection,
    runbook_id: Uuid,
) -> StoreResult<Option<BreakerRow>> {
    breaker_one(
        conn,
        select_breaker!("WHERE b.runbook_id = $1 FOR UPDATE OF b"),
        runbook_id,
    )
    .await
}

/// The runbook's breaker as committed and as of now (an open breaker whose reset timeout has
/// passed reads half_open), without locking; `None` when the runbook does not exist.
pub async fn breaker_get(
    conn: &mut PgConnection,
    runbook_id: Uuid,
) -> StoreResult<Option<BreakerRow>> {
    breaker_one(
        conn,
        select_breaker_as_of_now!("WHERE b.runbook_id = $1"),
        runbook_id,
    )
    .await
}

async fn breaker_one(
    conn: &mut PgConnection,
    sql: &'static str,
    runbook_id: Uuid,
) -> StoreResult<Option<BreakerRow>> {
    Ok(sqlx::query_as::<_, BreakerRow>(sql)
        .bind(runbook_id)
        .fetch_optional(conn)
        .await?)
}

/// The breaker's committed state and consecutive failures, without locking; `None` when the
/// breaker does not exist yet.
pub async fn breaker_peek(
    conn: &mut PgConnection,
    runbook_id: Uuid,
) -> StoreResult<Option<(String, i32)>> {
    Ok(sqlx::query_as(
        "SELECT state::text, failure_count FROM circuit_breakers WHERE runbook_id = $1",
    )
    .bind(runbook_id)
    .fetch_optional(conn)
    .await?)
}

/// Writes the breaker's state and counters back.
pub async fn breaker_save(
    conn: &mut PgConnection,
    runbook_id: Uuid,
    b: &Breaker,
) -> StoreResult<()> {
    sqlx::query(
        "UPDATE circuit_breakers SET state = $2::circuit_state, failure_count = $3, \
           success_count = $4, last_failure_at = $5, opened_at = $6, half_open_at = $7 \
         WHERE runbook_id = $1",
    )
    .bind(runbook_id)
    .bind(b.state.as_str())
    .bind(b.failure_count)
    .bind(b.success_count)
    .bind(b.last_failure_at)
    .bind(b.opened_at)
    .bind(b.half_open_at)
    .execute(conn)
    .await?;
    Ok(())
}

/// Changes the thresholds; whether any of them changed (a change to the same values leaves the
/// row, and its `updated_at`, as it is).
pub async fn breaker_configure(
    conn: &mut PgConnection,
    runbook_id: Uuid,
    failure_threshold: Option<i32>,
    success_threshold: Option<i32>,
    reset_timeout_seconds: Option<i32>,
) -> StoreResult<bool> {
    let done = sqlx::query(
        "UPDATE circuit_breakers SET \
           failure_threshold = COALESCE($2, failure_threshold), \
           success_threshold = COALESCE($3, success_threshold), \
           reset_timeout_seconds = COALESCE($4, reset_timeout_seconds) \
         WHERE runbook_id = $1 \
           AND (failure_threshold, success_threshold, reset_timeout_seconds) IS DISTINCT FROM \
               (COALESCE($2, failure_threshold), COALESCE($3, success_threshold), \
                COALESCE($4, reset_timeout_seconds))",
    )
    .bind(runbook_id)
    .bind(failure_threshold)
    .bind(success_threshold)
    .bind(reset_timeout_seconds)
    .execute(conn)
    .await?;
    Ok(done.rows_affected() > 0)
}

/// Lists breakers (every runbook that has one), optionally by state.
pub async fn breaker_list(
    conn: &mut PgConnection,
    state: Option<&str>,
    limit: i64,
    offset: i64,
) -> StoreResult<(Vec<BreakerRow>, i64)> {
    let rows = sqlx::query_as::<_, BreakerRow>(select_breaker_as_of_now!(
        "WHERE ($1::text IS NULL OR $1 = ",
        state_as_of_now!(),
        ") ORDER BY r.name LIMIT $2 OFFSET $3"
    ))
    .bind(state)
    .bind(limit)
    .bind(offset)
    .fetch_all(&mut *conn)
    .await?;
    let total = sqlx::query_scalar(concat!(
        "SELECT count(*) FROM circuit_breakers b WHERE ($1::text IS NULL OR $1 = ",
        state_as_of_now!(),
        ")"
    ))
    .bind(state)
    .fetch_one(conn)
    .await?;
    Ok((rows, total))
}
