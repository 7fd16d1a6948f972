//! The RBAC matrix: every operation in the OpenAPI document, called with no token and with a
//! token of every role, answers 401 / 403 / allowed exactly as its "Least role:" line says.
//!
//! The operations come from the spec the code emits, so a new endpoint is covered the moment it
//! exists; one without a "Least role:" line, or with a request body but no sample in `BODIES`,
//! fails this test.

mod common;

use std::collections::HashMap;

use aiops::domain::Role;
use serde_json::{Value, json};

/// A request body that parses for each operation that takes one. Refused roles must get 403
/// with it; allowed roles anything but 401/403 (201, 404, 409, 422 are all fine).
const BODIES: &[(&str, &str)] = &[
    (
        "server_create",
        r#"{"name": "rbac-server", "hostname": "127.0.0.1", "username": "root", "auth_type": "password", "password": "pw"}"#,
    ),
    ("server_update", r#"{"environment": "staging"}"#),
    (
        "auth_login",
        r#"{"username": "nobody", "password": "wrong-password"}"#,
    ),
    ("token_create", r#"{"name": "rbac"}"#),
    (
        "user_create",
        r#"{"username": "rbac-made", "email": "rbac@example.test", "password": "long-enough-password", "role": "viewer"}"#,
    ),
    ("user_update", r#"{"full_name": "Renamed"}"#),
    ("config_put", r#"{"value": {"enabled": true}}"#),
    (
        "execution_create",
        r#"{"runbook_id": "00000000-0000-0000-0000-000000000001"}"#,
    ),
    ("execution_cancel", r#"{"reason": "rbac"}"#),
    ("execution_reject", r#"{"reason": "rbac"}"#),
    (
        "runbook_create",
        r#"{"name": "rbac-runbook", "steps": [{"name": "s", "command": "true"}]}"#,
    ),
    (
        "runbook_update",
        r#"{"name": "rbac-runbook", "steps": [{"name": "s", "command": "true"}]}"#,
    ),
    (
        "runbook_import",
        r#"{"yaml": "name: rbac-import\nsteps:\n  - {name: s, command: 'true'}\n"}"#,
    ),
    (
        "runbook_validate",
        r#"{"yaml": "name: rbac-validate\nsteps:\n  - {name: s, command: 'true'}\n"}"#,
    ),
    (
        "runbook_dry_run",
        r#"{"yaml": "name: rbac-dry\nsteps:\n  - {name: s, command: 'true'}\n", "alert": {"name": "NodeDown"}, "server": {"hostname": "web-1"}}"#,
    ),
    ("breaker_update", r#"{"failure_threshold": 3}"#),
    (
        "blackout_create",
        r#"{"name": "rbac", "start_time": "2030-01-01T00:00:00Z", "end_time": "2030-01-01T01:00:00Z"}"#,
    ),
    (
        "blackout_update",
        r#"{"name": "rbac", "start_time": "2030-01-01T00:00:00Z", "end_time": "2030-01-01T01:00:00Z"}"#,
    ),
    (
        "alertmanager_webhook_receive",
        r#"{"version": "4", "status": "firing", "receiver": "aiops", "alerts": []}"#,
    ),
    ("webhook_token_create", r#"{"name": "rbac-alertmanager"}"#),
    (
        "alert_rule_create",
        r#"{"name": "rbac-rule", "alert_name_pattern": "Node*", "action": "manual"}"#,
    ),
    (
        "alert_rule_update",
        r#"{"name": "rbac-rule", "action": "ignore"}"#,
    ),
];

struct Operation {
    id: String,
    method: reqwest::Method,
    path: String,
    least: Option<Role>,
    body: Option<Value>,
}

fn operations(spec: &Value) -> Vec<Operation> {
    let bodies: HashMap<&str, &str> = BODIES.iter().copied().collect();
    let mut out = Vec::new();
    let mut problems = Vec::new();
    for (path, item) in spec["paths"].as_object().expect("paths") {
        for (method, op) in item.as_object().expect("path item") {
            let id = op["operationId"].as_str().unwrap_or("<none>").to_owned();
            let text = format!(
                "{} {}",
                op["summary"].as_str().unwrap_or(""),
                op["description"].as_str().unwrap_or("")
            );
            let least = match text.split("Least role:").nth(1).map(|rest| {
                rest.trim_start()
                    .split(|c: char| !c.is_ascii_alphabetic())
                    .next()
                    .unwrap_or("")
                    .to_owned()
            }) {
                Some(name) if name == "none" => None,
                Some(name) => match name.parse::<Role>() {
                    Ok(role) => Some(role),
                    Err(_) => {
                        problems.push(format!("{id}: unknown least role `{name}`"));
                        continue;
                    }
                },
                None => {
                    problems.push(format!("{id}: no `Least role:` line in its description"));
                    continue;
                }
            };
            let mut concrete = String::new();
            for segment in path.split('/') {
                if segment.starts_with('{') {
                    let name = segment.trim_matches(['{', '}']);
                    let format = op["parameters"]
                        .as_array()
                        .and_then(|ps| ps.iter().find(|p| p["name"] == name))
                        .map(|p| p["schema"]["format"].as_str().unwrap_or("").to_owned())
                        .unwrap_or_default();
                    if format == "uuid" {
                        concrete.push_str(&uuid::Uuid::new_v4().to_string());
                    } else if format.starts_with("int") {
                        concrete.push_str("987654321");
                    } else {
                        concrete.push_str("rbac-probe");
                    }
                } else {
                    concrete.push_str(segment);
                }
                concrete.push('/');
            }
            concrete.pop();
            let body = if op.get("requestBody").is_some() {
                match bodies.get(id.as_str()) {
                    Some(b) => Some(serde_json::from_str(b).expect("BODIES entries are JSON")),
                    None => {
                        problems.push(format!("{id}: takes a body but has no entry in BODIES"));
                        continue;
                    }
                }
            } else {
                None
            };
            out.push(Operation {
                id,
                method: method.to_uppercase().parse().expect("HTTP method"),
                path: concrete,
                least,
                body,
            });
        }
    }
    assert!(
        problems.is_empty(),
        "spec problems:\n{}",
        problems.join("\n")
    );
    out
}

#[tokio::test]
async fn every_operation_enforces_its_least_role() {
    let app = common::spawn_app().await;
    let spec: Value = serde_json::from_str(&aiops::api::spec_json()).unwrap();
    let ops = operations(&spec);
    assert!(ops.len() >= 15, "only {} operations found", ops.len());

    let mut users = HashMap::new();
    for role in Role::ALL {
        let (id, _) = app.user_with_role(role.as_str()).await;
        users.insert(role, id);
    }

    let mut failures = Vec::new();
    let mut checked = 0;
    for op in &ops {
        let Some(least) = op.least else {
            continue;
        };
        let (status, body) = app
            .call(op.method.clone(), &op.path, None, op.body.clone())
            .await;
        checked += 1;
        if status != 401 {
            failures.push(format!("{} without a token: {status} {body}", op.id));
        }
        for role in Role::ALL {
            // A fresh token per call, so operations such as logout cannot affect the next one.
            let token = app.mint_token(users[&role]).await;
            let (status, body) = app
                .call(op.method.clone(), &op.path, Some(&token), op.body.clone())
                .await;
            checked += 1;
            let allowed = role.allows(least);
            let ok = if allowed {
                status != 401 && status != 403 && status < 500
            } else {
                status == 403 && body["code"] == json!("forbidden")
            };
            if !ok {
                failures.push(format!(
                    "{} {} as {role} (least {least}, expected {}): {status} {body}",
                    op.method,
                    op.id,
                    if allowed { "allowed" } else { "403" }
                ));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "RBAC mismatches:\n{}",
        failures.join("\n")
    );
    assert!(checked > 60, "only {checked} calls checked");
}

#[tokio::test]
async fn public_operations_are_only_version_and_login() {
    let spec: Value = serde_json::from_str(&aiops::api::spec_json()).unwrap();
    let public: Vec<String> = operations(&spec)
        .into_iter()
        .filter(|op| op.least.is_none())
        .map(|op| op.id)
        .collect();
    // Anything public must be deliberately listed here.
    let allowed = ["version_get", "auth_login", "alertmanager_webhook_receive"];
    for id in &public {
        assert!(
            allowed.contains(&id.as_str()),
            "{id} is public but not on the allow list"
        );
    }
    assert!(public.contains(&"auth_login".to_owned()));
}
