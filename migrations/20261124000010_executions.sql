-- Durable runbook execution: the columns the engine needs beyond the schema document, and the
-- live-output event log. Every addition is listed in ARCHITECTURE.md.

ALTER TABLE runbook_executions
    -- The runbook (steps, variables, limits) as it was when the execution was created, so every
    -- worker runs the same definition even if the runbook changes mid-run.
    ADD COLUMN runbook_snapshot    jsonb        NOT NULL DEFAULT '{}',
    -- Runbook-level attempts: attempt counts from 1 when running; max_attempts = max_retries + 1.
    ADD COLUMN attempt             integer      NOT NULL DEFAULT 0,
    ADD COLUMN max_attempts        integer      NOT NULL DEFAULT 1,
    -- Approval bookkeeping.
    ADD COLUMN awaiting_approval   boolean      NOT NULL DEFAULT false,
    ADD COLUMN approval_expires_at timestamptz,
    -- Cancellation request (the worker running the step kills its command when it sees it).
    ADD COLUMN cancel_requested_at timestamptz,
    ADD COLUMN cancelled_by        uuid,
    -- Fan-out: executions started together on many servers share a batch and its concurrency.
    ADD COLUMN batch_id            uuid,
    ADD COLUMN batch_concurrency   integer,
    -- Admitted by a half-open circuit breaker as a probe.
    ADD COLUMN breaker_probe       boolean      NOT NULL DEFAULT false,
    -- Why the run did (or did not) happen: the gate that refused it.
    ADD COLUMN refused_by          varchar(30),
    ADD CONSTRAINT runbook_executions_attempt_check CHECK (attempt >= 0 AND attempt <= max_attempts),
    ADD CONSTRAINT runbook_executions_max_attempts_check CHECK (max_attempts >= 1),
    ADD CONSTRAINT runbook_executions_batch_concurrency_check
        CHECK (batch_concurrency IS NULL OR batch_concurrency > 0),
    ADD CONSTRAINT runbook_executions_refused_by_check CHECK (refused_by IS NULL OR refused_by IN
        ('runbook_inactive', 'blackout', 'circuit_breaker', 'rate_limit', 'approval_rejected',
         'approval_expired', 'target', 'concurrency')),
    ADD CONSTRAINT runbook_executions_cancelled_by_fkey FOREIGN KEY (cancelled_by)
        REFERENCES users (id) ON DELETE SET NULL;

-- Rate limiting counts the executions of a runbook that started within a window.
CREATE INDEX idx_runbook_executions_runbook_started ON runbook_executions (runbook_id, started_at DESC)
    WHERE started_at IS NOT NULL;
CREATE INDEX idx_runbook_executions_batch ON runbook_executions (batch_id) WHERE batch_id IS NOT NULL;
CREATE INDEX idx_runbook_executions_created_at ON runbook_executions (created_at DESC);

ALTER TABLE step_executions
    -- 'run' for the step itself, 'rollback' for its rollback_command.
    ADD COLUMN phase         varchar(10) NOT NULL DEFAULT 'run',
    -- The runbook-level attempt this row belongs to.
    ADD COLUMN run_attempt   integer     NOT NULL DEFAULT 1,
    -- The condition was false: recorded, not run.
    ADD COLUMN skipped       boolean     NOT NULL DEFAULT false,
    -- The worker running this attempt died; the step ran again (at-least-once side effects).
    ADD COLUMN interrupted   boolean     NOT NULL DEFAULT false,
    -- Output was cut at the limit (a visible marker is in the text too).
    ADD COLUMN truncated     boolean     NOT NULL DEFAULT false,
    ADD COLUMN error_message text,
    -- The rendered command as run, with secrets masked.
    ADD COLUMN command       text,
    ADD COLUMN exit_signal   varchar(20),
    ADD CONSTRAINT step_executions_phase_check CHECK (phase IN ('run', 'rollback')),
    ADD CONSTRAINT step_executions_run_attempt_check CHECK (run_attempt >= 1);

CREATE INDEX idx_step_executions_lookup
    ON step_executions (execution_id, phase, run_attempt, step_order, retry_attempt);

-- Live output and status changes of executions, appended by workers and streamed by any API
-- server (Server-Sent Events). Bounded per chunk; pruned with the execution's retention.
CREATE TABLE execution_events (
    id                bigint      GENERATED ALWAYS AS IDENTITY,
    execution_id      uuid        NOT NULL,
    step_execution_id uuid,
    kind              varchar(10) NOT NULL,
    data              text        NOT NULL,
    created_at        timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT execution_events_pkey PRIMARY KEY (id),
    CONSTRAINT execution_events_kind_check CHECK (kind IN ('status', 'stdout', 'stderr')),
    CONSTRAINT execution_events_data_check CHECK (octet_length(data) <= 65536),
    CONSTRAINT execution_events_execution_id_fkey FOREIGN KEY (execution_id)
        REFERENCES runbook_executions (id) ON DELETE CASCADE,
    CONSTRAINT execution_events_step_execution_id_fkey FOREIGN KEY (step_execution_id)
        REFERENCES step_executions (id) ON DELETE CASCADE
);
CREATE INDEX idx_execution_events_execution ON execution_events (execution_id, id);
