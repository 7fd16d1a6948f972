//! The embedded default database: a private PostgreSQL cluster under the data directory, created
//! on first use and reused afterwards, built from the PostgreSQL server binaries installed on the
//! machine (on `PATH` or under `/usr/lib/postgresql/*/bin`).
//!
//! The server listens only on a Unix socket inside its own data directory (no TCP port), with
//! trust authentication for the local `aiops` role. PostgreSQL refuses to run as root, so when
//! this process is root the cluster is owned by and run as the `postgres` system user.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use tokio::process::Command;

/// Database and role name inside the private cluster.
pub const DATABASE: &str = "aiops";
/// Socket "port": names the socket file; nothing listens on TCP.
const PORT: u16 = 5432;

/// The cluster could not be created, started or stopped.
#[derive(Debug, thiserror::Error)]
pub enum EmbeddedPgError {
    /// No `initdb`/`pg_ctl` found.
    #[error(
        "PostgreSQL server binaries (initdb, pg_ctl, postgres) were not found on PATH or under \
         /usr/lib/postgresql/*/bin. Install the Debian package `postgresql` \
         (apt-get install postgresql), or set DATABASE_URL to use an existing server."
    )]
    BinariesMissing,
    /// The directory given as `AIOPS_POSTGRES_BIN_DIR` lacks the server binaries.
    #[error(
        "AIOPS_POSTGRES_BIN_DIR {0} does not hold the PostgreSQL server binaries (initdb, \
         pg_ctl, postgres). Point it at their directory, install the Debian package \
         `postgresql` (apt-get install postgresql) and leave it unset, or set DATABASE_URL to \
         use an existing server."
    )]
    BinDirWithoutBinaries(PathBuf),
    /// Running as root without a `postgres` user to run the server as.
    #[error(
        "running as root, but there is no `postgres` system user to run the database as; \
         install the Debian package `postgresql` (it creates one) or run aiops as a normal user"
    )]
    NoPostgresUser,
    /// The data directory path cannot be used.
    #[error("data directory {0}: {1}")]
    DataDir(PathBuf, String),
    /// A PostgreSQL command failed.
    #[error("`{command}` failed ({status}): {output}")]
    Command {
        /// The command line.
        command: String,
        /// Its exit status.
        status: String,
        /// What it printed (and the tail of the server log when starting).
        output: String,
    },
    /// Filesystem or process error.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The error.
        source: std::io::Error,
    },
}

fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> EmbeddedPgError {
    let context = context.into();
    move |source| EmbeddedPgError::Io { context, source }
}

/// A running private cluster. Stop it with [`EmbeddedPostgres::stop`]; dropping it stops it too.
#[derive(Debug)]
pub struct EmbeddedPostgres {
    bin_dir: PathBuf,
    pgdata: PathBuf,
    socket_dir: PathBuf,
    run_as: Option<(u32, u32)>,
    running: bool,
}

/// Finds the directory holding `initdb` and `pg_ctl`: first on PATH, then the newest
/// `/usr/lib/postgresql/<version>/bin`.
pub fn find_bin_dir() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            if has_tools(&dir) {
                return Some(dir);
            }
        }
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let version = e.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            has_tools(&bin).then_some((version, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, bin)| bin)
}

fn has_tools(dir: &Path) -> bool {
    ["initdb", "pg_ctl", "psql", "createdb"]
        .iter()
        .all(|tool| dir.join(tool).is_file())
}

fn effective_uid() -> Option<u32> {
    // /proc/self is owned by the process's effective user.
    std::fs::metadata("/proc/self").ok().map(|m| m.uid())
}

fn postgres_user() -> Option<(u32, u32)> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|line| {
        let fields: Vec<&str> = line.split(':').collect();
        if fields.first() == Some(&"postgres") && fields.len() > 3 {
            Some((fields[2].parse().ok()?, fields[3].parse().ok()?))
        } else {
            None
        }
    })
}

impl EmbeddedPostgres {
    /// Creates the cluster under `data_dir/postgres` on first use, starts it (or adopts one
    /// already running on that directory), and makes sure the `aiops` database exists.
    /// `bin_dir` overrides discovery; it must then hold the binaries itself.
    pub async fn start(
        data_dir: &Path,
        bin_dir: Option<&Path>,
    ) -> Result<EmbeddedPostgres, EmbeddedPgError> {
        let bin_dir = match bin_dir {
            Some(dir) if has_tools(dir) => dir.to_path_buf(),
            Some(dir) => return Err(EmbeddedPgError::BinDirWithoutBinaries(dir.to_path_buf())),
            None => find_bin_dir().ok_or(EmbeddedPgError::BinariesMissing)?,
        };
        std::fs::create_dir_all(data_dir).map_err(io(format!("create {}", data_dir.display())))?;
        let data_dir = data_dir
            .canonicalize()
            .map_err(io(format!("resolve {}", data_dir.display())))?;
        let pgdata = data_dir.join("postgres");
        let pgdata_str = pgdata.to_string_lossy();
        // pg_ctl passes the path through a shell, in double quotes, and reads commas in its
        // options: such characters would change what it runs.
        if let Some(c) = pgdata_str
            .chars()
            .find(|c| matches!(c, '\'' | '"' | '$' | '`' | '\\' | ',' | '\n' | '\r'))
        {
            return Err(EmbeddedPgError::DataDir(
                data_dir.clone(),
                format!(
                    "the path must not contain {c:?} (nor quotes, `$`, backquotes, `\\`, commas, line breaks)"
                ),
            ));
        }
        // Unix socket paths are limited to 107 bytes; keep the socket beside the data when it
        // fits, else in a private directory under /tmp.
        let socket_dir = if pgdata_str.len() + 20 < 100 {
            pgdata.clone()
        } else {
            let digest = crate::crypto::token::hash(&pgdata_str);
            let name: String = digest.iter().take(8).map(|b| format!("{b:02x}")).collect();
            PathBuf::from(format!("/tmp/aiops-pg-{name}"))
        };
        let run_as = if effective_uid() == Some(0) {
            Some(postgres_user().ok_or(EmbeddedPgError::NoPostgresUser)?)
        } else {
            None
        };
        // The server runs as `postgres` and must reach its data through this directory.
        if let Some((uid, gid)) = run_as {
            use std::os::unix::fs::MetadataExt;
            let meta = std::fs::metadata(&data_dir)
                .map_err(io(format!("inspect {}", data_dir.display())))?;
            let searchable = meta.mode() & 0o001 != 0
                || (meta.uid() == uid && meta.mode() & 0o100 != 0)
                || (meta.gid() == gid && meta.mode() & 0o010 != 0);
            if !searchable {
                return Err(EmbeddedPgError::DataDir(
                    data_dir.clone(),
                    format!(
                        "the database runs as the postgres user, who cannot enter this directory \
                         (mode {:o}); allow it (chmod o+x {})",
                        meta.mode() & 0o7777,
                        data_dir.display()
                    ),
                ));
            }
        }
        let mut pg = EmbeddedPostgres {
            bin_dir,
            pgdata,
            socket_dir,
            run_as,
            running: false,
        };
        if !pg.pgdata.join("PG_VERSION").is_file() {
            pg.init().await?;
        }
        pg.prepare_dir(&pg.socket_dir.clone())?;
        if pg.is_running().await {
            tracing::warn!(pgdata = %pg.pgdata.display(), "adopting a PostgreSQL server already running on this data directory");
        } else {
            pg.pg_ctl_start().await?;
        }
        pg.running = true;
        pg.create_database().await?;
        Ok(pg)
    }

    /// Makes a directory owned by the server's user with mode 0700. A path that is a symbolic
    /// link, not a directory, or a directory of another user is refused, never taken over: the
    /// socket directory may be in /tmp, where anyone could have prepared its (predictable)
    /// name, and changing its owner or mode would then change those of the link's target. A
    /// directory of this process's user or the server's, in /tmp (sticky), cannot be swapped by
    /// anyone else once checked.
    fn prepare_dir(&self, dir: &Path) -> Result<(), EmbeddedPgError> {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let refuse = |why: &str| EmbeddedPgError::DataDir(dir.to_path_buf(), why.to_owned());
        match std::fs::symlink_metadata(dir) {
            Ok(meta) if meta.file_type().is_symlink() => {
                return Err(refuse("is a symbolic link; refusing to use it"));
            }
            Ok(meta) if !meta.is_dir() => return Err(refuse("exists and is not a directory")),
            Ok(meta) => {
                let owners = [effective_uid(), self.run_as.map(|(uid, _)| uid)];
                if !owners.contains(&Some(meta.uid())) {
                    return Err(refuse(&format!(
                        "belongs to another user (uid {}); refusing to use it",
                        meta.uid()
                    )));
                }
            }
            Err(_) => {
                if let Some(parent) = dir.parent() {
                    std::fs::create_dir_all(parent)
                        .map_err(io(format!("create {}", parent.display())))?;
                }
                // Fails if anything appeared there in the meantime.
                std::fs::create_dir(dir).map_err(io(format!("create {}", dir.display())))?;
            }
        }
        if let Some((uid, gid)) = self.run_as {
            std::os::unix::fs::lchown(dir, Some(uid), Some(gid))
                .map_err(io(format!("chown {} to postgres", dir.display())))?;
        }
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .map_err(io(format!("chmod {}", dir.display())))
    }

    fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new(self.bin_dir.join(program));
        if let Some((uid, gid)) = self.run_as {
            cmd.uid(uid).gid(gid);
        }
        if let Some(parent) = self.pgdata.parent() {
            cmd.current_dir(parent);
        }
        // The server gets none of this process's environment (which holds the secret key and
        // the platform's settings): it is dumpable and may run as this process's user, where a
        // command of a run on this host could read /proc/<pid>/environ.
        cmd.env_clear()
            .envs(std::env::var_os("PATH").map(|path| ("PATH", path)))
            .env("LC_ALL", "C")
            .stdin(Stdio::null())
            .kill_on_drop(true);
        cmd
    }

    async fn run(&self, mut cmd: Command, describe: String) -> Result<String, EmbeddedPgError> {
        let out = cmd.output().await.map_err(io(format!("run {describe}")))?;
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        if out.status.success() {
            Ok(text)
        } else {
            Err(EmbeddedPgError::Command {
                command: describe,
                status: out.status.to_string(),
                output: text.trim().to_owned(),
            })
        }
    }

    async fn init(&self) -> Result<(), EmbeddedPgError> {
        tracing::info!(pgdata = %self.pgdata.display(), "creating the embedded PostgreSQL cluster");
        self.prepare_dir(&self.pgdata)?;
        let mut cmd = self.command("initdb");
        cmd.arg("-D").arg(&self.pgdata).args([
            "-U",
            DATABASE,
            "-A",
            "trust",
            "-E",
            "UTF8",
            "--locale=C",
        ]);
        self.run(cmd, format!("initdb -D {}", self.pgdata.display()))
            .await
            .map(|_| ())
    }

    async fn is_running(&self) -> bool {
        let mut cmd = self.command("pg_ctl");
        cmd.arg("status").arg("-D").arg(&self.pgdata);
        matches!(cmd.output().await, Ok(out) if out.status.success())
    }

    async fn pg_ctl_start(&self) -> Result<(), EmbeddedPgError> {
        let log = self.pgdata.join("server.log");
        let options = format!(
            "-c listen_addresses='' -c unix_socket_directories='{}' -p {PORT}",
            self.socket_dir.display()
        );
        let mut cmd = self.command("pg_ctl");
        cmd.arg("start")
            .arg("-D")
            .arg(&self.pgdata)
            .arg("-l")
            .arg(&log)
            .args(["-w", "-t", "60", "-o", &options]);
        match self
            .run(cmd, format!("pg_ctl start -D {}", self.pgdata.display()))
            .await
        {
            Ok(_) => Ok(()),
            Err(EmbeddedPgError::Command {
                command,
                status,
                output,
            }) => {
                let tail = std::fs::read_to_string(&log)
                    .map(|l| {
                        let lines: Vec<&str> = l.lines().collect();
                        lines[lines.len().saturating_sub(15)..].join("\n")
                    })
                    .unwrap_or_default();
                Err(EmbeddedPgError::Command {
                    command,
                    status,
                    output: format!("{output}\nserver log:\n{tail}"),
                })
            }
            Err(e) => Err(e),
        }
    }

    async fn create_database(&self) -> Result<(), EmbeddedPgError> {
        let mut cmd = self.command("psql");
        cmd.arg("-h")
            .arg(&self.socket_dir)
            .args([
                "-p",
                &PORT.to_string(),
                "-U",
                DATABASE,
                "-d",
                "postgres",
                "-tAc",
            ])
            .arg(format!(
                "SELECT 1 FROM pg_database WHERE datname = '{DATABASE}'"
            ));
        let exists = self.run(cmd, "psql (check database)".to_owned()).await?;
        if exists.trim() == "1" {
            return Ok(());
        }
        let mut cmd = self.command("createdb");
        cmd.arg("-h").arg(&self.socket_dir).args([
            "-p",
            &PORT.to_string(),
            "-U",
            DATABASE,
            DATABASE,
        ]);
        self.run(cmd, format!("createdb {DATABASE}"))
            .await
            .map(|_| ())
    }

    /// Starts the server again when it is no longer running (it crashed, or was killed);
    /// PostgreSQL's crash recovery then brings the data back to its last commit. Returns whether
    /// it had to. A start that fails (for example while backends of the dead server still hold
    /// its shared memory) can simply be tried again.
    pub async fn restart_if_stopped(&self) -> Result<bool, EmbeddedPgError> {
        if self.is_running().await {
            return Ok(false);
        }
        self.prepare_dir(&self.socket_dir)?;
        self.pg_ctl_start().await?;
        Ok(true)
    }

    /// The connection URL (Unix socket, no password).
    pub fn url(&self) -> String {
        format!(
            "postgres://{DATABASE}@localhost:{PORT}/{DATABASE}?host={}",
            self.socket_dir.display()
        )
    }

    /// The cluster's data directory.
    pub fn pgdata(&self) -> &Path {
        &self.pgdata
    }

    /// Stops the server (fast shutdown: open sessions are ended, data is flushed).
    pub async fn stop(mut self) -> Result<(), EmbeddedPgError> {
        self.running = false;
        let mut cmd = self.command("pg_ctl");
        cmd.arg("stop")
            .arg("-D")
            .arg(&self.pgdata)
            .args(["-m", "fast", "-w", "-t", "60"]);
        self.run(cmd, format!("pg_ctl stop -D {}", self.pgdata.display()))
            .await
            .map(|_| ())
    }
}

impl Drop for EmbeddedPostgres {
    fn drop(&mut self) {
        if !self.running {
            return;
        }
        // Last resort when the owner did not call `stop` (an early return or a panic).
        let mut cmd = std::process::Command::new(self.bin_dir.join("pg_ctl"));
        if let Some((uid, gid)) = self.run_as {
            use std::os::unix::process::CommandExt;
            cmd.uid(uid).gid(gid);
        }
        let _ = cmd
            .arg("stop")
            .arg("-D")
            .arg(&self.pgdata)
            .args(["-m", "fast", "-w"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}
