//! `users`: accounts, roles and login bookkeeping.

use chrono::{DateTime, Utc};
use sqlx::PgConnection;
use uuid::Uuid;

use super::StoreResult;

/// A row of `users`. `password_hash` never leaves the crate through the API.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct UserRow {
    /// Primary key.
    pub id: Uuid,
    /// Unique login name.
    pub username: String,
    /// Unique email address.
    pub email: String,
    /// Display name.
    pub full_name: Option<String>,
    /// argon2id PHC string.
    pub password_hash: String,
    /// admin, engineer, operator or viewer.
    pub role: String,
    /// Preferred LLM provider.
    pub default_llm_provider_id: Option<Uuid>,
    /// Inactive users cannot log in and their tokens stop working.
    pub is_active: bool,
    /// Creation time.
    pub created_at: DateTime<Utc>,
    /// Last successful login.
    pub last_login: Option<DateTime<Utc>>,
}

/// Fields of a new user.
#[derive(Debug, Clone)]
pub struct NewUser<'a> {
    /// Unique login name.
    pub username: &'a str,
    /// Unique email address.
    pub email: &'a str,
    /// Display name.
    pub full_name: Option<&'a str>,
    /// argon2id PHC string.
    pub password_hash: &'a str,
    /// Role name.
    pub role: &'a str,
    /// Whether the account may log in.
    pub is_active: bool,
}

/// Inserts a user.
pub async fn user_create(conn: &mut PgConnection, new: &NewUser<'_>) -> StoreResult<UserRow> {
    let row = sqlx::query_as::<_, UserRow>(
        "INSERT INTO users (username, email, full_name, password_hash, role, is_active) \
         VALUES ($1, $2, $3, $4, $5, $6) \
         RETURNING id, username, email, full_name, password_hash, role, \
         default_llm_provider_id, is_active, created_at, last_login",
    )
    .bind(new.username)
    .bind(new.email)
    .bind(new.full_name)
    .bind(new.password_hash)
    .bind(new.role)
    .bind(new.is_active)
    .fetch_one(conn)
    .await?;
    Ok(row)
}

/// Fetches a user by id.
pub async fn user_get(conn: &mut PgConnection, id: Uuid) -> StoreResult<Option<UserRow>> {
    Ok(sqlx::query_as::<_, UserRow>(
        "SELECT id, username, email, full_name, password_hash, role, \
         default_llm_provider_id, is_active, created_at, last_login FROM users WHERE id = $1",
    )
    .bind(id)
    .fetch_optional(conn)
    .await?)
}

/// Fetches a user by username.
pub async fn user_get_by_username(
    conn: &mut PgConnection,
    username: &str,
) -> StoreResult<Option<UserRow>> {
    Ok(sqlx::query_as::<_, UserRow>(
        "SELECT id, username, email, full_name, password_hash, role, \
         default_llm_provider_id, is_active, created_at, last_login FROM users \
         WHERE username = $1",
    )
    .bind(username)
    .fetch_optional(conn)
    .await?)
}

/// A user's password hash and whether the account is active, read under a row lock held
/// until the transaction ends: a concurrent password change, deactivation or deletion waits
/// for it, and one that committed first is what this reads. `None` when the user is gone.
/// `for_update` takes the lock a later update of the row in the same transaction needs (a
/// login writes `last_login`): two transactions that share-locked the row and then both
/// updated it would deadlock.
pub async fn user_lock_credentials(
    conn: &mut PgConnection,
    id: Uuid,
    for_update: bool,
) -> StoreResult<Option<(String, bool)>> {
    let sql = if for_update {
        "SELECT password_hash, is_active FROM users WHERE id = $1 FOR NO KEY UPDATE"
    } else {
        "SELECT password_hash, is_active FROM users WHERE id = $1 FOR SHARE"
    };
    Ok(sqlx::query_as(sql).bind(id).fetch_optional(conn).await?)
}

/// Lists users ordered by username, with keyset-free offset pagination (the table is small).
pub async fn user_list(
    conn: &mut PgConnection,
    limit: i64,
    offset: i64,
) -> StoreResult<(Vec<UserRow>, i64)> {
    let rows = sqlx::query_as::<_, UserRow>(
        "SELECT id, username, email, full_name, password_hash, role, \
         default_llm_provider_id, is_active, created_at, last_login FROM users \
         ORDER BY username LIMIT $1 OFFSET $2",
    )
    .bind(limit)
    .bind(offset)
    .fetch_all(&mut *conn)
    .await?;
    let total: i64 = sqlx::query_scalar("SELECT count(*) FROM users")
        .fetch_one(conn)
        .await?;
    Ok((rows, total))
}

/// Counts users; zero means the first admin has not been created yet.
pub async fn user_count(conn: &mut PgConnection) -> StoreResult<i64> {
    Ok(sqlx::query_scalar("SELECT count(*) FROM users")
        .fetch_one(conn)
        .await?)
}

/// A partial update; `None` leaves a column as it is.
#[derive(Debug, Default, Clone)]
pub struct UserChanges<'a> {
    /// New email.
    pub email: Option<&'a str>,
    /// New display name: `Some(None)` clears it.
    pub full_name: Option<Option<&'a str>>,
    /// New password hash.
    pub password_hash: Option<&'a str>,
    /// New role.
    pub role: Option<&'a str>,
    /// Activate or deactivate.
    pub is_active: Option<bool>,
}

/// Applies a partial update and returns the row, or `None` when the user does not exist.
pub async fn user_update(
    conn: &mut PgConnection,
    id: Uuid,
    changes: &UserChanges<'_>,
) -> StoreResult<Option<UserRow>> {
    Ok(sqlx::query_as::<_, UserRow>(
        "UPDATE users SET \
           email = COALESCE($2, email), \
           full_name = CASE WHEN $7 THEN $3 ELSE full_name END, \
           password_hash = COALESCE($4, password_hash), \
           role = COALESCE($5, role), \
           is_active = COALESCE($6, is_active) \
         WHERE id = $1 \
         RETURNING id, username, email, full_name, password_hash, role, \
         default_llm_provider_id, is_active, created_at, last_login",
    )
    .bind(id)
    .bind(changes.email)
    .bind(changes.full_name.flatten())
    .bind(changes.password_hash)
    .bind(changes.role)
    .bind(changes.is_active)
    .bind(changes.full_name.is_some())
    .fetch_optional(conn)
    .await?)
}

/// Deletes a user; returns whether a row was deleted.
pub async fn user_delete(conn: &mut PgConnection, id: Uuid) -> StoreResult<bool> {
    let done = sqlx::query("DELETE FROM users WHERE id = $1")
        .bind(id)
        .execute(conn)
        .await?;
    Ok(done.rows_affected() == 1)
}

/// Records a successful login.
pub async fn user_touch_login(conn: &mut PgConnection, id: Uuid) -> StoreResult<()> {
    sqlx::query("UPDATE users SET last_login = now() WHERE id = $1")
        .bind(id)
        .execute(conn)
        .await?;
    Ok(())
}

/// Counts active admins other than `except`, under a lock held until the transaction ends;
/// used to refuse removing the last admin.
pub async fn user_count_other_active_admins(
    conn: &mut PgConnection,
    except: Uuid,
) -> StoreResult<i64> {
    // Check, then act: two admins demoting each other at once must not both see the other.
    // The lock serializes every change that can take an admin away until the transaction ends.
    sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended('users: active admins', 0))")
        .execute(&mut *conn)
        .await?;
    Ok(sqlx::query_scalar(
        "SELECT count(*) FROM users WHERE role = 'admin' AND is_active AND id <> $1",
    )
    .bind(except)
    .fetch_one(conn)
    .await?)
}
