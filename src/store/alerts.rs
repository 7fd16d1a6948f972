//! `alerts` and what alert processing reads and claims: the episode upsert of the webhook, the
//! processing outcome, candidate triggers, servers, the matching-configuration version
//! (`alert_matching_version`), and the two cooldown compare-and-sets
//! (`runbook_triggers.last_triggered_at` and `trigger_cooldowns`).
//!
//! Knows nothing about Alertmanager's JSON or HTTP: callers pass validated rows.

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::PgConnection;
use uuid::Uuid;

use super::StoreResult;

/// Columns of [`AlertRow`].
const ALERT_COLUMNS: &str = "id, fingerprint, \"timestamp\", alert_name, severity, instance, job, \
     status, labels_json, annotations_json, raw_alert_json, matched_rule_id, action_taken, \
     analyzed, analyzed_at, ai_analysis, recommendations_json, starts_at, ends_at, generator_url, \
     source, receiver, group_key, external_url, last_received_at, receive_count, resolved_at, \
     processed_at, match_outcome, suggested_runbooks, analysis_status, analysis_error, \
     analysis_requested_at";

/// A row of `alerts`.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct AlertRow {
    /// Id.
    pub id: Uuid,
    /// Alertmanager's fingerprint.
    pub fingerprint: String,
    /// First received.
    pub timestamp: DateTime<Utc>,
    /// `alertname`.
    pub alert_name: String,
    /// `severity` label.
    pub severity: Option<String>,
    /// `instance` label.
    pub instance: Option<String>,
    /// `job` label.
    pub job: Option<String>,
    /// firing or resolved.
    pub status: String,
    /// Labels.
    pub labels_json: Value,
    /// Annotations.
    pub annotations_json: Value,
    /// The alert and its envelope as received last.
    pub raw_alert_json: Value,
    /// The auto_analyze rule that matched.
    pub matched_rule_id: Option<Uuid>,
    /// That rule's action.
    pub action_taken: Option<String>,
    /// Analysed.
    pub analyzed: bool,
    /// When.
    pub analyzed_at: Option<DateTime<Utc>>,
    /// Analysis text.
    pub ai_analysis: Option<String>,
    /// Recommendations.
    pub recommendations_json: Option<Value>,
    /// Start of the episode.
    pub starts_at: DateTime<Utc>,
    /// End, when known.
    pub ends_at: Option<DateTime<Utc>>,
    /// Expression link.
    pub generator_url: Option<String>,
    /// Source.
    pub source: Option<String>,
    /// Alertmanager receiver.
    pub receiver: Option<String>,
    /// Alertmanager group key.
    pub group_key: Option<String>,
    /// Alertmanager URL.
    pub external_url: Option<String>,
    /// Last notification.
    pub last_received_at: DateTime<Utc>,
    /// Notifications received for this episode.
    pub receive_count: i32,
    /// When we learned it resolved.
    pub resolved_at: Option<DateTime<Utc>>,
    /// When rules and triggers were evaluated.
    pub processed_at: Option<DateTime<Utc>>,
    /// What they decided.
    pub match_outcome: Option<Value>,
    /// Runbooks suggested (manual mode).
    pub suggested_runbooks: Value,
    /// queued, completed, unavailable, failed.
    pub analysis_status: Option<String>,
    /// Why analysis is unavailable or failed.
    pub analysis_error: Option<String>,
    /// When analysis was requested.
    pub analysis_requested_at: Option<DateTime<Utc>>,
}

/// One alert of a webhook payload, ready to store.
#[derive(Debug, Clone)]
pub struct AlertUpsert {
    /// Fingerprint.
    pub fingerprint: String,
    /// Episode start.
    pub starts_at: DateTime<Utc>,
    /// End.
    pub ends_at: Option<DateTime<Utc>>,
    /// firing or resolved.
    pub status: &'static str,
    /// Name.
    pub alert_name: String,
    /// Severity.
    pub severity: Option<String>,
    /// Instance.
    pub instance: Option<String>,
    /// Job.
    pub job: Option<String>,
    /// Labels (JSON text of an object).
    pub labels: String,
    /// Annotations (JSON text of an object).
    pub annotations: String,
    /// Raw alert with envelope (JSON text).
    pub raw: String,
    /// Generator URL.
    pub generator_url: String,
    /// Source.
    pub source: Option<String>,
}

/// One accepted-for-validation notification: its token, envelope and alerts.
#[derive(Debug, Clone)]
pub struct IntakeNotification {
    /// Hash of the webhook token it came with.
    pub token_hash: Vec<u8>,
    /// Receiver.
    pub receiver: String,
    /// Group key.
    pub group_key: String,
    /// Alertmanager URL.
    pub external_url: String,
    /// Its alerts: not empty, one per episode `(fingerprint, starts_at)`.
    pub alerts: Vec<AlertUpsert>,
}

/// What the upsert did to one episode.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct UpsertOutcome {
    /// The row.
    pub id: Uuid,
    /// A new episode.
    pub inserted: bool,
    /// Status after the write.
    pub status: String,
    /// Needs processing: a new episode, or resolved by this write.
    pub needs_processing: bool,
    /// Which notification of the batch it came with (from 1).
    pub notification: i32,
}

/// The processing jobs [`alert_intake`] enqueues, as the engine defines them.
#[derive(Debug, Clone, Copy)]
pub struct IntakeJobs<'a> {
    /// Job kind.
    pub kind: &'a str,
    /// Attempts before a job is dead.
    pub max_attempts: i32,
    /// Most alerts per job; a job's payload is `{"alert_ids": [...]}`.
    pub per_job: i64,
}

/// One statement for a batch of notifications (one or more; see `api::intake`): inserts or
/// updates one row per episode `(fingerprint, starts_at)` and enqueues the processing jobs of
/// the new and newly resolved episodes (`jobs` rows of `jobs.kind`, up to `jobs.per_job` alert
/// ids each, in id order). Run outside an explicit transaction it commits as one: every
/// accepted alert and its jobs, or nothing. A resolved episode stays resolved when a late
/// firing notification arrives. An episode keeps the labels it was first stored with (its
/// fingerprint is computed from them), so what its triggers matched is what its runs read.
///
/// No episode may appear twice in one batch (one row cannot be upserted twice by one
/// statement). Rows are written in `(fingerprint, starts_at)` order, so concurrent batches lock
/// them in the same order.
///
/// This is the one statement outside `store::jobs` that writes `jobs`: enqueueing in the
/// upsert saves the webhook a transaction's worth of round trips per notification.
///
/// The same statement authenticates: a notification's alerts are written only when its
/// `token_hash` is the hash of a live webhook token (whose use it records at most once a
/// minute, as [`super::webhook_tokens::webhook_token_authenticate`] does). The answer has one
/// entry per notification, in order: `None` when its token was not accepted, else one outcome
/// per alert.
pub async fn alert_intake(
    conn: &mut PgConnection,
    notifications: &[IntakeNotification],
    jobs: &IntakeJobs<'_>,
) -> StoreResult<Vec<Option<Vec<UpsertOutcome>>>> {
    let mut rows: Vec<(i32, &AlertUpsert)> = notifications
        .iter()
        .zip(1i32..)
        .flat_map(|(n, i)| n.alerts.iter().map(move |a| (i, a)))
        .collect();
    rows.sort_by(|(_, a), (_, b)| {
        (&a.fingerprint, a.starts_at).cmp(&(&b.fingerprint, b.starts_at))
    });
    let mut notification = Vec::with_capacity(rows.len());
    let mut fingerprint = Vec::with_capacity(rows.len());
    let mut starts_at = Vec::with_capacity(rows.len());
    let mut ends_at = Vec::with_capacity(rows.len());
    let mut status = Vec::with_capacity(rows.len());
    let mut name = Vec::with_capacity(rows.len());
    let mut severity = Vec::with_capacity(rows.len());
    let mut instance = Vec::with_capacity(rows.len());
    let mut job = Vec::with_capacity(rows.len());
    let mut labels = Vec::with_capacity(rows.len());
    let mut annotations = Vec::with_capacity(rows.len());
    let mut raw = Vec::with_capacity(rows.len());
    let mut generator = Vec::with_capacity(rows.len());
    let mut source = Vec::with_capacity(rows.len());
    for (i, a) in &rows {
        notification.push(*i);
        fingerprint.push(a.fingerprint.as_str());
        starts_at.push(a.starts_at);
        ends_at.push(a.ends_at);
        status.push(a.status);
        name.push(a.alert_name.as_str());
        severity.push(a.severity.as_deref());
        instance.push(a.instance.as_deref());
        job.push(a.job.as_deref());
        labels.push(a.labels.as_str());
        annotations.push(a.annotations.as_str());
        raw.push(a.raw.as_str());
        generator.push(a.generator_url.as_str());
        source.push(a.source.as_deref());
    }
    let token_hash: Vec<&[u8]> = notifications
        .iter()
        .map(|n| n.token_hash.as_slice())
        .collect();
    let receiver: Vec<&str> = notifications.iter().map(|n| n.receiver.as_str()).collect();
    let group_key: Vec<&str> = notifications.iter().map(|n| n.group_key.as_str()).collect();
    let external_url: Vec<&str> = notifications
        .iter()
        .map(|n| n.external_url.as_str())
        .collect();
    let outcomes = sqlx::query_as::<_, UpsertOutcome>(
        "WITH n AS (SELECT * FROM unnest($14::bytea[], $15::text[], $16::text[], $17::text[]) \
                      WITH ORDINALITY AS n(token_hash, receiver, group_key, external_url, i)), \
         tok AS (SELECT n.i, w.id, w.last_used_at IS NULL \
                        OR w.last_used_at < now() - interval '1 minute' AS stale \
                      FROM n JOIN webhook_tokens w \
                        ON w.token_hash = n.token_hash AND w.revoked_at IS NULL), \
         used AS (UPDATE webhook_tokens SET last_used_at = now() WHERE id IN \
                    (SELECT w.id FROM webhook_tokens w WHERE w.id IN \
                       (SELECT id FROM tok WHERE stale) \
                     ORDER BY w.id FOR UPDATE SKIP LOCKED)), \
         up AS (INSERT INTO alerts AS a (fingerprint, starts_at, ends_at, status, alert_name, severity, \
           instance, job, labels_json, annotations_json, raw_alert_json, generator_url, source, \
           receiver, group_key, external_url, resolved_at) \
         SELECT u.fingerprint, u.starts_at, u.ends_at, u.status, u.alert_name, u.severity, \
           u.instance, u.job, u.labels::jsonb, u.annotations::jsonb, u.raw::jsonb, \
           u.generator_url, u.source, \
           n.receiver, n.group_key, n.external_url, \
           CASE WHEN u.status = 'resolved' THEN now() END \
         FROM unnest($1::int4[], $2::text[], $3::timestamptz[], $4::timestamptz[], $5::text[], \
           $6::text[], $7::text[], $8::text[], $9::text[], $10::text[], $11::text[], \
           $12::text[], $13::text[], $18::text[]) WITH ORDINALITY AS u(notification, fingerprint, \
           starts_at, ends_at, status, alert_name, severity, instance, job, labels, annotations, \
           raw, generator_url, source, k) \
         JOIN n ON n.i = u.notification \
         WHERE EXISTS (SELECT 1 FROM tok WHERE tok.i = u.notification) \
         ORDER BY u.k \
         ON CONFLICT (fingerprint, starts_at) DO UPDATE SET \
           status = CASE WHEN a.status = 'resolved' THEN 'resolved' ELSE EXCLUDED.status END, \
           ends_at = CASE WHEN a.status = 'resolved' THEN a.ends_at ELSE EXCLUDED.ends_at END, \
           resolved_at = COALESCE(a.resolved_at, EXCLUDED.resolved_at), \
           annotations_json = EXCLUDED.annotations_json, \
           raw_alert_json = EXCLUDED.raw_alert_json, generator_url = EXCLUDED.generator_url, \
           source = EXCLUDED.source, receiver = EXCLUDED.receiver, \
           group_key = EXCLUDED.group_key, external_url = EXCLUDED.external_url, \
           last_received_at = now(), receive_count = a.receive_count + 1 \
         RETURNING id, (xmax = 0) AS inserted, status, \
           (xmax = 0 OR COALESCE(resolved_at = now(), false)) AS needs_processing, \
           fingerprint, starts_at), \
         queued AS (SELECT id, (row_number() OVER (ORDER BY id) - 1) / $21 AS chunk \
           FROM up WHERE needs_processing), \
         enqueued AS (INSERT INTO jobs (kind, payload, max_attempts) \
           SELECT $19, jsonb_build_object('alert_ids', jsonb_agg(id ORDER BY id)), $20 \
           FROM queued GROUP BY chunk RETURNING id) \
         SELECT up.id, up.inserted, up.status, up.needs_processing, u.notification \
         FROM up JOIN unnest($1::int4[], $2::text[], $3::timestamptz[]) \
           AS u(notification, fingerprint, starts_at) \
           ON u.fingerprint = up.fingerprint AND u.starts_at = up.starts_at",
    )
    .bind(&notification)
    .bind(&fingerprint)
    .bind(&starts_at)
    .bind(&ends_at)
    .bind(&status)
    .bind(&name)
    .bind(&severity)
    .bind(&instance)
    .bind(&job)
    .bind(&labels)
    .bind(&annotations)
    .bind(&raw)
    .bind(&generator)
    .bind(&token_hash)
    .bind(&receiver)
    .bind(&group_key)
    .bind(&external_url)
    .bind(&source)
    .bind(jobs.kind)
    .bind(jobs.max_attempts)
    .bind(jobs.per_job.max(1))
    .fetch_all(conn)
    .await?;
    let mut answer: Vec<Option<Vec<UpsertOutcome>>> = vec![None; notifications.len()];
    for o in outcomes {
        if let Some(slot) = usize::try_from(o.notification - 1)
            .ok()
            .and_then(|i| answer.get_mut(i))
        {
            slot.get_or_insert_with(Vec::new).push(o);
        }
    }
    Ok(answer)
}

/// Fetches one alert.
pub async fn alert_get(conn: &mut PgConnection, id: Uuid) -> StoreResult<Option<AlertRow>> {
    Ok(sqlx::query_as::<_, AlertRow>(sqlx::AssertSqlSafe(format!(
        "SELECT {ALERT_COLUMNS} FROM alerts WHERE id = $1"
    )))
    .bind(id)
    .fetch_optional(conn)
    .await?)
}

/// Alerts locked for processing, with the matching-configuration version read in the same
/// statement.
#[derive(Debug, Clone, Default)]
pub struct LockedAlerts {
    /// `alert_matching_version.version` as this statement saw it; `None` when no alert was
    /// found.
    pub matching_version: Option<i64>,
    /// The alerts found, in locking order.
    pub alerts: Vec<AlertRow>,
}

#[derive(sqlx::FromRow)]
struct LockedAlertRow {
    matching_version: i64,
    #[sqlx(flatten)]
    alert: AlertRow,
}

/// Locks alerts for the rest of the transaction and reads the matching-configuration version in
/// the same statement. Rows are locked in episode-key order, byte-wise: the order in which
/// [`alert_intake`] locks them (its callers sort by fingerprint and start), so processing and a
/// repeated notification of the same alerts cannot deadlock.
pub async fn alert_lock_many(conn: &mut PgConnection, ids: &[Uuid]) -> StoreResult<LockedAlerts> {
    let rows = sqlx::query_as::<_, LockedAlertRow>(sqlx::AssertSqlSafe(format!(
        "SELECT (SELECT version FROM alert_matching_version) AS matching_version, \
           {ALERT_COLUMNS} FROM alerts WHERE id = ANY($1) \
         ORDER BY fingerprint COLLATE \"C\", starts_at FOR UPDATE"
    )))
    .bind(ids)
    .fetch_all(conn)
    .await?;
    Ok(LockedAlerts {
        matching_version: rows.first().map(|r| r.matching_version),
        alerts: rows.into_iter().map(|r| r.alert).collect(),
    })
}

/// The version of what alert matching reads (`alert_matching_version`): every committed change
/// to auto_analyze rules, triggers, the matching fields of runbooks and servers, or
/// `system_config` has bumped it.
pub async fn alert_matching_version(conn: &mut PgConnection) -> StoreResult<i64> {
    Ok(
        sqlx::query_scalar("SELECT version FROM alert_matching_version")
            .fetch_one(conn)
            .await?,
    )
}

/// Filters for listing alerts (all optional; combined with AND).
#[derive(Debug, Clone, Default)]
pub struct AlertFilter {
    /// firing or resolved.
    pub status: Option<String>,
    /// Exact severity.
    pub severity: Option<String>,
    /// Exact alert name.
    pub name: Option<String>,
    /// Labels that must all be present with these values (JSON object).
    pub labels: Option<Value>,
    /// Episode started at or after.
    pub since: Option<DateTime<Utc>>,
    /// Episode started before.
    pub until: Option<DateTime<Utc>>,
}

/// Lists alerts, newest episode first, with the total.
pub async fn alert_list(
    conn: &mut PgConnection,
    f: &AlertFilter,
    limit: i64,
    offset: i64,
) -> StoreResult<(Vec<AlertRow>, i64)> {
    // The name and severity columns keep a prefix of a long value (255 and 50 characters):
    // the prefix finds the rows through their index, the label holds the whole value.
    const WHERE: &str = "WHERE ($1::text IS NULL OR status = $1) \
           AND ($2::text IS NULL OR (severity = left($2, 50) \
                AND labels_json->>'severity' = $2)) \
           AND ($3::text IS NULL OR (alert_name = left($3, 255) \
                AND labels_json->>'alertname' = $3)) \
           AND ($4::jsonb IS NULL OR labels_json @> $4) \
           AND ($5::timestamptz IS NULL OR starts_at >= $5) \
           AND ($6::timestamptz IS NULL OR starts_at < $6)";
    let rows = sqlx::query_as::<_, AlertRow>(sqlx::AssertSqlSafe(format!(
        "SELECT {ALERT_COLUMNS} FROM alerts {WHERE} \
         ORDER BY starts_at DESC, id LIMIT $7 OFFSET $8"
    )))
    .bind(&f.status)
    .bind(&f.severity)
    .bind(&f.name)
    .bind(&f.labels)
    .bind(f.since)
    .bind(f.until)
    .bind(limit)
    .bind(offset)
    .fetch_all(&mut *conn)
    .await?;
    let total: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT count(*) FROM alerts {WHERE}"
    )))
    .bind(&f.status)
    .bind(&f.severity)
    .bind(&f.name)
    .bind(&f.labels)
    .bind(f.since)
    .bind(f.until)
    .fetch_one(conn)
    .await?;
    Ok((rows, total))
}

/// What processing decided for one alert.
#[derive(Debug, Clone)]
pub struct ProcessingRecord {
    /// The alert.
    pub id: Uuid,
    /// The rule that matched.
    pub matched_rule_id: Option<Uuid>,
    /// Its action.
    pub action_taken: Option<String>,
    /// The decision and every reason (JSON).
    pub match_outcome: Value,
    /// Runbooks suggested instead of run.
    pub suggested_runbooks: Value,
    /// Mark an analysis as requested too (status queued).
    pub request_analysis: bool,
}

/// Records processing outcomes in one statement, for the alerts not processed yet; returns the
/// ids written (the others were already processed).
pub async fn alert_record_processing_many(
    conn: &mut PgConnection,
    records: &[ProcessingRecord],
) -> StoreResult<Vec<Uuid>> {
    if records.is_empty() {
        return Ok(Vec::new());
    }
    let mut ids = Vec::with_capacity(records.len());
    let mut rules = Vec::with_capacity(records.len());
    let mut actions = Vec::with_capacity(records.len());
    let mut outcomes = Vec::with_capacity(records.len());
    let mut suggested = Vec::with_capacity(records.len());
    let mut analyze = Vec::with_capacity(records.len());
    for r in records {
        ids.push(r.id);
        rules.push(r.matched_rule_id);
        actions.push(r.action_taken.as_deref());
        outcomes.push(&r.match_outcome);
        suggested.push(&r.suggested_runbooks);
        analyze.push(r.request_analysis);
    }
    Ok(sqlx::query_scalar(
        "UPDATE alerts AS a SET processed_at = now(), matched_rule_id = u.rule_id, \
           action_taken = u.action, match_outcome = u.outcome, suggested_runbooks = u.suggested, \
           analysis_status = CASE WHEN u.wants_analysis THEN 'queued' ELSE a.analysis_status END, \
           analysis_error = CASE WHEN u.wants_analysis THEN NULL ELSE a.analysis_error END, \
           analysis_requested_at = CASE WHEN u.wants_analysis THEN now() \
             ELSE a.analysis_requested_at END \
         FROM unnest($1::uuid[], $2::uuid[], $3::text[], $4::jsonb[], $5::jsonb[], \
           $6::bool[]) AS u(id, rule_id, action, outcome, suggested, wants_analysis) \
         WHERE a.id = u.id AND a.processed_at IS NULL \
         RETURNING a.id",
    )
    .bind(&ids)
    .bind(&rules)
    .bind(&actions)
    .bind(&outcomes)
    .bind(&suggested)
    .bind(&analyze)
    .fetch_all(conn)
    .await?)
}

/// Marks an analysis as requested (status queued).
pub async fn alert_analysis_request(conn: &mut PgConnection, id: Uuid) -> StoreResult<bool> {
    let done = sqlx::query(
        "UPDATE alerts SET analysis_status = 'queued', analysis_error = NULL, \
           analysis_requested_at = now() WHERE id = $1",
    )
    .bind(id)
    .execute(conn)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// Records that analysis could not run (status unavailable or failed, with the reason).
pub async fn alert_analysis_not_done(
    conn: &mut PgConnection,
    id: Uuid,
    status: &str,
    reason: &str,
) -> StoreResult<bool> {
    let done = sqlx::query(
        "UPDATE alerts SET analysis_status = $2, analysis_error = $3 \
         WHERE id = $1 AND analysis_status = 'queued'",
    )
    .bind(id)
    .bind(status)
    .bind(reason)
    .execute(conn)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// The executions that wait for approval, or are about to (pending, needing an approval, not
/// approved yet: their start job has not run), among those `$1` selects by `column`.
macro_rules! awaiting_approval_sql {
    ($select:literal, $column:literal) => {
        concat!(
            "SELECT ",
            $select,
            " FROM runbook_executions WHERE ",
            $column,
            " AND status = 'pending' AND (awaiting_approval \
               OR (approved_at IS NULL AND (mode::text = 'semi_auto' \
                   OR runbook_snapshot->>'requires_approval' = 'true'))) \
             ORDER BY created_at, id"
        )
    };
}

/// Executions of these alerts waiting for approval, or about to, so a resolution racing the
/// start job still cancels them: `(alert id, execution id)` in creation order.
pub async fn alert_executions_awaiting_approval(
    conn: &mut PgConnection,
    alert_ids: &[Uuid],
) -> StoreResult<Vec<(Uuid, Uuid)>> {
    Ok(
        sqlx::query_as(awaiting_approval_sql!("alert_id, id", "alert_id = ANY($1)"))
            .bind(alert_ids)
            .fetch_all(conn)
            .await?,
    )
}

/// Executions of a runbook that wait for approval, or are about to, in creation order.
pub async fn runbook_executions_awaiting_approval(
    conn: &mut PgConnection,
    runbook_id: Uuid,
) -> StoreResult<Vec<Uuid>> {
    Ok(
        sqlx::query_scalar(awaiting_approval_sql!("id", "runbook_id = $1"))
            .bind(runbook_id)
            .fetch_all(conn)
            .await?,
    )
}

/// A trigger with what matching needs of its runbook.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct TriggerCandidate {
    /// The trigger.
    #[sqlx(flatten)]
    pub trigger: super::runbooks::TriggerRow,
    /// The runbook.
    pub runbook_id: Uuid,
    /// Its name.
    pub runbook_name: String,
    /// Its status.
    pub runbook_status: String,
    /// Its mode.
    pub runbook_mode: String,
    /// Its allowed_servers.
    pub allowed_servers: Value,
}

/// Every enabled trigger in matching order: priority, then runbook name, then trigger name.
pub async fn trigger_candidates(conn: &mut PgConnection) -> StoreResult<Vec<TriggerCandidate>> {
    Ok(sqlx::query_as::<_, TriggerCandidate>(
        "SELECT t.id, t.name, t.priority, t.alert_name_pattern, t.severity_pattern, \
           t.source_pattern, t.labels_match, t.time_window_start, t.time_window_end, t.enabled, \
           t.cooldown_seconds, t.cooldown_per_instance, t.last_triggered_at, r.id AS runbook_id, \
           r.name AS runbook_name, r.status::text AS runbook_status, r.mode::text AS runbook_mode, \
           r.allowed_servers \
         FROM runbook_triggers t JOIN runbooks r ON r.id = t.runbook_id \
         WHERE t.enabled ORDER BY t.priority, r.name, t.name",
    )
    .fetch_all(conn)
    .await?)
}

/// Claims the trigger's cooldown: sets `last_triggered_at` only when the cooldown has passed,
/// in one statement (zero rows: cooling down). Uses the statement's clock, not the
/// transaction's, so a transaction that waited for the row lock compares against the time it
/// actually got it.
pub async fn trigger_cooldown_claim(
    conn: &mut PgConnection,
    trigger_id: Uuid,
) -> StoreResult<bool> {
    let row: Option<Uuid> = sqlx::query_scalar(
        "UPDATE runbook_triggers SET last_triggered_at = clock_timestamp() \
         WHERE id = $1 AND (last_triggered_at IS NULL \
           OR last_triggered_at <= clock_timestamp() - make_interval(secs => cooldown_seconds)) \
         RETURNING id",
    )
    .bind(trigger_id)
    .fetch_optional(conn)
    .await?;
    Ok(row.is_some())
}

/// Claims a per-instance cooldown the same way in `trigger_cooldowns`, and records the firing
/// in `runbook_triggers.last_triggered_at` too.
pub async fn trigger_instance_cooldown_claim(
    conn: &mut PgConnection,
    trigger_id: Uuid,
    instance_key: &str,
    cooldown_seconds: i32,
) -> StoreResult<bool> {
    let row: Option<Uuid> = sqlx::query_scalar(
        "INSERT INTO trigger_cooldowns AS c (trigger_id, instance_key, last_triggered_at) \
         VALUES ($1, $2, clock_timestamp()) \
         ON CONFLICT (trigger_id, instance_key) DO UPDATE SET last_triggered_at = clock_timestamp() \
         WHERE c.last_triggered_at <= clock_timestamp() - make_interval(secs => $3) \
         RETURNING trigger_id",
    )
    .bind(trigger_id)
    .bind(instance_key)
    .bind(f64::from(cooldown_seconds))
    .fetch_optional(&mut *conn)
    .await?;
    if row.is_some() {
        sqlx::query(
            "UPDATE runbook_triggers SET last_triggered_at = clock_timestamp() WHERE id = $1",
        )
        .bind(trigger_id)
        .execute(conn)
        .await?;
    }
    Ok(row.is_some())
}

/// Gives back the cooldown claimed for execution `execution_id` of trigger `trigger_id` when
/// a start gate refused it: the trigger's `last_triggered_at` (and, for a per-instance cooldown,
/// its instance's) becomes the creation time of the latest other execution of the trigger that
/// a gate did not refuse (`gate_refusals`), or none. The instance key is computed as
/// `domain::alert::instance_key` computes it.
pub async fn trigger_cooldown_release(
    conn: &mut PgConnection,
    trigger_id: Uuid,
    execution_id: Uuid,
    gate_refusals: &[&str],
) -> StoreResult<()> {
    sqlx::query(
        "WITH fired AS ( \
             SELECT e.created_at, \
                    COALESCE(CASE WHEN char_length(a.labels_json->>'instance') > 255 \
                                  THEN 'sha256:' || encode(sha256(convert_to( \
                                       a.labels_json->>'instance', 'UTF8')), 'hex') \
                                  ELSE NULLIF(a.labels_json->>'instance', '') END, \
                             'fingerprint:' || a.fingerprint) AS instance_key \
             FROM runbook_executions e LEFT JOIN alerts a ON a.id = e.alert_id \
             WHERE e.trigger_id = $1 AND e.id <> $2 \
               AND (e.refused_by IS NULL OR e.refused_by <> ALL($3))), \
         this AS ( \
             SELECT COALESCE(CASE WHEN char_length(a.labels_json->>'instance') > 255 \
                                  THEN 'sha256:' || encode(sha256(convert_to( \
                                       a.labels_json->>'instance', 'UTF8')), 'hex') \
                                  ELSE NULLIF(a.labels_json->>'instance', '') END, \
                             'fingerprint:' || a.fingerprint) AS instance_key \
             FROM runbook_executions e JOIN alerts a ON a.id = e.alert_id WHERE e.id = $2), \
         trigger_level AS ( \
             UPDATE runbook_triggers SET last_triggered_at = (SELECT max(created_at) FROM fired) \
             WHERE id = $1), \
         instance_level AS ( \
             UPDATE trigger_cooldowns c SET last_triggered_at = \
               (SELECT max(f.created_at) FROM fired f WHERE f.instance_key = c.instance_key) \
             WHERE c.trigger_id = $1 AND c.instance_key = (SELECT instance_key FROM this) \
               AND EXISTS (SELECT 1 FROM fired f WHERE f.instance_key = c.instance_key)) \
         DELETE FROM trigger_cooldowns c \
         WHERE c.trigger_id = $1 AND c.instance_key = (SELECT instance_key FROM this) \
           AND NOT EXISTS (SELECT 1 FROM fired f WHERE f.instance_key = c.instance_key)",
    )
    .bind(trigger_id)
    .bind(execution_id)
    .bind(gate_refusals)
    .execute(conn)
    .await?;
    Ok(())
}

/// A server as target resolution sees it.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ServerCandidate {
    /// Id.
    pub id: Uuid,
    /// Name.
    pub name: String,
    /// Host name.
    pub hostname: String,
    /// Tags.
    pub tags: Option<Value>,
    /// Environment.
    pub environment: Option<String>,
}

/// Every server, by name (what target resolution chooses from).
pub async fn server_candidates_all(conn: &mut PgConnection) -> StoreResult<Vec<ServerCandidate>> {
    Ok(sqlx::query_as::<_, ServerCandidate>(
        "SELECT id, name, hostname, tags, environment FROM server_credentials ORDER BY name",
    )
    .fetch_all(conn)
    .await?)
}

/// The `system_config` key of the timezone trigger time windows are read in (a JSON string, an
/// IANA timezone name).
pub const ALERT_TIMEZONE_KEY: &str = "alerts.timezone";

/// The configured timezone of trigger time windows ([`ALERT_TIMEZONE_KEY`]), if set.
pub async fn alert_timezone_setting(conn: &mut PgConnection) -> StoreResult<Option<String>> {
    let value: Option<Value> =
        sqlx::query_scalar("SELECT value_json FROM system_config WHERE key = $1")
            .bind(ALERT_TIMEZONE_KEY)
            .fetch_optional(conn)
            .await?;
    Ok(value.and_then(|v| v.as_str().map(str::to_owned)))
}

/// Whether any LLM provider is configured.
pub async fn llm_provider_name(conn: &mut PgConnection) -> StoreResult<Option<String>> {
    Ok(sqlx::query_scalar(
        "SELECT name FROM llm_providers ORDER BY is_default DESC, created_at LIMIT 1",
    )
    .fetch_optional(conn)
    .await?)
}
