//! `server_credentials`: managed servers, their encrypted credentials, pinned SSH host keys and
//! connection-test results. Secret columns hold envelopes sealed by `crypto::secrets`; this file
//! stores and returns them as opaque text and never sees plaintext.

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::PgConnection;
use uuid::Uuid;

use super::StoreResult;

/// A row of `server_credentials` (secret columns are envelopes).
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ServerRow {
    /// Primary key.
    pub id: Uuid,
    /// Friendly name (unique).
    pub name: String,
    /// Host name or address.
    pub hostname: String,
    /// Port.
    pub port: i32,
    /// Login name.
    pub username: String,
    /// linux or windows.
    pub os_type: String,
    /// ssh or winrm.
    pub protocol: String,
    /// key or password.
    pub auth_type: String,
    /// Envelope of the private key.
    pub ssh_key_encrypted: Option<String>,
    /// Envelope of the password (or of the key's passphrase when auth_type is key).
    pub password_encrypted: Option<String>,
    /// kerberos, ntlm or certificate.
    pub winrm_transport: Option<String>,
    /// WinRM over TLS.
    pub winrm_use_ssl: bool,
    /// Validate the WinRM certificate.
    pub winrm_cert_validation: bool,
    /// AD domain.
    pub domain: Option<String>,
    /// Environment.
    pub environment: Option<String>,
    /// Tags (JSON array of strings).
    pub tags: Value,
    /// Last connection test.
    pub last_connection_test: Option<DateTime<Utc>>,
    /// success or failed.
    pub last_connection_status: Option<String>,
    /// Message of the last failed connection test.
    pub last_connection_error: Option<String>,
    /// Pinned host key (OpenSSH public-key text).
    pub ssh_host_key: Option<String>,
    /// SHA-256 fingerprint of the pinned key.
    pub ssh_host_key_fingerprint: Option<String>,
    /// When the key was pinned.
    pub ssh_host_key_pinned_at: Option<DateTime<Utc>>,
    /// Creator.
    pub created_by: Option<Uuid>,
    /// Creation time.
    pub created_at: DateTime<Utc>,
    /// Last change.
    pub updated_at: DateTime<Utc>,
}

/// Every non-secret field of a server, for create and full update.
#[derive(Debug, Clone)]
pub struct ServerFields<'a> {
    /// Friendly name.
    pub name: &'a str,
    /// Host name or address.
    pub hostname: &'a str,
    /// Port.
    pub port: i32,
    /// Login name.
    pub username: &'a str,
    /// linux or windows.
    pub os_type: &'a str,
    /// ssh or winrm.
    pub protocol: &'a str,
    /// key or password.
    pub auth_type: &'a str,
    /// kerberos, ntlm or certificate.
    pub winrm_transport: Option<&'a str>,
    /// WinRM over TLS.
    pub winrm_use_ssl: bool,
    /// Validate the WinRM certificate.
    pub winrm_cert_validation: bool,
    /// AD domain.
    pub domain: Option<&'a str>,
    /// Environment.
    pub environment: Option<&'a str>,
    /// Tags.
    pub tags: &'a Value,
}

/// Inserts a server with the given id (secrets are sealed for that id before the insert).
pub async fn server_create(
    conn: &mut PgConnection,
    id: Uuid,
    f: &ServerFields<'_>,
    ssh_key_encrypted: Option<&str>,
    password_encrypted: Option<&str>,
    created_by: Uuid,
) -> StoreResult<ServerRow> {
    Ok(sqlx::query_as::<_, ServerRow>(
        "INSERT INTO server_credentials (id, name, hostname, port, username, os_type, protocol, \
           auth_type, winrm_transport, winrm_use_ssl, winrm_cert_validation, domain, environment, \
           tags, ssh_key_encrypted, password_encrypted, created_by) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17) \
         RETURNING id, name, hostname, port, username, os_type, protocol, auth_type, \
           ssh_key_encrypted, password_encrypted, winrm_transport, winrm_use_ssl, \
           winrm_cert_validation, domain, environment, tags, last_connection_test, \
           last_connection_status, last_connection_error, ssh_host_key, ssh_host_key_fingerprint, \
           ssh_host_key_pinned_at, created_by, created_at, updated_at",
    )
    .bind(id)
    .bind(f.name)
    .bind(f.hostname)
    .bind(f.port)
    .bind(f.username)
    .bind(f.os_type)
    .bind(f.protocol)
    .bind(f.auth_type)
    .bind(f.winrm_transport)
    .bind(f.winrm_use_ssl)
    .bind(f.winrm_cert_validation)
    .bind(f.domain)
    .bind(f.environment)
    .bind(f.tags)
    .bind(ssh_key_encrypted)
    .bind(password_encrypted)
    .bind(created_by)
    .fetch_one(conn)
    .await?)
}

/// Fetches a server.
pub async fn server_get(conn: &mut PgConnection, id: Uuid) -> StoreResult<Option<ServerRow>> {
    Ok(sqlx::query_as::<_, ServerRow>(
        "SELECT id, name, hostname, port, username, os_type, protocol, auth_type, \
           ssh_key_encrypted, password_encrypted, winrm_transport, winrm_use_ssl, \
           winrm_cert_validation, domain, environment, tags, last_connection_test, \
           last_connection_status, last_connection_error, ssh_host_key, ssh_host_key_fingerprint, \
           ssh_host_key_pinned_at, created_by, created_at, updated_at \
         FROM server_credentials WHERE id = $1",
    )
    .bind(id)
    .fetch_optional(conn)
    .await?)
}

/// Fetches a server and locks its row for the rest of the transaction.
pub async fn server_get_for_update(
    conn: &mut PgConnection,
    id: Uuid,
) -> StoreResult<Option<ServerRow>> {
    Ok(sqlx::query_as::<_, ServerRow>(
        "SELECT id, name, hostname, port, username, os_type, protocol, auth_type, \
           ssh_key_encrypted, password_encrypted, winrm_transport, winrm_use_ssl, \
           winrm_cert_validation, domain, environment, tags, last_connection_test, \
           last_connection_status, last_connection_error, ssh_host_key, ssh_host_key_fingerprint, \
           ssh_host_key_pinned_at, created_by, created_at, updated_at \
         FROM server_credentials WHERE id = $1 FOR UPDATE",
    )
    .bind(id)
    .fetch_optional(conn)
    .await?)
}

/// Lists servers by name, filtered by tags (a server must carry every tag given) and
/// environment; returns the page and the total matching.
pub async fn server_list(
    conn: &mut PgConnection,
    tags: &[String],
    environment: Option<&str>,
    limit: i64,
    offset: i64,
) -> StoreResult<(Vec<ServerRow>, i64)> {
    let wanted = Value::from(tags.to_vec());
    let rows = sqlx::query_as::<_, ServerRow>(
        "SELECT id, name, hostname, port, username, os_type, protocol, auth_type, \
           ssh_key_encrypted, password_encrypted, winrm_transport, winrm_use_ssl, \
           winrm_cert_validation, domain, environment, tags, last_connection_test, \
           last_connection_status, last_connection_error, ssh_host_key, ssh_host_key_fingerprint, \
           ssh_host_key_pinned_at, created_by, created_at, updated_at \
         FROM server_credentials \
         WHERE tags @> $1 AND ($2::text IS NULL OR environment = $2) \
         ORDER BY name, id LIMIT $3 OFFSET $4",
    )
    .bind(&wanted)
    .bind(environment)
    .bind(limit)
    .bind(offset)
    .fetch_all(&mut *conn)
    .await?;
    let total: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM server_credentials \
         WHERE tags @> $1 AND ($2::text IS NULL OR environment = $2)",
    )
    .bind(&wanted)
    .bind(environment)
    .fetch_one(conn)
    .await?;
    Ok((rows, total))
}

/// Replaces every non-secret field and both secret columns (the caller passes the current
/// envelopes for secrets it keeps). With `may_clear_host_key` (an admin's change), a changed
/// hostname or port clears the pinned host key; otherwise the pin stays, and the new address
/// must present the same key.
pub async fn server_update(
    conn: &mut PgConnection,
    id: Uuid,
    f: &ServerFields<'_>,
    ssh_key_encrypted: Option<&str>,
    password_encrypted: Option<&str>,
    may_clear_host_key: bool,
) -> StoreResult<Option<ServerRow>> {
    Ok(sqlx::query_as::<_, ServerRow>(
        "UPDATE server_credentials SET name = $2, hostname = $3, port = $4, username = $5, \
           os_type = $6, protocol = $7, auth_type = $8, winrm_transport = $9, winrm_use_ssl = $10, \
           winrm_cert_validation = $11, domain = $12, environment = $13, tags = $14, \
           ssh_key_encrypted = $15, password_encrypted = $16, \
           ssh_host_key = \
             CASE WHEN NOT $17 OR (hostname = $3 AND port = $4) THEN ssh_host_key END, \
           ssh_host_key_fingerprint = CASE WHEN NOT $17 OR (hostname = $3 AND port = $4) \
             THEN ssh_host_key_fingerprint END, \
           ssh_host_key_pinned_at = CASE WHEN NOT $17 OR (hostname = $3 AND port = $4) \
             THEN ssh_host_key_pinned_at END \
         WHERE id = $1 \
         RETURNING id, name, hostname, port, username, os_type, protocol, auth_type, \
           ssh_key_encrypted, password_encrypted, winrm_transport, winrm_use_ssl, \
           winrm_cert_validation, domain, environment, tags, last_connection_test, \
           last_connection_status, last_connection_error, ssh_host_key, ssh_host_key_fingerprint, \
           ssh_host_key_pinned_at, created_by, created_at, updated_at",
    )
    .bind(id)
    .bind(f.name)
    .bind(f.hostname)
    .bind(f.port)
    .bind(f.username)
    .bind(f.os_type)
    .bind(f.protocol)
    .bind(f.auth_type)
    .bind(f.winrm_transport)
    .bind(f.winrm_use_ssl)
    .bind(f.winrm_cert_validation)
    .bind(f.domain)
    .bind(f.environment)
    .bind(f.tags)
    .bind(ssh_key_encrypted)
    .bind(password_encrypted)
    .bind(may_clear_host_key)
    .fetch_optional(conn)
    .await?)
}

/// Deletes a server; returns whether it existed.
pub async fn server_delete(conn: &mut PgConnection, id: Uuid) -> StoreResult<bool> {
    let done = sqlx::query("DELETE FROM server_credentials WHERE id = $1")
        .bind(id)
        .execute(conn)
        .await?;
    Ok(done.rows_affected() == 1)
}

/// Pins a host key if none is pinned yet; returns the key pinned afterwards (None when the
/// server no longer exists). One statement, so concurrent first connections agree on a winner.
pub async fn server_host_key_pin(
    conn: &mut PgConnection,
    id: Uuid,
    key: &str,
    fingerprint: &str,
) -> StoreResult<Option<String>> {
    sqlx::query(
        "UPDATE server_credentials SET ssh_host_key = $2, ssh_host_key_fingerprint = $3, \
           ssh_host_key_pinned_at = now() \
         WHERE id = $1 AND ssh_host_key IS NULL",
    )
    .bind(id)
    .bind(key)
    .bind(fingerprint)
    .execute(&mut *conn)
    .await?;
    let pinned: Option<Option<String>> =
        sqlx::query_scalar("SELECT ssh_host_key FROM server_credentials WHERE id = $1")
            .bind(id)
            .fetch_optional(conn)
            .await?;
    Ok(pinned.flatten())
}

/// Clears the pinned host key; returns the fingerprint that was pinned, if the server exists.
pub async fn server_host_key_reset(
    conn: &mut PgConnection,
    id: Uuid,
) -> StoreResult<Option<Option<String>>> {
    Ok(sqlx::query_scalar(
        "UPDATE server_credentials AS s SET ssh_host_key = NULL, \
           ssh_host_key_fingerprint = NULL, ssh_host_key_pinned_at = NULL \
         FROM (SELECT id, ssh_host_key_fingerprint AS old FROM server_credentials \
               WHERE id = $1 FOR UPDATE) AS before \
         WHERE s.id = before.id RETURNING before.old",
    )
    .bind(id)
    .fetch_optional(conn)
    .await?)
}

/// Records the outcome of a connection test.
pub async fn server_connection_test_record(
    conn: &mut PgConnection,
    id: Uuid,
    success: bool,
    error: Option<&str>,
) -> StoreResult<Option<ServerRow>> {
    Ok(sqlx::query_as::<_, ServerRow>(
        "UPDATE server_credentials SET last_connection_test = now(), \
           last_connection_status = CASE WHEN $2 THEN 'success' ELSE 'failed' END, \
           last_connection_error = $3 \
         WHERE id = $1 \
         RETURNING id, name, hostname, port, username, os_type, protocol, auth_type, \
           ssh_key_encrypted, password_encrypted, winrm_transport, winrm_use_ssl, \
           winrm_cert_validation, domain, environment, tags, last_connection_test, \
           last_connection_status, last_connection_error, ssh_host_key, ssh_host_key_fingerprint, \
           ssh_host_key_pinned_at, created_by, created_at, updated_at",
    )
    .bind(id)
    .bind(success)
    .bind(error)
    .fetch_optional(conn)
    .await?)
}
