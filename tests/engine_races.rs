//! Check-then-act races across connections and workers: the rate limit holds with several
//! workers starting executions at once, and two approvers racing produce one start.

mod common;

use serde_json::json;

#[tokio::test]
async fn rate_limit_holds_under_concurrent_starts_on_several_workers() {
    let app = common::spawn_app().await;
    let runbook = app
        .runbook_from_yaml("name: once-per-hour\nmode: auto\nrate_limit_count: 2\nrate_limit_window_seconds: 3600\nsteps:\n  - {name: s, command: 'true'}\n")
        .await;
    // Create all executions first, then let three workers race on their start jobs.
    let mut ids = Vec::new();
    for _ in 0..12 {
        ids.push(app.start_execution(json!({ "runbook_id": runbook })).await);
    }
    let workers = [
        common::TestWorker::start(&app.pool).await,
        common::TestWorker::start(&app.pool).await,
        common::TestWorker::start(&app.pool).await,
    ];
    let mut completed = 0;
    let mut refused = 0;
    for id in ids {
        let done = app.wait_for_status(id, common::FINISHED, 60).await;
        match done["status"].as_str().unwrap() {
            "completed" => completed += 1,
            "cancelled" => {
                assert_eq!(done["refused_by"], "rate_limit", "{done}");
                refused += 1;
            }
            other => panic!("unexpected {other}: {done}"),
        }
    }
    assert_eq!((completed, refused), (2, 10));
    for w in workers {
        w.stop().await;
    }
}

#[tokio::test]
async fn racing_approvers_start_the_run_once() {
    let app = common::spawn_app().await;
    let worker = common::TestWorker::start(&app.pool).await;
    let runbook = app
        .runbook_from_yaml(
            "name: needs-approval\nmode: semi_auto\nsteps:\n  - {name: s, command: 'true'}\n",
        )
        .await;
    let id = app.start_execution(json!({ "runbook_id": runbook })).await;
    app.wait_awaiting_approval(id).await;
    let mut approvers = Vec::new();
    for _ in 0..6 {
        approvers.push(app.user_with_role("engineer").await.1);
    }
    let calls = approvers.iter().map(|token| {
        let app = &app;
        async move { app.approve(id, token).await.0 }
    });
    let statuses = futures_util::future::join_all(calls).await;
    assert_eq!(
        statuses.iter().filter(|s| **s == 200).count(),
        1,
        "{statuses:?}"
    );
    assert!(
        statuses.iter().all(|s| *s == 200 || *s == 409),
        "{statuses:?}"
    );
    let done = app.wait_for_status(id, common::FINISHED, 30).await;
    assert_eq!(done["status"], "completed");
    let runs = common::step_rows(&app.pool, id).await;
    assert_eq!(runs, 1);
    worker.stop().await;
}
