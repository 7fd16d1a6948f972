//! Server targeting: whether a runbook may run on a server, from the runbook's
//! `allowed_servers` JSON and the server's tags and environment. Pure; the execution engine
//! enforces it when an execution starts.
//!
//! `allowed_servers` shape (every key optional):
//!
//! ```json
//! {"tags": ["db", "role=primary"], "environments": ["staging", "production"], "server_ids": ["<uuid>"]}
//! ```
//!
//! `null`, `{}` or an object whose lists are all empty allows every server. Otherwise a server is
//! allowed when it is listed in `server_ids`, or when it satisfies every non-empty criterion:
//! it carries **all** the listed tags (`name` or `name=value`, as in
//! [`crate::domain::blackout::server_has_tag`]) and its environment is **one of** the listed
//! environments. A bare array is read as `{"tags": [...]}`.

use serde_json::Value;
use uuid::Uuid;

use super::blackout::server_has_tag;

/// A parsed `allowed_servers`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AllowedServers {
    /// Tags a server must all carry.
    pub tags: Vec<String>,
    /// Environments of which the server's must be one.
    pub environments: Vec<String>,
    /// Servers allowed by id regardless of tags and environment.
    pub server_ids: Vec<Uuid>,
}

/// What targeting needs to know about a server.
#[derive(Debug, Clone)]
pub struct ServerTraits<'a> {
    /// The server's id.
    pub id: Uuid,
    /// `server_credentials.tags`.
    pub tags: &'a Value,
    /// `server_credentials.environment`.
    pub environment: Option<&'a str>,
}

fn strings(value: Option<&Value>, field: &str) -> Result<Vec<String>, String> {
    match value {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(items)) => items
            .iter()
            .enumerate()
            .map(|(i, v)| {
                v.as_str()
                    .filter(|s| !s.is_empty())
                    .map(str::to_owned)
                    .ok_or_else(|| {
                        format!("allowed_servers.{field}[{i}]: must be a non-empty string")
                    })
            })
            .collect(),
        Some(_) => Err(format!(
            "allowed_servers.{field}: must be an array of strings"
        )),
    }
}

impl AllowedServers {
    /// Parses the JSON shape documented on this module; the error names the offending field.
    pub fn parse(value: &Value) -> Result<AllowedServers, String> {
        match value {
            Value::Null => Ok(AllowedServers::default()),
            Value::Array(_) => Ok(AllowedServers {
                tags: strings(Some(value), "tags")?,
                ..AllowedServers::default()
            }),
            Value::Object(map) => {
                if let Some(key) = map
                    .keys()
                    .find(|k| !matches!(k.as_str(), "tags" | "environments" | "server_ids"))
                {
                    return Err(format!(
                        "allowed_servers.{key}: unknown key (expected tags, environments, server_ids)"
                    ));
                }
                let server_ids = strings(map.get("server_ids"), "server_ids")?
                    .iter()
                    .enumerate()
                    .map(|(i, s)| {
                        s.parse::<Uuid>()
                            .map_err(|_| format!("allowed_servers.server_ids[{i}]: must be a UUID"))
                    })
                    .collect::<Result<_, _>>()?;
                Ok(AllowedServers {
                    tags: strings(map.get("tags"), "tags")?,
                    environments: strings(map.get("environments"), "environments")?,
                    server_ids,
                })
            }
            _ => Err("allowed_servers: must be an object, an array of tags or null".to_owned()),
        }
    }

    /// Whether nothing is restricted.
    pub fn allows_all(&self) -> bool {
        self.tags.is_empty() && self.environments.is_empty() && self.server_ids.is_empty()
    }

    /// Whether a runbook with this restriction may run on `server`.
    pub fn allows(&self, server: &ServerTraits<'_>) -> bool {
        if self.allows_all() || self.server_ids.contains(&server.id) {
            return true;
        }
        if self.tags.is_empty() && self.environments.is_empty() {
            return false;
        }
        let tags_ok = self.tags.iter().all(|t| server_has_tag(server.tags, t));
        let env_ok = self.environments.is_empty()
            || server
                .environment
                .is_some_and(|e| self.environments.iter().any(|x| x == e));
        tags_ok && env_ok
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn server<'a>(tags: &'a Value, env: Option<&'a str>) -> ServerTraits<'a> {
        ServerTraits {
            id: Uuid::nil(),
            tags,
            environment: env,
        }
    }

    #[test]
    fn empty_allows_everything() {
        let tags = json!([]);
        for v in [json!(null), json!({}), json!({"tags": []})] {
            assert!(
                AllowedServers::parse(&v)
                    .unwrap()
                    .allows(&server(&tags, None))
            );
        }
    }

    #[test]
    fn tags_are_all_required_and_environment_is_one_of() {
        let rule = AllowedServers::parse(&json!({
            "tags": ["db", "role=primary"], "environments": ["staging", "production"]
        }))
        .unwrap();
        let both = json!(["db", "role=primary", "eu"]);
        let one = json!(["db"]);
        assert!(rule.allows(&server(&both, Some("staging"))));
        assert!(!rule.allows(&server(&both, Some("dev"))));
        assert!(!rule.allows(&server(&both, None)));
        assert!(!rule.allows(&server(&one, Some("staging"))));
        let object_tags = json!({"db": "", "role": "primary"});
        assert!(rule.allows(&server(&object_tags, Some("production"))));
    }

    #[test]
    fn ids_allow_directly_and_bad_shapes_name_the_field() {
        let id = Uuid::new_v4();
        let rule =
            AllowedServers::parse(&json!({"server_ids": [id.to_string()], "tags": ["x"]})).unwrap();
        let none = json!([]);
        assert!(rule.allows(&ServerTraits {
            id,
            tags: &none,
            environment: None
        }));
        assert!(!rule.allows(&server(&none, None)));
        assert!(AllowedServers::parse(&json!(["db"])).unwrap().tags == ["db"]);
        let err = AllowedServers::parse(&json!({"tag": ["db"]})).unwrap_err();
        assert!(err.contains("allowed_servers.tag"), "{err}");
        let err = AllowedServers::parse(&json!({"environments": [1]})).unwrap_err();
        assert!(err.contains("environments[0]"), "{err}");
        let err = AllowedServers::parse(&json!({"server_ids": ["nope"]})).unwrap_err();
        assert!(err.contains("server_ids[0]"), "{err}");
    }
}
