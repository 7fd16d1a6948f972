//! The local executor: exit codes and signals, separate streams, literal environment values,
//! output cap, and that timeout and cancellation kill the whole process group.

use std::time::Duration;

mod common;
mod procs;

use aiops::exec::local::LocalExecutor;
use aiops::exec::{CancellationToken, CommandRequest, OutputStream, StepExecutor, Target};
use procs::{wait_for_pid, wait_gone};
use tokio::sync::mpsc;

fn request(command: &str) -> CommandRequest {
    CommandRequest {
        command: command.to_owned(),
        env: Vec::new(),
        timeout: Duration::from_secs(20),
        output_limit_bytes: 1 << 20,
    }
}

async fn run(req: &CommandRequest) -> aiops::exec::CommandOutcome {
    let (tx, _rx) = mpsc::channel(64);
    LocalExecutor::default()
        .run(&Target::Local, req, CancellationToken::new(), tx)
        .await
        .unwrap()
}
#[tokio::test]
async fn exit_code_streams_and_signal() {
    let out = run(&request("echo out; echo err >&2; exit 3")).await;
    assert_eq!(out.exit_code, Some(3));
    assert_eq!(out.stdout, "out\n");
    assert_eq!(out.stderr, "err\n");
    assert!(!out.truncated && !out.timed_out && !out.cancelled);
    let out = run(&request("kill -TERM $$")).await;
    assert_eq!(out.exit_code, None);
    assert_eq!(out.exit_signal.as_deref(), Some("TERM"));
}

#[tokio::test]
async fn hostile_environment_values_stay_literal() {
    let hostile = "'; touch /tmp/aiops-pwned; echo '$(id)`id`\"\n$HOME";
    let mut req = request("printf '%s' \"$HOSTILE\"");
    req.env = vec![("HOSTILE".to_owned(), hostile.to_owned())];
    let out = run(&req).await;
    assert_eq!(out.stdout, hostile);
    req.env = vec![("BAD-NAME".to_owned(), "x".to_owned())];
    let (tx, _rx) = mpsc::channel(1);
    assert!(
        LocalExecutor::default()
            .run(&Target::Local, &req, CancellationToken::new(), tx)
            .await
            .is_err()
    );
}

#[tokio::test]
async fn a_command_starts_from_the_base_environment_and_the_step_variables_only() {
    let executor = LocalExecutor::with_base_env([
        ("HOME".to_owned(), "/home/runner".to_owned()),
        ("LANG".to_owned(), "C.UTF-8".to_owned()),
    ]);
    assert!(
        executor.base_env().iter().any(|(n, _)| n == "PATH"),
        "PATH is always set"
    );
    let mut req = request("env | sort");
    req.env = vec![("SERVICE".to_owned(), "web".to_owned())];
    let (tx, _rx) = mpsc::channel(64);
    let out = executor
        .run(&Target::Local, &req, CancellationToken::new(), tx)
        .await
        .unwrap();
    let names: Vec<&str> = out
        .stdout
        .lines()
        .filter_map(|l| l.split_once('=').map(|(n, _)| n))
        .filter(|n| !["PWD", "OLDPWD", "SHLVL", "_"].contains(n))
        .collect();
    assert_eq!(names, ["HOME", "LANG", "PATH", "SERVICE"], "{}", out.stdout);
    assert!(out.stdout.contains("HOME=/home/runner\n"), "{}", out.stdout);
    assert!(out.stdout.contains("SERVICE=web\n"), "{}", out.stdout);
}

#[tokio::test]
async fn output_is_capped_with_a_marker_and_streamed_live() {
    let mut req = request("head -c 100000 /dev/zero | tr '\\0' a; echo done >&2");
    req.output_limit_bytes = 1000;
    let (tx, mut rx) = mpsc::channel(1024);
    let out = LocalExecutor::default()
        .run(&Target::Local, &req, CancellationToken::new(), tx)
        .await
        .unwrap();
    assert!(out.truncated);
    assert!(out.stdout.starts_with(&"a".repeat(1000)));
    assert!(
        out.stdout
            .contains("output truncated at 1000 bytes; 99000 more bytes discarded")
    );
    assert_eq!(out.stderr, "done\n");
    let mut live = Vec::new();
    while let Ok(chunk) = rx.try_recv() {
        if chunk.stream == OutputStream::Stdout {
            live.extend_from_slice(&chunk.bytes);
        }
    }
    // What was kept, then where the cut happened.
    assert_eq!(
        String::from_utf8(live).unwrap(),
        format!(
            "{}\n[aiops: output truncated at 1000 bytes; the rest is discarded]\n",
            "a".repeat(1000)
        )
    );
}

#[tokio::test]
async fn timeout_kills_the_process_group() {
    let dir = common::Scratch::new("local");
    let pidfile = dir.join("pid");
    let mut req = request(&format!(
        "sleep 300 & echo $! > {}; wait",
        pidfile.display()
    ));
    req.timeout = Duration::from_millis(500);
    let out = run(&req).await;
    assert!(out.timed_out);
    let pid = wait_for_pid(&pidfile, Duration::from_secs(10)).await;
    assert!(
        wait_gone(pid).await,
        "background sleep {pid} survived the timeout"
    );
}

#[tokio::test]
async fn an_abandoned_run_kills_the_process_group() {
    let dir = common::Scratch::new("local");
    let pidfile = dir.join("pid");
    let req = request(&format!(
        "sleep 300 & echo $! > {}; wait",
        pidfile.display()
    ));
    let (tx, _rx) = mpsc::channel(16);
    let task = tokio::spawn(async move {
        LocalExecutor::default()
            .run(&Target::Local, &req, CancellationToken::new(), tx)
            .await
    });
    let pid = wait_for_pid(&pidfile, Duration::from_secs(10)).await;
    // What a worker does with a job it gives up (handler timeout, lost lease, end of the
    // shutdown grace period): the run is dropped mid-command.
    task.abort();
    assert!(task.await.unwrap_err().is_cancelled());
    assert!(
        wait_gone(pid).await,
        "background sleep {pid} survived its abandoned run"
    );
}

#[tokio::test]
async fn cancellation_kills_mid_command() {
    let dir = common::Scratch::new("local");
    let pidfile = dir.join("pid");
    let req = request(&format!(
        "echo started; sleep 300 & echo $! > {}; wait",
        pidfile.display()
    ));
    let cancel = CancellationToken::new();
    let (tx, mut rx) = mpsc::channel(16);
    let task = {
        let cancel = cancel.clone();
        tokio::spawn(async move {
            LocalExecutor::default()
                .run(&Target::Local, &req, cancel, tx)
                .await
        })
    };
    // Cancel once the command has visibly started.
    let first = rx.recv().await.unwrap();
    assert_eq!(first.bytes, b"started\n");
    let pid = wait_for_pid(&pidfile, Duration::from_secs(10)).await;
    cancel.cancel();
    let out = task.await.unwrap().unwrap();
    assert!(out.cancelled && !out.timed_out);
    assert!(wait_gone(pid).await, "sleep {pid} survived cancellation");
}

/// A command that exits leaving a process that holds its output open ends when it exits: the
/// leftover is killed (as over SSH), the step is not held until its timeout nor recorded as
/// timed out, and the output written before is kept.
#[tokio::test]
async fn a_command_ends_when_it_exits_though_a_leftover_holds_its_output() {
    let dir = common::Scratch::new("leftover");
    let pidfile = dir.join("pid");
    let req = request(&format!(
        "echo done; sleep 300 & echo $! > {}",
        pidfile.display()
    ));
    let started = std::time::Instant::now();
    let out = run(&req).await;
    assert_eq!(
        (out.exit_code, out.timed_out, out.cancelled),
        (Some(0), false, false),
        "{out:?}"
    );
    assert_eq!(out.stdout, "done\n");
    assert!(
        started.elapsed() < req.timeout,
        "held until the step timeout: {out:?}"
    );
    let pid = wait_for_pid(&pidfile, Duration::from_secs(5)).await;
    assert!(wait_gone(pid).await, "the leftover sleep {pid} survived");
}
