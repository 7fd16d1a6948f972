//! Runs of one runbook do not queue behind its circuit breaker's row lock while the breaker is
//! closed: admission and a successful outcome take no lock then (the benchmark found every start
//! and every completion of a runbook serialised on that row), and neither does a new runbook's
//! first burst of runs, because the breaker is created with the runbook.

mod common;

use serde_json::json;

#[tokio::test]
async fn a_closed_breaker_admits_and_records_success_without_its_row_lock() {
    let app = common::spawn_app().await;
    let worker = common::TestWorker::start(&app.pool).await;
    let runbook = app
        .runbook_from_yaml(
            "name: busy\nmode: auto\nsteps:\n  - {name: a, command: 'true'}\n  - {name: b, command: 'true'}\n",
        )
        .await;
    let terminal = common::FINISHED;

    // Someone holds the breaker row (as a concurrent start or completion would), from before
    // the runbook's first run: the runbook was created with its breaker, closed.
    let mut holder = app.pool.begin().await.unwrap();
    let locked: Option<i32> = sqlx::query_scalar(
        "SELECT failure_count FROM circuit_breakers WHERE runbook_id = $1 FOR UPDATE",
    )
    .bind(runbook)
    .fetch_optional(&mut *holder)
    .await
    .unwrap();
    assert_eq!(
        locked,
        Some(0),
        "the runbook was created with a closed breaker"
    );

    // Reading the breaker does not wait for the lock either.
    let (status, breaker) = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        app.get(&format!("/circuit-breakers/{runbook}")),
    )
    .await
    .expect("GET of a locked breaker answers");
    assert_eq!(status, 200, "{breaker}");
    assert_eq!(breaker["state"], "closed", "{breaker}");

    // The first run starts and completes while the lock is held.
    let first = app.start_execution(json!({ "runbook_id": runbook })).await;
    let done = app.wait_for_status(first, terminal, 20).await;
    assert_eq!(done["status"], "completed", "{done}");

    // Another run starts and completes while the lock is held.
    let second = app.start_execution(json!({ "runbook_id": runbook })).await;
    let done = app.wait_for_status(second, terminal, 20).await;
    assert_eq!(done["status"], "completed", "{done}");
    let events: Vec<&str> = done["execution_log"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["event"].as_str().unwrap())
        .collect();
    assert!(events.contains(&"circuit_breaker"), "{events:?}");
    holder.commit().await.unwrap();

    let (_, breaker) = app.get(&format!("/circuit-breakers/{runbook}")).await;
    assert_eq!(breaker["state"], "closed", "{breaker}");
    assert_eq!(breaker["failure_count"], 0, "{breaker}");
    worker.stop().await;
}
