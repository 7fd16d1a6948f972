//! Managed servers: CRUD of `server_credentials`, the connection test and the admin reset of a
//! pinned SSH host key. Secrets go in (sealed before they reach the store) and never come out:
//! responses say only `has_password` / `has_ssh_key`, and audit entries name changed fields,
//! never values.

use chrono::{DateTime, Utc};
use poem::Request;
use poem_openapi::types::MaybeUndefined;
use poem_openapi::{ApiResponse, Enum, Object, OpenApi, param::Path, param::Query, payload::Json};
use serde_json::{Value, json};
use uuid::Uuid;

use crate::domain::Role;
use crate::servers::{PASSWORD_COLUMN, SSH_KEY_COLUMN, slot};
use crate::store::{self, servers::ServerFields, servers::ServerRow};

use super::Tag;
use super::context::{AppState, BearerAuth};
use super::error::ApiError;
use super::pagination::Page;
use super::patch::{Change, required_value};

/// Operating system.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Enum)]
#[oai(rename_all = "lowercase")]
pub enum OsType {
    /// Linux (shell commands).
    Linux,
    /// Windows (PowerShell commands).
    Windows,
}

/// Remote protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Enum)]
#[oai(rename_all = "lowercase")]
pub enum Protocol {
    /// SSH.
    Ssh,
    /// WinRM.
    Winrm,
}

/// Authentication method.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Enum)]
#[oai(rename_all = "lowercase")]
pub enum AuthType {
    /// Private key (optionally passphrase-protected).
    Key,
    /// Password.
    Password,
}

/// WinRM transport.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Enum)]
#[oai(rename_all = "lowercase")]
pub enum WinrmTransport {
    /// Kerberos.
    Kerberos,
    /// NTLM.
    Ntlm,
    /// Client certificate.
    Certificate,
}

fn parse_enum<T: poem_openapi::types::ParseFromJSON>(s: &str) -> Option<T> {
    T::parse_from_json(Some(Value::String(s.to_owned()))).ok()
}

/// A managed server as the API shows it: never any secret, only whether one is set.
#[derive(Debug, Clone, Object)]
pub struct Server {
    /// Id.
    pub id: Uuid,
    /// Unique friendly name.
    pub name: String,
    /// Host name or IP address.
    pub hostname: String,
    /// Port.
    pub port: i32,
    /// Login name.
    pub username: String,
    /// Operating system.
    pub os_type: OsType,
    /// Protocol.
    pub protocol: Protocol,
    /// Authentication method.
    pub auth_type: AuthType,
    /// Whether a private key is stored.
    pub has_ssh_key: bool,
    /// Whether a password (or, with auth_type key, a key passphrase) is stored.
    pub has_password: bool,
    /// WinRM transport.
    #[oai(skip_serializing_if_is_none)]
    pub winrm_transport: Option<WinrmTransport>,
    /// WinRM over TLS.
    pub winrm_use_ssl: bool,
    /// Validate the WinRM TLS certificate.
    pub winrm_cert_validation: bool,
    /// AD domain.
    #[oai(skip_serializing_if_is_none)]
    pub domain: Option<String>,
    /// Environment (`production`, `staging`, ...).
    #[oai(skip_serializing_if_is_none)]
    pub environment: Option<String>,
    /// Tags (`db`, `role=primary`).
    pub tags: Vec<String>,
    /// Time of the last connection test.
    #[oai(skip_serializing_if_is_none)]
    pub last_connection_test: Option<DateTime<Utc>>,
    /// `success` or `failed`.
    #[oai(skip_serializing_if_is_none)]
    pub last_connection_status: Option<String>,
    /// Why the last connection test failed.
    #[oai(skip_serializing_if_is_none)]
    pub last_connection_error: Option<String>,
    /// SHA-256 fingerprint of the pinned SSH host key.
    #[oai(skip_serializing_if_is_none)]
    pub ssh_host_key_fingerprint: Option<String>,
    /// When the host key was pinned (first successful connection).
    #[oai(skip_serializing_if_is_none)]
    pub ssh_host_key_pinned_at: Option<DateTime<Utc>>,
    /// Creator.
    #[oai(skip_serializing_if_is_none)]
    pub created_by: Option<Uuid>,
    /// Creation time.
    pub created_at: DateTime<Utc>,
    /// Last change.
    pub updated_at: DateTime<Utc>,
}

fn tags_of(value: &Value) -> Vec<String> {
    match value {
        Value::Array(items) => items
            .iter()
            .filter_map(|v| v.as_str().map(str::to_owned))
            .collect(),
        Value::Object(map) => map
            .iter()
            .map(|(k, v)| match v.as_str() {
                Some(s) => format!("{k}={s}"),
                None => k.clone(),
            })
            .collect(),
        _ => Vec::new(),
    }
}

impl From<ServerRow> for Server {
    fn from(row: ServerRow) -> Server {
        Server {
            id: row.id,
            name: row.name,
            hostname: row.hostname,
            port: row.port,
            username: row.username,
            os_type: parse_enum(&row.os_type).unwrap_or(OsType::Linux),
            protocol: parse_enum(&row.protocol).unwrap_or(Protocol::Ssh),
            auth_type: parse_enum(&row.auth_type).unwrap_or(AuthType::Key),
            has_ssh_key: row.ssh_key_encrypted.is_some(),
            has_password: row.password_encrypted.is_some(),
            winrm_transport: row.winrm_transport.as_deref().and_then(parse_enum),
            winrm_use_ssl: row.winrm_use_ssl,
            winrm_cert_validation: row.winrm_cert_validation,
            domain: row.domain,
            environment: row.environment,
            tags: tags_of(&row.tags),
            last_connection_test: row.last_connection_test,
            last_connection_status: row.last_connection_status,
            last_connection_error: row.last_connection_error,
            ssh_host_key_fingerprint: row.ssh_host_key_fingerprint,
            ssh_host_key_pinned_at: row.ssh_host_key_pinned_at,
            created_by: row.created_by,
            created_at: row.created_at,
            updated_at: row.updated_at,
        }
    }
}

/// Fields of a new server. Secrets are write-only.
#[derive(Debug, Object)]
#[oai(deny_unknown_fields)]
pub struct ServerCreate {
    /// Unique friendly name, 1 to 100 characters.
    #[oai(validator(min_length = 1, max_length = 100))]
    pub name: String,
    /// Host name or IP address, 1 to 255 characters, no spaces.
    #[oai(validator(min_length = 1, max_length = 255))]
    pub hostname: String,
    /// Port, 1 to 65535 (default 22 for ssh, 5986 for winrm).
    #[oai(validator(minimum(value = "1"), maximum(value = "65535")))]
    #[oai(nullable)]
    pub port: Option<i32>,
    /// Login name, 1 to 100 characters.
    #[oai(validator(min_length = 1, max_length = 100))]
    pub username: String,
    /// Default linux.
    #[oai(nullable)]
    pub os_type: Option<OsType>,
    /// Default ssh.
    #[oai(nullable)]
    pub protocol: Option<Protocol>,
    /// Default key.
    #[oai(nullable)]
    pub auth_type: Option<AuthType>,
    /// OpenSSH or PEM private key (required with auth_type key). Write-only.
    #[oai(nullable)]
    pub ssh_key: Option<String>,
    /// Passphrase of an encrypted private key. Write-only.
    #[oai(nullable)]
    pub ssh_key_passphrase: Option<String>,
    /// Password (required with auth_type password). Write-only.
    #[oai(nullable)]
    pub password: Option<String>,
    /// WinRM transport.
    #[oai(nullable)]
    pub winrm_transport: Option<WinrmTransport>,
    /// Default true.
    #[oai(nullable)]
    pub winrm_use_ssl: Option<bool>,
    /// Default true.
    #[oai(nullable)]
    pub winrm_cert_validation: Option<bool>,
    /// AD domain, at most 100 characters.
    #[oai(validator(min_length = 1, max_length = 100))]
    #[oai(nullable)]
    pub domain: Option<String>,
    /// Environment, 1 to 50 of letters, digits, `.`, `_`, `-`.
    #[oai(validator(min_length = 1, max_length = 50))]
    #[oai(nullable)]
    pub environment: Option<String>,
    /// Tags, each 1 to 100 characters (`db`, `role=primary`), at most 50.
    #[oai(validator(max_items = 50))]
    #[oai(nullable)]
    pub tags: Option<Vec<String>>,
}

/// A partial update: a field left out keeps its value; `null` clears `domain`, `environment` and
/// `winrm_transport` and is refused for the others. Giving a secret replaces it.
#[derive(Debug, Object)]
#[oai(deny_unknown_fields)]
pub struct ServerUpdate {
    /// New name.
    #[oai(validator(min_length = 1, max_length = 100))]
    pub name: MaybeUndefined<String>,
    /// New host name (clears the pinned host key).
    #[oai(validator(min_length = 1, max_length = 255))]
    pub hostname: MaybeUndefined<String>,
    /// New port (clears the pinned host key).
    #[oai(validator(minimum(value = "1"), maximum(value = "65535")))]
    pub port: MaybeUndefined<i32>,
    /// New login name.
    #[oai(validator(min_length = 1, max_length = 100))]
    pub username: MaybeUndefined<String>,
    /// New operating system.
    pub os_type: MaybeUndefined<OsType>,
    /// New protocol.
    pub protocol: MaybeUndefined<Protocol>,
    /// New authentication method (the matching secret must be stored or given).
    pub auth_type: MaybeUndefined<AuthType>,
    /// New private key. Write-only.
    pub ssh_key: MaybeUndefined<String>,
    /// New key passphrase. Write-only.
    pub ssh_key_passphrase: MaybeUndefined<String>,
    /// New password. Write-only.
    pub password: MaybeUndefined<String>,
    /// New WinRM transport; `null` clears it.
    #[oai(nullable)]
    pub winrm_transport: MaybeUndefined<WinrmTransport>,
    /// New WinRM TLS setting.
    pub winrm_use_ssl: MaybeUndefined<bool>,
    /// New WinRM certificate validation setting.
    pub winrm_cert_validation: MaybeUndefined<bool>,
    /// New AD domain; `null` clears it.
    #[oai(validator(min_length = 1, max_length = 100))]
    #[oai(nullable)]
    pub domain: MaybeUndefined<String>,
    /// New environment; `null` clears it.
    #[oai(validator(min_length = 1, max_length = 50))]
    #[oai(nullable)]
    pub environment: MaybeUndefined<String>,
    /// New tags (replace the old ones).
    #[oai(validator(max_items = 50))]
    pub tags: MaybeUndefined<Vec<String>>,
}

/// A page of servers.
#[derive(Debug, Object)]
pub struct ServerPage {
    /// The servers on this page.
    pub items: Vec<Server>,
    /// All matching servers.
    pub total: i64,
    /// Page size used.
    pub limit: i64,
    /// Offset used.
    pub offset: i64,
}

/// Result of a connection test.
#[derive(Debug, Object)]
pub struct ConnectionTestResult {
    /// `success` or `failed`.
    pub status: String,
    /// Failure class: `dns`, `refused`, `timeout`, `authentication`, `host_key_mismatch`,
    /// `unsupported` or `other`.
    #[oai(skip_serializing_if_is_none)]
    pub failure: Option<String>,
    /// What failed, in words.
    #[oai(skip_serializing_if_is_none)]
    pub message: Option<String>,
    /// Fingerprint of the pinned host key after the test.
    #[oai(skip_serializing_if_is_none)]
    pub ssh_host_key_fingerprint: Option<String>,
    /// Time taken, in milliseconds.
    pub duration_ms: i64,
}

#[derive(ApiResponse)]
enum ServerCreated {
    /// Created.
    #[oai(status = 201)]
    Created(Json<Server>),
}

#[derive(ApiResponse)]
enum Deleted {
    /// Deleted.
    #[oai(status = 204)]
    NoContent,
}

/// The validated, merged shape of a server before it is written.
struct Draft {
    name: String,
    hostname: String,
    port: i32,
    username: String,
    os_type: OsType,
    protocol: Protocol,
    auth_type: AuthType,
    winrm_transport: Option<WinrmTransport>,
    winrm_use_ssl: bool,
    winrm_cert_validation: bool,
    domain: Option<String>,
    environment: Option<String>,
    tags: Vec<String>,
}

fn enum_str<T: poem_openapi::types::ToJSON>(v: &T) -> String {
    v.to_json()
        .and_then(|j| j.as_str().map(str::to_owned))
        .unwrap_or_default()
}

fn check_len(field: &str, value: &str, max: usize) -> Result<(), ApiError> {
    let n = value.chars().count();
    if n == 0 || n > max {
        return Err(ApiError::invalid(
            field,
            format!("must be 1 to {max} characters"),
        ));
    }
    if value.trim().is_empty() {
        return Err(ApiError::invalid(field, "must not be blank"));
    }
    Ok(())
}

/// A host name (labels of letters, digits, `-` and `_`, separated by single dots, a final dot
/// allowed) or an IPv4 or IPv6 address (without brackets).
fn valid_host(host: &str) -> bool {
    if host.contains(':') {
        return host.parse::<std::net::Ipv6Addr>().is_ok();
    }
    let name = host.strip_suffix('.').unwrap_or(host);
    !name.is_empty()
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        })
}

fn validate(d: &Draft) -> Result<(), ApiError> {
    check_len("name", &d.name, 100)?;
    check_len("hostname", &d.hostname, 255)?;
    if !valid_host(&d.hostname) {
        return Err(ApiError::invalid(
            "hostname",
            "must be a host name or an IP address (an IPv6 address without brackets)",
        ));
    }
    if !(1..=65535).contains(&d.port) {
        return Err(ApiError::invalid("port", "must be between 1 and 65535"));
    }
    check_len("username", &d.username, 100)?;
    if d.username
        .chars()
        .any(|c| c.is_whitespace() || c.is_control())
    {
        return Err(ApiError::invalid(
            "username",
            "must not contain spaces or control characters",
        ));
    }
    if let Some(domain) = &d.domain {
        check_len("domain", domain, 100)?;
    }
    if let Some(env) = &d.environment {
        check_len("environment", env, 50)?;
        if !env
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
        {
            return Err(ApiError::invalid(
                "environment",
                "may contain only letters, digits, '.', '_' and '-'",
            ));
        }
    }
    if d.tags.len() > 50 {
        return Err(ApiError::invalid("tags", "at most 50 tags"));
    }
    let mut seen = std::collections::HashSet::new();
    for (i, tag) in d.tags.iter().enumerate() {
        check_len(&format!("tags[{i}]"), tag, 100)?;
        if tag
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || c == ',')
        {
            return Err(ApiError::invalid(
                &format!("tags[{i}]"),
                "must not contain spaces or commas",
            ));
        }
        if let Some((key, value)) = tag.split_once('=')
            && (key.is_empty() || value.is_empty())
        {
            return Err(ApiError::invalid(
                &format!("tags[{i}]"),
                "a key=value tag needs both a key and a value",
            ));
        }
        if !seen.insert(tag) {
            return Err(ApiError::invalid(&format!("tags[{i}]"), "duplicate tag"));
        }
    }
    if d.protocol == Protocol::Winrm && d.os_type == OsType::Linux {
        return Err(ApiError::invalid(
            "protocol",
            "winrm is for windows servers",
        ));
    }
    if d.protocol == Protocol::Winrm && d.auth_type == AuthType::Key {
        return Err(ApiError::invalid(
            "auth_type",
            "winrm servers authenticate with a password",
        ));
    }
    if d.protocol == Protocol::Ssh && d.winrm_transport.is_some() {
        return Err(ApiError::invalid(
            "winrm_transport",
            "only for protocol winrm",
        ));
    }
    Ok(())
}

fn validate_secret(field: &str, value: &str) -> Result<(), ApiError> {
    if value.is_empty() || value.len() > 16 * 1024 {
        return Err(ApiError::invalid(field, "must be 1 to 16384 bytes"));
    }
    if value.contains('\0') {
        return Err(ApiError::invalid(field, "must not contain NUL bytes"));
    }
    Ok(())
}

/// Secrets after a create or update: for each column, keep, replace or clear.
struct SecretPlan<'a> {
    ssh_key: Option<&'a str>,
    /// Password, or the key passphrase when auth_type is key.
    password: Option<&'a str>,
    keep_ssh_key: bool,
    keep_password: bool,
}

fn no_key() -> ApiError {
    ApiError::Unavailable(Json(super::error::ErrorBody {
        code: "secrets_unavailable".to_owned(),
        message: "no secret key is configured on this server (AIOPS_SECRET_KEY or \
                  AIOPS_SECRET_KEY_FILE); credentials cannot be stored"
            .to_owned(),
        details: None,
    }))
}

impl AppState {
    fn seal(&self, id: Uuid, column: &'static str, plaintext: &str) -> Result<String, ApiError> {
        let keyring = self.secrets.as_deref().ok_or_else(no_key)?;
        keyring
            .seal_str(slot(id, column), plaintext)
            .map_err(|e| ApiError::internal(&e))
    }
}

/// Managed servers.
pub struct ServersApi {
    /// Shared state.
    pub state: AppState,
}

#[OpenApi(prefix_path = "/servers", tag = "Tag::Servers")]
impl ServersApi {
    /// List servers, filtered by tags (a server must carry every `tag` given) and environment.
    ///
    /// Least role: viewer.
    #[oai(path = "/", method = "get", operation_id = "server_list")]
    async fn server_list(
        &self,
        req: &Request,
        auth: BearerAuth,
        /// Tags the server must carry (repeat for several).
        tag: Query<Option<Vec<String>>>,
        /// Environment the server must be in.
        environment: Query<Option<String>>,
        /// Page size, 1 to 500 (default 50).
        #[oai(validator(minimum(value = "1"), maximum(value = "500")))]
        limit: Query<Option<i64>>,
        /// Rows to skip (default 0).
        #[oai(validator(minimum(value = "0")))]
        offset: Query<Option<i64>>,
    ) -> Result<Json<ServerPage>, ApiError> {
        self.state.authorize(req, &auth, Role::Viewer).await?;
        let page = Page::parse(limit.0, offset.0)?;
        let mut conn = store::read_snapshot(&self.state.pool).await?;
        let (rows, total) = store::servers::server_list(
            &mut conn,
            tag.0.as_deref().unwrap_or_default(),
            environment.0.as_deref(),
            page.limit,
            page.offset,
        )
        .await?;
        Ok(Json(ServerPage {
            items: rows.into_iter().map(Server::from).collect(),
            total,
            limit: page.limit,
            offset: page.offset,
        }))
    }

    /// Create a server. Secrets are encrypted before they are stored and are never returned.
    ///
    /// Least role: engineer.
    #[oai(path = "/", method = "post", operation_id = "server_create")]
    async fn server_create(
        &self,
        req: &Request,
        auth: BearerAuth,
        body: Json<ServerCreate>,
    ) -> Result<ServerCreated, ApiError> {
        let caller = self.state.authorize(req, &auth, Role::Engineer).await?;
        let b = body.0;
        let protocol = b.protocol.unwrap_or(Protocol::Ssh);
        let draft = Draft {
            name: b.name,
            hostname: b.hostname,
            port: b.port.unwrap_or(if protocol == Protocol::Winrm {
                5986
            } else {
                22
            }),
            username: b.username,
            os_type: b.os_type.unwrap_or(OsType::Linux),
            protocol,
            auth_type: b.auth_type.unwrap_or(AuthType::Key),
            winrm_transport: b.winrm_transport,
            winrm_use_ssl: b.winrm_use_ssl.unwrap_or(true),
            winrm_cert_validation: b.winrm_cert_validation.unwrap_or(true),
            domain: b.domain,
            environment: b.environment,
            tags: b.tags.unwrap_or_default(),
        };
        validate(&draft)?;
        let plan = plan_secrets(
            draft.auth_type,
            b.ssh_key.as_deref(),
            b.ssh_key_passphrase.as_deref(),
            b.password.as_deref(),
            (false, false),
        )?;
        let id = Uuid::new_v4();
        let ssh_key = plan
            .ssh_key
            .map(|k| self.state.seal(id, SSH_KEY_COLUMN, k))
            .transpose()?;
        let password = plan
            .password
            .map(|p| self.state.seal(id, PASSWORD_COLUMN, p))
            .transpose()?;
        let tags = Value::from(draft.tags.clone());
        let mut tx = self.state.pool.begin().await?;
        let row = store::servers::server_create(
            &mut tx,
            id,
            &fields(&draft, &tags),
            ssh_key.as_deref(),
            password.as_deref(),
            caller.identity.user_id,
        )
        .await?;
        caller
            .record(
                &mut tx,
                caller.audit(
                    "server_create",
                    "server",
                    Some(row.id),
                    json!({
                        "name": row.name, "hostname": row.hostname, "port": row.port,
                        "auth_type": row.auth_type, "has_ssh_key": ssh_key.is_some(),
                        "has_password": password.is_some(),
                    }),
                ),
            )
            .await?;
        tx.commit().await?;
        Ok(ServerCreated::Created(Json(row.into())))
    }

    /// Get a server (never its secrets).
    ///
    /// Least role: viewer.
    #[oai(path = "/:id", method = "get", operation_id = "server_get")]
    async fn server_get(
        &self,
        req: &Request,
        auth: BearerAuth,
        /// Server id.
        id: Path<Uuid>,
    ) -> Result<Json<Server>, ApiError> {
        self.state.authorize(req, &auth, Role::Viewer).await?;
        let mut conn = self.state.pool.acquire().await?;
        let row = store::servers::server_get(&mut conn, id.0)
            .await?
            .ok_or_else(|| ApiError::not_found("server", id.0))?;
        Ok(Json(row.into()))
    }

    /// Update a server. A new hostname or port clears the pinned host key.
    ///
    /// Moving a server that holds a password or key (a new hostname or port) needs an admin,
    /// or the password or key given again in the same request (403 naming the field): the
    /// stored one would be sent to the new address.
    ///
    /// Fields left out keep their values; an update that gives no field changes nothing and is
    /// not audited. The audit entry keeps the server before and after (never its secrets).
    ///
    /// Least role: engineer.
    #[oai(path = "/:id", method = "patch", operation_id = "server_update")]
    async fn server_update(
        &self,
        req: &Request,
        auth: BearerAuth,
        /// Server id.
        id: Path<Uuid>,
        body: Json<ServerUpdate>,
    ) -> Result<Json<Server>, ApiError> {
        let caller = self.state.authorize(req, &auth, Role::Engineer).await?;
        let b = body.0;
        let name = required_value("name", b.name)?;
        let hostname = required_value("hostname", b.hostname)?;
        let port = required_value("port", b.port)?;
        let username = required_value("username", b.username)?;
        let os_type = required_value("os_type", b.os_type)?;
        let protocol = required_value("protocol", b.protocol)?;
        let auth_type = required_value("auth_type", b.auth_type)?;
        let new_ssh_key = required_value("ssh_key", b.ssh_key)?;
        let new_passphrase = required_value("ssh_key_passphrase", b.ssh_key_passphrase)?;
        let new_password = required_value("password", b.password)?;
        let winrm_transport = Change::of(b.winrm_transport);
        let winrm_use_ssl = required_value("winrm_use_ssl", b.winrm_use_ssl)?;
        let winrm_cert_validation =
            required_value("winrm_cert_validation", b.winrm_cert_validation)?;
        let domain = Change::of(b.domain);
        let environment = Change::of(b.environment);
        let new_tags = required_value("tags", b.tags)?;
        let mut tx = self.state.pool.begin().await?;
        let cur = store::servers::server_get_for_update(&mut tx, id.0)
            .await?
            .ok_or_else(|| ApiError::not_found("server", id.0))?;
        let draft = Draft {
            name: name.clone().unwrap_or_else(|| cur.name.clone()),
            hostname: hostname.clone().unwrap_or_else(|| cur.hostname.clone()),
            port: port.unwrap_or(cur.port),
            username: username.clone().unwrap_or_else(|| cur.username.clone()),
            os_type: os_type
                .or_else(|| parse_enum(&cur.os_type))
                .unwrap_or(OsType::Linux),
            protocol: protocol
                .or_else(|| parse_enum(&cur.protocol))
                .unwrap_or(Protocol::Ssh),
            auth_type: auth_type
                .or_else(|| parse_enum(&cur.auth_type))
                .unwrap_or(AuthType::Key),
            winrm_transport: winrm_transport
                .apply(cur.winrm_transport.as_deref().and_then(parse_enum)),
            winrm_use_ssl: winrm_use_ssl.unwrap_or(cur.winrm_use_ssl),
            winrm_cert_validation: winrm_cert_validation.unwrap_or(cur.winrm_cert_validation),
            domain: domain.clone().apply(cur.domain.clone()),
            environment: environment.clone().apply(cur.environment.clone()),
            tags: new_tags.clone().unwrap_or_else(|| tags_of(&cur.tags)),
        };
        validate(&draft)?;
        // The stored password or key goes wherever the server points. Before a host key is
        // pinned nothing checks who answers there, so only an admin moves a server that holds
        // credentials, unless the same request gives them anew.
        let moved = draft.hostname != cur.hostname || draft.port != cur.port;
        let holds_secrets = cur.password_encrypted.is_some() || cur.ssh_key_encrypted.is_some();
        let secrets_given = new_password.is_some() || new_ssh_key.is_some();
        if moved && holds_secrets && !secrets_given && !caller.identity.role.allows(Role::Admin) {
            return Err(ApiError::forbidden_field(
                if draft.hostname != cur.hostname {
                    "hostname"
                } else {
                    "port"
                },
                "moving a server that holds a password or key needs an admin, or the \
                 password or key given again in the same request: they would be sent to \
                 the new address",
            ));
        }
        let mut changed = Vec::new();
        for (name, set) in [
            ("name", name.is_some()),
            ("hostname", hostname.is_some()),
            ("port", port.is_some()),
            ("username", username.is_some()),
            ("os_type", os_type.is_some()),
            ("protocol", protocol.is_some()),
            ("auth_type", auth_type.is_some()),
            ("ssh_key", new_ssh_key.is_some()),
            ("ssh_key_passphrase", new_passphrase.is_some()),
            ("password", new_password.is_some()),
            ("winrm_transport", winrm_transport.is_given()),
            ("winrm_use_ssl", winrm_use_ssl.is_some()),
            ("winrm_cert_validation", winrm_cert_validation.is_some()),
            ("domain", domain.is_given()),
            ("environment", environment.is_given()),
            ("tags", new_tags.is_some()),
        ] {
            if set {
                changed.push(name);
            }
        }
        if changed.is_empty() {
            // Nothing given: nothing changes, nothing to record.
            return Ok(Json(cur.into()));
        }
        let auth_changed = enum_str(&draft.auth_type) != cur.auth_type;
        let plan = plan_secrets(
            draft.auth_type,
            new_ssh_key.as_deref(),
            new_passphrase.as_deref(),
            new_password.as_deref(),
            (
                cur.ssh_key_encrypted.is_some() && !auth_changed,
                cur.password_encrypted.is_some() && !auth_changed,
            ),
        )?;
        let ssh_key = match plan.ssh_key {
            Some(k) => Some(self.state.seal(id.0, SSH_KEY_COLUMN, k)?),
            None if plan.keep_ssh_key => cur.ssh_key_encrypted.clone(),
            None => None,
        };
        let password = match plan.password {
            Some(p) => Some(self.state.seal(id.0, PASSWORD_COLUMN, p)?),
            None if plan.keep_password => cur.password_encrypted.clone(),
            None => None,
        };
        let tags = Value::from(draft.tags.clone());
        let row = store::servers::server_update(
            &mut tx,
            id.0,
            &fields(&draft, &tags),
            ssh_key.as_deref(),
            password.as_deref(),
            // Clearing a pinned host key is an admin's decision (as its reset is): an
            // engineer's change of address keeps the pin.
            caller.identity.role.allows(Role::Admin),
        )
        .await?
        .ok_or_else(|| ApiError::not_found("server", id.0))?;
        caller
            .record(
                &mut tx,
                caller.audit(
                    "server_update",
                    "server",
                    Some(row.id),
                    json!({
                        "changed": changed,
                        "host_key_cleared": cur.ssh_host_key.is_some() && row.ssh_host_key.is_none(),
                        "before": audited_server(&cur),
                        "after": audited_server(&row),
                    }),
                ),
            )
            .await?;
        tx.commit().await?;
        Ok(Json(row.into()))
    }

    /// Delete a server.
    ///
    /// Refused (409) while an execution that targets it is unfinished: waiting, running, or
    /// rolling back after it ended. Finished executions keep their history without it.
    ///
    /// Least role: engineer.
    #[oai(path = "/:id", method = "delete", operation_id = "server_delete")]
    async fn server_delete(
        &self,
        req: &Request,
        auth: BearerAuth,
        /// Server id.
        id: Path<Uuid>,
    ) -> Result<Deleted, ApiError> {
        let caller = self.state.authorize(req, &auth, Role::Engineer).await?;
        let mut tx = self.state.pool.begin().await?;
        // Locked: a run created meanwhile (its server reference takes a share lock on the row)
        // is ordered before the count or after the deletion.
        let cur = store::servers::server_get_for_update(&mut tx, id.0)
            .await?
            .ok_or_else(|| ApiError::not_found("server", id.0))?;
        let acting = store::executions::execution_count_acting_on_server(
            &mut tx,
            id.0,
            crate::engine::KIND_ROLLBACK,
        )
        .await?;
        if acting > 0 {
            // Deleting it would leave those runs without their target.
            return Err(ApiError::conflict(
                format!(
                    "{acting} unfinished execution(s) target server {}: cancel them or let them \
                     finish (rollbacks included) first",
                    cur.name
                ),
                None,
            ));
        }
        store::servers::server_delete(&mut tx, id.0).await?;
        caller
            .record(
                &mut tx,
                caller.audit(
                    "server_delete",
                    "server",
                    Some(id.0),
                    json!({ "name": cur.name }),
                ),
            )
            .await?;
        tx.commit().await?;
        Ok(Deleted::NoContent)
    }

    /// Test the connection: connect, verify (or, on first success, pin) the host key and
    /// authenticate. Records `last_connection_test` and `last_connection_status`.
    ///
    /// Least role: engineer.
    #[oai(
        path = "/:id/connection-test",
        method = "post",
        operation_id = "server_connection_test"
    )]
    async fn server_connection_test(
        &self,
        req: &Request,
        auth: BearerAuth,
        /// Server id.
        id: Path<Uuid>,
    ) -> Result<Json<ConnectionTestResult>, ApiError> {
        let caller = self.state.authorize(req, &auth, Role::Engineer).await?;
        let row = {
            let mut conn = self.state.pool.acquire().await?;
            store::servers::server_get(&mut conn, id.0)
                .await?
                .ok_or_else(|| ApiError::not_found("server", id.0))?
        };
        let started = std::time::Instant::now();
        let outcome: Result<(), (String, String)> = match crate::servers::ssh_target(
            &row,
            self.state.secrets.as_deref(),
            self.state.config.ssh_connect_timeout,
        ) {
            Err(crate::servers::TargetError::NotSsh(..)) => Err((
                "unsupported".to_owned(),
                "connection tests over winrm are not supported yet".to_owned(),
            )),
            Err(e) => Err(("other".to_owned(), e.to_string())),
            Ok(target) => {
                let pinner = crate::servers::PgHostKeyPinner {
                    pool: self.state.pool.clone(),
                };
                crate::exec::ssh::test_connection(&target, &pinner)
                    .await
                    .map_err(|e| {
                        let kind = e
                            .connect_failure()
                            .map_or("other", crate::exec::ConnectFailure::as_str);
                        (kind.to_owned(), e.to_string())
                    })
            }
        };
        let duration_ms = i64::try_from(started.elapsed().as_millis()).unwrap_or(i64::MAX);
        let mut tx = self.state.pool.begin().await?;
        let error_text = outcome.as_ref().err().map(|(k, m)| format!("{k}: {m}"));
        let row = store::servers::server_connection_test_record(
            &mut tx,
            id.0,
            outcome.is_ok(),
            error_text.as_deref(),
        )
        .await?
        .ok_or_else(|| ApiError::not_found("server", id.0))?;
        caller
            .record(
                &mut tx,
                caller.audit(
                    "server_connection_test",
                    "server",
                    Some(id.0),
                    json!({
                        "status": row.last_connection_status,
                        "failure": outcome.as_ref().err().map(|(k, _)| k),
                    }),
                ),
            )
            .await?;
        tx.commit().await?;
        let (failure, message) = match outcome {
            Ok(()) => (None, None),
            Err((k, m)) => (Some(k), Some(m)),
        };
        Ok(Json(ConnectionTestResult {
            status: row.last_connection_status.unwrap_or_default(),
            failure,
            message,
            ssh_host_key_fingerprint: row.ssh_host_key_fingerprint,
            duration_ms,
        }))
    }

    /// Forget the pinned SSH host key, so that the next successful connection pins the key the
    /// server presents then. Use only after verifying that the host was legitimately re-keyed.
    ///
    /// Least role: admin.
    #[oai(
        path = "/:id/host-key",
        method = "delete",
        operation_id = "server_host_key_reset"
    )]
    async fn server_host_key_reset(
        &self,
        req: &Request,
        auth: BearerAuth,
        /// Server id.
        id: Path<Uuid>,
    ) -> Result<Json<Server>, ApiError> {
        let caller = self.state.authorize(req, &auth, Role::Admin).await?;
        let mut tx = self.state.pool.begin().await?;
        let old = store::servers::server_host_key_reset(&mut tx, id.0)
            .await?
            .ok_or_else(|| ApiError::not_found("server", id.0))?;
        caller
            .record(
                &mut tx,
                caller.audit(
                    "server_host_key_reset",
                    "server",
                    Some(id.0),
                    json!({ "previous_fingerprint": old }),
                ),
            )
            .await?;
        let row = store::servers::server_get(&mut tx, id.0)
            .await?
            .ok_or_else(|| ApiError::not_found("server", id.0))?;
        tx.commit().await?;
        Ok(Json(row.into()))
    }
}

fn fields<'a>(d: &'a Draft, tags: &'a Value) -> ServerFields<'a> {
    ServerFields {
        name: &d.name,
        hostname: &d.hostname,
        port: d.port,
        username: &d.username,
        os_type: match d.os_type {
            OsType::Linux => "linux",
            OsType::Windows => "windows",
        },
        protocol: match d.protocol {
            Protocol::Ssh => "ssh",
            Protocol::Winrm => "winrm",
        },
        auth_type: match d.auth_type {
            AuthType::Key => "key",
            AuthType::Password => "password",
        },
        winrm_transport: d.winrm_transport.map(|t| match t {
            WinrmTransport::Kerberos => "kerberos",
            WinrmTransport::Ntlm => "ntlm",
            WinrmTransport::Certificate => "certificate",
        }),
        winrm_use_ssl: d.winrm_use_ssl,
        winrm_cert_validation: d.winrm_cert_validation,
        domain: d.domain.as_deref(),
        environment: d.environment.as_deref(),
        tags,
    }
}

/// Decides which secrets to write. `stored` says whether (key, password) are already stored and
/// still apply.
fn plan_secrets<'a>(
    auth_type: AuthType,
    ssh_key: Option<&'a str>,
    passphrase: Option<&'a str>,
    password: Option<&'a str>,
    stored: (bool, bool),
) -> Result<SecretPlan<'a>, ApiError> {
    match auth_type {
        AuthType::Password => {
            if let Some(field) = [("ssh_key", ssh_key), ("ssh_key_passphrase", passphrase)]
                .into_iter()
                .find_map(|(field, value)| value.map(|_| field))
            {
                return Err(ApiError::invalid(field, "only with auth_type key"));
            }
            if let Some(p) = password {
                validate_secret("password", p)?;
            } else if !stored.1 {
                return Err(ApiError::invalid(
                    "password",
                    "required with auth_type password",
                ));
            }
            Ok(SecretPlan {
                ssh_key: None,
                password,
                keep_ssh_key: false,
                keep_password: password.is_none(),
            })
        }
        AuthType::Key => {
            if password.is_some() {
                return Err(ApiError::invalid(
                    "password",
                    "only with auth_type password (use ssh_key_passphrase for an encrypted key)",
                ));
            }
            match ssh_key {
                Some(k) => {
                    validate_secret("ssh_key", k)?;
                    if let Some(p) = passphrase {
                        validate_secret("ssh_key_passphrase", p)?;
                    }
                    crate::exec::ssh::check_private_key(k, passphrase).map_err(|problem| {
                        match problem {
                            crate::exec::ssh::KeyProblem::Key(reason) => {
                                ApiError::invalid("ssh_key", reason)
                            }
                            crate::exec::ssh::KeyProblem::Passphrase(reason) => {
                                ApiError::invalid("ssh_key_passphrase", reason)
                            }
                        }
                    })?;
                    Ok(SecretPlan {
                        ssh_key: Some(k),
                        password: passphrase,
                        keep_ssh_key: false,
                        keep_password: false,
                    })
                }
                None if stored.0 => {
                    if passphrase.is_some() {
                        return Err(ApiError::invalid(
                            "ssh_key_passphrase",
                            "give it together with the ssh_key it opens",
                        ));
                    }
                    Ok(SecretPlan {
                        ssh_key: None,
                        password: None,
                        keep_ssh_key: true,
                        keep_password: true,
                    })
                }
                None => Err(ApiError::invalid("ssh_key", "required with auth_type key")),
            }
        }
    }
}

/// What the audit log keeps of a server before and after a change: the server as the API shows
/// it (never a secret; a new key or password shows in `changed`), without its update time.
fn audited_server(row: &ServerRow) -> Value {
    let mut value =
        poem_openapi::types::ToJSON::to_json(&Server::from(row.clone())).unwrap_or_default();
    if let Some(fields) = value.as_object_mut() {
        fields.remove("updated_at");
    }
    value
}
