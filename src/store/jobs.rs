//! `jobs`: the durable queue's rows. Enqueue (single and bulk), claim, lease heartbeat, the
//! lease-guarded writes that move a running job on (complete, fail, snooze, release), rescue of
//! expired leases, pruning, and the admin reads and writes (list, counts, retry, cancel).
//!
//! Every write made on behalf of a running job is guarded by `id`, `lease_token` and
//! `state = 'running'`; zero rows means the lease was lost and the caller must discard its work.
//! This file knows nothing about handlers, backoff policy or wake-ups: those live in `queue`.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::PgConnection;
use uuid::Uuid;

use super::StoreResult;

/// States a job can be in (the `jobs_state_check` constraint).
pub const JOB_STATES: [&str; 6] = [
    "available",
    "running",
    "retryable",
    "completed",
    "dead",
    "cancelled",
];

/// How many failed attempts `errors` keeps (oldest dropped first).
pub const ERROR_HISTORY: i32 = 20;

/// A job to enqueue. Build with [`NewJob::new`] and the `with_*` methods.
#[derive(Debug, Clone)]
pub struct NewJob {
    /// Handler kind (`execution.start`, `queue.prune`).
    pub kind: String,
    /// Arguments for the handler.
    pub payload: Value,
    /// Lower runs first (default 0).
    pub priority: i16,
    /// Not before this instant (default: now, by the database clock).
    pub run_at: Option<DateTime<Utc>>,
    /// Attempts before the job is dead (default 25).
    pub max_attempts: i32,
    /// While a job with this key is unfinished, enqueueing another is a no-op.
    pub unique_key: Option<String>,
    /// Overrides the kind's handler timeout.
    pub timeout_seconds: Option<i32>,
}

impl NewJob {
    /// A job of `kind` with `payload` and default options.
    pub fn new(kind: impl Into<String>, payload: Value) -> NewJob {
        NewJob {
            kind: kind.into(),
            payload,
            priority: 0,
            run_at: None,
            max_attempts: 25,
            unique_key: None,
            timeout_seconds: None,
        }
    }

    /// Sets the priority (lower runs first).
    pub fn with_priority(mut self, priority: i16) -> NewJob {
        self.priority = priority;
        self
    }

    /// Schedules the job.
    pub fn with_run_at(mut self, run_at: DateTime<Utc>) -> NewJob {
        self.run_at = Some(run_at);
        self
    }

    /// Whether the job may be claimed at `now` (no `run_at`, or one not after `now`). Only such
    /// jobs are worth a wake-up: a job scheduled for later is found by the polls once it is due.
    pub fn is_due_at(&self, now: DateTime<Utc>) -> bool {
        self.run_at.is_none_or(|at| at <= now)
    }

    /// Sets the attempt budget (at least 1).
    pub fn with_max_attempts(mut self, max_attempts: i32) -> NewJob {
        self.max_attempts = max_attempts.max(1);
        self
    }

    /// De-duplicates against unfinished jobs with the same key.
    pub fn with_unique_key(mut self, key: impl Into<String>) -> NewJob {
        self.unique_key = Some(key.into());
        self
    }

    /// Overrides the kind's handler timeout.
    pub fn with_timeout_seconds(mut self, seconds: i32) -> NewJob {
        self.timeout_seconds = Some(seconds.max(1));
        self
    }
}

/// A job as the admin API and tests see it.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct JobRow {
    /// Primary key.
    pub id: i64,
    /// Handler kind.
    pub kind: String,
    /// Handler arguments.
    pub payload: Value,
    /// One of [`JOB_STATES`].
    pub state: String,
    /// Lower runs first.
    pub priority: i16,
    /// Not claimable before.
    pub run_at: DateTime<Utc>,
    /// Claims so far.
    pub attempt: i32,
    /// Attempt budget.
    pub max_attempts: i32,
    /// Lease of the current claim.
    pub lease_token: Option<Uuid>,
    /// When the current lease ends unless renewed.
    pub lease_expires_at: Option<DateTime<Utc>>,
    /// Worker holding or last holding the job.
    pub locked_by: Option<Uuid>,
    /// Per-job handler timeout.
    pub timeout_seconds: Option<i32>,
    /// Error of the last failed attempt.
    pub last_error: Option<String>,
    /// Every failed attempt (capped).
    pub errors: Value,
    /// De-duplication key.
    pub unique_key: Option<String>,
    /// Enqueue time.
    pub created_at: DateTime<Utc>,
    /// Last claim time.
    pub attempted_at: Option<DateTime<Utc>>,
    /// Completion, death or cancellation time.
    pub finished_at: Option<DateTime<Utc>>,
}

/// A job handed to a worker by [`job_claim`].
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ClaimedJob {
    /// Primary key.
    pub id: i64,
    /// Handler kind.
    pub kind: String,
    /// Handler arguments.
    pub payload: Value,
    /// This attempt's number (1 for the first).
    pub attempt: i32,
    /// Attempt budget.
    pub max_attempts: i32,
    /// The lease every write of this attempt must present.
    pub lease_token: Uuid,
    /// When the lease ends unless renewed.
    pub lease_expires_at: DateTime<Utc>,
    /// Per-job handler timeout.
    pub timeout_seconds: Option<i32>,
    /// When the job became due.
    pub run_at: DateTime<Utc>,
    /// De-duplication key.
    pub unique_key: Option<String>,
    /// No worker held the job before this claim. A job put back without spending an attempt
    /// (a graceful release, a snooze) or retried by an admin starts again at attempt 1, but it
    /// has run before.
    pub first_claim: bool,
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// `INSERT` of one job from `$source` (kind, payload, priority, run_at, max_attempts,
/// unique_key, timeout_seconds: a `VALUES` list or a `SELECT`), skipped while an unfinished job
/// holds its unique key.
macro_rules! enqueue_insert {
    ($source:literal) => {
        concat!(
            "INSERT INTO jobs (kind, payload, priority, run_at, max_attempts, unique_key, \
                               timeout_seconds) ",
            $source,
            " ON CONFLICT (unique_key) \
                 WHERE unique_key IS NOT NULL AND state IN ('available', 'running', 'retryable') \
                 DO NOTHING"
        )
    };
}
pub(crate) use enqueue_insert;

/// Inserts one job in the caller's transaction. Returns `None` when an unfinished job with the
/// same unique key exists (the enqueue is a no-op).
pub async fn job_enqueue(conn: &mut PgConnection, job: &NewJob) -> StoreResult<Option<i64>> {
    let q = sqlx::query_as::<_, (i64,)>(concat!(
        enqueue_insert!("VALUES ($1, $2, $3, COALESCE($4, now()), $5, $6, $7)"),
        " RETURNING id"
    ));
    Ok(bind_job(q, job).fetch_optional(conn).await?.map(|(id,)| id))
}

/// Binds a job's kind, payload, priority, run_at, max_attempts, unique_key and
/// timeout_seconds, in that order.
pub fn bind_job<'q, O>(q: PgQueryAs<'q, O>, job: &'q NewJob) -> PgQueryAs<'q, O> {
    q.bind(&job.kind)
        .bind(&job.payload)
        .bind(job.priority)
        .bind(job.run_at)
        .bind(job.max_attempts)
        .bind(&job.unique_key)
        .bind(job.timeout_seconds)
}

/// Inserts many jobs in one statement (`unnest`). Returns the ids of the inserted jobs; jobs whose
/// unique key is already taken by an unfinished job (or by an earlier one in the same batch) are
/// skipped.
pub async fn job_enqueue_many(conn: &mut PgConnection, jobs: &[NewJob]) -> StoreResult<Vec<i64>> {
    let mut kinds = Vec::with_capacity(jobs.len());
    let mut payloads = Vec::with_capacity(jobs.len());
    let mut priorities = Vec::with_capacity(jobs.len());
    let mut run_ats = Vec::with_capacity(jobs.len());
    let mut max_attempts = Vec::with_capacity(jobs.len());
    let mut unique_keys = Vec::with_capacity(jobs.len());
    let mut timeouts = Vec::with_capacity(jobs.len());
    for job in jobs {
        kinds.push(job.kind.as_str());
        payloads.push(&job.payload);
        priorities.push(job.priority);
        run_ats.push(job.run_at);
        max_attempts.push(job.max_attempts);
        unique_keys.push(job.unique_key.as_deref());
        timeouts.push(job.timeout_seconds);
    }
    Ok(sqlx::query_scalar(
        "INSERT INTO jobs (kind, payload, priority, run_at, max_attempts, unique_key, \
                           timeout_seconds) \
         SELECT k, p, pr, COALESCE(r, now()), m, u, t \
         FROM unnest($1::text[], $2::jsonb[], $3::int2[], $4::timestamptz[], $5::int4[], \
                     $6::text[], $7::int4[]) AS n(k, p, pr, r, m, u, t) \
         ON CONFLICT (unique_key) \
             WHERE unique_key IS NOT NULL AND state IN ('available', 'running', 'retryable') \
             DO NOTHING \
         RETURNING id",
    )
    .bind(kinds)
    .bind(payloads)
    .bind(priorities)
    .bind(run_ats)
    .bind(max_attempts)
    .bind(unique_keys)
    .bind(timeouts)
    .fetch_all(conn)
    .await?)
}

/// The insert of a job claimed by a worker (`$1`..`$8`, bound by [`bind_claimed`]), one row
/// per row of the `FROM` clause given (none: one row).
macro_rules! claimed_insert {
    ($from:literal) => {
        concat!(
            "INSERT INTO jobs (kind, payload, priority, run_at, max_attempts, unique_key, \
                               timeout_seconds, state, attempt, lease_token, lease_expires_at, \
                               locked_by, attempted_at) \
             SELECT $1, $2, $3, now(), $4, $5, $6, 'running', 1, gen_random_uuid(), \
                    now() + $8::bigint * interval '1 millisecond', $7, now() ",
            $from,
            " ON CONFLICT (unique_key) \
                 WHERE unique_key IS NOT NULL AND state IN ('available', 'running', 'retryable') \
                 DO NOTHING \
             RETURNING id, kind, payload, attempt, max_attempts, lease_token, lease_expires_at, \
                 timeout_seconds, run_at, unique_key, true AS first_claim"
        )
    };
}

/// Inserts one job already claimed by `worker` (state `running`, attempt 1, a fresh lease valid
/// for `lease`) in the caller's transaction: the continuation of the job that transaction
/// completes, run next by the same worker without a claim round trip. If the worker dies, the
/// rescuer returns it like any other expired lease. `None` when an unfinished job with the same
/// unique key exists.
pub async fn job_enqueue_claimed(
    conn: &mut PgConnection,
    job: &NewJob,
    worker: Uuid,
    lease: Duration,
) -> StoreResult<Option<ClaimedJob>> {
    let q = sqlx::query_as::<_, ClaimedJob>(claimed_insert!(""));
    Ok(bind_claimed(q, job, worker, lease)
        .fetch_optional(conn)
        .await?)
}

/// A typed query on PostgreSQL, as handlers bind it.
pub type PgQueryAs<'q, O> =
    sqlx::query::QueryAs<'q, sqlx::Postgres, O, sqlx::postgres::PgArguments>;

fn bind_claimed<'q, O>(
    q: PgQueryAs<'q, O>,
    job: &'q NewJob,
    worker: Uuid,
    lease: Duration,
) -> PgQueryAs<'q, O> {
    q.bind(&job.kind)
        .bind(&job.payload)
        .bind(job.priority)
        .bind(job.max_attempts)
        .bind(&job.unique_key)
        .bind(job.timeout_seconds)
        .bind(worker)
        .bind(millis(lease))
}

/// The row [`job_complete_continuing`] reads: whether the job was completed (its lease was
/// held), and the continuation it inserted claimed, if any. Opaque to handlers, which only bind.
#[derive(Debug, Clone)]
pub struct Continued {
    completed: bool,
    next: Option<ClaimedJob>,
}

impl<'r> sqlx::FromRow<'r, sqlx::postgres::PgRow> for Continued {
    fn from_row(row: &'r sqlx::postgres::PgRow) -> Result<Self, sqlx::Error> {
        use sqlx::Row;
        let inserted: Option<i64> = row.try_get("id")?;
        Ok(Continued {
            completed: row.try_get("completed")?,
            next: inserted.map(|_| ClaimedJob::from_row(row)).transpose()?,
        })
    }
}

/// The statement of [`job_complete_continuing`], as [`HandlerWrites::bind`] gets it.
pub type ContinuingQuery<'q> = PgQueryAs<'q, Continued>;

/// The `fence` CTE of a one-statement completion: the row of job `$id`, locked, while lease
/// token `$token` still holds it (empty otherwise).
macro_rules! fence_cte {
    ($id:literal, $token:literal) => {
        concat!(
            "fence AS (SELECT id FROM jobs WHERE id = ",
            $id,
            " AND lease_token = ",
            $token,
            " AND state = 'running' FOR UPDATE)"
        )
    };
}

/// The `done` CTE of a one-statement completion: the fenced job completed.
const DONE_CTE: &str = "done AS (UPDATE jobs SET state = 'completed', finished_at = now(), \
                          lease_token = NULL, lease_expires_at = NULL \
                        WHERE id = (SELECT id FROM fence))";

/// A handler's own writes in the statement of [`job_complete_continuing`]: common table
/// expressions, each followed by a comma, using parameters from `$11` on (bound by `bind`).
/// `before` may read `fence` (the job row, locked; empty when the lease is lost) and must
/// define `go` (a row when the continuation is to be inserted); `after` may read `nxt` (the
/// continuation inserted, empty when not). Every write must depend on `fence` or `nxt`, so
/// that a worker that lost its lease writes nothing.
pub struct HandlerWrites<B> {
    /// CTEs before the continuation's insert (defining `go`).
    pub before: &'static str,
    /// CTEs after it.
    pub after: &'static str,
    /// Binds `$11`, `$12`, ...
    pub bind: B,
}

/// Completes running job `id` under lease `token`, inserts `next` claimed by `worker` (as
/// [`job_enqueue_claimed`]) when the handler's `go` says so, and makes the handler's writes:
/// one statement, which run outside an explicit transaction commits as one, so a job that
/// continues costs one round trip and one commit. The job row is locked first (`fence`);
/// without the lease nothing is written and `Ok(None)` comes back. `Ok(Some(None))`: completed,
/// no continuation (not wanted, or de-duplicated by its unique key).
pub async fn job_complete_continuing<'q, B>(
    conn: &mut PgConnection,
    id: i64,
    token: Uuid,
    next: &'q NewJob,
    worker: Uuid,
    lease: Duration,
    writes: HandlerWrites<B>,
) -> StoreResult<Option<Option<ClaimedJob>>>
where
    B: FnOnce(ContinuingQuery<'q>) -> ContinuingQuery<'q>,
{
    let sql = format!(
        "WITH {fence}, {before} nxt AS ({insert}), {after} {DONE_CTE} \
         SELECT EXISTS (SELECT 1 FROM fence) AS completed, nxt.* \
         FROM (SELECT 1) one LEFT JOIN nxt ON true",
        fence = fence_cte!("$9", "$10"),
        before = writes.before,
        after = writes.after,
        insert = claimed_insert!("FROM go WHERE EXISTS (SELECT 1 FROM fence)"),
    );
    let q = sqlx::query_as::<_, Continued>(sqlx::AssertSqlSafe(sql));
    let q = bind_claimed(q, next, worker, lease).bind(id).bind(token);
    let row = (writes.bind)(q).fetch_one(conn).await?;
    Ok(row.completed.then_some(row.next))
}

/// A handler's own writes in the statement of [`job_complete_with`]: common table expressions,
/// each followed by a comma, using parameters from `$3` on (bound by `bind`). They may read
/// `fence` (the job row, locked; empty when the lease is lost), and every write must depend on
/// it, so that a worker that lost its lease writes nothing.
pub struct FinalWrites<B> {
    /// The CTEs.
    pub ctes: &'static str,
    /// Binds `$3`, `$4`, ...
    pub bind: B,
}

/// The statement of [`job_complete_with`], as [`FinalWrites::bind`] gets it.
pub type FinalQuery<'q> = PgQueryAs<'q, (bool,)>;

/// Completes running job `id` under lease `token` and makes the handler's last `writes`, in one
/// statement, which run outside an explicit transaction commits as one: a job that ends with
/// one write costs one round trip and one commit. The job row is locked first (`fence`); without
/// the lease nothing is written and `false` comes back.
pub async fn job_complete_with<'q, B>(
    conn: &mut PgConnection,
    id: i64,
    token: Uuid,
    writes: FinalWrites<B>,
) -> StoreResult<bool>
where
    B: FnOnce(FinalQuery<'q>) -> FinalQuery<'q>,
{
    let sql = format!(
        "WITH {fence}, {ctes} {DONE_CTE} SELECT EXISTS (SELECT 1 FROM fence)",
        fence = fence_cte!("$1", "$2"),
        ctes = writes.ctes,
    );
    let q = sqlx::query_as::<_, (bool,)>(sqlx::AssertSqlSafe(sql))
        .bind(id)
        .bind(token);
    Ok((writes.bind)(q).fetch_one(conn).await?.0)
}

/// The update that cancels the job with unique key `$key` if it has not started (`available` or
/// `retryable`): a timer that is no longer needed, cancelled inside the statement that makes it
/// so.
macro_rules! cancel_pending_by_key {
    ($key:literal) => {
        concat!(
            "UPDATE jobs SET state = 'cancelled', finished_at = now() WHERE unique_key = ",
            $key,
            " AND state IN ('available', 'retryable')"
        )
    };
}
pub(crate) use cancel_pending_by_key;

/// Cancels the job with unique key `key` if it has not started: a timer that a decision made
/// unnecessary (an approval's expiry once the approval is decided). Returns whether one was.
pub async fn job_cancel_pending(conn: &mut PgConnection, key: &str) -> StoreResult<bool> {
    let done = sqlx::query(cancel_pending_by_key!("$1"))
        .bind(key)
        .execute(conn)
        .await?;
    Ok(done.rows_affected() > 0)
}

/// The claim statement, shared with the EXPLAIN test so the test checks exactly what runs. The
/// rows come back in claim order (`priority, run_at, id`): a worker that claims more jobs than
/// it has free slots starts them in that order. `$4` lists the kinds the worker runs (NULL:
/// any): a job of a kind it has no handler for is left to a worker that has one (a newer
/// version during a rolling upgrade), not claimed and failed.
pub const CLAIM_SQL: &str = "WITH picked AS ( \
         SELECT id, attempted_at FROM jobs \
         WHERE state IN ('available', 'retryable') AND run_at <= now() \
           AND ($4::text[] IS NULL OR kind = ANY($4::text[])) \
         ORDER BY priority, run_at, id \
         LIMIT $2 \
         FOR UPDATE SKIP LOCKED \
     ), claimed AS ( \
         UPDATE jobs j SET state = 'running', attempt = j.attempt + 1, \
             lease_token = gen_random_uuid(), \
             lease_expires_at = now() + $3::bigint * interval '1 millisecond', \
             locked_by = $1, attempted_at = now() \
         FROM picked WHERE j.id = picked.id \
         RETURNING j.id, j.kind, j.payload, j.attempt, j.max_attempts, j.lease_token, \
             j.lease_expires_at, j.timeout_seconds, j.run_at, j.unique_key, j.priority, \
             picked.attempted_at IS NULL AS first_claim \
     ) \
     SELECT id, kind, payload, attempt, max_attempts, lease_token, lease_expires_at, \
         timeout_seconds, run_at, unique_key, first_claim \
     FROM claimed ORDER BY priority, run_at, id";

/// Claims up to `limit` due jobs for `worker` in one statement (`FOR UPDATE SKIP LOCKED`), giving
/// each a fresh lease token valid for `lease`; returned in `(priority, run_at, id)` order. Only
/// jobs of `kinds` when given.
pub async fn job_claim(
    conn: &mut PgConnection,
    worker: Uuid,
    limit: i64,
    lease: Duration,
    kinds: Option<&[String]>,
) -> StoreResult<Vec<ClaimedJob>> {
    Ok(sqlx::query_as::<_, ClaimedJob>(CLAIM_SQL)
        .bind(worker)
        .bind(limit)
        .bind(millis(lease))
        .bind(kinds)
        .fetch_all(conn)
        .await?)
}

/// Extends the leases of running jobs by `lease` from now. Takes parallel slices of ids and
/// tokens; returns the ids whose lease is still held (the others were rescued or cancelled).
pub async fn job_heartbeat(
    conn: &mut PgConnection,
    ids: &[i64],
    tokens: &[Uuid],
    lease: Duration,
) -> StoreResult<Vec<i64>> {
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    Ok(sqlx::query_scalar(
        "UPDATE jobs j SET lease_expires_at = now() + $3::bigint * interval '1 millisecond' \
         FROM unnest($1::bigint[], $2::uuid[]) AS h(id, token) \
         WHERE j.id = h.id AND j.lease_token = h.token AND j.state = 'running' \
         RETURNING j.id",
    )
    .bind(ids)
    .bind(tokens)
    .bind(millis(lease))
    .fetch_all(conn)
    .await?)
}

/// Locks a running job's row for the rest of the caller's transaction if, and only if, the lease
/// is still held. `false` means the lease was lost: the caller must roll back.
pub async fn job_lock_leased(conn: &mut PgConnection, id: i64, token: Uuid) -> StoreResult<bool> {
    let row: Option<i64> = sqlx::query_scalar(
        "SELECT id FROM jobs WHERE id = $1 AND lease_token = $2 AND state = 'running' \
         FOR UPDATE",
    )
    .bind(id)
    .bind(token)
    .fetch_optional(conn)
    .await?;
    Ok(row.is_some())
}

/// Marks a running job completed. `false` means the lease was lost.
pub async fn job_complete(conn: &mut PgConnection, id: i64, token: Uuid) -> StoreResult<bool> {
    let done = sqlx::query(
        "UPDATE jobs SET state = 'completed', finished_at = now(), lease_token = NULL, \
             lease_expires_at = NULL \
         WHERE id = $1 AND lease_token = $2 AND state = 'running'",
    )
    .bind(id)
    .bind(token)
    .execute(conn)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// Marks many running jobs completed in one statement; returns the ids whose lease was still
/// held (and which are now completed).
pub async fn job_complete_many(
    conn: &mut PgConnection,
    ids: &[i64],
    tokens: &[Uuid],
) -> StoreResult<Vec<i64>> {
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    Ok(sqlx::query_scalar(
        "UPDATE jobs j SET state = 'completed', finished_at = now(), lease_token = NULL, \
             lease_expires_at = NULL \
         FROM unnest($1::bigint[], $2::uuid[]) AS c(id, token) \
         WHERE j.id = c.id AND j.lease_token = c.token AND j.state = 'running' \
         RETURNING j.id",
    )
    .bind(ids)
    .bind(tokens)
    .fetch_all(conn)
    .await?)
}

/// A failed attempt of a running job.
#[derive(Debug, Clone)]
pub struct JobFailure<'a> {
    /// The job.
    pub id: i64,
    /// Its lease.
    pub token: Uuid,
    /// What went wrong.
    pub error: &'a str,
    /// `Some(delay)`: retry after the delay if attempts remain; `None`: permanent, go dead.
    pub retry_in: Option<Duration>,
}

/// Records a failed attempt: back to `retryable` with `run_at = now() + delay` while attempts
/// remain and the error is retryable, otherwise `dead`. Returns the new state, or `None` when the
/// lease was lost.
pub async fn job_fail(conn: &mut PgConnection, f: &JobFailure<'_>) -> StoreResult<Option<String>> {
    Ok(sqlx::query_scalar(
        "UPDATE jobs SET \
             state = CASE WHEN $4::bigint IS NOT NULL AND attempt < max_attempts \
                          THEN 'retryable' ELSE 'dead' END, \
             run_at = CASE WHEN $4::bigint IS NOT NULL AND attempt < max_attempts \
                          THEN now() + $4::bigint * interval '1 millisecond' ELSE run_at END, \
             finished_at = CASE WHEN $4::bigint IS NOT NULL AND attempt < max_attempts \
                          THEN NULL ELSE now() END, \
             lease_token = NULL, lease_expires_at = NULL, last_error = $3, \
             errors = (CASE WHEN jsonb_array_length(errors) >= $5 THEN errors - 0 \
                           ELSE errors END) \
                      || jsonb_build_array(jsonb_build_object('attempt', attempt, \
                             'at', now(), 'error', $3::text, 'worker', locked_by)) \
         WHERE id = $1 AND lease_token = $2 AND state = 'running' \
         RETURNING state",
    )
    .bind(f.id)
    .bind(f.token)
    .bind(f.error)
    .bind(f.retry_in.map(millis))
    .bind(ERROR_HISTORY)
    .fetch_optional(conn)
    .await?)
}

/// Puts a running job back to `available` after `delay` without spending an attempt. `false`
/// means the lease was lost.
pub async fn job_snooze(
    conn: &mut PgConnection,
    id: i64,
    token: Uuid,
    delay: Duration,
) -> StoreResult<bool> {
    let done = sqlx::query(
        "UPDATE jobs SET state = 'available', attempt = greatest(attempt - 1, 0), \
             run_at = now() + $3::bigint * interval '1 millisecond', \
             lease_token = NULL, lease_expires_at = NULL \
         WHERE id = $1 AND lease_token = $2 AND state = 'running'",
    )
    .bind(id)
    .bind(token)
    .bind(millis(delay))
    .execute(conn)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// Gives running jobs back to the queue at once (graceful shutdown past its grace period, or
/// jobs never started). The interrupted attempt is not counted; the interruption is recorded in
/// `errors`. A job of `never_held` true was claimed for the first time and never started: it
/// goes back as never attempted (`attempted_at` cleared), so its next claim is a first claim
/// again. Returns the ids released.
pub async fn job_release_many(
    conn: &mut PgConnection,
    ids: &[i64],
    tokens: &[Uuid],
    never_held: &[bool],
    reason: &str,
) -> StoreResult<Vec<i64>> {
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    Ok(sqlx::query_scalar(
        "UPDATE jobs j SET state = 'available', attempt = greatest(j.attempt - 1, 0), \
             run_at = now(), lease_token = NULL, lease_expires_at = NULL, \
             attempted_at = CASE WHEN r.never_held THEN NULL ELSE j.attempted_at END, \
             errors = (CASE WHEN jsonb_array_length(j.errors) >= $4 THEN j.errors - 0 \
                           ELSE j.errors END) \
                      || jsonb_build_array(jsonb_build_object('attempt', j.attempt, \
                             'at', now(), 'error', $3::text, 'worker', j.locked_by)) \
         FROM unnest($1::bigint[], $2::uuid[], $5::bool[]) AS r(id, token, never_held) \
         WHERE j.id = r.id AND j.lease_token = r.token AND j.state = 'running' \
         RETURNING j.id",
    )
    .bind(ids)
    .bind(tokens)
    .bind(reason)
    .bind(ERROR_HISTORY)
    .bind(never_held)
    .fetch_all(conn)
    .await?)
}

/// A running job whose lease has expired, locked for rescue.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ExpiredJob {
    /// The job.
    pub id: i64,
    /// Its kind (for the kind's backoff).
    pub kind: String,
    /// The attempt that was interrupted.
    pub attempt: i32,
    /// Attempt budget.
    pub max_attempts: i32,
}

/// Locks up to `limit` running jobs whose lease has expired (skipping rows another transaction
/// holds, such as a handler committing its result). Call inside a transaction and finish with
/// [`job_rescue_apply`].
pub async fn job_rescue_expired(
    conn: &mut PgConnection,
    limit: i64,
) -> StoreResult<Vec<ExpiredJob>> {
    Ok(sqlx::query_as::<_, ExpiredJob>(
        "SELECT id, kind, attempt, max_attempts FROM jobs \
         WHERE state = 'running' AND lease_expires_at < now() \
         ORDER BY lease_expires_at \
         LIMIT $1 \
         FOR UPDATE SKIP LOCKED",
    )
    .bind(limit)
    .fetch_all(conn)
    .await?)
}

/// Moves rescued jobs on: `retryable` after their delay while attempts remain, `dead` otherwise.
/// Clears the lease, so the worker that lost it can no longer write. Returns (id, new state).
pub async fn job_rescue_apply(
    conn: &mut PgConnection,
    ids: &[i64],
    delays: &[Duration],
) -> StoreResult<Vec<(i64, String)>> {
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    let delays: Vec<i64> = delays.iter().copied().map(millis).collect();
    Ok(sqlx::query_as(
        "UPDATE jobs j SET \
             state = CASE WHEN j.attempt < j.max_attempts THEN 'retryable' ELSE 'dead' END, \
             run_at = CASE WHEN j.attempt < j.max_attempts \
                          THEN now() + r.delay * interval '1 millisecond' ELSE j.run_at END, \
             finished_at = CASE WHEN j.attempt < j.max_attempts THEN NULL ELSE now() END, \
             last_error = 'lease expired: the worker stopped heartbeating (crashed or hung)', \
             lease_token = NULL, lease_expires_at = NULL, \
             errors = (CASE WHEN jsonb_array_length(j.errors) >= $3 THEN j.errors - 0 \
                           ELSE j.errors END) \
                      || jsonb_build_array(jsonb_build_object('attempt', j.attempt, \
                             'at', now(), 'error', 'lease expired', 'worker', j.locked_by)) \
         FROM unnest($1::bigint[], $2::bigint[]) AS r(id, delay) \
         WHERE j.id = r.id AND j.state = 'running' AND j.lease_expires_at < now() \
         RETURNING j.id, j.state",
    )
    .bind(ids)
    .bind(delays)
    .bind(ERROR_HISTORY)
    .fetch_all(conn)
    .await?)
}

/// Deletes up to `limit` finished jobs (completed, dead, cancelled) that finished more than
/// `retention` ago. Returns how many were deleted.
pub async fn job_prune(
    conn: &mut PgConnection,
    retention: Duration,
    limit: i64,
) -> StoreResult<u64> {
    let done = sqlx::query(
        "DELETE FROM jobs WHERE id IN ( \
             SELECT id FROM jobs \
             WHERE state IN ('completed', 'dead', 'cancelled') \
               AND finished_at < now() - $1::bigint * interval '1 millisecond' \
             LIMIT $2)",
    )
    .bind(millis(retention))
    .bind(limit)
    .execute(conn)
    .await?;
    Ok(done.rows_affected())
}

/// One job by id.
pub async fn job_get(conn: &mut PgConnection, id: i64) -> StoreResult<Option<JobRow>> {
    Ok(sqlx::query_as::<_, JobRow>(
        "SELECT id, kind, payload, state, priority, run_at, attempt, max_attempts, \
             lease_token, lease_expires_at, locked_by, timeout_seconds, last_error, errors, \
             unique_key, created_at, attempted_at, finished_at \
         FROM jobs WHERE id = $1",
    )
    .bind(id)
    .fetch_optional(conn)
    .await?)
}

/// Jobs filtered by kind and state, newest first, with the total matching.
pub async fn job_list(
    conn: &mut PgConnection,
    kind: Option<&str>,
    state: Option<&str>,
    limit: i64,
    offset: i64,
) -> StoreResult<(Vec<JobRow>, i64)> {
    let rows = sqlx::query_as::<_, JobRow>(
        "SELECT id, kind, payload, state, priority, run_at, attempt, max_attempts, \
             lease_token, lease_expires_at, locked_by, timeout_seconds, last_error, errors, \
             unique_key, created_at, attempted_at, finished_at \
         FROM jobs \
         WHERE ($1::text IS NULL OR kind = $1) AND ($2::text IS NULL OR state = $2) \
         ORDER BY id DESC LIMIT $3 OFFSET $4",
    )
    .bind(kind)
    .bind(state)
    .bind(limit)
    .bind(offset)
    .fetch_all(&mut *conn)
    .await?;
    let total: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM jobs \
         WHERE ($1::text IS NULL OR kind = $1) AND ($2::text IS NULL OR state = $2)",
    )
    .bind(kind)
    .bind(state)
    .fetch_one(conn)
    .await?;
    Ok((rows, total))
}

/// Number of jobs per (kind, state), ordered by kind then state.
pub async fn job_counts(conn: &mut PgConnection) -> StoreResult<Vec<(String, String, i64)>> {
    Ok(sqlx::query_as(
        "SELECT kind, state, count(*) FROM jobs GROUP BY kind, state ORDER BY kind, state",
    )
    .fetch_all(conn)
    .await?)
}

/// Puts a dead or cancelled job back to `available` now with a fresh attempt budget. `None` when
/// the job is not dead or cancelled (or does not exist).
pub async fn job_retry(conn: &mut PgConnection, id: i64) -> StoreResult<Option<JobRow>> {
    Ok(sqlx::query_as::<_, JobRow>(
        "UPDATE jobs SET state = 'available', attempt = 0, run_at = now(), finished_at = NULL, \
             lease_token = NULL, lease_expires_at = NULL \
         WHERE id = $1 AND state IN ('dead', 'cancelled') \
         RETURNING id, kind, payload, state, priority, run_at, attempt, max_attempts, \
             lease_token, lease_expires_at, locked_by, timeout_seconds, last_error, errors, \
             unique_key, created_at, attempted_at, finished_at",
    )
    .bind(id)
    .fetch_optional(conn)
    .await?)
}

/// Cancels a job that is not finished, or a dead one. Cancelling a running job clears its lease,
/// so the worker running it can no longer write. `None` when the job is completed or already
/// cancelled (or does not exist).
pub async fn job_cancel(conn: &mut PgConnection, id: i64) -> StoreResult<Option<JobRow>> {
    Ok(sqlx::query_as::<_, JobRow>(
        "UPDATE jobs SET state = 'cancelled', finished_at = now(), lease_token = NULL, \
             lease_expires_at = NULL \
         WHERE id = $1 AND state IN ('available', 'retryable', 'running', 'dead') \
         RETURNING id, kind, payload, state, priority, run_at, attempt, max_attempts, \
             lease_token, lease_expires_at, locked_by, timeout_seconds, last_error, errors, \
             unique_key, created_at, attempted_at, finished_at",
    )
    .bind(id)
    .fetch_optional(conn)
    .await?)
}

/// Wakes idle workers (`NOTIFY aiops_jobs`). Sent after the enqueueing transaction commits, on
/// its own (never inside a transaction: it turns off `synchronous_commit` for the transaction it
/// runs in). A wake-up needs no durability, so its commit does not wait for the WAL flush: a
/// NOTIFY holds PostgreSQL's global notification lock until its commit ends.
pub async fn job_notify(conn: &mut PgConnection) -> StoreResult<()> {
    sqlx::query(
        "SELECT pg_notify('aiops_jobs', ''), set_config('synchronous_commit', 'off', true)",
    )
    .execute(conn)
    .await?;
    Ok(())
}

/// A dedicated connection listening on the `aiops_jobs` channel.
pub async fn job_listener(
    pool: &sqlx::PgPool,
    extra_channels: &[&str],
) -> StoreResult<sqlx::postgres::PgListener> {
    let mut listener = sqlx::postgres::PgListener::connect_with(pool).await?;
    listener.listen("aiops_jobs").await?;
    if !extra_channels.is_empty() {
        listener.listen_all(extra_channels.iter().copied()).await?;
    }
    Ok(listener)
}
