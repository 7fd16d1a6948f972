//! `execution.start`: the gates, in order, each refusal recorded with its reason:
//! 1. the runbook is active;
//! 2. no blackout window covers the runbook on the server now;
//! 3. the circuit breaker admits the run (open refuses; half-open admits limited probes);
//! 4. the rate limit (`rate_limit_count` per `rate_limit_window_seconds`, counted over every
//!    worker under a per-runbook advisory lock);
//! 5. approval: semi_auto mode or requires_approval keeps the execution pending until a permitted
//!    user approves (the approval enqueues this job again, and gates 1-4 are evaluated again).
//!
//! A fan-out batch additionally waits (the job snoozes) while its concurrency is used up.
//!
//! The common start, where every gate passes on reads without locks and none needs a lock to
//! decide, is one read of everything the gates look at and one statement that also completes
//! this job and hands the first step over (`start_at_once`); every other start, and every
//! refusal, is decided and recorded in one transaction under the execution's row lock.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use serde_json::json;

use crate::domain::circuit::Admission;
use crate::domain::execution::{Event, transition};
use crate::queue::{JobContext, JobError};
use crate::store;
use crate::store::executions::ExecutionRow;

use super::control::{
    approval_expiry_job, deadline_job, log, log_entry, refuse, snapshot_of, state_of,
};
use super::runner::StepHandoff;
use super::snapshot::{RunbookSnapshot, runbook_gate_facts};
use super::{Engine, ExecutionPayload};

/// Handles `execution.start`.
pub async fn handle(engine: &Engine, ctx: JobContext) -> Result<(), JobError> {
    let p: ExecutionPayload = ctx.payload_as()?;
    if start_at_once(&ctx, p.execution_id).await? {
        return Ok(());
    }
    let mut g = ctx.lease().guarded_tx().await?;
    let Some(row) = store::executions::execution_lock(g.conn(), p.execution_id).await? else {
        return g.complete().await;
    };
    if row.status != "pending" && row.status != "approved" {
        return g.complete().await;
    }
    let snapshot = snapshot_of(&row)?;
    let now = Utc::now();

    // 1. Runbook active (its current status, not the snapshot's).
    let current = runbook_gate_facts(g.conn(), snapshot.id).await?;
    let category = match current {
        Some((status, category)) if status == "active" => category,
        other => {
            let reason = match other {
                Some((s, _)) => format!("runbook {} is {s}", snapshot.name),
                None => format!("runbook {} was deleted", snapshot.name),
            };
            refuse(g.conn(), &row, "runbook_inactive", &reason).await?;
            return g.complete().await;
        }
    };

    // 2. Blackout windows, for the runbook's current category (as the blackout check reads it).
    let runbook_facts = crate::domain::blackout::RunbookFacts {
        id: snapshot.id,
        category,
    };
    let server_facts = match row.server_id {
        Some(id) => store::blackouts::blackout_server_facts(g.conn(), id).await?,
        None => None,
    };
    if !snapshot
        .allows_server(server_facts.as_ref())
        .unwrap_or(false)
    {
        refuse(
            g.conn(),
            &row,
            "target",
            "the server is not among the runbook's allowed_servers",
        )
        .await?;
        return g.complete().await;
    }
    let active = store::blackouts::blackout_active_for(
        g.conn(),
        Some(&runbook_facts),
        server_facts.as_ref(),
        now,
    )
    .await?;
    if let Some((window, occurrence)) = active.first() {
        refuse(g.conn(), &row, "blackout", &window.describe(occurrence)).await?;
        return g.complete().await;
    }

    // 3. Circuit breaker. A closed breaker admits without a row lock (a concurrent opening is
    //    ordered after this admission); otherwise it is locked for the rest of this transaction.
    let mut probe = false;
    let closed = matches!(
        store::breakers::breaker_peek(g.conn(), snapshot.id).await?,
        Some((state, _)) if state == "closed"
    );
    if !closed && let Some(b) = store::breakers::breaker_lock(g.conn(), snapshot.id).await? {
        let mut breaker = b.breaker();
        let probes =
            store::executions::execution_count_probes_running(g.conn(), snapshot.id).await?;
        let admission = breaker.admit(b.read_at, probes);
        if breaker != b.breaker() {
            store::breakers::breaker_save(g.conn(), snapshot.id, &breaker).await?;
        }
        match admission {
            Admission::Allowed => {}
            Admission::Probe => probe = true,
            Admission::Refused(reason) => {
                refuse(g.conn(), &row, "circuit_breaker", &reason).await?;
                return g.complete().await;
            }
        }
    }

    // 4. Rate limit, counted under a per-runbook advisory lock so concurrent workers cannot all
    //    squeeze under it.
    if let (Some(count), Some(window)) = (
        snapshot.rate_limit_count,
        snapshot.rate_limit_window_seconds,
    ) {
        sqlx::query(
            "SELECT pg_advisory_xact_lock(hashtextextended('aiops.rate_limit:' || $1::text, 0))",
        )
        .bind(snapshot.id)
        .execute(g.conn())
        .await?;
        let since = now - chrono::Duration::seconds(i64::from(window));
        let started =
            store::executions::execution_count_started_since(g.conn(), snapshot.id, since).await?;
        if started >= i64::from(count) {
            let reason = format!(
                "rate limit reached: {started} run(s) of {} started in the last {window} s (limit {count})",
                snapshot.name
            );
            refuse(g.conn(), &row, "rate_limit", &reason).await?;
            return g.complete().await;
        }
    }

    // 5. Approval.
    if row.status == "pending" && snapshot.needs_approval() {
        if !row.awaiting_approval {
            let expires = now + snapshot.approval_timeout();
            transition(state_of(&row), &Event::ApprovalRequired)
                .map_err(|e| JobError::Permanent(e.to_string()))?;
            store::executions::execution_await_approval(g.conn(), row.id, expires).await?;
            g.enqueue(&approval_expiry_job(row.id, expires)).await?;
            log(
                g.conn(),
                row.id,
                "awaiting_approval",
                json!({ "roles": snapshot.approval_roles, "expires_at": expires }),
            )
            .await?;
        }
        return g.complete().await;
    }

    // Fan-out concurrency: wait for a slot without consuming an attempt.
    if let (Some(batch), Some(limit)) = (row.batch_id, row.batch_concurrency) {
        sqlx::query(
            "SELECT pg_advisory_xact_lock(hashtextextended('aiops.batch:' || $1::text, 0))",
        )
        .bind(batch)
        .execute(g.conn())
        .await?;
        let running = store::executions::execution_count_running_in_batch(
            g.conn(),
            batch,
            super::KIND_ROLLBACK,
        )
        .await?;
        if running >= i64::from(limit) {
            drop(g);
            return Err(JobError::Snooze(Duration::from_secs(1)));
        }
    }

    transition(state_of(&row), &Event::GatesPassed)
        .map_err(|e| JobError::Permanent(e.to_string()))?;
    let (started, deadline) = started_entry(&snapshot, now, probe);
    let Some(started_at) =
        store::executions::execution_start(g.conn(), row.id, probe, &started).await?
    else {
        return g.complete().await;
    };
    g.enqueue(&deadline_job(row.id, deadline)).await?;
    super::runner::enqueue_step(&mut g, row.id, 1, &snapshot, 0).await?;
    // The first step, when this worker continues into it, starts from the execution as this
    // transaction leaves it (the row stays locked until the commit, so no end commits first).
    let row = ExecutionRow {
        status: "running".into(),
        attempt: 1,
        started_at: Some(started_at),
        awaiting_approval: false,
        breaker_probe: probe,
        ..row
    };
    ctx.lease()
        .pass_on(StepHandoff::new(engine, Arc::new(row), Arc::new(snapshot)));
    g.complete().await
}

/// The log entry of a run that starts at `now`, and the runbook deadline it records.
fn started_entry(
    snapshot: &RunbookSnapshot,
    now: chrono::DateTime<Utc>,
    probe: bool,
) -> (serde_json::Value, chrono::DateTime<Utc>) {
    let deadline = now + chrono::Duration::seconds(i64::from(snapshot.timeout_seconds));
    let started = log_entry(
        "started",
        json!({ "attempt": 1, "breaker_probe": probe, "deadline": deadline }),
    );
    (started, deadline)
}

/// The common start in one statement: every gate passes on reads without locks and none needs
/// a lock to decide (no rate limit, no approval to wait for, no fan-out concurrency, and a
/// closed breaker, which admits without its row lock as above). The run then starts with a
/// compare-and-set on the execution's status in the statement that completes this job and
/// hands the first step over, so a cancel that commits first wins as it does under the row
/// lock. `Ok(false)`, with nothing written, when there is nothing to start, a gate refuses or
/// needs its lock, or the first step cannot follow on this worker: the transaction in
/// [`handle`] then decides and records it.
async fn start_at_once(ctx: &JobContext, execution_id: uuid::Uuid) -> Result<bool, JobError> {
    let mut conn = ctx.pool().acquire().await?;
    let now = Utc::now();
    // The execution and what every gate reads, in one round trip.
    let Some(facts) =
        store::executions::execution_start_facts(&mut conn, execution_id, now).await?
    else {
        return Ok(false);
    };
    let row = facts.row;
    if row.status != "pending" && row.status != "approved" {
        return Ok(false);
    }
    let snapshot = snapshot_of(&row)?;
    let needs_lock = (row.status == "pending" && snapshot.needs_approval())
        || (snapshot.rate_limit_count.is_some() && snapshot.rate_limit_window_seconds.is_some())
        || (row.batch_id.is_some() && row.batch_concurrency.is_some());
    if needs_lock || transition(state_of(&row), &Event::GatesPassed).is_err() {
        return Ok(false);
    }
    // The facts were read for the execution's runbook, which is the snapshot's.
    if row.runbook_id != Some(snapshot.id) || facts.runbook_status.as_deref() != Some("active") {
        return Ok(false);
    }
    if row.server_id.is_some() != facts.server.is_some()
        || !snapshot
            .allows_server(facts.server.as_ref())
            .unwrap_or(false)
    {
        return Ok(false);
    }
    // Windows are read and evaluated only when some enabled one has begun.
    if facts.blackout_windows_begun {
        let runbook_facts = crate::domain::blackout::RunbookFacts {
            id: snapshot.id,
            category: facts.runbook_category.clone(),
        };
        if !store::blackouts::blackout_active_for(
            &mut conn,
            Some(&runbook_facts),
            facts.server.as_ref(),
            now,
        )
        .await?
        .is_empty()
        {
            return Ok(false);
        }
    }
    if facts.breaker_state.as_deref() != Some("closed") {
        return Ok(false);
    }
    drop(conn);
    let (started, deadline) = started_entry(&snapshot, now, false);
    super::runner::start_run_at_once(
        ctx,
        row.id,
        &snapshot,
        &started,
        &deadline_job(row.id, deadline),
    )
    .await
}

/// The blackout window that covers a run's runbook (its current category) on its server now,
/// described; `None` when none does. For a runbook-level retry, which begins the runbook's
/// commands again.
pub(crate) async fn blackout_now(
    conn: &mut sqlx::PgConnection,
    row: &ExecutionRow,
    snapshot: &RunbookSnapshot,
) -> Result<Option<String>, super::EngineError> {
    let category = store::runbooks::runbook_get(conn, snapshot.id)
        .await?
        .map(|r| r.category)
        .unwrap_or_else(|| snapshot.category.clone());
    let runbook_facts = crate::domain::blackout::RunbookFacts {
        id: snapshot.id,
        category,
    };
    let server_facts = match row.server_id {
        Some(id) => store::blackouts::blackout_server_facts(conn, id).await?,
        None => None,
    };
    let active = store::blackouts::blackout_active_for(
        conn,
        Some(&runbook_facts),
        server_facts.as_ref(),
        chrono::Utc::now(),
    )
    .await?;
    Ok(active
        .first()
        .map(|(window, occurrence)| window.describe(occurrence)))
}
