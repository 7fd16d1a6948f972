//! Users: create, list, get, update and delete accounts (admin only).

use chrono::{DateTime, Utc};
use poem::Request;
use poem_openapi::types::MaybeUndefined;
use poem_openapi::{ApiResponse, Enum, Object, OpenApi, param::Path, param::Query, payload::Json};
use uuid::Uuid;

use crate::domain::Role;
use crate::store::{self, users::UserRow};

use super::Tag;
use super::context::{AppState, BearerAuth};
use super::error::ApiError;
use super::pagination::Page;
use super::patch::{Change, required_value};

/// A role name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Enum)]
#[oai(rename_all = "lowercase")]
pub enum RoleName {
    /// Everything.
    Admin,
    /// Writes runbooks, servers, rules.
    Engineer,
    /// Acts on executions.
    Operator,
    /// Reads.
    Viewer,
}

impl From<RoleName> for Role {
    fn from(r: RoleName) -> Role {
        match r {
            RoleName::Admin => Role::Admin,
            RoleName::Engineer => Role::Engineer,
            RoleName::Operator => Role::Operator,
            RoleName::Viewer => Role::Viewer,
        }
    }
}

impl From<Role> for RoleName {
    fn from(r: Role) -> RoleName {
        match r {
            Role::Admin => RoleName::Admin,
            Role::Engineer => RoleName::Engineer,
            Role::Operator => RoleName::Operator,
            Role::Viewer => RoleName::Viewer,
        }
    }
}

/// A user account as the API shows it (never with its password hash).
#[derive(Debug, Clone, Object)]
pub struct User {
    /// Id.
    pub id: Uuid,
    /// Unique login name.
    pub username: String,
    /// Unique email address.
    pub email: String,
    /// Display name.
    #[oai(skip_serializing_if_is_none)]
    pub full_name: Option<String>,
    /// Role.
    pub role: RoleName,
    /// Whether the account may log in.
    pub is_active: bool,
    /// Preferred LLM provider.
    #[oai(skip_serializing_if_is_none)]
    pub default_llm_provider_id: Option<Uuid>,
    /// Creation time.
    pub created_at: DateTime<Utc>,
    /// Last successful login.
    #[oai(skip_serializing_if_is_none)]
    pub last_login: Option<DateTime<Utc>>,
}

impl From<UserRow> for User {
    fn from(row: UserRow) -> User {
        User {
            id: row.id,
            username: row.username,
            email: row.email,
            full_name: row.full_name,
            role: row.role.parse::<Role>().unwrap_or(Role::Viewer).into(),
            is_active: row.is_active,
            default_llm_provider_id: row.default_llm_provider_id,
            created_at: row.created_at,
            last_login: row.last_login,
        }
    }
}

/// Fields of a new user.
#[derive(Debug, Object)]
#[oai(deny_unknown_fields)]
pub struct UserCreate {
    /// 1 to 50 characters: letters, digits, `.`, `_`, `-`.
    #[oai(validator(min_length = 1, max_length = 50))]
    pub username: String,
    /// Email address (must contain `@`, at most 255 characters).
    #[oai(validator(max_length = 255))]
    pub email: String,
    /// Display name, at most 100 characters.
    #[oai(validator(max_length = 100))]
    #[oai(nullable)]
    pub full_name: Option<String>,
    /// At least 12 characters.
    #[oai(validator(min_length = 12))]
    pub password: String,
    /// Role.
    pub role: RoleName,
    /// Defaults to true.
    #[oai(nullable)]
    pub is_active: Option<bool>,
}

/// A partial update: a field left out keeps its value; `null` clears `full_name` and is refused
/// for the others.
#[derive(Debug, Object)]
#[oai(deny_unknown_fields)]
pub struct UserUpdate {
    /// New email.
    #[oai(validator(max_length = 255))]
    pub email: MaybeUndefined<String>,
    /// New display name; `null` clears it.
    #[oai(validator(max_length = 100), nullable)]
    pub full_name: MaybeUndefined<String>,
    /// New password (revokes the user's tokens).
    #[oai(validator(min_length = 12))]
    pub password: MaybeUndefined<String>,
    /// New role.
    pub role: MaybeUndefined<RoleName>,
    /// Activate or deactivate (deactivation revokes the user's tokens).
    pub is_active: MaybeUndefined<bool>,
}

/// A page of users.
#[derive(Debug, Object)]
pub struct UserPage {
    /// The users on this page.
    pub items: Vec<User>,
    /// All users.
    pub total: i64,
    /// Page size used.
    pub limit: i64,
    /// Offset used.
    pub offset: i64,
}

#[derive(ApiResponse)]
enum UserCreated {
    /// Created.
    #[oai(status = 201)]
    Created(Json<User>),
}

#[derive(ApiResponse)]
enum Deleted {
    /// Deleted.
    #[oai(status = 204)]
    NoContent,
}

/// Password rule shared by create, update and the CLI.
pub fn validate_password(field: &str, password: &str) -> Result<(), ApiError> {
    if password.chars().count() < 12 {
        return Err(ApiError::invalid(field, "must be at least 12 characters"));
    }
    if password.len() > 1024 {
        return Err(ApiError::invalid(field, "must be at most 1024 bytes"));
    }
    if password.trim().is_empty() {
        return Err(ApiError::invalid(field, "must not be only spaces"));
    }
    Ok(())
}

/// Username rule shared by create and the CLI.
pub fn validate_username(username: &str) -> Result<(), ApiError> {
    if username.is_empty() || username.chars().count() > 50 {
        return Err(ApiError::invalid("username", "must be 1 to 50 characters"));
    }
    if !username
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
    {
        return Err(ApiError::invalid(
            "username",
            "may contain only letters, digits, '.', '_' and '-'",
        ));
    }
    if !username.chars().any(|c| c.is_ascii_alphanumeric()) {
        return Err(ApiError::invalid(
            "username",
            "must contain a letter or a digit",
        ));
    }
    Ok(())
}

/// Email rule shared by create, update and the CLI.
pub fn validate_email(email: &str) -> Result<(), ApiError> {
    let well_formed = email.rsplit_once('@').is_some_and(|(local, domain)| {
        !local.is_empty()
            && !domain.is_empty()
            && !domain.starts_with('.')
            && !domain.ends_with('.')
    }) && !email.chars().any(|c| c.is_whitespace() || c.is_control());
    if email.len() > 255 || !well_formed {
        return Err(ApiError::invalid(
            "email",
            "must be an email address of at most 255 characters",
        ));
    }
    Ok(())
}

pub fn validate_full_name(name: Option<&str>) -> Result<(), ApiError> {
    if name.is_some_and(|n| n.chars().count() > 100) {
        return Err(ApiError::invalid(
            "full_name",
            "must be at most 100 characters",
        ));
    }
    if name.is_some_and(|n| n.trim().is_empty()) {
        return Err(ApiError::invalid(
            "full_name",
            "must not be blank (leave it out, or null, for none)",
        ));
    }
    Ok(())
}

/// User management.
pub struct UsersApi {
    /// Shared state.
    pub state: AppState,
}

#[OpenApi(prefix_path = "/users", tag = "Tag::Users")]
impl UsersApi {
    /// List users.
    ///
    /// Least role: admin.
    #[oai(path = "/", method = "get", operation_id = "user_list")]
    async fn user_list(
        &self,
        req: &Request,
        auth: BearerAuth,
        /// Page size, 1 to 500 (default 50).
        #[oai(validator(minimum(value = "1"), maximum(value = "500")))]
        limit: Query<Option<i64>>,
        /// Rows to skip (default 0).
        #[oai(validator(minimum(value = "0")))]
        offset: Query<Option<i64>>,
    ) -> Result<Json<UserPage>, ApiError> {
        self.state.authorize(req, &auth, Role::Admin).await?;
        let page = Page::parse(limit.0, offset.0)?;
        let mut conn = store::read_snapshot(&self.state.pool).await?;
        let (rows, total) = store::users::user_list(&mut conn, page.limit, page.offset).await?;
        Ok(Json(UserPage {
            items: rows.into_iter().map(User::from).collect(),
            total,
            limit: page.limit,
            offset: page.offset,
        }))
    }

    /// Create a user.
    ///
    /// Least role: admin.
    #[oai(path = "/", method = "post", operation_id = "user_create")]
    async fn user_create(
        &self,
        req: &Request,
        auth: BearerAuth,
        body: Json<UserCreate>,
    ) -> Result<UserCreated, ApiError> {
        let caller = self.state.authorize(req, &auth, Role::Admin).await?;
        let body = body.0;
        validate_username(&body.username)?;
        validate_email(&body.email)?;
        validate_full_name(body.full_name.as_deref())?;
        validate_password("password", &body.password)?;
        let hash = crate::auth::hash_password(body.password)
            .await
            .map_err(|e| ApiError::internal(&e))?;
        let role: Role = body.role.into();
        let mut tx = self.state.pool.begin().await?;
        let row = store::users::user_create(
            &mut tx,
            &store::users::NewUser {
                username: &body.username,
                email: &body.email,
                full_name: body.full_name.as_deref(),
                password_hash: &hash,
                role: role.as_str(),
                is_active: body.is_active.unwrap_or(true),
            },
        )
        .await?;
        caller
            .record(
                &mut tx,
                caller.audit(
                    "user_create",
                    "user",
                    Some(row.id),
                    serde_json::json!({ "username": row.username, "role": row.role }),
                ),
            )
            .await?;
        tx.commit().await?;
        Ok(UserCreated::Created(Json(row.into())))
    }

    /// Get a user.
    ///
    /// Least role: admin.
    #[oai(path = "/:id", method = "get", operation_id = "user_get")]
    async fn user_get(
        &self,
        req: &Request,
        auth: BearerAuth,
        /// User id.
        id: Path<Uuid>,
    ) -> Result<Json<User>, ApiError> {
        self.state.authorize(req, &auth, Role::Admin).await?;
        let mut conn = self.state.pool.acquire().await?;
        let row = store::users::user_get(&mut conn, id.0)
            .await?
            .ok_or_else(|| ApiError::not_found("user", id.0))?;
        Ok(Json(row.into()))
    }

    /// Update a user. Changing the password or deactivating revokes every token of the user.
    ///
    /// Least role: admin.
    #[oai(path = "/:id", method = "patch", operation_id = "user_update")]
    async fn user_update(
        &self,
        req: &Request,
        auth: BearerAuth,
        /// User id.
        id: Path<Uuid>,
        body: Json<UserUpdate>,
    ) -> Result<Json<User>, ApiError> {
        let caller = self.state.authorize(req, &auth, Role::Admin).await?;
        let body = body.0;
        let email = required_value("email", body.email)?;
        let full_name = Change::of(body.full_name);
        let password = required_value("password", body.password)?;
        let role = required_value("role", body.role)?;
        let is_active = required_value("is_active", body.is_active)?;
        if let Some(email) = &email {
            validate_email(email)?;
        }
        if let Change::Set(name) = &full_name {
            validate_full_name(Some(name))?;
        }
        let hash = match password {
            Some(p) => {
                validate_password("password", &p)?;
                Some(
                    crate::auth::hash_password(p)
                        .await
                        .map_err(|e| ApiError::internal(&e))?,
                )
            }
            None => None,
        };
        let role: Option<Role> = role.map(Into::into);
        if caller.identity.user_id == id.0 && is_active == Some(false) {
            // As deleting yourself is: it would end this session and every token of yours.
            return Err(ApiError::conflict(
                "cannot deactivate yourself",
                Some("is_active"),
            ));
        }
        let mut tx = self.state.pool.begin().await?;
        let current = store::users::user_get(&mut tx, id.0)
            .await?
            .ok_or_else(|| ApiError::not_found("user", id.0))?;
        let demotes_admin = role.is_some_and(|r| r != Role::Admin) || is_active == Some(false);
        if demotes_admin
            && current.role == "admin"
            && store::users::user_count_other_active_admins(&mut tx, id.0).await? == 0
        {
            return Err(ApiError::conflict(
                "cannot demote or deactivate the last active admin",
                Some(if role.is_some_and(|r| r != Role::Admin) {
                    "role"
                } else {
                    "is_active"
                }),
            ));
        }
        let row = store::users::user_update(
            &mut tx,
            id.0,
            &store::users::UserChanges {
                email: email.as_deref(),
                full_name: full_name.as_ref().map_set(String::as_str).into_option(),
                password_hash: hash.as_deref(),
                role: role.map(Role::as_str),
                is_active,
            },
        )
        .await?
        .ok_or_else(|| ApiError::not_found("user", id.0))?;
        let revoked = if hash.is_some() || is_active == Some(false) {
            store::tokens::token_revoke_all(&mut tx, id.0).await?
        } else {
            0
        };
        let mut changed = Vec::new();
        for (name, set) in [
            ("email", email.is_some()),
            ("full_name", full_name.is_given()),
            ("password", hash.is_some()),
            ("role", role.is_some()),
            ("is_active", is_active.is_some()),
        ] {
            if set {
                changed.push(name);
            }
        }
        caller
            .record(
                &mut tx,
                caller.audit(
                    "user_update",
                    "user",
                    Some(row.id),
                    serde_json::json!({
                        "changed": changed,
                        "role": row.role,
                        "is_active": row.is_active,
                        "tokens_revoked": revoked,
                        "before": audited_user(&current),
                        "after": audited_user(&row),
                    }),
                ),
            )
            .await?;
        tx.commit().await?;
        Ok(Json(row.into()))
    }

    /// Delete a user. Their audit entries and the things they created are kept.
    ///
    /// Least role: admin.
    #[oai(path = "/:id", method = "delete", operation_id = "user_delete")]
    async fn user_delete(
        &self,
        req: &Request,
        auth: BearerAuth,
        /// User id.
        id: Path<Uuid>,
    ) -> Result<Deleted, ApiError> {
        let caller = self.state.authorize(req, &auth, Role::Admin).await?;
        if caller.identity.user_id == id.0 {
            return Err(ApiError::conflict("cannot delete yourself", Some("id")));
        }
        let mut tx = self.state.pool.begin().await?;
        let current = store::users::user_get(&mut tx, id.0)
            .await?
            .ok_or_else(|| ApiError::not_found("user", id.0))?;
        if current.role == "admin"
            && store::users::user_count_other_active_admins(&mut tx, id.0).await? == 0
        {
            return Err(ApiError::conflict(
                "cannot delete the last active admin",
                Some("id"),
            ));
        }
        store::users::user_delete(&mut tx, id.0).await?;
        caller
            .record(
                &mut tx,
                caller.audit(
                    "user_delete",
                    "user",
                    Some(id.0),
                    serde_json::json!({ "username": current.username }),
                ),
            )
            .await?;
        tx.commit().await?;
        Ok(Deleted::NoContent)
    }
}

/// What the audit log keeps of a user's account before and after a change (never a password
/// hash: a password change shows as `password` in `changed`).
fn audited_user(u: &store::users::UserRow) -> serde_json::Value {
    serde_json::json!({
        "email": u.email,
        "full_name": u.full_name,
        "role": u.role,
        "is_active": u.is_active,
    })
}
