//! The local executor: runs a command on the worker's own host with `/bin/sh -c`, in its own
//! process group, so that a timeout or a cancellation kills the command and everything it
//! started. The command does not inherit the worker's environment, which holds the database URL
//! and the secret key: it gets a short list of host variables (`PATH`, `HOME`, locale, ...),
//! the ones the operator names, and the step's own variables. With a [`Lifeline`], every
//! command's group is registered with it while the command runs, so that the group dies with
//! the worker even when the worker is killed outright. Knows nothing about SSH, SQL or
//! runbooks.

use std::os::unix::process::ExitStatusExt;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Instant;

use rustix::process::{Pid, Signal, kill_process_group};
use tokio::io::AsyncReadExt;
use tokio::process::{Child, Command};
use tokio::sync::mpsc;

use super::lifeline::{KILL_GRACE, Lifeline};
use super::{
    CancellationToken, CappedBuffer, CommandOutcome, CommandRequest, ExecError, ExecFuture,
    OutputChunk, OutputStream, StepExecutor, Target, forward, signal_name, validate_env,
};

/// Host variables a local command gets from the worker's environment when they are set.
pub const HOST_ENV: &[&str] = &[
    "PATH",
    "HOME",
    "USER",
    "LOGNAME",
    "SHELL",
    "LANG",
    "LANGUAGE",
    "LC_ALL",
    "LC_CTYPE",
    "LC_MESSAGES",
    "LC_NUMERIC",
    "LC_TIME",
    "LC_COLLATE",
    "LC_MONETARY",
    "TZ",
    "TMPDIR",
];

/// `PATH` for commands when the worker has none.
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Runs commands on the worker's host.
#[derive(Debug, Clone)]
pub struct LocalExecutor {
    /// What every command starts from, read once from the worker's environment.
    base_env: std::sync::Arc<[(String, String)]>,
    /// Kills the commands' groups if this process dies without doing so itself.
    lifeline: Option<Arc<Lifeline>>,
}

impl Default for LocalExecutor {
    /// The host variables of [`HOST_ENV`] only.
    fn default() -> Self {
        LocalExecutor::from_host(&[])
    }
}

impl LocalExecutor {
    /// Commands get [`HOST_ENV`] and the `passthrough` names from this process's environment
    /// (those that are set), and `PATH` in any case.
    pub fn from_host(passthrough: &[String]) -> Self {
        let names = HOST_ENV
            .iter()
            .copied()
            .chain(passthrough.iter().map(String::as_str));
        LocalExecutor::with_base_env(
            names.filter_map(|name| std::env::var(name).ok().map(|v| (name.to_owned(), v))),
        )
    }

    /// Commands start from exactly these variables (and `PATH`, when they hold none); the
    /// step's variables come on top.
    pub fn with_base_env(vars: impl IntoIterator<Item = (String, String)>) -> Self {
        let mut base: Vec<(String, String)> = Vec::new();
        for (name, value) in vars {
            base.retain(|(n, _)| *n != name);
            base.push((name, value));
        }
        if !base.iter().any(|(n, _)| n == "PATH") {
            base.push(("PATH".to_owned(), DEFAULT_PATH.to_owned()));
        }
        LocalExecutor {
            base_env: base.into(),
            lifeline: None,
        }
    }

    /// Commands' process groups are registered with `lifeline` while they run, so that they
    /// die with this process even when it is killed with SIGKILL.
    pub fn with_lifeline(mut self, lifeline: Arc<Lifeline>) -> Self {
        self.lifeline = Some(lifeline);
        self
    }

    /// The variables every command starts from.
    pub fn base_env(&self) -> &[(String, String)] {
        &self.base_env
    }
}

impl StepExecutor for LocalExecutor {
    fn run<'a>(
        &'a self,
        target: &'a Target,
        request: &'a CommandRequest,
        cancel: CancellationToken,
        output: mpsc::Sender<OutputChunk>,
    ) -> ExecFuture<'a> {
        Box::pin(async move {
            if !matches!(target, Target::Local) {
                return Err(ExecError::UnsupportedTarget(target.kind()));
            }
            run_local(
                &self.base_env,
                self.lifeline.as_deref(),
                request,
                cancel,
                output,
            )
            .await
        })
    }
}

/// Sends `signal` to the whole process group `pgid` (a syscall; no helper process). A group
/// that is already gone is not an error.
fn kill_group(pgid: u32, signal: Signal) {
    if let Some(pid) = i32::try_from(pgid).ok().and_then(Pid::from_raw) {
        let _ = kill_process_group(pid, signal);
    }
}

/// Kills the command's process group when a run is dropped before it ended on its own terms:
/// the job that runs it was abandoned (handler timeout, lease lost, end of the worker's
/// shutdown grace period). Dropping the run would otherwise kill only the shell (`kill_on_drop`)
/// and leave what it started running while another worker runs the step again. Either way the
/// group is then taken off the lifeline.
struct GroupGuard<'a> {
    pgid: Option<u32>,
    armed: bool,
    lifeline: Option<&'a Lifeline>,
}

impl<'a> GroupGuard<'a> {
    /// Guards `pgid`, registered with `lifeline` from now on.
    fn new(pgid: Option<u32>, lifeline: Option<&'a Lifeline>) -> Self {
        if let (Some(pgid), Some(lifeline)) = (pgid, lifeline) {
            lifeline.watch(pgid);
        }
        GroupGuard {
            pgid,
            armed: true,
            lifeline,
        }
    }

    /// The run ended normally; its group was already dealt with.
    fn disarm(&mut self) {
        self.armed = false;
    }
}

impl Drop for GroupGuard<'_> {
    fn drop(&mut self) {
        let Some(pgid) = self.pgid else { return };
        if self.armed {
            tracing::debug!(pgid, "command abandoned; killing its process group");
            kill_group(pgid, Signal::KILL);
        }
        if let Some(lifeline) = self.lifeline {
            lifeline.release(pgid);
        }
    }
}

/// TERM the group, give it a grace period, then KILL whatever is left.
async fn terminate(child: &mut Child, pgid: Option<u32>) {
    if let Some(pgid) = pgid {
        kill_group(pgid, Signal::TERM);
        if tokio::time::timeout(KILL_GRACE, child.wait())
            .await
            .is_err()
        {
            tracing::debug!(pgid, "command ignored SIGTERM; sending SIGKILL");
        }
        // Always KILL the group: the shell may be gone while its children still run.
        kill_group(pgid, Signal::KILL);
    }
    let _ = child.start_kill();
}

async fn run_local(
    base_env: &[(String, String)],
    lifeline: Option<&Lifeline>,
    request: &CommandRequest,
    cancel: CancellationToken,
    output: mpsc::Sender<OutputChunk>,
) -> Result<CommandOutcome, ExecError> {
    validate_env(&request.env)?;
    let started = Instant::now();
    let mut child = Command::new("/bin/sh")
        .arg("-c")
        .arg(&request.command)
        .env_clear()
        .envs(base_env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .envs(request.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true)
        .spawn()?;
    let pgid = child.id();
    let mut guard = GroupGuard::new(pgid, lifeline);
    let mut stdout = child.stdout.take();
    let mut stderr = child.stderr.take();
    let mut out = CappedBuffer::new(OutputStream::Stdout, request.output_limit_bytes);
    let mut err = CappedBuffer::new(OutputStream::Stderr, request.output_limit_bytes);
    let mut out_buf = vec![0u8; 16 * 1024];
    let mut err_buf = vec![0u8; 16 * 1024];
    let deadline = tokio::time::sleep(request.timeout);
    tokio::pin!(deadline);
    let mut timed_out = false;
    let mut cancelled = false;
    let mut status = None;

    // Read both pipes until they close and the child exits, or until time runs out.
    loop {
        if stdout.is_none() && stderr.is_none() && status.is_some() {
            break;
        }
        tokio::select! {
            n = read_some(&mut stdout, &mut out_buf), if stdout.is_some() => {
                match n {
                    Ok(0) | Err(_) => stdout = None,
                    Ok(n) => forward(&output, out.push(&out_buf[..n])).await,
                }
            }
            n = read_some(&mut stderr, &mut err_buf), if stderr.is_some() => {
                match n {
                    Ok(0) | Err(_) => stderr = None,
                    Ok(n) => forward(&output, err.push(&err_buf[..n])).await,
                }
            }
            s = child.wait(), if status.is_none() => {
                status = Some(s?);
                // What the command left running in its group dies with it (as the SSH
                // wrapper's watcher does), so pipes it held close and the loop reads them to
                // the end instead of waiting for the step timeout.
                if let Some(pgid) = pgid {
                    kill_group(pgid, Signal::KILL);
                }
            }
            // A command that has already exited finished on its own: it is neither timed out
            // nor cancelled (a pipe still held open by a process that left its group is given
            // up on here).
            _ = &mut deadline => {
                timed_out = status.is_none();
                break;
            }
            _ = cancel.cancelled() => {
                cancelled = status.is_none();
                break;
            }
        }
    }
    if timed_out || cancelled {
        terminate(&mut child, pgid).await;
        status = child.wait().await.ok();
    } else if let Some(pgid) = pgid {
        // Background processes the command left behind are part of the step; do not leak them.
        kill_group(pgid, Signal::KILL);
    }
    guard.disarm();
    let (exit_code, exit_signal) = match status {
        Some(s) => (s.code(), s.signal().map(signal_name)),
        None => (None, None),
    };
    let truncated = out.truncated() || err.truncated();
    Ok(CommandOutcome {
        exit_code,
        exit_signal,
        stdout: out.finish(),
        stderr: err.finish(),
        truncated,
        timed_out,
        cancelled,
        kill_error: None,
        lost: None,
        duration: started.elapsed(),
    })
}

/// Reads from a pipe that may already be closed (then never resolves; the select guard keeps
/// it from being polled).
async fn read_some<R: tokio::io::AsyncRead + Unpin>(
    reader: &mut Option<R>,
    buf: &mut [u8],
) -> std::io::Result<usize> {
    match reader {
        Some(r) => r.read(buf).await,
        None => std::future::pending().await,
    }
}
