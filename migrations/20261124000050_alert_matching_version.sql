-- A counter of changes to what alert matching reads: auto_analyze_rules, the matching columns of
-- runbook_triggers and runbooks, the identity columns of server_credentials, and system_config.
-- Workers cache the matching configuration and compare this counter, read in the processing
-- transaction, with the one their cache was loaded under: the bump commits with the change, so a
-- change is seen by every alert processed after it commits. Columns that change while alerts
-- are processed (last_triggered_at, connection tests, host keys) do not bump it.
CREATE TABLE alert_matching_version (
    id      boolean NOT NULL DEFAULT true,
    version bigint  NOT NULL,
    CONSTRAINT alert_matching_version_pkey PRIMARY KEY (id),
    CONSTRAINT alert_matching_version_single_row CHECK (id)
);
INSERT INTO alert_matching_version (id, version) VALUES (true, 1);

CREATE FUNCTION alert_matching_version_bump() RETURNS trigger
    LANGUAGE plpgsql AS $$
BEGIN
    UPDATE alert_matching_version SET version = version + 1;
    RETURN NULL;
END;
$$;

CREATE TRIGGER auto_analyze_rules_matching_version
    AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON auto_analyze_rules
    FOR EACH STATEMENT EXECUTE FUNCTION alert_matching_version_bump();
CREATE TRIGGER runbook_triggers_matching_version_write
    AFTER INSERT OR DELETE OR TRUNCATE ON runbook_triggers
    FOR EACH STATEMENT EXECUTE FUNCTION alert_matching_version_bump();
CREATE TRIGGER runbook_triggers_matching_version_update
    AFTER UPDATE OF id, runbook_id, name, priority, alert_name_pattern, severity_pattern,
        source_pattern, labels_match, time_window_start, time_window_end, enabled,
        cooldown_seconds, cooldown_per_instance ON runbook_triggers
    FOR EACH STATEMENT EXECUTE FUNCTION alert_matching_version_bump();
CREATE TRIGGER runbooks_matching_version_write
    AFTER INSERT OR DELETE OR TRUNCATE ON runbooks
    FOR EACH STATEMENT EXECUTE FUNCTION alert_matching_version_bump();
CREATE TRIGGER runbooks_matching_version_update
    AFTER UPDATE OF id, name, status, mode, allowed_servers ON runbooks
    FOR EACH STATEMENT EXECUTE FUNCTION alert_matching_version_bump();
CREATE TRIGGER server_credentials_matching_version_write
    AFTER INSERT OR DELETE OR TRUNCATE ON server_credentials
    FOR EACH STATEMENT EXECUTE FUNCTION alert_matching_version_bump();
CREATE TRIGGER server_credentials_matching_version_update
    AFTER UPDATE OF id, name, hostname, tags, environment ON server_credentials
    FOR EACH STATEMENT EXECUTE FUNCTION alert_matching_version_bump();
CREATE TRIGGER system_config_matching_version
    AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON system_config
    FOR EACH STATEMENT EXECUTE FUNCTION alert_matching_version_bump();
