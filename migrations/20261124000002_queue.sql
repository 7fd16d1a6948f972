-- The durable job queue: jobs, the workers that run them, and cron bookkeeping.
--
-- State machine (ARCHITECTURE.md, "Queue"):
--   available --claim--> running --complete--> completed
--   running --fail (retryable)--> retryable --claim (run_at reached)--> running
--   running --fail (permanent or attempts exhausted)--> dead
--   running --lease expired, rescued--> retryable | dead
--   running --graceful shutdown--> available
--   available | retryable | running | dead --admin cancel--> cancelled
--   dead | cancelled --admin retry--> available
-- Every write that moves a job out of `running` is guarded by the job's lease_token.

CREATE TABLE queue_workers (
    id            uuid PRIMARY KEY,
    host          varchar(255) NOT NULL,
    pid           integer NOT NULL,
    version       varchar(50) NOT NULL,
    concurrency   integer NOT NULL,
    kinds         text[] NOT NULL DEFAULT '{}',
    started_at    timestamptz NOT NULL DEFAULT now(),
    last_seen_at  timestamptz NOT NULL DEFAULT now(),
    stopped_at    timestamptz,
    CONSTRAINT queue_workers_concurrency_check CHECK (concurrency > 0)
);

CREATE INDEX queue_workers_last_seen_idx ON queue_workers (last_seen_at DESC);

CREATE TABLE jobs (
    id                bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    kind              varchar(100) NOT NULL,
    payload           jsonb NOT NULL DEFAULT '{}',
    state             varchar(20) NOT NULL DEFAULT 'available',
    -- Lower runs first.
    priority          smallint NOT NULL DEFAULT 0,
    -- Not claimable before this instant (scheduled jobs and retry backoff).
    run_at            timestamptz NOT NULL DEFAULT now(),
    -- Claims so far; the claim that starts attempt n sets it to n.
    attempt           integer NOT NULL DEFAULT 0,
    max_attempts      integer NOT NULL DEFAULT 25,
    -- A fresh token per claim; every write by the claimant is guarded by it.
    lease_token       uuid,
    lease_expires_at  timestamptz,
    -- The worker (queue_workers.id) holding or last holding the job. No foreign key on purpose:
    -- a key-share lock on the worker row at every claim would serialise the claimers.
    locked_by         uuid,
    -- Per-job handler timeout; the kind's default applies when NULL.
    timeout_seconds   integer,
    last_error        text,
    -- [{attempt, at, error, worker}] of every failed attempt, oldest first (capped).
    errors            jsonb NOT NULL DEFAULT '[]',
    -- At most one unfinished job per key (jobs_unique_key_idx).
    unique_key        varchar(255),
    created_at        timestamptz NOT NULL DEFAULT now(),
    attempted_at      timestamptz,
    finished_at       timestamptz,
    CONSTRAINT jobs_state_check CHECK (state IN
        ('available', 'running', 'retryable', 'completed', 'dead', 'cancelled')),
    CONSTRAINT jobs_max_attempts_check CHECK (max_attempts > 0),
    CONSTRAINT jobs_attempt_check CHECK (attempt >= 0),
    CONSTRAINT jobs_timeout_check CHECK (timeout_seconds IS NULL OR timeout_seconds > 0),
    CONSTRAINT jobs_running_lease_check CHECK (
        state <> 'running' OR (lease_token IS NOT NULL AND lease_expires_at IS NOT NULL)),
    CONSTRAINT jobs_finished_check CHECK (
        (state IN ('completed', 'dead', 'cancelled')) = (finished_at IS NOT NULL))
);

-- The claim query walks this index in claim order and stops after LIMIT rows.
CREATE INDEX jobs_claimable_idx ON jobs (priority, run_at, id)
    WHERE state IN ('available', 'retryable');

-- The rescuer looks for running jobs whose lease has expired.
CREATE INDEX jobs_running_lease_idx ON jobs (lease_expires_at) WHERE state = 'running';

-- Pruning deletes finished jobs past the retention period.
CREATE INDEX jobs_finished_idx ON jobs (finished_at)
    WHERE state IN ('completed', 'dead', 'cancelled');

-- The admin API lists jobs by kind and state, newest first.
CREATE INDEX jobs_kind_state_idx ON jobs (kind, state, id);

CREATE UNIQUE INDEX jobs_unique_key_idx ON jobs (unique_key)
    WHERE unique_key IS NOT NULL AND state IN ('available', 'running', 'retryable');

-- One row per cron schedule: the last tick that was fired. Advancing it is a compare-and-set in
-- the transaction that enqueues the tick's job, so N workers fire each tick once.
CREATE TABLE queue_cron (
    name        varchar(100) PRIMARY KEY,
    schedule    varchar(255) NOT NULL,
    last_tick   timestamptz NOT NULL,
    fired_at    timestamptz NOT NULL DEFAULT now()
);
