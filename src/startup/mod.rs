//! Start-up: building the HTTP application on a listener, the first admin, signal handling, and
//! the embedded PostgreSQL cluster used by `aiops up` when no `DATABASE_URL` is given.

pub mod embedded_pg;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use poem::Server;
use poem::listener::{Acceptor, Listener, TcpAcceptor, TcpListener};
use sqlx::PgPool;

use crate::api::{self, AppState};
use crate::config::Config;
use crate::crypto::token;
use crate::store;

/// The API server bound to its listener, ready to run. Binding happens in [`Application::build`]
/// so that callers (and tests, with port 0) learn the real address before serving.
pub struct Application {
    acceptor: TcpAcceptor,
    addr: SocketAddr,
    state: AppState,
}

impl Application {
    /// Binds the configured listen address.
    pub async fn build(config: Arc<Config>, pool: PgPool) -> std::io::Result<Application> {
        let acceptor = TcpListener::bind(config.listen)
            .into_acceptor()
            .await
            .map_err(|e| {
                std::io::Error::new(e.kind(), format!("cannot listen on {}: {e}", config.listen))
            })?;
        let addr = acceptor
            .local_addr()
            .first()
            .and_then(|a| a.as_socket_addr().copied())
            .ok_or_else(|| std::io::Error::other("listener has no socket address"))?;
        Ok(Application {
            acceptor,
            addr,
            state: AppState::new(pool, config).map_err(std::io::Error::other)?,
        })
    }

    /// The bound address (with the real port when the configured one was 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Serves until `shutdown` resolves, then lets in-flight requests finish for up to 10 s.
    pub async fn run_until(self, shutdown: impl Future<Output = ()> + Send) -> std::io::Result<()> {
        Server::new_with_acceptor(self.acceptor)
            .run_with_graceful_shutdown(
                api::app(self.state),
                shutdown,
                Some(Duration::from_secs(10)),
            )
            .await
    }
}

/// Resolves on the first SIGINT (Ctrl-C) or SIGTERM. The handlers are installed when this is
/// called, not when the future is first polled, so a signal that arrives while the caller is
/// still starting up is not lost (nor does it kill the process with the default action).
pub fn shutdown_signal() -> impl Future<Output = ()> + Send + 'static {
    use tokio::signal::unix::{SignalKind, signal};
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    async move {
        match (term, int) {
            (Ok(mut term), Ok(mut int)) => {
                tokio::select! {
                    _ = int.recv() => tracing::info!("received SIGINT, shutting down"),
                    _ = term.recv() => tracing::info!("received SIGTERM, shutting down"),
                }
            }
            (Err(e), _) | (_, Err(e)) => {
                tracing::error!(error = %e, "cannot listen for signals; only Ctrl-C will stop");
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
}

/// Credentials of an account created by [`ensure_first_admin`].
pub struct FirstAdmin {
    /// Username (`admin`).
    pub username: String,
    /// The generated password; printed once, never stored in clear.
    pub password: String,
}

/// Creates the first admin when the database has no users at all. Safe to call from several
/// processes at once: a transaction-scoped advisory lock serialises the check and the insert.
pub async fn ensure_first_admin(pool: &PgPool) -> anyhow::Result<Option<FirstAdmin>> {
    let mut tx = pool.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock(hashtext('aiops.first_admin'))")
        .execute(&mut *tx)
        .await?;
    if store::users::user_count(&mut tx).await? > 0 {
        return Ok(None);
    }
    let password = token::random_password();
    let hash = crate::auth::hash_password(password.clone()).await?;
    let row = store::users::user_create(
        &mut tx,
        &store::users::NewUser {
            username: "admin",
            email: "admin@localhost",
            full_name: Some("First administrator"),
            password_hash: &hash,
            role: "admin",
            is_active: true,
        },
    )
    .await?;
    store::audit::audit_insert(
        &mut tx,
        &store::audit::NewAuditEntry {
            user_id: None,
            action: "user_create",
            resource_type: "user",
            resource_id: Some(row.id),
            details: serde_json::json!({ "username": "admin", "role": "admin", "bootstrap": true }),
            ip_address: None,
        },
    )
    .await?;
    tx.commit().await?;
    Ok(Some(FirstAdmin {
        username: row.username,
        password,
    }))
}
