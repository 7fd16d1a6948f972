//! `execution.step`: one attempt of one step.
//!
//! 1. The attempt row. When the job that enqueued this one inserted it already (`prepared`, a
//!    step that follows at once) and this is the job's first attempt, it is adopted: the
//!    execution is taken from the job this worker continues from (see [`StepHandoff`]) or read
//!    without a transaction, and the command runs. Otherwise, in a lease-fenced
//!    transaction (a checkpoint): a slot that already completed is never run again (the next
//!    step is enqueued instead); attempts of this slot left `running` by a dead worker are
//!    marked interrupted; the new attempt row is inserted as running.
//! 2. The command runs, rendered through `templates` (every value quoted), with the step timeout
//!    capped by the runbook deadline, while a watcher polls for cancellation and output streams
//!    to `execution_events` line by line, masked.
//! 3. In one lease-fenced transaction: the attempt row is finished and what follows is enqueued
//!    (the next step, a durable step retry, or the end of the run) together with the job's
//!    completion; in one statement when the next step follows on this worker, or when a run
//!    that succeeded ends with only its execution row changing. A worker that lost its lease
//!    writes nothing.

use std::collections::BTreeMap;
use std::sync::Arc;

use chrono::Utc;
use serde_json::{Value, json};
use tokio::sync::{broadcast, mpsc};

use crate::domain::execution::Event;
use crate::exec::{
    CancellationToken, CommandOutcome, CommandRequest, OutputChunk, OutputStream, Target,
};
use crate::queue::{GuardedTx, JobContext, JobError};
use crate::store::{self, executions::ExecutionRow, executions::StepResult, executions::StepSlot};
use crate::templates::{Renderer, StepOutput, TemplateContext};

use super::control::{finish_run, log, snapshot_of};
use super::masking::Masker;
use super::secret_vars::{self, is_secret_var};
use super::snapshot::{RunbookSnapshot, StepSnapshot};
use super::{Engine, EngineError, StepPayload, step_job};

/// Where the first part of an attempt reads (and, for a checkpoint, writes).
enum Prep {
    /// A lease-fenced checkpoint transaction: the attempt row is written here.
    Checkpoint(Box<GuardedTx>),
    /// The attempt row was prepared by the job that enqueued this one: reads only.
    Prepared(sqlx::pool::PoolConnection<sqlx::Postgres>),
}

impl Prep {
    fn conn(&mut self) -> &mut sqlx::PgConnection {
        match self {
            Prep::Checkpoint(g) => g.conn(),
            Prep::Prepared(c) => c,
        }
    }

    /// The fenced transaction to finish in: the checkpoint's own, or a new one.
    async fn into_guarded(self, ctx: &JobContext) -> Result<GuardedTx, JobError> {
        match self {
            Prep::Checkpoint(g) => Ok(*g),
            Prep::Prepared(c) => {
                drop(c);
                ctx.lease().guarded_tx().await
            }
        }
    }
}

/// Handles `execution.step`.
pub async fn handle(engine: &Engine, ctx: JobContext) -> Result<(), JobError> {
    let p: StepPayload = ctx.payload_as()?;
    // The attempt row the enqueuing transaction inserted is this job's only on its first
    // claim: a later one may follow a worker that died while the command ran, that let the job
    // go at shutdown, or an admin's retry, so it takes the checkpoint path, which marks that
    // row interrupted.
    let prepared = p.prepared.filter(|_| ctx.attempt == 1 && ctx.first_claim);
    // Checkpoint: the attempt row, in one lease-fenced transaction with the reads it needs.
    // Its commit does not wait for the WAL flush: only a crash of the PostgreSQL server itself
    // within the WAL writer's delay could lose it, and then the job is still running under its
    // lease and the step simply runs again; the step's result is committed durably below, and
    // that commit flushes this one too.
    let mut prep = match prepared {
        Some(_) => Prep::Prepared(ctx.pool().acquire().await?),
        None => {
            let mut g = ctx.lease().guarded_tx().await?;
            store::relax_commit_durability(g.conn()).await?;
            Prep::Checkpoint(Box::new(g))
        }
    };
    // A step this worker continues from its previous step gets that step's execution row, parsed
    // snapshot and end subscription in memory: the statement that enqueued it found the
    // execution still running at this attempt, and an end committed since reaches the
    // subscription. Otherwise (or when an end has arrived) the row is read.
    let handed = prepared
        .and_then(|_| ctx.take_handoff::<StepHandoff>())
        .and_then(|h| h.usable(&p));
    let (row, snapshot, ended) = match handed {
        Some(h) => (h.row, h.snapshot, Some(h.ended)),
        None => {
            let Some(row) = store::executions::execution_get(prep.conn(), p.execution_id).await?
            else {
                return prep.into_guarded(&ctx).await?.complete().await;
            };
            if row.status != "running" || row.attempt != p.attempt {
                // Cancelled, timed out or superseded by a later attempt: nothing to run.
                let mut g = prep.into_guarded(&ctx).await?;
                if let Some(step_row) = prepared {
                    store::executions::step_finish(
                        g.conn(),
                        step_row,
                        &StepResult {
                            status: "cancelled",
                            error_message: Some("the execution ended before this step started"),
                            ..StepResult::default()
                        },
                        Some(
                            &json!({ "step": snapshot_of(&row).ok()
                                         .and_then(|s| s.steps.get(p.index)
                                         .map(|s| s.name.clone())),
                                     "status": "cancelled" })
                            .to_string(),
                        ),
                    )
                    .await?;
                } else if let Some((order, name)) = snapshot_of(&row)
                    .ok()
                    .and_then(|s| s.steps.get(p.index).map(|s| (s.step_order, s.name.clone())))
                {
                    // A worker that held this job before (it died, or let the job go at
                    // shutdown) may have left its attempt running: it is recorded interrupted,
                    // not left running for good.
                    let slot = StepSlot {
                        execution_id: row.id,
                        phase: "run",
                        run_attempt: p.attempt,
                        step_order: order,
                    };
                    let (_, interrupted, _) =
                        store::executions::step_slot_prepare(g.conn(), slot).await?;
                    if !interrupted.is_empty() {
                        log(
                            g.conn(),
                            row.id,
                            "step_interrupted",
                            json!({ "step": name, "step_order": order,
                                    "attempts": interrupted.len() }),
                        )
                        .await?;
                    }
                }
                return g.complete().await;
            }
            if let Some(step_row) = prepared.filter(|_| !ctx.continued_in_slot()) {
                // Not continued in its predecessor's slot: the row was prepared when that step
                // ended, and the job waited since (given back at a worker's shutdown). The
                // attempt starts now.
                store::executions::step_restart_clock(prep.conn(), step_row).await?;
            }
            let snapshot = Arc::new(snapshot_of(&row)?);
            (Arc::new(row), snapshot, None)
        }
    };
    let step = snapshot
        .steps
        .get(p.index)
        .cloned()
        .ok_or_else(|| JobError::Permanent(format!("step index {} out of range", p.index)))?;
    // A runbook-level retry begins the runbook's commands again: a blackout window that became
    // active during its delay refuses it, as the start gate refuses a run.
    if p.begins_attempt
        && let Some(reason) = super::start::blackout_now(prep.conn(), &row, &snapshot).await?
    {
        let mut g = prep.into_guarded(&ctx).await?;
        let reason = format!("attempt {} was not begun: {reason}", p.attempt);
        match super::control::cancel(g.conn(), row.id, None, &reason).await {
            Ok(()) | Err(EngineError::Conflict(_)) => {}
            Err(e) => return Err(e.into()),
        }
        store::executions::execution_set_refused_by(g.conn(), row.id, "blackout").await?;
        return g.complete().await;
    }
    let slot = StepSlot {
        execution_id: row.id,
        phase: "run",
        run_attempt: p.attempt,
        step_order: step.step_order,
    };

    let resolved = super::targets::resolve_for(
        engine.targets.as_ref(),
        prep.conn(),
        row.server_id,
        &snapshot.target_os,
    )
    .await;
    let (target, secrets, server_json, target_error) = match resolved {
        Ok(r) => (Some(r.target), r.secrets, r.server, None),
        Err(e) => (None, Vec::new(), json!({ "error": e }), Some(e)),
    };

    let (done, interrupted, attempts) = match &mut prep {
        Prep::Prepared(_) => (false, Vec::new(), 0),
        Prep::Checkpoint(g) => store::executions::step_slot_prepare(g.conn(), slot).await?,
    };
    if done {
        let g = prep.into_guarded(&ctx).await?;
        advance(engine, g, &row, &snapshot, p.index).await?;
        return Ok(());
    }
    let retry_attempt = i32::try_from(attempts).unwrap_or(i32::MAX);
    let RenderInputs {
        renderer,
        tctx,
        vars: rendered_vars,
        masker,
        env,
    } = render_inputs(
        engine,
        prep.conn(),
        &row,
        &snapshot,
        (row.attempt, p.index),
        server_json,
        secrets,
    )
    .await?;

    // Render: condition, then command. A template error fails the attempt without running.
    let rendered: Result<Option<String>, String> = match &rendered_vars {
        Err(e) => Err(e.clone()),
        Ok(rvars) => match step.condition.as_deref() {
            Some(cond) => match renderer.eval_condition(cond, &tctx, rvars) {
                Ok(false) => Ok(None),
                Ok(true) => renderer
                    .render_command(&step.command, &tctx, rvars)
                    .map(Some)
                    .map_err(|e| format!("command: {e}")),
                Err(e) => Err(format!("condition: {e}")),
            },
            None => renderer
                .render_command(&step.command, &tctx, rvars)
                .map(Some)
                .map_err(|e| format!("command: {e}")),
        },
    };
    let masked_command = match &rendered {
        Ok(Some(c)) => Some(masker.mask(c)),
        _ => None,
    };
    let step_row = match (&mut prep, prepared) {
        (Prep::Prepared(_), Some(step_row)) => step_row,
        (prep, _) => {
            let conn = prep.conn();
            let step_row = store::executions::step_start(
                conn,
                None,
                slot,
                Some(step.id),
                &step.name,
                retry_attempt,
                masked_command.as_deref(),
                Some(&running_event(
                    &step,
                    retry_attempt,
                    p.attempt,
                    interrupted.len() as i64,
                )),
            )
            .await?;
            if !interrupted.is_empty() {
                if let Some(command) = &masked_command {
                    store::executions::step_interrupted_command(conn, &interrupted, command)
                        .await?;
                }
                log(
                    conn,
                    row.id,
                    "step_interrupted",
                    json!({ "step": step.name, "step_order": step.step_order,
                            "attempts": interrupted.len() }),
                )
                .await?;
            }
            step_row
        }
    };

    let command = match (rendered, target) {
        (Ok(None), _) => {
            // Condition false: recorded as skipped, then the next step.
            let mut g = prep.into_guarded(&ctx).await?;
            store::executions::step_finish(
                g.conn(),
                step_row,
                &StepResult {
                    status: "completed",
                    skipped: true,
                    error_message: Some("condition is false"),
                    ..StepResult::default()
                },
                Some(&json!({ "step": step.name, "status": "skipped" }).to_string()),
            )
            .await?;
            advance(engine, g, &row, &snapshot, p.index).await?;
            return Ok(());
        }
        (Err(message), _) => Err(masker.mask(&message)),
        (Ok(Some(_)), None) => Err(masker.mask(&target_error.unwrap_or_else(|| {
            format!(
                "no target for server {}",
                row.server_id.map(|s| s.to_string()).unwrap_or_default()
            )
        }))),
        (Ok(Some(command)), Some(target)) => Ok((command, target)),
    };
    match prep {
        Prep::Checkpoint(g) => g.commit().await?,
        // Back to the pool while the command runs.
        Prep::Prepared(conn) => drop(conn),
    }

    // Run.
    let deadline = row.started_at.unwrap_or_else(Utc::now)
        + chrono::Duration::seconds(i64::from(snapshot.timeout_seconds));
    let remaining = (deadline - Utc::now()).to_std().unwrap_or_default();
    let step_timeout =
        std::time::Duration::from_secs(u64::try_from(step.timeout_seconds).unwrap_or(60));
    let runbook_deadline_binds = remaining < step_timeout;
    let run = match command {
        Err(message) => RunResult::NotRun(message),
        Ok(_) if remaining.is_zero() => RunResult::DeadlinePassed,
        Ok((command, target)) => {
            let request = CommandRequest {
                command,
                env,
                timeout: remaining.min(step_timeout),
                output_limit_bytes: engine.settings.output_limit_bytes,
            };
            let (outcome, ended_as) = run_command(
                engine, &ctx, &row, &step, step_row, &target, &request, &masker, ended,
            )
            .await;
            RunResult::Ran(outcome, ended_as)
        }
    };

    // Record and continue, fenced.
    let verdict = judge(
        &step,
        &run,
        &masker,
        (step_timeout, remaining, runbook_deadline_binds),
    );
    // A sensitive step's captured output is kept only sealed, for later steps to read.
    let to_seal = match &run {
        RunResult::Ran(Ok(o), _) if step.sensitive && step.capture_output => Some(o),
        _ => None,
    };
    let sealed_output = match (to_seal, engine.keyring.as_deref()) {
        (Some(o), Some(keyring)) => Some(
            secret_vars::seal_step_output(keyring, step_row, &o.stdout, &o.stderr)
                .map_err(JobError::Permanent)?,
        ),
        _ => None,
    };
    let unsealed = to_seal.is_some() && sealed_output.is_none();
    let result = StepResult {
        status: verdict.status,
        exit_code: verdict.exit_code,
        exit_signal: verdict.exit_signal.as_deref(),
        stdout: verdict.stdout.as_deref(),
        stderr: verdict.stderr.as_deref(),
        truncated: verdict.truncated,
        skipped: false,
        error_message: verdict.error.as_deref(),
        // A prepared attempt row gets its command here.
        command: masked_command.as_deref(),
        output_encrypted: sealed_output.as_deref(),
    };
    let finish_event = json!({ "step": step.name, "status": verdict.status,
                               "exit_code": verdict.exit_code, "error": verdict.error })
    .to_string();
    let recorded = Recorded {
        run: &run,
        verdict: &verdict,
        result: &result,
        finish_event: &finish_event,
        unsealed,
        runbook_deadline_binds,
        retry_attempt,
    };
    // A lost database connection (the server restarting) does not throw the command's result
    // away: the write is tried again on a new connection while the lease may still be held.
    // It is lease-fenced, so a retry after an attempt whose commit did land writes nothing.
    let since = std::time::Instant::now();
    let mut pause = RECORD_RETRY_FIRST_PAUSE;
    loop {
        match record(
            engine, &ctx, &p, &row, &snapshot, &step, step_row, &recorded,
        )
        .await
        {
            Err(e)
                if e.is_connection_lost()
                    && ctx.lease().may_be_held()
                    && since.elapsed() < RECORD_RETRY_WINDOW =>
            {
                tracing::warn!(job = ctx.id, execution = %row.id, step = %step.name, error = %e,
                    "recording the step's result failed on a lost database connection; trying again");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(RECORD_RETRY_MAX_PAUSE);
            }
            other => return other,
        }
    }
}

/// What the start job or a step passes on in memory to the step this worker continues into
/// (see [`crate::queue::Lease::pass_on`]).
pub(crate) struct StepHandoff {
    /// The execution as the passing job saw it; the statement that enqueued the step found it
    /// running at the same attempt (or, for the start job, made it so under the row's lock).
    row: Arc<ExecutionRow>,
    snapshot: Arc<RunbookSnapshot>,
    /// Ends of executions, subscribed before that statement committed.
    ended: broadcast::Receiver<String>,
}

impl StepHandoff {
    /// A handoff of `row` with a subscription to execution ends opened now: create it before
    /// the statement that enqueues the step commits.
    pub(crate) fn new(
        engine: &Engine,
        row: Arc<ExecutionRow>,
        snapshot: Arc<RunbookSnapshot>,
    ) -> StepHandoff {
        StepHandoff {
            row,
            snapshot,
            ended: engine.ended.subscribe(),
        }
    }

    /// The handoff, when it is this step's execution and attempt and no end of the execution
    /// has arrived since (a lagging or closed subscription counts as one: the row is read).
    fn usable(mut self, p: &StepPayload) -> Option<StepHandoff> {
        if self.row.id != p.execution_id || self.row.attempt != p.attempt {
            return None;
        }
        (!may_have_ended(&mut self.ended, &self.row.id.to_string())).then_some(self)
    }
}

/// Whether `ended` has delivered the end of execution `id`, or may have missed it (lagged or
/// closed); consumes what has arrived.
fn may_have_ended(ended: &mut broadcast::Receiver<String>, id: &str) -> bool {
    loop {
        match ended.try_recv() {
            Ok(other) if other != id => {}
            Err(broadcast::error::TryRecvError::Empty) => return false,
            Ok(_) | Err(_) => return true,
        }
    }
}

/// First pause before recording a step's result again after a lost connection; it doubles up
/// to [`RECORD_RETRY_MAX_PAUSE`], for at most [`RECORD_RETRY_WINDOW`] (and never once the lease
/// may be gone).
const RECORD_RETRY_FIRST_PAUSE: std::time::Duration = std::time::Duration::from_millis(100);
const RECORD_RETRY_MAX_PAUSE: std::time::Duration = std::time::Duration::from_secs(2);
const RECORD_RETRY_WINDOW: std::time::Duration = std::time::Duration::from_secs(120);

/// What a step attempt ended with, to record.
struct Recorded<'a> {
    run: &'a RunResult,
    verdict: &'a Verdict,
    result: &'a StepResult<'a>,
    finish_event: &'a str,
    /// A sensitive step's output was to be captured but no key can seal it.
    unsealed: bool,
    runbook_deadline_binds: bool,
    retry_attempt: i32,
}

/// Records the attempt and what follows (the next step, a durable step retry, or the end of the
/// run) with the job's completion, in one lease-fenced transaction (or one statement when this
/// worker runs the next step itself, or when the run succeeds and only its execution row
/// changes).
#[allow(clippy::too_many_arguments)]
async fn record(
    engine: &Engine,
    ctx: &JobContext,
    p: &StepPayload,
    row: &Arc<ExecutionRow>,
    snapshot: &Arc<RunbookSnapshot>,
    step: &StepSnapshot,
    step_row: uuid::Uuid,
    r: &Recorded<'_>,
) -> Result<(), JobError> {
    if r.verdict.status == "completed" && p.index + 1 < snapshot.steps.len() && !r.unsealed {
        // The next step follows at once: the result, the next step's job and attempt row and
        // this job's completion in one statement, when this worker runs the next job itself.
        let next = next_step(row.id, p.attempt, snapshot, p.index + 1);
        if let (true, Some(prepared)) = (ctx.lease().can_continue_with(&next.job), &next.row) {
            // Subscribed before the statement: an end that commits after it still arrives.
            ctx.lease()
                .pass_on(StepHandoff::new(engine, row.clone(), snapshot.clone()));
            return ctx
                .lease()
                .complete_continuing(
                    &next.job,
                    store::executions::step_advance_writes(
                        row.id,
                        p.attempt,
                        step_row,
                        r.result,
                        r.finish_event,
                        prepared.as_next(),
                    ),
                )
                .await;
        }
    }
    if r.verdict.status == "completed" && p.index + 1 == snapshot.steps.len() && !r.unsealed {
        // The run ends with this step: when only the execution row changes, the result, the end
        // and the job's completion in one statement, which applies the end only while the
        // execution is still running in this attempt.
        let mut conn = ctx.pool().acquire().await?;
        let planned =
            super::control::plan_success_end(&mut conn, row, snapshot.id, (step_row, r.result))
                .await?;
        drop(conn);
        if let Some(end) = planned {
            return ctx
                .lease()
                .complete_with(store::executions::step_end_run_writes(
                    step_row,
                    r.result,
                    r.finish_event,
                    end.as_run_end(row),
                ))
                .await;
        }
    }
    let mut g = ctx.lease().guarded_tx().await?;
    if r.unsealed {
        log(
            g.conn(),
            row.id,
            "sensitive_output_not_captured",
            json!({ "step": step.name, "reason": "no secret key is configured to seal it" }),
        )
        .await?;
    }
    let finished =
        store::executions::step_finish(g.conn(), step_row, r.result, Some(r.finish_event)).await?;
    let still_running = |status: &str, attempt: i32| status == "running" && attempt == p.attempt;
    if !finished
        .execution_status
        .as_deref()
        .zip(finished.execution_attempt)
        .is_some_and(|(s, a)| still_running(s, a))
    {
        // Cancelled or timed out while the command ran; the attempt row says how it ended.
        return g.complete().await;
    }
    if r.verdict.status == "completed" && p.index + 1 < snapshot.steps.len() {
        // The next step follows without locking the execution row: its job reads the status
        // before it runs, so an end that commits meanwhile stops it there.
        enqueue_step(&mut g, row.id, p.attempt, snapshot, p.index + 1).await?;
        return g.complete().await;
    }
    // Ending the run (or deciding a failure) changes the execution: under its row lock.
    let Some(current) = store::executions::execution_lock(g.conn(), row.id)
        .await?
        .filter(|c| still_running(&c.status, c.attempt))
    else {
        return g.complete().await;
    };
    if r.verdict.status == "completed" {
        advance_locked(engine, g, &current, snapshot, p.index).await?;
        return Ok(());
    }
    let deadline_hit = matches!(r.run, RunResult::DeadlinePassed)
        || (r.verdict.status == "timeout" && r.runbook_deadline_binds);
    if deadline_hit {
        finish_run(engine, &mut g, &current, Event::TimedOut).await?;
        return g.complete().await;
    }
    if r.retry_attempt < step.retry_count {
        let mut job = step_job(row.id, p.attempt, p.index, i64::from(r.retry_attempt) + 1);
        job.run_at =
            Some(Utc::now() + chrono::Duration::seconds(i64::from(step.retry_delay_seconds)));
        g.enqueue(&job).await?;
        log(
            g.conn(),
            row.id,
            "step_retry_scheduled",
            json!({ "step": step.name, "retry_attempt": r.retry_attempt + 1,
                    "delay_seconds": step.retry_delay_seconds }),
        )
        .await?;
        return g.complete().await;
    }
    if step.continue_on_failure {
        log(
            g.conn(),
            row.id,
            "step_failed_continuing",
            json!({ "step": step.name }),
        )
        .await?;
        advance_locked(engine, g, &current, snapshot, p.index).await?;
        return Ok(());
    }
    let reason = format!(
        "step {} ({}) failed: {}",
        step.step_order,
        step.name,
        r.verdict.error.clone().unwrap_or_else(|| "failed".into())
    );
    finish_run(engine, &mut g, &current, Event::RunFailed(reason)).await?;
    g.complete().await
}

enum RunResult {
    NotRun(String),
    DeadlinePassed,
    /// The command ran; with the status the execution ended with, when that stopped it.
    Ran(Result<CommandOutcome, String>, Option<String>),
}

struct Verdict {
    status: &'static str,
    exit_code: Option<i32>,
    exit_signal: Option<String>,
    stdout: Option<String>,
    stderr: Option<String>,
    truncated: bool,
    error: Option<String>,
}

fn judge(
    step: &StepSnapshot,
    run: &RunResult,
    masker: &Masker,
    (step_timeout, remaining, runbook_deadline_binds): (
        std::time::Duration,
        std::time::Duration,
        bool,
    ),
) -> Verdict {
    let failed = |error: String| Verdict {
        status: "failed",
        exit_code: None,
        exit_signal: None,
        stdout: None,
        stderr: None,
        truncated: false,
        error: Some(error),
    };
    match run {
        RunResult::NotRun(message) => failed(message.clone()),
        RunResult::DeadlinePassed => Verdict {
            status: "timeout",
            ..failed("the runbook timeout passed before this step started".into())
        },
        RunResult::Ran(Err(e), _) => failed(masker.mask(e)),
        RunResult::Ran(Ok(o), ended_as) => {
            let (stdout, stderr) = if step.sensitive {
                (
                    format!(
                        "[output of a sensitive step is masked: {} bytes]",
                        o.stdout.len()
                    ),
                    format!(
                        "[output of a sensitive step is masked: {} bytes]",
                        o.stderr.len()
                    ),
                )
            } else {
                (masker.mask(&o.stdout), masker.mask(&o.stderr))
            };
            // What became of a command that was to be killed.
            // What became of the command: killed, not killed, or never started (over SSH, a
            // timeout or cancel while the server was being reached).
            let killed = match (&o.kill_error, &o.lost) {
                (Some(e), _) => {
                    format!("killing the command failed ({e}); it may still be running")
                }
                (None, Some(why)) => why.clone(),
                (None, None) => "the command was killed".to_owned(),
            };
            let (status, error) = if o.cancelled && ended_as.as_deref() == Some("timeout") {
                (
                    "timeout",
                    Some(format!("the runbook timeout ended the execution; {killed}")),
                )
            } else if o.cancelled && (o.kill_error.is_some() || o.lost.is_some()) {
                (
                    "cancelled",
                    Some(format!("cancelled while running; {killed}")),
                )
            } else if o.cancelled {
                ("cancelled", Some("cancelled while running".to_owned()))
            } else if o.timed_out && runbook_deadline_binds {
                // The time left before the runbook deadline was shorter than the step timeout.
                (
                    "timeout",
                    // The time the step was given, not how long its kill then took.
                    Some(format!(
                        "the runbook timeout passed {:.1} s into this step; {killed}",
                        remaining.as_secs_f64()
                    )),
                )
            } else if o.timed_out {
                (
                    "timeout",
                    Some(format!(
                        "timed out after {} s (the step timeout); {killed}",
                        step_timeout.as_secs()
                    )),
                )
            } else if o
                .exit_code
                .is_some_and(|c| step.expected_exit_codes.contains(&c))
            {
                ("completed", None)
            } else {
                (
                    "failed",
                    Some(match (o.exit_code, &o.exit_signal) {
                        (Some(c), _) => format!(
                            "exit code {c} is not one of the expected {:?}",
                            step.expected_exit_codes
                        ),
                        (None, Some(sig)) => format!("killed by signal {sig}"),
                        (None, None) => o.lost.clone().unwrap_or_else(|| "no exit status".into()),
                    }),
                )
            };
            Verdict {
                status,
                exit_code: o.exit_code,
                exit_signal: o.exit_signal.clone(),
                stdout: Some(stdout),
                stderr: Some(stderr),
                truncated: o.truncated,
                error,
            }
        }
    }
}

/// Runs the command while a watcher turns the end of the execution (notified, or found by a
/// fallback poll) and a lost lease into cancellation, and a streamer appends masked output lines
/// to the live event log. Also returns the status the execution had ended with when that
/// stopped the command (`timeout`, `cancelled`).
#[allow(clippy::too_many_arguments)]
async fn run_command(
    engine: &Engine,
    ctx: &JobContext,
    row: &ExecutionRow,
    step: &StepSnapshot,
    step_row: uuid::Uuid,
    target: &Target,
    request: &CommandRequest,
    masker: &Masker,
    ended: Option<broadcast::Receiver<String>>,
) -> (Result<CommandOutcome, String>, Option<String>) {
    let executor = match target {
        Target::Local => engine.local.clone(),
        _ => match engine.ssh.clone() {
            Some(ssh) => ssh,
            None => {
                let kind = target.kind();
                return (
                    Err(format!("no executor for {kind} targets on this worker")),
                    None,
                );
            }
        },
    };
    let cancel = CancellationToken::new();
    // A run dropped mid-command (the job abandoned) stops its watcher too.
    let _stop_watcher = cancel.clone().drop_guard();
    let (tx, rx) = mpsc::channel::<OutputChunk>(64);
    let pool = engine.pool.clone();
    // A step's command stops when its execution ends in any way.
    let watcher = watch_execution(engine, ctx, row.id, ended, &cancel, |status, requested| {
        status != "running" || requested
    });
    let streamer = tokio::spawn(stream_output(
        pool,
        row.id,
        step_row,
        rx,
        Arc::new(masker.clone()),
        step.sensitive,
        engine.settings.stream_limit_bytes,
    ));
    let outcome = executor.run(target, request, cancel.clone(), tx).await;
    cancel.cancel();
    let ended_as = watcher.await.ok().flatten();
    let _ = streamer.await;
    (outcome.map_err(|e| e.to_string()), ended_as)
}

/// Spawns the watcher of a running command: it cancels `cancel` when the execution reaches a
/// status `stops` accepts (given the status and whether a cancel was requested), as notified
/// on the end channel or found by the fallback poll, or when the job's lease is lost. Returns
/// the status that stopped it.
pub(crate) fn watch_execution(
    engine: &Engine,
    ctx: &JobContext,
    id: uuid::Uuid,
    ended: Option<broadcast::Receiver<String>>,
    cancel: &CancellationToken,
    stops: fn(&str, bool) -> bool,
) -> tokio::task::JoinHandle<Option<String>> {
    let cancel = cancel.clone();
    let pool = engine.pool.clone();
    let lease = ctx.lease().clone();
    let poll = engine.settings.cancel_poll;
    let mut ended = ended.unwrap_or_else(|| engine.ended.subscribe());
    let id_text = id.to_string();
    tokio::spawn(async move {
        let mut fallback = tokio::time::interval_at(tokio::time::Instant::now() + poll, poll);
        fallback.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            // The end of the execution is notified; the poll is the fallback.
            tokio::select! {
                _ = cancel.cancelled() => return None,
                _ = lease.lost() => { cancel.cancel(); return None; }
                _ = fallback.tick() => {}
                msg = ended.recv() => match msg {
                    Ok(ended_id) if ended_id != id_text => continue,
                    Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => {
                        fallback.tick().await;
                    }
                },
            }
            let Ok(mut conn) = pool.acquire().await else {
                continue;
            };
            match store::executions::execution_status(&mut conn, id).await {
                Ok(Some((status, requested))) if !stops(&status, requested) => {}
                Ok(ended) => {
                    cancel.cancel();
                    return ended.map(|(status, _)| status);
                }
                Err(_) => {}
            }
        }
    })
}

/// Appends a command's output to the live event log of attempt row `step_row` as it arrives:
/// whole lines, masked; a sensitive step's only as a notice; up to `limit` bytes, then a notice.
pub(crate) async fn stream_output(
    pool: sqlx::PgPool,
    execution_id: uuid::Uuid,
    step_row: uuid::Uuid,
    mut rx: mpsc::Receiver<OutputChunk>,
    masker: Arc<Masker>,
    sensitive: bool,
    limit: usize,
) {
    let mut pending: BTreeMap<&'static str, Vec<u8>> = BTreeMap::new();
    let mut sent = 0usize;
    let mut announced = false;
    while let Some(chunk) = rx.recv().await {
        let kind = match chunk.stream {
            OutputStream::Stdout => "stdout",
            OutputStream::Stderr => "stderr",
        };
        if sensitive {
            if !announced {
                announced = true;
                append(
                    &pool,
                    execution_id,
                    step_row,
                    kind,
                    "[output of a sensitive step is not streamed]\n",
                )
                .await;
            }
            continue;
        }
        let buf = pending.entry(kind).or_default();
        buf.extend_from_slice(&chunk.bytes);
        // Stream whole lines only, so a secret split across chunks is still masked.
        if let Some(pos) = buf.iter().rposition(|b| *b == b'\n') {
            let lines: Vec<u8> = buf.drain(..=pos).collect();
            if sent < limit {
                let text = masker.mask(&crate::exec::output_text(&lines));
                sent += text.len();
                append(&pool, execution_id, step_row, kind, &text).await;
                if sent >= limit {
                    let notice = format!(
                        "[aiops: live output stops after {limit} bytes; the step's stored output has the rest up to its cap]\n"
                    );
                    append(&pool, execution_id, step_row, kind, &notice).await;
                }
            }
        }
    }
    for (kind, rest) in pending {
        if !rest.is_empty() && sent < limit {
            // The output's last line may have been cut at the output cap inside a secret.
            let text = masker.mask_cut_end(&crate::exec::output_text(&rest));
            append(&pool, execution_id, step_row, kind, &text).await;
        }
    }
}

/// The largest event the live log takes is 64 KiB; longer text goes as several events.
const EVENT_BYTES: usize = 60_000;

async fn append(
    pool: &sqlx::PgPool,
    execution_id: uuid::Uuid,
    step_row: uuid::Uuid,
    kind: &str,
    text: &str,
) {
    let Ok(mut conn) = pool.acquire().await else {
        return;
    };
    for piece in pieces(text, EVENT_BYTES) {
        let _ =
            store::executions::event_append(&mut conn, execution_id, Some(step_row), kind, piece)
                .await;
    }
}

/// `text` in consecutive pieces of at most `max` bytes, split at character boundaries.
fn pieces(mut text: &str, max: usize) -> Vec<&str> {
    let mut out = Vec::new();
    while text.len() > max {
        let mut at = max;
        while !text.is_char_boundary(at) {
            at -= 1;
        }
        let (piece, rest) = text.split_at(at);
        out.push(piece);
        text = rest;
    }
    if !text.is_empty() {
        out.push(text);
    }
    out
}

/// Enqueues the next step, or ends the run successfully after the last one; completes the job
/// in the same transaction.
async fn advance(
    engine: &Engine,
    mut g: GuardedTx,
    row: &ExecutionRow,
    snapshot: &RunbookSnapshot,
    index: usize,
) -> Result<(), JobError> {
    if index + 1 < snapshot.steps.len() {
        return advance_locked(engine, g, row, snapshot, index).await;
    }
    // Ending the run changes the execution: under its row lock.
    match store::executions::execution_lock(g.conn(), row.id).await? {
        Some(current) => advance_locked(engine, g, &current, snapshot, index).await,
        None => g.complete().await,
    }
}

/// [`advance`] when the execution row is already locked in `g` (`current`), or, before the
/// last step, need not be.
async fn advance_locked(
    engine: &Engine,
    mut g: GuardedTx,
    current: &ExecutionRow,
    snapshot: &RunbookSnapshot,
    index: usize,
) -> Result<(), JobError> {
    if index + 1 < snapshot.steps.len() {
        enqueue_step(&mut g, current.id, current.attempt, snapshot, index + 1).await?;
    } else {
        finish_run(engine, &mut g, current, Event::RunSucceeded).await?;
    }
    g.complete().await
}

/// Enqueues step `index` of run attempt `attempt` to follow at once (the continuation of the
/// current job), with its attempt row inserted `running` in the same transaction, so the step's
/// job needs no checkpoint transaction of its own before it runs the command. Nothing is
/// inserted when the job was de-duplicated by its unique key.
pub(crate) async fn enqueue_step(
    g: &mut GuardedTx,
    execution_id: uuid::Uuid,
    attempt: i32,
    snapshot: &RunbookSnapshot,
    index: usize,
) -> Result<(), JobError> {
    let next = next_step(execution_id, attempt, snapshot, index);
    if g.enqueue_next(&next.job).await?.is_some()
        && let Some(prepared) = &next.row
    {
        let slot = StepSlot {
            execution_id,
            phase: "run",
            run_attempt: attempt,
            step_order: prepared.step_order,
        };
        store::executions::step_start(
            g.conn(),
            Some(prepared.row_id),
            slot,
            prepared.step_id,
            &prepared.step_name,
            0,
            None,
            Some(&prepared.event),
        )
        .await?;
    }
    Ok(())
}

/// Starts run attempt 1 of an execution whose gates all passed (without locks) and hands its
/// first step over to this worker, in one statement with the start job's completion (see
/// [`store::executions::execution_start_writes`]). `Ok(false)`, with nothing written, when the
/// first step cannot follow on this worker (the caller then starts the run in a transaction).
pub(crate) async fn start_run_at_once(
    ctx: &JobContext,
    execution_id: uuid::Uuid,
    snapshot: &RunbookSnapshot,
    started: &Value,
    deadline: &crate::queue::NewJob,
) -> Result<bool, JobError> {
    let next = next_step(execution_id, 1, snapshot, 0);
    let Some(first) = next
        .row
        .as_ref()
        .filter(|_| ctx.lease().can_continue_with(&next.job))
    else {
        return Ok(false);
    };
    ctx.lease()
        .complete_continuing(
            &next.job,
            store::executions::execution_start_writes(
                execution_id,
                started,
                deadline,
                first.as_next(),
            ),
        )
        .await?;
    // The deadline's timer was inserted by that statement: a worker-local timer fires it on
    // time while no step runs (a step waiting for its retry delay), as for an enqueued job.
    if let Some(at) = deadline.run_at {
        ctx.lease().note_due_later(at);
    }
    Ok(true)
}

/// The job of step `index` of run attempt `attempt`, to follow at once, and the attempt row to
/// insert with it (`None` for an index past the last step: the job then finds nothing to run).
struct FollowingStep {
    job: crate::queue::NewJob,
    row: Option<PreparedRow>,
}

struct PreparedRow {
    row_id: uuid::Uuid,
    step_id: Option<uuid::Uuid>,
    step_order: i32,
    step_name: String,
    event: String,
}

impl PreparedRow {
    fn as_next(&self) -> store::executions::NextStep<'_> {
        store::executions::NextStep {
            row_id: self.row_id,
            step_id: self.step_id,
            step_order: self.step_order,
            step_name: &self.step_name,
            event: &self.event,
        }
    }
}

fn next_step(
    execution_id: uuid::Uuid,
    attempt: i32,
    snapshot: &RunbookSnapshot,
    index: usize,
) -> FollowingStep {
    let mut job = step_job(execution_id, attempt, index, 0);
    let Some(step) = snapshot.steps.get(index) else {
        return FollowingStep { job, row: None };
    };
    let row_id = uuid::Uuid::new_v4();
    job.payload = json!(StepPayload {
        execution_id,
        attempt,
        index,
        prepared: Some(row_id),
        begins_attempt: false,
    });
    FollowingStep {
        job,
        row: Some(PreparedRow {
            row_id,
            step_id: Some(step.id),
            step_order: step.step_order,
            step_name: step.name.clone(),
            event: running_event(step, 0, attempt, 0),
        }),
    }
}

/// The live `status` event of an attempt that starts.
fn running_event(
    step: &StepSnapshot,
    retry_attempt: i32,
    attempt: i32,
    interrupted: i64,
) -> String {
    json!({ "step": step.name, "step_order": step.step_order, "status": "running",
            "retry_attempt": retry_attempt, "attempt": attempt,
            "interrupted_attempts": interrupted })
    .to_string()
}

/// Variables by name.
type Vars = BTreeMap<String, String>;

/// The variables of a run: the runbook's (templates, rendered per command) and the values given
/// at start (text, never rendered: a caller may not read through them what the templates see),
/// with the execution's secret variables opened. A value given at start replaces the runbook's
/// variable of the same name.
fn variables(
    engine: &Engine,
    snapshot: &RunbookSnapshot,
    row: &ExecutionRow,
) -> Result<(Vars, Vars), String> {
    let mut given = BTreeMap::new();
    if let Value::Object(map) = &row.context_vars {
        for (k, v) in map {
            given.insert(k.clone(), secret_vars::value_text(v));
        }
    }
    given.extend(secret_vars::open(
        row.id,
        row.secret_vars_encrypted.as_deref(),
        engine.keyring.as_deref(),
    )?);
    let templates = snapshot
        .environment_vars
        .iter()
        .filter(|(name, _)| !given.contains_key(*name))
        .map(|(name, value)| (name.clone(), value.clone()))
        .collect();
    Ok((templates, given))
}

fn target_os(snapshot: &RunbookSnapshot) -> crate::domain::runbook::TargetOs {
    if snapshot.target_os == "windows" {
        crate::domain::runbook::TargetOs::Windows
    } else {
        crate::domain::runbook::TargetOs::Linux
    }
}

/// What a command of an execution (a step's or a rollback's) is rendered with.
pub(crate) struct RenderInputs {
    pub(crate) renderer: Renderer,
    pub(crate) tctx: TemplateContext,
    /// The variables (the runbook's, overridden by the execution's, secret ones opened),
    /// rendered; or why they could not be (masked).
    pub(crate) vars: Result<BTreeMap<String, String>, String>,
    /// Masks every secret in play: the server's credentials, secret variables as given and as
    /// rendered, and the opened outputs of sensitive steps.
    pub(crate) masker: Masker,
    /// The rendered variables with environment-variable names: the command's environment.
    pub(crate) env: Vec<(String, String)>,
}

/// The [`RenderInputs`] of a command of run attempt `attempt` that sees the captured outputs of
/// the steps before `index` (`(attempt, index)`); `secrets` are the target's credentials.
pub(crate) async fn render_inputs(
    engine: &Engine,
    conn: &mut sqlx::PgConnection,
    row: &ExecutionRow,
    snapshot: &RunbookSnapshot,
    (attempt, index): (i32, usize),
    server: Value,
    mut secrets: Vec<String>,
) -> Result<RenderInputs, EngineError> {
    let ((vars, given), vars_error) = match variables(engine, snapshot, row) {
        Ok(both) => (both, None),
        Err(e) => ((BTreeMap::new(), BTreeMap::new()), Some(e)),
    };
    let secret_values = |vars: &BTreeMap<String, String>| {
        vars.iter()
            .filter(|(name, _)| is_secret_var(snapshot, name))
            .map(|(_, value)| value.clone())
            .collect::<Vec<_>>()
    };
    secrets.extend(secret_values(&vars));
    secrets.extend(secret_values(&given));
    let (tctx, captured_secrets, captured_error) =
        template_context(engine, conn, row, snapshot, (attempt, index), server).await?;
    secrets.extend(captured_secrets);
    let renderer = Renderer::new(target_os(snapshot));
    let rendered = renderer.render_vars(&vars, &tctx).map(|mut rendered| {
        rendered.extend(given);
        rendered
    });
    if let Ok(rendered) = &rendered {
        secrets.extend(secret_values(rendered));
    }
    let masker = Masker::new(secrets);
    let vars = match (vars_error.or(captured_error), rendered) {
        (Some(e), _) => Err(masker.mask(&e)),
        (None, Err((name, e))) => Err(masker.mask(&format!("variable {name}: {e}"))),
        (None, Ok(vars)) => Ok(vars),
    };
    let env = vars
        .as_ref()
        .map(|vars| {
            vars.iter()
                .filter(|(name, _)| crate::exec::is_env_name(name))
                .map(|(name, value)| (name.clone(), value.clone()))
                .collect()
        })
        .unwrap_or_default();
    Ok(RenderInputs {
        renderer,
        tctx,
        vars,
        masker,
        env,
    })
}

/// What templates see: the alert, the server, the execution and the captured outputs of earlier
/// steps of run attempt `attempt` (those before `index`), read back from the database (sealed
/// outputs of sensitive steps opened; they are returned too, to be masked).
async fn template_context(
    engine: &Engine,
    conn: &mut sqlx::PgConnection,
    row: &ExecutionRow,
    snapshot: &RunbookSnapshot,
    (attempt, index): (i32, usize),
    server: Value,
) -> Result<(TemplateContext, Vec<String>, Option<String>), EngineError> {
    let mut sensitive = Vec::new();
    let mut open_error = None;
    let alert = match row.alert_id {
        Some(id) => match store::executions::execution_alert(conn, id).await? {
            Some(a) => json!({
                "id": id, "name": a.alert_name, "alertname": a.alert_name, "severity": a.severity,
                "instance": a.instance, "status": a.status, "fingerprint": a.fingerprint,
                "source": a.source,
                "labels": a.labels_json.unwrap_or(json!({})),
                "annotations": a.annotations_json.unwrap_or(json!({})),
            }),
            None => json!({}),
        },
        None => json!({}),
    };
    let mut steps = BTreeMap::new();
    let captured_before = snapshot.steps[..index.min(snapshot.steps.len())]
        .iter()
        .any(|s| s.capture_output);
    let completed = if captured_before {
        store::executions::step_completed_runs(conn, row.id, attempt).await?
    } else {
        Vec::new()
    };
    for done in completed {
        let captured = snapshot
            .steps
            .iter()
            .any(|s| s.step_order == done.step_order && s.capture_output);
        if captured && !done.skipped {
            let (stdout, stderr) = match &done.output_encrypted {
                Some(envelope) => {
                    match secret_vars::open_step_output(
                        engine.keyring.as_deref(),
                        done.id,
                        envelope,
                    ) {
                        Ok((out, err)) => {
                            sensitive.extend(
                                [out.trim(), err.trim()]
                                    .into_iter()
                                    .filter(|v| !v.is_empty())
                                    .map(str::to_owned),
                            );
                            (out, err)
                        }
                        Err(e) => {
                            open_error = Some(format!("steps.{}: {e}", done.step_name));
                            (String::new(), String::new())
                        }
                    }
                }
                None => (
                    done.stdout.clone().unwrap_or_default(),
                    done.stderr.clone().unwrap_or_default(),
                ),
            };
            steps.insert(
                done.step_name.clone(),
                StepOutput {
                    stdout,
                    stderr,
                    exit_code: done.exit_code.unwrap_or(-1),
                },
            );
        }
    }
    let tctx = TemplateContext {
        alert,
        server,
        execution: json!({
            "id": row.id,
            "attempt": attempt,
            "runbook": snapshot.name,
            "runbook_version": snapshot.version,
            "started_at": row.started_at,
            "variables": row.context_vars,
        }),
        steps,
    };
    Ok((tctx, sensitive, open_error))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_live_output_goes_as_several_events_split_at_characters() {
        let text = format!("{}é{}", "a".repeat(5), "b".repeat(4));
        assert_eq!(pieces(&text, 6), vec!["aaaaa", "ébbbb"]);
        assert_eq!(pieces("abc", 3), vec!["abc"]);
        assert!(pieces("", 3).is_empty());
        let long = "x".repeat(2 * EVENT_BYTES + 1);
        let split = pieces(&long, EVENT_BYTES);
        assert_eq!(split.len(), 3);
        assert_eq!(split.concat(), long);
    }

    #[test]
    fn a_timeout_whose_kill_failed_says_the_command_may_still_run() {
        let step = StepSnapshot {
            id: uuid::Uuid::nil(),
            step_order: 1,
            name: "s".into(),
            command: "sleep 1000".into(),
            expected_exit_codes: vec![0],
            timeout_seconds: 8,
            continue_on_failure: false,
            condition: None,
            rollback_command: None,
            retry_count: 0,
            retry_delay_seconds: 0,
            capture_output: false,
            sensitive: false,
        };
        let outcome = |kill_error: Option<&str>| CommandOutcome {
            exit_code: None,
            exit_signal: None,
            stdout: "start\n".into(),
            stderr: String::new(),
            truncated: false,
            timed_out: true,
            cancelled: false,
            kill_error: kill_error.map(str::to_owned),
            lost: None,
            duration: std::time::Duration::from_secs(8),
        };
        let limits = (
            std::time::Duration::from_secs(8),
            std::time::Duration::from_secs(60),
            false,
        );
        let masker = Masker::new(Vec::<String>::new());
        let killed = judge(
            &step,
            &RunResult::Ran(Ok(outcome(None)), None),
            &masker,
            limits,
        );
        assert_eq!(
            killed.error.as_deref(),
            Some("timed out after 8 s (the step timeout); the command was killed")
        );
        // Over SSH, a timeout while the server was being reached: the command never ran.
        let mut never = outcome(None);
        never.lost =
            Some("the command never started: the connection to db-1:22 was not ready".into());
        let never = judge(&step, &RunResult::Ran(Ok(never), None), &masker, limits);
        assert_eq!(
            never.error.as_deref(),
            Some(
                "timed out after 8 s (the step timeout); the command never started: the \
                 connection to db-1:22 was not ready"
            )
        );
        let failed = judge(
            &step,
            &RunResult::Ran(
                Ok(outcome(Some("cannot reconnect: connection refused"))),
                None,
            ),
            &masker,
            limits,
        );
        assert_eq!(failed.status, "timeout");
        assert_eq!(
            failed.error.as_deref(),
            Some(
                "timed out after 8 s (the step timeout); killing the command failed (cannot \
                 reconnect: connection refused); it may still be running"
            )
        );
    }

    #[test]
    fn an_end_of_the_execution_or_a_gap_in_the_subscription_counts_as_ended() {
        let (tx, mut rx) = broadcast::channel::<String>(4);
        assert!(!may_have_ended(&mut rx, "a"), "nothing arrived");
        tx.send("b".into()).unwrap();
        tx.send("c".into()).unwrap();
        assert!(!may_have_ended(&mut rx, "a"), "other executions ended");
        tx.send("b".into()).unwrap();
        tx.send("a".into()).unwrap();
        assert!(may_have_ended(&mut rx, "a"), "this one ended");
        for other in ["b", "c", "d", "e", "f"] {
            tx.send(other.into()).unwrap();
        }
        assert!(may_have_ended(&mut rx, "a"), "lagged: an end may be lost");
        assert!(!may_have_ended(&mut rx, "a"), "caught up again");
        drop(tx);
        assert!(may_have_ended(&mut rx, "a"), "closed");
    }
}
