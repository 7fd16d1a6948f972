//! Request context shared by every resource: application state, bearer authentication, role
//! checks and the client address used by the audit log.

use std::net::IpAddr;
use std::sync::Arc;

use poem::Request;
use poem_openapi::{SecurityScheme, auth::Bearer};
use sqlx::PgPool;

use crate::auth::{self, AuthSettings, Identity};
use crate::config::Config;
use crate::domain::Role;
use crate::store::{self, audit::NewAuditEntry};

use super::error::ApiError;

/// What every handler can reach. Cheap to clone.
#[derive(Clone)]
pub struct AppState {
    /// The database.
    pub pool: PgPool,
    /// The configuration the process started with.
    pub config: Arc<Config>,
    /// Keys for stored secrets; `None` when none is configured (secrets cannot be written).
    pub secrets: Option<Arc<crate::crypto::secrets::Keyring>>,
    /// Webhook requests checking a token on a connection of their own (refused or empty
    /// notifications) at once: at most half the pool's connections, so a storm of them queues
    /// here instead of starving the rest of the API of connections.
    pub webhook_slots: Arc<tokio::sync::Semaphore>,
    /// Where accepted notifications are stored, in group commits (a few connections at most).
    pub intake: Arc<super::intake::Intake>,
    /// Wakes workers after a request committed jobs (one debounced `NOTIFY` for a burst, sent
    /// outside the request's transaction).
    pub job_notifier: crate::queue::Notifier,
    /// Wake-ups of live execution streams (one lazily opened listening connection).
    pub live: Arc<super::live::LiveEvents>,
}

/// Minimum spacing of the wake-up `NOTIFY`s an API process sends.
pub const JOB_NOTIFY_DEBOUNCE: std::time::Duration = std::time::Duration::from_millis(5);

/// Permits for concurrent webhook token checks on a pool of `max_connections`.
pub fn webhook_slots_for(pool: &PgPool) -> Arc<tokio::sync::Semaphore> {
    let max = pool.options().get_max_connections() as usize;
    Arc::new(tokio::sync::Semaphore::new((max / 2).max(1)))
}

/// The webhook's group-commit writers on a pool of `max_connections`: a quarter of the pool,
/// from 1 to 4. While some commit, the notifications arriving meanwhile gather for the next.
pub fn intake_for(pool: &PgPool) -> Arc<super::intake::Intake> {
    let max = pool.options().get_max_connections() as usize;
    super::intake::Intake::spawn(
        pool.clone(),
        (max / 4).clamp(1, 4),
        crate::engine::alerts::INTAKE_JOBS,
    )
}

impl AppState {
    /// State for a pool and a configuration; loads the secret keyring the configuration names.
    pub fn new(
        pool: PgPool,
        config: Arc<Config>,
    ) -> Result<AppState, crate::crypto::secrets::SecretError> {
        let secrets = crate::crypto::secrets::Keyring::from_config(&config)?.map(Arc::new);
        Ok(AppState {
            webhook_slots: webhook_slots_for(&pool),
            intake: intake_for(&pool),
            job_notifier: crate::queue::Notifier::spawn(pool.clone(), JOB_NOTIFY_DEBOUNCE),
            live: super::live::LiveEvents::new(pool.clone()),
            pool,
            config,
            secrets,
        })
    }

    /// Identity settings derived from the configuration.
    pub fn auth_settings(&self) -> AuthSettings {
        AuthSettings {
            token_ttl: self.config.token_ttl,
            max_failures_per_user: self.config.login_max_failures_per_user,
            max_failures_per_ip: self.config.login_max_failures_per_ip,
            window: self.config.login_window,
        }
    }
}

/// A bearer token from `POST /api/v1/auth/login` or an API token.
#[derive(SecurityScheme)]
#[oai(ty = "bearer", rename = "bearerAuth")]
pub struct BearerAuth(pub Bearer);

/// The authenticated caller of one request, with its address.
#[derive(Debug, Clone)]
pub struct Caller {
    /// Who.
    pub identity: Identity,
    /// From where.
    pub ip: Option<String>,
}

/// The client address: the socket peer, or, when the deployment says a trusted proxy sets
/// `X-Forwarded-For`, the last address of that header: the one the proxy itself appended (the
/// ones before it are whatever the client sent, and would let a client pick its own address
/// for the login throttle and the audit log).
pub fn client_ip(req: &Request, trust_forwarded_for: bool) -> Option<String> {
    if trust_forwarded_for
        && let Some(forwarded) = req
            .headers()
            .get_all("x-forwarded-for")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .next_back()
        && let Some(last) = forwarded.rsplit(',').next()
        && let Ok(ip) = last.trim().parse::<IpAddr>()
    {
        return Some(ip.to_string());
    }
    req.remote_addr()
        .as_socket_addr()
        .map(|addr| addr.ip().to_string())
}

impl AppState {
    /// Authenticates the bearer token and checks the least role the operation needs.
    pub async fn authorize(
        &self,
        req: &Request,
        auth: &BearerAuth,
        least: Role,
    ) -> Result<Caller, ApiError> {
        let identity = auth::authenticate(&self.pool, &auth.0.token).await?;
        auth::require(&identity, least)?;
        Ok(Caller {
            identity,
            ip: client_ip(req, self.config.trust_forwarded_for),
        })
    }
}

impl Caller {
    /// An audit entry by this caller.
    pub fn audit<'a>(
        &'a self,
        action: &'a str,
        resource_type: &'a str,
        resource_id: Option<uuid::Uuid>,
        details: serde_json::Value,
    ) -> NewAuditEntry<'a> {
        NewAuditEntry {
            user_id: Some(self.identity.user_id),
            action,
            resource_type,
            resource_id,
            details,
            ip_address: self.ip.as_deref(),
        }
    }

    /// Writes an audit entry in the caller's transaction.
    pub async fn record(
        &self,
        conn: &mut sqlx::PgConnection,
        entry: NewAuditEntry<'_>,
    ) -> Result<(), ApiError> {
        store::audit::audit_insert(conn, &entry).await?;
        Ok(())
    }
}
