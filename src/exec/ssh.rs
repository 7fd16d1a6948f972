//! The SSH executor (russh): password and private-key authentication, host keys pinned per
//! server, one reused connection per server within a worker, and commands that are really
//! killed on the remote host when they time out or are cancelled.
//!
//! How a command runs: sshd starts the session's shell as the leader of its own session and
//! process group. The remote shell gets a small wrapper that reads the environment (as
//! single-quoted literals) and the command on its standard input, not in the exec request whose
//! text is a command line any user of the host can read, records that group's id in a private
//! file under `/tmp` (written under `umask 077`; the command runs with the session's), forks a
//! watcher into the group and execs the command in its own place, so sshd waits for the command
//! itself and reports how it really ended: an exit status, or the signal that killed it (a
//! command that runs `exit 137` reports 137, one killed by SIGKILL reports `KILL`). Once the
//! command has exited, the watcher removes the file and kills whatever the command left running
//! in the group; when the session's sshd goes away under the command (the connection broke, or
//! the worker died) and nobody kills the group within 3 s, the watcher kills it. (On a server
//! that does not give the session its own group, the wrapper runs the command under `setsid`
//! and waits for it instead, with a watcher of its own for the sshd going away; a command
//! killed by a signal then reports the shell's `128 + N`.) stdout and stderr travel on separate
//! SSH streams.
//!
//! Killing: the executor opens a second channel on the same connection and signals the recorded
//! group (TERM, then KILL). The command does not depend on the connection: when the connection
//! breaks while it runs (its channel ends without an exit status), the executor drops that
//! connection, opens a new one to the same target and kills the group over it, and `run` fails
//! saying so. A run dropped mid-command (its job abandoned by the worker) leaves a tracked kill
//! task behind; [`SshExecutor::settle`] waits for those.
//!
//! Host keys: a target with no pinned key accepts the presented key only after authentication
//! succeeds and the [`HostKeyPinner`] records it; a target with a pinned key refuses any other
//! key with [`ConnectFailure::HostKeyMismatch`]. Nothing here knows about SQL: the pinner is
//! how the caller persists the key.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex as StdMutex};
use std::time::{Duration, Instant};

use russh::client;
use russh::keys::{HashAlg, PrivateKeyWithHashAlg, PublicKey, PublicKeyOrCertificate};
use russh::{ChannelMsg, Sig};
use sha2::{Digest, Sha256};
use tokio::sync::{Mutex, mpsc};
use uuid::Uuid;

use super::{
    CancellationToken, CappedBuffer, CommandOutcome, CommandRequest, ConnectFailure, ExecError,
    ExecFuture, OutputChunk, OutputStream, SshAuth, SshTarget, StepExecutor, Target, forward,
    shell_quote, validate_env,
};

/// How long the kill channel may take before we give up on it (plus the connect timeout when
/// the kill needs a new connection).
const KILL_TIMEOUT: Duration = Duration::from_secs(10);

/// How long opening a channel on a pooled connection may take before the kill falls back to a
/// new connection (a connection that died without a TCP reset answers nothing).
const CHANNEL_OPEN_TIMEOUT: Duration = Duration::from_secs(3);

/// Exit code of [`kill_script`] when the command itself was no longer running: it had already
/// ended (anything it left in its group is killed all the same) or never started.
const KILL_NOTHING_TO_KILL: u32 = 3;

/// Persists the first host key a server presents. Implemented by the store layer.
pub trait HostKeyPinner: Send + Sync {
    /// Records `key` (OpenSSH public-key text) as the pinned key of `server_id` if none is
    /// pinned yet, and returns the key pinned afterwards (another one when a concurrent first
    /// connection won the race).
    fn pin<'a>(
        &'a self,
        server_id: Uuid,
        key: &'a str,
        fingerprint: &'a str,
    ) -> Pin<Box<dyn Future<Output = Result<String, String>> + Send + 'a>>;
}

/// The SHA-256 fingerprint of an OpenSSH public key, as `ssh-keygen -l` prints it.
pub fn fingerprint(openssh_public_key: &str) -> Option<String> {
    PublicKey::from_openssh(openssh_public_key)
        .ok()
        .map(|k| k.fingerprint(HashAlg::Sha256).to_string())
}

/// Checks that a private key parses (and decrypts with the passphrase, when one is given).
/// Returns a message without key material when it does not.
pub fn check_private_key(private_key: &str, passphrase: Option<&str>) -> Result<(), KeyProblem> {
    match russh::keys::decode_secret_key(private_key, passphrase) {
        Ok(_) => Ok(()),
        Err(russh::keys::Error::KeyIsEncrypted) => Err(KeyProblem::Key(
            "the key is encrypted; give its passphrase".to_owned(),
        )),
        // An encrypted key that a passphrase did not open: the passphrase is wrong.
        Err(_)
            if passphrase.is_some()
                && matches!(
                    russh::keys::decode_secret_key(private_key, None),
                    Err(russh::keys::Error::KeyIsEncrypted)
                ) =>
        {
            Err(KeyProblem::Passphrase("does not open the key".to_owned()))
        }
        Err(e) => Err(KeyProblem::Key(format!(
            "not a usable OpenSSH or PEM private key ({e})"
        ))),
    }
}

/// Why a private key cannot be used, by the field at fault.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyProblem {
    /// The key itself.
    Key(String),
    /// Its passphrase.
    Passphrase(String),
}

struct Client {
    expected: Option<PublicKey>,
    presented: Arc<StdMutex<Option<PublicKey>>>,
}

impl client::Handler for Client {
    type Error = russh::Error;

    async fn check_server_key(
        &mut self,
        server_public_key: &PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        // Host certificates are not pinned material; refuse them rather than trust a CA silently.
        let PublicKeyOrCertificate::PublicKey { key, .. } = server_public_key else {
            return Ok(false);
        };
        if let Ok(mut slot) = self.presented.lock() {
            *slot = Some(key.clone());
        }
        Ok(match &self.expected {
            Some(expected) => expected.key_data() == key.key_data(),
            None => true,
        })
    }
}

/// One authenticated connection, shared by every command to the same server.
struct Connection {
    handle: client::Handle<Client>,
    /// Digest of everything the connection was made with; a changed target gets a new one.
    identity: [u8; 32],
}

fn identity(target: &SshTarget) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(target.hostname.as_bytes());
    h.update(target.port.to_be_bytes());
    h.update(target.username.as_bytes());
    match &target.auth {
        SshAuth::Password(p) => {
            h.update(b"password\0");
            h.update(p.as_bytes());
        }
        SshAuth::Key {
            private_key,
            passphrase,
        } => {
            h.update(b"key\0");
            h.update(private_key.as_bytes());
            h.update(passphrase.as_deref().unwrap_or("").as_bytes());
        }
    }
    h.update(b"\0");
    h.update(target.pinned_host_key.as_deref().unwrap_or("").as_bytes());
    h.finalize().into()
}

fn connect_error(
    kind: ConnectFailure,
    target: &SshTarget,
    what: impl std::fmt::Display,
) -> ExecError {
    ExecError::Connect {
        kind,
        message: format!(
            "{} to {}@{}:{}: {what}",
            match kind {
                ConnectFailure::Dns => "cannot resolve host name",
                ConnectFailure::Refused => "connection refused",
                ConnectFailure::Timeout => "connection timed out",
                ConnectFailure::Authentication => "authentication failed",
                ConnectFailure::HostKeyMismatch => "host key mismatch",
                ConnectFailure::Other => "cannot connect",
            },
            target.username,
            target.hostname,
            target.port
        ),
    }
}

/// Connects, verifies the host key, authenticates and (on a first connection) pins the key.
async fn connect(
    target: &SshTarget,
    pinner: &dyn HostKeyPinner,
) -> Result<client::Handle<Client>, ExecError> {
    let started = Instant::now();
    let remaining = || target.connect_timeout.saturating_sub(started.elapsed());
    let expected = match &target.pinned_host_key {
        Some(text) => Some(PublicKey::from_openssh(text).map_err(|e| {
            connect_error(
                ConnectFailure::Other,
                target,
                format!("the pinned host key is unreadable ({e})"),
            )
        })?),
        None => None,
    };

    let addrs: Vec<SocketAddr> = match tokio::time::timeout(
        remaining(),
        tokio::net::lookup_host((target.hostname.as_str(), target.port)),
    )
    .await
    {
        Err(_) => {
            return Err(connect_error(
                ConnectFailure::Timeout,
                target,
                "name lookup took too long",
            ));
        }
        Ok(Err(e)) => return Err(connect_error(ConnectFailure::Dns, target, e)),
        Ok(Ok(a)) => a.collect(),
    };
    if addrs.is_empty() {
        return Err(connect_error(ConnectFailure::Dns, target, "no addresses"));
    }
    let stream =
        match tokio::time::timeout(remaining(), tokio::net::TcpStream::connect(&addrs[..])).await {
            Err(_) => {
                return Err(connect_error(
                    ConnectFailure::Timeout,
                    target,
                    format!("no answer within {:?}", target.connect_timeout),
                ));
            }
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                return Err(connect_error(ConnectFailure::Refused, target, e));
            }
            Ok(Err(e)) => return Err(connect_error(ConnectFailure::Other, target, e)),
            Ok(Ok(s)) => s,
        };
    let _ = stream.set_nodelay(true);

    let config = Arc::new(client::Config {
        inactivity_timeout: None,
        keepalive_interval: Some(Duration::from_secs(30)),
        keepalive_max: 3,
        nodelay: true,
        ..Default::default()
    });
    let presented = Arc::new(StdMutex::new(None));
    let handler = Client {
        expected: expected.clone(),
        presented: presented.clone(),
    };
    let presented_key = || presented.lock().ok().and_then(|p| p.clone());
    let mut handle =
        match tokio::time::timeout(remaining(), client::connect_stream(config, stream, handler))
            .await
        {
            Err(_) => {
                return Err(connect_error(
                    ConnectFailure::Timeout,
                    target,
                    "SSH handshake took too long",
                ));
            }
            Ok(Err(e)) => {
                if let (Some(expected), Some(got)) = (&expected, presented_key())
                    && expected.key_data() != got.key_data()
                {
                    return Err(mismatch(target, expected, &got));
                }
                return Err(connect_error(
                    ConnectFailure::Other,
                    target,
                    format!("SSH handshake failed ({e})"),
                ));
            }
            Ok(Ok(h)) => h,
        };

    let auth = async {
        match &target.auth {
            SshAuth::Password(password) => handle
                .authenticate_password(target.username.clone(), password.clone())
                .await
                .map_err(|e| connect_error(ConnectFailure::Other, target, e)),
            SshAuth::Key {
                private_key,
                passphrase,
            } => {
                let key = russh::keys::decode_secret_key(private_key, passphrase.as_deref())
                    .map_err(|e| {
                        connect_error(
                            ConnectFailure::Authentication,
                            target,
                            format!("the stored private key cannot be used ({e})"),
                        )
                    })?;
                // RSA keys sign with SHA-2 (rsa-sha2-512/256), never SHA-1.
                let hash = if key.algorithm().is_rsa() {
                    match handle.best_supported_rsa_hash().await {
                        Ok(Some(Some(h))) => Some(h),
                        _ => Some(HashAlg::Sha256),
                    }
                } else {
                    None
                };
                handle
                    .authenticate_publickey(
                        target.username.clone(),
                        PrivateKeyWithHashAlg::new(Arc::new(key), hash),
                    )
                    .await
                    .map_err(|e| connect_error(ConnectFailure::Other, target, e))
            }
        }
    };
    let result = match tokio::time::timeout(remaining(), auth).await {
        Err(_) => {
            return Err(connect_error(
                ConnectFailure::Timeout,
                target,
                "authentication took too long",
            ));
        }
        Ok(r) => r?,
    };
    if !result.success() {
        let method = match target.auth {
            SshAuth::Password(_) => "password",
            SshAuth::Key { .. } => "private key",
        };
        return Err(connect_error(
            ConnectFailure::Authentication,
            target,
            format!("the server refused the {method}"),
        ));
    }

    if expected.is_none() {
        let got = presented_key()
            .ok_or_else(|| connect_error(ConnectFailure::Other, target, "no host key seen"))?;
        let text = got
            .to_openssh()
            .map_err(|e| connect_error(ConnectFailure::Other, target, e))?;
        let print = got.fingerprint(HashAlg::Sha256).to_string();
        let pinned = pinner
            .pin(target.server_id, &text, &print)
            .await
            .map_err(|e| {
                connect_error(
                    ConnectFailure::Other,
                    target,
                    format!("cannot record the host key: {e}"),
                )
            })?;
        if pinned != text {
            let winner = PublicKey::from_openssh(&pinned)
                .map_err(|e| connect_error(ConnectFailure::Other, target, e))?;
            if winner.key_data() != got.key_data() {
                return Err(mismatch(target, &winner, &got));
            }
        }
        tracing::info!(server_id = %target.server_id, fingerprint = %print, "pinned SSH host key on first connection");
    }
    Ok(handle)
}

fn mismatch(target: &SshTarget, expected: &PublicKey, got: &PublicKey) -> ExecError {
    connect_error(
        ConnectFailure::HostKeyMismatch,
        target,
        format!(
            "the server presented {} but {} is pinned; if the host was legitimately re-keyed, an \
             admin must reset the pinned key (server_host_key_reset)",
            got.fingerprint(HashAlg::Sha256),
            expected.fingerprint(HashAlg::Sha256)
        ),
    )
}

/// Connects and authenticates once, without running anything: the connection test.
pub async fn test_connection(
    target: &SshTarget,
    pinner: &dyn HostKeyPinner,
) -> Result<(), ExecError> {
    let handle = connect(target, pinner).await?;
    let _ = handle
        .disconnect(russh::Disconnect::ByApplication, "connection test", "en")
        .await;
    Ok(())
}

/// What the wrapper reads on its standard input before anything else: the step's environment
/// (`export NAME='value'` lines) and the command (`aiops_command='...'`). They travel on the
/// channel, not in the exec request, whose text is the session shell's command line (and that
/// of the watcher forked from it), which every user of the host can read in `ps` or
/// `/proc/<pid>/cmdline`; nor does their size count against the kernel's limit for one argument.
fn wrapper_input(request: &CommandRequest) -> String {
    let mut input = String::new();
    for (name, value) in &request.env {
        input.push_str(&format!("export {name}={}\n", shell_quote(value)));
    }
    input.push_str(&format!(
        "aiops_command={}\n",
        shell_quote(&request.command)
    ));
    input
}

/// The remote wrapper around a command (see the module comment). It reads [`wrapper_input`]
/// to its end from standard input into a variable and applies it only in what becomes the
/// command, after the wrapper's own state (its parent, umask, pgid file) is taken and its
/// watcher is forked: a step variable named like one of the wrapper's, or `PATH`, `PPID`, ...
/// changes nothing of the wrapper. The command keeps the session's umask (only the pgid file is
/// written under `umask 077`).
fn wrapper_script(pgid_file: &str) -> String {
    let mut script = String::from("aiops_in=$(cat)\naiops_o=$PPID\naiops_u=$(umask)\numask 077\n");
    script.push_str(&format!("aiops_f={}\n", shell_quote(pgid_file)));
    // sshd starts the session's shell as the leader of its own session and process group. The
    // wrapper records that group, forks a watcher into it and execs the command in its place,
    // so sshd itself waits for the command and reports its real end: `exit-status`, or
    // `exit-signal` when a signal killed it. The watcher (detached, its streams on /dev/null)
    // polls until the command has exited (gone, or a zombie not yet reaped), then removes the
    // pgid file and kills what the command left running in the group, itself last, so a step
    // never leaks processes or holds the output streams open. While the watcher lives the group
    // exists, so its id cannot be reused by an unrelated process. When the command's parent
    // is no longer the one the wrapper started under, the session's sshd is gone (the
    // connection broke, or the worker died): unless the group is killed over a new connection
    // within 3 s, the watcher sends it TERM, then KILL 2 s later, so the command does not run on
    // beside the step's next run.
    script.push_str(concat!(
        "if kill -0 \"-$$\" 2>/dev/null; then\n",
        "echo $$ >\"$aiops_f\"\n",
        "( (p=$$ d=0.1 i=0 o=$aiops_o f=$aiops_f\n",
        "while kill -0 \"$p\"; do\n",
        "s=; read -r s <\"/proc/$p/stat\"; s=${s##*) }; [ \"${s%% *}\" != Z ] || break\n",
        "s=${s#* }; s=${s%% *}\n",
        "if [ -n \"$s\" ] && [ \"$s\" != \"$o\" ]; then trap '' TERM; sleep 3; kill -TERM \"-$p\"; sleep 2; break; fi\n",
        "sleep \"$d\" || sleep 1; i=$((i+1)); [ \"$i\" -ne 100 ] || d=1\n",
        "done\n",
        "rm -f \"$f\"; kill -KILL \"-$p\") </dev/null >/dev/null 2>&1 &)\n",
        "umask \"$aiops_u\"\n",
        "eval \"$aiops_in\"\n",
        "exec /bin/sh -c \"$aiops_command\" </dev/null\n",
        "fi\n",
    ));
    // Otherwise (a server that does not give the session its own group): run the command under
    // `setsid` in the background and wait for it. This shell survives a signal that kills the
    // command, so the exit code is then the shell's `128 + N`. A watcher outside the command's
    // group checks every second that this shell's parent, the session's sshd, is still there;
    // when it is gone, the command's group gets TERM 3 s later and KILL 2 s after that, as above.
    // The step's environment is applied in the subshell that becomes `setsid` (found with the
    // session's `PATH`), not here.
    script.push_str(concat!(
        "aiops_setsid=$(command -v setsid)\n",
        "(eval \"$aiops_in\"; exec \"$aiops_setsid\" -w /bin/sh -c 'echo $$ >\"$1\"; umask \"$2\"; exec /bin/sh -c \"$3\"' aiops-step \"$aiops_f\" \"$aiops_u\" \"$aiops_command\") </dev/null &\n",
        "w=$!\n",
        "(o=$aiops_o\n",
        "while kill -0 \"$w\"; do\n",
        "s=; read -r s <\"/proc/$$/stat\"; s=${s##*) }; s=${s#* }; s=${s%% *}\n",
        "if [ -n \"$s\" ] && [ \"$s\" != \"$o\" ]; then sleep 3; kill -TERM \"-$w\"; sleep 2; kill -KILL \"-$w\"; break; fi\n",
        "sleep 1\n",
        "done) </dev/null >/dev/null 2>&1 &\n",
        "wait \"$w\"\nrc=$?\nrm -f \"$aiops_f\"\nkill -KILL \"-$w\" 2>/dev/null\nexit \"$rc\"\n",
    ));
    script
}

/// The script the second channel runs to kill a command's process group: TERM, then KILL after
/// two seconds. The recorded group id is also the command's own pid. Exits 0 once the group was
/// signalled while the command ran, [`KILL_NOTHING_TO_KILL`] when the command was not running.
fn kill_script(pgid_file: &str) -> String {
    format!(
        "f={}\n\
         i=0; while [ ! -s \"$f\" ] && [ $i -lt 20 ]; do sleep 0.1; i=$((i+1)); done\n\
         p=$(cat \"$f\" 2>/dev/null) && [ -n \"$p\" ] || exit {KILL_NOTHING_TO_KILL}\n\
         r=0; kill -0 \"$p\" 2>/dev/null || r={KILL_NOTHING_TO_KILL}\n\
         kill -TERM \"-$p\" 2>/dev/null || {{ rm -f \"$f\"; exit {KILL_NOTHING_TO_KILL}; }}\n\
         i=0; while kill -0 \"-$p\" 2>/dev/null && [ $i -lt 20 ]; do sleep 0.1; i=$((i+1)); done\n\
         kill -KILL \"-$p\" 2>/dev/null\n\
         rm -f \"$f\"\n\
         exit $r\n",
        shell_quote(pgid_file)
    )
}

/// What the command's channel reported: its output (capped) and how it ended.
struct Report {
    out: CappedBuffer,
    err: CappedBuffer,
    exit_code: Option<i32>,
    exit_signal: Option<String>,
}

impl Report {
    fn new(limit: usize) -> Self {
        Self {
            out: CappedBuffer::new(OutputStream::Stdout, limit),
            err: CappedBuffer::new(OutputStream::Stderr, limit),
            exit_code: None,
            exit_signal: None,
        }
    }

    /// Takes one message of the channel, streaming output as it comes; whether the channel
    /// has ended.
    async fn take(&mut self, msg: Option<ChannelMsg>, output: &mpsc::Sender<OutputChunk>) -> bool {
        match msg {
            Some(ChannelMsg::Data { data }) => forward(output, self.out.push(&data)).await,
            Some(ChannelMsg::ExtendedData { data, ext: 1 }) => {
                forward(output, self.err.push(&data)).await
            }
            Some(ChannelMsg::ExitStatus { exit_status }) => {
                self.exit_code = Some(i32::try_from(exit_status).unwrap_or(i32::MAX));
            }
            Some(ChannelMsg::ExitSignal { signal_name, .. }) => {
                self.exit_signal = Some(sig_name(&signal_name));
            }
            Some(ChannelMsg::Close) | None => return true,
            Some(_) => {}
        }
        false
    }
}

/// How long a command's channel is read for the rest of its end: its exit report once a kill
/// has been delivered, or its close once its exit has been reported.
const KILLED_REPORT_WAIT: Duration = Duration::from_secs(2);

/// What a kill over the second channel found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kill {
    /// The command's process group was signalled (TERM, then KILL).
    Delivered,
    /// The command itself was not running any more (what it left in its group was killed).
    NothingRunning,
}

fn sig_name(sig: &Sig) -> String {
    match sig {
        Sig::ABRT => "ABRT".to_owned(),
        Sig::ALRM => "ALRM".to_owned(),
        Sig::FPE => "FPE".to_owned(),
        Sig::HUP => "HUP".to_owned(),
        Sig::ILL => "ILL".to_owned(),
        Sig::INT => "INT".to_owned(),
        Sig::KILL => "KILL".to_owned(),
        Sig::PIPE => "PIPE".to_owned(),
        Sig::QUIT => "QUIT".to_owned(),
        Sig::SEGV => "SEGV".to_owned(),
        Sig::TERM => "TERM".to_owned(),
        Sig::USR1 => "USR1".to_owned(),
        Sig::Custom(name) => name.clone(),
    }
}

/// Runs commands over SSH, keeping one connection per server. Clones share the pool.
#[derive(Clone)]
pub struct SshExecutor {
    pinner: Arc<dyn HostKeyPinner>,
    pool: Arc<Mutex<HashMap<Uuid, Arc<Connection>>>>,
    /// Kills of commands whose run was dropped mid-command; [`SshExecutor::settle`] waits for
    /// them.
    abandoned: Arc<StdMutex<tokio::task::JoinSet<()>>>,
}

/// Kills the remote command when a run is dropped before it ended on its own terms: the job
/// running it was abandoned (handler timeout, lease lost, end of the worker's shutdown grace
/// period). The command runs in its own session on the host, so without this it would keep
/// running while another worker runs the step again. The kill runs as a task of its own (a drop
/// cannot wait), tracked so the worker can wait for it before it exits.
struct AbandonGuard<'a> {
    executor: &'a SshExecutor,
    target: &'a SshTarget,
    conn: Arc<Connection>,
    pgid_file: Option<String>,
}

impl AbandonGuard<'_> {
    /// The run dealt with its command itself.
    fn disarm(&mut self) {
        self.pgid_file = None;
    }
}

impl Drop for AbandonGuard<'_> {
    fn drop(&mut self) {
        let Some(pgid_file) = self.pgid_file.take() else {
            return;
        };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let (executor, target, conn) = (
            self.executor.clone(),
            self.target.clone(),
            self.conn.clone(),
        );
        let kill = async move {
            match executor.kill_remote(&target, Some(&conn), &pgid_file).await {
                Ok(Kill::Delivered) => tracing::info!(server_id = %target.server_id,
                    "command of an abandoned step killed on the host"),
                Ok(Kill::NothingRunning) => tracing::info!(server_id = %target.server_id,
                    "command of an abandoned step had already ended on the host"),
                Err(e) => tracing::warn!(server_id = %target.server_id, error = %e,
                    "could not kill the command of an abandoned step; it may still be running \
                     (its process group id is in {pgid_file} on the host)"),
            }
        };
        let mut abandoned = self
            .executor
            .abandoned
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        while abandoned.try_join_next().is_some() {}
        abandoned.spawn_on(kill, &runtime);
    }
}

impl SshExecutor {
    /// An executor that records first-seen host keys through `pinner`.
    pub fn new(pinner: Arc<dyn HostKeyPinner>) -> Self {
        SshExecutor {
            pinner,
            pool: Arc::new(Mutex::new(HashMap::new())),
            abandoned: Arc::new(StdMutex::new(tokio::task::JoinSet::new())),
        }
    }

    /// Number of pooled connections (for tests and metrics).
    pub async fn pooled_connections(&self) -> usize {
        self.pool.lock().await.len()
    }

    async fn connection(
        &self,
        target: &SshTarget,
        fresh: bool,
    ) -> Result<Arc<Connection>, ExecError> {
        let wanted = identity(target);
        if !fresh {
            let pool = self.pool.lock().await;
            if let Some(conn) = pool.get(&target.server_id)
                && conn.identity == wanted
                && !conn.handle.is_closed()
            {
                return Ok(conn.clone());
            }
        }
        let handle = connect(target, self.pinner.as_ref()).await?;
        let conn = Arc::new(Connection {
            handle,
            identity: wanted,
        });
        self.pool
            .lock()
            .await
            .insert(target.server_id, conn.clone());
        Ok(conn)
    }

    /// A session channel on the server's pooled connection, or on a new one when the pooled
    /// one broke or went silent since its last use (a host that lost power or a firewall that
    /// drops the connection answers nothing: the keepalive would notice only after minutes).
    async fn open_channel(
        &self,
        target: &SshTarget,
    ) -> Result<(Arc<Connection>, russh::Channel<russh::client::Msg>), ExecError> {
        let conn = self.connection(target, false).await?;
        let problem =
            match tokio::time::timeout(CHANNEL_OPEN_TIMEOUT, conn.handle.channel_open_session())
                .await
            {
                Ok(Ok(channel)) => return Ok((conn, channel)),
                Ok(Err(e)) => e.to_string(),
                Err(_) => format!("no answer within {} s", CHANNEL_OPEN_TIMEOUT.as_secs()),
            };
        tracing::info!(server_id = %target.server_id, error = %problem, "pooled SSH connection is broken; reconnecting");
        self.drop_connection(target.server_id, &conn).await;
        let conn = self.connection(target, true).await?;
        match tokio::time::timeout(CHANNEL_OPEN_TIMEOUT, conn.handle.channel_open_session()).await {
            Ok(Ok(channel)) => Ok((conn, channel)),
            Ok(Err(e)) => Err(ExecError::Session(format!("cannot open a channel: {e}"))),
            Err(_) => Err(ExecError::Session(format!(
                "cannot open a channel: no answer within {} s",
                CHANNEL_OPEN_TIMEOUT.as_secs()
            ))),
        }
    }

    async fn drop_connection(&self, server_id: Uuid, conn: &Arc<Connection>) {
        let mut pool = self.pool.lock().await;
        if pool.get(&server_id).is_some_and(|c| Arc::ptr_eq(c, conn)) {
            pool.remove(&server_id);
        }
    }

    async fn run_ssh(
        &self,
        target: &SshTarget,
        request: &CommandRequest,
        cancel: CancellationToken,
        output: mpsc::Sender<OutputChunk>,
    ) -> Result<CommandOutcome, ExecError> {
        validate_env(&request.env)?;
        let started = Instant::now();
        // The step timeout and a cancel also cover reaching the server and opening a channel.
        let deadline = tokio::time::sleep(request.timeout);
        tokio::pin!(deadline);
        let not_started = |timed_out: bool| CommandOutcome {
            exit_code: None,
            exit_signal: None,
            stdout: String::new(),
            stderr: String::new(),
            truncated: false,
            timed_out,
            cancelled: !timed_out,
            kill_error: None,
            lost: Some(format!(
                "the command never started: the connection to {}:{} was not ready",
                target.hostname, target.port
            )),
            duration: started.elapsed(),
        };
        let (conn, mut channel) = tokio::select! {
            opened = self.open_channel(target) => opened?,
            _ = &mut deadline => return Ok(not_started(true)),
            _ = cancel.cancelled() => return Ok(not_started(false)),
        };
        let pgid_file = format!("/tmp/.aiops-step-{}.pgid", Uuid::new_v4().simple());
        let mut guard = AbandonGuard {
            executor: self,
            target,
            conn: conn.clone(),
            pgid_file: Some(pgid_file.clone()),
        };
        let started_command = async {
            channel.exec(true, wrapper_script(&pgid_file)).await?;
            channel.data(wrapper_input(request).as_bytes()).await?;
            channel.eof().await
        };
        if let Err(e) = started_command.await {
            guard.disarm();
            return Err(ExecError::Session(format!("cannot start the command: {e}")));
        }

        let mut report = Report::new(request.output_limit_bytes);
        let mut timed_out = false;
        let mut cancelled = false;
        let mut closed_cleanly = false;
        loop {
            // Once sshd has reported the command's end, it finished on its own: a timeout or
            // cancel arriving before the channel closes does not make it timed out or
            // cancelled (the wrapper's watcher kills what it left running, and the channel
            // closes).
            let ended = report.exit_code.is_some() || report.exit_signal.is_some();
            tokio::select! {
                msg = channel.wait() => if report.take(msg, &output).await {
                    closed_cleanly = report.exit_code.is_some() || report.exit_signal.is_some();
                    break;
                },
                _ = &mut deadline, if !ended => { timed_out = true; break; }
                _ = cancel.cancelled(), if !ended => { cancelled = true; break; }
                _ = tokio::time::sleep(KILLED_REPORT_WAIT), if ended => {
                    closed_cleanly = true;
                    break;
                }
            }
        }
        let mut kill_error = None;
        if timed_out || cancelled {
            let killed = self.kill_remote(target, Some(&conn), &pgid_file).await;
            if let Err(e) = &killed {
                tracing::warn!(server_id = %target.server_id, error = %e, "could not kill the remote command");
                kill_error = Some(format!(
                    "{e} (its process group id is in {pgid_file} on the host)"
                ));
            }
            guard.disarm();
            if matches!(killed, Ok(Kill::Delivered)) {
                // sshd reports how the killed command ended (`exit-signal TERM`, as a local
                // command reports it), after the output it flushed on the way.
                let _ = tokio::time::timeout(KILLED_REPORT_WAIT, async {
                    while !report.take(channel.wait().await, &output).await {}
                })
                .await;
            }
            let _ = channel.close().await;
        } else if !closed_cleanly {
            // The channel ended without an exit status: the connection broke under the command.
            // The command runs in its own session, so nothing on the host stops it: kill it over
            // a new connection (which also replaces the broken one in the pool).
            self.drop_connection(target.server_id, &conn).await;
            drop(channel);
            let lost = format!(
                "the connection to {}:{} was lost while the command ran",
                target.hostname, target.port
            );
            let message = match self.kill_remote(target, None, &pgid_file).await {
                Ok(Kill::Delivered) => {
                    format!("{lost}; the remote command was killed over a new connection")
                }
                Ok(Kill::NothingRunning) => format!(
                    "{lost}; the command had already ended on the host, with an unknown exit status"
                ),
                Err(e) => format!(
                    "{lost}, and killing the remote command failed ({e}); it may still be running \
                     (its process group id is in {pgid_file} on the host)"
                ),
            };
            guard.disarm();
            tracing::warn!(server_id = %target.server_id, "{message}");
            // What the command printed until then is kept, as for a timeout.
            let truncated = report.out.truncated() || report.err.truncated();
            return Ok(CommandOutcome {
                exit_code: None,
                exit_signal: None,
                stdout: report.out.finish(),
                stderr: report.err.finish(),
                truncated,
                timed_out: false,
                cancelled: false,
                kill_error: None,
                lost: Some(format!("ssh session failed: {message}")),
                duration: started.elapsed(),
            });
        }
        // Ended on its own: the wrapper's watcher kills what it left running.
        guard.disarm();
        let truncated = report.out.truncated() || report.err.truncated();
        Ok(CommandOutcome {
            exit_code: report.exit_code,
            exit_signal: report.exit_signal,
            stdout: report.out.finish(),
            stderr: report.err.finish(),
            truncated,
            timed_out,
            cancelled,
            kill_error,
            lost: None,
            duration: started.elapsed(),
        })
    }

    /// Kills the command's process group over a second channel: on `conn` when given and still
    /// answering, otherwise on a new connection to the same target (same host key rules), which
    /// then replaces the pooled one.
    async fn kill_remote(
        &self,
        target: &SshTarget,
        conn: Option<&Arc<Connection>>,
        pgid_file: &str,
    ) -> Result<Kill, String> {
        let attempt = async {
            let pooled = match conn {
                Some(conn) => {
                    match tokio::time::timeout(
                        CHANNEL_OPEN_TIMEOUT,
                        conn.handle.channel_open_session(),
                    )
                    .await
                    {
                        Ok(Ok(channel)) => Some(channel),
                        _ => {
                            self.drop_connection(target.server_id, conn).await;
                            None
                        }
                    }
                }
                None => None,
            };
            let mut channel = match pooled {
                Some(channel) => channel,
                None => {
                    let fresh = self
                        .connection(target, true)
                        .await
                        .map_err(|e| format!("cannot reconnect: {e}"))?;
                    fresh
                        .handle
                        .channel_open_session()
                        .await
                        .map_err(|e| format!("cannot open a channel: {e}"))?
                }
            };
            channel
                .exec(true, kill_script(pgid_file))
                .await
                .map_err(|e| format!("cannot start the kill: {e}"))?;
            let mut status = None;
            while let Some(msg) = channel.wait().await {
                match msg {
                    ChannelMsg::ExitStatus { exit_status } => status = Some(exit_status),
                    ChannelMsg::Close => break,
                    _ => {}
                }
            }
            match status {
                Some(0) => Ok(Kill::Delivered),
                Some(KILL_NOTHING_TO_KILL) => Ok(Kill::NothingRunning),
                Some(code) => Err(format!("the kill script exited with {code}")),
                None => Err("the kill channel ended without an exit status".to_owned()),
            }
        };
        match tokio::time::timeout(KILL_TIMEOUT + target.connect_timeout, attempt).await {
            Ok(result) => result,
            Err(_) => Err(format!(
                "no answer within {:?}",
                KILL_TIMEOUT + target.connect_timeout
            )),
        }
    }
}

impl SshExecutor {
    /// Waits for the kills of abandoned commands still under way.
    pub async fn settle(&self) {
        let mut abandoned =
            std::mem::take(&mut *self.abandoned.lock().unwrap_or_else(|p| p.into_inner()));
        while abandoned.join_next().await.is_some() {}
    }
}

impl StepExecutor for SshExecutor {
    fn settle(&self) -> Pin<Box<dyn Future<Output = ()> + Send + '_>> {
        Box::pin(SshExecutor::settle(self))
    }

    fn run<'a>(
        &'a self,
        target: &'a Target,
        request: &'a CommandRequest,
        cancel: CancellationToken,
        output: mpsc::Sender<OutputChunk>,
    ) -> ExecFuture<'a> {
        Box::pin(async move {
            match target {
                Target::Ssh(ssh) => self.run_ssh(ssh, request, cancel, output).await,
                other => Err(ExecError::UnsupportedTarget(other.kind())),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrapper_quotes_environment_and_command() {
        let request = CommandRequest {
            command: "echo 'hi'".to_owned(),
            env: vec![("X".to_owned(), "a'b; rm -rf /".to_owned())],
            timeout: Duration::from_secs(1),
            output_limit_bytes: 10,
        };
        let input = wrapper_input(&request);
        assert!(input.contains("export X='a'\\''b; rm -rf /'\n"), "{input}");
        assert!(
            input.contains("\naiops_command='echo '\\''hi'\\'''\n"),
            "{input}"
        );
        // Neither is part of the exec request, the command line every user of the host sees.
        let script = wrapper_script("/tmp/.aiops-step-x.pgid");
        assert!(
            !script.contains("rm -rf") && !script.contains("export X"),
            "{script}"
        );
    }

    /// Runs the wrapper with this host's `/bin/sh`, as the leader of its own process group (as
    /// sshd starts it) or not; returns the raw exit status and whether the pgid file is gone.
    fn run_wrapper_locally(command: &str, leader: bool) -> (std::process::ExitStatus, bool) {
        run_wrapper_locally_with(command, leader, Vec::new())
    }

    /// [`run_wrapper_locally`] with a step environment.
    fn run_wrapper_locally_with(
        command: &str,
        leader: bool,
        env: Vec<(String, String)>,
    ) -> (std::process::ExitStatus, bool) {
        use std::os::unix::process::CommandExt;
        let pgid_file = format!("/tmp/.aiops-step-test-{}.pgid", Uuid::new_v4().simple());
        let request = CommandRequest {
            command: command.to_owned(),
            env,
            timeout: Duration::from_secs(10),
            output_limit_bytes: 1024,
        };
        let mut cmd = std::process::Command::new("/bin/sh");
        cmd.arg("-c")
            .arg(wrapper_script(&pgid_file))
            .stdin(std::process::Stdio::piped());
        if leader {
            cmd.process_group(0);
        }
        let mut child = cmd.spawn().unwrap();
        {
            use std::io::Write;
            let mut stdin = child.stdin.take().unwrap();
            stdin.write_all(wrapper_input(&request).as_bytes()).unwrap();
        }
        let status = child.wait().unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while std::path::Path::new(&pgid_file).exists() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        (status, !std::path::Path::new(&pgid_file).exists())
    }

    /// Step variables named like the wrapper's own, or that the wrapper relies on (`PATH`,
    /// `PPID`), reach the command as given and change nothing of the wrapper, in both of its
    /// paths.
    #[test]
    fn step_variables_do_not_reach_into_the_wrapper() {
        let env: Vec<(String, String)> = [
            ("c", "my-c"),
            ("f", "my-f"),
            ("u", "my-u"),
            ("p", "my-p"),
            ("o", "my-o"),
            ("PPID", "1"),
            ("PATH", "/nonexistent"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let check = "[ \"$c$f$u$p$o$PATH\" = my-cmy-fmy-umy-pmy-o/nonexistent ] || exit 3; \
                     /bin/sleep 4; exit 7";
        for leader in [true, false] {
            let (status, cleaned) = run_wrapper_locally_with(check, leader, env.clone());
            assert_eq!((status.code(), cleaned), (Some(7), true), "leader {leader}");
        }
    }

    #[test]
    fn as_group_leader_the_wrapper_ends_as_the_command_did() {
        use std::os::unix::process::ExitStatusExt;
        let (status, cleaned) = run_wrapper_locally("exit 137", true);
        assert_eq!(
            (status.code(), status.signal(), cleaned),
            (Some(137), None, true)
        );
        let (status, cleaned) = run_wrapper_locally("kill -TERM $$", true);
        assert_eq!(
            (status.code(), status.signal(), cleaned),
            (None, Some(15), true)
        );
    }

    #[test]
    fn outside_its_own_group_the_wrapper_reports_the_shell_exit_code() {
        use std::os::unix::process::ExitStatusExt;
        let (status, cleaned) = run_wrapper_locally("exit 137", false);
        assert_eq!(
            (status.code(), status.signal(), cleaned),
            (Some(137), None, true)
        );
        let (status, cleaned) = run_wrapper_locally("kill -TERM $$", false);
        assert_eq!(
            (status.code(), status.signal(), cleaned),
            (Some(143), None, true)
        );
    }

    /// Runs the wrapper (as a group leader or not) under a parent shell that then dies, as the
    /// session's sshd does when the connection breaks; returns whether the command (`sleep`)
    /// was killed and the pgid file removed within 10 s.
    fn orphan_wrapper_locally(leader: bool) -> (bool, bool) {
        let pgid_file = format!("/tmp/.aiops-step-test-{}.pgid", Uuid::new_v4().simple());
        let request = CommandRequest {
            command: "exec sleep 300".to_owned(),
            env: Vec::new(),
            timeout: Duration::from_secs(10),
            output_limit_bytes: 1024,
        };
        // `setsid` run in the background by a shell without job control is no group leader, so
        // it makes itself one in place: the wrapper leads a group and a session, as under sshd.
        let start = if leader { "setsid /bin/sh" } else { "/bin/sh" };
        let mut parent = std::process::Command::new("/bin/sh")
            .arg("-c")
            .arg(format!(
                "printf '%s' \"$2\" | {start} -c \"$1\" >/dev/null 2>&1 & wait"
            ))
            .arg("parent")
            .arg(wrapper_script(&pgid_file))
            .arg(wrapper_input(&request))
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        let pid = loop {
            if let Ok(pid) = std::fs::read_to_string(&pgid_file)
                .unwrap_or_default()
                .trim()
                .parse::<i32>()
            {
                break pid;
            }
            assert!(
                Instant::now() < deadline,
                "the wrapper never wrote its pgid file"
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        // The watcher compares with the parent the wrapper started under ($PPID), so the parent
        // may go at once.
        assert!(alive(pid), "the command ended before its parent died");
        parent.kill().unwrap();
        parent.wait().unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while (alive(pid) || std::path::Path::new(&pgid_file).exists()) && Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(50));
        }
        let killed = !alive(pid);
        if !killed {
            let _ = rustix::process::kill_process(
                rustix::process::Pid::from_raw(pid).unwrap(),
                rustix::process::Signal::KILL,
            );
        }
        (killed, !std::path::Path::new(&pgid_file).exists())
    }

    /// Whether `pid` runs (a zombie does not).
    fn alive(pid: i32) -> bool {
        std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
            !stat
                .rsplit_once(')')
                .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'))
        })
    }

    #[test]
    fn a_command_whose_session_sshd_is_gone_is_killed() {
        assert_eq!(
            orphan_wrapper_locally(true),
            (true, true),
            "as group leader"
        );
        assert_eq!(orphan_wrapper_locally(false), (true, true), "under setsid");
    }

    #[test]
    fn the_kill_script_says_whether_the_command_was_still_running() {
        use std::os::unix::process::{CommandExt, ExitStatusExt};
        let run_kill = |pgid_file: &str| {
            std::process::Command::new("/bin/sh")
                .arg("-c")
                .arg(kill_script(pgid_file))
                .status()
                .unwrap()
                .code()
        };
        let pgid_file = format!("/tmp/.aiops-step-test-{}.pgid", Uuid::new_v4().simple());
        let running = std::process::Command::new("sleep")
            .arg("30")
            .process_group(0)
            .spawn()
            .unwrap();
        std::fs::write(&pgid_file, format!("{}\n", running.id())).unwrap();
        // Reaped as soon as it dies, as sshd does, so the script sees the group go.
        let reaper = std::thread::spawn(move || {
            let mut running = running;
            running.wait().unwrap().signal()
        });
        assert_eq!(run_kill(&pgid_file), Some(0));
        assert_eq!(reaper.join().unwrap(), Some(15));
        assert!(!std::path::Path::new(&pgid_file).exists());

        let mut ended = std::process::Command::new("true")
            .process_group(0)
            .spawn()
            .unwrap();
        ended.wait().unwrap();
        std::fs::write(&pgid_file, format!("{}\n", ended.id())).unwrap();
        assert_eq!(run_kill(&pgid_file), Some(KILL_NOTHING_TO_KILL as i32));
        assert!(!std::path::Path::new(&pgid_file).exists());
    }
}
