//! Circuit breakers: visible to viewers, thresholds set by engineers, reset by admins.

use chrono::{DateTime, Utc};
use poem::Request;
use poem_openapi::types::MaybeUndefined;
use poem_openapi::{Enum, Object, OpenApi, param::Path, param::Query, payload::Json};
use uuid::Uuid;

use crate::domain::Role;
use crate::store::{self, breakers::BreakerRow};

use super::Tag;
use super::context::{AppState, BearerAuth};
use super::error::ApiError;
use super::pagination::Page;
use super::patch::required_value;

/// `circuit_state`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Enum)]
#[oai(rename_all = "snake_case")]
pub enum CircuitStateName {
    /// Runs are admitted.
    Closed,
    /// Runs are refused until the reset timeout passes.
    Open,
    /// Limited probe runs are admitted.
    HalfOpen,
}

fn state_name(s: &str) -> CircuitStateName {
    match s {
        "closed" => CircuitStateName::Closed,
        "half_open" => CircuitStateName::HalfOpen,
        _ => CircuitStateName::Open,
    }
}

fn state_label(s: CircuitStateName) -> &'static str {
    match s {
        CircuitStateName::Closed => "closed",
        CircuitStateName::Open => "open",
        CircuitStateName::HalfOpen => "half_open",
    }
}

/// A runbook's circuit breaker.
#[derive(Debug, Object)]
pub struct CircuitBreaker {
    /// The runbook.
    pub runbook_id: Uuid,
    /// The runbook's name.
    pub runbook_name: String,
    /// State.
    pub state: CircuitStateName,
    /// Consecutive failures.
    pub failure_count: i32,
    /// Consecutive successes while half-open.
    pub success_count: i32,
    /// Most recent failure.
    #[oai(skip_serializing_if_is_none)]
    pub last_failure_at: Option<DateTime<Utc>>,
    /// When it opened.
    #[oai(skip_serializing_if_is_none)]
    pub opened_at: Option<DateTime<Utc>>,
    /// When it became half-open.
    #[oai(skip_serializing_if_is_none)]
    pub half_open_at: Option<DateTime<Utc>>,
    /// Failures before opening.
    pub failure_threshold: i32,
    /// Successes before closing.
    pub success_threshold: i32,
    /// Seconds in open before half-open.
    pub reset_timeout_seconds: i32,
    /// Last change.
    pub updated_at: DateTime<Utc>,
}

impl From<BreakerRow> for CircuitBreaker {
    fn from(r: BreakerRow) -> Self {
        CircuitBreaker {
            runbook_id: r.runbook_id,
            runbook_name: r.runbook_name,
            state: state_name(&r.state),
            failure_count: r.failure_count,
            success_count: r.success_count,
            last_failure_at: r.last_failure_at,
            opened_at: r.opened_at,
            half_open_at: r.half_open_at,
            failure_threshold: r.failure_threshold,
            success_threshold: r.success_threshold,
            reset_timeout_seconds: r.reset_timeout_seconds,
            updated_at: r.updated_at,
        }
    }
}

/// New thresholds: a field left out keeps its value; `null` is refused (none can be cleared).
#[derive(Debug, Object)]
#[oai(deny_unknown_fields)]
pub struct CircuitBreakerSettings {
    /// Consecutive failures before opening (> 0).
    #[oai(validator(minimum(value = "1")))]
    pub failure_threshold: MaybeUndefined<i32>,
    /// Consecutive half-open successes before closing (> 0).
    #[oai(validator(minimum(value = "1")))]
    pub success_threshold: MaybeUndefined<i32>,
    /// Seconds in open before half-open (> 0).
    #[oai(validator(minimum(value = "1")))]
    pub reset_timeout_seconds: MaybeUndefined<i32>,
}

/// A page of breakers.
#[derive(Debug, Object)]
pub struct CircuitBreakerPage {
    /// Breakers.
    pub items: Vec<CircuitBreaker>,
    /// Matching breakers.
    pub total: i64,
    /// Page size used.
    pub limit: i64,
    /// Offset used.
    pub offset: i64,
}

/// Circuit breaker endpoints.
pub struct BreakersApi {
    /// Shared state.
    pub state: AppState,
}

#[OpenApi(prefix_path = "/circuit-breakers", tag = "Tag::CircuitBreakers")]
impl BreakersApi {
    /// List circuit breakers.
    ///
    /// States are as of now: an open breaker whose reset timeout has passed is half_open (the
    /// next run is admitted as a probe), and is listed so.
    ///
    /// Least role: viewer.
    #[oai(path = "/", method = "get", operation_id = "breaker_list")]
    async fn breaker_list(
        &self,
        req: &Request,
        auth: BearerAuth,
        /// Only breakers in this state.
        state: Query<Option<CircuitStateName>>,
        /// Page size, 1 to 500 (default 50).
        #[oai(validator(minimum(value = "1"), maximum(value = "500")))]
        limit: Query<Option<i64>>,
        /// Rows to skip (default 0).
        #[oai(validator(minimum(value = "0")))]
        offset: Query<Option<i64>>,
    ) -> Result<Json<CircuitBreakerPage>, ApiError> {
        self.state.authorize(req, &auth, Role::Viewer).await?;
        let page = Page::parse(limit.0, offset.0)?;
        let mut conn = store::read_snapshot(&self.state.pool).await?;
        let (rows, total) = store::breakers::breaker_list(
            &mut conn,
            state.0.map(state_label),
            page.limit,
            page.offset,
        )
        .await?;
        Ok(Json(CircuitBreakerPage {
            items: rows.into_iter().map(Into::into).collect(),
            total,
            limit: page.limit,
            offset: page.offset,
        }))
    }

    /// Get a runbook's circuit breaker (every runbook has one, created closed with it).
    ///
    /// As of now: an open breaker whose reset timeout has passed reads half_open, with
    /// `half_open_at` the instant it became so.
    ///
    /// Least role: viewer.
    #[oai(path = "/:runbook_id", method = "get", operation_id = "breaker_get")]
    async fn breaker_get(
        &self,
        req: &Request,
        auth: BearerAuth,
        /// Runbook id.
        runbook_id: Path<Uuid>,
    ) -> Result<Json<CircuitBreaker>, ApiError> {
        self.state.authorize(req, &auth, Role::Viewer).await?;
        let mut conn = self.state.pool.acquire().await?;
        let row = store::breakers::breaker_get(&mut conn, runbook_id.0)
            .await?
            .ok_or_else(|| ApiError::not_found("runbook", runbook_id.0))?;
        Ok(Json(row.into()))
    }

    /// Change a breaker's thresholds.
    ///
    /// Fields left out keep their values. Settings equal to the current ones change nothing:
    /// `updated_at` stays and no audit entry is written.
    ///
    /// Least role: engineer.
    #[oai(
        path = "/:runbook_id",
        method = "patch",
        operation_id = "breaker_update"
    )]
    async fn breaker_update(
        &self,
        req: &Request,
        auth: BearerAuth,
        /// Runbook id.
        runbook_id: Path<Uuid>,
        body: Json<CircuitBreakerSettings>,
    ) -> Result<Json<CircuitBreaker>, ApiError> {
        let caller = self.state.authorize(req, &auth, Role::Engineer).await?;
        let b = body.0;
        let failure_threshold = required_value("failure_threshold", b.failure_threshold)?;
        let success_threshold = required_value("success_threshold", b.success_threshold)?;
        let reset_timeout_seconds =
            required_value("reset_timeout_seconds", b.reset_timeout_seconds)?;
        // Values below 1 were refused by the declared `minimum` before the handler ran.
        let mut tx = self.state.pool.begin().await?;
        let before = store::breakers::breaker_lock(&mut tx, runbook_id.0)
            .await?
            .ok_or_else(|| ApiError::not_found("runbook", runbook_id.0))?;
        let changed = store::breakers::breaker_configure(
            &mut tx,
            runbook_id.0,
            failure_threshold,
            success_threshold,
            reset_timeout_seconds,
        )
        .await?;
        // As of now: a shorter reset timeout may already have let an open breaker half-open.
        let row = store::breakers::breaker_get(&mut tx, runbook_id.0)
            .await?
            .ok_or_else(|| ApiError::not_found("runbook", runbook_id.0))?;
        if !changed {
            // Nothing to record: the settings already were these.
            return Ok(Json(row.into()));
        }
        caller
            .record(
                &mut tx,
                caller.audit(
                    "breaker_update",
                    "circuit_breaker",
                    Some(runbook_id.0),
                    serde_json::json!({
                        "runbook_id": runbook_id.0,
                        "before": {
                            "failure_threshold": before.failure_threshold,
                            "success_threshold": before.success_threshold,
                            "reset_timeout_seconds": before.reset_timeout_seconds,
                        },
                        "after": {
                            "failure_threshold": row.failure_threshold,
                            "success_threshold": row.success_threshold,
                            "reset_timeout_seconds": row.reset_timeout_seconds,
                        },
                    }),
                ),
            )
            .await?;
        tx.commit().await?;
        Ok(Json(row.into()))
    }

    /// Reset a breaker to closed with clean counters.
    ///
    /// Least role: admin.
    #[oai(
        path = "/:runbook_id/reset",
        method = "post",
        operation_id = "breaker_reset"
    )]
    async fn breaker_reset(
        &self,
        req: &Request,
        auth: BearerAuth,
        /// Runbook id.
        runbook_id: Path<Uuid>,
    ) -> Result<Json<CircuitBreaker>, ApiError> {
        let caller = self.state.authorize(req, &auth, Role::Admin).await?;
        let mut tx = self.state.pool.begin().await?;
        let row = store::breakers::breaker_lock(&mut tx, runbook_id.0)
            .await?
            .ok_or_else(|| ApiError::not_found("runbook", runbook_id.0))?;
        let previous = row.state.clone();
        let mut breaker = row.breaker();
        breaker.reset();
        store::breakers::breaker_save(&mut tx, runbook_id.0, &breaker).await?;
        let row = store::breakers::breaker_lock(&mut tx, runbook_id.0)
            .await?
            .ok_or_else(|| ApiError::not_found("runbook", runbook_id.0))?;
        caller
            .record(
                &mut tx,
                caller.audit(
                    "breaker_reset",
                    "circuit_breaker",
                    Some(runbook_id.0),
                    serde_json::json!({ "runbook_id": runbook_id.0, "previous_state": previous }),
                ),
            )
            .await?;
        tx.commit().await?;
        Ok(Json(row.into()))
    }
}
