//! `audit_log`: who did what to which resource, from where.

use chrono::{DateTime, Utc};
use sqlx::PgConnection;
use uuid::Uuid;

use super::StoreResult;

/// A new audit entry. `details` must already be free of secrets.
#[derive(Debug, Clone)]
pub struct NewAuditEntry<'a> {
    /// Acting user; `None` for anonymous actions such as a failed login.
    pub user_id: Option<Uuid>,
    /// Action name, noun_verb (`user_create`, `login`).
    pub action: &'a str,
    /// Resource type (`user`, `token`, `system_config`).
    pub resource_type: &'a str,
    /// Resource id when it has a UUID.
    pub resource_id: Option<Uuid>,
    /// Context without secrets.
    pub details: serde_json::Value,
    /// Client address.
    pub ip_address: Option<&'a str>,
}

/// A row of `audit_log`.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct AuditRow {
    /// Primary key.
    pub id: Uuid,
    /// Acting user.
    pub user_id: Option<Uuid>,
    /// The acting user's name when the entry was written (kept after the user is deleted).
    pub username: Option<String>,
    /// Action name.
    pub action: String,
    /// Resource type.
    pub resource_type: Option<String>,
    /// Resource id.
    pub resource_id: Option<Uuid>,
    /// Details.
    pub details_json: Option<serde_json::Value>,
    /// Client address.
    pub ip_address: Option<String>,
    /// When.
    pub created_at: DateTime<Utc>,
}

/// Appends an entry; call it in the same transaction as the change it records. The actor's
/// name is written beside their id.
pub async fn audit_insert(conn: &mut PgConnection, entry: &NewAuditEntry<'_>) -> StoreResult<()> {
    sqlx::query(
        "INSERT INTO audit_log \
           (user_id, username, action, resource_type, resource_id, details_json, ip_address) \
         VALUES ($1, (SELECT username FROM users WHERE id = $1), $2, $3, $4, $5, $6)",
    )
    .bind(entry.user_id)
    .bind(entry.action)
    .bind(entry.resource_type)
    .bind(entry.resource_id)
    .bind(&entry.details)
    .bind(entry.ip_address)
    .execute(conn)
    .await?;
    Ok(())
}

/// Filters for listing the audit log; `None` means "any".
#[derive(Debug, Default, Clone)]
pub struct AuditFilter {
    /// Acting user.
    pub user_id: Option<Uuid>,
    /// Acting user's name (any case), also for entries of deleted users.
    pub username: Option<String>,
    /// Action name.
    pub action: Option<String>,
    /// Resource type.
    pub resource_type: Option<String>,
    /// Resource id.
    pub resource_id: Option<Uuid>,
    /// Inclusive lower bound on `created_at`.
    pub since: Option<DateTime<Utc>>,
    /// Exclusive upper bound on `created_at`.
    pub until: Option<DateTime<Utc>>,
}

/// The filter of [`audit_list`], as a literal for `concat!`.
macro_rules! audit_where {
    () => {
        " FROM audit_log WHERE ($1::uuid IS NULL OR user_id = $1) \
          AND ($2::text IS NULL OR action = $2) \
          AND ($3::text IS NULL OR resource_type = $3) \
          AND ($4::uuid IS NULL OR resource_id = $4) \
          AND ($5::timestamptz IS NULL OR created_at >= $5) \
          AND ($6::timestamptz IS NULL OR created_at < $6) \
          AND ($7::text IS NULL OR lower(username) = lower($7))"
    };
}

/// Binds the parameters `$1`..`$7` of [`audit_where!`] from an [`AuditFilter`].
macro_rules! bind_filter {
    ($query:expr, $filter:expr) => {
        $query
            .bind($filter.user_id)
            .bind($filter.action.as_deref())
            .bind($filter.resource_type.as_deref())
            .bind($filter.resource_id)
            .bind($filter.since)
            .bind($filter.until)
            .bind($filter.username.as_deref())
    };
}

/// Lists entries newest first, with the total matching count.
pub async fn audit_list(
    conn: &mut PgConnection,
    filter: &AuditFilter,
    limit: i64,
    offset: i64,
) -> StoreResult<(Vec<AuditRow>, i64)> {
    let rows = bind_filter!(
        sqlx::query_as::<_, AuditRow>(concat!(
            "SELECT id, user_id, username, action, resource_type, resource_id, details_json, \
             ip_address, created_at",
            audit_where!(),
            " ORDER BY created_at DESC, id LIMIT $8 OFFSET $9"
        )),
        filter
    )
    .bind(limit)
    .bind(offset)
    .fetch_all(&mut *conn)
    .await?;
    let total: i64 = bind_filter!(
        sqlx::query_scalar(concat!("SELECT count(*)", audit_where!())),
        filter
    )
    .fetch_one(conn)
    .await?;
    Ok((rows, total))
}
