//! Durable execution end to end: the real API, a real worker runtime, real commands on this host.

mod common;

use std::path::PathBuf;

use reqwest::Method;
use serde_json::{Value, json};

fn scratch() -> common::Scratch {
    common::Scratch::new("engine")
}

/// The state of the runbook deadline's timer job of execution `id`.
async fn deadline_timer(app: &common::TestApp, id: uuid::Uuid) -> String {
    timer_state(app, id, "deadline").await
}

/// The state of execution `id`'s timer job `timer` (`deadline`, `approval_expiry`).
async fn timer_state(app: &common::TestApp, id: uuid::Uuid, timer: &str) -> String {
    sqlx::query_scalar("SELECT state::text FROM jobs WHERE unique_key = $1")
        .bind(format!("execution:{id}:{timer}"))
        .fetch_one(&app.pool)
        .await
        .unwrap()
}

/// Polls an execution until its log holds an entry of `event`; returns the execution.
async fn wait_for_log_event(app: &common::TestApp, id: uuid::Uuid, event: &str) -> Value {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let (_, run) = app.get(&format!("/executions/{id}")).await;
        if run["execution_log"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["event"] == event)
        {
            return run;
        }
        assert!(std::time::Instant::now() < deadline, "no {event}: {run}");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// Polls an execution until one of its rollback attempts has ended; returns that attempt.
async fn wait_for_finished_rollback(app: &common::TestApp, id: uuid::Uuid) -> Value {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let steps = app.steps(id).await;
        if let Some(s) = steps
            .iter()
            .find(|s| s["phase"] == "rollback" && s["status"] != "running")
        {
            return s.clone();
        }
        assert!(std::time::Instant::now() < deadline, "{steps:?}");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

fn read(path: &PathBuf) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

#[tokio::test]
async fn steps_run_in_order_capture_output_and_skip_on_false_condition() {
    let app = common::spawn_app().await;
    let worker = common::TestWorker::start(&app.pool).await;
    let dir = scratch();
    let log = dir.join("log");
    let yaml = format!(
        r#"
name: capture-and-skip
mode: auto
environment_vars:
  LOG: "{log}"
steps:
  - name: measure
    command: echo 42
    capture_output: true
  - name: use-it
    command: echo got {{{{ steps.measure.stdout | trim }}}} >> {{{{ LOG }}}}
  - name: never
    command: echo never >> {{{{ LOG }}}}
    condition: steps.measure.stdout | trim == "7"
  - name: last
    command: echo last >> {{{{ LOG }}}}
"#,
        log = log.display()
    );
    let runbook = app.runbook_from_yaml(&yaml).await;
    let id = app.start_execution(json!({ "runbook_id": runbook })).await;
    let done = app.wait_for_status(id, common::FINISHED, 30).await;
    assert_eq!(done["status"], "completed", "{done}");
    assert_eq!(read(&log), "got 42\nlast\n");
    assert!(done["duration_ms"].as_i64().unwrap() >= 0);
    assert!(
        done["output_summary"]
            .as_str()
            .unwrap()
            .contains("3 step(s) completed, 1 skipped")
    );
    let steps = app.steps(id).await;
    assert_eq!(steps.len(), 4);
    assert_eq!(steps[0]["stdout"], "42\n");
    assert_eq!(steps[2]["skipped"], true);
    assert!(steps.iter().all(|s| s["status"] == "completed"));
    let events: Vec<&str> = done["execution_log"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["event"].as_str().unwrap())
        .collect();
    assert!(events.starts_with(&["created", "started"]), "{events:?}");
    assert_eq!(*events.last().unwrap(), "completed");
    // The end of the run cancels the deadline's timer in the same statement.
    assert_eq!(deadline_timer(&app, id).await, "cancelled");
    worker.stop().await;
}

#[tokio::test]
async fn variables_given_at_start_are_text_not_templates() {
    let app = common::spawn_app().await;
    let worker = common::TestWorker::start(&app.pool).await;
    let yaml = r#"
name: start-variables-are-text
mode: auto
environment_vars:
  LABEL: default
  FMT: none
  N: "0"
  KEPT: "kept-{{ 1 + 1 }}"
steps:
  - name: fetch
    command: echo TopSecretToken-4242
    sensitive: true
    capture_output: true
  - name: report
    command: printf '%s|%s|%s|%s' "$LABEL" "$FMT" "$N" "$KEPT"
"#;
    let runbook = app.runbook_from_yaml(yaml).await;
    // A value that looks like a template reaches the command as written: it cannot read what
    // templates see (here a sensitive step's captured output), and a Go format string does not
    // fail the run. A number is its text; null leaves the runbook's value (itself a template).
    let id = app
        .start_execution(json!({ "runbook_id": runbook, "variables": {
            "LABEL": "{{ steps.fetch.stdout | reverse }}",
            "FMT": "{{.Names}}",
            "N": 5,
            "KEPT": null,
        } }))
        .await;
    let done = app.wait_for_status(id, common::FINISHED, 30).await;
    assert_eq!(done["status"], "completed", "{done}");
    let steps = app.steps(id).await;
    assert_eq!(
        steps[1]["stdout"], "{{ steps.fetch.stdout | reverse }}|{{.Names}}|5|kept-2",
        "{steps:?}"
    );
    // Only variables the runbook declares are taken: whoever may start a run cannot hand its
    // commands PERL5OPT, NODE_OPTIONS, PATH or any other variable its author did not choose.
    for name in [
        "PERL5OPT",
        "NODE_OPTIONS",
        "PATH",
        "LD_PRELOAD",
        "UNDECLARED",
    ] {
        let (status, body) = app
            .call(
                reqwest::Method::POST,
                "/executions",
                Some(&app.admin_token),
                Some(json!({ "runbook_id": runbook, "variables": { name: "x" } })),
            )
            .await;
        assert_eq!(status, 422, "{name}: {body}");
        assert_eq!(
            body["details"]["field"],
            format!("variables.{name}"),
            "{body}"
        );
    }
    worker.stop().await;
}

#[tokio::test]
async fn a_windows_runbook_never_runs_with_the_posix_shell() {
    let app = common::spawn_app().await;
    let runbook = app
        .runbook_from_yaml("name: win-only\nmode: auto\ntarget_os: windows\nsteps:\n  - {name: s, command: 'Write-Output hi'}\n")
        .await;
    let (status, body) = app
        .call(
            Method::POST,
            "/executions",
            Some(&app.admin_token),
            Some(json!({ "runbook_id": runbook })),
        )
        .await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(body["details"]["field"], "runbook_id", "{body}");
    // A run whose snapshot says windows by the time a worker takes it (stored before this
    // check existed, say) fails its step without running anything.
    let dir = scratch();
    let marker = dir.join("ran");
    let linux = app
        .runbook_from_yaml(&format!(
            "name: became-windows\nmode: auto\nsteps:\n  - {{name: s, command: 'touch {}'}}\n",
            marker.display()
        ))
        .await;
    let id = app.start_execution(json!({ "runbook_id": linux })).await;
    sqlx::query(
        "UPDATE runbook_executions SET runbook_snapshot = \
         jsonb_set(runbook_snapshot, '{target_os}', '\"windows\"') WHERE id = $1",
    )
    .bind(id)
    .execute(&app.pool)
    .await
    .unwrap();
    let worker = common::TestWorker::start(&app.pool).await;
    let done = app.wait_for_status(id, common::FINISHED, 30).await;
    assert_eq!(done["status"], "failed", "{done}");
    assert!(
        done["error_message"]
            .as_str()
            .unwrap_or_default()
            .contains("targets windows"),
        "{done}"
    );
    assert!(!marker.exists(), "the command ran");
    worker.stop().await;
}

#[tokio::test]
async fn failure_rolls_back_completed_steps_newest_first() {
    let app = common::spawn_app().await;
    let worker = common::TestWorker::start(&app.pool).await;
    let dir = scratch();
    let log = dir.join("log");
    let yaml = format!(
        r#"
name: rollback-order
mode: auto
environment_vars:
  LOG: "{log}"
steps:
  - name: one
    command: echo do-1 >> {{{{ LOG }}}}
    rollback_command: echo undo-1 >> {{{{ LOG }}}}
  - name: two
    command: echo do-2 >> {{{{ LOG }}}}
    rollback_command: echo undo-2 >> {{{{ LOG }}}}; exit 4
  - name: three
    command: echo do-3 >> {{{{ LOG }}}}; exit 3
    rollback_command: echo undo-3 >> {{{{ LOG }}}}
  - name: four
    command: echo do-4 >> {{{{ LOG }}}}
"#,
        log = log.display()
    );
    let runbook = app.runbook_from_yaml(&yaml).await;
    let id = app.start_execution(json!({ "runbook_id": runbook })).await;
    let done = app.wait_for_status(id, common::FINISHED, 30).await;
    assert_eq!(done["status"], "failed", "{done}");
    assert!(
        done["error_message"]
            .as_str()
            .unwrap()
            .contains("exit code 3"),
        "{done}"
    );
    // Rollbacks run after the status is final; wait for the second one.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while read(&log).lines().count() < 5 && std::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(read(&log), "do-1\ndo-2\ndo-3\nundo-2\nundo-1\n");
    let steps = app.steps(id).await;
    let rollbacks: Vec<&str> = steps
        .iter()
        .filter(|s| s["phase"] == "rollback")
        .map(|s| s["step_name"].as_str().unwrap())
        .collect();
    assert_eq!(rollbacks, ["two", "one"]);
    // A rollback that fails is recorded as failed, and the older ones still run.
    let undo_two = steps
        .iter()
        .find(|s| s["phase"] == "rollback" && s["step_name"] == "two")
        .unwrap();
    assert_eq!(undo_two["status"], "failed", "{undo_two}");
    assert_eq!(
        undo_two["error_message"], "rollback exited with code 4",
        "{undo_two}"
    );
    let (_, breaker) = app.get(&format!("/circuit-breakers/{runbook}")).await;
    assert_eq!(breaker["failure_count"], 1, "{breaker}");
    worker.stop().await;
}

/// A cancel that comes while the rollbacks before a runbook retry run stops them: the running
/// rollback command is killed and recorded as cancelled, the older ones never run, and the log
/// says why.
#[tokio::test]
async fn a_cancel_during_the_rollbacks_before_a_retry_stops_them() {
    let app = common::spawn_app().await;
    let worker = common::TestWorker::start(&app.pool).await;
    let dir = scratch();
    let log = dir.join("log");
    let yaml = format!(
        r#"
name: rollback-cancelled
mode: auto
max_retries: 1
retry_delay_seconds: 1
environment_vars:
  LOG: "{log}"
steps:
  - name: one
    command: "true"
    rollback_command: echo undo-1 >> {{{{ LOG }}}}
  - name: two
    command: "true"
    rollback_command: echo undo-2 >> {{{{ LOG }}}}; sleep 30; echo undo-2-end >> {{{{ LOG }}}}
  - name: three
    command: exit 1
"#,
        log = log.display()
    );
    let runbook = app.runbook_from_yaml(&yaml).await;
    let id = app.start_execution(json!({ "runbook_id": runbook })).await;
    common::wait_for_file(&log, "undo-2\n").await;
    let (status, body) = app
        .call(
            Method::POST,
            &format!("/executions/{id}/cancel"),
            Some(&app.admin_token),
            Some(json!({ "reason": "stop everything" })),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["status"], "cancelled", "{body}");
    // The rollback's command is killed at once and recorded, and nothing follows it.
    let undo_two = wait_for_finished_rollback(&app, id).await;
    assert_eq!(undo_two["step_name"], "two", "{undo_two}");
    assert_eq!(undo_two["status"], "cancelled", "{undo_two}");
    // Like a step's, a rollback's row says which signal ended its command.
    assert_eq!(undo_two["exit_signal"], "TERM", "{undo_two}");
    let done = wait_for_log_event(&app, id, "rollback_stopped").await;
    assert_eq!(done["status"], "cancelled", "{done}");
    let rollbacks = app
        .steps(id)
        .await
        .into_iter()
        .filter(|s| s["phase"] == "rollback")
        .count();
    assert_eq!(rollbacks, 1);
    assert_eq!(read(&log), "undo-2\n");
    worker.stop().await;
}

/// A retry that slow rollbacks pushed past the runbook deadline is not scheduled: the run fails
/// saying why, as when the deadline is known at the failure, instead of ending as a timeout.
#[tokio::test]
async fn a_retry_the_rollbacks_pushed_past_the_deadline_fails_the_run() {
    let app = common::spawn_app().await;
    let worker = common::TestWorker::start(&app.pool).await;
    let yaml = "name: slow-undo\nmode: auto\ntimeout_seconds: 6\nmax_retries: 1\nretry_delay_seconds: 2\n\
                steps:\n  - name: a\n    command: 'true'\n    rollback_command: sleep 5\n  \
                - name: b\n    command: exit 1\n";
    let runbook = app.runbook_from_yaml(yaml).await;
    let id = app.start_execution(json!({ "runbook_id": runbook })).await;
    let done = app.wait_for_status(id, common::FINISHED, 30).await;
    assert_eq!(done["status"], "failed", "{done}");
    let error = done["error_message"].as_str().unwrap();
    assert!(
        error.contains("not retried: after the retry delay (2 s)"),
        "{done}"
    );
    let events: Vec<&str> = done["execution_log"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["event"].as_str().unwrap())
        .collect();
    assert!(events.contains(&"rollback_step"), "{events:?}");
    assert!(!events.contains(&"retry_scheduled"), "{events:?}");
    // Rolled back once, not again at the end.
    let rollbacks = app
        .steps(id)
        .await
        .into_iter()
        .filter(|s| s["phase"] == "rollback")
        .count();
    assert_eq!(rollbacks, 1);
    worker.stop().await;
}

/// A runbook-level retry begins the runbook's commands again: a blackout window that became
/// active during its delay refuses it, as the start gate refuses a run.
#[tokio::test]
async fn a_blackout_that_begins_during_the_retry_delay_refuses_the_retry() {
    let app = common::spawn_app().await;
    let worker = common::TestWorker::start(&app.pool).await;
    let yaml = "name: retry-freeze\nmode: auto\ncategory: freeze-me\nmax_retries: 1\n\
                retry_delay_seconds: 2\nsteps:\n  - name: a\n    command: exit 1\n";
    let runbook = app.runbook_from_yaml(yaml).await;
    let id = app.start_execution(json!({ "runbook_id": runbook })).await;
    wait_for_log_event(&app, id, "retry_scheduled").await;
    app.blackout_now(
        "change-freeze",
        json!({ "affected_runbooks": { "categories": ["freeze-me"] } }),
    )
    .await;
    let done = app.wait_for_status(id, common::FINISHED, 30).await;
    assert_eq!(done["status"], "cancelled", "{done}");
    assert_eq!(done["refused_by"], "blackout", "{done}");
    let error = done["error_message"].as_str().unwrap();
    assert!(error.contains("attempt 2 was not begun"), "{done}");
    assert!(error.contains("change-freeze"), "{done}");
    let runs: Vec<i64> = app
        .steps(id)
        .await
        .iter()
        .map(|s| s["run_attempt"].as_i64().unwrap())
        .collect();
    assert_eq!(runs, [1], "the command ran only in the first attempt");
    worker.stop().await;
}

/// A run whose step job died (its attempts exhausted: the step got its worker killed on every
/// one) is ended by the engine's dead-job pass instead of waiting for its deadline with an
/// attempt row left running: the row is closed as interrupted and the run fails.
#[tokio::test]
async fn a_run_whose_step_job_died_is_failed_and_its_attempt_closed() {
    let app = common::spawn_app().await;
    let worker = common::TestWorker::start(&app.pool).await;
    let runbook = app
        .runbook_from_yaml(
            "name: poison\nmode: auto\ntimeout_seconds: 3600\nsteps:\n  - name: s1\n    \
             command: echo started; sleep 30\n",
        )
        .await;
    let id = app.start_execution(json!({ "runbook_id": runbook })).await;
    app.wait_step_running(id, "s1").await;
    // As the rescuer leaves a job whose last attempt's worker died.
    let died = sqlx::query(
        "UPDATE jobs SET state = 'dead', finished_at = now(), lease_token = NULL, \
           last_error = 'lease expired: the worker stopped heartbeating (crashed or hung)' \
         WHERE kind = 'execution.step' AND state = 'running'",
    )
    .execute(&app.pool)
    .await
    .unwrap();
    assert_eq!(died.rows_affected(), 1);
    worker.stop().await;
    common::run_scheduled_job(&app.pool, aiops::engine::dead_jobs::KIND).await;
    let (_, done) = app.get(&format!("/executions/{id}")).await;
    assert_eq!(done["status"], "failed", "{done}");
    assert!(
        done["error_message"]
            .as_str()
            .unwrap()
            .contains("its execution.step job died after its last attempt (lease expired"),
        "{done}"
    );
    let steps = app.steps(id).await;
    assert_eq!(steps.len(), 1, "{steps:?}");
    assert_eq!(steps[0]["status"], "failed", "{steps:?}");
    assert_eq!(steps[0]["interrupted"], true, "{steps:?}");
    assert!(steps[0]["completed_at"].is_string(), "{steps:?}");
    // The live stream gets the attempt's end too, not only its start.
    let ended: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM execution_events WHERE step_execution_id = $1::text::uuid \
         AND kind = 'status' AND (data::jsonb)->>'status' = 'failed' \
         AND (data::jsonb)->>'interrupted' = 'true'",
    )
    .bind(steps[0]["id"].as_str().unwrap())
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(ended, 1);
    // Once ended, the pass leaves it alone.
    common::run_scheduled_job(&app.pool, aiops::engine::dead_jobs::KIND).await;
    let (_, again) = app.get(&format!("/executions/{id}")).await;
    assert_eq!(again["execution_log"], done["execution_log"]);
}

/// A rollback whose job died counts as that rollback failing, also after the run ended (the
/// rollbacks after a failure run then): its row is closed as interrupted, the older rollbacks
/// still run, and the death is handled once.
#[tokio::test]
async fn a_rollback_whose_job_died_is_closed_and_the_older_ones_still_run() {
    let app = common::spawn_app().await;
    let worker = common::TestWorker::start(&app.pool).await;
    let dir = scratch();
    let log = dir.join("log");
    let yaml = format!(
        "name: dying-undo\nmode: auto\nenvironment_vars:\n  LOG: \"{}\"\nsteps:\n  - name: s1\n    \
         command: 'true'\n    rollback_command: echo rb1 >> {{{{ LOG }}}}\n  - name: s2\n    \
         command: 'true'\n    rollback_command: echo rb2 >> {{{{ LOG }}}}; sleep 30\n  - name: s3\n    \
         command: exit 5\n",
        log.display()
    );
    let runbook = app.runbook_from_yaml(&yaml).await;
    let id = app.start_execution(json!({ "runbook_id": runbook })).await;
    common::wait_for_file(&log, "rb2\n").await;
    let died = sqlx::query(
        "UPDATE jobs SET state = 'dead', finished_at = now(), lease_token = NULL, \
           last_error = 'lease expired: the worker stopped heartbeating (crashed or hung)' \
         WHERE kind = 'execution.rollback' AND state = 'running'",
    )
    .execute(&app.pool)
    .await
    .unwrap();
    assert_eq!(died.rows_affected(), 1);
    common::run_scheduled_job(&app.pool, aiops::engine::dead_jobs::KIND).await;
    common::wait_for_file(&log, "rb2\nrb1\n").await;
    let done = wait_for_log_event(&app, id, "rollback_finished").await;
    assert_eq!(done["status"], "failed", "{done}");
    let rollbacks: Vec<(String, String, bool)> = app
        .steps(id)
        .await
        .iter()
        .filter(|s| s["phase"] == "rollback")
        .map(|s| {
            (
                s["step_name"].as_str().unwrap().to_owned(),
                s["status"].as_str().unwrap().to_owned(),
                s["interrupted"].as_bool().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        rollbacks,
        [
            ("s2".to_owned(), "failed".to_owned(), true),
            ("s1".to_owned(), "completed".to_owned(), false)
        ]
    );
    // Handled once: another pass changes nothing.
    common::run_scheduled_job(&app.pool, aiops::engine::dead_jobs::KIND).await;
    let (_, again) = app.get(&format!("/executions/{id}")).await;
    let died = again["execution_log"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["event"] == "job_died")
        .count();
    assert_eq!(died, 1, "{again}");
    worker.stop().await;
}

/// A rollback command is rendered with what the run's steps saw: the variables given at start
/// (overriding the runbook's), secret ones included and masked in what is stored, the captured
/// output of earlier steps, and the variables as its environment.
#[tokio::test]
async fn rollback_renders_with_the_runs_variables_captured_output_and_environment() {
    let app = common::spawn_app().await;
    let worker = common::TestWorker::start(&app.pool).await;
    let dir = scratch();
    let log = dir.join("log");
    // A quote in the secret: rendered commands carry it escaped inside a quoted word.
    let secret = "it's-r0llback-pw";
    let yaml = format!(
        r#"
name: rollback-context
mode: auto
environment_vars:
  LOG: "{log}"
  SERVICE: "default-svc"
  DB_PASSWORD: "default-pw"
steps:
  - name: probe
    command: echo probed-7
    capture_output: true
  - name: act
    command: echo start {{{{ SERVICE }}}} >> {{{{ LOG }}}}
    rollback_command: echo stop {{{{ SERVICE }}}} {{{{ steps.probe.stdout | trim }}}} "$SERVICE" {{{{ DB_PASSWORD }}}} >> {{{{ LOG }}}}; echo undone {{{{ SERVICE }}}}
  - name: break
    command: exit 4
"#,
        log = log.display()
    );
    let runbook = app.runbook_from_yaml(&yaml).await;
    let id = app
        .start_execution(json!({ "runbook_id": runbook,
                                 "variables": { "SERVICE": "web-1", "DB_PASSWORD": secret } }))
        .await;
    let done = app.wait_for_status(id, common::FINISHED, 30).await;
    assert_eq!(done["status"], "failed", "{done}");
    // Rollbacks run after the status is final; wait until the rollback's attempt is recorded.
    let rollback = wait_for_finished_rollback(&app, id).await;
    assert_eq!(
        read(&log),
        format!("start web-1\nstop web-1 probed-7 web-1 {secret}\n")
    );
    assert_eq!(rollback["step_name"], "act");
    assert_eq!(rollback["status"], "completed", "{rollback}");
    let stored: Vec<Option<String>> = sqlx::query_scalar(
        "SELECT command FROM step_executions WHERE execution_id = $1 AND phase = 'rollback'",
    )
    .bind(id)
    .fetch_all(&app.pool)
    .await
    .unwrap();
    assert_eq!(
        stored,
        [Some(format!(
            "echo stop web-1 probed-7 \"$SERVICE\" '********' >> {}; echo undone web-1",
            log.display()
        ))]
    );
    let hits: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM step_executions WHERE execution_id = $1 \
           AND (command LIKE '%r0llback%' OR stdout LIKE '%r0llback%' OR stderr LIKE '%r0llback%')",
    )
    .bind(id)
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(hits, 0);
    // The rollback's start and end reach the live stream as status events.
    let phases: Vec<String> = sqlx::query_scalar(
        "SELECT data::jsonb->>'status' FROM execution_events \
         WHERE execution_id = $1 AND kind = 'status' AND data::jsonb->>'phase' = 'rollback' \
         ORDER BY id",
    )
    .bind(id)
    .fetch_all(&app.pool)
    .await
    .unwrap();
    assert_eq!(phases, ["running", "completed"]);
    // And its output, on its own attempt row.
    let output: Vec<String> = sqlx::query_scalar(
        "SELECT data FROM execution_events \
         WHERE step_execution_id = $1::text::uuid AND kind = 'stdout' ORDER BY id",
    )
    .bind(rollback["id"].as_str().unwrap())
    .fetch_all(&app.pool)
    .await
    .unwrap();
    assert_eq!(output, ["undone web-1\n"]);
    worker.stop().await;
}

/// Applies a new runbook and starts it through the API.
async fn start_new(app: &common::TestApp, yaml: &str) -> uuid::Uuid {
    let runbook = app.runbook_from_yaml(yaml).await;
    app.start_execution(json!({ "runbook_id": runbook })).await
}

/// A worker that polls only once a minute runs a start, an approved start and a rollback well
/// within that minute: each was woken by the transaction that enqueued it, after its commit.
#[tokio::test]
async fn starts_approvals_and_rollbacks_wake_an_idle_worker_before_its_poll() {
    let app = common::spawn_app().await;
    let poll = std::time::Duration::from_secs(60);
    let worker = common::TestWorker::start_adjusted(&app.pool, |o| {
        o.queue.poll_interval = poll;
        o.queue.maintenance_interval = poll;
    })
    .await;
    // Well under the poll: only a wake-up gets the job claimed this soon.
    let bound = 15;
    assert!(std::time::Duration::from_secs(bound) < poll / 2);
    let terminal = common::FINISHED;
    // The worker's first claim found nothing; it now waits for a wake-up or its poll.
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;

    // A start through the API.
    let id = start_new(
        &app,
        "name: woken\nmode: auto\nsteps:\n  - {name: s, command: 'true'}\n",
    )
    .await;
    let done = app.wait_for_status(id, terminal, bound).await;
    assert_eq!(done["status"], "completed", "{done}");

    // An approval enqueues the start job again.
    let id = start_new(&app, "name: woken-after-approval\nmode: semi_auto\napproval_roles: [engineer]\nsteps:\n  - {name: s, command: 'true'}\n").await;
    app.wait_awaiting_approval(id).await;
    let (_, engineer) = app.user_with_role("engineer").await;
    let (status, body) = app.approve(id, &engineer).await;
    assert_eq!(status, 200, "{body}");
    let done = app.wait_for_status(id, terminal, bound).await;
    assert_eq!(done["status"], "completed", "{done}");

    // A failed run's rollback job is enqueued by the step that failed.
    let id = start_new(&app, "name: woken-rollback\nmode: auto\nsteps:\n  - {name: one, command: 'true', rollback_command: 'true'}\n  - {name: two, command: 'exit 3'}\n").await;
    let done = app.wait_for_status(id, terminal, bound).await;
    assert_eq!(done["status"], "failed", "{done}");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(bound);
    loop {
        let steps = app.steps(id).await;
        if steps
            .iter()
            .any(|s| s["phase"] == "rollback" && s["status"] == "completed")
        {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the rollback did not run within {bound} s: {steps:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    worker.stop().await;
}

#[tokio::test]
async fn step_retries_continue_on_failure_and_runbook_retries() {
    let app = common::spawn_app().await;
    let worker = common::TestWorker::start(&app.pool).await;
    let dir = scratch();
    let counter = dir.join("counter");
    let yaml = format!(
        r#"
name: flaky
mode: auto
max_retries: 1
retry_delay_seconds: 0
environment_vars:
  C: "{counter}"
steps:
  - name: flaky-step
    command: echo x >> {{{{ C }}}}; test $(wc -l < {{{{ C }}}}) -ge 2
    retry_count: 1
    retry_delay_seconds: 0
  - name: allowed-to-fail
    command: exit 9
    continue_on_failure: true
  - name: fails-first-attempt
    command: test $(wc -l < {{{{ C }}}}) -ge 3 || (echo y >> {{{{ C }}}}; exit 1)
"#,
        counter = counter.display()
    );
    let runbook = app.runbook_from_yaml(&yaml).await;
    let id = app.start_execution(json!({ "runbook_id": runbook })).await;
    let done = app.wait_for_status(id, common::FINISHED, 40).await;
    assert_eq!(done["status"], "completed", "{done}");
    assert_eq!(done["attempt"], 2);
    let steps = app.steps(id).await;
    let flaky: Vec<(i64, i64, &str)> = steps
        .iter()
        .filter(|s| s["step_name"] == "flaky-step")
        .map(|s| {
            (
                s["run_attempt"].as_i64().unwrap(),
                s["retry_attempt"].as_i64().unwrap(),
                s["status"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(flaky[0], (1, 0, "failed"));
    assert_eq!(flaky[1], (1, 1, "completed"));
    assert!(
        steps
            .iter()
            .any(|s| s["step_name"] == "allowed-to-fail" && s["status"] == "failed")
    );
    worker.stop().await;
}

async fn pid_alive(pid: &str) -> bool {
    std::process::Command::new("kill")
        .args(["-0", pid.trim()])
        .stderr(std::process::Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

async fn wait_file(path: &PathBuf) -> String {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let text = read(path);
        if !text.trim().is_empty() {
            return text;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{} never written",
            path.display()
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn cancel_mid_step_kills_the_command() {
    let app = common::spawn_app().await;
    // The fallback poll never fires within this test: the notified end of the execution is
    // what stops the command.
    let worker = common::TestWorker::start_adjusted(&app.pool, |o| {
        o.engine.cancel_poll = std::time::Duration::from_secs(3600);
    })
    .await;
    let dir = scratch();
    let pidfile = dir.join("pid");
    let yaml = format!(
        r#"
name: long-sleep
mode: auto
environment_vars:
  P: "{pid}"
steps:
  - name: sleep
    command: sh -c 'echo $$ > "$1"; exec sleep 60' sh {{{{ P }}}}
    timeout_seconds: 120
"#,
        pid = pidfile.display()
    );
    let runbook = app.runbook_from_yaml(&yaml).await;
    let id = app.start_execution(json!({ "runbook_id": runbook })).await;
    let pid = wait_file(&pidfile).await;
    assert!(pid_alive(&pid).await);
    let (_, operator) = app.user_with_role("operator").await;
    let (status, body) = app
        .call(
            Method::POST,
            &format!("/executions/{id}/cancel"),
            Some(&operator),
            Some(json!({ "reason": "wrong host" })),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["status"], "cancelled");
    assert_eq!(deadline_timer(&app, id).await, "cancelled");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while pid_alive(&pid).await {
        assert!(
            std::time::Instant::now() < deadline,
            "the command survived the cancel"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let steps = app.steps(id).await;
        if steps[0]["status"] == "cancelled" {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{steps:?}");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(app.audit_rows("execution_cancel").await.len(), 1);
    let (status, _) = app
        .call(
            Method::POST,
            &format!("/executions/{id}/cancel"),
            Some(&operator),
            Some(json!({})),
        )
        .await;
    assert_eq!(
        status, 409,
        "a finished execution cannot be cancelled again"
    );
    worker.stop().await;
}

#[tokio::test]
async fn runbook_timeout_kills_the_step_and_rolls_back() {
    let app = common::spawn_app().await;
    let worker = common::TestWorker::start(&app.pool).await;
    let dir = scratch();
    let pidfile = dir.join("pid");
    let log = dir.join("log");
    let yaml = format!(
        r#"
name: too-slow
mode: auto
timeout_seconds: 2
environment_vars:
  P: "{pid}"
  LOG: "{log}"
steps:
  - name: quick
    command: echo did >> {{{{ LOG }}}}
    rollback_command: echo undid >> {{{{ LOG }}}}
    timeout_seconds: 2
  - name: slow
    command: sh -c 'echo $$ > "$1"; exec sleep 60' sh {{{{ P }}}}
    timeout_seconds: 2
"#,
        pid = pidfile.display(),
        log = log.display()
    );
    let runbook = app.runbook_from_yaml(&yaml).await;
    let id = app.start_execution(json!({ "runbook_id": runbook })).await;
    let pid = wait_file(&pidfile).await;
    let done = app.wait_for_status(id, common::FINISHED, 30).await;
    assert_eq!(done["status"], "timeout", "{done}");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while pid_alive(&pid).await || read(&log) != "did\nundid\n" {
        assert!(
            std::time::Instant::now() < deadline,
            "pid alive or no rollback: {}",
            read(&log)
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    worker.stop().await;
}

/// The runbook's deadline job ending the execution stops the step it finds running: that step
/// is recorded as timed out, not as cancelled, and the rollback of the step before it begins
/// only after the stopped command is gone (this one takes a second to exit on SIGTERM). (The run
/// is made an hour old, as if its timeout had long passed, and its deadline job due now.)
#[tokio::test]
async fn a_step_stopped_by_the_runbook_deadline_is_recorded_as_timed_out() {
    let app = common::spawn_app().await;
    let worker = common::TestWorker::start(&app.pool).await;
    let runbook = app
        .runbook_from_yaml("name: deadline-stop\nmode: auto\ntimeout_seconds: 600\nsteps:\n  - {name: first, command: 'true', rollback_command: 'true'}\n  - {name: long, command: 'trap \"sleep 1; exit 143\" TERM; sleep 120 & wait', timeout_seconds: 500}\n")
        .await;
    let id = app.start_execution(json!({ "runbook_id": runbook })).await;
    app.wait_step_running(id, "long").await;
    sqlx::query(
        "UPDATE runbook_executions SET started_at = started_at - interval '1 hour' WHERE id = $1",
    )
    .bind(id)
    .execute(&app.pool)
    .await
    .unwrap();
    sqlx::query("UPDATE jobs SET run_at = now() WHERE unique_key = $1")
        .bind(format!("execution:{id}:deadline"))
        .execute(&app.pool)
        .await
        .unwrap();
    sqlx::query("SELECT pg_notify('aiops_jobs', '')")
        .execute(&app.pool)
        .await
        .unwrap();
    let done = app.wait_for_status(id, common::FINISHED, 30).await;
    assert_eq!(done["status"], "timeout", "{done}");
    // The summary, written as the run ends, counts the step the deadline is stopping.
    assert_eq!(
        done["output_summary"],
        "attempt 1 of 1: 1 step(s) completed, 0 skipped, 1 failed attempt(s)",
        "{done}"
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let (step, rollback) = loop {
        let steps = app.steps(id).await;
        let long = steps.iter().find(|s| s["step_name"] == "long").cloned();
        let undo = steps.iter().find(|s| s["phase"] == "rollback").cloned();
        if let (Some(long), Some(undo)) = (long, undo)
            && long["status"] != "running"
            && undo["status"] != "running"
        {
            break (long, undo);
        }
        assert!(
            std::time::Instant::now() < deadline,
            "not recorded: {steps:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    assert_eq!(step["status"], "timeout", "{step}");
    assert!(
        step["error_message"]
            .as_str()
            .unwrap()
            .contains("runbook timeout"),
        "{step}"
    );
    assert_eq!(rollback["step_name"], "first");
    assert_eq!(rollback["status"], "completed", "{rollback}");
    let at =
        |v: &Value, k: &str| chrono::DateTime::parse_from_rfc3339(v[k].as_str().unwrap()).unwrap();
    assert!(
        at(&rollback, "started_at") >= at(&step, "completed_at"),
        "the rollback began while the stopped command was still running: {rollback} {step}"
    );
    worker.stop().await;
}

/// A runbook-level retry that could only begin after the runbook timeout is not scheduled: the
/// run fails at once and says why, instead of waiting to end as a timeout.
#[tokio::test]
async fn no_runbook_retry_is_scheduled_past_the_runbook_timeout() {
    let app = common::spawn_app().await;
    let worker = common::TestWorker::start(&app.pool).await;
    let runbook = app
        .runbook_from_yaml("name: late-retry\nmode: auto\ntimeout_seconds: 30\nmax_retries: 2\nretry_delay_seconds: 60\nsteps:\n  - {name: s, command: 'exit 1', timeout_seconds: 10}\n")
        .await;
    let id = app.start_execution(json!({ "runbook_id": runbook })).await;
    let done = app.wait_for_status(id, common::FINISHED, 20).await;
    assert_eq!(done["status"], "failed", "{done}");
    assert_eq!(done["attempt"], 1, "{done}");
    let message = done["error_message"].as_str().unwrap_or_default();
    assert!(message.contains("exit code 1"), "{done}");
    assert!(message.contains("not retried"), "{done}");
    worker.stop().await;
}

#[tokio::test]
async fn step_timeout_fails_the_step() {
    let app = common::spawn_app().await;
    let worker = common::TestWorker::start(&app.pool).await;
    let runbook = app
        .runbook_from_yaml("name: step-timeout\nmode: auto\nsteps:\n  - name: slow\n    command: sleep 30\n    timeout_seconds: 1\n")
        .await;
    let id = app.start_execution(json!({ "runbook_id": runbook })).await;
    let done = app.wait_for_status(id, common::FINISHED, 30).await;
    assert_eq!(done["status"], "failed", "{done}");
    assert_eq!(
        done["output_summary"],
        "attempt 1 of 1: 0 step(s) completed, 0 skipped, 1 failed attempt(s)",
        "the timed-out attempt counts as failed: {done}"
    );
    let steps = app.steps(id).await;
    assert_eq!(steps[0]["status"], "timeout");
    assert!(
        steps[0]["error_message"]
            .as_str()
            .unwrap()
            .contains("timed out")
    );
    worker.stop().await;
}

#[tokio::test]
async fn secrets_and_sensitive_output_are_masked_everywhere() {
    let app = common::spawn_app().await;
    let worker = common::TestWorker::start(&app.pool).await;
    let secret = "s3cr3t-Pa55word-xyz";
    let yaml = r#"
name: masked
mode: auto
environment_vars:
  DB_PASSWORD: "set-at-start"
steps:
  - name: leaky
    command: echo "password is $DB_PASSWORD"; echo again {{ DB_PASSWORD }} >&2
  - name: private
    command: echo top-secret-output
    sensitive: true
"#;
    let runbook = app.runbook_from_yaml(yaml).await;
    let id = app
        .start_execution(json!({ "runbook_id": runbook, "variables": { "DB_PASSWORD": secret } }))
        .await;
    let done = app.wait_for_status(id, common::FINISHED, 30).await;
    assert_eq!(done["status"], "completed", "{done}");
    let steps = app.steps(id).await;
    assert_eq!(steps[0]["stdout"], "password is ********\n");
    assert!(steps[0]["stderr"].as_str().unwrap().contains("********"));
    assert!(
        !steps[1]["stdout"]
            .as_str()
            .unwrap()
            .contains("top-secret-output")
    );
    // Nowhere in the database except the variables the caller gave (context_vars).
    let hits: i64 = sqlx::query_scalar(
        "SELECT (SELECT count(*) FROM step_executions WHERE stdout LIKE '%' || $1 || '%' \
           OR stderr LIKE '%' || $1 || '%' OR command LIKE '%' || $1 || '%') + \
         (SELECT count(*) FROM execution_events WHERE data LIKE '%' || $1 || '%' OR data LIKE '%top-secret-output%') + \
         (SELECT count(*) FROM audit_log WHERE details_json::text LIKE '%' || $1 || '%') + \
         (SELECT count(*) FROM runbook_executions WHERE execution_log::text LIKE '%' || $1 || '%')",
    )
    .bind(secret)
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(hits, 0);
    worker.stop().await;
}

#[tokio::test]
async fn gates_refuse_with_their_reason() {
    let app = common::spawn_app().await;
    let worker = common::TestWorker::start(&app.pool).await;
    let terminal = common::FINISHED;

    // Rate limit: one run per hour.
    let limited = app
        .runbook_from_yaml("name: limited\nmode: auto\nrate_limit_count: 1\nrate_limit_window_seconds: 3600\nsteps:\n  - {name: s, command: 'true'}\n")
        .await;
    let first = app.start_execution(json!({ "runbook_id": limited })).await;
    assert_eq!(
        app.wait_for_status(first, terminal, 30).await["status"],
        "completed"
    );
    let second = app.start_execution(json!({ "runbook_id": limited })).await;
    let refused = app.wait_for_status(second, terminal, 30).await;
    assert_eq!(refused["status"], "cancelled");
    assert_eq!(refused["refused_by"], "rate_limit");
    assert!(
        refused["error_message"]
            .as_str()
            .unwrap()
            .contains("rate limit")
    );

    // Blackout covering the runbook's category.
    let blacked = app
        .runbook_from_yaml("name: blacked\ncategory: database\nmode: auto\nsteps:\n  - {name: s, command: 'true'}\n")
        .await;
    app.blackout_now(
        "freeze",
        json!({ "affected_runbooks": { "categories": ["database"] } }),
    )
    .await;
    let id = app.start_execution(json!({ "runbook_id": blacked })).await;
    let refused = app.wait_for_status(id, terminal, 30).await;
    assert_eq!(refused["refused_by"], "blackout", "{refused}");
    assert!(
        refused["error_message"]
            .as_str()
            .unwrap()
            .contains("freeze")
    );
    // A run that never started has no duration, and the stats average only runs that ran.
    assert_eq!(refused["started_at"], Value::Null, "{refused}");
    assert_eq!(refused["duration_ms"], Value::Null, "{refused}");
    let (_, stats) = app.get(&format!("/stats/executions/{blacked}")).await;
    assert_eq!(stats["total_executions"], 1, "{stats}");
    assert_eq!(stats["avg_duration_ms"], Value::Null, "{stats}");
    // The gate reads the runbook's category as it is when the run is admitted, as the blackout
    // check does: a run approved after its runbook moved into the frozen category is refused.
    let moved = "name: moved\ncategory: {}\nmode: semi_auto\napproval_roles: [admin]\nsteps:\n  - {name: s, command: 'true'}\n";
    let moved_id = app.runbook_from_yaml(&moved.replace("{}", "web")).await;
    let id = app.start_execution(json!({ "runbook_id": moved_id })).await;
    app.wait_awaiting_approval(id).await;
    assert_eq!(
        app.runbook_from_yaml(&moved.replace("{}", "database"))
            .await,
        moved_id
    );
    let (_, check) = app
        .get(&format!("/blackout-windows/check?runbook_id={moved_id}"))
        .await;
    assert_eq!(check["blacked_out"], true, "{check}");
    let (status, body) = app.approve(id, &app.admin_token).await;
    assert_eq!(status, 200, "{body}");
    let refused = app.wait_for_status(id, terminal, 30).await;
    assert_eq!(refused["refused_by"], "blackout", "{refused}");

    // Open circuit breaker.
    let broken = app
        .runbook_from_yaml("name: broken\nmode: auto\nsteps:\n  - {name: s, command: 'exit 1'}\n")
        .await;
    app.call(
        Method::PATCH,
        &format!("/circuit-breakers/{broken}"),
        Some(&app.admin_token),
        Some(json!({ "failure_threshold": 1 })),
    )
    .await;
    let id = app.start_execution(json!({ "runbook_id": broken })).await;
    assert_eq!(
        app.wait_for_status(id, terminal, 30).await["status"],
        "failed"
    );
    let (_, breaker) = app.get(&format!("/circuit-breakers/{broken}")).await;
    assert_eq!(breaker["state"], "open", "{breaker}");
    let id = app.start_execution(json!({ "runbook_id": broken })).await;
    let refused = app.wait_for_status(id, terminal, 30).await;
    assert_eq!(refused["refused_by"], "circuit_breaker", "{refused}");

    // Disabled runbook.
    let disabled = app
        .runbook_from_yaml("name: disabled-one\nmode: auto\nstatus: disabled\nsteps:\n  - {name: s, command: 'true'}\n")
        .await;
    let id = app.start_execution(json!({ "runbook_id": disabled })).await;
    let refused = app.wait_for_status(id, terminal, 30).await;
    assert_eq!(refused["refused_by"], "runbook_inactive", "{refused}");

    // A window for some servers (every runbook) does not cover a run on the worker's own host.
    app.blackout_now(
        "db hosts",
        json!({ "affected_servers": { "tags": ["role=db"] } }),
    )
    .await;
    let local = app
        .runbook_from_yaml(
            "name: local-only
mode: auto
steps:
  - {name: s, command: 'true'}
",
        )
        .await;
    let id = app.start_execution(json!({ "runbook_id": local })).await;
    let done = app.wait_for_status(id, terminal, 30).await;
    assert_eq!(done["status"], "completed", "{done}");
    worker.stop().await;
}

/// A window selecting servers by tag or environment refuses runs on the servers it selects and
/// no others; a server outside the runbook's allowed_servers is refused up front.
#[tokio::test]
async fn blackouts_and_allowed_servers_judge_the_run_by_its_server() {
    let app = common::spawn_app().await;
    let worker = common::TestWorker::start(&app.pool).await;
    let terminal = common::FINISHED;
    let server = |name: &str, tags: Value, environment: &str| {
        app.create_server(json!({ "name": name, "hostname": format!("{name}.example.test"),
                                  "username": "ops", "auth_type": "password", "password": "pw-not-used",
                                  "tags": tags, "environment": environment }))
    };
    let db1 = server("db1", json!(["managed", "role=db"]), "production").await;
    let web1 = server("web1", json!(["managed", "role=web"]), "production").await;
    let web2 = server("web2", json!(["managed", "role=web"]), "staging").await;
    for (name, servers) in [
        ("db freeze", json!({ "tags": ["role=db"] })),
        ("staging freeze", json!({ "environments": ["staging"] })),
    ] {
        app.blackout_now(name, json!({ "affected_servers": servers }))
            .await;
    }
    let runbook = app
        .runbook_from_yaml(
            "name: on-servers\nmode: auto\nallowed_servers: [managed]\nsteps:\n  - {name: s, command: 'true'}\n",
        )
        .await;
    for (server, window) in [(db1, "db freeze"), (web2, "staging freeze")] {
        let id = app
            .start_execution(json!({ "runbook_id": runbook, "server_id": server }))
            .await;
        let refused = app.wait_for_status(id, terminal, 30).await;
        assert_eq!(refused["refused_by"], "blackout", "{refused}");
        assert!(
            refused["error_message"].as_str().unwrap().contains(window),
            "{refused}"
        );
    }
    // web1 is in no window: the gates pass and the step runs (and fails: this worker has no
    // remote executor).
    let id = app
        .start_execution(json!({ "runbook_id": runbook, "server_id": web1 }))
        .await;
    let ran = app.wait_for_status(id, terminal, 30).await;
    assert_eq!(ran["status"], "failed", "{ran}");
    assert_eq!(ran["refused_by"], Value::Null, "{ran}");
    let (_, steps) = app.get(&format!("/executions/{id}/steps")).await;
    assert_eq!(steps.as_array().map(Vec::len), Some(1), "{steps}");

    // A server outside allowed_servers is refused when the run is asked for.
    let other = server("other1", json!(["role=web"]), "production").await;
    let (status, body) = app
        .call(
            Method::POST,
            "/executions",
            Some(&app.admin_token),
            Some(json!({ "runbook_id": runbook, "server_id": other })),
        )
        .await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(body["details"]["field"], "server_id", "{body}");

    // The object form: production web servers, or one listed by id.
    let scoped = app
        .runbook_from_yaml(&format!(
            "name: prod-web\nmode: auto\nallowed_servers:\n  tags: [role=web]\n  environments: [production]\n  server_ids: [{db1}]\nsteps:\n  - {{name: s, command: 'true'}}\n"
        ))
        .await;
    for (server, allowed) in [(web1, true), (other, true), (db1, true), (web2, false)] {
        let (status, body) = app
            .call(
                Method::POST,
                "/executions",
                Some(&app.admin_token),
                Some(json!({ "runbook_id": scoped, "server_id": server })),
            )
            .await;
        if allowed {
            assert_eq!(status, 201, "{server}: {body}");
        } else {
            assert_eq!(status, 422, "{server}: {body}");
            assert_eq!(body["details"]["field"], "server_id", "{body}");
        }
    }
    // Without a server a run takes the worker's own host: never for a runbook limited to some
    // servers, whoever asks.
    let (status, body) = app
        .call(
            Method::POST,
            "/executions",
            Some(&app.admin_token),
            Some(json!({ "runbook_id": scoped })),
        )
        .await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(body["details"]["field"], "server_id", "{body}");

    // A run on the worker's own host runs its commands as the worker's user, who can reach the
    // platform's database and key: only an admin may start one.
    let anywhere = app
        .runbook_from_yaml(
            "name: anywhere
mode: auto
steps:
  - {name: s, command: 'true'}
",
        )
        .await;
    let stored = || async {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM runbook_executions")
            .fetch_one(&app.pool)
            .await
            .unwrap()
    };
    let before = stored().await;
    for role in ["operator", "engineer"] {
        let (_, token) = app.user_with_role(role).await;
        let (status, body) = app
            .call(
                Method::POST,
                "/executions",
                Some(&token),
                Some(json!({ "runbook_id": anywhere })),
            )
            .await;
        assert_eq!(status, 403, "{role}: {body}");
        assert_eq!(body["details"]["field"], "server_id", "{role}: {body}");
        // On a server, the same role may.
        let (status, body) = app
            .call(
                Method::POST,
                "/executions",
                Some(&token),
                Some(json!({ "runbook_id": anywhere, "server_id": web1 })),
            )
            .await;
        assert_eq!(status, 201, "{role}: {body}");
    }
    assert_eq!(
        stored().await,
        before + 2,
        "only the runs on a server were stored"
    );
    let id = app.start_execution(json!({ "runbook_id": anywhere })).await;
    let done = app.wait_for_status(id, terminal, 30).await;
    assert_eq!(
        done["status"], "completed",
        "an admin's run on the worker's host: {done}"
    );
    worker.stop().await;
}

/// A reject or cancel reason is stored and audited: the run's secrets written into it are
/// masked, both the runbook's as written and those given at start (sealed). One over the
/// limit is refused by name.
#[tokio::test]
async fn reasons_are_stored_with_the_runs_secrets_masked() {
    let app = common::spawn_app().await;
    let worker = common::TestWorker::start(&app.pool).await;
    let runbook = app
        .runbook_from_yaml("name: reasons\nmode: semi_auto\napproval_roles: [admin]\nenvironment_vars:\n  API_TOKEN: \"tok-literal-123\"\n  DB_PASSWORD: \"\"\nsteps:\n  - {name: s, command: 'true'}\n")
        .await;
    for (action, verb) in [
        ("execution_reject", "reject"),
        ("execution_cancel", "cancel"),
    ] {
        let id = app
            .start_execution(json!({ "runbook_id": runbook,
                                     "variables": { "DB_PASSWORD": "sealed-pw-456" } }))
            .await;
        app.wait_awaiting_approval(id).await;
        // A reason longer than the limit is refused by name, and the run keeps waiting.
        let (status, body) = app
            .call(
                Method::POST,
                &format!("/executions/{id}/{verb}"),
                Some(&app.admin_token),
                Some(json!({ "reason": "r".repeat(2001) })),
            )
            .await;
        assert_eq!(status, 422, "{verb}: {body}");
        assert_eq!(body["details"]["field"], "reason", "{verb}: {body}");
        let (_, waiting) = app.get(&format!("/executions/{id}")).await;
        assert_eq!(waiting["status"], "pending", "{waiting}");
        let (status, body) = app
            .call(
                Method::POST,
                &format!("/executions/{id}/{verb}"),
                Some(&app.admin_token),
                Some(json!({ "reason": "leaked tok-literal-123 and sealed-pw-456" })),
            )
            .await;
        assert_eq!(status, 200, "{body}");
        let message = body["error_message"].as_str().unwrap_or_default();
        assert!(message.contains("leaked ********"), "{body}");
        let audit = app.audit_rows(action).await;
        let stored = format!("{body} {:?}", audit[0].3);
        for secret in ["tok-literal-123", "sealed-pw-456"] {
            assert!(!stored.contains(secret), "{verb}: {stored}");
        }
    }
    worker.stop().await;
}

#[tokio::test]
async fn approvals_need_a_permitted_role_and_can_be_rejected_or_expire() {
    let app = common::spawn_app().await;
    let worker = common::TestWorker::start(&app.pool).await;
    let terminal = common::FINISHED;
    let runbook = app
        .runbook_from_yaml("name: needs-ok\nmode: semi_auto\napproval_roles: [engineer]\nsteps:\n  - {name: s, command: 'echo ran'}\n")
        .await;
    let id = app.start_execution(json!({ "runbook_id": runbook })).await;
    let e = app.wait_awaiting_approval(id).await;
    assert_eq!(e["status"], "pending");
    let (_, operator) = app.user_with_role("operator").await;
    let (status, body) = app.approve(id, &operator).await;
    assert_eq!(status, 403, "operator is not in approval_roles: {body}");
    // Admin is not listed either: approval_roles is the whole list.
    let (status, _) = app.approve(id, &app.admin_token).await;
    assert_eq!(status, 403);
    let (engineer_id, engineer) = app.user_with_role("engineer").await;
    let (status, body) = app.approve(id, &engineer).await;
    assert_eq!(status, 200, "{body}");
    let (status, _) = app.approve(id, &engineer).await;
    assert_eq!(status, 409, "a second approval is refused");
    let done = app.wait_for_status(id, terminal, 30).await;
    assert_eq!(done["status"], "completed", "{done}");
    assert_eq!(done["approved_by"], json!(engineer_id));
    assert_eq!(app.audit_rows("execution_approve").await.len(), 1);
    // The decision retires the approval's timer instead of leaving it queued.
    let expiry_state = |id| timer_state(&app, id, "approval_expiry");
    assert_eq!(expiry_state(id).await, "cancelled");

    // Reject.
    let id = app.start_execution(json!({ "runbook_id": runbook })).await;
    app.wait_awaiting_approval(id).await;
    let reject = |token: String| {
        let app = &app;
        async move {
            app.call(
                Method::POST,
                &format!("/executions/{id}/reject"),
                Some(&token),
                Some(json!({ "reason": "not now" })),
            )
            .await
        }
    };
    let (status, body) = reject(operator.clone()).await;
    assert_eq!(status, 403, "operator is not in approval_roles: {body}");
    assert!(app.audit_rows("execution_reject").await.is_empty());
    let (status, body) = reject(engineer.clone()).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["status"], "cancelled");
    assert_eq!(body["refused_by"], "approval_rejected");
    let audited = app.audit_rows("execution_reject").await;
    assert_eq!(audited.len(), 1, "{audited:?}");
    assert_eq!(expiry_state(id).await, "cancelled");
    let (status, _) = reject(engineer.clone()).await;
    assert_eq!(status, 409, "a rejected run cannot be rejected again");
    let (status, _) = app.approve(id, &engineer).await;
    assert_eq!(status, 409, "nor approved");

    // Expiry.
    let quick = app
        .runbook_from_yaml("name: expires\nmode: manual\nrequires_approval: true\nconfig:\n  approval_timeout_seconds: 1\nsteps:\n  - {name: s, command: 'true'}\n")
        .await;
    let id = app.start_execution(json!({ "runbook_id": quick })).await;
    let expired = app.wait_for_status(id, terminal, 30).await;
    assert_eq!(expired["status"], "cancelled");
    assert_eq!(expired["refused_by"], "approval_expired", "{expired}");
    let (status, body) = app.approve(id, &app.admin_token).await;
    assert_eq!(status, 409, "an expired approval cannot be given: {body}");

    // The reason is optional: a JSON cancel with an empty body is fine.
    let id = app.start_execution(json!({ "runbook_id": runbook })).await;
    app.wait_awaiting_approval(id).await;
    let resp = app
        .client
        .post(app.api(&format!("/executions/{id}/cancel")))
        .bearer_auth(&engineer)
        .header("content-type", "application/json")
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let body: Value = resp.json().await.unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["status"], "cancelled", "{body}");
    // It never started: no summary of steps.
    assert!(body.get("output_summary").is_none(), "{body}");
    assert_eq!(expiry_state(id).await, "cancelled");
    // So is no body at all, without a Content-Type, as a generated client sends it; a body
    // without a Content-Type is still refused.
    for (action, expected) in [("reject", "approval_rejected"), ("cancel", "cancelled")] {
        let id = app.start_execution(json!({ "runbook_id": runbook })).await;
        app.wait_awaiting_approval(id).await;
        let url = app.api(&format!("/executions/{id}/{action}"));
        let resp = app
            .client
            .post(&url)
            .bearer_auth(&engineer)
            .body("{}")
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), 415, "{action}");
        let (status, body) = app
            .call(
                Method::POST,
                &format!("/executions/{id}/{action}"),
                Some(&engineer),
                None,
            )
            .await;
        assert_eq!(status, 200, "{action}: {body}");
        assert_eq!(body["status"], "cancelled", "{body}");
        if action == "reject" {
            assert_eq!(body["refused_by"], expected, "{body}");
        }
    }

    // Deleting the runbook cancels its runs that wait for approval, saying why.
    let id = app.start_execution(json!({ "runbook_id": runbook })).await;
    app.wait_awaiting_approval(id).await;
    let (status, _) = app
        .call(
            Method::DELETE,
            &format!("/runbooks/{runbook}"),
            Some(&app.admin_token),
            None,
        )
        .await;
    assert_eq!(status, 204);
    let (_, gone) = app.get(&format!("/executions/{id}")).await;
    assert_eq!(gone["status"], "cancelled", "{gone}");
    assert_eq!(
        gone["error_message"], "runbook needs-ok was deleted while the run waited for approval",
        "{gone}"
    );
    let (status, body) = app.approve(id, &engineer).await;
    assert_eq!(status, 409, "nothing is left to approve: {body}");
    worker.stop().await;
}

#[tokio::test]
async fn live_events_stream_status_and_output() {
    let app = common::spawn_app().await;
    let worker = common::TestWorker::start(&app.pool).await;
    let runbook = app
        .runbook_from_yaml("name: chatty\nmode: auto\nsteps:\n  - {name: a, command: 'echo line-one; echo line-two'}\n  - {name: b, command: 'echo from-b >&2'}\n")
        .await;
    let id = app.start_execution(json!({ "runbook_id": runbook })).await;
    let resp = app
        .client
        .get(app.api(&format!("/executions/{id}/events")))
        .bearer_auth(&app.admin_token)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(
        resp.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    let body = tokio::time::timeout(std::time::Duration::from_secs(30), resp.text())
        .await
        .expect("the stream ends when the execution is done")
        .unwrap();
    let datas: Vec<Value> = body
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    let stdout: String = datas
        .iter()
        .filter(|d| d["kind"] == "stdout")
        .map(|d| d["data"].as_str().unwrap())
        .collect();
    assert!(stdout.contains("line-one\nline-two\n"), "{body}");
    assert!(
        datas
            .iter()
            .any(|d| d["kind"] == "stderr" && d["data"] == "from-b\n"),
        "{body}"
    );
    assert!(body.contains("event: status"));
    assert!(datas.iter().any(|d| d["kind"] == "status" && d["data"].as_str().unwrap().contains("\"completed\"")));
    // Each event as its schema writes it: a step's events name the attempt, the execution's
    // own leave the field out (never `null`).
    for d in &datas {
        match d.get("step_execution_id") {
            Some(v) => assert!(v.is_string(), "{d}"),
            None => assert_eq!(d["kind"], "status", "{d}"),
        }
    }
    assert!(
        datas.iter().any(|d| d.get("step_execution_id").is_none()),
        "{body}"
    );
    worker.stop().await;
}

/// A live stream outlives neither its token nor its user's access: revoking the token ends it
/// while the run goes on.
#[tokio::test]
async fn a_live_stream_ends_when_its_token_is_revoked() {
    let app = common::spawn_app().await;
    let worker = common::TestWorker::start(&app.pool).await;
    let runbook = app
        .runbook_from_yaml("name: long-live\nmode: auto\nsteps:\n  - {name: nap, command: 'while true; do echo tick; sleep 0.2; done', timeout_seconds: 120}\n")
        .await;
    let id = app.start_execution(json!({ "runbook_id": runbook })).await;
    let (status, token) = app
        .call(
            Method::POST,
            "/tokens",
            Some(&app.admin_token),
            Some(json!({ "name": "stream" })),
        )
        .await;
    assert_eq!(status, 201, "{token}");
    let secret = token["token"].as_str().unwrap().to_owned();
    let resp = app
        .client
        .get(app.api(&format!("/executions/{id}/events")))
        .bearer_auth(&secret)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let body = tokio::spawn(resp.text());
    app.wait_step_running(id, "nap").await;
    let (status, _) = app
        .call(
            Method::DELETE,
            &format!("/tokens/{}", token["info"]["id"].as_str().unwrap()),
            Some(&app.admin_token),
            None,
        )
        .await;
    assert_eq!(status, 204);
    let text = tokio::time::timeout(std::time::Duration::from_secs(15), body)
        .await
        .expect("the stream ends once its token is revoked")
        .unwrap()
        .unwrap();
    assert!(text.contains("tick"), "{text}");
    let (_, e) = app.get(&format!("/executions/{id}")).await;
    assert_eq!(e["status"], "running", "the run goes on: {e}");
    app.call(
        Method::POST,
        &format!("/executions/{id}/cancel"),
        Some(&app.admin_token),
        None,
    )
    .await;
    app.wait_for_status(id, common::FINISHED, 30).await;
    worker.stop().await;
}

/// A cancel ends the execution before the worker has recorded the step it stopped: the stream
/// stays open until that step's final status is sent. A reconnecting client's `Last-Event-ID`
/// resumes after that event.
#[tokio::test]
async fn live_stream_carries_the_step_a_cancel_stopped_and_resumes_after_last_event_id() {
    let app = common::spawn_app().await;
    let worker = common::TestWorker::start(&app.pool).await;
    let runbook = app
        .runbook_from_yaml("name: stopped-live\nmode: auto\nsteps:\n  - {name: warm, command: 'echo warming'}\n  - {name: nap, command: 'echo napping; trap \"sleep 1; exit 143\" TERM; sleep 60 & wait', timeout_seconds: 120}\n")
        .await;
    let id = app.start_execution(json!({ "runbook_id": runbook })).await;
    let stream = |last_event_id: Option<i64>| {
        let mut req = app
            .client
            .get(app.api(&format!("/executions/{id}/events")))
            .bearer_auth(&app.admin_token);
        if let Some(last) = last_event_id {
            req = req.header("Last-Event-ID", last.to_string());
        }
        async move {
            let resp = req.send().await.unwrap();
            assert_eq!(resp.status(), 200);
            let body = tokio::time::timeout(std::time::Duration::from_secs(60), resp.text())
                .await
                .expect("the stream ends")
                .unwrap();
            body.lines()
                .filter_map(|l| l.strip_prefix("data: "))
                .map(|d| serde_json::from_str::<Value>(d).unwrap())
                .collect::<Vec<Value>>()
        }
    };
    let live = tokio::spawn(stream(None));
    // Cancel once the second step runs.
    app.wait_step_running(id, "nap").await;
    let (status, body) = app
        .call(
            Method::POST,
            &format!("/executions/{id}/cancel"),
            Some(&app.admin_token),
            Some(json!({ "reason": "enough" })),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    // The cancelled run says how far it got.
    assert_eq!(
        body["output_summary"],
        "attempt 1 of 1: 1 step(s) completed, 0 skipped, 0 failed attempt(s)",
        "{body}"
    );
    let events = live.await.unwrap();
    let status_of = |e: &Value| -> Option<(String, String)> {
        let data: Value = serde_json::from_str(e["data"].as_str()?).ok()?;
        Some((
            data["step"].as_str()?.to_owned(),
            data["status"].as_str()?.to_owned(),
        ))
    };
    assert!(
        events
            .iter()
            .filter(|e| e["kind"] == "status")
            .filter_map(status_of)
            .any(|(step, status)| step == "nap" && status == "cancelled"),
        "the stopped step's final status was not streamed: {events:?}"
    );
    let ids: Vec<i64> = events.iter().map(|e| e["id"].as_i64().unwrap()).collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "{ids:?}");

    // Resume after the first event: everything after it, nothing before or again.
    let resumed = stream(Some(ids[0])).await;
    let resumed_ids: Vec<i64> = resumed.iter().map(|e| e["id"].as_i64().unwrap()).collect();
    assert_eq!(resumed_ids, ids[1..].to_vec());
    worker.stop().await;
}

/// A runbook whose one step succeeds while the file `flag` exists, with its breaker set to
/// `settings` (failure_threshold, success_threshold, reset_timeout_seconds).
async fn flag_runbook(
    app: &common::TestApp,
    name: &str,
    flag: &std::path::Path,
    settings: Value,
) -> uuid::Uuid {
    let yaml = format!(
        "name: {name}\nmode: auto\nenvironment_vars:\n  FLAG: \"{}\"\nsteps:\n  - name: check\n    command: test -e {{{{ FLAG }}}}\n",
        flag.display()
    );
    let runbook = app.runbook_from_yaml(&yaml).await;
    let (status, body) = app
        .call(
            Method::PATCH,
            &format!("/circuit-breakers/{runbook}"),
            Some(&app.admin_token),
            Some(settings),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    runbook
}

/// Real runs drive the breaker: it stays closed below failure_threshold consecutive failures
/// (a success in between starts the count again), opens at the threshold and refuses runs; after
/// the reset timeout a probe is admitted, and a failing probe opens it again at once.
#[tokio::test]
async fn breaker_opens_at_its_threshold_and_a_failing_probe_reopens_it() {
    let app = common::spawn_app().await;
    let worker = common::TestWorker::start(&app.pool).await;
    let terminal = common::FINISHED;
    let dir = scratch();
    let flag = dir.join("healthy");
    let runbook = flag_runbook(
        &app,
        "flaky",
        &flag,
        json!({ "failure_threshold": 2, "success_threshold": 1, "reset_timeout_seconds": 4 }),
    )
    .await;
    let run = || async {
        let id = app.start_execution(json!({ "runbook_id": runbook })).await;
        app.wait_for_status(id, terminal, 30).await
    };
    let breaker = || async {
        let (_, b) = app.get(&format!("/circuit-breakers/{runbook}")).await;
        b
    };
    assert_eq!(run().await["status"], "failed");
    let b = breaker().await;
    assert_eq!(
        (b["state"].clone(), b["failure_count"].clone()),
        (json!("closed"), json!(1)),
        "{b}"
    );
    std::fs::write(&flag, "").unwrap();
    assert_eq!(run().await["status"], "completed");
    assert_eq!(
        breaker().await["failure_count"],
        0,
        "a success resets the count"
    );
    std::fs::remove_file(&flag).unwrap();
    assert_eq!(run().await["status"], "failed");
    assert_eq!(breaker().await["state"], "closed");
    assert_eq!(run().await["status"], "failed");
    let b = breaker().await;
    assert_eq!(b["state"], "open", "{b}");
    // Its times come from one clock, the database's: the opening failure's transaction.
    assert_eq!(b["opened_at"], b["updated_at"], "{b}");
    assert_eq!(b["last_failure_at"], b["updated_at"], "{b}");
    let refused = run().await;
    assert_eq!(refused["refused_by"], "circuit_breaker", "{refused}");

    // Half-open after the timeout; the probe fails and opens it again.
    let opened = chrono::DateTime::parse_from_rfc3339(b["opened_at"].as_str().unwrap()).unwrap();
    while chrono::Utc::now() < opened + chrono::Duration::milliseconds(4100) {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let probe = run().await;
    assert_eq!(probe["status"], "failed", "{probe}");
    let b = breaker().await;
    assert_eq!(b["state"], "open", "{b}");
    let reopened = chrono::DateTime::parse_from_rfc3339(b["opened_at"].as_str().unwrap()).unwrap();
    assert!(reopened > opened, "{b}");
    assert_eq!(run().await["refused_by"], "circuit_breaker");
    worker.stop().await;
}

#[tokio::test]
async fn open_breaker_half_opens_after_its_timeout_and_a_good_probe_closes_it() {
    let app = common::spawn_app().await;
    let worker = common::TestWorker::start(&app.pool).await;
    let terminal = common::FINISHED;
    let dir = scratch();
    let flag = dir.join("healthy");
    let runbook = flag_runbook(
        &app,
        "probe-me",
        &flag,
        json!({ "failure_threshold": 1, "success_threshold": 1, "reset_timeout_seconds": 3 }),
    )
    .await;
    let id = app.start_execution(json!({ "runbook_id": runbook })).await;
    assert_eq!(
        app.wait_for_status(id, terminal, 30).await["status"],
        "failed"
    );
    let (_, b) = app.get(&format!("/circuit-breakers/{runbook}")).await;
    assert_eq!(b["state"], "open");
    let opened = chrono::DateTime::parse_from_rfc3339(b["opened_at"].as_str().unwrap()).unwrap();

    // After the reset timeout the next run is admitted as a probe; it succeeds and closes it.
    std::fs::write(&flag, "").unwrap();
    while chrono::Utc::now() < opened + chrono::Duration::milliseconds(3100) {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    // Before any run asks: the API already shows it half-open, from the instant it became so.
    let (_, b) = app.get(&format!("/circuit-breakers/{runbook}")).await;
    assert_eq!(b["state"], "half_open", "{b}");
    assert_eq!(b["success_count"], 0, "{b}");
    let half_open_at =
        chrono::DateTime::parse_from_rfc3339(b["half_open_at"].as_str().unwrap()).unwrap();
    assert_eq!(half_open_at, opened + chrono::Duration::seconds(3));
    let listed = |state: &'static str| {
        let app = &app;
        async move {
            let (status, page) = app.get(&format!("/circuit-breakers?state={state}")).await;
            assert_eq!(status, 200, "{page}");
            page["items"]
                .as_array()
                .unwrap()
                .iter()
                .any(|b| b["runbook_id"] == json!(runbook))
        }
    };
    assert!(listed("half_open").await);
    assert!(!listed("open").await);
    let id = app.start_execution(json!({ "runbook_id": runbook })).await;
    assert_eq!(
        app.wait_for_status(id, terminal, 30).await["status"],
        "completed"
    );
    let probe: bool =
        sqlx::query_scalar("SELECT breaker_probe FROM runbook_executions WHERE id = $1")
            .bind(id)
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert!(probe);
    let (_, b) = app.get(&format!("/circuit-breakers/{runbook}")).await;
    assert_eq!(b["state"], "closed", "{b}");
    worker.stop().await;
}

/// Output holding NUL bytes (`find -print0`, `/proc/*/cmdline`) is recorded, NUL written as
/// `␀`, stored and live alike; the step completes once and its command runs once.
#[tokio::test]
async fn a_step_printing_nul_bytes_completes_and_runs_once() {
    let app = common::spawn_app().await;
    let worker = common::TestWorker::start(&app.pool).await;
    let dir = scratch();
    let log = dir.join("runs");
    let yaml = format!(
        "name: nul-output\nmode: auto\nsteps:\n  - name: n\n    command: |\n      echo run >> {log}\n      \
         printf 'a\\000b\\n'\n      printf 'c\\000' >&2\n",
        log = log.display()
    );
    let runbook = app.runbook_from_yaml(&yaml).await;
    let id = app.start_execution(json!({ "runbook_id": runbook })).await;
    let done = app.wait_for_status(id, common::FINISHED, 30).await;
    assert_eq!(done["status"], "completed", "{done}");
    assert_eq!(read(&log), "run\n", "the command ran once");
    let steps = app.steps(id).await;
    assert_eq!(steps.len(), 1, "{steps:?}");
    assert_eq!(steps[0]["stdout"], "a\u{2400}b\n");
    assert_eq!(steps[0]["stderr"], "c\u{2400}");
    let live: Vec<String> = sqlx::query_scalar(
        "SELECT data FROM execution_events WHERE execution_id = $1 AND kind = 'stdout'",
    )
    .bind(id)
    .fetch_all(&app.pool)
    .await
    .unwrap();
    assert_eq!(live.concat(), "a\u{2400}b\n", "{live:?}");
    worker.stop().await;
}

/// A cancel racing the end of a run: the step's end locks the execution before the deadline
/// timer's job, as a cancel does, so the two never deadlock. Here the step's end commits first
/// (the test holds the timer's row until both wait), the cancel then finds the run completed,
/// and the step is recorded as it ended.
#[tokio::test]
async fn a_cancel_racing_the_end_of_a_run_waits_for_it_instead_of_deadlocking() {
    let app = common::spawn_app().await;
    let worker = common::TestWorker::start(&app.pool).await;
    let runbook = app
        .runbook_from_yaml("name: race\nmode: auto\nsteps:\n  - {name: s, command: 'sleep 1'}\n")
        .await;
    let id = app.start_execution(json!({ "runbook_id": runbook })).await;
    app.wait_for_status(id, &["running"], 30).await;
    let mut holder = app.pool.begin().await.unwrap();
    let _: i64 = sqlx::query_scalar("SELECT id FROM jobs WHERE unique_key = $1 FOR UPDATE")
        .bind(format!("execution:{id}:deadline"))
        .fetch_one(&mut *holder)
        .await
        .unwrap();
    let waiting = |n: i64| {
        let pool = app.pool.clone();
        async move {
            for _ in 0..300 {
                let waiting: i64 = sqlx::query_scalar(
                    "SELECT count(*) FROM pg_stat_activity \
                     WHERE datname = current_database() AND wait_event_type = 'Lock'",
                )
                .fetch_one(&pool)
                .await
                .unwrap();
                if waiting >= n {
                    return;
                }
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
            panic!("fewer than {n} statements wait for a lock");
        }
    };
    // The step's end waits (for the timer's row, or for the execution row it holds).
    waiting(1).await;
    let cancel = {
        let request = app
            .client
            .post(app.api(&format!("/executions/{id}/cancel")))
            .bearer_auth(&app.admin_token)
            .json(&json!({ "reason": "racing the end" }));
        tokio::spawn(async move { request.send().await.unwrap().status().as_u16() })
    };
    waiting(2).await;
    holder.commit().await.unwrap();
    assert_eq!(cancel.await.unwrap(), 409, "the run had completed");
    let done = app.wait_for_status(id, common::FINISHED, 30).await;
    assert_eq!(done["status"], "completed", "{done}");
    let steps = app.steps(id).await;
    assert_eq!(steps.len(), 1, "{steps:?}");
    assert_eq!(steps[0]["status"], "completed", "{steps:?}");
    worker.stop().await;
}

/// A run cancelled while it waits to begin its next runbook attempt says how the attempt
/// before went, and that the next had not begun.
#[tokio::test]
async fn a_run_cancelled_before_its_retry_began_summarizes_the_attempt_that_ran() {
    let app = common::spawn_app().await;
    let worker = common::TestWorker::start(&app.pool).await;
    let runbook = app
        .runbook_from_yaml(
            "name: retry-later\nmode: auto\nmax_retries: 1\nretry_delay_seconds: 60\nsteps:\n  \
             - {name: ok, command: 'true'}\n  - {name: bad, command: 'exit 3'}\n",
        )
        .await;
    let id = app.start_execution(json!({ "runbook_id": runbook })).await;
    for _ in 0..300 {
        let (_, e) = app.get(&format!("/executions/{id}")).await;
        if e["attempt"] == 2 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let (status, body) = app
        .call(
            Method::POST,
            &format!("/executions/{id}/cancel"),
            Some(&app.admin_token),
            None,
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["attempt"], 2, "{body}");
    assert_eq!(
        body["output_summary"],
        "attempt 2 of 2 had not begun; attempt 1: 1 step(s) completed, 0 skipped, 1 failed attempt(s)",
        "{body}"
    );
    worker.stop().await;
}
