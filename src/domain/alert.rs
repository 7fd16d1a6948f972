//! Alerts as Alertmanager sends them (webhook payload version 4), reduced to the facts intake
//! stores and matching uses: the firing-episode key, the source, the instance's host, the
//! fingerprint Alertmanager would compute, and `auto_analyze_rules` matching. Pure: no SQL, no
//! HTTP.
//!
//! Definitions (ARCHITECTURE.md "Alert intake" repeats them):
//! - **episode**: `(fingerprint, startsAt)`. Alertmanager resends an alert with the same
//!   fingerprint and startsAt until it resolves; when the same label set fires again later it
//!   gets a new startsAt, hence a new episode.
//! - **source**: the `source` label when the alert has one, else the host (and port) of its
//!   `generatorURL` (the Prometheus or ruler that evaluated it), else none.
//! - **instance host**: the `instance` label without a trailing `:port` (`[::1]:9100` -> `::1`).

use std::collections::BTreeMap;

use chrono::{DateTime, Datelike, Timelike, Utc};

use super::trigger_match::Pattern;

/// One alert of a webhook payload, after validation.
#[derive(Debug, Clone, PartialEq)]
pub struct IncomingAlert {
    /// `firing` or `resolved`.
    pub status: AlertStatus,
    /// Every label.
    pub labels: BTreeMap<String, String>,
    /// Every annotation.
    pub annotations: BTreeMap<String, String>,
    /// Start of the firing episode.
    pub starts_at: DateTime<Utc>,
    /// End, when Alertmanager sent one (it sends the zero time while the alert fires with no
    /// known end).
    pub ends_at: Option<DateTime<Utc>>,
    /// Link to the expression that fired.
    pub generator_url: String,
    /// Alertmanager's fingerprint of the label set.
    pub fingerprint: String,
}

/// Alert status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AlertStatus {
    /// Firing.
    Firing,
    /// Resolved.
    Resolved,
}

impl AlertStatus {
    /// Parses `firing` / `resolved`.
    pub fn parse(s: &str) -> Option<AlertStatus> {
        match s {
            "firing" => Some(AlertStatus::Firing),
            "resolved" => Some(AlertStatus::Resolved),
            _ => None,
        }
    }

    /// The stored label.
    pub fn as_str(self) -> &'static str {
        match self {
            AlertStatus::Firing => "firing",
            AlertStatus::Resolved => "resolved",
        }
    }
}

/// Alertmanager's encoding of "no time" (Go's zero `time.Time`): year 1.
pub fn is_zero_time(t: &DateTime<Utc>) -> bool {
    t.year() <= 1
}

/// The instant as the database keeps it: whole microseconds (finer digits are cut, as the
/// driver does), and a leap second (`23:59:60`) read as the next second, as PostgreSQL reads
/// it. Two times that differ only below that are the same alert episode.
pub fn stored_instant(t: DateTime<Utc>) -> DateTime<Utc> {
    let nanos = t.timestamp_subsec_nanos();
    let leap = nanos >= 1_000_000_000;
    let micros = (nanos % 1_000_000_000) / 1_000 * 1_000;
    let whole = t
        .with_nanosecond(micros)
        .expect("a sub-second count below one second is valid");
    if leap {
        whole + chrono::TimeDelta::seconds(1)
    } else {
        whole
    }
}

/// The fingerprint Alertmanager (prometheus/common `model.LabelSet.Fingerprint`) computes:
/// FNV-1a 64 over the label names in order, each name and value followed by the byte 0xff,
/// written as 16 lowercase hex digits. Used when a payload omits `fingerprint`.
pub fn fingerprint_of(labels: &BTreeMap<String, String>) -> String {
    const OFFSET: u64 = 14_695_981_039_346_656_037;
    const PRIME: u64 = 1_099_511_628_211;
    if labels.is_empty() {
        return format!("{OFFSET:016x}");
    }
    let mut hash = OFFSET;
    let mut add = |bytes: &[u8]| {
        for b in bytes {
            hash ^= u64::from(*b);
            hash = hash.wrapping_mul(PRIME);
        }
    };
    for (name, value) in labels {
        add(name.as_bytes());
        add(&[0xff]);
        add(value.as_bytes());
        add(&[0xff]);
    }
    format!("{hash:016x}")
}

/// The host of an `instance` label: `host:port` -> `host`, `[v6]:port` -> `v6`; a bare host or
/// an unbracketed IPv6 address is returned as is. A URL (`https://user@host:8443/healthz`, as
/// blackbox_exporter probes put the probed target in `instance`) gives its host.
pub fn instance_host(instance: &str) -> &str {
    let mut instance = instance.trim();
    if let Some((scheme, rest)) = instance.split_once("://")
        && !scheme.is_empty()
        && scheme
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
    {
        let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
        instance = authority
            .rsplit_once('@')
            .map_or(authority, |(_, host)| host);
    }
    if let Some(rest) = instance.strip_prefix('[')
        && let Some((host, _)) = rest.split_once(']')
    {
        return host;
    }
    match instance.rsplit_once(':') {
        Some((host, port))
            if !host.contains(':')
                && !port.is_empty()
                && port.bytes().all(|b| b.is_ascii_digit()) =>
        {
            host
        }
        _ => instance,
    }
}

/// The alert's source (see the module documentation).
pub fn source_of(labels: &BTreeMap<String, String>, generator_url: &str) -> Option<String> {
    if let Some(s) = labels.get("source").filter(|s| !s.is_empty()) {
        return Some(s.clone());
    }
    let rest = generator_url.split_once("://")?.1;
    let authority = rest.split(['/', '?', '#']).next()?;
    let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    (!host.is_empty()).then(|| host.to_owned())
}

/// The longest instance key stored as it is (`trigger_cooldowns.instance_key` is
/// `varchar(255)`).
pub const MAX_INSTANCE_KEY_CHARS: usize = 255;

/// The key a per-instance cooldown counts under: the `instance` label, or the fingerprint for
/// alerts without one (each label set is then its own instance). A label longer than
/// [`MAX_INSTANCE_KEY_CHARS`] counts under `sha256:` and the hex digest of its UTF-8 text, so
/// that two long instances sharing a prefix stay apart.
/// `store::alerts::trigger_cooldown_release` computes the same key in SQL.
pub fn instance_key(labels: &BTreeMap<String, String>, fingerprint: &str) -> String {
    use sha2::{Digest, Sha256};
    match labels.get("instance").filter(|s| !s.is_empty()) {
        Some(instance) if instance.chars().count() > MAX_INSTANCE_KEY_CHARS => {
            let digest = Sha256::digest(instance.as_bytes());
            let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
            format!("sha256:{hex}")
        }
        Some(instance) => instance.clone(),
        None => format!("fingerprint:{fingerprint}"),
    }
}

/// Cuts a value to at most `max` characters (for the indexed columns; the labels keep the whole
/// value).
pub fn truncate(value: &str, max: usize) -> String {
    value.chars().take(max).collect()
}

/// An `auto_analyze_rules` row as the matcher sees it.
#[derive(Debug, Clone)]
pub struct RuleFacts<'a> {
    /// Glob on the alert name.
    pub alert_name_pattern: &'a str,
    /// Glob on the severity (`*` matches alerts without one too).
    pub severity_pattern: &'a str,
}

/// Whether a rule matches an alert name and severity. Patterns use the trigger syntax (glob,
/// or regex as `/.../` / `re:...`); a pattern that does not compile never matches. An alert
/// without a severity is matched as the empty string.
pub fn rule_matches(rule: &RuleFacts<'_>, name: &str, severity: Option<&str>) -> bool {
    CompiledRule::new(rule).matches(name, severity)
}

/// A rule's patterns compiled once, to match many alerts exactly as [`rule_matches`] does.
#[derive(Debug, Clone)]
pub struct CompiledRule {
    alert_name: Option<Pattern>,
    severity: Option<Pattern>,
}

impl CompiledRule {
    /// Compiles the rule's patterns (one that does not compile never matches).
    pub fn new(rule: &RuleFacts<'_>) -> CompiledRule {
        CompiledRule {
            alert_name: Pattern::compile(rule.alert_name_pattern).ok(),
            severity: Pattern::compile(rule.severity_pattern).ok(),
        }
    }

    /// Whether the rule matches an alert name and severity.
    pub fn matches(&self, name: &str, severity: Option<&str>) -> bool {
        self.alert_name.as_ref().is_some_and(|p| p.matches(name))
            && self
                .severity
                .as_ref()
                .is_some_and(|p| p.matches(severity.unwrap_or("")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn fingerprints_match_alertmanager() {
        // Values computed by prometheus/common model.LabelSet.Fingerprint.
        assert_eq!(fingerprint_of(&BTreeMap::new()), "cbf29ce484222325");
        let a = labels(&[("alertname", "NodeDown"), ("instance", "web-1:9100")]);
        let b = labels(&[("instance", "web-1:9100"), ("alertname", "NodeDown")]);
        assert_eq!(fingerprint_of(&a), fingerprint_of(&b));
        assert_ne!(
            fingerprint_of(&a),
            fingerprint_of(&labels(&[("alertname", "NodeDown")]))
        );
        assert_eq!(fingerprint_of(&a).len(), 16);
        // Captured from Alertmanager 0.25.0 (tests/fixtures/alertmanager/0.25.0-firing.json).
        let captured = labels(&[
            ("alertname", "NodeDown"),
            ("instance", "web-1:9100"),
            ("job", "node"),
            ("severity", "critical"),
        ]);
        assert_eq!(fingerprint_of(&captured), "8b13b0fa2923a800");
    }

    #[test]
    fn instance_hosts_lose_their_port() {
        assert_eq!(instance_host("web-1:9100"), "web-1");
        assert_eq!(instance_host("web-1"), "web-1");
        assert_eq!(instance_host("10.0.0.5:9100"), "10.0.0.5");
        assert_eq!(instance_host("[::1]:9100"), "::1");
        assert_eq!(instance_host("::1"), "::1");
        assert_eq!(instance_host("fe80::1"), "fe80::1");
        assert_eq!(instance_host("db.example.com:"), "db.example.com:");
        // Probed URLs give their host.
        assert_eq!(
            instance_host("https://nginx-1.example.com/healthz"),
            "nginx-1.example.com"
        );
        assert_eq!(
            instance_host("https://nginx-1.example.com"),
            "nginx-1.example.com"
        );
        assert_eq!(
            instance_host("http://nginx-1.example.com:8080/"),
            "nginx-1.example.com"
        );
        assert_eq!(
            instance_host("http://u:p@[2001:db8::1]:8080/x?y#z"),
            "2001:db8::1"
        );
        assert_eq!(instance_host("tcp://db-1:5432"), "db-1");
    }

    #[test]
    fn source_prefers_the_label_then_the_generator() {
        assert_eq!(
            source_of(&labels(&[("source", "loki")]), "http://prom:9090/graph"),
            Some("loki".to_owned())
        );
        assert_eq!(
            source_of(
                &BTreeMap::new(),
                "http://prometheus-0:9090/graph?g0.expr=up"
            ),
            Some("prometheus-0:9090".to_owned())
        );
        assert_eq!(source_of(&BTreeMap::new(), ""), None);
    }

    #[test]
    fn zero_time_and_keys() {
        let zero = DateTime::parse_from_rfc3339("0001-01-01T00:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        assert!(is_zero_time(&zero));
        assert!(!is_zero_time(&Utc::now()));
        assert_eq!(
            instance_key(&labels(&[("instance", "a:1")]), "f"),
            "a:1".to_owned()
        );
        assert_eq!(instance_key(&BTreeMap::new(), "f"), "fingerprint:f");
        // At the column's width the label is the key; past it, its digest is.
        let wide = "é".repeat(MAX_INSTANCE_KEY_CHARS);
        assert_eq!(instance_key(&labels(&[("instance", &wide)]), "f"), wide);
        let long = format!("{wide}x");
        let key = instance_key(&labels(&[("instance", &long)]), "f");
        assert_eq!(
            key,
            "sha256:9b29854583a7dde3247bfcfd1b7ac39476e4e8dabf3f25c4649a6890129715a7"
        );
        let other = format!("{wide}y");
        assert_ne!(instance_key(&labels(&[("instance", &other)]), "f"), key);
        assert_eq!(truncate("abcdef", 3), "abc");
    }

    #[test]
    fn rules_glob_on_name_and_severity() {
        let rule = RuleFacts {
            alert_name_pattern: "Node*",
            severity_pattern: "crit*",
        };
        assert!(rule_matches(&rule, "NodeDown", Some("critical")));
        assert!(!rule_matches(&rule, "NodeDown", Some("warning")));
        assert!(!rule_matches(&rule, "KubeDown", Some("critical")));
        assert!(!rule_matches(&rule, "NodeDown", None));
        let any = RuleFacts {
            alert_name_pattern: "*",
            severity_pattern: "*",
        };
        assert!(rule_matches(&any, "X", None));
        let broken = RuleFacts {
            alert_name_pattern: "[oops",
            severity_pattern: "*",
        };
        assert!(!rule_matches(&broken, "[oops", None));
    }

    #[test]
    fn stored_instants_are_whole_microseconds_and_leap_seconds_move_on() {
        let parse = |s: &str| {
            chrono::DateTime::parse_from_rfc3339(s)
                .unwrap()
                .with_timezone(&Utc)
        };
        assert_eq!(
            stored_instant(parse("2026-12-01T10:00:00.000000100Z")),
            stored_instant(parse("2026-12-01T10:00:00.000000900Z"))
        );
        assert_eq!(
            stored_instant(parse("2026-12-01T10:00:00.123456789Z")),
            parse("2026-12-01T10:00:00.123456Z")
        );
        assert_eq!(
            stored_instant(parse("2026-12-31T23:59:60Z")),
            parse("2027-01-01T00:00:00Z")
        );
        assert_eq!(
            stored_instant(parse("2026-12-31T23:59:60.25Z")),
            parse("2027-01-01T00:00:00.25Z")
        );
    }
}
