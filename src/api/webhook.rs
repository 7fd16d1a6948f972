//! The Alertmanager webhook (payload version 4, as `notify/webhook` in prometheus/alertmanager
//! sends it) and the admin API of the tokens it authenticates with.
//!
//! A request is authenticated with a webhook token (bearer, or the password of basic auth, as
//! Alertmanager's `http_config` sends them), validated whole (any problem: 4xx naming the field,
//! nothing stored), then one statement (its own transaction, shared with the notifications
//! arriving at the same moment: see [`super::intake`]) upserts one `alerts` row per firing
//! episode and enqueues `alert.process` for the new and newly resolved ones (one job per 100
//! alerts); only after it committed does it answer 200, and wake the workers.
//! Database trouble answers 5xx, so Alertmanager retries.

use std::collections::{BTreeMap, HashMap};

use chrono::{DateTime, Datelike, Utc};
use poem::Request;
use poem_openapi::auth::{Basic, Bearer};
use poem_openapi::{
    ApiResponse, Object, OpenApi, SecurityScheme, param::Path, param::Query, payload::Json,
};
use serde::Serialize;
use serde_json::json;
use uuid::Uuid;

use crate::domain::Role;
use crate::domain::alert::{self, AlertStatus};
use crate::store::{self, alerts::AlertUpsert, webhook_tokens::WebhookTokenRow};

use super::Tag;
use super::context::{AppState, BearerAuth};
use super::error::{ApiError, ErrorBody};
use super::pagination::Page;

/// A webhook token as a bearer token (`http_config.authorization.credentials`).
#[derive(SecurityScheme)]
#[oai(ty = "bearer", rename = "webhookBearer")]
pub struct WebhookBearer(pub Bearer);

/// A webhook token as the password of basic auth (`http_config.basic_auth.password`; the
/// username is not checked).
#[derive(SecurityScheme)]
#[oai(ty = "basic", rename = "webhookBasic")]
pub struct WebhookBasic(pub Basic);

/// Either way of presenting a webhook token.
#[derive(SecurityScheme)]
pub enum WebhookAuth {
    /// Bearer.
    Bearer(WebhookBearer),
    /// Basic.
    Basic(WebhookBasic),
}

impl WebhookAuth {
    fn secret(&self) -> &str {
        match self {
            WebhookAuth::Bearer(b) => &b.0.token,
            WebhookAuth::Basic(b) => &b.0.password,
        }
    }
}

/// One alert of an Alertmanager webhook notification.
#[derive(Debug, Clone, Object)]
pub struct AlertmanagerAlert {
    /// `firing` or `resolved`.
    pub status: String,
    /// Labels (at least one); `alertname` names the alert (empty without it).
    pub labels: HashMap<String, String>,
    /// Annotations.
    #[oai(default, nullable)]
    pub annotations: HashMap<String, String>,
    /// Start of the firing episode (RFC 3339).
    #[oai(rename = "startsAt")]
    pub starts_at: String,
    /// End (RFC 3339); `0001-01-01T00:00:00Z` when unknown.
    #[oai(rename = "endsAt")]
    #[oai(nullable)]
    pub ends_at: Option<String>,
    /// Link to the expression that fired.
    #[oai(rename = "generatorURL", default, nullable)]
    pub generator_url: String,
    /// Alertmanager's fingerprint of the label set. The alert is stored under the fingerprint
    /// computed from its labels the way Alertmanager computes it (the same value Alertmanager
    /// sends); a different value given here is not taken.
    #[oai(nullable)]
    pub fingerprint: Option<String>,
}

/// An Alertmanager webhook notification, payload version 4.
#[derive(Debug, Clone, Object)]
pub struct AlertmanagerPayload {
    /// Must be `4`.
    pub version: String,
    /// The notification group's key.
    #[oai(rename = "groupKey", default, nullable)]
    pub group_key: String,
    /// Alerts Alertmanager left out because of the receiver's `max_alerts`.
    #[oai(rename = "truncatedAlerts", default, nullable)]
    pub truncated_alerts: u64,
    /// `firing` when any alert of the group fires, else `resolved`.
    pub status: String,
    /// The receiver's name.
    pub receiver: String,
    /// Labels the group is keyed by.
    #[oai(rename = "groupLabels", default, nullable)]
    pub group_labels: HashMap<String, String>,
    /// Labels every alert shares.
    #[oai(rename = "commonLabels", default, nullable)]
    pub common_labels: HashMap<String, String>,
    /// Annotations every alert shares.
    #[oai(rename = "commonAnnotations", default, nullable)]
    pub common_annotations: HashMap<String, String>,
    /// Alertmanager's URL.
    #[oai(rename = "externalURL", default, nullable)]
    pub external_url: String,
    /// The alerts.
    pub alerts: Vec<AlertmanagerAlert>,
    /// Why Alertmanager sent this notification (0.32 and later: `first notification`,
    /// `new alerts added`, `some alerts resolved`, `all alerts resolved`,
    /// `repeat interval elapsed`, ...; absent from older versions). Kept in the stored raw
    /// notification; nothing is decided by it.
    #[oai(rename = "notification_reason")]
    #[oai(nullable)]
    pub notification_reason: Option<String>,
}

/// What one notification did.
#[derive(Debug, Object)]
pub struct WebhookReceipt {
    /// Alerts in the payload.
    pub received: usize,
    /// New firing episodes stored.
    pub created: usize,
    /// Existing episodes updated (repeats and retries).
    pub updated: usize,
    /// Alerts resolved in the payload.
    pub resolved: usize,
    /// Alerts queued for rules and trigger matching.
    pub queued: usize,
}

/// Longest fingerprint stored.
const FINGERPRINT_MAX: usize = 100;

/// One alert with its notification's envelope, as `alerts.raw_alert_json` keeps it.
#[derive(Serialize)]
struct RawNotification<'a> {
    version: &'a str,
    receiver: &'a str,
    status: &'a str,
    #[serde(rename = "groupKey")]
    group_key: &'a str,
    #[serde(rename = "groupLabels")]
    group_labels: &'a HashMap<String, String>,
    #[serde(rename = "commonLabels")]
    common_labels: &'a HashMap<String, String>,
    #[serde(rename = "commonAnnotations")]
    common_annotations: &'a HashMap<String, String>,
    #[serde(rename = "externalURL")]
    external_url: &'a str,
    #[serde(rename = "truncatedAlerts")]
    truncated_alerts: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    notification_reason: Option<&'a str>,
    alert: RawAlert<'a>,
}

/// The alert part of [`RawNotification`].
#[derive(Serialize)]
struct RawAlert<'a> {
    status: &'a str,
    labels: &'a BTreeMap<String, String>,
    annotations: &'a BTreeMap<String, String>,
    #[serde(rename = "startsAt")]
    starts_at: &'a str,
    #[serde(rename = "endsAt")]
    ends_at: Option<&'a str>,
    #[serde(rename = "generatorURL")]
    generator_url: &'a str,
    fingerprint: &'a str,
}

/// JSON text of a value made of strings, maps of strings and numbers (which always serialises).
fn json_text<T: Serialize>(value: &T) -> String {
    serde_json::to_string(value).unwrap_or_else(|_| "null".to_owned())
}

fn no_nul(field: &str, value: &str) -> Result<(), ApiError> {
    if value.contains('\0') {
        return Err(ApiError::invalid(field, "must not contain a NUL character"));
    }
    Ok(())
}

fn no_nul_in_map(field: &str, map: &HashMap<String, String>) -> Result<(), ApiError> {
    for (k, v) in map {
        if k.contains('\0') {
            return Err(ApiError::invalid(field, "a name contains a NUL character"));
        }
        no_nul(&format!("{field}.{k}"), v)?;
    }
    Ok(())
}

/// Logs, in one line, the alerts of an authenticated notification whose sent fingerprint
/// differs from the one computed from their labels (which identifies them). Only after the
/// token is checked: an unauthenticated caller must not be able to write to the log.
fn log_foreign_fingerprints(p: &AlertmanagerPayload) {
    let mut foreign = p.alerts.iter().enumerate().filter_map(|(i, a)| {
        let sent = a.fingerprint.as_deref()?;
        let labels: BTreeMap<String, String> = a
            .labels
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let computed = alert::fingerprint_of(&labels);
        (sent != computed).then_some((i, sent, computed))
    });
    if let Some((first, sent, computed)) = foreign.next() {
        tracing::warn!(
            alerts = 1 + foreign.count(),
            first,
            sent = ?sent,
            computed = %computed,
            "alerts whose sent fingerprint does not match their labels; the one computed from \
             the labels identifies each"
        );
    }
}

/// Validates a payload into rows to store, or names the first problem.
pub fn prepare(p: &AlertmanagerPayload) -> Result<Vec<AlertUpsert>, ApiError> {
    if p.version != "4" {
        return Err(ApiError::invalid(
            "version",
            format!("`{}` is not supported; expected \"4\"", p.version),
        ));
    }
    if AlertStatus::parse(&p.status).is_none() {
        return Err(ApiError::invalid(
            "status",
            format!("`{}` is neither firing nor resolved", p.status),
        ));
    }
    // PostgreSQL keeps no NUL character in text or jsonb.
    for (field, value) in [
        ("receiver", &p.receiver),
        ("groupKey", &p.group_key),
        ("externalURL", &p.external_url),
    ] {
        no_nul(field, value)?;
    }
    for (field, map) in [
        ("groupLabels", &p.group_labels),
        ("commonLabels", &p.common_labels),
        ("commonAnnotations", &p.common_annotations),
    ] {
        no_nul_in_map(field, map)?;
    }
    if let Some(reason) = &p.notification_reason {
        no_nul("notificationReason", reason)?;
    }
    let mut rows: BTreeMap<(String, DateTime<Utc>), AlertUpsert> = BTreeMap::new();
    for (i, a) in p.alerts.iter().enumerate() {
        let field = |f: &str| format!("alerts[{i}].{f}");
        no_nul_in_map(&field("labels"), &a.labels)?;
        no_nul_in_map(&field("annotations"), &a.annotations)?;
        no_nul(&field("generatorURL"), &a.generator_url)?;
        if let Some(f) = &a.fingerprint {
            no_nul(&field("fingerprint"), f)?;
        }
        let status = AlertStatus::parse(&a.status).ok_or_else(|| {
            ApiError::invalid(
                &field("status"),
                format!("`{}` is neither firing nor resolved", a.status),
            )
        })?;
        // Alertmanager takes an alert without `alertname` (it needs only one label): such an
        // alert is stored with an empty name, so the rest of its group is not refused with it.
        if a.labels.is_empty() {
            return Err(ApiError::invalid(
                &field("labels"),
                "must hold at least one label (Alertmanager refuses an alert without any)",
            ));
        }
        let empty = String::new();
        let name = a.labels.get("alertname").unwrap_or(&empty);
        let time = |name: &str, value: &str| {
            let t = DateTime::parse_from_rfc3339(value)
                .map(|t| alert::stored_instant(t.with_timezone(&Utc)))
                .map_err(|e| {
                    ApiError::invalid(
                        &field(name),
                        format!("`{value}` is not an RFC 3339 time: {e}"),
                    )
                })?;
            // RFC 3339 has four-digit years: a later instant could not be given back.
            if t.year() > 9999 {
                return Err(ApiError::invalid(
                    &field(name),
                    format!("`{value}` is after the year 9999 in UTC"),
                ));
            }
            Ok(t)
        };
        let starts_at = time("startsAt", &a.starts_at)?;
        if alert::is_zero_time(&starts_at) {
            return Err(ApiError::invalid(&field("startsAt"), "must be set"));
        }
        let ends_at = match a.ends_at.as_deref() {
            None | Some("") => None,
            Some(v) => Some(time("endsAt", v)?).filter(|t| !alert::is_zero_time(t)),
        };
        // Alertmanager itself refuses such an alert ("start time must be before end time").
        if let Some(end) = ends_at
            && end < starts_at
        {
            return Err(ApiError::invalid(
                &field("endsAt"),
                format!(
                    "`{}` is before startsAt `{}`",
                    end.to_rfc3339(),
                    starts_at.to_rfc3339()
                ),
            ));
        }
        let labels: BTreeMap<String, String> = a
            .labels
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let annotations: BTreeMap<String, String> = a
            .annotations
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        // An episode is its label set: the fingerprint is computed from the labels, as
        // Alertmanager computes the one it sends. A sent value that differs is not taken: it
        // would let one notification update another episode, labels included, after its
        // triggers matched.
        let fingerprint = alert::fingerprint_of(&labels);
        match &a.fingerprint {
            Some(f) if f.is_empty() || f.chars().count() > FINGERPRINT_MAX => {
                return Err(ApiError::invalid(
                    &field("fingerprint"),
                    format!("must be 1 to {FINGERPRINT_MAX} characters"),
                ));
            }
            // Logged once the sender is authenticated (`log_foreign_fingerprints`).
            _ => {}
        }
        let raw = json_text(&RawNotification {
            version: &p.version,
            receiver: &p.receiver,
            status: &p.status,
            group_key: &p.group_key,
            group_labels: &p.group_labels,
            common_labels: &p.common_labels,
            common_annotations: &p.common_annotations,
            external_url: &p.external_url,
            truncated_alerts: p.truncated_alerts,
            notification_reason: p.notification_reason.as_deref(),
            alert: RawAlert {
                status: &a.status,
                labels: &labels,
                annotations: &annotations,
                starts_at: &a.starts_at,
                ends_at: a.ends_at.as_deref(),
                generator_url: &a.generator_url,
                fingerprint: &fingerprint,
            },
        });
        let row = AlertUpsert {
            fingerprint: fingerprint.clone(),
            starts_at,
            ends_at,
            status: status.as_str(),
            alert_name: alert::truncate(name, 255),
            severity: labels.get("severity").map(|s| alert::truncate(s, 50)),
            instance: labels.get("instance").map(|s| alert::truncate(s, 255)),
            job: labels.get("job").map(|s| alert::truncate(s, 100)),
            source: alert::source_of(&labels, &a.generator_url).map(|s| alert::truncate(&s, 255)),
            labels: json_text(&labels),
            annotations: json_text(&annotations),
            raw,
            generator_url: a.generator_url.clone(),
        };
        // The same episode twice in one payload: the later entry wins.
        rows.insert((fingerprint, starts_at), row);
    }
    Ok(rows.into_values().collect())
}

#[derive(ApiResponse)]
enum TokenCreated {
    /// Created; the secret is shown only here.
    #[oai(status = 201)]
    Created(Json<WebhookTokenSecret>),
}

#[derive(ApiResponse)]
enum Revoked {
    /// Revoked.
    #[oai(status = 204)]
    NoContent,
}

/// A webhook token (never its secret).
#[derive(Debug, Object)]
pub struct WebhookToken {
    /// Id.
    pub id: Uuid,
    /// Name (use it as the basic-auth username, for the logs).
    pub name: String,
    /// Creator.
    #[oai(skip_serializing_if_is_none)]
    pub created_by: Option<Uuid>,
    /// Creation.
    pub created_at: DateTime<Utc>,
    /// Last accepted request (to the minute).
    #[oai(skip_serializing_if_is_none)]
    pub last_used_at: Option<DateTime<Utc>>,
    /// Revocation.
    #[oai(skip_serializing_if_is_none)]
    pub revoked_at: Option<DateTime<Utc>>,
}

impl From<WebhookTokenRow> for WebhookToken {
    fn from(r: WebhookTokenRow) -> Self {
        WebhookToken {
            id: r.id,
            name: r.name,
            created_by: r.created_by,
            created_at: r.created_at,
            last_used_at: r.last_used_at,
            revoked_at: r.revoked_at,
        }
    }
}

/// A new webhook token with its secret.
#[derive(Debug, Object)]
pub struct WebhookTokenSecret {
    /// The token.
    pub token: WebhookToken,
    /// The secret for Alertmanager's `http_config`; shown once.
    pub secret: String,
}

/// A request for a webhook token.
#[derive(Debug, Object)]
#[oai(deny_unknown_fields)]
pub struct WebhookTokenInput {
    /// Name (1 to 100 characters), e.g. the Alertmanager cluster.
    #[oai(validator(min_length = 1, max_length = 100))]
    pub name: String,
}

/// Webhook and webhook-token endpoints.
pub struct WebhookApi {
    /// Shared state.
    pub state: AppState,
}

/// What the webhook answers to `credentials` (an `Authorization` header) before anything about
/// its payload: 401 for a header that carries no webhook token (bearer, or the basic-auth
/// password) or one that does not authenticate. `None` when the token is good, or when that
/// cannot be told now (the database failed): then the answer already given stands.
pub(crate) async fn credentials_refused(
    pool: &sqlx::PgPool,
    credentials: &poem::http::HeaderValue,
) -> Option<poem::Response> {
    use base64::Engine as _;
    use poem::IntoResponse;
    let secret = credentials.to_str().ok().and_then(|value| {
        let (scheme, rest) = value.split_once(' ')?;
        let rest = rest.trim();
        if scheme.eq_ignore_ascii_case("bearer") {
            Some(rest.to_owned())
        } else if scheme.eq_ignore_ascii_case("basic") {
            let decoded = base64::engine::general_purpose::STANDARD
                .decode(rest)
                .ok()?;
            let decoded = String::from_utf8(decoded).ok()?;
            decoded
                .split_once(':')
                .map(|(_, password)| password.to_owned())
        } else {
            None
        }
    });
    if let Some(secret) = secret {
        let hash = crate::crypto::token::hash(&secret);
        let mut conn = pool.acquire().await.ok()?;
        match store::webhook_tokens::webhook_token_authenticate(&mut conn, &hash).await {
            Ok(Some(_)) | Err(_) => return None,
            Ok(None) => {}
        }
    }
    Some(unauthorized().into_response())
}

/// The 401 of the webhook: no valid webhook token.
pub(crate) fn unauthorized() -> ApiError {
    ApiError::Unauthorized(Json(ErrorBody {
        code: "unauthorized".to_owned(),
        message: "a valid webhook token is required (bearer, or basic auth password)".to_owned(),
        details: None,
    }))
}

#[OpenApi(tag = "Tag::Alerts")]
impl WebhookApi {
    /// Receive an Alertmanager webhook notification (payload version 4).
    ///
    /// Authenticates with a webhook token from `webhook_token_create`, not a user token: as a
    /// bearer token (`http_config.authorization.credentials`) or as the basic-auth password
    /// (`http_config.basic_auth`). Every alert is stored (one row per firing episode,
    /// `fingerprint` + `startsAt`; repeats update it) and queued for rules and trigger matching
    /// in one transaction before the answer. 4xx: the payload is refused and nothing is stored;
    /// 5xx: retry.
    ///
    /// Least role: none (public).
    #[oai(
        path = "/webhooks/alertmanager",
        method = "post",
        operation_id = "alertmanager_webhook_receive"
    )]
    async fn alertmanager_webhook_receive(
        &self,
        auth: WebhookAuth,
        body: Json<AlertmanagerPayload>,
    ) -> Result<Json<WebhookReceipt>, ApiError> {
        let hash = crate::crypto::token::hash(auth.secret());
        let rows = match prepare(&body.0) {
            Ok(rows) if !rows.is_empty() => rows,
            // A refusal or an empty notification: the token is checked on its own first, so a
            // caller without one learns nothing about the payload.
            refused_or_empty => {
                let _slot = self
                    .state
                    .webhook_slots
                    .acquire()
                    .await
                    .map_err(|e| ApiError::internal(&e))?;
                let mut conn = self.state.pool.acquire().await?;
                if store::webhook_tokens::webhook_token_authenticate(&mut conn, &hash)
                    .await?
                    .is_none()
                {
                    return Err(unauthorized());
                }
                refused_or_empty?
            }
        };
        let resolved = rows.iter().filter(|r| r.status == "resolved").count();
        // Committed before the answer, in one statement with the token check and the
        // processing jobs (grouped with the notifications arriving meanwhile).
        let outcomes = if rows.is_empty() {
            Vec::new()
        } else {
            self.state
                .intake
                .submit(store::alerts::IntakeNotification {
                    token_hash: hash,
                    // The column holds 255 characters; the raw notification keeps it whole.
                    receiver: alert::truncate(&body.0.receiver, 255),
                    group_key: body.0.group_key.clone(),
                    external_url: body.0.external_url.clone(),
                    alerts: rows,
                })
                .await
                .map_err(|e| ApiError::from(&*e))?
                .ok_or_else(unauthorized)?
        };
        log_foreign_fingerprints(&body.0);
        let receipt = WebhookReceipt {
            received: body.0.alerts.len(),
            created: outcomes.iter().filter(|o| o.inserted).count(),
            updated: outcomes.iter().filter(|o| !o.inserted).count(),
            resolved,
            queued: outcomes.iter().filter(|o| o.needs_processing).count(),
        };
        if receipt.queued > 0 {
            // After the commit: a NOTIFY inside the transaction would hold PostgreSQL's global
            // notification lock across the commit's WAL flush and serialise every webhook.
            self.state.job_notifier.notify();
        }
        Ok(Json(receipt))
    }

    /// List webhook tokens (never their secrets).
    ///
    /// Least role: admin.
    #[oai(
        path = "/webhook-tokens",
        method = "get",
        operation_id = "webhook_token_list"
    )]
    async fn webhook_token_list(
        &self,
        req: &Request,
        auth: BearerAuth,
        /// Page size, 1 to 500 (default 50).
        #[oai(validator(minimum(value = "1"), maximum(value = "500")))]
        limit: Query<Option<i64>>,
        /// Rows to skip (default 0).
        #[oai(validator(minimum(value = "0")))]
        offset: Query<Option<i64>>,
    ) -> Result<Json<WebhookTokenPage>, ApiError> {
        self.state.authorize(req, &auth, Role::Admin).await?;
        let page = Page::parse(limit.0, offset.0)?;
        let mut conn = self.state.pool.acquire().await?;
        let rows = store::webhook_tokens::webhook_token_list(&mut conn).await?;
        let (items, total) = page.slice(rows);
        Ok(Json(WebhookTokenPage {
            items: items.into_iter().map(Into::into).collect(),
            total,
            limit: page.limit,
            offset: page.offset,
        }))
    }

    /// Create a webhook token for Alertmanager; the secret is returned once.
    ///
    /// Least role: admin.
    #[oai(
        path = "/webhook-tokens",
        method = "post",
        operation_id = "webhook_token_create"
    )]
    async fn webhook_token_create(
        &self,
        req: &Request,
        auth: BearerAuth,
        body: Json<WebhookTokenInput>,
    ) -> Result<TokenCreated, ApiError> {
        let caller = self.state.authorize(req, &auth, Role::Admin).await?;
        let name = body.0.name.trim();
        if name.is_empty() || name.chars().count() > 100 {
            return Err(ApiError::invalid("name", "must be 1 to 100 characters"));
        }
        let new = crate::crypto::token::generate();
        let mut tx = self.state.pool.begin().await?;
        let row = store::webhook_tokens::webhook_token_create(
            &mut tx,
            name,
            &new.hash,
            Some(caller.identity.user_id),
        )
        .await?;
        caller
            .record(
                &mut tx,
                caller.audit(
                    "webhook_token_create",
                    "webhook_token",
                    Some(row.id),
                    json!({ "name": row.name }),
                ),
            )
            .await?;
        tx.commit().await?;
        Ok(TokenCreated::Created(Json(WebhookTokenSecret {
            token: row.into(),
            secret: new.secret,
        })))
    }

    /// Revoke a webhook token; Alertmanager using it gets 401 from then on.
    ///
    /// Least role: admin.
    #[oai(
        path = "/webhook-tokens/:id",
        method = "delete",
        operation_id = "webhook_token_revoke"
    )]
    async fn webhook_token_revoke(
        &self,
        req: &Request,
        auth: BearerAuth,
        /// Token id.
        id: Path<Uuid>,
    ) -> Result<Revoked, ApiError> {
        let caller = self.state.authorize(req, &auth, Role::Admin).await?;
        let mut tx = self.state.pool.begin().await?;
        if !store::webhook_tokens::webhook_token_revoke(&mut tx, id.0).await? {
            return Err(ApiError::not_found("webhook token", id.0));
        }
        caller
            .record(
                &mut tx,
                caller.audit(
                    "webhook_token_revoke",
                    "webhook_token",
                    Some(id.0),
                    json!({}),
                ),
            )
            .await?;
        tx.commit().await?;
        Ok(Revoked::NoContent)
    }
}

/// A page of webhook tokens.
#[derive(Debug, Object)]
pub struct WebhookTokenPage {
    /// Webhook tokens.
    pub items: Vec<WebhookToken>,
    /// All webhook tokens.
    pub total: i64,
    /// Page size used.
    pub limit: i64,
    /// Offset used.
    pub offset: i64,
}
