//! `aiops secrets rotate`: every envelope moves to the current key, row by row; readers holding
//! old and new keys read both meanwhile; afterwards the new key alone opens everything.

mod common;

use aiops::crypto::secrets::Keyring;
use aiops::exec::SshAuth;
use reqwest::Method;
use serde_json::json;

const OLD: &str = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";
const NEW: &str = "1f1e1d1c1b1a191817161514131211100f0e0d0c0b0a09080706050403020100";

fn ring(entries: &[String]) -> Keyring {
    Keyring::from_entries(entries.iter().map(|e| ("test".to_owned(), e.as_str()))).unwrap()
}

async fn rows(app: &common::TestApp) -> Vec<aiops::store::servers::ServerRow> {
    let mut conn = app.pool.acquire().await.unwrap();
    aiops::store::servers::server_list(&mut conn, &[], None, 500, 0)
        .await
        .unwrap()
        .0
}

#[tokio::test]
async fn rotation_reseals_everything_under_the_new_key() {
    let app = common::spawn_app_with(|c| c.secret_key = Some(format!("old:{OLD}"))).await;
    for i in 0..5 {
        let (status, body) = app
            .call(
                Method::POST,
                "/servers",
                Some(&app.admin_token),
                Some(json!({
                    "name": format!("s{i}"), "hostname": "10.0.0.1", "username": "root",
                    "auth_type": "password", "password": format!("secret-{i}"),
                })),
            )
            .await;
        assert_eq!(status, 201, "{body}");
    }
    // An execution's secret variables are sealed too (no worker runs it here).
    let runbook = app
        .runbook_from_yaml(
            "name: rotate-vars\nmode: manual\nenvironment_vars:\n  DB_PASSWORD: set-at-start\nsteps:\n  - name: s\n    command: echo $DB_PASSWORD\n",
        )
        .await;
    let execution = app
        .start_execution(
            json!({ "runbook_id": runbook, "variables": { "DB_PASSWORD": "hunter2-x" } }),
        )
        .await;
    let sealed = |app: &common::TestApp| {
        let pool = app.pool.clone();
        async move {
            sqlx::query_scalar::<_, Option<String>>(
                "SELECT secret_vars_encrypted FROM runbook_executions WHERE id = $1",
            )
            .bind(execution)
            .fetch_one(&pool)
            .await
            .unwrap()
            .unwrap()
        }
    };
    assert!(sealed(&app).await.starts_with("v1:old:"));
    let before = rows(&app).await;
    assert!(before.iter().all(|r| {
        r.password_encrypted
            .as_deref()
            .unwrap()
            .starts_with("v1:old:")
    }));

    // During the rollout readers hold both keys and read old envelopes.
    let both = ring(&[format!("new:{NEW}"), format!("old:{OLD}")]);
    let timeout = std::time::Duration::from_secs(1);
    for row in &before {
        assert!(aiops::servers::ssh_target(row, Some(&both), timeout).is_ok());
    }
    let report = aiops::cli::secrets::rotate(&app.pool, &both).await.unwrap();
    assert_eq!(report.rotated, 6, "5 passwords and 1 execution's variables");
    let audited = app.audit_rows("secrets_rotate").await;
    assert_eq!(audited.len(), 1);
    assert_eq!(audited[0].3.as_ref().unwrap()["rotated"], 6);
    let envelope = sealed(&app).await;
    assert!(envelope.starts_with("v1:new:"));
    let opened = aiops::engine::secret_vars::open(
        execution,
        Some(&envelope),
        Some(&ring(&[format!("new:{NEW}")])),
    )
    .unwrap();
    assert_eq!(opened["DB_PASSWORD"], "hunter2-x");

    let after = rows(&app).await;
    let new_only = ring(&[format!("new:{NEW}")]);
    for row in &after {
        assert!(
            row.password_encrypted
                .as_deref()
                .unwrap()
                .starts_with("v1:new:")
        );
        let target = aiops::servers::ssh_target(row, Some(&new_only), timeout).unwrap();
        let SshAuth::Password(p) = target.auth else {
            panic!("password auth")
        };
        assert_eq!(p, format!("secret-{}", &row.name[1..]));
    }
    // The old key alone no longer opens anything.
    let old_only = ring(&[format!("old:{OLD}")]);
    assert!(aiops::servers::ssh_target(&after[0], Some(&old_only), timeout).is_err());
    // Idempotent.
    assert_eq!(
        aiops::cli::secrets::rotate(&app.pool, &both)
            .await
            .unwrap()
            .rotated,
        0
    );
}
