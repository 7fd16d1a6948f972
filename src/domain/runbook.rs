//! The runbook document: the YAML format of section 8 of the schema document, able to express
//! every column of `runbooks`, `runbook_steps` and `runbook_triggers` (except the system-managed
//! ones: ids, `version`, `created_by`, timestamps and `last_triggered_at`).
//!
//! This module parses YAML (errors carry line and column), checks the structural rules (field
//! paths such as `steps[2].timeout_seconds`, indexes 0-based), puts documents in canonical form
//! and writes canonical YAML. It knows nothing about templates (see `crate::templates`, which
//! adds the template checks on top of [`validate`]), PostgreSQL or HTTP.
//!
//! Canonical form: steps sorted by their order; `order` written only when the orders are not
//! simply 1, 2, 3, ... in list order; triggers sorted by priority then name (the order matching
//! considers them in); approval roles in privilege order; time windows as `HH:MM`
//! (or `HH:MM:SS`). Canonical YAML always writes `name`, `mode`, `target_os`, `steps` (with each
//! step's `name` and `command`) and each trigger's `name` and `alert_name_pattern`; every other
//! field is written only when it differs from its default. `export(import(x))` is therefore
//! canonical, and importing canonical YAML gives back the same document.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;

use chrono::{NaiveTime, Timelike};
use serde::{Deserialize, Serialize};

use super::Role;
use super::trigger_match::Pattern;

/// Largest accepted document, in bytes.
pub const MAX_DOCUMENT_BYTES: usize = 256 * 1024;
/// Most steps in one runbook.
pub const MAX_STEPS: usize = 100;
/// Most triggers in one runbook.
pub const MAX_TRIGGERS: usize = 50;

/// `runbooks.mode`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExecutionMode {
    /// Runs as soon as a trigger matches.
    Auto,
    /// Proposed on a match; a human starts it.
    SemiAuto,
    /// Only started by hand.
    #[default]
    Manual,
}

impl ExecutionMode {
    /// The PostgreSQL enum label.
    pub fn as_str(self) -> &'static str {
        match self {
            ExecutionMode::Auto => "auto",
            ExecutionMode::SemiAuto => "semi_auto",
            ExecutionMode::Manual => "manual",
        }
    }

    /// Parses the PostgreSQL enum label.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "auto" => Some(ExecutionMode::Auto),
            "semi_auto" => Some(ExecutionMode::SemiAuto),
            "manual" => Some(ExecutionMode::Manual),
            _ => None,
        }
    }
}

/// `runbooks.status`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunbookStatus {
    /// In use.
    #[default]
    Active,
    /// Kept but never run.
    Disabled,
    /// Being written; never run by triggers.
    Draft,
}

impl RunbookStatus {
    /// The PostgreSQL enum label.
    pub fn as_str(self) -> &'static str {
        match self {
            RunbookStatus::Active => "active",
            RunbookStatus::Disabled => "disabled",
            RunbookStatus::Draft => "draft",
        }
    }

    /// Parses the PostgreSQL enum label.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "active" => Some(RunbookStatus::Active),
            "disabled" => Some(RunbookStatus::Disabled),
            "draft" => Some(RunbookStatus::Draft),
            _ => None,
        }
    }
}

/// `runbooks.target_os`: decides the shell commands are written for and how values are quoted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TargetOs {
    /// POSIX `sh` over SSH.
    #[default]
    Linux,
    /// PowerShell over WinRM.
    Windows,
}

impl TargetOs {
    /// The PostgreSQL enum label.
    pub fn as_str(self) -> &'static str {
        match self {
            TargetOs::Linux => "linux",
            TargetOs::Windows => "windows",
        }
    }

    /// Parses the PostgreSQL enum label.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "linux" => Some(TargetOs::Linux),
            "windows" => Some(TargetOs::Windows),
            _ => None,
        }
    }
}

/// Default of the field of that name.
pub fn default_runbook_timeout() -> i32 {
    300
}
/// Default of the field of that name.
pub fn default_runbook_retry_delay() -> i32 {
    60
}
/// Default of the field of that name.
pub fn default_approval_roles() -> Vec<String> {
    vec!["admin".to_owned(), "engineer".to_owned()]
}
/// Default of the field of that name.
pub fn default_allowed_servers() -> serde_json::Value {
    serde_json::Value::Array(Vec::new())
}
/// Default of the field of that name.
pub fn default_config() -> serde_json::Value {
    serde_json::Value::Object(serde_json::Map::new())
}
/// Default of the field of that name.
pub fn default_exit_codes() -> Vec<i32> {
    vec![0]
}
/// Default of the field of that name.
pub fn default_step_timeout() -> i32 {
    60
}
/// Default of the field of that name.
pub fn default_step_retry_delay() -> i32 {
    5
}
/// Default of the field of that name.
pub fn default_priority() -> i32 {
    100
}
fn default_true() -> bool {
    true
}

fn is_zero(v: &i32) -> bool {
    *v == 0
}
fn is_false(v: &bool) -> bool {
    !*v
}
fn is_true(v: &bool) -> bool {
    *v
}
fn is_default_status(v: &RunbookStatus) -> bool {
    *v == RunbookStatus::default()
}
fn is_default_runbook_timeout(v: &i32) -> bool {
    *v == default_runbook_timeout()
}
fn is_default_runbook_retry_delay(v: &i32) -> bool {
    *v == default_runbook_retry_delay()
}
fn is_default_approval_roles(v: &[String]) -> bool {
    v == default_approval_roles().as_slice()
}
fn is_default_allowed_servers(v: &serde_json::Value) -> bool {
    *v == default_allowed_servers()
}
fn is_default_config(v: &serde_json::Value) -> bool {
    *v == default_config()
}
fn is_default_exit_codes(v: &[i32]) -> bool {
    v == [0]
}
fn is_default_step_timeout(v: &i32) -> bool {
    *v == default_step_timeout()
}
fn is_default_step_retry_delay(v: &i32) -> bool {
    *v == default_step_retry_delay()
}
fn is_default_priority(v: &i32) -> bool {
    *v == default_priority()
}

/// A whole runbook: the `runbooks` row with its steps and triggers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunbookDocument {
    /// Unique name: letters, digits, `.`, `_`, `-`; starts with a letter or digit.
    pub name: String,
    /// What the runbook is for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Grouping (`database`, `network`, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub category: Option<String>,
    /// How it starts.
    #[serde(default)]
    pub mode: ExecutionMode,
    /// Whether triggers may run it.
    #[serde(default, skip_serializing_if = "is_default_status")]
    pub status: RunbookStatus,
    /// The OS its commands are written for.
    #[serde(default)]
    pub target_os: TargetOs,
    /// Whole-run limit in seconds (default 300).
    #[serde(
        default = "default_runbook_timeout",
        skip_serializing_if = "is_default_runbook_timeout"
    )]
    pub timeout_seconds: i32,
    /// Retries of a failed run (default 0).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub max_retries: i32,
    /// Seconds between run retries (default 60).
    #[serde(
        default = "default_runbook_retry_delay",
        skip_serializing_if = "is_default_runbook_retry_delay"
    )]
    pub retry_delay_seconds: i32,
    /// Runs allowed per window; set together with `rate_limit_window_seconds`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit_count: Option<i32>,
    /// The rate-limit window in seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit_window_seconds: Option<i32>,
    /// Whether a human must approve each run.
    #[serde(default, skip_serializing_if = "is_false")]
    pub requires_approval: bool,
    /// Roles that may approve (default admin, engineer).
    #[serde(
        default = "default_approval_roles",
        skip_serializing_if = "is_default_approval_roles"
    )]
    pub approval_roles: Vec<String>,
    /// Servers the runbook may run on (`domain::targeting`): a list of tags, or an object of
    /// `tags`, `environments` and `server_ids` (default empty: no restriction).
    #[serde(
        default = "default_allowed_servers",
        skip_serializing_if = "is_default_allowed_servers"
    )]
    pub allowed_servers: serde_json::Value,
    /// Variables (themselves templates) available as `vars.NAME` and `NAME`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub environment_vars: BTreeMap<String, String>,
    /// Free-form extra configuration: a mapping.
    #[serde(default = "default_config", skip_serializing_if = "is_default_config")]
    pub config: serde_json::Value,
    /// The steps, run in order.
    pub steps: Vec<StepDocument>,
    /// Alert patterns that start the runbook.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub triggers: Vec<TriggerDocument>,
}

/// One `runbook_steps` row.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StepDocument {
    /// `step_order`; when omitted on every step, the list position (1-based) is used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub order: Option<i32>,
    /// Unique within the runbook.
    pub name: String,
    /// What the step does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// The command template.
    pub command: String,
    /// Exit codes that count as success (default [0]).
    #[serde(
        default = "default_exit_codes",
        skip_serializing_if = "is_default_exit_codes"
    )]
    pub expected_exit_codes: Vec<i32>,
    /// Step limit in seconds (default 60).
    #[serde(
        default = "default_step_timeout",
        skip_serializing_if = "is_default_step_timeout"
    )]
    pub timeout_seconds: i32,
    /// Go on with the next step when this one fails.
    #[serde(default, skip_serializing_if = "is_false")]
    pub continue_on_failure: bool,
    /// A minijinja expression; the step is skipped when it is false.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub condition: Option<String>,
    /// Command template that undoes this step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollback_command: Option<String>,
    /// Step-level retries (default 0).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub retry_count: i32,
    /// Seconds between step retries (default 5).
    #[serde(
        default = "default_step_retry_delay",
        skip_serializing_if = "is_default_step_retry_delay"
    )]
    pub retry_delay_seconds: i32,
    /// Keep stdout for later steps as `steps.<name>.stdout`.
    #[serde(default, skip_serializing_if = "is_false")]
    pub capture_output: bool,
    /// Mask output in stored results and logs.
    #[serde(default, skip_serializing_if = "is_false")]
    pub sensitive: bool,
}

/// One `runbook_triggers` row.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TriggerDocument {
    /// Unique within the runbook.
    pub name: String,
    /// Lower wins (default 100).
    #[serde(
        default = "default_priority",
        skip_serializing_if = "is_default_priority"
    )]
    pub priority: i32,
    /// Pattern on the alert name (glob, or regex as `/.../` or `re:...`).
    pub alert_name_pattern: String,
    /// Pattern on the severity; absent: any. An alert without a severity is matched as the
    /// empty string, so `*` matches it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub severity_pattern: Option<String>,
    /// Pattern on the alert source; absent: any. An alert without a source is matched as the
    /// empty string, so `*` matches it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_pattern: Option<String>,
    /// Label name -> pattern; every one must match. A missing label is matched as the empty
    /// string.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels_match: BTreeMap<String, String>,
    /// `HH:MM` (in the `alerts.timezone` setting, default UTC) from which the trigger is active; set with `time_window_end`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time_window_start: Option<String>,
    /// `HH:MM` (same timezone) at which it stops being active; earlier than the start wraps midnight.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time_window_end: Option<String>,
    /// Whether the trigger is considered at all (default true).
    #[serde(default = "default_true", skip_serializing_if = "is_true")]
    pub enabled: bool,
    /// Minimum seconds between two firings (default 0).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub cooldown_seconds: i32,
    /// Count the cooldown per alerting instance (the alert's `instance` label) instead of per
    /// trigger (default false).
    #[serde(default, skip_serializing_if = "is_false")]
    pub cooldown_per_instance: bool,
}

/// A YAML document that could not be read, with its position (1-based line and column).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}{}{message}", location_prefix(*line, *column), path_prefix(path.as_deref()))]
pub struct ParseError {
    /// Field path of the problem (`steps[0].timeout_seconds`), when the text is valid YAML
    /// and the position names a field.
    pub path: Option<String>,
    /// Line of the problem, when known.
    pub line: Option<u32>,
    /// Column of the problem, when known.
    pub column: Option<u32>,
    /// What is wrong.
    pub message: String,
}

impl ParseError {
    /// The problem without its position: the field path (when known) and what is wrong.
    pub fn described(&self) -> String {
        format!("{}{}", path_prefix(self.path.as_deref()), self.message)
    }
}

fn path_prefix(path: Option<&str>) -> String {
    path.map(|p| format!("{p} ")).unwrap_or_default()
}

fn location_prefix(line: Option<u32>, column: Option<u32>) -> String {
    match (line, column) {
        (Some(l), Some(c)) => format!("{l}:{c}: "),
        (Some(l), None) => format!("{l}: "),
        _ => String::new(),
    }
}

/// One validation problem: where (a field path) and what.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Issue {
    /// Field path into the document (`steps[2].timeout_seconds`; indexes 0-based).
    pub path: String,
    /// What is wrong, phrased to follow the path (`must be > 0`).
    pub message: String,
}

impl Issue {
    /// A problem at a path.
    pub fn new(path: impl Into<String>, message: impl Into<String>) -> Issue {
        Issue {
            path: path.into(),
            message: message.into(),
        }
    }
}

impl fmt::Display for Issue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.path, self.message)
    }
}

/// Reads one runbook from YAML: size limit, syntax, unknown fields and types. Does not run the
/// semantic checks; call [`validate`] (or `templates::validate_runbook`) next.
pub fn parse_yaml(text: &str) -> Result<RunbookDocument, ParseError> {
    if text.len() > MAX_DOCUMENT_BYTES {
        return Err(ParseError {
            path: None,
            line: None,
            column: None,
            message: format!(
                "document of {} bytes exceeds the limit of {MAX_DOCUMENT_BYTES} bytes",
                text.len()
            ),
        });
    }
    if let Some(tagged) = foreign_tags(text, 1).pop() {
        return Err(tagged);
    }
    serde_saphyr::from_str::<RunbookDocument>(text).map_err(|e| parse_error(text, &e))
}

/// Up to `limit` nodes that carry a YAML tag outside the core schema (`!vault`, `!!binary`,
/// `!!timestamp`, ...). The format gives no such tag a meaning, and reading the tagged text as
/// it stands would run what its author meant to be transformed first (an encrypted value as a
/// command, say). Core-schema tags (`!!str`, `!!int`, ...) and the non-specific `!` only say
/// how to read a value, and are read so. Text that is not YAML yields nothing here: the
/// reader reports it.
fn foreign_tags(text: &str, limit: usize) -> Vec<ParseError> {
    use serde_saphyr::granit_parser::Parser;
    let mut found = Vec::new();
    for item in Parser::new_from_str(text) {
        let Ok((event, span)) = item else {
            return Vec::new();
        };
        let Some(tag) = event.tag() else { continue };
        let written = tag.original();
        if tag.is_yaml_core_schema() || written == "!" {
            continue;
        }
        if found.len() == limit {
            break;
        }
        let node = (span.start.line() as u32, span.start.col() as u32 + 1);
        let path = path_at(text, node, None)
            .map(|(path, _)| path)
            .filter(|path| !path.is_empty());
        // The node's span begins at its content (a block scalar's first line): point at the
        // tag itself, written before it.
        let before: String = text.chars().take(span.start.index()).collect();
        let position = before.rfind(&written).map_or(node, |at| {
            let line_start = before[..at].rfind('\n').map_or(0, |i| i + 1);
            (
                before[..at].matches('\n').count() as u32 + 1,
                before[line_start..at].chars().count() as u32 + 1,
            )
        });
        let message = format!(
            "{} the YAML tag `{}`: runbooks give tags no meaning, write the value itself",
            if path.is_some() {
                "carries"
            } else {
                "the document carries"
            },
            written
        );
        found.push(ParseError {
            path,
            line: Some(position.0),
            column: Some(position.1),
            message,
        });
    }
    found
}

/// Like [`parse_yaml`], but reports every field problem it can find instead of the first: an
/// unknown field or a value of the wrong type is set aside and the rest is read again, up to
/// [`MAX_PARSE_PROBLEMS`]. Positions refer to `text`. Used where a person fixes a file (the
/// CLI, the validation endpoint).
pub fn parse_yaml_all(text: &str) -> Result<RunbookDocument, Vec<ParseError>> {
    parse_yaml_partial(text).map_err(|(problems, _)| problems)
}

/// The rest of a document whose field problems [`parse_yaml_partial`] set aside: read with a
/// stand-in of the right type for each field of the wrong type, without each unknown field,
/// and with a filler for each missing one.
#[derive(Debug)]
pub struct PartialReading {
    /// The document as read with the stand-ins.
    pub doc: RunbookDocument,
    /// The paths of the fields set aside: problems found at or under them are about the
    /// stand-ins, not the file (see [`PartialReading::keeps`]).
    pub set_aside: Vec<String>,
}

impl PartialReading {
    /// Whether a problem the validation of [`doc`](Self::doc) found at `path` concerns the file
    /// as written: not at or under a field set aside.
    pub fn keeps(&self, path: &str) -> bool {
        !self.set_aside.iter().any(|r| {
            path == r
                || path
                    .strip_prefix(r.as_str())
                    .is_some_and(|rest| rest.starts_with('.') || rest.starts_with('['))
        })
    }
}

/// [`parse_yaml_all`], and with its problems the rest of the document, read past them, when
/// it could be read (so that the checks after parsing can report the file's other problems at
/// once instead of after the field problems are fixed).
pub fn parse_yaml_partial(
    text: &str,
) -> Result<RunbookDocument, (Vec<ParseError>, Option<Box<PartialReading>>)> {
    let tagged = foreign_tags(text, MAX_PARSE_PROBLEMS);
    let first = match parse_yaml(text) {
        Ok(doc) => return Ok(doc),
        // The tags are reported with the field problems the rest of the text has.
        Err(_) if !tagged.is_empty() => {
            match serde_saphyr::from_str::<RunbookDocument>(text).map_err(|e| parse_error(text, &e))
            {
                Ok(_) => return Err((tagged, None)),
                Err(e) => e,
            }
        }
        Err(e) => e,
    };
    let mut problems = vec![first];
    // Only a document that is YAML and a mapping can be read again without a field.
    let Ok(mut value) = serde_saphyr::from_str::<serde_json::Value>(text) else {
        return Err((problems, None));
    };
    let mut rest = None;
    // A value of the wrong type was replaced by a stand-in: the checks after parsing would
    // judge the stand-in (and compare it with other fields), so the rest is not checked.
    let mut stand_ins = false;
    // Stand-in mappings (for a list element that is not one): the fields they lack are not the
    // file's problems.
    let mut stand_in_maps: Vec<String> = Vec::new();
    let nodes = yaml_nodes(text);
    let locations = yaml_locations(text);
    let mut removed: Vec<String> = Vec::new();
    let mut current = problems[0].clone();
    let mut rounds = 0;
    while problems.len() < MAX_PARSE_PROBLEMS && rounds < 4 * MAX_PARSE_PROBLEMS {
        rounds += 1;
        // A value of the wrong type is replaced by one of the right type (a list element too,
        // so that the indexes of later problems stay those of the file); an unknown field is
        // removed; a missing field is given a value of its type.
        let Some(path) = current.path.clone() else {
            break;
        };
        let set_aside = if current.message == MISSING {
            insert_missing(&mut value, &path)
        } else {
            match placeholder(&current.message) {
                Some(valid) if !current.message.starts_with("is not a field") => {
                    stand_ins = true;
                    if valid.is_object() {
                        stand_in_maps.push(path.clone());
                    }
                    field_at(&mut value, &path).map(|v| *v = valid).is_some()
                }
                // Never a list element: only a key is removed.
                _ => remove_field(&mut value, &path),
            }
        };
        if !set_aside {
            break;
        }
        removed.push(path);
        // Written again as JSON, which is YAML in flow style: an error about a collection is
        // placed at the collection itself, not at its first element as in block style.
        let Ok(again) = serde_json::to_string(&value) else {
            break;
        };
        let e = match serde_saphyr::from_str::<RunbookDocument>(&again) {
            Ok(doc) => {
                rest = Some(doc);
                break;
            }
            Err(e) => e,
        };
        let (mut next, kind) = parse_error_at(&again, &e);
        let Some(path) = next.path.as_deref() else {
            break;
        };
        // The stand-in for "must be a string" (the parser says so for a list or mapping where
        // any scalar belongs) was text where a number belongs: the problem is that one, and a
        // number stands in instead.
        if next.message.starts_with("must be a whole number")
            && let Some(last) = problems.last_mut()
            && last.message == "must be a string"
            && last.path.as_deref() == Some(path)
            && let Some(field) = field_at(&mut value, path)
        {
            last.message = next.message.clone();
            *field = serde_json::Value::from(1);
            current = next;
            continue;
        }
        // A field set aside for its type now reads as missing: already reported.
        if removed.iter().any(|r| r == path) {
            break;
        }
        let in_stand_in = next.message == MISSING
            && stand_in_maps.iter().any(|m| {
                path.strip_prefix(m.as_str())
                    .is_some_and(|rest| rest.starts_with('.'))
            });
        if !in_stand_in {
            // The same node in the file as written: its key, its value, or for a missing
            // field the mapping that lacks it.
            let (wanted, kind) = if next.message == MISSING {
                (
                    path.rfind('.').map_or("", |i| &path[..i]),
                    Some(NodeKind::Collection),
                )
            } else {
                (path, kind)
            };
            let position = nodes
                .iter()
                .find(|(p, k, _)| p == wanted && Some(*k) == kind)
                .map(|(_, _, pos)| *pos)
                .or_else(|| locate(&locations, path));
            next.line = position.map(|p| p.0);
            next.column = position.map(|p| p.1);
            problems.push(next.clone());
        }
        current = next;
    }
    // A document with foreign tags is not read past them.
    let partial = rest.filter(|_| tagged.is_empty() && !stand_ins).map(|doc| {
        Box::new(PartialReading {
            doc,
            set_aside: removed,
        })
    });
    problems.extend(tagged);
    // Read again, fields come in another order; report them in the file's.
    problems.sort_by_key(|p| (p.line, p.column));
    problems.truncate(MAX_PARSE_PROBLEMS);
    Err((problems, partial))
}

/// At most this many problems are reported for one document.
pub const MAX_PARSE_PROBLEMS: usize = 50;

/// The message of a required field that is absent.
const MISSING: &str = "is required";

/// A value of the type a parse message asks for, to read the rest of a document past it.
fn placeholder(message: &str) -> Option<serde_json::Value> {
    use serde_json::Value;
    if message.starts_with("must be a whole number") {
        return Some(Value::from(1));
    }
    if let Some(rest) = message.strip_prefix("cannot be `")
        && let Some((_, variants)) = rest.split_once("; it is one of ")
    {
        return variants
            .split(", ")
            .next()
            .map(|v| Value::String(v.to_owned()));
    }
    match message {
        "must be true or false" => Some(Value::Bool(false)),
        "must be a string" => Some(Value::String("x".to_owned())),
        "must be a list" => Some(Value::Array(Vec::new())),
        _ if message.starts_with("must be a mapping") => {
            Some(Value::Object(serde_json::Map::new()))
        }
        _ => None,
    }
}

/// One step of a field path: a mapping key or a list index.
enum PathStep<'p> {
    Key(&'p str),
    Index(usize),
}

/// The steps of a path of dotted keys and `[i]` indexes, read against the document it names,
/// so that a key which itself holds `.` or `[` (`"db.host": 1`) is one step: at each mapping
/// the longest key the rest of the path starts with is taken. A last key the mapping lacks is
/// taken as it is (a missing field). `None` when the path leaves the document.
fn path_steps<'p>(value: &serde_json::Value, path: &'p str) -> Option<Vec<PathStep<'p>>> {
    let mut steps = Vec::new();
    let mut node = value;
    let mut rest = path;
    while !rest.is_empty() {
        if let Some(after) = rest.strip_prefix('[') {
            let (index, after) = after.split_once(']')?;
            let index = index.parse::<usize>().ok()?;
            node = node.get(index)?;
            steps.push(PathStep::Index(index));
            rest = after;
            continue;
        }
        if !steps.is_empty() {
            rest = rest.strip_prefix('.')?;
        }
        let map = node.as_object()?;
        let ends_key = |k: &str| {
            rest.strip_prefix(k)
                .is_some_and(|after| after.is_empty() || after.starts_with(['.', '[']))
        };
        let key = match map.keys().filter(|k| ends_key(k)).max_by_key(|k| k.len()) {
            Some(key) => &rest[..key.len()],
            None if !rest.contains(['.', '[']) => rest,
            None => return None,
        };
        rest = &rest[key.len()..];
        match map.get(key) {
            Some(next) => node = next,
            // Only the last key may be absent.
            None if rest.is_empty() => {}
            None => return None,
        }
        steps.push(PathStep::Key(key));
    }
    Some(steps)
}

/// Follows path steps from a value.
fn follow<'v>(
    value: &'v mut serde_json::Value,
    steps: &[PathStep<'_>],
) -> Option<&'v mut serde_json::Value> {
    steps.iter().try_fold(value, |node, step| match step {
        PathStep::Key(key) => node.get_mut(*key),
        PathStep::Index(index) => node.get_mut(*index),
    })
}

/// The value at a path of dotted keys and `[i]` indexes.
fn field_at<'v>(value: &'v mut serde_json::Value, path: &str) -> Option<&'v mut serde_json::Value> {
    let steps = path_steps(value, path)?;
    follow(value, &steps)
}

/// The mapping that holds the field at a path of dotted keys and `[i]` indexes, and the
/// field's key; `None` when that mapping is not there.
fn parent_map<'v, 'p>(
    value: &'v mut serde_json::Value,
    path: &'p str,
) -> Option<(&'v mut serde_json::Map<String, serde_json::Value>, &'p str)> {
    let mut steps = path_steps(value, path)?;
    let Some(PathStep::Key(key)) = steps.pop() else {
        return None;
    };
    follow(value, &steps)?.as_object_mut().map(|map| (map, key))
}

/// Gives a missing field a value of its type (a list for `steps`, text for the others), to
/// read the rest of a document past it; false when its mapping is not there or has the field.
fn insert_missing(value: &mut serde_json::Value, path: &str) -> bool {
    let Some((map, key)) = parent_map(value, path) else {
        return false;
    };
    if map.contains_key(key) {
        return false;
    }
    let filler = if key == "steps" {
        serde_json::Value::Array(Vec::new())
    } else {
        serde_json::Value::String(String::new())
    };
    map.insert(key.to_owned(), filler);
    true
}

/// Removes the field at a path of dotted keys and `[i]` indexes; false when there is none.
fn remove_field(value: &mut serde_json::Value, path: &str) -> bool {
    parent_map(value, path).is_some_and(|(map, key)| map.remove(key).is_some())
}

/// A parser error in the product's words, with the field path it concerns.
fn parse_error(text: &str, e: &serde_saphyr::Error) -> ParseError {
    parse_error_at(text, e).0
}

/// [`parse_error`], and the kind of node its position is at.
fn parse_error_at(text: &str, e: &serde_saphyr::Error) -> (ParseError, Option<NodeKind>) {
    let location = e.location();
    // The plain message repeats the position; keep only the text after it.
    let raw = strip_position(&e.without_snippet().to_string());
    let line = location.map(|l| l.line() as u32);
    let column = location.map(|l| l.column() as u32);
    let missing = raw
        .strip_prefix("missing field `")
        .and_then(|rest| rest.split_once('`'))
        .map(|(field, _)| field);
    let found = line
        .zip(column)
        .and_then(|position| path_at(text, position, missing));
    let message = product_message(&raw, found.is_some());
    // A list where a string belongs is reported at its first element: name the field. (A list
    // of strings takes any scalar, so no element of one is ever "not a string".)
    let found = match found {
        Some((path, _)) if message == "must be a string" && path.ends_with("[0]") => {
            Some((path[..path.len() - 3].to_owned(), NodeKind::Collection))
        }
        other => other,
    };
    let kind = found.as_ref().map(|(_, kind)| *kind);
    let path = found.map(|(path, _)| path);
    let error = ParseError {
        message,
        path,
        line,
        column,
    };
    (error, kind)
}

/// Says what to do in the product's words, not the parser's API. With a field path the
/// message follows it (`steps[0].timeout_seconds must be a whole number ...`).
fn product_message(raw: &str, has_path: bool) -> String {
    let integer = |bits: &str| match bits {
        "i32" => Some("must be a whole number from -2147483648 to 2147483647"),
        "i64" => Some("must be a whole number"),
        "u8" | "u16" | "u32" | "u64" | "usize" => Some("must be a whole number, 0 or more"),
        _ => None,
    };
    if raw.starts_with("budget breached") {
        return "is too large once its aliases (`*name`) are expanded".to_owned();
    }
    if raw.starts_with("multiple YAML documents") {
        return "holds more than one YAML document (`---`): one runbook at a time here \
                (`aiops runbook apply` reads files of several)"
            .to_owned();
    }
    if let Some((what, _)) = raw.split_once(", set DuplicateKeyPolicy") {
        return what.to_owned();
    }
    if !has_path {
        return match raw {
            "expected mapping start" => {
                "a runbook must be a mapping of fields (`name: ...`)".to_owned()
            }
            _ => raw.to_owned(),
        };
    }
    if raw.starts_with("missing field `") {
        return MISSING.to_owned();
    }
    if let Some(rest) = raw.strip_prefix("unknown field `") {
        if let Some((_, expected)) = rest.split_once("`, expected one of ") {
            return format!("is not a field here; the fields are {expected}");
        }
        return "is not a field here".to_owned();
    }
    if let Some(rest) = raw.strip_prefix("unknown variant `")
        && let Some((value, expected)) = rest.split_once("`, expected one of ")
    {
        return format!("cannot be `{value}`; it is one of {expected}");
    }
    if let Some(kind) = raw.strip_prefix("invalid ")
        && let Some(text) = integer(kind)
    {
        return text.to_owned();
    }
    match raw {
        "invalid boolean" => "must be true or false".to_owned(),
        "expected string scalar" => "must be a string".to_owned(),
        "expected sequence start" => "must be a list".to_owned(),
        "expected mapping start" => "must be a mapping (`key: value` lines)".to_owned(),
        _ if raw.starts_with("cannot deserialize null") => "needs a value".to_owned(),
        _ => raw.to_owned(),
    }
}

/// A YAML parser message without the position it repeats (`... at line L, column C`), for
/// callers that print the position themselves.
pub fn strip_position(message: &str) -> String {
    // serde-saphyr renders "... at line L, column C"; the position is carried separately.
    let trimmed = match message.rfind(" at line ") {
        Some(i) => &message[..i],
        None => message,
    };
    trimmed.trim().to_owned()
}

/// Where a node of a YAML text begins: a mapping key, a scalar value, or the start of a
/// mapping or sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum NodeKind {
    Key,
    Value,
    Collection,
    /// Where a collection ends (the position of what follows it), under its path.
    CollectionEnd,
}

/// Every node of a YAML text in document order: its field path (`steps[1].command`), kind and
/// 1-based (line, column). Empty for text that does not parse.
fn yaml_nodes(text: &str) -> Vec<(String, NodeKind, (u32, u32))> {
    use serde_saphyr::granit_parser::{Event, Parser};
    enum Frame {
        Map { key: Option<String> },
        Seq { index: usize },
    }
    fn child(path: &str, frame: &Frame) -> Option<String> {
        match frame {
            Frame::Map { key: Some(k) } if path.is_empty() => Some(k.clone()),
            Frame::Map { key: Some(k) } => Some(format!("{path}.{k}")),
            Frame::Map { key: None } => None,
            Frame::Seq { index } => Some(format!("{path}[{index}]")),
        }
    }
    // After a value completes, a mapping expects a key next and a sequence moves on.
    fn advance(stack: &mut [(Frame, String)]) {
        if let Some((frame, _)) = stack.last_mut() {
            match frame {
                Frame::Map { key } => *key = None,
                Frame::Seq { index } => *index += 1,
            }
        }
    }
    let mut out = Vec::new();
    let mut stack: Vec<(Frame, String)> = Vec::new();
    for item in Parser::new_from_str(text) {
        let Ok((event, span)) = item else {
            return Vec::new();
        };
        let pos = (span.start.line() as u32, span.start.col() as u32 + 1);
        let value_path = stack.last().and_then(|(f, p)| child(p, f));
        match event {
            Event::MappingStart(..) | Event::SequenceStart(..) => {
                let path = match stack.last() {
                    None => String::new(),
                    Some(_) => match value_path {
                        Some(p) => p,
                        None => return out, // complex keys: not part of our format
                    },
                };
                out.push((path.clone(), NodeKind::Collection, pos));
                let frame = if matches!(event, Event::MappingStart(..)) {
                    Frame::Map { key: None }
                } else {
                    Frame::Seq { index: 0 }
                };
                stack.push((frame, path));
            }
            Event::MappingEnd | Event::SequenceEnd => {
                if let Some((_, path)) = stack.pop() {
                    out.push((path, NodeKind::CollectionEnd, pos));
                }
                advance(&mut stack);
            }
            Event::Scalar(value, ..) => match stack.last_mut() {
                Some((Frame::Map { key }, path)) if key.is_none() => {
                    let k = value.to_string();
                    let full = if path.is_empty() {
                        k.clone()
                    } else {
                        format!("{path}.{k}")
                    };
                    out.push((full, NodeKind::Key, pos));
                    *key = Some(k);
                }
                Some(_) => {
                    if let Some(p) = value_path {
                        out.push((p, NodeKind::Value, pos));
                    }
                    advance(&mut stack);
                }
                None => {}
            },
            Event::Alias(_) => advance(&mut stack),
            _ => {}
        }
    }
    out
}

/// 1-based (line, column) of every node of a YAML text, by field path (`steps[1].command`):
/// a scalar's value, otherwise its key. Used to point CLI messages at the line a semantic
/// [`Issue`] concerns. Returns an empty map for text that does not parse.
pub fn yaml_locations(text: &str) -> HashMap<String, (u32, u32)> {
    let mut out = HashMap::new();
    for (path, kind, pos) in yaml_nodes(text) {
        if path.is_empty() || kind == NodeKind::CollectionEnd {
            continue;
        }
        if kind == NodeKind::Value {
            out.insert(path, pos);
        } else {
            out.entry(path).or_insert(pos);
        }
    }
    out
}

/// The field path of the node a parse error points at: the deepest node that begins at the
/// position, otherwise the last one before it. A missing field is named inside the mapping
/// that lacks it. `None` when the text does not parse as YAML at all.
fn path_at(
    text: &str,
    position: (u32, u32),
    missing_field: Option<&str>,
) -> Option<(String, NodeKind)> {
    let nodes = yaml_nodes(text);
    let before = nodes
        .iter()
        .filter(|(_, kind, pos)| *pos <= position && *kind != NodeKind::CollectionEnd);
    let path = if let Some(field) = missing_field {
        // The mapping that lacks the field contains the position: the innermost collection
        // that began at or before it and had not ended before it (one that ended there is the
        // one before the position, not the one around it).
        let ended_by = |path: &str, start: (u32, u32)| {
            nodes.iter().any(|(p, kind, pos)| {
                *kind == NodeKind::CollectionEnd && p == path && *pos > start && *pos <= position
            })
        };
        let (path, _, _) = before
            .filter(|(path, kind, start)| *kind == NodeKind::Collection && !ended_by(path, *start))
            .max_by_key(|(path, _, pos)| (*pos, path.len()))?;
        let path = if path.is_empty() {
            field.to_owned()
        } else {
            format!("{path}.{field}")
        };
        (path, NodeKind::Collection)
    } else {
        let (_, _, at) = before.clone().max_by_key(|(_, _, pos)| *pos)?;
        let (path, kind, _) = before
            .filter(|(_, _, pos)| pos == at)
            .max_by_key(|(path, _, _)| path.len())?;
        (path.clone(), *kind)
    };
    (!path.0.is_empty()).then_some(path)
}

/// The position for an issue path: the path itself or its nearest ancestor that has one.
pub fn locate(locations: &HashMap<String, (u32, u32)>, path: &str) -> Option<(u32, u32)> {
    let mut current = path.to_owned();
    loop {
        if let Some(pos) = locations.get(&current) {
            return Some(*pos);
        }
        let cut = current.rfind(['.', '['])?;
        current.truncate(cut);
        if current.is_empty() {
            return None;
        }
    }
}

/// Parses a time-window bound: `HH:MM` or `HH:MM:SS`, 24-hour, two digits each.
pub fn parse_time_of_day(s: &str) -> Option<NaiveTime> {
    let bytes = s.as_bytes();
    let well_formed = match bytes.len() {
        5 => bytes[2] == b':',
        8 => bytes[2] == b':' && bytes[5] == b':',
        _ => false,
    } && s
        .bytes()
        .enumerate()
        .all(|(i, b)| i % 3 == 2 || b.is_ascii_digit());
    if !well_formed {
        return None;
    }
    let format = if bytes.len() == 5 {
        "%H:%M"
    } else {
        "%H:%M:%S"
    };
    // chrono reads second 60 as a leap second; a time window has none.
    NaiveTime::parse_from_str(s, format)
        .ok()
        .filter(|t| t.nanosecond() < 1_000_000_000)
}

/// A JSON object as a map of strings (labels, annotations, `labels_match`,
/// `environment_vars` as stored): string values as they are, any other value as its JSON text;
/// anything but an object is empty.
pub fn string_map(value: &serde_json::Value) -> BTreeMap<String, String> {
    value
        .as_object()
        .map(|o| {
            o.iter()
                .map(|(k, v)| {
                    let s = v.as_str().map_or_else(|| v.to_string(), str::to_owned);
                    (k.clone(), s)
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Writes a time of day the canonical way: `HH:MM`, or `HH:MM:SS` when seconds are set.
pub fn format_time_of_day(t: NaiveTime) -> String {
    use chrono::Timelike;
    if t.second() == 0 {
        t.format("%H:%M").to_string()
    } else {
        t.format("%H:%M:%S").to_string()
    }
}

fn valid_runbook_name(name: &str) -> bool {
    !name.is_empty()
        && name.chars().count() <= 200
        && name
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphanumeric())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

/// Whether a variable name says its value is a secret.
pub fn is_secret_name(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    [
        "password",
        "passwd",
        "secret",
        "token",
        "api_key",
        "apikey",
        "private_key",
        "credential",
    ]
    .iter()
    .any(|m| lower.contains(m))
}

/// The longest `config.approval_timeout_seconds`: a year.
pub const MAX_APPROVAL_TIMEOUT_SECONDS: i64 = 365 * 24 * 3600;

/// Whether `name` can be a variable name in templates.
pub fn valid_identifier(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// The most retries a runbook (`max_retries`) or a step (`retry_count`) may ask for.
pub const MAX_RETRIES: i32 = 100;

/// Names of the template context that environment variables may not shadow.
pub const RESERVED_CONTEXT_NAMES: [&str; 5] = ["alert", "server", "vars", "steps", "execution"];

/// The structural checks of a document (everything except templates). Paths use the list
/// positions of the document as written. Returns every problem found, in document order.
pub fn validate(doc: &RunbookDocument) -> Vec<Issue> {
    let mut issues = Vec::new();
    let mut push = |path: String, message: String| issues.push(Issue { path, message });

    if !valid_runbook_name(&doc.name) {
        push(
            "name".into(),
            "must be 1 to 200 characters: letters, digits, '.', '_' or '-', starting with a letter or digit"
                .into(),
        );
    }
    if let Some(c) = &doc.category
        && (c.is_empty() || c.chars().count() > 100)
    {
        push("category".into(), "must be 1 to 100 characters".into());
    }
    if doc.timeout_seconds <= 0 {
        push("timeout_seconds".into(), "must be > 0".into());
    }
    if !(0..=MAX_RETRIES).contains(&doc.max_retries) {
        push("max_retries".into(), format!("must be 0 to {MAX_RETRIES}"));
    }
    if doc.retry_delay_seconds < 0 {
        push("retry_delay_seconds".into(), "must be >= 0".into());
    }
    match (doc.rate_limit_count, doc.rate_limit_window_seconds) {
        (None, None) => {}
        (Some(c), Some(w)) => {
            if c <= 0 {
                push("rate_limit_count".into(), "must be > 0".into());
            }
            if w <= 0 {
                push("rate_limit_window_seconds".into(), "must be > 0".into());
            }
        }
        (Some(_), None) => push(
            "rate_limit_window_seconds".into(),
            "must be set when rate_limit_count is".into(),
        ),
        (None, Some(_)) => push(
            "rate_limit_count".into(),
            "must be set when rate_limit_window_seconds is".into(),
        ),
    }
    let mut seen_roles = HashSet::new();
    for (i, role) in doc.approval_roles.iter().enumerate() {
        if role.parse::<Role>().is_err() {
            push(
                format!("approval_roles[{i}]"),
                format!("is `{role}`; must be one of admin, engineer, operator, viewer"),
            );
        } else if !seen_roles.insert(role.as_str()) {
            push(format!("approval_roles[{i}]"), format!("repeats `{role}`"));
        }
    }
    // A run that waits for approval needs someone who may give it: approving takes the
    // operator role at least.
    let needs_approval = doc.requires_approval || doc.mode == ExecutionMode::SemiAuto;
    let can_approve = doc
        .approval_roles
        .iter()
        .filter_map(|r| r.parse::<Role>().ok())
        .any(|r| r >= Role::Operator);
    if needs_approval && !can_approve {
        push(
            "approval_roles".into(),
            format!(
                "must name operator, engineer or admin: runs of this runbook wait for approval \
                 ({}), and approving takes the operator role at least",
                if doc.requires_approval {
                    "requires_approval is true"
                } else {
                    "mode is semi_auto"
                }
            ),
        );
    }
    // A list of tags, or `{tags, environments, server_ids}` (`domain::targeting`).
    if let Err(e) = super::targeting::AllowedServers::parse(&doc.allowed_servers) {
        let (path, reason) = e
            .split_once(": ")
            .unwrap_or(("allowed_servers", e.as_str()));
        push(path.to_owned(), reason.to_owned());
    }
    if !doc.config.is_object() {
        push("config".into(), "must be a mapping".into());
    }
    // The keys the product reads; others are free-form.
    if let Some(timeout) = doc.config.get("approval_timeout_seconds")
        && !timeout
            .as_i64()
            .is_some_and(|t| (1..=MAX_APPROVAL_TIMEOUT_SECONDS).contains(&t))
    {
        push(
            "config.approval_timeout_seconds".into(),
            format!("must be a whole number of seconds from 1 to {MAX_APPROVAL_TIMEOUT_SECONDS}"),
        );
    }
    if let Some(names) = doc.config.get("secret_vars") {
        match names.as_array() {
            None => push(
                "config.secret_vars".into(),
                "must be a list of variable names".into(),
            ),
            Some(names) => {
                for (i, name) in names.iter().enumerate() {
                    if !name.as_str().is_some_and(valid_identifier) {
                        push(
                            format!("config.secret_vars[{i}]"),
                            "must be a variable name (letters, digits and '_', not starting with a digit)"
                                .into(),
                        );
                    }
                }
            }
        }
    }
    for name in doc.environment_vars.keys() {
        if !valid_identifier(name) {
            push(
                format!("environment_vars.{name}"),
                "must be a name of letters, digits and '_' not starting with a digit".into(),
            );
        } else if RESERVED_CONTEXT_NAMES.contains(&name.as_str()) {
            push(
                format!("environment_vars.{name}"),
                "is a reserved template name (alert, server, vars, steps, execution)".into(),
            );
        }
    }

    validate_steps(doc, &mut push);
    validate_triggers(doc, &mut push);
    if let Some(at) = serde_json::to_value(doc)
        .ok()
        .as_ref()
        .and_then(super::text::first_nul)
    {
        push(at.path.clone(), at.reason().into());
    }
    issues
}

fn validate_steps(doc: &RunbookDocument, push: &mut impl FnMut(String, String)) {
    if doc.steps.is_empty() {
        push("steps".into(), "must contain at least one step".into());
    }
    if doc.steps.len() > MAX_STEPS {
        push(
            "steps".into(),
            format!("must have at most {MAX_STEPS} steps"),
        );
    }
    let with_order = doc.steps.iter().filter(|s| s.order.is_some()).count();
    if with_order != 0 && with_order != doc.steps.len() {
        push(
            "steps".into(),
            "must give `order` on every step or on none".into(),
        );
    }
    let mut orders: HashMap<i32, usize> = HashMap::new();
    let mut names: HashMap<&str, usize> = HashMap::new();
    for (i, step) in doc.steps.iter().enumerate() {
        let p = format!("steps[{i}]");
        if let Some(order) = step.order {
            if order <= 0 {
                push(format!("{p}.order"), "must be > 0".into());
            } else if let Some(first) = orders.insert(order, i) {
                push(
                    format!("{p}.order"),
                    format!("repeats order {order} of steps[{first}]"),
                );
            }
        }
        if step.name.trim().is_empty() || step.name.chars().count() > 200 {
            push(format!("{p}.name"), "must be 1 to 200 characters".into());
        } else if let Some(first) = names.insert(step.name.as_str(), i) {
            push(
                format!("{p}.name"),
                format!("repeats the name `{}` of steps[{first}]", step.name),
            );
        }
        if step.command.trim().is_empty() {
            push(format!("{p}.command"), "must not be empty".into());
        }
        if step.expected_exit_codes.is_empty() {
            push(
                format!("{p}.expected_exit_codes"),
                "must list at least one code".into(),
            );
        }
        let mut codes = HashSet::new();
        for (j, code) in step.expected_exit_codes.iter().enumerate() {
            if !(0..=255).contains(code) {
                push(
                    format!("{p}.expected_exit_codes[{j}]"),
                    "must be between 0 and 255".into(),
                );
            } else if !codes.insert(*code) {
                push(
                    format!("{p}.expected_exit_codes[{j}]"),
                    format!("repeats {code}"),
                );
            }
        }
        if step.timeout_seconds <= 0 {
            push(format!("{p}.timeout_seconds"), "must be > 0".into());
        } else if doc.timeout_seconds > 0
            && step.timeout_seconds > doc.timeout_seconds
            // A step that keeps the default is bounded by the runbook's deadline: its author
            // set nothing to blame.
            && step.timeout_seconds != default_step_timeout()
        {
            push(
                format!("{p}.timeout_seconds"),
                format!(
                    "must not exceed the runbook timeout_seconds ({})",
                    doc.timeout_seconds
                ),
            );
        }
        if !(0..=MAX_RETRIES).contains(&step.retry_count) {
            push(
                format!("{p}.retry_count"),
                format!("must be 0 to {MAX_RETRIES}"),
            );
        }
        if step.retry_delay_seconds < 0 {
            push(format!("{p}.retry_delay_seconds"), "must be >= 0".into());
        }
        if step
            .condition
            .as_deref()
            .is_some_and(|c| c.trim().is_empty())
        {
            push(
                format!("{p}.condition"),
                "must not be empty (omit it to always run)".into(),
            );
        }
        if step
            .rollback_command
            .as_deref()
            .is_some_and(|c| c.trim().is_empty())
        {
            push(
                format!("{p}.rollback_command"),
                "must not be empty (omit it when there is none)".into(),
            );
        }
    }
}

fn validate_triggers(doc: &RunbookDocument, push: &mut impl FnMut(String, String)) {
    if doc.triggers.len() > MAX_TRIGGERS {
        push(
            "triggers".into(),
            format!("must have at most {MAX_TRIGGERS} triggers"),
        );
    }
    let mut names: HashMap<&str, usize> = HashMap::new();
    for (i, t) in doc.triggers.iter().enumerate() {
        let p = format!("triggers[{i}]");
        if t.name.trim().is_empty() || t.name.chars().count() > 200 {
            push(format!("{p}.name"), "must be 1 to 200 characters".into());
        } else if let Some(first) = names.insert(t.name.as_str(), i) {
            push(
                format!("{p}.name"),
                format!("repeats the name `{}` of triggers[{first}]", t.name),
            );
        }
        if t.alert_name_pattern.is_empty() {
            push(
                format!("{p}.alert_name_pattern"),
                "must not be empty (use `*` for any alert)".into(),
            );
        } else if let Err(e) = Pattern::compile(&t.alert_name_pattern) {
            push(format!("{p}.alert_name_pattern"), e);
        }
        for (field, value) in [
            ("severity_pattern", &t.severity_pattern),
            ("source_pattern", &t.source_pattern),
        ] {
            if let Some(v) = value
                && let Err(e) = Pattern::compile(v)
            {
                push(format!("{p}.{field}"), e);
            }
        }
        for (label, pattern) in &t.labels_match {
            // Prometheus 3 and Alertmanager 0.28 take any UTF-8 label name (`service.name`, as
            // OpenTelemetry names them), and the webhook stores them: triggers match them too.
            if label.trim().is_empty() || label.chars().any(char::is_control) {
                push(
                    format!("{p}.labels_match.{label}"),
                    "is not a label name (it is empty or holds control characters)".into(),
                );
            }
            if let Err(e) = Pattern::compile(pattern) {
                push(format!("{p}.labels_match.{label}"), e);
            }
        }
        // Each bound that is given is read, whether or not the other is.
        let mut bound = |field: &str, value: &Option<String>| {
            let value = value.as_ref()?;
            let time = parse_time_of_day(value);
            if time.is_none() {
                push(
                    format!("{p}.{field}"),
                    format!(
                        "is `{value}`; must be HH:MM or HH:MM:SS (24-hour, in the alerts.timezone setting)"
                    ),
                );
            }
            time
        };
        let start = bound("time_window_start", &t.time_window_start);
        let end = bound("time_window_end", &t.time_window_end);
        match (&t.time_window_start, &t.time_window_end) {
            (None, None) => {}
            (Some(_), Some(_)) => {
                if start.is_some() && start == end {
                    push(
                        format!("{p}.time_window_end"),
                        "must differ from time_window_start (omit both for always active)".into(),
                    );
                }
            }
            (Some(_), None) => push(
                format!("{p}.time_window_end"),
                "must be set when time_window_start is".into(),
            ),
            (None, Some(_)) => push(
                format!("{p}.time_window_start"),
                "must be set when time_window_end is".into(),
            ),
        }
        if t.cooldown_seconds < 0 {
            push(format!("{p}.cooldown_seconds"), "must be >= 0".into());
        }
    }
}

impl StepDocument {
    /// The `step_order` of the step at list position `index` (0-based).
    pub fn effective_order(&self, index: usize) -> i32 {
        self.order
            .unwrap_or_else(|| i32::try_from(index + 1).unwrap_or(i32::MAX))
    }
}

/// The canonical form of a (valid) document; see the module documentation.
pub fn canonicalize(doc: &RunbookDocument) -> RunbookDocument {
    let mut doc = doc.clone();
    let mut steps: Vec<(i32, StepDocument)> = doc
        .steps
        .drain(..)
        .enumerate()
        .map(|(i, s)| (s.effective_order(i), s))
        .collect();
    steps.sort_by_key(|(order, _)| *order);
    let sequential = steps
        .iter()
        .enumerate()
        .all(|(i, (order, _))| usize::try_from(*order).ok() == Some(i + 1));
    doc.steps = steps
        .into_iter()
        .map(|(order, mut s)| {
            s.order = if sequential { None } else { Some(order) };
            s
        })
        .collect();
    doc.approval_roles
        .sort_by_key(|r| std::cmp::Reverse(r.parse::<Role>().ok()));
    doc.triggers
        .sort_by(|a, b| (a.priority, &a.name).cmp(&(b.priority, &b.name)));
    for t in &mut doc.triggers {
        for bound in [&mut t.time_window_start, &mut t.time_window_end] {
            if let Some(parsed) = bound.as_deref().and_then(parse_time_of_day) {
                *bound = Some(format_time_of_day(parsed));
            }
        }
    }
    doc
}

/// Canonical YAML of a document (see the module documentation).
pub fn to_canonical_yaml(doc: &RunbookDocument) -> String {
    let canonical = canonicalize(doc);
    // Serializing plain data (strings, integers, JSON values) into a String cannot fail.
    serde_saphyr::to_string(&canonical).unwrap_or_else(|e| format!("# cannot serialize: {e}\n"))
}

/// A short summary of what changed between two versions of a runbook, for `runbook_versions`.
pub fn change_summary(old: &RunbookDocument, new: &RunbookDocument) -> String {
    let old = canonicalize(old);
    let new = canonicalize(new);
    let mut parts = Vec::new();
    let top = |d: &RunbookDocument| {
        let mut v = serde_json::to_value(d).unwrap_or_default();
        if let Some(o) = v.as_object_mut() {
            o.remove("steps");
            o.remove("triggers");
        }
        v
    };
    let (old_top, new_top) = (top(&old), top(&new));
    let fields = [
        "name",
        "description",
        "category",
        "mode",
        "status",
        "target_os",
        "timeout_seconds",
        "max_retries",
        "retry_delay_seconds",
        "rate_limit_count",
        "rate_limit_window_seconds",
        "requires_approval",
        "approval_roles",
        "allowed_servers",
        "environment_vars",
        "config",
    ];
    let changed: Vec<&str> = fields
        .iter()
        .copied()
        .filter(|f| old_top.get(f) != new_top.get(f))
        .collect();
    if !changed.is_empty() {
        parts.push(format!("changed {}", changed.join(", ")));
    }
    let list_changes = |what: &str, old: Vec<(&str, String)>, new: Vec<(&str, String)>| {
        let old_map: BTreeMap<&str, &String> = old.iter().map(|(n, v)| (*n, v)).collect();
        let new_map: BTreeMap<&str, &String> = new.iter().map(|(n, v)| (*n, v)).collect();
        let added: Vec<String> = new
            .iter()
            .filter(|(n, _)| !old_map.contains_key(n))
            .map(|(n, _)| format!("`{n}`"))
            .collect();
        let removed: Vec<String> = old
            .iter()
            .filter(|(n, _)| !new_map.contains_key(n))
            .map(|(n, _)| format!("`{n}`"))
            .collect();
        let modified: Vec<String> = new
            .iter()
            .filter(|(n, v)| old_map.get(n).is_some_and(|o| *o != v))
            .map(|(n, _)| format!("`{n}`"))
            .collect();
        let mut out = Vec::new();
        if !added.is_empty() {
            out.push(format!("added {what} {}", added.join(", ")));
        }
        if !removed.is_empty() {
            out.push(format!("removed {what} {}", removed.join(", ")));
        }
        if !modified.is_empty() {
            out.push(format!("modified {what} {}", modified.join(", ")));
        }
        let old_names: Vec<&str> = old.iter().map(|(n, _)| *n).collect();
        let new_names: Vec<&str> = new.iter().map(|(n, _)| *n).collect();
        if out.is_empty() && old_names != new_names {
            out.push(format!("reordered {what}"));
        }
        out
    };
    let step_key = |d: &RunbookDocument| -> Vec<(String, String)> {
        d.steps
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let mut s = s.clone();
                s.order = Some(s.effective_order(i));
                (
                    s.name.clone(),
                    serde_json::to_string(&s).unwrap_or_default(),
                )
            })
            .collect()
    };
    let trigger_key = |d: &RunbookDocument| -> Vec<(String, String)> {
        d.triggers
            .iter()
            .map(|t| (t.name.clone(), serde_json::to_string(t).unwrap_or_default()))
            .collect()
    };
    let (os, ns) = (step_key(&old), step_key(&new));
    parts.extend(list_changes(
        "steps",
        os.iter().map(|(n, v)| (n.as_str(), v.clone())).collect(),
        ns.iter().map(|(n, v)| (n.as_str(), v.clone())).collect(),
    ));
    let (ot, nt) = (trigger_key(&old), trigger_key(&new));
    parts.extend(list_changes(
        "triggers",
        ot.iter().map(|(n, v)| (n.as_str(), v.clone())).collect(),
        nt.iter().map(|(n, v)| (n.as_str(), v.clone())).collect(),
    ));
    if parts.is_empty() {
        "no changes".to_owned()
    } else {
        parts.join("; ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = "name: x\nsteps:\n  - name: a\n    command: echo hi\n";

    fn doc(extra: &str) -> RunbookDocument {
        parse_yaml(&format!("{MINIMAL}{extra}")).unwrap()
    }

    #[test]
    fn schema_example_parses_and_validates() {
        let text = r#"
name: restart-service
description: Restart a failing service
category: service-management
mode: semi_auto
target_os: linux
timeout_seconds: 300
requires_approval: true
approval_roles:
  - admin
  - engineer
environment_vars:
  SERVICE_NAME: "{{ alert.labels.service }}"

steps:
  - name: Check service status
    command: systemctl status {{ SERVICE_NAME }}
    expected_exit_codes: [0, 3]  # 3 = stopped
    timeout_seconds: 30

  - name: Restart service
    command: sudo systemctl restart {{ SERVICE_NAME }}
    timeout_seconds: 60
    rollback_command: sudo systemctl stop {{ SERVICE_NAME }}

triggers:
  - name: Service down alert
    alert_name_pattern: "ServiceDown*"
    severity_pattern: "critical"
    labels_match:
      type: service
    cooldown_seconds: 300
"#;
        let d = parse_yaml(text).unwrap();
        assert_eq!(d.mode, ExecutionMode::SemiAuto);
        assert_eq!(d.steps[0].expected_exit_codes, vec![0, 3]);
        assert!(validate(&d).is_empty(), "{:?}", validate(&d));
        let yaml = to_canonical_yaml(&d);
        let again = parse_yaml(&yaml).unwrap();
        assert_eq!(canonicalize(&d), again);
        assert_eq!(to_canonical_yaml(&again), yaml);
    }

    #[test]
    fn syntax_errors_carry_line_and_column() {
        let err = parse_yaml("name: x\nsteps:\n  - name: a\n   command: [\n").unwrap_err();
        assert!(err.line.is_some(), "{err:?}");
        let err = parse_yaml("name: x\nbogus: 1\nsteps: []\n").unwrap_err();
        assert_eq!(err.line, Some(2), "{err:?}");
        assert_eq!(err.path.as_deref(), Some("bogus"), "{err:?}");
        assert!(err.to_string().starts_with("2:1: bogus "), "{err}");
    }

    #[test]
    fn parse_errors_name_the_field_in_the_products_words() {
        let cases = [
            (
                "name: x\nsteps:\n  - name: a\n    command: echo\n    timout_seconds: 5\n",
                "5:5: steps[0].timout_seconds is not a field here; the fields are order, name,",
            ),
            (
                "name: x\nsteps:\n  - name: a\n    command: echo\n    timeout_seconds: soon\n",
                "5:22: steps[0].timeout_seconds must be a whole number from",
            ),
            (
                "name: x\nsteps:\n  - name: a\n    timeout_seconds: 5\n  - name: b\n    command: echo\n",
                "4:5: steps[0].command is required",
            ),
            ("steps: []\n", "1:1: name is required"),
            (
                "name: x\nsteps:\n  - name: a\n    command: echo\n    expected_exit_codes: [0, x]\n",
                "5:30: steps[0].expected_exit_codes[1] must be a whole number",
            ),
            (
                "name: x\nmode: bogus\nsteps: []\n",
                "2:7: mode cannot be `bogus`; it is one of auto, semi_auto, manual",
            ),
            (
                "name: x\nsteps:\n  - {name: a, command: {a: 1}}\n",
                "3:24: steps[0].command must be a string",
            ),
            ("name: x\nsteps: {a: 1}\n", "2:8: steps must be a list"),
            ("name:\nsteps: []\n", "1:5: name needs a value"),
            (
                "name: x\nsteps:\n  - name: a\n    command: echo\n    capture_output: maybe\n",
                "5:21: steps[0].capture_output must be true or false",
            ),
            ("- a\n", "1:1: a runbook must be a mapping of fields"),
        ];
        for (text, expected) in cases {
            let e = parse_yaml(text).unwrap_err().to_string();
            assert!(e.starts_with(expected), "{text:?}: {e}");
        }
    }

    #[test]
    fn a_tag_outside_the_core_schema_is_refused_where_it_stands() {
        // An encrypted value must not run as the command it encrypts.
        let text = "name: x\nsteps:\n  - name: a\n    command: !vault |\n      $ANSIBLE_VAULT;1.1\n  \
                    - name: b\n    command: !!binary ZWNobw==\n    timeout_seconds: !!int 5\n";
        let e = parse_yaml(text).unwrap_err();
        assert_eq!(e.path.as_deref(), Some("steps[0].command"), "{e:?}");
        assert_eq!((e.line, e.column), (Some(4), Some(14)), "{e:?}");
        assert_eq!(
            e.to_string(),
            "4:14: steps[0].command carries the YAML tag `!vault`: runbooks give tags no \
             meaning, write the value itself"
        );
        let all = parse_yaml_all(text).unwrap_err();
        let paths: Vec<_> = all.iter().map(|p| p.path.as_deref().unwrap()).collect();
        assert_eq!(paths, ["steps[0].command", "steps[1].command"], "{all:?}");
        assert!(all[1].message.contains("`!!binary`"), "{all:?}");
        // With a field problem elsewhere, both are reported.
        let all = parse_yaml_all("name: !secret x\nbogus: 1\nsteps: []\n").unwrap_err();
        let paths: Vec<_> = all.iter().map(|p| p.path.as_deref().unwrap()).collect();
        assert_eq!(paths, ["name", "bogus"], "{all:?}");
        // Core-schema tags and the non-specific tag only say how to read a value.
        let doc = parse_yaml(
            "name: ! x\nsteps:\n  - name: !!str a\n    command: echo\n    timeout_seconds: !!int 5\n",
        )
        .unwrap();
        assert_eq!(doc.name, "x");
        assert_eq!(doc.steps[0].timeout_seconds, 5);
    }

    #[test]
    fn stand_ins_add_no_problems_of_their_own() {
        // A list element that is not a mapping is one problem, not also its missing fields.
        let problems = parse_yaml_all("name: x\nsteps: [5]\n").unwrap_err();
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert_eq!(problems[0].path.as_deref(), Some("steps[0]"));
        // Past a stand-in value the rest is not checked; past unknown fields only, it is.
        let doc = "steps:\n  - {name: a, command: 'true'}\n";
        let (_, partial) =
            parse_yaml_partial(&format!("name: x\ntimeout_seconds: soon\n{doc}")).unwrap_err();
        assert!(partial.is_none());
        let (_, partial) = parse_yaml_partial(&format!("name: x\nbogus: 1\n{doc}")).unwrap_err();
        let partial = partial.unwrap();
        assert!(!partial.keeps("bogus") && !partial.keeps("bogus.x"));
        assert!(partial.keeps("steps[0].name") && partial.keeps("bogusness"));
    }

    #[test]
    fn triggers_match_utf8_label_names() {
        let doc = |labels: &str| {
            parse_yaml(&format!(
                "name: x\nsteps:\n  - {{name: a, command: echo}}\ntriggers:\n  - name: t\n    \
                 alert_name_pattern: '*'\n    labels_match: {labels}\n"
            ))
            .unwrap()
        };
        let issues = validate(&doc("{service.name: checkout, k8s-ns: prod, Größe: L}"));
        assert!(issues.is_empty(), "{issues:?}");
        let issues = validate(&doc("{'': x}"));
        assert_eq!(issues.len(), 1, "{issues:?}");
        assert_eq!(issues[0].path, "triggers[0].labels_match.");
    }

    #[test]
    fn a_missing_field_is_named_in_the_mapping_that_lacks_it() {
        for (text, expected) in [
            (
                "name: x\nenvironment_vars:\n  A: b\ndescription: d\n",
                "steps",
            ),
            (
                "name: x\nsteps:\n  - name: a\n    expected_exit_codes: [0, 1]\n    timeout_seconds: 5\n",
                "steps[0].command",
            ),
            (
                "steps:\n  - name: a\n    command: echo\ntriggers:\n  - name: t\n    alert_name_pattern: X\n",
                "name",
            ),
            (
                "name: x\nsteps:\n  - {name: a, command: echo}\ntriggers:\n  - name: t\n    labels_match: {a: b}\n",
                "triggers[0].alert_name_pattern",
            ),
        ] {
            let problems = parse_yaml_all(text).unwrap_err();
            let paths: Vec<_> = problems.iter().map(|p| p.path.as_deref()).collect();
            assert_eq!(paths, [Some(expected)], "{text}: {problems:?}");
            assert_eq!(problems[0].message, MISSING, "{problems:?}");
        }
    }

    #[test]
    fn a_list_where_a_number_belongs_is_told_to_be_a_number() {
        let problems = parse_yaml_all(
            "name: x\nretry_delay_seconds: [1]\nsteps:\n  - name: a\n    command: echo\n    \
             timeout_seconds: {a: 1}\n    retry_count: lots\n",
        )
        .unwrap_err();
        let shown: Vec<_> = problems
            .iter()
            .map(|p| {
                (
                    p.path.as_deref().unwrap(),
                    p.message.starts_with("must be a whole number"),
                )
            })
            .collect();
        assert_eq!(
            shown,
            [
                ("retry_delay_seconds", true),
                ("steps[0].timeout_seconds", true),
                ("steps[0].retry_count", true)
            ],
            "{problems:?}"
        );
    }

    /// Each problem's line and field path.
    fn lines_and_paths(problems: &[ParseError]) -> Vec<(u32, &str)> {
        problems
            .iter()
            .map(|p| (p.line.unwrap(), p.path.as_deref().unwrap()))
            .collect()
    }

    #[test]
    fn a_collection_of_the_wrong_kind_is_one_problem_at_its_field() {
        let text = "name: ev\nmode: AUTO\nenvironment_vars: [a]\nstatus: enabled\nsteps:\n  - name: s\n    \
                    command: echo\n    timeout_seconds: x\n";
        let problems = parse_yaml_all(text).unwrap_err();
        let paths: Vec<_> = problems
            .iter()
            .map(|p| p.path.as_deref().unwrap())
            .collect();
        assert_eq!(
            paths,
            [
                "mode",
                "environment_vars",
                "status",
                "steps[0].timeout_seconds"
            ],
            "{problems:?}"
        );
        let text = "name: e\nmode: bogus\nsteps:\n  - name: s\n    command: {a: b}\n    timeout_seconds: soon\n  \
                    - name: t\n    command: echo\n    retry_count: lots\n";
        let problems = parse_yaml_all(text).unwrap_err();
        let shown = lines_and_paths(&problems);
        assert_eq!(
            shown,
            [
                (2, "mode"),
                (5, "steps[0].command"),
                (6, "steps[0].timeout_seconds"),
                (9, "steps[1].retry_count")
            ],
            "{problems:?}"
        );
    }

    #[test]
    fn unknown_keys_holding_dots_or_brackets_are_set_aside_too() {
        // Such a key is one field, not a path: the problems after it are still reported.
        let text = "name: x\n\"db.host\": 1\nsteps:\n  - name: a\n    command: echo\n    \
                    \"x[0]\": 2\n    retry_count: many\nmode: sometimes\n";
        let problems = parse_yaml_all(text).unwrap_err();
        let shown = lines_and_paths(&problems);
        assert_eq!(
            shown,
            [
                (2, "db.host"),
                (6, "steps[0].x[0]"),
                (7, "steps[0].retry_count"),
                (8, "mode")
            ],
            "{problems:?}"
        );
        // A key that only starts like another one is not taken for it.
        let (_, partial) =
            parse_yaml_partial("name: x\n\"db.host\": 1\ndb: 2\nsteps: []\n").unwrap_err();
        let partial = partial.unwrap();
        assert_eq!(partial.set_aside, ["db.host", "db"], "{partial:?}");
    }

    #[test]
    fn every_field_problem_of_a_document_is_reported() {
        let text = "name: x\nbogus: 1\nmode: sometimes\nsteps:\n  - name: a\n    command: echo\n    \
                    timeout_seconds: soon\n  - name: b\n    command: echo\n    retry_count: many\n    \
                    capture: true\n";
        let problems = parse_yaml_all(text).unwrap_err();
        let shown: Vec<String> = problems
            .iter()
            .map(|p| {
                format!(
                    "{}:{} {}",
                    p.line.unwrap(),
                    p.column.unwrap(),
                    p.path.as_deref().unwrap()
                )
            })
            .collect();
        assert_eq!(
            shown,
            [
                "2:1 bogus",
                "3:7 mode",
                "7:22 steps[0].timeout_seconds",
                "10:18 steps[1].retry_count",
                "11:5 steps[1].capture",
            ],
            "{problems:?}"
        );
        // A required field set aside for its type is reported once, not again as missing.
        let problems = parse_yaml_all("name: [x]\nsteps: []\nbogus: 1\n").unwrap_err();
        let paths: Vec<_> = problems.iter().map(|p| p.path.as_deref()).collect();
        assert_eq!(paths, [Some("name"), Some("bogus")], "{problems:?}");
        // A missing field is reported at the mapping that lacks it.
        let problems = parse_yaml_all("steps: []\nbogus: 1\nmode: x\n").unwrap_err();
        let shown: Vec<_> = problems
            .iter()
            .map(|p| (p.line, p.column, p.path.as_deref()))
            .collect();
        assert_eq!(
            shown,
            [
                (Some(1), Some(1), Some("name")),
                (Some(2), Some(1), Some("bogus")),
                (Some(3), Some(7), Some("mode"))
            ],
            "{problems:?}"
        );
        // A missing field does not hide the problems after it.
        let problems =
            parse_yaml_all("name: b\nmode: turbo\nunknown_field: 1\nsteps: [{name: s1}]\n")
                .unwrap_err();
        let mut paths: Vec<_> = problems
            .iter()
            .map(|p| p.path.as_deref().unwrap())
            .collect();
        paths.sort_unstable();
        assert_eq!(
            paths,
            ["mode", "steps[0].command", "unknown_field"],
            "{problems:?}"
        );
        // Elements of a list and values after them: each is reported where the file has it.
        let problems = parse_yaml_all(
            "name: x\nsteps:\n  - name: a\n    command: echo\n    expected_exit_codes: [0, x, y]\n  - name: b\n    command: [echo]\n    timeout_seconds: soon\n    capture_output: maybe\n",
        )
        .unwrap_err();
        let paths: Vec<_> = problems
            .iter()
            .map(|p| p.path.as_deref().unwrap())
            .collect();
        assert_eq!(
            paths,
            [
                "steps[0].expected_exit_codes[1]",
                "steps[0].expected_exit_codes[2]",
                "steps[1].command",
                "steps[1].timeout_seconds",
                "steps[1].capture_output",
            ],
            "{problems:?}"
        );
        // A valid document reads as with parse_yaml.
        assert!(parse_yaml_all(MINIMAL).is_ok());
    }

    #[test]
    fn a_malformed_time_window_bound_is_named_even_without_the_other() {
        let d = parse_yaml(&format!(
            "{MINIMAL}triggers:\n  - name: t\n    alert_name_pattern: '*'\n    time_window_start: '25:99'\n"
        ))
        .unwrap();
        let found: Vec<String> = validate(&d).iter().map(ToString::to_string).collect();
        assert_eq!(
            found,
            [
                "triggers[0].time_window_start is `25:99`; must be HH:MM or HH:MM:SS (24-hour, in the alerts.timezone setting)",
                "triggers[0].time_window_end must be set when time_window_start is",
            ]
        );
    }

    #[test]
    fn a_step_without_its_own_timeout_fits_a_short_runbook() {
        let d =
            parse_yaml("name: x\ntimeout_seconds: 5\nsteps:\n  - name: a\n    command: 'true'\n")
                .unwrap();
        assert!(validate(&d).is_empty(), "{:?}", validate(&d));
        let d = parse_yaml(
            "name: x\ntimeout_seconds: 5\nsteps:\n  - name: a\n    command: 'true'\n    timeout_seconds: 6\n",
        )
        .unwrap();
        assert_eq!(validate(&d)[0].path, "steps[0].timeout_seconds");
    }

    #[test]
    fn the_config_keys_the_product_reads_are_checked() {
        let issues = |config: &str| -> Vec<String> {
            let d = parse_yaml(&format!(
                "name: x\nconfig: {config}\nsteps:\n  - name: a\n    command: 'true'\n"
            ))
            .unwrap();
            validate(&d).into_iter().map(|i| i.path).collect()
        };
        // A secret list given as one name would leave the value unmasked; a timeout past the
        // bound or in text would not be what it says.
        assert_eq!(issues("{secret_vars: TOKEN}"), ["config.secret_vars"]);
        assert_eq!(
            issues("{secret_vars: [TOKEN, 'not a name', 3]}"),
            ["config.secret_vars[1]", "config.secret_vars[2]"]
        );
        for timeout in ["10000000000000000", "'20s'", "0", "-5", "1.5"] {
            assert_eq!(
                issues(&format!("{{approval_timeout_seconds: {timeout}}}")),
                ["config.approval_timeout_seconds"],
                "{timeout}"
            );
        }
        assert!(
            issues("{approval_timeout_seconds: 600, secret_vars: [TOKEN], team: sre}").is_empty()
        );
    }

    #[test]
    fn oversized_documents_are_refused() {
        let big = format!(
            "{MINIMAL}description: \"{}\"\n",
            "a".repeat(MAX_DOCUMENT_BYTES)
        );
        assert!(parse_yaml(&big).unwrap_err().message.contains("exceeds"));
    }

    #[test]
    fn locations_point_at_nested_fields() {
        let text = "name: x\nsteps:\n  - name: a\n    command: echo\n  - name: b\n    timeout_seconds: 0\n";
        let locs = yaml_locations(text);
        assert_eq!(locate(&locs, "steps[1].timeout_seconds"), Some((6, 22)));
        assert_eq!(locate(&locs, "steps[1].command"), Some((5, 5)));
        assert_eq!(locate(&locs, "name"), Some((1, 7)));
    }

    #[test]
    fn parser_messages_speak_of_runbooks() {
        let two = parse_yaml("name: a\nsteps: []\n---\nname: b\nsteps: []\n").unwrap_err();
        assert!(
            two.message.starts_with("holds more than one YAML document"),
            "{}",
            two.message
        );
        let dup = parse_yaml("name: a\nname: b\nsteps: []\n").unwrap_err();
        assert!(
            !dup.message.contains("DuplicateKeyPolicy"),
            "{}",
            dup.message
        );
    }

    #[test]
    fn time_of_day_parsing() {
        assert!(parse_time_of_day("22:00").is_some());
        assert!(parse_time_of_day("06:30:15").is_some());
        for bad in [
            "24:00",
            "9:00",
            "12:60",
            "09:00:60",
            "23:59:60",
            "noon",
            "12:00:00:00",
            "",
        ] {
            assert!(parse_time_of_day(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn canonical_order_is_written_only_when_needed() {
        let d = parse_yaml(
            "name: x\nsteps:\n  - {order: 20, name: b, command: b}\n  - {order: 10, name: a, command: a}\n",
        )
        .unwrap();
        let c = canonicalize(&d);
        assert_eq!(c.steps[0].name, "a");
        assert_eq!(c.steps[0].order, Some(10));
        let d = parse_yaml(
            "name: x\nsteps:\n  - {order: 2, name: b, command: b}\n  - {order: 1, name: a, command: a}\n",
        )
        .unwrap();
        let c = canonicalize(&d);
        assert_eq!((c.steps[0].name.as_str(), c.steps[0].order), ("a", None));
    }

    #[test]
    fn change_summary_names_what_changed() {
        let a = doc("");
        let mut b = a.clone();
        b.description = Some("new".into());
        b.steps.push(StepDocument {
            name: "verify".into(),
            ..a.steps[0].clone()
        });
        let s = change_summary(&a, &b);
        assert!(s.contains("changed description"), "{s}");
        assert!(s.contains("added steps `verify`"), "{s}");
        assert_eq!(change_summary(&a, &a), "no changes");
    }
}
