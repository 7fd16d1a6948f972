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
//!
//! Unsigned integers (`format: uint32`, `uint64`, ...) refuse negative values, but poem-openapi
//! writes only the format; every such schema without a lower bound gets `minimum: 0`, so that
//! checkers and generated clients that ignore formats know it too.

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
/// request object and `minimum: 0` on every unsigned integer without a lower bound. The text is
/// edited rather than re-serialized, so the document keeps poem-openapi's order of paths and
/// keys.
pub fn complete(spec: &str) -> String {
    let Ok(parsed) = serde_json::from_str::<Value>(spec) else {
        return spec.to_owned();
    };
    let closed = closed_request_objects(&parsed);
    let lines: Vec<&str> = spec.split_inclusive('\n').collect();
    let mut out = String::with_capacity(spec.len() + closed.len() * 40);
    let mut in_schemas = false;
    for (at, line) in lines.iter().enumerate() {
        let line = *line;
        if let Some(indent) = unbounded_unsigned(&lines, at) {
            // The format line, then the bound; a comma moves to the format line when it was the
            // object's last key.
            match line.strip_suffix(",\n") {
                Some(_) => {
                    out.push_str(line);
                    out.push_str(&format!("{indent}\"minimum\": 0,\n"));
                }
                None => {
                    out.push_str(line.trim_end_matches('\n'));
                    out.push_str(&format!(",\n{indent}\"minimum\": 0\n"));
                }
            }
            continue;
        }
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

/// When `lines[at]` is the `format` of an unsigned integer whose schema declares no `minimum`:
/// the indentation of its keys.
fn unbounded_unsigned<'a>(lines: &[&'a str], at: usize) -> Option<&'a str> {
    let line = lines[at];
    let key = line.trim_start();
    let indent = &line[..line.len() - key.len()];
    let format = key
        .strip_prefix("\"format\": \"")?
        .trim_end()
        .trim_end_matches(',')
        .strip_suffix('"')?;
    if !matches!(format, "uint8" | "uint16" | "uint32" | "uint64") {
        return None;
    }
    // The other keys of the same schema: the lines at this indentation until one at less
    // (deeper lines belong to nested values).
    let same_schema = |l: &str| l.starts_with(indent) && !l[indent.len()..].starts_with(' ');
    let before = lines[..at]
        .iter()
        .rev()
        .take_while(|l| l.starts_with(indent));
    let after = lines[at + 1..].iter().take_while(|l| l.starts_with(indent));
    let bounded = before
        .chain(after)
        .filter(|l| same_schema(l))
        .any(|l| l[indent.len()..].starts_with("\"minimum\":"));
    (!bounded).then_some(indent)
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
        // Only the added lines differ (and a comma before a bound added as the last key).
        let removed: String = completed
            .lines()
            .filter(|l| l.trim() != "\"additionalProperties\": false,")
            .filter(|l| !matches!(l.trim(), "\"minimum\": 0," | "\"minimum\": 0"))
            .map(|l| format!("{l}\n"))
            .collect();
        let raw_lines: String = raw.lines().map(|l| format!("{l}\n")).collect::<String>();
        let (kept, raw) = (
            strip_format_commas(&removed),
            strip_format_commas(&raw_lines),
        );
        let differ = kept.lines().zip(raw.lines()).position(|(a, b)| a != b);
        assert_eq!(differ, None, "{:?}", differ.map(|at| kept.lines().nth(at)));
        assert_eq!(kept.lines().count(), raw.lines().count());
    }

    fn strip_format_commas(text: &str) -> String {
        text.lines()
            .map(|l| match l.trim_start().starts_with("\"format\"") {
                true => format!("{}\n", l.trim_end_matches(',')),
                false => format!("{l}\n"),
            })
            .collect()
    }

    /// Every unsigned integer in the served document has a lower bound: 0 where poem-openapi
    /// wrote none, its declared one otherwise.
    #[test]
    fn unsigned_integers_are_bounded_below() {
        let completed: Value =
            serde_json::from_str(&complete(&crate::api::raw_spec_json())).expect("still JSON");
        let mut unsigned = Vec::new();
        collect_unsigned(&completed, "", &mut unsigned);
        assert!(unsigned.len() >= 10, "{unsigned:?}");
        for (at, schema) in &unsigned {
            let minimum = schema["minimum"].as_f64();
            assert!(minimum.is_some_and(|m| m >= 0.0), "{at}: {schema}");
        }
        let truncated = &completed["components"]["schemas"]["AlertmanagerPayload"]["properties"]["truncatedAlerts"];
        assert_eq!(truncated["minimum"], 0, "{truncated}");
        let expires =
            &completed["components"]["schemas"]["ApiTokenCreate"]["properties"]["expires_in_days"];
        assert_eq!(
            expires["minimum"], 1.0,
            "a declared bound is kept: {expires}"
        );

        // The edit on its own: a bound as the last key takes the comma along.
        let text = "{\n  \"a\": {\n    \"type\": \"integer\",\n    \"format\": \"uint64\"\n  },\n  \"b\": {\n    \"format\": \"uint32\",\n    \"type\": \"integer\"\n  }\n}\n";
        let edited: Value = serde_json::from_str(&complete(text)).expect("still JSON");
        assert_eq!(edited["a"]["minimum"], 0);
        assert_eq!(edited["b"]["minimum"], 0);
    }

    fn collect_unsigned<'a>(node: &'a Value, at: &str, out: &mut Vec<(String, &'a Value)>) {
        match node {
            Value::Object(map) => {
                if map
                    .get("format")
                    .and_then(Value::as_str)
                    .is_some_and(|f| f.starts_with("uint"))
                {
                    out.push((at.to_owned(), node));
                }
                for (key, value) in map {
                    collect_unsigned(value, &format!("{at}/{key}"), out);
                }
            }
            Value::Array(items) => {
                for (i, value) in items.iter().enumerate() {
                    collect_unsigned(value, &format!("{at}/{i}"), out);
                }
            }
            _ => {}
        }
    }
}
