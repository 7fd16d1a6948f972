//! End to end with a real Prometheus Alertmanager (Debian package `prometheus-alertmanager`,
//! installed by `scripts/ensure-alertmanager.sh`): started on loopback with our webhook and a
//! webhook token as its receiver; `amtool alert add` fires an alert, it is stored, matched and a
//! runbook runs over SSH on a real sshd; a second alert of the same group re-sends the first,
//! which is de-duplicated; `amtool` resolves it and the alert is marked resolved.
//!
//! Skipped, loudly, only when the Alertmanager binaries are not installed.

mod common;
mod sshd;

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::{Value, json};

fn find(names: &[&str]) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    for dir in std::env::split_paths(&path).chain([PathBuf::from("/usr/bin")]) {
        for name in names {
            let candidate = dir.join(name);
            if candidate.is_file() {
                return Some(candidate);
            }
        }
    }
    None
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn amtool(amtool: &PathBuf, url: &str, args: &[&str]) {
    let out = tokio::process::Command::new(amtool)
        .arg(format!("--alertmanager.url={url}"))
        .args(args)
        .output()
        .await
        .expect("run amtool");
    assert!(
        out.status.success(),
        "amtool {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

async fn poll<T>(what: &str, seconds: u64, mut f: impl AsyncFnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(seconds);
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn alertmanager_delivers_alerts_that_run_and_resolve() {
    let (Some(alertmanager), Some(amtool_bin)) = (
        find(&["prometheus-alertmanager", "alertmanager"]),
        find(&["amtool"]),
    ) else {
        eprintln!(
            "\n\n*** SKIPPED alertmanager_delivers_alerts_that_run_and_resolve: Alertmanager is not \
             installed (run scripts/ensure-alertmanager.sh as root to install \
             prometheus-alertmanager) ***\n\n"
        );
        return;
    };
    let sshd = sshd::sshd();
    let app = common::spawn_app().await;
    let worker = common::TestWorker::start_ssh(&app.pool, &app.config).await;
    let (status, created) = app
        .call(
            Method::POST,
            "/webhook-tokens",
            Some(&app.admin_token),
            Some(json!({ "name": "alertmanager-e2e" })),
        )
        .await;
    assert_eq!(status, 201, "{created}");
    let token = created["secret"].as_str().unwrap().to_owned();
    let (status, body) = app
        .call(
            Method::POST,
            "/servers",
            Some(&app.admin_token),
            Some(json!({
                "name": "loopback", "hostname": "127.0.0.1", "port": sshd.port,
                "username": sshd::USER, "auth_type": "password", "password": sshd.password,
            })),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    app.runbook_from_yaml(
        r#"
name: e2e-node-down
mode: auto
steps:
  - name: report
    command: echo {{ alert.name }} on {{ alert.labels.instance }}
    capture_output: true
triggers:
  - name: node-down
    alert_name_pattern: NodeDown
    severity_pattern: critical
"#,
    )
    .await;

    let dir = std::env::temp_dir().join(format!("aiops-am-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(dir.join("data")).unwrap();
    let config = format!(
        r#"
route:
  receiver: aiops
  group_by: ['alertname']
  group_wait: 1s
  group_interval: 1s
  repeat_interval: 1h
receivers:
  - name: aiops
    webhook_configs:
      - url: http://{addr}/api/v1/webhooks/alertmanager
        send_resolved: true
        http_config:
          authorization:
            type: Bearer
            credentials: {token}
"#,
        addr = app.addr
    );
    std::fs::write(dir.join("alertmanager.yml"), config).unwrap();
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    let _am = tokio::process::Command::new(&alertmanager)
        .arg(format!(
            "--config.file={}",
            dir.join("alertmanager.yml").display()
        ))
        .arg(format!("--storage.path={}", dir.join("data").display()))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .arg("--cluster.listen-address=")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("alertmanager.log")).unwrap())
        .kill_on_drop(true)
        .spawn()
        .expect("start alertmanager");
    let client = reqwest::Client::new();
    poll("alertmanager ready", 30, async || {
        let ok = client
            .get(format!("{url}/-/ready"))
            .send()
            .await
            .is_ok_and(|r| r.status().is_success());
        ok.then_some(())
    })
    .await;

    // Fire.
    amtool(
        &amtool_bin,
        &url,
        &[
            "alert",
            "add",
            "NodeDown",
            "instance=127.0.0.1:9100",
            "severity=critical",
            "job=node",
            "--annotation=summary=loopback is down",
            "--generator-url=http://prometheus-e2e:9090/graph",
        ],
    )
    .await;
    let alert_id: uuid::Uuid = poll("the alert stored", 30, async || {
        sqlx::query_scalar("SELECT id FROM alerts WHERE alert_name = 'NodeDown'")
            .fetch_optional(&app.pool)
            .await
            .unwrap()
    })
    .await;
    let detail: Value = poll("the alert processed", 30, async || {
        let (_, d) = app.get(&format!("/alerts/{alert_id}")).await;
        d["alert"]["processed_at"].is_string().then_some(d)
    })
    .await;
    assert_eq!(
        detail["match_outcome"]["decision"], "execution_created",
        "{detail}"
    );
    assert_eq!(detail["alert"]["receiver"], "aiops");
    assert_eq!(detail["alert"]["source"], "prometheus-e2e:9090");
    let execution: uuid::Uuid = detail["match_outcome"]["execution_id"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let done = app.wait_for_status(execution, common::FINISHED, 60).await;
    assert_eq!(done["status"], "completed", "{done}");
    assert_eq!(
        app.steps(execution).await[0]["stdout"],
        "NodeDown on 127.0.0.1:9100\n"
    );

    // A second alert in the same group (posted through Alertmanager's v2 API) makes it send the
    // group again: the first alert's episode is updated, not duplicated.
    let resp = client
        .post(format!("{url}/api/v2/alerts"))
        .json(&json!([{
            "labels": { "alertname": "NodeDown", "instance": "10.9.9.9:9100", "severity": "warning" },
            "annotations": { "summary": "second" },
        }]))
        .send()
        .await
        .unwrap();
    assert!(resp.status().is_success(), "{:?}", resp.text().await);
    let count: i32 = poll("the first alert re-sent", 30, async || {
        let (n, count): (i64, i32) = sqlx::query_as(
            "SELECT (SELECT count(*) FROM alerts), \
             (SELECT receive_count FROM alerts WHERE id = $1)",
        )
        .bind(alert_id)
        .fetch_one(&app.pool)
        .await
        .unwrap();
        (n == 2 && count >= 2).then_some(count)
    })
    .await;
    assert!(count >= 2);
    let rows: i64 =
        sqlx::query_scalar("SELECT count(*) FROM alerts WHERE instance = '127.0.0.1:9100'")
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!(rows, 1, "the repeat created a second row");

    // Resolve with amtool (an end time in the past).
    let past = (chrono::Utc::now() - chrono::Duration::seconds(1))
        .format("%Y-%m-%dT%H:%M:%SZ")
        .to_string();
    amtool(
        &amtool_bin,
        &url,
        &[
            "alert",
            "add",
            "NodeDown",
            "instance=127.0.0.1:9100",
            "severity=critical",
            "job=node",
            "--annotation=summary=loopback is down",
            "--generator-url=http://prometheus-e2e:9090/graph",
            &format!("--end={past}"),
        ],
    )
    .await;
    let resolved: Value = poll("the alert resolved", 30, async || {
        let (_, d) = app.get(&format!("/alerts/{alert_id}")).await;
        (d["alert"]["status"] == "resolved").then_some(d)
    })
    .await;
    assert!(resolved["alert"]["ends_at"].is_string(), "{resolved}");
    let total: i64 = sqlx::query_scalar("SELECT count(*) FROM alerts")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(total, 2);
    worker.stop().await;
    std::fs::remove_dir_all(&dir).ok();
}
