//! The OpenAPI document as it is served, shown in Swagger UI and committed: poem-openapi's, plus
//! what poem-openapi enforces but does not write.
//!
//! Request objects refuse fields they do not declare (`#[oai(deny_unknown_fields)]`, so a typo
//! such as `affected_servers.tag` is an error, not a silently empty selector). poem-openapi
//! does not put that in the document, so generated clients and checkers would take extra fields
//! as allowed. Here every object schema a request body reaches gets `additionalProperties:
//! false`, except the Alertmanager payload's, which take the fields newer Alertmanagers add.
//! `tests/rbac.rs` sends every operation's body with an extra field at every object and checks
//! that the answer matches what the document says.

use std::borrow::Cow;
use std::collections::BTreeSet;

use poem_openapi::types::Type;
use serde_json::Value;

/// Request schemas that take fields they do not declare.
pub fn open_request_objects() -> [Cow<'static, str>; 2] {
    [
        super::webhook::AlertmanagerPayload::name(),
        super::webhook::AlertmanagerAlert::name(),
    ]
}

/// `spec` (poem-openapi's pretty JSON) with `additionalProperties: false` on every closed
/// request object. The text is edited rather than re-serialized, so the document keeps
/// poem-openapi's order of paths and keys.
pub fn complete(spec: &str) -> String {
    let Ok(parsed) = serde_json::from_str::<Value>(spec) else {
        return spec.to_owned();
    };
    let closed = closed_request_objects(&parsed);
    let mut out = String::with_capacity(spec.len() + closed.len() * 40);
    let mut in_schemas = false;
    for line in spec.split_inclusive('\n') {
        out.push_str(line);
        // serde_json's pretty printer: components at 2 spaces, schemas at 4, each schema at 6.
        if line == "    \"schemas\": {\n" {
            in_schemas = true;
            continue;
        }
        if !in_schemas || !line.starts_with("      \"") || line.starts_with("       ") {
            continue;
        }
        let name = line
            .trim()
            .trim_end_matches('{')
            .trim()
            .trim_end_matches(':');
        if let Ok(name) = serde_json::from_str::<String>(name)
            && closed.contains(&name)
            && line.trim_end().ends_with('{')
        {
            out.push_str("        \"additionalProperties\": false,\n");
        }
    }
    out
}

/// The object schemas (by component name) reachable from any operation's request body, less the
/// open ones, and less those that already say what extra fields they take (maps).
pub fn closed_request_objects(spec: &Value) -> BTreeSet<String> {
    let schemas = &spec["components"]["schemas"];
    let mut reached = BTreeSet::new();
    let mut pending: Vec<String> = Vec::new();
    for item in spec["paths"]
        .as_object()
        .into_iter()
        .flat_map(|p| p.values())
    {
        for op in item.as_object().into_iter().flat_map(|o| o.values()) {
            refs(&op["requestBody"], &mut pending);
        }
    }
    while let Some(name) = pending.pop() {
        if reached.insert(name.clone()) {
            refs(&schemas[&name], &mut pending);
        }
    }
    let open = open_request_objects();
    reached
        .into_iter()
        .filter(|name| {
            let schema = &schemas[name];
            schema["type"] == "object"
                && schema.get("additionalProperties").is_none()
                && !open.iter().any(|o| o == name)
        })
        .collect()
}

/// Every component a schema refers to (`$ref: #/components/schemas/Name`), at any depth.
fn refs(node: &Value, out: &mut Vec<String>) {
    match node {
        Value::Object(map) => {
            for (key, value) in map {
                match (key.as_str(), value) {
                    ("$ref", Value::String(r)) => {
                        if let Some(name) = r.strip_prefix("#/components/schemas/") {
                            out.push(name.to_owned());
                        }
                    }
                    _ => refs(value, out),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|v| refs(v, out)),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn closes_the_request_objects_and_keeps_the_text_otherwise() {
        let raw = crate::api::raw_spec_json();
        let completed = complete(&raw);
        let parsed: Value = serde_json::from_str(&completed).expect("still JSON");
        let closed = closed_request_objects(&serde_json::from_str(&raw).unwrap());
        for name in [
            "ExecutionCreate",
            "StepSpec",
            "AffectedServers",
            "RecurrencePattern",
        ] {
            assert!(closed.contains(name), "{name} is a request object");
        }
        for (name, schema) in parsed["components"]["schemas"].as_object().unwrap() {
            let marked = schema.get("additionalProperties") == Some(&Value::Bool(false));
            assert_eq!(marked, closed.contains(name), "{name}");
        }
        for open in open_request_objects() {
            assert!(parsed["components"]["schemas"].get(open.as_ref()).is_some());
            assert!(!closed.contains(open.as_ref()));
        }
        // Response-only objects stay as they were.
        for response_only in ["Execution", "ExecutionPage", "ErrorBody"] {
            assert!(parsed["components"]["schemas"].get(response_only).is_some());
            assert!(!closed.contains(response_only), "{response_only}");
        }
        // Only the added lines differ.
        let removed: String = completed
            .lines()
            .filter(|l| l.trim() != "\"additionalProperties\": false,")
            .map(|l| format!("{l}\n"))
            .collect();
        assert_eq!(removed, raw);
    }
}
