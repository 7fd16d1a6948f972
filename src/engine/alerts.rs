//! Alert processing jobs: `alert.process` (rules, triggers, cooldowns, target server, execution
//! per the runbook's mode; cancellation of approvals when an alert resolves) and `alert.analyze`
//! (records that no LLM provider is available until the AI module handles it).
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
//! alert row is locked and `processed_at` set in the job's lease-fenced transaction.

use std::collections::BTreeMap;

use chrono::Utc;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sqlx::PgConnection;
use uuid::Uuid;

use crate::domain::alert::{self, RuleFacts};
use crate::domain::runbook::{TriggerDocument, format_time_of_day};
use crate::domain::targeting::{AllowedServers, ServerTraits};
use crate::domain::trigger_match::{AlertFacts, trigger_matches_in};
use crate::queue::{JobContext, JobError, NewJob};
use crate::store::{
    self,
    alert_rules::RuleRow,
    alerts::{AlertRow, ServerCandidate, TriggerCandidate},
};

use super::{Engine, EngineError, StartRequest};

/// Job kind: evaluate rules and triggers for one alert.
pub const KIND_PROCESS: &str = "alert.process";
/// Job kind: analyse one alert.
pub const KIND_ANALYZE: &str = "alert.analyze";

/// Payload of `alert.process`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProcessPayload {
    /// An alert that is new or was just resolved.
    pub alert_id: Uuid,
}

/// Payload of `alert.analyze`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AnalyzePayload {
    /// The alert.
    pub alert_id: Uuid,
}

/// The processing job of one alert. One job per alert keeps each transaction short: cooldown
/// and trigger rows are locked only while one alert is decided, so a storm of alerts sharing
/// them queues on those rows briefly instead of deadlocking in long batches.
pub fn process_job(alert_id: Uuid) -> NewJob {
    let mut job = NewJob::new(KIND_PROCESS, json!(ProcessPayload { alert_id }));
    job.max_attempts = 10;
    job
}

/// The analysis job of an alert (one at a time per alert).
pub fn analyze_job(alert_id: Uuid) -> NewJob {
    let mut job = NewJob::new(KIND_ANALYZE, json!(AnalyzePayload { alert_id }));
    job.unique_key = Some(format!("alert:{alert_id}:analyze"));
    job.max_attempts = 5;
    job
}

/// Marks an alert's analysis as queued and enqueues the job, in the caller's transaction.
pub async fn request_analysis(
    conn: &mut PgConnection,
    alert_id: Uuid,
) -> Result<bool, EngineError> {
    if !store::alerts::alert_analysis_request(conn, alert_id).await? {
        return Ok(false);
    }
    store::jobs::job_enqueue(conn, &analyze_job(alert_id)).await?;
    super::control::notify_jobs(conn).await?;
    Ok(true)
}

/// Handles `alert.process`.
pub async fn handle_process(_engine: &Engine, ctx: JobContext) -> Result<(), JobError> {
    let p: ProcessPayload = ctx.payload_as()?;
    let mut g = ctx.lease().guarded_tx().await?;
    let conn = g.conn();
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
    let rules = store::alert_rules::rule_list(conn, true).await?;
    let triggers = store::alerts::trigger_candidates(conn).await?;
    let env = Env {
        rules: &rules,
        triggers: &triggers,
        tz,
        tz_note: tz_note.as_deref(),
    };
    process_one(g.conn(), &env, p.alert_id).await?;
    g.complete().await
}

struct Env<'a> {
    rules: &'a [RuleRow],
    triggers: &'a [TriggerCandidate],
    tz: chrono_tz::Tz,
    tz_note: Option<&'a str>,
}

fn string_map(value: &Value) -> BTreeMap<String, String> {
    value
        .as_object()
        .map(|o| {
            o.iter()
                .map(|(k, v)| {
                    let s = v.as_str().map_or_else(|| v.to_string(), str::to_owned);
                    (k.clone(), s)
                })
                .collect()
        })
        .unwrap_or_default()
}

async fn process_one(conn: &mut PgConnection, env: &Env<'_>, id: Uuid) -> Result<(), JobError> {
    let Some(a) = store::alerts::alert_lock(conn, id).await? else {
        return Ok(());
    };
    if a.status == "resolved" {
        let reason = format!(
            "alert {} ({}) resolved{} while the run waited for approval",
            a.alert_name,
            a.fingerprint,
            a.ends_at
                .map(|t| format!(" at {}", t.format("%Y-%m-%dT%H:%M:%SZ")))
                .unwrap_or_default()
        );
        for execution_id in store::alerts::alert_executions_awaiting_approval(conn, id).await? {
            match super::control::cancel(conn, execution_id, None, &reason).await {
                Ok(()) | Err(EngineError::Conflict(_)) => {}
                Err(e) => return Err(e.into()),
            }
        }
        if a.processed_at.is_none() {
            let outcome = json!({
                "decision": "not_evaluated",
                "reason": "the alert was resolved before it was processed",
            });
            store::alerts::alert_record_processing(
                conn,
                id,
                &store::alerts::ProcessingResult {
                    matched_rule_id: None,
                    action_taken: None,
                    match_outcome: &outcome,
                    suggested_runbooks: &json!([]),
                },
            )
            .await?;
        }
        return Ok(());
    }
    if a.processed_at.is_some() {
        return Ok(());
    }
    let mut outcome = serde_json::Map::new();
    if let Some(note) = env.tz_note {
        outcome.insert("note".into(), json!(note));
    }

    // 1. auto_analyze_rules, first match wins.
    let rule = env.rules.iter().find(|r| {
        alert::rule_matches(
            &RuleFacts {
                alert_name_pattern: &r.alert_name_pattern,
                severity_pattern: &r.severity_pattern,
            },
            &a.alert_name,
            a.severity.as_deref(),
        )
    });
    outcome.insert(
        "rule".into(),
        match rule {
            Some(r) => json!({ "id": r.id, "name": r.name, "action": r.action }),
            None => Value::Null,
        },
    );
    if let Some(r) = rule
        && r.action == "auto_analyze"
    {
        request_analysis(conn, id).await?;
    }
    let mut suggested = Vec::new();
    if rule.is_some_and(|r| r.action == "ignore") {
        outcome.insert("decision".into(), json!("ignored"));
        outcome.insert(
            "reason".into(),
            json!("an auto_analyze rule with action `ignore` matched; triggers not evaluated"),
        );
    } else {
        match_triggers(conn, env, &a, &mut outcome, &mut suggested).await?;
    }
    store::alerts::alert_record_processing(
        conn,
        id,
        &store::alerts::ProcessingResult {
            matched_rule_id: rule.map(|r| r.id),
            action_taken: rule.map(|r| r.action.as_str()),
            match_outcome: &Value::Object(outcome),
            suggested_runbooks: &Value::Array(suggested),
        },
    )
    .await?;
    Ok(())
}

async fn match_triggers(
    conn: &mut PgConnection,
    env: &Env<'_>,
    a: &AlertRow,
    outcome: &mut serde_json::Map<String, Value>,
    suggested: &mut Vec<Value>,
) -> Result<(), JobError> {
    let labels = string_map(&a.labels_json);
    let facts = AlertFacts {
        name: a.alert_name.clone(),
        severity: a.severity.clone(),
        source: a.source.clone(),
        labels: labels.clone(),
    };
    let now = Utc::now();
    let mut evaluated = Vec::new();
    let mut chosen = None;
    for t in env.triggers {
        if t.runbook_status != "active" {
            evaluated.push(json!({
                "trigger_id": t.id, "trigger": t.name, "runbook": t.runbook_name,
                "matched": false,
                "reasons": [format!("runbook {} is {}", t.runbook_name, t.runbook_status)],
            }));
            continue;
        }
        let doc = TriggerDocument {
            name: t.name.clone(),
            priority: t.priority,
            alert_name_pattern: t.alert_name_pattern.clone(),
            severity_pattern: t.severity_pattern.clone(),
            source_pattern: t.source_pattern.clone(),
            labels_match: string_map(&t.labels_match),
            time_window_start: t.time_window_start.map(format_time_of_day),
            time_window_end: t.time_window_end.map(format_time_of_day),
            enabled: true,
            cooldown_seconds: t.cooldown_seconds,
            cooldown_per_instance: t.cooldown_per_instance,
        };
        let verdict = trigger_matches_in(&doc, &facts, now, None, env.tz);
        evaluated.push(json!({
            "trigger_id": t.id, "trigger": t.name, "runbook": t.runbook_name,
            "matched": verdict.matched, "reasons": verdict.reasons,
        }));
        if verdict.matched {
            chosen = Some(t);
            break;
        }
    }
    outcome.insert("triggers".into(), Value::Array(evaluated));
    let Some(t) = chosen else {
        outcome.insert("decision".into(), json!("no_trigger_matched"));
        return Ok(());
    };
    let mut decide = |decision: &str, reason: Option<String>, extra: Value| {
        outcome.insert("decision".into(), json!(decision));
        outcome.insert(
            "matched_trigger".into(),
            json!({ "id": t.id, "name": t.name, "runbook_id": t.runbook_id,
                    "runbook": t.runbook_name, "mode": t.runbook_mode }),
        );
        if let Some(r) = reason {
            outcome.insert("reason".into(), json!(r));
        }
        if let Value::Object(m) = extra {
            outcome.extend(m);
        }
    };

    // 3. Manual runbooks are suggested, not run.
    if t.runbook_mode == "manual" {
        suggested.push(json!({
            "runbook_id": t.runbook_id, "runbook": t.runbook_name,
            "trigger_id": t.id, "trigger": t.name,
        }));
        decide(
            "suggested",
            Some(format!(
                "runbook {} is in manual mode: suggested, not run",
                t.runbook_name
            )),
            json!({}),
        );
        return Ok(());
    }

    // 4. Target server.
    let server = match resolve_server(conn, a, &t.allowed_servers).await? {
        Ok(s) => s,
        Err(reason) => {
            decide("no_server", Some(reason), json!({}));
            return Ok(());
        }
    };

    // 5. Cooldown.
    let claimed = if t.cooldown_per_instance {
        let key = alert::instance_key(&labels, &a.fingerprint);
        store::alerts::trigger_instance_cooldown_claim(conn, t.id, &key, t.cooldown_seconds).await?
    } else {
        store::alerts::trigger_cooldown_claim(conn, t.id).await?
    };
    if !claimed {
        let scope = if t.cooldown_per_instance {
            format!(
                "for instance {}",
                alert::instance_key(&labels, &a.fingerprint)
            )
        } else {
            "for the trigger".to_owned()
        };
        decide(
            "cooldown",
            Some(format!(
                "trigger {} fired within its cooldown of {} s {scope}",
                t.name, t.cooldown_seconds
            )),
            json!({ "server_id": server.0, "server": server.1 }),
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
        trigger_id: Some(t.id),
        batch: None,
    };
    // Alert-started runs carry no variables, so nothing needs sealing.
    match super::create_execution(conn, &request, None).await {
        Ok(execution_id) => decide(
            "execution_created",
            None,
            json!({ "execution_id": execution_id, "server_id": server.0, "server": server.1 }),
        ),
        Err(EngineError::Store(e)) => return Err(JobError::Store(e)),
        Err(e) => decide(
            "not_run",
            Some(e.to_string()),
            json!({ "server_id": server.0, "server": server.1 }),
        ),
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

/// The alert's target server: `(id, name)`, or why there is none.
async fn resolve_server(
    conn: &mut PgConnection,
    a: &AlertRow,
    allowed_servers: &Value,
) -> Result<Result<(Uuid, String), String>, JobError> {
    let selector = match AllowedServers::parse(allowed_servers) {
        Ok(s) => s,
        Err(e) => {
            return Ok(Err(format!(
                "the runbook's allowed_servers is invalid: {e}"
            )));
        }
    };
    let host = a.instance.as_deref().map(alert::instance_host);
    if let Some(host) = host.filter(|h| !h.is_empty()) {
        let found = store::alerts::server_find_by_host(conn, host).await?;
        match found.as_slice() {
            [] => {}
            [one] => {
                if allowed(&selector, one) {
                    return Ok(Ok((one.id, one.name.clone())));
                }
                return Ok(Err(format!(
                    "server {} (from instance `{host}`) is not among the runbook's allowed_servers",
                    one.name
                )));
            }
            many => {
                let permitted: Vec<&ServerCandidate> =
                    many.iter().filter(|s| allowed(&selector, s)).collect();
                if let [one] = permitted.as_slice() {
                    return Ok(Ok((one.id, one.name.clone())));
                }
                return Ok(Err(format!(
                    "{} servers have hostname or name `{host}` and {} of them are allowed; \
                     refusing to guess",
                    many.len(),
                    permitted.len()
                )));
            }
        }
    }
    let from_instance = match host {
        Some(h) if !h.is_empty() => format!("no server has hostname or name `{h}`"),
        _ => "the alert has no `instance` label".to_owned(),
    };
    if selector.allows_all() {
        return Ok(Err(format!(
            "{from_instance}, and the runbook's allowed_servers does not select a server"
        )));
    }
    let all = store::alerts::server_candidates_all(conn).await?;
    let permitted: Vec<&ServerCandidate> = all.iter().filter(|s| allowed(&selector, s)).collect();
    match permitted.as_slice() {
        [one] => Ok(Ok((one.id, one.name.clone()))),
        [] => Ok(Err(format!(
            "{from_instance}, and no server matches the runbook's allowed_servers"
        ))),
        many => Ok(Err(format!(
            "{from_instance}, and {} servers match the runbook's allowed_servers; refusing to guess",
            many.len()
        ))),
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
