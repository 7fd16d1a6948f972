//! Executors: run one command on one target and report what happened. The [`StepExecutor`]
//! trait is the boundary the execution engine calls; [`local::LocalExecutor`] runs on the
//! worker's own host and [`ssh::SshExecutor`] on a managed server over SSH (a WinRM executor
//! will implement the same trait).
//!
//! Every executor honours the same contract: a command runs under `/bin/sh -c` (or the target's
//! shell), environment variables are passed as data and never as shell syntax, stdout and stderr
//! are kept apart, each is capped at `output_limit_bytes` with a visible marker, and on timeout
//! or cancellation the whole process group is killed before `run` returns. This module knows
//! nothing about SQL, HTTP, runbooks or templates: it receives a finished command string.

pub mod lifeline;
pub mod local;
pub mod ssh;

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use tokio::sync::mpsc;
pub use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// Which stream a chunk of output came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputStream {
    /// Standard output.
    Stdout,
    /// Standard error.
    Stderr,
}

/// A piece of live output, sent as it arrives (already within the output cap).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutputChunk {
    /// Which stream.
    pub stream: OutputStream,
    /// The bytes, as received (not necessarily whole lines or whole UTF-8 sequences).
    pub bytes: Vec<u8>,
}

/// What to run.
#[derive(Debug, Clone)]
pub struct CommandRequest {
    /// A shell command line, already rendered and quoted by the template layer.
    pub command: String,
    /// Environment variables: names must match `[A-Za-z_][A-Za-z0-9_]*`; values are passed
    /// literally (any bytes but NUL).
    pub env: Vec<(String, String)>,
    /// Wall-clock limit for the command; the command is killed when it passes.
    pub timeout: Duration,
    /// Cap on each of stdout and stderr, in bytes; the rest is discarded and counted.
    pub output_limit_bytes: usize,
}

/// How a command ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandOutcome {
    /// Exit code, when the command exited (None when killed by a signal or when no status came).
    pub exit_code: Option<i32>,
    /// Signal name without `SIG` (`KILL`, `TERM`), when the process was killed by one.
    pub exit_signal: Option<String>,
    /// Standard output (lossy UTF-8), capped, with the truncation marker when capped.
    pub stdout: String,
    /// Standard error (lossy UTF-8), capped, with the truncation marker when capped.
    pub stderr: String,
    /// Whether either stream was capped.
    pub truncated: bool,
    /// Whether the timeout killed the command.
    pub timed_out: bool,
    /// Whether cancellation killed the command.
    pub cancelled: bool,
    /// Why killing the command (at its timeout, or on cancel) failed, when it did: it may
    /// still be running. Only a remote command can fail to be killed.
    pub kill_error: Option<String>,
    /// Why the command ended without an exit status, when it did (the connection to its host
    /// was lost while it ran); what it printed until then is kept.
    pub lost: Option<String>,
    /// Wall-clock time from start to end.
    pub duration: Duration,
}

/// Why a connection attempt failed, in the classes the API reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectFailure {
    /// The host name does not resolve.
    Dns,
    /// Nothing listens on the port (connection refused).
    Refused,
    /// No answer within the connect timeout.
    Timeout,
    /// The server refused the credentials.
    Authentication,
    /// The server presented a host key other than the pinned one.
    HostKeyMismatch,
    /// Anything else (protocol error, unreachable network, bad key material).
    Other,
}

impl ConnectFailure {
    /// Stable lower-case name (`dns`, `refused`, `timeout`, `authentication`,
    /// `host_key_mismatch`, `other`).
    pub fn as_str(self) -> &'static str {
        match self {
            ConnectFailure::Dns => "dns",
            ConnectFailure::Refused => "refused",
            ConnectFailure::Timeout => "timeout",
            ConnectFailure::Authentication => "authentication",
            ConnectFailure::HostKeyMismatch => "host_key_mismatch",
            ConnectFailure::Other => "other",
        }
    }
}

/// A command could not be run (as opposed to running and failing, which is a
/// [`CommandOutcome`] with a non-zero exit code).
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    /// The request itself is unusable (bad environment variable name, NUL byte).
    #[error("invalid command request: {0}")]
    InvalidRequest(String),
    /// The target could not be reached or refused us.
    #[error("{message}")]
    Connect {
        /// The class of failure.
        kind: ConnectFailure,
        /// A message that says what failed and with what input (never a secret).
        message: String,
    },
    /// The executor does not handle this kind of target.
    #[error("this executor does not handle {0} targets")]
    UnsupportedTarget(&'static str),
    /// Starting or supervising the process failed.
    #[error("cannot run the command: {0}")]
    Io(#[from] std::io::Error),
    /// The SSH session failed after connecting.
    #[error("ssh session failed: {0}")]
    Session(String),
}

impl ExecError {
    /// The connection failure class, when this is one.
    pub fn connect_failure(&self) -> Option<ConnectFailure> {
        match self {
            ExecError::Connect { kind, .. } => Some(*kind),
            _ => None,
        }
    }
}

/// How to authenticate over SSH. Debug output never shows the secret.
#[derive(Clone)]
pub enum SshAuth {
    /// Password authentication.
    Password(String),
    /// Private-key authentication with an OpenSSH (or PEM) private key.
    Key {
        /// The private key text.
        private_key: String,
        /// Passphrase of an encrypted key.
        passphrase: Option<String>,
    },
}

impl std::fmt::Debug for SshAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SshAuth::Password(_) => f.write_str("Password(<redacted>)"),
            SshAuth::Key { passphrase, .. } => f
                .debug_struct("Key")
                .field("private_key", &"<redacted>")
                .field("passphrase", &passphrase.as_ref().map(|_| "<redacted>"))
                .finish(),
        }
    }
}

/// A server reached over SSH, with its decrypted credentials and pinned host key.
#[derive(Debug, Clone)]
pub struct SshTarget {
    /// The `server_credentials` row; connections are pooled per server.
    pub server_id: Uuid,
    /// Host name or address.
    pub hostname: String,
    /// TCP port.
    pub port: u16,
    /// Login name.
    pub username: String,
    /// Credentials.
    pub auth: SshAuth,
    /// The pinned host key in OpenSSH public-key format (`ssh-ed25519 AAAA...`), or `None` when
    /// no connection has succeeded yet (trust on first use, recorded through the pinner).
    pub pinned_host_key: Option<String>,
    /// Limit for TCP connect, key exchange and authentication together.
    pub connect_timeout: Duration,
}

/// Where a command runs.
#[derive(Debug, Clone)]
pub enum Target {
    /// The worker's own host.
    Local,
    /// A managed server over SSH.
    Ssh(SshTarget),
}

impl Target {
    /// `local`, `ssh` (and later `winrm`), for errors and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Target::Local => "local",
            Target::Ssh(_) => "ssh",
        }
    }
}

/// The boxed future executors return, so the trait can be used as `dyn StepExecutor`.
pub type ExecFuture<'a> =
    Pin<Box<dyn Future<Output = Result<CommandOutcome, ExecError>> + Send + 'a>>;

/// Runs one command on one target. The execution engine holds executors as
/// `Arc<dyn StepExecutor>` and picks one per target kind.
pub trait StepExecutor: Send + Sync {
    /// Runs `request` on `target`. Live output goes to `output` as it arrives (a closed receiver
    /// is ignored); cancelling `cancel` kills the command and returns an outcome with
    /// `cancelled` set. Returns only after the command (and its process group) is gone.
    fn run<'a>(
        &'a self,
        target: &'a Target,
        request: &'a CommandRequest,
        cancel: CancellationToken,
        output: mpsc::Sender<OutputChunk>,
    ) -> ExecFuture<'a>;

    /// Waits until the work this executor still does for runs that were dropped mid-command
    /// (killing their commands) is over. A worker calls it before it exits.
    fn settle(&self) -> Pin<Box<dyn Future<Output = ()> + Send + '_>> {
        Box::pin(std::future::ready(()))
    }
}

/// Whether `name` is a plain shell identifier (`[A-Za-z_][A-Za-z0-9_]*`).
pub fn is_env_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Checks that an environment variable name is a plain shell identifier.
pub fn validate_env(env: &[(String, String)]) -> Result<(), ExecError> {
    for (name, value) in env {
        if !is_env_name(name) {
            return Err(ExecError::InvalidRequest(format!(
                "environment variable name `{name}` must match [A-Za-z_][A-Za-z0-9_]*"
            )));
        }
        if value.contains('\0') {
            return Err(ExecError::InvalidRequest(format!(
                "environment variable `{name}` contains a NUL byte"
            )));
        }
    }
    Ok(())
}

/// Quotes a string as one POSIX shell word: `'...'` with each `'` written as `'\''`.
pub fn shell_quote(value: &str) -> String {
    let mut out = String::with_capacity(value.len() + 2);
    out.push('\'');
    for c in value.chars() {
        if c == '\'' {
            out.push_str("'\\''");
        } else {
            out.push(c);
        }
    }
    out.push('\'');
    out
}

/// How the marker appended to output cut at the cap starts.
pub(crate) const TRUNCATION_MARKER: &str = "\n[aiops: output truncated at ";

/// Accumulates one stream up to the cap, forwarding what fits as live output.
pub(crate) struct CappedBuffer {
    stream: OutputStream,
    limit: usize,
    kept: Vec<u8>,
    dropped: u64,
}

impl CappedBuffer {
    pub(crate) fn new(stream: OutputStream, limit: usize) -> Self {
        CappedBuffer {
            stream,
            limit,
            kept: Vec::new(),
            dropped: 0,
        }
    }

    /// Keeps what fits; returns the part to forward live, if any. The chunk that reaches the
    /// cap carries the truncation marker, so a live reader sees the output was cut. The cut
    /// never splits a UTF-8 character: one that does not fit whole is dropped whole.
    pub(crate) fn push(&mut self, bytes: &[u8]) -> Option<OutputChunk> {
        let room = self.limit.saturating_sub(self.kept.len());
        let take = room.min(bytes.len());
        let cut_now = self.dropped == 0 && take < bytes.len();
        self.dropped += (bytes.len() - take) as u64;
        self.kept.extend_from_slice(&bytes[..take]);
        let mut live_end = take;
        if cut_now {
            // The character the cut falls in is dropped whole, wherever its bytes came from
            // (this read or the ones before it; those already forwarded live stay forwarded).
            let whole = without_cut_char(&self.kept).len();
            let cut = self.kept.len() - whole;
            self.kept.truncate(whole);
            self.dropped += cut as u64;
            live_end = take.saturating_sub(cut);
        }
        let mut live = bytes[..live_end].to_vec();
        if cut_now {
            live.extend_from_slice(
                format!(
                    "{TRUNCATION_MARKER}{} bytes; the rest is discarded]\n",
                    self.limit
                )
                .as_bytes(),
            );
        }
        (!live.is_empty()).then_some(OutputChunk {
            stream: self.stream,
            bytes: live,
        })
    }

    pub(crate) fn truncated(&self) -> bool {
        self.dropped > 0
    }

    /// The marker appended to a capped stream.
    pub(crate) fn marker(&self) -> Option<String> {
        self.truncated().then(|| {
            format!(
                "{TRUNCATION_MARKER}{} bytes; {} more bytes discarded]\n",
                self.limit, self.dropped
            )
        })
    }

    pub(crate) fn finish(self) -> String {
        let mut text = output_text(&self.kept);
        if let Some(marker) = self.marker() {
            text.push_str(&marker);
        }
        text
    }
}

/// Command output as text, as it is stored and streamed: bytes that are not UTF-8 become
/// U+FFFD, and NUL becomes `␀` (U+2400), since PostgreSQL text cannot hold it. Without that a
/// step printing NUL (`find -print0`, `/proc/*/cmdline`) could not record its result, and its
/// job would run the command again.
pub fn output_text(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    if text.contains('\0') {
        text.replace('\0', "\u{2400}")
    } else {
        text.into_owned()
    }
}

/// `bytes` without a UTF-8 character cut short at its end (the lead byte of a sequence whose
/// continuation bytes are missing, and those of its continuation bytes present).
fn without_cut_char(bytes: &[u8]) -> &[u8] {
    for back in 1..=bytes.len().min(3) {
        let b = bytes[bytes.len() - back];
        if b & 0xC0 != 0x80 {
            let needs = match b {
                0xF0.. => 4,
                0xE0.. => 3,
                0xC0.. => 2,
                _ => 1,
            };
            return if needs > back {
                &bytes[..bytes.len() - back]
            } else {
                bytes
            };
        }
    }
    bytes
}

/// Forwards a chunk of live output without blocking the command on a slow consumer for long:
/// a full or closed channel drops the live copy (the capped copy is still in the outcome).
pub(crate) async fn forward(output: &mpsc::Sender<OutputChunk>, chunk: Option<OutputChunk>) {
    if let Some(chunk) = chunk {
        let _ = output.send(chunk).await;
    }
}

/// Signal names without the `SIG` prefix, for the numbers Linux uses.
pub(crate) fn signal_name(number: i32) -> String {
    let name = match number {
        1 => "HUP",
        2 => "INT",
        3 => "QUIT",
        4 => "ILL",
        6 => "ABRT",
        8 => "FPE",
        9 => "KILL",
        10 => "USR1",
        11 => "SEGV",
        12 => "USR2",
        13 => "PIPE",
        14 => "ALRM",
        15 => "TERM",
        _ => return format!("SIG{number}"),
    };
    name.to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting_is_one_literal_word() {
        assert_eq!(shell_quote("plain"), "'plain'");
        assert_eq!(shell_quote("it's"), "'it'\\''s'");
        assert_eq!(shell_quote(""), "''");
    }

    #[test]
    fn env_names_are_identifiers() {
        let ok = vec![("A_1".to_owned(), "x; rm -rf /".to_owned())];
        assert!(validate_env(&ok).is_ok());
        for bad in ["1A", "A-B", "A B", "", "A;B", "$(x)"] {
            let env = vec![(bad.to_owned(), String::new())];
            assert!(validate_env(&env).is_err(), "{bad}");
        }
        assert!(validate_env(&[("A".to_owned(), "a\0b".to_owned())]).is_err());
    }

    #[test]
    fn capped_buffer_marks_truncation() {
        let mut b = CappedBuffer::new(OutputStream::Stdout, 5);
        assert_eq!(b.push(b"abc").unwrap().bytes, b"abc");
        // The chunk that reaches the cap tells a live reader that the rest is cut.
        assert_eq!(
            String::from_utf8(b.push(b"defg").unwrap().bytes).unwrap(),
            "de\n[aiops: output truncated at 5 bytes; the rest is discarded]\n"
        );
        assert!(b.push(b"xyz").is_none());
        assert!(b.truncated());
        let text = b.finish();
        assert!(
            text.starts_with("abcde\n[aiops: output truncated at 5 bytes; 5 more"),
            "{text}"
        );
    }

    #[test]
    fn the_cap_never_splits_a_character_that_came_in_several_reads() {
        // "é" is 0xC3 0xA9; the cap falls after its first byte, which came in a read of its
        // own (and so did the second).
        let mut b = CappedBuffer::new(OutputStream::Stdout, 3);
        b.push(b"ab");
        b.push(&[0xC3]);
        b.push(&[0xA9, b'\n']);
        let text = b.finish();
        assert!(
            text.starts_with("ab\n[aiops: output truncated at 3 bytes; 3 more"),
            "{text}"
        );
        // A read that fills the cap exactly and ends inside a character.
        let mut b = CappedBuffer::new(OutputStream::Stdout, 4);
        b.push(&[b'a', b'b', b'c', 0xE2]);
        b.push(&[0x82, 0xAC]);
        let text = b.finish();
        assert!(
            text.starts_with("abc\n[aiops") && !text.contains('\u{FFFD}'),
            "{text}"
        );
    }

    #[test]
    fn the_cap_never_splits_a_character() {
        // "aé" is 3 bytes; a cap of 2 would cut "é" in half: it is dropped whole.
        let mut b = CappedBuffer::new(OutputStream::Stdout, 2);
        let live = b.push("aé€".as_bytes()).unwrap().bytes;
        assert!(String::from_utf8(live).unwrap().starts_with("a\n[aiops"));
        assert!(
            b.finish()
                .starts_with("a\n[aiops: output truncated at 2 bytes; 5 more")
        );
        for (text, cap, kept) in [
            ("€€", 4, "€"),
            ("a😀", 4, "a"),
            ("ab", 1, "a"),
            ("é", 2, "é"),
        ] {
            let mut b = CappedBuffer::new(OutputStream::Stdout, cap);
            b.push(text.as_bytes());
            let out = b.finish();
            assert!(
                out.starts_with(kept) && !out.contains('\u{FFFD}'),
                "{text}: {out}"
            );
        }
    }

    #[test]
    fn nul_in_output_is_text_postgres_can_store() {
        assert_eq!(output_text(b"a\0b\xff"), "a\u{2400}b\u{FFFD}");
        let mut b = CappedBuffer::new(OutputStream::Stdout, 100);
        b.push(b"x\0y\n");
        assert_eq!(b.finish(), "x\u{2400}y\n");
    }
}
