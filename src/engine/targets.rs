//! Where an execution's commands run: the worker's own host when the execution has no server,
//! otherwise the server's connection details (decrypted only here, in memory) for its executor.

use std::future::Future;
use std::pin::Pin;

use sqlx::PgPool;
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
    fn resolve<'a>(&'a self, pool: &'a PgPool, server_id: Option<Uuid>) -> ResolveFuture<'a>;
}

/// Runs everything on the worker's host; refuses server targets.
pub struct LocalOnly;

impl TargetResolver for LocalOnly {
    fn resolve<'a>(&'a self, _pool: &'a PgPool, server_id: Option<Uuid>) -> ResolveFuture<'a> {
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
