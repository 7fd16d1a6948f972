//! Schema conformance: a freshly migrated database matches `spec/database-schema.md`.
//!
//! Everything is driven by the data tables below, so a missing or mistyped table, column,
//! enum value, index, constraint or default names itself in the failure message. All
//! mismatches are collected and reported at once.
//!
//! Columns marked `// addition` are ours (not in the schema document); the auth tables at
//! the end of `TABLES` are product tables the document lacks.

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};

use sqlx::PgPool;

/// A column type as `information_schema.columns` reports it.
#[derive(Clone, Copy, Debug)]
enum Ty {
    Uuid,
    Varchar(i32),
    Text,
    Jsonb,
    Tstz,
    Int,
    BigInt,
    Numeric,
    Bool,
    Time,
    TextArray,
    IntArray,
    Bytea,
    Enum(&'static str),
}

use Ty::*;

impl Ty {
    /// (data_type, udt_name, character_maximum_length)
    fn expected(self) -> (&'static str, &'static str, Option<i32>) {
        match self {
            Uuid => ("uuid", "uuid", None),
            Varchar(n) => ("character varying", "varchar", Some(n)),
            Text => ("text", "text", None),
            Jsonb => ("jsonb", "jsonb", None),
            Tstz => ("timestamp with time zone", "timestamptz", None),
            Int => ("integer", "int4", None),
            BigInt => ("bigint", "int8", None),
            Numeric => ("numeric", "numeric", None),
            Bool => ("boolean", "bool", None),
            Time => ("time without time zone", "time", None),
            TextArray => ("ARRAY", "_text", None),
            IntArray => ("ARRAY", "_int4", None),
            Bytea => ("bytea", "bytea", None),
            Enum(name) => ("USER-DEFINED", name, None),
        }
    }
}

const NOT_NULL: bool = true;
const NULLABLE: bool = false;

type Column = (&'static str, Ty, bool);

/// Every table: (table, [(column, type, not_null)]). The first column is the primary key.
const TABLES: &[(&str, &[Column])] = &[
    (
        "users",
        &[
            ("id", Uuid, NOT_NULL),
            ("username", Varchar(50), NOT_NULL),
            ("email", Varchar(255), NOT_NULL),
            ("full_name", Varchar(100), NULLABLE),
            ("password_hash", Varchar(255), NOT_NULL),
            ("role", Varchar(20), NOT_NULL),
            ("default_llm_provider_id", Uuid, NULLABLE),
            ("is_active", Bool, NOT_NULL),
            ("created_at", Tstz, NOT_NULL),
            ("updated_at", Tstz, NOT_NULL), // addition
            ("last_login", Tstz, NULLABLE),
        ],
    ),
    (
        "system_config",
        &[
            ("key", Varchar(50), NOT_NULL),
            ("value_json", Jsonb, NOT_NULL),
            ("updated_at", Tstz, NOT_NULL),
            ("updated_by", Uuid, NULLABLE),
        ],
    ),
    (
        "audit_log",
        &[
            ("id", Uuid, NOT_NULL),
            ("user_id", Uuid, NULLABLE),
            ("action", Varchar(50), NOT_NULL),
            ("resource_type", Varchar(50), NULLABLE),
            ("resource_id", Uuid, NULLABLE),
            ("details_json", Jsonb, NOT_NULL),
            ("ip_address", Varchar(45), NULLABLE),
            ("created_at", Tstz, NOT_NULL),
        ],
    ),
    (
        "server_credentials",
        &[
            ("id", Uuid, NOT_NULL),
            ("name", Varchar(100), NOT_NULL),
            ("hostname", Varchar(255), NOT_NULL),
            ("port", Int, NOT_NULL),
            ("username", Varchar(100), NOT_NULL),
            ("os_type", Varchar(20), NOT_NULL),
            ("protocol", Varchar(20), NOT_NULL),
            ("auth_type", Varchar(20), NOT_NULL),
            ("ssh_key_encrypted", Text, NULLABLE),
            ("password_encrypted", Text, NULLABLE),
            ("winrm_transport", Varchar(20), NULLABLE),
            ("winrm_use_ssl", Bool, NOT_NULL),
            ("winrm_cert_validation", Bool, NOT_NULL),
            ("domain", Varchar(100), NULLABLE),
            ("environment", Varchar(50), NULLABLE),
            ("tags", Jsonb, NOT_NULL),
            ("last_connection_test", Tstz, NULLABLE),
            ("last_connection_status", Varchar(20), NULLABLE),
            ("created_by", Uuid, NULLABLE),
            ("created_at", Tstz, NOT_NULL),
            ("updated_at", Tstz, NOT_NULL), // addition
        ],
    ),
    (
        "terminal_sessions",
        &[
            ("id", Uuid, NOT_NULL),
            ("user_id", Uuid, NOT_NULL),
            ("server_credential_id", Uuid, NULLABLE),
            ("alert_id", Uuid, NULLABLE),
            ("started_at", Tstz, NOT_NULL),
            ("ended_at", Tstz, NULLABLE),
            ("recording_path", Varchar(255), NULLABLE),
        ],
    ),
    (
        "alerts",
        &[
            ("id", Uuid, NOT_NULL),
            ("fingerprint", Varchar(100), NOT_NULL),
            ("timestamp", Tstz, NOT_NULL),
            ("alert_name", Varchar(255), NOT_NULL),
            ("severity", Varchar(50), NULLABLE),
            ("instance", Varchar(255), NULLABLE),
            ("job", Varchar(100), NULLABLE),
            ("status", Varchar(20), NOT_NULL),
            ("labels_json", Jsonb, NOT_NULL),
            ("annotations_json", Jsonb, NOT_NULL),
            ("raw_alert_json", Jsonb, NOT_NULL),
            ("matched_rule_id", Uuid, NULLABLE),
            ("action_taken", Varchar(20), NULLABLE),
            ("analyzed", Bool, NOT_NULL),
            ("analyzed_at", Tstz, NULLABLE),
            ("ai_analysis", Text, NULLABLE),
            ("recommendations_json", Jsonb, NULLABLE),
        ],
    ),
    (
        "auto_analyze_rules",
        &[
            ("id", Uuid, NOT_NULL),
            ("name", Varchar(100), NOT_NULL),
            ("priority", Int, NOT_NULL),
            ("alert_name_pattern", Text, NOT_NULL),
            ("severity_pattern", Text, NOT_NULL),
            ("action", Varchar(20), NOT_NULL),
            ("enabled", Bool, NOT_NULL),
            ("created_at", Tstz, NOT_NULL), // addition
            ("updated_at", Tstz, NOT_NULL), // addition
        ],
    ),
    (
        "llm_providers",
        &[
            ("id", Uuid, NOT_NULL),
            ("name", Varchar(100), NOT_NULL),
            ("provider_type", Varchar(50), NOT_NULL),
            ("model_id", Varchar(100), NOT_NULL),
            ("api_key_encrypted", Text, NULLABLE),
            ("is_default", Bool, NOT_NULL),
            ("config_json", Jsonb, NOT_NULL),
            ("created_at", Tstz, NOT_NULL), // addition
            ("updated_at", Tstz, NOT_NULL), // addition
        ],
    ),
    (
        "chat_sessions",
        &[
            ("id", Uuid, NOT_NULL),
            ("user_id", Uuid, NOT_NULL),
            ("alert_id", Uuid, NULLABLE),
            ("title", Varchar(255), NULLABLE),
            ("llm_provider_id", Uuid, NULLABLE),
            ("created_at", Tstz, NOT_NULL), // addition
            ("updated_at", Tstz, NOT_NULL), // addition
        ],
    ),
    (
        "chat_messages",
        &[
            ("id", Uuid, NOT_NULL),
            ("session_id", Uuid, NOT_NULL),
            ("role", Varchar(20), NOT_NULL),
            ("content", Text, NOT_NULL),
            ("tokens_used", Int, NULLABLE),
            ("created_at", Tstz, NOT_NULL),
        ],
    ),
    (
        "runbooks",
        &[
            ("id", Uuid, NOT_NULL),
            ("name", Varchar(200), NOT_NULL),
            ("description", Text, NULLABLE),
            ("category", Varchar(100), NULLABLE),
            ("mode", Enum("execution_mode"), NOT_NULL),
            ("status", Enum("runbook_status"), NOT_NULL),
            ("target_os", Enum("os_type"), NOT_NULL),
            ("version", Int, NOT_NULL),
            ("timeout_seconds", Int, NOT_NULL),
            ("max_retries", Int, NOT_NULL),
            ("retry_delay_seconds", Int, NOT_NULL),
            ("rate_limit_count", Int, NULLABLE),
            ("rate_limit_window_seconds", Int, NULLABLE),
            ("requires_approval", Bool, NOT_NULL),
            ("approval_roles", TextArray, NOT_NULL),
            ("allowed_servers", Jsonb, NOT_NULL),
            ("environment_vars", Jsonb, NOT_NULL),
            ("config", Jsonb, NOT_NULL),
            ("created_by", Uuid, NULLABLE),
            ("created_at", Tstz, NOT_NULL),
            ("updated_at", Tstz, NOT_NULL),
        ],
    ),
    (
        "runbook_steps",
        &[
            ("id", Uuid, NOT_NULL),
            ("runbook_id", Uuid, NOT_NULL),
            ("step_order", Int, NOT_NULL),
            ("name", Varchar(200), NOT_NULL),
            ("description", Text, NULLABLE),
            ("command", Text, NOT_NULL),
            ("expected_exit_codes", IntArray, NOT_NULL),
            ("timeout_seconds", Int, NOT_NULL),
            ("continue_on_failure", Bool, NOT_NULL),
            ("condition", Text, NULLABLE),
            ("rollback_command", Text, NULLABLE),
            ("retry_count", Int, NOT_NULL),
            ("retry_delay_seconds", Int, NOT_NULL),
            ("capture_output", Bool, NOT_NULL),
            ("sensitive", Bool, NOT_NULL),
        ],
    ),
    (
        "runbook_triggers",
        &[
            ("id", Uuid, NOT_NULL),
            ("runbook_id", Uuid, NOT_NULL),
            ("name", Varchar(200), NOT_NULL),
            ("priority", Int, NOT_NULL),
            ("alert_name_pattern", Text, NOT_NULL),
            ("severity_pattern", Text, NULLABLE),
            ("source_pattern", Text, NULLABLE),
            ("labels_match", Jsonb, NOT_NULL),
            ("time_window_start", Time, NULLABLE),
            ("time_window_end", Time, NULLABLE),
            ("enabled", Bool, NOT_NULL),
            ("cooldown_seconds", Int, NOT_NULL),
            ("last_triggered_at", Tstz, NULLABLE),
        ],
    ),
    (
        "runbook_versions",
        &[
            ("id", Uuid, NOT_NULL),
            ("runbook_id", Uuid, NOT_NULL),
            ("version", Int, NOT_NULL),
            ("yaml_content", Text, NOT_NULL),
            ("change_summary", Text, NULLABLE),
            ("created_by", Uuid, NULLABLE),
            ("created_at", Tstz, NOT_NULL),
        ],
    ),
    (
        "runbook_executions",
        &[
            ("id", Uuid, NOT_NULL),
            ("runbook_id", Uuid, NULLABLE),
            ("runbook_version", Int, NOT_NULL),
            ("server_id", Uuid, NULLABLE),
            ("alert_id", Uuid, NULLABLE),
            ("trigger_id", Uuid, NULLABLE),
            ("status", Enum("execution_status"), NOT_NULL),
            ("mode", Enum("execution_mode"), NOT_NULL),
            ("created_at", Tstz, NOT_NULL), // addition
            ("started_at", Tstz, NULLABLE),
            ("completed_at", Tstz, NULLABLE),
            ("duration_ms", Int, NULLABLE),
            ("initiated_by", Uuid, NULLABLE),
            ("approved_by", Uuid, NULLABLE),
            ("approved_at", Tstz, NULLABLE),
            ("error_message", Text, NULLABLE),
            ("output_summary", Text, NULLABLE),
            ("context_vars", Jsonb, NOT_NULL),
            ("execution_log", Jsonb, NOT_NULL),
        ],
    ),
    (
        "step_executions",
        &[
            ("id", Uuid, NOT_NULL),
            ("execution_id", Uuid, NOT_NULL),
            ("step_id", Uuid, NULLABLE),
            ("step_order", Int, NOT_NULL),
            ("step_name", Varchar(200), NOT_NULL),
            ("status", Enum("execution_status"), NOT_NULL),
            ("started_at", Tstz, NULLABLE),
            ("completed_at", Tstz, NULLABLE),
            ("duration_ms", Int, NULLABLE),
            ("exit_code", Int, NULLABLE),
            ("stdout", Text, NULLABLE),
            ("stderr", Text, NULLABLE),
            ("retry_attempt", Int, NOT_NULL),
        ],
    ),
    (
        "circuit_breakers",
        &[
            ("id", Uuid, NOT_NULL),
            ("runbook_id", Uuid, NOT_NULL),
            ("state", Enum("circuit_state"), NOT_NULL),
            ("failure_count", Int, NOT_NULL),
            ("success_count", Int, NOT_NULL),
            ("last_failure_at", Tstz, NULLABLE),
            ("opened_at", Tstz, NULLABLE),
            ("half_open_at", Tstz, NULLABLE),
            ("failure_threshold", Int, NOT_NULL),
            ("success_threshold", Int, NOT_NULL),
            ("reset_timeout_seconds", Int, NOT_NULL),
            ("updated_at", Tstz, NOT_NULL),
        ],
    ),
    (
        "blackout_windows",
        &[
            ("id", Uuid, NOT_NULL),
            ("name", Varchar(200), NOT_NULL),
            ("description", Text, NULLABLE),
            ("start_time", Tstz, NOT_NULL),
            ("end_time", Tstz, NOT_NULL),
            ("recurrence", Varchar(50), NOT_NULL),
            ("recurrence_pattern", Jsonb, NULLABLE),
            ("affected_servers", Jsonb, NOT_NULL),
            ("affected_runbooks", Jsonb, NOT_NULL),
            ("created_by", Uuid, NULLABLE),
            ("created_at", Tstz, NOT_NULL),
            ("updated_at", Tstz, NOT_NULL), // addition
            ("enabled", Bool, NOT_NULL),
        ],
    ),
    (
        "auth_tokens",
        &[
            ("id", Uuid, NOT_NULL),
            ("user_id", Uuid, NOT_NULL),
            ("kind", Varchar(10), NOT_NULL),
            ("name", Varchar(100), NULLABLE),
            ("token_hash", Bytea, NOT_NULL),
            ("created_at", Tstz, NOT_NULL),
            ("expires_at", Tstz, NULLABLE),
            ("last_used_at", Tstz, NULLABLE),
            ("revoked_at", Tstz, NULLABLE),
        ],
    ),
    (
        "login_attempts",
        &[
            ("id", BigInt, NOT_NULL),
            ("username", Varchar(50), NOT_NULL),
            ("ip_address", Varchar(45), NULLABLE),
            ("succeeded", Bool, NOT_NULL),
            ("created_at", Tstz, NOT_NULL),
        ],
    ),
];

/// The `execution_stats` view (section 7), as information_schema reports its columns.
const VIEW_COLUMNS: &[(&str, Ty)] = &[
    ("runbook_id", Uuid),
    ("runbook_name", Varchar(200)),
    ("total_executions", BigInt),
    ("successful", BigInt),
    ("failed", BigInt),
    ("avg_duration_ms", Numeric),
    ("last_execution", Tstz),
];

/// Enum types with their values in declaration order (section 5).
const ENUMS: &[(&str, &[&str])] = &[
    ("execution_mode", &["auto", "semi_auto", "manual"]),
    ("runbook_status", &["active", "disabled", "draft"]),
    (
        "execution_status",
        &[
            "pending",
            "approved",
            "running",
            "completed",
            "failed",
            "cancelled",
            "timeout",
        ],
    ),
    ("circuit_state", &["closed", "open", "half_open"]),
    ("os_type", &["linux", "windows"]),
];

/// Column defaults, exactly as `information_schema.columns.column_default` prints them.
/// Not listed here but checked for every table: `id uuid` -> gen_random_uuid(),
/// `created_at` / `updated_at` -> now().
const DEFAULTS: &[(&str, &str, &str)] = &[
    // documented
    ("server_credentials", "port", "22"),
    ("server_credentials", "winrm_use_ssl", "true"),
    ("runbooks", "version", "1"),
    ("runbooks", "timeout_seconds", "300"),
    ("runbooks", "max_retries", "0"),
    ("runbooks", "retry_delay_seconds", "60"),
    ("runbooks", "approval_roles", "'{admin,engineer}'::text[]"),
    ("runbook_steps", "expected_exit_codes", "'{0}'::integer[]"),
    ("runbook_steps", "timeout_seconds", "60"),
    ("circuit_breakers", "failure_threshold", "5"),
    ("circuit_breakers", "success_threshold", "3"),
    // ours
    ("users", "role", "'viewer'::character varying"),
    ("users", "is_active", "true"),
    ("system_config", "value_json", "'{}'::jsonb"),
    ("audit_log", "details_json", "'{}'::jsonb"),
    (
        "server_credentials",
        "os_type",
        "'linux'::character varying",
    ),
    ("server_credentials", "protocol", "'ssh'::character varying"),
    (
        "server_credentials",
        "auth_type",
        "'key'::character varying",
    ),
    ("server_credentials", "winrm_cert_validation", "true"),
    ("server_credentials", "tags", "'[]'::jsonb"),
    ("terminal_sessions", "started_at", "now()"),
    ("alerts", "timestamp", "now()"),
    ("alerts", "status", "'firing'::character varying"),
    ("alerts", "labels_json", "'{}'::jsonb"),
    ("alerts", "annotations_json", "'{}'::jsonb"),
    ("alerts", "raw_alert_json", "'{}'::jsonb"),
    ("alerts", "analyzed", "false"),
    ("auto_analyze_rules", "priority", "100"),
    ("auto_analyze_rules", "alert_name_pattern", "'*'::text"),
    ("auto_analyze_rules", "severity_pattern", "'*'::text"),
    (
        "auto_analyze_rules",
        "action",
        "'manual'::character varying",
    ),
    ("auto_analyze_rules", "enabled", "true"),
    ("llm_providers", "is_default", "false"),
    ("llm_providers", "config_json", "'{}'::jsonb"),
    ("runbooks", "mode", "'manual'::execution_mode"),
    ("runbooks", "status", "'active'::runbook_status"),
    ("runbooks", "target_os", "'linux'::os_type"),
    ("runbooks", "requires_approval", "false"),
    ("runbooks", "allowed_servers", "'[]'::jsonb"),
    ("runbooks", "environment_vars", "'{}'::jsonb"),
    ("runbooks", "config", "'{}'::jsonb"),
    ("runbook_steps", "continue_on_failure", "false"),
    ("runbook_steps", "retry_count", "0"),
    ("runbook_steps", "retry_delay_seconds", "5"),
    ("runbook_steps", "capture_output", "false"),
    ("runbook_steps", "sensitive", "false"),
    ("runbook_triggers", "priority", "100"),
    ("runbook_triggers", "labels_match", "'{}'::jsonb"),
    ("runbook_triggers", "enabled", "true"),
    ("runbook_triggers", "cooldown_seconds", "0"),
    (
        "runbook_executions",
        "status",
        "'pending'::execution_status",
    ),
    ("runbook_executions", "mode", "'manual'::execution_mode"),
    ("runbook_executions", "context_vars", "'{}'::jsonb"),
    ("runbook_executions", "execution_log", "'[]'::jsonb"),
    ("step_executions", "status", "'pending'::execution_status"),
    ("step_executions", "retry_attempt", "0"),
    ("circuit_breakers", "state", "'closed'::circuit_state"),
    ("circuit_breakers", "failure_count", "0"),
    ("circuit_breakers", "success_count", "0"),
    ("circuit_breakers", "reset_timeout_seconds", "300"),
    (
        "blackout_windows",
        "recurrence",
        "'none'::character varying",
    ),
    ("blackout_windows", "affected_servers", "'[]'::jsonb"),
    ("blackout_windows", "affected_runbooks", "'[]'::jsonb"),
    ("blackout_windows", "enabled", "true"),
];

/// Named indexes: (index, table, unique, what follows "USING btree " in pg_indexes.indexdef).
const INDEXES: &[(&str, &str, bool, &str)] = &[
    // documented
    ("idx_runbooks_name", "runbooks", false, "(name)"),
    ("idx_runbooks_category", "runbooks", false, "(category)"),
    (
        "idx_runbooks_status_mode",
        "runbooks",
        false,
        "(status, mode)",
    ),
    (
        "idx_triggers_runbook",
        "runbook_triggers",
        false,
        "(runbook_id)",
    ),
    (
        "idx_triggers_enabled_priority",
        "runbook_triggers",
        false,
        "(enabled, priority)",
    ),
    (
        "idx_executions_runbook",
        "runbook_executions",
        false,
        "(runbook_id)",
    ),
    (
        "idx_executions_server",
        "runbook_executions",
        false,
        "(server_id)",
    ),
    (
        "idx_executions_status",
        "runbook_executions",
        false,
        "(status)",
    ),
    (
        "idx_executions_started_at",
        "runbook_executions",
        false,
        "(started_at DESC)",
    ),
    (
        "idx_step_executions_execution",
        "step_executions",
        false,
        "(execution_id)",
    ),
    // ours
    (
        "idx_audit_log_created_at",
        "audit_log",
        false,
        "(created_at DESC)",
    ),
    ("idx_audit_log_user_id", "audit_log", false, "(user_id)"),
    (
        "idx_audit_log_resource_type_resource_id",
        "audit_log",
        false,
        "(resource_type, resource_id)",
    ),
    ("idx_alerts_fingerprint", "alerts", false, "(fingerprint)"),
    (
        "idx_alerts_timestamp",
        "alerts",
        false,
        "(\"timestamp\" DESC)",
    ),
    ("idx_alerts_status", "alerts", false, "(status)"),
    ("idx_alerts_alert_name", "alerts", false, "(alert_name)"),
    (
        "idx_alerts_matched_rule_id",
        "alerts",
        false,
        "(matched_rule_id)",
    ),
    (
        "idx_terminal_sessions_user_id",
        "terminal_sessions",
        false,
        "(user_id)",
    ),
    (
        "idx_terminal_sessions_server_credential_id",
        "terminal_sessions",
        false,
        "(server_credential_id)",
    ),
    (
        "idx_terminal_sessions_alert_id",
        "terminal_sessions",
        false,
        "(alert_id)",
    ),
    (
        "idx_llm_providers_is_default",
        "llm_providers",
        true,
        "(is_default) WHERE is_default",
    ),
    (
        "idx_chat_sessions_user_id",
        "chat_sessions",
        false,
        "(user_id)",
    ),
    (
        "idx_chat_sessions_alert_id",
        "chat_sessions",
        false,
        "(alert_id)",
    ),
    (
        "idx_chat_messages_session_id_created_at",
        "chat_messages",
        false,
        "(session_id, created_at)",
    ),
    (
        "idx_runbook_executions_runbook_id_created_at",
        "runbook_executions",
        false,
        "(runbook_id, created_at DESC)",
    ),
    (
        "idx_runbook_executions_alert_id",
        "runbook_executions",
        false,
        "(alert_id)",
    ),
    (
        "idx_runbook_executions_trigger_id",
        "runbook_executions",
        false,
        "(trigger_id)",
    ),
    (
        "idx_step_executions_execution_id_step_order_retry_attempt",
        "step_executions",
        false,
        "(execution_id, step_order, retry_attempt)",
    ),
    (
        "idx_step_executions_step_id",
        "step_executions",
        false,
        "(step_id)",
    ),
    ("idx_auth_tokens_user", "auth_tokens", false, "(user_id)"),
    (
        "idx_login_attempts_username_created",
        "login_attempts",
        false,
        "(username, created_at DESC)",
    ),
    (
        "idx_login_attempts_ip_created",
        "login_attempts",
        false,
        "(ip_address, created_at DESC)",
    ),
];

/// Unique constraints: (table, constraint, pg_get_constraintdef).
const UNIQUES: &[(&str, &str, &str)] = &[
    (
        "runbook_steps",
        "runbook_steps_runbook_id_step_order_key",
        "UNIQUE (runbook_id, step_order)",
    ),
    (
        "runbook_versions",
        "runbook_versions_runbook_id_version_key",
        "UNIQUE (runbook_id, version)",
    ),
    (
        "circuit_breakers",
        "circuit_breakers_runbook_id_key",
        "UNIQUE (runbook_id)",
    ),
    ("runbooks", "runbooks_name_key", "UNIQUE (name)"),
    ("users", "users_username_key", "UNIQUE (username)"),
    ("users", "users_email_key", "UNIQUE (email)"),
    (
        "auth_tokens",
        "auth_tokens_token_hash_key",
        "UNIQUE (token_hash)",
    ),
];

/// The documented CHECK, compared exactly.
const END_AFTER_START: (&str, &str, &str) = (
    "blackout_windows",
    "blackout_windows_end_after_start",
    "CHECK ((end_time > start_time))",
);

/// Other CHECK constraints: (table, constraint, fragments its definition must contain).
const CHECKS: &[(&str, &str, &[&str])] = &[
    (
        "users",
        "users_role_check",
        &["role", "'admin'", "'engineer'", "'operator'", "'viewer'"],
    ),
    (
        "server_credentials",
        "server_credentials_port_check",
        &["port >= 1", "port <= 65535"],
    ),
    (
        "server_credentials",
        "server_credentials_os_type_check",
        &["os_type", "'linux'", "'windows'"],
    ),
    (
        "server_credentials",
        "server_credentials_protocol_check",
        &["protocol", "'ssh'", "'winrm'"],
    ),
    (
        "server_credentials",
        "server_credentials_auth_type_check",
        &["auth_type", "'key'", "'password'"],
    ),
    (
        "server_credentials",
        "server_credentials_winrm_transport_check",
        &[
            "winrm_transport IS NULL",
            "'kerberos'",
            "'ntlm'",
            "'certificate'",
        ],
    ),
    (
        "server_credentials",
        "server_credentials_last_connection_status_check",
        &["last_connection_status IS NULL", "'success'", "'failed'"],
    ),
    (
        "alerts",
        "alerts_status_check",
        &["status", "'firing'", "'resolved'"],
    ),
    (
        "alerts",
        "alerts_action_taken_check",
        &[
            "action_taken IS NULL",
            "'auto_analyze'",
            "'ignore'",
            "'manual'",
        ],
    ),
    (
        "auto_analyze_rules",
        "auto_analyze_rules_action_check",
        &["action", "'auto_analyze'", "'ignore'", "'manual'"],
    ),
    (
        "chat_messages",
        "chat_messages_role_check",
        &["role", "'user'", "'assistant'", "'system'"],
    ),
    (
        "chat_messages",
        "chat_messages_tokens_used_check",
        &["tokens_used >= 0"],
    ),
    (
        "blackout_windows",
        "blackout_windows_recurrence_check",
        &[
            "recurrence",
            "'none'",
            "'daily'",
            "'weekly'",
            "'monthly'",
            "'cron'",
        ],
    ),
    (
        "blackout_windows",
        "blackout_windows_cron_pattern_check",
        &["recurrence_pattern IS NOT NULL"],
    ),
    ("runbooks", "runbooks_version_check", &["version > 0"]),
    (
        "runbooks",
        "runbooks_timeout_seconds_check",
        &["timeout_seconds > 0"],
    ),
    (
        "runbooks",
        "runbooks_max_retries_check",
        &["max_retries >= 0"],
    ),
    (
        "runbooks",
        "runbooks_retry_delay_seconds_check",
        &["retry_delay_seconds >= 0"],
    ),
    (
        "runbooks",
        "runbooks_rate_limit_check",
        &[
            "rate_limit_count IS NULL",
            "rate_limit_window_seconds IS NULL",
            "rate_limit_count > 0",
            "rate_limit_window_seconds > 0",
        ],
    ),
    (
        "runbooks",
        "runbooks_approval_roles_check",
        &["approval_roles <@"],
    ),
    (
        "runbook_steps",
        "runbook_steps_timeout_seconds_check",
        &["timeout_seconds > 0"],
    ),
    (
        "runbook_steps",
        "runbook_steps_retry_count_check",
        &["retry_count >= 0"],
    ),
    (
        "runbook_steps",
        "runbook_steps_retry_delay_seconds_check",
        &["retry_delay_seconds >= 0"],
    ),
    (
        "runbook_triggers",
        "runbook_triggers_cooldown_seconds_check",
        &["cooldown_seconds >= 0"],
    ),
    (
        "runbook_triggers",
        "runbook_triggers_time_window_check",
        &["time_window_start IS NULL"],
    ),
    (
        "runbook_versions",
        "runbook_versions_version_check",
        &["version > 0"],
    ),
    (
        "runbook_executions",
        "runbook_executions_duration_ms_check",
        &["duration_ms >= 0"],
    ),
    (
        "step_executions",
        "step_executions_retry_attempt_check",
        &["retry_attempt >= 0"],
    ),
    (
        "step_executions",
        "step_executions_duration_ms_check",
        &["duration_ms >= 0"],
    ),
    (
        "circuit_breakers",
        "circuit_breakers_failure_count_check",
        &["failure_count >= 0"],
    ),
    (
        "circuit_breakers",
        "circuit_breakers_success_count_check",
        &["success_count >= 0"],
    ),
    (
        "circuit_breakers",
        "circuit_breakers_failure_threshold_check",
        &["failure_threshold > 0"],
    ),
    (
        "circuit_breakers",
        "circuit_breakers_success_threshold_check",
        &["success_threshold > 0"],
    ),
    (
        "circuit_breakers",
        "circuit_breakers_reset_timeout_seconds_check",
        &["reset_timeout_seconds > 0"],
    ),
    (
        "auth_tokens",
        "auth_tokens_kind_check",
        &["kind", "'session'", "'api'"],
    ),
    (
        "auth_tokens",
        "auth_tokens_token_hash_check",
        &["octet_length(token_hash) = 32"],
    ),
    (
        "auth_tokens",
        "auth_tokens_session_expires_check",
        &["expires_at IS NOT NULL"],
    ),
];

#[derive(Clone, Copy, Debug)]
enum OnDelete {
    Cascade,
    SetNull,
}

impl OnDelete {
    /// pg_constraint.confdeltype
    fn code(self) -> &'static str {
        match self {
            OnDelete::Cascade => "c",
            OnDelete::SetNull => "n",
        }
    }
}

/// Foreign keys: (table, column, referenced table, ON DELETE). Each is named `<table>_<column>_fkey`.
const FKS: &[(&str, &str, &str, OnDelete)] = &[
    // documented
    ("runbook_steps", "runbook_id", "runbooks", OnDelete::Cascade),
    (
        "runbook_triggers",
        "runbook_id",
        "runbooks",
        OnDelete::Cascade,
    ),
    (
        "runbook_versions",
        "runbook_id",
        "runbooks",
        OnDelete::Cascade,
    ),
    (
        "circuit_breakers",
        "runbook_id",
        "runbooks",
        OnDelete::Cascade,
    ),
    (
        "runbook_executions",
        "runbook_id",
        "runbooks",
        OnDelete::SetNull,
    ),
    (
        "step_executions",
        "execution_id",
        "runbook_executions",
        OnDelete::Cascade,
    ),
    (
        "step_executions",
        "step_id",
        "runbook_steps",
        OnDelete::SetNull,
    ),
    // the document names the reference but not the behaviour: history is kept
    (
        "users",
        "default_llm_provider_id",
        "llm_providers",
        OnDelete::SetNull,
    ),
    ("system_config", "updated_by", "users", OnDelete::SetNull),
    ("audit_log", "user_id", "users", OnDelete::SetNull),
    (
        "server_credentials",
        "created_by",
        "users",
        OnDelete::SetNull,
    ),
    ("terminal_sessions", "user_id", "users", OnDelete::Cascade),
    (
        "terminal_sessions",
        "server_credential_id",
        "server_credentials",
        OnDelete::SetNull,
    ),
    ("terminal_sessions", "alert_id", "alerts", OnDelete::SetNull),
    (
        "alerts",
        "matched_rule_id",
        "auto_analyze_rules",
        OnDelete::SetNull,
    ),
    ("chat_sessions", "user_id", "users", OnDelete::Cascade),
    ("chat_sessions", "alert_id", "alerts", OnDelete::SetNull),
    (
        "chat_sessions",
        "llm_provider_id",
        "llm_providers",
        OnDelete::SetNull,
    ),
    (
        "chat_messages",
        "session_id",
        "chat_sessions",
        OnDelete::Cascade,
    ),
    ("runbooks", "created_by", "users", OnDelete::SetNull),
    ("runbook_versions", "created_by", "users", OnDelete::SetNull),
    (
        "runbook_executions",
        "server_id",
        "server_credentials",
        OnDelete::SetNull,
    ),
    (
        "runbook_executions",
        "alert_id",
        "alerts",
        OnDelete::SetNull,
    ),
    (
        "runbook_executions",
        "trigger_id",
        "runbook_triggers",
        OnDelete::SetNull,
    ),
    (
        "runbook_executions",
        "initiated_by",
        "users",
        OnDelete::SetNull,
    ),
    (
        "runbook_executions",
        "approved_by",
        "users",
        OnDelete::SetNull,
    ),
    ("blackout_windows", "created_by", "users", OnDelete::SetNull),
    ("auth_tokens", "user_id", "users", OnDelete::Cascade),
];

struct ColumnInfo {
    data_type: String,
    udt_name: String,
    max_len: Option<i32>,
    is_nullable: String,
    default: Option<String>,
    is_identity: String,
    identity_generation: Option<String>,
}

const COLUMNS_SQL: &str = "\
    SELECT table_name::text, column_name::text, data_type::text, udt_name::text, \
           character_maximum_length::int4, is_nullable::text, column_default::text, \
           is_identity::text, identity_generation::text \
    FROM information_schema.columns \
    WHERE table_schema = 'public'";

const RELATIONS_SQL: &str = "\
    SELECT table_name::text, table_type::text \
    FROM information_schema.tables \
    WHERE table_schema = 'public'";

const ENUMS_SQL: &str = "\
    SELECT t.typname::text, e.enumlabel::text \
    FROM pg_type t \
    JOIN pg_enum e ON e.enumtypid = t.oid \
    JOIN pg_namespace n ON n.oid = t.typnamespace \
    WHERE n.nspname = 'public' \
    ORDER BY t.typname, e.enumsortorder";

const INDEXES_SQL: &str = "\
    SELECT indexname::text, tablename::text, indexdef::text \
    FROM pg_indexes \
    WHERE schemaname = 'public'";

const CONSTRAINTS_SQL: &str = "\
    SELECT t.relname::text, c.conname::text, c.contype::text, pg_get_constraintdef(c.oid)::text \
    FROM pg_constraint c \
    JOIN pg_class t ON t.oid = c.conrelid \
    JOIN pg_namespace n ON n.oid = c.connamespace \
    WHERE n.nspname = 'public'";

const FKS_SQL: &str = "\
    SELECT t.relname::text, a.attname::text, r.relname::text, c.conname::text, c.confdeltype::text \
    FROM pg_constraint c \
    JOIN pg_class t ON t.oid = c.conrelid \
    JOIN pg_class r ON r.oid = c.confrelid \
    JOIN pg_namespace n ON n.oid = c.connamespace \
    JOIN pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = c.conkey[1] \
    WHERE c.contype = 'f' AND n.nspname = 'public' AND cardinality(c.conkey) = 1";

const TRIGGERS_SQL: &str = "\
    SELECT c.relname::text, t.tgname::text, p.proname::text, \
           (t.tgtype::int & 2) <> 0 AS before, (t.tgtype::int & 16) <> 0 AS on_update \
    FROM pg_trigger t \
    JOIN pg_class c ON c.oid = t.tgrelid \
    JOIN pg_namespace n ON n.oid = c.relnamespace \
    JOIN pg_proc p ON p.oid = t.tgfoid \
    WHERE NOT t.tgisinternal AND n.nspname = 'public'";

const VIEW_SQL: &str = "\
    SELECT count(*) FROM pg_views WHERE schemaname = 'public' AND viewname = 'execution_stats'";

fn describe(data_type: &str, udt_name: &str, max_len: Option<i32>) -> String {
    match max_len {
        Some(n) => format!("{data_type}({n}) [{udt_name}]"),
        None => format!("{data_type} [{udt_name}]"),
    }
}

fn check_type(problems: &mut Vec<String>, what: &str, ty: Ty, info: &ColumnInfo) {
    let (data_type, udt_name, max_len) = ty.expected();
    if info.data_type != data_type || info.udt_name != udt_name || info.max_len != max_len {
        problems.push(format!(
            "{what}: expected type {}, found {}",
            describe(data_type, udt_name, max_len),
            describe(&info.data_type, &info.udt_name, info.max_len),
        ));
    }
}

#[tokio::test]
async fn schema_matches_the_document() {
    let pool: PgPool = common::fresh_pool().await;
    let mut problems: Vec<String> = Vec::new();

    // ---- tables and views -----------------------------------------------------------------
    let relations: HashMap<String, String> = sqlx::query_as::<_, (String, String)>(RELATIONS_SQL)
        .fetch_all(&pool)
        .await
        .expect("read information_schema.tables")
        .into_iter()
        .collect();

    // ---- columns ----------------------------------------------------------------------------
    let rows = sqlx::query_as::<
        _,
        (
            String,
            String,
            String,
            String,
            Option<i32>,
            String,
            Option<String>,
            String,
            Option<String>,
        ),
    >(COLUMNS_SQL)
    .fetch_all(&pool)
    .await
    .expect("read information_schema.columns");
    let mut columns: HashMap<(String, String), ColumnInfo> = HashMap::new();
    for (
        table,
        column,
        data_type,
        udt_name,
        max_len,
        is_nullable,
        default,
        is_identity,
        identity_generation,
    ) in rows
    {
        columns.insert(
            (table, column),
            ColumnInfo {
                data_type,
                udt_name,
                max_len,
                is_nullable,
                default,
                is_identity,
                identity_generation,
            },
        );
    }
    let column = |table: &str, name: &str| columns.get(&(table.to_owned(), name.to_owned()));

    for &(table, cols) in TABLES {
        match relations.get(table).map(String::as_str) {
            None => {
                problems.push(format!("table {table}: missing"));
                continue;
            }
            Some("BASE TABLE") => {}
            Some(other) => {
                problems.push(format!("table {table}: expected BASE TABLE, found {other}"))
            }
        }
        for &(name, ty, not_null) in cols {
            let what = format!("{table}.{name}");
            let Some(info) = column(table, name) else {
                problems.push(format!("{what}: missing column"));
                continue;
            };
            check_type(&mut problems, &what, ty, info);
            let expected_nullable = if not_null { "NO" } else { "YES" };
            if info.is_nullable != expected_nullable {
                problems.push(format!(
                    "{what}: expected {}, found is_nullable={}",
                    if not_null { "NOT NULL" } else { "nullable" },
                    info.is_nullable
                ));
            }
            // Defaults every table shares.
            let generic_default = match (name, ty) {
                ("id", Uuid) => Some("gen_random_uuid()"),
                ("created_at" | "updated_at", Tstz) => Some("now()"),
                _ => None,
            };
            if let Some(expected) = generic_default
                && info.default.as_deref() != Some(expected)
            {
                problems.push(format!(
                    "{what}: expected default {expected}, found {:?}",
                    info.default
                ));
            }
        }
    }

    // login_attempts.id is an identity column, not a uuid.
    match column("login_attempts", "id") {
        Some(info)
            if info.is_identity == "YES"
                && info.identity_generation.as_deref() == Some("ALWAYS") => {}
        Some(info) => problems.push(format!(
            "login_attempts.id: expected GENERATED ALWAYS AS IDENTITY, found is_identity={} generation={:?}",
            info.is_identity, info.identity_generation
        )),
        None => {} // already reported as missing
    }

    // ---- primary keys: the first listed column of each table --------------------------------
    let constraints: HashMap<(String, String), (String, String)> =
        sqlx::query_as::<_, (String, String, String, String)>(CONSTRAINTS_SQL)
            .fetch_all(&pool)
            .await
            .expect("read pg_constraint")
            .into_iter()
            .map(|(table, name, contype, def)| ((table, name), (contype, def)))
            .collect();
    let constraint =
        |table: &str, name: &str| constraints.get(&(table.to_owned(), name.to_owned()));

    for &(table, cols) in TABLES {
        let name = format!("{table}_pkey");
        let expected = format!("PRIMARY KEY ({})", cols[0].0);
        match constraint(table, &name) {
            Some((contype, def)) if contype == "p" && *def == expected => {}
            Some((contype, def)) => problems.push(format!(
                "{table}: constraint {name} expected {expected}, found contype={contype} {def}"
            )),
            None => problems.push(format!("{table}: missing primary key {name} ({expected})")),
        }
    }

    // ---- defaults ---------------------------------------------------------------------------
    for &(table, name, expected) in DEFAULTS {
        match column(table, name) {
            None => problems.push(format!(
                "{table}.{name}: missing column (default {expected})"
            )),
            Some(info) if info.default.as_deref() == Some(expected) => {}
            Some(info) => problems.push(format!(
                "{table}.{name}: expected default {expected}, found {:?}",
                info.default
            )),
        }
    }

    // ---- enums ------------------------------------------------------------------------------
    let mut enums: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (type_name, label) in sqlx::query_as::<_, (String, String)>(ENUMS_SQL)
        .fetch_all(&pool)
        .await
        .expect("read pg_enum")
    {
        enums.entry(type_name).or_default().push(label);
    }
    for &(name, values) in ENUMS {
        match enums.get(name) {
            None => problems.push(format!("enum {name}: missing")),
            Some(found) if found.iter().map(String::as_str).eq(values.iter().copied()) => {}
            Some(found) => problems.push(format!(
                "enum {name}: expected values {values:?}, found {found:?}"
            )),
        }
    }

    // ---- indexes ----------------------------------------------------------------------------
    let indexes: HashMap<String, (String, String)> =
        sqlx::query_as::<_, (String, String, String)>(INDEXES_SQL)
            .fetch_all(&pool)
            .await
            .expect("read pg_indexes")
            .into_iter()
            .map(|(name, table, def)| (name, (table, def)))
            .collect();
    for &(name, table, unique, tail) in INDEXES {
        let Some((found_table, def)) = indexes.get(name) else {
            problems.push(format!("index {name} on {table} {tail}: missing"));
            continue;
        };
        if found_table != table {
            problems.push(format!(
                "index {name}: expected on {table}, found on {found_table}"
            ));
        }
        let expected_tail = format!(" USING btree {tail}");
        if !def.ends_with(&expected_tail) {
            problems.push(format!(
                "index {name}: expected ...{expected_tail}, found {def}"
            ));
        }
        if def.starts_with("CREATE UNIQUE INDEX") != unique {
            problems.push(format!(
                "index {name}: expected {}, found {def}",
                if unique { "UNIQUE" } else { "not unique" }
            ));
        }
    }

    // ---- unique and check constraints -------------------------------------------------------
    for &(table, name, expected) in UNIQUES {
        match constraint(table, name) {
            Some((contype, def)) if contype == "u" && def == expected => {}
            Some((contype, def)) => problems.push(format!(
                "{table}: constraint {name} expected {expected}, found contype={contype} {def}"
            )),
            None => problems.push(format!(
                "{table}: missing unique constraint {name} {expected}"
            )),
        }
    }
    {
        let (table, name, expected) = END_AFTER_START;
        match constraint(table, name) {
            Some((contype, def)) if contype == "c" && def == expected => {}
            Some((contype, def)) => problems.push(format!(
                "{table}: constraint {name} expected {expected}, found contype={contype} {def}"
            )),
            None => problems.push(format!(
                "{table}: missing check constraint {name} {expected}"
            )),
        }
    }
    for &(table, name, fragments) in CHECKS {
        match constraint(table, name) {
            Some((contype, def)) if contype == "c" => {
                for fragment in fragments {
                    if !def.contains(fragment) {
                        problems.push(format!(
                            "{table}: check {name} should contain {fragment:?}, found {def}"
                        ));
                    }
                }
            }
            Some((contype, def)) => problems.push(format!(
                "{table}: constraint {name} expected a CHECK, found contype={contype} {def}"
            )),
            None => problems.push(format!("{table}: missing check constraint {name}")),
        }
    }

    // ---- foreign keys -----------------------------------------------------------------------
    let fks: HashMap<(String, String), (String, String, String)> =
        sqlx::query_as::<_, (String, String, String, String, String)>(FKS_SQL)
            .fetch_all(&pool)
            .await
            .expect("read foreign keys")
            .into_iter()
            .map(|(table, column, referenced, name, on_delete)| {
                ((table, column), (referenced, name, on_delete))
            })
            .collect();
    for &(table, col, referenced, on_delete) in FKS {
        let expected_name = format!("{table}_{col}_fkey");
        let Some((found_ref, name, found_on_delete)) = fks.get(&(table.to_owned(), col.to_owned()))
        else {
            problems.push(format!(
                "{table}.{col}: missing foreign key to {referenced} ON DELETE {on_delete:?}"
            ));
            continue;
        };
        if found_ref != referenced {
            problems.push(format!(
                "{table}.{col}: expected to reference {referenced}, references {found_ref}"
            ));
        }
        if found_on_delete != on_delete.code() {
            problems.push(format!(
                "{table}.{col}: expected ON DELETE {on_delete:?} ({}), found confdeltype {found_on_delete}",
                on_delete.code()
            ));
        }
        if *name != expected_name {
            problems.push(format!(
                "{table}.{col}: foreign key named {name}, expected {expected_name}"
            ));
        }
    }

    // ---- updated_at triggers: every table with an updated_at column has one -----------------
    let triggers = sqlx::query_as::<_, (String, String, String, bool, bool)>(TRIGGERS_SQL)
        .fetch_all(&pool)
        .await
        .expect("read pg_trigger");
    let maintained: HashSet<&str> = triggers
        .iter()
        .filter(|(_, _, function, before, on_update)| {
            function == "set_updated_at" && *before && *on_update
        })
        .map(|(table, _, _, _, _)| table.as_str())
        .collect();
    let mut with_updated_at: Vec<&str> = columns
        .keys()
        .filter(|(table, column)| {
            column == "updated_at" && relations.get(table).map(String::as_str) == Some("BASE TABLE")
        })
        .map(|(table, _)| table.as_str())
        .collect();
    with_updated_at.sort_unstable();
    for table in with_updated_at {
        if !maintained.contains(table) {
            problems.push(format!(
                "{table}: has updated_at but no BEFORE UPDATE trigger calling set_updated_at()"
            ));
        }
    }

    // ---- execution_stats view ---------------------------------------------------------------
    let views = sqlx::query_scalar::<_, i64>(VIEW_SQL)
        .fetch_one(&pool)
        .await
        .expect("read pg_views");
    if views != 1 {
        problems.push("view execution_stats: missing".to_owned());
    } else {
        for &(name, ty) in VIEW_COLUMNS {
            let what = format!("execution_stats.{name}");
            match column("execution_stats", name) {
                None => problems.push(format!("{what}: missing column")),
                Some(info) => check_type(&mut problems, &what, ty, info),
            }
        }
    }

    assert!(
        problems.is_empty(),
        "{} schema mismatch(es) against spec/database-schema.md:\n  {}",
        problems.len(),
        problems.join("\n  ")
    );
}

/// Asserts a statement failed on the named CHECK constraint.
fn assert_check_violation(
    result: Result<sqlx::postgres::PgQueryResult, sqlx::Error>,
    constraint: &str,
    label: &str,
) {
    let err = match result {
        Ok(_) => {
            panic!("{label}: expected a violation of {constraint}, but the statement succeeded")
        }
        Err(err) => err,
    };
    let Some(db_err) = err.as_database_error() else {
        panic!("{label}: expected a database error from {constraint}, got {err:?}");
    };
    assert_eq!(
        db_err.code().as_deref(),
        Some("23514"),
        "{label}: expected check_violation (23514), got {err}"
    );
    assert_eq!(
        db_err.constraint(),
        Some(constraint),
        "{label}: wrong constraint in {err}"
    );
    assert!(
        err.to_string().contains(constraint),
        "{label}: the error message should name {constraint}: {err}"
    );
}

#[tokio::test]
async fn updated_at_trigger_and_blackout_window_check() {
    let pool: PgPool = common::fresh_pool().await;

    // updated_at advances on UPDATE (the trigger), created_at does not move.
    sqlx::query(
        "INSERT INTO runbooks (name, created_at, updated_at) \
         VALUES ('trigger-probe', '2000-01-01T00:00:00Z', '2000-01-01T00:00:00Z')",
    )
    .execute(&pool)
    .await
    .expect("insert runbook");
    let updated =
        sqlx::query("UPDATE runbooks SET description = 'touched' WHERE name = 'trigger-probe'")
            .execute(&pool)
            .await
            .expect("update runbook");
    assert_eq!(updated.rows_affected(), 1);
    let (advanced, recent, created_unchanged) = sqlx::query_as::<_, (bool, bool, bool)>(
        "SELECT updated_at > '2000-01-01T00:00:00Z'::timestamptz, \
                updated_at > now() - interval '10 minutes', \
                created_at = '2000-01-01T00:00:00Z'::timestamptz \
         FROM runbooks WHERE name = 'trigger-probe'",
    )
    .fetch_one(&pool)
    .await
    .expect("read runbook timestamps");
    assert!(advanced, "runbooks.updated_at did not advance on UPDATE");
    assert!(
        recent,
        "runbooks.updated_at was not set to the current time"
    );
    assert!(created_unchanged, "runbooks.created_at changed on UPDATE");

    // blackout_windows: CHECK (end_time > start_time) refuses reversed and empty windows.
    for (label, start, end) in [
        (
            "end before start",
            "2026-01-02T00:00:00Z",
            "2026-01-01T00:00:00Z",
        ),
        (
            "end equal to start",
            "2026-01-01T00:00:00Z",
            "2026-01-01T00:00:00Z",
        ),
    ] {
        let result = sqlx::query(
            "INSERT INTO blackout_windows (name, start_time, end_time) \
             VALUES ($1, $2::timestamptz, $3::timestamptz)",
        )
        .bind(label)
        .bind(start)
        .bind(end)
        .execute(&pool)
        .await;
        assert_check_violation(result, "blackout_windows_end_after_start", label);
    }
    sqlx::query(
        "INSERT INTO blackout_windows (name, start_time, end_time) \
         VALUES ('valid', '2026-01-01T00:00:00Z', '2026-01-01T02:00:00Z')",
    )
    .execute(&pool)
    .await
    .expect("a window with end_time > start_time is accepted");

    // Rate limit columns are both NULL or both > 0.
    let result =
        sqlx::query("INSERT INTO runbooks (name, rate_limit_count) VALUES ('half-rate-limit', 5)")
            .execute(&pool)
            .await;
    assert_check_violation(
        result,
        "runbooks_rate_limit_check",
        "rate limit without window",
    );
}

#[tokio::test]
async fn execution_stats_aggregates_per_runbook() {
    let pool: PgPool = common::fresh_pool().await;

    sqlx::query("INSERT INTO runbooks (name) VALUES ('stats-probe'), ('never-run')")
        .execute(&pool)
        .await
        .expect("insert runbooks");
    sqlx::query(
        "INSERT INTO runbook_executions (runbook_id, runbook_version, status, duration_ms, started_at) \
         SELECT r.id, 1, v.status::execution_status, v.duration_ms, now() \
         FROM runbooks r, (VALUES ('completed', 100), ('completed', 200), ('failed', 600)) AS v(status, duration_ms) \
         WHERE r.name = 'stats-probe'",
    )
    .execute(&pool)
    .await
    .expect("insert executions");

    let (total, successful, failed, avg) = sqlx::query_as::<_, (i64, i64, i64, Option<f64>)>(
        "SELECT total_executions, successful, failed, avg_duration_ms::float8 \
         FROM execution_stats WHERE runbook_name = 'stats-probe'",
    )
    .fetch_one(&pool)
    .await
    .expect("read execution_stats");
    assert_eq!((total, successful, failed), (3, 2, 1));
    assert_eq!(avg, Some(300.0));

    let (total, last) = sqlx::query_as::<_, (i64, bool)>(
        "SELECT total_executions, last_execution IS NULL \
         FROM execution_stats WHERE runbook_name = 'never-run'",
    )
    .fetch_one(&pool)
    .await
    .expect("read execution_stats for a runbook without executions");
    assert_eq!(total, 0);
    assert!(last, "last_execution of a runbook never run should be NULL");
}
