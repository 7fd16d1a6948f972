//! The SSH executor against a real OpenSSH server on loopback (`tests/sshd`): key and password
//! authentication, host key pinning, timeouts and cancellation that kill the remote process,
//! output caps, literal environment values, replacement of a broken pooled connection, and a
//! command whose connection breaks while it runs killed over a new one.

mod procs;
mod sshd;

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aiops::exec::ssh::{HostKeyPinner, SshExecutor};
use aiops::exec::{
    CancellationToken, CommandOutcome, CommandRequest, ConnectFailure, ExecError, SshAuth,
    SshTarget, StepExecutor, Target,
};
use procs::{alive, wait_for_pid, wait_gone};
use tokio::sync::mpsc;
use uuid::Uuid;

/// Pins in memory, like the store does in the database.
#[derive(Default)]
struct MemoryPinner(Mutex<HashMap<Uuid, String>>);

impl HostKeyPinner for MemoryPinner {
    fn pin<'a>(
        &'a self,
        server_id: Uuid,
        key: &'a str,
        _fingerprint: &'a str,
    ) -> Pin<Box<dyn Future<Output = Result<String, String>> + Send + 'a>> {
        Box::pin(async move {
            let mut map = self.0.lock().unwrap();
            Ok(map
                .entry(server_id)
                .or_insert_with(|| key.to_owned())
                .clone())
        })
    }
}

fn executor() -> (SshExecutor, Arc<MemoryPinner>) {
    let pinner = Arc::new(MemoryPinner::default());
    (SshExecutor::new(pinner.clone()), pinner)
}

fn request(command: &str) -> CommandRequest {
    CommandRequest {
        command: command.to_owned(),
        env: Vec::new(),
        timeout: Duration::from_secs(30),
        output_limit_bytes: 1 << 20,
    }
}

async fn run(
    exec: &SshExecutor,
    target: &SshTarget,
    req: &CommandRequest,
) -> Result<CommandOutcome, ExecError> {
    let (tx, _rx) = mpsc::channel(1024);
    exec.run(
        &Target::Ssh(target.clone()),
        req,
        CancellationToken::new(),
        tx,
    )
    .await
}
#[tokio::test]
async fn key_auth_with_every_key_type_and_a_passphrase() {
    let sshd = sshd::sshd();
    let (exec, _) = executor();
    for key in ["id_ed25519", "id_ecdsa", "id_rsa", "id_ed25519_pass"] {
        let target = sshd.key_target(key);
        let out = run(&exec, &target, &request("echo out; echo err >&2; exit 7"))
            .await
            .unwrap_or_else(|e| panic!("{key}: {e}"));
        assert_eq!(out.exit_code, Some(7), "{key}");
        assert_eq!(out.stdout, "out\n", "{key}");
        assert_eq!(out.stderr, "err\n", "{key}");
    }
    // RSA authenticates with SHA-2: the server log names the algorithm it accepted.
    let log = sshd.read("sshd.log");
    assert!(log.contains("RSA") || log.contains("rsa-sha2"), "{log}");
    assert!(!log.contains("ssh-rsa SHA1"), "{log}");
}

#[tokio::test]
async fn wrong_passphrase_and_wrong_password_fail_as_authentication() {
    let sshd = sshd::sshd();
    let (exec, _) = executor();
    let mut target = sshd.key_target("id_ed25519_pass");
    target.auth = SshAuth::Key {
        private_key: sshd.read("id_ed25519_pass"),
        passphrase: Some("wrong".to_owned()),
    };
    let err = run(&exec, &target, &request("true")).await.unwrap_err();
    assert_eq!(
        err.connect_failure(),
        Some(ConnectFailure::Authentication),
        "{err}"
    );

    let target = sshd.password_target();
    let out = run(&exec, &target, &request("whoami")).await.unwrap();
    assert_eq!(out.stdout, "aiops-test\n");
    let mut wrong = sshd.password_target();
    wrong.auth = SshAuth::Password("not-the-password".to_owned());
    let err = run(&exec, &wrong, &request("true")).await.unwrap_err();
    assert_eq!(
        err.connect_failure(),
        Some(ConnectFailure::Authentication),
        "{err}"
    );
    assert!(err.to_string().contains("refused the password"), "{err}");
    assert!(!err.to_string().contains("not-the-password"));
}

#[tokio::test]
async fn first_connection_pins_and_a_changed_key_is_refused() {
    let sshd = sshd::sshd();
    let (exec, pinner) = executor();
    let target = sshd.key_target("id_ed25519");
    run(&exec, &target, &request("true")).await.unwrap();
    let pinned = pinner
        .0
        .lock()
        .unwrap()
        .get(&target.server_id)
        .cloned()
        .unwrap();
    // The pinned key is one of the server's host keys.
    let host_keys = [
        sshd.read("host_ed25519.pub"),
        sshd.read("host_ecdsa.pub"),
        sshd.read("host_rsa.pub"),
    ];
    let pinned_body = pinned.split_whitespace().nth(1).unwrap();
    assert!(
        host_keys.iter().any(|k| k.contains(pinned_body)),
        "{pinned}"
    );

    // Pinned to the right key: accepted.
    let mut good = target.clone();
    good.pinned_host_key = Some(pinned.clone());
    run(&exec, &good, &request("true")).await.unwrap();

    // Pinned to another key (the host was re-keyed, or this is not the host): refused.
    let mut changed = target.clone();
    changed.pinned_host_key = Some(sshd.read("other_host_ed25519.pub"));
    let err = run(&exec, &changed, &request("touch /tmp/should-not-run"))
        .await
        .unwrap_err();
    assert_eq!(
        err.connect_failure(),
        Some(ConnectFailure::HostKeyMismatch),
        "{err}"
    );
    assert!(err.to_string().contains("admin must reset"), "{err}");
}

#[tokio::test]
async fn timeout_kills_the_remote_process() {
    let sshd = sshd::sshd();
    let (exec, _) = executor();
    let target = sshd.key_target("id_ed25519");
    let pidfile = format!("/tmp/aiops-ssh-test-{}.pid", Uuid::new_v4().simple());
    let mut req = request(&format!("sleep 300 & echo $! > {pidfile}; wait"));
    req.timeout = Duration::from_secs(1);
    let out = run(&exec, &target, &req).await.unwrap();
    assert!(out.timed_out && !out.cancelled);
    // sshd's report of the killed command, as a local command reports it.
    assert_eq!(
        (out.exit_code, out.exit_signal.as_deref()),
        (None, Some("TERM"))
    );
    let pid = wait_for_pid(&pidfile, Duration::from_secs(10)).await;
    assert!(
        wait_gone(pid).await,
        "remote sleep {pid} survived the timeout"
    );
    let _ = std::fs::remove_file(&pidfile);
}

#[tokio::test]
async fn cancellation_mid_command_kills_it() {
    let sshd = sshd::sshd();
    let exec = Arc::new(executor().0);
    let target = Target::Ssh(sshd.key_target("id_ed25519"));
    let pidfile = format!("/tmp/aiops-ssh-test-{}.pid", Uuid::new_v4().simple());
    let req = request(&format!(
        "echo started; sleep 300 & echo $! > {pidfile}; wait"
    ));
    let cancel = CancellationToken::new();
    let (tx, mut rx) = mpsc::channel(16);
    let task = {
        let (exec, cancel) = (exec.clone(), cancel.clone());
        tokio::spawn(async move { exec.run(&target, &req, cancel, tx).await })
    };
    assert_eq!(rx.recv().await.unwrap().bytes, b"started\n");
    let pid = wait_for_pid(&pidfile, Duration::from_secs(10)).await;
    assert!(alive(pid));
    cancel.cancel();
    let out = task.await.unwrap().unwrap();
    assert!(out.cancelled && !out.timed_out);
    assert_eq!(
        (out.exit_code, out.exit_signal.as_deref()),
        (None, Some("TERM"))
    );
    assert!(
        wait_gone(pid).await,
        "remote sleep {pid} survived cancellation"
    );
    let _ = std::fs::remove_file(&pidfile);
}

#[tokio::test]
async fn an_abandoned_run_kills_the_remote_command() {
    let sshd = sshd::sshd();
    let exec = Arc::new(executor().0);
    let target = Target::Ssh(sshd.key_target("id_ed25519"));
    let pidfile = format!("/tmp/aiops-ssh-test-{}.pid", Uuid::new_v4().simple());
    let req = request(&format!("sleep 300 & echo $! > {pidfile}; wait"));
    let (tx, _rx) = mpsc::channel(16);
    let task = {
        let exec = exec.clone();
        tokio::spawn(async move { exec.run(&target, &req, CancellationToken::new(), tx).await })
    };
    let pid = wait_for_pid(&pidfile, Duration::from_secs(10)).await;
    assert!(alive(pid));
    // What a worker does with a job it gives up (handler timeout, lost lease, end of the
    // shutdown grace period): the run is dropped mid-command. The kill it leaves behind is
    // awaited, as a stopping worker does.
    task.abort();
    assert!(task.await.unwrap_err().is_cancelled());
    exec.settle().await;
    assert!(
        wait_gone(pid).await,
        "remote sleep {pid} survived its abandoned run"
    );
    let _ = std::fs::remove_file(&pidfile);
}

#[tokio::test]
async fn large_output_is_capped_and_streams_stay_apart() {
    let sshd = sshd::sshd();
    let (exec, _) = executor();
    let target = sshd.key_target("id_ed25519");
    let mut req = request("head -c 5000000 /dev/zero | tr '\\0' x; echo tail >&2; exit 0");
    req.output_limit_bytes = 4096;
    let out = run(&exec, &target, &req).await.unwrap();
    assert_eq!(out.exit_code, Some(0));
    assert!(out.truncated);
    assert!(out.stdout.starts_with(&"x".repeat(4096)));
    assert!(
        out.stdout
            .contains("truncated at 4096 bytes; 4995904 more bytes discarded"),
        "{}",
        &out.stdout[4096..]
    );
    assert_eq!(out.stderr, "tail\n");
}

#[tokio::test]
async fn hostile_environment_values_stay_one_literal_argument() {
    let sshd = sshd::sshd();
    let (exec, _) = executor();
    let target = sshd.key_target("id_ed25519");
    let marker = format!("/tmp/aiops-pwned-{}", Uuid::new_v4().simple());
    let hostile =
        format!("x'; touch {marker}; echo '$(touch {marker})`touch {marker}`\"\n;$HOME \\ *");
    let mut req = request("printf '%s' \"$VALUE\"; printf '|%s' $#");
    req.env = vec![("VALUE".to_owned(), hostile.clone())];
    let out = run(&exec, &target, &req).await.unwrap();
    assert_eq!(out.stdout, format!("{hostile}|0"));
    // As one argument to a program: argv count is exactly one.
    let mut req = request("set -- \"$VALUE\"; echo $#");
    req.env = vec![("VALUE".to_owned(), hostile)];
    assert_eq!(run(&exec, &target, &req).await.unwrap().stdout, "1\n");
    assert!(
        !std::path::Path::new(&marker).exists(),
        "hostile value was executed"
    );
    // Names are validated, not quoted.
    let mut req = request("true");
    req.env = vec![("A;touch x".to_owned(), String::new())];
    assert!(matches!(
        run(&exec, &target, &req).await,
        Err(ExecError::InvalidRequest(_))
    ));
}

#[tokio::test]
async fn a_command_killed_by_a_signal_reports_the_signal_and_an_exit_code_stays_one() {
    let sshd = sshd::sshd();
    let (exec, _) = executor();
    let target = sshd.key_target("id_ed25519");
    // The command's shell kills itself: sshd reports the signal, not an exit code.
    let out = run(
        &exec,
        &target,
        &request("echo before; kill -TERM $$; echo after"),
    )
    .await
    .unwrap();
    assert_eq!(
        (out.exit_code, out.exit_signal.as_deref()),
        (None, Some("TERM"))
    );
    assert_eq!(out.stdout, "before\n");
    // Exiting with 128 + N is an exit code, never taken for a signal.
    for code in [137, 143] {
        let out = run(&exec, &target, &request(&format!("exit {code}")))
            .await
            .unwrap();
        assert_eq!((out.exit_code, out.exit_signal), (Some(code), None));
    }
    // A child killed by a signal is the shell's business: the shell exits with 128 + N.
    let out = run(
        &exec,
        &target,
        &request("/bin/sh -c 'kill -KILL $$'; exit $?"),
    )
    .await
    .unwrap();
    assert_eq!((out.exit_code, out.exit_signal), (Some(137), None));

    // Killed from outside (as the OOM killer would): the command itself reports KILL.
    let pidfile = format!("/tmp/aiops-ssh-test-{}.pid", Uuid::new_v4().simple());
    let exec = Arc::new(exec);
    let task = {
        let (exec, target) = (exec.clone(), Target::Ssh(target.clone()));
        let req = request(&format!("echo $$ > {pidfile}; exec sleep 300"));
        tokio::spawn(async move {
            let (tx, _rx) = mpsc::channel(16);
            exec.run(&target, &req, CancellationToken::new(), tx).await
        })
    };
    let pid = wait_for_pid(&pidfile, Duration::from_secs(10)).await;
    // Wait until the shell has become `sleep`, so the signal hits the command itself.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while comm_and_parent(pid).is_none_or(|(comm, _)| comm != "sleep") {
        assert!(
            std::time::Instant::now() < deadline,
            "{pid} never became sleep"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let status = std::process::Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let out = task.await.unwrap().unwrap();
    assert_eq!(
        (out.exit_code, out.exit_signal.as_deref(), out.timed_out),
        (None, Some("KILL"), false)
    );
    let _ = std::fs::remove_file(&pidfile);
}

#[tokio::test]
async fn what_a_command_leaves_running_is_killed_after_it_exits() {
    let sshd = sshd::sshd();
    let (exec, _) = executor();
    let target = sshd.key_target("id_ed25519");
    let pidfile = format!("/tmp/aiops-ssh-test-{}.pid", Uuid::new_v4().simple());
    // One leftover holds stdout open (the channel cannot close while it lives), one does not;
    // the command prints the pgid file that names its group. Other tests' steps remove their
    // pgid files as they end, so one may vanish under grep: its exit status is not the point.
    let out = run(
        &exec,
        &target,
        &request(&format!(
            "sleep 300 & echo $! > {pidfile}; sleep 300 >/dev/null 2>&1 & echo $! >> {pidfile}; \
             grep -slx \"$$\" /tmp/.aiops-step-*.pgid || true"
        )),
    )
    .await
    .unwrap();
    assert_eq!(out.exit_code, Some(0), "{out:?}");
    let pgid_file = out.stdout.trim().to_owned();
    assert!(pgid_file.starts_with("/tmp/.aiops-step-"), "{out:?}");
    let pids: Vec<i32> = std::fs::read_to_string(&pidfile)
        .unwrap()
        .lines()
        .map(|l| l.trim().parse().unwrap())
        .collect();
    assert_eq!(pids.len(), 2);
    for pid in pids {
        assert!(wait_gone(pid).await, "leftover {pid} survived the step");
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(3);
    while std::path::Path::new(&pgid_file).exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "{pgid_file} was left behind"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = std::fs::remove_file(&pidfile);
}

/// A TCP forwarder in front of sshd whose connections the test can cut.
struct Proxy {
    port: u16,
    accepted: Arc<AtomicUsize>,
    tasks: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>>,
    freeze: Arc<tokio::sync::Notify>,
}

impl Proxy {
    async fn start(upstream: u16) -> Proxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let accepted = Arc::new(AtomicUsize::new(0));
        let tasks: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>> = Arc::default();
        let freeze = Arc::new(tokio::sync::Notify::new());
        let (acc, t, f) = (accepted.clone(), tasks.clone(), freeze.clone());
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                acc.fetch_add(1, Ordering::SeqCst);
                let f = f.clone();
                let handle = tokio::spawn(async move {
                    let mut outbound = tokio::net::TcpStream::connect(("127.0.0.1", upstream))
                        .await
                        .unwrap();
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        // Silent from now on: nothing passes, nothing is closed.
                        _ = f.notified() => std::future::pending::<()>().await,
                    }
                });
                t.lock().unwrap().push(handle);
            }
        });
        Proxy {
            port,
            accepted,
            tasks,
            freeze,
        }
    }

    /// The connections open now go silent, as to a host that lost power: no data passes and
    /// none is closed. Later connections pass.
    fn freeze_all(&self) {
        self.freeze.notify_waiters();
    }

    fn cut_all(&self) {
        for task in self.tasks.lock().unwrap().drain(..) {
            task.abort();
        }
    }
}

#[tokio::test]
async fn connections_are_reused_and_a_broken_one_is_replaced() {
    let sshd = sshd::sshd();
    let proxy = Proxy::start(sshd.port).await;
    let (exec, _) = executor();
    let mut target = sshd.key_target("id_ed25519");
    target.port = proxy.port;
    for _ in 0..5 {
        assert_eq!(
            run(&exec, &target, &request("echo hi"))
                .await
                .unwrap()
                .stdout,
            "hi\n"
        );
    }
    assert_eq!(
        proxy.accepted.load(Ordering::SeqCst),
        1,
        "five steps should share one connection"
    );
    assert_eq!(exec.pooled_connections().await, 1);

    proxy.cut_all();
    let out = run(&exec, &target, &request("echo again")).await.unwrap();
    assert_eq!(out.stdout, "again\n");
    assert_eq!(
        proxy.accepted.load(Ordering::SeqCst),
        2,
        "the broken connection is replaced once"
    );
    assert_eq!(exec.pooled_connections().await, 1);
}

/// A pooled connection that went silent (no reset, nothing answers) is given up after a few
/// seconds and replaced, instead of holding the step until the keepalive notices; a cancel
/// that comes while the channel is being opened ends the step at once.
#[tokio::test]
async fn a_silent_pooled_connection_is_replaced_and_a_cancel_reaches_the_connect() {
    let sshd = sshd::sshd();
    let proxy = Proxy::start(sshd.port).await;
    let (exec, _) = executor();
    let mut target = sshd.key_target("id_ed25519");
    target.port = proxy.port;
    assert_eq!(
        run(&exec, &target, &request("echo hi"))
            .await
            .unwrap()
            .stdout,
        "hi\n"
    );
    proxy.freeze_all();
    // Bounded well below the keepalive's two minutes.
    let out = tokio::time::timeout(
        Duration::from_secs(60),
        run(&exec, &target, &request("echo again")),
    )
    .await
    .expect("the silent connection held the step")
    .unwrap();
    assert_eq!(out.stdout, "again\n");
    assert!(!out.timed_out, "{out:?}");
    assert_eq!(proxy.accepted.load(Ordering::SeqCst), 2);

    proxy.freeze_all();
    let cancel = CancellationToken::new();
    let (tx, _rx) = mpsc::channel(16);
    let canceller = {
        let cancel = cancel.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            cancel.cancel();
        })
    };
    let out = tokio::time::timeout(
        Duration::from_secs(20),
        exec.run(
            &Target::Ssh(target.clone()),
            &request("echo never"),
            cancel,
            tx,
        ),
    )
    .await
    .expect("the cancel did not reach the connect")
    .unwrap();
    canceller.await.unwrap();
    assert!(out.cancelled && out.exit_code.is_none(), "{out:?}");
    assert_eq!(out.stdout, "");
    assert!(
        out.lost
            .as_deref()
            .is_some_and(|why| why.starts_with("the command never started")),
        "{out:?}"
    );
}

/// `comm` and parent pid of a process, from `/proc/<pid>/stat`.
fn comm_and_parent(pid: i32) -> Option<(String, i32)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (head, rest) = stat.rsplit_once(')')?;
    let comm = head.split_once('(')?.1.to_owned();
    let ppid = rest.split_whitespace().nth(1)?.parse().ok()?;
    Some((comm, ppid))
}

/// The per-connection sshd process serving the session `pid` runs in: its nearest sshd
/// ancestor (the listening sshd is further up).
fn serving_sshd(pid: i32) -> i32 {
    let mut current = pid;
    loop {
        let (comm, parent) = comm_and_parent(current)
            .unwrap_or_else(|| panic!("process {current} (an ancestor of {pid}) is gone"));
        if comm.starts_with("sshd") {
            return current;
        }
        assert!(parent > 1, "process {pid} does not run under sshd");
        current = parent;
    }
}

#[tokio::test]
async fn a_connection_lost_mid_command_is_replaced_and_the_command_killed_over_it() {
    let sshd = sshd::sshd();
    let proxy = Proxy::start(sshd.port).await;
    let exec = Arc::new(executor().0);
    let mut target = sshd.key_target("id_ed25519");
    target.port = proxy.port;
    let pidfile = format!("/tmp/aiops-ssh-test-{}.pid", Uuid::new_v4().simple());
    let mut req = request(&format!(
        "echo started; sleep 300 & echo $! > {pidfile}; wait"
    ));
    // Long enough that only the lost connection (never the timeout) can end the command here.
    req.timeout = Duration::from_secs(120);
    let (tx, mut rx) = mpsc::channel(16);
    let task = {
        let (exec, target) = (exec.clone(), Target::Ssh(target.clone()));
        tokio::spawn(async move { exec.run(&target, &req, CancellationToken::new(), tx).await })
    };
    // Its first line has reached the executor before the connection breaks.
    let first = tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .expect("no output")
        .expect("output channel closed");
    assert_eq!(first.bytes, b"started\n");
    let _keep_receiving = tokio::spawn(async move { while rx.recv().await.is_some() {} });
    let sleep_pid = wait_for_pid(&pidfile, Duration::from_secs(10)).await;
    let shell_pid = comm_and_parent(sleep_pid).unwrap().1;
    let server = serving_sshd(sleep_pid);
    let listener: i32 = sshd.read("sshd.pid").trim().parse().unwrap();
    assert_ne!(server, listener, "must cut one connection, not the server");
    assert_eq!(proxy.accepted.load(Ordering::SeqCst), 1);

    // Break the connection from the host side: its sshd process dies, the command does not.
    let status = std::process::Command::new("kill")
        .args(["-KILL", &server.to_string()])
        .status()
        .unwrap();
    assert!(status.success());

    let out = tokio::time::timeout(Duration::from_secs(60), task)
        .await
        .expect("run did not return after the connection broke")
        .unwrap()
        .unwrap();
    // No exit status, what it printed kept, and why.
    assert_eq!(
        (out.exit_code, out.exit_signal.as_deref()),
        (None, None),
        "{out:?}"
    );
    assert_eq!(out.stdout, "started\n", "{out:?}");
    let text = out.lost.unwrap_or_default();
    assert!(
        text.contains(&format!(
            "the connection to 127.0.0.1:{} was lost while the command ran",
            proxy.port
        )) && text.contains("the remote command was killed over a new connection"),
        "{text}"
    );
    assert!(
        wait_gone(sleep_pid).await,
        "remote sleep {sleep_pid} survived the lost connection"
    );
    assert!(
        wait_gone(shell_pid).await,
        "remote shell {shell_pid} survived the lost connection"
    );
    assert_eq!(
        proxy.accepted.load(Ordering::SeqCst),
        2,
        "the kill goes over one new connection"
    );

    // The new connection replaced the broken one: the next command runs on it.
    let out = run(&exec, &target, &request("echo again")).await.unwrap();
    assert_eq!(out.stdout, "again\n");
    assert_eq!(proxy.accepted.load(Ordering::SeqCst), 2);
    assert_eq!(exec.pooled_connections().await, 1);
    let _ = std::fs::remove_file(&pidfile);
}

#[tokio::test]
async fn connect_failures_are_classified() {
    let (exec, _) = executor();
    let sshd = sshd::sshd();
    // Refused: a port nobody listens on.
    let mut target = sshd.key_target("id_ed25519");
    target.port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let err = run(&exec, &target, &request("true")).await.unwrap_err();
    assert_eq!(
        err.connect_failure(),
        Some(ConnectFailure::Refused),
        "{err}"
    );
    // DNS: a name under the reserved .invalid TLD never resolves.
    let mut target = sshd.key_target("id_ed25519");
    target.hostname = "no-such-host.invalid".to_owned();
    let err = run(&exec, &target, &request("true")).await.unwrap_err();
    assert_eq!(err.connect_failure(), Some(ConnectFailure::Dns), "{err}");
    // Timeout: a listener that accepts but never speaks SSH.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mut target = sshd.key_target("id_ed25519");
    target.port = silent.local_addr().unwrap().port();
    target.connect_timeout = Duration::from_millis(500);
    let err = run(&exec, &target, &request("true")).await.unwrap_err();
    assert_eq!(
        err.connect_failure(),
        Some(ConnectFailure::Timeout),
        "{err}"
    );
}

/// The step's environment and command travel on the channel, not in the exec request: no
/// process on the host shows a secret variable in its command line while the command runs,
/// a large environment is no argument over the kernel's limit, and the command keeps the
/// session's umask (the wrapper's own `umask 077` is for its pgid file only).
#[tokio::test]
async fn the_environment_stays_out_of_every_command_line_on_the_host() {
    let sshd = sshd::sshd();
    let (exec, _) = executor();
    let target = sshd.key_target("id_ed25519");
    let secret = format!("s3cret-{}", Uuid::new_v4().simple());
    // Two values of 100,000 bytes: each under the kernel's limit for one string, together
    // over it (as one exec request they were refused).
    let mut req = request("sleep 2; umask; printf '%s%s' \"$BIG\" \"$BIG2\" | wc -c");
    req.env = vec![
        ("DB_PASSWORD".to_owned(), secret.clone()),
        ("BIG".to_owned(), "x".repeat(100_000)),
        ("BIG2".to_owned(), "y".repeat(100_000)),
    ];
    let running = {
        let (exec, target, req) = (exec.clone(), target.clone(), req.clone());
        tokio::spawn(async move { run(&exec, &target, &req).await })
    };
    let mut seen = Vec::new();
    let until = std::time::Instant::now() + Duration::from_millis(1500);
    while std::time::Instant::now() < until {
        for entry in std::fs::read_dir("/proc").unwrap().flatten() {
            if let Ok(cmdline) = std::fs::read(entry.path().join("cmdline"))
                && String::from_utf8_lossy(&cmdline).contains(&secret)
            {
                seen.push(String::from_utf8_lossy(&cmdline).replace('\0', " "));
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let out = running.await.unwrap().unwrap();
    assert!(seen.is_empty(), "{seen:?}");
    assert_eq!(out.exit_code, Some(0), "{out:?}");
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert_ne!(lines[0], "0077", "{out:?}");
    assert_eq!(lines[1].trim(), "200000", "{out:?}");
}
