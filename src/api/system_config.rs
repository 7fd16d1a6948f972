//! Global key/value settings (admin).

use chrono::{DateTime, Utc};
use poem::Request;
use poem_openapi::{ApiResponse, Object, OpenApi, param::Path, param::Query, payload::Json};
use uuid::Uuid;

use crate::domain::Role;
use crate::store;

use super::Tag;
use super::context::{AppState, BearerAuth};
use super::error::ApiError;
use super::pagination::Page;

/// One setting.
#[derive(Debug, Object)]
pub struct ConfigEntry {
    /// Key (1 to 50 characters: letters, digits, `.`, `_`, `-`).
    pub key: String,
    /// Any JSON value but null (DELETE the key to remove a setting).
    pub value: serde_json::Value,
    /// Last change.
    pub updated_at: DateTime<Utc>,
    /// Who made the last change.
    #[oai(skip_serializing_if_is_none)]
    pub updated_by: Option<Uuid>,
}

/// A new value for a key.
#[derive(Debug, Object)]
#[oai(deny_unknown_fields)]
pub struct ConfigValue {
    /// Any JSON value.
    pub value: serde_json::Value,
}

impl From<store::system_config::ConfigRow> for ConfigEntry {
    fn from(r: store::system_config::ConfigRow) -> ConfigEntry {
        ConfigEntry {
            key: r.key,
            value: r.value_json,
            updated_at: r.updated_at,
            updated_by: r.updated_by,
        }
    }
}

#[derive(ApiResponse)]
enum Deleted {
    /// Deleted.
    #[oai(status = 204)]
    NoContent,
}

/// The keys the product reads.
const READ_KEYS: [&str; 1] = [store::alerts::ALERT_TIMEZONE_KEY];

/// Refuses a value the product would not understand for a key it reads (any other key takes any
/// JSON value).
fn validate_value(key: &str, value: &serde_json::Value) -> Result<(), ApiError> {
    // A key the product reads, written another way, would be stored and never read.
    for known in READ_KEYS {
        let folded = |k: &str| k.to_ascii_lowercase().replace(['-', '_'], ".");
        if key != known && folded(key) == folded(known) {
            return Err(ApiError::invalid(
                "key",
                format!("`{key}` is not `{known}`, the key the product reads (keys are exact)"),
            ));
        }
    }
    if key == store::alerts::ALERT_TIMEZONE_KEY {
        let Some(name) = value.as_str() else {
            return Err(ApiError::invalid(
                "value",
                format!("{key} must be a string naming an IANA timezone (Europe/Berlin)"),
            ));
        };
        if name.parse::<chrono_tz::Tz>().is_err() {
            return Err(ApiError::invalid(
                "value",
                format!("`{name}` is not an IANA timezone (Europe/Berlin, America/New_York, UTC)"),
            ));
        }
    }
    Ok(())
}

/// System configuration endpoints.
pub struct SystemConfigApi {
    /// Shared state.
    pub state: AppState,
}

#[OpenApi(prefix_path = "/system-config", tag = "Tag::SystemConfig")]
impl SystemConfigApi {
    /// List every setting.
    ///
    /// Least role: admin.
    #[oai(path = "/", method = "get", operation_id = "config_list")]
    async fn config_list(
        &self,
        req: &Request,
        auth: BearerAuth,
        /// Page size, 1 to 500 (default 50).
        #[oai(validator(minimum(value = "1"), maximum(value = "500")))]
        limit: Query<Option<i64>>,
        /// Rows to skip (default 0).
        #[oai(validator(minimum(value = "0")))]
        offset: Query<Option<i64>>,
    ) -> Result<Json<ConfigEntryPage>, ApiError> {
        self.state.authorize(req, &auth, Role::Admin).await?;
        let page = Page::parse(limit.0, offset.0)?;
        let mut conn = self.state.pool.acquire().await?;
        let rows = store::system_config::config_list(&mut conn).await?;
        let (items, total) = page.slice(rows);
        Ok(Json(ConfigEntryPage {
            items: items.into_iter().map(ConfigEntry::from).collect(),
            total,
            limit: page.limit,
            offset: page.offset,
        }))
    }

    /// Get one setting.
    ///
    /// Least role: admin.
    #[oai(path = "/:key", method = "get", operation_id = "config_get")]
    async fn config_get(
        &self,
        req: &Request,
        auth: BearerAuth,
        /// Setting key.
        #[oai(validator(min_length = 1, max_length = 50, pattern = r"^[A-Za-z0-9._-]+$"))]
        key: Path<String>,
    ) -> Result<Json<ConfigEntry>, ApiError> {
        self.state.authorize(req, &auth, Role::Admin).await?;
        let mut conn = self.state.pool.acquire().await?;
        let row = store::system_config::config_get(&mut conn, &key.0)
            .await?
            .ok_or_else(|| ApiError::not_found("system_config key", &key.0))?;
        Ok(Json(row.into()))
    }

    /// Create or replace one setting. `alerts.timezone` (the timezone of trigger time windows)
    /// must be an IANA timezone name, and a key that differs from it only in case or in `-`,
    /// `_` and `.` is refused; other keys take any JSON value.
    ///
    /// Least role: admin.
    #[oai(path = "/:key", method = "put", operation_id = "config_put")]
    async fn config_put(
        &self,
        req: &Request,
        auth: BearerAuth,
        /// Setting key.
        #[oai(validator(min_length = 1, max_length = 50, pattern = r"^[A-Za-z0-9._-]+$"))]
        key: Path<String>,
        body: Json<ConfigValue>,
    ) -> Result<Json<ConfigEntry>, ApiError> {
        let caller = self.state.authorize(req, &auth, Role::Admin).await?;
        validate_value(&key.0, &body.0.value)?;
        let mut tx = self.state.pool.begin().await?;
        let (row, previous) = store::system_config::config_put(
            &mut tx,
            &key.0,
            &body.0.value,
            Some(caller.identity.user_id),
        )
        .await?;
        caller
            .record(
                &mut tx,
                caller.audit(
                    "system_config_put",
                    "system_config",
                    None,
                    serde_json::json!({
                        "key": key.0,
                        "previous": previous,
                        "value": body.0.value,
                    }),
                ),
            )
            .await?;
        tx.commit().await?;
        Ok(Json(row.into()))
    }

    /// Delete one setting.
    ///
    /// Least role: admin.
    #[oai(path = "/:key", method = "delete", operation_id = "config_delete")]
    async fn config_delete(
        &self,
        req: &Request,
        auth: BearerAuth,
        /// Setting key.
        #[oai(validator(min_length = 1, max_length = 50, pattern = r"^[A-Za-z0-9._-]+$"))]
        key: Path<String>,
    ) -> Result<Deleted, ApiError> {
        let caller = self.state.authorize(req, &auth, Role::Admin).await?;
        let mut tx = self.state.pool.begin().await?;
        let previous = store::system_config::config_delete(&mut tx, &key.0)
            .await?
            .ok_or_else(|| ApiError::not_found("system_config key", &key.0))?;
        caller
            .record(
                &mut tx,
                caller.audit(
                    "system_config_delete",
                    "system_config",
                    None,
                    serde_json::json!({ "key": key.0, "previous": previous }),
                ),
            )
            .await?;
        tx.commit().await?;
        Ok(Deleted::NoContent)
    }
}

/// A page of settings.
#[derive(Debug, Object)]
pub struct ConfigEntryPage {
    /// Settings.
    pub items: Vec<ConfigEntry>,
    /// All settings.
    pub total: i64,
    /// Page size used.
    pub limit: i64,
    /// Offset used.
    pub offset: i64,
}
