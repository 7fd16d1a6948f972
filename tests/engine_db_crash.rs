//! Crash recovery of the database itself: PostgreSQL stops abruptly (SIGQUIT to the postmaster,
//! as `pg_ctl stop -m immediate` does, so the restart goes through crash recovery) while step 2
//! of a 4-step runbook runs, and stays down until after the step's command has ended. The same
//! worker process survives the outage and finishes the run once the database is back: step 1 is
//! not run again, steps 3 and 4 run once, and step 2 either kept its result or ran again with its
//! interrupted attempt recorded. The worker then runs new work.
//!
//! It needs a server of its own to stop, so it starts a private cluster with the product's
//! embedded-PostgreSQL code, whatever `DATABASE_URL` says.

mod common;
mod procs;

use std::time::Duration;

use aiops::startup::embedded_pg::EmbeddedPostgres;
use serde_json::json;

#[tokio::test]
async fn a_database_crash_mid_step_is_survived_without_rerunning_completed_steps() {
    let dir = std::env::temp_dir().join(format!("aiops-dbcrash-{}", uuid::Uuid::new_v4().simple()));
    let pg = EmbeddedPostgres::start(&dir, None)
        .await
        .expect("start a private cluster");
    let pgdata = pg.pgdata().to_path_buf();
    let app = common::spawn_app_on(pg.url(), |_| {}).await;
    let file = dir.join("steps");
    let yaml = common::appending_runbook("survive-the-database", &file, 2);
    let runbook = app.runbook_from_yaml(&yaml).await;
    let mut worker = app
        .worker_command(&["--concurrency", "2", "--lease-seconds", "2"])
        .spawn()
        .unwrap();
    let id = app.start_execution(json!({ "runbook_id": runbook })).await;

    common::wait_for_file(&file, "1\n2\n").await;

    // The database goes away mid-step, without a shutdown checkpoint.
    let postmaster = procs::postmaster_pid(&pgdata);
    std::process::Command::new("kill")
        .args(["-QUIT", &postmaster.to_string()])
        .status()
        .unwrap();
    assert!(
        procs::wait_gone(postmaster).await,
        "the postmaster did not stop"
    );
    // Its handle would stop the restarted server when dropped: it has nothing left to stop.
    drop(pg);
    // Down until well after step 2's command has ended (and past the lease).
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert!(
        worker.try_wait().unwrap().is_none(),
        "the worker exited while the database was down"
    );
    let pg = EmbeddedPostgres::start(&dir, None)
        .await
        .expect("restart the cluster (crash recovery)");

    let done = app
        .wait_for_status(id, &["completed", "failed", "cancelled", "timeout"], 90)
        .await;
    assert_eq!(done["status"], "completed", "{done}");
    let written = std::fs::read_to_string(&file).unwrap();
    eprintln!("steps run across the outage: {written:?}");
    assert!(
        written == "1\n2\n3\n4\n" || written == "1\n2\n2\n3\n4\n",
        "step 1 ran once, step 2 at most twice, steps 3 and 4 once: {written:?}"
    );
    let steps = app.steps(id).await;
    let runs_of = |name: &str| -> Vec<&serde_json::Value> {
        steps.iter().filter(|s| s["step_name"] == name).collect()
    };
    for name in ["one", "three", "four"] {
        let runs = runs_of(name);
        assert_eq!(runs.len(), 1, "{name}: {steps:?}");
        assert_eq!(runs[0]["status"], "completed", "{name}: {steps:?}");
    }
    let two = runs_of("two");
    assert_eq!(
        two.len(),
        written.matches('2').count(),
        "one attempt row per run of step 2: {steps:?}"
    );
    assert_eq!(two.last().unwrap()["status"], "completed", "{steps:?}");
    if two.len() == 2 {
        assert_eq!(two[0]["interrupted"], true, "{steps:?}");
    }
    assert!(steps.iter().all(|s| s["status"] != "running"), "{steps:?}");

    // The same worker process goes on with new work.
    assert!(
        worker.try_wait().unwrap().is_none(),
        "the worker exited after the outage"
    );
    std::fs::write(&file, "").unwrap();
    let again = app.start_execution(json!({ "runbook_id": runbook })).await;
    let done = app
        .wait_for_status(again, &["completed", "failed", "cancelled", "timeout"], 60)
        .await;
    assert_eq!(done["status"], "completed", "{done}");
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "1\n2\n3\n4\n");

    worker.start_kill().unwrap();
    worker.wait().await.unwrap();
    app.pool.close().await;
    pg.stop().await.expect("stop the private cluster");
    let _ = std::fs::remove_dir_all(&dir);
}
