//! The queue's admin API: listing and counting jobs, workers, retry and cancel, with their roles
//! (reads: operator; retry and cancel: admin) and audit entries.

mod common;

use aiops::queue::{self, JobError, KindOptions, NewJob, Registry, Worker, WorkerConfig};
use reqwest::Method;
use serde_json::json;

#[tokio::test]
async fn admin_lists_counts_retries_and_cancels_jobs() {
    let app = common::spawn_app().await;
    let mut registry = Registry::new();
    registry.register("fails", KindOptions::default(), |_| async {
        Err(JobError::permanent("bad input"))
    });
    registry.register("ok", KindOptions::default(), |_| async { Ok(()) });
    let worker = Worker::start(app.pool.clone(), registry, WorkerConfig::default())
        .await
        .unwrap();
    let mut conn = app.pool.acquire().await.unwrap();
    let dead = queue::enqueue(&mut conn, &NewJob::new("fails", json!({ "x": 1 })))
        .await
        .unwrap()
        .unwrap();
    queue::enqueue(&mut conn, &NewJob::new("ok", json!({})))
        .await
        .unwrap();
    drop(conn);
    let o = worker.tick().await.unwrap();
    assert_eq!((o.completed, o.dead), (1, 1));
    let mut conn = app.pool.acquire().await.unwrap();
    let waiting = queue::enqueue(
        &mut conn,
        &NewJob::new("ok", json!({})).with_run_at(chrono::Utc::now() + chrono::TimeDelta::hours(1)),
    )
    .await
    .unwrap()
    .unwrap();
    drop(conn);

    let (status, body) = app.get("/queue/jobs?kind=fails&state=dead").await;
    assert_eq!(status, 200, "{body}");
    // The kind filter's bounds are declared, and a value outside them is named.
    for kind in [String::new(), "k".repeat(101)] {
        let (status, body) = app.get(&format!("/queue/jobs?kind={kind}")).await;
        assert_eq!(status, 422, "{body}");
        assert_eq!(body["details"]["field"], "kind", "{body}");
        assert_eq!(
            body["details"]["reason"], "must be 1 to 100 characters",
            "{body}"
        );
    }
    assert_eq!(body["total"], 1);
    assert_eq!(body["items"][0]["id"], dead);
    assert_eq!(
        body["items"][0]["last_error"],
        "permanent failure: bad input"
    );
    assert!(body["items"][0].get("lease_token").is_none());

    let (status, body) = app.get("/queue/jobs?limit=1").await;
    assert_eq!(
        (
            status,
            body["total"].as_i64(),
            body["items"].as_array().unwrap().len()
        ),
        (200, Some(3), 1)
    );
    let (status, _) = app.get("/queue/jobs?state=bogus").await;
    assert_eq!(status, 400);

    let (status, body) = app.get("/queue/counts").await;
    assert_eq!(status, 200);
    let items = body["items"].as_array().unwrap();
    assert!(
        items.contains(&json!({ "kind": "fails", "state": "dead", "count": 1 })),
        "{body}"
    );
    assert!(
        items.contains(&json!({ "kind": "ok", "state": "completed", "count": 1 })),
        "{body}"
    );
    assert!(
        items.contains(&json!({ "kind": "ok", "state": "available", "count": 1 })),
        "{body}"
    );

    let (status, body) = app.get("/queue/workers").await;
    assert_eq!(status, 200);
    assert_eq!(body["items"][0]["id"], worker.id().to_string());
    assert_eq!(body["items"][0]["pid"], std::process::id());
    assert_eq!(body["items"][0]["kinds"], json!(["fails", "ok"]));

    // Roles: an operator reads but cannot retry or cancel; a viewer cannot read.
    let (_, operator) = app.user_with_role("operator").await;
    let (_, viewer) = app.user_with_role("viewer").await;
    let (status, _) = app
        .call(
            Method::GET,
            &format!("/queue/jobs/{dead}"),
            Some(&operator),
            None,
        )
        .await;
    assert_eq!(status, 200);
    let (status, _) = app
        .call(Method::GET, "/queue/jobs", Some(&viewer), None)
        .await;
    assert_eq!(status, 403);
    let (status, _) = app
        .call(
            Method::POST,
            &format!("/queue/jobs/{dead}/retry"),
            Some(&operator),
            None,
        )
        .await;
    assert_eq!(status, 403);

    // Retry: dead -> available with a fresh budget; audited.
    let token = app.admin_token.clone();
    let (status, body) = app
        .call(
            Method::POST,
            &format!("/queue/jobs/{dead}/retry"),
            Some(&token),
            None,
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        (body["state"].as_str(), body["attempt"].as_i64()),
        (Some("available"), Some(0))
    );
    let audit = app.audit_rows("job_retry").await;
    assert_eq!(audit.len(), 1);
    assert_eq!(audit[0].3.as_ref().unwrap()["job_id"], dead);
    // Retrying an available job conflicts.
    let (status, _) = app
        .call(
            Method::POST,
            &format!("/queue/jobs/{dead}/retry"),
            Some(&token),
            None,
        )
        .await;
    assert_eq!(status, 409);

    // Cancel a scheduled job; cancelling it again conflicts; unknown ids are 404.
    let (status, body) = app
        .call(
            Method::POST,
            &format!("/queue/jobs/{waiting}/cancel"),
            Some(&token),
            None,
        )
        .await;
    assert_eq!((status, body["state"].as_str()), (200, Some("cancelled")));
    assert_eq!(app.audit_rows("job_cancel").await.len(), 1);
    let (status, _) = app
        .call(
            Method::POST,
            &format!("/queue/jobs/{waiting}/cancel"),
            Some(&token),
            None,
        )
        .await;
    assert_eq!(status, 409);
    let (status, _) = app
        .call(
            Method::POST,
            "/queue/jobs/999999/cancel",
            Some(&token),
            None,
        )
        .await;
    assert_eq!(status, 404);
    let (status, _) = app.get("/queue/jobs/999999").await;
    assert_eq!(status, 404);
}

#[tokio::test]
async fn cancelling_a_running_job_fences_its_worker() {
    let app = common::spawn_app().await;
    let gate = std::sync::Arc::new(tokio::sync::Notify::new());
    let mut registry = Registry::new();
    {
        let gate = gate.clone();
        registry.register(
            "step",
            KindOptions::default(),
            move |ctx: queue::JobContext| {
                let gate = gate.clone();
                async move {
                    gate.notified().await;
                    ctx.lease().guarded_tx().await?.complete().await
                }
            },
        );
    }
    let worker = Worker::start(app.pool.clone(), registry, WorkerConfig::default())
        .await
        .unwrap();
    let mut conn = app.pool.acquire().await.unwrap();
    let id = queue::enqueue(&mut conn, &NewJob::new("step", json!({})))
        .await
        .unwrap()
        .unwrap();
    drop(conn);
    let tick = tokio::spawn({
        let worker = worker.clone();
        async move { worker.tick().await.unwrap() }
    });
    loop {
        let (_, body) = app.get(&format!("/queue/jobs/{id}")).await;
        if body["state"] == "running" {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let token = app.admin_token.clone();
    let (status, _) = app
        .call(
            Method::POST,
            &format!("/queue/jobs/{id}/cancel"),
            Some(&token),
            None,
        )
        .await;
    assert_eq!(status, 200);
    gate.notify_one();
    let outcome = tick.await.unwrap();
    assert_eq!((outcome.completed, outcome.lease_lost), (0, 1));
    let (_, body) = app.get(&format!("/queue/jobs/{id}")).await;
    assert_eq!(body["state"], "cancelled");
}

#[tokio::test]
async fn an_executions_jobs_are_cancelled_through_the_execution() {
    let app = common::spawn_app().await;
    let runbook = app
        .runbook_from_yaml(
            "name: jobs-of-a-run\nmode: auto\nsteps:\n  - {name: s, command: 'true'}\n",
        )
        .await;
    // No worker: the run's start job waits in the queue.
    let id = app.start_execution(json!({ "runbook_id": runbook })).await;
    let job: i64 = sqlx::query_scalar(
        "SELECT id FROM jobs WHERE kind = 'execution.start' AND payload->>'execution_id' = $1",
    )
    .bind(id.to_string())
    .fetch_one(&app.pool)
    .await
    .unwrap();
    let (status, body) = app
        .call(
            Method::POST,
            &format!("/queue/jobs/{job}/cancel"),
            Some(&app.admin_token),
            None,
        )
        .await;
    assert_eq!(status, 409, "{body}");
    assert_eq!(body["details"]["field"], "kind", "{body}");
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains(&format!("/executions/{id}/cancel")),
        "{body}"
    );
    let (_, job_row) = app.get(&format!("/queue/jobs/{job}")).await;
    assert_eq!(job_row["state"], "available", "{job_row}");
}
