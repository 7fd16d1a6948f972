//! Holds a JSON request body, or a path or query parameter, to the served OpenAPI document and
//! names what does not fit.
//!
//! poem-openapi refuses a body that does not fit its operation's schema with a message that
//! names the Rust type and the JSON type it expected (`Expected input type "string", found
//! null. (occurred while parsing "ServerCreate")`), never the field, and reads a number or a
//! boolean sent for a string field as its text. So every JSON body is walked against the
//! operation's request schema first, and the first field that breaks it is reported with the
//! reason, as a path into the request (`servers.tags[1]`, `variables`). Parameters are named
//! from poem-openapi's parse errors.

use serde_json::{Map, Value};

/// The request-body schemas of every operation, from the OpenAPI document.
pub struct BodySchemas {
    spec: Value,
}

/// The field a body broke its schema at, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Offence {
    pub field: Option<String>,
    pub reason: String,
    /// The value has the declared type but is not allowed (outside a declared bound such as
    /// `minimum`, `maxLength`, `maxItems`): a 422 like any other invalid value, not a 400.
    pub invalid_value: bool,
}

impl BodySchemas {
    /// From this build's OpenAPI document (JSON).
    pub fn new(spec_json: &str) -> BodySchemas {
        BodySchemas {
            spec: serde_json::from_str(spec_json).unwrap_or(Value::Null),
        }
    }

    /// Why `body` does not fit the JSON request schema of `method` on `path` (relative to the
    /// API prefix): a field of the wrong type, missing, unknown to a closed object (the served
    /// document closes every request object, see [`super::document`]) or outside a declared
    /// bound. `None` when the operation has no JSON body schema or the body fits it.
    pub fn diagnose(&self, method: &str, path: &str, body: &[u8]) -> Option<Offence> {
        let schema = self.request_schema(method, path)?;
        let value: Value = match serde_json::from_slice(body) {
            Ok(v) => v,
            Err(e) => {
                return Some(Offence {
                    invalid_value: false,
                    field: None,
                    reason: format!(
                        "the body is not JSON: {e} (line {}, column {})",
                        e.line(),
                        e.column()
                    ),
                });
            }
        };
        Walk { spec: &self.spec }.check(schema, &value, "")
    }

    /// Why a path or query parameter of `method` on `path` (relative to the API prefix) was
    /// refused, from poem-openapi's parse error `message` (`failed to parse path `param0`: ...`,
    /// `failed to parse parameter `limit`: ...`): the parameter as the operation names it, and
    /// what its value should be, quoting the value sent (`query` is the request's query string).
    /// `None` for any other message.
    pub fn parameter_problem(
        &self,
        method: &str,
        path: &str,
        query: Option<&str>,
        message: &str,
    ) -> Option<Offence> {
        let (template, item) = self.path_item(path)?;
        // poem-openapi numbers a path parameter it cannot parse (in the order of the path
        // template) and names one its validator refuses, as it names query parameters.
        let name = if let Some(rest) = message.strip_prefix("failed to parse path `param") {
            let index: usize = rest.split('`').next()?.parse().ok()?;
            template
                .split('/')
                .filter(|s| s.starts_with('{') && s.ends_with('}'))
                .nth(index)?
                .trim_matches(['{', '}'])
                .to_owned()
        } else if let Some(rest) = message.strip_prefix("failed to parse parameter `") {
            rest.split('`').next()?.to_owned()
        } else {
            return None;
        };
        let placeholder = format!("{{{name}}}");
        let raw = match template.split('/').position(|s| s == placeholder) {
            Some(position) => path
                .split('/')
                .nth(position)
                .map(|s| percent_decoded(s, false)),
            None => query.and_then(|q| {
                q.split('&').find_map(|pair| {
                    let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
                    (percent_decoded(key, true) == name).then(|| percent_decoded(value, true))
                })
            }),
        };
        let parameter = item
            .get(method.to_ascii_lowercase())?
            .get("parameters")?
            .as_array()?
            .iter()
            .find(|p| p.get("name").and_then(Value::as_str) == Some(name.as_str()))?;
        if parameter.get("in").and_then(Value::as_str) == Some("header") {
            // A header that is there but does not parse: poem-openapi's own words.
            let reason = message.split_once("`: ").map_or(message, |(_, r)| r);
            return offence(&name, reason);
        }
        let schema = parameter.get("schema")?;
        let walk = Walk { spec: &self.spec };
        let schema = walk.resolve(schema);
        let raw = match raw {
            None => return offence(&name, "is required"),
            Some(raw) if raw.is_empty() && template.contains(&placeholder) => {
                return offence(&name, "is required: its segment of the path is empty");
            }
            Some(raw) => raw,
        };
        let shown: String = raw.chars().take(100).collect();
        let value = match schema.get("type").and_then(Value::as_str) {
            Some("integer") => match raw.parse::<i64>() {
                Ok(n) => Value::from(n),
                Err(_) => return offence(&name, format!("`{shown}` is not a whole number")),
            },
            Some("number") => match raw
                .parse::<f64>()
                .ok()
                .and_then(serde_json::Number::from_f64)
            {
                Some(n) => Value::Number(n),
                None => return offence(&name, format!("`{shown}` is not a number")),
            },
            Some("boolean") => match raw.as_str() {
                "true" => Value::Bool(true),
                "false" => Value::Bool(false),
                _ => return offence(&name, format!("`{shown}` is not true or false")),
            },
            _ => Value::String(raw),
        };
        walk.check(schema, &value, &name).or_else(|| {
            // The schema admits the value but poem-openapi did not: its own words.
            let reason = message.split_once("`: ").map_or(message, |(_, r)| r);
            offence(&name, reason)
        })
    }

    /// The first path or query parameter of a request to `path` (relative to the API prefix)
    /// whose decoded value holds a NUL character, named as the operation declares it (`query`
    /// is the request's query string).
    pub fn parameter_with_nul(&self, path: &str, query: Option<&str>) -> Option<String> {
        if path.contains("%00") {
            let template = self.path_item(path).map(|(t, _)| t).unwrap_or_default();
            let position = path
                .split('/')
                .position(|segment| percent_decoded(segment, false).contains('\0'))?;
            let name = template
                .split('/')
                .nth(position)
                .and_then(|s| s.strip_prefix('{')?.strip_suffix('}'));
            return Some(name.unwrap_or("path").to_owned());
        }
        query?.split('&').find_map(|pair| {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            let (key, value) = (percent_decoded(key, true), percent_decoded(value, true));
            (key.contains('\0') || value.contains('\0')).then(|| key.replace('\0', ""))
        })
    }

    /// The first query parameter of a request that `method` on `path` (relative to the API
    /// prefix) does not declare, named, with the parameters the operation takes: a mistyped
    /// filter (`?stauts=failed`) would otherwise be dropped and the list come back unfiltered.
    /// A parameter given twice that takes one value (only list parameters such as `tag` and
    /// `label` repeat) is refused the same way: one of its values would be dropped silently.
    /// `None` when each one is declared, for a request that matches no operation, and for the
    /// Alertmanager webhook (its token schemes), which never refuses an alert for its URL.
    pub fn undeclared_query_parameter(
        &self,
        method: &str,
        path: &str,
        query: Option<&str>,
    ) -> Option<Offence> {
        let query = query.filter(|q| !q.is_empty())?;
        let (_, item) = self.path_item(path)?;
        let operation = item.get(method.to_ascii_lowercase())?;
        if self.webhook_secured(method, path) {
            return None;
        }
        let parameters: Vec<&Value> = operation
            .get("parameters")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter(|p| p.get("in").and_then(Value::as_str) == Some("query"))
            .collect();
        let declared: Vec<&str> = parameters
            .iter()
            .filter_map(|p| p.get("name").and_then(Value::as_str))
            .collect();
        let names: Vec<String> = query
            .split('&')
            .filter(|pair| !pair.is_empty())
            .map(|pair| percent_decoded(pair.split_once('=').map_or(pair, |(k, _)| k), true))
            .collect();
        let Some(name) = names.iter().find(|name| !declared.contains(&name.as_str())) else {
            let repeated = names.iter().enumerate().find(|(i, name)| {
                names[..*i].contains(name)
                    && parameters.iter().any(|p| {
                        p.get("name").and_then(Value::as_str) == Some(name.as_str())
                            && p.pointer("/schema/type").and_then(Value::as_str) != Some("array")
                    })
            });
            return repeated.map(|(_, name)| Offence {
                field: Some(name.clone()),
                reason: "is given more than once; it takes one value".to_owned(),
                invalid_value: false,
            });
        };
        let takes = if declared.is_empty() {
            "it takes none".to_owned()
        } else {
            format!("it takes {}", declared.join(", "))
        };
        let shown: String = name.chars().take(100).collect();
        Some(Offence {
            field: Some(shown),
            reason: format!(
                "is not a query parameter of {} {path}; {takes}",
                method.to_ascii_uppercase()
            ),
            invalid_value: false,
        })
    }

    /// Whether the operation takes webhook tokens (the Alertmanager webhook's schemes).
    pub fn webhook_secured(&self, method: &str, path: &str) -> bool {
        self.security(method, path)
            .iter()
            .any(|requirement| requirement.keys().any(|name| name.starts_with("webhook")))
    }

    /// Whether `method` on `path` (relative to the API prefix) declares a security scheme.
    pub fn secured(&self, method: &str, path: &str) -> bool {
        !self.security(method, path).is_empty()
    }

    /// Whether the operation takes bearer tokens of users (`bearerAuth`) and nothing else.
    pub fn bearer_secured(&self, method: &str, path: &str) -> bool {
        let schemes = self.security(method, path);
        !schemes.is_empty()
            && schemes
                .iter()
                .all(|requirement| requirement.keys().all(|name| name == "bearerAuth"))
    }

    /// The least role the operation needs, from the `Least role:` line of its description
    /// (`tests/rbac.rs` holds every operation to its line); `None` when it is public or unknown.
    pub fn least_role(&self, method: &str, path: &str) -> Option<crate::domain::role::Role> {
        let (_, item) = self.path_item(path)?;
        let description = item
            .get(method.to_ascii_lowercase())?
            .get("description")?
            .as_str()?;
        let rest = description.split("Least role:").nth(1)?.trim_start();
        let name = rest.split(|c: char| !c.is_ascii_alphabetic()).next()?;
        name.parse().ok()
    }

    /// The operation's security requirements (each a map of scheme names), empty when it needs
    /// none or is unknown.
    fn security(&self, method: &str, path: &str) -> Vec<&Map<String, Value>> {
        self.path_item(path)
            .and_then(|(_, item)| item.get(method.to_ascii_lowercase()))
            .and_then(|op| op.get("security")?.as_array())
            .map(|schemes| schemes.iter().filter_map(Value::as_object).collect())
            .unwrap_or_default()
    }

    /// The methods the path (relative to the API prefix) takes, upper-case, in the document's
    /// order, with `HEAD` wherever `GET` is (the router answers it): the `Allow` header of a 405.
    pub fn allowed_methods(&self, path: &str) -> Vec<String> {
        let Some((_, item)) = self.path_item(path) else {
            return Vec::new();
        };
        let mut methods: Vec<String> = item
            .as_object()
            .into_iter()
            .flat_map(|o| o.keys())
            .filter(|k| HTTP_METHODS.contains(&k.as_str()))
            .map(|k| k.to_ascii_uppercase())
            .collect();
        if methods.iter().any(|m| m == "GET") {
            methods.push("HEAD".to_owned());
        }
        methods
    }

    /// The media types the request body of `method` on `path` may have, as the document
    /// declares them; empty when the operation takes no body.
    pub fn body_media_types(&self, method: &str, path: &str) -> Vec<String> {
        self.path_item(path)
            .and_then(|(_, item)| item.get(method.to_ascii_lowercase()))
            .and_then(|op| op.get("requestBody")?.get("content")?.as_object())
            .map(|content| content.keys().cloned().collect())
            .unwrap_or_default()
    }

    /// Why an empty JSON body does not do for `method` on `path`: the operation requires a
    /// body (an operation whose body is optional, such as a cancel, takes none).
    pub fn empty_body_problem(&self, method: &str, path: &str) -> Option<Offence> {
        let required = self
            .path_item(path)
            .and_then(|(_, item)| item.get(method.to_ascii_lowercase()))
            .and_then(|op| op.get("requestBody")?.get("required")?.as_bool())
            .unwrap_or(false);
        (required && self.request_schema(method, path).is_some()).then(|| Offence {
            invalid_value: false,
            field: None,
            reason: "the body is empty; this operation takes a JSON object".to_owned(),
        })
    }

    /// The path template matching a request path, and its path item. Where several match
    /// (`/runbooks/import` and `/runbooks/{id}`), the one with the fewest parameters, as the
    /// router chooses.
    fn path_item(&self, path: &str) -> Option<(&str, &Value)> {
        self.spec
            .get("paths")?
            .as_object()?
            .iter()
            .filter(|(template, _)| path_matches(template, path))
            .min_by_key(|(template, _)| template.matches('{').count())
            .map(|(template, item)| (template.as_str(), item))
    }

    fn request_schema(&self, method: &str, path: &str) -> Option<&Value> {
        let (_, item) = self.path_item(path)?;
        let content = item
            .get(method.to_ascii_lowercase())?
            .get("requestBody")?
            .get("content")?
            .as_object()?;
        content
            .iter()
            .find(|(kind, _)| kind.starts_with("application/json"))
            .and_then(|(_, media)| media.get("schema"))
    }
}

/// The keys of an OpenAPI path item that are operations.
const HTTP_METHODS: [&str; 8] = [
    "get", "put", "post", "delete", "options", "head", "patch", "trace",
];

/// `%XX` escapes decoded (and, in a query, `+` as a space); invalid escapes kept as they are.
fn percent_decoded(text: &str, plus_is_space: bool) -> String {
    let bytes = text.as_bytes();
    let hex = |b: u8| char::from(b).to_digit(16);
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = (bytes[i] == b'%' && i + 2 < bytes.len())
            .then(|| Some(hex(bytes[i + 1])? * 16 + hex(bytes[i + 2])?))
            .flatten()
            .and_then(|v| u8::try_from(v).ok());
        match (escaped, bytes[i]) {
            (Some(v), _) => {
                out.push(v);
                i += 3;
                continue;
            }
            (None, b'+') if plus_is_space => out.push(b' '),
            (None, b) => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Whether a path template (`/executions/{id}/approve`) matches a request path.
fn path_matches(template: &str, path: &str) -> bool {
    let mut t = template.trim_end_matches('/').split('/');
    let mut p = path.trim_end_matches('/').split('/');
    loop {
        match (t.next(), p.next()) {
            (None, None) => return true,
            // An empty segment takes a parameter's place too: the router matches it there, and
            // the parameter is then named as missing.
            (Some(ts), Some(_)) if ts.starts_with('{') && ts.ends_with('}') => {}
            (Some(ts), Some(ps)) if ts == ps => {}
            _ => return false,
        }
    }
}

struct Walk<'a> {
    spec: &'a Value,
}

fn join(path: &str, key: &str) -> String {
    if key.is_empty() {
        // A field named by the empty string still gets a path that says which one it was.
        format!("{path}[\"\"]")
    } else if path.is_empty() {
        key.to_owned()
    } else {
        format!("{path}.{key}")
    }
}

fn offence(path: &str, reason: impl Into<String>) -> Option<Offence> {
    Some(Offence {
        field: (!path.is_empty()).then(|| path.to_owned()),
        reason: reason.into(),
        invalid_value: false,
    })
}

fn out_of_bounds(path: &str, reason: impl Into<String>) -> Option<Offence> {
    offence(path, reason).map(|o| Offence {
        invalid_value: true,
        ..o
    })
}

/// What a declared pair of bounds asks for, when `n` breaks it: `between 1 and 500`,
/// `>= 0`, `at most 100` (with `unit`, `1 to 100 characters`).
fn bounds_reason(
    low: Option<f64>,
    high: Option<f64>,
    n: f64,
    unit: Option<&str>,
) -> Option<String> {
    let broken = low.is_some_and(|l| n < l) || high.is_some_and(|h| n > h);
    if !broken {
        return None;
    }
    Some(match (low, high, unit) {
        (Some(1.0), None, Some("characters")) => "must not be empty".to_owned(),
        (Some(l), Some(h), Some(u)) => format!("must be {l} to {h} {u}"),
        (Some(l), None, Some(u)) => format!("must be at least {l} {u}"),
        (None, Some(h), Some(u)) => format!("must be at most {h} {u}"),
        (Some(l), Some(h), None) => format!("must be between {l} and {h}, not {n}"),
        (Some(l), None, None) => format!("must be >= {l}, not {n}"),
        (None, Some(h), None) => format!("must be <= {h}, not {n}"),
        (None, None, _) => return None,
    })
}

fn json_type(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

impl<'a> Walk<'a> {
    /// A schema with its `$ref` and single-reference `allOf` wrappers resolved.
    fn resolve(&self, mut schema: &'a Value) -> &'a Value {
        for _ in 0..16 {
            if let Some(target) = schema.get("$ref").and_then(Value::as_str) {
                let name = target.trim_start_matches("#/components/schemas/");
                match self.spec.pointer(&format!("/components/schemas/{name}")) {
                    Some(s) => schema = s,
                    None => return schema,
                }
            } else if let Some(parts) = schema.get("allOf").and_then(Value::as_array)
                && let Some(first) = parts.iter().find(|p| p.get("$ref").is_some())
            {
                schema = first;
            } else {
                return schema;
            }
        }
        schema
    }

    fn check(&self, schema: &'a Value, value: &Value, path: &str) -> Option<Offence> {
        let schema = self.resolve(schema);
        for key in ["oneOf", "anyOf"] {
            if let Some(choices) = schema.get(key).and_then(Value::as_array) {
                let offences: Vec<Offence> = choices
                    .iter()
                    .filter_map(|c| self.check(c, value, path))
                    .collect();
                return if offences.len() < choices.len() {
                    None
                } else {
                    offences.into_iter().next()
                };
            }
        }
        if let Some(allowed) = schema.get("enum").and_then(Value::as_array)
            && !allowed.contains(value)
        {
            let names: Vec<String> = allowed.iter().map(Value::to_string).collect();
            return offence(path, format!("must be one of {}", names.join(", ")));
        }
        let format = schema.get("format").and_then(Value::as_str);
        match schema.get("type").and_then(Value::as_str) {
            Some("object") => self.check_object(schema, value, path),
            Some("array") => {
                let Value::Array(items) = value else {
                    return offence(path, format!("must be an array, not {}", json_type(value)));
                };
                let bound = |key: &str| schema.get(key).and_then(Value::as_f64);
                let count = items.len() as f64;
                if let Some(reason) =
                    bounds_reason(bound("minItems"), bound("maxItems"), count, Some("items"))
                {
                    return out_of_bounds(path, format!("{reason}, not {count}"));
                }
                let item_schema = schema.get("items")?;
                items
                    .iter()
                    .enumerate()
                    .find_map(|(i, item)| self.check(item_schema, item, &format!("{path}[{i}]")))
            }
            Some("string") => {
                let Value::String(s) = value else {
                    return offence(path, format!("must be a string, not {}", json_type(value)));
                };
                let bound = |key: &str| schema.get(key).and_then(Value::as_f64);
                let chars = s.chars().count() as f64;
                if let Some(reason) = bounds_reason(
                    bound("minLength"),
                    bound("maxLength"),
                    chars,
                    Some("characters"),
                ) {
                    return out_of_bounds(path, reason);
                }
                if let Some(pattern) = schema.get("pattern").and_then(Value::as_str)
                    && regex::Regex::new(pattern).is_ok_and(|re| !re.is_match(s))
                {
                    return out_of_bounds(path, format!("must match `{pattern}`"));
                }
                match format {
                    Some("uuid") if uuid::Uuid::parse_str(s).is_err() => {
                        offence(path, format!("`{s}` is not a UUID"))
                    }
                    Some("date-time") if chrono::DateTime::parse_from_rfc3339(s).is_err() => {
                        offence(
                            path,
                            format!("`{s}` is not an RFC 3339 date-time (2026-01-31T12:00:00Z)"),
                        )
                    }
                    _ => None,
                }
            }
            Some("integer") => {
                let (low, high) = match format {
                    Some("int32") => (i64::from(i32::MIN), i64::from(i32::MAX)),
                    Some("int16") => (i64::from(i16::MIN), i64::from(i16::MAX)),
                    Some("int8") => (i64::from(i8::MIN), i64::from(i8::MAX)),
                    Some("uint32") => (0, i64::from(u32::MAX)),
                    Some("uint16") => (0, i64::from(u16::MAX)),
                    Some("uint8") => (0, i64::from(u8::MAX)),
                    Some("uint64") => (0, i64::MAX),
                    _ => (i64::MIN, i64::MAX),
                };
                let n = match value {
                    Value::Number(number) => match number.as_i64() {
                        Some(n) => n,
                        // A whole number past what 64 bits hold (2^63, 2^64, 1e30) is out of
                        // range; one with a fraction or written as a decimal (1.5, 1.0) is not
                        // whole.
                        None if number.is_u64()
                            || number
                                .as_f64()
                                .is_some_and(|f| f.fract() == 0.0 && f.abs() >= 9.2e18) =>
                        {
                            return offence(
                                path,
                                format!("{number} is out of range ({low} to {high})"),
                            );
                        }
                        None => {
                            return offence(
                                path,
                                format!("must be a whole number, not `{number}`"),
                            );
                        }
                    },
                    _ => {
                        return offence(
                            path,
                            format!("must be a whole number, not {}", json_type(value)),
                        );
                    }
                };
                if !(low..=high).contains(&n) {
                    return offence(path, format!("{n} is out of range ({low} to {high})"));
                }
                let bound = |key: &str| schema.get(key).and_then(Value::as_f64);
                let reason = bounds_reason(bound("minimum"), bound("maximum"), n as f64, None);
                out_of_bounds(path, reason?)
            }
            Some("number") if !value.is_number() => {
                offence(path, format!("must be a number, not {}", json_type(value)))
            }
            Some("boolean") if !value.is_boolean() => offence(
                path,
                format!("must be true or false, not {}", json_type(value)),
            ),
            _ => None,
        }
    }

    fn check_object(&self, schema: &'a Value, value: &Value, path: &str) -> Option<Offence> {
        let Value::Object(fields) = value else {
            return offence(path, format!("must be an object, not {}", json_type(value)));
        };
        let empty = Map::new();
        let properties = schema
            .get("properties")
            .and_then(Value::as_object)
            .unwrap_or(&empty);
        let required = schema.get("required").and_then(Value::as_array);
        for name in required.into_iter().flatten().filter_map(Value::as_str) {
            match fields.get(name) {
                None => return offence(&join(path, name), "is required"),
                Some(Value::Null) => {
                    return offence(&join(path, name), "is required and must not be null");
                }
                Some(_) => {}
            }
        }
        for (name, field) in fields {
            match properties.get(name) {
                // An optional field may be null: it reads as absent.
                Some(_) if field.is_null() => {}
                Some(property) => {
                    if let Some(found) = self.check(property, field, &join(path, name)) {
                        return Some(found);
                    }
                }
                None => match schema.get("additionalProperties") {
                    Some(Value::Bool(false)) => {
                        return offence(&join(path, name), "is not a known field");
                    }
                    Some(entry @ Value::Object(_)) => {
                        let entry_path = format!("{path}[{}]", Value::String(name.clone()));
                        if let Some(found) = self.check(entry, field, &entry_path) {
                            return Some(found);
                        }
                    }
                    _ => {}
                },
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn schemas() -> BodySchemas {
        let spec = json!({
            "paths": {
                "/things/{id}/parts": { "post": { "requestBody": { "content": {
                    "application/json; charset=utf-8": {
                        "schema": { "$ref": "#/components/schemas/Part" } } } } } }
            },
            "components": { "schemas": {
                "Part": { "type": "object", "required": ["id", "count"], "additionalProperties": false,
                  "properties": {
                    "id": { "type": "string", "format": "uuid" },
                    "count": { "type": "integer", "format": "int32" },
                    "dropped": { "type": "integer", "format": "uint64" },
                    "at": { "type": "string", "format": "date-time" },
                    "kind": { "allOf": [{ "$ref": "#/components/schemas/Kind" },
                                        { "description": "The kind." }] },
                    "tags": { "type": "array", "items": { "type": "string" } },
                    "labels": { "type": "object", "additionalProperties": { "type": "string" } },
                    "extra": { "type": "object", "additionalProperties": {} }
                } },
                "Kind": { "type": "string", "enum": ["a", "b"] }
            } }
        });
        BodySchemas::new(&spec.to_string())
    }

    fn field(body: Value) -> Option<(Option<String>, String)> {
        schemas()
            .diagnose("POST", "/things/7/parts", body.to_string().as_bytes())
            .map(|o| (o.field, o.reason))
    }

    #[test]
    fn names_the_first_field_that_breaks_the_schema() {
        let id = "7d4c3c1e-52b4-4a8b-9a77-1d6a3c2b9e10";
        assert_eq!(field(json!({ "id": id, "count": 1 })), None);
        assert_eq!(
            field(json!({ "count": 1 })),
            Some((Some("id".into()), "is required".into()))
        );
        assert_eq!(
            field(json!({ "id": null, "count": 1 })),
            Some((Some("id".into()), "is required and must not be null".into()))
        );
        assert_eq!(
            field(json!({ "id": "x-1", "count": 1 })),
            Some((Some("id".into()), "`x-1` is not a UUID".into()))
        );
        assert_eq!(
            field(json!({ "id": id, "count": "many" })).unwrap().0,
            Some("count".into())
        );
        assert_eq!(
            field(json!({ "id": id, "count": 1i64 << 40 })).unwrap().0,
            Some("count".into())
        );
        // Too large for 64 bits is out of range; a fraction or a decimal point is not whole.
        let count = |body: &str| {
            schemas()
                .diagnose("POST", "/things/7/parts", body.as_bytes())
                .map(|o| o.reason)
        };
        let body = |n: &str| format!("{{\"id\": \"{id}\", \"count\": {n}}}");
        for huge in ["9223372036854775808", "18446744073709551616", "1e30"] {
            let reason = count(&body(huge)).unwrap();
            assert!(reason.contains("is out of range"), "{huge}: {reason}");
        }
        for fraction in ["1.5", "1.0"] {
            assert_eq!(
                count(&body(fraction)).unwrap(),
                format!("must be a whole number, not `{fraction}`")
            );
        }
        assert_eq!(
            field(json!({ "id": id, "count": 1, "dropped": -3 })),
            Some((
                Some("dropped".into()),
                format!("-3 is out of range (0 to {})", i64::MAX)
            ))
        );
        assert_eq!(
            field(json!({ "id": id, "count": 1, "at": "yesterday" }))
                .unwrap()
                .0,
            Some("at".into())
        );
        assert_eq!(
            field(json!({ "id": id, "count": 1, "kind": "c" })),
            Some((Some("kind".into()), "must be one of \"a\", \"b\"".into()))
        );
        assert_eq!(
            field(json!({ "id": id, "count": 1, "tags": ["x", 2] }))
                .unwrap()
                .0,
            Some("tags[1]".into())
        );
        assert_eq!(
            field(json!({ "id": id, "count": 1, "labels": { "env": 3 } }))
                .unwrap()
                .0,
            Some("labels[\"env\"]".into())
        );
        // Optional fields may be null; a free-form map takes anything.
        assert_eq!(
            field(json!({ "id": id, "count": 1, "at": null, "extra": { "k": [1] } })),
            None
        );
        // A closed object names a field it does not declare.
        assert_eq!(
            field(json!({ "id": id, "count": 1, "cuont": 2 })),
            Some((Some("cuont".into()), "is not a known field".into()))
        );
        assert_eq!(
            field(json!({ "id": id, "count": 1, "": 2 })),
            Some((Some("[\"\"]".into()), "is not a known field".into()))
        );
        assert_eq!(
            field(json!([1])),
            Some((None, "must be an object, not an array".into()))
        );
        let broken = schemas().diagnose("POST", "/things/7/parts", b"{\"id\": ");
        assert!(broken.unwrap().reason.starts_with("the body is not JSON"));
        assert_eq!(
            schemas().diagnose("POST", "/other", b"{}"),
            None,
            "no such operation"
        );
    }

    #[test]
    fn names_the_path_or_query_parameter_and_what_its_value_should_be() {
        let spec = json!({
            "paths": { "/things/{id}/versions/{version}": { "get": { "parameters": [
                { "name": "id", "in": "path", "schema": { "type": "string", "format": "uuid" } },
                { "name": "version", "in": "path",
                  "schema": { "type": "integer", "format": "int32" } },
                { "name": "state", "in": "query",
                  "schema": { "$ref": "#/components/schemas/State" } },
                { "name": "since", "in": "query",
                  "schema": { "type": "string", "format": "date-time" } },
                { "name": "all", "in": "query", "schema": { "type": "boolean" } }
            ] } } },
            "components": { "schemas": { "State": { "type": "string", "enum": ["on", "off"] } } }
        });
        let schemas = BodySchemas::new(&spec.to_string());
        let id = "7d4c3c1e-52b4-4a8b-9a77-1d6a3c2b9e10";
        let problem = |path: &str, query: Option<&str>, message: &str| {
            schemas
                .parameter_problem("GET", path, query, message)
                .map(|o| (o.field.unwrap_or_default(), o.reason))
        };
        let uuid_error = "failed to parse path `param0`: failed to parse \"string_uuid\": invalid \
                          character: found `n` at 0";
        assert_eq!(
            problem("/things/not-a-uuid/versions/1", None, uuid_error),
            Some(("id".into(), "`not-a-uuid` is not a UUID".into()))
        );
        assert_eq!(
            problem(
                "/things//versions/1",
                None,
                &uuid_error.replace("character: found `n` at 0", "length: found 0")
            ),
            Some((
                "id".into(),
                "is required: its segment of the path is empty".into()
            ))
        );
        assert_eq!(
            problem(
                &format!("/things/{id}/versions/v2"),
                None,
                "failed to parse path `param1`: failed to parse \"integer_int32\": invalid digit"
            ),
            Some(("version".into(), "`v2` is not a whole number".into()))
        );
        let query_error = |name: &str| format!("failed to parse parameter `{name}`: bad");
        let path = format!("/things/{id}/versions/1");
        assert_eq!(
            problem(&path, Some("all=1&state=bogus"), &query_error("state")),
            Some(("state".into(), "must be one of \"on\", \"off\"".into()))
        );
        assert_eq!(
            problem(&path, Some("since=next+tuesday%21"), &query_error("since")),
            Some((
                "since".into(),
                "`next tuesday!` is not an RFC 3339 date-time (2026-01-31T12:00:00Z)".into()
            ))
        );
        assert_eq!(
            problem(&path, Some("all=yes"), &query_error("all")),
            Some(("all".into(), "`yes` is not true or false".into()))
        );
        // A value the schema admits keeps poem-openapi's own reason.
        assert_eq!(
            problem(&path, Some("state=on"), &query_error("state")),
            Some(("state".into(), "bad".into()))
        );
        assert_eq!(problem(&path, None, "some other error"), None);
        assert_eq!(
            problem("/elsewhere", Some("all=yes"), &query_error("all")),
            None
        );
    }

    #[test]
    fn names_a_query_parameter_the_operation_does_not_declare() {
        let spec = json!({
            "paths": {
                "/things": { "get": { "parameters": [
                    { "name": "state", "in": "query", "schema": { "type": "string" } },
                    { "name": "limit", "in": "query", "schema": { "type": "integer" } }
                ] }, "delete": {} },
                "/hook": { "post": { "security": [{ "webhookBearer": [] }] } }
            }
        });
        let schemas = BodySchemas::new(&spec.to_string());
        let undeclared = |method: &str, path: &str, query: &str| {
            schemas
                .undeclared_query_parameter(method, path, Some(query))
                .map(|o| (o.field.unwrap_or_default(), o.reason, o.invalid_value))
        };
        assert_eq!(undeclared("GET", "/things", "state=on&limit=2&"), None);
        assert_eq!(undeclared("GET", "/things", ""), None);
        assert_eq!(
            undeclared("GET", "/things", "limit=2&st%61tus=on"),
            Some((
                "status".into(),
                "is not a query parameter of GET /things; it takes state, limit".into(),
                false
            ))
        );
        assert_eq!(
            undeclared("DELETE", "/things", "force"),
            Some((
                "force".into(),
                "is not a query parameter of DELETE /things; it takes none".into(),
                false
            ))
        );
        // No such operation, and the webhook: not this check's to refuse.
        assert_eq!(undeclared("GET", "/other", "x=1"), None);
        assert_eq!(undeclared("POST", "/hook", "x=1"), None);
    }

    #[test]
    fn percent_escapes_are_decoded_and_plus_only_in_queries() {
        assert_eq!(percent_decoded("a%20b+c%2", true), "a b c%2");
        assert_eq!(percent_decoded("a%20b+c", false), "a b+c");
        assert_eq!(percent_decoded("%zz%", false), "%zz%");
    }
}
