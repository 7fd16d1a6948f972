//! `auth_tokens`: login (session) tokens and long-lived API tokens, stored as SHA-256 hashes.

use chrono::{DateTime, Utc};
use sqlx::PgConnection;
use uuid::Uuid;

use super::StoreResult;

/// A token row, without its hash.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct TokenRow {
    /// Primary key.
    pub id: Uuid,
    /// Owner.
    pub user_id: Uuid,
    /// `session` (from login) or `api`.
    pub kind: String,
    /// Label for API tokens.
    pub name: Option<String>,
    /// Creation time.
    pub created_at: DateTime<Utc>,
    /// Expiry; `None` for API tokens without one.
    pub expires_at: Option<DateTime<Utc>>,
    /// Last time it authenticated a request.
    pub last_used_at: Option<DateTime<Utc>>,
    /// Revocation time.
    pub revoked_at: Option<DateTime<Utc>>,
    /// The API token it was created with, if any (revoking that one revokes this one).
    pub created_with: Option<Uuid>,
}

/// Fields of a new token.
pub struct NewTokenRow<'a> {
    /// Owner.
    pub user_id: Uuid,
    /// `session` or `api`.
    pub kind: &'a str,
    /// Label.
    pub name: Option<&'a str>,
    /// SHA-256 of the secret.
    pub token_hash: &'a [u8],
    /// Expiry.
    pub expires_at: Option<DateTime<Utc>>,
    /// The API token that created it (`None` for a login session's).
    pub created_with: Option<Uuid>,
}

/// The columns of [`TokenRow`], as a literal for `concat!`.
macro_rules! token_columns {
    () => {
        "id, user_id, kind, name, created_at, expires_at, last_used_at, revoked_at, created_with"
    };
}

/// Inserts a token.
pub async fn token_insert(conn: &mut PgConnection, new: &NewTokenRow<'_>) -> StoreResult<TokenRow> {
    Ok(sqlx::query_as::<_, TokenRow>(concat!(
        "INSERT INTO auth_tokens (user_id, kind, name, token_hash, expires_at, created_with) \
         VALUES ($1, $2, $3, $4, $5, $6) RETURNING ",
        token_columns!()
    ))
    .bind(new.user_id)
    .bind(new.kind)
    .bind(new.name)
    .bind(new.token_hash)
    .bind(new.expires_at)
    .bind(new.created_with)
    .fetch_one(conn)
    .await?)
}

/// The identity behind a valid token.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct TokenIdentity {
    /// The token's id.
    pub token_id: Uuid,
    /// The user's id.
    pub user_id: Uuid,
    /// The user's name.
    pub username: String,
    /// The user's role.
    pub role: String,
}

/// Resolves a token hash to its user when the token is unrevoked, unexpired and its user active,
/// and records its use. One statement, so a revocation is seen by the very next request.
pub async fn token_lookup(
    conn: &mut PgConnection,
    token_hash: &[u8],
) -> StoreResult<Option<TokenIdentity>> {
    Ok(sqlx::query_as::<_, TokenIdentity>(
        "UPDATE auth_tokens t SET last_used_at = now() \
         FROM users u \
         WHERE t.token_hash = $1 AND u.id = t.user_id \
           AND t.revoked_at IS NULL AND (t.expires_at IS NULL OR t.expires_at > now()) \
           AND u.is_active \
         RETURNING t.id AS token_id, u.id AS user_id, u.username, u.role",
    )
    .bind(token_hash)
    .fetch_optional(conn)
    .await?)
}

/// A live token's kind (`session` or `api`) and expiry; `None` once it is revoked or expired.
pub async fn token_live_kind_and_expiry(
    conn: &mut PgConnection,
    id: Uuid,
) -> StoreResult<Option<(String, Option<DateTime<Utc>>)>> {
    Ok(sqlx::query_as(
        "SELECT kind, expires_at FROM auth_tokens WHERE id = $1 AND revoked_at IS NULL \
           AND (expires_at IS NULL OR expires_at > now())",
    )
    .bind(id)
    .fetch_optional(conn)
    .await?)
}

/// Revokes one token of a user and every live token created with it, or with those, and so
/// on. `None` when the named token was not live; otherwise how many tokens created from it
/// were revoked with it. The user's row is locked first: a token being created from one of
/// the user's tokens (which share-locks that row) is committed before the line is read, and
/// one created later sees its maker revoked.
pub async fn token_revoke(
    conn: &mut PgConnection,
    user_id: Uuid,
    id: Uuid,
) -> StoreResult<Option<i64>> {
    sqlx::query("SELECT 1 FROM users WHERE id = $1 FOR NO KEY UPDATE")
        .bind(user_id)
        .execute(&mut *conn)
        .await?;
    let (named, descendants): (i64, i64) = sqlx::query_as(
        "WITH RECURSIVE lineage AS ( \
             SELECT id FROM auth_tokens WHERE id = $1 AND user_id = $2 AND revoked_at IS NULL \
             UNION \
             SELECT t.id FROM auth_tokens t JOIN lineage l ON t.created_with = l.id \
              WHERE t.revoked_at IS NULL \
         ), revoked AS ( \
             UPDATE auth_tokens t SET revoked_at = now() FROM lineage l WHERE t.id = l.id \
             RETURNING t.id \
         ) \
         SELECT count(*) FILTER (WHERE id = $1), count(*) FILTER (WHERE id <> $1) FROM revoked",
    )
    .bind(id)
    .bind(user_id)
    .fetch_one(conn)
    .await?;
    Ok((named == 1).then_some(descendants))
}

/// Revokes every live token of a user (deactivation, password change).
pub async fn token_revoke_all(conn: &mut PgConnection, user_id: Uuid) -> StoreResult<u64> {
    let done = sqlx::query(
        "UPDATE auth_tokens SET revoked_at = now() WHERE user_id = $1 AND revoked_at IS NULL",
    )
    .bind(user_id)
    .execute(conn)
    .await?;
    Ok(done.rows_affected())
}

/// Lists a user's API tokens, newest first.
pub async fn token_list_api(conn: &mut PgConnection, user_id: Uuid) -> StoreResult<Vec<TokenRow>> {
    Ok(sqlx::query_as::<_, TokenRow>(concat!(
        "SELECT ",
        token_columns!(),
        " FROM auth_tokens WHERE user_id = $1 AND kind = 'api' ORDER BY created_at DESC, id"
    ))
    .bind(user_id)
    .fetch_all(conn)
    .await?)
}
