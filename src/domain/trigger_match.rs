//! Trigger matching: does an alert start a runbook through this trigger, and if not, why not.
//! Pure: the caller passes the alert facts, the trigger, the time of day and the last firing.
//!
//! Pattern syntax (alert name, severity, source and every `labels_match` value):
//! - a glob by default: `*` any run of characters, `?` one character, `[abc]` / `[a-z]` / `[!a]`
//!   a class; everything else literal; matched against the whole value, case-sensitively;
//! - a regular expression when written `/.../` or `re:...` (Rust `regex` syntax), anchored at
//!   both ends like Alertmanager's `=~`, so `re:Node.*` matches `NodeDown` but not `XNodeDown`.
//!
//! Time windows are wall-clock times in a timezone (UTC unless the caller passes one, see
//! [`trigger_matches_in`]); an end earlier than the start wraps midnight (`22:00`-`06:00` is
//! active from 22:00 to 05:59:59), and the end itself is outside the window.

use std::collections::BTreeMap;

use chrono::{DateTime, NaiveTime, Utc};
use regex::Regex;

use super::runbook::{TriggerDocument, parse_time_of_day};

/// A compiled trigger pattern.
#[derive(Debug, Clone)]
pub struct Pattern {
    source: String,
    regex: Regex,
}

impl Pattern {
    /// Compiles a glob, `/regex/` or `re:regex`; the error says what is wrong.
    pub fn compile(source: &str) -> Result<Pattern, String> {
        let regex_body = if let Some(body) = source.strip_prefix("re:") {
            Some(body)
        } else if source.len() >= 2 && source.starts_with('/') && source.ends_with('/') {
            Some(&source[1..source.len() - 1])
        } else {
            None
        };
        let anchored = match regex_body {
            Some(body) => format!("^(?:{body})$"),
            None => glob_to_regex(source)?,
        };
        let regex = regex::RegexBuilder::new(&anchored)
            .size_limit(1 << 20)
            .build()
            .map_err(|e| match regex_body {
                Some(_) => format!(
                    "is not a valid regular expression: {}",
                    e.to_string().lines().last().unwrap_or("invalid")
                ),
                None => format!("is not a valid glob: {e}"),
            })?;
        Ok(Pattern {
            source: source.to_owned(),
            regex,
        })
    }

    /// Whether the whole value matches.
    pub fn matches(&self, value: &str) -> bool {
        self.regex.is_match(value)
    }

    /// The pattern as written.
    pub fn as_str(&self) -> &str {
        &self.source
    }
}

fn glob_to_regex(glob: &str) -> Result<String, String> {
    let mut out = String::from("^");
    let mut chars = glob.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            // Any character, a line break too: label values may hold one.
            '*' => out.push_str("(?s:.*)"),
            '?' => out.push_str("(?s:.)"),
            '[' => {
                let mut class = String::from("[");
                if chars.peek() == Some(&'!') {
                    chars.next();
                    class.push('^');
                }
                let mut closed = false;
                let mut first = true;
                for d in chars.by_ref() {
                    if d == ']' && !first {
                        closed = true;
                        break;
                    }
                    first = false;
                    if matches!(d, '\\' | '[' | '&' | '~' | '^') {
                        class.push('\\');
                    }
                    class.push(d);
                }
                if !closed {
                    return Err(format!("is not a valid glob: unclosed `[` in `{glob}`"));
                }
                class.push(']');
                out.push_str(&class);
            }
            other => out.push_str(&regex::escape(&other.to_string())),
        }
    }
    out.push('$');
    Ok(out)
}

/// What the matcher knows about an alert.
#[derive(Debug, Clone, Default)]
pub struct AlertFacts {
    /// `alertname`.
    pub name: String,
    /// `severity` label, when there is one.
    pub severity: Option<String>,
    /// Where it came from (`alertmanager`, the Prometheus job, ...).
    pub source: Option<String>,
    /// Every label.
    pub labels: BTreeMap<String, String>,
}

/// The matcher's answer for one trigger.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MatchVerdict {
    /// Whether the trigger would fire.
    pub matched: bool,
    /// Why not (empty when it matched), one sentence per failed condition.
    pub reasons: Vec<String>,
}

/// Checks a trigger against an alert at `now`, given when it last fired. Every condition is
/// checked so the answer lists all the reasons, not only the first.
pub fn trigger_matches(
    trigger: &TriggerDocument,
    alert: &AlertFacts,
    now: DateTime<Utc>,
    last_triggered_at: Option<DateTime<Utc>>,
) -> MatchVerdict {
    trigger_matches_in(trigger, alert, now, last_triggered_at, chrono_tz::Tz::UTC)
}

/// [`trigger_matches`] with the time window read as wall-clock times in `tz`.
pub fn trigger_matches_in(
    trigger: &TriggerDocument,
    alert: &AlertFacts,
    now: DateTime<Utc>,
    last_triggered_at: Option<DateTime<Utc>>,
    tz: chrono_tz::Tz,
) -> MatchVerdict {
    CompiledTrigger::new(trigger.clone()).matches_in(alert, now, last_triggered_at, tz)
}

/// A pattern compiled once: the source as written and the compiled form, or why it does not
/// compile.
#[derive(Debug, Clone)]
struct CompiledPattern {
    source: String,
    compiled: Result<Pattern, String>,
}

impl CompiledPattern {
    fn new(source: &str) -> CompiledPattern {
        CompiledPattern {
            source: source.to_owned(),
            compiled: Pattern::compile(source),
        }
    }

    fn check(&self, reasons: &mut Vec<String>, what: &str, value: Option<&str>) {
        let pattern = &self.source;
        match &self.compiled {
            Err(e) => reasons.push(format!("the {what} pattern `{pattern}` {e}")),
            Ok(p) => match value {
                // As Prometheus and Alertmanager matchers read it: a missing value is the
                // empty string, so `*` matches an alert without one.
                None if p.matches("") => {}
                None => reasons.push(format!("the alert has no {what} (pattern `{pattern}`)")),
                Some(v) if !p.matches(v) => {
                    reasons.push(format!("{what} `{v}` does not match `{pattern}`"))
                }
                Some(_) => {}
            },
        }
    }
}

/// A trigger with its patterns and time window compiled once, to match many alerts; the
/// verdicts are exactly those of [`trigger_matches_in`].
#[derive(Debug, Clone)]
pub struct CompiledTrigger {
    doc: TriggerDocument,
    alert_name: CompiledPattern,
    severity: Option<CompiledPattern>,
    source: Option<CompiledPattern>,
    labels: Vec<(String, CompiledPattern)>,
    window: Option<Option<(NaiveTime, NaiveTime)>>,
}

impl CompiledTrigger {
    /// Compiles the trigger's patterns and window.
    pub fn new(doc: TriggerDocument) -> CompiledTrigger {
        let window = match (&doc.time_window_start, &doc.time_window_end) {
            (Some(start), Some(end)) => Some(parse_time_of_day(start).zip(parse_time_of_day(end))),
            _ => None,
        };
        CompiledTrigger {
            alert_name: CompiledPattern::new(&doc.alert_name_pattern),
            severity: doc.severity_pattern.as_deref().map(CompiledPattern::new),
            source: doc.source_pattern.as_deref().map(CompiledPattern::new),
            labels: doc
                .labels_match
                .iter()
                .map(|(label, pattern)| (label.clone(), CompiledPattern::new(pattern)))
                .collect(),
            window,
            doc,
        }
    }

    /// The trigger as written.
    pub fn document(&self) -> &TriggerDocument {
        &self.doc
    }

    /// Checks the trigger against an alert at `now` (time window in `tz`), given when it last
    /// fired; lists every reason it does not match.
    pub fn matches_in(
        &self,
        alert: &AlertFacts,
        now: DateTime<Utc>,
        last_triggered_at: Option<DateTime<Utc>>,
        tz: chrono_tz::Tz,
    ) -> MatchVerdict {
        let trigger = &self.doc;
        let mut reasons = Vec::new();
        if !trigger.enabled {
            reasons.push("the trigger is disabled".to_owned());
        }
        self.alert_name
            .check(&mut reasons, "alert name", Some(&alert.name));
        if let Some(p) = &self.severity {
            p.check(&mut reasons, "severity", alert.severity.as_deref());
        }
        if let Some(p) = &self.source {
            p.check(&mut reasons, "source", alert.source.as_deref());
        }
        for (label, pattern) in &self.labels {
            pattern.check(
                &mut reasons,
                &format!("label `{label}`"),
                alert.labels.get(label).map(String::as_str),
            );
        }
        if let (Some(window), Some(start), Some(end)) = (
            &self.window,
            &trigger.time_window_start,
            &trigger.time_window_end,
        ) {
            match window {
                Some((s, e)) => {
                    let local = now.with_timezone(&tz);
                    if !in_window(local.time(), *s, *e) {
                        reasons.push(format!(
                            "{} {tz} is outside the time window {start}-{end}",
                            local.format("%H:%M:%S")
                        ));
                    }
                }
                None => reasons.push(format!("the time window {start}-{end} is malformed")),
            }
        }
        if let Some(last) = last_triggered_at {
            let cooldown = chrono::Duration::seconds(i64::from(trigger.cooldown_seconds));
            if trigger.cooldown_seconds > 0 && now < last + cooldown {
                let left = (last + cooldown - now).num_seconds();
                reasons.push(format!(
                    "in cooldown: fired at {} and the cooldown of {}s has {left}s left",
                    last.format("%Y-%m-%dT%H:%M:%SZ"),
                    trigger.cooldown_seconds
                ));
            }
        }
        MatchVerdict {
            matched: reasons.is_empty(),
            reasons,
        }
    }
}

/// Whether `t` is in `[start, end)`, wrapping midnight when `end < start`.
pub fn in_window(t: NaiveTime, start: NaiveTime, end: NaiveTime) -> bool {
    if start <= end {
        start <= t && t < end
    } else {
        t >= start || t < end
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn trigger() -> TriggerDocument {
        TriggerDocument {
            name: "t".into(),
            priority: 100,
            alert_name_pattern: "KubePod*".into(),
            severity_pattern: None,
            source_pattern: None,
            labels_match: BTreeMap::new(),
            time_window_start: None,
            time_window_end: None,
            enabled: true,
            cooldown_seconds: 0,
            cooldown_per_instance: false,
        }
    }

    fn at(h: u32, m: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 11, 24, h, m, 0).unwrap()
    }

    fn alert(name: &str) -> AlertFacts {
        AlertFacts {
            name: name.into(),
            severity: Some("critical".into()),
            source: Some("alertmanager".into()),
            labels: [("job".to_owned(), "node".to_owned())].into(),
        }
    }

    #[test]
    fn globs_match_whole_values() {
        let p = Pattern::compile("Node*Down").unwrap();
        assert!(p.matches("NodeDown") && p.matches("NodeHostDown"));
        assert!(!p.matches("XNodeDown") && !p.matches("NodeDownNow"));
        assert!(Pattern::compile("crit?cal").unwrap().matches("critical"));
        assert!(Pattern::compile("[wc]*").unwrap().matches("warning"));
        assert!(!Pattern::compile("[!wc]*").unwrap().matches("warning"));
        assert!(Pattern::compile("a.b").unwrap().matches("a.b"));
        assert!(!Pattern::compile("a.b").unwrap().matches("axb"));
        assert!(Pattern::compile("[oops").is_err());
    }

    #[test]
    fn regexes_are_anchored() {
        let p = Pattern::compile("re:Node(Filesystem|Disk).*").unwrap();
        assert!(p.matches("NodeFilesystemAlmostOutOfSpace"));
        assert!(!p.matches("XNodeDisk"));
        assert!(Pattern::compile("/warn|crit/").unwrap().matches("crit"));
        assert!(Pattern::compile("re:(unclosed").is_err());
        assert!(Pattern::compile("/(/").is_err());
    }

    #[test]
    fn reports_every_reason() {
        let mut t = trigger();
        t.severity_pattern = Some("warning".into());
        t.labels_match.insert("job".into(), "postgres".into());
        t.labels_match.insert("instance".into(), "web-*".into());
        let v = trigger_matches(&t, &alert("NodeDown"), at(12, 0), None);
        assert!(!v.matched);
        assert_eq!(v.reasons.len(), 4, "{:?}", v.reasons);
        assert!(v.reasons[0].contains("alert name `NodeDown` does not match `KubePod*`"));
        assert!(v.reasons.iter().any(|r| r.contains("no label `instance`")));
    }

    #[test]
    fn a_missing_value_is_the_empty_string_and_globs_span_line_breaks() {
        let mut t = trigger();
        t.alert_name_pattern = "*".into();
        t.severity_pattern = Some("*".into());
        t.source_pattern = Some("*".into());
        t.labels_match.insert("team".into(), "*".into());
        let bare = AlertFacts {
            name: "Multi\nLine".into(),
            severity: None,
            source: None,
            labels: BTreeMap::new(),
        };
        let v = trigger_matches(&t, &bare, at(12, 0), None);
        assert!(v.matched, "{:?}", v.reasons);
        // A pattern the empty string does not match still needs the value.
        t.severity_pattern = Some("crit*".into());
        t.labels_match.insert("team".into(), "?*".into());
        let v = trigger_matches(&t, &bare, at(12, 0), None);
        assert_eq!(v.reasons.len(), 2, "{:?}", v.reasons);
        assert!(v.reasons[0].contains("no severity"), "{:?}", v.reasons);
        assert!(Pattern::compile("warn?ing").unwrap().matches("warn\ning"));
        assert!(Pattern::compile("a*b").unwrap().matches("a\n\nb"));
    }

    #[test]
    fn matches_when_everything_holds() {
        let mut t = trigger();
        t.alert_name_pattern = "Node*".into();
        t.labels_match
            .insert("job".into(), "re:node|windows".into());
        let v = trigger_matches(&t, &alert("NodeDown"), at(12, 0), None);
        assert!(v.matched, "{:?}", v.reasons);
    }

    #[test]
    fn time_windows_cross_midnight() {
        let mut t = trigger();
        t.alert_name_pattern = "*".into();
        t.time_window_start = Some("22:00".into());
        t.time_window_end = Some("06:00".into());
        for (h, m, expected) in [
            (23, 0, true),
            (0, 30, true),
            (5, 59, true),
            (6, 0, false),
            (12, 0, false),
            (21, 59, false),
            (22, 0, true),
        ] {
            let v = trigger_matches(&t, &alert("X"), at(h, m), None);
            assert_eq!(v.matched, expected, "{h}:{m} {:?}", v.reasons);
        }
        t.time_window_start = Some("09:00".into());
        t.time_window_end = Some("17:00".into());
        assert!(trigger_matches(&t, &alert("X"), at(9, 0), None).matched);
        assert!(!trigger_matches(&t, &alert("X"), at(17, 0), None).matched);
    }

    #[test]
    fn time_windows_follow_the_timezone() {
        let mut t = trigger();
        t.alert_name_pattern = "*".into();
        t.time_window_start = Some("22:00".into());
        t.time_window_end = Some("06:00".into());
        let berlin: chrono_tz::Tz = "Europe/Berlin".parse().unwrap();
        // 21:30 UTC on 24 November is 22:30 in Berlin (UTC+1): inside the window there only.
        assert!(!trigger_matches(&t, &alert("X"), at(21, 30), None).matched);
        assert!(trigger_matches_in(&t, &alert("X"), at(21, 30), None, berlin).matched);
        // 05:30 UTC is 06:30 in Berlin: outside there, inside in UTC.
        assert!(trigger_matches(&t, &alert("X"), at(5, 30), None).matched);
        let v = trigger_matches_in(&t, &alert("X"), at(5, 30), None, berlin);
        assert!(
            !v.matched && v.reasons[0].contains("Europe/Berlin"),
            "{v:?}"
        );
    }

    #[test]
    fn cooldown_and_disabled() {
        let mut t = trigger();
        t.alert_name_pattern = "*".into();
        t.cooldown_seconds = 300;
        let v = trigger_matches(&t, &alert("X"), at(12, 4), Some(at(12, 0)));
        assert!(!v.matched && v.reasons[0].contains("cooldown"), "{v:?}");
        assert!(trigger_matches(&t, &alert("X"), at(12, 5), Some(at(12, 0))).matched);
        t.enabled = false;
        let v = trigger_matches(&t, &alert("X"), at(12, 5), None);
        assert_eq!(v.reasons, vec!["the trigger is disabled".to_owned()]);
    }
}
