//! Runbooks: create, read, list, update and delete whole documents (runbook, steps, triggers),
//! their versions (list, get, diff, restore), YAML import/export, validation and dry runs.
//! Engineer to write, viewer to read. The document rules live in `domain::runbook` and
//! `templates`; the SQL in `store::runbooks`; this file maps requests and errors.

use std::collections::{BTreeMap, HashMap};

use chrono::{DateTime, Utc};
use poem::Request;
use poem_openapi::payload::{Json, PlainText};
use poem_openapi::{ApiRequest, ApiResponse, Enum, Object, OpenApi, param::Path, param::Query};
use uuid::Uuid;

use crate::domain::Role;
use crate::domain::runbook::{
    ExecutionMode, Issue, MAX_DOCUMENT_BYTES, RunbookDocument, RunbookStatus, StepDocument,
    TargetOs, TriggerDocument, locate, parse_yaml, parse_yaml_all, to_canonical_yaml,
    yaml_locations,
};
use crate::domain::trigger_match::{AlertFacts, trigger_matches_in};
use crate::store::{self, runbooks::StoredRunbook};
use crate::templates::{TemplateContext, render_dry_run, validate_runbook};

use super::Tag;
use super::context::{AppState, BearerAuth};
use super::error::{ApiError, ErrorBody};
use super::pagination::Page;

/// `mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Enum)]
#[oai(rename_all = "snake_case")]
pub enum ModeName {
    /// Runs when a trigger matches.
    Auto,
    /// Proposed on a match; a human starts it.
    SemiAuto,
    /// Started by hand only.
    Manual,
}

/// `status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Enum)]
#[oai(rename_all = "snake_case")]
pub enum StatusName {
    /// In use.
    Active,
    /// Never run.
    Disabled,
    /// Being written.
    Draft,
}

/// `target_os`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Enum)]
#[oai(rename_all = "snake_case")]
pub enum OsName {
    /// POSIX sh over SSH.
    Linux,
    /// PowerShell over WinRM.
    Windows,
}

impl From<ModeName> for ExecutionMode {
    fn from(m: ModeName) -> Self {
        match m {
            ModeName::Auto => ExecutionMode::Auto,
            ModeName::SemiAuto => ExecutionMode::SemiAuto,
            ModeName::Manual => ExecutionMode::Manual,
        }
    }
}
impl From<ExecutionMode> for ModeName {
    fn from(m: ExecutionMode) -> Self {
        match m {
            ExecutionMode::Auto => ModeName::Auto,
            ExecutionMode::SemiAuto => ModeName::SemiAuto,
            ExecutionMode::Manual => ModeName::Manual,
        }
    }
}
impl From<StatusName> for RunbookStatus {
    fn from(s: StatusName) -> Self {
        match s {
            StatusName::Active => RunbookStatus::Active,
            StatusName::Disabled => RunbookStatus::Disabled,
            StatusName::Draft => RunbookStatus::Draft,
        }
    }
}
impl From<RunbookStatus> for StatusName {
    fn from(s: RunbookStatus) -> Self {
        match s {
            RunbookStatus::Active => StatusName::Active,
            RunbookStatus::Disabled => StatusName::Disabled,
            RunbookStatus::Draft => StatusName::Draft,
        }
    }
}
impl From<OsName> for TargetOs {
    fn from(o: OsName) -> Self {
        match o {
            OsName::Linux => TargetOs::Linux,
            OsName::Windows => TargetOs::Windows,
        }
    }
}
impl From<TargetOs> for OsName {
    fn from(o: TargetOs) -> Self {
        match o {
            TargetOs::Linux => OsName::Linux,
            TargetOs::Windows => OsName::Windows,
        }
    }
}

/// One step. In requests, omitted fields take their defaults; responses give every field.
#[derive(Debug, Clone, Object)]
#[oai(deny_unknown_fields)]
pub struct StepSpec {
    /// `step_order`; give it on every step or none (then the list position counts from 1).
    #[oai(skip_serializing_if_is_none)]
    #[oai(nullable)]
    pub order: Option<i32>,
    /// Unique within the runbook.
    pub name: String,
    /// What the step does.
    #[oai(skip_serializing_if_is_none)]
    #[oai(nullable)]
    pub description: Option<String>,
    /// Command template; every `{{ }}` value is shell-quoted.
    pub command: String,
    /// Success exit codes (default [0]).
    #[oai(skip_serializing_if_is_none)]
    #[oai(nullable)]
    pub expected_exit_codes: Option<Vec<i32>>,
    /// Step limit in seconds (default 60).
    #[oai(skip_serializing_if_is_none)]
    #[oai(nullable)]
    pub timeout_seconds: Option<i32>,
    /// Continue after a failure (default false).
    #[oai(skip_serializing_if_is_none)]
    #[oai(nullable)]
    pub continue_on_failure: Option<bool>,
    /// minijinja expression; the step is skipped when false.
    #[oai(skip_serializing_if_is_none)]
    #[oai(nullable)]
    pub condition: Option<String>,
    /// Command template that undoes the step.
    #[oai(skip_serializing_if_is_none)]
    #[oai(nullable)]
    pub rollback_command: Option<String>,
    /// Step retries (default 0).
    #[oai(skip_serializing_if_is_none)]
    #[oai(nullable)]
    pub retry_count: Option<i32>,
    /// Seconds between retries (default 5).
    #[oai(skip_serializing_if_is_none)]
    #[oai(nullable)]
    pub retry_delay_seconds: Option<i32>,
    /// Keep stdout for later steps (default false).
    #[oai(skip_serializing_if_is_none)]
    #[oai(nullable)]
    pub capture_output: Option<bool>,
    /// Mask output (default false).
    #[oai(skip_serializing_if_is_none)]
    #[oai(nullable)]
    pub sensitive: Option<bool>,
}

/// One trigger. In requests, omitted fields take their defaults; responses give every field.
#[derive(Debug, Clone, Object)]
#[oai(deny_unknown_fields)]
pub struct TriggerSpec {
    /// Unique within the runbook.
    pub name: String,
    /// Lower wins (default 100).
    #[oai(skip_serializing_if_is_none)]
    #[oai(nullable)]
    pub priority: Option<i32>,
    /// Glob, or regex as `/.../` or `re:...`, on the alert name.
    pub alert_name_pattern: String,
    /// Pattern on the severity (absent: any). An alert without a severity is matched as the
    /// empty string, so `*` matches it.
    #[oai(skip_serializing_if_is_none)]
    #[oai(nullable)]
    pub severity_pattern: Option<String>,
    /// Pattern on the source (absent: any). An alert without a source is matched as the empty
    /// string, so `*` matches it.
    #[oai(skip_serializing_if_is_none)]
    #[oai(nullable)]
    pub source_pattern: Option<String>,
    /// Label name -> pattern; all must match. A missing label is matched as the empty string.
    #[oai(skip_serializing_if_is_none)]
    #[oai(nullable)]
    pub labels_match: Option<BTreeMap<String, String>>,
    /// `HH:MM` in the `alerts.timezone` setting (default UTC); with `time_window_end`.
    #[oai(skip_serializing_if_is_none)]
    #[oai(nullable)]
    pub time_window_start: Option<String>,
    /// `HH:MM` in the same timezone; earlier than the start wraps midnight.
    #[oai(skip_serializing_if_is_none)]
    #[oai(nullable)]
    pub time_window_end: Option<String>,
    /// Considered at all (default true).
    #[oai(skip_serializing_if_is_none)]
    #[oai(nullable)]
    pub enabled: Option<bool>,
    /// Seconds between firings (default 0).
    #[oai(skip_serializing_if_is_none)]
    #[oai(nullable)]
    pub cooldown_seconds: Option<i32>,
    /// Count the cooldown per alerting instance (`instance` label) instead of per trigger
    /// (default false).
    #[oai(skip_serializing_if_is_none)]
    #[oai(nullable)]
    pub cooldown_per_instance: Option<bool>,
}

/// A whole runbook document: the YAML format as JSON. In requests, omitted fields take their
/// defaults; responses give every field.
#[derive(Debug, Clone, Object)]
#[oai(deny_unknown_fields)]
pub struct RunbookSpec {
    /// Unique name: letters, digits, `.`, `_`, `-`.
    pub name: String,
    /// Description.
    #[oai(skip_serializing_if_is_none)]
    #[oai(nullable)]
    pub description: Option<String>,
    /// Category.
    #[oai(skip_serializing_if_is_none)]
    #[oai(nullable)]
    pub category: Option<String>,
    /// Default manual.
    #[oai(skip_serializing_if_is_none)]
    #[oai(nullable)]
    pub mode: Option<ModeName>,
    /// Default active.
    #[oai(skip_serializing_if_is_none)]
    #[oai(nullable)]
    pub status: Option<StatusName>,
    /// Default linux.
    #[oai(skip_serializing_if_is_none)]
    #[oai(nullable)]
    pub target_os: Option<OsName>,
    /// Whole-run limit (default 300).
    #[oai(skip_serializing_if_is_none)]
    #[oai(nullable)]
    pub timeout_seconds: Option<i32>,
    /// Run retries (default 0).
    #[oai(skip_serializing_if_is_none)]
    #[oai(nullable)]
    pub max_retries: Option<i32>,
    /// Seconds between run retries (default 60).
    #[oai(skip_serializing_if_is_none)]
    #[oai(nullable)]
    pub retry_delay_seconds: Option<i32>,
    /// Runs per window (with `rate_limit_window_seconds`).
    #[oai(skip_serializing_if_is_none)]
    #[oai(nullable)]
    pub rate_limit_count: Option<i32>,
    /// Window in seconds.
    #[oai(skip_serializing_if_is_none)]
    #[oai(nullable)]
    pub rate_limit_window_seconds: Option<i32>,
    /// Needs approval (default false).
    #[oai(skip_serializing_if_is_none)]
    #[oai(nullable)]
    pub requires_approval: Option<bool>,
    /// Approving roles (default admin, engineer).
    #[oai(skip_serializing_if_is_none)]
    #[oai(nullable)]
    pub approval_roles: Option<Vec<String>>,
    /// Servers the runbook may run on: a list of tags (`name` or `name=value`, all required), or
    /// `{"tags": [...], "environments": [...], "server_ids": [...]}` (a listed server, or one
    /// carrying every tag in one of the environments); empty allows every server.
    #[oai(skip_serializing_if_is_none)]
    #[oai(nullable)]
    pub allowed_servers: Option<serde_json::Value>,
    /// Variable templates, available as `vars.NAME` and `NAME`.
    #[oai(skip_serializing_if_is_none)]
    #[oai(nullable)]
    pub environment_vars: Option<BTreeMap<String, String>>,
    /// Extra configuration, a mapping.
    #[oai(skip_serializing_if_is_none)]
    #[oai(nullable)]
    pub config: Option<serde_json::Value>,
    /// Steps.
    pub steps: Vec<StepSpec>,
    /// Triggers.
    #[oai(skip_serializing_if_is_none)]
    #[oai(nullable)]
    pub triggers: Option<Vec<TriggerSpec>>,
}

impl RunbookSpec {
    /// The domain document, defaults applied.
    pub fn into_document(self) -> RunbookDocument {
        use crate::domain::runbook as d;
        RunbookDocument {
            name: self.name,
            description: self.description,
            category: self.category,
            mode: self.mode.map(Into::into).unwrap_or_default(),
            status: self.status.map(Into::into).unwrap_or_default(),
            target_os: self.target_os.map(Into::into).unwrap_or_default(),
            timeout_seconds: self
                .timeout_seconds
                .unwrap_or_else(d::default_runbook_timeout),
            max_retries: self.max_retries.unwrap_or(0),
            retry_delay_seconds: self
                .retry_delay_seconds
                .unwrap_or_else(d::default_runbook_retry_delay),
            rate_limit_count: self.rate_limit_count,
            rate_limit_window_seconds: self.rate_limit_window_seconds,
            requires_approval: self.requires_approval.unwrap_or(false),
            approval_roles: self
                .approval_roles
                .unwrap_or_else(d::default_approval_roles),
            allowed_servers: self
                .allowed_servers
                .unwrap_or_else(d::default_allowed_servers),
            environment_vars: self.environment_vars.unwrap_or_default(),
            config: self.config.unwrap_or_else(d::default_config),
            steps: self
                .steps
                .into_iter()
                .map(|s| StepDocument {
                    order: s.order,
                    name: s.name,
                    description: s.description,
                    command: s.command,
                    expected_exit_codes: s
                        .expected_exit_codes
                        .unwrap_or_else(d::default_exit_codes),
                    timeout_seconds: s.timeout_seconds.unwrap_or_else(d::default_step_timeout),
                    continue_on_failure: s.continue_on_failure.unwrap_or(false),
                    condition: s.condition,
                    rollback_command: s.rollback_command,
                    retry_count: s.retry_count.unwrap_or(0),
                    retry_delay_seconds: s
                        .retry_delay_seconds
                        .unwrap_or_else(d::default_step_retry_delay),
                    capture_output: s.capture_output.unwrap_or(false),
                    sensitive: s.sensitive.unwrap_or(false),
                })
                .collect(),
            triggers: self
                .triggers
                .unwrap_or_default()
                .into_iter()
                .map(|t| TriggerDocument {
                    name: t.name,
                    priority: t.priority.unwrap_or_else(d::default_priority),
                    alert_name_pattern: t.alert_name_pattern,
                    severity_pattern: t.severity_pattern,
                    source_pattern: t.source_pattern,
                    labels_match: t.labels_match.unwrap_or_default(),
                    time_window_start: t.time_window_start,
                    time_window_end: t.time_window_end,
                    enabled: t.enabled.unwrap_or(true),
                    cooldown_seconds: t.cooldown_seconds.unwrap_or(0),
                    cooldown_per_instance: t.cooldown_per_instance.unwrap_or(false),
                })
                .collect(),
        }
    }

    /// Every field written out.
    pub fn from_document(doc: &RunbookDocument) -> RunbookSpec {
        RunbookSpec {
            name: doc.name.clone(),
            description: doc.description.clone(),
            category: doc.category.clone(),
            mode: Some(doc.mode.into()),
            status: Some(doc.status.into()),
            target_os: Some(doc.target_os.into()),
            timeout_seconds: Some(doc.timeout_seconds),
            max_retries: Some(doc.max_retries),
            retry_delay_seconds: Some(doc.retry_delay_seconds),
            rate_limit_count: doc.rate_limit_count,
            rate_limit_window_seconds: doc.rate_limit_window_seconds,
            requires_approval: Some(doc.requires_approval),
            approval_roles: Some(doc.approval_roles.clone()),
            allowed_servers: Some(doc.allowed_servers.clone()),
            environment_vars: Some(doc.environment_vars.clone()),
            config: Some(doc.config.clone()),
            steps: doc
                .steps
                .iter()
                .enumerate()
                .map(|(i, s)| StepSpec {
                    order: Some(s.effective_order(i)),
                    name: s.name.clone(),
                    description: s.description.clone(),
                    command: s.command.clone(),
                    expected_exit_codes: Some(s.expected_exit_codes.clone()),
                    timeout_seconds: Some(s.timeout_seconds),
                    continue_on_failure: Some(s.continue_on_failure),
                    condition: s.condition.clone(),
                    rollback_command: s.rollback_command.clone(),
                    retry_count: Some(s.retry_count),
                    retry_delay_seconds: Some(s.retry_delay_seconds),
                    capture_output: Some(s.capture_output),
                    sensitive: Some(s.sensitive),
                })
                .collect(),
            triggers: Some(
                doc.triggers
                    .iter()
                    .map(|t| TriggerSpec {
                        name: t.name.clone(),
                        priority: Some(t.priority),
                        alert_name_pattern: t.alert_name_pattern.clone(),
                        severity_pattern: t.severity_pattern.clone(),
                        source_pattern: t.source_pattern.clone(),
                        labels_match: Some(t.labels_match.clone()),
                        time_window_start: t.time_window_start.clone(),
                        time_window_end: t.time_window_end.clone(),
                        enabled: Some(t.enabled),
                        cooldown_seconds: Some(t.cooldown_seconds),
                        cooldown_per_instance: Some(t.cooldown_per_instance),
                    })
                    .collect(),
            ),
        }
    }
}

/// A stored runbook.
#[derive(Debug, Clone, Object)]
pub struct Runbook {
    /// Id.
    pub id: Uuid,
    /// Current version.
    pub version: i32,
    /// Author.
    #[oai(skip_serializing_if_is_none)]
    pub created_by: Option<Uuid>,
    /// Creation time.
    pub created_at: DateTime<Utc>,
    /// Last change.
    pub updated_at: DateTime<Utc>,
    /// The document.
    #[oai(flatten)]
    pub spec: RunbookSpec,
}

impl From<&StoredRunbook> for Runbook {
    fn from(s: &StoredRunbook) -> Runbook {
        Runbook {
            id: s.row.id,
            version: s.row.version,
            created_by: s.row.created_by,
            created_at: s.row.created_at,
            updated_at: s.row.updated_at,
            spec: RunbookSpec::from_document(&s.document()),
        }
    }
}

/// A page of runbooks.
#[derive(Debug, Object)]
pub struct RunbookPage {
    /// The runbooks on this page.
    pub items: Vec<Runbook>,
    /// All runbooks matching the filters.
    pub total: i64,
    /// Page size used.
    pub limit: i64,
    /// Offset used.
    pub offset: i64,
}

/// A version, without its YAML.
#[derive(Debug, Object)]
pub struct RunbookVersionSummary {
    /// Version number.
    pub version: i32,
    /// What changed.
    #[oai(skip_serializing_if_is_none)]
    pub change_summary: Option<String>,
    /// Who made it.
    #[oai(skip_serializing_if_is_none)]
    pub created_by: Option<Uuid>,
    /// When.
    pub created_at: DateTime<Utc>,
}

/// A page of versions, newest first.
#[derive(Debug, Object)]
pub struct RunbookVersionPage {
    /// Versions on this page.
    pub items: Vec<RunbookVersionSummary>,
    /// All versions.
    pub total: i64,
    /// Page size used.
    pub limit: i64,
    /// Offset used.
    pub offset: i64,
}

/// A version with its canonical YAML.
#[derive(Debug, Object)]
pub struct RunbookVersion {
    /// The runbook.
    pub runbook_id: Uuid,
    /// Version number.
    pub version: i32,
    /// What changed.
    #[oai(skip_serializing_if_is_none)]
    pub change_summary: Option<String>,
    /// Who made it.
    #[oai(skip_serializing_if_is_none)]
    pub created_by: Option<Uuid>,
    /// When.
    pub created_at: DateTime<Utc>,
    /// The full runbook as canonical YAML.
    pub yaml: String,
}

/// A unified diff between two versions' YAML.
#[derive(Debug, Object)]
pub struct RunbookDiff {
    /// Older side.
    pub from_version: i32,
    /// Newer side.
    pub to_version: i32,
    /// Unified diff (empty when identical).
    pub diff: String,
}

/// The result of an import or restore.
#[derive(Debug, Object)]
pub struct RunbookApplied {
    /// Whether the runbook was created.
    pub created: bool,
    /// Whether anything changed (false: same document, no new version).
    pub changed: bool,
    /// The change summary written, when something changed.
    #[oai(skip_serializing_if_is_none)]
    pub change_summary: Option<String>,
    /// The runbook after the operation.
    pub runbook: Runbook,
}

/// A runbook as YAML, for clients that send JSON only.
#[derive(Debug, Object)]
#[oai(deny_unknown_fields)]
pub struct YamlDocument {
    /// The YAML text.
    pub yaml: String,
}

/// A YAML runbook: `application/yaml` (or `text/yaml`) text, or JSON `{"yaml": "..."}`.
#[derive(Debug, ApiRequest)]
pub enum YamlBody {
    /// The YAML document.
    #[oai(content_type = "application/yaml")]
    Yaml(PlainText<String>),
    /// The YAML document.
    #[oai(content_type = "text/yaml")]
    TextYaml(PlainText<String>),
    /// The YAML document wrapped in JSON.
    Json(Json<YamlDocument>),
}

impl YamlBody {
    fn into_text(self) -> String {
        match self {
            YamlBody::Yaml(t) | YamlBody::TextYaml(t) => t.0,
            YamlBody::Json(j) => j.0.yaml,
        }
    }
}

/// One validation problem.
#[derive(Debug, Object)]
pub struct ValidationIssue {
    /// Field path (`steps[2].timeout_seconds`; 0-based indexes).
    pub path: String,
    /// What is wrong.
    pub message: String,
    /// 1-based line in the YAML, when known.
    #[oai(skip_serializing_if_is_none)]
    pub line: Option<u32>,
    /// 1-based column in the YAML, when known.
    #[oai(skip_serializing_if_is_none)]
    pub column: Option<u32>,
}

/// Whether a document is valid, and every problem when not.
#[derive(Debug, Object)]
pub struct ValidationReport {
    /// No problems.
    pub valid: bool,
    /// The runbook's name, when the document parsed.
    #[oai(skip_serializing_if_is_none)]
    pub name: Option<String>,
    /// Every problem.
    pub issues: Vec<ValidationIssue>,
}

/// The alert a dry run pretends has fired.
#[derive(Debug, Clone, Object)]
#[oai(deny_unknown_fields)]
pub struct SampleAlert {
    /// Alert name (`alertname`).
    pub name: String,
    /// Severity (default: the `severity` label).
    #[oai(nullable)]
    pub severity: Option<String>,
    /// Source (default: the `source` label, as intake reads it; a real alert without one has
    /// the host of its generatorURL).
    #[oai(nullable)]
    pub source: Option<String>,
    /// `firing` (default) or `resolved`.
    #[oai(nullable, validator(pattern = "^(firing|resolved)$"))]
    pub status: Option<String>,
    /// Labels.
    #[oai(nullable)]
    pub labels: Option<BTreeMap<String, String>>,
    /// Annotations.
    #[oai(nullable)]
    pub annotations: Option<BTreeMap<String, String>>,
}

/// A server given inline to a dry run.
#[derive(Debug, Clone, Object)]
#[oai(deny_unknown_fields)]
pub struct SampleServer {
    /// Display name.
    #[oai(nullable)]
    pub name: Option<String>,
    /// Host name or address.
    pub hostname: String,
    /// Port.
    #[oai(nullable)]
    pub port: Option<i32>,
    /// Login.
    #[oai(nullable)]
    pub username: Option<String>,
    /// linux or windows (default: the runbook's target).
    #[oai(nullable)]
    pub os_type: Option<OsName>,
    /// Environment (`production`, ...).
    #[oai(nullable)]
    pub environment: Option<String>,
    /// Tags.
    #[oai(nullable)]
    pub tags: Option<Vec<String>>,
}

/// What to dry-run: one of `runbook_id`, `runbook` or `yaml`; an alert; and a server by id or
/// inline.
#[derive(Debug, Object)]
#[oai(deny_unknown_fields)]
pub struct DryRunRequest {
    /// A stored runbook.
    #[oai(nullable)]
    pub runbook_id: Option<Uuid>,
    /// An inline document.
    #[oai(nullable)]
    pub runbook: Option<RunbookSpec>,
    /// An inline YAML document.
    #[oai(nullable)]
    pub yaml: Option<String>,
    /// The sample alert.
    pub alert: SampleAlert,
    /// A stored server.
    #[oai(nullable)]
    pub server_id: Option<Uuid>,
    /// An inline server.
    #[oai(nullable)]
    pub server: Option<SampleServer>,
    /// The time to evaluate time windows and cooldowns at (default now).
    #[oai(nullable)]
    pub at: Option<DateTime<Utc>>,
}

/// One step as it would run.
#[derive(Debug, Object)]
pub struct DryRunStep {
    /// Order.
    pub order: i32,
    /// Name.
    pub name: String,
    /// The rendered command.
    #[oai(skip_serializing_if_is_none)]
    pub command: Option<String>,
    /// Why the command cannot be rendered.
    #[oai(skip_serializing_if_is_none)]
    pub command_error: Option<String>,
    /// The condition expression.
    #[oai(skip_serializing_if_is_none)]
    pub condition: Option<String>,
    /// The condition's value.
    #[oai(skip_serializing_if_is_none)]
    pub condition_result: Option<bool>,
    /// Why the condition cannot be evaluated.
    #[oai(skip_serializing_if_is_none)]
    pub condition_error: Option<String>,
    /// The rendered rollback command.
    #[oai(skip_serializing_if_is_none)]
    pub rollback_command: Option<String>,
    /// Why the rollback cannot be rendered.
    #[oai(skip_serializing_if_is_none)]
    pub rollback_error: Option<String>,
}

/// One trigger's verdict.
#[derive(Debug, Object)]
pub struct DryRunTrigger {
    /// Trigger name.
    pub name: String,
    /// Priority.
    pub priority: i32,
    /// Whether it would fire.
    pub matched: bool,
    /// Why not.
    pub reasons: Vec<String>,
}

/// Everything a run would do, without doing it.
#[derive(Debug, Object)]
pub struct DryRunReport {
    /// Runbook name.
    pub runbook: String,
    /// Target OS (decides the quoting).
    pub target_os: OsName,
    /// The rendered environment variables.
    pub vars: BTreeMap<String, String>,
    /// Why the variables could not be rendered.
    #[oai(skip_serializing_if_is_none)]
    pub vars_error: Option<String>,
    /// Steps in order.
    pub steps: Vec<DryRunStep>,
    /// Every trigger, by priority.
    pub triggers: Vec<DryRunTrigger>,
    /// The trigger that would start the run (first match by priority).
    #[oai(skip_serializing_if_is_none)]
    pub matched_trigger: Option<String>,
    /// Notes on what a dry run cannot know (placeholders for captured output).
    pub notes: Vec<String>,
}

#[derive(ApiResponse)]
enum RunbookCreated {
    /// Created.
    #[oai(status = 201)]
    Created(Json<Runbook>),
}

#[derive(ApiResponse)]
enum Deleted {
    /// Deleted.
    #[oai(status = 204)]
    NoContent,
}

#[derive(ApiResponse)]
enum YamlExport {
    /// The canonical YAML.
    #[oai(status = 200, content_type = "application/yaml")]
    Yaml(PlainText<String>),
}

fn issues_error(issues: &[Issue], yaml: Option<&str>) -> ApiError {
    let locations = yaml.map(yaml_locations).unwrap_or_default();
    let first = &issues[0];
    let message = issues
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ");
    ApiError::document(
        false,
        message,
        Some(&first.path),
        first.message.clone(),
        locate(&locations, &first.path),
    )
}

/// Parses and fully validates a YAML body: 413 over the size limit, 400 with line and column
/// for syntax and unknown fields, 422 with the field path (and position) for the rest.
pub fn document_from_yaml(text: &str) -> Result<RunbookDocument, ApiError> {
    if text.len() > MAX_DOCUMENT_BYTES {
        return Err(ApiError::PayloadTooLarge(Json(ErrorBody {
            code: "payload_too_large".to_owned(),
            message: format!(
                "runbook document of {} bytes exceeds the limit of {MAX_DOCUMENT_BYTES} bytes",
                text.len()
            ),
            details: None,
        })));
    }
    let doc = parse_yaml_all(text).map_err(|problems| {
        let first = &problems[0];
        let message = problems
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("; ");
        ApiError::document(
            true,
            message,
            first.path.as_deref(),
            first.message.clone(),
            first.line.zip(first.column),
        )
    })?;
    let issues = validate_runbook(&doc);
    if !issues.is_empty() {
        return Err(issues_error(&issues, Some(text)));
    }
    Ok(doc)
}

fn document_from_spec(spec: RunbookSpec) -> Result<RunbookDocument, ApiError> {
    let doc = spec.into_document();
    let issues = validate_runbook(&doc);
    if !issues.is_empty() {
        return Err(issues_error(&issues, None));
    }
    Ok(doc)
}

fn alert_facts(alert: &SampleAlert) -> AlertFacts {
    let labels = alert.labels.clone().unwrap_or_default();
    AlertFacts {
        name: alert.name.clone(),
        severity: alert
            .severity
            .clone()
            .or_else(|| labels.get("severity").cloned()),
        // As intake derives it; a sample alert has no generatorURL to fall back on.
        source: alert
            .source
            .clone()
            .or_else(|| crate::domain::alert::source_of(&labels, "")),
        labels,
    }
}

/// Runbook definitions.
pub struct RunbooksApi {
    /// Shared state.
    pub state: AppState,
}

impl RunbooksApi {
    async fn load(
        &self,
        conn: &mut sqlx::PgConnection,
        id: Uuid,
    ) -> Result<StoredRunbook, ApiError> {
        store::runbooks::runbook_load(conn, id)
            .await?
            .ok_or_else(|| ApiError::not_found("runbook", id))
    }
}

#[OpenApi(prefix_path = "/runbooks", tag = "Tag::Runbooks")]
impl RunbooksApi {
    /// List runbooks, filtered by category, status, mode, target OS and text.
    ///
    /// Least role: viewer.
    #[oai(path = "/", method = "get", operation_id = "runbook_list")]
    #[allow(clippy::too_many_arguments)]
    async fn runbook_list(
        &self,
        req: &Request,
        auth: BearerAuth,
        /// Exact category.
        category: Query<Option<String>>,
        /// Status.
        status: Query<Option<StatusName>>,
        /// Mode.
        mode: Query<Option<ModeName>>,
        /// Target OS.
        target_os: Query<Option<OsName>>,
        /// Text the runbook's name or description contains, ignoring case.
        #[oai(validator(min_length = 1, max_length = 255))]
        search: Query<Option<String>>,
        /// Page size, 1 to 500 (default 50).
        #[oai(validator(minimum(value = "1"), maximum(value = "500")))]
        limit: Query<Option<i64>>,
        /// Rows to skip (default 0).
        #[oai(validator(minimum(value = "0")))]
        offset: Query<Option<i64>>,
    ) -> Result<Json<RunbookPage>, ApiError> {
        self.state.authorize(req, &auth, Role::Viewer).await?;
        let page = Page::parse(limit.0, offset.0)?;
        let filter = store::runbooks::RunbookFilter {
            category: category.0.as_deref(),
            status: status.0.map(|s| RunbookStatus::from(s).as_str()),
            mode: mode.0.map(|m| ExecutionMode::from(m).as_str()),
            target_os: target_os.0.map(|o| TargetOs::from(o).as_str()),
            search: search.0.as_deref(),
        };
        let mut conn = store::read_snapshot(&self.state.pool).await?;
        let (rows, total) =
            store::runbooks::runbook_list(&mut conn, &filter, page.limit, page.offset).await?;
        let items = store::runbooks::runbooks_with_parts(&mut conn, rows)
            .await?
            .iter()
            .map(Runbook::from)
            .collect();
        Ok(Json(RunbookPage {
            items,
            total,
            limit: page.limit,
            offset: page.offset,
        }))
    }

    /// Create a runbook from a whole document (steps and triggers included). Writes version 1.
    ///
    /// Least role: engineer.
    #[oai(path = "/", method = "post", operation_id = "runbook_create")]
    async fn runbook_create(
        &self,
        req: &Request,
        auth: BearerAuth,
        body: Json<RunbookSpec>,
        /// Change summary for the version (default `created`).
        change_summary: Query<Option<String>>,
    ) -> Result<RunbookCreated, ApiError> {
        let caller = self.state.authorize(req, &auth, Role::Engineer).await?;
        let doc = document_from_spec(body.0)?;
        let mut tx = self.state.pool.begin().await?;
        if store::runbooks::runbook_lock_by_name(&mut tx, &doc.name)
            .await?
            .is_some()
        {
            return Err(ApiError::conflict(
                format!("a runbook named `{}` already exists", doc.name),
                Some("name"),
            ));
        }
        let out = store::runbooks::runbook_save(
            &mut tx,
            None,
            &doc,
            change_summary.0.as_deref(),
            Some(caller.identity.user_id),
        )
        .await?;
        caller
            .record(
                &mut tx,
                caller.audit(
                    "runbook_create",
                    "runbook",
                    Some(out.id),
                    serde_json::json!({ "name": doc.name, "version": out.version }),
                ),
            )
            .await?;
        let stored = self.load(&mut tx, out.id).await?;
        tx.commit().await?;
        Ok(RunbookCreated::Created(Json(Runbook::from(&stored))))
    }

    /// Get a runbook with its steps and triggers.
    ///
    /// Least role: viewer.
    #[oai(path = "/:id", method = "get", operation_id = "runbook_get")]
    async fn runbook_get(
        &self,
        req: &Request,
        auth: BearerAuth,
        /// Runbook id.
        id: Path<Uuid>,
    ) -> Result<Json<Runbook>, ApiError> {
        self.state.authorize(req, &auth, Role::Viewer).await?;
        let mut conn = self.state.pool.acquire().await?;
        let stored = self.load(&mut conn, id.0).await?;
        Ok(Json(Runbook::from(&stored)))
    }

    /// Replace a runbook with a whole document. A document equal to the current one changes
    /// nothing; otherwise `version` goes up by one and a version row is written.
    ///
    /// Least role: engineer.
    #[oai(path = "/:id", method = "put", operation_id = "runbook_update")]
    async fn runbook_update(
        &self,
        req: &Request,
        auth: BearerAuth,
        /// Runbook id.
        id: Path<Uuid>,
        body: Json<RunbookSpec>,
        /// Change summary (default: generated from what changed).
        change_summary: Query<Option<String>>,
    ) -> Result<Json<Runbook>, ApiError> {
        let caller = self.state.authorize(req, &auth, Role::Engineer).await?;
        let doc = document_from_spec(body.0)?;
        let mut tx = self.state.pool.begin().await?;
        let existing = store::runbooks::runbook_lock(&mut tx, id.0)
            .await?
            .ok_or_else(|| ApiError::not_found("runbook", id.0))?;
        let out = store::runbooks::runbook_save(
            &mut tx,
            Some(&existing),
            &doc,
            change_summary.0.as_deref(),
            Some(caller.identity.user_id),
        )
        .await?;
        if out.changed {
            caller
                .record(
                    &mut tx,
                    caller.audit(
                        "runbook_update",
                        "runbook",
                        Some(out.id),
                        serde_json::json!({
                            "name": doc.name,
                            "version": out.version,
                            "change_summary": out.change_summary,
                        }),
                    ),
                )
                .await?;
        }
        let stored = self.load(&mut tx, out.id).await?;
        tx.commit().await?;
        Ok(Json(Runbook::from(&stored)))
    }

    /// Delete a runbook with its steps, triggers and versions. Its executions are kept (their
    /// runbook link becomes empty).
    ///
    /// Least role: engineer.
    #[oai(path = "/:id", method = "delete", operation_id = "runbook_delete")]
    async fn runbook_delete(
        &self,
        req: &Request,
        auth: BearerAuth,
        /// Runbook id.
        id: Path<Uuid>,
    ) -> Result<Deleted, ApiError> {
        let caller = self.state.authorize(req, &auth, Role::Engineer).await?;
        let mut tx = self.state.pool.begin().await?;
        let existing = store::runbooks::runbook_lock(&mut tx, id.0)
            .await?
            .ok_or_else(|| ApiError::not_found("runbook", id.0))?;
        // A run that waits for approval would be approved into a runbook that is gone.
        let waiting = crate::engine::control::delete_runbook(
            &mut tx,
            id.0,
            &existing.name,
            Some(caller.identity.user_id),
        )
        .await
        .map_err(super::executions::engine_error)?;
        caller
            .record(
                &mut tx,
                caller.audit(
                    "runbook_delete",
                    "runbook",
                    Some(id.0),
                    serde_json::json!({ "name": existing.name, "version": existing.version,
                                        "cancelled_executions": waiting }),
                ),
            )
            .await?;
        tx.commit().await?;
        Ok(Deleted::NoContent)
    }

    /// List a runbook's versions, newest first.
    ///
    /// Least role: viewer.
    #[oai(
        path = "/:id/versions",
        method = "get",
        operation_id = "runbook_version_list"
    )]
    async fn runbook_version_list(
        &self,
        req: &Request,
        auth: BearerAuth,
        /// Runbook id.
        id: Path<Uuid>,
        /// Page size, 1 to 500 (default 50).
        #[oai(validator(minimum(value = "1"), maximum(value = "500")))]
        limit: Query<Option<i64>>,
        /// Rows to skip (default 0).
        #[oai(validator(minimum(value = "0")))]
        offset: Query<Option<i64>>,
    ) -> Result<Json<RunbookVersionPage>, ApiError> {
        self.state.authorize(req, &auth, Role::Viewer).await?;
        let page = Page::parse(limit.0, offset.0)?;
        let mut conn = store::read_snapshot(&self.state.pool).await?;
        store::runbooks::runbook_get(&mut conn, id.0)
            .await?
            .ok_or_else(|| ApiError::not_found("runbook", id.0))?;
        let (rows, total) =
            store::runbooks::runbook_versions_list(&mut conn, id.0, page.limit, page.offset)
                .await?;
        Ok(Json(RunbookVersionPage {
            items: rows
                .into_iter()
                .map(|v| RunbookVersionSummary {
                    version: v.version,
                    change_summary: v.change_summary,
                    created_by: v.created_by,
                    created_at: v.created_at,
                })
                .collect(),
            total,
            limit: page.limit,
            offset: page.offset,
        }))
    }

    /// Get one version of a runbook with its full YAML.
    ///
    /// Least role: viewer.
    #[oai(
        path = "/:id/versions/:version",
        method = "get",
        operation_id = "runbook_version_get"
    )]
    async fn runbook_version_get(
        &self,
        req: &Request,
        auth: BearerAuth,
        /// Runbook id.
        id: Path<Uuid>,
        /// Version number.
        #[oai(validator(minimum(value = "1")))]
        version: Path<i32>,
    ) -> Result<Json<RunbookVersion>, ApiError> {
        self.state.authorize(req, &auth, Role::Viewer).await?;
        let mut conn = self.state.pool.acquire().await?;
        let v = store::runbooks::runbook_version_get(&mut conn, id.0, version.0)
            .await?
            .ok_or_else(|| {
                ApiError::not_found("runbook version", format!("{}/{}", id.0, version.0))
            })?;
        Ok(Json(RunbookVersion {
            runbook_id: v.runbook_id,
            version: v.version,
            change_summary: v.change_summary,
            created_by: v.created_by,
            created_at: v.created_at,
            yaml: v.yaml_content,
        }))
    }

    /// A unified diff of the YAML of two versions (`to` defaults to the current version).
    ///
    /// Least role: viewer.
    #[oai(path = "/:id/diff", method = "get", operation_id = "runbook_diff")]
    async fn runbook_diff(
        &self,
        req: &Request,
        auth: BearerAuth,
        /// Runbook id.
        id: Path<Uuid>,
        /// Older version.
        #[oai(validator(minimum(value = "1")))]
        from: Query<i32>,
        /// Newer version (default: current).
        #[oai(validator(minimum(value = "1")))]
        to: Query<Option<i32>>,
    ) -> Result<Json<RunbookDiff>, ApiError> {
        self.state.authorize(req, &auth, Role::Viewer).await?;
        let mut conn = self.state.pool.acquire().await?;
        let row = store::runbooks::runbook_get(&mut conn, id.0)
            .await?
            .ok_or_else(|| ApiError::not_found("runbook", id.0))?;
        let to_version = to.0.unwrap_or(row.version);
        let mut texts = Vec::new();
        for (field, v) in [("from", from.0), ("to", to_version)] {
            let found = store::runbooks::runbook_version_get(&mut conn, id.0, v)
                .await?
                .ok_or_else(|| ApiError::invalid(field, format!("version {v} does not exist")))?;
            texts.push(found.yaml_content);
        }
        Ok(Json(RunbookDiff {
            from_version: from.0,
            to_version,
            diff: unified_diff(
                &texts[0],
                &texts[1],
                &format!("{}@v{}", row.name, from.0),
                &format!("{}@v{to_version}", row.name),
            ),
        }))
    }

    /// Restore an old version: its document becomes the current one as a new version.
    ///
    /// Least role: engineer.
    #[oai(
        path = "/:id/versions/:version/restore",
        method = "post",
        operation_id = "runbook_restore"
    )]
    async fn runbook_restore(
        &self,
        req: &Request,
        auth: BearerAuth,
        /// Runbook id.
        id: Path<Uuid>,
        /// Version to restore.
        #[oai(validator(minimum(value = "1")))]
        version: Path<i32>,
    ) -> Result<Json<RunbookApplied>, ApiError> {
        let caller = self.state.authorize(req, &auth, Role::Engineer).await?;
        let mut tx = self.state.pool.begin().await?;
        let existing = store::runbooks::runbook_lock(&mut tx, id.0)
            .await?
            .ok_or_else(|| ApiError::not_found("runbook", id.0))?;
        let old = store::runbooks::runbook_version_get(&mut tx, id.0, version.0)
            .await?
            .ok_or_else(|| {
                ApiError::not_found("runbook version", format!("{}/{}", id.0, version.0))
            })?;
        let doc = parse_yaml(&old.yaml_content).map_err(|e| ApiError::internal(&e))?;
        let summary = format!("restored version {}", version.0);
        let out = store::runbooks::runbook_save(
            &mut tx,
            Some(&existing),
            &doc,
            Some(&summary),
            Some(caller.identity.user_id),
        )
        .await?;
        if out.changed {
            caller
                .record(
                    &mut tx,
                    caller.audit(
                        "runbook_restore",
                        "runbook",
                        Some(out.id),
                        serde_json::json!({
                            "name": doc.name,
                            "restored_version": version.0,
                            "version": out.version,
                        }),
                    ),
                )
                .await?;
        }
        let stored = self.load(&mut tx, out.id).await?;
        tx.commit().await?;
        Ok(Json(RunbookApplied {
            created: false,
            changed: out.changed,
            change_summary: out.change_summary,
            runbook: Runbook::from(&stored),
        }))
    }

    /// Import a YAML runbook: create it, or update the runbook of the same name. Importing the
    /// same document again changes nothing and writes no version.
    ///
    /// Least role: engineer.
    #[oai(path = "/import", method = "post", operation_id = "runbook_import")]
    async fn runbook_import(
        &self,
        req: &Request,
        auth: BearerAuth,
        body: YamlBody,
        /// Change summary (default: generated from what changed).
        change_summary: Query<Option<String>>,
    ) -> Result<Json<RunbookApplied>, ApiError> {
        let caller = self.state.authorize(req, &auth, Role::Engineer).await?;
        let text = body.into_text();
        let doc = document_from_yaml(&text)?;
        let mut tx = self.state.pool.begin().await?;
        let out = store::runbooks::runbook_apply(
            &mut tx,
            &doc,
            change_summary.0.as_deref(),
            Some(caller.identity.user_id),
        )
        .await?;
        if out.changed {
            caller
                .record(
                    &mut tx,
                    caller.audit(
                        "runbook_import",
                        "runbook",
                        Some(out.id),
                        serde_json::json!({
                            "name": doc.name,
                            "created": out.created,
                            "version": out.version,
                            "change_summary": out.change_summary,
                        }),
                    ),
                )
                .await?;
        }
        let stored = self.load(&mut tx, out.id).await?;
        tx.commit().await?;
        Ok(Json(RunbookApplied {
            created: out.created,
            changed: out.changed,
            change_summary: out.change_summary,
            runbook: Runbook::from(&stored),
        }))
    }

    /// Export a runbook as canonical YAML (what `runbook_import` and `aiops runbook apply` take).
    ///
    /// Least role: viewer.
    #[oai(path = "/:id/export", method = "get", operation_id = "runbook_export")]
    async fn runbook_export(
        &self,
        req: &Request,
        auth: BearerAuth,
        /// Runbook id.
        id: Path<Uuid>,
    ) -> Result<YamlExport, ApiError> {
        self.state.authorize(req, &auth, Role::Viewer).await?;
        let mut conn = self.state.pool.acquire().await?;
        let stored = self.load(&mut conn, id.0).await?;
        Ok(YamlExport::Yaml(PlainText(to_canonical_yaml(
            &stored.document(),
        ))))
    }

    /// Validate a YAML runbook without storing it; lists every problem with its position.
    ///
    /// Least role: viewer.
    #[oai(path = "/validate", method = "post", operation_id = "runbook_validate")]
    async fn runbook_validate(
        &self,
        req: &Request,
        auth: BearerAuth,
        body: YamlBody,
    ) -> Result<Json<ValidationReport>, ApiError> {
        self.state.authorize(req, &auth, Role::Viewer).await?;
        let text = body.into_text();
        Ok(Json(validation_report(&text)))
    }

    /// Dry run: render every step's command, condition and rollback for a sample alert and
    /// server without executing anything, and say which triggers would match and why not.
    ///
    /// Least role: viewer.
    #[oai(path = "/dry-run", method = "post", operation_id = "runbook_dry_run")]
    async fn runbook_dry_run(
        &self,
        req: &Request,
        auth: BearerAuth,
        body: Json<DryRunRequest>,
    ) -> Result<Json<DryRunReport>, ApiError> {
        self.state.authorize(req, &auth, Role::Viewer).await?;
        let body = body.0;
        let given = [
            body.runbook_id.is_some(),
            body.runbook.is_some(),
            body.yaml.is_some(),
        ];
        if given.iter().filter(|g| **g).count() != 1 {
            return Err(ApiError::invalid(
                "runbook_id",
                "give exactly one of runbook_id, runbook and yaml",
            ));
        }
        if body.server_id.is_some() && body.server.is_some() {
            return Err(ApiError::invalid(
                "server_id",
                "give server_id or server, not both",
            ));
        }
        let mut conn = self.state.pool.acquire().await?;
        let mut last_fired = HashMap::new();
        let mut version = 0;
        let doc = if let Some(id) = body.runbook_id {
            let stored = self.load(&mut conn, id).await?;
            version = stored.row.version;
            for t in &stored.triggers {
                last_fired.insert(t.name.clone(), t.last_triggered_at);
            }
            stored.document()
        } else if let Some(spec) = body.runbook {
            document_from_spec(spec)?
        } else {
            document_from_yaml(body.yaml.as_deref().unwrap_or_default())?
        };
        let server = match (body.server_id, body.server) {
            (Some(id), _) => store::runbooks::runbook_server_context(&mut conn, id)
                .await?
                .ok_or_else(|| ApiError::invalid("server_id", "no such server"))?,
            (None, Some(s)) => serde_json::json!({
                "name": s.name.clone().unwrap_or_else(|| s.hostname.clone()),
                "hostname": s.hostname,
                "port": s.port.unwrap_or(22),
                "username": s.username,
                "os_type": TargetOs::from(s.os_type.unwrap_or(doc.target_os.into())).as_str(),
                "environment": s.environment,
                "tags": s.tags.unwrap_or_default(),
            }),
            (None, None) => {
                return Err(ApiError::invalid("server", "give server_id or server"));
            }
        };
        let now = body.at.unwrap_or_else(Utc::now);
        // Time windows are read in the timezone alert matching uses.
        let tz = store::alerts::alert_timezone_setting(&mut conn)
            .await?
            .and_then(|name| name.parse::<chrono_tz::Tz>().ok())
            .unwrap_or(chrono_tz::Tz::UTC);
        Ok(Json(dry_run_report(
            &doc,
            &body.alert,
            server,
            version,
            (now, tz),
            &last_fired,
        )))
    }
}

/// Validates YAML text into a report with positions (shared by the API and the CLI).
/// A document with field problems is also checked as read past them
/// ([`crate::domain::runbook::parse_yaml_partial`]), so every problem is reported at once.
pub fn validation_report(text: &str) -> ValidationReport {
    let checked = |doc: &RunbookDocument| -> Vec<ValidationIssue> {
        let locations = yaml_locations(text);
        validate_runbook(doc)
            .into_iter()
            .map(|i| {
                let pos = locate(&locations, &i.path);
                ValidationIssue {
                    path: i.path,
                    message: i.message,
                    line: pos.map(|p| p.0),
                    column: pos.map(|p| p.1),
                }
            })
            .collect()
    };
    match crate::domain::runbook::parse_yaml_partial(text) {
        Err((problems, partial)) => {
            let mut issues: Vec<ValidationIssue> = problems
                .into_iter()
                .map(|e| ValidationIssue {
                    path: e.path.unwrap_or_default(),
                    message: e.message,
                    line: e.line,
                    column: e.column,
                })
                .collect();
            if let Some(partial) = partial {
                issues.extend(
                    checked(&partial.doc)
                        .into_iter()
                        .filter(|i| partial.keeps(&i.path)),
                );
                issues.sort_by_key(|i| (i.line.is_none(), i.line, i.column));
            }
            ValidationReport {
                valid: false,
                name: None,
                issues,
            }
        }
        Ok(doc) => {
            let issues = checked(&doc);
            ValidationReport {
                valid: issues.is_empty(),
                name: Some(doc.name),
                issues,
            }
        }
    }
}

/// A unified diff of two YAML texts with three lines of context.
pub fn unified_diff(old: &str, new: &str, old_name: &str, new_name: &str) -> String {
    if old == new {
        return String::new();
    }
    similar::TextDiff::from_lines(old, new)
        .unified_diff()
        .context_radius(3)
        .header(old_name, new_name)
        .to_string()
}

/// Renders a dry run of `doc` for a sample alert and server (shared by the API and the CLI).
pub fn dry_run_report(
    doc: &RunbookDocument,
    alert: &SampleAlert,
    server: serde_json::Value,
    version: i32,
    (now, tz): (DateTime<Utc>, chrono_tz::Tz),
    last_fired: &HashMap<String, Option<DateTime<Utc>>>,
) -> DryRunReport {
    let facts = alert_facts(alert);
    let fingerprint = {
        let mut labels = facts.labels.clone();
        labels
            .entry("alertname".to_owned())
            .or_insert_with(|| facts.name.clone());
        crate::domain::alert::fingerprint_of(&labels)
    };
    let ctx = TemplateContext {
        // The keys a run started by the alert has (`engine::runner`), computed as intake would.
        alert: serde_json::json!({
            "id": "dry-run",
            "name": facts.name,
            "alertname": facts.name,
            "severity": facts.severity,
            "source": facts.source,
            "instance": facts.labels.get("instance"),
            "fingerprint": fingerprint,
            "status": alert.status.clone().unwrap_or_else(|| "firing".to_owned()),
            "labels": facts.labels,
            "annotations": alert.annotations.clone().unwrap_or_default(),
        }),
        server,
        execution: serde_json::json!({
            "id": "dry-run",
            "runbook": doc.name,
            "version": version,
            "mode": doc.mode.as_str(),
            "dry_run": true,
        }),
        steps: BTreeMap::new(),
    };
    let rendered = render_dry_run(doc, &ctx);
    let canonical = crate::domain::runbook::canonicalize(doc);
    let triggers: Vec<DryRunTrigger> = canonical
        .triggers
        .iter()
        .map(|t| {
            let verdict = trigger_matches_in(
                t,
                &facts,
                now,
                last_fired.get(&t.name).copied().flatten(),
                tz,
            );
            DryRunTrigger {
                name: t.name.clone(),
                priority: t.priority,
                matched: verdict.matched,
                reasons: verdict.reasons,
            }
        })
        .collect();
    let matched_trigger = triggers.iter().find(|t| t.matched).map(|t| t.name.clone());
    let mut notes = Vec::new();
    if doc.steps.iter().any(|s| s.capture_output) {
        notes.push(
            "captured outputs are placeholders (`<stdout of step NAME>`, exit code 0); conditions on them are evaluated against the placeholders"
                .to_owned(),
        );
    }
    if doc.status != RunbookStatus::Active {
        notes.push(format!(
            "the runbook is {}; triggers do not start it",
            doc.status.as_str()
        ));
    }
    let (vars, vars_error) = match rendered.vars {
        Ok(v) => (v, None),
        Err(e) => (BTreeMap::new(), Some(e)),
    };
    DryRunReport {
        runbook: doc.name.clone(),
        target_os: doc.target_os.into(),
        vars,
        vars_error,
        steps: rendered
            .steps
            .into_iter()
            .map(|s| {
                let (command, command_error) = split(s.command);
                let (rollback_command, rollback_error) = match s.rollback_command {
                    Some(r) => split(r),
                    None => (None, None),
                };
                let (condition, condition_result, condition_error) = match s.condition {
                    Some(c) => {
                        let (r, e) = split(c.result);
                        (Some(c.expression), r, e)
                    }
                    None => (None, None, None),
                };
                DryRunStep {
                    order: s.order,
                    name: s.name,
                    command,
                    command_error,
                    condition,
                    condition_result,
                    condition_error,
                    rollback_command,
                    rollback_error,
                }
            })
            .collect(),
        triggers,
        matched_trigger,
        notes,
    }
}

fn split<T>(r: Result<T, String>) -> (Option<T>, Option<String>) {
    match r {
        Ok(v) => (Some(v), None),
        Err(e) => (None, Some(e)),
    }
}
