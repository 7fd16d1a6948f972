//! Alert processing jobs: `alert.process` (rules, triggers, cooldowns, target server,
//! execution per the runbook's mode; cancellation of approvals when an alert resolves) and
//! `alert.analyze` (records that no LLM provider is available until the AI module handles it).
//!
//! Matching order for a firing alert that has not been processed:
//! 1. `auto_analyze_rules`, enabled, by priority: the first whose name and severity globs match
//!    sets `matched_rule_id` and `action_taken`. `auto_analyze` enqueues `alert.analyze`;
//!    `ignore` stops here (no triggers); `manual` and no match go on.
//! 2. Enabled triggers by priority (then runbook name, trigger name): the first whose patterns,
//!    labels and time window match wins, and only that one; triggers of runbooks that are not
//!    active are skipped with a reason.
//! 3. Manual-mode runbook: suggested on the alert, not run.
//! 4. Target server: the `instance` label's host against server hostname, then name, then the
//!    runbook's `allowed_servers` when it selects exactly one server. Unresolved: recorded, not
//!    run, cooldown not spent.
//! 5. Cooldown: compare-and-set per trigger or per instance. Cooling down: recorded, not run.
//! 6. `engine::create_execution`: the start job applies the gates (blackout, breaker, rate
//!    limit, approval for semi_auto / requires_approval).
//!
//! Everything decided, and why, lands in `alerts.match_outcome`. Processing is idempotent: the
//! alert rows are locked and `processed_at` set in the job's lease-fenced transaction.
//!
//! One job carries the alerts of one notification (at most [`PROCESS_BATCH`]). Its first
//! transaction locks them all and records every alert decided without touching shared rows
//! (steps 1 to 4, and resolutions) in one statement. An alert that reaches step 5 in a batch
//! of several is then processed alone, in its own lease-fenced transaction, so cooldown and
//! trigger rows stay locked only while one alert is decided (a storm of alerts sharing them
//! queues on those rows briefly instead of deadlocking in long batches).
//!
//! What matching reads (rules, triggers with their runbooks, servers, `alerts.timezone`) is
//! cached per worker, compiled, and keyed by `alert_matching_version`, which every change to
//! those rows bumps in its own transaction; the version is read in the statement that locks
//! the alerts, so an alert processed after a change commits is matched against the change.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};
use sqlx::PgConnection;
use uuid::Uuid;

use crate::domain::alert::{self, CompiledRule, RuleFacts};
use crate::domain::runbook::string_map;
use crate::domain::targeting::{AllowedServers, ServerTraits};
use crate::domain::trigger_match::{AlertFacts, CompiledTrigger};
use crate::queue::{GuardedTx, JobContext, JobError, NewJob};
use crate::store::{
    self, StoreError,
    alert_rules::RuleRow,
    alerts::{AlertRow, ProcessingRecord, ServerCandidate, TriggerCandidate},
};

use super::{Engine, EngineError, StartRequest};

/// Job kind: evaluate rules and triggers for the alerts of one notification.
pub const KIND_PROCESS: &str = "alert.process";
/// Job kind: analyse one alert.
pub const KIND_ANALYZE: &str = "alert.analyze";
/// Most alerts in one `alert.process` job.
pub const PROCESS_BATCH: usize = 100;

/// Payload of `alert.process`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ProcessPayload {
    /// Alerts that are new or were just resolved.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub alert_ids: Vec<Uuid>,
    /// One alert (the payload of jobs that carry a single alert by this name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alert_id: Option<Uuid>,
}

/// Payload of `alert.analyze`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AnalyzePayload {
    /// The alert.
    pub alert_id: Uuid,
}

/// The processing jobs intake enqueues with the alerts ([`store::alerts::alert_intake`]): one
/// per [`PROCESS_BATCH`] alerts, payload [`ProcessPayload::alert_ids`].
pub const INTAKE_JOBS: store::alerts::IntakeJobs<'static> = store::alerts::IntakeJobs {
    kind: KIND_PROCESS,
    max_attempts: 10,
    per_job: PROCESS_BATCH as i64,
};

/// The analysis job of an alert (one at a time per alert).
pub fn analyze_job(alert_id: Uuid) -> NewJob {
    let mut job = NewJob::new(KIND_ANALYZE, json!(AnalyzePayload { alert_id }));
    job.unique_key = Some(format!("alert:{alert_id}:analyze"));
    job.max_attempts = 5;
    job
}

/// Marks an alert's analysis as queued and enqueues the job, in the caller's transaction; the
/// caller wakes the workers after the commit.
pub async fn request_analysis(
    conn: &mut PgConnection,
    alert_id: Uuid,
) -> Result<bool, EngineError> {
    if !store::alerts::alert_analysis_request(conn, alert_id).await? {
        return Ok(false);
    }
    store::jobs::job_enqueue(conn, &analyze_job(alert_id)).await?;
    Ok(true)
}

/// A rule as matching uses it.
struct CachedRule {
    row: RuleRow,
    matcher: CompiledRule,
}

/// A trigger as matching uses it.
struct CachedTrigger {
    row: TriggerCandidate,
    matcher: CompiledTrigger,
    allowed: Result<AllowedServers, String>,
}

/// Everything matching reads, compiled, as of one `alert_matching_version`.
pub struct MatchingConfig {
    version: i64,
    tz: chrono_tz::Tz,
    tz_note: Option<String>,
    rules: Vec<CachedRule>,
    triggers: Vec<CachedTrigger>,
    /// Every server, by name.
    servers: Vec<ServerCandidate>,
    /// Indices into `servers` by lowercased hostname, then by lowercased name.
    by_hostname: HashMap<String, Vec<usize>>,
    by_name: HashMap<String, Vec<usize>>,
}

impl MatchingConfig {
    /// Reads the configuration. The version is read first, so what follows is at least as new
    /// as the version it is labelled with.
    async fn load(conn: &mut PgConnection) -> Result<MatchingConfig, StoreError> {
        let version = store::alerts::alert_matching_version(conn).await?;
        let (tz, tz_note) = match store::alerts::alert_timezone_setting(conn).await? {
            None => (chrono_tz::Tz::UTC, None),
            Some(name) => match name.parse::<chrono_tz::Tz>() {
                Ok(tz) => (tz, None),
                Err(_) => (
                    chrono_tz::Tz::UTC,
                    Some(format!(
                        "setting alerts.timezone `{name}` is not an IANA timezone; used UTC"
                    )),
                ),
            },
        };
        let rules = store::alert_rules::rule_list(conn, true)
            .await?
            .into_iter()
            .map(|row| CachedRule {
                matcher: CompiledRule::new(&RuleFacts {
                    alert_name_pattern: &row.alert_name_pattern,
                    severity_pattern: &row.severity_pattern,
                }),
                row,
            })
            .collect();
        let triggers = store::alerts::trigger_candidates(conn)
            .await?
            .into_iter()
            .map(|t| CachedTrigger {
                matcher: CompiledTrigger::new(t.trigger.document()),
                allowed: AllowedServers::parse(&t.allowed_servers),
                row: t,
            })
            .collect();
        let servers = store::alerts::server_candidates_all(conn).await?;
        let mut by_hostname: HashMap<String, Vec<usize>> = HashMap::new();
        let mut by_name: HashMap<String, Vec<usize>> = HashMap::new();
        for (i, s) in servers.iter().enumerate() {
            by_hostname
                .entry(s.hostname.to_lowercase())
                .or_default()
                .push(i);
            by_name.entry(s.name.to_lowercase()).or_default().push(i);
        }
        Ok(MatchingConfig {
            version,
            tz,
            tz_note,
            rules,
            triggers,
            servers,
            by_hostname,
            by_name,
        })
    }

    /// Servers whose hostname equals `host` (case-insensitive); when none, those whose name
    /// does; by name.
    fn servers_for_host(&self, host: &str) -> Vec<&ServerCandidate> {
        let key = host.to_lowercase();
        self.by_hostname
            .get(&key)
            .or_else(|| self.by_name.get(&key))
            .map(|ix| ix.iter().map(|i| &self.servers[*i]).collect())
            .unwrap_or_default()
    }
}

/// A worker's cached [`MatchingConfig`]: reloaded when a processing transaction sees a newer
/// `alert_matching_version` than the one it was loaded under.
#[derive(Default)]
pub struct MatchingCache {
    current: Mutex<Option<Arc<MatchingConfig>>>,
}

impl MatchingCache {
    /// The configuration for a transaction that saw `version`: the cached one when it is at
    /// least that new, else freshly loaded (and cached).
    async fn get(
        &self,
        conn: &mut PgConnection,
        version: i64,
    ) -> Result<Arc<MatchingConfig>, StoreError> {
        if let Some(c) = self.snapshot()
            && c.version >= version
        {
            return Ok(c);
        }
        let loaded = Arc::new(MatchingConfig::load(conn).await?);
        let mut current = self.current.lock().unwrap_or_else(|p| p.into_inner());
        if current.as_ref().is_none_or(|c| c.version < loaded.version) {
            *current = Some(loaded.clone());
        }
        Ok(loaded)
    }

    fn snapshot(&self) -> Option<Arc<MatchingConfig>> {
        self.current
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

/// Handles `alert.process`.
pub async fn handle_process(engine: &Engine, ctx: JobContext) -> Result<(), JobError> {
    let p: ProcessPayload = ctx.payload_as()?;
    let mut ids = p.alert_ids;
    ids.extend(p.alert_id);
    ids.sort_unstable();
    ids.dedup();
    let mut g = ctx.lease().guarded_tx().await?;
    let alone = ids.len() == 1;
    let deferred = process_alerts(engine, &mut g, &ids, alone).await?;
    if deferred.is_empty() {
        return g.complete().await;
    }
    g.commit().await?;
    let last = deferred.len() - 1;
    for (i, id) in deferred.into_iter().enumerate() {
        let mut g = ctx.lease().guarded_tx().await?;
        process_alerts(engine, &mut g, &[id], true).await?;
        if i == last {
            g.complete().await?;
        } else {
            g.commit().await?;
        }
    }
    Ok(())
}

/// Processes the alerts `ids` in the guarded transaction: resolutions, and every firing alert
/// not processed yet. With `claims`, an alert that reaches its cooldown is decided to the end;
/// without, it is left unrecorded and returned, to be processed alone.
async fn process_alerts(
    engine: &Engine,
    g: &mut GuardedTx,
    ids: &[Uuid],
    claims: bool,
) -> Result<Vec<Uuid>, JobError> {
    let locked = store::alerts::alert_lock_many(g.conn(), ids).await?;
    let Some(version) = locked.matching_version else {
        return Ok(Vec::new());
    };
    let cfg = engine.alert_matching.get(g.conn(), version).await?;
    let mut records = Vec::new();
    let mut deferred = Vec::new();

    let resolved: Vec<&AlertRow> = locked
        .alerts
        .iter()
        .filter(|a| a.status == "resolved")
        .collect();
    if !resolved.is_empty() {
        cancel_approvals(g.conn(), &resolved).await?;
        for a in resolved.iter().filter(|a| a.processed_at.is_none()) {
            records.push(ProcessingRecord {
                id: a.id,
                matched_rule_id: None,
                action_taken: None,
                match_outcome: json!({
                    "decision": "not_evaluated",
                    "reason": "the alert was resolved before it was processed",
                }),
                suggested_runbooks: json!([]),
                request_analysis: false,
            });
        }
    }

    let now = Utc::now();
    for a in locked
        .alerts
        .iter()
        .filter(|a| a.status != "resolved" && a.processed_at.is_none())
    {
        let mut d = decide(&cfg, a, now);
        if let Some((t, server)) = d.claim.take() {
            if !claims {
                deferred.push(a.id);
                continue;
            }
            claim_and_start(g, a, t, server, &mut d.outcome).await?;
        }
        records.push(ProcessingRecord {
            id: a.id,
            matched_rule_id: d.rule.map(|r| r.row.id),
            action_taken: d.rule.map(|r| r.row.action.clone()),
            match_outcome: Value::Object(d.outcome),
            suggested_runbooks: Value::Array(d.suggested),
            request_analysis: d.rule.is_some_and(|r| r.row.action == "auto_analyze"),
        });
    }

    let written = store::alerts::alert_record_processing_many(g.conn(), &records).await?;
    let analyze: Vec<NewJob> = records
        .iter()
        .filter(|r| r.request_analysis && written.contains(&r.id))
        .map(|r| analyze_job(r.id))
        .collect();
    if !analyze.is_empty() {
        g.enqueue_many(&analyze).await?;
    }
    Ok(deferred)
}

/// Cancels the executions of resolved alerts that still wait for approval, with the reason.
async fn cancel_approvals(conn: &mut PgConnection, resolved: &[&AlertRow]) -> Result<(), JobError> {
    let ids: Vec<Uuid> = resolved.iter().map(|a| a.id).collect();
    let waiting = store::alerts::alert_executions_awaiting_approval(conn, &ids).await?;
    for (alert_id, execution_id) in waiting {
        let Some(a) = resolved.iter().find(|a| a.id == alert_id) else {
            continue;
        };
        let reason = format!(
            "alert {} ({}) resolved{} while the run waited for approval",
            a.alert_name,
            a.fingerprint,
            a.ends_at
                .map(|t| format!(" at {}", t.format("%Y-%m-%dT%H:%M:%SZ")))
                .unwrap_or_default()
        );
        match super::control::cancel(conn, execution_id, None, &reason).await {
            Ok(()) | Err(EngineError::Conflict(_)) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// What matching decided for one firing alert without touching shared rows.
struct Decision<'c> {
    rule: Option<&'c CachedRule>,
    outcome: Map<String, Value>,
    suggested: Vec<Value>,
    /// A runnable trigger matched and the target server is known: the cooldown decides.
    claim: Option<(&'c CachedTrigger, ChosenServer)>,
}

/// Records the decision on a matched trigger in the outcome.
fn set_decision(
    outcome: &mut Map<String, Value>,
    t: &TriggerCandidate,
    decision: &str,
    reason: Option<String>,
    extra: Value,
) {
    outcome.insert("decision".into(), json!(decision));
    outcome.insert(
        "matched_trigger".into(),
        json!({ "id": t.trigger.id, "name": t.trigger.name, "runbook_id": t.runbook_id,
                "runbook": t.runbook_name, "mode": t.runbook_mode }),
    );
    if let Some(r) = reason {
        outcome.insert("reason".into(), json!(r));
    }
    if let Value::Object(m) = extra {
        outcome.extend(m);
    }
}

/// Steps 1 to 4 for a firing alert: rules, triggers, manual mode, target server.
fn decide<'c>(cfg: &'c MatchingConfig, a: &AlertRow, now: DateTime<Utc>) -> Decision<'c> {
    let mut outcome = Map::new();
    if let Some(note) = &cfg.tz_note {
        outcome.insert("note".into(), json!(note));
    }
    let mut d = Decision {
        rule: None,
        outcome,
        suggested: Vec::new(),
        claim: None,
    };

    // Match on the labels as sent: the indexed columns keep only a prefix of a long value.
    let labels = string_map(&a.labels_json);
    let name = labels.get("alertname").unwrap_or(&a.alert_name);
    let severity = labels.get("severity").or(a.severity.as_ref());

    // 1. auto_analyze_rules, first match wins.
    d.rule = cfg
        .rules
        .iter()
        .find(|r| r.matcher.matches(name, severity.map(String::as_str)));
    d.outcome.insert(
        "rule".into(),
        match d.rule {
            Some(r) => json!({ "id": r.row.id, "name": r.row.name, "action": r.row.action }),
            None => Value::Null,
        },
    );
    if d.rule.is_some_and(|r| r.row.action == "ignore") {
        d.outcome.insert("decision".into(), json!("ignored"));
        d.outcome.insert(
            "reason".into(),
            json!("an auto_analyze rule with action `ignore` matched; triggers not evaluated"),
        );
        return d;
    }

    // 2. Triggers, first match wins.
    let facts = AlertFacts {
        name: name.clone(),
        severity: severity.cloned(),
        source: a.source.clone(),
        labels: labels.clone(),
    };
    let mut evaluated = Vec::new();
    let mut chosen = None;
    for ct in &cfg.triggers {
        let t = &ct.row;
        if t.runbook_status != "active" {
            evaluated.push(json!({
                "trigger_id": t.trigger.id, "trigger": t.trigger.name, "runbook": t.runbook_name,
                "matched": false,
                "reasons": [format!("runbook {} is {}", t.runbook_name, t.runbook_status)],
            }));
            continue;
        }
        let verdict = ct.matcher.matches_in(&facts, now, None, cfg.tz);
        evaluated.push(json!({
            "trigger_id": t.trigger.id, "trigger": t.trigger.name, "runbook": t.runbook_name,
            "matched": verdict.matched, "reasons": verdict.reasons,
        }));
        if verdict.matched {
            chosen = Some(ct);
            break;
        }
    }
    d.outcome.insert("triggers".into(), Value::Array(evaluated));
    let Some(ct) = chosen else {
        d.outcome
            .insert("decision".into(), json!("no_trigger_matched"));
        return d;
    };
    let t = &ct.row;

    // 3. Manual runbooks are suggested, not run.
    if t.runbook_mode == "manual" {
        d.suggested.push(json!({
            "runbook_id": t.runbook_id, "runbook": t.runbook_name,
            "trigger_id": t.trigger.id, "trigger": t.trigger.name,
        }));
        set_decision(
            &mut d.outcome,
            t,
            "suggested",
            Some(format!(
                "runbook {} is in manual mode: suggested, not run",
                t.runbook_name
            )),
            json!({}),
        );
        return d;
    }

    // 4. Target server.
    match resolve_server(cfg, a, &ct.allowed) {
        Ok(server) => d.claim = Some((ct, server)),
        Err(reason) => set_decision(&mut d.outcome, t, "no_server", Some(reason), json!({})),
    }
    d
}

/// Steps 5 and 6: the cooldown, then the execution.
async fn claim_and_start(
    g: &mut GuardedTx,
    a: &AlertRow,
    ct: &CachedTrigger,
    server: ChosenServer,
    outcome: &mut Map<String, Value>,
) -> Result<(), JobError> {
    let t = &ct.row;
    // 5. Cooldown, claimed in a savepoint: a run that cannot be created gives it back.
    let instance = t
        .trigger
        .cooldown_per_instance
        .then(|| alert::instance_key(&string_map(&a.labels_json), &a.fingerprint));
    let mut claim = sqlx::Connection::begin(g.conn()).await?;
    let claimed = match &instance {
        Some(key) => {
            store::alerts::trigger_instance_cooldown_claim(
                &mut claim,
                t.trigger.id,
                key,
                t.trigger.cooldown_seconds,
            )
            .await?
        }
        None => store::alerts::trigger_cooldown_claim(&mut claim, t.trigger.id).await?,
    };
    if !claimed {
        claim.commit().await?;
        let scope = match &instance {
            Some(key) => format!("for instance {key}"),
            None => "for the trigger".to_owned(),
        };
        set_decision(
            outcome,
            t,
            "cooldown",
            Some(format!(
                "trigger {} fired within its cooldown of {} s {scope}",
                t.trigger.name, t.trigger.cooldown_seconds
            )),
            json!({ "server_id": server.0, "server": server.1, "server_chosen_by": server.2 }),
        );
        return Ok(());
    }

    // 6. The execution; its start job applies the gates.
    let request = StartRequest {
        runbook_id: t.runbook_id,
        server_id: Some(server.0),
        variables: serde_json::Map::new(),
        initiated_by: None,
        alert_id: Some(a.id),
        trigger_id: Some(t.trigger.id),
        batch: None,
    };
    // Alert-started runs carry no variables, so nothing needs sealing.
    match super::create_execution(&mut claim, &request, None).await {
        Ok(execution_id) => {
            claim.commit().await?;
            g.wake_after_commit();
            set_decision(
                outcome,
                t,
                "execution_created",
                None,
                json!({ "execution_id": execution_id, "server_id": server.0, "server": server.1,
                        "server_chosen_by": server.2 }),
            )
        }
        Err(EngineError::Store(e)) => return Err(JobError::Store(e)),
        Err(e) => {
            claim.rollback().await?;
            set_decision(
                outcome,
                t,
                "not_run",
                Some(format!("{e} (the cooldown is not spent)")),
                json!({ "server_id": server.0, "server": server.1, "server_chosen_by": server.2 }),
            )
        }
    }
    Ok(())
}

fn allowed(rule: &AllowedServers, s: &ServerCandidate) -> bool {
    let tags = s.tags.clone().unwrap_or(Value::Null);
    rule.allows(&ServerTraits {
        id: s.id,
        tags: &tags,
        environment: s.environment.as_deref(),
    })
}

/// A server an alert's run targets: `(id, name, how it was chosen)`.
type ChosenServer = (Uuid, String, String);

/// The alert's target server, or why there is none.
fn resolve_server(
    cfg: &MatchingConfig,
    a: &AlertRow,
    allowed_servers: &Result<AllowedServers, String>,
) -> Result<ChosenServer, String> {
    let selector = match allowed_servers {
        Ok(s) => s,
        Err(e) => return Err(format!("the runbook's allowed_servers is invalid: {e}")),
    };
    let labels = string_map(&a.labels_json);
    let instance = labels.get("instance").or(a.instance.as_ref());
    let host = instance.map(|i| alert::instance_host(i));
    if let Some(host) = host.filter(|h| !h.is_empty()) {
        match cfg.servers_for_host(host).as_slice() {
            [] => {}
            [one] => {
                if allowed(selector, one) {
                    return Ok((one.id, one.name.clone(), format!("instance `{host}`")));
                }
                return Err(format!(
                    "server {} (from instance `{host}`) is not among the runbook's allowed_servers",
                    one.name
                ));
            }
            many => {
                let permitted: Vec<&&ServerCandidate> =
                    many.iter().filter(|s| allowed(selector, s)).collect();
                if let [one] = permitted.as_slice() {
                    return Ok((
                        one.id,
                        one.name.clone(),
                        format!("instance `{host}`, the one of its servers allowed_servers takes"),
                    ));
                }
                return Err(format!(
                    "{} servers have hostname or name `{host}` and {} of them are allowed; \
                     refusing to guess",
                    many.len(),
                    permitted.len()
                ));
            }
        }
    }
    let from_instance = match host {
        Some(h) if !h.is_empty() => format!("no server has hostname or name `{h}`"),
        _ => "the alert has no `instance` label".to_owned(),
    };
    if selector.allows_all() {
        return Err(format!(
            "{from_instance}, and the runbook's allowed_servers does not select a server"
        ));
    }
    let permitted: Vec<&ServerCandidate> = cfg
        .servers
        .iter()
        .filter(|s| allowed(selector, s))
        .collect();
    match permitted.as_slice() {
        [one] => Ok((
            one.id,
            one.name.clone(),
            format!("{from_instance}: the only server the runbook's allowed_servers selects"),
        )),
        [] => Err(format!(
            "{from_instance}, and no server matches the runbook's allowed_servers"
        )),
        many => Err(format!(
            "{from_instance}, and {} servers match the runbook's allowed_servers; refusing to guess",
            many.len()
        )),
    }
}

/// Handles `alert.analyze`: until an LLM integration handles this kind, records why no analysis
/// was made.
pub async fn handle_analyze(_engine: &Engine, ctx: JobContext) -> Result<(), JobError> {
    let p: AnalyzePayload = ctx.payload_as()?;
    let mut g = ctx.lease().guarded_tx().await?;
    let reason = match store::alerts::llm_provider_name(g.conn()).await? {
        None => "no LLM provider is configured".to_owned(),
        Some(name) => {
            format!("LLM provider {name} is configured, but this build has no analysis integration")
        }
    };
    store::alerts::alert_analysis_not_done(g.conn(), p.alert_id, "unavailable", &reason).await?;
    g.complete().await
}
