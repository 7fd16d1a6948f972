//! Step outcomes through the real engine and a real worker: expected exit codes, a durable step
//! retry that waits its delay as a scheduled job, output capped with a visible marker, and
//! captured output read back by a later step that runs on another worker.

mod common;

use serde_json::{Value, json};

const TERMINAL: &[&str] = common::FINISHED;

fn scratch() -> common::Scratch {
    common::Scratch::new("steps")
}

#[tokio::test]
async fn expected_exit_codes_decide_success() {
    let app = common::spawn_app().await;
    let worker = common::TestWorker::start(&app.pool).await;
    let runbook = app
        .runbook_from_yaml("name: exit-codes\nmode: auto\nsteps:\n  - {name: grep-miss, command: 'exit 1', expected_exit_codes: [0, 1]}\n  - {name: must-fail, command: 'true', expected_exit_codes: [2]}\n  - {name: never, command: 'true'}\n")
        .await;
    let id = app.start_execution(json!({ "runbook_id": runbook })).await;
    let done = app.wait_for_status(id, TERMINAL, 30).await;
    assert_eq!(done["status"], "failed", "{done}");
    let steps = app.steps(id).await;
    let run: Vec<&Value> = steps.iter().filter(|s| s["phase"] == "run").collect();
    assert_eq!(run.len(), 2, "{steps:?}");
    assert_eq!(run[0]["status"], "completed");
    assert_eq!(run[0]["exit_code"], 1);
    assert_eq!(run[1]["status"], "failed");
    assert_eq!(run[1]["exit_code"], 0);
    assert!(
        run[1]["error_message"]
            .as_str()
            .unwrap()
            .contains("exit code 0 is not one of the expected [2]"),
        "{:?}",
        run[1]
    );
    worker.stop().await;
}

#[tokio::test]
async fn a_step_retry_waits_its_delay_as_a_scheduled_job() {
    let app = common::spawn_app().await;
    let worker = common::TestWorker::start(&app.pool).await;
    let dir = scratch();
    let yaml = format!(
        "name: retry-later\nmode: auto\nenvironment_vars:\n  F: \"{}\"\nsteps:\n  - name: flaky\n    command: test -e {{{{ F }}}} || {{ touch {{{{ F }}}}; exit 1; }}\n    retry_count: 2\n    retry_delay_seconds: 2\n",
        dir.join("seen").display()
    );
    let runbook = app.runbook_from_yaml(&yaml).await;
    let id = app.start_execution(json!({ "runbook_id": runbook })).await;
    // While it waits, the retry is a job scheduled in the future, not a sleeping worker.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let waiting = loop {
        let scheduled: Option<f64> = sqlx::query_scalar(
            "SELECT extract(epoch FROM run_at - now())::float8 FROM jobs \
             WHERE kind = 'execution.step' AND state IN ('available', 'retryable') \
               AND payload->>'execution_id' = $1::text AND run_at > now()",
        )
        .bind(id)
        .fetch_optional(&app.pool)
        .await
        .unwrap();
        if let Some(left) = scheduled {
            break left;
        }
        assert!(std::time::Instant::now() < deadline, "no scheduled retry");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    assert!(waiting > 0.0 && waiting <= 2.0, "{waiting}");
    let done = app.wait_for_status(id, TERMINAL, 30).await;
    assert_eq!(done["status"], "completed", "{done}");
    let gap: f64 = sqlx::query_scalar(
        "SELECT extract(epoch FROM max(started_at) - min(completed_at))::float8 \
         FROM step_executions WHERE execution_id = $1",
    )
    .bind(id)
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert!(gap >= 1.9, "the retry started {gap} s after the failure");
    let steps = app.steps(id).await;
    let attempts: Vec<(Value, Value)> = steps
        .iter()
        .map(|s| (s["status"].clone(), s["retry_attempt"].clone()))
        .collect();
    assert_eq!(
        attempts,
        [(json!("failed"), json!(0)), (json!("completed"), json!(1))]
    );
    worker.stop().await;
}

#[tokio::test]
async fn output_over_the_cap_is_cut_with_a_visible_marker() {
    let app = common::spawn_app().await;
    let worker = common::TestWorker::start_adjusted(&app.pool, |o| {
        o.engine.output_limit_bytes = 1000;
    })
    .await;
    let runbook = app
        .runbook_from_yaml("name: chatty-cap\nmode: auto\nsteps:\n  - {name: flood, command: 'head -c 50000 /dev/zero | tr \"\\\\0\" a'}\n")
        .await;
    let id = app.start_execution(json!({ "runbook_id": runbook })).await;
    let done = app.wait_for_status(id, TERMINAL, 30).await;
    assert_eq!(done["status"], "completed", "{done}");
    let steps = app.steps(id).await;
    let stdout = steps[0]["stdout"].as_str().unwrap();
    assert!(stdout.starts_with(&"a".repeat(1000)), "{}", &stdout[..50]);
    assert!(
        stdout.ends_with("[aiops: output truncated at 1000 bytes; 49000 more bytes discarded]\n"),
        "{}",
        &stdout[1000..]
    );
    let truncated: bool =
        sqlx::query_scalar("SELECT truncated FROM step_executions WHERE execution_id = $1")
            .bind(id)
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert!(truncated);
    // The live stream says so too, where the cut happened.
    let live: String = sqlx::query_scalar(
        "SELECT string_agg(data, '' ORDER BY id) FROM execution_events \
         WHERE execution_id = $1 AND kind = 'stdout'",
    )
    .bind(id)
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert!(
        live.ends_with("[aiops: output truncated at 1000 bytes; the rest is discarded]\n"),
        "{}",
        &live[live.len().saturating_sub(120)..]
    );
    worker.stop().await;
}

/// Step 1 runs in one worker process, which is killed during step 2; another worker runs the
/// rest and step 3 still sees step 1's captured output: it is read back from the database, not
/// from the memory of the worker that captured it.
#[tokio::test]
async fn captured_output_reaches_a_step_on_another_worker() {
    let app = common::spawn_app().await;
    let dir = scratch();
    let gate = dir.join("go");
    let out = dir.join("out");
    let yaml = format!(
        "name: two-workers\nmode: auto\nenvironment_vars:\n  G: \"{}\"\n  O: \"{}\"\nsteps:\n  - {{name: measure, command: 'echo 42', capture_output: true}}\n  - {{name: wait, command: 'while ! test -e {{{{ G }}}}; do sleep 0.05; done'}}\n  - {{name: use, command: 'echo got-{{{{ steps.measure.stdout | trim }}}} > {{{{ O }}}}'}}\n",
        gate.display(),
        out.display()
    );
    let runbook = app.runbook_from_yaml(&yaml).await;
    let mut first = app
        .worker_command(&["--lease-seconds", "2"])
        .env("AIOPS_LOG", "warn")
        .spawn()
        .unwrap();
    let id = app.start_execution(json!({ "runbook_id": runbook })).await;
    app.wait_step_running(id, "wait").await;
    first.start_kill().unwrap(); // SIGKILL
    first.wait().await.unwrap();
    std::fs::write(&gate, "").unwrap();
    let second = common::TestWorker::start(&app.pool).await;
    let done = app.wait_for_status(id, TERMINAL, 60).await;
    assert_eq!(done["status"], "completed", "{done}");
    assert_eq!(std::fs::read_to_string(&out).unwrap(), "got-42\n");
    let workers: i64 = sqlx::query_scalar(
        "SELECT count(DISTINCT locked_by) FROM jobs \
         WHERE kind = 'execution.step' AND payload->>'execution_id' = $1::text",
    )
    .bind(id)
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(workers, 2, "steps ran on two workers");
    second.stop().await;
}

/// A captured step reads as its last attempt, whatever its end: one whose retry timed out is
/// seen with that attempt's output and exit code -1, not with the failed attempt before it.
#[tokio::test]
async fn a_captured_step_reads_as_its_last_attempt_even_when_it_timed_out() {
    let app = common::spawn_app().await;
    let worker = common::TestWorker::start(&app.pool).await;
    let dir = scratch();
    let yaml = format!(
        "name: capture-timeout\nmode: auto\nenvironment_vars:\n  F: \"{}\"\nsteps:\n  - name: flaky\n    command: if test -e {{{{ F }}}}; then echo attempt 2; sleep 30; else touch {{{{ F }}}}; echo attempt 1; exit 1; fi\n    capture_output: true\n    retry_count: 1\n    retry_delay_seconds: 0\n    timeout_seconds: 2\n    continue_on_failure: true\n  - name: report\n    command: echo flaky said {{{{ steps.flaky.stdout | trim }}}} exit {{{{ steps.flaky.exit_code }}}}\n",
        dir.join("seen").display()
    );
    let runbook = app.runbook_from_yaml(&yaml).await;
    let id = app.start_execution(json!({ "runbook_id": runbook })).await;
    let done = app.wait_for_status(id, TERMINAL, 60).await;
    assert_eq!(done["status"], "completed", "{done}");
    let steps = app.steps(id).await;
    let flaky: Vec<&str> = steps
        .iter()
        .filter(|s| s["step_name"] == "flaky")
        .map(|s| s["status"].as_str().unwrap())
        .collect();
    assert_eq!(flaky, ["failed", "timeout"], "{steps:?}");
    let report = steps.iter().find(|s| s["step_name"] == "report").unwrap();
    assert_eq!(
        report["stdout"], "flaky said attempt 2 exit -1\n",
        "{report}"
    );
    worker.stop().await;
}
