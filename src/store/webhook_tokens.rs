//! `webhook_tokens`: the credentials Alertmanager presents to the webhook (bearer token or basic
//! auth password). Only SHA-256 hashes are stored; the secret is shown once at creation.

use chrono::{DateTime, Utc};
use sqlx::PgConnection;
use uuid::Uuid;

use super::StoreResult;

/// A row of `webhook_tokens` (without the hash).
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct WebhookTokenRow {
    /// Id.
    pub id: Uuid,
    /// Name.
    pub name: String,
    /// Creator.
    pub created_by: Option<Uuid>,
    /// Creation.
    pub created_at: DateTime<Utc>,
    /// Last accepted request (updated at most once a minute).
    pub last_used_at: Option<DateTime<Utc>>,
    /// Revocation.
    pub revoked_at: Option<DateTime<Utc>>,
}

const COLUMNS: &str = "id, name, created_by, created_at, last_used_at, revoked_at";

/// Stores a new token's hash.
pub async fn webhook_token_create(
    conn: &mut PgConnection,
    name: &str,
    hash: &[u8],
    created_by: Option<Uuid>,
) -> StoreResult<WebhookTokenRow> {
    Ok(
        sqlx::query_as::<_, WebhookTokenRow>(sqlx::AssertSqlSafe(format!(
            "INSERT INTO webhook_tokens (name, token_hash, created_by) VALUES ($1, $2, $3) \
         RETURNING {COLUMNS}"
        )))
        .bind(name)
        .bind(hash)
        .bind(created_by)
        .fetch_one(conn)
        .await?,
    )
}

/// Every token, newest first.
pub async fn webhook_token_list(conn: &mut PgConnection) -> StoreResult<Vec<WebhookTokenRow>> {
    Ok(
        sqlx::query_as::<_, WebhookTokenRow>(sqlx::AssertSqlSafe(format!(
            "SELECT {COLUMNS} FROM webhook_tokens ORDER BY created_at DESC, id"
        )))
        .fetch_all(conn)
        .await?,
    )
}

/// Revokes a token; false when it does not exist or is already revoked.
pub async fn webhook_token_revoke(conn: &mut PgConnection, id: Uuid) -> StoreResult<bool> {
    let done = sqlx::query(
        "UPDATE webhook_tokens SET revoked_at = now() WHERE id = $1 AND revoked_at IS NULL",
    )
    .bind(id)
    .execute(conn)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// The live token with this hash, if any. Records the use at most once a minute, so a busy
/// webhook does not serialise on the token row.
pub async fn webhook_token_authenticate(
    conn: &mut PgConnection,
    hash: &[u8],
) -> StoreResult<Option<Uuid>> {
    let id: Option<(Uuid, bool)> = sqlx::query_as(
        "SELECT id, last_used_at IS NULL OR last_used_at < now() - interval '1 minute' \
         FROM webhook_tokens WHERE token_hash = $1 AND revoked_at IS NULL",
    )
    .bind(hash)
    .fetch_optional(&mut *conn)
    .await?;
    let Some((id, stale)) = id else {
        return Ok(None);
    };
    if stale {
        // SKIP LOCKED: another request recording the same use is as good as this one.
        sqlx::query(
            "UPDATE webhook_tokens SET last_used_at = now() WHERE id = (SELECT id FROM \
             webhook_tokens WHERE id = $1 FOR UPDATE SKIP LOCKED)",
        )
        .bind(id)
        .execute(conn)
        .await?;
    }
    Ok(Some(id))
}
