//! `alerts` and what alert processing reads and claims: the episode upsert of the webhook, the
//! processing outcome, candidate triggers, server lookup for an alert, and the two cooldown
//! compare-and-sets (`runbook_triggers.last_triggered_at` and `trigger_cooldowns`).
//!
//! Knows nothing about Alertmanager's JSON or HTTP: callers pass validated rows.

use chrono::{DateTime, NaiveTime, Utc};
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
    /// Labels.
    pub labels: Value,
    /// Annotations.
    pub annotations: Value,
    /// Raw alert with envelope.
    pub raw: Value,
    /// Generator URL.
    pub generator_url: String,
    /// Source.
    pub source: Option<String>,
}

/// The envelope shared by every alert of one payload.
#[derive(Debug, Clone)]
pub struct Envelope<'a> {
    /// Receiver.
    pub receiver: &'a str,
    /// Group key.
    pub group_key: &'a str,
    /// Alertmanager URL.
    pub external_url: &'a str,
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
}

/// Inserts or updates one row per episode `(fingerprint, starts_at)`, in the order given
/// (callers sort, so concurrent payloads lock rows in the same order). A resolved episode stays
/// resolved when a late firing notification arrives.
pub async fn alert_upsert_many(
    conn: &mut PgConnection,
    envelope: &Envelope<'_>,
    alerts: &[AlertUpsert],
) -> StoreResult<Vec<UpsertOutcome>> {
    let mut fingerprint = Vec::with_capacity(alerts.len());
    let mut starts_at = Vec::with_capacity(alerts.len());
    let mut ends_at = Vec::with_capacity(alerts.len());
    let mut status = Vec::with_capacity(alerts.len());
    let mut name = Vec::with_capacity(alerts.len());
    let mut severity = Vec::with_capacity(alerts.len());
    let mut instance = Vec::with_capacity(alerts.len());
    let mut job = Vec::with_capacity(alerts.len());
    let mut labels = Vec::with_capacity(alerts.len());
    let mut annotations = Vec::with_capacity(alerts.len());
    let mut raw = Vec::with_capacity(alerts.len());
    let mut generator = Vec::with_capacity(alerts.len());
    let mut source = Vec::with_capacity(alerts.len());
    for a in alerts {
        fingerprint.push(a.fingerprint.as_str());
        starts_at.push(a.starts_at);
        ends_at.push(a.ends_at);
        status.push(a.status);
        name.push(a.alert_name.as_str());
        severity.push(a.severity.as_deref());
        instance.push(a.instance.as_deref());
        job.push(a.job.as_deref());
        labels.push(&a.labels);
        annotations.push(&a.annotations);
        raw.push(&a.raw);
        generator.push(a.generator_url.as_str());
        source.push(a.source.as_deref());
    }
    Ok(sqlx::query_as::<_, UpsertOutcome>(
        "INSERT INTO alerts AS a (fingerprint, starts_at, ends_at, status, alert_name, severity, \
           instance, job, labels_json, annotations_json, raw_alert_json, generator_url, source, \
           receiver, group_key, external_url, resolved_at) \
         SELECT u.fingerprint, u.starts_at, u.ends_at, u.status, u.alert_name, u.severity, \
           u.instance, u.job, u.labels, u.annotations, u.raw, u.generator_url, u.source, \
           $14, $15, $16, CASE WHEN u.status = 'resolved' THEN now() END \
         FROM unnest($1::text[], $2::timestamptz[], $3::timestamptz[], $4::text[], $5::text[], \
           $6::text[], $7::text[], $8::text[], $9::jsonb[], $10::jsonb[], $11::jsonb[], \
           $12::text[], $13::text[]) WITH ORDINALITY AS u(fingerprint, starts_at, ends_at, status, \
           alert_name, severity, instance, job, labels, annotations, raw, generator_url, source, n) \
         ORDER BY u.n \
         ON CONFLICT (fingerprint, starts_at) DO UPDATE SET \
           status = CASE WHEN a.status = 'resolved' THEN 'resolved' ELSE EXCLUDED.status END, \
           ends_at = CASE WHEN a.status = 'resolved' THEN a.ends_at ELSE EXCLUDED.ends_at END, \
           resolved_at = COALESCE(a.resolved_at, EXCLUDED.resolved_at), \
           labels_json = EXCLUDED.labels_json, annotations_json = EXCLUDED.annotations_json, \
           raw_alert_json = EXCLUDED.raw_alert_json, generator_url = EXCLUDED.generator_url, \
           source = EXCLUDED.source, receiver = EXCLUDED.receiver, \
           group_key = EXCLUDED.group_key, external_url = EXCLUDED.external_url, \
           last_received_at = now(), receive_count = a.receive_count + 1 \
         RETURNING id, (xmax = 0) AS inserted, status, \
           (xmax = 0 OR COALESCE(resolved_at = now(), false)) AS needs_processing",
    )
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
    .bind(&source)
    .bind(envelope.receiver)
    .bind(envelope.group_key)
    .bind(envelope.external_url)
    .fetch_all(conn)
    .await?)
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

/// Locks one alert for the rest of the transaction.
pub async fn alert_lock(conn: &mut PgConnection, id: Uuid) -> StoreResult<Option<AlertRow>> {
    Ok(sqlx::query_as::<_, AlertRow>(sqlx::AssertSqlSafe(format!(
        "SELECT {ALERT_COLUMNS} FROM alerts WHERE id = $1 FOR UPDATE"
    )))
    .bind(id)
    .fetch_optional(conn)
    .await?)
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
    const WHERE: &str = "WHERE ($1::text IS NULL OR status = $1) \
           AND ($2::text IS NULL OR severity = $2) AND ($3::text IS NULL OR alert_name = $3) \
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

/// What processing decided for an alert.
#[derive(Debug, Clone)]
pub struct ProcessingResult<'a> {
    /// The rule that matched.
    pub matched_rule_id: Option<Uuid>,
    /// Its action.
    pub action_taken: Option<&'a str>,
    /// The decision and every reason (JSON).
    pub match_outcome: &'a Value,
    /// Runbooks suggested instead of run.
    pub suggested_runbooks: &'a Value,
}

/// Records the processing outcome; false when the alert was already processed.
pub async fn alert_record_processing(
    conn: &mut PgConnection,
    id: Uuid,
    r: &ProcessingResult<'_>,
) -> StoreResult<bool> {
    let done = sqlx::query(
        "UPDATE alerts SET processed_at = now(), matched_rule_id = $2, action_taken = $3, \
           match_outcome = $4, suggested_runbooks = $5 \
         WHERE id = $1 AND processed_at IS NULL",
    )
    .bind(id)
    .bind(r.matched_rule_id)
    .bind(r.action_taken)
    .bind(r.match_outcome)
    .bind(r.suggested_runbooks)
    .execute(conn)
    .await?;
    Ok(done.rows_affected() == 1)
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

/// Executions of an alert waiting for approval, or about to (pending, needing an approval,
/// not approved yet: their start job has not run), so a resolution racing the start job still
/// cancels them.
pub async fn alert_executions_awaiting_approval(
    conn: &mut PgConnection,
    alert_id: Uuid,
) -> StoreResult<Vec<Uuid>> {
    Ok(sqlx::query_scalar(
        "SELECT id FROM runbook_executions \
         WHERE alert_id = $1 AND status = 'pending' AND (awaiting_approval \
           OR (approved_at IS NULL AND (mode::text = 'semi_auto' \
               OR runbook_snapshot->>'requires_approval' = 'true'))) \
         ORDER BY created_at",
    )
    .bind(alert_id)
    .fetch_all(conn)
    .await?)
}

/// A trigger with what matching needs of its runbook.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct TriggerCandidate {
    /// Trigger id.
    pub id: Uuid,
    /// Trigger name.
    pub name: String,
    /// Lower wins.
    pub priority: i32,
    /// Alert name pattern.
    pub alert_name_pattern: String,
    /// Severity pattern.
    pub severity_pattern: Option<String>,
    /// Source pattern.
    pub source_pattern: Option<String>,
    /// Label patterns.
    pub labels_match: Value,
    /// Window start.
    pub time_window_start: Option<NaiveTime>,
    /// Window end.
    pub time_window_end: Option<NaiveTime>,
    /// Cooldown.
    pub cooldown_seconds: i32,
    /// Per instance.
    pub cooldown_per_instance: bool,
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
           t.source_pattern, t.labels_match, t.time_window_start, t.time_window_end, \
           t.cooldown_seconds, t.cooldown_per_instance, r.id AS runbook_id, \
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

/// Servers whose hostname equals `host` (case-insensitive); when none, those whose name does.
pub async fn server_find_by_host(
    conn: &mut PgConnection,
    host: &str,
) -> StoreResult<Vec<ServerCandidate>> {
    let by_host = sqlx::query_as::<_, ServerCandidate>(
        "SELECT id, name, hostname, tags, environment FROM server_credentials \
         WHERE lower(hostname) = lower($1) ORDER BY name",
    )
    .bind(host)
    .fetch_all(&mut *conn)
    .await?;
    if !by_host.is_empty() {
        return Ok(by_host);
    }
    Ok(sqlx::query_as::<_, ServerCandidate>(
        "SELECT id, name, hostname, tags, environment FROM server_credentials \
         WHERE lower(name) = lower($1) ORDER BY name",
    )
    .bind(host)
    .fetch_all(conn)
    .await?)
}

/// Every server (for selection by `allowed_servers`).
pub async fn server_candidates_all(conn: &mut PgConnection) -> StoreResult<Vec<ServerCandidate>> {
    Ok(sqlx::query_as::<_, ServerCandidate>(
        "SELECT id, name, hostname, tags, environment FROM server_credentials ORDER BY name",
    )
    .fetch_all(conn)
    .await?)
}

/// The configured timezone of trigger time windows (`system_config` key `alerts.timezone`, a
/// JSON string), if set.
pub async fn alert_timezone_setting(conn: &mut PgConnection) -> StoreResult<Option<String>> {
    let value: Option<Value> =
        sqlx::query_scalar("SELECT value_json FROM system_config WHERE key = 'alerts.timezone'")
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
