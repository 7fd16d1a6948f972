//! A private OpenSSH server for the SSH tests: started once per test binary by
//! `scripts/test-sshd.sh` on a free loopback port, with its own host keys, client keys and the
//! `aiops-test` user. The script stops sshd when this process exits (its stdin closes).
#![allow(dead_code)]

use std::io::BufRead;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use aiops::exec::{SshAuth, SshTarget};

/// The running server.
pub struct Sshd {
    /// Directory with keys, config and log.
    pub dir: PathBuf,
    /// Loopback port.
    pub port: u16,
    /// Password of `aiops-test`.
    pub password: String,
    _child: Mutex<Child>,
}

/// The login user.
pub const USER: &str = "aiops-test";

static SSHD: OnceLock<Sshd> = OnceLock::new();

fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

/// Starts (once) and returns the server.
pub fn sshd() -> &'static Sshd {
    SSHD.get_or_init(|| {
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
        let dir = std::env::var_os("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| root.join("target"))
            .join("test-sshd")
            .join(uuid::Uuid::new_v4().simple().to_string());
        let port = free_port();
        let mut child = Command::new(root.join("scripts/test-sshd.sh"))
            .arg(&dir)
            .arg(port.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("run scripts/test-sshd.sh");
        let stdout = child.stdout.take().unwrap();
        let mut line = String::new();
        std::io::BufReader::new(stdout)
            .read_line(&mut line)
            .unwrap();
        assert_eq!(
            line.trim(),
            "ready",
            "test sshd failed to start (see {})",
            dir.display()
        );
        let password = std::fs::read_to_string(dir.join("password")).unwrap();
        Sshd {
            dir,
            port,
            password,
            _child: Mutex::new(child),
        }
    })
}

impl Sshd {
    /// A file of the server's directory, as text.
    pub fn read(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.join(name)).unwrap()
    }

    /// A target authenticating with the named private key (`id_ed25519`, `id_rsa`, ...).
    pub fn key_target(&self, key: &str) -> SshTarget {
        let passphrase = key.ends_with("_pass").then(|| self.read("passphrase"));
        self.target(SshAuth::Key {
            private_key: self.read(key),
            passphrase,
        })
    }

    /// A target authenticating with the password.
    pub fn password_target(&self) -> SshTarget {
        self.target(SshAuth::Password(self.password.clone()))
    }

    /// A target with the given credentials and no pinned host key.
    pub fn target(&self, auth: SshAuth) -> SshTarget {
        SshTarget {
            server_id: uuid::Uuid::new_v4(),
            hostname: "127.0.0.1".to_owned(),
            port: self.port,
            username: USER.to_owned(),
            auth,
            pinned_host_key: None,
            connect_timeout: Duration::from_secs(10),
        }
    }
}
