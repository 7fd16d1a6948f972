//! Alert intake end to end against the real API and a real worker runtime: the Alertmanager
//! webhook (authentication, validation, payloads captured from every Alertmanager version in
//! tests/fixtures/alertmanager), episode de-duplication, auto_analyze rules, trigger matching into
//! executions (modes, cooldowns, server resolution), resolution cancelling approvals, the alert
//! API, a run on a real sshd, and a storm.

mod common;
mod sshd;

use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::{Value, json};

use common::TestApp;

async fn webhook_token(app: &TestApp) -> String {
    let (status, body) = app
        .call(
            Method::POST,
            "/webhook-tokens",
            Some(&app.admin_token),
            Some(json!({ "name": format!("am-{}", uuid::Uuid::new_v4().simple()) })),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    body["secret"].as_str().unwrap().to_owned()
}

async fn post(app: &TestApp, token: &str, payload: &Value) -> (u16, Value) {
    app.call(
        Method::POST,
        "/webhooks/alertmanager",
        Some(token),
        Some(payload.clone()),
    )
    .await
}

fn alert(name: &str, instance: &str, starts_at: &str, status: &str) -> Value {
    json!({
        "status": status,
        "labels": { "alertname": name, "instance": instance, "severity": "critical", "job": "node" },
        "annotations": { "summary": format!("{instance} is in trouble") },
        "startsAt": starts_at,
        "endsAt": if status == "resolved" { "2030-01-01T00:10:00Z" } else { "0001-01-01T00:00:00Z" },
        "generatorURL": "http://prometheus-0:9090/graph?g0.expr=up",
    })
}

fn payload(alerts: Vec<Value>) -> Value {
    let status = if alerts.iter().any(|a| a["status"] == "firing") {
        "firing"
    } else {
        "resolved"
    };
    json!({
        "version": "4", "groupKey": "{}:{alertname=\"X\"}", "truncatedAlerts": 0,
        "status": status, "receiver": "aiops", "groupLabels": {}, "commonLabels": {},
        "commonAnnotations": {}, "externalURL": "http://alertmanager:9093", "alerts": alerts,
    })
}

async fn alert_count(app: &TestApp) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM alerts")
        .fetch_one(&app.pool)
        .await
        .unwrap()
}

async fn alert_id(app: &TestApp, name: &str, instance: &str) -> uuid::Uuid {
    sqlx::query_scalar(
        "SELECT id FROM alerts WHERE alert_name = $1 AND instance = $2 ORDER BY starts_at DESC LIMIT 1",
    )
    .bind(name)
    .bind(instance)
    .fetch_one(&app.pool)
    .await
    .unwrap()
}

/// Polls an alert until `done(detail)` holds.
async fn wait_alert(
    app: &TestApp,
    id: uuid::Uuid,
    what: &str,
    done: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (status, body) = app.get(&format!("/alerts/{id}")).await;
        assert_eq!(status, 200, "{body}");
        if done(&body) {
            return body;
        }
        assert!(
            Instant::now() < deadline,
            "alert {id}: {what} not reached: {body}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn processed(app: &TestApp, id: uuid::Uuid) -> Value {
    wait_alert(app, id, "processed", |b| {
        b["alert"]["processed_at"].is_string()
    })
    .await
}

async fn server(app: &TestApp, name: &str, hostname: &str, tags: Value) -> uuid::Uuid {
    let (status, body) = app
        .call(
            Method::POST,
            "/servers",
            Some(&app.admin_token),
            Some(json!({
                "name": name, "hostname": hostname, "username": "root",
                "auth_type": "password", "password": "pw", "tags": tags,
            })),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    body["id"].as_str().unwrap().parse().unwrap()
}

#[tokio::test]
async fn webhook_authenticates_validates_and_stores_nothing_on_refusal() {
    let app = common::spawn_app().await;
    let token = webhook_token(&app).await;
    let good = payload(vec![alert(
        "NodeDown",
        "web-1:9100",
        "2030-01-01T00:00:00Z",
        "firing",
    )]);

    // No credentials, a wrong token, and a user's own bearer token are all refused.
    let resp = app
        .client
        .post(app.api("/webhooks/alertmanager"))
        .json(&good)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    assert_eq!(post(&app, "aiops_not-a-token", &good).await.0, 401);
    assert_eq!(post(&app, &app.admin_token, &good).await.0, 401);
    // Without a valid token a malformed payload is refused as unauthenticated, not described.
    let mut wrong_version = good.clone();
    wrong_version["version"] = json!("3");
    let (status, body) = post(&app, "aiops_not-a-token", &wrong_version).await;
    assert_eq!(status, 401, "{body}");
    assert!(!body.to_string().contains("version"), "{body}");
    assert_eq!(alert_count(&app).await, 0);
    let last_used: Option<chrono::DateTime<chrono::Utc>> =
        sqlx::query_scalar("SELECT max(last_used_at) FROM webhook_tokens")
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert!(last_used.is_none(), "refused requests used no token");

    // Malformed: not JSON, wrong version, bad status, no alertname, bad fingerprint.
    let resp = app
        .client
        .post(app.api("/webhooks/alertmanager"))
        .bearer_auth(&token)
        .header("content-type", "application/json")
        .body("{\"version\": \"4\", \"alerts\": [")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    let mut v3 = good.clone();
    v3["version"] = json!("3");
    let (status, body) = post(&app, &token, &v3).await;
    assert_eq!(
        (status, body["details"]["field"].clone()),
        (422, json!("version")),
        "{body}"
    );
    let mut bad_status = good.clone();
    bad_status["alerts"][0]["status"] = json!("exploding");
    let (status, body) = post(&app, &token, &bad_status).await;
    assert_eq!(status, 422);
    assert_eq!(body["details"]["field"], "alerts[0].status", "{body}");
    // An alert without any label, which Alertmanager itself refuses.
    let mut unlabelled = payload(vec![
        alert("Fine", "a:1", "2030-01-01T00:00:00Z", "firing"),
        alert("X", "b:1", "2030-01-01T00:00:00Z", "firing"),
    ]);
    unlabelled["alerts"][1]["labels"] = json!({});
    let (status, body) = post(&app, &token, &unlabelled).await;
    assert_eq!(status, 422);
    assert_eq!(body["details"]["field"], "alerts[1].labels", "{body}");
    let mut no_start = good.clone();
    no_start["alerts"][0]["startsAt"] = json!("yesterday");
    let (status, body) = post(&app, &token, &no_start).await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(body["details"]["field"], "alerts[0].startsAt", "{body}");
    // An end before the start, which Alertmanager itself never sends.
    let mut backwards = good.clone();
    backwards["alerts"][0]["startsAt"] = json!("2026-02-09T00:00:00Z");
    backwards["alerts"][0]["endsAt"] = json!("2026-02-08T00:00:00Z");
    let (status, body) = post(&app, &token, &backwards).await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(body["details"]["field"], "alerts[0].endsAt", "{body}");
    // RFC 3339 has four-digit years: a time whose UTC instant is in the year 10000 is refused.
    let mut far = good.clone();
    far["alerts"][0]["startsAt"] = json!("9999-12-31T23:59:59-23:59");
    let (status, body) = post(&app, &token, &far).await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(body["details"]["field"], "alerts[0].startsAt", "{body}");
    // PostgreSQL cannot keep a NUL character: refused by name, not failed in the database.
    let mut nul = good.clone();
    nul["alerts"][0]["labels"]["team"] = json!("ops\u{0}");
    let (status, body) = post(&app, &token, &nul).await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(body["details"]["field"], "alerts[0].labels.team", "{body}");
    let mut wrong_type = good.clone();
    wrong_type["alerts"] = json!("not a list");
    let (status, body) = post(&app, &token, &wrong_type).await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["details"]["field"], "alerts", "{body}");
    assert_eq!(
        body["details"]["reason"], "must be an array, not a string",
        "{body}"
    );
    // A caller whose token does not authenticate learns nothing about the payload, however
    // it is malformed, whether the token comes as bearer or as the basic-auth password.
    for malformed in [&wrong_type, &json!({ "version": 5 })] {
        let (status, body) = post(&app, "not-a-token", malformed).await;
        assert_eq!(status, 401, "{body}");
        let resp = app
            .client
            .post(app.api("/webhooks/alertmanager"))
            .basic_auth("alertmanager", Some("not-a-token"))
            .json(malformed)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 401);
    }
    // Oversized (the body limit is 1 MiB by default).
    let mut big = good.clone();
    big["alerts"][0]["annotations"]["description"] = json!("x".repeat(2 * 1024 * 1024));
    let (status, body) = post(&app, &token, &big).await;
    assert_eq!(status, 413, "{body}");
    assert_eq!(
        alert_count(&app).await,
        0,
        "a refused payload stored something"
    );

    // Bearer and basic auth (password = token) both work.
    let (status, body) = post(&app, &token, &good).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["created"], 1);
    let resp = app
        .client
        .post(app.api("/webhooks/alertmanager"))
        .basic_auth("alertmanager", Some(&token))
        .json(&good)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(
        (body["created"].clone(), body["updated"].clone()),
        (json!(0), json!(1))
    );

    // The same alert twice in one notification, at start times the database cannot tell
    // apart (below a microsecond, or a leap second and the next second): one episode, the
    // later entry wins.
    let twins = |first: &str, second: &str| {
        let mut a = alert("Twins", "web-9", first, "firing");
        // A sent fingerprint other than the labels' is not taken; the episode is the same.
        a["fingerprint"] = json!("aaaa000000000001");
        let mut b = a.clone();
        b["startsAt"] = json!(second);
        b["annotations"]["summary"] = json!("the later entry");
        payload(vec![a, b])
    };
    for (first, second) in [
        (
            "2026-12-01T10:00:00.000000100Z",
            "2026-12-01T10:00:00.000000200Z",
        ),
        ("2026-12-31T23:59:60Z", "2027-01-01T00:00:00Z"),
    ] {
        let (status, body) = post(&app, &token, &twins(first, second)).await;
        assert_eq!(status, 200, "{first} {second}: {body}");
        assert_eq!(body["created"], 1, "{body}");
    }
    let kept: Vec<(chrono::DateTime<chrono::Utc>, String)> = sqlx::query_as(
        "SELECT starts_at, annotations_json->>'summary' FROM alerts \
         WHERE alert_name = 'Twins' ORDER BY starts_at",
    )
    .fetch_all(&app.pool)
    .await
    .unwrap();
    assert_eq!(
        kept.iter()
            .map(|(t, s)| (t.to_rfc3339(), s.as_str()))
            .collect::<Vec<_>>(),
        [
            ("2026-12-01T10:00:00+00:00".to_owned(), "the later entry"),
            ("2027-01-01T00:00:00+00:00".to_owned(), "the later entry"),
        ]
    );

    // Accepted notifications record the token's use (in the intake statement itself).
    let used: i64 =
        sqlx::query_scalar("SELECT count(*) FROM webhook_tokens WHERE last_used_at IS NOT NULL")
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!(used, 1);

    // A revoked token stops working.
    let (_, page) = app.get("/webhook-tokens").await;
    assert_eq!(page["total"], 1, "{page}");
    let tokens = &page["items"];
    let id = tokens[0]["id"].as_str().unwrap();
    assert!(tokens[0].get("secret").is_none());
    let (status, _) = app
        .call(
            Method::DELETE,
            &format!("/webhook-tokens/{id}"),
            Some(&app.admin_token),
            None,
        )
        .await;
    assert_eq!(status, 204);
    assert_eq!(post(&app, &token, &good).await.0, 401);
    assert_eq!(app.audit_rows("webhook_token_revoke").await.len(), 1);
}

/// One Alertmanager version's captured notifications of the same scenario
/// (`scripts/capture-alertmanager-fixtures.sh`): web-1 and web-2 fire, then web-1 is resolved.
struct Captured {
    version: String,
    firing: Value,
    resolved: Value,
}

/// Every `<version>-firing.json` / `<version>-resolved.json` pair in tests/fixtures/alertmanager;
/// a file without its pair fails.
fn captured_versions() -> Vec<Captured> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/alertmanager");
    let read = |name: &str| -> Value {
        let text = std::fs::read_to_string(dir.join(name))
            .unwrap_or_else(|e| panic!("{name}: {e} (each capture is a firing and resolved pair)"));
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{name}: {e}"))
    };
    let mut versions: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter_map(|name| {
            name.strip_suffix("-firing.json")
                .or_else(|| name.strip_suffix("-resolved.json"))
                .map(str::to_owned)
        })
        .collect();
    versions.sort_by_key(|v| {
        v.split('.')
            .map(|n| n.parse::<u32>().unwrap_or(u32::MAX))
            .collect::<Vec<_>>()
    });
    versions.dedup();
    assert!(!versions.is_empty(), "no captured payloads in {dir:?}");
    versions
        .into_iter()
        .map(|version| Captured {
            firing: read(&format!("{version}-firing.json")),
            resolved: read(&format!("{version}-resolved.json")),
            version,
        })
        .collect()
}

/// The alert of a captured notification with this `instance` label.
fn captured_alert<'a>(payload: &'a Value, instance: &str) -> &'a Value {
    payload["alerts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["labels"]["instance"] == instance)
        .unwrap_or_else(|| panic!("no {instance} in {payload}"))
}

fn time_of(value: &Value) -> chrono::DateTime<chrono::Utc> {
    value.as_str().unwrap().parse().unwrap()
}

#[tokio::test]
async fn captured_payloads_deduplicate_by_episode_and_resolve() {
    let captured = captured_versions();
    eprintln!(
        "captured Alertmanager versions: {:?}",
        captured.iter().map(|c| &c.version).collect::<Vec<_>>()
    );
    for c in &captured {
        captured_version_deduplicates_and_resolves(c).await;
    }
}

/// The same assertions for every captured version, each against a fresh database.
async fn captured_version_deduplicates_and_resolves(c: &Captured) {
    let v = &c.version;
    let (firing, resolved) = (&c.firing, &c.resolved);
    // What was captured is the scenario: both fire, then web-1 of the same episode is resolved
    // while web-2 still fires. The fingerprints depend on the labels only, so every version
    // sends the same ones.
    let web1_firing = captured_alert(firing, "web-1:9100");
    let web1_resolved = captured_alert(resolved, "web-1:9100");
    assert_eq!(firing["alerts"].as_array().unwrap().len(), 2, "{v}");
    assert_eq!(
        (firing["status"].clone(), web1_firing["status"].clone()),
        (json!("firing"), json!("firing")),
        "{v}"
    );
    assert_eq!(
        (resolved["status"].clone(), web1_resolved["status"].clone()),
        (json!("firing"), json!("resolved")),
        "{v}"
    );
    assert_eq!(
        captured_alert(resolved, "web-2:9100")["status"],
        "firing",
        "{v}"
    );
    assert_eq!(web1_resolved["startsAt"], web1_firing["startsAt"], "{v}");
    assert_eq!(web1_firing["fingerprint"], "8b13b0fa2923a800", "{v}");
    assert_eq!(
        captured_alert(firing, "web-2:9100")["fingerprint"],
        "4f7dd0905e7b681f",
        "{v}"
    );
    // Alertmanager 0.32 and later say why they notified.
    for (payload, reason) in [
        (firing, "first notification"),
        (resolved, "some alerts resolved"),
    ] {
        if let Some(r) = payload.get("notification_reason") {
            assert_eq!(r, reason, "{v}");
        }
    }
    let starts = time_of(&web1_firing["startsAt"]);
    let ends = time_of(&web1_resolved["endsAt"]);
    assert!(starts < ends, "{v}: {starts} .. {ends}");

    let app = common::spawn_app().await;
    let token = webhook_token(&app).await;
    let (status, body) = post(&app, &token, firing).await;
    assert_eq!(status, 200, "{v}: {body}");
    assert_eq!(
        body,
        json!({"received": 2, "created": 2, "updated": 0, "resolved": 0, "queued": 2}),
        "{v}"
    );
    // Alertmanager's retries and repeat notifications update the same rows.
    for _ in 0..2 {
        let (_, body) = post(&app, &token, firing).await;
        assert_eq!(
            (body["created"].clone(), body["queued"].clone()),
            (json!(0), json!(0)),
            "{v}"
        );
    }
    // Without Alertmanager's fingerprints the computed ones are the same: same episodes.
    let mut unfingerprinted = firing.clone();
    for a in unfingerprinted["alerts"].as_array_mut().unwrap() {
        a.as_object_mut().unwrap().remove("fingerprint");
    }
    let (status, body) = post(&app, &token, &unfingerprinted).await;
    assert_eq!(
        (status, body["created"].clone(), body["updated"].clone()),
        (200, json!(0), json!(2)),
        "{v}: {body}"
    );
    assert_eq!(alert_count(&app).await, 2, "{v}");
    let (_, page) = app.get("/alerts?status=firing").await;
    assert_eq!(page["total"], 2, "{v}");
    let web1 = page["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["instance"] == "web-1:9100")
        .unwrap()
        .clone();
    assert_eq!(web1["receive_count"], 4, "{v}");
    assert_eq!(web1["fingerprint"], "8b13b0fa2923a800", "{v}");
    assert_eq!(web1["source"], "prometheus-0:9090", "{v}");
    assert_eq!(web1["annotations"]["summary"], "web-1 is down", "{v}");
    // Stored to the microsecond (PostgreSQL's precision); Alertmanager stamps nanoseconds.
    let stored = time_of(&web1["starts_at"]);
    assert!(
        (stored - starts).num_nanoseconds().unwrap().abs() < 1_000,
        "{v}: {stored} for {starts}"
    );
    assert!(
        web1.get("ends_at").is_none(),
        "{v}: the zero endsAt is no end: {web1}"
    );

    // The resolved notification marks web-1 resolved; web-2 still fires.
    let (_, body) = post(&app, &token, resolved).await;
    assert_eq!(
        (body["resolved"].clone(), body["queued"].clone()),
        (json!(1), json!(1)),
        "{v}"
    );
    let id: uuid::Uuid = web1["id"].as_str().unwrap().parse().unwrap();
    let (_, detail) = app.get(&format!("/alerts/{id}")).await;
    assert_eq!(detail["alert"]["status"], "resolved", "{v}");
    assert_eq!(time_of(&detail["alert"]["ends_at"]), ends, "{v}");
    assert_eq!(
        detail["raw"]["alert"]["endsAt"], web1_resolved["endsAt"],
        "{v}"
    );
    assert_eq!(
        detail["raw"]["alert"]["fingerprint"], "8b13b0fa2923a800",
        "{v}"
    );
    assert_eq!(detail["raw"]["receiver"], "aiops", "{v}");
    assert_eq!(
        detail["raw"].get("notification_reason"),
        resolved.get("notification_reason"),
        "{v}: the stored notification keeps the reason when there is one"
    );
    let (_, page) = app.get("/alerts?status=firing").await;
    assert_eq!(
        (page["total"].clone(), page["items"][0]["instance"].clone()),
        (json!(1), json!("web-2:9100")),
        "{v}"
    );
    // A late firing retry of the same episode does not un-resolve it.
    post(&app, &token, firing).await;
    let (_, detail) = app.get(&format!("/alerts/{id}")).await;
    assert_eq!(detail["alert"]["status"], "resolved", "{v}");
    assert_eq!(alert_count(&app).await, 2, "{v}");

    // The same labels firing again an hour later is a new episode.
    let rfc3339 =
        |t: chrono::DateTime<chrono::Utc>| t.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true);
    let mut again = firing.clone();
    let web1_index = again["alerts"]
        .as_array()
        .unwrap()
        .iter()
        .position(|a| a["labels"]["instance"] == "web-1:9100")
        .unwrap();
    again["alerts"][web1_index]["startsAt"] = json!(rfc3339(starts + chrono::Duration::hours(1)));
    let (_, body) = post(&app, &token, &again).await;
    assert_eq!(body["created"], 1, "{v}");
    assert_eq!(alert_count(&app).await, 3, "{v}");

    // Filters: name, severity, label, time range, pagination.
    let (_, page) = app
        .get("/alerts?name=NodeDown&severity=critical&label=instance%3Dweb-1%3A9100")
        .await;
    assert_eq!(page["total"], 2, "{v}: {page}");
    let (_, page) = app
        .get("/alerts?label=instance%3Dweb-1%3A9100&status=resolved")
        .await;
    assert_eq!(page["total"], 1, "{v}");
    // Every label filter must hold: one label asked for two values matches nothing.
    let (_, page) = app
        .get("/alerts?name=NodeDown&label=instance%3Dweb-1%3A9100&label=instance%3Dweb-1%3A9100")
        .await;
    assert_eq!(page["total"], 2, "{v}: {page}");
    let (_, page) = app
        .get("/alerts?label=instance%3Dweb-1%3A9100&label=instance%3Dother%3A9100")
        .await;
    assert_eq!(page["total"], 0, "{v}: {page}");
    let between = rfc3339(starts + chrono::Duration::minutes(30));
    let (_, page) = app.get(&format!("/alerts?since={between}")).await;
    assert_eq!(page["total"], 1, "{v}");
    let (_, page) = app
        .get(&format!("/alerts?until={between}&limit=1&offset=1"))
        .await;
    assert_eq!(
        (
            page["total"].clone(),
            page["items"].as_array().unwrap().len()
        ),
        (json!(2), 1),
        "{v}"
    );
    let (status, body) = app.get("/alerts?label=nonsense").await;
    assert_eq!(
        (status, body["details"]["field"].clone()),
        (422, json!("label[0]")),
        "{v}"
    );
}
#[tokio::test]
async fn rules_first_match_wins_and_auto_analyze_records_no_provider() {
    let app = common::spawn_app().await;
    let worker = common::TestWorker::start(&app.pool).await;
    let token = webhook_token(&app).await;
    let (_, engineer) = app.user_with_role("engineer").await;
    let rule = |name: &str, priority: i32, pattern: &str, severity: &str, action: &str| {
        json!({ "name": name, "priority": priority, "alert_name_pattern": pattern,
                "severity_pattern": severity, "action": action })
    };
    let mut ids = Vec::new();
    for body in [
        rule("broad", 50, "*", "*", "manual"),
        rule("db-critical", 10, "Postgres*", "crit*", "auto_analyze"),
        rule("watchdog", 5, "*Watchdog", "*", "ignore"),
    ] {
        let (status, created) = app
            .call(Method::POST, "/alert-rules", Some(&engineer), Some(body))
            .await;
        assert_eq!(status, 201, "{created}");
        ids.push(created["id"].as_str().unwrap().to_owned());
    }
    let (status, body) = app
        .call(
            Method::POST,
            "/alert-rules",
            Some(&engineer),
            Some(rule("bad", 1, "[oops", "*", "manual")),
        )
        .await;
    assert_eq!(
        (status, body["details"]["field"].clone()),
        (422, json!("alert_name_pattern"))
    );
    // An empty pattern is refused as the document declares it (minLength 1).
    for (pattern, severity, field) in [
        ("", "*", "alert_name_pattern"),
        ("*", "", "severity_pattern"),
    ] {
        let (status, body) = app
            .call(
                Method::POST,
                "/alert-rules",
                Some(&engineer),
                Some(rule("empty", 1, pattern, severity, "manual")),
            )
            .await;
        assert_eq!(status, 422, "{body}");
        assert_eq!(body["details"]["field"], field, "{body}");
        assert_eq!(body["details"]["reason"], "must not be empty", "{body}");
    }
    let (_, list) = app.get("/alert-rules").await;
    assert_eq!(list["total"], 3, "{list}");
    let names: Vec<&str> = list["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["watchdog", "db-critical", "broad"]);
    // A page of them, in the same order.
    let (_, page) = app.get("/alert-rules?limit=1&offset=1").await;
    assert_eq!(
        (
            page["total"].clone(),
            page["items"][0]["name"].clone(),
            page["items"].as_array().unwrap().len()
        ),
        (json!(3), json!("db-critical"), 1),
        "{page}"
    );

    let (status, _) = post(
        &app,
        &token,
        &payload(vec![
            alert(
                "PostgresDown",
                "db-1:9187",
                "2030-01-01T00:00:00Z",
                "firing",
            ),
            alert("Watchdog", "am:9093", "2030-01-01T00:00:00Z", "firing"),
            alert("DiskFull", "web-1:9100", "2030-01-01T00:00:00Z", "firing"),
            // The indexed column keeps 255 characters of the name; rules see all of it.
            alert(
                &format!("{}Watchdog", "L".repeat(290)),
                "am:9094",
                "2030-01-01T00:00:00Z",
                "firing",
            ),
        ]),
    )
    .await;
    assert_eq!(status, 200);
    let long = processed(&app, alert_id(&app, &"L".repeat(255), "am:9094").await).await;
    assert_eq!(long["alert"]["action_taken"], "ignore", "{long}");
    // The list finds it by its whole name.
    let (status, found) = app
        .get(&format!("/alerts?name={}Watchdog", "L".repeat(290)))
        .await;
    assert_eq!(status, 200, "{found}");
    assert_eq!(found["total"], 1, "{found}");
    let pg = processed(&app, alert_id(&app, "PostgresDown", "db-1:9187").await).await;
    assert_eq!(pg["alert"]["action_taken"], "auto_analyze");
    assert_eq!(pg["matched_rule"]["name"], "db-critical");
    let pg_id: uuid::Uuid = pg["alert"]["id"].as_str().unwrap().parse().unwrap();
    let pg = wait_alert(&app, pg_id, "analysis recorded", |b| {
        b["alert"]["analysis"]["status"] == "unavailable"
    })
    .await;
    assert_eq!(
        pg["alert"]["analysis"]["error"],
        "no LLM provider is configured"
    );
    assert_eq!(pg["alert"]["analysis"]["analyzed"], false);
    let dog = processed(&app, alert_id(&app, "Watchdog", "am:9093").await).await;
    assert_eq!(dog["alert"]["action_taken"], "ignore");
    assert_eq!(dog["match_outcome"]["decision"], "ignored");
    assert!(dog["alert"]["analysis"].get("status").is_none());
    let disk = processed(&app, alert_id(&app, "DiskFull", "web-1:9100").await).await;
    assert_eq!(disk["alert"]["action_taken"], "manual");
    assert_eq!(disk["match_outcome"]["decision"], "no_trigger_matched");

    // An analysis on request (operator), and rule update / delete.
    let (_, operator) = app.user_with_role("operator").await;
    let disk_id = disk["alert"]["id"].as_str().unwrap();
    let (status, body) = app
        .call(
            Method::POST,
            &format!("/alerts/{disk_id}/analysis"),
            Some(&operator),
            None,
        )
        .await;
    assert_eq!(
        (status, body["status"].clone()),
        (202, json!("queued")),
        "{body}"
    );
    wait_alert(&app, disk_id.parse().unwrap(), "analysis", |b| {
        b["alert"]["analysis"]["status"] == "unavailable"
    })
    .await;
    let (status, updated) = app
        .call(
            Method::PUT,
            &format!("/alert-rules/{}", ids[0]),
            Some(&engineer),
            Some(rule("broad", 50, "*", "*", "ignore")),
        )
        .await;
    assert_eq!((status, updated["action"].clone()), (200, json!("ignore")));
    let (status, _) = app
        .call(
            Method::DELETE,
            &format!("/alert-rules/{}", ids[1]),
            Some(&engineer),
            None,
        )
        .await;
    assert_eq!(status, 204);
    // The audit log says what each change did: the whole rule before and after an update,
    // and the whole rule a delete removed.
    let updated = app.audit_rows("alert_rule_update").await;
    assert_eq!(
        updated[0].3.clone().unwrap(),
        json!({
            "before": { "name": "broad", "priority": 50, "alert_name_pattern": "*",
                        "severity_pattern": "*", "action": "manual", "enabled": true },
            "after": { "name": "broad", "priority": 50, "alert_name_pattern": "*",
                       "severity_pattern": "*", "action": "ignore", "enabled": true },
        })
    );
    let deleted = app.audit_rows("alert_rule_delete").await;
    assert_eq!(
        deleted[0].3.clone().unwrap(),
        json!({ "name": "db-critical", "priority": 10, "alert_name_pattern": "Postgres*",
                "severity_pattern": "crit*", "action": "auto_analyze", "enabled": true })
    );
    assert_eq!(app.audit_rows("alert_rule_create").await.len(), 3);
    assert_eq!(app.audit_rows("alert_analyze").await.len(), 1);
    worker.stop().await;
}

const APPROVAL_RUNBOOK: &str = r#"
name: restart-node
mode: semi_auto
steps:
  - name: restart
    command: echo restarting {{ alert.labels.instance }}
triggers:
  - name: node-down
    alert_name_pattern: "re:Node(Down|Unreachable)"
    severity_pattern: "crit*"
    labels_match:
      job: node
    cooldown_seconds: 3600
"#;

#[tokio::test]
async fn triggers_create_executions_by_mode_and_resolution_cancels_the_approval() {
    let app = common::spawn_app().await;
    let worker = common::TestWorker::start(&app.pool).await;
    let token = webhook_token(&app).await;
    let runbook = app.runbook_from_yaml(APPROVAL_RUNBOOK).await;
    app.runbook_from_yaml(
        r#"
name: suggest-disk-cleanup
mode: manual
steps:
  - name: clean
    command: "true"
triggers:
  - name: disk
    alert_name_pattern: "Disk*"
"#,
    )
    .await;
    let web1 = server(&app, "web-1", "web-1.example.test", json!(["web"])).await;
    server(&app, "db-1", "db-1.example.test", json!(["db"])).await;

    // web-1 resolves by name ("web-1" is the server's name, not its hostname).
    post(
        &app,
        &token,
        &payload(vec![
            alert("NodeDown", "web-1:9100", "2030-01-01T00:00:00Z", "firing"),
            alert("DiskFull", "web-1:9100", "2030-01-01T00:00:00Z", "firing"),
            alert(
                "NodeDown",
                "unknown-host:9100",
                "2030-01-01T00:00:00Z",
                "firing",
            ),
        ]),
    )
    .await;
    let node = processed(&app, alert_id(&app, "NodeDown", "web-1:9100").await).await;
    assert_eq!(
        node["match_outcome"]["decision"], "execution_created",
        "{node}"
    );
    assert_eq!(
        node["match_outcome"]["matched_trigger"]["name"],
        "node-down"
    );
    let execution: uuid::Uuid = node["match_outcome"]["execution_id"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let waiting = app.wait_for_status(execution, &["pending"], 10).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (_, e) = app.get(&format!("/executions/{execution}")).await;
        if e["awaiting_approval"] == true {
            break;
        }
        assert!(Instant::now() < deadline, "never awaited approval: {e}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(waiting["server_id"], json!(web1));
    assert_eq!(waiting["alert_id"], node["alert"]["id"]);
    assert_eq!(waiting["runbook_id"], json!(runbook));
    let last: Option<chrono::DateTime<chrono::Utc>> =
        sqlx::query_scalar("SELECT last_triggered_at FROM runbook_triggers WHERE runbook_id = $1")
            .bind(runbook)
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert!(last.is_some(), "last_triggered_at not written");

    let disk = processed(&app, alert_id(&app, "DiskFull", "web-1:9100").await).await;
    assert_eq!(disk["match_outcome"]["decision"], "suggested");
    assert_eq!(
        disk["suggested_runbooks"][0]["runbook"],
        "suggest-disk-cleanup"
    );
    assert_eq!(disk["executions"], json!([]));

    let lost = processed(&app, alert_id(&app, "NodeDown", "unknown-host:9100").await).await;
    assert_eq!(lost["match_outcome"]["decision"], "no_server", "{lost}");
    assert!(
        lost["match_outcome"]["reason"]
            .as_str()
            .unwrap()
            .contains("`unknown-host`")
    );

    // A second episode inside the cooldown: recorded, not run.
    post(
        &app,
        &token,
        &payload(vec![alert(
            "NodeDown",
            "db-1:9100",
            "2030-01-01T00:05:00Z",
            "firing",
        )]),
    )
    .await;
    let cool = processed(&app, alert_id(&app, "NodeDown", "db-1:9100").await).await;
    assert_eq!(cool["match_outcome"]["decision"], "cooldown", "{cool}");
    assert_eq!(cool["executions"], json!([]));

    // web-1 resolves while its run waits for approval: the run is cancelled with the reason.
    post(
        &app,
        &token,
        &payload(vec![alert(
            "NodeDown",
            "web-1:9100",
            "2030-01-01T00:00:00Z",
            "resolved",
        )]),
    )
    .await;
    let done = app.wait_for_status(execution, &["cancelled"], 20).await;
    assert!(
        done["error_message"].as_str().unwrap().contains("resolved"),
        "{done}"
    );
    let node_id: uuid::Uuid = node["alert"]["id"].as_str().unwrap().parse().unwrap();
    let (_, detail) = app.get(&format!("/alerts/{node_id}")).await;
    assert_eq!(detail["alert"]["status"], "resolved");
    assert_eq!(detail["executions"][0]["status"], "cancelled");
    worker.stop().await;
}

#[tokio::test]
async fn per_instance_cooldown_and_allowed_servers_resolution() {
    let app = common::spawn_app().await;
    let worker = common::TestWorker::start(&app.pool).await;
    let token = webhook_token(&app).await;
    app.runbook_from_yaml(
        r#"
name: per-instance
mode: semi_auto
allowed_servers: ["pool"]
steps:
  - name: s
    command: "true"
triggers:
  - name: t
    alert_name_pattern: "HighLoad"
    cooldown_seconds: 3600
    cooldown_per_instance: true
"#,
    )
    .await;
    let a = server(&app, "pool-a", "10.0.0.1", json!(["pool"])).await;
    let b = server(&app, "pool-b", "10.0.0.2", json!(["pool"])).await;
    server(&app, "other", "10.0.0.3", json!(["other"])).await;
    post(
        &app,
        &token,
        &payload(vec![
            alert(
                "HighLoad",
                "10.0.0.1:9100",
                "2030-01-01T00:00:00Z",
                "firing",
            ),
            alert(
                "HighLoad",
                "10.0.0.2:9100",
                "2030-01-01T00:00:00Z",
                "firing",
            ),
            alert(
                "HighLoad",
                "10.0.0.3:9100",
                "2030-01-01T00:00:00Z",
                "firing",
            ),
        ]),
    )
    .await;
    let first = processed(&app, alert_id(&app, "HighLoad", "10.0.0.1:9100").await).await;
    assert_eq!(
        first["match_outcome"]["decision"], "execution_created",
        "{first}"
    );
    assert_eq!(first["match_outcome"]["server_id"], json!(a));
    assert_eq!(
        first["match_outcome"]["server_chosen_by"], "instance `10.0.0.1`",
        "{first}"
    );
    // The same instance fires again (a new episode): inside its own cooldown.
    post(
        &app,
        &token,
        &payload(vec![alert(
            "HighLoad",
            "10.0.0.1:9100",
            "2030-01-01T01:00:00Z",
            "firing",
        )]),
    )
    .await;
    let one = processed(&app, alert_id(&app, "HighLoad", "10.0.0.1:9100").await).await;
    assert_ne!(one["alert"]["id"], first["alert"]["id"]);
    assert_eq!(one["match_outcome"]["decision"], "cooldown", "{one}");
    let two = processed(&app, alert_id(&app, "HighLoad", "10.0.0.2:9100").await).await;
    assert_eq!(two["match_outcome"]["decision"], "execution_created");
    assert_eq!(two["match_outcome"]["server_id"], json!(b));
    let three = processed(&app, alert_id(&app, "HighLoad", "10.0.0.3:9100").await).await;
    assert_eq!(three["match_outcome"]["decision"], "no_server");
    assert!(
        three["match_outcome"]["reason"]
            .as_str()
            .unwrap()
            .contains("allowed_servers")
    );
    let cooldowns: i64 = sqlx::query_scalar("SELECT count(*) FROM trigger_cooldowns")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(cooldowns, 2);

    // No instance label: allowed_servers selecting exactly one server is used.
    app.runbook_from_yaml(
        r#"
name: only-other
mode: semi_auto
allowed_servers: ["other"]
steps:
  - name: s
    command: "true"
triggers:
  - name: t
    alert_name_pattern: "ClusterWide"
"#,
    )
    .await;
    let mut cluster = alert("ClusterWide", "", "2030-01-01T00:00:00Z", "firing");
    cluster["labels"]
        .as_object_mut()
        .unwrap()
        .remove("instance");
    post(&app, &token, &payload(vec![cluster])).await;
    let id: uuid::Uuid =
        sqlx::query_scalar("SELECT id FROM alerts WHERE alert_name = 'ClusterWide'")
            .fetch_one(&app.pool)
            .await
            .unwrap();
    let c = processed(&app, id).await;
    assert_eq!(c["match_outcome"]["decision"], "execution_created", "{c}");
    assert_eq!(c["match_outcome"]["server"], "other");
    // The outcome says the server came from allowed_servers, not from the alert.
    assert_eq!(
        c["match_outcome"]["server_chosen_by"],
        "the alert has no `instance` label: the only server the runbook's allowed_servers selects",
        "{c}"
    );
    worker.stop().await;
}

#[tokio::test]
async fn database_unavailable_answers_5xx_so_alertmanager_retries() {
    let app = common::spawn_app().await;
    let token = webhook_token(&app).await;
    app.pool.close().await;
    let (status, body) = post(
        &app,
        &token,
        &payload(vec![alert(
            "NodeDown",
            "web-1:9100",
            "2030-01-01T00:00:00Z",
            "firing",
        )]),
    )
    .await;
    assert!((500..600).contains(&status), "{status} {body}");
    assert_eq!(status, 503, "{body}");
}

/// Sends `notifications` (token, payload) at once while a transaction holds the alerts table,
/// so that the webhook's writers wait on the lock and every notification after the first ones
/// gathers behind them; then releases the table and returns each answer, in order.
async fn post_while_alerts_are_held(
    app: &TestApp,
    notifications: Vec<(String, Value)>,
) -> Vec<(u16, Value)> {
    let mut hold = app.pool.begin().await.unwrap();
    sqlx::query("LOCK TABLE alerts IN EXCLUSIVE MODE")
        .execute(&mut *hold)
        .await
        .unwrap();
    let tasks: Vec<_> = notifications
        .into_iter()
        .map(|(token, body)| {
            let client = app.client.clone();
            let url = app.api("/webhooks/alertmanager");
            tokio::spawn(async move {
                let resp = client
                    .post(url)
                    .bearer_auth(token)
                    .json(&body)
                    .send()
                    .await
                    .unwrap();
                let status = resp.status().as_u16();
                (status, resp.json::<Value>().await.unwrap_or(Value::Null))
            })
        })
        .collect();
    // Every request is in by then: the first writers wait on the lock, the rest queue.
    tokio::time::sleep(Duration::from_secs(1)).await;
    hold.commit().await.unwrap();
    let mut answers = Vec::new();
    for t in tasks {
        answers.push(t.await.unwrap());
    }
    answers
}

#[tokio::test]
async fn notifications_arriving_together_are_committed_together_and_each_answered() {
    let app = common::spawn_app().await;
    let token = webhook_token(&app).await;
    let one = |i: usize| {
        let mut p = payload(vec![alert(
            &format!("Group{i}"),
            &format!("web-{i}:9100"),
            "2030-01-01T00:00:00Z",
            "firing",
        )]);
        p["receiver"] = json!(format!("am-{i}"));
        p
    };
    let mut notifications: Vec<(String, Value)> =
        (0..30).map(|i| (token.clone(), one(i))).collect();
    // The same episode as notification 0, from another receiver: one row, counted twice.
    notifications.push((token.clone(), one(0)));
    // A wrong token among them: refused, and nothing of it stored.
    let mut stranger = one(99);
    stranger["receiver"] = json!("stranger");
    notifications.push(("aiops_not-a-token".to_owned(), stranger));

    let answers = post_while_alerts_are_held(&app, notifications).await;
    for (i, (status, body)) in answers.iter().enumerate().take(31) {
        assert_eq!(*status, 200, "notification {i}: {body}");
        assert_eq!(body["received"], 1, "notification {i}: {body}");
    }
    assert_eq!(answers[31].0, 401, "{}", answers[31].1);
    let created: i64 = answers[..31]
        .iter()
        .map(|(_, b)| b["created"].as_i64().unwrap())
        .sum();
    let updated: i64 = answers[..31]
        .iter()
        .map(|(_, b)| b["updated"].as_i64().unwrap())
        .sum();
    assert_eq!((created, updated), (30, 1));
    assert_eq!(
        answers[0].1["created"].as_i64().unwrap() + answers[30].1["created"].as_i64().unwrap(),
        1,
        "exactly one of the two notifications of episode 0 created it"
    );

    // Every alert carries its own notification's envelope.
    let rows: Vec<(String, String, i32)> = sqlx::query_as(
        "SELECT alert_name, receiver, receive_count FROM alerts ORDER BY alert_name",
    )
    .fetch_all(&app.pool)
    .await
    .unwrap();
    assert_eq!(rows.len(), 30, "{rows:?}");
    for (name, receiver, count) in &rows {
        let i: usize = name.trim_start_matches("Group").parse().unwrap();
        assert_eq!(*count, if i == 0 { 2 } else { 1 }, "{name}");
        if i != 0 {
            assert_eq!(receiver, &format!("am-{i}"), "{name}");
        }
    }
    // Each new episode is queued for processing exactly once, and the notifications that
    // waited were stored together: fewer processing jobs than notifications.
    let (jobs, queued): (i64, i64) = sqlx::query_as(
        "SELECT count(*), sum(jsonb_array_length(payload->'alert_ids'))::int8 FROM jobs \
         WHERE kind = 'alert.process'",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(queued, 30);
    assert!(
        jobs < 10,
        "{jobs} processing jobs for 30 notifications: not grouped"
    );
}

#[tokio::test]
async fn a_notification_the_database_refuses_fails_alone_in_its_group() {
    let app = common::spawn_app().await;
    let token = webhook_token(&app).await;
    // A database-side refusal no validation foresees (a trigger of this test database).
    sqlx::raw_sql(
        "CREATE FUNCTION refuse_poison() RETURNS trigger LANGUAGE plpgsql AS $$ \
         BEGIN IF NEW.alert_name = 'Poison' THEN RAISE EXCEPTION 'poisoned alert'; END IF; \
         RETURN NEW; END $$; \
         CREATE TRIGGER refuse_poison BEFORE INSERT ON alerts \
           FOR EACH ROW EXECUTE FUNCTION refuse_poison();",
    )
    .execute(&app.pool)
    .await
    .unwrap();
    let one = |name: &str, i: usize| {
        payload(vec![alert(
            name,
            &format!("web-{i}:9100"),
            "2030-01-01T00:00:00Z",
            "firing",
        )])
    };
    let mut notifications: Vec<(String, Value)> = (0..12)
        .map(|i| (token.clone(), one("Healthy", i)))
        .collect();
    notifications.insert(6, (token.clone(), one("Poison", 6)));

    let answers = post_while_alerts_are_held(&app, notifications).await;
    for (i, (status, body)) in answers.iter().enumerate() {
        if i == 6 {
            assert_eq!(*status, 500, "the refused notification: {body}");
        } else {
            assert_eq!(*status, 200, "notification {i}: {body}");
            assert_eq!(body["created"], 1, "notification {i}: {body}");
        }
    }
    let names: Vec<String> = sqlx::query_scalar("SELECT DISTINCT alert_name FROM alerts")
        .fetch_all(&app.pool)
        .await
        .unwrap();
    assert_eq!(names, vec!["Healthy".to_owned()]);
    assert_eq!(alert_count(&app).await, 12);
    let queued: i64 = sqlx::query_scalar(
        "SELECT sum(jsonb_array_length(payload->'alert_ids'))::int8 FROM jobs \
         WHERE kind = 'alert.process'",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(queued, 12);
}

/// Fires one alert through the webhook and waits until it is processed into an execution;
/// returns the execution's id.
async fn fire_into_execution(app: &TestApp, token: &str, name: &str, instance: &str) -> uuid::Uuid {
    post(
        app,
        token,
        &payload(vec![alert(
            name,
            instance,
            "2030-01-01T00:00:00Z",
            "firing",
        )]),
    )
    .await;
    let node = processed(app, alert_id(app, name, instance).await).await;
    assert_eq!(
        node["match_outcome"]["decision"], "execution_created",
        "{node}"
    );
    node["match_outcome"]["execution_id"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap()
}

/// A worker that polls only once a minute starts an alert's run well within that minute: the
/// processing job wakes the workers for the start job it enqueued, after its commit.
#[tokio::test]
async fn an_alert_started_run_wakes_an_idle_worker_before_its_poll() {
    let app = common::spawn_app().await;
    let poll = Duration::from_secs(60);
    let worker = common::TestWorker::start_adjusted(&app.pool, |o| {
        o.queue.poll_interval = poll;
        o.queue.maintenance_interval = poll;
    })
    .await;
    let bound = 15;
    assert!(Duration::from_secs(bound) < poll / 2);
    let token = webhook_token(&app).await;
    server(&app, "woken", "10.9.0.1", json!([])).await;
    app.runbook_from_yaml(
        r#"
name: woken-by-alert
mode: auto
steps:
  - name: s
    command: "true"
triggers:
  - name: any
    alert_name_pattern: "Woken*"
"#,
    )
    .await;
    // The worker's first claim found nothing; it now waits for a wake-up or its poll.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let sent = Instant::now();
    let execution = fire_into_execution(&app, &token, "WokenUp", "10.9.0.1:9100").await;
    // The start job ran: its gates passed and the step was attempted (this worker has no SSH
    // executor for the server, so the run may fail; it must not still be pending).
    let started = app
        .wait_for_status(
            execution,
            &["running", "completed", "failed", "cancelled", "timeout"],
            bound,
        )
        .await;
    assert!(started["started_at"].is_string(), "{started}");
    assert!(
        sent.elapsed() < Duration::from_secs(bound),
        "{:?}",
        sent.elapsed()
    );
    worker.stop().await;
}

#[tokio::test]
async fn alert_run_executes_on_a_real_server_over_ssh_with_alert_context() {
    let sshd = sshd::sshd();
    let app = common::spawn_app().await;
    let worker = common::TestWorker::start_ssh(&app.pool, &app.config).await;
    let token = webhook_token(&app).await;
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
name: report-over-ssh
mode: auto
steps:
  - name: report
    command: echo {{ alert.name }} {{ alert.severity }} {{ alert.labels.instance }} {{ alert.annotations.summary }} {{ alert.source }} {{ alert.instance }} {{ alert.alertname }}
    capture_output: true
triggers:
  - name: any-node
    alert_name_pattern: "Node*"
"#,
    )
    .await;
    let execution = fire_into_execution(&app, &token, "NodeDown", "127.0.0.1:9100").await;
    let done = app.wait_for_status(execution, common::FINISHED, 60).await;
    assert_eq!(done["status"], "completed", "{done}");
    let steps = app.steps(execution).await;
    assert_eq!(
        steps[0]["stdout"],
        "NodeDown critical 127.0.0.1:9100 127.0.0.1:9100 is in trouble prometheus-0:9090 \
         127.0.0.1:9100 NodeDown\n"
    );
    worker.stop().await;
}

/// 10,000 firing alerts in a burst: every one stored, only what the cooldown allows starts, and
/// the API answers meanwhile (latency printed, not asserted).
#[tokio::test]
async fn storm_of_ten_thousand_alerts() {
    let app = common::spawn_app().await;
    let worker = common::TestWorker::start(&app.pool).await;
    let token = webhook_token(&app).await;
    app.runbook_from_yaml(
        r#"
name: storm-guard
mode: semi_auto
rate_limit_count: 5
rate_limit_window_seconds: 3600
steps:
  - name: s
    command: "true"
triggers:
  - name: per-instance
    alert_name_pattern: "Storm*"
    cooldown_seconds: 3600
    cooldown_per_instance: true
"#,
    )
    .await;
    // 20 servers: the 10,000 alerts come from 20 instances, so the per-instance cooldown allows
    // exactly 20 runs.
    for i in 0..20 {
        server(
            &app,
            &format!("storm-{i}"),
            &format!("10.1.0.{i}"),
            json!([]),
        )
        .await;
    }
    let payloads: Vec<Value> = (0..100)
        .map(|p| {
            payload(
                (0..100)
                    .map(|i| {
                        let n = p * 100 + i;
                        let mut a = alert(
                            &format!("Storm{}", n % 7),
                            &format!("10.1.0.{}:9100", n % 20),
                            "2030-01-01T00:00:00Z",
                            "firing",
                        );
                        a["labels"]["shard"] = json!(n.to_string());
                        a
                    })
                    .collect(),
            )
        })
        .collect();
    let started = Instant::now();
    let sender = {
        let client = app.client.clone();
        let url = app.api("/webhooks/alertmanager");
        let token = token.clone();
        tokio::spawn(async move {
            futures_util::future::join_all(payloads.into_iter().map(|p| {
                let client = client.clone();
                let url = url.clone();
                let token = token.clone();
                async move {
                    client
                        .post(url)
                        .bearer_auth(token)
                        .json(&p)
                        .send()
                        .await
                        .unwrap()
                        .status()
                        .as_u16()
                }
            }))
            .await
        })
    };
    let mut latencies = Vec::new();
    while !sender.is_finished() {
        let t = Instant::now();
        let (status, _) = app.get("/alerts?limit=10").await;
        assert_eq!(status, 200);
        latencies.push(t.elapsed());
    }
    let statuses = sender.await.unwrap();
    let ingest = started.elapsed();
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    assert_eq!(alert_count(&app).await, 10_000);

    let deadline = Instant::now() + Duration::from_secs(300);
    let mut processing_latencies = Vec::new();
    loop {
        let unprocessed: i64 =
            sqlx::query_scalar("SELECT count(*) FROM alerts WHERE processed_at IS NULL")
                .fetch_one(&app.pool)
                .await
                .unwrap();
        if unprocessed == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{unprocessed} alerts still unprocessed"
        );
        let t = Instant::now();
        let (status, _) = app.get("/alerts?status=firing&limit=10").await;
        assert_eq!(status, 200);
        processing_latencies.push(t.elapsed());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let processed_in = started.elapsed();
    let executions: i64 = sqlx::query_scalar("SELECT count(*) FROM runbook_executions")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(
        executions, 20,
        "per-instance cooldown lets exactly one run per instance"
    );
    let decisions: Vec<(String, i64)> = sqlx::query_as(
        "SELECT match_outcome->>'decision', count(*) FROM alerts GROUP BY 1 ORDER BY 1",
    )
    .fetch_all(&app.pool)
    .await
    .unwrap();
    assert_eq!(
        decisions,
        vec![
            ("cooldown".to_owned(), 9_980),
            ("execution_created".to_owned(), 20)
        ]
    );
    let summary = |mut l: Vec<Duration>| {
        if l.is_empty() {
            return "n=0".to_owned();
        }
        l.sort();
        let pct = |p: f64| l[((l.len() - 1) as f64 * p) as usize];
        format!(
            "n={} p50={:?} p99={:?} max={:?}",
            l.len(),
            pct(0.5),
            pct(0.99),
            l[l.len() - 1]
        )
    };
    println!(
        "storm: 10000 alerts in 100 concurrent payloads stored in {ingest:?}, all processed \
         after {processed_in:?}; GET /alerts while posting: {}; while processing: {}",
        summary(latencies),
        summary(processing_latencies),
    );
    worker.stop().await;
}

/// Matching configuration is cached by workers: every change made through the API (trigger
/// patterns and runbook mode on re-import, auto_analyze rules, servers) applies to the alerts
/// that arrive after it commits, with the same worker that cached the earlier configuration.
#[tokio::test]
async fn changes_to_rules_triggers_and_servers_apply_to_the_next_alert() {
    let app = common::spawn_app().await;
    let worker = common::TestWorker::start(&app.pool).await;
    let token = webhook_token(&app).await;
    let runbook = |mode: &str, pattern: &str| {
        format!(
            "name: follow-changes\nmode: {mode}\nsteps:\n  - name: s\n    command: \"true\"\n\
             triggers:\n  - name: t\n    alert_name_pattern: \"{pattern}\"\n"
        )
    };
    let mut n = 0;
    let mut next = async |app: &TestApp, name: &str| {
        n += 1;
        let starts = format!("2030-01-01T00:{n:02}:00Z");
        let (status, body) = post(
            app,
            &token,
            &payload(vec![alert(name, "late-1:9100", &starts, "firing")]),
        )
        .await;
        assert_eq!(status, 200, "{body}");
        processed(app, alert_id(app, name, "late-1:9100").await).await
    };

    let id = app.runbook_from_yaml(&runbook("manual", "Flap*")).await;
    let a = next(&app, "FlapA").await;
    assert_eq!(a["match_outcome"]["decision"], "suggested", "{a}");

    // The trigger's pattern changes: the next alert no longer matches.
    assert_eq!(
        app.runbook_from_yaml(&runbook("manual", "Other*")).await,
        id
    );
    let b = next(&app, "FlapB").await;
    assert_eq!(b["match_outcome"]["decision"], "no_trigger_matched", "{b}");

    // A new ignore rule stops the next alert; deleting it lets the one after through.
    let (status, rule) = app
        .call(
            Method::POST,
            "/alert-rules",
            Some(&app.admin_token),
            Some(
                json!({ "name": "quiet", "priority": 1, "alert_name_pattern": "Flap*",
                         "severity_pattern": "*", "action": "ignore" }),
            ),
        )
        .await;
    assert_eq!(status, 201, "{rule}");
    let c = next(&app, "FlapC").await;
    assert_eq!(c["match_outcome"]["decision"], "ignored", "{c}");
    let (status, _) = app
        .call(
            Method::DELETE,
            &format!("/alert-rules/{}", rule["id"].as_str().unwrap()),
            Some(&app.admin_token),
            None,
        )
        .await;
    assert_eq!(status, 204);
    let d = next(&app, "FlapD").await;
    assert_eq!(d["match_outcome"]["decision"], "no_trigger_matched", "{d}");
    assert_eq!(d["match_outcome"]["rule"], Value::Null, "{d}");

    // Back to matching, now semi_auto: no server called late-1 yet, then one is added.
    app.runbook_from_yaml(&runbook("semi_auto", "Flap*")).await;
    let e = next(&app, "FlapE").await;
    assert_eq!(e["match_outcome"]["decision"], "no_server", "{e}");
    let late = server(&app, "late-1", "late-1.example.test", json!([])).await;
    let f = next(&app, "FlapF").await;
    assert_eq!(f["match_outcome"]["decision"], "execution_created", "{f}");
    assert_eq!(f["match_outcome"]["server_id"], json!(late));
    worker.stop().await;
}

/// Trigger time windows are read in the `alerts.timezone` setting (UTC when unset).
#[tokio::test]
async fn trigger_time_windows_follow_the_configured_timezone() {
    let app = common::spawn_app().await;
    let worker = common::TestWorker::start(&app.pool).await;
    let token = webhook_token(&app).await;
    // A two-hour window around the wall-clock time in Kiritimati (UTC+14): 14 hours away from
    // the time of day in UTC, so it is open there and closed in UTC.
    let tz: chrono_tz::Tz = "Pacific/Kiritimati".parse().unwrap();
    let local = chrono::Utc::now().with_timezone(&tz);
    let start = (local - chrono::Duration::hours(1)).format("%H:%M");
    let end = (local + chrono::Duration::hours(1)).format("%H:%M");
    app.runbook_from_yaml(&format!(
        "name: kiritimati-hours\nmode: manual\nsteps:\n  - name: s\n    command: \"true\"\n\
         triggers:\n  - name: t\n    alert_name_pattern: \"Window*\"\n    \
         time_window_start: \"{start}\"\n    time_window_end: \"{end}\"\n"
    ))
    .await;
    let fire = async |name: &str| {
        let (status, body) = post(
            &app,
            &token,
            &payload(vec![alert(
                name,
                "w:9100",
                "2030-01-01T00:00:00Z",
                "firing",
            )]),
        )
        .await;
        assert_eq!(status, 200, "{body}");
        processed(&app, alert_id(&app, name, "w:9100").await).await
    };

    let utc = fire("WindowUtc").await;
    assert_eq!(
        utc["match_outcome"]["decision"], "no_trigger_matched",
        "{utc}"
    );
    let reasons = utc["match_outcome"]["triggers"][0]["reasons"].to_string();
    assert!(
        reasons.contains("UTC is outside the time window"),
        "{reasons}"
    );

    let (status, body) = app
        .call(
            Method::PUT,
            "/system-config/alerts.timezone",
            Some(&app.admin_token),
            Some(json!({ "value": "Pacific/Kiritimati" })),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let there = fire("WindowKiritimati").await;
    assert_eq!(there["match_outcome"]["decision"], "suggested", "{there}");

    // The API refuses a name that is not an IANA timezone, and keeps the setting it had.
    for value in [json!("Mars/Olympus_Mons"), json!(14)] {
        let (status, body) = app
            .call(
                Method::PUT,
                "/system-config/alerts.timezone",
                Some(&app.admin_token),
                Some(json!({ "value": value })),
            )
            .await;
        assert_eq!(status, 422, "{body}");
        assert_eq!(body["details"]["field"], "value", "{body}");
    }
    // The same key written another way would be stored and never read: refused.
    for key in ["ALERTS.TIMEZONE", "alerts_timezone", "Alerts-Timezone"] {
        let (status, body) = app
            .call(
                Method::PUT,
                &format!("/system-config/{key}"),
                Some(&app.admin_token),
                Some(json!({ "value": "UTC" })),
            )
            .await;
        assert_eq!(status, 422, "{key}: {body}");
        assert_eq!(body["details"]["field"], "key", "{body}");
    }
    let (_, kept) = app.get("/system-config/alerts.timezone").await;
    assert_eq!(kept["value"], "Pacific/Kiritimati", "{kept}");
    // One that stopped being valid (written before, or dropped from the timezone database):
    // UTC, with a note saying so.
    sqlx::query("UPDATE system_config SET value_json = '\"Mars/Olympus_Mons\"' WHERE key = $1")
        .bind("alerts.timezone")
        .execute(&app.pool)
        .await
        .unwrap();
    let bad = fire("WindowBadZone").await;
    assert_eq!(
        bad["match_outcome"]["decision"], "no_trigger_matched",
        "{bad}"
    );
    assert!(
        bad["match_outcome"]["note"]
            .as_str()
            .unwrap()
            .contains("`Mars/Olympus_Mons` is not an IANA timezone"),
        "{bad}"
    );
    worker.stop().await;
}

/// Alertmanager resends a notification answered 5xx forever: a receiver name longer than its
/// column is kept to 255 characters (the raw notification keeps it whole), not refused.
#[tokio::test]
async fn a_long_receiver_name_is_kept_to_its_column() {
    let app = common::spawn_app().await;
    let token = webhook_token(&app).await;
    let mut body = payload(vec![alert(
        "LongReceiver",
        "web-1:9100",
        "2030-01-01T00:00:00Z",
        "firing",
    )]);
    body["receiver"] = json!("r".repeat(300));
    let (status, receipt) = post(&app, &token, &body).await;
    assert_eq!(status, 200, "{receipt}");
    let (receiver, raw): (String, Value) = sqlx::query_as(
        "SELECT receiver, raw_alert_json FROM alerts WHERE alert_name = 'LongReceiver'",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(receiver, "r".repeat(255));
    assert_eq!(raw["receiver"], "r".repeat(300), "{raw}");
}

/// A trigger's cooldown counts runs, not refusals: a run a blackout refused does not keep the
/// next alert (after the blackout) from starting the runbook, for a trigger-wide cooldown and
/// for a per-instance one; a run that did run does.
#[tokio::test]
async fn a_run_refused_by_a_gate_does_not_spend_the_cooldown() {
    let app = common::spawn_app().await;
    let worker = common::TestWorker::start(&app.pool).await;
    let token = webhook_token(&app).await;
    server(&app, "web-1", "10.0.0.1", json!([])).await;
    for (name, per_instance) in [("Frozen", false), ("FrozenInstance", true)] {
        app.runbook_from_yaml(&format!(
            "name: fix-{}\ncategory: frozen\nmode: auto\nsteps:\n  - {{name: s, command: 'true'}}\n\
             triggers:\n  - name: t\n    alert_name_pattern: \"{name}\"\n    cooldown_seconds: 3600\n    \
             cooldown_per_instance: {per_instance}\n",
            name.to_lowercase()
        ))
        .await;
    }
    let window = app
        .blackout_now(
            "freeze",
            json!({ "affected_runbooks": { "categories": ["frozen"] } }),
        )
        .await;
    let fire = |name: &'static str, starts_at: &'static str| {
        let (app, token) = (&app, &token);
        async move {
            post(
                app,
                token,
                &payload(vec![alert(name, "10.0.0.1:9100", starts_at, "firing")]),
            )
            .await;
            processed(app, alert_id(app, name, "10.0.0.1:9100").await).await
        }
    };
    for name in ["Frozen", "FrozenInstance"] {
        let first = fire(name, "2030-01-01T00:00:00Z").await;
        assert_eq!(
            first["match_outcome"]["decision"], "execution_created",
            "{first}"
        );
        let id = first["match_outcome"]["execution_id"]
            .as_str()
            .unwrap()
            .parse()
            .unwrap();
        let refused = app.wait_for_status(id, common::FINISHED, 30).await;
        assert_eq!(refused["refused_by"], "blackout", "{refused}");
    }
    let (status, _) = app
        .call(
            Method::DELETE,
            &format!("/blackout-windows/{}", window["id"].as_str().unwrap()),
            Some(&app.admin_token),
            None,
        )
        .await;
    assert_eq!(status, 204);
    for name in ["Frozen", "FrozenInstance"] {
        let second = fire(name, "2030-01-01T01:00:00Z").await;
        assert_eq!(
            second["match_outcome"]["decision"], "execution_created",
            "{name}: {second}"
        );
        let id = second["match_outcome"]["execution_id"]
            .as_str()
            .unwrap()
            .parse()
            .unwrap();
        // It ran (and failed: this worker has no SSH executor for the server).
        let done = app.wait_for_status(id, common::FINISHED, 30).await;
        assert!(
            done["refused_by"].is_null() && done["started_at"].is_string(),
            "{done}"
        );
        // That one ran: the next episode is inside the cooldown.
        let third = fire(name, "2030-01-01T02:00:00Z").await;
        assert_eq!(
            third["match_outcome"]["decision"], "cooldown",
            "{name}: {third}"
        );
    }
    worker.stop().await;
}

/// An `instance` label longer than the cooldown key's column counts under its digest: the
/// alert is processed (before, its job failed on every attempt and the alerts after it in the
/// notification were never processed), and a gate's refusal gives that key back.
#[tokio::test]
async fn a_per_instance_cooldown_takes_an_instance_longer_than_its_column() {
    let app = common::spawn_app().await;
    let worker = common::TestWorker::start(&app.pool).await;
    let token = webhook_token(&app).await;
    server(&app, "solo", "10.9.0.1", json!(["solo"])).await;
    app.runbook_from_yaml(
        "name: long-instances\ncategory: frozen\nmode: auto\nallowed_servers: [solo]\n\
         steps:\n  - {name: s, command: 'true'}\n\
         triggers:\n  - name: t\n    alert_name_pattern: LongInstance\n    cooldown_seconds: 3600\n    \
         cooldown_per_instance: true\n",
    )
    .await;
    let long_a = format!("a{}", "g".repeat(300));
    let long_b = format!("b{}", "g".repeat(300));
    let stored = |instance: &str| instance.chars().take(255).collect::<String>();
    let fire = |instances: Vec<&str>, starts_at: &'static str| {
        let (app, token) = (&app, &token);
        let instances: Vec<String> = instances.into_iter().map(str::to_owned).collect();
        async move {
            let alerts = instances
                .iter()
                .map(|i| alert("LongInstance", i, starts_at, "firing"))
                .collect();
            let (status, body) = post(app, token, &payload(alerts)).await;
            assert_eq!(status, 200, "{body}");
            let mut outcomes = Vec::new();
            for instance in &instances {
                let id = alert_id(app, "LongInstance", &stored(instance)).await;
                outcomes.push(processed(app, id).await["match_outcome"].clone());
            }
            outcomes
        }
    };
    let keys = || async {
        sqlx::query_scalar::<_, String>("SELECT instance_key FROM trigger_cooldowns ORDER BY 1")
            .fetch_all(&app.pool)
            .await
            .unwrap()
    };

    // A refused run gives its instance's cooldown back: the key computed in SQL is the same.
    let window = app
        .blackout_now(
            "freeze",
            json!({ "affected_runbooks": { "categories": ["frozen"] } }),
        )
        .await;
    let outcome = fire(vec![&long_a], "2030-01-01T00:00:00Z").await.remove(0);
    assert_eq!(outcome["decision"], "execution_created", "{outcome}");
    let id = outcome["execution_id"].as_str().unwrap().parse().unwrap();
    let refused = app.wait_for_status(id, common::FINISHED, 30).await;
    assert_eq!(refused["refused_by"], "blackout", "{refused}");
    assert!(keys().await.is_empty(), "{:?}", keys().await);
    let (status, _) = app
        .call(
            Method::DELETE,
            &format!("/blackout-windows/{}", window["id"].as_str().unwrap()),
            Some(&app.admin_token),
            None,
        )
        .await;
    assert_eq!(status, 204);

    // Two long instances and a short one in one notification: each its own cooldown.
    let outcomes = fire(
        vec![&long_a, &long_b, "10.9.0.1:9100"],
        "2030-01-01T01:00:00Z",
    )
    .await;
    for outcome in &outcomes {
        assert_eq!(outcome["decision"], "execution_created", "{outcome}");
    }
    let stored_keys = keys().await;
    assert_eq!(stored_keys.len(), 3, "{stored_keys:?}");
    assert!(stored_keys.contains(&"10.9.0.1:9100".to_owned()));
    assert_eq!(
        stored_keys
            .iter()
            .filter(|k| k.starts_with("sha256:"))
            .count(),
        2,
        "{stored_keys:?}"
    );
    // The next episode of a long instance is inside its cooldown.
    let again = fire(vec![&long_b], "2030-01-01T02:00:00Z").await.remove(0);
    assert_eq!(again["decision"], "cooldown", "{again}");
    worker.stop().await;
}

/// Alertmanager takes an alert without `alertname` (it needs one label only): it is stored with
/// an empty name, and the alerts grouped with it are not refused with it.
#[tokio::test]
async fn an_alert_without_alertname_is_stored_with_its_group() {
    let app = common::spawn_app().await;
    let token = webhook_token(&app).await;
    let mut group = payload(vec![
        alert(
            "SrvNoName",
            "grp-host:9100",
            "2030-01-01T00:00:00Z",
            "firing",
        ),
        alert("X", "grp-host:9100", "2030-01-01T00:00:00Z", "firing"),
    ]);
    group["alerts"][1]["labels"]
        .as_object_mut()
        .unwrap()
        .remove("alertname");
    let (status, body) = post(&app, &token, &group).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["created"], 2, "{body}");
    let names: Vec<String> =
        sqlx::query_scalar("SELECT alert_name FROM alerts ORDER BY alert_name")
            .fetch_all(&app.pool)
            .await
            .unwrap();
    assert_eq!(names, ["", "SrvNoName"]);
}

/// A notification is looked at only for a valid token: one with a wrong token gets 401 and
/// writes nothing to the log, whatever its alerts say; with the right token, alerts whose sent
/// fingerprint differs from their labels' are logged in one line.
#[tokio::test]
async fn only_an_authenticated_notification_is_logged() {
    let app = common::spawn_app().await;
    let token = webhook_token(&app).await;
    let marker = format!("forged-{}", uuid::Uuid::new_v4().simple());
    let alerts: Vec<Value> = (0..50)
        .map(|i| {
            let mut a = alert(
                "Forged",
                &format!("web-{i}:9100"),
                "2030-01-01T00:00:00Z",
                "firing",
            );
            a["fingerprint"] = json!(marker);
            a
        })
        .collect();
    let (status, body) = post(&app, "aiops_not-a-token", &payload(alerts.clone())).await;
    assert_eq!(status, 401, "{body}");
    assert!(!common::logged().contains(&marker), "{}", common::logged());
    let (status, body) = post(&app, &token, &payload(alerts)).await;
    assert_eq!(status, 200, "{body}");
    let lines: Vec<String> = common::logged()
        .lines()
        .filter(|l| l.contains(&marker))
        .map(str::to_owned)
        .collect();
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(lines[0].contains("alerts=50"), "{lines:?}");
}

/// An alert is stored under the fingerprint of its labels: a notification naming another
/// episode's fingerprint with other labels makes an episode of its own, and the first keeps
/// the labels its triggers matched.
#[tokio::test]
async fn a_sent_fingerprint_never_moves_an_alert_into_another_episode() {
    let app = common::spawn_app().await;
    let token = webhook_token(&app).await;
    let with_service = |service: &str| {
        let mut a = alert("SvcDown", "web-1:9100", "2030-01-01T00:00:00Z", "firing");
        a["labels"]["service"] = json!(service);
        a
    };
    let (status, body) = post(&app, &token, &payload(vec![with_service("nginx")])).await;
    assert_eq!(status, 200, "{body}");
    let id = alert_id(&app, "SvcDown", "web-1:9100").await;
    let (_, first) = app.get(&format!("/alerts/{id}")).await;
    let fingerprint = first["alert"]["fingerprint"].clone();

    let mut forged = with_service("sshd");
    forged["fingerprint"] = fingerprint.clone();
    let (status, body) = post(&app, &token, &payload(vec![forged])).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["created"], 1, "{body}");
    let (_, after) = app.get(&format!("/alerts/{id}")).await;
    assert_eq!(after["alert"]["labels"]["service"], "nginx", "{after}");
    assert_eq!(after["alert"]["receive_count"], 1, "{after}");
    let fingerprints: Vec<String> = sqlx::query_scalar(
        "SELECT fingerprint FROM alerts WHERE alert_name = 'SvcDown' ORDER BY labels_json->>'service'",
    )
    .fetch_all(&app.pool)
    .await
    .unwrap();
    assert_eq!(fingerprints.len(), 2, "{fingerprints:?}");
    assert_eq!(json!(fingerprints[0]), fingerprint, "nginx keeps its own");
    assert_ne!(
        json!(fingerprints[1]),
        fingerprint,
        "sshd gets the one of its labels"
    );
}
