//! Runbooks through the real API on real PostgreSQL: CRUD, validation errors with paths and
//! positions, import idempotency and versions, diff and restore, delete keeping executions,
//! dry run, and every `workflows/` file validated and round-tripped.

mod common;

use aiops::domain::runbook::{canonicalize, parse_yaml, to_canonical_yaml};
use aiops::templates::validate_runbook;
use reqwest::Method;
use serde_json::{Value, json};

const YAML_V1: &str = r#"
name: restart-service
description: Restart a failing service
category: service-management
mode: semi_auto
target_os: linux
requires_approval: true
environment_vars:
  SERVICE_NAME: "{{ alert.labels.service }}"
steps:
  - name: Check service status
    command: systemctl status -- {{ SERVICE_NAME }}
    expected_exit_codes: [0, 3]
    timeout_seconds: 30
  - name: Restart service
    command: sudo systemctl restart -- {{ SERVICE_NAME }}
    rollback_command: sudo systemctl stop -- {{ SERVICE_NAME }}
triggers:
  - name: Service down alert
    alert_name_pattern: "ServiceDown*"
    severity_pattern: critical
    labels_match:
      type: service
    cooldown_seconds: 300
"#;

async fn import(app: &common::TestApp, token: &str, yaml: &str) -> (u16, Value) {
    let resp = app
        .client
        .post(app.api("/runbooks/import"))
        .bearer_auth(token)
        .header("content-type", "application/yaml")
        .body(yaml.to_owned())
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

/// Imports of one new runbook at once: one creates it, the others find it unchanged.
#[tokio::test]
async fn parallel_imports_of_a_new_runbook_create_it_once() {
    let app = common::spawn_app().await;
    let (_, engineer) = app.user_with_role("engineer").await;
    let answers =
        futures_util::future::join_all((0..6).map(|_| import(&app, &engineer, YAML_V1))).await;
    let mut created = 0;
    for (status, body) in &answers {
        assert_eq!(*status, 200, "{body}");
        if body["created"] == true {
            created += 1;
        }
        assert_eq!(body["runbook"]["version"], 1, "{body}");
    }
    assert_eq!(created, 1, "{answers:?}");
}

#[tokio::test]
async fn import_is_idempotent_and_versions_every_change() {
    let app = common::spawn_app().await;
    let (_, engineer) = app.user_with_role("engineer").await;

    let (status, body) = import(&app, &engineer, YAML_V1).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["created"], true);
    assert_eq!(body["runbook"]["version"], 1);
    let id = body["runbook"]["id"].as_str().unwrap().to_owned();
    assert_eq!(
        body["runbook"]["steps"][1]["rollback_command"],
        "sudo systemctl stop -- {{ SERVICE_NAME }}"
    );

    // The same YAML again: nothing changes, no version, no audit entry.
    let (status, body) = import(&app, &engineer, YAML_V1).await;
    assert_eq!(status, 200);
    assert_eq!(
        (body["created"].clone(), body["changed"].clone()),
        (json!(false), json!(false))
    );
    assert_eq!(body["runbook"]["version"], 1);
    assert_eq!(app.audit_rows("runbook_import").await.len(), 1);

    // The canonical export is itself a no-op import.
    let export = app
        .client
        .get(app.api(&format!("/runbooks/{id}/export")))
        .bearer_auth(&engineer)
        .send()
        .await
        .unwrap();
    assert_eq!(export.headers()["content-type"], "application/yaml");
    let exported = export.text().await.unwrap();
    assert_eq!(exported, to_canonical_yaml(&parse_yaml(YAML_V1).unwrap()));
    let (_, body) = import(&app, &engineer, &exported).await;
    assert_eq!(body["changed"], false);

    // A change: new version with a generated summary.
    let v2 = YAML_V1.replace("timeout_seconds: 30", "timeout_seconds: 45");
    let (_, body) = import(&app, &engineer, &v2).await;
    assert_eq!(body["changed"], true);
    assert_eq!(body["runbook"]["version"], 2);
    assert_eq!(
        body["change_summary"],
        "modified steps `Check service status`"
    );

    let (status, versions) = app.get(&format!("/runbooks/{id}/versions")).await;
    assert_eq!(status, 200);
    assert_eq!(versions["total"], 2);
    assert_eq!(versions["items"][0]["version"], 2);
    assert_eq!(versions["items"][1]["change_summary"], "created");
    let (_, v1) = app.get(&format!("/runbooks/{id}/versions/1")).await;
    assert_eq!(v1["yaml"].as_str().unwrap(), exported);

    // Diff of the two versions is a readable unified diff.
    let (status, diff) = app.get(&format!("/runbooks/{id}/diff?from=1&to=2")).await;
    assert_eq!(status, 200);
    let text = diff["diff"].as_str().unwrap();
    assert!(text.contains("--- restart-service@v1"), "{text}");
    assert!(
        text.contains("-  timeout_seconds: 30\n") && text.contains("+  timeout_seconds: 45\n"),
        "{text}"
    );

    // Restore version 1: a new version 3 equal to version 1.
    let (status, restored) = app
        .call(
            Method::POST,
            &format!("/runbooks/{id}/versions/1/restore"),
            Some(&engineer),
            None,
        )
        .await;
    assert_eq!(status, 200, "{restored}");
    assert_eq!(restored["runbook"]["version"], 3);
    assert_eq!(restored["change_summary"], "restored version 1");
    let (_, v3) = app.get(&format!("/runbooks/{id}/versions/3")).await;
    assert_eq!(v3["yaml"], v1["yaml"]);
    assert_eq!(app.audit_rows("runbook_restore").await.len(), 1);
    let (_, diff) = app.get(&format!("/runbooks/{id}/diff?from=1&to=3")).await;
    assert_eq!(diff["diff"], "");
    // Versions count from 1, as the document declares; a version that was never written is
    // named with the field that asked for it.
    for (path, field, reason) in [
        (
            format!("/runbooks/{id}/diff?from=0"),
            "from",
            "must be >= 1, not 0",
        ),
        (
            format!("/runbooks/{id}/diff?from=1&to=-2"),
            "to",
            "must be >= 1, not -2",
        ),
        (
            format!("/runbooks/{id}/versions/0"),
            "version",
            "must be >= 1, not 0",
        ),
        (
            format!("/runbooks/{id}/diff?from=9"),
            "from",
            "version 9 does not exist",
        ),
    ] {
        let (status, answer) = app.get(&path).await;
        assert_eq!(status, 422, "{path}: {answer}");
        assert_eq!(answer["details"]["field"], field, "{path}: {answer}");
        assert_eq!(answer["details"]["reason"], reason, "{path}: {answer}");
    }

    // Viewers read but cannot write.
    let (_, viewer) = app.user_with_role("viewer").await;
    let (status, _) = import(&app, &viewer, &v2).await;
    assert_eq!(status, 403);
    let (status, _) = app
        .call(Method::GET, &format!("/runbooks/{id}"), Some(&viewer), None)
        .await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn crud_through_json_documents_with_filters() {
    let app = common::spawn_app().await;
    let doc = json!({
        "name": "db-vacuum",
        "description": "Reclaims table Bloat",
        "category": "database",
        "mode": "manual",
        "steps": [{"name": "vacuum", "command": "vacuumdb --all --analyze-only"}],
        "triggers": [{"name": "bloat", "alert_name_pattern": "PostgresqlBloat*",
                      "time_window_start": "22:00", "time_window_end": "04:00"}]
    });
    let (status, created) = app
        .call(
            Method::POST,
            "/runbooks",
            Some(&app.admin_token),
            Some(doc.clone()),
        )
        .await;
    assert_eq!(status, 201, "{created}");
    let id = created["id"].as_str().unwrap().to_owned();
    assert_eq!(
        created["steps"][0]["timeout_seconds"], 60,
        "defaults are filled in"
    );
    assert_eq!(created["triggers"][0]["time_window_end"], "04:00");
    assert_eq!(app.audit_rows("runbook_create").await.len(), 1);

    let (status, _) = app
        .call(
            Method::POST,
            "/runbooks",
            Some(&app.admin_token),
            Some(doc.clone()),
        )
        .await;
    assert_eq!(status, 409, "duplicate name");
    // Names are unique regardless of case.
    let mut shouted = doc.clone();
    shouted["name"] = json!(doc["name"].as_str().unwrap().to_uppercase());
    let (status, body) = app
        .call(
            Method::POST,
            "/runbooks",
            Some(&app.admin_token),
            Some(shouted),
        )
        .await;
    assert_eq!(status, 409, "{body}");
    assert_eq!(body["details"]["field"], "name", "{body}");

    let other = json!({"name": "win-iis", "target_os": "windows", "mode": "auto",
        "steps": [{"name": "reset", "command": "iisreset /restart"}]});
    let (status, _) = app
        .call(
            Method::POST,
            "/runbooks",
            Some(&app.admin_token),
            Some(other),
        )
        .await;
    assert_eq!(status, 201);

    let (_, page) = app.get("/runbooks?category=database").await;
    assert_eq!(page["total"], 1);
    assert_eq!(page["items"][0]["name"], "db-vacuum");
    let (_, page) = app.get("/runbooks?target_os=windows&mode=auto").await;
    assert_eq!(page["total"], 1);
    assert_eq!(page["items"][0]["name"], "win-iis");
    let (_, page) = app.get("/runbooks?status=draft").await;
    assert_eq!(page["total"], 0);
    // Renaming onto another runbook's name: 409 naming the field, not the constraint.
    let mut renamed = doc.clone();
    renamed["name"] = json!("WIN-iis");
    let (status, body) = app
        .call(
            Method::PUT,
            &format!("/runbooks/{id}"),
            Some(&app.admin_token),
            Some(renamed),
        )
        .await;
    assert_eq!(status, 409, "{body}");
    assert_eq!(body["details"]["field"], "name", "{body}");
    assert_eq!(
        body["details"]["reason"], "is already used by another record",
        "{body}"
    );
    assert!(!body.to_string().contains("_key"), "{body}");

    // Text search: in the name or the description, ignoring case; `%` and `_` are plain text.
    let (_, page) = app.get("/runbooks?search=IIS").await;
    assert_eq!(page["total"], 1);
    assert_eq!(page["items"][0]["name"], "win-iis");
    let (_, page) = app.get("/runbooks?search=bloat").await;
    assert_eq!(page["total"], 1, "{page}");
    assert_eq!(page["items"][0]["name"], "db-vacuum");
    // A listed runbook comes whole, steps and triggers included.
    assert_eq!(page["items"][0]["steps"][0]["name"], "vacuum", "{page}");
    assert_eq!(page["items"][0]["triggers"][0]["name"], "bloat", "{page}");
    let (_, page) = app.get("/runbooks?search=%25").await;
    assert_eq!(page["total"], 0, "{page}");
    let (status, page) = app.get("/runbooks?search=").await;
    assert_eq!(status, 422, "{page}");
    assert_eq!(page["details"]["field"], "search");
    let (_, page) = app.get("/runbooks?limit=1&offset=1").await;
    assert_eq!(
        (
            page["total"].clone(),
            page["items"].as_array().unwrap().len()
        ),
        (json!(2), 1)
    );

    // Update: same document is a no-op, a change bumps the version.
    let (_, same) = app
        .call(
            Method::PUT,
            &format!("/runbooks/{id}"),
            Some(&app.admin_token),
            Some(doc.clone()),
        )
        .await;
    assert_eq!(same["version"], 1);
    let mut changed = doc.clone();
    changed["status"] = json!("disabled");
    let (status, updated) = app
        .call(
            Method::PUT,
            &format!("/runbooks/{id}?change_summary=paused"),
            Some(&app.admin_token),
            Some(changed),
        )
        .await;
    assert_eq!(status, 200, "{updated}");
    assert_eq!(
        (updated["version"].clone(), updated["status"].clone()),
        (json!(2), json!("disabled"))
    );
    let (_, v2) = app.get(&format!("/runbooks/{id}/versions/2")).await;
    assert_eq!(v2["change_summary"], "paused");

    // Unknown fields are refused.
    let (status, body) = app
        .call(
            Method::POST,
            "/runbooks",
            Some(&app.admin_token),
            Some(json!({"name": "x", "steps": [{"name": "a", "command": "true", "bogus": 1}]})),
        )
        .await;
    assert_eq!(status, 400, "{body}");
}

#[tokio::test]
async fn delete_keeps_executions() {
    let app = common::spawn_app().await;
    let (_, body) = import(&app, &app.admin_token, YAML_V1).await;
    let id: uuid::Uuid = body["runbook"]["id"].as_str().unwrap().parse().unwrap();
    let execution: uuid::Uuid = sqlx::query_scalar(
        "INSERT INTO runbook_executions (runbook_id, runbook_version, status) \
         VALUES ($1, 1, 'completed') RETURNING id",
    )
    .bind(id)
    .fetch_one(&app.pool)
    .await
    .unwrap();
    let (status, _) = app
        .call(
            Method::DELETE,
            &format!("/runbooks/{id}"),
            Some(&app.admin_token),
            None,
        )
        .await;
    assert_eq!(status, 204);
    let (status, _) = app.get(&format!("/runbooks/{id}")).await;
    assert_eq!(status, 404);
    let kept: Option<Option<uuid::Uuid>> =
        sqlx::query_scalar("SELECT runbook_id FROM runbook_executions WHERE id = $1")
            .bind(execution)
            .fetch_optional(&app.pool)
            .await
            .unwrap();
    assert_eq!(kept, Some(None), "the execution stays, unlinked");
    let audit = app.audit_rows("runbook_delete").await;
    assert_eq!(audit.len(), 1);
    assert_eq!(audit[0].2, Some(id));
}

/// The validation report of a YAML document (the operation answers 200 either way).
async fn validate_report(app: &common::TestApp, yaml: &str) -> serde_json::Value {
    let (status, report) = app
        .call(
            Method::POST,
            "/runbooks/validate",
            Some(&app.admin_token),
            Some(json!({ "yaml": yaml })),
        )
        .await;
    assert_eq!(status, 200, "{report}");
    report
}

#[tokio::test]
async fn validation_errors_name_the_field_and_position() {
    let app = common::spawn_app().await;
    // Syntax and unknown fields: 400 with line and column.
    let (status, body) = import(
        &app,
        &app.admin_token,
        "name: x\nsteps:\n  - name: a\n    comand: ls\n    timeout_seconds: soon\n",
    )
    .await;
    assert_eq!(status, 400, "{body}");
    // Every field problem of the document is in the message, each with its place, in the
    // order of the file; the details are those of the first.
    assert_eq!(
        body["message"]
            .as_str()
            .unwrap()
            .split("; ")
            .take(2)
            .collect::<Vec<_>>(),
        [
            "3:5: steps[0].command is required",
            "4:5: steps[0].comand is not a field here",
        ],
        "{body}"
    );
    assert!(
        body["message"].as_str().unwrap().ends_with(
            "; 5:22: steps[0].timeout_seconds must be a whole number from -2147483648 to 2147483647"
        ),
        "{body}"
    );
    assert_eq!(
        body["details"],
        json!({"field": "steps[0].command", "reason": "is required", "line": 3, "column": 5})
    );

    // Semantic problems: 422 with the field path and where it is.
    let yaml = "name: x\nsteps:\n  - name: a\n    command: 'true'\n  - name: b\n    command: 'true'\n  - name: c\n    command: 'true'\n    timeout_seconds: 0\n";
    let (status, body) = import(&app, &app.admin_token, yaml).await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(body["details"]["field"], "steps[2].timeout_seconds");
    assert_eq!(body["details"]["reason"], "must be > 0");
    assert_eq!(body["message"], "steps[2].timeout_seconds must be > 0");
    assert_eq!(
        (
            body["details"]["line"].clone(),
            body["details"]["column"].clone()
        ),
        (json!(9), json!(22))
    );

    // The validate operation lists every problem.
    let yaml = "name: x\nsteps:\n  - name: a\n    command: echo \"{{ alert.name }}\"\n  - name: a\n    command: echo {{ NOPE }}\ntriggers:\n  - name: t\n    alert_name_pattern: 're:(oops'\n    time_window_start: '25:00'\n    time_window_end: '06:00'\n";
    let report = validate_report(&app, yaml).await;
    assert_eq!(report["valid"], false);
    let paths: Vec<&str> = report["issues"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["path"].as_str().unwrap())
        .collect();
    for expected in [
        "steps[1].name",
        "triggers[0].alert_name_pattern",
        "triggers[0].time_window_start",
        "steps[0].command",
        "steps[1].command",
    ] {
        assert!(
            paths.contains(&expected),
            "{expected} missing from {paths:?}"
        );
    }

    // The validate operation lists every field problem a document has as written, too.
    let yaml = "name: x\nmode: sometimes\nsteps:\n  - name: a\n    command: 'true'\n    retry_count: many\n";
    let report = validate_report(&app, yaml).await;
    assert_eq!(report["valid"], false);
    assert_eq!(
        report["issues"],
        json!([
            {"path": "mode", "line": 2, "column": 7,
             "message": "cannot be `sometimes`; it is one of auto, semi_auto, manual"},
            {"path": "steps[0].retry_count", "line": 6, "column": 18,
             "message": "must be a whole number from -2147483648 to 2147483647"},
        ])
    );
    // ... and, with unknown fields, the problems the rest of the document has: the checks
    // after parsing read it without those fields.
    let yaml = "name: x\nbogus: 1\nsteps:\n  - name: a\n    command: 'true'\n    retry_countt: 2\n  - name: a\n    command: echo {{ NOPE }}\n    timeout_seconds: -5\n";
    let report = validate_report(&app, yaml).await;
    assert_eq!(report["valid"], false);
    let found: Vec<(&str, i64)> = report["issues"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| (i["path"].as_str().unwrap(), i["line"].as_i64().unwrap()))
        .collect();
    assert_eq!(
        found,
        [
            ("bogus", 2),
            ("steps[0].retry_countt", 6),
            ("steps[1].name", 7),
            ("steps[1].command", 8),
            ("steps[1].timeout_seconds", 9),
        ],
        "{report}"
    );
    // A value of the wrong type would be checked through its stand-in (here against the
    // steps' timeouts): then only the field problems are reported.
    let yaml = "name: x\ntimeout_seconds: soon\nsteps:\n  - name: a\n    command: 'true'\n    timeout_seconds: 30\n";
    let report = validate_report(&app, yaml).await;
    let paths: Vec<&str> = report["issues"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["path"].as_str().unwrap())
        .collect();
    assert_eq!(paths, ["timeout_seconds"], "{report}");

    // Oversized documents: 413.
    let big = format!(
        "name: x\ndescription: '{}'\nsteps:\n  - name: a\n    command: 'true'\n",
        "a".repeat(300 * 1024)
    );
    let (status, _) = import(&app, &app.admin_token, &big).await;
    assert_eq!(status, 413);
}

/// Each validation rule, named, with a document that breaks only it.
#[test]
fn each_validation_rule_has_a_named_error() {
    let base = "name: ok\nsteps:\n  - name: a\n    command: 'true'\n";
    let cases: &[(&str, &str, &str)] = &[
        (
            "bad name",
            "name: 'no spaces'\nsteps:\n  - name: a\n    command: 'true'\n",
            "name must be",
        ),
        (
            "no steps",
            "name: x\nsteps: []\n",
            "steps must contain at least one step",
        ),
        (
            "step timeout",
            "name: x\nsteps:\n  - name: a\n    command: 'true'\n    timeout_seconds: 0\n",
            "steps[0].timeout_seconds must be > 0",
        ),
        (
            "step over runbook timeout",
            "name: x\ntimeout_seconds: 10\nsteps:\n  - name: a\n    command: 'true'\n    timeout_seconds: 20\n",
            "steps[0].timeout_seconds must not exceed",
        ),
        (
            "duplicate order",
            "name: x\nsteps:\n  - {order: 1, name: a, command: 'true'}\n  - {order: 1, name: b, command: 'true'}\n",
            "steps[1].order repeats order 1",
        ),
        (
            "partial order",
            "name: x\nsteps:\n  - {order: 1, name: a, command: 'true'}\n  - {name: b, command: 'true'}\n",
            "steps must give `order` on every step or on none",
        ),
        (
            "duplicate step name",
            "name: x\nsteps:\n  - {name: a, command: 'true'}\n  - {name: a, command: 'true'}\n",
            "steps[1].name repeats",
        ),
        (
            "exit code range",
            "name: x\nsteps:\n  - {name: a, command: 'true', expected_exit_codes: [256]}\n",
            "steps[0].expected_exit_codes[0] must be between 0 and 255",
        ),
        (
            "empty command",
            "name: x\nsteps:\n  - {name: a, command: ' '}\n",
            "steps[0].command must not be empty",
        ),
        (
            "rate limit pair",
            &format!("{base}rate_limit_count: 3\n"),
            "rate_limit_window_seconds must be set",
        ),
        (
            "approval role",
            &format!("{base}approval_roles: [root]\n"),
            "approval_roles[0] is `root`",
        ),
        (
            "nobody may approve",
            &format!("{base}mode: semi_auto\napproval_roles: [viewer]\n"),
            "approval_roles must name operator, engineer or admin",
        ),
        (
            "approval without roles",
            &format!("{base}requires_approval: true\napproval_roles: []\n"),
            "approval_roles must name operator, engineer or admin",
        ),
        (
            "runbook retries",
            &format!("{base}max_retries: 2147483647\n"),
            "max_retries must be 0 to 100",
        ),
        (
            "step retries",
            "name: x\nsteps:\n  - {name: a, command: 'true', retry_count: 101}\n",
            "steps[0].retry_count must be 0 to 100",
        ),
        (
            "allowed servers shape",
            &format!("{base}allowed_servers: {{a: 1}}\n"),
            "allowed_servers.a unknown key (expected tags, environments, server_ids)",
        ),
        (
            "allowed server id",
            &format!("{base}allowed_servers: {{server_ids: [web-1]}}\n"),
            "allowed_servers.server_ids[0] must be a UUID",
        ),
        (
            "allowed servers scalar",
            &format!("{base}allowed_servers: web\n"),
            "allowed_servers must be an object, an array of tags or null",
        ),
        (
            "config shape",
            &format!("{base}config: [1]\n"),
            "config must be a mapping",
        ),
        (
            "reserved var",
            &format!("{base}environment_vars:\n  alert: x\n"),
            "environment_vars.alert is a reserved",
        ),
        (
            "bad glob",
            &format!("{base}triggers:\n  - {{name: t, alert_name_pattern: '[oops'}}\n"),
            "triggers[0].alert_name_pattern is not a valid glob",
        ),
        (
            "bad regex",
            &format!(
                "{base}triggers:\n  - {{name: t, alert_name_pattern: '*', severity_pattern: '/(/'}}\n"
            ),
            "triggers[0].severity_pattern is not a valid regular expression",
        ),
        (
            "bad label pattern",
            &format!(
                "{base}triggers:\n  - {{name: t, alert_name_pattern: '*', labels_match: {{job: 're:['}}}}\n"
            ),
            "triggers[0].labels_match.job is not a valid regular expression",
        ),
        (
            "malformed window",
            &format!(
                "{base}triggers:\n  - {{name: t, alert_name_pattern: '*', time_window_start: '7pm', time_window_end: '06:00'}}\n"
            ),
            "triggers[0].time_window_start is `7pm`",
        ),
        (
            "half window",
            &format!(
                "{base}triggers:\n  - {{name: t, alert_name_pattern: '*', time_window_start: '07:00'}}\n"
            ),
            "triggers[0].time_window_end must be set",
        ),
        (
            "empty window",
            &format!(
                "{base}triggers:\n  - {{name: t, alert_name_pattern: '*', time_window_start: '07:00', time_window_end: '07:00'}}\n"
            ),
            "triggers[0].time_window_end must differ",
        ),
        (
            "duplicate trigger",
            &format!(
                "{base}triggers:\n  - {{name: t, alert_name_pattern: '*'}}\n  - {{name: t, alert_name_pattern: '*'}}\n"
            ),
            "triggers[1].name repeats",
        ),
        (
            "negative cooldown",
            &format!(
                "{base}triggers:\n  - {{name: t, alert_name_pattern: '*', cooldown_seconds: -1}}\n"
            ),
            "triggers[0].cooldown_seconds must be >= 0",
        ),
        (
            "template syntax",
            "name: x\nsteps:\n  - {name: broken, command: 'echo {{ x'}\n",
            "steps[0].command has a template syntax error in step `broken`",
        ),
        (
            "rollback syntax",
            "name: x\nsteps:\n  - {name: r, command: 'true', rollback_command: 'echo {% if %}'}\n",
            "steps[0].rollback_command has a template syntax error in step `r`",
        ),
        (
            "undefined variable",
            "name: x\nsteps:\n  - {name: u, command: 'echo {{ SERVICE }}'}\n",
            "refers to `SERVICE`, which is never defined",
        ),
        (
            "undefined vars entry",
            "name: x\nsteps:\n  - {name: u, command: 'echo {{ vars.SERVICE }}'}\n",
            "refers to `vars.SERVICE`",
        ),
        (
            "template in quotes",
            "name: x\nsteps:\n  - {name: q, command: \"echo '{{ alert.name }}'\"}\n",
            "inside single quotes",
        ),
        (
            "condition syntax",
            "name: x\nsteps:\n  - {name: c, command: 'true', condition: 'alert.name =='}\n",
            "steps[0].condition does not compile in step `c`",
        ),
        (
            "step output not captured",
            "name: x\nsteps:\n  - {name: a, command: 'true'}\n  - {name: b, command: 'true', condition: \"steps.a.stdout == 'x'\"}\n",
            "does not set capture_output",
        ),
    ];
    for (label, yaml, expected) in cases {
        let doc = parse_yaml(yaml).unwrap_or_else(|e| panic!("{label}: {e}"));
        let issues: Vec<String> = validate_runbook(&doc)
            .iter()
            .map(ToString::to_string)
            .collect();
        assert!(
            issues.iter().any(|i| i.contains(expected)),
            "{label}: expected `{expected}` in {issues:?}"
        );
    }
    assert!(validate_runbook(&parse_yaml(base).unwrap()).is_empty());
}

#[tokio::test]
async fn dry_run_renders_and_explains_triggers() {
    let app = common::spawn_app().await;
    let (_, body) = import(&app, &app.admin_token, YAML_V1).await;
    let id = body["runbook"]["id"].as_str().unwrap().to_owned();
    let (_, viewer) = app.user_with_role("viewer").await;
    let request = json!({
        "runbook_id": id,
        "alert": {"name": "ServiceDownNginx", "labels": {"service": "nginx; reboot", "type": "service", "severity": "warning"}},
        "server": {"hostname": "web-1"},
    });
    let (status, report) = app
        .call(
            Method::POST,
            "/runbooks/dry-run",
            Some(&viewer),
            Some(request),
        )
        .await;
    assert_eq!(status, 200, "{report}");
    assert_eq!(
        report["steps"][0]["command"],
        "systemctl status -- 'nginx; reboot'"
    );
    assert_eq!(
        report["steps"][1]["rollback_command"],
        "sudo systemctl stop -- 'nginx; reboot'"
    );
    assert_eq!(report["triggers"][0]["matched"], false);
    assert_eq!(
        report["triggers"][0]["reasons"],
        json!(["severity `warning` does not match `critical`"])
    );
    assert!(report.get("matched_trigger").is_none());

    // Inline YAML, inline server, a condition, a window and a match.
    let yaml = "name: inline\nsteps:\n  - name: only-prod\n    condition: server.environment == 'production'\n    command: echo {{ server.hostname }}\ntriggers:\n  - name: night\n    alert_name_pattern: 'Node*'\n    time_window_start: '22:00'\n    time_window_end: '06:00'\n";
    let (status, report) = app
        .call(
            Method::POST,
            "/runbooks/dry-run",
            Some(&viewer),
            Some(json!({
                "yaml": yaml,
                "alert": {"name": "NodeDown"},
                "server": {"hostname": "db 1", "environment": "staging"},
                "at": "2026-11-24T23:15:00Z",
            })),
        )
        .await;
    assert_eq!(status, 200, "{report}");
    assert_eq!(report["steps"][0]["condition_result"], false);
    assert_eq!(report["steps"][0]["command"], "echo 'db 1'");
    assert_eq!(report["matched_trigger"], "night");

    // The window is read in the alerts.timezone setting, as alert matching reads it: 23:15 UTC
    // is 08:15 in Tokyo, outside 22:00-06:00 there.
    let (status, body) = app
        .call(
            Method::PUT,
            "/system-config/alerts.timezone",
            Some(&app.admin_token),
            Some(json!({ "value": "Asia/Tokyo" })),
        )
        .await;
    assert!(status == 200 || status == 201, "{body}");
    let at_tokyo = |at: &str| {
        json!({ "yaml": yaml, "alert": {"name": "NodeDown"},
                "server": {"hostname": "db 1"}, "at": at })
    };
    let (_, report) = app
        .call(
            Method::POST,
            "/runbooks/dry-run",
            Some(&viewer),
            Some(at_tokyo("2026-11-24T23:15:00Z")),
        )
        .await;
    assert_eq!(report["triggers"][0]["matched"], false, "{report}");
    assert!(
        report["triggers"][0]["reasons"][0]
            .as_str()
            .is_some_and(|r| r.contains("Asia/Tokyo")),
        "{report}"
    );
    let (_, report) = app
        .call(
            Method::POST,
            "/runbooks/dry-run",
            Some(&viewer),
            Some(at_tokyo("2026-11-24T14:15:00Z")),
        )
        .await;
    assert_eq!(
        report["matched_trigger"], "night",
        "23:15 in Tokyo: {report}"
    );

    // An alert is firing or resolved, nothing else.
    let (status, body) = app
        .call(
            Method::POST,
            "/runbooks/dry-run",
            Some(&viewer),
            Some(json!({ "yaml": yaml, "alert": {"name": "NodeDown", "status": "bogus"} })),
        )
        .await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(body["details"]["field"], "alert.status", "{body}");

    // The alert has the keys a run it starts has, computed as intake would.
    let (status, report) = app
        .call(
            Method::POST,
            "/runbooks/dry-run",
            Some(&viewer),
            Some(json!({
                "yaml": "name: keys\nsteps:\n  - name: k\n    command: echo {{ alert.alertname }} {{ alert.source }} {{ alert.instance }} {{ alert.fingerprint }}\n",
                "alert": {"name": "NodeDown", "labels": {"instance": "db-1:9100", "source": "loki"}},
                "server": {"hostname": "db-1"},
            })),
        )
        .await;
    assert_eq!(status, 200, "{report}");
    let labels = [
        ("alertname", "NodeDown"),
        ("instance", "db-1:9100"),
        ("source", "loki"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    assert_eq!(
        report["steps"][0]["command"],
        format!(
            "echo NodeDown loki db-1:9100 {}",
            aiops::domain::alert::fingerprint_of(&labels)
        )
    );

    // Nothing was stored by the dry run.
    let (_, page) = app.get("/runbooks").await;
    assert_eq!(page["total"], 1);

    let (status, _) = app
        .call(
            Method::POST,
            "/runbooks/dry-run",
            Some(&viewer),
            Some(json!({
            "alert": {"name": "NodeDown"}, "server": {"hostname": "x"}})),
        )
        .await;
    assert_eq!(status, 422, "a runbook must be given");
}

#[tokio::test]
async fn every_workflow_file_validates_round_trips_and_applies() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("workflows");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    assert!(files.len() >= 6, "{files:?}");
    let app = common::spawn_app().await;
    let mut windows = 0;
    for file in &files {
        let text = std::fs::read_to_string(file).unwrap();
        let doc = parse_yaml(&text).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        assert!(
            validate_runbook(&doc).is_empty(),
            "{}: {:?}",
            file.display(),
            validate_runbook(&doc)
        );
        assert!(
            !doc.triggers.is_empty(),
            "{} has no trigger",
            file.display()
        );
        if doc.target_os == aiops::domain::runbook::TargetOs::Windows {
            windows += 1;
        }
        // Canonical YAML parses back to the same document and is a fixed point.
        let canonical = to_canonical_yaml(&doc);
        let again = parse_yaml(&canonical).unwrap();
        assert_eq!(again, canonicalize(&doc), "{}", file.display());
        assert_eq!(to_canonical_yaml(&again), canonical, "{}", file.display());

        // Through the API: import, export gives the canonical YAML, re-import changes nothing.
        let (status, body) = import(&app, &app.admin_token, &text).await;
        assert_eq!(status, 200, "{}: {body}", file.display());
        let id = body["runbook"]["id"].as_str().unwrap();
        let exported = app
            .client
            .get(app.api(&format!("/runbooks/{id}/export")))
            .bearer_auth(&app.admin_token)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert_eq!(exported, canonical, "{}", file.display());
        let (_, body) = import(&app, &app.admin_token, &exported).await;
        assert_eq!(body["changed"], false, "{}", file.display());
    }
    assert!(windows >= 1, "a Windows runbook ships");
}
