//! Identity end to end through the real server: login, tokens (expiry, revocation, API tokens),
//! inactive users, throttling, user management and the audit rows each of them writes.

mod common;

use reqwest::Method;
use serde_json::{Value, json};

/// The username of a user.
async fn username_of(app: &common::TestApp, id: uuid::Uuid) -> String {
    sqlx::query_scalar("SELECT username FROM users WHERE id = $1")
        .bind(id)
        .fetch_one(&app.pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn login_returns_an_opaque_token_and_writes_last_login_and_audit() {
    let app = common::spawn_app().await;
    let (id, _) = app.user_with_role("viewer").await;
    let username = username_of(&app, id).await;
    let (status, body) = app
        .call(
            Method::POST,
            "/auth/login",
            None,
            Some(json!({ "username": username, "password": common::PASSWORD })),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let token = body["token"].as_str().unwrap();
    assert!(
        token.starts_with("aiops_") && token.len() == 6 + 64,
        "{token}"
    );
    assert_eq!(body["token_type"], "Bearer");
    assert_eq!(body["user"]["role"], "viewer");
    assert!(body["user"].get("password_hash").is_none());

    // Only the hash is stored; the secret appears nowhere in the database.
    let leaked: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM auth_tokens WHERE encode(token_hash, 'escape') LIKE '%' || $1 || '%'",
    )
    .bind(&token[6..])
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(leaked, 0);
    let stored: Vec<u8> = sqlx::query_scalar(
        "SELECT token_hash FROM auth_tokens WHERE user_id = $1 ORDER BY created_at DESC LIMIT 1",
    )
    .bind(id)
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(stored, aiops::crypto::token::hash(token));

    let last_login: Option<chrono::DateTime<chrono::Utc>> =
        sqlx::query_scalar("SELECT last_login FROM users WHERE id = $1")
            .bind(id)
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert!(last_login.is_some());

    let (status, me) = app.call(Method::GET, "/auth/me", Some(token), None).await;
    assert_eq!(status, 200);
    assert_eq!(me["id"], json!(id));

    let logins = app.audit_rows("login").await;
    let mine = logins
        .iter()
        .find(|r| r.0 == Some(id))
        .expect("login audited");
    assert_eq!(mine.4.as_deref(), Some("127.0.0.1"));
}

#[tokio::test]
async fn wrong_password_and_unknown_user_are_refused_alike() {
    let app = common::spawn_app().await;
    let (_, _) = app.user_with_role("viewer").await;
    let (status, body) = app
        .call(
            Method::POST,
            "/auth/login",
            None,
            Some(json!({ "username": "admin-nope", "password": "wrong" })),
        )
        .await;
    assert_eq!(status, 401);
    assert_eq!(body["code"], "unauthorized");
    let admin_name: String = sqlx::query_scalar("SELECT username FROM users WHERE id = $1")
        .bind(app.admin_id)
        .fetch_one(&app.pool)
        .await
        .unwrap();
    let (status2, body2) = app
        .call(
            Method::POST,
            "/auth/login",
            None,
            Some(json!({ "username": admin_name, "password": "wrong-password" })),
        )
        .await;
    assert_eq!(status2, 401);
    assert_eq!(body["message"], body2["message"]);
    let failed = app.audit_rows("login_failed").await;
    assert_eq!(failed.len(), 2);
    // The attempted password is never recorded.
    for row in &failed {
        let details = row.3.as_ref().unwrap().to_string();
        assert!(!details.contains("wrong"), "{details}");
    }
}

#[tokio::test]
async fn inactive_users_cannot_log_in_and_their_tokens_stop_working() {
    let app = common::spawn_app().await;
    let (id, token) = app.user_with_role("engineer").await;
    let (status, _) = app.call(Method::GET, "/auth/me", Some(&token), None).await;
    assert_eq!(status, 200);
    let (status, body) = app
        .call(
            Method::PATCH,
            &format!("/users/{id}"),
            Some(&app.admin_token),
            Some(json!({ "is_active": false })),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["is_active"], false);
    let (status, _) = app.call(Method::GET, "/auth/me", Some(&token), None).await;
    assert_eq!(status, 401, "a deactivated user's token must stop working");
    let username = body["username"].as_str().unwrap();
    let (status, body) = app
        .call(
            Method::POST,
            "/auth/login",
            None,
            Some(json!({ "username": username, "password": common::PASSWORD })),
        )
        .await;
    assert_eq!(status, 401);
    assert_eq!(body["message"], "account is disabled");
    let refused = app.audit_rows("login_refused_inactive").await;
    assert_eq!(refused.len(), 1, "{refused:?}");
    assert_eq!(refused[0].0, Some(id));
}

#[tokio::test]
async fn expired_and_revoked_tokens_are_refused() {
    let app = common::spawn_app().await;
    let (id, token) = app.user_with_role("viewer").await;
    let other = app.mint_token(id).await;

    // Logout revokes exactly the presenting token.
    let (status, _) = app
        .call(Method::POST, "/auth/logout", Some(&token), None)
        .await;
    assert_eq!(status, 204);
    let (status, body) = app.call(Method::GET, "/auth/me", Some(&token), None).await;
    assert_eq!(status, 401);
    assert_eq!(body["code"], "unauthorized");
    let (status, _) = app.call(Method::GET, "/auth/me", Some(&other), None).await;
    assert_eq!(status, 200);
    assert_eq!(app.audit_rows("logout").await.len(), 1);

    // Expiry is enforced by the database clock.
    sqlx::query(
        "UPDATE auth_tokens SET expires_at = now() - interval '1 second' WHERE user_id = $1",
    )
    .bind(id)
    .execute(&app.pool)
    .await
    .unwrap();
    let (status, _) = app.call(Method::GET, "/auth/me", Some(&other), None).await;
    assert_eq!(status, 401);

    // Garbage and missing tokens.
    let (status, _) = app
        .call(Method::GET, "/auth/me", Some("aiops_nonsense"), None)
        .await;
    assert_eq!(status, 401);
    let (status, body) = app.call(Method::GET, "/auth/me", None, None).await;
    assert_eq!(status, 401);
    assert_eq!(body["code"], "unauthorized");
}

#[tokio::test]
async fn login_token_lifetime_follows_configuration() {
    let app = common::spawn_app_with(|c| c.token_ttl = std::time::Duration::from_secs(120)).await;
    let (id, _) = app.user_with_role("viewer").await;
    let seconds: f64 = sqlx::query_scalar(
        "SELECT extract(epoch FROM expires_at - created_at)::float8 FROM auth_tokens \
         WHERE user_id = $1 AND kind = 'session'",
    )
    .bind(id)
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert!((119.0..=121.0).contains(&seconds), "{seconds}");
}

#[tokio::test]
async fn api_tokens_are_shown_once_listed_without_secret_and_revocable() {
    let app = common::spawn_app().await;
    let (_, token) = app.user_with_role("operator").await;
    let (status, created) = app
        .call(
            Method::POST,
            "/tokens",
            Some(&token),
            Some(json!({ "name": "ci pipeline", "expires_in_days": 30 })),
        )
        .await;
    assert_eq!(status, 201, "{created}");
    let secret = created["token"].as_str().unwrap().to_owned();
    let token_id = created["info"]["id"].as_str().unwrap().to_owned();
    let (status, me) = app.call(Method::GET, "/auth/me", Some(&secret), None).await;
    assert_eq!(status, 200);
    assert_eq!(me["role"], "operator");

    let (status, page) = app.call(Method::GET, "/tokens", Some(&token), None).await;
    assert_eq!(status, 200);
    assert_eq!(page["total"], 1, "{page}");
    let list = page["items"].as_array().unwrap();
    assert_eq!(list.len(), 1);
    assert_eq!(list[0]["name"], "ci pipeline");
    assert!(list[0].get("token").is_none());
    assert!(!serde_json::to_string(&list).unwrap().contains(&secret[6..]));

    let (status, body) = app
        .call(
            Method::POST,
            "/tokens",
            Some(&token),
            Some(json!({ "name": "" })),
        )
        .await;
    assert_eq!(status, 422);
    assert_eq!(body["details"]["field"], "name");

    let (status, _) = app
        .call(
            Method::DELETE,
            &format!("/tokens/{token_id}"),
            Some(&token),
            None,
        )
        .await;
    assert_eq!(status, 204);
    let (status, _) = app.call(Method::GET, "/auth/me", Some(&secret), None).await;
    assert_eq!(status, 401);
    let (status, _) = app
        .call(
            Method::DELETE,
            &format!("/tokens/{token_id}"),
            Some(&token),
            None,
        )
        .await;
    assert_eq!(status, 404);
    assert_eq!(app.audit_rows("token_create").await.len(), 1);
    assert_eq!(app.audit_rows("token_revoke").await.len(), 1);
}

#[tokio::test]
async fn failed_logins_are_throttled_per_user_and_per_address() {
    let app = common::spawn_app_with(|c| {
        c.login_max_failures_per_user = 3;
        c.login_max_failures_per_ip = 6;
        c.login_window = std::time::Duration::from_secs(20);
    })
    .await;
    let (id, _) = app.user_with_role("viewer").await;
    let username = username_of(&app, id).await;
    let login = |user: String, password: &'static str| {
        let app = &app;
        async move {
            app.call(
                Method::POST,
                "/auth/login",
                None,
                Some(json!({ "username": user, "password": password })),
            )
            .await
        }
    };
    for _ in 0..3 {
        assert_eq!(login(username.clone(), "wrong-password").await.0, 401);
    }
    // Even the right password is refused while the user is throttled, saying when to retry:
    // when the oldest counted failure leaves the 20-second window, since this refusal counts
    // as a failure too.
    let resp = app
        .client
        .post(app.api("/auth/login"))
        .json(&json!({ "username": username, "password": common::PASSWORD }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 429);
    let retry: u64 = resp.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((15..=20).contains(&retry), "Retry-After {retry}");
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["code"], "too_many_requests");
    assert_eq!(
        body["message"],
        format!("too many failed login attempts; retry in {retry} seconds")
    );

    // Per address: failures spread over other usernames (4 more makes 8 from this address).
    for i in 0..4 {
        login(format!("ghost-{i}"), "wrong-password").await;
    }
    let fresh: String = format!("fresh-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let hash = aiops::auth::hash_password(common::PASSWORD.to_owned())
        .await
        .unwrap();
    let mut conn = app.pool.acquire().await.unwrap();
    aiops::store::users::user_create(
        &mut conn,
        &aiops::store::users::NewUser {
            username: &fresh,
            email: &format!("{fresh}@example.test"),
            full_name: None,
            password_hash: &hash,
            role: "viewer",
            is_active: true,
        },
    )
    .await
    .unwrap();
    let (status, _) = login(fresh, common::PASSWORD).await;
    assert_eq!(status, 429, "the address is over its limit");
}

#[tokio::test]
async fn parallel_logins_check_no_more_passwords_than_the_limit_and_never_starve_the_pool() {
    let app = common::spawn_app_with(|c| {
        c.login_max_failures_per_user = 3;
        c.login_max_failures_per_ip = 1000;
        c.db_max_connections = 4;
    })
    .await;
    let mut users = Vec::new();
    for _ in 0..10 {
        let (id, _) = app.user_with_role("viewer").await;
        let username = username_of(&app, id).await;
        users.push(username);
    }
    let login = |username: &str, password: &'static str| {
        let app = &app;
        let username = username.to_owned();
        async move {
            let (status, body) = app
                .call(
                    Method::POST,
                    "/auth/login",
                    None,
                    Some(json!({ "username": username, "password": password })),
                )
                .await;
            (
                status,
                body["message"].as_str().unwrap_or_default().to_owned(),
            )
        }
    };
    // Thirty right passwords at once (three for each of ten users), through a pool of four
    // connections: each is answered, none waits for a connection another login holds.
    let statuses = futures_util::future::join_all(
        users
            .iter()
            .flat_map(|u| [u, u, u])
            .map(|u| login(u, common::PASSWORD)),
    )
    .await;
    assert!(statuses.iter().all(|(s, _)| *s == 200), "{statuses:?}");
    // Twenty wrong ones on one user at once: no more passwords are checked than the limit.
    let statuses =
        futures_util::future::join_all((0..20).map(|_| login(&users[0], "wrong-password"))).await;
    let refused = statuses.iter().filter(|(s, _)| *s == 401).count();
    let throttled = statuses.iter().filter(|(s, _)| *s == 429).count();
    assert_eq!((refused, throttled), (3, 17), "{statuses:?}");
    // Once they are checked, the user is throttled for the window, even with the right
    // password.
    let (status, message) = login(&users[0], common::PASSWORD).await;
    assert_eq!(status, 429);
    assert!(
        message.starts_with("too many failed login attempts"),
        "{message}"
    );
    assert_eq!(app.audit_rows("login_failed").await.len(), 3);
}

#[tokio::test]
async fn two_admins_deactivating_each_other_at_once_leave_one_active() {
    let app = common::spawn_app().await;
    for round in 0..5 {
        let (a, a_token) = app.user_with_role("admin").await;
        let (b, b_token) = app.user_with_role("admin").await;
        // Exactly these two are the active admins.
        sqlx::query("UPDATE users SET is_active = (id = $1 OR id = $2) WHERE role = 'admin'")
            .bind(a)
            .bind(b)
            .execute(&app.pool)
            .await
            .unwrap();
        let deactivate = |token: String, other: uuid::Uuid| {
            let app = &app;
            async move {
                app.call(
                    Method::PATCH,
                    &format!("/users/{other}"),
                    Some(&token),
                    Some(json!({ "is_active": false })),
                )
                .await
            }
        };
        let ((s1, b1), (s2, b2)) = tokio::join!(deactivate(a_token, b), deactivate(b_token, a));
        let mut statuses = [s1, s2];
        statuses.sort();
        // One wins; the other is refused as the last admin, or finds its own token revoked
        // when it arrives after the first committed.
        assert!(
            statuses == [200, 409] || statuses == [200, 401],
            "round {round}: {s1} {b1} / {s2} {b2}"
        );
        for body in [&b1, &b2] {
            if body["code"] == "conflict" {
                assert_eq!(body["details"]["field"], "is_active", "{body}");
            }
        }
        let active: i64 =
            sqlx::query_scalar("SELECT count(*) FROM users WHERE role = 'admin' AND is_active")
                .fetch_one(&app.pool)
                .await
                .unwrap();
        assert_eq!(active, 1, "round {round}");
    }
    // Nor can an admin deactivate themselves, as they cannot delete themselves.
    let (me, token) = app.user_with_role("admin").await;
    let (status, body) = app
        .call(
            Method::PATCH,
            &format!("/users/{me}"),
            Some(&token),
            Some(json!({ "is_active": false })),
        )
        .await;
    assert_eq!(status, 409, "{body}");
    assert_eq!(body["details"]["field"], "is_active", "{body}");
    let (status, _) = app.call(Method::GET, "/auth/me", Some(&token), None).await;
    assert_eq!(status, 200, "the session still works");
}

#[tokio::test]
async fn users_crud_validation_conflicts_and_audit() {
    let app = common::spawn_app().await;
    let (status, created) = app
        .call(
            Method::POST,
            "/users",
            Some(&app.admin_token),
            Some(json!({
                "username": "alice",
                "email": "alice@example.test",
                "full_name": "Alice",
                "password": "a-long-enough-password",
                "role": "engineer"
            })),
        )
        .await;
    assert_eq!(status, 201, "{created}");
    let id = created["id"].as_str().unwrap().to_owned();
    assert!(created.get("password").is_none() && created.get("password_hash").is_none());

    let (status, body) = app
        .call(
            Method::POST,
            "/users",
            Some(&app.admin_token),
            Some(json!({
                "username": "alice",
                "email": "other@example.test",
                "password": "a-long-enough-password",
                "role": "viewer"
            })),
        )
        .await;
    assert_eq!(status, 409, "{body}");
    assert_eq!(body["details"]["field"], "username");
    // Regardless of case: `ALICE` would be a second account for the same person, and so
    // would the same email in capitals.
    for (username, email, field) in [
        ("ALICE", "other@example.test", "username"),
        ("alice2", "Alice@Example.TEST", "email"),
    ] {
        let (status, body) = app
            .call(
                Method::POST,
                "/users",
                Some(&app.admin_token),
                Some(json!({
                    "username": username,
                    "email": email,
                    "password": "a-long-enough-password",
                    "role": "viewer"
                })),
            )
            .await;
        assert_eq!(status, 409, "{body}");
        assert_eq!(body["details"]["field"], field, "{body}");
    }

    let base = json!({"username": "bob", "email": "b@y", "password": "a-long-enough-password",
                      "role": "viewer"});
    for (field, value) in [
        ("username", json!("bad name")),
        ("email", json!("nope")),
        ("password", json!("short")),
        ("username", json!("..")),
        ("email", json!("   @   ")),
        ("email", json!("b@y\n")),
        ("password", json!(" ".repeat(12))),
        ("full_name", json!("   ")),
    ] {
        let mut payload = base.clone();
        payload[field] = value;
        let (status, body) = app
            .call(
                Method::POST,
                "/users",
                Some(&app.admin_token),
                Some(payload),
            )
            .await;
        assert_eq!(status, 422, "{body}");
        assert_eq!(body["details"]["field"], field, "{body}");
    }
    let (status, body) = app
        .call(
            Method::POST,
            "/users",
            Some(&app.admin_token),
            Some(json!({"username": "bob", "email": "b@y", "password": "a-long-enough-password", "role": "root"})),
        )
        .await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["code"], "bad_request");

    let (status, got) = app.get(&format!("/users/{id}")).await;
    assert_eq!(status, 200);
    assert_eq!(got["role"], "engineer");

    let (status, page) = app.get("/users?limit=1&offset=0").await;
    assert_eq!(status, 200);
    assert_eq!(page["items"].as_array().unwrap().len(), 1);
    assert_eq!(page["total"], 2);
    let (status, body) = app.get("/users?limit=0").await;
    assert_eq!(status, 422);
    assert_eq!(body["details"]["field"], "limit");

    let (status, updated) = app
        .call(
            Method::PATCH,
            &format!("/users/{id}"),
            Some(&app.admin_token),
            Some(json!({ "role": "operator", "password": "another-long-password" })),
        )
        .await;
    assert_eq!(status, 200, "{updated}");
    assert_eq!(updated["role"], "operator");
    let token = app.login("alice", "another-long-password").await;
    assert!(!token.is_empty());
    assert_eq!(updated["full_name"], "Alice", "left out: kept");

    // `null` clears the display name; the other fields cannot be cleared and say so.
    let user_path = format!("/users/{id}");
    for field in ["email", "password", "role", "is_active"] {
        let (status, body) = app
            .call(
                Method::PATCH,
                &user_path,
                Some(&app.admin_token),
                Some(json!({ field: null, "full_name": "Not Applied" })),
            )
            .await;
        assert_eq!(status, 422, "{field}: {body}");
        assert_eq!(body["details"]["field"], field, "{body}");
    }
    let (status, cleared) = app
        .call(
            Method::PATCH,
            &user_path,
            Some(&app.admin_token),
            Some(json!({ "full_name": null })),
        )
        .await;
    assert_eq!(status, 200, "{cleared}");
    assert!(cleared.get("full_name").is_none(), "{cleared}");
    assert_eq!(cleared["email"], "alice@example.test");
    assert_eq!(cleared["role"], "operator");

    // The last admin cannot be demoted or deleted.
    let (status, body) = app
        .call(
            Method::PATCH,
            &format!("/users/{}", app.admin_id),
            Some(&app.admin_token),
            Some(json!({ "role": "viewer" })),
        )
        .await;
    assert_eq!(status, 409, "{body}");

    let (status, _) = app
        .call(
            Method::DELETE,
            &format!("/users/{id}"),
            Some(&app.admin_token),
            None,
        )
        .await;
    assert_eq!(status, 204);
    let (status, body) = app.get(&format!("/users/{id}")).await;
    assert_eq!(status, 404);
    assert_eq!(body["code"], "not_found");

    let create = app.audit_rows("user_create").await;
    assert_eq!(create.len(), 1);
    assert_eq!(create[0].0, Some(app.admin_id));
    assert_eq!(create[0].1.as_deref(), Some("user"));
    assert_eq!(create[0].2.unwrap().to_string(), id);
    assert_eq!(create[0].4.as_deref(), Some("127.0.0.1"));
    let update = app.audit_rows("user_update").await;
    assert_eq!(update.len(), 2, "refused updates are not audited");
    assert_eq!(
        update[0].3.clone().unwrap()["changed"],
        json!(["full_name"])
    );
    let details = update[1].3.clone().unwrap();
    assert_eq!(details["changed"], json!(["password", "role"]));
    assert!(!details.to_string().contains("another-long-password"));
    assert!(!details.to_string().contains("argon2"), "{details}");
    // A demotion shows the role it took away.
    assert_ne!(
        details["before"]["role"], details["after"]["role"],
        "{details}"
    );
    assert_eq!(details["after"]["role"], details["role"], "{details}");
    assert_eq!(app.audit_rows("user_delete").await.len(), 1);
}

/// A deleted user's audit trail still names them: the entries keep the username (their id is
/// cleared with the user), and the log can be filtered by it in any case.
#[tokio::test]
async fn a_deleted_users_audit_entries_still_name_them() {
    let app = common::spawn_app().await;
    let (id, token) = app.user_with_role("operator").await;
    let username = username_of(&app, id).await;
    let (status, _) = app
        .call(
            Method::POST,
            "/tokens",
            Some(&token),
            Some(json!({ "name": "t1" })),
        )
        .await;
    assert_eq!(status, 201);
    let (status, _) = app
        .call(
            Method::DELETE,
            &format!("/users/{id}"),
            Some(&app.admin_token),
            None,
        )
        .await;
    assert_eq!(status, 204);
    let (status, page) = app
        .get(&format!("/audit-log?username={}", username.to_uppercase()))
        .await;
    assert_eq!(status, 200, "{page}");
    let actions: Vec<&str> = page["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    assert_eq!(actions, ["token_create", "login"], "{page}");
    assert_eq!(page["total"], 2, "{page}");
    for entry in page["items"].as_array().unwrap() {
        assert_eq!(entry["username"], username.as_str(), "{entry}");
        assert!(entry.get("user_id").is_none(), "{entry}");
    }
    // The admin's own entries name the admin.
    let (_, page) = app.get("/audit-log?action=user_delete").await;
    assert_eq!(
        page["items"][0]["user_id"],
        app.admin_id.to_string(),
        "{page}"
    );
    assert!(page["items"][0]["username"].is_string(), "{page}");
}

#[tokio::test]
async fn system_config_put_get_list_delete_with_audit() {
    let app = common::spawn_app().await;
    let (status, body) = app
        .call(
            Method::PUT,
            "/system-config/notifications.slack",
            Some(&app.admin_token),
            Some(json!({ "value": { "channel": "#ops", "enabled": true } })),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["updated_by"], json!(app.admin_id));
    let first_update = body["updated_at"].as_str().unwrap().to_owned();
    let (status, body) = app
        .call(
            Method::PUT,
            "/system-config/notifications.slack",
            Some(&app.admin_token),
            Some(json!({ "value": { "channel": "#sre", "enabled": false } })),
        )
        .await;
    assert_eq!(status, 200);
    assert_ne!(body["updated_at"].as_str().unwrap(), first_update);
    let (status, got) = app.get("/system-config/notifications.slack").await;
    assert_eq!(status, 200);
    assert_eq!(got["value"]["channel"], "#sre");
    let (status, list) = app.get("/system-config").await;
    assert_eq!(status, 200);
    assert_eq!(list["items"].as_array().unwrap().len(), 1, "{list}");
    assert_eq!(list["total"], 1, "{list}");
    let (status, list) = app.get("/system-config?limit=0").await;
    assert_eq!(status, 422, "{list}");
    assert_eq!(list["details"]["field"], "limit", "{list}");
    // A body without a value (or with null) is refused and keeps the setting.
    for (body, reason) in [
        (json!({}), "is required"),
        (json!({ "value": null }), "is required and must not be null"),
    ] {
        let (status, answer) = app
            .call(
                Method::PUT,
                "/system-config/notifications.slack",
                Some(&app.admin_token),
                Some(body),
            )
            .await;
        assert_eq!(status, 400, "{answer}");
        assert_eq!(answer["details"]["field"], "value", "{answer}");
        assert_eq!(answer["details"]["reason"], reason, "{answer}");
    }
    let (_, kept) = app.get("/system-config/notifications.slack").await;
    assert_eq!(kept["value"]["channel"], "#sre");
    // Keys are declared as the API takes them: 1 to 50 of letters, digits, '.', '_', '-'.
    let long = "k".repeat(51);
    for (path, reason) in [
        (
            "/system-config/bad%20key".to_owned(),
            "must match `^[A-Za-z0-9._-]+$`",
        ),
        (
            format!("/system-config/{long}"),
            "must be 1 to 50 characters",
        ),
    ] {
        let (status, body) = app.get(&path).await;
        assert_eq!(status, 422, "{path}: {body}");
        assert_eq!(body["details"]["field"], "key", "{path}: {body}");
        assert_eq!(body["details"]["reason"], reason, "{path}: {body}");
    }
    let spec: Value = serde_json::from_str(&aiops::api::spec_json()).unwrap();
    let key = &spec["paths"]["/system-config/{key}"]["get"]["parameters"][0]["schema"];
    assert_eq!(key["pattern"], "^[A-Za-z0-9._-]+$", "{key}");
    assert_eq!(key["maxLength"], 50, "{key}");

    let audit = app.audit_rows("system_config_put").await;
    assert_eq!(audit.len(), 2);
    let latest = audit[0].3.clone().unwrap();
    assert_eq!(latest["key"], "notifications.slack");
    assert_eq!(latest["previous"]["channel"], "#ops");
    assert_eq!(latest["value"]["channel"], "#sre");

    let (status, _) = app
        .call(
            Method::DELETE,
            "/system-config/notifications.slack",
            Some(&app.admin_token),
            None,
        )
        .await;
    assert_eq!(status, 204);
    let (status, _) = app.get("/system-config/notifications.slack").await;
    assert_eq!(status, 404);
    let deleted = app.audit_rows("system_config_delete").await;
    assert_eq!(deleted.len(), 1);
    let details = deleted[0].3.clone().unwrap();
    assert_eq!(details["key"], "notifications.slack");
    assert_eq!(
        details["previous"]["channel"], "#sre",
        "the value it held: {details}"
    );
}

#[tokio::test]
async fn audit_log_lists_with_filters() {
    let app = common::spawn_app().await;
    for key in ["a", "b", "c"] {
        app.call(
            Method::PUT,
            &format!("/system-config/{key}"),
            Some(&app.admin_token),
            Some(json!({ "value": 1 })),
        )
        .await;
    }
    let (status, page) = app.get("/audit-log?action=system_config_put&limit=2").await;
    assert_eq!(status, 200, "{page}");
    assert_eq!(page["total"], 3);
    assert_eq!(page["items"].as_array().unwrap().len(), 2);
    assert_eq!(page["items"][0]["details"]["key"], "c", "newest first");

    let (_, by_user) = app
        .get(&format!("/audit-log?user_id={}", app.admin_id))
        .await;
    assert!(by_user["total"].as_i64().unwrap() >= 4, "{by_user}");
    let (_, by_resource) = app.get("/audit-log?resource_type=system_config").await;
    assert_eq!(by_resource["total"], 3);
    let future = (chrono::Utc::now() + chrono::Duration::hours(1)).to_rfc3339();
    let (status, later) = app
        .get(&format!("/audit-log?since={}", urlencode(&future)))
        .await;
    assert_eq!(status, 200, "{later}");
    assert_eq!(later["total"], 0);
    let (status, body) = app.get("/audit-log?user_id=not-a-uuid").await;
    assert_eq!(status, 400);
    assert_eq!(body["code"], "bad_request");
}

fn urlencode(s: &str) -> String {
    s.replace('+', "%2B").replace(':', "%3A")
}

#[tokio::test]
async fn errors_share_one_json_body_and_bodies_are_limited() {
    let app = common::spawn_app_with(|c| c.max_body_bytes = 1024).await;
    let resp = app
        .client
        .get(app.api("/no-such-thing"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["code"], "not_found");
    assert_eq!(
        body["message"], "no endpoint GET /api/v1/no-such-thing",
        "{body}"
    );
    // A route that exists, with a method it does not take.
    let resp = app
        .client
        .delete(app.api("/executions"))
        .bearer_auth(&app.admin_token)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 405);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["code"], "method_not_allowed");
    assert_eq!(
        body["message"], "/api/v1/executions does not take DELETE (it takes GET, POST, HEAD)",
        "{body}"
    );
    assert_eq!(
        resp_allow(&app, Method::DELETE, "/executions").await,
        "GET, POST, HEAD"
    );
    // A literal path beside a parameter one (`/runbooks/import`, `/runbooks/{id}`) answers
    // with its own methods, as the router chooses it.
    assert_eq!(
        resp_allow(&app, Method::GET, "/runbooks/import").await,
        "POST"
    );

    // A body without a type, or of a type the operation does not take: 415 naming the types
    // it takes.
    for content_type in [None, Some("text/plain")] {
        let mut req = app
            .client
            .post(app.api("/users"))
            .bearer_auth(&app.admin_token)
            .body("{}");
        if let Some(t) = content_type {
            req = req.header("content-type", t);
        }
        let resp = req.send().await.unwrap();
        assert_eq!(resp.status(), 415, "{content_type:?}");
        let body: Value = resp.json().await.unwrap();
        assert_eq!(body["code"], "unsupported_media_type");
        let message = body["message"].as_str().unwrap();
        assert!(
            message.ends_with("; it takes application/json; charset=utf-8"),
            "{body}"
        );
    }

    let resp = app
        .client
        .post(app.api("/users"))
        .bearer_auth(&app.admin_token)
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["code"], "bad_request");
    // No field to name: the key is left out, as the document declares, never `null`.
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .starts_with("the body is not JSON"),
        "{body}"
    );
    assert_eq!(
        body["details"]
            .as_object()
            .unwrap()
            .keys()
            .collect::<Vec<_>>(),
        ["reason"],
        "{body}"
    );

    let big = json!({ "value": "x".repeat(4096) });
    let resp = app
        .client
        .put(app.api("/system-config/big"))
        .bearer_auth(&app.admin_token)
        .json(&big)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 413);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["code"], "payload_too_large");
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM system_config")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(stored, 0);

    // Probes and docs live outside the API prefix.
    let resp = app.client.get(app.url("/healthz")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let resp = app.client.get(app.url("/readyz")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let resp = app.client.get(app.url("/docs")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    // Swagger UI shows the document as served, closed request objects included.
    let page = resp.text().await.unwrap();
    let document = aiops::api::spec_json();
    assert!(
        page.contains(document.trim_end()),
        "the docs embed the served document"
    );
    let resp = app
        .client
        .get(app.api("/openapi.json"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let spec: Value = resp.json().await.unwrap();
    assert_eq!(spec["info"]["title"], "aiops");
    let document: Value = serde_json::from_str(&aiops::api::spec_json()).unwrap();
    assert_eq!(spec, document, "the served document is the committed one");
    assert_eq!(
        spec["components"]["schemas"]["ExecutionCreate"]["additionalProperties"],
        false
    );
    let (status, version) = app.call(Method::GET, "/version", None, None).await;
    assert_eq!(status, 200);
    assert_eq!(version["version"], aiops::VERSION);
}

#[tokio::test]
async fn readyz_fails_when_migrations_are_not_current() {
    let app = common::spawn_app().await;
    let readyz = || async {
        let resp = app.client.get(app.url("/readyz")).send().await.unwrap();
        let status = resp.status().as_u16();
        (status, resp.json::<Value>().await.unwrap())
    };
    sqlx::query("UPDATE _sqlx_migrations SET success = false WHERE version = (SELECT max(version) FROM _sqlx_migrations)")
        .execute(&app.pool)
        .await
        .unwrap();
    let (status, body) = readyz().await;
    assert_eq!(status, 503);
    assert_eq!(body["code"], "unavailable");
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("migrations are not current"),
        "{body}"
    );
    // A database never migrated (no migration table) says the same, not "unreachable".
    sqlx::query("DROP TABLE _sqlx_migrations")
        .execute(&app.pool)
        .await
        .unwrap();
    let (status, body) = readyz().await;
    assert_eq!(status, 503);
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("migrations are not current"),
        "{body}"
    );
}

#[tokio::test]
async fn login_attempts_older_than_the_retention_are_pruned_by_their_scheduled_job() {
    let pool = common::fresh_pool().await;
    let ids: Vec<(i64, bool)> = sqlx::query_as(
        "INSERT INTO login_attempts (username, ip_address, succeeded, created_at) \
         SELECT 'someone', '192.0.2.1', false, now() - age \
         FROM unnest(ARRAY[interval '8 days', interval '30 days', interval '1 day', \
                           interval '1 minute']) AS age \
         RETURNING id, created_at < now() - interval '7 days'",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    common::run_scheduled_job(&pool, aiops::worker::KIND_LOGIN_ATTEMPTS_PRUNE).await;
    let left: Vec<i64> = sqlx::query_scalar("SELECT id FROM login_attempts ORDER BY id")
        .fetch_all(&pool)
        .await
        .unwrap();
    let expected: Vec<i64> = ids
        .iter()
        .filter(|(_, old)| !old)
        .map(|(id, _)| *id)
        .collect();
    assert_eq!(expected.len(), 2);
    assert_eq!(left, expected, "only attempts older than 7 days went");

    // A retention shorter than the login window keeps what throttling still reads: pruning
    // must not lift a lockout.
    sqlx::query("DELETE FROM login_attempts")
        .execute(&pool)
        .await
        .unwrap();
    sqlx::query(
        "INSERT INTO login_attempts (username, ip_address, succeeded, created_at) \
         SELECT 'victim', '192.0.2.1', false, now() - age \
         FROM unnest(ARRAY[interval '2 hours', interval '3 days']) AS age",
    )
    .execute(&pool)
    .await
    .unwrap();
    let options = aiops::worker::WorkerOptions {
        retention: std::time::Duration::from_secs(3600),
        ..aiops::worker::WorkerOptions::default()
    }
    .with_login_window(std::time::Duration::from_secs(48 * 3600));
    common::run_scheduled_job_with(&pool, aiops::worker::KIND_LOGIN_ATTEMPTS_PRUNE, &options).await;
    let left: Vec<bool> =
        sqlx::query_scalar("SELECT created_at > now() - interval '1 day' FROM login_attempts")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(left, [true], "the attempt within the login window stays");
}

/// Bounds the document declares (lengths, item counts, numeric ranges) are refused through the
/// real API with 422 naming the field and the bound, and nothing is stored.
#[tokio::test]
async fn declared_bounds_are_refused_naming_the_field() {
    let app = common::spawn_app().await;
    let spec: Value = serde_json::from_str(&aiops::api::spec_json()).unwrap();
    let server = &spec["components"]["schemas"]["ServerCreate"]["properties"];
    assert_eq!(server["name"]["maxLength"], 100);
    assert_eq!(server["tags"]["maxItems"], 50);
    assert_eq!(server["port"]["maximum"], 65535.0);
    assert_eq!(
        spec["components"]["schemas"]["UserCreate"]["properties"]["password"]["minLength"],
        12
    );

    let base = json!({ "name": "db-1", "hostname": "10.0.0.5", "username": "ops",
                       "auth_type": "password", "password": "pw" });
    let tags: Vec<String> = (0..51).map(|i| format!("t{i}")).collect();
    let cases = [
        (
            "/servers",
            json!({ "name": "n".repeat(101) }),
            "name",
            "must be 1 to 100 characters",
        ),
        (
            "/servers",
            json!({ "name": "" }),
            "name",
            "must be 1 to 100 characters",
        ),
        (
            "/servers",
            json!({ "tags": tags }),
            "tags",
            "must be at most 50 items, not 51",
        ),
        (
            "/servers",
            json!({ "port": 70000 }),
            "port",
            "must be between 1 and 65535, not 70000",
        ),
        (
            "/users",
            json!({ "username": "shorty", "email": "s@example.test", "password": "short",
                    "role": "viewer" }),
            "password",
            "must be at least 12 characters",
        ),
    ];
    for (path, change, field, reason) in cases {
        let mut body = if path == "/servers" {
            base.clone()
        } else {
            json!({})
        };
        for (k, v) in change.as_object().unwrap() {
            body[k] = v.clone();
        }
        let (status, answer) = app
            .call(Method::POST, path, Some(&app.admin_token), Some(body))
            .await;
        assert_eq!(status, 422, "{path} {field}: {answer}");
        assert_eq!(answer["code"], "validation_failed", "{answer}");
        assert_eq!(answer["details"]["field"], field, "{answer}");
        assert_eq!(answer["details"]["reason"], reason, "{answer}");
        assert_eq!(answer["message"], format!("{field}: {reason}"), "{answer}");
    }
    let servers: i64 = sqlx::query_scalar("SELECT count(*) FROM server_credentials")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    let users: i64 = sqlx::query_scalar("SELECT count(*) FROM users WHERE username = 'shorty'")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!((servers, users), (0, 0), "nothing refused was stored");

    // The same bound on a partial update, and on a type the bound does not fit: a 400.
    let (status, answer) = app
        .call(
            Method::PATCH,
            &format!("/circuit-breakers/{}", uuid::Uuid::new_v4()),
            Some(&app.admin_token),
            Some(json!({ "failure_threshold": 0 })),
        )
        .await;
    assert_eq!(status, 422, "{answer}");
    assert_eq!(
        answer["details"]["reason"], "must be >= 1, not 0",
        "{answer}"
    );
    let (status, answer) = app
        .call(
            Method::PATCH,
            &format!("/circuit-breakers/{}", uuid::Uuid::new_v4()),
            Some(&app.admin_token),
            Some(json!({ "failure_threshold": "many" })),
        )
        .await;
    assert_eq!(status, 400, "{answer}");
    assert_eq!(answer["details"]["field"], "failure_threshold", "{answer}");
}

/// A string field takes only a JSON string: a number or a boolean (which poem-openapi alone
/// would read as its text, storing a token named "false") is a 400 naming the field.
#[tokio::test]
async fn string_fields_take_no_numbers_or_booleans() {
    let app = common::spawn_app().await;
    for (path, body, field, reason) in [
        (
            "/webhook-tokens",
            json!({ "name": false }),
            "name",
            "must be a string, not a boolean",
        ),
        (
            "/tokens",
            json!({ "name": 17 }),
            "name",
            "must be a string, not a number",
        ),
        (
            "/users",
            json!({ "username": "numeric", "email": "n@example.test",
                    "password": 123456789012345_i64, "role": "viewer" }),
            "password",
            "must be a string, not a number",
        ),
        (
            "/runbooks/validate",
            json!({ "yaml": false }),
            "yaml",
            "must be a string, not a boolean",
        ),
    ] {
        let (status, answer) = app
            .call(Method::POST, path, Some(&app.admin_token), Some(body))
            .await;
        assert_eq!(status, 400, "{path}: {answer}");
        assert_eq!(answer["code"], "bad_request", "{answer}");
        assert_eq!(answer["details"]["field"], field, "{path}: {answer}");
        assert_eq!(answer["details"]["reason"], reason, "{path}: {answer}");
    }
    // Without credentials, an operation that needs them says 401 before anything about the
    // input (a bad body, a NUL in a parameter).
    for (method, path, body) in [
        (
            Method::POST,
            "/webhook-tokens",
            Some(json!({ "name": false })),
        ),
        (
            Method::PUT,
            "/system-config/x",
            Some(json!({ "value": null })),
        ),
        (Method::GET, "/servers?environment=a%00", None),
    ] {
        let (status, answer) = app.call(method, path, None, body).await;
        assert_eq!(status, 401, "{path}: {answer}");
        assert_eq!(answer["code"], "unauthorized", "{answer}");
    }
    // So do credentials that do not authenticate (unknown, revoked, not a bearer token), also
    // where the operation itself reads its parameters before it authenticates (`limit=x`,
    // a body of the wrong media type); the same requests with a valid token are refused for
    // their input.
    let (_, revoked) = app
        .call(
            Method::POST,
            "/tokens",
            Some(&app.admin_token),
            Some(json!({ "name": "soon-revoked" })),
        )
        .await;
    let revoked_token = revoked["token"].as_str().unwrap().to_owned();
    let (status, answer) = app
        .call(
            Method::DELETE,
            &format!("/tokens/{}", revoked["info"]["id"].as_str().unwrap()),
            Some(&app.admin_token),
            None,
        )
        .await;
    assert_eq!(status, 204, "{answer}");
    let unknown = format!("{}{}", aiops::crypto::token::PREFIX, "0".repeat(43));
    let bad_input = [
        (
            Method::POST,
            "/webhook-tokens",
            Some(json!({ "name": false })),
            400,
        ),
        (
            Method::PUT,
            "/system-config/x",
            Some(json!({ "value": null })),
            400,
        ),
        (Method::GET, "/servers?environment=a%00", None, 422),
        (Method::GET, "/executions?limit=x", None, 400),
        (Method::GET, "/servers?limit=0", None, 422),
    ];
    for token in [unknown.as_str(), revoked_token.as_str(), "not-a-token"] {
        for (method, path, body, _) in bad_input.clone() {
            let (status, answer) = app.call(method, path, Some(token), body).await;
            assert_eq!(status, 401, "{path} with {token}: {answer}");
            assert_eq!(answer["code"], "unauthorized", "{answer}");
        }
    }
    for (method, path, body, refused) in bad_input {
        let (status, answer) = app.call(method, path, Some(&app.admin_token), body).await;
        assert_eq!(status, refused, "{path}: {answer}");
    }
    let request = app
        .client
        .post(app.api("/servers"))
        .header("Authorization", format!("Basic {}", "YTpi"))
        .header("Content-Type", "text/plain")
        .body("name=x")
        .send()
        .await
        .unwrap();
    assert_eq!(request.status(), 401, "not a bearer token");
    let request = app
        .client
        .post(app.api("/servers"))
        .bearer_auth(&app.admin_token)
        .header("Content-Type", "text/plain")
        .body("name=x")
        .send()
        .await
        .unwrap();
    assert_eq!(
        request.status(),
        415,
        "a valid token with a body of the wrong media type"
    );
    let stored: (i64, i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM webhook_tokens), \
                (SELECT count(*) FROM auth_tokens WHERE name = '17'), \
                (SELECT count(*) FROM users WHERE username = 'numeric')",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(stored, (0, 0, 0), "nothing refused was stored");
}

/// PostgreSQL keeps no NUL character in text or jsonb: one in a path or query parameter, in a
/// JSON body (value or field name) or in a runbook's YAML is refused with 422 naming where it
/// is, never a 500, and nothing is stored.
#[tokio::test]
async fn nul_characters_are_refused_by_name_not_failed_in_the_database() {
    let app = common::spawn_app().await;
    let get = |path: &'static str| app.get(path);
    for (path, field) in [
        ("/servers?environment=prod%00", "environment"),
        ("/servers?tag=role%3Dweb&tag=a%00b", "tag"),
        ("/alerts?name=Disk%00", "name"),
        ("/alerts?label=team%3Dops%00", "label"),
        ("/runbooks?category=%00", "category"),
        ("/audit-log?action=x%00", "action"),
        ("/queue/jobs?kind=a%00", "kind"),
        ("/system-config/a%00b", "key"),
    ] {
        let (status, body) = get(path).await;
        assert_eq!(status, 422, "{path}: {body}");
        assert_eq!(body["details"]["field"], field, "{path}: {body}");
        assert_eq!(
            body["details"]["reason"], "must not contain a NUL character, which cannot be stored",
            "{path}: {body}"
        );
    }
    let server = json!({ "name": "db\u{0}1", "hostname": "10.0.0.5", "username": "ops",
                         "auth_type": "password", "password": "pw" });
    for (method, path, body, field) in [
        (Method::POST, "/servers", server, "name"),
        (
            Method::POST,
            "/tokens",
            json!({ "name": "ci\u{0}" }),
            "name",
        ),
        (
            Method::PUT,
            "/system-config/feature",
            json!({ "value": { "list": ["ok", "no\u{0}"] } }),
            "value.list[1]",
        ),
        (
            Method::PUT,
            "/system-config/feature",
            json!({ "value": { "bad\u{0}key": 1 } }),
            "value",
        ),
        (
            Method::POST,
            "/blackout-windows",
            json!({ "name": "w", "description": "\u{0}", "start_time": "2030-01-01T00:00:00Z",
                    "end_time": "2030-01-02T00:00:00Z" }),
            "description",
        ),
    ] {
        let (status, answer) = app
            .call(method, path, Some(&app.admin_token), Some(body))
            .await;
        assert_eq!(status, 422, "{path}: {answer}");
        assert_eq!(answer["code"], "validation_failed", "{answer}");
        assert_eq!(answer["details"]["field"], field, "{path}: {answer}");
    }
    // A runbook's YAML can carry one as the escape `\0`.
    let resp = app
        .client
        .post(app.api("/runbooks/import"))
        .bearer_auth(&app.admin_token)
        .header("content-type", "application/yaml")
        .body("name: nul-probe\nsteps:\n  - name: s\n    command: \"echo \\0\"\n")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 422);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["details"]["field"], "steps[0].command", "{body}");
    let stored: (i64, i64, i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM server_credentials), \
                (SELECT count(*) FROM system_config), \
                (SELECT count(*) FROM blackout_windows), \
                (SELECT count(*) FROM runbooks WHERE name = 'nul-probe')",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(stored, (0, 0, 0, 0), "nothing refused was stored");
}

/// The `Allow` header of the 405 that `method` on `path` (under the API prefix) answers.
async fn resp_allow(app: &common::TestApp, method: Method, path: &str) -> String {
    let resp = app
        .client
        .request(method, app.api(path))
        .bearer_auth(&app.admin_token)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 405, "{path}");
    resp.headers()
        .get("allow")
        .expect("a 405 says what the path takes")
        .to_str()
        .unwrap()
        .to_owned()
}

/// A token made with an expiring API token expires with it at the latest; one made with a login
/// session lives as long as asked.
#[tokio::test]
async fn a_token_made_with_an_expiring_api_token_does_not_outlive_it() {
    let app = common::spawn_app().await;
    let (_, session) = app.user_with_role("operator").await;
    let create = |token: String, body: serde_json::Value| {
        let app = &app;
        async move {
            let (status, created) = app
                .call(Method::POST, "/tokens", Some(&token), Some(body))
                .await;
            assert_eq!(status, 201, "{created}");
            created
        }
    };
    let parent = create(
        session.clone(),
        json!({ "name": "short", "expires_in_days": 2 }),
    )
    .await;
    let parent_secret = parent["token"].as_str().unwrap().to_owned();
    let parent_expiry = parent["info"]["expires_at"].clone();
    assert!(parent_expiry.is_string(), "{parent}");
    for (name, days) in [
        ("forever", None),
        ("longer", Some(30)),
        ("shorter", Some(1)),
    ] {
        let mut body = json!({ "name": name });
        if let Some(d) = days {
            body["expires_in_days"] = json!(d);
        }
        let child = create(parent_secret.clone(), body).await;
        let expiry = &child["info"]["expires_at"];
        if days == Some(1) {
            assert!(
                expiry.as_str().unwrap() < parent_expiry.as_str().unwrap(),
                "{child}"
            );
        } else {
            assert_eq!(expiry, &parent_expiry, "{name}: {child}");
        }
    }
    let lasting = create(session, json!({ "name": "lasting" })).await;
    assert!(lasting["info"].get("expires_at").is_none(), "{lasting}");
}

/// Revoking an API token revokes every token minted with it, down the line; a login session's
/// end revokes no API token made with it, and a sibling line is untouched.
#[tokio::test]
async fn revoking_an_api_token_revokes_the_tokens_made_with_it() {
    let app = common::spawn_app().await;
    let (_, session) = app.user_with_role("operator").await;
    let create = |token: String, name: &'static str| {
        let app = &app;
        async move {
            let (status, created) = app
                .call(
                    Method::POST,
                    "/tokens",
                    Some(&token),
                    Some(json!({ "name": name })),
                )
                .await;
            assert_eq!(status, 201, "{created}");
            let id = created["info"]["id"].as_str().unwrap().to_owned();
            (created["token"].as_str().unwrap().to_owned(), id, created)
        }
    };
    let (root, root_id, created) = create(session.clone(), "root").await;
    assert!(created["info"].get("created_with").is_none(), "{created}");
    let (child, _, created) = create(root.clone(), "child").await;
    assert_eq!(
        created["info"]["created_with"],
        root_id.as_str(),
        "{created}"
    );
    let (grandchild, _, _) = create(child.clone(), "grandchild").await;
    let (other, _, _) = create(session.clone(), "other").await;
    let works = |token: String| {
        let app = &app;
        async move {
            app.call(Method::GET, "/auth/me", Some(&token), None)
                .await
                .0
        }
    };
    for t in [&root, &child, &grandchild, &other] {
        assert_eq!(works(t.clone()).await, 200);
    }
    let (status, body) = app
        .call(
            Method::DELETE,
            &format!("/tokens/{root_id}"),
            Some(&session),
            None,
        )
        .await;
    assert_eq!(status, 204, "{body}");
    for t in [&root, &child, &grandchild] {
        assert_eq!(works(t.clone()).await, 401);
    }
    assert_eq!(works(other.clone()).await, 200);
    let audit = app.audit_rows("token_revoke").await;
    assert_eq!(audit.len(), 1, "{audit:?}");
    let details = audit[0].3.as_ref().unwrap();
    assert_eq!(details["tokens_created_with_it_revoked"], 2, "{details}");
    // Logging out ends the session only: the API token it made keeps working.
    let (status, _) = app
        .call(Method::POST, "/auth/logout", Some(&session), None)
        .await;
    assert_eq!(status, 204);
    assert_eq!(works(session).await, 401);
    assert_eq!(works(other).await, 200);
}

/// Parallel logins to one account all succeed: each locks the user's row for the update it
/// makes (`last_login`), so none deadlocks with another.
#[tokio::test]
async fn parallel_logins_to_one_account_all_succeed() {
    let app = common::spawn_app().await;
    let (id, _) = app.user_with_role("operator").await;
    let username = username_of(&app, id).await;
    for _ in 0..10 {
        let logins: Vec<_> = (0..5)
            .map(|_| {
                let request = app
                    .client
                    .post(app.api("/auth/login"))
                    .json(&json!({ "username": username, "password": common::PASSWORD }));
                tokio::spawn(async move { request.send().await.unwrap().status().as_u16() })
            })
            .collect();
        for login in logins {
            assert_eq!(login.await.unwrap(), 200);
        }
    }
}

/// A password change that commits while a login with the old password is being checked wins:
/// the login is refused and leaves no session behind. The change is held open (its row lock
/// taken, the user's tokens revoked) until the login waits for it, then committed.
#[tokio::test]
async fn a_login_with_the_password_being_changed_gets_no_session() {
    let app = common::spawn_app().await;
    let (id, _) = app.user_with_role("engineer").await;
    let username = username_of(&app, id).await;
    let new_hash = aiops::auth::hash_password("a-brand-new-password".to_owned())
        .await
        .unwrap();
    let mut change = app.pool.begin().await.unwrap();
    sqlx::query("UPDATE users SET password_hash = $2 WHERE id = $1")
        .bind(id)
        .bind(&new_hash)
        .execute(&mut *change)
        .await
        .unwrap();
    sqlx::query(
        "UPDATE auth_tokens SET revoked_at = now() WHERE user_id = $1 AND revoked_at IS NULL",
    )
    .bind(id)
    .execute(&mut *change)
    .await
    .unwrap();
    let login = {
        let request = app
            .client
            .post(app.api("/auth/login"))
            .json(&json!({ "username": username, "password": common::PASSWORD }));
        tokio::spawn(async move { request.send().await.unwrap().status().as_u16() })
    };
    // Until the login waits for the change's lock (or, were it not to wait, has answered).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let waiting: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity \
             WHERE datname = current_database() AND wait_event_type = 'Lock'",
        )
        .fetch_one(&app.pool)
        .await
        .unwrap();
        if waiting > 0 || login.is_finished() || std::time::Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    change.commit().await.unwrap();
    assert_eq!(login.await.unwrap(), 401);
    let live: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM auth_tokens WHERE user_id = $1 AND revoked_at IS NULL",
    )
    .bind(id)
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(live, 0);
    assert_eq!(app.audit_rows("login_failed").await.len(), 1);
}

/// Behind a trusted proxy the client is the address the proxy appended to `X-Forwarded-For`,
/// the last one: the ones before it are whatever the client sent.
#[tokio::test]
async fn the_forwarded_client_address_is_the_one_the_proxy_appended() {
    let app = common::spawn_app_with(|c| c.trust_forwarded_for = true).await;
    let resp = app
        .client
        .post(app.api("/auth/login"))
        .header("x-forwarded-for", "198.51.100.7, 203.0.113.9")
        .json(&json!({ "username": "nobody-here", "password": "wrong-password-1" }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 401);
    let failed = app.audit_rows("login_failed").await;
    assert_eq!(failed.len(), 1, "{failed:?}");
    assert_eq!(failed[0].4.as_deref(), Some("203.0.113.9"), "{failed:?}");
}

/// A request carrying two Authorization headers is refused: which credentials were meant is
/// not guessed (before, the first one silently won).
#[tokio::test]
async fn two_authorization_headers_are_refused() {
    let app = common::spawn_app().await;
    let (_, viewer) = app.user_with_role("viewer").await;
    let resp = app
        .client
        .get(app.api("/auth/me"))
        .header("authorization", format!("Bearer {viewer}"))
        .header("authorization", format!("Bearer {}", app.admin_token))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 400);
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(body["details"]["field"], "Authorization", "{body}");
    // One is fine.
    let (status, me) = app.call(Method::GET, "/auth/me", Some(&viewer), None).await;
    assert_eq!(status, 200, "{me}");
}
