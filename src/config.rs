//! Configuration: defaults, then an optional YAML file, then environment variables (which win).
//!
//! Every key is documented in README.md with its default. Configuration is read once at start-up
//! and passed down; nothing else in the crate reads the environment.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line, for log shippers.
    Json,
}

/// The whole runtime configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// PostgreSQL URL. `None` means: use the embedded cluster under `data_dir` (only `aiops up`).
    pub database_url: Option<String>,
    /// Address the HTTP API listens on.
    pub listen: SocketAddr,
    /// Directory for the embedded PostgreSQL cluster and other local state.
    pub data_dir: PathBuf,
    /// Directory of the PostgreSQL server binaries for the embedded cluster; discovered on PATH
    /// and under /usr/lib/postgresql/*/bin when unset.
    pub postgres_bin_dir: Option<PathBuf>,
    /// Key for encrypting stored secrets (32 bytes, hex or base64). `None` until configured.
    pub secret_key: Option<String>,
    /// File holding the secret key, used when `secret_key` is not set.
    pub secret_key_file: Option<PathBuf>,
    /// Old keys still accepted for reading secrets during a rotation (`id:key` or bare keys).
    pub secret_keys_old: Vec<String>,
    /// Log format.
    pub log_format: LogFormat,
    /// Log filter, in `tracing` EnvFilter syntax (`info`, `aiops=debug,sqlx=warn`).
    pub log_level: String,
    /// Lifetime of a login (session) token.
    pub token_ttl: Duration,
    /// Largest accepted request body in bytes.
    pub max_body_bytes: usize,
    /// Trust `X-Forwarded-For` for the client address (only behind a proxy that sets it).
    pub trust_forwarded_for: bool,
    /// Folder of runbook YAML applied by `aiops up` at start.
    pub workflows_dir: PathBuf,
    /// Maximum database connections per process.
    pub db_max_connections: u32,
    /// Failed logins per username within `login_window` before further attempts are refused.
    pub login_max_failures_per_user: i64,
    /// Failed logins per client address within `login_window` before further attempts are refused.
    pub login_max_failures_per_ip: i64,
    /// The window over which failed logins are counted.
    pub login_window: Duration,
    /// Limit for reaching a managed server over SSH: TCP connect, key exchange and
    /// authentication together (steps and the connection test).
    pub ssh_connect_timeout: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            database_url: None,
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            data_dir: PathBuf::from("data"),
            postgres_bin_dir: None,
            secret_key: None,
            secret_key_file: None,
            secret_keys_old: Vec::new(),
            log_format: LogFormat::Text,
            log_level: "info".to_owned(),
            token_ttl: Duration::from_secs(12 * 3600),
            max_body_bytes: 1024 * 1024,
            trust_forwarded_for: false,
            workflows_dir: PathBuf::from("workflows"),
            db_max_connections: 10,
            login_max_failures_per_user: 5,
            login_max_failures_per_ip: 20,
            login_window: Duration::from_secs(15 * 60),
            ssh_connect_timeout: Duration::from_secs(10),
        }
    }
}

/// The optional YAML file. Every key is optional; unknown keys are refused so a typo is not
/// silently ignored.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    database_url: Option<String>,
    listen: Option<String>,
    data_dir: Option<PathBuf>,
    postgres_bin_dir: Option<PathBuf>,
    secret_key: Option<String>,
    secret_key_file: Option<PathBuf>,
    secret_keys_old: Option<Vec<String>>,
    log_format: Option<String>,
    log_level: Option<String>,
    token_ttl_seconds: Option<u64>,
    max_body_bytes: Option<usize>,
    trust_forwarded_for: Option<bool>,
    workflows_dir: Option<PathBuf>,
    db_max_connections: Option<u32>,
    login_max_failures_per_user: Option<i64>,
    login_max_failures_per_ip: Option<i64>,
    login_window_seconds: Option<u64>,
    ssh_connect_timeout_seconds: Option<u64>,
}

/// A configuration value that could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid YAML or has unknown keys.
    #[error("config file {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message, with line and column.
        message: String,
    },
    /// A key has a value of the wrong shape.
    #[error("config key {key}: {message} (got `{value}`)")]
    Invalid {
        /// The key, as an environment variable name or file key.
        key: &'static str,
        /// The rejected value.
        value: String,
        /// What was expected.
        message: &'static str,
    },
}

/// A config file's parse error with its position and the top-level key it is under (the
/// parser names only the position, and a value inside a list is lines below its key).
fn file_error(text: &str, e: &serde_saphyr::Error) -> String {
    let message = e.without_snippet().to_string();
    let Some(location) = e.location() else {
        return message;
    };
    let line = location.line() as usize;
    // The last line at or before the error's that starts a top-level `key:`.
    let key = text
        .lines()
        .take(line)
        .filter(|l| !l.starts_with([' ', '\t', '-', '#']) && l.contains(':'))
        .filter_map(|l| {
            l.split_once(':')
                .map(|(k, _)| k.trim().trim_matches(['"', '\'']))
        })
        .last();
    // The parser's text repeats the position.
    let reason = crate::domain::runbook::strip_position(&message);
    match key {
        Some(key) => format!(
            "line {line} column {}: key `{key}`: {reason}",
            location.column()
        ),
        None => format!("line {line} column {}: {reason}", location.column()),
    }
}

fn invalid(key: &'static str, value: &str, message: &'static str) -> ConfigError {
    ConfigError::Invalid {
        key,
        value: value.to_owned(),
        message,
    }
}

fn parse_num<T: std::str::FromStr>(key: &'static str, value: &str) -> Result<T, ConfigError> {
    value
        .trim()
        .parse()
        .map_err(|_| invalid(key, value, "expected a non-negative integer"))
}

fn positive_seconds(key: &'static str, seconds: u64) -> Result<Duration, ConfigError> {
    if seconds == 0 {
        return Err(invalid(key, "0", "expected a positive number of seconds"));
    }
    Ok(Duration::from_secs(seconds))
}

fn parse_bool(key: &'static str, value: &str) -> Result<bool, ConfigError> {
    match value.trim().to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Ok(true),
        "0" | "false" | "no" | "off" => Ok(false),
        _ => Err(invalid(key, value, "expected true or false")),
    }
}

fn parse_listen(key: &'static str, value: &str) -> Result<SocketAddr, ConfigError> {
    value
        .trim()
        .parse()
        .map_err(|_| invalid(key, value, "expected an address like 127.0.0.1:8080"))
}

fn parse_format(key: &'static str, value: &str) -> Result<LogFormat, ConfigError> {
    match value.trim().to_ascii_lowercase().as_str() {
        "text" => Ok(LogFormat::Text),
        "json" => Ok(LogFormat::Json),
        _ => Err(invalid(key, value, "expected text or json")),
    }
}

impl Config {
    /// Loads the configuration from the process environment and, when given (or named by
    /// `AIOPS_CONFIG`), a YAML file.
    pub fn load(file: Option<&Path>) -> Result<Config, ConfigError> {
        let env_file = std::env::var_os("AIOPS_CONFIG").map(PathBuf::from);
        let file = file.map(Path::to_path_buf).or(env_file);
        Config::from_sources(file.as_deref(), |key| std::env::var(key).ok())
    }

    /// Builds the configuration from a file and an environment lookup, so tests can inject both.
    pub fn from_sources(
        file: Option<&Path>,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        let mut config = Config::default();
        if let Some(path) = file {
            let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                path: path.to_path_buf(),
                source,
            })?;
            let parsed: FileConfig = if text.trim().is_empty() {
                FileConfig::default()
            } else {
                serde_saphyr::from_str(&text).map_err(|e| ConfigError::Parse {
                    path: path.to_path_buf(),
                    message: file_error(&text, &e),
                })?
            };
            config.apply_file(parsed)?;
        }
        config.apply_env(env)?;
        config.check_ranges()?;
        Ok(config)
    }

    /// Refuses values that parse but cannot work: a limit of 0 that would refuse every request
    /// or connection, or a duration too long for the clock arithmetic it enters (a login token
    /// expiring past the end of the calendar).
    fn check_ranges(&self) -> Result<(), ConfigError> {
        const TEN_YEARS: u64 = 10 * 366 * 24 * 3600;
        let seconds = |key: &'static str, d: Duration| {
            if (1..=TEN_YEARS).contains(&d.as_secs()) {
                Ok(())
            } else {
                Err(invalid(
                    key,
                    &d.as_secs().to_string(),
                    "expected 1 second to 10 years",
                ))
            }
        };
        seconds(
            "token_ttl_seconds (AIOPS_TOKEN_TTL_SECONDS)",
            self.token_ttl,
        )?;
        seconds(
            "login_window_seconds (AIOPS_LOGIN_WINDOW_SECONDS)",
            self.login_window,
        )?;
        seconds(
            "ssh_connect_timeout_seconds (AIOPS_SSH_CONNECT_TIMEOUT_SECONDS)",
            self.ssh_connect_timeout,
        )?;
        if !(1..=10_000).contains(&self.db_max_connections) {
            return Err(invalid(
                "db_max_connections (AIOPS_DB_MAX_CONNECTIONS)",
                &self.db_max_connections.to_string(),
                "expected 1 to 10000",
            ));
        }
        // A filter that does not parse would silently log at `info`.
        if tracing_subscriber::EnvFilter::try_new(&self.log_level).is_err() {
            return Err(invalid(
                "log_level (AIOPS_LOG)",
                &self.log_level,
                "not a log filter; for example `info` or `warn,aiops=debug` (levels: error, \
                 warn, info, debug, trace, off)",
            ));
        }
        if self.max_body_bytes < 1024 {
            return Err(invalid(
                "max_body_bytes (AIOPS_MAX_BODY_BYTES)",
                &self.max_body_bytes.to_string(),
                "expected at least 1024",
            ));
        }
        for (key, value) in [
            (
                "login_max_failures_per_user (AIOPS_LOGIN_MAX_FAILURES_PER_USER)",
                self.login_max_failures_per_user,
            ),
            (
                "login_max_failures_per_ip (AIOPS_LOGIN_MAX_FAILURES_PER_IP)",
                self.login_max_failures_per_ip,
            ),
        ] {
            if value < 1 {
                return Err(invalid(key, &value.to_string(), "expected at least 1"));
            }
        }
        Ok(())
    }

    fn apply_file(&mut self, f: FileConfig) -> Result<(), ConfigError> {
        if let Some(v) = f.database_url {
            self.database_url = Some(v);
        }
        if let Some(v) = f.listen {
            self.listen = parse_listen("listen", &v)?;
        }
        if let Some(v) = f.data_dir {
            self.data_dir = v;
        }
        if let Some(v) = f.postgres_bin_dir {
            self.postgres_bin_dir = Some(v);
        }
        if let Some(v) = f.secret_key {
            self.secret_key = Some(v);
        }
        if let Some(v) = f.secret_key_file {
            self.secret_key_file = Some(v);
        }
        if let Some(v) = f.secret_keys_old {
            self.secret_keys_old = v;
        }
        if let Some(v) = f.log_format {
            self.log_format = parse_format("log_format", &v)?;
        }
        if let Some(v) = f.log_level {
            self.log_level = v;
        }
        if let Some(v) = f.token_ttl_seconds {
            self.token_ttl = Duration::from_secs(v);
        }
        if let Some(v) = f.max_body_bytes {
            self.max_body_bytes = v;
        }
        if let Some(v) = f.trust_forwarded_for {
            self.trust_forwarded_for = v;
        }
        if let Some(v) = f.workflows_dir {
            self.workflows_dir = v;
        }
        if let Some(v) = f.db_max_connections {
            self.db_max_connections = v;
        }
        if let Some(v) = f.login_max_failures_per_user {
            self.login_max_failures_per_user = v;
        }
        if let Some(v) = f.login_max_failures_per_ip {
            self.login_max_failures_per_ip = v;
        }
        if let Some(v) = f.login_window_seconds {
            self.login_window = Duration::from_secs(v);
        }
        if let Some(v) = f.ssh_connect_timeout_seconds {
            self.ssh_connect_timeout = positive_seconds("ssh_connect_timeout_seconds", v)?;
        }
        Ok(())
    }

    fn apply_env(&mut self, env: impl Fn(&str) -> Option<String>) -> Result<(), ConfigError> {
        let get = |key: &str| env(key).filter(|v| !v.is_empty());
        if let Some(v) = get("DATABASE_URL") {
            self.database_url = Some(v);
        }
        if let Some(v) = get("AIOPS_LISTEN") {
            self.listen = parse_listen("AIOPS_LISTEN", &v)?;
        }
        if let Some(v) = get("AIOPS_DATA_DIR") {
            self.data_dir = PathBuf::from(v);
        }
        if let Some(v) = get("AIOPS_POSTGRES_BIN_DIR") {
            self.postgres_bin_dir = Some(PathBuf::from(v));
        }
        if let Some(v) = get("AIOPS_SECRET_KEY") {
            self.secret_key = Some(v);
        }
        if let Some(v) = get("AIOPS_SECRET_KEY_FILE") {
            self.secret_key_file = Some(PathBuf::from(v));
        }
        if let Some(v) = get("AIOPS_SECRET_KEYS_OLD") {
            self.secret_keys_old = v.split(',').map(|s| s.trim().to_owned()).collect();
        }
        if let Some(v) = get("AIOPS_LOG_FORMAT") {
            self.log_format = parse_format("AIOPS_LOG_FORMAT", &v)?;
        }
        if let Some(v) = get("AIOPS_LOG") {
            self.log_level = v;
        }
        if let Some(v) = get("AIOPS_TOKEN_TTL_SECONDS") {
            self.token_ttl = Duration::from_secs(parse_num("AIOPS_TOKEN_TTL_SECONDS", &v)?);
        }
        if let Some(v) = get("AIOPS_MAX_BODY_BYTES") {
            self.max_body_bytes = parse_num("AIOPS_MAX_BODY_BYTES", &v)?;
        }
        if let Some(v) = get("AIOPS_TRUST_FORWARDED_FOR") {
            self.trust_forwarded_for = parse_bool("AIOPS_TRUST_FORWARDED_FOR", &v)?;
        }
        if let Some(v) = get("AIOPS_WORKFLOWS_DIR") {
            self.workflows_dir = PathBuf::from(v);
        }
        if let Some(v) = get("AIOPS_DB_MAX_CONNECTIONS") {
            self.db_max_connections = parse_num("AIOPS_DB_MAX_CONNECTIONS", &v)?;
        }
        if let Some(v) = get("AIOPS_LOGIN_MAX_FAILURES_PER_USER") {
            self.login_max_failures_per_user = parse_num("AIOPS_LOGIN_MAX_FAILURES_PER_USER", &v)?;
        }
        if let Some(v) = get("AIOPS_LOGIN_MAX_FAILURES_PER_IP") {
            self.login_max_failures_per_ip = parse_num("AIOPS_LOGIN_MAX_FAILURES_PER_IP", &v)?;
        }
        if let Some(v) = get("AIOPS_LOGIN_WINDOW_SECONDS") {
            self.login_window = Duration::from_secs(parse_num("AIOPS_LOGIN_WINDOW_SECONDS", &v)?);
        }
        if let Some(v) = get("AIOPS_SSH_CONNECT_TIMEOUT_SECONDS") {
            const KEY: &str = "AIOPS_SSH_CONNECT_TIMEOUT_SECONDS";
            self.ssh_connect_timeout = positive_seconds(KEY, parse_num(KEY, &v)?)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| map.get(k).cloned()
    }

    #[test]
    fn values_that_cannot_work_are_refused() {
        for (key, value) in [
            ("AIOPS_TOKEN_TTL_SECONDS", "9000000000000"),
            ("AIOPS_TOKEN_TTL_SECONDS", "0"),
            ("AIOPS_LOGIN_WINDOW_SECONDS", "18446744073709551615"),
            ("AIOPS_DB_MAX_CONNECTIONS", "0"),
            ("AIOPS_MAX_BODY_BYTES", "0"),
            ("AIOPS_LOGIN_MAX_FAILURES_PER_USER", "-1"),
            ("AIOPS_LOGIN_MAX_FAILURES_PER_IP", "0"),
        ] {
            let refused = Config::from_sources(None, env(&[(key, value)]));
            assert!(
                matches!(refused, Err(ConfigError::Invalid { .. })),
                "{key}={value}: {refused:?}"
            );
        }
        assert!(Config::from_sources(None, env(&[("AIOPS_TOKEN_TTL_SECONDS", "5")])).is_ok());
    }

    #[test]
    fn defaults_without_sources() {
        let c = Config::from_sources(None, env(&[])).unwrap();
        assert_eq!(c.listen.port(), 8080);
        assert_eq!(c.token_ttl, Duration::from_secs(43200));
        assert!(c.database_url.is_none());
        assert_eq!(c.log_format, LogFormat::Text);
    }

    #[test]
    fn environment_overrides_file() {
        let dir = std::env::temp_dir().join(format!("aiops-config-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("aiops.yaml");
        std::fs::write(
            &path,
            "listen: 0.0.0.0:9000\nlog_format: json\ntoken_ttl_seconds: 60\n",
        )
        .unwrap();
        let c =
            Config::from_sources(Some(&path), env(&[("AIOPS_LISTEN", "127.0.0.1:9100")])).unwrap();
        assert_eq!(c.listen.port(), 9100);
        assert_eq!(c.log_format, LogFormat::Json);
        assert_eq!(c.token_ttl, Duration::from_secs(60));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn bad_values_name_the_key() {
        let err = Config::from_sources(None, env(&[("AIOPS_LOG_FORMAT", "xml")])).unwrap_err();
        assert!(err.to_string().contains("AIOPS_LOG_FORMAT"), "{err}");
        let dir = std::env::temp_dir().join(format!("aiops-config-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("aiops.yaml");
        std::fs::write(&path, "lisen: 1\n").unwrap();
        let err = Config::from_sources(Some(&path), env(&[])).unwrap_err();
        assert!(err.to_string().contains("lisen"), "{err}");
        // A value of the wrong type names the key it is under, even lines below it.
        std::fs::write(
            &path,
            "listen: 127.0.0.1:1\nsecret_keys_old:\n  - a\n  - [b]\ntoken_ttl_seconds: 5\n",
        )
        .unwrap();
        let err = Config::from_sources(Some(&path), env(&[])).unwrap_err();
        assert!(
            err.to_string()
                .contains("line 4 column 5: key `secret_keys_old`: expected string"),
            "{err}"
        );
        std::fs::write(&path, "token_ttl_seconds: -5\n").unwrap();
        let err = Config::from_sources(Some(&path), env(&[])).unwrap_err();
        assert!(err.to_string().contains("key `token_ttl_seconds`"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn ssh_connect_timeout_is_positive_seconds() {
        assert_eq!(
            Config::from_sources(None, env(&[]))
                .unwrap()
                .ssh_connect_timeout,
            Duration::from_secs(10)
        );
        let c =
            Config::from_sources(None, env(&[("AIOPS_SSH_CONNECT_TIMEOUT_SECONDS", "3")])).unwrap();
        assert_eq!(c.ssh_connect_timeout, Duration::from_secs(3));
        let err = Config::from_sources(None, env(&[("AIOPS_SSH_CONNECT_TIMEOUT_SECONDS", "0")]))
            .unwrap_err();
        assert!(
            err.to_string()
                .contains("AIOPS_SSH_CONNECT_TIMEOUT_SECONDS"),
            "{err}"
        );
    }

    #[test]
    fn a_log_filter_that_does_not_parse_is_refused() {
        for bad in ["warn,aiops=dbug", "[[["] {
            let err = Config::from_sources(None, env(&[("AIOPS_LOG", bad)])).unwrap_err();
            assert!(err.to_string().contains("log_level (AIOPS_LOG)"), "{err}");
        }
        let c = Config::from_sources(None, env(&[("AIOPS_LOG", "warn,aiops=debug")])).unwrap();
        assert_eq!(c.log_level, "warn,aiops=debug");
    }
}
