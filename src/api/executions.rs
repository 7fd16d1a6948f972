//! Executions: start a runbook (on one server, the worker's host, or every server matching a tag
//! selector), list and inspect runs and their steps, cancel, approve or reject, and follow a run
//! live as Server-Sent Events.

use std::time::Duration;

use chrono::{DateTime, Utc};
use futures_util::stream::{self, BoxStream, StreamExt};
use poem::Request;
use poem::web::sse::Event as SseEvent;
use poem_openapi::payload::EventStream;
use poem_openapi::{
    ApiResponse, Enum, Object, OpenApi, param::Header, param::Path, param::Query, payload::Json,
};
use serde_json::Value;
use uuid::Uuid;

use crate::domain::Role;
use crate::domain::blackout::ServerSelector;
use crate::engine::{self, EngineError, StartRequest};
use crate::store::{
    self, executions::ExecutionFilter, executions::ExecutionRow, executions::StepRow,
};

use super::Tag;
use super::context::{AppState, BearerAuth};
use super::error::ApiError;
use super::live;
use super::optional_json::OptionalJson;
use super::pagination::Page;

/// `execution_status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Enum)]
#[oai(rename_all = "snake_case")]
pub enum ExecutionStatus {
    /// Waiting for its gates or an approval.
    Pending,
    /// Approved; about to start.
    Approved,
    /// Running.
    Running,
    /// Succeeded.
    Completed,
    /// Failed.
    Failed,
    /// Cancelled, refused by a gate, rejected or expired.
    Cancelled,
    /// The runbook timeout passed.
    Timeout,
}

fn status_of(s: &str) -> ExecutionStatus {
    match s {
        "pending" => ExecutionStatus::Pending,
        "approved" => ExecutionStatus::Approved,
        "running" => ExecutionStatus::Running,
        "completed" => ExecutionStatus::Completed,
        "failed" => ExecutionStatus::Failed,
        "timeout" => ExecutionStatus::Timeout,
        _ => ExecutionStatus::Cancelled,
    }
}

fn status_label(s: ExecutionStatus) -> &'static str {
    match s {
        ExecutionStatus::Pending => "pending",
        ExecutionStatus::Approved => "approved",
        ExecutionStatus::Running => "running",
        ExecutionStatus::Completed => "completed",
        ExecutionStatus::Failed => "failed",
        ExecutionStatus::Cancelled => "cancelled",
        ExecutionStatus::Timeout => "timeout",
    }
}

/// Servers selected by tags and environments (union; at least one criterion).
#[derive(Debug, Clone, Object)]
#[oai(deny_unknown_fields)]
pub struct ServerSelectorInput {
    /// Server tags: `name` or `name=value`.
    #[oai(default, nullable)]
    pub tags: Vec<String>,
    /// Server environments.
    #[oai(default, nullable)]
    pub environments: Vec<String>,
}

/// A request to run a runbook.
#[derive(Debug, Clone, Object)]
#[oai(deny_unknown_fields)]
pub struct ExecutionCreate {
    /// The runbook.
    pub runbook_id: Uuid,
    /// One server. Leave out both `server_id` and `servers` to run on a worker's own host
    /// (admin only: such a run's commands run as the worker's operating-system user).
    #[oai(nullable)]
    pub server_id: Option<Uuid>,
    /// Every matching server gets its own execution.
    #[oai(nullable)]
    pub servers: Option<ServerSelectorInput>,
    /// Executions of one fan-out that may run at once (default 5).
    #[oai(validator(minimum(value = "1"), maximum(value = "1000")))]
    #[oai(nullable)]
    pub max_concurrency: Option<i32>,
    /// Variables: text (never rendered as a template) that replaces the runbook's
    /// environment_vars of the same name. Names are identifiers; names that change how
    /// commands run (PATH, IFS, ENV, BASH_ENV, LD_*, ...) only when the runbook declares them.
    /// A value is a string, number or boolean; null leaves the variable out.
    #[oai(nullable)]
    pub variables: Option<std::collections::BTreeMap<String, Value>>,
}

/// The executions a request created.
#[derive(Debug, Object)]
pub struct ExecutionCreated {
    /// One per target.
    pub execution_ids: Vec<Uuid>,
    /// Shared by the executions of a fan-out.
    #[oai(skip_serializing_if_is_none)]
    pub batch_id: Option<Uuid>,
}

/// One run of a runbook.
#[derive(Debug, Object)]
pub struct Execution {
    /// Id.
    pub id: Uuid,
    /// Runbook (absent once deleted).
    #[oai(skip_serializing_if_is_none)]
    pub runbook_id: Option<Uuid>,
    /// Runbook name at creation.
    pub runbook_name: String,
    /// Runbook version at creation.
    pub runbook_version: i32,
    /// Target server (absent: a worker's own host).
    #[oai(skip_serializing_if_is_none)]
    pub server_id: Option<Uuid>,
    /// Triggering alert.
    #[oai(skip_serializing_if_is_none)]
    pub alert_id: Option<Uuid>,
    /// Triggering trigger.
    #[oai(skip_serializing_if_is_none)]
    pub trigger_id: Option<Uuid>,
    /// Status.
    pub status: ExecutionStatus,
    /// Mode at creation.
    pub mode: String,
    /// Waiting for an approval.
    pub awaiting_approval: bool,
    /// Approval deadline.
    #[oai(skip_serializing_if_is_none)]
    pub approval_expires_at: Option<DateTime<Utc>>,
    /// Runbook-level attempt.
    pub attempt: i32,
    /// Allowed attempts.
    pub max_attempts: i32,
    /// Request time.
    pub created_at: DateTime<Utc>,
    /// Start.
    #[oai(skip_serializing_if_is_none)]
    pub started_at: Option<DateTime<Utc>>,
    /// End.
    #[oai(skip_serializing_if_is_none)]
    pub completed_at: Option<DateTime<Utc>>,
    /// Duration.
    #[oai(skip_serializing_if_is_none)]
    pub duration_ms: Option<i32>,
    /// Who started it.
    #[oai(skip_serializing_if_is_none)]
    pub initiated_by: Option<Uuid>,
    /// Who approved it.
    #[oai(skip_serializing_if_is_none)]
    pub approved_by: Option<Uuid>,
    /// When.
    #[oai(skip_serializing_if_is_none)]
    pub approved_at: Option<DateTime<Utc>>,
    /// The gate that refused the run.
    #[oai(skip_serializing_if_is_none)]
    pub refused_by: Option<String>,
    /// Failure or refusal reason.
    #[oai(skip_serializing_if_is_none)]
    pub error_message: Option<String>,
    /// Summary.
    #[oai(skip_serializing_if_is_none)]
    pub output_summary: Option<String>,
    /// Variables given at start.
    pub context_vars: Value,
    /// Timeline.
    pub execution_log: Value,
    /// Fan-out batch.
    #[oai(skip_serializing_if_is_none)]
    pub batch_id: Option<Uuid>,
}

/// Variables as responses show them: values of secret-looking names (and of the runbook's
/// `config.secret_vars`) are masked.
fn masked_vars(r: &ExecutionRow) -> Value {
    let declared: Vec<String> = r.runbook_snapshot["config"]["secret_vars"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    match &r.context_vars {
        Value::Object(map) => Value::Object(
            map.iter()
                .map(|(k, v)| {
                    let secret = engine::masking::is_secret_name(k) || declared.contains(k);
                    let shown = if secret {
                        Value::String(engine::masking::MASK.to_owned())
                    } else {
                        v.clone()
                    };
                    (k.clone(), shown)
                })
                .collect(),
        ),
        other => other.clone(),
    }
}

fn to_execution(r: ExecutionRow) -> Execution {
    let context_vars = masked_vars(&r);
    Execution {
        runbook_name: r.runbook_snapshot["name"]
            .as_str()
            .unwrap_or_default()
            .to_owned(),
        id: r.id,
        runbook_id: r.runbook_id,
        runbook_version: r.runbook_version,
        server_id: r.server_id,
        alert_id: r.alert_id,
        trigger_id: r.trigger_id,
        status: status_of(&r.status),
        mode: r.mode,
        awaiting_approval: r.awaiting_approval,
        approval_expires_at: r.approval_expires_at,
        attempt: r.attempt,
        max_attempts: r.max_attempts,
        created_at: r.created_at,
        started_at: r.started_at,
        completed_at: r.completed_at,
        duration_ms: r.duration_ms,
        initiated_by: r.initiated_by,
        approved_by: r.approved_by,
        approved_at: r.approved_at,
        refused_by: r.refused_by,
        error_message: r.error_message,
        output_summary: r.output_summary,
        context_vars,
        execution_log: r.execution_log,
        batch_id: r.batch_id,
    }
}

/// One attempt of one step (or of its rollback).
#[derive(Debug, Object)]
pub struct StepExecution {
    /// Id.
    pub id: Uuid,
    /// Step definition.
    #[oai(skip_serializing_if_is_none)]
    pub step_id: Option<Uuid>,
    /// Position.
    pub step_order: i32,
    /// Name.
    pub step_name: String,
    /// `run` or `rollback`.
    pub phase: String,
    /// Runbook-level attempt.
    pub run_attempt: i32,
    /// Step-level retry number, from 0.
    pub retry_attempt: i32,
    /// Status.
    pub status: ExecutionStatus,
    /// Skipped because its condition was false.
    pub skipped: bool,
    /// Its worker died during this attempt; the step ran again.
    pub interrupted: bool,
    /// Start.
    #[oai(skip_serializing_if_is_none)]
    pub started_at: Option<DateTime<Utc>>,
    /// End.
    #[oai(skip_serializing_if_is_none)]
    pub completed_at: Option<DateTime<Utc>>,
    /// Duration.
    #[oai(skip_serializing_if_is_none)]
    pub duration_ms: Option<i32>,
    /// The command as run (secrets masked).
    #[oai(skip_serializing_if_is_none)]
    pub command: Option<String>,
    /// Exit code.
    #[oai(skip_serializing_if_is_none)]
    pub exit_code: Option<i32>,
    /// Signal that ended the command.
    #[oai(skip_serializing_if_is_none)]
    pub exit_signal: Option<String>,
    /// Standard output (masked, capped).
    #[oai(skip_serializing_if_is_none)]
    pub stdout: Option<String>,
    /// Standard error (masked, capped).
    #[oai(skip_serializing_if_is_none)]
    pub stderr: Option<String>,
    /// Output was cut at the limit.
    pub truncated: bool,
    /// Why it failed.
    #[oai(skip_serializing_if_is_none)]
    pub error_message: Option<String>,
}

fn to_step(r: StepRow) -> StepExecution {
    StepExecution {
        id: r.id,
        step_id: r.step_id,
        step_order: r.step_order,
        step_name: r.step_name,
        phase: r.phase,
        run_attempt: r.run_attempt,
        retry_attempt: r.retry_attempt,
        status: status_of(&r.status),
        skipped: r.skipped,
        interrupted: r.interrupted,
        started_at: r.started_at,
        completed_at: r.completed_at,
        duration_ms: r.duration_ms,
        command: r.command,
        exit_code: r.exit_code,
        exit_signal: r.exit_signal,
        stdout: r.stdout,
        stderr: r.stderr,
        truncated: r.truncated,
        error_message: r.error_message,
    }
}

/// A page of executions.
#[derive(Debug, Object)]
pub struct ExecutionPage {
    /// Executions, newest first.
    pub items: Vec<Execution>,
    /// Matching executions.
    pub total: i64,
    /// Page size used.
    pub limit: i64,
    /// Offset used.
    pub offset: i64,
}

/// An optional reason.
#[derive(Debug, Object)]
#[oai(deny_unknown_fields)]
pub struct Reason {
    /// Why (at most 2,000 characters).
    #[oai(nullable, validator(max_length = 2000))]
    pub reason: Option<String>,
}

/// A live event of an execution.
#[derive(Debug, Object)]
pub struct ExecutionEvent {
    /// Position in the stream (use as Last-Event-ID).
    pub id: i64,
    /// `status` (JSON in `data`), `stdout` or `stderr`.
    pub kind: String,
    /// Step attempt.
    #[oai(skip_serializing_if_is_none)]
    pub step_execution_id: Option<Uuid>,
    /// Payload.
    pub data: String,
    /// When.
    pub created_at: DateTime<Utc>,
}

#[derive(ApiResponse)]
enum Created {
    /// Created; the executions start as workers pick them up.
    #[oai(status = 201)]
    Created(Json<ExecutionCreated>),
}

pub(crate) fn engine_error(e: EngineError) -> ApiError {
    match e {
        EngineError::Store(s) => s.into(),
        EngineError::Invalid { field, reason } => ApiError::invalid(&field, reason),
        EngineError::Conflict(m) => ApiError::conflict(m, None),
        EngineError::NotFound(what) => ApiError::NotFound(Json(super::error::ErrorBody {
            code: "not_found".into(),
            message: format!("{what} not found"),
            details: None,
        })),
        EngineError::UnknownReference { field, what } => {
            ApiError::NotFound(Json(super::error::ErrorBody {
                code: "not_found".into(),
                message: format!("{field}: {what} not found"),
                details: Some(super::error::ErrorDetails {
                    field: Some(field),
                    reason: Some(format!("{what} does not exist")),
                    ..Default::default()
                }),
            }))
        }
        EngineError::Forbidden(m) => ApiError::Forbidden(Json(super::error::ErrorBody {
            code: "forbidden".into(),
            message: m,
            details: None,
        })),
    }
}

/// Execution endpoints.
pub struct ExecutionsApi {
    /// Shared state.
    pub state: AppState,
}

#[OpenApi(prefix_path = "/executions", tag = "Tag::Executions")]
impl ExecutionsApi {
    /// Start a runbook: on one server, on every server matching a selector (one execution per
    /// server, `max_concurrency` at a time), or on a worker's own host.
    ///
    /// Least role: operator; a run on a worker's own host (no `server_id`, no `servers`) needs
    /// admin, since its commands run as the worker's operating-system user, with whatever that
    /// user can reach (the platform's database and secret key included).
    #[oai(path = "/", method = "post", operation_id = "execution_create")]
    async fn execution_create(
        &self,
        req: &Request,
        auth: BearerAuth,
        body: Json<ExecutionCreate>,
    ) -> Result<Created, ApiError> {
        let caller = self.state.authorize(req, &auth, Role::Operator).await?;
        let body = body.0;
        if body.server_id.is_some() && body.servers.is_some() {
            return Err(ApiError::invalid(
                "servers",
                "give either server_id or servers, not both",
            ));
        }
        if body.server_id.is_none()
            && body.servers.is_none()
            && !caller.identity.role.allows(Role::Admin)
        {
            return Err(ApiError::forbidden_field(
                "server_id",
                "without a server the run takes the worker's own host, where its commands run \
                 as the worker's operating-system user; only an admin may start such a run",
            ));
        }
        let concurrency = body.max_concurrency.unwrap_or(5);
        if !(1..=1000).contains(&concurrency) {
            return Err(ApiError::invalid(
                "max_concurrency",
                "must be between 1 and 1000",
            ));
        }
        let variables: serde_json::Map<String, Value> = body
            .variables
            .clone()
            .unwrap_or_default()
            .into_iter()
            .collect();
        if variables.len() > 200 {
            return Err(ApiError::invalid("variables", "at most 200 variables"));
        }
        let mut tx = self.state.pool.begin().await?;
        let (targets, batch) = match &body.servers {
            None => (vec![body.server_id], None),
            Some(sel) => {
                if sel.tags.is_empty() && sel.environments.is_empty() {
                    return Err(ApiError::invalid(
                        "servers",
                        "give at least one tag or environment",
                    ));
                }
                let selector = ServerSelector {
                    server_ids: Vec::new(),
                    tags: sel.tags.clone(),
                    environments: sel.environments.clone(),
                };
                let all = store::blackouts::blackout_all_server_facts(&mut tx).await?;
                let matching: Vec<Option<Uuid>> = all
                    .into_iter()
                    .filter(|facts| selector.matches(facts))
                    .map(|facts| Some(facts.id))
                    .collect();
                if matching.is_empty() {
                    return Err(ApiError::invalid(
                        "servers",
                        "no server matches the selector",
                    ));
                }
                (matching, Some((Uuid::new_v4(), concurrency)))
            }
        };
        let mut ids = Vec::with_capacity(targets.len());
        for server_id in targets {
            let id = engine::create_execution(
                &mut tx,
                &StartRequest {
                    runbook_id: body.runbook_id,
                    server_id,
                    variables: variables.clone(),
                    initiated_by: Some(caller.identity.user_id),
                    alert_id: None,
                    trigger_id: None,
                    batch,
                },
                self.state.secrets.as_deref(),
            )
            .await
            .map_err(|e| match (e, server_id, &body.servers) {
                // A server the selector matched: the caller named `servers`, not a server id.
                (EngineError::Invalid { field, reason }, Some(server), Some(_))
                    if field == "server_id" =>
                {
                    ApiError::invalid("servers", format!("matched server {server}: {reason}"))
                }
                (e, ..) => engine_error(e),
            })?;
            ids.push(id);
        }
        // Variable values are not audited: they may hold secrets.
        caller
            .record(
                &mut tx,
                caller.audit(
                    "execution_create",
                    "runbook",
                    Some(body.runbook_id),
                    serde_json::json!({
                        "execution_ids": ids,
                        "variables": variables.keys().collect::<Vec<_>>(),
                        "batch_id": batch.map(|b| b.0),
                    }),
                ),
            )
            .await?;
        tx.commit().await?;
        self.state.job_notifier.notify();
        Ok(Created::Created(Json(ExecutionCreated {
            execution_ids: ids,
            batch_id: batch.map(|b| b.0),
        })))
    }

    /// List executions, newest first.
    ///
    /// Least role: viewer.
    #[allow(clippy::too_many_arguments)]
    #[oai(path = "/", method = "get", operation_id = "execution_list")]
    async fn execution_list(
        &self,
        req: &Request,
        auth: BearerAuth,
        /// Only this runbook.
        runbook_id: Query<Option<Uuid>>,
        /// Only this server.
        server_id: Query<Option<Uuid>>,
        /// Only this alert.
        alert_id: Query<Option<Uuid>>,
        /// Only this status.
        status: Query<Option<ExecutionStatus>>,
        /// Created at or after.
        since: Query<Option<DateTime<Utc>>>,
        /// Created before.
        until: Query<Option<DateTime<Utc>>>,
        /// Only this fan-out batch.
        batch_id: Query<Option<Uuid>>,
        /// Page size, 1 to 500 (default 50).
        #[oai(validator(minimum(value = "1"), maximum(value = "500")))]
        limit: Query<Option<i64>>,
        /// Rows to skip (default 0).
        #[oai(validator(minimum(value = "0")))]
        offset: Query<Option<i64>>,
    ) -> Result<Json<ExecutionPage>, ApiError> {
        self.state.authorize(req, &auth, Role::Viewer).await?;
        let page = Page::parse(limit.0, offset.0)?;
        let filter = ExecutionFilter {
            runbook_id: runbook_id.0,
            server_id: server_id.0,
            alert_id: alert_id.0,
            status: status.0.map(|s| status_label(s).to_owned()),
            since: since.0,
            until: until.0,
            batch_id: batch_id.0,
        };
        let mut conn = store::read_snapshot(&self.state.pool).await?;
        let (rows, total) =
            store::executions::execution_list(&mut conn, &filter, page.limit, page.offset).await?;
        Ok(Json(ExecutionPage {
            items: rows.into_iter().map(to_execution).collect(),
            total,
            limit: page.limit,
            offset: page.offset,
        }))
    }

    /// Get an execution.
    ///
    /// Least role: viewer.
    #[oai(path = "/:id", method = "get", operation_id = "execution_get")]
    async fn execution_get(
        &self,
        req: &Request,
        auth: BearerAuth,
        /// Execution id.
        id: Path<Uuid>,
    ) -> Result<Json<Execution>, ApiError> {
        self.state.authorize(req, &auth, Role::Viewer).await?;
        let mut conn = self.state.pool.acquire().await?;
        let row = store::executions::execution_get(&mut conn, id.0)
            .await?
            .ok_or_else(|| ApiError::not_found("execution", id.0))?;
        Ok(Json(to_execution(row)))
    }

    /// List the step attempts (and rollbacks) of an execution, in the order they ran.
    ///
    /// Least role: viewer.
    #[oai(
        path = "/:id/steps",
        method = "get",
        operation_id = "execution_steps_list"
    )]
    async fn execution_steps_list(
        &self,
        req: &Request,
        auth: BearerAuth,
        /// Execution id.
        id: Path<Uuid>,
    ) -> Result<Json<Vec<StepExecution>>, ApiError> {
        self.state.authorize(req, &auth, Role::Viewer).await?;
        let mut conn = self.state.pool.acquire().await?;
        store::executions::execution_get(&mut conn, id.0)
            .await?
            .ok_or_else(|| ApiError::not_found("execution", id.0))?;
        let rows = store::executions::step_list(&mut conn, id.0).await?;
        Ok(Json(rows.into_iter().map(to_step).collect()))
    }

    /// Cancel an execution; a running command is killed.
    ///
    /// Least role: operator.
    #[oai(
        path = "/:id/cancel",
        method = "post",
        operation_id = "execution_cancel"
    )]
    async fn execution_cancel(
        &self,
        req: &Request,
        auth: BearerAuth,
        /// Execution id.
        id: Path<Uuid>,
        body: OptionalJson<Reason>,
    ) -> Result<Json<Execution>, ApiError> {
        let caller = self.state.authorize(req, &auth, Role::Operator).await?;
        self.decide(
            &caller,
            id.0,
            Decision::Cancel(body.0.and_then(|b| b.reason)),
        )
        .await
    }

    /// Approve an execution waiting for approval. Only users holding one of the runbook's
    /// approval_roles may approve; others get 403.
    ///
    /// Least role: operator.
    #[oai(
        path = "/:id/approve",
        method = "post",
        operation_id = "execution_approve"
    )]
    async fn execution_approve(
        &self,
        req: &Request,
        auth: BearerAuth,
        /// Execution id.
        id: Path<Uuid>,
    ) -> Result<Json<Execution>, ApiError> {
        let caller = self.state.authorize(req, &auth, Role::Operator).await?;
        self.decide(&caller, id.0, Decision::Approve).await
    }

    /// Reject an execution waiting for approval (it is cancelled with the reason). Only users
    /// holding one of the runbook's approval_roles may reject.
    ///
    /// Least role: operator.
    #[oai(
        path = "/:id/reject",
        method = "post",
        operation_id = "execution_reject"
    )]
    async fn execution_reject(
        &self,
        req: &Request,
        auth: BearerAuth,
        /// Execution id.
        id: Path<Uuid>,
        body: OptionalJson<Reason>,
    ) -> Result<Json<Execution>, ApiError> {
        let caller = self.state.authorize(req, &auth, Role::Operator).await?;
        self.decide(
            &caller,
            id.0,
            Decision::Reject(body.0.and_then(|b| b.reason)),
        )
        .await
    }

    /// Follow an execution live: Server-Sent Events of step status changes and output chunks
    /// (masked), from the beginning or after `after` (an event id; a reconnecting client's
    /// `Last-Event-ID` header takes precedence). The stream ends when the execution has
    /// finished, its stopped step and its rollbacks have been recorded, and every event was
    /// sent.
    ///
    /// Least role: viewer.
    #[oai(
        path = "/:id/events",
        method = "get",
        operation_id = "execution_events_stream"
    )]
    async fn execution_events_stream(
        &self,
        req: &Request,
        auth: BearerAuth,
        /// Execution id.
        id: Path<Uuid>,
        /// Only events after this id.
        after: Query<Option<i64>>,
        /// The id of the last event a reconnecting client received (sent by browsers).
        #[oai(name = "Last-Event-ID")]
        last_event_id: Header<Option<i64>>,
    ) -> Result<EventStream<BoxStream<'static, ExecutionEvent>>, ApiError> {
        self.state.authorize(req, &auth, Role::Viewer).await?;
        let mut conn = self.state.pool.acquire().await?;
        store::executions::execution_get(&mut conn, id.0)
            .await?
            .ok_or_else(|| ApiError::not_found("execution", id.0))?;
        drop(conn);
        // Subscribe before registering and before the first read, so nothing appended after the
        // first read goes unnoticed; the fallback poll covers a listener still connecting.
        let wake = self.state.live.subscribe();
        let watch = live::Watch::register(&self.state.pool, id.0).await?;
        let state = Follow {
            pool: self.state.pool.clone(),
            execution_id: id.0,
            last: last_event_id.0.or(after.0).unwrap_or(0),
            buffered: std::collections::VecDeque::new(),
            done: false,
            wake,
            watch,
            refreshed: tokio::time::Instant::now(),
            credential: auth.0.token.clone(),
            authorized: tokio::time::Instant::now(),
        };
        let events = stream::unfold(state, |mut f| async move {
            loop {
                if f.authorized.elapsed() >= STREAM_REAUTHORIZE {
                    match crate::auth::authenticate(&f.pool, &f.credential).await {
                        Ok(identity) if crate::auth::require(&identity, Role::Viewer).is_ok() => {
                            f.authorized = tokio::time::Instant::now();
                        }
                        // Revoked, expired, deactivated or demoted: the stream ends.
                        Err(crate::auth::AuthError::Unauthenticated) | Ok(_) => return None,
                        // The database is away: checked again on the next turn.
                        Err(_) => {}
                    }
                }
                if let Some(event) = f.buffered.pop_front() {
                    return Some((event, f));
                }
                if f.done {
                    return None;
                }
                if f.refreshed.elapsed() >= live::Watch::refresh_interval() {
                    f.refreshed = tokio::time::Instant::now();
                    let _ = f.watch.refresh().await;
                }
                let Ok(mut conn) = f.pool.acquire().await else {
                    tokio::time::sleep(STREAM_FALLBACK_POLL).await;
                    continue;
                };
                // Read whether it settled first: events written before are all seen.
                let finished = matches!(
                    store::executions::execution_stream_settled(
                        &mut conn,
                        f.execution_id,
                        STREAM_SETTLE_SECONDS,
                        engine::KIND_ROLLBACK,
                    )
                    .await,
                    Ok(Some(true) | None)
                );
                let rows =
                    store::executions::event_list_after(&mut conn, f.execution_id, f.last, 200)
                        .await
                        .unwrap_or_default();
                drop(conn);
                let full_page = rows.len() == 200;
                for r in rows {
                    f.last = r.id;
                    f.buffered.push_back(ExecutionEvent {
                        id: r.id,
                        kind: r.kind,
                        step_execution_id: r.step_execution_id,
                        data: r.data,
                        created_at: r.created_at,
                    });
                }
                if finished && !full_page {
                    f.done = true;
                    continue;
                }
                if f.buffered.is_empty() {
                    f.wait().await;
                }
            }
        })
        .boxed();
        Ok(EventStream::new(events)
            .keep_alive(STREAM_KEEP_ALIVE)
            .to_event(|e: ExecutionEvent| {
                let id = e.id.to_string();
                let kind = e.kind.clone();
                // The event as its schema writes it (an absent step attempt is left out).
                let data = poem_openapi::types::ToJSON::to_json_string(&e);
                SseEvent::message(data).event_type(kind).id(id)
            }))
    }
}

/// A human decision on an execution.
enum Decision {
    Cancel(Option<String>),
    Approve,
    Reject(Option<String>),
}

impl ExecutionsApi {
    /// Applies a decision, audits it in the same transaction and returns the execution.
    async fn decide(
        &self,
        caller: &super::context::Caller,
        id: Uuid,
        decision: Decision,
    ) -> Result<Json<Execution>, ApiError> {
        let user = caller.identity.user_id;
        let role = caller.identity.role.as_str();
        let mut tx = self.state.pool.begin().await?;
        // A reason is stored and audited: secrets of the run written into it are masked.
        let masker = store::executions::execution_get(&mut tx, id)
            .await?
            .map(|row| engine::secret_vars::reason_masker(&row, self.state.secrets.as_deref()));
        let mask = |reason: &Option<String>| {
            reason
                .as_deref()
                .map(|r| masker.as_ref().map_or_else(|| r.to_owned(), |m| m.mask(r)))
        };
        let decision = match decision {
            Decision::Cancel(reason) => Decision::Cancel(mask(&reason)),
            Decision::Reject(reason) => Decision::Reject(mask(&reason)),
            Decision::Approve => Decision::Approve,
        };
        let (action, details) = match &decision {
            Decision::Cancel(reason) => {
                let text = format!(
                    "cancelled by {}{}",
                    caller.identity.username,
                    reason
                        .as_deref()
                        .map(|r| format!(": {r}"))
                        .unwrap_or_default()
                );
                engine::control::cancel(&mut tx, id, Some(user), &text)
                    .await
                    .map_err(engine_error)?;
                ("execution_cancel", serde_json::json!({ "reason": reason }))
            }
            Decision::Approve => {
                engine::control::approve(&mut tx, id, user, role)
                    .await
                    .map_err(engine_error)?;
                ("execution_approve", serde_json::json!({}))
            }
            Decision::Reject(reason) => {
                engine::control::reject(&mut tx, id, user, role, reason.as_deref())
                    .await
                    .map_err(engine_error)?;
                ("execution_reject", serde_json::json!({ "reason": reason }))
            }
        };
        caller
            .record(
                &mut tx,
                caller.audit(action, "execution", Some(id), details),
            )
            .await?;
        let row = store::executions::execution_get(&mut tx, id)
            .await?
            .ok_or_else(|| ApiError::not_found("execution", id))?;
        tx.commit().await?;
        if matches!(decision, Decision::Approve) {
            // The start job the approval enqueued.
            self.state.job_notifier.notify();
        }
        Ok(Json(to_execution(row)))
    }
}

/// A comment line sent on an idle stream: keeps proxies from closing it, and is how a client
/// that went away is noticed (and its watcher registration removed).
const STREAM_KEEP_ALIVE: Duration = Duration::from_secs(5);

/// How often a live stream reads even when no notification arrived.
const STREAM_FALLBACK_POLL: Duration = Duration::from_secs(1);
/// How long after its end a stream still waits for the stopped step's attempt row and the
/// rollbacks to be recorded (a worker that died mid-step never records its attempt).
const STREAM_SETTLE_SECONDS: i32 = 60;

/// State of one live stream.
struct Follow {
    pool: sqlx::PgPool,
    execution_id: Uuid,
    last: i64,
    buffered: std::collections::VecDeque<ExecutionEvent>,
    done: bool,
    wake: tokio::sync::broadcast::Receiver<Uuid>,
    watch: live::Watch,
    refreshed: tokio::time::Instant,
    /// The bearer token the stream was opened with, checked again every
    /// [`STREAM_REAUTHORIZE`]: a revoked token, a deactivated user or a role taken away ends
    /// the stream.
    credential: String,
    authorized: tokio::time::Instant,
}

/// How often an open live stream checks again that its token still authorizes it.
const STREAM_REAUTHORIZE: Duration = Duration::from_secs(2);

impl Follow {
    /// Until this execution is notified, or the fallback poll interval passes.
    async fn wait(&mut self) {
        let id = self.execution_id;
        let _ = tokio::time::timeout(STREAM_FALLBACK_POLL, async {
            loop {
                match self.wake.recv().await {
                    Ok(notified) if notified != id => continue,
                    Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => return,
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => {
                        std::future::pending::<()>().await
                    }
                }
            }
        })
        .await;
    }
}
