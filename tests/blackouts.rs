//! Blackout windows through the API: CRUD, validation (the database enforces end > start), and
//! the check endpoint for one-off, recurring and cron windows selecting by tag and category.

mod common;

use chrono::{Duration, Utc};
use reqwest::Method;
use serde_json::{Value, json};
use uuid::Uuid;

async fn runbook(app: &common::TestApp, name: &str, category: &str) -> Uuid {
    sqlx::query_scalar("INSERT INTO runbooks (name, category) VALUES ($1, $2) RETURNING id")
        .bind(name)
        .bind(category)
        .fetch_one(&app.pool)
        .await
        .unwrap()
}

async fn server(app: &common::TestApp, name: &str, tags: Value, env: &str) -> Uuid {
    sqlx::query_scalar(
        "INSERT INTO server_credentials (name, hostname, username, os_type, protocol, auth_type, tags, environment) \
         VALUES ($1, 'db1.example.test', 'ops', 'linux', 'ssh', 'key', $2, $3) RETURNING id",
    )
    .bind(name)
    .bind(tags)
    .bind(env)
    .fetch_one(&app.pool)
    .await
    .unwrap()
}

#[tokio::test]
async fn crud_and_validation() {
    let app = common::spawn_app().await;
    let (_, engineer) = app.user_with_role("engineer").await;
    let start = Utc::now() + Duration::hours(1);
    let (status, created) = app
        .call(
            Method::POST,
            "/blackout-windows",
            Some(&engineer),
            Some(json!({
                "name": "Saturday patching",
                "description": "OS patching of the database fleet",
                "start_time": start,
                "end_time": start + Duration::hours(2),
                "recurrence": "weekly",
                "recurrence_pattern": { "timezone": "Europe/Berlin" },
                "affected_servers": { "tags": ["role=db"] },
                "affected_runbooks": { "categories": ["database"] }
            })),
        )
        .await;
    assert_eq!(status, 201, "{created}");
    let id = created["id"].as_str().unwrap().to_owned();
    assert_eq!(created["recurrence"], "weekly");
    assert_eq!(created["recurrence_pattern"]["timezone"], "Europe/Berlin");
    assert_eq!(created["affected_servers"]["tags"], json!(["role=db"]));
    assert_eq!(created["active_now"], false);

    // end_time <= start_time is refused by the database constraint, reported on end_time.
    let (status, body) = app
        .call(
            Method::PUT,
            &format!("/blackout-windows/{id}"),
            Some(&engineer),
            Some(json!({ "name": "bad", "start_time": start, "end_time": start })),
        )
        .await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(body["details"]["field"], "end_time");
    let (_, unchanged) = app.get(&format!("/blackout-windows/{id}")).await;
    assert_eq!(
        unchanged["name"], "Saturday patching",
        "a refused update loses nothing"
    );

    for (payload, field) in [
        (
            json!({"name": "c", "start_time": start, "end_time": start + Duration::hours(1), "recurrence": "cron"}),
            "recurrence_pattern.cron",
        ),
        (
            json!({"name": "c", "start_time": start, "end_time": start + Duration::hours(1), "recurrence": "cron", "recurrence_pattern": {"cron": "99 * * * *"}}),
            "recurrence_pattern.cron",
        ),
        (
            json!({"name": "c", "start_time": start, "end_time": start + Duration::hours(1), "recurrence_pattern": {"timezone": "Nowhere/City"}}),
            "recurrence_pattern.timezone",
        ),
        (
            json!({"name": "", "start_time": start, "end_time": start + Duration::hours(1)}),
            "name",
        ),
        (
            json!({"name": "c", "start_time": start, "end_time": start + Duration::hours(1), "recurrence": "cron", "recurrence_pattern": {"cron": "0 2 * * 8"}}),
            "recurrence_pattern.cron",
        ),
        (
            json!({"name": "c", "start_time": start, "end_time": start + Duration::hours(1), "recurrence": "daily", "recurrence_pattern": {"until": start}}),
            "recurrence_pattern.until",
        ),
        (
            json!({"name": "c", "start_time": start, "end_time": start + Duration::hours(1), "recurrence_pattern": {"until": start - Duration::days(1)}}),
            "recurrence_pattern.until",
        ),
        (
            json!({"name": "c", "start_time": start, "end_time": start + Duration::hours(1), "affected_runbooks": {"ids": [Uuid::new_v4()]}}),
            "affected_runbooks.ids[0]",
        ),
        (
            json!({"name": "c", "start_time": start, "end_time": start + Duration::hours(1), "affected_servers": {"server_ids": [Uuid::new_v4()]}}),
            "affected_servers.server_ids[0]",
        ),
    ] {
        let (status, body) = app
            .call(
                Method::POST,
                "/blackout-windows",
                Some(&engineer),
                Some(payload),
            )
            .await;
        assert_eq!(status, 422, "{body}");
        assert_eq!(body["details"]["field"], field, "{body}");
    }

    let (status, updated) = app
        .call(
            Method::PUT,
            &format!("/blackout-windows/{id}"),
            Some(&engineer),
            Some(json!({
                "name": "Nightly backups",
                "start_time": start,
                "end_time": start + Duration::minutes(30),
                "recurrence": "cron",
                "recurrence_pattern": { "cron": "0 2 * * *", "timezone": "UTC" },
                "enabled": false
            })),
        )
        .await;
    assert_eq!(status, 200, "{updated}");
    assert_eq!(updated["enabled"], false);
    let (status, page) = app.get("/blackout-windows?enabled=false").await;
    assert_eq!(status, 200);
    assert_eq!(page["total"], 1);
    let (_, page) = app.get("/blackout-windows?enabled=true").await;
    assert_eq!(page["total"], 0);

    let (status, _) = app
        .call(
            Method::DELETE,
            &format!("/blackout-windows/{id}"),
            Some(&engineer),
            None,
        )
        .await;
    assert_eq!(status, 204);
    let (status, _) = app.get(&format!("/blackout-windows/{id}")).await;
    assert_eq!(status, 404);
    for action in ["blackout_create", "blackout_update", "blackout_delete"] {
        let rows = app.audit_rows(action).await;
        assert_eq!(rows.len(), 1, "{action}");
        assert_eq!(rows[0].2.unwrap().to_string(), id);
    }
    // The deletion's entry names what went.
    let deleted = app.audit_rows("blackout_delete").await;
    assert_eq!(
        deleted[0].3.as_ref().unwrap()["name"],
        "Nightly backups",
        "{deleted:?}"
    );
    // The update's entry has the window before and after.
    let updated = app.audit_rows("blackout_update").await;
    let details = updated[0].3.as_ref().unwrap();
    assert_eq!(details["before"]["name"], "Saturday patching", "{details}");
    assert_eq!(details["before"]["recurrence"], "weekly", "{details}");
    assert_eq!(details["after"]["name"], "Nightly backups", "{details}");
    assert_eq!(
        details["after"]["recurrence_pattern"]["cron"], "0 2 * * *",
        "{details}"
    );
}

/// A server or runbook a window names may be deleted later: the window can still be edited and
/// disabled, keeping the ids it holds; a new id must still name something.
#[tokio::test]
async fn a_window_naming_a_deleted_server_or_runbook_stays_editable() {
    let app = common::spawn_app().await;
    let gone_server = server(&app, "gone", json!([]), "production").await;
    let gone_runbook = runbook(&app, "gone", "database").await;
    let start = Utc::now() + Duration::hours(1);
    let window = |enabled: bool, extra: Option<Uuid>| {
        let mut servers = vec![gone_server];
        servers.extend(extra);
        json!({
            "name": "freeze", "start_time": start, "end_time": start + Duration::hours(1),
            "affected_servers": { "server_ids": servers },
            "affected_runbooks": { "ids": [gone_runbook] },
            "enabled": enabled,
        })
    };
    let (status, created) = app
        .call(
            Method::POST,
            "/blackout-windows",
            Some(&app.admin_token),
            Some(window(true, None)),
        )
        .await;
    assert_eq!(status, 201, "{created}");
    let id = created["id"].as_str().unwrap().to_owned();
    for sql in [
        "DELETE FROM server_credentials WHERE id = $1",
        "DELETE FROM runbooks WHERE id = $1",
    ] {
        let target = if sql.contains("server") {
            gone_server
        } else {
            gone_runbook
        };
        sqlx::query(sql)
            .bind(target)
            .execute(&app.pool)
            .await
            .unwrap();
    }
    let (status, updated) = app
        .call(
            Method::PUT,
            &format!("/blackout-windows/{id}"),
            Some(&app.admin_token),
            Some(window(false, None)),
        )
        .await;
    assert_eq!(status, 200, "{updated}");
    assert_eq!(updated["enabled"], false);
    assert_eq!(
        updated["affected_servers"]["server_ids"],
        json!([gone_server])
    );
    let (status, body) = app
        .call(
            Method::PUT,
            &format!("/blackout-windows/{id}"),
            Some(&app.admin_token),
            Some(window(false, Some(Uuid::new_v4()))),
        )
        .await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(
        body["details"]["field"], "affected_servers.server_ids[1]",
        "{body}"
    );
}

#[tokio::test]
async fn check_says_whether_and_why() {
    let app = common::spawn_app().await;
    let db_runbook = runbook(&app, "pg-cancel-long-queries", "database").await;
    let web_runbook = runbook(&app, "nginx-reload", "web").await;
    let db_server = server(&app, "db1", json!({"role": "db"}), "production").await;
    let web_server = server(&app, "web1", json!(["web"]), "staging").await;
    let now = Utc::now();

    let (status, body) = app
        .call(
            Method::POST,
            "/blackout-windows",
            Some(&app.admin_token),
            Some(json!({
                "name": "DB maintenance",
                "start_time": now - Duration::minutes(10),
                "end_time": now + Duration::minutes(50),
                "affected_servers": { "tags": ["role=db"] },
                "affected_runbooks": { "categories": ["database"] }
            })),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["active_now"], true);

    let check = |runbook: Uuid, server: Uuid| {
        let app = &app;
        async move {
            let (status, body) = app
                .get(&format!(
                    "/blackout-windows/check?runbook_id={runbook}&server_id={server}"
                ))
                .await;
            assert_eq!(status, 200, "{body}");
            body
        }
    };
    let hit = check(db_runbook, db_server).await;
    assert_eq!(hit["blacked_out"], true, "{hit}");
    assert_eq!(hit["windows"][0]["name"], "DB maintenance");
    assert!(
        hit["windows"][0]["reason"]
            .as_str()
            .unwrap()
            .contains("DB maintenance")
    );
    assert_eq!(check(db_runbook, web_server).await["blacked_out"], false);
    assert_eq!(check(web_runbook, db_server).await["blacked_out"], false);

    // A recurring window that started days ago and repeats daily covers now.
    let (status, _) = app
        .call(
            Method::POST,
            "/blackout-windows",
            Some(&app.admin_token),
            Some(json!({
                "name": "Daily web freeze",
                "start_time": now - Duration::days(3) - Duration::minutes(5),
                "end_time": now - Duration::days(3) + Duration::minutes(5),
                "recurrence": "daily",
                "affected_servers": { "environments": ["staging"] }
            })),
        )
        .await;
    assert_eq!(status, 201);
    let web = check(web_runbook, web_server).await;
    assert_eq!(web["blacked_out"], true, "{web}");
    assert_eq!(web["windows"][0]["name"], "Daily web freeze");

    // The same instant two hours later is outside both windows.
    let later = (now + Duration::hours(2)).to_rfc3339().replace('+', "%2B");
    let (_, body) = app
        .get(&format!(
            "/blackout-windows/check?runbook_id={web_runbook}&server_id={web_server}&at={later}"
        ))
        .await;
    assert_eq!(body["blacked_out"], false, "{body}");

    // Without a server the question is a run on a worker's own host: windows that select
    // servers (both above) do not cover it.
    let (status, own_host) = app
        .get(&format!("/blackout-windows/check?runbook_id={db_runbook}"))
        .await;
    assert_eq!(status, 200, "{own_host}");
    assert_eq!(own_host["blacked_out"], false, "{own_host}");
    // Without a runbook: windows for every runbook on that server ("Daily web freeze"), not
    // those for some runbooks ("DB maintenance").
    let (_, web_only) = app
        .get(&format!("/blackout-windows/check?server_id={web_server}"))
        .await;
    assert_eq!(web_only["blacked_out"], true, "{web_only}");
    let (_, db_only) = app
        .get(&format!("/blackout-windows/check?server_id={db_server}"))
        .await;
    assert_eq!(db_only["blacked_out"], false, "{db_only}");
    // A window for every server covers the worker's own host too.
    let (status, _) = app
        .call(
            Method::POST,
            "/blackout-windows",
            Some(&app.admin_token),
            Some(json!({
                "name": "Change freeze",
                "start_time": now - Duration::minutes(1),
                "end_time": now + Duration::minutes(30),
                "affected_runbooks": { "categories": ["database"] }
            })),
        )
        .await;
    assert_eq!(status, 201);
    let (_, own_host) = app
        .get(&format!("/blackout-windows/check?runbook_id={db_runbook}"))
        .await;
    assert_eq!(own_host["blacked_out"], true, "{own_host}");
    assert_eq!(
        own_host["windows"][0]["name"], "Change freeze",
        "{own_host}"
    );

    let (status, _) = app
        .get(&format!(
            "/blackout-windows/check?runbook_id={}",
            Uuid::new_v4()
        ))
        .await;
    assert_eq!(status, 404);
}

/// Weekly, monthly and cron windows answered by the check endpoint at chosen instants: each
/// recurs at its local wall-clock time in its timezone (across a daylight-saving change), and a
/// window selecting runbooks by id covers only those.
#[tokio::test]
async fn recurring_windows_follow_their_timezone_through_the_api() {
    let app = common::spawn_app().await;
    let patched = runbook(&app, "os-patch", "os").await;
    let other = runbook(&app, "disk-cleanup", "os").await;
    let create = |body: Value| {
        let app = &app;
        async move {
            let (status, created) = app
                .call(
                    Method::POST,
                    "/blackout-windows",
                    Some(&app.admin_token),
                    Some(body),
                )
                .await;
            assert_eq!(status, 201, "{created}");
        }
    };
    // Saturdays 02:00-04:00 in Berlin (first: 2026-03-07, CET), for one runbook only.
    create(json!({
        "name": "weekly patching",
        "start_time": "2026-03-07T01:00:00Z", "end_time": "2026-03-07T03:00:00Z",
        "recurrence": "weekly", "recurrence_pattern": { "timezone": "Europe/Berlin" },
        "affected_runbooks": { "ids": [patched] }
    }))
    .await;
    // The 15th of every month, 10:00-11:00 UTC, for every runbook.
    create(json!({
        "name": "monthly audit",
        "start_time": "2026-01-15T10:00:00Z", "end_time": "2026-01-15T11:00:00Z",
        "recurrence": "monthly"
    }))
    .await;
    // Cron: Saturdays at 02:00 in New York, 30 minutes each.
    create(json!({
        "name": "cron backups",
        "start_time": "2026-01-03T07:00:00Z", "end_time": "2026-01-03T07:30:00Z",
        "recurrence": "cron",
        "recurrence_pattern": { "cron": "0 0 2 * * SAT", "timezone": "America/New_York" },
        "affected_runbooks": { "ids": [other] }
    }))
    .await;
    let check = |runbook: Uuid, at: &'static str| {
        let app = &app;
        async move {
            let (status, body) = app
                .get(&format!(
                    "/blackout-windows/check?runbook_id={runbook}&at={}",
                    at.replace('+', "%2B")
                ))
                .await;
            assert_eq!(status, 200, "{body}");
            let names: Vec<String> = body["windows"]
                .as_array()
                .unwrap()
                .iter()
                .map(|w| w["name"].as_str().unwrap().to_owned())
                .collect();
            assert_eq!(body["blacked_out"], !names.is_empty(), "{body}");
            names
        }
    };
    let none: Vec<String> = Vec::new();
    // Weekly: 02:30 CET on a later Saturday; 02:15 CEST after the clocks went forward (00:15 UTC,
    // outside the first occurrence's UTC hours); not on a Sunday; not for the other runbook.
    assert_eq!(
        check(patched, "2026-03-14T01:30:00Z").await,
        ["weekly patching"]
    );
    assert_eq!(
        check(patched, "2026-04-04T00:15:00Z").await,
        ["weekly patching"]
    );
    assert_eq!(
        check(patched, "2026-04-04T02:30:00Z").await,
        none,
        "04:30 CEST"
    );
    assert_eq!(
        check(patched, "2026-03-15T01:30:00Z").await,
        none,
        "a Sunday"
    );
    assert_eq!(
        check(other, "2026-03-14T01:30:00Z").await,
        none,
        "another runbook"
    );
    // Monthly: the 15th, not the 16th.
    assert_eq!(
        check(other, "2026-05-15T10:30:00Z").await,
        ["monthly audit"]
    );
    assert_eq!(check(other, "2026-05-16T10:30:00Z").await, none);
    // Cron: 02:10 EDT on a Saturday in July (06:10 UTC), not at 03:10, not on a Friday.
    assert_eq!(check(other, "2026-07-11T06:10:00Z").await, ["cron backups"]);
    assert_eq!(check(other, "2026-07-11T07:10:00Z").await, none);
    assert_eq!(check(other, "2026-07-10T06:10:00Z").await, none);
    assert_eq!(
        check(patched, "2026-07-11T06:10:00Z").await,
        none,
        "cron for `other` only"
    );
}
