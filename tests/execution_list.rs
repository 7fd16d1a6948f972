//! Listing executions through the API: each filter (runbook, server, status, time range) on its
//! own and combined, pagination with the total, newest first; bad parameters are refused with
//! the field named. No worker runs, so every execution stays where the test put it.

mod common;

use reqwest::Method;
use serde_json::{Value, json};

const RUNBOOK: &str = "mode: auto\nsteps:\n  - name: s\n    command: \"true\"\n";

fn ids(page: &Value) -> Vec<String> {
    page["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["id"].as_str().unwrap().to_owned())
        .collect()
}

/// `created_at` of an execution, ready for a query string.
async fn created_at(app: &common::TestApp, id: &str) -> String {
    let (status, body) = app.get(&format!("/executions/{id}")).await;
    assert_eq!(status, 200, "{body}");
    body["created_at"].as_str().unwrap().replace('+', "%2B")
}

#[tokio::test]
async fn executions_list_filters_and_paginates_newest_first() {
    let app = common::spawn_app().await;
    let a = app
        .runbook_from_yaml(&format!("name: list-a\n{RUNBOOK}"))
        .await;
    let b = app
        .runbook_from_yaml(&format!("name: list-b\n{RUNBOOK}"))
        .await;
    let (status, server) = app
        .call(
            Method::POST,
            "/servers",
            Some(&app.admin_token),
            Some(json!({
                "name": "list-web-1", "hostname": "192.0.2.10", "username": "ops",
                "auth_type": "password", "password": "never-used",
                "environment": "production", "tags": ["role=web"],
            })),
        )
        .await;
    assert_eq!(status, 201, "{server}");
    let server = server["id"].as_str().unwrap().to_owned();

    // Five runs of `a` on the worker's own host, then two of `b` on the server.
    let mut on_a = Vec::new();
    for _ in 0..5 {
        on_a.push(
            app.start_execution(json!({ "runbook_id": a }))
                .await
                .to_string(),
        );
    }
    let mut on_server = Vec::new();
    for _ in 0..2 {
        on_server.push(
            app.start_execution(json!({ "runbook_id": b, "server_id": server }))
                .await
                .to_string(),
        );
    }
    let (status, cancelled) = app
        .call(
            Method::POST,
            &format!("/executions/{}/cancel", on_a[1]),
            Some(&app.admin_token),
            Some(json!({ "reason": "listed as cancelled" })),
        )
        .await;
    assert_eq!(status, 200, "{cancelled}");

    // Everything, newest first.
    let (status, all) = app.get("/executions").await;
    assert_eq!(status, 200, "{all}");
    assert_eq!(all["total"], 7);
    let newest_first: Vec<String> = on_a.iter().chain(&on_server).rev().cloned().collect();
    assert_eq!(ids(&all), newest_first);

    // Runbook, server, status, and combinations.
    let (_, of_a) = app.get(&format!("/executions?runbook_id={a}")).await;
    assert_eq!(of_a["total"], 5);
    assert_eq!(ids(&of_a), on_a.iter().rev().cloned().collect::<Vec<_>>());
    let (_, of_server) = app.get(&format!("/executions?server_id={server}")).await;
    assert_eq!(
        ids(&of_server),
        on_server.iter().rev().cloned().collect::<Vec<_>>()
    );
    assert!(
        of_server["items"]
            .as_array()
            .unwrap()
            .iter()
            .all(|e| e["server_id"] == server.as_str())
    );
    let (_, a_on_server) = app
        .get(&format!("/executions?runbook_id={a}&server_id={server}"))
        .await;
    assert_eq!(a_on_server["total"], 0, "{a_on_server}");
    let (_, cancelled) = app.get("/executions?status=cancelled").await;
    assert_eq!(ids(&cancelled), vec![on_a[1].clone()]);
    let (_, pending_a) = app
        .get(&format!("/executions?runbook_id={a}&status=pending"))
        .await;
    assert_eq!(pending_a["total"], 4, "{pending_a}");
    assert!(!ids(&pending_a).contains(&on_a[1]));

    // Time range: `since` is inclusive, `until` exclusive, on created_at.
    let from = created_at(&app, &on_a[2]).await;
    let to = created_at(&app, &on_server[0]).await;
    let (_, since) = app.get(&format!("/executions?since={from}")).await;
    assert_eq!(
        ids(&since),
        vec![
            on_server[1].clone(),
            on_server[0].clone(),
            on_a[4].clone(),
            on_a[3].clone(),
            on_a[2].clone()
        ]
    );
    let (_, window) = app
        .get(&format!("/executions?since={from}&until={to}"))
        .await;
    assert_eq!(
        ids(&window),
        vec![on_a[4].clone(), on_a[3].clone(), on_a[2].clone()]
    );
    let (_, until) = app.get(&format!("/executions?until={from}")).await;
    assert_eq!(ids(&until), vec![on_a[1].clone(), on_a[0].clone()]);

    // Pages: the total is the whole match, the items one page of it, in the same order.
    let mut paged = Vec::new();
    for offset in [0, 2, 4] {
        let (status, page) = app
            .get(&format!(
                "/executions?runbook_id={a}&limit=2&offset={offset}"
            ))
            .await;
        assert_eq!(status, 200, "{page}");
        assert_eq!(page["total"], 5);
        assert_eq!(page["limit"], 2);
        assert_eq!(page["offset"], offset);
        paged.extend(ids(&page));
    }
    assert_eq!(paged, ids(&of_a), "pages concatenate to the whole list");
    let (_, past_the_end) = app.get("/executions?limit=10&offset=50").await;
    assert_eq!(past_the_end["total"], 7);
    assert!(ids(&past_the_end).is_empty());

    // Values outside the bounds the document declares name the field and the bounds.
    for (query, field, reason) in [
        ("limit=0", "limit", "must be between 1 and 500, not 0"),
        ("limit=501", "limit", "must be between 1 and 500, not 501"),
        ("offset=-1", "offset", "must be >= 0, not -1"),
    ] {
        let (status, body) = app.get(&format!("/executions?{query}")).await;
        assert_eq!(status, 422, "{query}: {body}");
        assert_eq!(body["code"], "validation_failed", "{query}: {body}");
        assert_eq!(body["details"]["field"], field, "{query}: {body}");
        assert_eq!(body["details"]["reason"], reason, "{query}: {body}");
    }
    // Values that do not parse: the parameter as the API documents it, and why.
    for (path, field, reason) in [
        (
            "/executions?since=yesterday",
            "since",
            "`yesterday` is not an RFC 3339 date-time (2026-01-31T12:00:00Z)",
        ),
        (
            "/executions?server_id=web-1",
            "server_id",
            "`web-1` is not a UUID",
        ),
        (
            "/executions?limit=ten",
            "limit",
            "`ten` is not a whole number",
        ),
        ("/executions/not-an-id", "id", "`not-an-id` is not a UUID"),
        (
            "/executions/not-an-id/steps",
            "id",
            "`not-an-id` is not a UUID",
        ),
        (
            "/executions//events",
            "id",
            "is required: its segment of the path is empty",
        ),
    ] {
        let (status, body) = app.get(path).await;
        assert_eq!(status, 400, "{path}: {body}");
        assert_eq!(body["code"], "bad_request", "{path}: {body}");
        assert_eq!(body["details"]["field"], field, "{path}: {body}");
        assert_eq!(body["details"]["reason"], reason, "{path}: {body}");
        assert_eq!(
            body["message"],
            format!("{field}: {reason}"),
            "{path}: {body}"
        );
    }
    // A Last-Event-ID header that is not an event id: named, and not called missing.
    let resp = app
        .client
        .get(app.api(&format!("/executions/{}/events", uuid::Uuid::new_v4())))
        .bearer_auth(&app.admin_token)
        .header("Last-Event-ID", "abc")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(body["details"]["field"], "Last-Event-ID", "{body}");
    let reason = body["details"]["reason"].as_str().unwrap_or_default();
    assert!(!reason.is_empty() && !reason.contains("required"), "{body}");

    let (status, body) = app.get("/executions?status=exploded").await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["details"]["field"], "status", "{body}");
    let reason = body["details"]["reason"].as_str().unwrap_or_default();
    assert!(
        reason.starts_with("must be one of ") && reason.contains("\"completed\""),
        "{body}"
    );
}
