//! Crash recovery of the database itself: PostgreSQL stops abruptly (SIGQUIT to the postmaster,
//! as `pg_ctl stop -m immediate` does, so the restart goes through crash recovery) while step 2
//! of a 4-step runbook runs, and stays down until after the step's command has ended. The same
//! worker process survives the outage and finishes the run once the database is back: step 1 is
//! not run again and steps 3 and 4 run once. When the outage outlasts the lease, step 2 runs
//! again with its interrupted attempt recorded; when the server is back within the lease, the
//! worker records step 2's result on a new connection and step 2 is not run again. The worker
//! then runs new work.
//!
//! Each test needs a server of its own to stop, so it starts a private cluster with the
//! product's embedded-PostgreSQL code, whatever `DATABASE_URL` says.

mod common;
mod procs;

use std::time::Duration;

use aiops::startup::embedded_pg::EmbeddedPostgres;
use serde_json::{Value, json};

/// What a run that lived through the outage left: the file its steps appended to, and its
/// step attempt rows.
struct Survived {
    written: String,
    steps: Vec<Value>,
}

/// Runs the 4-step runbook (step 2 sleeping `step_two_sleep` seconds) on one worker with a
/// `lease_seconds` lease, crashes the database once step 2 has started, keeps it down for
/// `down`, starts it again and waits for the run to complete; then checks that the same worker
/// runs a new execution.
async fn crash_during_step_two(
    lease_seconds: &str,
    step_two_sleep: u32,
    down: Duration,
) -> Survived {
    let dir = std::env::temp_dir().join(format!("aiops-dbcrash-{}", uuid::Uuid::new_v4().simple()));
    let pg = EmbeddedPostgres::start(&dir, None)
        .await
        .expect("start a private cluster");
    let pgdata = pg.pgdata().to_path_buf();
    let app = common::spawn_app_on(pg.url(), |_| {}).await;
    let file = dir.join("steps");
    let yaml = common::appending_runbook("survive-the-database", &file, step_two_sleep);
    let runbook = app.runbook_from_yaml(&yaml).await;
    let mut worker = app
        .worker_command(&["--concurrency", "2", "--lease-seconds", lease_seconds])
        .spawn()
        .unwrap();
    let id = app.start_execution(json!({ "runbook_id": runbook })).await;

    common::wait_for_file(&file, "1\n2\n").await;

    // The database goes away mid-step, without a shutdown checkpoint.
    procs::crash_postmaster(&pgdata, "QUIT").await;
    // Its handle would stop the restarted server when dropped: it has nothing left to stop.
    drop(pg);
    tokio::time::sleep(down).await;
    assert!(
        worker.try_wait().unwrap().is_none(),
        "the worker exited while the database was down"
    );
    let pg = EmbeddedPostgres::start(&dir, None)
        .await
        .expect("restart the cluster (crash recovery)");

    let done = app.wait_for_status(id, common::FINISHED, 90).await;
    assert_eq!(done["status"], "completed", "{done}");
    let written = std::fs::read_to_string(&file).unwrap();
    let steps = app.steps(id).await;
    for name in ["one", "three", "four"] {
        let runs: Vec<_> = steps.iter().filter(|s| s["step_name"] == name).collect();
        assert_eq!(runs.len(), 1, "{name}: {steps:?}");
        assert_eq!(runs[0]["status"], "completed", "{name}: {steps:?}");
    }
    assert!(steps.iter().all(|s| s["status"] != "running"), "{steps:?}");

    // The same worker process goes on with new work.
    assert!(
        worker.try_wait().unwrap().is_none(),
        "the worker exited after the outage"
    );
    std::fs::write(&file, "").unwrap();
    let again = app.start_execution(json!({ "runbook_id": runbook })).await;
    let done = app.wait_for_status(again, common::FINISHED, 60).await;
    assert_eq!(done["status"], "completed", "{done}");
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "1\n2\n3\n4\n");

    worker.start_kill().unwrap();
    worker.wait().await.unwrap();
    app.pool.close().await;
    pg.stop().await.expect("stop the private cluster");
    let _ = std::fs::remove_dir_all(&dir);
    Survived { written, steps }
}

fn runs_of<'a>(steps: &'a [Value], name: &str) -> Vec<&'a Value> {
    steps.iter().filter(|s| s["step_name"] == name).collect()
}

#[tokio::test]
async fn a_database_crash_longer_than_the_lease_reruns_only_the_interrupted_step() {
    // Down 4 s: past the end of step 2's command (2 s) and past the 2 s lease.
    let s = crash_during_step_two("2", 2, Duration::from_secs(4)).await;
    assert_eq!(
        s.written, "1\n2\n2\n3\n4\n",
        "step 1 ran once; step 2 ran again after the lease ran out"
    );
    let two = runs_of(&s.steps, "two");
    assert_eq!(two.len(), 2, "{:?}", s.steps);
    assert_eq!(two[0]["interrupted"], true, "{:?}", s.steps);
    assert_eq!(two[1]["status"], "completed", "{:?}", s.steps);
}

#[tokio::test]
async fn a_database_restart_within_the_lease_keeps_the_steps_result() {
    // Down 3 s with a 30 s lease: step 2's command (1 s) ends while the server is down, and its
    // result is recorded once the server is back.
    let s = crash_during_step_two("30", 1, Duration::from_secs(3)).await;
    assert_eq!(s.written, "1\n2\n3\n4\n", "every step ran exactly once");
    let two = runs_of(&s.steps, "two");
    assert_eq!(two.len(), 1, "{:?}", s.steps);
    assert_eq!(two[0]["status"], "completed", "{:?}", s.steps);
    assert_eq!(two[0]["interrupted"], false, "{:?}", s.steps);
}
