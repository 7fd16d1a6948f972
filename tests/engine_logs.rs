//! Secrets stay out of the logs: a worker process at debug level runs a step that prints a secret
//! variable; neither its log output nor the database holds the secret afterwards.

mod common;

use std::process::Stdio;

use serde_json::json;
use tokio::io::AsyncReadExt;

#[tokio::test]
async fn a_debug_level_worker_never_logs_a_secret() {
    let app = common::spawn_app().await;
    let secret = format!("pw-{}", uuid::Uuid::new_v4().simple());
    let runbook = app
        .runbook_from_yaml(
            "name: logs-secret\nmode: auto\nenvironment_vars:\n  API_TOKEN: unset\nsteps:\n  - name: print\n    command: echo token=$API_TOKEN; echo {{ API_TOKEN }} >&2; exit 1\n",
        )
        .await;
    let mut worker = tokio::process::Command::new(env!("CARGO_BIN_EXE_aiops"))
        .args(["worker", "--poll-ms", "50", "--maintenance-ms", "200"])
        .env("DATABASE_URL", &app.database_url)
        .env("AIOPS_LOG", "debug")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let id = app
        .start_execution(json!({ "runbook_id": runbook, "variables": { "API_TOKEN": secret } }))
        .await;
    let done = app
        .wait_for_status(id, &["completed", "failed", "cancelled", "timeout"], 60)
        .await;
    assert_eq!(done["status"], "failed", "{done}");
    assert_eq!(app.steps(id).await[0]["stdout"], "token=********\n");
    assert_eq!(
        done["context_vars"]["API_TOKEN"], "********",
        "variables are masked in responses"
    );
    let pid = worker.id().unwrap().to_string();
    std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    let mut stderr = String::new();
    worker
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .await
        .unwrap();
    let mut stdout = String::new();
    worker
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut stdout)
        .await
        .unwrap();
    worker.wait().await.unwrap();
    assert!(stderr.contains("DEBUG"), "the worker logged at debug level");
    assert!(
        !stderr.contains(&secret) && !stdout.contains(&secret),
        "secret in the worker log"
    );
    let in_db: i64 = sqlx::query_scalar(
        "SELECT (SELECT count(*) FROM step_executions WHERE concat(stdout, stderr, command, error_message) LIKE '%' || $1 || '%') \
         + (SELECT count(*) FROM execution_events WHERE data LIKE '%' || $1 || '%') \
         + (SELECT count(*) FROM runbook_executions WHERE concat(error_message, output_summary, execution_log::text) LIKE '%' || $1 || '%') \
         + (SELECT count(*) FROM jobs WHERE concat(payload::text, last_error) LIKE '%' || $1 || '%')",
    )
    .bind(&secret)
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(in_db, 0);

    // Filters on the list.
    let (_, failed) = app
        .get(&format!("/executions?runbook_id={runbook}&status=failed"))
        .await;
    assert_eq!(failed["total"], 1);
    let (_, none) = app
        .get(&format!(
            "/executions?runbook_id={runbook}&status=completed"
        ))
        .await;
    assert_eq!(none["total"], 0);
    let (status, body) = app.get("/executions?status=exploded").await;
    assert_eq!(status, 400, "{body}");
}
