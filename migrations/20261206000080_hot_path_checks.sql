-- The value lists of the columns every step writes (jobs.state, step_executions.phase,
-- execution_events.kind, runbook_executions.refused_by) become domains with the same CHECK.
--
-- PostgreSQL reads a table's CHECK constraints from their stored node text and prepares them
-- again in every statement that inserts into or updates the table, once per table the statement
-- writes: a step's completion writes jobs, step_executions and execution_events twice each, and
-- the `IN (...)` lists were most of that text. A domain's constraints are read once per
-- connection (type cache); only the values a statement assigns to the column are checked.
-- The same values are refused, with the same constraint names; clients still see varchar.
--
-- The constraints and indexes that mention jobs.state are recreated as they were written, so
-- that the queries' predicates keep matching the partial indexes.

CREATE DOMAIN job_state AS varchar(20)
    CONSTRAINT jobs_state_check CHECK (VALUE IN
        ('available', 'running', 'retryable', 'completed', 'dead', 'cancelled'));
CREATE DOMAIN step_phase AS varchar(10)
    CONSTRAINT step_executions_phase_check CHECK (VALUE IN ('run', 'rollback'));
CREATE DOMAIN execution_event_kind AS varchar(10)
    CONSTRAINT execution_events_kind_check CHECK (VALUE IN ('status', 'stdout', 'stderr'));
CREATE DOMAIN execution_refusal AS varchar(30)
    CONSTRAINT runbook_executions_refused_by_check CHECK (VALUE IN
        ('runbook_inactive', 'blackout', 'circuit_breaker', 'rate_limit', 'approval_rejected',
         'approval_expired', 'target', 'concurrency'));

ALTER TABLE jobs
    DROP CONSTRAINT jobs_state_check,
    DROP CONSTRAINT jobs_running_lease_check,
    DROP CONSTRAINT jobs_finished_check;
DROP INDEX jobs_claimable_idx, jobs_running_lease_idx, jobs_finished_idx, jobs_kind_state_idx,
    jobs_unique_key_idx;

ALTER TABLE jobs ALTER COLUMN state TYPE job_state;

ALTER TABLE jobs
    ADD CONSTRAINT jobs_running_lease_check CHECK (
        state <> 'running' OR (lease_token IS NOT NULL AND lease_expires_at IS NOT NULL)),
    -- A constant array rather than an IN list: less node text to read per statement.
    ADD CONSTRAINT jobs_finished_check CHECK (
        (state::text = ANY ('{completed,dead,cancelled}'::text[])) = (finished_at IS NOT NULL));

CREATE INDEX jobs_claimable_idx ON jobs (priority, run_at, id)
    WHERE state IN ('available', 'retryable');
CREATE INDEX jobs_running_lease_idx ON jobs (lease_expires_at) WHERE state = 'running';
CREATE INDEX jobs_finished_idx ON jobs (finished_at)
    WHERE state IN ('completed', 'dead', 'cancelled');
CREATE INDEX jobs_kind_state_idx ON jobs (kind, state, id);
CREATE UNIQUE INDEX jobs_unique_key_idx ON jobs (unique_key)
    WHERE unique_key IS NOT NULL AND state IN ('available', 'running', 'retryable');

ALTER TABLE step_executions DROP CONSTRAINT step_executions_phase_check;
ALTER TABLE step_executions ALTER COLUMN phase TYPE step_phase;

ALTER TABLE execution_events DROP CONSTRAINT execution_events_kind_check;
ALTER TABLE execution_events ALTER COLUMN kind TYPE execution_event_kind;

ALTER TABLE runbook_executions DROP CONSTRAINT runbook_executions_refused_by_check;
ALTER TABLE runbook_executions ALTER COLUMN refused_by TYPE execution_refusal;
