//! `login_attempts`: the record that login throttling counts.

use std::time::Duration;

use sqlx::PgConnection;

use super::StoreResult;

/// Records one login attempt.
pub async fn login_attempt_record(
    conn: &mut PgConnection,
    username: &str,
    ip_address: Option<&str>,
    succeeded: bool,
) -> StoreResult<()> {
    sqlx::query("INSERT INTO login_attempts (username, ip_address, succeeded) VALUES ($1, $2, $3)")
        .bind(username)
        .bind(ip_address)
        .bind(succeeded)
        .execute(conn)
        .await?;
    Ok(())
}

/// Failed attempts for a username and for an address within the window. A success for the
/// username resets its count (failures before the last success are not counted).
pub async fn login_failures_recent(
    conn: &mut PgConnection,
    username: &str,
    ip_address: Option<&str>,
    window: Duration,
) -> StoreResult<(i64, i64)> {
    let seconds = window.as_secs_f64();
    let row: (i64, i64) = sqlx::query_as(
        "SELECT \
           (SELECT count(*) FROM login_attempts a \
             WHERE a.username = $1 AND NOT a.succeeded \
               AND a.created_at > now() - make_interval(secs => $3) \
               AND a.created_at > COALESCE((SELECT max(s.created_at) FROM login_attempts s \
                   WHERE s.username = $1 AND s.succeeded), '-infinity')), \
           (SELECT count(*) FROM login_attempts a \
             WHERE $2::text IS NOT NULL AND a.ip_address = $2 AND NOT a.succeeded \
               AND a.created_at > now() - make_interval(secs => $3))",
    )
    .bind(username)
    .bind(ip_address)
    .bind(seconds)
    .fetch_one(conn)
    .await?;
    Ok(row)
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
