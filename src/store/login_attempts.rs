//! `login_attempts`: the record that login throttling counts.

use std::time::Duration;

use sqlx::PgConnection;

use super::StoreResult;

/// Records one login attempt; returns its id.
pub async fn login_attempt_record(
    conn: &mut PgConnection,
    username: &str,
    ip_address: Option<&str>,
    succeeded: bool,
) -> StoreResult<i64> {
    let id = sqlx::query_scalar(
        "INSERT INTO login_attempts (username, ip_address, succeeded) VALUES ($1, $2, $3) \
         RETURNING id",
    )
    .bind(username)
    .bind(ip_address)
    .bind(succeeded)
    .fetch_one(conn)
    .await?;
    Ok(id)
}

/// Records an attempt whose password is about to be checked; [`login_attempt_finish`] ends it.
pub async fn login_attempt_begin(
    conn: &mut PgConnection,
    username: &str,
    ip_address: Option<&str>,
) -> StoreResult<i64> {
    let id = sqlx::query_scalar(
        "INSERT INTO login_attempts (username, ip_address, succeeded, pending) \
         VALUES ($1, $2, false, true) RETURNING id",
    )
    .bind(username)
    .bind(ip_address)
    .fetch_one(conn)
    .await?;
    Ok(id)
}

/// Ends a pending attempt with the verdict of its password check.
pub async fn login_attempt_finish(
    conn: &mut PgConnection,
    id: i64,
    succeeded: bool,
) -> StoreResult<()> {
    sqlx::query("UPDATE login_attempts SET pending = false, succeeded = $2 WHERE id = $1")
        .bind(id)
        .bind(succeeded)
        .execute(conn)
        .await?;
    Ok(())
}

/// Serializes the attempts on one username and on one address until the transaction ends, so
/// that counting the recent failures and recording a new attempt happen as one step (the
/// username's lock first, then the address's: one order, no deadlock).
pub async fn login_attempt_lock(
    conn: &mut PgConnection,
    username: &str,
    ip_address: Option<&str>,
) -> StoreResult<()> {
    sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended('login username ' || $1, 0))")
        .bind(username)
        .execute(&mut *conn)
        .await?;
    if let Some(ip) = ip_address {
        sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended('login address ' || $1, 0))")
            .bind(ip)
            .execute(&mut *conn)
            .await?;
    }
    Ok(())
}

/// Recent attempts on a username and from an address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecentAttempts {
    /// Failures for the username within the window, after its last success.
    pub user_failures: i64,
    /// Attempts on the username whose password is being checked now.
    pub user_pending: i64,
    /// Failures from the address within the window.
    pub ip_failures: i64,
    /// Attempts from the address whose password is being checked now.
    pub ip_pending: i64,
}

/// How long a pending attempt counts as in progress: a process that died while checking a
/// password leaves its attempt pending, and it stops counting after this.
const PENDING_COUNTS_SECS: f64 = 60.0;

/// A statement on the recent unsuccessful attempts (`$1` username, `$2` address, `$3` window in
/// seconds): `u`, those on the username after its last success, and `i`, those from the address,
/// each with `pending` and `created_at`; `$rest` selects, or continues the `WITH` list after a comma.
macro_rules! recent_attempts_sql {
    ($rest:literal) => {
        concat!(
            "WITH u AS ( \
               SELECT a.pending, a.created_at FROM login_attempts a \
                WHERE a.username = $1 AND NOT a.succeeded \
                  AND a.created_at > now() - make_interval(secs => $3) \
                  AND a.created_at > COALESCE((SELECT max(s.created_at) FROM login_attempts s \
                      WHERE s.username = $1 AND s.succeeded), '-infinity')), \
             i AS ( \
               SELECT a.pending, a.created_at FROM login_attempts a \
                WHERE $2::text IS NOT NULL AND a.ip_address = $2 AND NOT a.succeeded \
                  AND a.created_at > now() - make_interval(secs => $3)) ",
            $rest
        )
    };
}

/// How long until a username or address locked out by its limit of failures within `window` may
/// try again, once the failure about to be recorded counts too. With n failures counted and the
/// limit l, that is when the (n - l + 2)-th oldest is older than the window (the failure about
/// to be recorded when there is none); the longer of the two lockouts.
pub async fn login_lockout_remaining(
    conn: &mut PgConnection,
    username: &str,
    ip_address: Option<&str>,
    window: Duration,
    (user_limit, ip_limit): (i64, i64),
) -> StoreResult<Duration> {
    let seconds: Option<f64> = sqlx::query_scalar(recent_attempts_sql!(
        ", uf AS (SELECT created_at FROM u WHERE NOT pending), \
             if_ AS (SELECT created_at FROM i WHERE NOT pending), \
             nu AS (SELECT count(*) AS n FROM uf), ni AS (SELECT count(*) AS n FROM if_), \
             ends AS ( \
               SELECT CASE WHEN nu.n >= $4 THEN COALESCE((SELECT created_at FROM uf \
                        ORDER BY created_at OFFSET nu.n + 1 - $4 LIMIT 1), now()) END AS e \
                 FROM nu \
               UNION ALL \
               SELECT CASE WHEN ni.n >= $5 THEN COALESCE((SELECT created_at FROM if_ \
                        ORDER BY created_at OFFSET ni.n + 1 - $5 LIMIT 1), now()) END FROM ni) \
             SELECT EXTRACT(EPOCH FROM max(e) + make_interval(secs => $3) - now())::float8 \
             FROM ends"
    ))
    .bind(username)
    .bind(ip_address)
    .bind(window.as_secs_f64())
    .bind(user_limit)
    .bind(ip_limit)
    .fetch_one(conn)
    .await?;
    // No counted failure left to age out (the newest is the one recorded now): a whole window.
    Ok(seconds
        .filter(|s| *s > 0.0)
        .map_or(window, Duration::from_secs_f64))
}

/// Failed and pending attempts for a username and for an address within the window. A success
/// for the username resets its count (failures before the last success are not counted).
pub async fn login_failures_recent(
    conn: &mut PgConnection,
    username: &str,
    ip_address: Option<&str>,
    window: Duration,
) -> StoreResult<RecentAttempts> {
    let seconds = window.as_secs_f64();
    let row: (i64, i64, i64, i64) = sqlx::query_as(recent_attempts_sql!(
        "SELECT (SELECT count(*) FROM u WHERE NOT pending), \
                (SELECT count(*) FROM u WHERE pending \
                    AND created_at > now() - make_interval(secs => $4)), \
                (SELECT count(*) FROM i WHERE NOT pending), \
                (SELECT count(*) FROM i WHERE pending \
                    AND created_at > now() - make_interval(secs => $4))"
    ))
    .bind(username)
    .bind(ip_address)
    .bind(seconds)
    .bind(PENDING_COUNTS_SECS)
    .fetch_one(conn)
    .await?;
    Ok(RecentAttempts {
        user_failures: row.0,
        user_pending: row.1,
        ip_failures: row.2,
        ip_pending: row.3,
    })
}

/// Deletes attempts older than the given age; returns how many were removed.
pub async fn login_attempt_prune(
    conn: &mut PgConnection,
    older_than: Duration,
) -> StoreResult<u64> {
    let done = sqlx::query(
        "DELETE FROM login_attempts WHERE created_at < now() - make_interval(secs => $1)",
    )
    .bind(older_than.as_secs_f64())
    .execute(conn)
    .await?;
    Ok(done.rows_affected())
}
