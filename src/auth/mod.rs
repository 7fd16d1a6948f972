//! Identity: login with throttling, bearer-token authentication, API tokens and role checks.
//!
//! This is the application layer for identity: it composes `crypto` and `store` and knows nothing
//! about HTTP. The API layer maps [`AuthError`] onto status codes.

use std::time::Duration;

use chrono::Utc;
use sqlx::PgPool;
use uuid::Uuid;

use crate::crypto::{password, token};
use crate::domain::Role;
use crate::store::{self, StoreError, audit::NewAuditEntry, tokens::NewTokenRow};

/// The authenticated caller of a request.
#[derive(Debug, Clone)]
pub struct Identity {
    /// The user.
    pub user_id: Uuid,
    /// The user's name.
    pub username: String,
    /// The user's role.
    pub role: Role,
    /// The token that authenticated this request.
    pub token_id: Uuid,
}

/// Why an identity operation was refused.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// Unknown user or wrong password (deliberately indistinguishable).
    #[error("invalid username or password")]
    InvalidCredentials,
    /// The account exists but is deactivated.
    #[error("account is disabled")]
    Inactive,
    /// Too many failed attempts for this user or address.
    #[error("too many failed login attempts; retry in {} seconds", retry_seconds(*retry_after))]
    Throttled {
        /// When a new attempt may succeed.
        retry_after: Duration,
    },
    /// As many attempts on this user or from this address are being checked right now as the
    /// failure limit allows.
    #[error("too many login attempts in progress for this user or address; retry in a moment")]
    Busy,
    /// No valid token (missing, unknown, expired, revoked, or its user deactivated).
    #[error("missing, invalid, expired or revoked token")]
    Unauthenticated,
    /// Valid token, insufficient role.
    #[error("this operation needs role {need} or higher; you have {have}")]
    Forbidden {
        /// The least role the operation needs.
        need: Role,
        /// The caller's role.
        have: Role,
    },
    /// The database failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Login throttling and token settings.
#[derive(Debug, Clone)]
pub struct AuthSettings {
    /// Lifetime of session tokens.
    pub token_ttl: Duration,
    /// Failed attempts per username in the window before refusing.
    pub max_failures_per_user: i64,
    /// Failed attempts per address in the window before refusing.
    pub max_failures_per_ip: i64,
    /// The counting window.
    pub window: Duration,
}

/// A successful login: the bearer secret (shown once) and its expiry.
#[derive(Debug, Clone)]
pub struct LoginGrant {
    /// The bearer token.
    pub token: String,
    /// When it stops working.
    pub expires_at: chrono::DateTime<Utc>,
    /// Who logged in.
    pub user_id: Uuid,
    /// Their role.
    pub role: Role,
}

/// Whole seconds to wait, rounded up (a client that waits them is not refused again).
pub fn retry_seconds(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

fn parse_role(stored: &str) -> Role {
    // The CHECK constraint on users.role guarantees one of the four; fall back to the least
    // privileged role rather than failing open.
    stored.parse().unwrap_or(Role::Viewer)
}

/// A job for the password threads.
type PasswordJob = Box<dyn FnOnce() + Send>;

/// Runs `work` (argon2id, deliberately slow) on this process's password threads, one per core,
/// and returns its result; `None` if the threads are gone. Not the runtime's blocking pool:
/// each hash takes argon2id's memory (19 MiB), which the allocator keeps in the arena of the
/// thread that used it, so a burst of logins spread over many blocking threads left the API
/// process holding that much per thread of the burst. A few long-lived threads bound that to
/// their number, and beyond the cores more hashes at once only wait for CPU anyway.
async fn on_password_threads<T: Send + 'static>(
    work: impl FnOnce() -> T + Send + 'static,
) -> Option<T> {
    static JOBS: std::sync::OnceLock<std::sync::Mutex<std::sync::mpsc::Sender<PasswordJob>>> =
        std::sync::OnceLock::new();
    let jobs = JOBS.get_or_init(|| {
        let (tx, rx) = std::sync::mpsc::channel::<PasswordJob>();
        let rx = std::sync::Arc::new(std::sync::Mutex::new(rx));
        let threads = std::thread::available_parallelism().map_or(2, std::num::NonZero::get);
        for i in 0..threads {
            let rx = rx.clone();
            let _ = std::thread::Builder::new()
                .name(format!("password-{i}"))
                .spawn(move || {
                    loop {
                        let job = rx.lock().unwrap_or_else(|p| p.into_inner()).recv();
                        match job {
                            // A job that panics costs its own result, not the thread.
                            Ok(job) => {
                                let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job));
                            }
                            Err(_) => return,
                        }
                    }
                });
        }
        std::sync::Mutex::new(tx)
    });
    let (tx, rx) = tokio::sync::oneshot::channel();
    let job: PasswordJob = Box::new(move || {
        let _ = tx.send(work());
    });
    jobs.lock()
        .unwrap_or_else(|p| p.into_inner())
        .send(job)
        .ok()?;
    rx.await.ok()
}

/// Verifies a password on the password threads.
async fn verify_blocking(candidate: String, stored: String) -> bool {
    on_password_threads(move || password::verify(&candidate, &stored))
        .await
        .unwrap_or(false)
}

/// Hashes a password on the password threads.
pub async fn hash_password(plain: String) -> Result<String, password::PasswordError> {
    on_password_threads(move || password::hash(&plain))
        .await
        .unwrap_or_else(|| Err(password::PasswordError::unavailable()))
}

/// Logs a user in: refuses throttled attempts, verifies the password, records the attempt,
/// issues a session token, writes `last_login` and the audit log.
pub async fn login(
    pool: &PgPool,
    settings: &AuthSettings,
    username: &str,
    candidate: &str,
    ip: Option<&str>,
) -> Result<LoginGrant, AuthError> {
    // The attempt is recorded (pending) before the password is checked, in the transaction
    // that counts the recent attempts under the username's and the address's locks: parallel
    // attempts see each other, so no more passwords are checked than the limit allows. No
    // connection is held while the (deliberately slow) hash is verified.
    let mut tx = pool.begin().await.map_err(StoreError::from)?;
    store::login_attempts::login_attempt_lock(&mut tx, username, ip).await?;
    let recent =
        store::login_attempts::login_failures_recent(&mut tx, username, ip, settings.window)
            .await?;
    let per_user = settings.max_failures_per_user;
    let per_ip = settings.max_failures_per_ip;
    if recent.user_failures >= per_user || recent.ip_failures >= per_ip {
        // A refused attempt counts as a failure too: trying on extends the lockout.
        let retry_after = store::login_attempts::login_lockout_remaining(
            &mut tx,
            username,
            ip,
            settings.window,
            (per_user, per_ip),
        )
        .await?;
        store::login_attempts::login_attempt_record(&mut tx, username, ip, false).await?;
        tx.commit().await.map_err(StoreError::from)?;
        return Err(AuthError::Throttled { retry_after });
    }
    if recent.user_failures + recent.user_pending >= per_user
        || recent.ip_failures + recent.ip_pending >= per_ip
    {
        tx.commit().await.map_err(StoreError::from)?;
        return Err(AuthError::Busy);
    }
    let attempt = store::login_attempts::login_attempt_begin(&mut tx, username, ip).await?;
    let user = store::users::user_get_by_username(&mut tx, username).await?;
    tx.commit().await.map_err(StoreError::from)?;
    let stored = user
        .as_ref()
        .map(|u| u.password_hash.clone())
        .unwrap_or_else(|| password::dummy_hash().to_owned());
    let ok = verify_blocking(candidate.to_owned(), stored).await;
    // The outcome is decided again under a lock on the user's row, held until the session
    // is committed: a password change, deactivation or deletion that committed while the hash
    // was being verified is seen here (the verified hash is no longer the stored one), and one
    // that comes after waits for this session, which its revocation of the user's tokens then
    // covers. So no session outlives the password or the account it was granted for.
    let mut tx = pool.begin().await.map_err(StoreError::from)?;
    let current = match &user {
        Some(u) if ok => store::users::user_lock_credentials(&mut tx, u.id, true).await?,
        _ => None,
    };
    let user = match (user, current) {
        (Some(user), Some((hash, active))) if hash == user.password_hash => {
            if !active {
                // The right password for a disabled account: worth an audit entry of its own
                // (someone holds the credentials of an account that was shut off).
                store::login_attempts::login_attempt_finish(&mut tx, attempt, false).await?;
                store::audit::audit_insert(
                    &mut tx,
                    &NewAuditEntry {
                        user_id: Some(user.id),
                        action: "login_refused_inactive",
                        resource_type: "user",
                        resource_id: Some(user.id),
                        details: serde_json::json!({ "username": username }),
                        ip_address: ip,
                    },
                )
                .await?;
                tx.commit().await.map_err(StoreError::from)?;
                return Err(AuthError::Inactive);
            }
            user
        }
        _ => {
            store::login_attempts::login_attempt_finish(&mut tx, attempt, false).await?;
            store::audit::audit_insert(
                &mut tx,
                &NewAuditEntry {
                    user_id: None,
                    action: "login_failed",
                    resource_type: "user",
                    resource_id: None,
                    details: serde_json::json!({ "username": username }),
                    ip_address: ip,
                },
            )
            .await?;
            tx.commit().await.map_err(StoreError::from)?;
            return Err(AuthError::InvalidCredentials);
        }
    };
    let new = token::generate();
    let expires_at = Utc::now()
        + chrono::Duration::from_std(settings.token_ttl).unwrap_or(chrono::Duration::hours(12));
    let row = store::tokens::token_insert(
        &mut tx,
        &NewTokenRow {
            user_id: user.id,
            kind: "session",
            name: None,
            token_hash: &new.hash,
            expires_at: Some(expires_at),
            created_with: None,
        },
    )
    .await?;
    store::users::user_touch_login(&mut tx, user.id).await?;
    store::login_attempts::login_attempt_finish(&mut tx, attempt, true).await?;
    store::audit::audit_insert(
        &mut tx,
        &NewAuditEntry {
            user_id: Some(user.id),
            action: "login",
            resource_type: "token",
            resource_id: Some(row.id),
            details: serde_json::json!({ "kind": "session" }),
            ip_address: ip,
        },
    )
    .await?;
    tx.commit().await.map_err(StoreError::from)?;
    Ok(LoginGrant {
        token: new.secret,
        expires_at,
        user_id: user.id,
        role: parse_role(&user.role),
    })
}

/// Resolves a bearer secret to the caller.
pub async fn authenticate(pool: &PgPool, secret: &str) -> Result<Identity, AuthError> {
    if !secret.starts_with(token::PREFIX) {
        return Err(AuthError::Unauthenticated);
    }
    let mut conn = pool.acquire().await.map_err(StoreError::from)?;
    let found = store::tokens::token_lookup(&mut conn, &token::hash(secret)).await?;
    let found = found.ok_or(AuthError::Unauthenticated)?;
    Ok(Identity {
        user_id: found.user_id,
        username: found.username,
        role: parse_role(&found.role),
        token_id: found.token_id,
    })
}

/// Checks the caller's role against the least role an operation needs.
pub fn require(identity: &Identity, least: Role) -> Result<(), AuthError> {
    if identity.role.allows(least) {
        Ok(())
    } else {
        Err(AuthError::Forbidden {
            need: least,
            have: identity.role,
        })
    }
}
