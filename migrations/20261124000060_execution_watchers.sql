-- Live-stream watchers. An append to execution_events sends NOTIFY aiops_execution_events
-- (payload: the execution id) only while some live stream follows that execution. Every NOTIFY
-- costs each listening backend of the database a transaction, and a notifying commit holds
-- PostgreSQL's global notification lock through its WAL flush, so runs nobody watches must not
-- notify at all. Streams register here (and refresh expires_at while open); an API process that
-- died leaves rows that simply expire. Unlogged: after a server crash the streams reconnect and
-- register again.
CREATE UNLOGGED TABLE execution_watchers (
    execution_id uuid        NOT NULL,
    watcher_id   uuid        NOT NULL,
    expires_at   timestamptz NOT NULL,
    CONSTRAINT execution_watchers_pkey PRIMARY KEY (execution_id, watcher_id)
);

CREATE FUNCTION execution_events_notify() RETURNS trigger
    LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM execution_watchers
               WHERE execution_id = NEW.execution_id AND expires_at > now()) THEN
        PERFORM pg_notify('aiops_execution_events', NEW.execution_id::text);
    END IF;
    RETURN NULL;
END;
$$;

CREATE TRIGGER execution_events_notify
    AFTER INSERT ON execution_events
    FOR EACH ROW EXECUTE FUNCTION execution_events_notify();
