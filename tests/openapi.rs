//! The API is a contract: the committed `openapi/aiops.json` must equal what the code emits.
//!
//! Regenerate after an intended API change with
//! `cargo run -q -- openapi > openapi/aiops.json` (or run this test with `UPDATE_OPENAPI=1`).

use serde_json::Value;

const COMMITTED: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/openapi/aiops.json");

#[test]
fn committed_spec_matches_the_code() {
    let emitted = aiops::api::spec_json();
    if std::env::var_os("UPDATE_OPENAPI").is_some() {
        std::fs::write(COMMITTED, &emitted).unwrap();
    }
    let committed = std::fs::read_to_string(COMMITTED).unwrap_or_default();
    assert!(
        committed == emitted,
        "openapi/aiops.json differs from the spec the code emits; review the change and run \
         `cargo run -q -- openapi > openapi/aiops.json`"
    );
}

#[test]
fn operation_ids_are_noun_verb_and_errors_are_declared() {
    let spec: Value = serde_json::from_str(&aiops::api::spec_json()).unwrap();
    let mut problems = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for (path, item) in spec["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            let id = op["operationId"].as_str().unwrap_or("");
            let parts: Vec<&str> = id.split('_').collect();
            if parts.len() < 2
                || parts
                    .iter()
                    .any(|p| p.is_empty() || !p.chars().all(|c| c.is_ascii_lowercase()))
            {
                problems.push(format!(
                    "{method} {path}: operationId `{id}` is not noun_verb"
                ));
            }
            if !seen.insert(id.to_owned()) {
                problems.push(format!("duplicate operationId {id}"));
            }
            let responses = op["responses"].as_object().unwrap();
            let public = op["security"].is_null();
            let takes_input = op.get("requestBody").is_some()
                || op["parameters"].as_array().is_some_and(|p| !p.is_empty());
            let mut needed = Vec::new();
            if takes_input {
                needed.extend(["400", "422"]);
            }
            if !public {
                needed.extend(["401", "403"]);
            }
            if path.contains('{') {
                needed.push("404");
            }
            if op.get("requestBody").is_some() {
                needed.extend(["413", "415"]);
            }
            // Page bounds are part of the contract, so generated clients can check them.
            for param in op["parameters"].as_array().into_iter().flatten() {
                let bounds = (&param["schema"]["minimum"], &param["schema"]["maximum"]);
                let expected = match param["name"].as_str() {
                    Some("limit") => (Value::from(1.0), Value::from(500.0)),
                    Some("offset") => (Value::from(0.0), Value::Null),
                    _ => continue,
                };
                if (bounds.0, bounds.1) != (&expected.0, &expected.1) {
                    problems.push(format!(
                        "{id}: {} declares bounds {bounds:?}",
                        param["name"]
                    ));
                }
            }
            for code in needed {
                if !responses.contains_key(code) {
                    problems.push(format!("{id}: response {code} not declared"));
                }
            }
            for (code, resp) in responses {
                if code.starts_with('4') || code.starts_with('5') {
                    let schema = &resp["content"]["application/json; charset=utf-8"]["schema"];
                    if schema["$ref"] != "#/components/schemas/ErrorBody" {
                        problems.push(format!("{id}: {code} does not use ErrorBody"));
                    }
                }
            }
        }
    }
    // Optional properties must not be required, so generated clients accept absent fields.
    for (name, schema) in spec["components"]["schemas"].as_object().unwrap() {
        let required: Vec<&str> = schema["required"]
            .as_array()
            .map(|r| r.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        if let Some(props) = schema["properties"].as_object() {
            for req in &required {
                if !props.contains_key(*req) {
                    problems.push(format!("{name}: required `{req}` is not a property"));
                }
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}
