//! Alerts (list with filters, get with matched rule, executions and analysis, request an
//! analysis) and `auto_analyze_rules` CRUD.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use poem::Request;
use poem_openapi::{ApiResponse, Enum, Object, OpenApi, param::Path, param::Query, payload::Json};
use serde_json::{Value, json};
use uuid::Uuid;

use crate::domain::Role;
use crate::domain::runbook::string_map;
use crate::domain::trigger_match::Pattern;
use crate::store::{
    self,
    alert_rules::{RuleFields, RuleRow},
    alerts::{AlertFilter, AlertRow},
    executions::ExecutionFilter,
};

use super::Tag;
use super::context::{AppState, BearerAuth};
use super::error::ApiError;
use super::pagination::Page;

/// Analysis of an alert.
#[derive(Debug, Object)]
pub struct AlertAnalysis {
    /// queued, completed, unavailable or failed; absent when never requested.
    #[oai(skip_serializing_if_is_none)]
    pub status: Option<String>,
    /// Why it is unavailable or failed.
    #[oai(skip_serializing_if_is_none)]
    pub error: Option<String>,
    /// When it was last requested.
    #[oai(skip_serializing_if_is_none)]
    pub requested_at: Option<DateTime<Utc>>,
    /// Whether an analysis exists.
    pub analyzed: bool,
    /// When it was made.
    #[oai(skip_serializing_if_is_none)]
    pub analyzed_at: Option<DateTime<Utc>>,
    /// Root-cause analysis.
    #[oai(skip_serializing_if_is_none)]
    pub text: Option<String>,
    /// Recommended remediation.
    #[oai(skip_serializing_if_is_none)]
    pub recommendations: Option<Value>,
}

/// A stored alert: one firing episode.
#[derive(Debug, Object)]
pub struct Alert {
    /// Id.
    pub id: Uuid,
    /// Alertmanager's fingerprint.
    pub fingerprint: String,
    /// `alertname`.
    pub alert_name: String,
    /// `severity` label.
    #[oai(skip_serializing_if_is_none)]
    pub severity: Option<String>,
    /// `instance` label.
    #[oai(skip_serializing_if_is_none)]
    pub instance: Option<String>,
    /// `job` label.
    #[oai(skip_serializing_if_is_none)]
    pub job: Option<String>,
    /// firing or resolved.
    pub status: String,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Annotations.
    pub annotations: BTreeMap<String, String>,
    /// Start of the episode.
    pub starts_at: DateTime<Utc>,
    /// End, when known.
    #[oai(skip_serializing_if_is_none)]
    pub ends_at: Option<DateTime<Utc>>,
    /// Link to the expression.
    #[oai(skip_serializing_if_is_none)]
    pub generator_url: Option<String>,
    /// Source: the `source` label, else the generator URL's host.
    #[oai(skip_serializing_if_is_none)]
    pub source: Option<String>,
    /// Alertmanager receiver.
    #[oai(skip_serializing_if_is_none)]
    pub receiver: Option<String>,
    /// First notification.
    pub received_at: DateTime<Utc>,
    /// Latest notification.
    pub last_received_at: DateTime<Utc>,
    /// Notifications received for this episode.
    pub receive_count: i32,
    /// When the resolution arrived.
    #[oai(skip_serializing_if_is_none)]
    pub resolved_at: Option<DateTime<Utc>>,
    /// When rules and triggers were evaluated.
    #[oai(skip_serializing_if_is_none)]
    pub processed_at: Option<DateTime<Utc>>,
    /// The auto_analyze rule that matched.
    #[oai(skip_serializing_if_is_none)]
    pub matched_rule_id: Option<Uuid>,
    /// auto_analyze, ignore or manual.
    #[oai(skip_serializing_if_is_none)]
    pub action_taken: Option<String>,
    /// Analysis.
    pub analysis: AlertAnalysis,
}

fn to_dto(r: &AlertRow) -> Alert {
    Alert {
        id: r.id,
        fingerprint: r.fingerprint.clone(),
        alert_name: r.alert_name.clone(),
        severity: r.severity.clone(),
        instance: r.instance.clone(),
        job: r.job.clone(),
        status: r.status.clone(),
        labels: string_map(&r.labels_json),
        annotations: string_map(&r.annotations_json),
        starts_at: r.starts_at,
        ends_at: r.ends_at,
        generator_url: r.generator_url.clone(),
        source: r.source.clone(),
        receiver: r.receiver.clone(),
        received_at: r.timestamp,
        last_received_at: r.last_received_at,
        receive_count: r.receive_count,
        resolved_at: r.resolved_at,
        processed_at: r.processed_at,
        matched_rule_id: r.matched_rule_id,
        action_taken: r.action_taken.clone(),
        analysis: AlertAnalysis {
            status: r.analysis_status.clone(),
            error: r.analysis_error.clone(),
            requested_at: r.analysis_requested_at,
            analyzed: r.analyzed,
            analyzed_at: r.analyzed_at,
            text: r.ai_analysis.clone(),
            recommendations: r.recommendations_json.clone(),
        },
    }
}

/// An execution started for an alert.
#[derive(Debug, Object)]
pub struct AlertExecution {
    /// Execution id.
    pub id: Uuid,
    /// Runbook.
    #[oai(skip_serializing_if_is_none)]
    pub runbook_id: Option<Uuid>,
    /// Trigger that started it.
    #[oai(skip_serializing_if_is_none)]
    pub trigger_id: Option<Uuid>,
    /// Target server.
    #[oai(skip_serializing_if_is_none)]
    pub server_id: Option<Uuid>,
    /// Status.
    pub status: String,
    /// Waiting for an approval.
    pub awaiting_approval: bool,
    /// Failure, refusal or cancellation reason.
    #[oai(skip_serializing_if_is_none)]
    pub error_message: Option<String>,
    /// Request time.
    pub created_at: DateTime<Utc>,
}

/// An alert with everything decided about it.
#[derive(Debug, Object)]
pub struct AlertDetail {
    /// The alert.
    pub alert: Alert,
    /// The auto_analyze rule that matched.
    #[oai(skip_serializing_if_is_none)]
    pub matched_rule: Option<AlertRule>,
    /// What rules and triggers decided and why (`decision`, `reason`, `rule`, `triggers` with
    /// per-trigger reasons, `matched_trigger`, `execution_id`); absent until processed.
    #[oai(skip_serializing_if_is_none)]
    pub match_outcome: Option<Value>,
    /// Runbooks suggested instead of run (manual mode).
    pub suggested_runbooks: Value,
    /// Executions started for it.
    pub executions: Vec<AlertExecution>,
    /// The alert and its notification envelope as last received.
    pub raw: Value,
}

/// A page of alerts.
#[derive(Debug, Object)]
pub struct AlertPage {
    /// Alerts.
    pub items: Vec<Alert>,
    /// Matching alerts.
    pub total: i64,
    /// Page size used.
    pub limit: i64,
    /// Offset used.
    pub offset: i64,
}

/// Alert status filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Enum)]
#[oai(rename_all = "lowercase")]
pub enum AlertStatusName {
    /// Firing.
    Firing,
    /// Resolved.
    Resolved,
}

/// What a rule does with matching alerts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Enum)]
#[oai(rename_all = "snake_case")]
pub enum RuleAction {
    /// Request an analysis, then match triggers.
    AutoAnalyze,
    /// Store only: no analysis, no triggers.
    Ignore,
    /// No automatic analysis; match triggers.
    Manual,
}

impl RuleAction {
    fn as_str(self) -> &'static str {
        match self {
            RuleAction::AutoAnalyze => "auto_analyze",
            RuleAction::Ignore => "ignore",
            RuleAction::Manual => "manual",
        }
    }

    fn parse(s: &str) -> RuleAction {
        match s {
            "auto_analyze" => RuleAction::AutoAnalyze,
            "ignore" => RuleAction::Ignore,
            _ => RuleAction::Manual,
        }
    }
}

/// An auto_analyze rule.
#[derive(Debug, Object)]
pub struct AlertRule {
    /// Id.
    pub id: Uuid,
    /// Name.
    pub name: String,
    /// Evaluation order (lower first; the first match wins).
    pub priority: i32,
    /// Glob on the alert name.
    pub alert_name_pattern: String,
    /// Glob on the severity.
    pub severity_pattern: String,
    /// Action.
    pub action: RuleAction,
    /// Considered at all.
    pub enabled: bool,
    /// Creation.
    pub created_at: DateTime<Utc>,
    /// Last change.
    pub updated_at: DateTime<Utc>,
}

impl From<RuleRow> for AlertRule {
    fn from(r: RuleRow) -> Self {
        AlertRule {
            id: r.id,
            action: RuleAction::parse(&r.action),
            name: r.name,
            priority: r.priority,
            alert_name_pattern: r.alert_name_pattern,
            severity_pattern: r.severity_pattern,
            enabled: r.enabled,
            created_at: r.created_at,
            updated_at: r.updated_at,
        }
    }
}

/// An auto_analyze rule as written by clients.
#[derive(Debug, Object)]
#[oai(deny_unknown_fields)]
pub struct AlertRuleInput {
    /// Name (1 to 100 characters).
    #[oai(validator(min_length = 1, max_length = 100))]
    pub name: String,
    /// Evaluation order, lower first (default 100).
    #[oai(nullable)]
    pub priority: Option<i32>,
    /// Glob on the alert name (default `*`; regex as `/.../` or `re:...`).
    #[oai(validator(min_length = 1))]
    #[oai(nullable)]
    pub alert_name_pattern: Option<String>,
    /// Glob on the severity (default `*`, which also matches alerts without one).
    #[oai(validator(min_length = 1))]
    #[oai(nullable)]
    pub severity_pattern: Option<String>,
    /// Action.
    pub action: RuleAction,
    /// Considered at all (default true).
    #[oai(nullable)]
    pub enabled: Option<bool>,
}

struct PreparedRule {
    name: String,
    priority: i32,
    name_pattern: String,
    severity_pattern: String,
    action: &'static str,
    enabled: bool,
}

fn prepare_rule(input: &AlertRuleInput) -> Result<PreparedRule, ApiError> {
    let name = input.name.trim();
    if name.is_empty() || name.chars().count() > 100 {
        return Err(ApiError::invalid("name", "must be 1 to 100 characters"));
    }
    let name_pattern = input
        .alert_name_pattern
        .clone()
        .unwrap_or_else(|| "*".into());
    let severity_pattern = input.severity_pattern.clone().unwrap_or_else(|| "*".into());
    for (field, p) in [
        ("alert_name_pattern", &name_pattern),
        ("severity_pattern", &severity_pattern),
    ] {
        if p.is_empty() {
            return Err(ApiError::invalid(field, "must not be empty"));
        }
        Pattern::compile(p).map_err(|e| ApiError::invalid(field, e))?;
    }
    Ok(PreparedRule {
        name: name.to_owned(),
        priority: input.priority.unwrap_or(100),
        name_pattern,
        severity_pattern,
        action: input.action.as_str(),
        enabled: input.enabled.unwrap_or(true),
    })
}

impl PreparedRule {
    fn fields(&self) -> RuleFields<'_> {
        RuleFields {
            name: &self.name,
            priority: self.priority,
            alert_name_pattern: &self.name_pattern,
            severity_pattern: &self.severity_pattern,
            action: self.action,
            enabled: self.enabled,
        }
    }
}

#[derive(ApiResponse)]
enum RuleCreated {
    /// Created.
    #[oai(status = 201)]
    Created(Json<AlertRule>),
}

#[derive(ApiResponse)]
enum Deleted {
    /// Deleted.
    #[oai(status = 204)]
    NoContent,
}

#[derive(ApiResponse)]
enum AnalysisQueued {
    /// Queued; `alert_get` shows the result.
    #[oai(status = 202)]
    Accepted(Json<AlertAnalysis>),
}

/// Alert and auto_analyze rule endpoints.
pub struct AlertsApi {
    /// Shared state.
    pub state: AppState,
}

/// The `label` filters as one containment object, or `None` when two of them ask one label for
/// different values (an alert has one value per label, so nothing matches).
fn parse_labels(labels: &[String]) -> Result<Option<Option<Value>>, ApiError> {
    if labels.is_empty() {
        return Ok(Some(None));
    }
    let mut map = serde_json::Map::new();
    let mut satisfiable = true;
    for (i, l) in labels.iter().enumerate() {
        let Some((k, v)) = l.split_once('=').filter(|(k, _)| !k.is_empty()) else {
            return Err(ApiError::invalid(
                &format!("label[{i}]"),
                "must be `name=value`",
            ));
        };
        if let Some(earlier) = map.insert(k.to_owned(), json!(v))
            && earlier != json!(v)
        {
            satisfiable = false;
        }
    }
    Ok(satisfiable.then_some(Some(Value::Object(map))))
}

#[OpenApi(tag = "Tag::Alerts")]
impl AlertsApi {
    /// List alerts (firing episodes), newest first.
    ///
    /// Least role: viewer.
    #[oai(path = "/alerts", method = "get", operation_id = "alert_list")]
    #[allow(clippy::too_many_arguments)]
    async fn alert_list(
        &self,
        req: &Request,
        auth: BearerAuth,
        /// Only firing or resolved alerts.
        status: Query<Option<AlertStatusName>>,
        /// Exact severity.
        severity: Query<Option<String>>,
        /// Exact alert name.
        name: Query<Option<String>>,
        /// `name=value`; repeat for several (all must hold).
        label: Query<Option<Vec<String>>>,
        /// Episodes that started at or after this instant.
        since: Query<Option<DateTime<Utc>>>,
        /// Episodes that started before this instant.
        until: Query<Option<DateTime<Utc>>>,
        /// Page size, 1 to 500 (default 50).
        #[oai(validator(minimum(value = "1"), maximum(value = "500")))]
        limit: Query<Option<i64>>,
        /// Rows to skip (default 0).
        #[oai(validator(minimum(value = "0")))]
        offset: Query<Option<i64>>,
    ) -> Result<Json<AlertPage>, ApiError> {
        self.state.authorize(req, &auth, Role::Viewer).await?;
        let page = Page::parse(limit.0, offset.0)?;
        let filter = AlertFilter {
            status: status.0.map(|s| match s {
                AlertStatusName::Firing => "firing".to_owned(),
                AlertStatusName::Resolved => "resolved".to_owned(),
            }),
            severity: severity.0,
            name: name.0,
            labels: match parse_labels(label.0.as_deref().unwrap_or_default())? {
                Some(labels) => labels,
                None => {
                    return Ok(Json(AlertPage {
                        items: Vec::new(),
                        total: 0,
                        limit: page.limit,
                        offset: page.offset,
                    }));
                }
            },
            since: since.0,
            until: until.0,
        };
        let mut conn = store::read_snapshot(&self.state.pool).await?;
        let (rows, total) =
            store::alerts::alert_list(&mut conn, &filter, page.limit, page.offset).await?;
        Ok(Json(AlertPage {
            items: rows.iter().map(to_dto).collect(),
            total,
            limit: page.limit,
            offset: page.offset,
        }))
    }

    /// Get an alert with its matched rule, match outcome, executions and analysis.
    ///
    /// Least role: viewer.
    #[oai(path = "/alerts/:id", method = "get", operation_id = "alert_get")]
    async fn alert_get(
        &self,
        req: &Request,
        auth: BearerAuth,
        /// Alert id.
        id: Path<Uuid>,
    ) -> Result<Json<AlertDetail>, ApiError> {
        self.state.authorize(req, &auth, Role::Viewer).await?;
        let mut conn = self.state.pool.acquire().await?;
        let row = store::alerts::alert_get(&mut conn, id.0)
            .await?
            .ok_or_else(|| ApiError::not_found("alert", id.0))?;
        let rule = match row.matched_rule_id {
            Some(rule_id) => store::alert_rules::rule_get(&mut conn, rule_id).await?,
            None => None,
        };
        let (executions, _) = store::executions::execution_list(
            &mut conn,
            &ExecutionFilter {
                alert_id: Some(id.0),
                ..ExecutionFilter::default()
            },
            100,
            0,
        )
        .await?;
        Ok(Json(AlertDetail {
            alert: to_dto(&row),
            matched_rule: rule.map(Into::into),
            match_outcome: row.match_outcome.clone(),
            suggested_runbooks: row.suggested_runbooks.clone(),
            executions: executions
                .into_iter()
                .map(|e| AlertExecution {
                    id: e.id,
                    runbook_id: e.runbook_id,
                    trigger_id: e.trigger_id,
                    server_id: e.server_id,
                    status: e.status,
                    awaiting_approval: e.awaiting_approval,
                    error_message: e.error_message,
                    created_at: e.created_at,
                })
                .collect(),
            raw: row.raw_alert_json,
        }))
    }

    /// Request an analysis of an alert (queued as a job).
    ///
    /// Least role: operator.
    #[oai(
        path = "/alerts/:id/analysis",
        method = "post",
        operation_id = "alert_analyze"
    )]
    async fn alert_analyze(
        &self,
        req: &Request,
        auth: BearerAuth,
        /// Alert id.
        id: Path<Uuid>,
    ) -> Result<AnalysisQueued, ApiError> {
        let caller = self.state.authorize(req, &auth, Role::Operator).await?;
        let mut tx = self.state.pool.begin().await?;
        let queued = crate::engine::alerts::request_analysis(&mut tx, id.0)
            .await
            .map_err(|e| match e {
                crate::engine::EngineError::Store(s) => ApiError::from(s),
                other => ApiError::internal(&other),
            })?;
        if !queued {
            return Err(ApiError::not_found("alert", id.0));
        }
        caller
            .record(
                &mut tx,
                caller.audit("alert_analyze", "alert", Some(id.0), json!({})),
            )
            .await?;
        let row = store::alerts::alert_get(&mut tx, id.0)
            .await?
            .ok_or_else(|| ApiError::not_found("alert", id.0))?;
        tx.commit().await?;
        self.state.job_notifier.notify();
        Ok(AnalysisQueued::Accepted(Json(to_dto(&row).analysis)))
    }

    /// List auto_analyze rules in evaluation order.
    ///
    /// Least role: viewer.
    #[oai(
        path = "/alert-rules",
        method = "get",
        operation_id = "alert_rule_list"
    )]
    async fn alert_rule_list(
        &self,
        req: &Request,
        auth: BearerAuth,
        /// Page size, 1 to 500 (default 50).
        #[oai(validator(minimum(value = "1"), maximum(value = "500")))]
        limit: Query<Option<i64>>,
        /// Rows to skip (default 0).
        #[oai(validator(minimum(value = "0")))]
        offset: Query<Option<i64>>,
    ) -> Result<Json<AlertRulePage>, ApiError> {
        self.state.authorize(req, &auth, Role::Viewer).await?;
        let page = Page::parse(limit.0, offset.0)?;
        let mut conn = self.state.pool.acquire().await?;
        let rows = store::alert_rules::rule_list(&mut conn, false).await?;
        let (items, total) = page.slice(rows);
        Ok(Json(AlertRulePage {
            items: items.into_iter().map(Into::into).collect(),
            total,
            limit: page.limit,
            offset: page.offset,
        }))
    }

    /// Create an auto_analyze rule.
    ///
    /// Least role: engineer.
    #[oai(
        path = "/alert-rules",
        method = "post",
        operation_id = "alert_rule_create"
    )]
    async fn alert_rule_create(
        &self,
        req: &Request,
        auth: BearerAuth,
        body: Json<AlertRuleInput>,
    ) -> Result<RuleCreated, ApiError> {
        let caller = self.state.authorize(req, &auth, Role::Engineer).await?;
        let p = prepare_rule(&body.0)?;
        let mut tx = self.state.pool.begin().await?;
        let row = store::alert_rules::rule_create(&mut tx, &p.fields()).await?;
        caller
            .record(
                &mut tx,
                caller.audit(
                    "alert_rule_create",
                    "auto_analyze_rule",
                    Some(row.id),
                    rule_audit(&row),
                ),
            )
            .await?;
        tx.commit().await?;
        Ok(RuleCreated::Created(Json(row.into())))
    }

    /// Get an auto_analyze rule.
    ///
    /// Least role: viewer.
    #[oai(
        path = "/alert-rules/:id",
        method = "get",
        operation_id = "alert_rule_get"
    )]
    async fn alert_rule_get(
        &self,
        req: &Request,
        auth: BearerAuth,
        /// Rule id.
        id: Path<Uuid>,
    ) -> Result<Json<AlertRule>, ApiError> {
        self.state.authorize(req, &auth, Role::Viewer).await?;
        let mut conn = self.state.pool.acquire().await?;
        let row = store::alert_rules::rule_get(&mut conn, id.0)
            .await?
            .ok_or_else(|| ApiError::not_found("alert rule", id.0))?;
        Ok(Json(row.into()))
    }

    /// Replace an auto_analyze rule.
    ///
    /// Least role: engineer.
    #[oai(
        path = "/alert-rules/:id",
        method = "put",
        operation_id = "alert_rule_update"
    )]
    async fn alert_rule_update(
        &self,
        req: &Request,
        auth: BearerAuth,
        /// Rule id.
        id: Path<Uuid>,
        body: Json<AlertRuleInput>,
    ) -> Result<Json<AlertRule>, ApiError> {
        let caller = self.state.authorize(req, &auth, Role::Engineer).await?;
        let p = prepare_rule(&body.0)?;
        let mut tx = self.state.pool.begin().await?;
        let before = store::alert_rules::rule_get(&mut tx, id.0)
            .await?
            .ok_or_else(|| ApiError::not_found("alert rule", id.0))?;
        let row = store::alert_rules::rule_update(&mut tx, id.0, &p.fields())
            .await?
            .ok_or_else(|| ApiError::not_found("alert rule", id.0))?;
        caller
            .record(
                &mut tx,
                caller.audit(
                    "alert_rule_update",
                    "auto_analyze_rule",
                    Some(row.id),
                    json!({ "before": rule_audit(&before), "after": rule_audit(&row) }),
                ),
            )
            .await?;
        tx.commit().await?;
        Ok(Json(row.into()))
    }

    /// Delete an auto_analyze rule (alerts it matched keep their action_taken).
    ///
    /// Least role: engineer.
    #[oai(
        path = "/alert-rules/:id",
        method = "delete",
        operation_id = "alert_rule_delete"
    )]
    async fn alert_rule_delete(
        &self,
        req: &Request,
        auth: BearerAuth,
        /// Rule id.
        id: Path<Uuid>,
    ) -> Result<Deleted, ApiError> {
        let caller = self.state.authorize(req, &auth, Role::Engineer).await?;
        let mut tx = self.state.pool.begin().await?;
        let Some(deleted) = store::alert_rules::rule_delete(&mut tx, id.0).await? else {
            return Err(ApiError::not_found("alert rule", id.0));
        };
        caller
            .record(
                &mut tx,
                caller.audit(
                    "alert_rule_delete",
                    "auto_analyze_rule",
                    Some(id.0),
                    rule_audit(&deleted),
                ),
            )
            .await?;
        tx.commit().await?;
        Ok(Deleted::NoContent)
    }
}

/// What the audit log keeps of a rule: everything that decides what it matches and does.
fn rule_audit(row: &store::alert_rules::RuleRow) -> serde_json::Value {
    json!({
        "name": row.name,
        "priority": row.priority,
        "alert_name_pattern": row.alert_name_pattern,
        "severity_pattern": row.severity_pattern,
        "action": row.action,
        "enabled": row.enabled,
    })
}

/// A page of alert rules, in evaluation order.
#[derive(Debug, Object)]
pub struct AlertRulePage {
    /// Alert rules, in evaluation order.
    pub items: Vec<AlertRule>,
    /// All alert rules, in evaluation order.
    pub total: i64,
    /// Page size used.
    pub limit: i64,
    /// Offset used.
    pub offset: i64,
}
