-- Pinned SSH host keys (trust on first use): the first successful connection records the key;
-- any other key is refused until an admin resets the pin.
ALTER TABLE server_credentials
    ADD COLUMN ssh_host_key             text,
    ADD COLUMN ssh_host_key_fingerprint varchar(100),
    ADD COLUMN ssh_host_key_pinned_at   timestamptz,
    ADD COLUMN last_connection_error    text;

CREATE UNIQUE INDEX server_credentials_name_key ON server_credentials (name);
CREATE INDEX idx_server_credentials_environment ON server_credentials (environment);
CREATE INDEX idx_server_credentials_tags ON server_credentials USING gin (tags);
