//! Login, logout, the current user, and long-lived API tokens.

use chrono::{DateTime, Utc};
use poem::Request;
use poem_openapi::{ApiResponse, Object, OpenApi, param::Path, param::Query, payload::Json};
use uuid::Uuid;

use crate::crypto::token;
use crate::domain::Role;
use crate::store::{self, tokens::NewTokenRow};

use super::Tag;
use super::context::{AppState, BearerAuth, client_ip};
use super::error::ApiError;
use super::pagination::Page;
use super::users::User;
use crate::auth::AuthError;

/// Credentials.
#[derive(Debug, Object)]
#[oai(deny_unknown_fields)]
pub struct LoginRequest {
    /// Username.
    pub username: String,
    /// Password.
    pub password: String,
}

/// A session token; send it as `Authorization: Bearer <token>`.
#[derive(Debug, Object)]
pub struct LoginResponse {
    /// The bearer token. Shown only here.
    pub token: String,
    /// Always `Bearer`.
    pub token_type: String,
    /// When the token stops working.
    pub expires_at: DateTime<Utc>,
    /// The logged-in user.
    pub user: User,
}

/// A request for a long-lived API token.
#[derive(Debug, Object)]
#[oai(deny_unknown_fields)]
pub struct ApiTokenCreate {
    /// A label saying what the token is for (1 to 100 characters).
    #[oai(validator(min_length = 1, max_length = 100))]
    pub name: String,
    /// Lifetime in days; absent means it never expires.
    #[oai(validator(minimum(value = "1"), maximum(value = "3650")))]
    #[oai(nullable)]
    pub expires_in_days: Option<u32>,
}

/// An API token's metadata (never its secret).
#[derive(Debug, Object)]
pub struct ApiToken {
    /// Id.
    pub id: Uuid,
    /// Label.
    pub name: String,
    /// Creation time.
    pub created_at: DateTime<Utc>,
    /// Expiry.
    #[oai(skip_serializing_if_is_none)]
    pub expires_at: Option<DateTime<Utc>>,
    /// Last time it authenticated a request.
    #[oai(skip_serializing_if_is_none)]
    pub last_used_at: Option<DateTime<Utc>>,
    /// Revocation time.
    #[oai(skip_serializing_if_is_none)]
    pub revoked_at: Option<DateTime<Utc>>,
    /// The API token this one was created with: revoking that one revokes this one too.
    #[oai(skip_serializing_if_is_none)]
    pub created_with: Option<Uuid>,
}

/// A newly created API token, with its secret shown once.
#[derive(Debug, Object)]
pub struct ApiTokenCreated {
    /// The bearer secret. Store it now: it cannot be shown again.
    pub token: String,
    /// The token's metadata.
    pub info: ApiToken,
}

impl From<store::tokens::TokenRow> for ApiToken {
    fn from(row: store::tokens::TokenRow) -> ApiToken {
        ApiToken {
            id: row.id,
            name: row.name.unwrap_or_default(),
            created_at: row.created_at,
            expires_at: row.expires_at,
            last_used_at: row.last_used_at,
            revoked_at: row.revoked_at,
            created_with: row.created_with,
        }
    }
}

#[derive(ApiResponse)]
enum NoContent {
    /// Done.
    #[oai(status = 204)]
    Done,
}

#[derive(ApiResponse)]
enum TokenCreated {
    /// Created.
    #[oai(status = 201)]
    Created(Json<ApiTokenCreated>),
}

/// Identity endpoints.
pub struct AuthApi {
    /// Shared state.
    pub state: AppState,
}

#[OpenApi(tag = "Tag::Auth")]
impl AuthApi {
    /// Log in with a username and password; returns a session bearer token.
    ///
    /// Failed attempts are counted per username and per client address; past the configured
    /// limit further attempts get 429 until the window passes.
    ///
    /// Least role: none (public).
    #[oai(path = "/auth/login", method = "post", operation_id = "auth_login")]
    async fn auth_login(
        &self,
        req: &Request,
        body: Json<LoginRequest>,
    ) -> Result<Json<LoginResponse>, ApiError> {
        let ip = client_ip(req, self.state.config.trust_forwarded_for);
        if body.0.username.len() > 50 || body.0.password.len() > 1024 {
            return Err(crate::auth::AuthError::InvalidCredentials.into());
        }
        let grant = crate::auth::login(
            &self.state.pool,
            &self.state.auth_settings(),
            &body.0.username,
            &body.0.password,
            ip.as_deref(),
        )
        .await?;
        let mut conn = self.state.pool.acquire().await?;
        let user = store::users::user_get(&mut conn, grant.user_id)
            .await?
            .ok_or_else(|| ApiError::not_found("user", grant.user_id))?;
        Ok(Json(LoginResponse {
            token: grant.token,
            token_type: "Bearer".to_owned(),
            expires_at: grant.expires_at,
            user: user.into(),
        }))
    }

    /// Log out: revoke the token that authenticated this request.
    ///
    /// Least role: viewer.
    #[oai(path = "/auth/logout", method = "post", operation_id = "auth_logout")]
    async fn auth_logout(&self, req: &Request, auth: BearerAuth) -> Result<NoContent, ApiError> {
        let caller = self.state.authorize(req, &auth, Role::Viewer).await?;
        let mut tx = self.state.pool.begin().await?;
        store::tokens::token_revoke(&mut tx, caller.identity.user_id, caller.identity.token_id)
            .await?;
        caller
            .record(
                &mut tx,
                caller.audit(
                    "logout",
                    "token",
                    Some(caller.identity.token_id),
                    serde_json::json!({}),
                ),
            )
            .await?;
        tx.commit().await?;
        Ok(NoContent::Done)
    }

    /// The user behind the presented token.
    ///
    /// Least role: viewer.
    #[oai(path = "/auth/me", method = "get", operation_id = "current_user_get")]
    async fn current_user_get(
        &self,
        req: &Request,
        auth: BearerAuth,
    ) -> Result<Json<User>, ApiError> {
        let caller = self.state.authorize(req, &auth, Role::Viewer).await?;
        let mut conn = self.state.pool.acquire().await?;
        let user = store::users::user_get(&mut conn, caller.identity.user_id)
            .await?
            .ok_or_else(|| ApiError::not_found("user", caller.identity.user_id))?;
        Ok(Json(user.into()))
    }

    /// Create a long-lived API token for the calling user (for automation and generated clients).
    ///
    /// A token created with an API token expires with it at the latest and is revoked with it.
    ///
    /// Least role: viewer.
    #[oai(path = "/tokens", method = "post", operation_id = "token_create")]
    async fn token_create(
        &self,
        req: &Request,
        auth: BearerAuth,
        body: Json<ApiTokenCreate>,
    ) -> Result<TokenCreated, ApiError> {
        let caller = self.state.authorize(req, &auth, Role::Viewer).await?;
        let name = body.0.name.trim();
        if name.is_empty() || name.chars().count() > 100 {
            return Err(ApiError::invalid("name", "must be 1 to 100 characters"));
        }
        let expires_at = match body.0.expires_in_days {
            Some(0) => return Err(ApiError::invalid("expires_in_days", "must be > 0")),
            Some(days) if days > 3650 => {
                return Err(ApiError::invalid("expires_in_days", "must be at most 3650"));
            }
            Some(days) => Some(Utc::now() + chrono::Duration::days(i64::from(days))),
            None => None,
        };
        let mut tx = self.state.pool.begin().await?;
        // The user's row is share-locked until the new token is committed, and the calling
        // token is read again after it: a password change, deactivation or revocation that
        // committed meanwhile refuses the request, and one that comes later waits for it and
        // then revokes the new token with the others.
        match store::users::user_lock_credentials(&mut tx, caller.identity.user_id, false).await? {
            Some((_, true)) => {}
            _ => return Err(AuthError::Unauthenticated.into()),
        }
        // An API token outlives nothing that made it: one created with an expiring API token
        // expires with it at the latest, so a leaked short-lived token cannot mint a lasting
        // one. A login session creates tokens of any lifetime (that is what it is for).
        // It is also revoked with the API token that made it (and that one's maker, and so on),
        // so revoking a leaked token leaves no copy it minted.
        let (expires_at, created_with) =
            match store::tokens::token_live_kind_and_expiry(&mut tx, caller.identity.token_id)
                .await?
                .ok_or(AuthError::Unauthenticated)?
            {
                (kind, parent) if kind == "api" => (
                    match parent {
                        Some(parent) => Some(expires_at.map_or(parent, |own| own.min(parent))),
                        None => expires_at,
                    },
                    Some(caller.identity.token_id),
                ),
                _ => (expires_at, None),
            };
        let new = token::generate();
        let row = store::tokens::token_insert(
            &mut tx,
            &NewTokenRow {
                user_id: caller.identity.user_id,
                kind: "api",
                name: Some(name),
                token_hash: &new.hash,
                expires_at,
                created_with,
            },
        )
        .await?;
        caller
            .record(
                &mut tx,
                caller.audit(
                    "token_create",
                    "token",
                    Some(row.id),
                    serde_json::json!({ "name": name, "expires_at": expires_at }),
                ),
            )
            .await?;
        tx.commit().await?;
        Ok(TokenCreated::Created(Json(ApiTokenCreated {
            token: new.secret,
            info: row.into(),
        })))
    }

    /// List the calling user's API tokens (never their secrets).
    ///
    /// Least role: viewer.
    #[oai(path = "/tokens", method = "get", operation_id = "token_list")]
    async fn token_list(
        &self,
        req: &Request,
        auth: BearerAuth,
        /// Page size, 1 to 500 (default 50).
        #[oai(validator(minimum(value = "1"), maximum(value = "500")))]
        limit: Query<Option<i64>>,
        /// Rows to skip (default 0).
        #[oai(validator(minimum(value = "0")))]
        offset: Query<Option<i64>>,
    ) -> Result<Json<ApiTokenPage>, ApiError> {
        let caller = self.state.authorize(req, &auth, Role::Viewer).await?;
        let page = Page::parse(limit.0, offset.0)?;
        let mut conn = self.state.pool.acquire().await?;
        let rows = store::tokens::token_list_api(&mut conn, caller.identity.user_id).await?;
        let (items, total) = page.slice(rows);
        Ok(Json(ApiTokenPage {
            items: items.into_iter().map(ApiToken::from).collect(),
            total,
            limit: page.limit,
            offset: page.offset,
        }))
    }

    /// Revoke one of the calling user's API tokens, and every token created with it (and with
    /// those, and so on).
    ///
    /// Least role: viewer.
    #[oai(path = "/tokens/:id", method = "delete", operation_id = "token_revoke")]
    async fn token_revoke(
        &self,
        req: &Request,
        auth: BearerAuth,
        /// Token id.
        id: Path<Uuid>,
    ) -> Result<NoContent, ApiError> {
        let caller = self.state.authorize(req, &auth, Role::Viewer).await?;
        let mut tx = self.state.pool.begin().await?;
        let Some(with_it) =
            store::tokens::token_revoke(&mut tx, caller.identity.user_id, id.0).await?
        else {
            return Err(ApiError::not_found("token", id.0));
        };
        caller
            .record(
                &mut tx,
                caller.audit(
                    "token_revoke",
                    "token",
                    Some(id.0),
                    serde_json::json!({ "tokens_created_with_it_revoked": with_it }),
                ),
            )
            .await?;
        tx.commit().await?;
        Ok(NoContent::Done)
    }
}

/// A page of API tokens.
#[derive(Debug, Object)]
pub struct ApiTokenPage {
    /// API tokens.
    pub items: Vec<ApiToken>,
    /// All API tokens.
    pub total: i64,
    /// Page size used.
    pub limit: i64,
    /// Offset used.
    pub offset: i64,
}
