-- Initial schema of the aiops platform.
--
-- Source of truth: spec/database-schema.md. Every documented table, column, enum, index,
-- constraint and the execution_stats view is created here with its documented name.
-- Columns and constraints the document does not list (created_at/updated_at on some tables,
-- CHECKs on the documented string enums, extra indexes, auth tables) are additions of ours and
-- are commented as such. Every constraint carries an explicit name so code and tests can match
-- on it (sqlx DatabaseError::constraint()).
--
-- Runs in one transaction (sqlx default). Needs PostgreSQL >= 13 (gen_random_uuid() is built in).
-- The job queue tables live in a later migration.

-- ---------------------------------------------------------------------------------------------
-- Helpers
-- ---------------------------------------------------------------------------------------------

-- Keeps every updated_at column current; attached BEFORE UPDATE to each table that has one.
CREATE FUNCTION set_updated_at() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    NEW.updated_at := now();
    RETURN NEW;
END;
$$;

-- ---------------------------------------------------------------------------------------------
-- Enum types (section 5 of the schema document, values in documented order)
-- ---------------------------------------------------------------------------------------------

CREATE TYPE execution_mode AS ENUM ('auto', 'semi_auto', 'manual');
CREATE TYPE runbook_status AS ENUM ('active', 'disabled', 'draft');
CREATE TYPE execution_status AS ENUM ('pending', 'approved', 'running', 'completed', 'failed', 'cancelled', 'timeout');
CREATE TYPE circuit_state AS ENUM ('closed', 'open', 'half_open');
CREATE TYPE os_type AS ENUM ('linux', 'windows');

-- ---------------------------------------------------------------------------------------------
-- 4. AI: llm_providers comes first because users.default_llm_provider_id references it
-- ---------------------------------------------------------------------------------------------

CREATE TABLE llm_providers (
    id                uuid         NOT NULL DEFAULT gen_random_uuid(),
    name              varchar(100) NOT NULL,
    provider_type     varchar(50)  NOT NULL,
    model_id          varchar(100) NOT NULL,
    api_key_encrypted text,                                   -- NULL: provider needs no key (local models)
    is_default        boolean      NOT NULL DEFAULT false,
    config_json       jsonb        NOT NULL DEFAULT '{}',
    created_at        timestamptz  NOT NULL DEFAULT now(),    -- addition
    updated_at        timestamptz  NOT NULL DEFAULT now(),    -- addition
    CONSTRAINT llm_providers_pkey PRIMARY KEY (id)
);
-- At most one default provider (addition).
CREATE UNIQUE INDEX idx_llm_providers_is_default ON llm_providers (is_default) WHERE is_default;

-- ---------------------------------------------------------------------------------------------
-- 1. Core system
-- ---------------------------------------------------------------------------------------------

CREATE TABLE users (
    id                      uuid         NOT NULL DEFAULT gen_random_uuid(),
    username                varchar(50)  NOT NULL,
    email                   varchar(255) NOT NULL,
    full_name               varchar(100),
    password_hash           varchar(255) NOT NULL,          -- argon2id PHC string
    role                    varchar(20)  NOT NULL DEFAULT 'viewer',
    default_llm_provider_id uuid,
    is_active               boolean      NOT NULL DEFAULT true,
    created_at              timestamptz  NOT NULL DEFAULT now(),
    updated_at              timestamptz  NOT NULL DEFAULT now(),   -- addition
    last_login              timestamptz,
    CONSTRAINT users_pkey PRIMARY KEY (id),
    CONSTRAINT users_username_key UNIQUE (username),
    CONSTRAINT users_email_key UNIQUE (email),
    CONSTRAINT users_role_check CHECK (role IN ('admin', 'engineer', 'operator', 'viewer')),
    CONSTRAINT users_default_llm_provider_id_fkey FOREIGN KEY (default_llm_provider_id)
        REFERENCES llm_providers (id) ON DELETE SET NULL
);

CREATE TABLE system_config (
    key        varchar(50) NOT NULL,
    value_json jsonb       NOT NULL DEFAULT '{}',
    updated_at timestamptz NOT NULL DEFAULT now(),
    updated_by uuid,
    CONSTRAINT system_config_pkey PRIMARY KEY (key),
    CONSTRAINT system_config_updated_by_fkey FOREIGN KEY (updated_by)
        REFERENCES users (id) ON DELETE SET NULL
);

CREATE TABLE audit_log (
    id            uuid        NOT NULL DEFAULT gen_random_uuid(),
    user_id       uuid,                                     -- NULL: system action, or user deleted
    action        varchar(50) NOT NULL,
    resource_type varchar(50),
    resource_id   uuid,
    details_json  jsonb       NOT NULL DEFAULT '{}',
    ip_address    varchar(45),
    created_at    timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT audit_log_pkey PRIMARY KEY (id),
    CONSTRAINT audit_log_user_id_fkey FOREIGN KEY (user_id)
        REFERENCES users (id) ON DELETE SET NULL
);
CREATE INDEX idx_audit_log_created_at ON audit_log (created_at DESC);
CREATE INDEX idx_audit_log_user_id ON audit_log (user_id);
CREATE INDEX idx_audit_log_resource_type_resource_id ON audit_log (resource_type, resource_id);

-- ---------------------------------------------------------------------------------------------
-- 2. Infrastructure & connectivity
-- ---------------------------------------------------------------------------------------------

CREATE TABLE server_credentials (
    id                     uuid         NOT NULL DEFAULT gen_random_uuid(),
    name                   varchar(100) NOT NULL,
    hostname               varchar(255) NOT NULL,
    port                   integer      NOT NULL DEFAULT 22,
    username               varchar(100) NOT NULL,
    os_type                varchar(20)  NOT NULL DEFAULT 'linux',
    protocol               varchar(20)  NOT NULL DEFAULT 'ssh',
    auth_type              varchar(20)  NOT NULL DEFAULT 'key',
    ssh_key_encrypted      text,
    password_encrypted     text,
    winrm_transport        varchar(20),
    winrm_use_ssl          boolean      NOT NULL DEFAULT true,
    winrm_cert_validation  boolean      NOT NULL DEFAULT true,
    domain                 varchar(100),
    environment            varchar(50),
    tags                   jsonb        NOT NULL DEFAULT '[]',
    last_connection_test   timestamptz,
    last_connection_status varchar(20),
    created_by             uuid,
    created_at             timestamptz  NOT NULL DEFAULT now(),
    updated_at             timestamptz  NOT NULL DEFAULT now(),   -- addition
    CONSTRAINT server_credentials_pkey PRIMARY KEY (id),
    CONSTRAINT server_credentials_port_check CHECK (port BETWEEN 1 AND 65535),
    CONSTRAINT server_credentials_os_type_check CHECK (os_type IN ('linux', 'windows')),
    CONSTRAINT server_credentials_protocol_check CHECK (protocol IN ('ssh', 'winrm')),
    CONSTRAINT server_credentials_auth_type_check CHECK (auth_type IN ('key', 'password')),
    CONSTRAINT server_credentials_winrm_transport_check
        CHECK (winrm_transport IS NULL OR winrm_transport IN ('kerberos', 'ntlm', 'certificate')),
    CONSTRAINT server_credentials_last_connection_status_check
        CHECK (last_connection_status IS NULL OR last_connection_status IN ('success', 'failed')),
    CONSTRAINT server_credentials_created_by_fkey FOREIGN KEY (created_by)
        REFERENCES users (id) ON DELETE SET NULL
);

-- ---------------------------------------------------------------------------------------------
-- 3. Incident management
-- ---------------------------------------------------------------------------------------------

CREATE TABLE auto_analyze_rules (
    id                 uuid         NOT NULL DEFAULT gen_random_uuid(),
    name               varchar(100) NOT NULL,
    priority           integer      NOT NULL DEFAULT 100,
    alert_name_pattern text         NOT NULL DEFAULT '*',
    severity_pattern   text         NOT NULL DEFAULT '*',
    action             varchar(20)  NOT NULL DEFAULT 'manual',
    enabled            boolean      NOT NULL DEFAULT true,
    created_at         timestamptz  NOT NULL DEFAULT now(),   -- addition
    updated_at         timestamptz  NOT NULL DEFAULT now(),   -- addition
    CONSTRAINT auto_analyze_rules_pkey PRIMARY KEY (id),
    CONSTRAINT auto_analyze_rules_action_check CHECK (action IN ('auto_analyze', 'ignore', 'manual'))
);

CREATE TABLE alerts (
    id                   uuid         NOT NULL DEFAULT gen_random_uuid(),
    fingerprint          varchar(100) NOT NULL,   -- not unique: one fingerprint fires and resolves many times
    "timestamp"          timestamptz  NOT NULL DEFAULT now(),
    alert_name           varchar(255) NOT NULL,
    severity             varchar(50),
    instance             varchar(255),
    job                  varchar(100),
    status               varchar(20)  NOT NULL DEFAULT 'firing',
    labels_json          jsonb        NOT NULL DEFAULT '{}',
    annotations_json     jsonb        NOT NULL DEFAULT '{}',
    raw_alert_json       jsonb        NOT NULL DEFAULT '{}',
    matched_rule_id      uuid,
    action_taken         varchar(20),
    analyzed             boolean      NOT NULL DEFAULT false,
    analyzed_at          timestamptz,
    ai_analysis          text,
    recommendations_json jsonb,                  -- NULL until analysed
    CONSTRAINT alerts_pkey PRIMARY KEY (id),
    CONSTRAINT alerts_status_check CHECK (status IN ('firing', 'resolved')),
    CONSTRAINT alerts_action_taken_check
        CHECK (action_taken IS NULL OR action_taken IN ('auto_analyze', 'ignore', 'manual')),
    CONSTRAINT alerts_matched_rule_id_fkey FOREIGN KEY (matched_rule_id)
        REFERENCES auto_analyze_rules (id) ON DELETE SET NULL
);
CREATE INDEX idx_alerts_fingerprint ON alerts (fingerprint);
CREATE INDEX idx_alerts_timestamp ON alerts ("timestamp" DESC);
CREATE INDEX idx_alerts_status ON alerts (status);
CREATE INDEX idx_alerts_alert_name ON alerts (alert_name);
CREATE INDEX idx_alerts_matched_rule_id ON alerts (matched_rule_id);   -- FK (rule deletion)

CREATE TABLE terminal_sessions (
    id                   uuid         NOT NULL DEFAULT gen_random_uuid(),
    user_id              uuid         NOT NULL,
    server_credential_id uuid,
    alert_id             uuid,
    started_at           timestamptz  NOT NULL DEFAULT now(),
    ended_at             timestamptz,
    recording_path       varchar(255),
    CONSTRAINT terminal_sessions_pkey PRIMARY KEY (id),
    CONSTRAINT terminal_sessions_user_id_fkey FOREIGN KEY (user_id)
        REFERENCES users (id) ON DELETE CASCADE,
    CONSTRAINT terminal_sessions_server_credential_id_fkey FOREIGN KEY (server_credential_id)
        REFERENCES server_credentials (id) ON DELETE SET NULL,
    CONSTRAINT terminal_sessions_alert_id_fkey FOREIGN KEY (alert_id)
        REFERENCES alerts (id) ON DELETE SET NULL
);
CREATE INDEX idx_terminal_sessions_user_id ON terminal_sessions (user_id);
CREATE INDEX idx_terminal_sessions_server_credential_id ON terminal_sessions (server_credential_id);
CREATE INDEX idx_terminal_sessions_alert_id ON terminal_sessions (alert_id);

-- ---------------------------------------------------------------------------------------------
-- 4. AI & chat
-- ---------------------------------------------------------------------------------------------

CREATE TABLE chat_sessions (
    id              uuid         NOT NULL DEFAULT gen_random_uuid(),
    user_id         uuid         NOT NULL,
    alert_id        uuid,
    title           varchar(255),
    llm_provider_id uuid,
    created_at      timestamptz  NOT NULL DEFAULT now(),   -- addition
    updated_at      timestamptz  NOT NULL DEFAULT now(),   -- addition
    CONSTRAINT chat_sessions_pkey PRIMARY KEY (id),
    CONSTRAINT chat_sessions_user_id_fkey FOREIGN KEY (user_id)
        REFERENCES users (id) ON DELETE CASCADE,
    CONSTRAINT chat_sessions_alert_id_fkey FOREIGN KEY (alert_id)
        REFERENCES alerts (id) ON DELETE SET NULL,
    CONSTRAINT chat_sessions_llm_provider_id_fkey FOREIGN KEY (llm_provider_id)
        REFERENCES llm_providers (id) ON DELETE SET NULL
);
CREATE INDEX idx_chat_sessions_user_id ON chat_sessions (user_id);
CREATE INDEX idx_chat_sessions_alert_id ON chat_sessions (alert_id);

CREATE TABLE chat_messages (
    id          uuid        NOT NULL DEFAULT gen_random_uuid(),
    session_id  uuid        NOT NULL,
    role        varchar(20) NOT NULL,
    content     text        NOT NULL,
    tokens_used integer,
    created_at  timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT chat_messages_pkey PRIMARY KEY (id),
    CONSTRAINT chat_messages_role_check CHECK (role IN ('user', 'assistant', 'system')),
    CONSTRAINT chat_messages_tokens_used_check CHECK (tokens_used IS NULL OR tokens_used >= 0),
    CONSTRAINT chat_messages_session_id_fkey FOREIGN KEY (session_id)
        REFERENCES chat_sessions (id) ON DELETE CASCADE
);
CREATE INDEX idx_chat_messages_session_id_created_at ON chat_messages (session_id, created_at);

-- ---------------------------------------------------------------------------------------------
-- 5. Auto-remediation
-- ---------------------------------------------------------------------------------------------

CREATE TABLE runbooks (
    id                        uuid           NOT NULL DEFAULT gen_random_uuid(),
    name                      varchar(200)   NOT NULL,
    description               text,
    category                  varchar(100),
    mode                      execution_mode NOT NULL DEFAULT 'manual',
    status                    runbook_status NOT NULL DEFAULT 'active',
    target_os                 os_type        NOT NULL DEFAULT 'linux',
    version                   integer        NOT NULL DEFAULT 1,
    timeout_seconds           integer        NOT NULL DEFAULT 300,
    max_retries               integer        NOT NULL DEFAULT 0,
    retry_delay_seconds       integer        NOT NULL DEFAULT 60,
    rate_limit_count          integer,                       -- both NULL: no rate limit
    rate_limit_window_seconds integer,
    requires_approval         boolean        NOT NULL DEFAULT false,
    approval_roles            text[]         NOT NULL DEFAULT '{admin,engineer}',
    allowed_servers           jsonb          NOT NULL DEFAULT '[]',
    environment_vars          jsonb          NOT NULL DEFAULT '{}',
    config                    jsonb          NOT NULL DEFAULT '{}',
    created_by                uuid,
    created_at                timestamptz    NOT NULL DEFAULT now(),
    updated_at                timestamptz    NOT NULL DEFAULT now(),
    CONSTRAINT runbooks_pkey PRIMARY KEY (id),
    CONSTRAINT runbooks_name_key UNIQUE (name),
    CONSTRAINT runbooks_version_check CHECK (version > 0),
    CONSTRAINT runbooks_timeout_seconds_check CHECK (timeout_seconds > 0),
    CONSTRAINT runbooks_max_retries_check CHECK (max_retries >= 0),
    CONSTRAINT runbooks_retry_delay_seconds_check CHECK (retry_delay_seconds >= 0),
    CONSTRAINT runbooks_rate_limit_check CHECK (
        (rate_limit_count IS NULL AND rate_limit_window_seconds IS NULL)
        OR (rate_limit_count IS NOT NULL AND rate_limit_window_seconds IS NOT NULL
            AND rate_limit_count > 0 AND rate_limit_window_seconds > 0)),
    CONSTRAINT runbooks_approval_roles_check
        CHECK (approval_roles <@ ARRAY['admin', 'engineer', 'operator', 'viewer']::text[]),
    CONSTRAINT runbooks_created_by_fkey FOREIGN KEY (created_by)
        REFERENCES users (id) ON DELETE SET NULL
);
CREATE INDEX idx_runbooks_name ON runbooks (name);
CREATE INDEX idx_runbooks_category ON runbooks (category);
CREATE INDEX idx_runbooks_status_mode ON runbooks (status, mode);

CREATE TABLE runbook_steps (
    id                  uuid        NOT NULL DEFAULT gen_random_uuid(),
    runbook_id          uuid        NOT NULL,
    step_order          integer     NOT NULL,
    name                varchar(200) NOT NULL,
    description         text,
    command             text        NOT NULL,
    expected_exit_codes integer[]   NOT NULL DEFAULT '{0}',
    timeout_seconds     integer     NOT NULL DEFAULT 60,
    continue_on_failure boolean     NOT NULL DEFAULT false,
    condition           text,
    rollback_command    text,
    retry_count         integer     NOT NULL DEFAULT 0,
    retry_delay_seconds integer     NOT NULL DEFAULT 5,
    capture_output      boolean     NOT NULL DEFAULT false,
    sensitive           boolean     NOT NULL DEFAULT false,
    CONSTRAINT runbook_steps_pkey PRIMARY KEY (id),
    CONSTRAINT runbook_steps_runbook_id_step_order_key UNIQUE (runbook_id, step_order),
    CONSTRAINT runbook_steps_timeout_seconds_check CHECK (timeout_seconds > 0),
    CONSTRAINT runbook_steps_retry_count_check CHECK (retry_count >= 0),
    CONSTRAINT runbook_steps_retry_delay_seconds_check CHECK (retry_delay_seconds >= 0),
    CONSTRAINT runbook_steps_runbook_id_fkey FOREIGN KEY (runbook_id)
        REFERENCES runbooks (id) ON DELETE CASCADE
);

CREATE TABLE runbook_triggers (
    id                 uuid         NOT NULL DEFAULT gen_random_uuid(),
    runbook_id         uuid         NOT NULL,
    name               varchar(200) NOT NULL,
    priority           integer      NOT NULL DEFAULT 100,
    alert_name_pattern text         NOT NULL,              -- no default: a trigger must say what it matches
    severity_pattern   text,                               -- NULL: any severity
    source_pattern     text,                               -- NULL: any source
    labels_match       jsonb        NOT NULL DEFAULT '{}',
    time_window_start  time,                               -- both NULL: always active;
    time_window_end    time,                               -- end < start wraps midnight
    enabled            boolean      NOT NULL DEFAULT true,
    cooldown_seconds   integer      NOT NULL DEFAULT 0,
    last_triggered_at  timestamptz,
    CONSTRAINT runbook_triggers_pkey PRIMARY KEY (id),
    CONSTRAINT runbook_triggers_cooldown_seconds_check CHECK (cooldown_seconds >= 0),
    CONSTRAINT runbook_triggers_time_window_check
        CHECK ((time_window_start IS NULL) = (time_window_end IS NULL)),
    CONSTRAINT runbook_triggers_runbook_id_fkey FOREIGN KEY (runbook_id)
        REFERENCES runbooks (id) ON DELETE CASCADE
);
CREATE INDEX idx_triggers_runbook ON runbook_triggers (runbook_id);
CREATE INDEX idx_triggers_enabled_priority ON runbook_triggers (enabled, priority);

CREATE TABLE runbook_versions (
    id             uuid        NOT NULL DEFAULT gen_random_uuid(),
    runbook_id     uuid        NOT NULL,
    version        integer     NOT NULL,
    yaml_content   text        NOT NULL,
    change_summary text,
    created_by     uuid,
    created_at     timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT runbook_versions_pkey PRIMARY KEY (id),
    CONSTRAINT runbook_versions_runbook_id_version_key UNIQUE (runbook_id, version),
    CONSTRAINT runbook_versions_version_check CHECK (version > 0),
    CONSTRAINT runbook_versions_runbook_id_fkey FOREIGN KEY (runbook_id)
        REFERENCES runbooks (id) ON DELETE CASCADE,
    CONSTRAINT runbook_versions_created_by_fkey FOREIGN KEY (created_by)
        REFERENCES users (id) ON DELETE SET NULL
);

CREATE TABLE runbook_executions (
    id              uuid             NOT NULL DEFAULT gen_random_uuid(),
    runbook_id      uuid,                                  -- NULL once the runbook is deleted
    runbook_version integer          NOT NULL,
    server_id       uuid,
    alert_id        uuid,
    trigger_id      uuid,
    status          execution_status NOT NULL DEFAULT 'pending',
    mode            execution_mode   NOT NULL DEFAULT 'manual',
    created_at      timestamptz      NOT NULL DEFAULT now(),   -- addition: request time (rate limit, approval expiry)
    started_at      timestamptz,                           -- NULL while pending/approved
    completed_at    timestamptz,
    duration_ms     integer,
    initiated_by    uuid,
    approved_by     uuid,
    approved_at     timestamptz,
    error_message   text,
    output_summary  text,
    context_vars    jsonb            NOT NULL DEFAULT '{}',
    execution_log   jsonb            NOT NULL DEFAULT '[]',
    CONSTRAINT runbook_executions_pkey PRIMARY KEY (id),
    CONSTRAINT runbook_executions_duration_ms_check CHECK (duration_ms IS NULL OR duration_ms >= 0),
    CONSTRAINT runbook_executions_runbook_id_fkey FOREIGN KEY (runbook_id)
        REFERENCES runbooks (id) ON DELETE SET NULL,
    CONSTRAINT runbook_executions_server_id_fkey FOREIGN KEY (server_id)
        REFERENCES server_credentials (id) ON DELETE SET NULL,
    CONSTRAINT runbook_executions_alert_id_fkey FOREIGN KEY (alert_id)
        REFERENCES alerts (id) ON DELETE SET NULL,
    CONSTRAINT runbook_executions_trigger_id_fkey FOREIGN KEY (trigger_id)
        REFERENCES runbook_triggers (id) ON DELETE SET NULL,
    CONSTRAINT runbook_executions_initiated_by_fkey FOREIGN KEY (initiated_by)
        REFERENCES users (id) ON DELETE SET NULL,
    CONSTRAINT runbook_executions_approved_by_fkey FOREIGN KEY (approved_by)
        REFERENCES users (id) ON DELETE SET NULL
);
CREATE INDEX idx_executions_runbook ON runbook_executions (runbook_id);
CREATE INDEX idx_executions_server ON runbook_executions (server_id);
CREATE INDEX idx_executions_status ON runbook_executions (status);
CREATE INDEX idx_executions_started_at ON runbook_executions (started_at DESC);
-- Additions: rate-limit window counts, and FK columns hit by ON DELETE SET NULL.
CREATE INDEX idx_runbook_executions_runbook_id_created_at ON runbook_executions (runbook_id, created_at DESC);
CREATE INDEX idx_runbook_executions_alert_id ON runbook_executions (alert_id);
CREATE INDEX idx_runbook_executions_trigger_id ON runbook_executions (trigger_id);

CREATE TABLE step_executions (
    id            uuid             NOT NULL DEFAULT gen_random_uuid(),
    execution_id  uuid             NOT NULL,
    step_id       uuid,                                    -- NULL once the step definition is gone
    step_order    integer          NOT NULL,
    step_name     varchar(200)     NOT NULL,
    status        execution_status NOT NULL DEFAULT 'pending',
    started_at    timestamptz,
    completed_at  timestamptz,
    duration_ms   integer,
    exit_code     integer,
    stdout        text,
    stderr        text,
    retry_attempt integer          NOT NULL DEFAULT 0,
    CONSTRAINT step_executions_pkey PRIMARY KEY (id),
    CONSTRAINT step_executions_retry_attempt_check CHECK (retry_attempt >= 0),
    CONSTRAINT step_executions_duration_ms_check CHECK (duration_ms IS NULL OR duration_ms >= 0),
    CONSTRAINT step_executions_execution_id_fkey FOREIGN KEY (execution_id)
        REFERENCES runbook_executions (id) ON DELETE CASCADE,
    CONSTRAINT step_executions_step_id_fkey FOREIGN KEY (step_id)
        REFERENCES runbook_steps (id) ON DELETE SET NULL
);
CREATE INDEX idx_step_executions_execution ON step_executions (execution_id);
CREATE INDEX idx_step_executions_execution_id_step_order_retry_attempt
    ON step_executions (execution_id, step_order, retry_attempt);
-- Addition: deleting a runbook cascades to its steps, which SET NULLs step_executions.step_id.
CREATE INDEX idx_step_executions_step_id ON step_executions (step_id);

CREATE TABLE circuit_breakers (
    id                    uuid          NOT NULL DEFAULT gen_random_uuid(),
    runbook_id            uuid          NOT NULL,
    state                 circuit_state NOT NULL DEFAULT 'closed',
    failure_count         integer       NOT NULL DEFAULT 0,
    success_count         integer       NOT NULL DEFAULT 0,
    last_failure_at       timestamptz,
    opened_at             timestamptz,
    half_open_at          timestamptz,
    failure_threshold     integer       NOT NULL DEFAULT 5,
    success_threshold     integer       NOT NULL DEFAULT 3,
    reset_timeout_seconds integer       NOT NULL DEFAULT 300,
    updated_at            timestamptz   NOT NULL DEFAULT now(),
    CONSTRAINT circuit_breakers_pkey PRIMARY KEY (id),
    CONSTRAINT circuit_breakers_runbook_id_key UNIQUE (runbook_id),
    CONSTRAINT circuit_breakers_failure_count_check CHECK (failure_count >= 0),
    CONSTRAINT circuit_breakers_success_count_check CHECK (success_count >= 0),
    CONSTRAINT circuit_breakers_failure_threshold_check CHECK (failure_threshold > 0),
    CONSTRAINT circuit_breakers_success_threshold_check CHECK (success_threshold > 0),
    CONSTRAINT circuit_breakers_reset_timeout_seconds_check CHECK (reset_timeout_seconds > 0),
    CONSTRAINT circuit_breakers_runbook_id_fkey FOREIGN KEY (runbook_id)
        REFERENCES runbooks (id) ON DELETE CASCADE
);

CREATE TABLE blackout_windows (
    id                 uuid         NOT NULL DEFAULT gen_random_uuid(),
    name               varchar(200) NOT NULL,
    description        text,
    start_time         timestamptz  NOT NULL,
    end_time           timestamptz  NOT NULL,
    recurrence         varchar(50)  NOT NULL DEFAULT 'none',
    recurrence_pattern jsonb,                              -- required when recurrence = 'cron'
    affected_servers   jsonb        NOT NULL DEFAULT '[]',
    affected_runbooks  jsonb        NOT NULL DEFAULT '[]',
    created_by         uuid,
    created_at         timestamptz  NOT NULL DEFAULT now(),
    updated_at         timestamptz  NOT NULL DEFAULT now(),   -- addition
    enabled            boolean      NOT NULL DEFAULT true,
    CONSTRAINT blackout_windows_pkey PRIMARY KEY (id),
    CONSTRAINT blackout_windows_end_after_start CHECK (end_time > start_time),
    CONSTRAINT blackout_windows_recurrence_check
        CHECK (recurrence IN ('none', 'daily', 'weekly', 'monthly', 'cron')),
    CONSTRAINT blackout_windows_cron_pattern_check
        CHECK (recurrence <> 'cron' OR recurrence_pattern IS NOT NULL),
    CONSTRAINT blackout_windows_created_by_fkey FOREIGN KEY (created_by)
        REFERENCES users (id) ON DELETE SET NULL
);

-- ---------------------------------------------------------------------------------------------
-- 7. Views (verbatim from the schema document)
-- ---------------------------------------------------------------------------------------------

CREATE VIEW execution_stats AS
SELECT 
    r.id AS runbook_id,
    r.name AS runbook_name,
    COUNT(e.id) AS total_executions,
    COUNT(*) FILTER (WHERE e.status = 'completed') AS successful,
    COUNT(*) FILTER (WHERE e.status = 'failed') AS failed,
    AVG(e.duration_ms) AS avg_duration_ms,
    MAX(e.started_at) AS last_execution
FROM runbooks r
LEFT JOIN runbook_executions e ON r.id = e.runbook_id
GROUP BY r.id, r.name;

-- ---------------------------------------------------------------------------------------------
-- Product tables, not in the schema document
-- ---------------------------------------------------------------------------------------------

-- Opaque bearer tokens: login sessions (always expiring) and long-lived API tokens.
-- Only the SHA-256 of the token is stored.
CREATE TABLE auth_tokens (
    id           uuid         NOT NULL DEFAULT gen_random_uuid(),
    user_id      uuid         NOT NULL,
    kind         varchar(10)  NOT NULL,
    name         varchar(100),                             -- label for API tokens
    token_hash   bytea        NOT NULL,
    created_at   timestamptz  NOT NULL DEFAULT now(),
    expires_at   timestamptz,                              -- NULL: never (API tokens only)
    last_used_at timestamptz,
    revoked_at   timestamptz,
    CONSTRAINT auth_tokens_pkey PRIMARY KEY (id),
    CONSTRAINT auth_tokens_token_hash_key UNIQUE (token_hash),
    CONSTRAINT auth_tokens_kind_check CHECK (kind IN ('session', 'api')),
    CONSTRAINT auth_tokens_token_hash_check CHECK (octet_length(token_hash) = 32),
    CONSTRAINT auth_tokens_session_expires_check CHECK (kind <> 'session' OR expires_at IS NOT NULL),
    CONSTRAINT auth_tokens_user_id_fkey FOREIGN KEY (user_id)
        REFERENCES users (id) ON DELETE CASCADE
);
CREATE INDEX idx_auth_tokens_user ON auth_tokens (user_id);

-- Login throttling (per username and per client IP) and forensics.
CREATE TABLE login_attempts (
    id         bigint      GENERATED ALWAYS AS IDENTITY,
    username   varchar(50) NOT NULL,
    ip_address varchar(45),
    succeeded  boolean     NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT login_attempts_pkey PRIMARY KEY (id)
);
CREATE INDEX idx_login_attempts_username_created ON login_attempts (username, created_at DESC);
CREATE INDEX idx_login_attempts_ip_created ON login_attempts (ip_address, created_at DESC);

-- ---------------------------------------------------------------------------------------------
-- updated_at triggers: one per table that has an updated_at column
-- ---------------------------------------------------------------------------------------------

CREATE TRIGGER llm_providers_set_updated_at BEFORE UPDATE ON llm_providers
    FOR EACH ROW EXECUTE FUNCTION set_updated_at();
CREATE TRIGGER users_set_updated_at BEFORE UPDATE ON users
    FOR EACH ROW EXECUTE FUNCTION set_updated_at();
CREATE TRIGGER system_config_set_updated_at BEFORE UPDATE ON system_config
    FOR EACH ROW EXECUTE FUNCTION set_updated_at();
CREATE TRIGGER server_credentials_set_updated_at BEFORE UPDATE ON server_credentials
    FOR EACH ROW EXECUTE FUNCTION set_updated_at();
CREATE TRIGGER auto_analyze_rules_set_updated_at BEFORE UPDATE ON auto_analyze_rules
    FOR EACH ROW EXECUTE FUNCTION set_updated_at();
CREATE TRIGGER chat_sessions_set_updated_at BEFORE UPDATE ON chat_sessions
    FOR EACH ROW EXECUTE FUNCTION set_updated_at();
CREATE TRIGGER runbooks_set_updated_at BEFORE UPDATE ON runbooks
    FOR EACH ROW EXECUTE FUNCTION set_updated_at();
CREATE TRIGGER circuit_breakers_set_updated_at BEFORE UPDATE ON circuit_breakers
    FOR EACH ROW EXECUTE FUNCTION set_updated_at();
CREATE TRIGGER blackout_windows_set_updated_at BEFORE UPDATE ON blackout_windows
    FOR EACH ROW EXECUTE FUNCTION set_updated_at();
