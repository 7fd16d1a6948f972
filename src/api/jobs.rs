//! The job queue's admin API: list and inspect jobs, counts per kind and state, the workers, and
//! retry or cancel of a job. Reads need operator (on-call people look at stuck work); retry and
//! cancel need admin, because they override the queue's own decisions. Knows nothing about how
//! jobs are claimed or run: that is `queue`.

use chrono::{DateTime, Utc};
use poem::Request;
use poem_openapi::{Enum, Object, OpenApi, param::Path, param::Query, payload::Json};
use uuid::Uuid;

use crate::domain::Role;
use crate::store::{self, jobs::JobRow, queue_workers::WorkerRow};

use super::Tag;
use super::context::{AppState, BearerAuth};
use super::error::ApiError;
use super::pagination::Page;

/// Where a job is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Enum)]
#[oai(rename_all = "lowercase")]
pub enum JobState {
    /// Waiting to be claimed (possibly scheduled for later).
    Available,
    /// Claimed by a worker under a lease.
    Running,
    /// Failed; waits for its backoff before the next attempt.
    Retryable,
    /// Done.
    Completed,
    /// Failed permanently or ran out of attempts.
    Dead,
    /// Cancelled by an admin.
    Cancelled,
}

impl JobState {
    fn as_str(self) -> &'static str {
        match self {
            JobState::Available => "available",
            JobState::Running => "running",
            JobState::Retryable => "retryable",
            JobState::Completed => "completed",
            JobState::Dead => "dead",
            JobState::Cancelled => "cancelled",
        }
    }

    fn parse(s: &str) -> JobState {
        match s {
            "available" => JobState::Available,
            "running" => JobState::Running,
            "retryable" => JobState::Retryable,
            "completed" => JobState::Completed,
            "cancelled" => JobState::Cancelled,
            _ => JobState::Dead,
        }
    }
}

/// A job.
#[derive(Debug, Clone, Object)]
pub struct Job {
    /// Id.
    pub id: i64,
    /// Handler kind.
    pub kind: String,
    /// Handler arguments.
    pub payload: serde_json::Value,
    /// State.
    pub state: JobState,
    /// Lower runs first.
    pub priority: i32,
    /// Not run before this instant.
    pub run_at: DateTime<Utc>,
    /// Attempts started so far.
    pub attempt: i32,
    /// Attempt budget.
    pub max_attempts: i32,
    /// The worker holding (running) or last holding the job.
    #[oai(skip_serializing_if_is_none)]
    pub locked_by: Option<Uuid>,
    /// When the running attempt's lease ends unless renewed.
    #[oai(skip_serializing_if_is_none)]
    pub lease_expires_at: Option<DateTime<Utc>>,
    /// Per-job handler timeout in seconds.
    #[oai(skip_serializing_if_is_none)]
    pub timeout_seconds: Option<i32>,
    /// Error of the last failed attempt.
    #[oai(skip_serializing_if_is_none)]
    pub last_error: Option<String>,
    /// Failed attempts, oldest first: `[{attempt, at, error, worker}]` (the last 20).
    pub errors: serde_json::Value,
    /// De-duplication key.
    #[oai(skip_serializing_if_is_none)]
    pub unique_key: Option<String>,
    /// Enqueue time.
    pub created_at: DateTime<Utc>,
    /// Last claim time.
    #[oai(skip_serializing_if_is_none)]
    pub attempted_at: Option<DateTime<Utc>>,
    /// Completion, death or cancellation time.
    #[oai(skip_serializing_if_is_none)]
    pub finished_at: Option<DateTime<Utc>>,
}

impl From<JobRow> for Job {
    fn from(r: JobRow) -> Job {
        Job {
            id: r.id,
            kind: r.kind,
            payload: r.payload,
            state: JobState::parse(&r.state),
            priority: i32::from(r.priority),
            run_at: r.run_at,
            attempt: r.attempt,
            max_attempts: r.max_attempts,
            locked_by: r.locked_by,
            lease_expires_at: r.lease_expires_at,
            timeout_seconds: r.timeout_seconds,
            last_error: r.last_error,
            errors: r.errors,
            unique_key: r.unique_key,
            created_at: r.created_at,
            attempted_at: r.attempted_at,
            finished_at: r.finished_at,
        }
    }
}

/// A page of jobs, newest first.
#[derive(Debug, Object)]
pub struct JobPage {
    /// Jobs.
    pub items: Vec<Job>,
    /// Jobs matching the filters.
    pub total: i64,
    /// Page size used.
    pub limit: i64,
    /// Offset used.
    pub offset: i64,
}

/// How many jobs of one kind are in one state.
#[derive(Debug, Object)]
pub struct JobCount {
    /// Kind.
    pub kind: String,
    /// State.
    pub state: JobState,
    /// Jobs.
    pub count: i64,
}

/// Job counts per kind and state (pairs with no jobs are absent).
#[derive(Debug, Object)]
pub struct JobCounts {
    /// One entry per (kind, state), ordered by kind then state.
    pub items: Vec<JobCount>,
}

/// A worker process.
#[derive(Debug, Object)]
pub struct QueueWorker {
    /// Id (`locked_by` of the jobs it runs).
    pub id: Uuid,
    /// Host name.
    pub host: String,
    /// Process id.
    pub pid: i32,
    /// aiops version.
    pub version: String,
    /// Jobs it runs at once.
    pub concurrency: i32,
    /// Job kinds it has handlers for.
    pub kinds: Vec<String>,
    /// Start time.
    pub started_at: DateTime<Utc>,
    /// Last heartbeat; a worker not seen for long has died without a clean stop.
    pub last_seen_at: DateTime<Utc>,
    /// Clean shutdown time.
    #[oai(skip_serializing_if_is_none)]
    pub stopped_at: Option<DateTime<Utc>>,
}

impl From<WorkerRow> for QueueWorker {
    fn from(r: WorkerRow) -> QueueWorker {
        QueueWorker {
            id: r.id,
            host: r.host,
            pid: r.pid,
            version: r.version,
            concurrency: r.concurrency,
            kinds: r.kinds,
            started_at: r.started_at,
            last_seen_at: r.last_seen_at,
            stopped_at: r.stopped_at,
        }
    }
}

/// A page of workers, most recently seen first.
#[derive(Debug, Object)]
pub struct QueueWorkerPage {
    /// Workers.
    pub items: Vec<QueueWorker>,
    /// All recorded workers.
    pub total: i64,
    /// Page size used.
    pub limit: i64,
    /// Offset used.
    pub offset: i64,
}

/// Queue administration.
pub struct JobsApi {
    /// Shared state.
    pub state: AppState,
}

#[OpenApi(prefix_path = "/queue", tag = "Tag::Queue")]
impl JobsApi {
    /// List jobs, newest first, optionally filtered by kind and state.
    ///
    /// Least role: operator.
    #[oai(path = "/jobs", method = "get", operation_id = "job_list")]
    async fn job_list(
        &self,
        req: &Request,
        auth: BearerAuth,
        /// Only jobs of this kind.
        #[oai(validator(min_length = 1, max_length = 100))]
        kind: Query<Option<String>>,
        /// Only jobs in this state.
        state: Query<Option<JobState>>,
        /// Page size, 1 to 500 (default 50).
        #[oai(validator(minimum(value = "1"), maximum(value = "500")))]
        limit: Query<Option<i64>>,
        /// Rows to skip (default 0).
        #[oai(validator(minimum(value = "0")))]
        offset: Query<Option<i64>>,
    ) -> Result<Json<JobPage>, ApiError> {
        self.state.authorize(req, &auth, Role::Operator).await?;
        let page = Page::parse(limit.0, offset.0)?;
        if kind
            .0
            .as_ref()
            .is_some_and(|k| k.is_empty() || k.len() > 100)
        {
            return Err(ApiError::invalid("kind", "must be 1 to 100 characters"));
        }
        let mut conn = store::read_snapshot(&self.state.pool).await?;
        let (rows, total) = store::jobs::job_list(
            &mut conn,
            kind.0.as_deref(),
            state.0.map(JobState::as_str),
            page.limit,
            page.offset,
        )
        .await?;
        Ok(Json(JobPage {
            items: rows.into_iter().map(Job::from).collect(),
            total,
            limit: page.limit,
            offset: page.offset,
        }))
    }

    /// Get a job, with its error history.
    ///
    /// Least role: operator.
    #[oai(path = "/jobs/:id", method = "get", operation_id = "job_get")]
    async fn job_get(
        &self,
        req: &Request,
        auth: BearerAuth,
        /// Job id.
        id: Path<i64>,
    ) -> Result<Json<Job>, ApiError> {
        self.state.authorize(req, &auth, Role::Operator).await?;
        let mut conn = self.state.pool.acquire().await?;
        let row = store::jobs::job_get(&mut conn, id.0)
            .await?
            .ok_or_else(|| ApiError::not_found("job", id.0))?;
        Ok(Json(row.into()))
    }

    /// Retry a dead or cancelled job now, with a fresh attempt budget. 409 when the job is in
    /// another state, or when an unfinished job holds its unique key.
    ///
    /// Least role: admin.
    #[oai(path = "/jobs/:id/retry", method = "post", operation_id = "job_retry")]
    async fn job_retry(
        &self,
        req: &Request,
        auth: BearerAuth,
        /// Job id.
        id: Path<i64>,
    ) -> Result<Json<Job>, ApiError> {
        let caller = self.state.authorize(req, &auth, Role::Admin).await?;
        let mut tx = self.state.pool.begin().await?;
        let before = store::jobs::job_get(&mut tx, id.0)
            .await?
            .ok_or_else(|| ApiError::not_found("job", id.0))?;
        let row = match store::jobs::job_retry(&mut tx, id.0).await {
            Ok(Some(row)) => row,
            Ok(None) => {
                return Err(ApiError::conflict(
                    format!(
                        "job {} is {}; only dead or cancelled jobs can be retried",
                        id.0, before.state
                    ),
                    Some("state"),
                ));
            }
            Err(store::StoreError::Conflict(_)) => {
                return Err(ApiError::conflict(
                    format!(
                        "an unfinished job already holds unique key `{}`",
                        before.unique_key.as_deref().unwrap_or_default()
                    ),
                    Some("unique_key"),
                ));
            }
            Err(e) => return Err(e.into()),
        };
        caller
            .record(
                &mut tx,
                caller.audit(
                    "job_retry",
                    "job",
                    None,
                    serde_json::json!({ "job_id": row.id, "kind": row.kind, "from_state": before.state }),
                ),
            )
            .await?;
        tx.commit().await?;
        // Wake idle workers now rather than at their next poll; failure only delays the job.
        if let Ok(mut conn) = self.state.pool.acquire().await {
            let _ = store::jobs::job_notify(&mut conn).await;
        }
        Ok(Json(row.into()))
    }

    /// Cancel a job that has not finished (available, retryable or running), or a dead one so it
    /// is not retried. Cancelling a running job revokes its lease: the worker's further writes
    /// for it are refused. 409 for completed or already cancelled jobs, and for an unfinished
    /// job of an execution (`execution.*`), which is cancelled through the execution.
    ///
    /// Least role: admin.
    #[oai(
        path = "/jobs/:id/cancel",
        method = "post",
        operation_id = "job_cancel"
    )]
    async fn job_cancel(
        &self,
        req: &Request,
        auth: BearerAuth,
        /// Job id.
        id: Path<i64>,
    ) -> Result<Json<Job>, ApiError> {
        let caller = self.state.authorize(req, &auth, Role::Admin).await?;
        let mut tx = self.state.pool.begin().await?;
        let before = store::jobs::job_get(&mut tx, id.0)
            .await?
            .ok_or_else(|| ApiError::not_found("job", id.0))?;
        // A run's jobs carry its state from step to step: cancelling one would leave the run
        // `running` with nothing to move it on. The run is cancelled as a whole instead.
        if before.kind.starts_with("execution.") && before.state != "dead" {
            let execution = before
                .payload
                .get("execution_id")
                .and_then(|v| v.as_str())
                .map_or_else(|| "{id}".to_owned(), str::to_owned);
            return Err(ApiError::conflict(
                format!(
                    "job {} belongs to an execution; cancel the execution instead \
                     (POST /api/v1/executions/{execution}/cancel)",
                    id.0
                ),
                Some("kind"),
            ));
        }
        let row = store::jobs::job_cancel(&mut tx, id.0)
            .await?
            .ok_or_else(|| {
                ApiError::conflict(
                    format!("job {} is {}; it cannot be cancelled", id.0, before.state),
                    Some("state"),
                )
            })?;
        caller
            .record(
                &mut tx,
                caller.audit(
                    "job_cancel",
                    "job",
                    None,
                    serde_json::json!({ "job_id": row.id, "kind": row.kind, "from_state": before.state }),
                ),
            )
            .await?;
        tx.commit().await?;
        Ok(Json(row.into()))
    }

    /// Job counts per kind and state.
    ///
    /// Least role: operator.
    #[oai(path = "/counts", method = "get", operation_id = "job_count_list")]
    async fn job_count_list(
        &self,
        req: &Request,
        auth: BearerAuth,
    ) -> Result<Json<JobCounts>, ApiError> {
        self.state.authorize(req, &auth, Role::Operator).await?;
        let mut conn = self.state.pool.acquire().await?;
        let rows = store::jobs::job_counts(&mut conn).await?;
        Ok(Json(JobCounts {
            items: rows
                .into_iter()
                .map(|(kind, state, count)| JobCount {
                    kind,
                    state: JobState::parse(&state),
                    count,
                })
                .collect(),
        }))
    }

    /// List worker processes (running, stopped, or dead without a clean stop), most recently
    /// seen first.
    ///
    /// Least role: operator.
    #[oai(path = "/workers", method = "get", operation_id = "worker_list")]
    async fn worker_list(
        &self,
        req: &Request,
        auth: BearerAuth,
        /// Page size, 1 to 500 (default 50).
        #[oai(validator(minimum(value = "1"), maximum(value = "500")))]
        limit: Query<Option<i64>>,
        /// Rows to skip (default 0).
        #[oai(validator(minimum(value = "0")))]
        offset: Query<Option<i64>>,
    ) -> Result<Json<QueueWorkerPage>, ApiError> {
        self.state.authorize(req, &auth, Role::Operator).await?;
        let page = Page::parse(limit.0, offset.0)?;
        let mut conn = store::read_snapshot(&self.state.pool).await?;
        let (rows, total) =
            store::queue_workers::worker_list(&mut conn, page.limit, page.offset).await?;
        Ok(Json(QueueWorkerPage {
            items: rows.into_iter().map(QueueWorker::from).collect(),
            total,
            limit: page.limit,
            offset: page.offset,
        }))
    }
}
