//! Circuit breakers and execution statistics through the API.

mod common;

use reqwest::Method;
use serde_json::json;
use uuid::Uuid;

async fn runbook(app: &common::TestApp, name: &str) -> Uuid {
    sqlx::query_scalar("INSERT INTO runbooks (name, category) VALUES ($1, 'service') RETURNING id")
        .bind(name)
        .fetch_one(&app.pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn breakers_are_visible_configurable_and_resettable() {
    let app = common::spawn_app().await;
    let id = runbook(&app, "restart-nginx").await;
    let (status, b) = app.get(&format!("/circuit-breakers/{id}")).await;
    assert_eq!(status, 200, "{b}");
    assert_eq!(b["state"], "closed");
    assert_eq!(b["failure_threshold"], 5);
    assert_eq!(b["success_threshold"], 3);

    let (_, engineer) = app.user_with_role("engineer").await;
    let (status, b) = app
        .call(
            Method::PATCH,
            &format!("/circuit-breakers/{id}"),
            Some(&engineer),
            Some(json!({ "failure_threshold": 2, "reset_timeout_seconds": 60 })),
        )
        .await;
    assert_eq!(status, 200, "{b}");
    assert_eq!(b["failure_threshold"], 2);
    assert_eq!(b["reset_timeout_seconds"], 60);
    // The same settings again, or none, change nothing: no new `updated_at`, no audit entry.
    for same in [json!({ "failure_threshold": 2 }), json!({})] {
        let (status, again) = app
            .call(
                Method::PATCH,
                &format!("/circuit-breakers/{id}"),
                Some(&engineer),
                Some(same),
            )
            .await;
        assert_eq!(status, 200, "{again}");
        assert_eq!(again["updated_at"], b["updated_at"], "{again}");
    }
    let (status, body) = app
        .call(
            Method::PATCH,
            &format!("/circuit-breakers/{id}"),
            Some(&engineer),
            Some(json!({ "success_threshold": 0 })),
        )
        .await;
    assert_eq!(status, 422);
    assert_eq!(body["details"]["field"], "success_threshold");

    // Two consecutive failures recorded the way the engine records them open the breaker.
    for _ in 0..2 {
        let mut tx = app.pool.begin().await.unwrap();
        let row = aiops::store::breakers::breaker_lock(&mut tx, id)
            .await
            .unwrap()
            .unwrap();
        let mut breaker = row.breaker();
        breaker.record_failure(row.read_at);
        aiops::store::breakers::breaker_save(&mut tx, id, &breaker)
            .await
            .unwrap();
        tx.commit().await.unwrap();
    }
    let (_, open) = app.get("/circuit-breakers?state=open").await;
    assert_eq!(open["total"], 1, "{open}");
    assert_eq!(open["items"][0]["runbook_name"], "restart-nginx");
    assert!(open["items"][0]["opened_at"].is_string());

    let (status, _) = app
        .call(
            Method::POST,
            &format!("/circuit-breakers/{id}/reset"),
            Some(&engineer),
            None,
        )
        .await;
    assert_eq!(status, 403, "only admins reset breakers");
    let (status, b) = app
        .call(
            Method::POST,
            &format!("/circuit-breakers/{id}/reset"),
            Some(&app.admin_token),
            None,
        )
        .await;
    assert_eq!(status, 200, "{b}");
    assert_eq!(b["state"], "closed");
    assert_eq!(b["failure_count"], 0);
    let audit = app.audit_rows("breaker_reset").await;
    assert_eq!(audit.len(), 1);
    assert_eq!(audit[0].3.as_ref().unwrap()["previous_state"], "open");
    let updates = app.audit_rows("breaker_update").await;
    assert_eq!(updates.len(), 1);
    // Audited under the id the API names a breaker by: its runbook's.
    assert_eq!(updates[0].2, Some(id));
    assert_eq!(audit[0].2, Some(id));
    let details = updates[0].3.clone().unwrap();
    assert_eq!(details["before"]["failure_threshold"], 5, "{details}");
    assert_eq!(details["after"]["failure_threshold"], 2, "{details}");
    assert_eq!(details["after"]["reset_timeout_seconds"], 60, "{details}");

    let (status, _) = app
        .get(&format!("/circuit-breakers/{}", Uuid::new_v4()))
        .await;
    assert_eq!(status, 404);
}

#[tokio::test]
async fn stats_come_from_the_view() {
    let app = common::spawn_app().await;
    let a = runbook(&app, "a-runbook").await;
    let b = runbook(&app, "b-runbook").await;
    for (rb, status, ms) in [
        (a, "completed", 100),
        (a, "completed", 300),
        (a, "failed", 200),
        (b, "cancelled", 0),
    ] {
        sqlx::query(
            "INSERT INTO runbook_executions (runbook_id, runbook_version, status, started_at, duration_ms) \
             VALUES ($1, 1, $2::execution_status, now(), $3)",
        )
        .bind(rb)
        .bind(status)
        .bind(ms)
        .execute(&app.pool)
        .await
        .unwrap();
    }
    let (status, all) = app.get("/stats/executions").await;
    assert_eq!(status, 200, "{all}");
    assert_eq!(all["total_executions"], 4);
    assert_eq!(all["successful"], 2);
    assert_eq!(all["failed"], 1);
    assert_eq!(all["runbooks"][0]["runbook_name"], "a-runbook");
    let (status, one) = app.get(&format!("/stats/executions/{a}")).await;
    assert_eq!(status, 200);
    assert_eq!(one["total_executions"], 3);
    assert_eq!(one["avg_duration_ms"], 200.0);
    assert!(one["last_execution"].is_string());
}
