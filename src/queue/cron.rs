//! Cron: schedules (cron crate syntax, with seconds) that enqueue one job per tick across any
//! number of workers. Each schedule has a `queue_cron` row holding the last tick fired; a worker
//! fires tick `t` only by advancing that row from an earlier tick to `t` (compare-and-set) in the
//! transaction that enqueues the tick's job, which also carries the unique key
//! `cron:<name>:<unix seconds>`. So N workers racing on one tick enqueue exactly one job.
//!
//! Missed ticks (every worker down): only the latest due tick within the last 24 hours fires.

use std::str::FromStr;

use chrono::{DateTime, Utc};
use sqlx::PgPool;

use super::{NewJob, QueueError};
use crate::store;

/// How far back a worker looks for a due tick.
const LOOKBACK: chrono::TimeDelta = chrono::TimeDelta::hours(24);

/// One schedule.
#[derive(Debug, Clone)]
pub struct CronEntry {
    /// Unique schedule name (the `queue_cron` key).
    pub name: String,
    /// The expression as written.
    pub expr: String,
    schedule: cron::Schedule,
    /// The job each tick enqueues (its unique key and run_at are set per tick).
    pub job: NewJob,
}

impl CronEntry {
    /// Parses the expression.
    pub fn new(name: &str, expr: &str, job: NewJob) -> Result<CronEntry, QueueError> {
        let schedule = cron::Schedule::from_str(expr).map_err(|e| QueueError::Cron {
            name: name.to_owned(),
            expr: expr.to_owned(),
            message: e.to_string(),
        })?;
        Ok(CronEntry {
            name: name.to_owned(),
            expr: expr.to_owned(),
            schedule,
            job,
        })
    }

    /// The latest tick in `(after, now]`, looking back at most 24 hours.
    pub fn due_tick(&self, after: DateTime<Utc>, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let start = after.max(now - LOOKBACK);
        self.schedule.after(&start).take_while(|t| *t <= now).last()
    }
}

/// Fires every schedule whose tick is due at `now`; returns the (schedule, tick) pairs this call
/// fired. Safe to call from any number of workers at once.
pub async fn cron_fire(
    pool: &PgPool,
    entries: &[CronEntry],
    now: DateTime<Utc>,
) -> Result<Vec<(String, DateTime<Utc>)>, QueueError> {
    let mut fired = Vec::new();
    for entry in entries {
        let mut tx = pool.begin().await?;
        let last =
            store::queue_workers::cron_ensure(&mut tx, &entry.name, &entry.expr, now).await?;
        let Some(tick) = entry.due_tick(last, now) else {
            tx.commit().await?;
            continue;
        };
        if store::queue_workers::cron_advance(&mut tx, &entry.name, tick).await? {
            let mut job = entry
                .job
                .clone()
                .with_unique_key(format!("cron:{}:{}", entry.name, tick.timestamp()))
                .with_run_at(tick);
            if let Some(obj) = job.payload.as_object_mut() {
                obj.insert("cron_tick".to_owned(), serde_json::json!(tick));
            }
            store::jobs::job_enqueue(&mut tx, &job).await?;
            fired.push((entry.name.clone(), tick));
        }
        tx.commit().await?;
    }
    Ok(fired)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn due_tick_is_the_latest_in_the_window() {
        let e =
            CronEntry::new("t", "0 * * * * *", NewJob::new("k", serde_json::json!({}))).unwrap();
        let t0: DateTime<Utc> = "2026-01-01T00:00:30Z".parse().unwrap();
        assert_eq!(e.due_tick(t0, t0), None);
        let now: DateTime<Utc> = "2026-01-01T00:03:10Z".parse().unwrap();
        assert_eq!(
            e.due_tick(t0, now),
            Some("2026-01-01T00:03:00Z".parse().unwrap())
        );
        let long_ago: DateTime<Utc> = "2025-01-01T00:00:00Z".parse().unwrap();
        assert_eq!(
            e.due_tick(long_ago, now),
            Some("2026-01-01T00:03:00Z".parse().unwrap())
        );
    }

    #[test]
    fn bad_expression_names_the_schedule() {
        let err = CronEntry::new(
            "nightly",
            "not cron",
            NewJob::new("k", serde_json::json!({})),
        )
        .unwrap_err();
        assert!(err.to_string().contains("nightly"), "{err}");
    }
}
