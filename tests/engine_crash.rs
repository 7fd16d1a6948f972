//! Crash recovery with real processes: a worker process is killed with SIGKILL during step 2 of a
//! 4-step runbook whose steps append to a file; another worker finishes the run. Step 1 does not
//! run again (the file proves it), step 2 runs again and its interrupted attempt is recorded.
//! The commands a SIGKILLed worker was running die with it (its lifeline process ends them), so
//! they do not overlap the step's next run on another worker.
//! A worker stopped with SIGTERM whose grace period ends mid-step kills the step's command and
//! everything it started, and releases the step to other workers.

mod common;
mod procs;

use std::time::Duration;

use serde_json::json;

/// Runs the 4-step appending runbook `name` (step 2 sleeps `sleep_seconds`) on a worker
/// process with a 2 s lease, and kills that worker with SIGKILL once step 2 has appended to
/// `file` and its first output line has reached the live log; returns the execution.
async fn killed_during_step_two(
    app: &common::TestApp,
    name: &str,
    file: &std::path::Path,
    sleep_seconds: u32,
) -> uuid::Uuid {
    let runbook = app
        .runbook_from_yaml(&common::appending_runbook(name, file, sleep_seconds))
        .await;
    let mut doomed = app
        .worker_command(&["--concurrency", "2", "--lease-seconds", "2"])
        .env("AIOPS_LOG", "warn")
        .spawn()
        .unwrap();
    let id = app.start_execution(json!({ "runbook_id": runbook })).await;
    common::wait_for_file(file, "1\n2\n").await;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let streamed: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM execution_events WHERE execution_id = $1 AND kind = 'stdout'",
        )
        .bind(id)
        .fetch_one(&app.pool)
        .await
        .unwrap();
        if streamed > 0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "step 2 streamed nothing"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    doomed.start_kill().unwrap(); // SIGKILL
    doomed.wait().await.unwrap();
    id
}

/// Waits until `path` exists (a step wrote it), at most 30 s; `what` names it in the failure.
async fn wait_until_exists(path: &std::path::Path, what: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !path.exists() {
        assert!(std::time::Instant::now() < deadline, "{what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Sends SIGTERM to a worker process and waits (at most 30 s) until it has stopped.
async fn stop_with_sigterm(worker: &mut tokio::process::Child) -> std::process::ExitStatus {
    let worker_pid = worker.id().unwrap().to_string();
    std::process::Command::new("kill")
        .args(["-TERM", &worker_pid])
        .status()
        .unwrap();
    tokio::time::timeout(Duration::from_secs(30), worker.wait())
        .await
        .expect("the worker stops after its grace period")
        .unwrap()
}

#[tokio::test]
async fn a_killed_worker_is_resumed_without_rerunning_completed_steps() {
    let app = common::spawn_app().await;
    let dir = common::Scratch::new("crash");
    let file = dir.join("steps");
    let id = killed_during_step_two(&app, "crash-me", &file, 4).await;

    let survivor = common::TestWorker::start(&app.pool).await;
    let done = app.wait_for_status(id, common::FINISHED, 60).await;
    assert_eq!(done["status"], "completed", "{done}");
    assert_eq!(
        std::fs::read_to_string(&file).unwrap(),
        "1\n2\n2\n3\n4\n",
        "step 1 ran once; step 2 ran again after the crash"
    );
    let steps = app.steps(id).await;
    let two: Vec<_> = steps.iter().filter(|s| s["step_name"] == "two").collect();
    assert_eq!(two.len(), 2, "{steps:?}");
    assert_eq!(two[0]["interrupted"], true);
    assert!(
        two[0]["error_message"]
            .as_str()
            .unwrap()
            .contains("interrupted")
    );
    // The interrupted attempt keeps what it streamed and the command it ran.
    assert_eq!(two[0]["stdout"], "two started\n", "{:?}", two[0]);
    assert_eq!(two[0]["command"], two[1]["command"], "{:?}", two[0]);
    assert!(
        two[0]["command"]
            .as_str()
            .unwrap()
            .starts_with("echo 2 >> "),
        "{:?}",
        two[0]
    );
    assert_eq!(two[1]["status"], "completed");
    // Run again as the same try: a crash does not use up one of the step's retries.
    assert_eq!(two[0]["retry_attempt"], 0);
    assert_eq!(two[1]["retry_attempt"], 0);
    assert_eq!(steps.iter().filter(|s| s["step_name"] == "one").count(), 1);
    // The log says which step was interrupted, by name and position.
    let interrupted: Vec<&serde_json::Value> = done["execution_log"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["event"] == "step_interrupted")
        .collect();
    assert_eq!(interrupted.len(), 1, "{done}");
    assert_eq!(interrupted[0]["details"]["step"], "two", "{done}");
    assert_eq!(interrupted[0]["details"]["step_order"], 2, "{done}");
    // The live stream gets the interrupted attempt's end too, not only its start.
    let ended: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM execution_events WHERE step_execution_id = $1::text::uuid \
         AND kind = 'status' AND (data::jsonb)->>'interrupted' = 'true'",
    )
    .bind(two[0]["id"].as_str().unwrap())
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(ended, 1);
    survivor.stop().await;
}

/// A run cancelled while the worker of its running step is dead: when another worker takes
/// the step's job up, it finds the run ended and records the dead worker's attempt as
/// interrupted instead of leaving it running for good.
#[tokio::test]
async fn a_run_cancelled_while_its_steps_worker_is_dead_leaves_no_attempt_running() {
    let app = common::spawn_app().await;
    let dir = common::Scratch::new("crash-cancel");
    let file = dir.join("steps");
    let id = killed_during_step_two(&app, "crash-cancel", &file, 30).await;
    let (status, body) = app
        .call(
            reqwest::Method::POST,
            &format!("/executions/{id}/cancel"),
            Some(&app.admin_token),
            None,
        )
        .await;
    assert_eq!(status, 200, "{body}");

    let survivor = common::TestWorker::start(&app.pool).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let two = loop {
        let steps = app.steps(id).await;
        let two: Vec<_> = steps
            .into_iter()
            .filter(|s| s["step_name"] == "two")
            .collect();
        if two.iter().all(|s| s["status"] != "running") {
            break two;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "still running: {two:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(two.len(), 1, "{two:?}");
    assert_eq!(two[0]["interrupted"], true, "{two:?}");
    assert_eq!(two[0]["stdout"], "two started\n", "{two:?}");
    assert_eq!(
        std::fs::read_to_string(&file).unwrap(),
        "1\n2\n",
        "nothing ran after the cancel"
    );
    survivor.stop().await;
}

#[tokio::test]
async fn a_killed_workers_local_commands_die_with_it() {
    let app = common::spawn_app().await;
    let dir = common::Scratch::new("orphan");
    let pidfile = dir.join("pid");
    let runbook = app
        .runbook_from_yaml(&common::background_sleep_runbook("orphan-me", &pidfile))
        .await;
    let mut doomed = app.worker_command(&[]).spawn().unwrap();
    app.start_execution(json!({ "runbook_id": runbook })).await;
    let pid = procs::wait_for_pid(&pidfile, Duration::from_secs(30)).await;
    let lifeline = procs::children(doomed.id().unwrap() as i32)
        .into_iter()
        .find(|child| procs::cmdline(*child).ends_with(&["lifeline".to_owned()]))
        .expect("the worker runs a lifeline process");

    // It holds nothing of the worker's environment.
    let environ = std::fs::read(format!("/proc/{lifeline}/environ")).unwrap();
    assert!(
        !String::from_utf8_lossy(&environ).contains("DATABASE_URL"),
        "the lifeline got the worker's environment"
    );
    // A stop signal sent to every process of the service does not end the lifeline early.
    for signal in ["-TERM", "-INT", "-HUP"] {
        let sent = std::process::Command::new("kill")
            .args([signal, &lifeline.to_string()])
            .status()
            .unwrap();
        assert!(sent.success());
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(procs::alive(lifeline), "the lifeline died of a stop signal");

    doomed.start_kill().unwrap(); // SIGKILL: the worker cannot clean up
    doomed.wait().await.unwrap();
    assert!(
        procs::wait_gone(pid).await,
        "sleep {pid} outlived the worker killed while running it"
    );
    assert!(
        procs::wait_gone(lifeline).await,
        "the lifeline process {lifeline} did not exit after its worker"
    );
}

#[tokio::test]
async fn a_worker_stopping_mid_step_kills_the_command_and_releases_the_step() {
    let app = common::spawn_app().await;
    let dir = common::Scratch::new("stop");
    let pidfile = dir.join("pid");
    let runbook = app
        .runbook_from_yaml(&common::background_sleep_runbook("stop-me", &pidfile))
        .await;
    let mut worker = app
        .worker_command(&["--grace-seconds", "0.3"])
        .spawn()
        .unwrap();
    let id = app.start_execution(json!({ "runbook_id": runbook })).await;
    let pid = procs::wait_for_pid(&pidfile, Duration::from_secs(30)).await;
    let status = stop_with_sigterm(&mut worker).await;
    assert!(status.success(), "{status:?}");
    // The command's background process went with the step.
    assert!(
        procs::wait_gone(pid).await,
        "sleep {pid} outlived the worker that gave its step up"
    );
    // The step's job went back to the queue for another worker, its attempt not spent.
    let (state, errors): (String, serde_json::Value) = sqlx::query_as(
        "SELECT state, errors FROM jobs WHERE kind = 'execution.step' AND payload->>'execution_id' = $1",
    )
    .bind(id.to_string())
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(state, "available", "{errors}");
    assert!(
        errors.to_string().contains("released at worker shutdown"),
        "{errors}"
    );
}

/// A step whose worker let it go at shutdown runs again on another worker, and the attempt that
/// was stopped stays recorded as interrupted, as after a crash: the job starts again at attempt
/// 1, but it is not its first claim.
#[tokio::test]
async fn a_step_released_at_shutdown_keeps_its_interrupted_attempt() {
    let app = common::spawn_app().await;
    let dir = common::Scratch::new("release");
    let mark = dir.join("mark");
    let yaml = format!(
        "name: release-me\nmode: auto\nsteps:\n  - name: s\n    command: \"if [ -e {m} ]; then echo second; else touch {m}; echo first; sleep 30; fi\"\n",
        m = mark.display()
    );
    let runbook = app.runbook_from_yaml(&yaml).await;
    let mut worker = app
        .worker_command(&["--grace-seconds", "0.3"])
        .spawn()
        .unwrap();
    let id = app.start_execution(json!({ "runbook_id": runbook })).await;
    wait_until_exists(&mark, "the step never started").await;
    stop_with_sigterm(&mut worker).await;

    let survivor = common::TestWorker::start(&app.pool).await;
    let done = app.wait_for_status(id, common::FINISHED, 60).await;
    assert_eq!(done["status"], "completed", "{done}");
    let steps = app.steps(id).await;
    let rows: Vec<(bool, &str, &str)> = steps
        .iter()
        .map(|s| {
            (
                s["interrupted"].as_bool().unwrap_or(false),
                s["status"].as_str().unwrap(),
                s["stdout"].as_str().unwrap_or_default(),
            )
        })
        .collect();
    assert_eq!(
        rows,
        // The stopped attempt keeps the output it streamed before it was stopped.
        [
            (true, "failed", "first\n"),
            (false, "completed", "second\n")
        ],
        "{steps:?}"
    );
    survivor.stop().await;
}

/// A worker stopped with SIGTERM finishes its step within the grace period and gives the next
/// step back unstarted: that step runs once on another worker, with no attempt recorded as
/// interrupted, since none was.
#[tokio::test]
async fn a_step_given_back_unstarted_at_shutdown_records_no_interrupted_attempt() {
    let app = common::spawn_app().await;
    let dir = common::Scratch::new("handback");
    let started = dir.join("started");
    let log = dir.join("log");
    let yaml = format!(
        "name: hand-back\nmode: auto\nsteps:\n  - name: a\n    command: \"touch {s}; sleep 2; echo a >> {l}\"\n  \
         - name: b\n    command: \"echo b >> {l}\"\n",
        s = started.display(),
        l = log.display()
    );
    let runbook = app.runbook_from_yaml(&yaml).await;
    let mut worker = app
        .worker_command(&["--grace-seconds", "20"])
        .spawn()
        .unwrap();
    let id = app.start_execution(json!({ "runbook_id": runbook })).await;
    wait_until_exists(&started, "step a never started").await;
    let status = stop_with_sigterm(&mut worker).await;
    assert!(status.success(), "{status:?}");
    assert_eq!(std::fs::read_to_string(&log).unwrap(), "a\n", "b waits");

    // b's attempt starts when b does, not when a ended.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let survivor = common::TestWorker::start(&app.pool).await;
    let done = app.wait_for_status(id, common::FINISHED, 60).await;
    assert_eq!(done["status"], "completed", "{done}");
    assert_eq!(std::fs::read_to_string(&log).unwrap(), "a\nb\n");
    let steps = app.steps(id).await;
    let rows: Vec<(&str, &str, bool)> = steps
        .iter()
        .map(|s| {
            (
                s["step_name"].as_str().unwrap(),
                s["status"].as_str().unwrap(),
                s["interrupted"].as_bool().unwrap_or(false),
            )
        })
        .collect();
    assert_eq!(
        rows,
        [("a", "completed", false), ("b", "completed", false)],
        "{steps:?}"
    );
    let at = |s: &serde_json::Value, key: &str| {
        chrono::DateTime::parse_from_rfc3339(s[key].as_str().unwrap()).unwrap()
    };
    assert!(
        at(&steps[1], "started_at") - at(&steps[0], "completed_at") >= chrono::Duration::seconds(1),
        "{steps:?}"
    );
    survivor.stop().await;
}
