//! Starting an execution with bad input: every refusal is a 4xx with a JSON body that names the
//! field and the reason, and nothing is created.

mod common;

use reqwest::Method;
use serde_json::{Value, json};

async fn executions(app: &common::TestApp) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM runbook_executions")
        .fetch_one(&app.pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn bad_start_requests_name_the_field_and_the_reason_and_create_nothing() {
    let app = common::spawn_app().await;
    let runbook = app
        .runbook_from_yaml(
            "name: input-checks\nmode: auto\nsteps:\n  - {name: s, command: 'true'}\n",
        )
        .await;
    let (status, server) = app
        .call(
            Method::POST,
            "/servers",
            Some(&app.admin_token),
            Some(
                json!({ "name": "input-db-1", "hostname": "192.0.2.20", "username": "ops",
                         "auth_type": "password", "password": "never-used",
                         "tags": ["role=db"] }),
            ),
        )
        .await;
    assert_eq!(status, 201, "{server}");
    let server = server["id"].as_str().unwrap().to_owned();
    let unknown = uuid::Uuid::new_v4();
    let cases: Vec<(&str, Value, u16, &str)> = vec![
        ("missing runbook", json!({}), 400, "runbook_id"),
        (
            "malformed runbook id",
            json!({ "runbook_id": "rb-1" }),
            400,
            "runbook_id",
        ),
        (
            "runbook id of the wrong type",
            json!({ "runbook_id": 7 }),
            400,
            "runbook_id",
        ),
        (
            "malformed server id",
            json!({ "runbook_id": runbook, "server_id": "db-1" }),
            400,
            "server_id",
        ),
        (
            "max_concurrency of the wrong type",
            json!({ "runbook_id": runbook, "max_concurrency": "many" }),
            400,
            "max_concurrency",
        ),
        (
            "misspelled field",
            json!({ "runbook_id": runbook, "serverid": server }),
            400,
            "serverid",
        ),
        (
            "unknown runbook",
            json!({ "runbook_id": unknown }),
            404,
            "runbook_id",
        ),
        (
            "unknown server",
            json!({ "runbook_id": runbook, "server_id": unknown }),
            404,
            "server_id",
        ),
        (
            "both targets",
            json!({ "runbook_id": runbook, "server_id": server, "servers": { "tags": ["role=db"] } }),
            422,
            "servers",
        ),
        (
            "empty selector",
            json!({ "runbook_id": runbook, "servers": {} }),
            422,
            "servers",
        ),
        (
            "selector matching nothing",
            json!({ "runbook_id": runbook, "servers": { "tags": ["role=none"] } }),
            422,
            "servers",
        ),
        (
            "selector tags of the wrong type",
            json!({ "runbook_id": runbook, "servers": { "tags": "role=db" } }),
            400,
            "servers.tags",
        ),
        (
            "misspelled selector field",
            json!({ "runbook_id": runbook, "servers": { "tag": ["role=db"] } }),
            400,
            "servers.tag",
        ),
        (
            "variable name the environment cannot hold",
            json!({ "runbook_id": runbook, "variables": { "bad name": "v" } }),
            422,
            "variables.bad name",
        ),
        (
            "variable name reserved for templates",
            json!({ "runbook_id": runbook, "variables": { "steps": "v" } }),
            422,
            "variables.steps",
        ),
        (
            "variable that changes how commands run",
            json!({ "runbook_id": runbook, "variables": { "PATH": "/nonexistent" } }),
            422,
            "variables.PATH",
        ),
        (
            "loader variable",
            json!({ "runbook_id": runbook, "variables": { "LD_PRELOAD": "/tmp/x.so" } }),
            422,
            "variables.LD_PRELOAD",
        ),
        (
            "variable that is a list",
            json!({ "runbook_id": runbook, "variables": { "HOSTS": ["a", "b"] } }),
            422,
            "variables.HOSTS",
        ),
        (
            "concurrency out of range",
            json!({ "runbook_id": runbook, "servers": { "tags": ["role=db"] }, "max_concurrency": 0 }),
            422,
            "max_concurrency",
        ),
    ];
    for (case, body, want_status, field) in cases {
        let (status, answer) = app
            .call(
                Method::POST,
                "/executions",
                Some(&app.admin_token),
                Some(body),
            )
            .await;
        assert_eq!(status, want_status, "{case}: {answer}");
        assert_eq!(answer["details"]["field"], field, "{case}: {answer}");
        let reason = answer["details"]["reason"].as_str().unwrap_or_default();
        assert!(!reason.is_empty(), "{case}: no reason: {answer}");
    }
    assert_eq!(
        executions(&app).await,
        0,
        "a refused request created an execution"
    );

    // The same holds for every JSON body: a server without its name.
    let (status, answer) = app
        .call(
            Method::POST,
            "/servers",
            Some(&app.admin_token),
            Some(json!({ "hostname": "192.0.2.21", "username": "ops" })),
        )
        .await;
    assert_eq!(status, 400, "{answer}");
    assert_eq!(answer["details"]["field"], "name", "{answer}");
    assert_eq!(answer["details"]["reason"], "is required", "{answer}");
    // A body that is not JSON at all says where it breaks.
    let resp = reqwest::Client::new()
        .post(app.api("/executions"))
        .bearer_auth(&app.admin_token)
        .header("content-type", "application/json")
        .body("{\"runbook_id\": ")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 400);
    let answer: Value = resp.json().await.unwrap();
    let reason = answer["details"]["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("not JSON") && reason.contains("line 1"),
        "{answer}"
    );
    // An empty body where the operation takes one says so; without a type, that is missing.
    for (content_type, expected_status, expected) in [
        (Some("application/json"), 400, "the body is empty"),
        (None, 415, "does not include the `Content-Type` header"),
    ] {
        let mut request = reqwest::Client::new()
            .post(app.api("/executions"))
            .bearer_auth(&app.admin_token)
            .header("content-length", "0");
        if let Some(kind) = content_type {
            request = request.header("content-type", kind);
        }
        let resp = request.send().await.unwrap();
        let status = resp.status().as_u16();
        let answer: Value = resp.json().await.unwrap();
        assert_eq!(status, expected_status, "{content_type:?}: {answer}");
        assert!(
            answer["message"]
                .as_str()
                .is_some_and(|m| m.contains(expected)),
            "{content_type:?}: {answer}"
        );
    }
}

/// Numbers given at start reach commands as they were written where that can be known (`1e3`
/// is `1000`), and one that JSON could not keep exactly is refused; a secret too short to be
/// masked is refused rather than shown.
#[tokio::test]
async fn start_values_are_kept_exactly_or_refused() {
    let app = common::spawn_app().await;
    let runbook = app
        .runbook_from_yaml(
            "name: values\nmode: auto\nenvironment_vars:\n  API_TOKEN: set-at-start\n  COUNT: '1'\nsteps:\n  - {name: s, command: 'true'}\n",
        )
        .await;
    let start = |variables: &str| {
        let body = format!(r#"{{"runbook_id": "{runbook}", "variables": {variables}}}"#);
        let app = &app;
        async move {
            let resp = app
                .client
                .post(app.api("/executions"))
                .bearer_auth(&app.admin_token)
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await
                .unwrap();
            let status = resp.status().as_u16();
            (status, resp.json::<Value>().await.unwrap())
        }
    };
    for (variables, field) in [
        (r#"{"COUNT": 100000000000000000000}"#, "variables.COUNT"),
        (r#"{"COUNT": 1.2345678901234567e22}"#, "variables.COUNT"),
        (r#"{"API_TOKEN": "Q7"}"#, "variables.API_TOKEN"),
    ] {
        let (status, answer) = start(variables).await;
        assert_eq!(status, 422, "{variables}: {answer}");
        assert_eq!(answer["details"]["field"], field, "{answer}");
    }
    for (given, stored) in [("1e3", "1000"), ("-0.0", "0"), ("0.1", "0.1"), ("42", "42")] {
        let (status, answer) = start(&format!(r#"{{"COUNT": {given}}}"#)).await;
        assert_eq!(status, 201, "{given}: {answer}");
        let id = answer["execution_ids"][0].as_str().unwrap();
        let (_, run) = app.get(&format!("/executions/{id}")).await;
        assert_eq!(run["context_vars"]["COUNT"], stored, "{given}: {run}");
    }
}
