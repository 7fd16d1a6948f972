-- Alert intake from Alertmanager: the firing episode, the webhook envelope, processing outcome,
-- webhook tokens and per-instance trigger cooldowns.

-- One row per firing episode: Alertmanager's fingerprint plus the episode's startsAt.
ALTER TABLE alerts
    ADD COLUMN starts_at             timestamptz,
    ADD COLUMN ends_at               timestamptz,              -- NULL while Alertmanager sends the zero time
    ADD COLUMN generator_url         text,
    ADD COLUMN source                varchar(255),             -- see ARCHITECTURE.md "Alert intake"
    ADD COLUMN receiver              varchar(255),
    ADD COLUMN group_key             text,
    ADD COLUMN external_url          text,
    ADD COLUMN last_received_at      timestamptz NOT NULL DEFAULT now(),
    ADD COLUMN receive_count         integer     NOT NULL DEFAULT 1,
    ADD COLUMN resolved_at           timestamptz,              -- when we learned it resolved
    ADD COLUMN processed_at          timestamptz,              -- rules and triggers evaluated
    ADD COLUMN match_outcome         jsonb,                    -- what rules and triggers decided, and why
    ADD COLUMN suggested_runbooks    jsonb       NOT NULL DEFAULT '[]',
    ADD COLUMN analysis_status       varchar(20),
    ADD COLUMN analysis_error        text,
    ADD COLUMN analysis_requested_at timestamptz;
UPDATE alerts SET starts_at = "timestamp" WHERE starts_at IS NULL;
ALTER TABLE alerts ALTER COLUMN starts_at SET NOT NULL;
ALTER TABLE alerts ADD CONSTRAINT alerts_analysis_status_check
    CHECK (analysis_status IS NULL OR analysis_status IN ('queued', 'completed', 'unavailable', 'failed'));
CREATE UNIQUE INDEX alerts_episode_key ON alerts (fingerprint, starts_at);
CREATE INDEX idx_alerts_severity ON alerts (severity);
CREATE INDEX idx_alerts_labels ON alerts USING gin (labels_json jsonb_path_ops);

-- Tokens Alertmanager authenticates with (bearer, or the password of basic auth). SHA-256 only.
CREATE TABLE webhook_tokens (
    id           uuid         NOT NULL DEFAULT gen_random_uuid(),
    name         varchar(100) NOT NULL,
    token_hash   bytea        NOT NULL,
    created_by   uuid,
    created_at   timestamptz  NOT NULL DEFAULT now(),
    last_used_at timestamptz,
    revoked_at   timestamptz,
    CONSTRAINT webhook_tokens_pkey PRIMARY KEY (id),
    CONSTRAINT webhook_tokens_name_key UNIQUE (name),
    CONSTRAINT webhook_tokens_token_hash_key UNIQUE (token_hash),
    CONSTRAINT webhook_tokens_created_by_fkey FOREIGN KEY (created_by)
        REFERENCES users (id) ON DELETE SET NULL
);
CREATE INDEX idx_webhook_tokens_created_by ON webhook_tokens (created_by);

-- Cooldown counted per alerting instance instead of per trigger.
ALTER TABLE runbook_triggers
    ADD COLUMN cooldown_per_instance boolean NOT NULL DEFAULT false;

CREATE TABLE trigger_cooldowns (
    trigger_id        uuid         NOT NULL,
    instance_key      varchar(255) NOT NULL,
    last_triggered_at timestamptz  NOT NULL,
    CONSTRAINT trigger_cooldowns_pkey PRIMARY KEY (trigger_id, instance_key),
    CONSTRAINT trigger_cooldowns_trigger_id_fkey FOREIGN KEY (trigger_id)
        REFERENCES runbook_triggers (id) ON DELETE CASCADE
);
