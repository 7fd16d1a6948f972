//! A step's attempt row prepared by the job that enqueued it, when the execution ends before the
//! step's job runs: the row is closed, nothing runs.

mod common;

use std::time::{Duration, Instant};

use aiops::store::executions::{StepSlot, step_start};
use serde_json::json;

#[tokio::test]
async fn a_prepared_step_whose_execution_ended_first_is_closed_cancelled_without_running() {
    let app = common::spawn_app().await;
    let dir = std::env::temp_dir().join(format!("aiops-prepared-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let marker = dir.join("ran");
    let yaml = format!(
        "name: two-steps\nmode: manual\nrequires_approval: true\nsteps:\n  - {{name: first, command: 'true'}}\n  - {{name: second, command: 'touch {}'}}\n",
        marker.display()
    );
    let runbook = app.runbook_from_yaml(&yaml).await;
    let id = app.start_execution(json!({ "runbook_id": runbook })).await;

    // The state a cancel leaves when it commits between the first step's result (which
    // prepared the second step's row and enqueued its job) and that job's start.
    let mut conn = app.pool.acquire().await.unwrap();
    sqlx::query(
        "UPDATE runbook_executions SET status = 'cancelled', attempt = 1, completed_at = now() \
         WHERE id = $1",
    )
    .bind(id)
    .execute(&mut *conn)
    .await
    .unwrap();
    let prepared = uuid::Uuid::new_v4();
    step_start(
        &mut conn,
        Some(prepared),
        StepSlot {
            execution_id: id,
            phase: "run",
            run_attempt: 1,
            step_order: 2,
        },
        None,
        "second",
        0,
        None,
        None,
    )
    .await
    .unwrap();
    let mut job = aiops::engine::step_job(id, 1, 1, 0);
    job.payload = json!({ "execution_id": id, "attempt": 1, "index": 1, "prepared": prepared });
    aiops::store::jobs::job_enqueue(&mut conn, &job)
        .await
        .unwrap();

    let worker = common::TestWorker::start(&app.pool).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    let (status, error): (String, Option<String>) = loop {
        let row: (String, Option<String>) =
            sqlx::query_as("SELECT status::text, error_message FROM step_executions WHERE id = $1")
                .bind(prepared)
                .fetch_one(&mut *conn)
                .await
                .unwrap();
        if row.0 != "running" {
            break row;
        }
        assert!(Instant::now() < deadline, "the prepared row stayed running");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(status, "cancelled");
    assert_eq!(
        error.as_deref(),
        Some("the execution ended before this step started")
    );
    let job_state: String = sqlx::query_scalar(
        "SELECT state::text FROM jobs WHERE kind = $1 AND payload->>'prepared' = $2",
    )
    .bind(aiops::engine::KIND_STEP)
    .bind(prepared.to_string())
    .fetch_one(&mut *conn)
    .await
    .unwrap();
    assert_eq!(job_state, "completed");
    assert!(!marker.exists(), "the step's command must not run");
    let rows = common::step_rows(&mut *conn, id).await;
    assert_eq!(rows, 1, "no other attempt row was written");
    worker.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
}
