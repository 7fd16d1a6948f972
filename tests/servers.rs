//! Managed servers over the API: CRUD, validation, filters, secrets that never come back out
//! (nor sit in the database in clear), connection tests against a real sshd with classified
//! failures, host key pinning and the admin reset.

mod common;
mod sshd;

use reqwest::Method;
use serde_json::{Value, json};

const KEY: &str = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";

async fn app() -> common::TestApp {
    common::spawn_app_with(|c| c.secret_key = Some(format!("main:{KEY}"))).await
}

async fn create(app: &common::TestApp, body: Value) -> (u16, Value) {
    app.call(Method::POST, "/servers", Some(&app.admin_token), Some(body))
        .await
}

fn password_server(name: &str, password: &str) -> Value {
    let sshd = sshd::sshd();
    json!({
        "name": name, "hostname": "127.0.0.1", "port": sshd.port, "username": sshd::USER,
        "auth_type": "password", "password": password,
        "environment": "staging", "tags": ["db", "role=primary"],
    })
}

#[tokio::test]
async fn crud_never_returns_secrets_and_viewers_read() {
    let app = app().await;
    let sshd = sshd::sshd();
    let key = sshd.read("id_ed25519_pass");
    let (status, created) = create(
        &app,
        json!({
            "name": "db-1", "hostname": "127.0.0.1", "port": sshd.port, "username": sshd::USER,
            "auth_type": "key", "ssh_key": key, "ssh_key_passphrase": sshd.read("passphrase"),
            "environment": "production", "tags": ["db", "role=primary"],
        }),
    )
    .await;
    assert_eq!(status, 201, "{created}");
    assert_eq!(created["has_ssh_key"], true);
    assert_eq!(created["has_password"], true);
    assert_eq!(created["os_type"], "linux");
    assert_eq!(created["protocol"], "ssh");
    let text = created.to_string();
    assert!(
        !text.contains("PRIVATE KEY") && !text.contains("passphrase\""),
        "{text}"
    );
    assert!(created.get("ssh_key").is_none() && created.get("ssh_key_encrypted").is_none());
    // The same name in capitals is the same server.
    let (status, body) = create(
        &app,
        json!({ "name": "DB-1", "hostname": "127.0.0.1", "username": "ops",
                "auth_type": "password", "password": "pw" }),
    )
    .await;
    assert_eq!(status, 409, "{body}");
    assert_eq!(body["details"]["field"], "name", "{body}");

    let id = created["id"].as_str().unwrap().to_owned();
    let (_, viewer) = app.user_with_role("viewer").await;
    let (status, got) = app
        .call(Method::GET, &format!("/servers/{id}"), Some(&viewer), None)
        .await;
    assert_eq!(status, 200);
    assert_eq!(got["name"], "db-1");
    assert!(!got.to_string().contains("PRIVATE KEY"));
    // Viewers cannot write.
    let (status, _) = app
        .call(
            Method::PATCH,
            &format!("/servers/{id}"),
            Some(&viewer),
            Some(json!({"port": 2222})),
        )
        .await;
    assert_eq!(status, 403);

    // Engineers update; a new port clears the pinned key; secrets stay unless replaced.
    let (_, engineer) = app.user_with_role("engineer").await;
    let (status, updated) = app
        .call(
            Method::PATCH,
            &format!("/servers/{id}"),
            Some(&engineer),
            Some(json!({"environment": "staging", "tags": ["web"]})),
        )
        .await;
    assert_eq!(status, 200, "{updated}");
    assert_eq!(updated["environment"], "staging");
    assert_eq!(updated["tags"], json!(["web"]));
    assert_eq!(updated["has_ssh_key"], true);

    // Audit entries carry no secrets.
    let audit = app.audit_rows("server_create").await;
    assert_eq!(audit.len(), 1);
    let details = audit[0].3.clone().unwrap().to_string();
    assert!(
        !details.contains("PRIVATE") && !details.contains("correct horse"),
        "{details}"
    );
    // The update's entry has the server before and after, without secrets.
    let audit = app.audit_rows("server_update").await;
    assert_eq!(audit.len(), 1);
    let details = audit[0].3.clone().unwrap();
    assert_eq!(
        details["before"]["tags"],
        json!(["db", "role=primary"]),
        "{details}"
    );
    assert_eq!(details["after"]["tags"], json!(["web"]), "{details}");
    assert_eq!(details["after"]["environment"], "staging", "{details}");
    assert!(!details.to_string().contains("PRIVATE"), "{details}");
    // An update that gives nothing changes nothing and records nothing.
    let (status, same) = app
        .call(
            Method::PATCH,
            &format!("/servers/{id}"),
            Some(&engineer),
            Some(json!({})),
        )
        .await;
    assert_eq!(status, 200, "{same}");
    assert_eq!(same["updated_at"], updated["updated_at"], "{same}");
    assert_eq!(app.audit_rows("server_update").await.len(), 1);

    let (status, _) = app
        .call(
            Method::DELETE,
            &format!("/servers/{id}"),
            Some(&engineer),
            None,
        )
        .await;
    assert_eq!(status, 204);
    assert_eq!(app.get(&format!("/servers/{id}")).await.0, 404);
    assert_eq!(app.audit_rows("server_delete").await.len(), 1);
}

/// A partial update: `null` clears the columns that may be empty (domain, environment, WinRM
/// transport) and is refused, naming the field, for the others, with nothing changed.
#[tokio::test]
async fn null_clears_what_may_be_empty_and_is_refused_elsewhere() {
    let app = app().await;
    let mut body = password_server("nulls", "pw");
    body["domain"] = json!("corp.example");
    let (status, created) = create(&app, body).await;
    assert_eq!(status, 201, "{created}");
    assert_eq!(created["domain"], "corp.example");
    assert_eq!(created["environment"], "staging");
    let path = format!("/servers/{}", created["id"].as_str().unwrap());
    let patch = |body: Value| app.call(Method::PATCH, &path, Some(&app.admin_token), Some(body));

    for field in [
        "name",
        "hostname",
        "port",
        "username",
        "tags",
        "password",
        "auth_type",
    ] {
        let (status, err) = patch(json!({ field: null, "environment": "other" })).await;
        assert_eq!(status, 422, "{field}: {err}");
        assert_eq!(err["details"]["field"], field, "{err}");
        assert!(
            err["details"]["reason"]
                .as_str()
                .unwrap()
                .contains("must not be null"),
            "{err}"
        );
    }
    let (_, unchanged) = app.get(&path).await;
    assert_eq!(
        unchanged["environment"], "staging",
        "a refused update changes nothing"
    );
    assert_eq!(unchanged["name"], "nulls");

    // Left out keeps; null clears.
    let (status, updated) = patch(json!({ "domain": null })).await;
    assert_eq!(status, 200, "{updated}");
    assert!(updated.get("domain").is_none(), "{updated}");
    assert_eq!(updated["environment"], "staging");
    let (status, updated) = patch(json!({ "environment": null, "port": 2200 })).await;
    assert_eq!(status, 200, "{updated}");
    assert!(updated.get("environment").is_none(), "{updated}");
    assert_eq!(updated["port"], 2200);
    let (_, stored) = app.get(&path).await;
    assert!(
        stored.get("domain").is_none() && stored.get("environment").is_none(),
        "{stored}"
    );
    assert_eq!(stored["has_password"], true);
    let audit = app.audit_rows("server_update").await;
    assert_eq!(audit.len(), 2, "refused updates are not audited");
    assert_eq!(audit[1].3.clone().unwrap()["changed"], json!(["domain"]));
    assert_eq!(
        audit[0].3.clone().unwrap()["changed"],
        json!(["port", "environment"])
    );
}

#[tokio::test]
async fn validation_names_the_field() {
    let app = app().await;
    let base = password_server("v", "pw");
    let cases = [
        ("port", json!(70000)),
        ("port", json!(0)),
        ("hostname", json!("has space")),
        ("hostname", json!("a_b..c")),
        ("hostname", json!("[::1]")),
        ("name", json!("")),
        ("name", json!("   ")),
        ("domain", json!("   ")),
        ("tags", json!(["=x"])),
        ("tags", json!(["a="])),
        ("environment", json!("prod env")),
        ("tags", json!(["a", "a"])),
    ];
    for (field, value) in cases {
        let mut body = base.clone();
        body[field] = value.clone();
        let (status, err) = create(&app, body).await;
        assert_eq!(status, 422, "{field}={value}: {err}");
        assert!(
            err["details"]["field"].as_str().unwrap().starts_with(field),
            "{err}"
        );
    }
    // Enums are closed.
    let mut body = base.clone();
    body["os_type"] = json!("plan9");
    assert_eq!(create(&app, body).await.0, 400);
    // A key must parse as a private key.
    let mut body = base.clone();
    body["auth_type"] = json!("key");
    body.as_object_mut().unwrap().remove("password");
    body["ssh_key"] = json!(
        "-----BEGIN OPENSSH PRIVATE KEY-----\nnot a key\n-----END OPENSSH PRIVATE KEY-----\n"
    );
    let (status, err) = create(&app, body.clone()).await;
    assert_eq!(status, 422, "{err}");
    assert_eq!(err["details"]["field"], "ssh_key");
    // An encrypted key needs its passphrase.
    body["ssh_key"] = json!(sshd::sshd().read("id_ed25519_pass"));
    let (status, err) = create(&app, body.clone()).await;
    assert_eq!(status, 422, "{err}");
    assert!(
        err["message"].as_str().unwrap().contains("passphrase"),
        "{err}"
    );
    // A wrong passphrase is named as such.
    body["ssh_key_passphrase"] = json!("not the passphrase");
    let (status, err) = create(&app, body).await;
    assert_eq!(status, 422, "{err}");
    assert_eq!(err["details"]["field"], "ssh_key_passphrase", "{err}");
    // A passphrase belongs to a key.
    let mut body = base.clone();
    body["ssh_key_passphrase"] = json!("pp");
    let (status, err) = create(&app, body).await;
    assert_eq!(status, 422, "{err}");
    assert_eq!(err["details"]["field"], "ssh_key_passphrase", "{err}");
    // The secret the auth type needs is required.
    let mut body = base;
    body.as_object_mut().unwrap().remove("password");
    assert_eq!(create(&app, body).await.0, 422);
}

#[tokio::test]
async fn list_filters_by_tags_and_environment_and_paginates() {
    let app = app().await;
    for (name, env, tags) in [
        ("a", "production", json!(["db", "eu"])),
        ("b", "production", json!(["web", "eu"])),
        ("c", "staging", json!(["db"])),
    ] {
        let mut body = password_server(name, "pw");
        body["environment"] = json!(env);
        body["tags"] = tags;
        assert_eq!(create(&app, body).await.0, 201);
    }
    let names = |v: &Value| -> Vec<String> {
        v["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["name"].as_str().unwrap().to_owned())
            .collect()
    };
    let (_, page) = app.get("/servers?tag=db").await;
    assert_eq!(names(&page), ["a", "c"]);
    let (_, page) = app.get("/servers?tag=db&tag=eu").await;
    assert_eq!(names(&page), ["a"]);
    let (_, page) = app.get("/servers?environment=production").await;
    assert_eq!(names(&page), ["a", "b"]);
    let (_, page) = app.get("/servers?limit=1&offset=1").await;
    assert_eq!(names(&page), ["b"]);
    assert_eq!(page["total"], 3);
}

#[tokio::test]
async fn database_dump_holds_no_plaintext_secret() {
    let app = app().await;
    let password = "plain-password-Zq81";
    let passphrase = sshd::sshd().read("passphrase");
    let key = sshd::sshd().read("id_ed25519_pass");
    assert_eq!(create(&app, password_server("p", password)).await.0, 201);
    let mut body = password_server("k", "x");
    body["auth_type"] = json!("key");
    body.as_object_mut().unwrap().remove("password");
    body["ssh_key"] = json!(key);
    body["ssh_key_passphrase"] = json!(passphrase);
    assert_eq!(create(&app, body).await.0, 201);

    // Every row of every table, as text.
    let tables: Vec<String> = sqlx::query_scalar(
        "SELECT table_name::text FROM information_schema.tables \
         WHERE table_schema = 'public' AND table_type = 'BASE TABLE'",
    )
    .fetch_all(&app.pool)
    .await
    .unwrap();
    let mut dump = String::new();
    for table in &tables {
        let rows: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "SELECT row_to_json(t)::text FROM \"{table}\" t"
        )))
        .fetch_all(&app.pool)
        .await
        .unwrap();
        dump.push_str(&rows.join("\n"));
    }
    assert!(dump.contains("v1:main:"), "envelopes are stored");
    let key_body: String = key.lines().nth(1).unwrap().to_owned();
    for secret in [
        password,
        passphrase.as_str(),
        key_body.as_str(),
        "PRIVATE KEY",
    ] {
        assert!(
            !dump.contains(secret),
            "plaintext `{secret}` found in the database"
        );
    }
}

#[tokio::test]
async fn connection_test_pins_classifies_and_admin_resets() {
    let app = app().await;
    let sshd = sshd::sshd();
    let (_, created) = create(&app, password_server("ok", &sshd.password)).await;
    let id = created["id"].as_str().unwrap().to_owned();
    let test = |id: String| {
        let app = &app;
        async move {
            app.call(
                Method::POST,
                &format!("/servers/{id}/connection-test"),
                Some(&app.admin_token),
                None,
            )
            .await
        }
    };
    let (status, result) = test(id.clone()).await;
    assert_eq!(status, 200, "{result}");
    assert_eq!(result["status"], "success", "{result}");
    let fingerprint = result["ssh_host_key_fingerprint"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(fingerprint.starts_with("SHA256:"));
    let (_, server) = app.get(&format!("/servers/{id}")).await;
    assert_eq!(server["last_connection_status"], "success");
    assert!(server["last_connection_test"].is_string());
    assert_eq!(server["ssh_host_key_fingerprint"], fingerprint.as_str());

    // A changed host key is refused: pin another key straight in the database.
    let other = sshd.read("other_host_ed25519.pub");
    sqlx::query("UPDATE server_credentials SET ssh_host_key = $2 WHERE id = $1::uuid")
        .bind(&id)
        .bind(other.trim())
        .execute(&app.pool)
        .await
        .unwrap();
    let (_, result) = test(id.clone()).await;
    assert_eq!(result["status"], "failed");
    assert_eq!(result["failure"], "host_key_mismatch", "{result}");
    let (_, server) = app.get(&format!("/servers/{id}")).await;
    assert_eq!(server["last_connection_status"], "failed");
    assert!(
        server["last_connection_error"]
            .as_str()
            .unwrap()
            .contains("host key mismatch")
    );

    // Only an admin resets; then the next success pins the real key again.
    let (_, engineer) = app.user_with_role("engineer").await;
    let (status, _) = app
        .call(
            Method::DELETE,
            &format!("/servers/{id}/host-key"),
            Some(&engineer),
            None,
        )
        .await;
    assert_eq!(status, 403);
    // An engineer does not move a server that holds a password (it would be sent to the new
    // address) unless the request gives the password again; and such a move (away and back)
    // does not clear the pin either.
    let (_, pinned) = app.get(&format!("/servers/{id}")).await;
    let port = pinned["port"].as_i64().unwrap();
    let (status, body) = app
        .call(
            Method::PATCH,
            &format!("/servers/{id}"),
            Some(&engineer),
            Some(json!({ "port": port + 1 })),
        )
        .await;
    assert_eq!(status, 403, "{body}");
    assert_eq!(body["details"]["field"], "port", "{body}");
    for p in [port + 1, port] {
        let (status, body) = app
            .call(
                Method::PATCH,
                &format!("/servers/{id}"),
                Some(&engineer),
                Some(json!({ "port": p, "password": sshd.password })),
            )
            .await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(
            body["ssh_host_key_fingerprint"], pinned["ssh_host_key_fingerprint"],
            "{body}"
        );
    }
    let (_, result) = test(id.clone()).await;
    assert_eq!(result["failure"], "host_key_mismatch", "{result}");
    let (status, reset) = app
        .call(
            Method::DELETE,
            &format!("/servers/{id}/host-key"),
            Some(&app.admin_token),
            None,
        )
        .await;
    assert_eq!(status, 200, "{reset}");
    assert!(reset.get("ssh_host_key_fingerprint").is_none());
    assert_eq!(app.audit_rows("server_host_key_reset").await.len(), 1);
    let (_, result) = test(id.clone()).await;
    assert_eq!(result["status"], "success", "{result}");
    assert_eq!(result["ssh_host_key_fingerprint"], fingerprint.as_str());

    // Authentication failure.
    let (_, wrong) = create(&app, password_server("wrong", "not-the-password")).await;
    let (_, result) = test(wrong["id"].as_str().unwrap().to_owned()).await;
    assert_eq!(result["failure"], "authentication", "{result}");
    assert!(!result.to_string().contains("not-the-password"));

    // Refused port.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut body = password_server("refused", "pw");
    body["port"] = json!(closed);
    let (_, s) = create(&app, body).await;
    let (_, result) = test(s["id"].as_str().unwrap().to_owned()).await;
    assert_eq!(result["failure"], "refused", "{result}");

    // Unknown host.
    let mut body = password_server("dns", "pw");
    body["hostname"] = json!("no-such-host.invalid");
    let (_, s) = create(&app, body).await;
    let (_, result) = test(s["id"].as_str().unwrap().to_owned()).await;
    assert_eq!(result["failure"], "dns", "{result}");
    assert_eq!(app.audit_rows("server_connection_test").await.len(), 7);
}

#[tokio::test]
async fn connection_test_of_a_server_that_never_answers_fails_as_timeout() {
    // A short configured limit keeps the test fast; the default is 10 s.
    let app = common::spawn_app_with(|c| {
        c.secret_key = Some(format!("main:{KEY}"));
        c.ssh_connect_timeout = std::time::Duration::from_millis(300);
    })
    .await;
    // Accepts TCP connections and holds them open without ever sending an SSH banner.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = silent.local_addr().unwrap().port();
    let (accepted_tx, mut accepted) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = silent.accept().await {
            held.push(socket);
            let _ = accepted_tx.send(());
        }
    });
    let mut body = password_server("silent", "pw");
    body["port"] = json!(port);
    let (status, created) = create(&app, body).await;
    assert_eq!(status, 201, "{created}");
    let id = created["id"].as_str().unwrap().to_owned();

    let started = std::time::Instant::now();
    let (status, result) = app
        .call(
            Method::POST,
            &format!("/servers/{id}/connection-test"),
            Some(&app.admin_token),
            None,
        )
        .await;
    let elapsed = started.elapsed();
    assert_eq!(status, 200, "{result}");
    assert_eq!(result["status"], "failed", "{result}");
    assert_eq!(result["failure"], "timeout", "{result}");
    let message = result["message"].as_str().unwrap();
    assert!(
        message.contains("connection timed out")
            && message.contains(&format!("127.0.0.1:{port}"))
            && message.contains("handshake took too long"),
        "{message}"
    );
    assert!(
        elapsed < std::time::Duration::from_secs(5),
        "the configured 300 ms limit was not applied: {elapsed:?}"
    );
    assert!(
        accepted.try_recv().is_ok(),
        "the test never reached the listener"
    );

    let (_, server) = app.get(&format!("/servers/{id}")).await;
    assert_eq!(server["last_connection_status"], "failed", "{server}");
    assert!(server["last_connection_test"].is_string(), "{server}");
    let error = server["last_connection_error"].as_str().unwrap();
    assert!(
        error.starts_with("timeout: ") && error.contains("connection timed out"),
        "{error}"
    );
    let audit = app.audit_rows("server_connection_test").await;
    assert_eq!(audit.len(), 1);
    assert_eq!(audit[0].3.as_ref().unwrap()["failure"], "timeout");
}
