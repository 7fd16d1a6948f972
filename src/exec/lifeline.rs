//! The lifeline: a small companion process (`aiops lifeline`, started by the worker) that kills
//! the process groups of the worker's local commands when the worker dies without killing them
//! itself (SIGKILL, the OOM killer, a crash). Without it such a command keeps running while the
//! step, whose lease expires, runs again on another worker.
//!
//! The worker writes one line per group on the companion's stdin: `+<pgid>` when a command
//! starts, `-<pgid>` once its group is dealt with. The pipe is the lifeline: only the worker
//! holds its write end (close-on-exec keeps it out of every command), so when the worker is
//! gone, however it went, the companion reads end of file, sends SIGTERM to the groups still
//! listed, SIGKILL to those left after [`KILL_GRACE`], and exits. Stop signals do not end it
//! (see [`outlast_stop_signals`]): only the end of the pipe does. A worker that stops on its own
//! has already ended its commands, so the list is empty then.

use std::collections::HashSet;
use std::io::{BufRead, Write};
use std::process::{ChildStdin, Command, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use rustix::process::{Pid, Signal, kill_process_group, test_kill_process_group};

/// Time a killed local command's group gets between SIGTERM and SIGKILL, whether the worker
/// kills it (timeout, cancel) or the lifeline does (the worker died).
pub const KILL_GRACE: Duration = Duration::from_secs(2);

/// The worker's end of the lifeline.
#[derive(Debug)]
pub struct Lifeline {
    stdin: Mutex<ChildStdin>,
    pid: u32,
    /// The companion was found gone or not reading (said once in the log).
    lost: AtomicBool,
}

impl Lifeline {
    /// Starts the companion: this executable with the `lifeline` argument, in a process group of
    /// its own (a Ctrl-C meant for the worker does not stop it; the end of the pipe does).
    pub fn spawn() -> std::io::Result<Lifeline> {
        use std::os::unix::process::CommandExt;
        let mut companion = Command::new(std::env::current_exe()?);
        // It needs nothing of the worker's environment (which holds the database URL and the
        // secret key).
        companion
            .arg("lifeline")
            .env_clear()
            .stdout(Stdio::null())
            .process_group(0);
        Lifeline::spawn_with(companion)
    }

    /// Starts `companion` with its stdin as the lifeline.
    fn spawn_with(mut companion: Command) -> std::io::Result<Lifeline> {
        let mut child = companion.stdin(Stdio::piped()).spawn()?;
        let stdin = child.stdin.take().expect("stdin is piped");
        // Never block the worker on a companion that stopped reading: a message that does not
        // fit is dropped instead (see `send`).
        rustix::io::ioctl_fionbio(&stdin, true)?;
        let pid = child.id();
        // Nobody waits for it: it outlives a worker that dies, and exits when the worker does.
        drop(child);
        Ok(Lifeline {
            stdin: Mutex::new(stdin),
            pid,
            lost: AtomicBool::new(false),
        })
    }

    /// The companion's process id.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// A command's group started: kill it if this process dies before [`release`](Self::release).
    pub fn watch(&self, pgid: u32) {
        self.send('+', pgid);
    }

    /// The group has ended or has been killed by this process.
    pub fn release(&self, pgid: u32) {
        self.send('-', pgid);
    }

    fn send(&self, op: char, pgid: u32) {
        let line = format!("{op}{pgid}\n");
        let mut stdin = self.stdin.lock().unwrap_or_else(|e| e.into_inner());
        // One write of a few bytes, well under PIPE_BUF, so it lands whole or not at all. A
        // companion that is gone (killed on its own) or stopped reading (the pipe is full)
        // costs the protection of this command; the command runs as before.
        let written = stdin.write(line.as_bytes());
        if let Err(e) = written
            && !self.lost.swap(true, Ordering::Relaxed)
        {
            tracing::warn!(error = %e, lifeline = self.pid,
                "cannot reach the lifeline process; local commands may outlive this worker if it is killed");
        }
    }
}

/// Makes SIGTERM, SIGINT and SIGHUP harmless to this process, so that the companion lives
/// until the end of its pipe, however its worker is stopped: a stop signal sent to every
/// process of a service (systemd's default) must not end the protection while the worker
/// still drains its commands. The runtime's handlers, once registered, stay installed for the
/// life of the process and only record the signal.
pub fn outlast_stop_signals() {
    use tokio::signal::unix::{SignalKind, signal};
    let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
    else {
        return;
    };
    runtime.block_on(async {
        for kind in [
            SignalKind::terminate(),
            SignalKind::interrupt(),
            SignalKind::hangup(),
        ] {
            let _ = signal(kind);
        }
    });
}

/// The companion's side: reads `+pgid` / `-pgid` lines until end of file, then ends the groups
/// still listed. Returns how many groups it had to end.
pub fn serve(input: impl BufRead) -> usize {
    let mut live = HashSet::new();
    for line in input.lines() {
        let Ok(line) = line else { break };
        let (op, pgid) = line.split_at(line.len().min(1));
        let Some(pgid) = pgid.parse::<i32>().ok().and_then(Pid::from_raw) else {
            continue;
        };
        match op {
            "+" => {
                live.insert(pgid);
            }
            "-" => {
                live.remove(&pgid);
            }
            _ => {}
        }
    }
    if live.is_empty() {
        return 0;
    }
    for pgid in &live {
        let _ = kill_process_group(*pgid, Signal::TERM);
    }
    let deadline = Instant::now() + KILL_GRACE;
    while Instant::now() < deadline && live.iter().any(|g| test_kill_process_group(*g).is_ok()) {
        std::thread::sleep(Duration::from_millis(20));
    }
    for pgid in &live {
        let _ = kill_process_group(*pgid, Signal::KILL);
    }
    live.len()
}

#[cfg(test)]
mod tests {
    use std::os::unix::process::{CommandExt, ExitStatusExt};

    use rustix::process::kill_process;

    use super::*;

    #[test]
    fn released_groups_are_left_alone_and_listed_ones_are_killed() {
        let mut sleeper = Command::new("sleep")
            .arg("300")
            .process_group(0)
            .spawn()
            .unwrap();
        let pgid = sleeper.id();
        // A released group is not killed, a listed one is; a line it cannot read is skipped.
        let input = format!("+{pgid}\n+1999999\n-1999999\nnot a line\n");
        assert_eq!(serve(input.as_bytes()), 1);
        let status = sleeper.wait().unwrap();
        assert_eq!(status.signal(), Some(15), "{status:?}");
        assert_eq!(serve(format!("+{pgid}\n-{pgid}\n").as_bytes()), 0);
    }

    #[test]
    fn a_companion_that_stopped_reading_never_blocks_the_worker() {
        // `sleep` never reads its stdin: the pipe fills after some thousands of messages.
        let mut sleeper = Command::new("sleep");
        sleeper.arg("30");
        let lifeline = Lifeline::spawn_with(sleeper).unwrap();
        let (done, finished) = std::sync::mpsc::channel();
        let writer = std::thread::spawn(move || {
            for pgid in 0..100_000 {
                lifeline.watch(1_000_000 + pgid);
            }
            done.send(lifeline.lost.load(Ordering::Relaxed)).unwrap();
            lifeline.pid()
        });
        let lost = finished
            .recv_timeout(Duration::from_secs(20))
            .expect("writing to a full lifeline pipe blocked");
        assert!(lost, "the full pipe was noticed");
        let pid = writer.join().unwrap();
        let _ = kill_process(Pid::from_raw(pid as i32).unwrap(), Signal::KILL);
    }
}
