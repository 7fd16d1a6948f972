//! Blackout windows: when is a window active, and does it cover a given runbook and server.
//!
//! A window's first occurrence runs from `start_time` to `end_time`; its duration is the
//! difference. Recurring windows repeat that duration:
//! - `daily`, `weekly`, `monthly`: at the wall-clock time (and weekday, or day of month) of
//!   `start_time` in the window's timezone, so "02:00 Europe/Berlin" stays 02:00 across daylight
//!   saving changes. Months without that day are skipped.
//! - `cron`: at every fire time of the cron expression (5 fields `min hour dom month dow`, or the
//!   cron crate's 6/7 fields with seconds), evaluated in the window's timezone.
//!
//! Occurrences never begin before `start_time`, and never at or after `until` when given.
//! `recurrence_pattern` is `{"timezone": "Europe/Berlin", "cron": "0 2 * * SAT", "until": RFC 3339}`
//! (every key optional except `cron` for `cron` windows; the timezone defaults to UTC).
//!
//! Coverage: `affected_servers` and `affected_runbooks` select by union of their criteria; an empty
//! selector covers everything. A run on a worker's own host (no server) is covered only by a
//! window with an empty server selector. Servers: `{"server_ids": [...], "tags": ["db", "env=prod"],
//! "environments": ["production"]}` (a bare JSON array is a tag list). Runbooks:
//! `{"ids": [...], "categories": [...]}` (a bare array holds ids and categories).

use std::str::FromStr;

use chrono::{DateTime, Datelike, Duration, NaiveDate, TimeZone, Utc};
use chrono_tz::Tz;
use serde_json::Value;
use uuid::Uuid;

/// How a window repeats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recurrence {
    /// Once.
    None,
    /// Every day at the same local time.
    Daily,
    /// Every week on the same weekday and local time.
    Weekly,
    /// Every month on the same day and local time.
    Monthly,
    /// At each fire time of a cron expression.
    Cron,
}

impl Recurrence {
    /// The name stored in `blackout_windows.recurrence`.
    pub fn as_str(self) -> &'static str {
        match self {
            Recurrence::None => "none",
            Recurrence::Daily => "daily",
            Recurrence::Weekly => "weekly",
            Recurrence::Monthly => "monthly",
            Recurrence::Cron => "cron",
        }
    }
}

impl FromStr for Recurrence {
    type Err = InvalidWindow;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "none" => Recurrence::None,
            "daily" => Recurrence::Daily,
            "weekly" => Recurrence::Weekly,
            "monthly" => Recurrence::Monthly,
            "cron" => Recurrence::Cron,
            other => {
                return Err(InvalidWindow::new(
                    "recurrence",
                    format!("`{other}` is not one of none, daily, weekly, monthly, cron"),
                ));
            }
        })
    }
}

/// A window definition that cannot be used, with the offending field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct InvalidWindow {
    /// Field path (`recurrence_pattern.timezone`).
    pub field: String,
    /// Why.
    pub reason: String,
}

impl InvalidWindow {
    fn new(field: &str, reason: impl Into<String>) -> Self {
        InvalidWindow {
            field: field.to_owned(),
            reason: reason.into(),
        }
    }
}

/// Parses a cron expression: 5 fields get a leading seconds field of 0.
pub fn parse_cron(expr: &str) -> Result<cron::Schedule, String> {
    let fields = expr.split_whitespace().count();
    let full = if fields == 5 {
        format!("0 {expr}")
    } else {
        expr.to_owned()
    };
    cron::Schedule::from_str(&full).map_err(|e| format!("invalid cron expression `{expr}`: {e}"))
}

/// The parsed `recurrence_pattern`.
#[derive(Debug, Clone)]
pub struct Pattern {
    /// Timezone the wall-clock times are in.
    pub timezone: Tz,
    /// The cron schedule for `cron` windows.
    pub cron: Option<cron::Schedule>,
    /// No occurrence starts at or after this instant.
    pub until: Option<DateTime<Utc>>,
}

/// Validates and parses a pattern for a recurrence.
pub fn parse_pattern(
    recurrence: Recurrence,
    value: Option<&Value>,
) -> Result<Pattern, InvalidWindow> {
    let empty = serde_json::Map::new();
    let object = match value {
        None | Some(Value::Null) => &empty,
        Some(Value::Object(map)) => map,
        Some(_) => {
            return Err(InvalidWindow::new(
                "recurrence_pattern",
                "must be a JSON object",
            ));
        }
    };
    for key in object.keys() {
        if !matches!(key.as_str(), "timezone" | "cron" | "until") {
            return Err(InvalidWindow::new(
                &format!("recurrence_pattern.{key}"),
                "unknown key (expected timezone, cron, until)",
            ));
        }
    }
    let timezone = match object.get("timezone") {
        None | Some(Value::Null) => Tz::UTC,
        Some(Value::String(name)) => name.parse::<Tz>().map_err(|_| {
            InvalidWindow::new(
                "recurrence_pattern.timezone",
                format!("unknown timezone `{name}`"),
            )
        })?,
        Some(_) => {
            return Err(InvalidWindow::new(
                "recurrence_pattern.timezone",
                "must be an IANA timezone name",
            ));
        }
    };
    let cron = match object.get("cron") {
        None | Some(Value::Null) => None,
        Some(Value::String(expr)) => {
            Some(parse_cron(expr).map_err(|e| InvalidWindow::new("recurrence_pattern.cron", e))?)
        }
        Some(_) => {
            return Err(InvalidWindow::new(
                "recurrence_pattern.cron",
                "must be a string",
            ));
        }
    };
    if recurrence == Recurrence::Cron && cron.is_none() {
        return Err(InvalidWindow::new(
            "recurrence_pattern.cron",
            "is required when recurrence is cron",
        ));
    }
    if recurrence != Recurrence::Cron && cron.is_some() {
        return Err(InvalidWindow::new(
            "recurrence_pattern.cron",
            "is only allowed when recurrence is cron",
        ));
    }
    let until = match object.get("until") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(
            DateTime::parse_from_rfc3339(s)
                .map_err(|e| InvalidWindow::new("recurrence_pattern.until", e.to_string()))?
                .with_timezone(&Utc),
        ),
        Some(_) => {
            return Err(InvalidWindow::new(
                "recurrence_pattern.until",
                "must be RFC 3339",
            ));
        }
    };
    Ok(Pattern {
        timezone,
        cron,
        until,
    })
}

/// Which servers a window covers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServerSelector {
    /// Specific servers.
    pub server_ids: Vec<Uuid>,
    /// Tags: `name` or `name=value`.
    pub tags: Vec<String>,
    /// Environments (`production`).
    pub environments: Vec<String>,
}

/// Which runbooks a window covers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RunbookSelector {
    /// Specific runbooks.
    pub ids: Vec<Uuid>,
    /// Runbook categories.
    pub categories: Vec<String>,
}

fn strings(value: &Value, field: &str) -> Result<Vec<String>, InvalidWindow> {
    match value {
        Value::Null => Ok(Vec::new()),
        Value::Array(items) => items
            .iter()
            .enumerate()
            .map(|(i, v)| {
                v.as_str()
                    .map(str::to_owned)
                    .ok_or_else(|| InvalidWindow::new(&format!("{field}[{i}]"), "must be a string"))
            })
            .collect(),
        _ => Err(InvalidWindow::new(field, "must be an array of strings")),
    }
}

fn uuids(value: &Value, field: &str) -> Result<Vec<Uuid>, InvalidWindow> {
    strings(value, field)?
        .iter()
        .enumerate()
        .map(|(i, s)| {
            s.parse()
                .map_err(|_| InvalidWindow::new(&format!("{field}[{i}]"), "must be a UUID"))
        })
        .collect()
}

fn only_keys(
    map: &serde_json::Map<String, Value>,
    field: &str,
    keys: &[&str],
) -> Result<(), InvalidWindow> {
    for key in map.keys() {
        if !keys.contains(&key.as_str()) {
            return Err(InvalidWindow::new(
                &format!("{field}.{key}"),
                format!("unknown key (expected {})", keys.join(", ")),
            ));
        }
    }
    Ok(())
}

impl ServerSelector {
    /// Parses `affected_servers`.
    pub fn parse(value: &Value) -> Result<Self, InvalidWindow> {
        const FIELD: &str = "affected_servers";
        match value {
            Value::Null => Ok(Self::default()),
            Value::Array(_) => Ok(ServerSelector {
                tags: strings(value, FIELD)?,
                ..Self::default()
            }),
            Value::Object(map) => {
                only_keys(map, FIELD, &["server_ids", "tags", "environments"])?;
                let get = |k: &str| map.get(k).cloned().unwrap_or(Value::Null);
                Ok(ServerSelector {
                    server_ids: uuids(&get("server_ids"), &format!("{FIELD}.server_ids"))?,
                    tags: strings(&get("tags"), &format!("{FIELD}.tags"))?,
                    environments: strings(&get("environments"), &format!("{FIELD}.environments"))?,
                })
            }
            _ => Err(InvalidWindow::new(
                FIELD,
                "must be an object or an array of tags",
            )),
        }
    }

    /// The canonical JSON stored in the database.
    pub fn to_json(&self) -> Value {
        serde_json::json!({
            "server_ids": self.server_ids,
            "tags": self.tags,
            "environments": self.environments,
        })
    }

    /// Whether no criterion is set (covers every server).
    pub fn is_all(&self) -> bool {
        self.server_ids.is_empty() && self.tags.is_empty() && self.environments.is_empty()
    }

    /// Whether the selector covers a server.
    pub fn matches(&self, server: &ServerFacts) -> bool {
        self.is_all()
            || self.server_ids.contains(&server.id)
            || server
                .environment
                .as_ref()
                .is_some_and(|e| self.environments.contains(e))
            || self
                .tags
                .iter()
                .any(|t| server_has_tag(&server.tags, t) || server.name.as_deref() == Some(t))
    }
}

/// Whether a server's `tags` JSON carries a tag: `name` matches an array element or an object
/// key; `name=value` matches an array element spelled so, or an object entry with that value.
pub fn server_has_tag(tags: &Value, wanted: &str) -> bool {
    let (name, value) = match wanted.split_once('=') {
        Some((n, v)) => (n, Some(v)),
        None => (wanted, None),
    };
    match tags {
        Value::Array(items) => items.iter().any(|i| i.as_str() == Some(wanted)),
        Value::Object(map) => match (map.get(name), value) {
            (Some(_), None) => true,
            (Some(Value::String(s)), Some(v)) => s == v,
            (Some(other), Some(v)) => serde_json::to_string(other).is_ok_and(|s| s == v),
            (None, _) => false,
        },
        _ => false,
    }
}

impl RunbookSelector {
    /// Parses `affected_runbooks`.
    pub fn parse(value: &Value) -> Result<Self, InvalidWindow> {
        const FIELD: &str = "affected_runbooks";
        match value {
            Value::Null => Ok(Self::default()),
            Value::Array(_) => {
                let mut selector = Self::default();
                for item in strings(value, FIELD)? {
                    match item.parse::<Uuid>() {
                        Ok(id) => selector.ids.push(id),
                        Err(_) => selector.categories.push(item),
                    }
                }
                Ok(selector)
            }
            Value::Object(map) => {
                only_keys(map, FIELD, &["ids", "categories"])?;
                let get = |k: &str| map.get(k).cloned().unwrap_or(Value::Null);
                Ok(RunbookSelector {
                    ids: uuids(&get("ids"), &format!("{FIELD}.ids"))?,
                    categories: strings(&get("categories"), &format!("{FIELD}.categories"))?,
                })
            }
            _ => Err(InvalidWindow::new(FIELD, "must be an object or an array")),
        }
    }

    /// The canonical JSON stored in the database.
    pub fn to_json(&self) -> Value {
        serde_json::json!({ "ids": self.ids, "categories": self.categories })
    }

    /// Whether no criterion is set (covers every runbook).
    pub fn is_all(&self) -> bool {
        self.ids.is_empty() && self.categories.is_empty()
    }

    /// Whether the selector covers a runbook.
    pub fn matches(&self, runbook: &RunbookFacts) -> bool {
        self.is_all()
            || self.ids.contains(&runbook.id)
            || runbook
                .category
                .as_ref()
                .is_some_and(|c| self.categories.contains(c))
    }
}

/// What a window needs to know of a server.
#[derive(Debug, Clone)]
pub struct ServerFacts {
    /// Id.
    pub id: Uuid,
    /// `server_credentials.tags`.
    pub tags: Value,
    /// `server_credentials.environment`.
    pub environment: Option<String>,
    /// `server_credentials.name` (a bare selector entry may name a server).
    pub name: Option<String>,
}

/// What a window needs to know of a runbook.
#[derive(Debug, Clone)]
pub struct RunbookFacts {
    /// Id.
    pub id: Uuid,
    /// Category.
    pub category: Option<String>,
}

/// A validated window.
#[derive(Debug, Clone)]
pub struct Window {
    /// Id.
    pub id: Uuid,
    /// Name.
    pub name: String,
    /// Start of the first occurrence.
    pub start_time: DateTime<Utc>,
    /// End of the first occurrence.
    pub end_time: DateTime<Utc>,
    /// Repetition.
    pub recurrence: Recurrence,
    /// Timezone, cron and end of the series.
    pub pattern: Pattern,
    /// Covered servers.
    pub servers: ServerSelector,
    /// Covered runbooks.
    pub runbooks: RunbookSelector,
    /// Disabled windows are never active.
    pub enabled: bool,
}

/// An occurrence of a window: `[start, end)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Occurrence {
    /// Start.
    pub start: DateTime<Utc>,
    /// End (exclusive).
    pub end: DateTime<Utc>,
}

impl Window {
    /// The window's duration.
    pub fn duration(&self) -> Duration {
        self.end_time - self.start_time
    }

    fn occurrence_if_covering(
        &self,
        start: DateTime<Utc>,
        now: DateTime<Utc>,
    ) -> Option<Occurrence> {
        let end = start + self.duration();
        let in_series = start >= self.start_time && self.pattern.until.is_none_or(|u| start < u);
        (in_series && start <= now && now < end).then_some(Occurrence { start, end })
    }

    /// The occurrence covering `now`, if any.
    pub fn active_at(&self, now: DateTime<Utc>) -> Option<Occurrence> {
        if !self.enabled || now < self.start_time {
            return None;
        }
        let duration = self.duration();
        match self.recurrence {
            Recurrence::None => self.occurrence_if_covering(self.start_time, now),
            Recurrence::Cron => {
                let schedule = self.pattern.cron.as_ref()?;
                let tz = self.pattern.timezone;
                // The latest fire time that could still cover `now` starts after now - duration.
                let earliest = (now - duration).max(self.start_time - Duration::seconds(1));
                let from = earliest.with_timezone(&tz);
                schedule
                    .after(&from)
                    .take_while(|fire| fire.with_timezone(&Utc) <= now)
                    .filter_map(|fire| self.occurrence_if_covering(fire.with_timezone(&Utc), now))
                    .last()
            }
            Recurrence::Daily | Recurrence::Weekly | Recurrence::Monthly => {
                let tz = self.pattern.timezone;
                let first_local = self.start_time.with_timezone(&tz);
                let time_of_day = first_local.time();
                let today = now.with_timezone(&tz).date_naive();
                let lookback = duration.num_days().clamp(0, 400) + 1;
                let mut best = None;
                for back in (0..=lookback).rev() {
                    let Some(date) = today.checked_sub_signed(Duration::days(back)) else {
                        continue;
                    };
                    if !self.recurs_on(date, first_local.date_naive()) {
                        continue;
                    }
                    // A local time skipped by a daylight-saving jump has no occurrence that day.
                    let Some(local) = tz
                        .from_local_datetime(&date.and_time(time_of_day))
                        .earliest()
                    else {
                        continue;
                    };
                    if let Some(o) = self.occurrence_if_covering(local.with_timezone(&Utc), now) {
                        best = Some(o);
                    }
                }
                best
            }
        }
    }

    fn recurs_on(&self, date: NaiveDate, first: NaiveDate) -> bool {
        match self.recurrence {
            Recurrence::Daily => true,
            Recurrence::Weekly => date.weekday() == first.weekday(),
            Recurrence::Monthly => date.day() == first.day(),
            Recurrence::None | Recurrence::Cron => false,
        }
    }

    /// Whether the window covers this runbook on this server (ignoring time). No server is a
    /// run on a worker's own host, which only a window for every server covers; no runbook
    /// asks about every runbook, which only a window for every runbook covers.
    pub fn covers(&self, runbook: Option<&RunbookFacts>, server: Option<&ServerFacts>) -> bool {
        let server_ok = match server {
            Some(s) => self.servers.matches(s),
            None => self.servers.is_all(),
        };
        let runbook_ok = match runbook {
            Some(r) => self.runbooks.matches(r),
            None => self.runbooks.is_all(),
        };
        server_ok && runbook_ok
    }

    /// A sentence for refusals and the check endpoint.
    pub fn describe(&self, occurrence: &Occurrence) -> String {
        format!(
            "blackout window '{}' ({}{}) is active from {} until {}",
            self.name,
            self.recurrence.as_str(),
            if self.recurrence == Recurrence::None {
                String::new()
            } else {
                format!(", {}", self.pattern.timezone)
            },
            occurrence.start.to_rfc3339(),
            occurrence.end.to_rfc3339()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    fn window(start: &str, end: &str, recurrence: Recurrence, pattern: Value) -> Window {
        Window {
            id: Uuid::nil(),
            name: "w".into(),
            start_time: at(start),
            end_time: at(end),
            recurrence,
            pattern: parse_pattern(recurrence, Some(&pattern)).unwrap(),
            servers: ServerSelector::default(),
            runbooks: RunbookSelector::default(),
            enabled: true,
        }
    }

    #[test]
    fn one_off_is_half_open() {
        let w = window(
            "2026-01-01T10:00:00Z",
            "2026-01-01T12:00:00Z",
            Recurrence::None,
            json!({}),
        );
        assert!(w.active_at(at("2026-01-01T09:59:59Z")).is_none());
        assert!(w.active_at(at("2026-01-01T10:00:00Z")).is_some());
        assert!(w.active_at(at("2026-01-01T11:59:59Z")).is_some());
        assert!(w.active_at(at("2026-01-01T12:00:00Z")).is_none());
    }

    #[test]
    fn daily_crosses_midnight_and_follows_local_time_across_dst() {
        // 23:00-01:00 Berlin local, first on 2026-03-01 (UTC+1).
        let w = window(
            "2026-03-01T22:00:00Z",
            "2026-03-02T00:00:00Z",
            Recurrence::Daily,
            json!({"timezone": "Europe/Berlin"}),
        );
        assert!(w.active_at(at("2026-03-10T23:30:00Z")).is_some()); // 00:30 local
        assert!(w.active_at(at("2026-03-10T12:00:00Z")).is_none());
        // After the switch to summer time (UTC+2) on 2026-03-29, 23:00 local is 21:00 UTC.
        assert!(w.active_at(at("2026-04-10T21:30:00Z")).is_some());
        assert!(w.active_at(at("2026-04-10T23:30:00Z")).is_none());
        // Never before the first occurrence.
        assert!(w.active_at(at("2026-02-28T22:30:00Z")).is_none());
    }

    #[test]
    fn weekly_and_monthly_repeat_on_their_day() {
        // Saturday 2026-01-03 02:00-04:00 UTC.
        let w = window(
            "2026-01-03T02:00:00Z",
            "2026-01-03T04:00:00Z",
            Recurrence::Weekly,
            json!({}),
        );
        assert!(w.active_at(at("2026-01-10T03:00:00Z")).is_some());
        assert!(w.active_at(at("2026-01-11T03:00:00Z")).is_none());
        let m = window(
            "2026-01-31T02:00:00Z",
            "2026-01-31T03:00:00Z",
            Recurrence::Monthly,
            json!({}),
        );
        assert!(m.active_at(at("2026-03-31T02:30:00Z")).is_some());
        assert!(
            m.active_at(at("2026-02-28T02:30:00Z")).is_none(),
            "February has no 31st"
        );
    }

    #[test]
    fn cron_windows_use_their_timezone_and_until() {
        // Every weekday at 09:00 New York, one hour long, until 2026-02-01.
        let w = window(
            "2026-01-01T00:00:00Z",
            "2026-01-01T01:00:00Z",
            Recurrence::Cron,
            json!({"timezone": "America/New_York", "cron": "0 9 * * Mon-Fri", "until": "2026-02-01T00:00:00Z"}),
        );
        // Monday 2026-01-12 09:30 EST = 14:30 UTC.
        assert!(w.active_at(at("2026-01-12T14:30:00Z")).is_some());
        assert!(w.active_at(at("2026-01-11T14:30:00Z")).is_none(), "Sunday");
        assert!(
            w.active_at(at("2026-01-12T15:30:00Z")).is_none(),
            "after the hour"
        );
        assert!(
            w.active_at(at("2026-02-02T14:30:00Z")).is_none(),
            "after until"
        );
    }

    #[test]
    fn patterns_are_validated_with_field_paths() {
        let e = parse_pattern(Recurrence::Cron, Some(&json!({}))).unwrap_err();
        assert_eq!(e.field, "recurrence_pattern.cron");
        let e = parse_pattern(
            Recurrence::Daily,
            Some(&json!({"timezone": "Mars/Olympus"})),
        )
        .unwrap_err();
        assert_eq!(e.field, "recurrence_pattern.timezone");
        let e = parse_pattern(Recurrence::Cron, Some(&json!({"cron": "61 * * * *"}))).unwrap_err();
        assert_eq!(e.field, "recurrence_pattern.cron");
        let e = parse_pattern(Recurrence::Daily, Some(&json!({"tz": "UTC"}))).unwrap_err();
        assert_eq!(e.field, "recurrence_pattern.tz");
    }

    #[test]
    fn selectors_cover_by_union_and_empty_covers_all() {
        let server = ServerFacts {
            id: Uuid::new_v4(),
            tags: json!({"role": "db", "env": "prod"}),
            environment: Some("production".into()),
            name: Some("db-7".into()),
        };
        assert!(
            ServerSelector::parse(&json!(["db-7"]))
                .unwrap()
                .matches(&server)
        );
        assert!(ServerSelector::default().matches(&server));
        assert!(
            ServerSelector::parse(&json!(["role=db"]))
                .unwrap()
                .matches(&server)
        );
        assert!(
            ServerSelector::parse(&json!(["role"]))
                .unwrap()
                .matches(&server)
        );
        assert!(
            !ServerSelector::parse(&json!(["role=web"]))
                .unwrap()
                .matches(&server)
        );
        assert!(
            ServerSelector::parse(&json!({"environments": ["production"]}))
                .unwrap()
                .matches(&server)
        );
        let array_tags = ServerFacts {
            tags: json!(["db", "primary"]),
            ..server.clone()
        };
        assert!(
            ServerSelector::parse(&json!({"tags": ["primary"]}))
                .unwrap()
                .matches(&array_tags)
        );
        let rb = RunbookFacts {
            id: Uuid::new_v4(),
            category: Some("database".into()),
        };
        assert!(
            RunbookSelector::parse(&json!(["database"]))
                .unwrap()
                .matches(&rb)
        );
        assert!(
            RunbookSelector::parse(&json!([rb.id.to_string()]))
                .unwrap()
                .matches(&rb)
        );
        assert!(
            !RunbookSelector::parse(&json!({"categories": ["network"]}))
                .unwrap()
                .matches(&rb)
        );
        assert!(ServerSelector::parse(&json!({"hosts": []})).is_err());
    }
}
