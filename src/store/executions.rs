//! `runbook_executions`, `step_executions` and `execution_events`: the durable record of every
//! run. Status changes are compare-and-set updates guarded by the status the caller read, so
//! racing workers, approvers and cancellers produce exactly one outcome.

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::PgConnection;
use sqlx::types::Json;
use uuid::Uuid;

use super::StoreResult;

/// `SELECT <every ExecutionRow column> FROM runbook_executions <tail>`, as one static string.
macro_rules! select_execution {
    ($tail:literal) => {
        concat!(
            "SELECT id, runbook_id, runbook_version, server_id, alert_id, trigger_id, \
             status::text AS status, mode::text AS mode, created_at, started_at, completed_at, \
             duration_ms, initiated_by, approved_by, approved_at, error_message, output_summary, \
             context_vars, execution_log, runbook_snapshot, attempt, max_attempts, \
             awaiting_approval, approval_expires_at, cancel_requested_at, cancelled_by, batch_id, \
             batch_concurrency, breaker_probe, refused_by, secret_vars_encrypted \
             FROM runbook_executions ",
            $tail
        )
    };
}

/// `INSERT` of one live `status` event per entry of the jsonb array `$entries`, in array
/// order, for the execution `$id` selected `FROM $from` (a source to join, or empty).
macro_rules! insert_status_events {
    ($id:literal, $from:literal, $entries:literal) => {
        concat!(
            "INSERT INTO execution_events (execution_id, kind, data) SELECT ",
            $id,
            ", 'status', entry::text FROM ",
            $from,
            "jsonb_array_elements(",
            $entries,
            "::jsonb) WITH ORDINALITY AS t(entry, n) ORDER BY n"
        )
    };
}

/// The update that moves execution `$id` from pending|approved to running for attempt 1
/// (`started_at` set once), with breaker probe flag `$probe` and the jsonb log entry `$entry`
/// appended.
macro_rules! start_running_update {
    ($id:literal, $probe:literal, $entry:literal) => {
        concat!(
            "UPDATE runbook_executions SET status = 'running', attempt = 1, \
               started_at = COALESCE(started_at, now()), awaiting_approval = false, \
               breaker_probe = ",
            $probe,
            ", execution_log = execution_log || jsonb_build_array(",
            $entry,
            "::jsonb) WHERE id = ",
            $id,
            " AND status IN ('pending', 'approved')"
        )
    };
}

/// The assignments that end an execution: terminal status `$status`, completed_at and
/// duration_ms (none when it never started: a refused, rejected or expired run has no duration,
/// and `execution_stats.avg_duration_ms` averages the runs that ran), the reason `$error` and
/// summary `$summary` (each unchanged when NULL), and the jsonb array of log entries `$log`
/// appended.
macro_rules! end_assignments {
    ($status:literal, $error:literal, $summary:literal, $log:literal) => {
        concat!(
            "status = ",
            $status,
            "::execution_status, completed_at = now(), \
             duration_ms = CASE WHEN started_at IS NOT NULL THEN \
                 LEAST(extract(epoch FROM now() - started_at) * 1000, 2147483647)::integer END, \
             error_message = COALESCE(",
            $error,
            ", error_message), output_summary = COALESCE(",
            $summary,
            ", output_summary), awaiting_approval = false, \
             execution_log = execution_log || ",
            $log,
            "::jsonb"
        )
    };
}

/// `SELECT <every StepRow column> FROM step_executions <tail>`, as one static string.
macro_rules! select_step {
    ($distinct:literal, $tail:literal) => {
        concat!(
            "SELECT ",
            $distinct,
            " id, execution_id, step_id, step_order, step_name, status::text AS status, \
             started_at, completed_at, duration_ms, exit_code, stdout, stderr, retry_attempt, \
             phase, run_attempt, skipped, interrupted, truncated, error_message, command, \
             exit_signal, output_encrypted FROM step_executions ",
            $tail
        )
    };
}

/// A row of `runbook_executions` (status and mode as their enum labels).
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ExecutionRow {
    /// Id.
    pub id: Uuid,
    /// Runbook (None once deleted).
    pub runbook_id: Option<Uuid>,
    /// Runbook version at creation.
    pub runbook_version: i32,
    /// Target server (None: the worker's own host).
    pub server_id: Option<Uuid>,
    /// Triggering alert.
    pub alert_id: Option<Uuid>,
    /// Triggering trigger.
    pub trigger_id: Option<Uuid>,
    /// Status label.
    pub status: String,
    /// Mode label.
    pub mode: String,
    /// Request time.
    pub created_at: DateTime<Utc>,
    /// First start.
    pub started_at: Option<DateTime<Utc>>,
    /// End.
    pub completed_at: Option<DateTime<Utc>>,
    /// Duration.
    pub duration_ms: Option<i32>,
    /// Who started it manually.
    pub initiated_by: Option<Uuid>,
    /// Who approved it.
    pub approved_by: Option<Uuid>,
    /// When.
    pub approved_at: Option<DateTime<Utc>>,
    /// Failure or refusal reason.
    pub error_message: Option<String>,
    /// Summary of the run.
    pub output_summary: Option<String>,
    /// Variables given at start.
    pub context_vars: Value,
    /// Timeline of the run.
    pub execution_log: Value,
    /// The runbook as it was at creation.
    pub runbook_snapshot: Value,
    /// Current attempt.
    pub attempt: i32,
    /// Allowed attempts.
    pub max_attempts: i32,
    /// Waiting for an approval.
    pub awaiting_approval: bool,
    /// Approval deadline.
    pub approval_expires_at: Option<DateTime<Utc>>,
    /// Cancel request time.
    pub cancel_requested_at: Option<DateTime<Utc>>,
    /// Who cancelled.
    pub cancelled_by: Option<Uuid>,
    /// Fan-out batch.
    pub batch_id: Option<Uuid>,
    /// Fan-out concurrency.
    pub batch_concurrency: Option<i32>,
    /// Admitted as a half-open probe.
    pub breaker_probe: bool,
    /// The gate that refused the run.
    pub refused_by: Option<String>,
    /// Envelope of the secret variables (opened only by the worker running the steps).
    pub secret_vars_encrypted: Option<String>,
}

/// Fields of a new execution.
#[derive(Debug, Clone)]
pub struct NewExecution<'a> {
    /// Primary key, chosen by the caller (secret variables are sealed to it).
    pub id: Uuid,
    /// Runbook.
    pub runbook_id: Uuid,
    /// Its version.
    pub runbook_version: i32,
    /// Target server.
    pub server_id: Option<Uuid>,
    /// Triggering alert.
    pub alert_id: Option<Uuid>,
    /// Triggering trigger.
    pub trigger_id: Option<Uuid>,
    /// Mode label at creation.
    pub mode: &'a str,
    /// Who asked.
    pub initiated_by: Option<Uuid>,
    /// Variables.
    pub context_vars: &'a Value,
    /// The runbook snapshot.
    pub runbook_snapshot: &'a Value,
    /// max_retries + 1.
    pub max_attempts: i32,
    /// Fan-out batch.
    pub batch_id: Option<Uuid>,
    /// Fan-out concurrency.
    pub batch_concurrency: Option<i32>,
    /// Envelope of the secret variables.
    pub secret_vars_encrypted: Option<&'a str>,
    /// The first `execution_log` entry (also the first live event).
    pub log_entry: &'a Value,
}

/// Inserts a pending execution.
pub async fn execution_create(
    conn: &mut PgConnection,
    new: &NewExecution<'_>,
) -> StoreResult<Uuid> {
    Ok(sqlx::query_scalar(
        "WITH x AS (INSERT INTO runbook_executions (runbook_id, runbook_version, server_id, \
           alert_id, trigger_id, mode, initiated_by, context_vars, runbook_snapshot, max_attempts, \
           batch_id, batch_concurrency, id, secret_vars_encrypted, execution_log) \
         VALUES ($1, $2, $3, $4, $5, $6::execution_mode, $7, $8, $9, $10, $11, $12, $13, $14, \
                 jsonb_build_array($15::jsonb)) \
         RETURNING id), \
         e AS (INSERT INTO execution_events (execution_id, kind, data) \
               SELECT id, 'status', $15::text FROM x) \
         SELECT id FROM x",
    )
    .bind(new.runbook_id)
    .bind(new.runbook_version)
    .bind(new.server_id)
    .bind(new.alert_id)
    .bind(new.trigger_id)
    .bind(new.mode)
    .bind(new.initiated_by)
    .bind(new.context_vars)
    .bind(new.runbook_snapshot)
    .bind(new.max_attempts)
    .bind(new.batch_id)
    .bind(new.batch_concurrency)
    .bind(new.id)
    .bind(new.secret_vars_encrypted)
    .bind(new.log_entry)
    .fetch_one(conn)
    .await?)
}

/// Fetches one execution.
pub async fn execution_get(conn: &mut PgConnection, id: Uuid) -> StoreResult<Option<ExecutionRow>> {
    Ok(
        sqlx::query_as::<_, ExecutionRow>(select_execution!("WHERE id = $1"))
            .bind(id)
            .fetch_optional(conn)
            .await?,
    )
}

/// What the gates of an execution's start read without locks, in one round trip: the execution,
/// its runbook's current status, its server's selector facts, whether any enabled blackout
/// window has begun (only then need the windows be read and evaluated), and the state of its
/// runbook's circuit breaker.
#[derive(Debug, Clone)]
pub struct StartFacts {
    /// The execution.
    pub row: ExecutionRow,
    /// `runbooks.status` of `row.runbook_id` (`None`: the runbook is gone).
    pub runbook_status: Option<String>,
    /// `runbooks.category` of `row.runbook_id` as it is now (blackout windows select by it).
    pub runbook_category: Option<String>,
    /// The server's selector facts (`None`: no server, or it is gone).
    pub server: Option<crate::domain::blackout::ServerFacts>,
    /// Some enabled blackout window has begun (it may be over or not cover this run).
    pub blackout_windows_begun: bool,
    /// The state of the runbook's breaker (`None`: no breaker row).
    pub breaker_state: Option<String>,
}

#[derive(sqlx::FromRow)]
struct StartFactsRow {
    #[sqlx(flatten)]
    row: ExecutionRow,
    gate_runbook_status: Option<String>,
    gate_runbook_category: Option<String>,
    gate_server_id: Option<Uuid>,
    gate_server_tags: Option<Value>,
    gate_server_environment: Option<String>,
    gate_server_name: Option<String>,
    gate_blackouts_begun: bool,
    gate_breaker_state: Option<String>,
}

/// Reads the [`StartFacts`] of execution `id` at `now`.
pub async fn execution_start_facts(
    conn: &mut PgConnection,
    id: Uuid,
    now: DateTime<Utc>,
) -> StoreResult<Option<StartFacts>> {
    let found = sqlx::query_as::<_, StartFactsRow>(concat!(
        "SELECT e.*, \
           r.status::text AS gate_runbook_status, r.category AS gate_runbook_category, \
           s.id AS gate_server_id, s.tags AS gate_server_tags, \
           s.environment AS gate_server_environment, s.name AS gate_server_name, \
           EXISTS (SELECT 1 FROM blackout_windows WHERE enabled AND start_time <= $2) \
             AS gate_blackouts_begun, \
           b.state::text AS gate_breaker_state \
         FROM (",
        select_execution!("WHERE id = $1"),
        ") e \
         LEFT JOIN runbooks r ON r.id = e.runbook_id \
         LEFT JOIN server_credentials s ON s.id = e.server_id \
         LEFT JOIN circuit_breakers b ON b.runbook_id = e.runbook_id"
    ))
    .bind(id)
    .bind(now)
    .fetch_optional(conn)
    .await?;
    Ok(found.map(|f| StartFacts {
        row: f.row,
        runbook_status: f.gate_runbook_status,
        runbook_category: f.gate_runbook_category,
        server: f.gate_server_id.map(|id| {
            super::blackouts::server_facts(
                id,
                f.gate_server_tags,
                f.gate_server_environment,
                f.gate_server_name,
            )
        }),
        blackout_windows_begun: f.gate_blackouts_begun,
        breaker_state: f.gate_breaker_state,
    }))
}

/// Locks one execution for the rest of the transaction.
pub async fn execution_lock(
    conn: &mut PgConnection,
    id: Uuid,
) -> StoreResult<Option<ExecutionRow>> {
    Ok(
        sqlx::query_as::<_, ExecutionRow>(select_execution!("WHERE id = $1 FOR UPDATE"))
            .bind(id)
            .fetch_optional(conn)
            .await?,
    )
}

/// Filters for listing executions.
#[derive(Debug, Default, Clone)]
pub struct ExecutionFilter {
    /// Runbook.
    pub runbook_id: Option<Uuid>,
    /// Server.
    pub server_id: Option<Uuid>,
    /// Alert.
    pub alert_id: Option<Uuid>,
    /// Status label.
    pub status: Option<String>,
    /// Created at or after.
    pub since: Option<DateTime<Utc>>,
    /// Created before.
    pub until: Option<DateTime<Utc>>,
    /// Fan-out batch.
    pub batch_id: Option<Uuid>,
}

/// Lists executions, newest first.
pub async fn execution_list(
    conn: &mut PgConnection,
    f: &ExecutionFilter,
    limit: i64,
    offset: i64,
) -> StoreResult<(Vec<ExecutionRow>, i64)> {
    let rows = sqlx::query_as::<_, ExecutionRow>(select_execution!(
        "WHERE ($1::uuid IS NULL OR runbook_id = $1) AND ($2::uuid IS NULL OR server_id = $2) \
             AND ($3::uuid IS NULL OR alert_id = $3) AND ($4::text IS NULL OR status::text = $4) \
             AND ($5::timestamptz IS NULL OR created_at >= $5) \
             AND ($6::timestamptz IS NULL OR created_at < $6) \
             AND ($7::uuid IS NULL OR batch_id = $7) \
             ORDER BY created_at DESC, id LIMIT $8 OFFSET $9"
    ))
    .bind(f.runbook_id)
    .bind(f.server_id)
    .bind(f.alert_id)
    .bind(f.status.as_deref())
    .bind(f.since)
    .bind(f.until)
    .bind(f.batch_id)
    .bind(limit)
    .bind(offset)
    .fetch_all(&mut *conn)
    .await?;
    let total = sqlx::query_scalar(
        "SELECT count(*) FROM runbook_executions \
         WHERE ($1::uuid IS NULL OR runbook_id = $1) AND ($2::uuid IS NULL OR server_id = $2) \
           AND ($3::uuid IS NULL OR alert_id = $3) AND ($4::text IS NULL OR status::text = $4) \
           AND ($5::timestamptz IS NULL OR created_at >= $5) \
           AND ($6::timestamptz IS NULL OR created_at < $6) \
           AND ($7::uuid IS NULL OR batch_id = $7)",
    )
    .bind(f.runbook_id)
    .bind(f.server_id)
    .bind(f.alert_id)
    .bind(f.status.as_deref())
    .bind(f.since)
    .bind(f.until)
    .bind(f.batch_id)
    .fetch_one(conn)
    .await?;
    Ok((rows, total))
}

/// pending|approved -> running for attempt 1 (started_at set once): the execution's
/// `started_at`, or `None` when it was in neither state.
pub async fn execution_start(
    conn: &mut PgConnection,
    id: Uuid,
    breaker_probe: bool,
    log_entry: &Value,
) -> StoreResult<Option<DateTime<Utc>>> {
    Ok(sqlx::query_scalar(concat!(
        "WITH u AS (",
        start_running_update!("$1", "$2", "$3"),
        " RETURNING id, started_at), \
             e AS (INSERT INTO execution_events (execution_id, kind, data) \
                   SELECT id, 'status', $3::text FROM u) \
             SELECT (SELECT started_at FROM u)"
    ))
    .bind(id)
    .bind(breaker_probe)
    .bind(log_entry)
    .fetch_one(conn)
    .await?)
}

/// Moves a running execution to its next attempt.
pub async fn execution_next_attempt(
    conn: &mut PgConnection,
    id: Uuid,
    attempt: i32,
) -> StoreResult<bool> {
    let done = sqlx::query(
        "UPDATE runbook_executions SET attempt = $2 \
         WHERE id = $1 AND status = 'running' AND attempt = $2 - 1 AND $2 <= max_attempts",
    )
    .bind(id)
    .bind(attempt)
    .execute(conn)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// Records that the execution waits for approval until `expires_at`.
pub async fn execution_await_approval(
    conn: &mut PgConnection,
    id: Uuid,
    expires_at: DateTime<Utc>,
) -> StoreResult<bool> {
    let done = sqlx::query(
        "UPDATE runbook_executions SET awaiting_approval = true, approval_expires_at = $2 \
         WHERE id = $1 AND status = 'pending' AND NOT awaiting_approval",
    )
    .bind(id)
    .bind(expires_at)
    .execute(conn)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// pending (awaiting approval, not expired) -> approved. Compare-and-set: of two racing
/// approvers exactly one succeeds.
pub async fn execution_approve(conn: &mut PgConnection, id: Uuid, user: Uuid) -> StoreResult<bool> {
    let done = sqlx::query(
        "UPDATE runbook_executions SET status = 'approved', approved_by = $2, approved_at = now(), \
           awaiting_approval = false \
         WHERE id = $1 AND status = 'pending' AND awaiting_approval \
           AND (approval_expires_at IS NULL OR approval_expires_at > now())",
    )
    .bind(id)
    .bind(user)
    .execute(conn)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// How an execution ends: the terminal status, the statuses it may end from, and what is
/// recorded with it.
#[derive(Debug, Default)]
pub struct ExecutionEnd<'a> {
    /// Statuses the execution may be in for the end to apply.
    pub from: &'a [&'a str],
    /// The terminal status.
    pub to: &'a str,
    /// Reason, kept in `error_message` (unchanged when `None`).
    pub error_message: Option<&'a str>,
    /// Kept in `output_summary` (unchanged when `None`).
    pub output_summary: Option<&'a str>,
    /// The gate that refused the run.
    pub refused_by: Option<&'a str>,
    /// Entries appended to `execution_log` and the live stream, in order, only if the end
    /// applied.
    pub log: &'a [Value],
    /// The unique key of a job that has not started (`available` or `retryable`) and that the
    /// end makes unnecessary, such as the runbook deadline's timer: cancelled in the same
    /// statement, whether or not the end applied.
    pub cancel_pending_job: Option<&'a str>,
}

/// Ends an execution with a terminal status if it is still in one of `end.from`; sets
/// completed_at, duration_ms (from started_at; none when it never started), the reason and
/// summary, appends the log entries and cancels `end.cancel_pending_job`, in one statement: one
/// new version of the row. Returns whether it applied.
pub async fn execution_finish(
    conn: &mut PgConnection,
    id: Uuid,
    end: &ExecutionEnd<'_>,
) -> StoreResult<bool> {
    let from: Vec<String> = end.from.iter().map(|s| s.to_string()).collect();
    let done = sqlx::query(concat!(
        "WITH u AS (UPDATE runbook_executions SET ",
        end_assignments!("$3", "$4", "$5", "$8"),
        ", refused_by = COALESCE($6, refused_by) \
           WHERE id = $1 AND status::text = ANY($2) \
           RETURNING id), \
         e AS (",
        insert_status_events!("u.id", "u, ", "$8"),
        "), timer AS (",
        crate::store::jobs::cancel_pending_by_key!("$9"),
        ") SELECT pg_notify($7, id::text) FROM u",
    ))
    .bind(id)
    .bind(&from)
    .bind(end.to)
    .bind(end.error_message)
    .bind(end.output_summary)
    .bind(end.refused_by)
    .bind(CONTROL_CHANNEL)
    .bind(Json(end.log))
    .bind(end.cancel_pending_job)
    .execute(conn)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// The channel that carries "execution X ended" (payload: the execution id), sent on commit of
/// every end of an execution (completed, failed, timeout, cancelled): a worker running one of
/// its steps stops the command at once instead of at its next status poll.
pub const CONTROL_CHANNEL: &str = "aiops_execution_control";

/// Names the gate that refused an execution (`refused_by`), for a refusal that ended it
/// through a cancel (a runbook-level retry refused when it was to begin).
pub async fn execution_set_refused_by(
    conn: &mut PgConnection,
    id: Uuid,
    gate: &str,
) -> StoreResult<()> {
    sqlx::query("UPDATE runbook_executions SET refused_by = $2 WHERE id = $1")
        .bind(id)
        .bind(gate)
        .execute(conn)
        .await?;
    Ok(())
}

/// A job of a run that died with its attempts exhausted.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct DeadJob {
    /// The run.
    pub execution_id: Uuid,
    /// The job.
    pub job_id: i64,
    /// Its kind (`execution.step`, `execution.rollback`, `execution.start`).
    pub kind: String,
    /// Its payload.
    pub payload: serde_json::Value,
    /// Its last error.
    pub last_error: Option<String>,
}

/// Jobs of runs that died (attempts exhausted) in the last day and that nothing moves on: no
/// job of the run is left to run, and the run has not recorded the death (`job_died` in its
/// log). A start job matters while its run is pending or approved, a step job while its run
/// runs, a rollback job whatever the run's status (the rollbacks after a failure run after the
/// end). Oldest first.
pub async fn dead_jobs_unhandled(conn: &mut PgConnection) -> StoreResult<Vec<DeadJob>> {
    Ok(sqlx::query_as::<_, DeadJob>(
        "SELECT e.id AS execution_id, j.id AS job_id, j.kind, j.payload, j.last_error \
         FROM jobs j JOIN runbook_executions e ON e.id::text = j.payload->>'execution_id' \
         WHERE j.state = 'dead' AND j.finished_at > now() - interval '1 day' \
           AND ((j.kind = 'execution.start' AND e.status IN ('pending', 'approved')) \
             OR (j.kind = 'execution.step' AND e.status = 'running') \
             OR j.kind = 'execution.rollback') \
           AND NOT e.execution_log @> jsonb_build_array(jsonb_build_object( \
                 'event', 'job_died', 'details', jsonb_build_object('job', j.id))) \
           AND NOT EXISTS (SELECT 1 FROM jobs o \
               WHERE o.kind IN ('execution.step', 'execution.rollback', 'execution.start') \
                 AND o.state IN ('available', 'retryable', 'running') \
                 AND o.payload->>'execution_id' = j.payload->>'execution_id') \
         ORDER BY j.finished_at, j.id",
    )
    .fetch_all(conn)
    .await?)
}

/// The `SET` of an attempt row marked interrupted (its worker died, or its job did), with
/// `$reason` as its error: failed, ended now, keeping the output it streamed to the live log
/// (masked as it was streamed) as its stdout and stderr. The row is aliased `s`.
macro_rules! interrupted_set {
    ($reason:literal) => {
        concat!(
            "status = 'failed', interrupted = true, completed_at = now(), \
             duration_ms = LEAST(extract(epoch FROM now() - started_at) * 1000, \
                                 2147483647)::integer, \
             error_message = ",
            $reason,
            ", stdout = COALESCE(s.stdout, (SELECT string_agg(e.data, '' ORDER BY e.id) \
                 FROM execution_events e WHERE e.execution_id = s.execution_id \
                   AND e.step_execution_id = s.id AND e.kind = 'stdout')), \
             stderr = COALESCE(s.stderr, (SELECT string_agg(e.data, '' ORDER BY e.id) \
                 FROM execution_events e WHERE e.execution_id = s.execution_id \
                   AND e.step_execution_id = s.id AND e.kind = 'stderr')) "
        )
    };
}

/// The live status event of each attempt row a CTE `$cte` marked interrupted (it returns
/// `id, step_name, step_order, phase, run_attempt`), for execution `$1`.
macro_rules! interrupted_events {
    ($cte:literal) => {
        concat!(
            "INSERT INTO execution_events (execution_id, step_execution_id, kind, data) \
             SELECT $1, i.id, 'status', json_build_object('step', i.step_name, \
                 'step_order', i.step_order, 'phase', i.phase, 'status', 'failed', \
                 'interrupted', true, 'attempt', i.run_attempt)::text FROM ",
            $cte,
            " i"
        )
    };
}

/// Closes the attempt rows of an execution still `running` whose job died: failed and
/// interrupted, with `reason`, keeping the output they streamed; each gets its status event on
/// the live stream. Returns how many were closed.
pub async fn steps_close_dead(
    conn: &mut PgConnection,
    execution_id: Uuid,
    reason: &str,
) -> StoreResult<u64> {
    let done = sqlx::query(concat!(
        "WITH closed AS (UPDATE step_executions s SET ",
        interrupted_set!("$2"),
        "WHERE execution_id = $1 AND status = 'running' \
         RETURNING id, step_name, step_order, phase, run_attempt) ",
        interrupted_events!("closed")
    ))
    .bind(execution_id)
    .bind(reason)
    .execute(conn)
    .await?;
    Ok(done.rows_affected())
}

/// Records a cancel request (idempotent); returns the row's status after the request.
pub async fn execution_request_cancel(
    conn: &mut PgConnection,
    id: Uuid,
    user: Option<Uuid>,
) -> StoreResult<()> {
    sqlx::query(
        "UPDATE runbook_executions SET cancel_requested_at = COALESCE(cancel_requested_at, now()), \
           cancelled_by = COALESCE(cancelled_by, $2) WHERE id = $1",
    )
    .bind(id)
    .bind(user)
    .execute(conn)
    .await?;
    Ok(())
}

/// Appends entries to `execution_log` and the same entries, in order, as `status` events to the
/// live stream, in one statement.
pub async fn execution_log_append(
    conn: &mut PgConnection,
    id: Uuid,
    entries: &[Value],
) -> StoreResult<()> {
    sqlx::query(concat!(
        "WITH l AS (UPDATE runbook_executions SET execution_log = execution_log || $2::jsonb \
                    WHERE id = $1), \
              e AS (",
        insert_status_events!("$1", "", "$2"),
        ") SELECT 1",
    ))
    .bind(id)
    .bind(Json(entries))
    .execute(conn)
    .await?;
    Ok(())
}

/// Status label of one execution (cheap; polled by running steps to notice cancellation).
pub async fn execution_status(
    conn: &mut PgConnection,
    id: Uuid,
) -> StoreResult<Option<(String, bool)>> {
    Ok(sqlx::query_as(
        "SELECT status::text, cancel_requested_at IS NOT NULL FROM runbook_executions WHERE id = $1",
    )
    .bind(id)
    .fetch_optional(conn)
    .await?)
}

/// Whether a live stream of the execution may end: the execution has finished, and nothing of
/// it still writes events (no attempt row still running, as the step a cancel or timeout
/// stopped is until its worker records it, and no rollback job left to run), or it finished
/// more than `settle_seconds` ago (a worker that died mid-step never records its attempt).
/// `rollback_kind` is the rollback jobs' kind. `None` when the execution does not exist.
pub async fn execution_stream_settled(
    conn: &mut PgConnection,
    id: Uuid,
    settle_seconds: i32,
    rollback_kind: &str,
) -> StoreResult<Option<bool>> {
    Ok(sqlx::query_scalar(
        "SELECT e.status IN ('completed', 'failed', 'cancelled', 'timeout') \
           AND (e.completed_at IS NULL \
                OR e.completed_at < now() - make_interval(secs => $2) \
                OR (NOT EXISTS (SELECT 1 FROM step_executions s \
                                WHERE s.execution_id = e.id AND s.status = 'running') \
                    AND NOT EXISTS (SELECT 1 FROM jobs j \
                                WHERE j.kind = $3 \
                                  AND j.state IN ('available', 'running', 'retryable') \
                                  AND j.payload->>'execution_id' = e.id::text))) \
         FROM runbook_executions e WHERE e.id = $1",
    )
    .bind(id)
    .bind(settle_seconds)
    .bind(rollback_kind)
    .fetch_optional(conn)
    .await?)
}

/// Whether an attempt row of run attempt `attempt` is still `running` although the run has
/// ended, less than `wait_seconds` ago: the step a timeout or cancel stopped, whose worker has
/// not yet recorded it (its command may still be in its kill grace). A worker that died never
/// records it; after `wait_seconds` it no longer counts.
pub async fn stopped_step_unrecorded(
    conn: &mut PgConnection,
    id: Uuid,
    attempt: i32,
    wait_seconds: i32,
) -> StoreResult<bool> {
    Ok(sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM step_executions s \
                          JOIN runbook_executions e ON e.id = s.execution_id \
                        WHERE s.execution_id = $1 AND s.phase = 'run' AND s.run_attempt = $2 \
                          AND s.status = 'running' \
                          AND coalesce(e.completed_at, now()) > now() - make_interval(secs => $3))",
    )
    .bind(id)
    .bind(attempt)
    .bind(wait_seconds)
    .fetch_one(conn)
    .await?)
}

/// Executions of a runbook that started within the window (rate limiting). Call under the
/// runbook's advisory lock.
pub async fn execution_count_started_since(
    conn: &mut PgConnection,
    runbook_id: Uuid,
    since: DateTime<Utc>,
) -> StoreResult<i64> {
    Ok(sqlx::query_scalar(
        "SELECT count(*) FROM runbook_executions WHERE runbook_id = $1 AND started_at >= $2",
    )
    .bind(runbook_id)
    .bind(since)
    .fetch_one(conn)
    .await?)
}

/// Half-open probes of a runbook still running.
pub async fn execution_count_probes_running(
    conn: &mut PgConnection,
    runbook_id: Uuid,
) -> StoreResult<i64> {
    Ok(sqlx::query_scalar(
        "SELECT count(*) FROM runbook_executions \
         WHERE runbook_id = $1 AND breaker_probe AND status = 'running'",
    )
    .bind(runbook_id)
    .fetch_one(conn)
    .await?)
}

/// Whether an execution (`e`) still acts on its server: running, or ended with rollback jobs
/// (kind `$rollback`) still to run.
macro_rules! acting_on_server_sql {
    ($rollback:literal) => {
        concat!(
            "(e.status IN ('pending', 'approved', 'running') \
              OR (e.status IN ('failed', 'cancelled', 'timeout') \
                  AND EXISTS (SELECT 1 FROM jobs j WHERE j.kind = ",
            $rollback,
            " AND j.state IN ('available', 'running', 'retryable') \
                  AND j.payload->>'execution_id' = e.id::text)))"
        )
    };
}

/// How many executions of a fan-out batch hold a slot of its concurrency: running, or rolling
/// back after they ended (a one-at-a-time rollout never touches two hosts at once).
pub async fn execution_count_running_in_batch(
    conn: &mut PgConnection,
    batch_id: Uuid,
    rollback_kind: &str,
) -> StoreResult<i64> {
    Ok(sqlx::query_scalar(concat!(
        "SELECT count(*) FROM runbook_executions e WHERE e.batch_id = $1 \
           AND e.status NOT IN ('pending', 'approved') AND ",
        acting_on_server_sql!("$2")
    ))
    .bind(batch_id)
    .bind(rollback_kind)
    .fetch_one(conn)
    .await?)
}

/// How many executions that still act on the server (see [`acting_on_server_sql!`]) target
/// it; a server is not deleted from under them.
pub async fn execution_count_acting_on_server(
    conn: &mut PgConnection,
    server_id: Uuid,
    rollback_kind: &str,
) -> StoreResult<i64> {
    Ok(sqlx::query_scalar(concat!(
        "SELECT count(*) FROM runbook_executions e WHERE e.server_id = $1 AND ",
        acting_on_server_sql!("$2")
    ))
    .bind(server_id)
    .bind(rollback_kind)
    .fetch_one(conn)
    .await?)
}

/// A row of `step_executions`.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct StepRow {
    /// Id.
    pub id: Uuid,
    /// Execution.
    pub execution_id: Uuid,
    /// Step definition (None once deleted).
    pub step_id: Option<Uuid>,
    /// Position.
    pub step_order: i32,
    /// Name.
    pub step_name: String,
    /// Status label.
    pub status: String,
    /// Start.
    pub started_at: Option<DateTime<Utc>>,
    /// End.
    pub completed_at: Option<DateTime<Utc>>,
    /// Duration.
    pub duration_ms: Option<i32>,
    /// Exit code.
    pub exit_code: Option<i32>,
    /// Captured stdout (masked, capped).
    pub stdout: Option<String>,
    /// Captured stderr (masked, capped).
    pub stderr: Option<String>,
    /// Step-level retry number, from 0.
    pub retry_attempt: i32,
    /// run or rollback.
    pub phase: String,
    /// Runbook-level attempt.
    pub run_attempt: i32,
    /// Condition was false.
    pub skipped: bool,
    /// The worker died during this attempt.
    pub interrupted: bool,
    /// Output was cut.
    pub truncated: bool,
    /// Why it failed.
    pub error_message: Option<String>,
    /// The command as run (masked).
    pub command: Option<String>,
    /// Signal that ended the command.
    pub exit_signal: Option<String>,
    /// Sealed captured output of a sensitive step (never returned by the API).
    pub output_encrypted: Option<String>,
}

/// Identifies one step slot of one attempt.
#[derive(Debug, Clone, Copy)]
pub struct StepSlot<'a> {
    /// Execution.
    pub execution_id: Uuid,
    /// run or rollback.
    pub phase: &'a str,
    /// Runbook-level attempt.
    pub run_attempt: i32,
    /// Position.
    pub step_order: i32,
}

/// A slot's state before a new attempt, in one statement: whether it already completed (a
/// completed step never runs again), the attempts left `running` by a dead worker that were
/// just marked interrupted, and how many attempts ended on their own (the next
/// `retry_attempt`: an attempt a dying worker left unfinished is run again as the same try, not
/// as a retry). An interrupted attempt keeps the output it streamed to the live log (masked as
/// it was streamed) as its stdout and stderr.
pub async fn step_slot_prepare(
    conn: &mut PgConnection,
    slot: StepSlot<'_>,
) -> StoreResult<(bool, Vec<Uuid>, i64)> {
    Ok(sqlx::query_as(concat!(
        "WITH interrupted AS ( \
             UPDATE step_executions s SET ",
        interrupted_set!(
            "'interrupted: its result was never recorded (the worker running it stopped, \
                 or could not write the result)'"
        ),
        "WHERE execution_id = $1 AND phase = $2 AND run_attempt = $3 AND step_order = $4 \
               AND status = 'running' \
             RETURNING id, step_name, step_order, phase, run_attempt), \
         ended AS (",
        interrupted_events!("interrupted"),
        "), \
         slot AS ( \
             SELECT status, interrupted FROM step_executions \
             WHERE execution_id = $1 AND phase = $2 AND run_attempt = $3 AND step_order = $4) \
         SELECT EXISTS (SELECT 1 FROM slot WHERE status = 'completed'), \
                ARRAY(SELECT id FROM interrupted), \
                (SELECT count(*) FROM slot WHERE status <> 'running' AND NOT interrupted)"
    ))
    .bind(slot.execution_id)
    .bind(slot.phase)
    .bind(slot.run_attempt)
    .bind(slot.step_order)
    .fetch_one(conn)
    .await?)
}

/// Gives interrupted attempts that never recorded their command (the attempt row was written
/// before the command was rendered) the command as rendered for the attempt that replaces
/// them, from the same inputs.
pub async fn step_interrupted_command(
    conn: &mut PgConnection,
    ids: &[Uuid],
    command: &str,
) -> StoreResult<()> {
    sqlx::query("UPDATE step_executions SET command = $2 WHERE id = ANY($1) AND command IS NULL")
        .bind(ids)
        .bind(command)
        .execute(conn)
        .await?;
    Ok(())
}

/// Inserts a running attempt row (with the given id, or a new one) and, when `event` is given,
/// that `status` event for the live stream, in one statement.
#[allow(clippy::too_many_arguments)]
pub async fn step_start(
    conn: &mut PgConnection,
    id: Option<Uuid>,
    slot: StepSlot<'_>,
    step_id: Option<Uuid>,
    step_name: &str,
    retry_attempt: i32,
    command: Option<&str>,
    event: Option<&str>,
) -> StoreResult<Uuid> {
    Ok(sqlx::query_scalar(
        "WITH s AS ( \
             INSERT INTO step_executions (id, execution_id, step_id, step_order, step_name, \
               status, started_at, retry_attempt, phase, run_attempt, command) \
             VALUES (COALESCE($10, gen_random_uuid()), $1, \
                     (SELECT id FROM runbook_steps WHERE id = $2), $3, $4, 'running', now(), \
                     $5, $6, $7, $8) \
             RETURNING id), \
         e AS ( \
             INSERT INTO execution_events (execution_id, step_execution_id, kind, data) \
             SELECT $1, s.id, 'status', $9 FROM s WHERE $9::text IS NOT NULL) \
         SELECT id FROM s",
    )
    .bind(slot.execution_id)
    .bind(step_id)
    .bind(slot.step_order)
    .bind(step_name)
    .bind(retry_attempt)
    .bind(slot.phase)
    .bind(slot.run_attempt)
    .bind(command)
    .bind(event)
    .bind(id)
    .fetch_one(conn)
    .await?)
}

/// The result of one attempt.
#[derive(Debug, Clone, Default)]
pub struct StepResult<'a> {
    /// Final status label (completed, failed, cancelled, timeout).
    pub status: &'a str,
    /// Exit code.
    pub exit_code: Option<i32>,
    /// Signal.
    pub exit_signal: Option<&'a str>,
    /// stdout (masked, capped).
    pub stdout: Option<&'a str>,
    /// stderr (masked, capped).
    pub stderr: Option<&'a str>,
    /// Output was cut.
    pub truncated: bool,
    /// Condition false.
    pub skipped: bool,
    /// Why it failed.
    pub error_message: Option<&'a str>,
    /// The command as run (masked).
    pub command: Option<&'a str>,
    /// Sealed captured output (sensitive steps with capture_output).
    pub output_encrypted: Option<&'a str>,
}

/// What [`step_finish`] found.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct StepFinished {
    /// The attempt was still running and is now finished.
    pub updated: bool,
    /// The execution's status as the statement read it (not locked).
    pub execution_status: Option<String>,
    /// The execution's run attempt as the statement read it.
    pub execution_attempt: Option<i32>,
}

/// Binds a result's status, exit code, signal, stdout, stderr, truncated, skipped, error and
/// command, in that order.
fn bind_result<'q, O>(
    q: crate::store::jobs::PgQueryAs<'q, O>,
    r: &'q StepResult<'q>,
) -> crate::store::jobs::PgQueryAs<'q, O> {
    q.bind(r.status)
        .bind(r.exit_code)
        .bind(r.exit_signal)
        .bind(r.stdout)
        .bind(r.stderr)
        .bind(r.truncated)
        .bind(r.skipped)
        .bind(r.error_message)
        .bind(r.command)
}

/// The update that finishes running attempt `id` with a result: the parameter numbers of id,
/// status, exit code, signal, stdout, stderr, truncated, skipped, error, command, sealed output.
macro_rules! step_finish_update {
    ($id:literal, $status:literal, $code:literal, $signal:literal, $stdout:literal,
     $stderr:literal, $truncated:literal, $skipped:literal, $error:literal, $command:literal,
     $sealed:literal) => {
        concat!(
            "UPDATE step_executions SET status = ",
            $status,
            "::execution_status, \
               completed_at = now(), \
               duration_ms = LEAST(extract(epoch FROM now() - started_at) * 1000, \
                                   2147483647)::integer, \
               exit_code = ",
            $code,
            ", exit_signal = ",
            $signal,
            ", stdout = ",
            $stdout,
            ", stderr = ",
            $stderr,
            ", truncated = ",
            $truncated,
            ", skipped = ",
            $skipped,
            ", error_message = ",
            $error,
            ", command = COALESCE(",
            $command,
            ", command), \
               output_encrypted = ",
            $sealed,
            " WHERE id = ",
            $id,
            " AND status = 'running'"
        )
    };
}

/// Sets a prepared attempt row's start to now, when its job starts later than the row was
/// written (its duration then counts from when the command started).
pub async fn step_restart_clock(conn: &mut PgConnection, id: Uuid) -> StoreResult<()> {
    sqlx::query(
        "UPDATE step_executions SET started_at = now() WHERE id = $1 AND status = 'running'",
    )
    .bind(id)
    .execute(conn)
    .await?;
    Ok(())
}

/// Records the end of a running attempt and, when `event` is given, appends that `status`
/// event for the live stream, in one statement, which also reads the execution's status and
/// attempt (without locking the row). `updated` is false when the attempt was no longer
/// running.
pub async fn step_finish(
    conn: &mut PgConnection,
    id: Uuid,
    r: &StepResult<'_>,
    event: Option<&str>,
) -> StoreResult<StepFinished> {
    let q = sqlx::query_as::<_, StepFinished>(concat!(
        "WITH u AS (",
        step_finish_update!(
            "$1", "$2", "$3", "$4", "$5", "$6", "$7", "$8", "$9", "$10", "$12"
        ),
        " RETURNING execution_id), \
         e AS ( \
             INSERT INTO execution_events (execution_id, step_execution_id, kind, data) \
             SELECT execution_id, $1, 'status', $11 FROM step_executions \
             WHERE id = $1 AND $11::text IS NOT NULL) \
         SELECT EXISTS (SELECT 1 FROM u) AS updated, x.status::text AS execution_status, \
                x.attempt AS execution_attempt \
         FROM (SELECT 1) one \
         LEFT JOIN runbook_executions x \
           ON x.id = (SELECT execution_id FROM step_executions WHERE id = $1)"
    ))
    .bind(id);
    Ok(bind_result(q, r)
        .bind(event)
        .bind(r.output_encrypted)
        .fetch_one(conn)
        .await?)
}

/// The step that follows at once: its attempt row, inserted `running` with the job that runs it.
#[derive(Debug, Clone, Copy)]
pub struct NextStep<'a> {
    /// Id of the attempt row (carried in the job's payload).
    pub row_id: Uuid,
    /// The runbook step, when it still exists.
    pub step_id: Option<Uuid>,
    /// Position.
    pub step_order: i32,
    /// Name.
    pub step_name: &'a str,
    /// Its live `status` event.
    pub event: &'a str,
}

/// The writes of a step attempt that completed and is followed at once by the next step, for
/// [`crate::queue::Lease::complete_continuing`] (one statement with the job's completion and
/// the next step's job): the attempt row finished with `r` and its `finish_event`; then, only
/// while execution `execution_id` is still `running` in run attempt `attempt` (read in the
/// statement, not locked: the next job reads the status again before it runs), the next job
/// and `next`'s attempt row with its event. Both events are appended by one insert, the finish
/// first: one table write fewer per step (each costs the table's constraint and trigger set-up).
pub fn step_advance_writes<'q>(
    execution_id: Uuid,
    attempt: i32,
    id: Uuid,
    r: &'q StepResult<'q>,
    finish_event: &'q str,
    next: NextStep<'q>,
) -> crate::store::jobs::HandlerWrites<
    impl FnOnce(crate::store::jobs::ContinuingQuery<'q>) -> crate::store::jobs::ContinuingQuery<'q>,
> {
    crate::store::jobs::HandlerWrites {
        before: concat!(
            "fin AS (",
            step_finish_update!(
                "$13", "$14", "$15", "$16", "$17", "$18", "$19", "$20", "$21", "$22", "$23"
            ),
            " AND EXISTS (SELECT 1 FROM fence)), \
             go AS (SELECT 1 FROM runbook_executions \
                    WHERE id = $11 AND status = 'running' AND attempt = $12),"
        ),
        after: "prep AS (INSERT INTO step_executions (id, execution_id, step_id, step_order, \
                           step_name, status, started_at, retry_attempt, phase, run_attempt) \
                         SELECT $25, $11, (SELECT id FROM runbook_steps WHERE id = $26), $27, \
                                $28, 'running', now(), 0, 'run', $12 FROM nxt), \
                events AS (INSERT INTO execution_events (execution_id, step_execution_id, kind, \
                             data) \
                           SELECT $11, $13, 'status', $24 WHERE EXISTS (SELECT 1 FROM fence) \
                           UNION ALL \
                           SELECT $11, $25, 'status', $29 FROM nxt),",
        bind: move |q: crate::store::jobs::ContinuingQuery<'q>| {
            bind_result(q.bind(execution_id).bind(attempt).bind(id), r)
                .bind(r.output_encrypted)
                .bind(finish_event)
                .bind(next.row_id)
                .bind(next.step_id)
                .bind(next.step_order)
                .bind(next.step_name)
                .bind(next.event)
        },
    }
}

/// The writes of an execution's start whose gates all passed, for
/// [`crate::queue::Lease::complete_continuing`] (one statement with the start job's completion
/// and the first step's job): pending|approved -> running for attempt 1 as
/// [`execution_start`] does it (a compare-and-set: nothing is written when a cancel or another
/// start committed first), with `log_entry` appended and streamed; the runbook deadline's timer
/// `deadline` enqueued; and the first step's attempt row `first` inserted `running` with its
/// event, with the step's job.
pub fn execution_start_writes<'q>(
    execution_id: Uuid,
    log_entry: &'q Value,
    deadline: &'q crate::queue::NewJob,
    first: NextStep<'q>,
) -> crate::store::jobs::HandlerWrites<
    impl FnOnce(crate::store::jobs::ContinuingQuery<'q>) -> crate::store::jobs::ContinuingQuery<'q>,
> {
    crate::store::jobs::HandlerWrites {
        before: concat!(
            "go AS (",
            start_running_update!("$11", "false", "$12"),
            " AND EXISTS (SELECT 1 FROM fence) RETURNING id),"
        ),
        after: concat!(
            "timer AS (",
            crate::store::jobs::enqueue_insert!(
                "SELECT $13, $14, $15, COALESCE($16, now()), $17, $18, $19 FROM go"
            ),
            "), \
                prep AS (INSERT INTO step_executions (id, execution_id, step_id, step_order, \
                           step_name, status, started_at, retry_attempt, phase, run_attempt) \
                         SELECT $20, $11, (SELECT id FROM runbook_steps WHERE id = $21), $22, \
                                $23, 'running', now(), 0, 'run', 1 FROM nxt), \
                events AS (INSERT INTO execution_events (execution_id, step_execution_id, kind, \
                             data) \
                           SELECT $11, NULL::uuid, 'status', $12::text FROM go \
                           UNION ALL \
                           SELECT $11, $20, 'status', $24 FROM nxt),"
        ),
        bind: move |q: crate::store::jobs::ContinuingQuery<'q>| {
            crate::store::jobs::bind_job(q.bind(execution_id).bind(Json(log_entry)), deadline)
                .bind(first.row_id)
                .bind(first.step_id)
                .bind(first.step_order)
                .bind(first.step_name)
                .bind(first.event)
        },
    }
}

/// How a run that succeeded ends, decided by the engine before the statement that records it.
#[derive(Debug, Clone, Copy)]
pub struct RunEnd<'a> {
    /// The execution.
    pub execution_id: Uuid,
    /// The run attempt that must still be running for the end to apply.
    pub attempt: i32,
    /// The terminal status.
    pub to: &'a str,
    /// Reason, kept in `error_message` (unchanged when `None`).
    pub error_message: Option<&'a str>,
    /// Kept in `output_summary`.
    pub output_summary: &'a str,
    /// Entries appended to `execution_log` and the live stream, in order (a JSON array).
    pub log: &'a Value,
    /// The unique key of the runbook deadline's timer, cancelled if it has not started.
    pub cancel_pending_job: &'a str,
}

/// The writes of the last step attempt of a run that ends with it, for
/// [`crate::queue::Lease::complete_with`] (one statement with the job's completion): the attempt
/// row finished with `r` and its `finish_event`; then, only while the execution is still
/// `running` in run attempt `end.attempt` (the compare-and-set that orders this end against a
/// cancel or timeout that commits first), the execution ends as [`execution_finish`] ends it,
/// with [`CONTROL_CHANNEL`] notified on commit. The finish event comes before the log entries
/// in the live stream. The deadline's timer is cancelled when the end applied (an end that
/// committed first cancelled it itself). Because the timer's update reads `u`, the statement
/// locks the execution row before the timer's job row, the order [`execution_finish`] takes
/// them in, so a cancel racing this end waits for it instead of deadlocking with it.
pub fn step_end_run_writes<'q>(
    id: Uuid,
    r: &'q StepResult<'q>,
    finish_event: &'q str,
    end: RunEnd<'q>,
) -> crate::store::jobs::FinalWrites<
    impl FnOnce(crate::store::jobs::FinalQuery<'q>) -> crate::store::jobs::FinalQuery<'q>,
> {
    crate::store::jobs::FinalWrites {
        ctes: concat!(
            "fin AS (",
            step_finish_update!(
                "$3", "$4", "$5", "$6", "$7", "$8", "$9", "$10", "$11", "$12", "$13"
            ),
            " AND EXISTS (SELECT 1 FROM fence)), \
             u AS (UPDATE runbook_executions SET ",
            end_assignments!("$17", "$18", "$19", "$20"),
            " WHERE id = $15 AND status = 'running' AND attempt = $16 \
                     AND EXISTS (SELECT 1 FROM fence) \
                   RETURNING id, pg_notify($21, id::text)), \
             events AS (INSERT INTO execution_events (execution_id, step_execution_id, kind, data) \
                        SELECT $15, ev.step, 'status', ev.data FROM ( \
                          SELECT 0::bigint AS n, $3::uuid AS step, $14::text AS data \
                          WHERE EXISTS (SELECT 1 FROM fence) \
                          UNION ALL \
                          SELECT t.n, NULL, t.entry::text \
                          FROM u, jsonb_array_elements($20::jsonb) WITH ORDINALITY AS t(entry, n) \
                        ) ev ORDER BY ev.n), \
             timer AS (",
            crate::store::jobs::cancel_pending_by_key!("$22"),
            " AND EXISTS (SELECT 1 FROM u)),"
        ),
        bind: move |q: crate::store::jobs::FinalQuery<'q>| {
            bind_result(q.bind(id), r)
                .bind(r.output_encrypted)
                .bind(finish_event)
                .bind(end.execution_id)
                .bind(end.attempt)
                .bind(end.to)
                .bind(end.error_message)
                .bind(end.output_summary)
                .bind(Json(end.log))
                .bind(CONTROL_CHANNEL)
                .bind(end.cancel_pending_job)
        },
    }
}

/// Every step row of an execution, in execution order.
pub async fn step_list(conn: &mut PgConnection, execution_id: Uuid) -> StoreResult<Vec<StepRow>> {
    Ok(sqlx::query_as::<_, StepRow>(select_step!(
        "",
        "WHERE execution_id = $1 ORDER BY started_at NULLS LAST, run_attempt, \
             CASE phase WHEN 'run' THEN 0 ELSE 1 END, step_order, retry_attempt"
    ))
    .bind(execution_id)
    .fetch_all(conn)
    .await?)
}

/// The latest finished run row of each step of an attempt (completed, failed or timed out;
/// not interrupted): the outputs later steps read (a step reads as its last attempt) and the
/// steps a rollback undoes (those completed and not skipped).
pub async fn step_completed_runs(
    conn: &mut PgConnection,
    execution_id: Uuid,
    run_attempt: i32,
) -> StoreResult<Vec<StepRow>> {
    Ok(sqlx::query_as::<_, StepRow>(select_step!(
        "DISTINCT ON (step_order)",
        "WHERE execution_id = $1 AND run_attempt = $2 AND phase = 'run' \
             AND status IN ('completed', 'failed', 'timeout') AND NOT interrupted \
             ORDER BY step_order, retry_attempt DESC"
    ))
    .bind(execution_id)
    .bind(run_attempt)
    .fetch_all(conn)
    .await?)
}

/// The channel that carries "execution X has new events" (payload: the execution id). The
/// `execution_events_notify` trigger sends it on commit of an event append, but only while a
/// live stream watches that execution ([`watcher_register`]): a notification costs every
/// listening backend a transaction, so runs nobody follows send none.
pub const EVENTS_CHANNEL: &str = "aiops_execution_events";

/// How long a watcher registration lasts unless refreshed; streams refresh at a third of it.
pub const WATCHER_TTL_SECONDS: i32 = 90;

/// Registers (or refreshes) a live-stream watcher of an execution, and drops registrations that
/// expired long ago (left by an API process that died), in one statement.
pub async fn watcher_register(
    conn: &mut PgConnection,
    execution_id: Uuid,
    watcher_id: Uuid,
) -> StoreResult<()> {
    sqlx::query(
        "WITH gone AS (DELETE FROM execution_watchers \
                       WHERE expires_at < now() - interval '10 minutes') \
         INSERT INTO execution_watchers (execution_id, watcher_id, expires_at) \
         VALUES ($1, $2, now() + make_interval(secs => $3)) \
         ON CONFLICT (execution_id, watcher_id) DO UPDATE SET expires_at = EXCLUDED.expires_at",
    )
    .bind(execution_id)
    .bind(watcher_id)
    .bind(f64::from(WATCHER_TTL_SECONDS))
    .execute(conn)
    .await?;
    Ok(())
}

/// Ends a live-stream watcher registration.
pub async fn watcher_remove(
    conn: &mut PgConnection,
    execution_id: Uuid,
    watcher_id: Uuid,
) -> StoreResult<()> {
    sqlx::query("DELETE FROM execution_watchers WHERE execution_id = $1 AND watcher_id = $2")
        .bind(execution_id)
        .bind(watcher_id)
        .execute(conn)
        .await?;
    Ok(())
}

/// Appends a live event (status change or output chunk); watchers are notified on commit
/// (see [`EVENTS_CHANNEL`]).
pub async fn event_append(
    conn: &mut PgConnection,
    execution_id: Uuid,
    step_execution_id: Option<Uuid>,
    kind: &str,
    data: &str,
) -> StoreResult<i64> {
    Ok(sqlx::query_scalar(
        "INSERT INTO execution_events (execution_id, step_execution_id, kind, data) \
         VALUES ($1, $2, $3, $4) RETURNING id",
    )
    .bind(execution_id)
    .bind(step_execution_id)
    .bind(kind)
    .bind(data)
    .fetch_one(conn)
    .await?)
}

/// Deletes up to `batch` of the oldest live events created before `cutoff`; returns how many.
/// Event ids grow with time, so the oldest are found through the primary key.
pub async fn event_prune(
    conn: &mut PgConnection,
    cutoff: DateTime<Utc>,
    batch: i64,
) -> StoreResult<u64> {
    let done = sqlx::query(
        "DELETE FROM execution_events WHERE id IN ( \
             SELECT id FROM execution_events WHERE created_at < $1 ORDER BY id LIMIT $2)",
    )
    .bind(cutoff)
    .bind(batch)
    .execute(conn)
    .await?;
    Ok(done.rows_affected())
}

/// A live event.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct EventRow {
    /// Position in the stream.
    pub id: i64,
    /// Step attempt.
    pub step_execution_id: Option<Uuid>,
    /// status, stdout, stderr.
    pub kind: String,
    /// Payload (JSON for status, text for output).
    pub data: String,
    /// When.
    pub created_at: DateTime<Utc>,
}

/// Events after `after_id`, oldest first.
pub async fn event_list_after(
    conn: &mut PgConnection,
    execution_id: Uuid,
    after_id: i64,
    limit: i64,
) -> StoreResult<Vec<EventRow>> {
    Ok(sqlx::query_as::<_, EventRow>(
        "SELECT id, step_execution_id, kind, data, created_at FROM execution_events \
         WHERE execution_id = $1 AND id > $2 ORDER BY id LIMIT $3",
    )
    .bind(execution_id)
    .bind(after_id)
    .bind(limit)
    .fetch_all(conn)
    .await?)
}

/// What templates see of the alert behind an execution.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct AlertContextRow {
    /// Alert name.
    pub alert_name: String,
    /// Severity.
    pub severity: Option<String>,
    /// Instance.
    pub instance: Option<String>,
    /// firing or resolved.
    pub status: String,
    /// Labels.
    pub labels_json: Option<Value>,
    /// Annotations.
    pub annotations_json: Option<Value>,
    /// Alertmanager fingerprint.
    pub fingerprint: String,
    /// Where it came from (`domain::alert::source_of`).
    pub source: Option<String>,
}

/// The alert behind an execution, for its templates.
pub async fn execution_alert(
    conn: &mut PgConnection,
    alert_id: Uuid,
) -> StoreResult<Option<AlertContextRow>> {
    Ok(sqlx::query_as::<_, AlertContextRow>(
        "SELECT alert_name, severity, instance, status, labels_json, annotations_json, fingerprint, \
           source FROM alerts WHERE id = $1",
    )
    .bind(alert_id)
    .fetch_optional(conn)
    .await?)
}
