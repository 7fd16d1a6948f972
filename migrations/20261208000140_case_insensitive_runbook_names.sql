-- Runbook names are unique regardless of case, as usernames and server names are:
-- `Restart-Web` and `restart-web` would be two runbooks that people (and triggers, and
-- `aiops runbook apply`) take for one. A database that already holds such a pair is refused
-- with the names, to be renamed before upgrading.
DO $$
DECLARE
    pairs text;
BEGIN
    SELECT string_agg(DISTINCT name, ', ') INTO pairs FROM runbooks r
     WHERE EXISTS (SELECT 1 FROM runbooks o WHERE lower(o.name) = lower(r.name) AND o.id <> r.id);
    IF pairs IS NOT NULL THEN
        RAISE EXCEPTION 'runbook names that differ only in case: %; rename all but one of each before upgrading', pairs;
    END IF;
END
$$;

CREATE UNIQUE INDEX runbooks_lower_name_key ON runbooks (lower(name));
