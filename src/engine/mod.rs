//! The execution engine: job handlers that turn an execution row into checkpointed steps on a
//! target, under the safety gates. One step is one job; a worker can die between any two steps
//! or inside one and another worker resumes.
//!
//! - [`start`]: the `execution.start` job evaluates the gates in order (runbook active, blackout,
//!   circuit breaker, rate limit, approval) and starts the run or records the refusal.
//! - [`runner`]: the `execution.step` job runs one step attempt and, in the same lease-fenced
//!   transaction that completes the job, records the `step_executions` row and enqueues what
//!   comes next.
//! - [`rollback`]: the `execution.rollback` job runs rollback commands newest first.
//! - [`alerts`]: `alert.process` (auto_analyze rules, trigger matching, cooldowns, target server,
//!   an execution per the runbook's mode) and `alert.analyze`.
//! - [`control`]: creation, approval, rejection, cancellation, approval expiry and the runbook
//!   deadline; every status change goes through `domain::execution::transition` and a
//!   compare-and-set update.
//!
//! The engine knows nothing about HTTP. It depends on `queue`, `store`, `exec`, `templates` and
//! `domain`.

pub mod alerts;
pub mod control;
pub mod dead_jobs;
pub mod masking;
pub mod prune;
pub mod rollback;
pub mod runner;
pub mod secret_vars;
pub mod snapshot;
pub mod start;
pub mod targets;

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sqlx::PgPool;
use uuid::Uuid;

use crate::exec::StepExecutor;
use crate::queue::{JobError, KindOptions, NewJob, Registry};
use crate::store::{self, StoreError};

pub use control::{StartRequest, create_execution};
pub use targets::TargetResolver;

/// Job kind: evaluate the gates and start (or refuse) an execution.
pub const KIND_START: &str = "execution.start";
/// Job kind: run one step attempt.
pub const KIND_STEP: &str = "execution.step";
/// Job kind: run one rollback command.
pub const KIND_ROLLBACK: &str = "execution.rollback";
/// Job kind: the runbook's timeout passed.
pub const KIND_DEADLINE: &str = "execution.deadline";
/// Job kind: an approval request's deadline passed.
pub const KIND_APPROVAL_EXPIRY: &str = "execution.approval_expiry";
/// The channel notified when an execution ends (payload: execution id).
pub use crate::store::executions::CONTROL_CHANNEL;
/// The channel workers notify when a watched execution gets new events (payload: execution id).
pub use crate::store::executions::EVENTS_CHANNEL;

/// Something the engine cannot do.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The database failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The request is not valid (unknown runbook, empty runbook, ...).
    #[error("{field}: {reason}")]
    Invalid {
        /// Field.
        field: String,
        /// Why.
        reason: String,
    },
    /// The execution is in a state where this cannot happen.
    #[error("{0}")]
    Conflict(String),
    /// Not found.
    #[error("{0} not found")]
    NotFound(String),
    /// A request names something that does not exist.
    #[error("{what} not found")]
    UnknownReference {
        /// The request field that names it.
        field: String,
        /// What was named (`runbook <id>`).
        what: String,
    },
    /// The caller may not do this.
    #[error("{0}")]
    Forbidden(String),
}

impl From<sqlx::Error> for EngineError {
    fn from(e: sqlx::Error) -> Self {
        EngineError::Store(e.into())
    }
}

impl From<EngineError> for JobError {
    fn from(e: EngineError) -> Self {
        match e {
            EngineError::Store(s) => JobError::Store(s),
            other => JobError::Permanent(other.to_string()),
        }
    }
}

/// Tunables.
#[derive(Debug, Clone)]
pub struct EngineSettings {
    /// Cap on stored stdout/stderr per step attempt.
    pub output_limit_bytes: usize,
    /// How often a running step checks for a cancel request when no notification arrives (the
    /// end of an execution is also notified on `aiops_execution_control`).
    pub cancel_poll: Duration,
    /// Cap on live output streamed per step attempt.
    pub stream_limit_bytes: usize,
}

impl Default for EngineSettings {
    fn default() -> Self {
        EngineSettings {
            output_limit_bytes: 64 * 1024,
            cancel_poll: Duration::from_secs(1),
            stream_limit_bytes: 256 * 1024,
        }
    }
}

/// Shared by every handler of a worker.
pub struct Engine {
    /// The database.
    pub pool: PgPool,
    /// Resolves an execution's server to an executor target.
    pub targets: Arc<dyn TargetResolver>,
    /// Runs commands on the worker's host.
    pub local: Arc<dyn StepExecutor>,
    /// Runs commands over SSH, when configured.
    pub ssh: Option<Arc<dyn StepExecutor>>,
    /// Seals and opens secret variables; `None` when no secret key is configured.
    pub keyring: Option<Arc<crate::crypto::secrets::Keyring>>,
    /// Ids of executions that just ended (`aiops_execution_control`, forwarded by the worker's
    /// listener, see [`register`]); running steps subscribe.
    pub ended: tokio::sync::broadcast::Sender<String>,
    /// Tunables.
    pub settings: EngineSettings,
    /// What alert matching reads, compiled and cached per worker.
    pub alert_matching: alerts::MatchingCache,
}

/// Payload of `execution.start`, `execution.deadline` and `execution.approval_expiry`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ExecutionPayload {
    /// The execution.
    pub execution_id: Uuid,
}

/// Payload of `execution.step`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StepPayload {
    /// The execution.
    pub execution_id: Uuid,
    /// Runbook-level attempt.
    pub attempt: i32,
    /// Index into the snapshot's steps.
    pub index: usize,
    /// The attempt row inserted `running` in the transaction that enqueued this job (the step
    /// follows at once); the job's first attempt runs under it without a checkpoint of its own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prepared: Option<Uuid>,
    /// The first step of a runbook-level retry: the attempt begins with it, and a blackout
    /// window active then refuses it as the start gate refuses a run.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub begins_attempt: bool,
}

/// Payload of `execution.rollback`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RollbackPayload {
    /// The execution.
    pub execution_id: Uuid,
    /// The attempt whose steps are undone.
    pub attempt: i32,
    /// Snapshot indices still to roll back, in order (newest first).
    pub remaining: Vec<usize>,
    /// Attempt to start once the rollback is done (runbook-level retry).
    pub then_attempt: Option<i32>,
}

/// The start job of an execution (unique per execution while unfinished).
pub fn start_job(execution_id: Uuid) -> NewJob {
    let mut job = NewJob::new(
        KIND_START,
        serde_json::json!(ExecutionPayload { execution_id }),
    );
    job.unique_key = Some(format!("execution:{execution_id}:start"));
    job.max_attempts = 10;
    job
}

/// The job of one step attempt.
pub fn step_job(execution_id: Uuid, attempt: i32, index: usize, retry: i64) -> NewJob {
    let mut job = NewJob::new(
        KIND_STEP,
        serde_json::json!(StepPayload {
            execution_id,
            attempt,
            index,
            prepared: None,
            begins_attempt: false,
        }),
    );
    job.unique_key = Some(format!(
        "execution:{execution_id}:{attempt}:{index}:{retry}"
    ));
    job.max_attempts = 10;
    job
}

/// Registers every engine job kind with a worker's registry; live events older than
/// `retention` are pruned ([`prune`]).
pub fn register(
    registry: &mut Registry,
    engine: Arc<Engine>,
    retention: Duration,
) -> Result<(), crate::queue::QueueError> {
    prune::register(registry, retention)?;
    dead_jobs::register(registry, engine.clone())?;
    registry.forward_notifications(store::executions::CONTROL_CHANNEL, engine.ended.clone());
    let quick = KindOptions {
        timeout: Duration::from_secs(60),
        ..KindOptions::default()
    };
    // Steps can run as long as a runbook allows (the step itself enforces its timeout).
    let long = KindOptions {
        timeout: Duration::from_secs(24 * 3600),
        ..KindOptions::default()
    };
    let e = engine.clone();
    registry.register(KIND_START, quick, move |ctx| {
        let e = e.clone();
        async move { start::handle(&e, ctx).await }
    });
    let e = engine.clone();
    registry.register(KIND_STEP, long, move |ctx| {
        let e = e.clone();
        async move { runner::handle(&e, ctx).await }
    });
    let e = engine.clone();
    registry.register(KIND_ROLLBACK, long, move |ctx| {
        let e = e.clone();
        async move { rollback::handle(&e, ctx).await }
    });
    let e = engine.clone();
    registry.register(KIND_DEADLINE, quick, move |ctx| {
        let e = e.clone();
        async move { control::handle_deadline(&e, ctx).await }
    });
    let e = engine.clone();
    registry.register(KIND_APPROVAL_EXPIRY, quick, move |ctx| {
        let e = e.clone();
        async move { control::handle_approval_expiry(&e, ctx).await }
    });
    let e = engine.clone();
    registry.register(alerts::KIND_PROCESS, quick, move |ctx| {
        let e = e.clone();
        async move { alerts::handle_process(&e, ctx).await }
    });
    let e = engine;
    registry.register(alerts::KIND_ANALYZE, quick, move |ctx| {
        let e = e.clone();
        async move { alerts::handle_analyze(&e, ctx).await }
    });
    Ok(())
}
