//! Executions on managed servers over SSH (a real sshd on loopback): fan-out to every server
//! matching a tag selector, one execution per server, at most `max_concurrency` at a time;
//! `allowed_servers` enforced; the server's password never stored or streamed. A worker killed
//! outright mid-step does not leave its remote command running.

mod common;
mod procs;
mod sshd;

use reqwest::Method;
use serde_json::json;

const KEY: &str = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";

/// Imports `yaml` and starts it on every `role=web` server, one at a time; returns the
/// runbook and the answer.
async fn one_at_a_time_on_web(
    app: &common::TestApp,
    yaml: &str,
) -> (uuid::Uuid, serde_json::Value) {
    let runbook = app.runbook_from_yaml(yaml).await;
    let created = app
        .create(
            "/executions",
            json!({ "runbook_id": runbook, "servers": { "tags": ["role=web"] }, "max_concurrency": 1 }),
        )
        .await;
    (runbook, created)
}

#[tokio::test]
async fn fan_out_by_tag_runs_one_execution_per_server_within_the_concurrency_limit() {
    let app = common::spawn_app_with(|c| c.secret_key = Some(format!("main:{KEY}"))).await;
    let worker = common::TestWorker::start_ssh(&app.pool, &app.config).await;
    let sshd = sshd::sshd();
    let mut servers = Vec::new();
    for (name, tags) in [
        ("web-1", json!(["role=web"])),
        ("web-2", json!(["role=web"])),
        ("web-3", json!(["role=web"])),
        ("db-1", json!(["role=db"])),
    ] {
        let (status, body) = app
            .call(
                Method::POST,
                "/servers",
                Some(&app.admin_token),
                Some(
                    json!({ "name": name, "hostname": "127.0.0.1", "port": sshd.port,
                              "username": sshd::USER, "auth_type": "password",
                              "password": sshd.password, "tags": tags }),
                ),
            )
            .await;
        assert_eq!(status, 201, "{body}");
        servers.push((name, body["id"].as_str().unwrap().to_owned()));
    }
    let marker = format!("/tmp/aiops-fanout-{}", uuid::Uuid::new_v4().simple());
    let yaml = format!(
        r#"
name: web-fanout
mode: auto
allowed_servers: ["role=web"]
environment_vars:
  MARK: "{marker}"
steps:
  - name: who
    command: echo {{{{ server.name }}}} $(id -un) >> {{{{ MARK }}}}
    capture_output: true
  - name: hold
    command: sleep 0.3
"#
    );
    let (runbook, created) = one_at_a_time_on_web(&app, &yaml).await;
    let ids: Vec<uuid::Uuid> = created["execution_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().parse().unwrap())
        .collect();
    assert_eq!(ids.len(), 3, "one execution per web server");
    let mut spans = Vec::new();
    for id in &ids {
        let done = app.wait_for_status(*id, common::FINISHED, 60).await;
        assert_eq!(done["status"], "completed", "{done}");
        let start =
            chrono::DateTime::parse_from_rfc3339(done["started_at"].as_str().unwrap()).unwrap();
        let end =
            chrono::DateTime::parse_from_rfc3339(done["completed_at"].as_str().unwrap()).unwrap();
        spans.push((start, end));
    }
    spans.sort();
    for pair in spans.windows(2) {
        assert!(
            pair[1].0 >= pair[0].1,
            "executions overlapped with max_concurrency 1: {spans:?}"
        );
    }
    let written = std::fs::read_to_string(&marker).unwrap();
    let mut lines: Vec<&str> = written.lines().collect();
    lines.sort();
    assert_eq!(
        lines,
        [
            format!("web-1 {}", sshd::USER),
            format!("web-2 {}", sshd::USER),
            format!("web-3 {}", sshd::USER)
        ]
    );

    // allowed_servers: the db server is refused at creation.
    let db = &servers[3].1;
    let (status, body) = app
        .call(
            Method::POST,
            "/executions",
            Some(&app.admin_token),
            Some(json!({ "runbook_id": runbook, "server_id": db })),
        )
        .await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(body["details"]["field"], "server_id");

    let leaked: i64 = sqlx::query_scalar(
        "SELECT (SELECT count(*) FROM step_executions WHERE stdout LIKE '%' || $1 || '%' OR command LIKE '%' || $1 || '%') \
         + (SELECT count(*) FROM execution_events WHERE data LIKE '%' || $1 || '%')",
    )
    .bind(&sshd.password)
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(leaked, 0);
    let _ = std::fs::remove_file(&marker);

    // A run rolling back after it failed keeps its slot: with max_concurrency 1 the next
    // server's run starts only once the previous rollback is done. A server that an unfinished
    // run targets cannot be deleted from under it.
    let rolled = format!(
        "/tmp/aiops-fanout-rollback-{}",
        uuid::Uuid::new_v4().simple()
    );
    let failing = format!(
        r#"
name: web-fanout-rollback
mode: auto
environment_vars:
  MARK: "{rolled}"
steps:
  - name: change
    command: echo start {{{{ server.name }}}} >> {{{{ MARK }}}}
    rollback_command: sleep 2; echo rolled {{{{ server.name }}}} >> {{{{ MARK }}}}
  - name: break
    command: exit 1
"#
    );
    one_at_a_time_on_web(&app, &failing).await;
    let web3_path = format!("/servers/{}", servers[2].1);
    let delete_web3 = || app.call(Method::DELETE, &web3_path, Some(&app.admin_token), None);
    let (status, body) = delete_web3().await;
    assert_eq!(status, 409, "{body}");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let lines = loop {
        let text = std::fs::read_to_string(&rolled).unwrap_or_default();
        let lines: Vec<String> = text.lines().map(str::to_owned).collect();
        if lines.len() >= 6 {
            break lines;
        }
        assert!(std::time::Instant::now() < deadline, "{lines:?}");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    for pair in lines.chunks(2) {
        let server = pair[0].strip_prefix("start ").expect("a run starts");
        assert_eq!(pair[1], format!("rolled {server}"), "{lines:?}");
    }
    // Once every rollback is done, the server can go.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let (status, body) = delete_web3().await;
        if status == 204 {
            break;
        }
        assert_eq!(status, 409, "{body}");
        assert!(std::time::Instant::now() < deadline, "{body}");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let _ = std::fs::remove_file(&rolled);
    worker.stop().await;
}

#[tokio::test]
async fn a_killed_workers_remote_command_dies_with_its_connection() {
    let app = common::spawn_app_with(|c| c.secret_key = Some(format!("main:{KEY}"))).await;
    let sshd = sshd::sshd();
    let server = app
        .create_server(json!({ "name": "orphan-host", "hostname": "127.0.0.1",
                               "port": sshd.port, "username": sshd::USER,
                               "auth_type": "password", "password": sshd.password }))
        .await;
    let pidfile = std::path::PathBuf::from(format!(
        "/tmp/aiops-remote-orphan-{}",
        uuid::Uuid::new_v4().simple()
    ));
    let runbook = app
        .runbook_from_yaml(&common::background_sleep_runbook("remote-orphan", &pidfile))
        .await;
    let mut doomed = app
        .worker_command(&[])
        .env("AIOPS_SECRET_KEY", format!("main:{KEY}"))
        .spawn()
        .unwrap();
    app.start_execution(json!({ "runbook_id": runbook, "server_id": server }))
        .await;
    let pid = procs::wait_for_pid(&pidfile, std::time::Duration::from_secs(30)).await;
    assert!(procs::alive(pid));

    doomed.start_kill().unwrap(); // SIGKILL: no executor is left to kill the remote group
    doomed.wait().await.unwrap();
    // The watcher notices the session's sshd is gone, waits 3 s for a kill over a new
    // connection that cannot come, then kills the group.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    while procs::alive(pid) && std::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(
        !procs::alive(pid),
        "remote sleep {pid} outlived the connection of the worker killed while running it"
    );
    let _ = std::fs::remove_file(&pidfile);
}
