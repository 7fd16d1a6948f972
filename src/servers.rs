//! Glue between managed-server rows, the secret keyring and the executors: turns a
//! `server_credentials` row into an [`exec::SshTarget`] (opening its secrets) and persists
//! first-seen host keys for [`exec::ssh::SshExecutor`]. Used by the API's connection test and by
//! the execution engine; holds no SQL of its own (that is `store::servers`).

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use sqlx::PgPool;
use uuid::Uuid;

use crate::crypto::secrets::{Keyring, SecretError, SecretSlot};
use crate::exec::{self, SshAuth, SshTarget};
use crate::store::servers::ServerRow;

/// The table whose secret columns this module opens.
pub const TABLE: &str = "server_credentials";
/// The column holding the private key envelope.
pub const SSH_KEY_COLUMN: &str = "ssh_key_encrypted";
/// The column holding the password (or the key's passphrase) envelope.
pub const PASSWORD_COLUMN: &str = "password_encrypted";

/// The slot of one secret column of one server.
pub fn slot(id: Uuid, column: &'static str) -> SecretSlot<'static> {
    SecretSlot {
        table: TABLE,
        row_id: id,
        column,
    }
}

/// A server row cannot become an SSH target.
#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    /// The server is not reached over SSH.
    #[error("server {0} uses protocol {1}; only ssh is supported by this executor")]
    NotSsh(Uuid, String),
    /// The credential the auth type needs is not stored.
    #[error("server {0} has auth_type {1} but no {2} is stored")]
    MissingSecret(Uuid, String, &'static str),
    /// A secret could not be opened.
    #[error("server {0}: {1}")]
    Secret(Uuid, SecretError),
}

/// Opens the row's secrets and builds the SSH target.
pub fn ssh_target(
    row: &ServerRow,
    keyring: Option<&Keyring>,
    connect_timeout: Duration,
) -> Result<SshTarget, TargetError> {
    if row.protocol != "ssh" {
        return Err(TargetError::NotSsh(row.id, row.protocol.clone()));
    }
    let open = |column: &'static str, envelope: &str| -> Result<String, TargetError> {
        let keyring = keyring.ok_or(TargetError::Secret(row.id, SecretError::NoKey))?;
        keyring
            .open_str(slot(row.id, column), envelope)
            .map_err(|e| TargetError::Secret(row.id, e))
    };
    let auth = match row.auth_type.as_str() {
        "password" => {
            let envelope = row.password_encrypted.as_deref().ok_or_else(|| {
                TargetError::MissingSecret(row.id, row.auth_type.clone(), "password")
            })?;
            SshAuth::Password(open(PASSWORD_COLUMN, envelope)?)
        }
        _ => {
            let envelope = row.ssh_key_encrypted.as_deref().ok_or_else(|| {
                TargetError::MissingSecret(row.id, row.auth_type.clone(), "private key")
            })?;
            let passphrase = match row.password_encrypted.as_deref() {
                Some(p) => Some(open(PASSWORD_COLUMN, p)?),
                None => None,
            };
            SshAuth::Key {
                private_key: open(SSH_KEY_COLUMN, envelope)?,
                passphrase,
            }
        }
    };
    Ok(SshTarget {
        server_id: row.id,
        hostname: row.hostname.clone(),
        port: u16::try_from(row.port).unwrap_or(22),
        username: row.username.clone(),
        auth,
        pinned_host_key: row.ssh_host_key.clone(),
        connect_timeout,
    })
}

/// Records first-seen host keys on the server row.
#[derive(Clone)]
pub struct PgHostKeyPinner {
    /// The database.
    pub pool: PgPool,
}

impl exec::ssh::HostKeyPinner for PgHostKeyPinner {
    fn pin<'a>(
        &'a self,
        server_id: Uuid,
        key: &'a str,
        fingerprint: &'a str,
    ) -> Pin<Box<dyn Future<Output = Result<String, String>> + Send + 'a>> {
        Box::pin(async move {
            let mut conn = self.pool.acquire().await.map_err(|e| e.to_string())?;
            crate::store::servers::server_host_key_pin(&mut conn, server_id, key, fingerprint)
                .await
                .map_err(|e| e.to_string())?
                .ok_or_else(|| format!("server {server_id} no longer exists"))
        })
    }
}
