-- Every runbook has its circuit breaker from the moment it exists (closed, default thresholds),
-- however the runbook is inserted: admission then always finds a row to read without a lock,
-- so the first burst of runs of a new runbook does not queue on the breaker's creation.
CREATE FUNCTION runbooks_create_breaker() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO circuit_breakers (runbook_id) VALUES (NEW.id)
    ON CONFLICT (runbook_id) DO NOTHING;
    RETURN NULL;
END;
$$;

CREATE TRIGGER runbooks_create_breaker AFTER INSERT ON runbooks
    FOR EACH ROW EXECUTE FUNCTION runbooks_create_breaker();

-- Runbooks created before this rule get theirs here.
INSERT INTO circuit_breakers (runbook_id)
SELECT id FROM runbooks
ON CONFLICT (runbook_id) DO NOTHING;
