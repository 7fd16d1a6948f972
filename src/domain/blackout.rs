//! Blackout windows: when is a window active, and does it cover a given runbook and server.
//!
//! A window's first occurrence runs from `start_time` to `end_time`; its duration is the
//! difference. Recurring windows repeat that duration:
//! - `daily`, `weekly`, `monthly`: at the wall-clock time (and weekday, or day of month) of
//!   `start_time` in the window's timezone, so "02:00 Europe/Berlin" stays 02:00 across daylight
//!   saving changes. Months without that day are skipped.
//! - `cron`: at every fire time of the cron expression, on the wall clock of the window's
//!   timezone. Five fields (`min hour dom month dow`) read as Unix cron does: day of week 0 or 7
//!   is Sunday, 1 Monday, ... 6 Saturday (or names), and when both the day of month and the day
//!   of week are restricted a day matching either fires. Six or seven fields (with seconds, and
//!   years) are the cron crate's own syntax, where day of week 1 is Sunday ... 7 Saturday.
//!
//! Wall-clock times read as PostgreSQL reads them: in the hour a daylight-saving change repeats,
//! the first of the two instants; in the hour it skips, as far past the jump as the time is past
//! its start (02:30 on a day that jumps from 02:00 to 03:00 is 03:30). An occurrence's length is
//! the window's duration in absolute time.
//!
//! Occurrences never begin before `start_time`, and never at or after `until` when given; the
//! first one, from `start_time` to `end_time`, always counts for daily, weekly and monthly
//! windows (also when `start_time` is the second pass of a repeated hour).
//! `recurrence_pattern` is `{"timezone": "Europe/Berlin", "cron": "0 2 * * SAT", "until": RFC 3339}`
//! (every key optional except `cron` for `cron` windows; the timezone defaults to UTC).
//!
//! Coverage: `affected_servers` and `affected_runbooks` select by union of their criteria; an empty
//! selector covers everything. A run on a worker's own host (no server) is covered only by a
//! window with an empty server selector. Servers: `{"server_ids": [...], "tags": ["db", "env=prod"],
//! "environments": ["production"]}` (a bare JSON array is a tag list). Runbooks:
//! `{"ids": [...], "categories": [...]}` (a bare array holds ids and categories).

use std::str::FromStr;

use chrono::{
    DateTime, Datelike, Duration, LocalResult, NaiveDate, NaiveDateTime, Offset, TimeZone, Utc,
};
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

/// A parsed cron expression: its fire times are those of any of its schedules, read as
/// wall-clock times.
#[derive(Debug, Clone)]
pub struct CronSpec {
    /// One schedule, or two for a 5-field expression that restricts both the day of the month
    /// and the day of the week (Unix cron fires on a day matching either).
    schedules: Vec<cron::Schedule>,
    /// The hour field is a wildcard (`*`, `*/2`): as Unix cron, such a schedule fires in both
    /// passes of an hour a daylight-saving change repeats; a fixed hour fires once, in the first.
    every_hour: bool,
}

impl CronSpec {
    /// Whether the schedule fires at all at or after `start`, read as wall-clock times of
    /// `tz`, and before `until`: `0 0 31 2 *` (31 February) never does.
    pub fn fires_after(&self, tz: Tz, start: DateTime<Utc>, until: Option<DateTime<Utc>>) -> bool {
        let local = Utc.from_utc_datetime(&start.with_timezone(&tz).naive_local());
        self.schedules.iter().any(|s| {
            s.after(&(local - Duration::seconds(1)))
                .next()
                .is_some_and(|fire| until.is_none_or(|u| local_instant(tz, fire.naive_utc()) < u))
        })
    }
}

/// Parses a cron expression. Five fields are Unix cron's (`min hour dom month dow`, day of week
/// 0 or 7 Sunday); six or seven are the cron crate's.
pub fn parse_cron(expr: &str) -> Result<CronSpec, String> {
    let invalid = |e: String| format!("invalid cron expression `{expr}`: {e}");
    let fields: Vec<&str> = expr.split_whitespace().collect();
    // Which field is which, for an expression of the cron crate's forms.
    let form = match fields.len() {
        6 => " (six fields read as: second minute hour day-of-month month day-of-week)",
        7 => " (seven fields read as: second minute hour day-of-month month day-of-week year)",
        _ => "",
    };
    let schedule = |full: &str| {
        cron::Schedule::from_str(full).map_err(|e| {
            let text = cron_error_text(&e.to_string(), full, expr);
            invalid(if text.trim().is_empty() {
                "not a schedule: give five fields (minute hour day-of-month month \
                 day-of-week), six or seven (a second first, a year last), or one of \
                 @yearly, @monthly, @weekly, @daily, @hourly"
                    .to_owned()
            } else {
                format!("{text}{form}")
            })
        })
    };
    let [minute, hour, dom, month, dow] = fields[..] else {
        let every_hour = match fields.len() {
            6 | 7 => fields[2].starts_with('*'),
            _ => expr.trim() == "@hourly",
        };
        return Ok(CronSpec {
            schedules: vec![schedule(expr)?],
            every_hour,
        });
    };
    // As Unix cron reads the two day fields: a day matching either, unless one of them starts
    // with `*` (`*`, `*/2`), and then a day matching both.
    let starred = |field: &str| field.starts_with('*') || field == "?";
    let either = !starred(dom) && !starred(dow);
    let dow = unix_weekdays(dow).map_err(invalid)?;
    let schedules = if !either {
        vec![schedule(&format!("0 {minute} {hour} {dom} {month} {dow}"))?]
    } else {
        vec![
            schedule(&format!("0 {minute} {hour} {dom} {month} *"))?,
            schedule(&format!("0 {minute} {hour} * {month} {dow}"))?,
        ]
    };
    Ok(CronSpec {
        schedules,
        every_hour: hour.starts_with('*'),
    })
}

/// The cron crate's error in the product's words: the problem without the six-field form a
/// five-field expression is read as, and the bounds it breaks stated as they are (the crate says
/// "less than 59" for a maximum of 59).
fn cron_error_text(error: &str, full: &str, written: &str) -> String {
    static BOUND: std::sync::LazyLock<regex::Regex> = std::sync::LazyLock::new(|| {
        regex::Regex::new(
            r"^(.+) must be (less than|greater than or equal to) (\d+)\. \('(\d+)' specified\.\)$",
        )
        .expect("valid pattern")
    });
    // The crate shows the expression it read with a caret under the problem, then the problem.
    let error = match error.rsplit_once('\n') {
        Some((_, last)) => last.to_owned(),
        None => error.replace(full, written),
    };
    match BOUND.captures(&error) {
        Some(c) => format!(
            "{} {} is out of range (at {} {})",
            c[1].to_lowercase(),
            &c[4],
            if &c[2] == "less than" {
                "most"
            } else {
                "least"
            },
            &c[3]
        ),
        None => error,
    }
}

/// A Unix cron day-of-week field (numbers 0-7, 0 and 7 Sunday; three-letter names; lists,
/// ranges and steps) as the cron crate reads it: the days by name (`*` and `?` kept).
fn unix_weekdays(field: &str) -> Result<String, String> {
    const NAMES: [&str; 7] = ["SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT"];
    if field == "*" || field == "?" {
        return Ok(field.to_owned());
    }
    let day = |text: &str| -> Result<usize, String> {
        match text.parse::<usize>() {
            Ok(n) if n <= 7 => Ok(n),
            Ok(n) => Err(format!(
                "day of week {n} is out of range (0-7; 0 and 7 are Sunday)"
            )),
            Err(_) => NAMES
                .iter()
                .position(|name| name.eq_ignore_ascii_case(text))
                .ok_or_else(|| format!("`{text}` is not a day of the week")),
        }
    };
    let mut days = [false; 7];
    for item in field.split(',') {
        let (range, step) = match item.split_once('/') {
            Some((range, step)) => (
                range,
                step.parse::<usize>()
                    .ok()
                    .filter(|s| *s > 0)
                    .ok_or_else(|| format!("`{step}` is not a step of days"))?,
            ),
            None => (item, 1),
        };
        let (first, last) = match range.split_once('-') {
            _ if range == "*" => (0, 6),
            Some((a, b)) => (day(a)?, day(b)?),
            // `N/step` runs from N to the end of the week.
            None if step > 1 => (day(range)?, 6),
            None => (day(range)?, day(range)?),
        };
        if first > last {
            return Err(format!("the day-of-week range `{range}` runs backwards"));
        }
        for d in (first..=last).step_by(step) {
            days[d % 7] = true;
        }
    }
    Ok(days
        .iter()
        .zip(NAMES)
        .filter(|(on, _)| **on)
        .map(|(_, name)| name)
        .collect::<Vec<_>>()
        .join(","))
}

/// The instant a wall-clock time of `tz` names: the first in an hour a daylight-saving change
/// repeats; in an hour it skips, the instant as far past the jump as the time is past the
/// start of the gap, as PostgreSQL reads it.
fn local_instant(tz: Tz, local: NaiveDateTime) -> DateTime<Utc> {
    match tz.from_local_datetime(&local) {
        LocalResult::Single(t) | LocalResult::Ambiguous(t, _) => t.with_timezone(&Utc),
        LocalResult::None => {
            // The offset in force before the jump.
            let before = tz
                .offset_from_utc_datetime(&(local - Duration::days(1)))
                .fix()
                .local_minus_utc();
            Utc.from_utc_datetime(&(local - Duration::seconds(i64::from(before))))
        }
    }
}

/// The latest fire time of `schedule`, read as wall-clock times of `tz`, at or before `upper`.
/// With `both_passes`, a wall-clock time of an hour a daylight-saving change repeats fires at
/// both of its instants.
fn latest_fire(
    schedule: &cron::Schedule,
    tz: Tz,
    upper: DateTime<Utc>,
    both_passes: bool,
) -> Option<DateTime<Utc>> {
    let local = upper.with_timezone(&tz).naive_local();
    // In the second pass of a repeated hour, the later wall-clock times of that hour name
    // earlier instants (their first pass): search from an hour later and pass over the fire
    // times after `upper`.
    let ahead = match tz.from_local_datetime(&local) {
        LocalResult::Ambiguous(..) => Duration::hours(1),
        _ => Duration::zero(),
    };
    let from = Utc.from_utc_datetime(&(local + ahead + Duration::seconds(1)));
    let ambiguous =
        |t: NaiveDateTime| matches!(tz.from_local_datetime(&t), LocalResult::Ambiguous(..));
    let mut best: Option<(NaiveDateTime, DateTime<Utc>)> = None;
    for fire in schedule.after(&from).rev() {
        let fire = fire.naive_utc();
        if let Some((found_at, _)) = best {
            // A later instant can only be the second pass of an earlier wall-clock time of a
            // repeated hour, less than an hour before the one found.
            if !both_passes || fire < found_at - Duration::hours(1) || !ambiguous(fire) {
                break;
            }
        }
        let instants = match tz.from_local_datetime(&fire) {
            LocalResult::Ambiguous(first, second) if both_passes => {
                vec![first.with_timezone(&Utc), second.with_timezone(&Utc)]
            }
            _ => vec![local_instant(tz, fire)],
        };
        for instant in instants.into_iter().filter(|i| *i <= upper) {
            if best.is_none_or(|(_, b)| instant > b) {
                best = Some((best.map_or(fire, |(at, _)| at), instant));
            }
        }
        if best.is_some() && !both_passes {
            break;
        }
    }
    best.map(|(_, instant)| instant)
}

/// The parsed `recurrence_pattern`.
#[derive(Debug, Clone)]
pub struct Pattern {
    /// Timezone the wall-clock times are in.
    pub timezone: Tz,
    /// The cron expression of `cron` windows.
    pub cron: Option<CronSpec>,
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
                let spec = self.pattern.cron.as_ref()?;
                // Occurrences end in the order they start, so only the latest fire time at or
                // before now (and before `until`) can cover now.
                let upper = match self.pattern.until {
                    Some(until) => now.min(until - Duration::nanoseconds(1)),
                    None => now,
                };
                spec.schedules
                    .iter()
                    .filter_map(|s| latest_fire(s, self.pattern.timezone, upper, spec.every_hour))
                    .filter_map(|fire| self.occurrence_if_covering(fire, now))
                    .max_by_key(|o| o.start)
            }
            Recurrence::Daily | Recurrence::Weekly | Recurrence::Monthly => {
                let tz = self.pattern.timezone;
                let first_local = self.start_time.with_timezone(&tz);
                let time_of_day = first_local.time();
                let today = now.with_timezone(&tz).date_naive();
                let lookback = duration.num_days().clamp(0, 400) + 1;
                // The first occurrence is the one given, whatever its wall-clock reading.
                let mut best = self.occurrence_if_covering(self.start_time, now);
                for back in (0..=lookback).rev() {
                    let Some(date) = today.checked_sub_signed(Duration::days(back)) else {
                        continue;
                    };
                    if !self.recurs_on(date, first_local.date_naive()) {
                        continue;
                    }
                    let start = local_instant(tz, date.and_time(time_of_day));
                    if let Some(o) = self.occurrence_if_covering(start, now)
                        && best.is_none_or(|b: Occurrence| o.start > b.start)
                    {
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

    /// Whether a cron window of ten minutes from 02:00 UTC (`expr` at 02:00) covers 02:05 on
    /// each day from Monday 2029-01-01 to Sunday 2029-01-07.
    fn cron_days(expr: &str) -> Vec<bool> {
        let w = window(
            "2029-01-01T00:00:00Z",
            "2029-01-01T00:10:00Z",
            Recurrence::Cron,
            json!({ "cron": expr }),
        );
        (1..=7)
            .map(|d| {
                w.active_at(at(&format!("2029-01-0{d}T02:05:00Z")))
                    .is_some()
            })
            .collect()
    }

    #[test]
    fn five_field_cron_reads_days_of_week_as_unix_cron() {
        let weekdays = vec![true, true, true, true, true, false, false];
        assert_eq!(cron_days("0 2 * * 1-5"), weekdays);
        assert_eq!(cron_days("0 2 * * MON-FRI"), weekdays);
        assert_eq!(cron_days("0 2 * * mon,tue,wed,thu,fri"), weekdays);
        let sunday = vec![false, false, false, false, false, false, true];
        assert_eq!(cron_days("0 2 * * 0"), sunday);
        assert_eq!(cron_days("0 2 * * 7"), sunday);
        assert_eq!(cron_days("0 2 * * SUN"), sunday);
        assert_eq!(
            cron_days("0 2 * * 5-7"),
            vec![false, false, false, false, true, true, true]
        );
        // Every other day from Sunday: Sunday, Tuesday, Thursday, Saturday.
        assert_eq!(
            cron_days("0 2 * * */2"),
            vec![false, true, false, true, false, true, true]
        );
        assert_eq!(
            cron_days("0 2 * * 1/3"),
            vec![true, false, false, true, false, false, false]
        );
        assert_eq!(cron_days("0 2 * * *"), vec![true; 7]);
        // Six fields are the cron crate's syntax: day 2 is Monday there.
        assert_eq!(
            cron_days("0 0 2 * * 2"),
            vec![true, false, false, false, false, false, false]
        );
        // Bounds are stated as they are, about the expression as written.
        let e =
            parse_pattern(Recurrence::Cron, Some(&json!({ "cron": "61 * * * *" }))).unwrap_err();
        assert_eq!(
            e.reason,
            "invalid cron expression `61 * * * *`: minutes 61 is out of range (at most 59)"
        );
        // Nothing the crate can say is left unsaid, and six fields say how they are read.
        let e = parse_pattern(Recurrence::Cron, Some(&json!({ "cron": "@reboot" }))).unwrap_err();
        assert!(
            e.reason.contains("not a schedule: give five fields"),
            "{}",
            e.reason
        );
        let e = parse_pattern(Recurrence::Cron, Some(&json!({ "cron": "0 0 2 * * 2099" })))
            .unwrap_err();
        assert!(
            e.reason.contains("out of range") && e.reason.contains("six fields read as"),
            "{}",
            e.reason
        );
        for bad in ["0 2 * * 8", "0 2 * * 5-1", "0 2 * * Funday", "0 2 * * 1/0"] {
            let e = parse_pattern(Recurrence::Cron, Some(&json!({ "cron": bad }))).unwrap_err();
            assert_eq!(e.field, "recurrence_pattern.cron", "{bad}");
            assert!(e.reason.contains(bad), "{bad}: {}", e.reason);
        }
    }

    #[test]
    fn five_field_cron_fires_on_either_day_when_both_are_restricted() {
        // The 13th, or any Friday (Unix cron), not only Friday the 13th.
        let w = window(
            "2027-01-01T00:00:00Z",
            "2027-01-01T00:10:00Z",
            Recurrence::Cron,
            json!({ "cron": "0 2 13 * FRI" }),
        );
        assert!(
            w.active_at(at("2027-01-13T02:05:00Z")).is_some(),
            "Wednesday the 13th"
        );
        assert!(
            w.active_at(at("2027-01-15T02:05:00Z")).is_some(),
            "a Friday"
        );
        assert!(w.active_at(at("2027-01-14T02:05:00Z")).is_none(), "neither");
        // A day field starting with `*` is not a restriction of its own: both must match
        // (odd days of the month that are Mondays: 2029-01-01 is one, the 3rd, 5th and 7th
        // are not Mondays).
        assert_eq!(
            cron_days("0 2 */2 * MON"),
            vec![true, false, false, false, false, false, false]
        );
        assert_eq!(
            cron_days("0 2 1-31/2 * MON"),
            vec![true, false, true, false, true, false, true]
        );
    }

    #[test]
    fn long_cron_windows_are_found_from_their_latest_fire_time() {
        // Fires every second, each occurrence lasting 30 days: covered throughout, found
        // without walking the fire times in between.
        let w = window(
            "2030-01-01T00:00:00Z",
            "2030-01-31T00:00:00Z",
            Recurrence::Cron,
            json!({ "cron": "* * * * * *", "until": "2030-02-01T00:00:00Z" }),
        );
        let o = w.active_at(at("2030-03-01T00:00:00Z")).unwrap();
        assert_eq!(
            o.start,
            at("2030-01-31T23:59:59Z"),
            "the last fire before until"
        );
        assert!(w.active_at(at("2030-03-03T00:00:00Z")).is_none());
    }

    #[test]
    fn wall_clock_times_across_daylight_saving_changes() {
        // Daily 02:00-04:00 Berlin (from 2027-03-01, UTC+1). On 2027-03-28 02:00 does not
        // exist: that day's occurrence starts at 03:00 CEST (01:00 UTC), as long as ever.
        let daily = window(
            "2027-03-01T01:00:00Z",
            "2027-03-01T03:00:00Z",
            Recurrence::Daily,
            json!({ "timezone": "Europe/Berlin" }),
        );
        let o = daily.active_at(at("2027-03-28T01:15:00Z")).unwrap();
        assert_eq!(o.start, at("2027-03-28T01:00:00Z"));
        assert!(daily.active_at(at("2027-03-28T00:30:00Z")).is_none());
        assert!(
            daily.active_at(at("2027-03-29T00:30:00Z")).is_some(),
            "02:30 CEST"
        );

        // Weekly from 02:30 CET on 2027-10-31, the second pass of the repeated hour (01:30 UTC):
        // the first occurrence is the one given; the next week's is 02:30 CET again.
        let weekly = window(
            "2027-10-31T01:30:00Z",
            "2027-10-31T02:00:00Z",
            Recurrence::Weekly,
            json!({ "timezone": "Europe/Berlin" }),
        );
        assert!(weekly.active_at(at("2027-10-31T01:45:00Z")).is_some());
        assert!(weekly.active_at(at("2027-10-31T00:45:00Z")).is_none());
        assert!(weekly.active_at(at("2027-11-07T01:45:00Z")).is_some());

        // Cron at 02:30 Berlin, 20 minutes: once on the day the hour repeats (its first pass,
        // 00:30 UTC), and at 03:30 CEST (01:30 UTC) on the day 02:30 is skipped.
        let cron = window(
            "2027-01-01T00:00:00Z",
            "2027-01-01T00:20:00Z",
            Recurrence::Cron,
            json!({ "timezone": "Europe/Berlin", "cron": "30 2 * * *" }),
        );
        assert!(cron.active_at(at("2027-10-31T00:40:00Z")).is_some());
        assert!(cron.active_at(at("2027-10-31T01:40:00Z")).is_none());
        let o = cron.active_at(at("2027-03-28T01:40:00Z")).unwrap();
        assert_eq!(o.start, at("2027-03-28T01:30:00Z"));
        // An ordinary day: 02:30 CET is 01:30 UTC.
        assert!(cron.active_at(at("2027-01-05T01:40:00Z")).is_some());

        // Every hour, an hour long: as Unix cron fires a wildcard hour in both passes of the
        // repeated hour, the window covers the night the clocks go back without a gap.
        let hourly = window(
            "2026-01-01T00:00:00Z",
            "2026-01-01T01:00:00Z",
            Recurrence::Cron,
            json!({ "timezone": "Europe/Berlin", "cron": "0 * * * *" }),
        );
        for now in [
            "2026-10-25T00:59:00Z",
            "2026-10-25T01:00:00Z",
            "2026-10-25T01:30:00Z",
            "2026-10-25T01:59:00Z",
            "2026-10-25T02:00:00Z",
            "2027-03-28T00:59:00Z",
            "2027-03-28T01:30:00Z",
        ] {
            let o = hourly.active_at(at(now));
            assert!(o.is_some(), "{now}");
            assert!(o.unwrap().start <= at(now), "{now}");
        }
        assert_eq!(
            hourly.active_at(at("2026-10-25T01:30:00Z")).unwrap().start,
            at("2026-10-25T01:00:00Z")
        );
    }

    #[test]
    fn a_cron_schedule_that_never_fires_is_known() {
        let start = at("2026-01-01T00:00:00Z");
        let never = parse_cron("0 0 31 2 *").unwrap();
        assert!(!never.fires_after(Tz::UTC, start, None));
        let leap = parse_cron("0 0 29 2 *").unwrap();
        assert!(leap.fires_after(Tz::UTC, start, None));
        assert!(!leap.fires_after(Tz::UTC, start, Some(at("2027-01-01T00:00:00Z"))));
        let daily = parse_cron("30 2 * * *").unwrap();
        assert!(daily.fires_after(Tz::Europe__Berlin, start, Some(at("2026-01-01T02:00:00Z"))));
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
