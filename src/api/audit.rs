//! The audit log, read-only (admin).

use chrono::{DateTime, Utc};
use poem::Request;
use poem_openapi::{Object, OpenApi, param::Query, payload::Json};
use uuid::Uuid;

use crate::domain::Role;
use crate::store::{self, audit::AuditFilter};

use super::Tag;
use super::context::{AppState, BearerAuth};
use super::error::ApiError;
use super::pagination::Page;

/// One audit entry.
#[derive(Debug, Object)]
pub struct AuditEntry {
    /// Id.
    pub id: Uuid,
    /// Acting user (absent for anonymous actions such as failed logins).
    #[oai(skip_serializing_if_is_none)]
    pub user_id: Option<Uuid>,
    /// The acting user's name when the entry was written. Kept when the user is deleted (then
    /// `user_id` is absent).
    #[oai(skip_serializing_if_is_none)]
    pub username: Option<String>,
    /// Action (`user_create`, `login`, ...).
    pub action: String,
    /// Resource type.
    #[oai(skip_serializing_if_is_none)]
    pub resource_type: Option<String>,
    /// Resource id.
    #[oai(skip_serializing_if_is_none)]
    pub resource_id: Option<Uuid>,
    /// Context (never secrets).
    #[oai(skip_serializing_if_is_none)]
    pub details: Option<serde_json::Value>,
    /// Client address.
    #[oai(skip_serializing_if_is_none)]
    pub ip_address: Option<String>,
    /// When.
    pub created_at: DateTime<Utc>,
}

/// A page of audit entries, newest first.
#[derive(Debug, Object)]
pub struct AuditPage {
    /// Entries.
    pub items: Vec<AuditEntry>,
    /// Entries matching the filters.
    pub total: i64,
    /// Page size used.
    pub limit: i64,
    /// Offset used.
    pub offset: i64,
}

/// Audit log endpoints.
pub struct AuditApi {
    /// Shared state.
    pub state: AppState,
}

#[OpenApi(tag = "Tag::Audit")]
impl AuditApi {
    /// List audit entries, newest first, with optional filters.
    ///
    /// Least role: admin.
    #[allow(clippy::too_many_arguments)]
    #[oai(path = "/audit-log", method = "get", operation_id = "audit_list")]
    async fn audit_list(
        &self,
        req: &Request,
        auth: BearerAuth,
        /// Only entries by this user.
        user_id: Query<Option<Uuid>>,
        /// Only entries by the user of this name (any case), also after the user was deleted.
        #[oai(validator(max_length = 100))]
        username: Query<Option<String>>,
        /// Only this action.
        action: Query<Option<String>>,
        /// Only this resource type.
        resource_type: Query<Option<String>>,
        /// Only this resource.
        resource_id: Query<Option<Uuid>>,
        /// Entries at or after this time.
        since: Query<Option<DateTime<Utc>>>,
        /// Entries before this time.
        until: Query<Option<DateTime<Utc>>>,
        /// Page size, 1 to 500 (default 50).
        #[oai(validator(minimum(value = "1"), maximum(value = "500")))]
        limit: Query<Option<i64>>,
        /// Rows to skip (default 0).
        #[oai(validator(minimum(value = "0")))]
        offset: Query<Option<i64>>,
    ) -> Result<Json<AuditPage>, ApiError> {
        self.state.authorize(req, &auth, Role::Admin).await?;
        let page = Page::parse(limit.0, offset.0)?;
        let filter = AuditFilter {
            user_id: user_id.0,
            username: username.0,
            action: action.0,
            resource_type: resource_type.0,
            resource_id: resource_id.0,
            since: since.0,
            until: until.0,
        };
        let mut conn = store::read_snapshot(&self.state.pool).await?;
        let (rows, total) =
            store::audit::audit_list(&mut conn, &filter, page.limit, page.offset).await?;
        Ok(Json(AuditPage {
            items: rows
                .into_iter()
                .map(|r| AuditEntry {
                    id: r.id,
                    user_id: r.user_id,
                    username: r.username,
                    action: r.action,
                    resource_type: r.resource_type,
                    resource_id: r.resource_id,
                    details: r.details_json,
                    ip_address: r.ip_address,
                    created_at: r.created_at,
                })
                .collect(),
            total,
            limit: page.limit,
            offset: page.offset,
        }))
    }
}
