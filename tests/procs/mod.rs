//! Watching processes a test's commands start, through `/proc`.

#![allow(dead_code)]

use std::path::Path;
use std::time::{Duration, Instant};

/// Whether process `pid` is alive; a zombie is dead for our purposes (the third field of
/// `/proc/<pid>/stat` is the state).
pub fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

/// The live children of process `pid`, from `/proc/<pid>/task/*/children`.
pub fn children(pid: i32) -> Vec<i32> {
    let mut out = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
        .flatten()
    {
        let list = std::fs::read_to_string(task.path().join("children")).unwrap_or_default();
        out.extend(
            list.split_whitespace()
                .filter_map(|c| c.parse::<i32>().ok()),
        );
    }
    out
}

/// The command line of process `pid`, argument by argument (empty when it is gone).
pub fn cmdline(pid: i32) -> Vec<String> {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .unwrap_or_default()
        .split(|b| *b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect()
}

/// Waits up to 3 s for `pid` to die: a kill is delivered asynchronously, so allow the kernel a
/// moment to tear the process down. False when it is still alive then.
pub async fn wait_gone(pid: i32) -> bool {
    let deadline = Instant::now() + Duration::from_secs(3);
    while alive(pid) {
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    true
}

/// Waits up to `within` for a command to write a pid to `path`, and returns it.
pub async fn wait_for_pid(path: impl AsRef<Path>, within: Duration) -> i32 {
    let path = path.as_ref();
    let deadline = Instant::now() + within;
    loop {
        if let Ok(pid) = std::fs::read_to_string(path)
            .unwrap_or_default()
            .trim()
            .parse()
        {
            return pid;
        }
        assert!(
            Instant::now() < deadline,
            "pid file {} never appeared",
            path.display()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The pid of the PostgreSQL server running on `pgdata`: the first line of its
/// `postmaster.pid`.
pub fn postmaster_pid(pgdata: &Path) -> i32 {
    let text = std::fs::read_to_string(pgdata.join("postmaster.pid")).expect("postmaster.pid");
    text.lines().next().unwrap().trim().parse().unwrap()
}

/// Stops the PostgreSQL server on `pgdata` abruptly: sends `signal` (`QUIT`, as
/// `pg_ctl stop -m immediate` does, or `KILL`) to its postmaster and waits until it is gone.
/// Returns the postmaster's pid.
pub async fn crash_postmaster(pgdata: &Path, signal: &str) -> i32 {
    let pid = postmaster_pid(pgdata);
    let sent = std::process::Command::new("kill")
        .args([format!("-{signal}"), pid.to_string()])
        .status()
        .unwrap();
    assert!(sent.success(), "kill -{signal} {pid}");
    assert!(wait_gone(pid).await, "the postmaster {pid} did not stop");
    pid
}
