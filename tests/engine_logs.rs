//! Secrets stay out of the logs: a worker process at debug level runs a step that prints a secret
//! variable; neither its log output nor the database holds the secret afterwards. A command run
//! on the worker's host does not see the worker's own environment (database URL, secret key).

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
    let mut worker = app
        .worker_command(&[])
        .env("AIOPS_SECRET_KEY", common::TEST_SECRET_KEY)
        .env("AIOPS_LOG", "debug")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let id = app
        .start_execution(json!({ "runbook_id": runbook, "variables": { "API_TOKEN": secret } }))
        .await;
    let done = app.wait_for_status(id, common::FINISHED, 60).await;
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
    assert_not_stored(&app.pool, &secret).await;
    let sealed: Option<String> =
        sqlx::query_scalar("SELECT secret_vars_encrypted FROM runbook_executions WHERE id = $1")
            .bind(id)
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert!(
        sealed.is_some_and(|e| e.starts_with("v1:test:")),
        "the secret variable is sealed under the configured key"
    );

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

#[tokio::test]
async fn a_local_command_gets_neither_the_database_url_nor_the_secret_key() {
    let app = common::spawn_app().await;
    let runbook = app
        .runbook_from_yaml(
            "name: local-env\nmode: auto\nenvironment_vars:\n  GREETING: hello\nsteps:\n  - name: env\n    command: env\n",
        )
        .await;
    let mut worker = app
        .worker_command(&[])
        .env("AIOPS_SECRET_KEY", common::TEST_SECRET_KEY)
        .env(
            "AIOPS_LOCAL_ENV_PASSTHROUGH",
            "AIOPS_TEST_PROXY, AIOPS_TEST_UNSET",
        )
        .env("AIOPS_TEST_PROXY", "http://proxy.example:3128")
        .env("AIOPS_TEST_HIDDEN", "not-for-commands")
        .env_remove("AIOPS_TEST_UNSET")
        .env("HOME", "/var/lib/aiops-test-home")
        .spawn()
        .unwrap();
    let id = app.start_execution(json!({ "runbook_id": runbook })).await;
    let done = app.wait_for_status(id, common::FINISHED, 60).await;
    assert_eq!(done["status"], "completed", "{done}");
    let stdout = app.steps(id).await[0]["stdout"]
        .as_str()
        .unwrap()
        .to_owned();
    let vars: std::collections::BTreeMap<&str, &str> =
        stdout.lines().filter_map(|l| l.split_once('=')).collect();
    assert_eq!(vars.get("GREETING"), Some(&"hello"), "{stdout}");
    assert_eq!(
        vars.get("AIOPS_TEST_PROXY"),
        Some(&"http://proxy.example:3128"),
        "a passed-through variable arrives: {stdout}"
    );
    assert_eq!(
        vars.get("HOME"),
        Some(&"/var/lib/aiops-test-home"),
        "{stdout}"
    );
    assert!(vars.get("PATH").is_some_and(|p| !p.is_empty()), "{stdout}");
    assert!(
        !stdout.contains(&app.database_url),
        "database URL leaked: {stdout}"
    );
    assert!(
        !stdout.contains(common::TEST_SECRET_KEY),
        "secret key leaked: {stdout}"
    );
    assert!(!stdout.contains("not-for-commands"), "{stdout}");
    // Nothing else of the worker's environment: only the host basics, the step's variable, the
    // passed-through one and what the shell itself sets.
    let allowed: Vec<&str> = aiops::exec::local::HOST_ENV
        .iter()
        .copied()
        .chain([
            "GREETING",
            "AIOPS_TEST_PROXY",
            "PWD",
            "OLDPWD",
            "SHLVL",
            "_",
        ])
        .collect();
    for name in vars.keys() {
        assert!(
            allowed.contains(name),
            "{name} came from the worker: {stdout}"
        );
    }
    let pid = worker.id().unwrap().to_string();
    std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    worker.wait().await.unwrap();

    // A name that is not a variable name is refused at start, naming it.
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_aiops"))
        .args(["worker", "--local-env-passthrough", "HTTP_PROXY,bad-name"])
        .env("DATABASE_URL", &app.database_url)
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("`bad-name` is not a variable name"),
        "{stderr}"
    );
}

#[tokio::test]
async fn secret_variables_are_refused_without_a_secret_key() {
    let app = common::spawn_app_with(|c| c.secret_key = None).await;
    let runbook = app
        .runbook_from_yaml("name: no-key\nmode: auto\nenvironment_vars:\n  SERVICE: none\n  api_token: set-at-start\nsteps:\n  - name: s\n    command: \"true\"\n")
        .await;
    let (status, body) = app
        .call(
            reqwest::Method::POST,
            "/executions",
            Some(&app.admin_token),
            Some(json!({ "runbook_id": runbook, "variables": { "SERVICE": "web", "api_token": "t0p" } })),
        )
        .await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(body["details"]["field"], "variables.api_token", "{body}");
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM runbook_executions")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(stored, 0, "nothing was stored");
    // Without secret variables the same runbook starts.
    let (status, body) = app
        .call(
            reqwest::Method::POST,
            "/executions",
            Some(&app.admin_token),
            Some(json!({ "runbook_id": runbook, "variables": { "SERVICE": "web" } })),
        )
        .await;
    assert_eq!(status, 201, "{body}");
}

/// Scans every column of every row of every table, as text, for `secret`.
async fn assert_not_stored(pool: &sqlx::PgPool, secret: &str) {
    let tables: Vec<String> = sqlx::query_scalar(
        "SELECT quote_ident(table_name) FROM information_schema.tables \
         WHERE table_schema = 'public' AND table_type = 'BASE TABLE'",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    assert!(tables.len() > 20, "{tables:?}");
    for table in tables {
        // The names come from the catalog and are quoted with quote_ident.
        let hits: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "SELECT count(*) FROM {table} t WHERE t::text LIKE '%' || $1 || '%'"
        )))
        .bind(secret)
        .fetch_one(pool)
        .await
        .unwrap();
        assert_eq!(hits, 0, "the secret is stored in plaintext in {table}");
    }
}

#[tokio::test]
async fn a_sensitive_steps_captured_output_reaches_later_steps_sealed() {
    let app = common::spawn_app().await;
    let worker = common::TestWorker::start(&app.pool).await;
    // The value exists only in a file on the host: the runbook holds its path, not the value.
    let token = format!("tok-{}", uuid::Uuid::new_v4().simple());
    let dir = common::Scratch::new("token");
    let file = dir.join("token");
    std::fs::write(&file, format!("{token}\n")).unwrap();
    let runbook = app
        .runbook_from_yaml(&format!(
            "name: sensitive-capture\nmode: auto\nsteps:\n  - name: fetch\n    command: cat {path}\n    sensitive: true\n    capture_output: true\n  - name: use\n    command: test {{{{ steps.fetch.stdout | trim }}}} = $(cat {path}) && echo using {{{{ steps.fetch.stdout | trim }}}}\n",
            path = file.display()
        ))
        .await;
    let id = app.start_execution(json!({ "runbook_id": runbook })).await;
    let done = app.wait_for_status(id, common::FINISHED, 60).await;
    assert_eq!(done["status"], "completed", "{done}");
    let steps = app.steps(id).await;
    assert!(
        steps[0]["stdout"].as_str().unwrap().contains("masked"),
        "{}",
        steps[0]
    );
    assert_eq!(steps[1]["stdout"], "using ********\n", "{}", steps[1]);
    assert!(
        steps[0].get("output_encrypted").is_none(),
        "the sealed output is never returned"
    );
    let sealed: Option<String> = sqlx::query_scalar(
        "SELECT output_encrypted FROM step_executions WHERE execution_id = $1 AND step_order = 1",
    )
    .bind(id)
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert!(sealed.is_some_and(|e| e.starts_with("v1:test:")));
    assert_not_stored(&app.pool, &token).await;
    drop(worker);
}
