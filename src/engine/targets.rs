//! Where an execution's commands run: the worker's own host when the execution has no server,
//! otherwise the server's connection details (decrypted only here, in memory) for its executor.

use std::future::Future;
use std::pin::Pin;

use sqlx::PgConnection;
use uuid::Uuid;

use crate::exec::Target;

/// A resolved target: how to reach it, the secret values to mask, and the server as templates
/// see it (no secrets).
#[derive(Debug, Clone)]
pub struct ResolvedTarget {
    /// Executor target.
    pub target: Target,
    /// Secret values (passwords, passphrases) to mask in everything stored or streamed.
    pub secrets: Vec<String>,
    /// `server` in templates.
    pub server: serde_json::Value,
}

/// Boxed future of [`TargetResolver::resolve`].
pub type ResolveFuture<'a> =
    Pin<Box<dyn Future<Output = Result<ResolvedTarget, String>> + Send + 'a>>;

/// Resolves an execution's server.
pub trait TargetResolver: Send + Sync {
    /// The target for `server_id` (`None`: the worker's own host).
    fn resolve<'a>(
        &'a self,
        conn: &'a mut PgConnection,
        server_id: Option<Uuid>,
    ) -> ResolveFuture<'a>;
}

/// Resolves an execution's target for its runbook: a runbook written for Windows (quoted and
/// checked by PowerShell rules) is refused on a target whose commands run with `/bin/sh` (the
/// worker's own host, SSH), where its quoting would not hold.
pub async fn resolve_for(
    resolver: &dyn TargetResolver,
    conn: &mut PgConnection,
    server_id: Option<Uuid>,
    target_os: &str,
) -> Result<ResolvedTarget, String> {
    let resolved = resolver.resolve(conn, server_id).await?;
    if target_os == "windows" {
        return Err(format!(
            "the runbook targets windows, but this {} target runs commands with /bin/sh; \
             a windows runbook runs only on a windows server over WinRM",
            resolved.target.kind()
        ));
    }
    Ok(resolved)
}

/// Runs everything on the worker's host; refuses server targets.
pub struct LocalOnly;

impl TargetResolver for LocalOnly {
    fn resolve<'a>(
        &'a self,
        _conn: &'a mut PgConnection,
        server_id: Option<Uuid>,
    ) -> ResolveFuture<'a> {
        Box::pin(async move {
            match server_id {
                None => Ok(ResolvedTarget {
                    target: Target::Local,
                    secrets: Vec::new(),
                    server: serde_json::json!({ "name": "local", "hostname": "localhost" }),
                }),
                Some(id) => Err(format!(
                    "server {id}: no remote executor is configured on this worker"
                )),
            }
        })
    }
}

/// Resolves servers from `server_credentials`: SSH servers get their credentials opened with
/// the keyring (in memory only) and their secrets masked; the worker's own host needs no row.
pub struct DatabaseTargets {
    /// Opens the stored credentials; `None` when no secret key is configured.
    pub keyring: Option<std::sync::Arc<crate::crypto::secrets::Keyring>>,
    /// SSH connect timeout.
    pub connect_timeout: std::time::Duration,
}

impl TargetResolver for DatabaseTargets {
    fn resolve<'a>(
        &'a self,
        conn: &'a mut PgConnection,
        server_id: Option<Uuid>,
    ) -> ResolveFuture<'a> {
        Box::pin(async move {
            let Some(id) = server_id else {
                return LocalOnly.resolve(conn, None).await;
            };
            let row = crate::store::servers::server_get(conn, id)
                .await
                .map_err(|e| e.to_string())?
                .ok_or_else(|| format!("server {id} no longer exists"))?;
            let server = serde_json::json!({
                "id": row.id, "name": row.name, "hostname": row.hostname, "port": row.port,
                "username": row.username, "os_type": row.os_type, "protocol": row.protocol,
                "environment": row.environment, "tags": row.tags,
            });
            let target =
                crate::servers::ssh_target(&row, self.keyring.as_deref(), self.connect_timeout)
                    .map_err(|e| e.to_string())?;
            let secrets = match &target.auth {
                crate::exec::SshAuth::Password(p) => vec![p.clone()],
                crate::exec::SshAuth::Key { passphrase, .. } => {
                    passphrase.iter().cloned().collect()
                }
            };
            Ok(ResolvedTarget {
                target: Target::Ssh(target),
                secrets,
                server,
            })
        })
    }
}
