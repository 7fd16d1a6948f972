//! Text PostgreSQL can keep: `text` and `jsonb` refuse the NUL character (U+0000), so input that
//! carries one is refused by name before it reaches the database.

use serde_json::Value;

/// Where a NUL character sits in a JSON value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NulAt {
    /// The string, or the object whose field name holds it, as a path (`steps[0].command`,
    /// `labels.team`); empty for the value itself.
    pub path: String,
    /// The NUL is in a field name, not a value.
    pub in_name: bool,
}

/// Why a value holding a NUL character is refused.
pub const NUL_REASON: &str = "must not contain a NUL character, which cannot be stored";

impl NulAt {
    /// Why the value is refused.
    pub fn reason(&self) -> &'static str {
        if self.in_name {
            "has a field name with a NUL character, which cannot be stored"
        } else {
            NUL_REASON
        }
    }
}

/// The first NUL character in `value`, depth first in document order.
pub fn first_nul(value: &Value) -> Option<NulAt> {
    find(value, String::new())
}

fn find(value: &Value, path: String) -> Option<NulAt> {
    match value {
        Value::String(s) if s.contains('\0') => Some(NulAt {
            path,
            in_name: false,
        }),
        Value::Array(items) => items
            .iter()
            .enumerate()
            .find_map(|(i, item)| find(item, format!("{path}[{i}]"))),
        Value::Object(fields) => fields.iter().find_map(|(key, field)| {
            if key.contains('\0') {
                return Some(NulAt {
                    path: path.clone(),
                    in_name: true,
                });
            }
            let sub = if path.is_empty() {
                key.clone()
            } else {
                format!("{path}.{key}")
            };
            find(field, sub)
        }),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn names_the_string_or_the_object_holding_a_nul() {
        assert_eq!(first_nul(&json!({ "a": ["x", 1, { "b": "ok" }] })), None);
        assert_eq!(
            first_nul(&json!({ "steps": [{ "name": "s" }, { "command": "echo \u{0}" }] })),
            Some(NulAt {
                path: "steps[1].command".into(),
                in_name: false
            })
        );
        let at = first_nul(&json!({ "labels": { "te\u{0}am": "ops" } })).unwrap();
        assert_eq!((at.path.as_str(), at.in_name), ("labels", true));
        assert!(at.reason().contains("field name"));
        assert_eq!(first_nul(&json!("\u{0}")).unwrap().path, "");
    }
}
