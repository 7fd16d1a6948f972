//! SSH step overhead: 100 trivial steps (`true`) over SSH to a loopback sshd, with the
//! executor's pooled connection, against a fresh OpenSSH `ssh host true` per step.
//!
//! Run with `cargo bench --bench ssh` (starts its own sshd through `scripts/test-sshd.sh`;
//! `STEPS=N` changes the step count). Prints per-step figures and the ratio; the goal is a
//! ratio of at most 0.3. Without `--bench` (as under `cargo test --all-targets`) it runs 5 steps.

use std::future::Future;
use std::io::BufRead;
use std::path::PathBuf;
use std::pin::Pin;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use aiops::exec::ssh::{HostKeyPinner, SshExecutor};
use aiops::exec::{CancellationToken, CommandRequest, SshAuth, SshTarget, StepExecutor, Target};

struct KeepFirst(std::sync::Mutex<Option<String>>);

impl HostKeyPinner for KeepFirst {
    fn pin<'a>(
        &'a self,
        _server_id: uuid::Uuid,
        key: &'a str,
        _fingerprint: &'a str,
    ) -> Pin<Box<dyn Future<Output = Result<String, String>> + Send + 'a>> {
        Box::pin(async move {
            let mut slot = self.0.lock().map_err(|e| e.to_string())?;
            Ok(slot.get_or_insert_with(|| key.to_owned()).clone())
        })
    }
}

fn main() -> anyhow::Result<()> {
    let steps: usize = std::env::var("STEPS")
        .ok()
        .and_then(|s| s.parse().ok())
        // `cargo bench` passes --bench; `cargo test --all-targets` does not: a smoke run then.
        .unwrap_or(if std::env::args().any(|a| a == "--bench") {
            100
        } else {
            5
        });
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let dir = root
        .join("target/bench-sshd")
        .join(uuid::Uuid::new_v4().simple().to_string());
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let mut sshd = Command::new(root.join("scripts/test-sshd.sh"))
        .arg(&dir)
        .arg(port.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()?;
    let mut line = String::new();
    std::io::BufReader::new(
        sshd.stdout
            .take()
            .ok_or_else(|| anyhow::anyhow!("no stdout"))?,
    )
    .read_line(&mut line)?;
    anyhow::ensure!(line.trim() == "ready", "sshd did not start");
    let key_path = dir.join("id_ed25519");

    // Fresh OpenSSH per step (ed25519 key, host key check off, no multiplexing).
    let fresh_ssh = || -> anyhow::Result<()> {
        let status = Command::new("ssh")
            .args([
                "-q",
                "-o",
                "BatchMode=yes",
                "-o",
                "StrictHostKeyChecking=no",
            ])
            .args([
                "-o",
                "UserKnownHostsFile=/dev/null",
                "-o",
                "ControlMaster=no",
            ])
            .arg("-i")
            .arg(&key_path)
            .args(["-p", &port.to_string(), "aiops-test@127.0.0.1", "true"])
            .stdin(Stdio::null())
            .status()?;
        anyhow::ensure!(status.success(), "ssh true failed: {status}");
        Ok(())
    };
    fresh_ssh()?; // warm-up
    let started = Instant::now();
    for _ in 0..steps {
        fresh_ssh()?;
    }
    let fresh = started.elapsed();

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let pooled = runtime.block_on(async {
        let exec = SshExecutor::new(Arc::new(KeepFirst(std::sync::Mutex::new(None))));
        let target = Target::Ssh(SshTarget {
            server_id: uuid::Uuid::new_v4(),
            hostname: "127.0.0.1".to_owned(),
            port,
            username: "aiops-test".to_owned(),
            auth: SshAuth::Key {
                private_key: std::fs::read_to_string(&key_path)?,
                passphrase: None,
            },
            pinned_host_key: None,
            connect_timeout: Duration::from_secs(10),
        });
        let request = CommandRequest {
            command: "true".to_owned(),
            env: Vec::new(),
            timeout: Duration::from_secs(30),
            output_limit_bytes: 1 << 20,
        };
        let step = || async {
            let (tx, _rx) = tokio::sync::mpsc::channel(16);
            let out = exec
                .run(&target, &request, CancellationToken::new(), tx)
                .await?;
            anyhow::ensure!(out.exit_code == Some(0), "step failed: {out:?}");
            Ok::<(), anyhow::Error>(())
        };
        step().await?; // connects and pins; the steps below reuse the connection
        let started = Instant::now();
        for _ in 0..steps {
            step().await?;
        }
        Ok::<Duration, anyhow::Error>(started.elapsed())
    })?;
    drop(sshd.stdin.take());
    let _ = sshd.wait();

    let per = |d: Duration| d.as_secs_f64() * 1000.0 / steps as f64;
    println!("ssh step overhead, {steps} trivial steps (`true`) to 127.0.0.1:{port}");
    println!(
        "  fresh OpenSSH `ssh host true` per step: {:8.2} ms/step  (total {:.2} s)",
        per(fresh),
        fresh.as_secs_f64()
    );
    println!(
        "  aiops SshExecutor, pooled connection:    {:8.2} ms/step  (total {:.2} s)",
        per(pooled),
        pooled.as_secs_f64()
    );
    println!(
        "  ratio pooled / fresh: {:.3} (goal <= 0.300)",
        per(pooled) / per(fresh)
    );
    Ok(())
}
