//! The start of a run and the end of a run that succeeds are each written in one statement with
//! their job's completion. Both apply only while the execution is still in the status they
//! expect (a compare-and-set), so a cancel that commits first wins, as it does under the row
//! lock of the transactional path; a worker that lost its lease writes nothing.

mod common;

use std::time::Duration;

use aiops::queue::NewJob;
use aiops::store::executions::{
    NextStep, RunEnd, StepResult, StepSlot, execution_start_writes, step_end_run_writes, step_start,
};
use aiops::store::jobs::{job_claim, job_complete_continuing, job_complete_with, job_enqueue};
use serde_json::{Value, json};
use sqlx::PgConnection;
use uuid::Uuid;

/// An execution of a one-step runbook whose start job no worker will run: the test plays it.
async fn execution(app: &common::TestApp) -> Uuid {
    let runbook = app
        .runbook_from_yaml(
            "name: one-step\nmode: auto\nsteps:\n  - {name: only, command: 'true'}\n",
        )
        .await;
    let id = app.start_execution(json!({ "runbook_id": runbook })).await;
    sqlx::query(
        "UPDATE jobs SET state = 'cancelled', finished_at = now() \
         WHERE kind = 'execution.start' AND payload->>'execution_id' = $1",
    )
    .bind(id.to_string())
    .execute(&app.pool)
    .await
    .unwrap();
    id
}

/// Enqueues `job` and claims it for `worker`: (job id, lease token).
async fn claimed(conn: &mut PgConnection, job: &NewJob, worker: Uuid) -> (i64, Uuid) {
    let id = job_enqueue(conn, job).await.unwrap().unwrap();
    let jobs = job_claim(conn, worker, 1, Duration::from_secs(60), None)
        .await
        .unwrap();
    assert_eq!(jobs.len(), 1);
    assert_eq!(jobs[0].id, id);
    (id, jobs[0].lease_token)
}

fn deadline_key(id: Uuid) -> String {
    format!("execution:{id}:deadline")
}

fn deadline_job(id: Uuid) -> NewJob {
    NewJob::new(aiops::engine::KIND_DEADLINE, json!({ "execution_id": id }))
        .with_run_at(chrono::Utc::now() + chrono::Duration::hours(1))
        .with_unique_key(deadline_key(id))
}

async fn job_state(conn: &mut PgConnection, id: i64) -> String {
    sqlx::query_scalar("SELECT state::text FROM jobs WHERE id = $1")
        .bind(id)
        .fetch_one(conn)
        .await
        .unwrap()
}

async fn execution_status(conn: &mut PgConnection, id: Uuid) -> String {
    sqlx::query_scalar("SELECT status::text FROM runbook_executions WHERE id = $1")
        .bind(id)
        .fetch_one(conn)
        .await
        .unwrap()
}

async fn step_status(conn: &mut PgConnection, row: Uuid) -> String {
    sqlx::query_scalar("SELECT status::text FROM step_executions WHERE id = $1")
        .bind(row)
        .fetch_one(conn)
        .await
        .unwrap()
}

async fn deadline_state(conn: &mut PgConnection, id: Uuid) -> Option<String> {
    sqlx::query_scalar("SELECT state::text FROM jobs WHERE unique_key = $1")
        .bind(deadline_key(id))
        .fetch_optional(conn)
        .await
        .unwrap()
}

/// The live stream's status events of an execution, in order: (step row, data).
async fn events(conn: &mut PgConnection, id: Uuid) -> Vec<(Option<Uuid>, String)> {
    sqlx::query_as(
        "SELECT step_execution_id, data FROM execution_events \
         WHERE execution_id = $1 AND kind = 'status' ORDER BY id",
    )
    .bind(id)
    .fetch_all(conn)
    .await
    .unwrap()
}

/// A running last step of run attempt 1, its job claimed, and the deadline's timer pending.
struct LastStep {
    id: Uuid,
    row: Uuid,
    job: i64,
    token: Uuid,
}

async fn last_step(app: &common::TestApp, status: &str) -> LastStep {
    let id = execution(app).await;
    let mut conn = app.pool.acquire().await.unwrap();
    sqlx::query(
        "UPDATE runbook_executions SET status = $2::execution_status, attempt = 1, \
           started_at = now() - interval '2 seconds' WHERE id = $1",
    )
    .bind(id)
    .bind(status)
    .execute(&mut *conn)
    .await
    .unwrap();
    job_enqueue(&mut conn, &deadline_job(id)).await.unwrap();
    let row = step_start(
        &mut conn,
        None,
        StepSlot {
            execution_id: id,
            phase: "run",
            run_attempt: 1,
            step_order: 1,
        },
        None,
        "only",
        0,
        Some("true"),
        None,
    )
    .await
    .unwrap();
    let (job, token) = claimed(
        &mut conn,
        &aiops::engine::step_job(id, 1, 0, 0),
        Uuid::new_v4(),
    )
    .await;
    LastStep {
        id,
        row,
        job,
        token,
    }
}

const COMPLETED: StepResult<'static> = StepResult {
    status: "completed",
    exit_code: Some(0),
    exit_signal: None,
    stdout: Some("done\n"),
    stderr: Some(""),
    truncated: false,
    skipped: false,
    error_message: None,
    command: None,
    output_encrypted: None,
};

async fn end_run(conn: &mut PgConnection, s: &LastStep, token: Uuid, log: &Value) -> bool {
    job_complete_with(
        conn,
        s.job,
        token,
        step_end_run_writes(
            s.row,
            &COMPLETED,
            r#"{"step":"only","status":"completed"}"#,
            RunEnd {
                execution_id: s.id,
                attempt: 1,
                to: "completed",
                error_message: None,
                output_summary: "attempt 1 of 1: 1 step(s) completed, 0 skipped, 0 failed attempt(s)",
                log,
                cancel_pending_job: &deadline_key(s.id),
            },
        ),
    )
    .await
    .unwrap()
}

#[tokio::test]
async fn the_last_step_ends_the_run_with_its_result_in_one_statement() {
    let app = common::spawn_app().await;
    let s = last_step(&app, "running").await;
    let mut conn = app.pool.acquire().await.unwrap();
    let log = json!([
        { "event": "circuit_breaker", "details": { "state": "closed", "failures": 0 } },
        { "event": "completed", "details": { "attempt": 1 } },
    ]);
    assert!(end_run(&mut conn, &s, s.token, &log).await);

    let (status, summary, duration, entries): (String, Option<String>, Option<i32>, Value) =
        sqlx::query_as(
            "SELECT status::text, output_summary, duration_ms, execution_log \
             FROM runbook_executions WHERE id = $1",
        )
        .bind(s.id)
        .fetch_one(&mut *conn)
        .await
        .unwrap();
    assert_eq!(status, "completed");
    assert_eq!(
        summary.as_deref(),
        Some("attempt 1 of 1: 1 step(s) completed, 0 skipped, 0 failed attempt(s)")
    );
    assert!(duration.unwrap() >= 2000, "{duration:?}");
    let events_logged: Vec<&str> = entries
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["event"].as_str())
        .collect();
    assert!(
        events_logged.ends_with(&["circuit_breaker", "completed"]),
        "{entries}"
    );
    let (step_status, stdout): (String, Option<String>) =
        sqlx::query_as("SELECT status::text, stdout FROM step_executions WHERE id = $1")
            .bind(s.row)
            .fetch_one(&mut *conn)
            .await
            .unwrap();
    assert_eq!(
        (step_status.as_str(), stdout.as_deref()),
        ("completed", Some("done\n"))
    );
    assert_eq!(job_state(&mut conn, s.job).await, "completed");
    assert_eq!(
        deadline_state(&mut conn, s.id).await.as_deref(),
        Some("cancelled")
    );
    // The step's end first, then the run's log entries, in order.
    let stream = events(&mut conn, s.id).await;
    let tail: Vec<(Option<Uuid>, Value)> = stream[stream.len() - 3..]
        .iter()
        .map(|(step, data)| (*step, serde_json::from_str(data).unwrap()))
        .collect();
    assert_eq!(tail[0].0, Some(s.row));
    assert_eq!(tail[0].1["status"], "completed");
    assert_eq!(
        (tail[1].0, tail[1].1["event"].as_str()),
        (None, Some("circuit_breaker"))
    );
    assert_eq!(
        (tail[2].0, tail[2].1["event"].as_str()),
        (None, Some("completed"))
    );
}

#[tokio::test]
async fn a_cancel_that_commits_before_the_last_step_ends_the_run_wins() {
    let app = common::spawn_app().await;
    let s = last_step(&app, "cancelled").await;
    let mut conn = app.pool.acquire().await.unwrap();
    let log = json!([{ "event": "completed", "details": { "attempt": 1 } }]);
    assert!(end_run(&mut conn, &s, s.token, &log).await);

    let (status, summary, entries): (String, Option<String>, Value) = sqlx::query_as(
        "SELECT status::text, output_summary, execution_log FROM runbook_executions WHERE id = $1",
    )
    .bind(s.id)
    .fetch_one(&mut *conn)
    .await
    .unwrap();
    assert_eq!(status, "cancelled");
    assert_eq!(summary, None);
    assert!(
        !entries
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["event"] == "completed"),
        "{entries}"
    );
    // The step's own result is still recorded, and the job is done.
    assert_eq!(step_status(&mut conn, s.row).await, "completed");
    assert_eq!(job_state(&mut conn, s.job).await, "completed");
    // The end that did not apply leaves the deadline's timer to the end that did (a cancel
    // cancels it in its own statement; this one only set the status): touching it would lock
    // the timer's row before the execution's, the other order from a cancel's.
    assert_eq!(
        deadline_state(&mut conn, s.id).await.as_deref(),
        Some("available")
    );
    assert!(
        !events(&mut conn, s.id)
            .await
            .iter()
            .any(|(_, data)| data.contains("\"completed\"") && data.contains("\"event\"")),
        "no end reached the live stream"
    );
}

#[tokio::test]
async fn a_worker_that_lost_its_lease_does_not_end_the_run() {
    let app = common::spawn_app().await;
    let s = last_step(&app, "running").await;
    let mut conn = app.pool.acquire().await.unwrap();
    let log = json!([{ "event": "completed", "details": { "attempt": 1 } }]);
    assert!(!end_run(&mut conn, &s, Uuid::new_v4(), &log).await);

    assert_eq!(execution_status(&mut conn, s.id).await, "running");
    assert_eq!(step_status(&mut conn, s.row).await, "running");
    assert_eq!(job_state(&mut conn, s.job).await, "running");
    assert_eq!(
        deadline_state(&mut conn, s.id).await.as_deref(),
        Some("available")
    );
}

/// Plays the start job of execution `id` with the one-statement start: whether its job was
/// completed, and whether the first step's job was handed over.
async fn start_run(conn: &mut PgConnection, id: Uuid, first_row: Uuid) -> (bool, bool) {
    let worker = Uuid::new_v4();
    let (job, token) = claimed(
        conn,
        &NewJob::new(aiops::engine::KIND_START, json!({ "execution_id": id })),
        worker,
    )
    .await;
    let mut next = aiops::engine::step_job(id, 1, 0, 0);
    next.payload["prepared"] = json!(first_row);
    let started = json!({ "event": "started", "details": { "attempt": 1 } });
    let deadline = deadline_job(id);
    let done = job_complete_continuing(
        conn,
        job,
        token,
        &next,
        worker,
        Duration::from_secs(60),
        execution_start_writes(
            id,
            &started,
            &deadline,
            NextStep {
                row_id: first_row,
                step_id: None,
                step_order: 1,
                step_name: "only",
                event: r#"{"step":"only","status":"running"}"#,
            },
        ),
    )
    .await
    .unwrap();
    assert_eq!(job_state(conn, job).await, "completed");
    let completed = done.is_some();
    (completed, done.flatten().is_some())
}

#[tokio::test]
async fn a_start_whose_gates_passed_starts_the_run_and_hands_the_first_step_over() {
    let app = common::spawn_app().await;
    let id = execution(&app).await;
    let mut conn = app.pool.acquire().await.unwrap();
    let first = Uuid::new_v4();
    assert_eq!(start_run(&mut conn, id, first).await, (true, true));

    let (status, attempt, started): (String, i32, Option<chrono::DateTime<chrono::Utc>>) =
        sqlx::query_as(
            "SELECT status::text, attempt, started_at FROM runbook_executions WHERE id = $1",
        )
        .bind(id)
        .fetch_one(&mut *conn)
        .await
        .unwrap();
    assert_eq!((status.as_str(), attempt), ("running", 1));
    assert!(started.is_some());
    let row: (Uuid, String, i32) = sqlx::query_as(
        "SELECT execution_id, status::text, run_attempt FROM step_executions WHERE id = $1",
    )
    .bind(first)
    .fetch_one(&mut *conn)
    .await
    .unwrap();
    assert_eq!(row, (id, "running".to_string(), 1));
    let step_job: String = sqlx::query_scalar(
        "SELECT state::text FROM jobs WHERE kind = 'execution.step' AND payload->>'prepared' = $1",
    )
    .bind(first.to_string())
    .fetch_one(&mut *conn)
    .await
    .unwrap();
    assert_eq!(
        step_job, "running",
        "claimed by the worker that started the run"
    );
    assert_eq!(
        deadline_state(&mut conn, id).await.as_deref(),
        Some("available")
    );
    let stream = events(&mut conn, id).await;
    let tail = &stream[stream.len() - 2..];
    assert_eq!(tail[0].0, None);
    assert!(tail[0].1.contains("\"started\""), "{tail:?}");
    assert_eq!(tail[1].0, Some(first));
}

#[tokio::test]
async fn a_cancel_that_commits_before_the_start_wins() {
    let app = common::spawn_app().await;
    let id = execution(&app).await;
    let mut conn = app.pool.acquire().await.unwrap();
    sqlx::query(
        "UPDATE runbook_executions SET status = 'cancelled', completed_at = now() WHERE id = $1",
    )
    .bind(id)
    .execute(&mut *conn)
    .await
    .unwrap();
    let first = Uuid::new_v4();
    assert_eq!(start_run(&mut conn, id, first).await, (true, false));

    assert_eq!(execution_status(&mut conn, id).await, "cancelled");
    let rows = common::step_rows(&mut *conn, id).await;
    assert_eq!(rows, 0);
    let step_jobs: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM jobs WHERE kind = 'execution.step' AND payload->>'execution_id' = $1",
    )
    .bind(id.to_string())
    .fetch_one(&mut *conn)
    .await
    .unwrap();
    assert_eq!(step_jobs, 0);
    assert_eq!(deadline_state(&mut conn, id).await, None);
    assert!(
        !events(&mut conn, id)
            .await
            .iter()
            .any(|(_, data)| data.contains("\"started\"")),
        "no start reached the live stream"
    );
}
