//! The RBAC matrix: every operation in the OpenAPI document, called with no token and with a
//! token of every role, answers 401 / 403 / allowed exactly as its "Least role:" line says, and
//! with a body that does not fit, 403 to a role below it and 400 to the rest.
//!
//! The operations come from the spec the code emits, so a new endpoint is covered the moment it
//! exists; one without a "Least role:" line, or with a request body but no sample in `BODIES`,
//! fails this test.

mod common;

use std::collections::HashMap;

use aiops::domain::Role;
use serde_json::{Value, json};

/// A request body that parses for each operation that takes one. Refused roles must get 403
/// with it; allowed roles anything but 401/403 (201, 404, 409, 422 are all fine).
const BODIES: &[(&str, &str)] = &[
    (
        "server_create",
        r#"{"name": "rbac-server", "hostname": "127.0.0.1", "username": "root", "auth_type": "password", "password": "pw"}"#,
    ),
    ("server_update", r#"{"environment": "staging"}"#),
    (
        "auth_login",
        r#"{"username": "nobody", "password": "wrong-password"}"#,
    ),
    ("token_create", r#"{"name": "rbac"}"#),
    (
        "user_create",
        r#"{"username": "rbac-made", "email": "rbac@example.test", "password": "long-enough-password", "role": "viewer"}"#,
    ),
    ("user_update", r#"{"full_name": "Renamed"}"#),
    ("config_put", r#"{"value": {"enabled": true}}"#),
    (
        "execution_create",
        r#"{"runbook_id": "00000000-0000-0000-0000-000000000001", "servers": {"tags": ["role=web"]}}"#,
    ),
    ("execution_cancel", r#"{"reason": "rbac"}"#),
    ("execution_reject", r#"{"reason": "rbac"}"#),
    (
        "runbook_create",
        r#"{"name": "rbac-runbook", "steps": [{"name": "s", "command": "true"}], "triggers": [{"name": "t", "alert_name_pattern": "Node*"}]}"#,
    ),
    (
        "runbook_update",
        r#"{"name": "rbac-runbook", "steps": [{"name": "s", "command": "true"}]}"#,
    ),
    (
        "runbook_import",
        r#"{"yaml": "name: rbac-import\nsteps:\n  - {name: s, command: 'true'}\n"}"#,
    ),
    (
        "runbook_validate",
        r#"{"yaml": "name: rbac-validate\nsteps:\n  - {name: s, command: 'true'}\n"}"#,
    ),
    (
        "runbook_dry_run",
        r#"{"yaml": "name: rbac-dry\nsteps:\n  - {name: s, command: 'true'}\n", "alert": {"name": "NodeDown"}, "server": {"hostname": "web-1"}}"#,
    ),
    ("breaker_update", r#"{"failure_threshold": 3}"#),
    (
        "blackout_create",
        r#"{"name": "rbac", "start_time": "2030-01-01T00:00:00Z", "end_time": "2030-01-01T01:00:00Z", "recurrence": "daily", "recurrence_pattern": {"timezone": "UTC"}, "affected_servers": {"tags": ["role=db"]}, "affected_runbooks": {"categories": ["disk"]}}"#,
    ),
    (
        "blackout_update",
        r#"{"name": "rbac", "start_time": "2030-01-01T00:00:00Z", "end_time": "2030-01-01T01:00:00Z"}"#,
    ),
    (
        "alertmanager_webhook_receive",
        r#"{"version": "4", "status": "firing", "receiver": "aiops", "alerts": [{"status": "firing", "labels": {"alertname": "RbacProbe"}, "startsAt": "2030-01-01T00:00:00Z"}]}"#,
    ),
    ("webhook_token_create", r#"{"name": "rbac-alertmanager"}"#),
    (
        "alert_rule_create",
        r#"{"name": "rbac-rule", "alert_name_pattern": "Node*", "action": "manual"}"#,
    ),
    (
        "alert_rule_update",
        r#"{"name": "rbac-rule", "action": "ignore"}"#,
    ),
];

struct Operation {
    id: String,
    method: reqwest::Method,
    path: String,
    least: Option<Role>,
    body: Option<Value>,
    /// The query parameters the document says the operation requires.
    required_query: Vec<String>,
}

fn operations(spec: &Value) -> Vec<Operation> {
    let bodies: HashMap<&str, &str> = BODIES.iter().copied().collect();
    let mut out = Vec::new();
    let mut problems = Vec::new();
    for (path, item) in spec["paths"].as_object().expect("paths") {
        for (method, op) in item.as_object().expect("path item") {
            let id = op["operationId"].as_str().unwrap_or("<none>").to_owned();
            let text = format!(
                "{} {}",
                op["summary"].as_str().unwrap_or(""),
                op["description"].as_str().unwrap_or("")
            );
            let least = match text.split("Least role:").nth(1).map(|rest| {
                rest.trim_start()
                    .split(|c: char| !c.is_ascii_alphabetic())
                    .next()
                    .unwrap_or("")
                    .to_owned()
            }) {
                Some(name) if name == "none" => None,
                Some(name) => match name.parse::<Role>() {
                    Ok(role) => Some(role),
                    Err(_) => {
                        problems.push(format!("{id}: unknown least role `{name}`"));
                        continue;
                    }
                },
                None => {
                    problems.push(format!("{id}: no `Least role:` line in its description"));
                    continue;
                }
            };
            let mut concrete = String::new();
            for segment in path.split('/') {
                if segment.starts_with('{') {
                    let name = segment.trim_matches(['{', '}']);
                    let format = op["parameters"]
                        .as_array()
                        .and_then(|ps| ps.iter().find(|p| p["name"] == name))
                        .map(|p| p["schema"]["format"].as_str().unwrap_or("").to_owned())
                        .unwrap_or_default();
                    if format == "uuid" {
                        concrete.push_str(&uuid::Uuid::new_v4().to_string());
                    } else if format.starts_with("int") {
                        concrete.push_str("987654321");
                    } else {
                        concrete.push_str("rbac-probe");
                    }
                } else {
                    concrete.push_str(segment);
                }
                concrete.push('/');
            }
            concrete.pop();
            let body = if op.get("requestBody").is_some() {
                match bodies.get(id.as_str()) {
                    Some(b) => Some(serde_json::from_str(b).expect("BODIES entries are JSON")),
                    None => {
                        problems.push(format!("{id}: takes a body but has no entry in BODIES"));
                        continue;
                    }
                }
            } else {
                None
            };
            let required_query = op["parameters"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|p| p["in"] == "query" && p["required"] == json!(true))
                .filter_map(|p| p["name"].as_str().map(str::to_owned))
                .collect();
            out.push(Operation {
                id,
                method: method.to_uppercase().parse().expect("HTTP method"),
                path: concrete,
                least,
                body,
                required_query,
            });
        }
    }
    assert!(
        problems.is_empty(),
        "spec problems:\n{}",
        problems.join("\n")
    );
    out
}

#[tokio::test]
async fn every_operation_enforces_its_least_role() {
    let app = common::spawn_app().await;
    let spec: Value = serde_json::from_str(&aiops::api::spec_json()).unwrap();
    let ops = operations(&spec);
    assert!(ops.len() >= 15, "only {} operations found", ops.len());

    let mut users = HashMap::new();
    for role in Role::ALL {
        let (id, _) = app.user_with_role(role.as_str()).await;
        users.insert(role, id);
    }

    let mut failures = Vec::new();
    let mut checked = 0;
    for op in &ops {
        let Some(least) = op.least else {
            continue;
        };
        let (status, body) = app
            .call(op.method.clone(), &op.path, None, op.body.clone())
            .await;
        checked += 1;
        // Said as a bad token is told.
        if status != 401 || body["message"] != "missing, invalid, expired or revoked token" {
            failures.push(format!("{} without a token: {status} {body}", op.id));
        }
        for role in Role::ALL {
            // A fresh token per call, so operations such as logout cannot affect the next one.
            let token = app.mint_token(users[&role]).await;
            let (status, body) = app
                .call(op.method.clone(), &op.path, Some(&token), op.body.clone())
                .await;
            checked += 1;
            let allowed = role.allows(least);
            let ok = if allowed {
                status != 401 && status != 403 && status < 500
            } else {
                status == 403 && body["code"] == json!("forbidden")
            };
            if !ok {
                failures.push(format!(
                    "{} {} as {role} (least {least}, expected {}): {status} {body}",
                    op.method,
                    op.id,
                    if allowed { "allowed" } else { "403" }
                ));
            }
            // A body that does not fit: the role is judged first (403), then the input (400),
            // though the operation reads its body before it authorizes.
            if op.body.is_some() {
                let (status, body) = app
                    .call(op.method.clone(), &op.path, Some(&token), Some(json!([])))
                    .await;
                checked += 1;
                let ok = if allowed {
                    status == 400 && body["code"] == json!("bad_request")
                } else {
                    status == 403 && body["code"] == json!("forbidden")
                };
                if !ok {
                    failures.push(format!(
                        "{} {} with a body that does not fit as {role} (least {least}, \
                         expected {}): {status} {body}",
                        op.method,
                        op.id,
                        if allowed { "400" } else { "403" }
                    ));
                }
            }
        }
    }
    assert!(
        failures.is_empty(),
        "RBAC mismatches:\n{}",
        failures.join("\n")
    );
    assert!(checked > 60, "only {checked} calls checked");
}

/// What the document says a request may leave out, it may: every operation called by the admin
/// with a body that parses and no query string answers 400 naming the first query parameter the
/// document requires, and never 400 when it requires none (a generated client must not be made
/// to send what the server does not need, nor be let to omit what it does).
#[tokio::test]
async fn query_parameters_are_required_exactly_as_documented() {
    let app = common::spawn_app().await;
    let spec: Value = serde_json::from_str(&aiops::api::spec_json()).unwrap();
    let mut failures = Vec::new();
    let mut required = 0;
    for op in operations(&spec) {
        let token = app.mint_token(app.admin_id).await;
        let (status, body) = app
            .call(op.method.clone(), &op.path, Some(&token), op.body.clone())
            .await;
        match op.required_query.first() {
            Some(name) => {
                required += 1;
                if status != 400 || body["details"]["field"] != json!(name) {
                    failures.push(format!(
                        "{} without its required `{name}`: {status} {body}",
                        op.id
                    ));
                }
            }
            None if status == 400 => {
                failures.push(format!("{} without a query string: 400 {body}", op.id));
            }
            None => {}
        }
    }
    assert!(
        failures.is_empty(),
        "query parameters not required as documented:\n{}",
        failures.join("\n")
    );
    assert!(required > 0, "no operation requires a query parameter");
}

#[tokio::test]
async fn public_operations_are_only_version_and_login() {
    let spec: Value = serde_json::from_str(&aiops::api::spec_json()).unwrap();
    let public: Vec<String> = operations(&spec)
        .into_iter()
        .filter(|op| op.least.is_none())
        .map(|op| op.id)
        .collect();
    // Anything public must be deliberately listed here.
    let allowed = ["version_get", "auth_login", "alertmanager_webhook_receive"];
    for id in &public {
        assert!(
            allowed.contains(&id.as_str()),
            "{id} is public but not on the allow list"
        );
    }
    assert!(public.contains(&"auth_login".to_owned()));
}

/// The field every object of a request body gets in [`request_objects_refuse_fields_as_documented`].
const EXTRA: &str = "zz_not_a_field";

/// A component schema, through `$ref` and poem-openapi's `allOf: [{$ref}, {description}]`
/// wrapper, with its component name when it has one.
fn resolve<'a>(spec: &'a Value, mut schema: &'a Value) -> (Option<String>, &'a Value) {
    let mut name = None;
    loop {
        if let Some(r) = schema["$ref"].as_str() {
            let component = r.trim_start_matches("#/components/schemas/");
            name = Some(component.to_owned());
            schema = &spec["components"]["schemas"][component];
        } else if let Some(first) = schema["allOf"].as_array().and_then(|a| a.first()) {
            schema = first;
        } else {
            return (name, schema);
        }
    }
}

/// An object of a request body: its JSON pointer, its path as error bodies name fields
/// (`steps[0]`), its component name and its schema.
type BodyObject<'a> = (String, String, Option<String>, &'a Value);

/// Every object in `value` that its schema describes as an object.
fn objects<'a>(
    spec: &'a Value,
    schema: &'a Value,
    value: &Value,
    pointer: String,
    path: String,
    out: &mut Vec<BodyObject<'a>>,
) {
    let (name, schema) = resolve(spec, schema);
    match value {
        // Maps (`additionalProperties: {schema}`) take any key by design.
        Value::Object(fields)
            if schema["type"] == "object" && !schema["additionalProperties"].is_object() =>
        {
            out.push((pointer.clone(), path.clone(), name, schema));
            for (key, field) in fields {
                if let Some(property) = schema["properties"].get(key) {
                    let sub = if path.is_empty() {
                        key.clone()
                    } else {
                        format!("{path}.{key}")
                    };
                    objects(spec, property, field, format!("{pointer}/{key}"), sub, out);
                }
            }
        }
        Value::Array(items) if schema["type"] == "array" => {
            for (i, item) in items.iter().enumerate() {
                let sub = format!("{path}[{i}]");
                objects(
                    spec,
                    &schema["items"],
                    item,
                    format!("{pointer}/{i}"),
                    sub,
                    out,
                );
            }
        }
        _ => {}
    }
}

/// The JSON schema of an operation's request body.
fn body_schema<'a>(spec: &'a Value, op: &Operation) -> &'a Value {
    let item = &spec["paths"]
        .as_object()
        .unwrap()
        .iter()
        .find(|(_, item)| {
            item.as_object()
                .unwrap()
                .values()
                .any(|o| o["operationId"] == op.id.as_str())
        })
        .unwrap()
        .1;
    let operation = &item[op.method.as_str().to_ascii_lowercase()];
    let content = operation["requestBody"]["content"].as_object().unwrap();
    &content
        .iter()
        .find(|(kind, _)| kind.starts_with("application/json"))
        .unwrap()
        .1["schema"]
}

/// Every object of an operation's sample body.
fn body_objects<'a>(spec: &'a Value, op: &Operation, body: &Value) -> Vec<BodyObject<'a>> {
    let mut found = Vec::new();
    objects(
        spec,
        body_schema(spec, op),
        body,
        String::new(),
        String::new(),
        &mut found,
    );
    found
}

/// Calls `op` with its sample `body` where the object at `(pointer, path)` has field `key` set
/// to `value`; returns the answer and the field's path as error bodies name it.
async fn call_with_field(
    app: &common::TestApp,
    op: &Operation,
    token: &str,
    body: &Value,
    (pointer, path): (&str, &str),
    key: &str,
    value: Value,
) -> (u16, Value, String) {
    let mut sent = body.clone();
    sent.pointer_mut(pointer)
        .and_then(Value::as_object_mut)
        .unwrap()
        .insert(key.to_owned(), value);
    let (status, answer) = app
        .call(op.method.clone(), &op.path, Some(token), Some(sent))
        .await;
    let field = if path.is_empty() {
        key.to_owned()
    } else {
        format!("{path}.{key}")
    };
    (status, answer, field)
}

/// A new Alertmanager webhook token.
async fn webhook_token(app: &common::TestApp, name: &str) -> String {
    let (status, created) = app
        .call(
            reqwest::Method::POST,
            "/webhook-tokens",
            Some(&app.admin_token),
            Some(json!({ "name": name })),
        )
        .await;
    assert_eq!(status, 201, "{created}");
    created["secret"].as_str().unwrap().to_owned()
}

/// The token an operation is called with: the webhook's for the webhook, the admin's otherwise.
fn token_for<'a>(app: &'a common::TestApp, op: &Operation, webhook_token: &'a str) -> &'a str {
    if op.id == "alertmanager_webhook_receive" {
        webhook_token
    } else {
        app.admin_token.as_str()
    }
}

/// The document says which request objects refuse fields they do not declare
/// (`additionalProperties: false`), and the API does exactly that: every object of every
/// operation's sample body, given one extra field, is refused with 400 naming it where the
/// document closes the object, and taken where it leaves it open (the Alertmanager payload).
/// Every closed object of the document is reached by some sample.
#[tokio::test]
async fn request_objects_refuse_fields_as_documented() {
    let app = common::spawn_app().await;
    let spec: Value = serde_json::from_str(&aiops::api::spec_json()).unwrap();
    let webhook_token = webhook_token(&app, "fields-probe").await;

    let mut reached = std::collections::BTreeSet::new();
    let mut failures = Vec::new();
    for op in operations(&spec) {
        let Some(body) = &op.body else { continue };
        let found = body_objects(&spec, &op, body);
        assert!(!found.is_empty(), "{}: no object in its body", op.id);
        let token = token_for(&app, &op, &webhook_token);
        for (pointer, path, name, _) in found {
            let name = name.unwrap_or_else(|| panic!("{}: {path:?} is an inline object", op.id));
            let closed = spec["components"]["schemas"][&name]["additionalProperties"] == false;
            let (status, answer, field) =
                call_with_field(&app, &op, token, body, (&pointer, &path), EXTRA, json!(1)).await;
            let refused = status == 400
                && answer["details"]["field"] == field.as_str()
                && answer["details"]["reason"] == "is not a known field";
            if closed {
                reached.insert(name.clone());
            }
            if refused != closed || (!closed && !(200..300).contains(&status)) {
                failures.push(format!(
                    "{} {field} ({name}, documented {}): {status} {answer}",
                    op.id,
                    if closed { "closed" } else { "open" }
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    let documented: std::collections::BTreeSet<String> = spec["components"]["schemas"]
        .as_object()
        .unwrap()
        .iter()
        .filter(|(_, s)| s["additionalProperties"] == false)
        .map(|(name, _)| name.clone())
        .collect();
    let missed: Vec<_> = documented.difference(&reached).collect();
    assert!(missed.is_empty(), "no sample body reaches {missed:?}");
}

/// Whether a property's schema lets it be `null` (poem-openapi puts `nullable` beside a `$ref`
/// in an `allOf` wrapper).
fn nullable(property: &Value) -> bool {
    property["nullable"] == true
        || property["allOf"]
            .as_array()
            .is_some_and(|parts| parts.iter().any(|p| p["nullable"] == true))
}

/// What the document says about `null`, the API does: every optional property of every object
/// of every operation's sample body, sent as `null`, is refused with 422 naming it and saying it
/// must not be null exactly where the document does not declare it `nullable` (a partial
/// update's field that cannot be cleared), and taken (as absent, or as clearing it) where it
/// does.
#[tokio::test]
async fn optional_fields_take_null_exactly_as_documented() {
    let app = common::spawn_app().await;
    let spec: Value = serde_json::from_str(&aiops::api::spec_json()).unwrap();
    let webhook_token = webhook_token(&app, "null-probe").await;
    let mut failures = Vec::new();
    let (mut refused_seen, mut taken_seen) = (0, 0);
    for op in operations(&spec) {
        let Some(body) = &op.body else { continue };
        let found = body_objects(&spec, &op, body);
        let token = token_for(&app, &op, &webhook_token);
        for (pointer, path, _, object_schema) in found {
            let required: Vec<&str> = object_schema["required"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .collect();
            for (name, property) in object_schema["properties"].as_object().unwrap() {
                if required.contains(&name.as_str()) {
                    continue;
                }
                let (status, answer, field) =
                    call_with_field(&app, &op, token, body, (&pointer, &path), name, Value::Null)
                        .await;
                let refused = status == 422
                    && answer["details"]["field"] == field.as_str()
                    && answer["details"]["reason"]
                        .as_str()
                        .is_some_and(|r| r.contains("must not be null"));
                let documented = nullable(property);
                if refused {
                    refused_seen += 1;
                } else {
                    taken_seen += 1;
                }
                if refused == documented || (documented && (status == 400 || status >= 500)) {
                    failures.push(format!(
                        "{} {field} (documented {}): {status} {answer}",
                        op.id,
                        if documented {
                            "nullable"
                        } else {
                            "not nullable"
                        }
                    ));
                }
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    // Both kinds occur: partial updates refuse null for fields that cannot be cleared.
    assert!(
        refused_seen > 0 && taken_seen > 0,
        "{refused_seen} {taken_seen}"
    );
}

/// A query parameter an operation does not declare is refused with 400 naming it and what the
/// operation takes, before the operation runs (a mistyped filter must not come back as an
/// unfiltered list, nor a mutation run with an option it ignored), by every operation except
/// the Alertmanager webhook, which takes an alert whatever its URL carries.
#[tokio::test]
async fn undeclared_query_parameters_are_refused_except_by_the_webhook() {
    let app = common::spawn_app().await;
    let spec: Value = serde_json::from_str(&aiops::api::spec_json()).unwrap();
    let webhook = webhook_token(&app, "query-probe").await;
    let mut failures = Vec::new();
    for op in operations(&spec) {
        let token = token_for(&app, &op, &webhook);
        let path = format!("{}?limit=5&stauts=failed", op.path);
        let (status, body) = app
            .call(op.method.clone(), &path, Some(token), op.body.clone())
            .await;
        let declared: Vec<&str> = spec["paths"]
            .as_object()
            .unwrap()
            .values()
            .flat_map(|item| item.as_object().unwrap().values())
            .find(|o| o["operationId"] == json!(op.id))
            .and_then(|o| o["parameters"].as_array())
            .into_iter()
            .flatten()
            .filter(|p| p["in"] == "query")
            .filter_map(|p| p["name"].as_str())
            .collect();
        // `limit` is the first undeclared one where the operation does not page.
        let expected = if declared.contains(&"limit") {
            "stauts"
        } else {
            "limit"
        };
        let named = body["details"]["field"] == json!(expected)
            && body["message"]
                .as_str()
                .is_some_and(|m| m.contains("is not a query parameter"));
        if op.id == "alertmanager_webhook_receive" {
            if !(200..300).contains(&status) {
                failures.push(format!("{} refused its alert: {status} {body}", op.id));
            }
        } else if status != 400 || !named {
            failures.push(format!(
                "{} with ?{}: {status} {body}",
                op.id,
                &path[op.path.len() + 1..]
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "undeclared query parameters not refused as they should be:\n{}",
        failures.join("\n")
    );
    // Declared ones still work.
    let (status, body) = app
        .call(
            reqwest::Method::GET,
            "/executions?status=completed&limit=5",
            Some(&app.admin_token),
            None,
        )
        .await;
    assert_eq!(status, 200, "{body}");
    // One that takes a single value, given twice, is refused rather than half read; a list
    // parameter repeats.
    for path in [
        "/executions?status=completed&status=failed",
        "/servers?limit=1&limit=2",
        "/queue/jobs?state=completed&state=running",
    ] {
        let (status, body) = app
            .call(reqwest::Method::GET, path, Some(&app.admin_token), None)
            .await;
        assert_eq!(status, 400, "{path}: {body}");
        assert!(
            body["details"]["reason"]
                .as_str()
                .is_some_and(|r| r.contains("more than once")),
            "{path}: {body}"
        );
    }
    let (status, body) = app
        .call(
            reqwest::Method::GET,
            "/servers?tag=a&tag=b",
            Some(&app.admin_token),
            None,
        )
        .await;
    assert_eq!(status, 200, "{body}");
}

/// A body over the size limit is answered 413 only to a caller who may call the operation: no
/// token, a wrong one or a role below the operation's hears 401 or 403 first.
#[tokio::test]
async fn an_oversized_body_is_refused_for_its_size_only_to_a_permitted_caller() {
    let app = common::spawn_app().await;
    let (_, viewer) = app.user_with_role("viewer").await;
    let big = json!({ "username": "x".repeat(2 * 1024 * 1024) });
    let send = |token: Option<String>, path: &'static str| {
        let app = &app;
        let big = big.clone();
        async move {
            let mut req = app.client.post(app.api(path)).json(&big);
            if let Some(t) = token {
                req = req.bearer_auth(t);
            }
            req.send().await.unwrap().status().as_u16()
        }
    };
    assert_eq!(send(None, "/users").await, 401);
    assert_eq!(
        send(Some("aiops_not-a-token".to_owned()), "/users").await,
        401
    );
    assert_eq!(send(Some(viewer), "/users").await, 403);
    assert_eq!(send(Some(app.admin_token.clone()), "/users").await, 413);
    // The Alertmanager webhook, with its own tokens.
    assert_eq!(send(None, "/webhooks/alertmanager").await, 401);
    assert_eq!(
        send(
            Some("not-a-webhook-token".to_owned()),
            "/webhooks/alertmanager"
        )
        .await,
        401
    );
}
