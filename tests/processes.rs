//! The binary as an operator runs it: `aiops up` on its embedded database (twice, keeping its
//! data), `aiops up` starting its embedded database again after it is killed, `aiops up`
//! without PostgreSQL binaries, `aiops worker` stopping on SIGTERM, and `aiops user create`.

mod common;
mod procs;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

const BIN: &str = env!("CARGO_BIN_EXE_aiops");

fn temp_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("aiops-{tag}-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn aiops(data_dir: &Path) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("AIOPS_DATA_DIR", data_dir)
        .env("AIOPS_LISTEN", "127.0.0.1:0")
        .env("AIOPS_LOG", "warn")
        .env(
            "AIOPS_WORKFLOWS_DIR",
            Path::new(env!("CARGO_MANIFEST_DIR")).join("workflows"),
        )
        .current_dir(data_dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    cmd
}

/// Reads stdout until the "is up" line; returns (base URL, printed admin password if any).
async fn wait_until_up(child: &mut Child) -> (String, Option<String>) {
    let stdout = child.stdout.take().unwrap();
    let mut lines = BufReader::new(stdout).lines();
    let mut password = None;
    let read = async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if let Some(p) = line.trim().strip_prefix("password: ") {
                password = Some(p.to_owned());
            }
            if let Some(rest) = line.strip_prefix("aiops is up: ") {
                return rest.trim_end_matches("/docs").to_owned();
            }
        }
        panic!("aiops up exited before it was up");
    };
    let base = tokio::time::timeout(Duration::from_secs(120), read)
        .await
        .expect("aiops up did not come up within 120 s");
    (base, password)
}

async fn terminate(child: &mut Child) {
    let pid = child.id().unwrap().to_string();
    let status = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(status.success());
    let exit = tokio::time::timeout(Duration::from_secs(60), child.wait())
        .await
        .expect("did not exit within 60 s of SIGTERM")
        .unwrap();
    assert!(exit.success(), "exit status {exit}");
}

async fn login(client: &reqwest::Client, base: &str, password: &str) -> String {
    let resp = client
        .post(format!("{base}/api/v1/auth/login"))
        .json(&json!({ "username": "admin", "password": password }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let body: Value = resp.json().await.unwrap();
    body["token"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn up_twice_keeps_its_data_and_stops_its_cluster() {
    let dir = temp_dir("up");
    let client = reqwest::Client::new();

    let mut first = aiops(&dir).arg("up").spawn().unwrap();
    let (base, password) = wait_until_up(&mut first).await;
    let password = password.expect("first start prints the admin credentials");
    let token = login(&client, &base, &password).await;
    let resp = client
        .put(format!("{base}/api/v1/system-config/kept"))
        .bearer_auth(&token)
        .json(&json!({ "value": { "survives": "restart" } }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let ready = client.get(format!("{base}/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), 200);
    // Without a configured key, `up` generates its own: credentials can be stored at once.
    let key_file = dir.join("secret.key");
    let key = std::fs::read_to_string(&key_file).expect("up generated its secret key");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&key_file).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let resp = client
        .post(format!("{base}/api/v1/servers"))
        .bearer_auth(&token)
        .json(
            &json!({ "name": "db1", "hostname": "10.0.0.5", "username": "ops",
                       "auth_type": "password", "password": "s3cret-pw" }),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201, "{}", resp.text().await.unwrap());
    terminate(&mut first).await;
    assert!(
        !dir.join("postgres/postmaster.pid").exists(),
        "the embedded cluster must be stopped on exit"
    );

    let mut second = aiops(&dir).arg("up").spawn().unwrap();
    let (base, printed) = wait_until_up(&mut second).await;
    assert!(
        printed.is_none(),
        "credentials are printed only on the first start"
    );
    let token = login(&client, &base, &password).await;
    let resp = client
        .get(format!("{base}/api/v1/system-config/kept"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["value"]["survives"], "restart");
    assert_eq!(
        std::fs::read_to_string(&key_file).unwrap(),
        key,
        "the generated key is reused"
    );
    terminate(&mut second).await;
    assert!(!dir.join("postgres/postmaster.pid").exists());
    let _ = std::fs::remove_dir_all(&dir);
}

/// Polls `GET path` until `done` accepts the answer (errors and other statuses are retried).
async fn poll_until(
    client: &reqwest::Client,
    url: &str,
    token: Option<&str>,
    within: Duration,
    done: impl Fn(u16, &Value) -> bool,
) -> Value {
    let deadline = std::time::Instant::now() + within;
    loop {
        let mut request = client.get(url);
        if let Some(t) = token {
            request = request.bearer_auth(t);
        }
        if let Ok(resp) = request.send().await {
            let status = resp.status().as_u16();
            let body = resp.json::<Value>().await.unwrap_or(Value::Null);
            if done(status, &body) {
                return body;
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{url} did not get there within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn up_starts_its_embedded_database_again_after_it_is_killed() {
    let dir = temp_dir("uprestart");
    let client = reqwest::Client::new();
    let mut up = aiops(&dir).arg("up").spawn().unwrap();
    // Drained all along, so that the logs of the outage never block the process.
    let stderr = up.stderr.take().unwrap();
    let log = tokio::spawn(async move {
        let mut lines = BufReader::new(stderr).lines();
        let mut all = String::new();
        while let Ok(Some(line)) = lines.next_line().await {
            all.push_str(&line);
            all.push('\n');
        }
        all
    });
    let (base, password) = wait_until_up(&mut up).await;
    let token = login(&client, &base, &password.unwrap()).await;

    // The database server gets none of the platform's environment (its secret key, settings):
    // a command of a run on this host could read a process environment of its own user.
    let pgdata = dir.join("postgres");
    let environ =
        std::fs::read(format!("/proc/{}/environ", procs::postmaster_pid(&pgdata))).unwrap();
    let environ = String::from_utf8_lossy(&environ);
    assert!(
        environ.split('\0').all(|v| !v.starts_with("AIOPS_")),
        "{environ}"
    );

    // The database dies the hardest way: SIGKILL to the postmaster.
    let postmaster = procs::crash_postmaster(&pgdata, "KILL").await;

    // `up` notices and starts it again; the platform is ready once more.
    poll_until(
        &client,
        &format!("{base}/readyz"),
        None,
        Duration::from_secs(90),
        |s, _| s == 200,
    )
    .await;
    let restarted = procs::postmaster_pid(&pgdata);
    assert_ne!(restarted, postmaster);
    assert!(procs::alive(restarted));

    // Writes work, and the worker inside `up` runs a runbook to completion.
    let resp = client
        .post(format!("{base}/api/v1/runbooks/import"))
        .bearer_auth(&token)
        .json(&json!({ "yaml": "name: after-restart\nmode: auto\nsteps:\n  - {name: a, command: 'echo back'}\n" }))
        .send()
        .await
        .unwrap();
    assert!(resp.status().is_success(), "{}", resp.text().await.unwrap());
    let runbook = resp.json::<Value>().await.unwrap()["runbook"]["id"].clone();
    let resp = client
        .post(format!("{base}/api/v1/executions"))
        .bearer_auth(&token)
        .json(&json!({ "runbook_id": runbook }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);
    let id = resp.json::<Value>().await.unwrap()["execution_ids"][0]
        .as_str()
        .unwrap()
        .to_owned();
    let done = poll_until(
        &client,
        &format!("{base}/api/v1/executions/{id}"),
        Some(&token),
        Duration::from_secs(60),
        |s, b| s == 200 && common::FINISHED.iter().any(|t| b["status"] == *t),
    )
    .await;
    assert_eq!(done["status"], "completed", "{done}");

    terminate(&mut up).await;
    let log = log.await.unwrap();
    assert!(
        log.contains("the embedded PostgreSQL was not running; started it again"),
        "{log}"
    );
    assert!(
        !pgdata.join("postmaster.pid").exists(),
        "the embedded cluster must be stopped on exit"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn up_without_postgres_binaries_names_the_package() {
    let dir = temp_dir("nobin");
    let empty = dir.join("empty-bin");
    std::fs::create_dir_all(&empty).unwrap();
    let out = aiops(&dir)
        .env("AIOPS_POSTGRES_BIN_DIR", &empty)
        .arg("up")
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("apt-get install postgresql") && stderr.contains("DATABASE_URL"),
        "{stderr}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn a_fatal_error_of_a_service_logging_json_is_one_json_line() {
    let dir = temp_dir("nobin-json");
    let empty = dir.join("empty-bin");
    std::fs::create_dir_all(&empty).unwrap();
    let out = aiops(&dir)
        .env("AIOPS_POSTGRES_BIN_DIR", &empty)
        .env("AIOPS_LOG_FORMAT", "json")
        .arg("up")
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    for line in stderr.lines() {
        let _: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("not a JSON line ({e}): {line}\n{stderr}"));
    }
    let last: serde_json::Value = serde_json::from_str(stderr.lines().last().unwrap()).unwrap();
    assert_eq!(last["level"], "ERROR", "{stderr}");
    let error = last["fields"]["error"].as_str().unwrap();
    assert!(error.contains("apt-get install postgresql"), "{stderr}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// `aiops serve` (without `--migrate`) and `aiops worker` refuse a database that was never
/// migrated, saying what to run, instead of answering 500 to every request.
#[tokio::test]
async fn serve_and_worker_refuse_a_database_that_was_never_migrated() {
    let dir = temp_dir("unmigrated");
    let url = common::fresh_database_url().await;
    for command in ["serve", "worker"] {
        let out = aiops(&dir)
            .env("DATABASE_URL", &url)
            .arg(command)
            .output()
            .await
            .unwrap();
        assert!(!out.status.success(), "{command}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("the database schema is not current; run `aiops migrate` first"),
            "{command}: {stderr}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// A database nobody listens for is named with the address and the reason, not only "pool
/// timed out".
#[tokio::test]
async fn an_unreachable_database_is_named_with_its_address_and_reason() {
    let dir = temp_dir("unreachable");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let out = aiops(&dir)
        .env(
            "DATABASE_URL",
            format!("postgres://postgres:hunter2@127.0.0.1:{port}/x"),
        )
        .arg("migrate")
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!(
            "cannot connect to the database at 127.0.0.1:{port}"
        )) && stderr.contains("refused"),
        "{stderr}"
    );
    assert!(!stderr.contains("hunter2"), "{stderr}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// `aiops up` refuses bad worker settings from the environment before it starts anything,
/// naming where they come from.
#[tokio::test]
async fn up_refuses_bad_worker_settings_before_starting() {
    let dir = temp_dir("bad-worker-env");
    for value in ["0", "abc"] {
        let out = aiops(&dir)
            .env("AIOPS_WORKER_CONCURRENCY", value)
            .arg("up")
            .output()
            .await
            .unwrap();
        assert!(!out.status.success());
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!stdout.contains("is up"), "{value}: {stdout}");
        assert!(
            stderr.contains("AIOPS_WORKER_") && stderr.contains("concurrency"),
            "{value}: {stderr}"
        );
        assert!(
            !dir.join("postgres").exists(),
            "{value}: a database was created"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn worker_connects_and_stops_cleanly_on_sigterm() {
    let url = common::fresh_database_url().await;
    let dir = temp_dir("worker");
    // A worker refuses a database whose migrations are not applied, naming the fix.
    let out = aiops(&dir)
        .env("DATABASE_URL", &url)
        .arg("worker")
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("aiops migrate"));
    let pool = aiops::store::connect(&url, 2).await.unwrap();
    aiops::store::migrate(&pool).await.unwrap();
    pool.close().await;
    let mut child = aiops(&dir)
        .env("DATABASE_URL", &url)
        .env("AIOPS_LOG", "info")
        .arg("worker")
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let mut lines = BufReader::new(stderr).lines();
    tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if line.contains("worker started") {
                return;
            }
        }
        panic!("worker exited before starting");
    })
    .await
    .expect("worker did not start");
    terminate(&mut child).await;

    // A worker that cannot reach its database fails at once with a clear error.
    let out = aiops(&dir)
        .env("DATABASE_URL", "postgres://nobody@127.0.0.1:1/none")
        .arg("worker")
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot connect"));
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn user_create_cli_makes_an_admin_that_can_log_in() {
    let url = common::fresh_database_url().await;
    let dir = temp_dir("cli");
    let out = aiops(&dir)
        .env("DATABASE_URL", &url)
        .arg("migrate")
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = aiops(&dir)
        .env("DATABASE_URL", &url)
        .args([
            "user",
            "create",
            "--username",
            "ops-lead",
            "--role",
            "admin",
        ])
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let password = stdout
        .lines()
        .find_map(|l| l.strip_prefix("password: "))
        .expect("a generated password is printed")
        .to_owned();
    let pool = aiops::store::connect(&url, 2).await.unwrap();
    let (role, hash): (String, String) =
        sqlx::query_as("SELECT role, password_hash FROM users WHERE username = 'ops-lead'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(role, "admin");
    assert!(aiops::crypto::password::verify(&password, &hash));

    let out = aiops(&dir)
        .env("DATABASE_URL", &url)
        .args([
            "user",
            "create",
            "--username",
            "ops-lead",
            "--role",
            "admin",
        ])
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("already exists"));
    let out = aiops(&dir)
        .env("DATABASE_URL", &url)
        .args(["user", "create", "--username", "x", "--role", "root"])
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown role"));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn every_subcommand_has_useful_help() {
    for args in [
        vec!["--help"],
        vec!["up", "--help"],
        vec!["serve", "--help"],
        vec!["worker", "--help"],
        vec!["migrate", "--help"],
        vec!["openapi", "--help"],
        vec!["user", "create", "--help"],
    ] {
        let out = std::process::Command::new(BIN)
            .args(&args)
            .output()
            .unwrap();
        assert!(out.status.success(), "{args:?}");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.contains("Usage:") && text.len() > 200,
            "{args:?}: {text}"
        );
    }
}

/// A data directory whose path is too long for a socket beside the data gets its socket
/// directory under /tmp, at a name anyone can compute: a symbolic link planted there is refused,
/// and its target keeps its owner and mode.
#[tokio::test]
async fn a_link_planted_at_the_socket_directory_is_refused() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let dir = temp_dir("sockdir");
    let long = dir.join("a".repeat(90));
    std::fs::create_dir_all(&long).unwrap();
    let pgdata = long.canonicalize().unwrap().join("postgres");
    let digest = aiops::crypto::token::hash(&pgdata.to_string_lossy());
    let name: String = digest.iter().take(8).map(|b| format!("{b:02x}")).collect();
    let link = PathBuf::from(format!("/tmp/aiops-pg-{name}"));
    let victim = dir.join("victim");
    std::fs::create_dir(&victim).unwrap();
    std::fs::set_permissions(&victim, std::fs::Permissions::from_mode(0o755)).unwrap();
    let owner = std::fs::metadata(&victim).unwrap().uid();
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(&victim, &link).unwrap();

    let refused = aiops::startup::embedded_pg::EmbeddedPostgres::start(&long, None).await;
    let _ = std::fs::remove_file(&link);
    let Err(error) = refused else {
        panic!("the planted link was taken over");
    };
    let error = error.to_string();
    assert!(error.contains("symbolic link"), "{error}");
    let meta = std::fs::metadata(&victim).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o755);
    assert_eq!(meta.uid(), owner);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A second `aiops up` on a data directory that another one runs on refuses to start, and the
/// first one keeps its database (before, the second adopted it and stopped it on exit).
#[tokio::test]
async fn a_second_up_on_the_same_data_directory_refuses_to_start() {
    let dir = temp_dir("uptwice");
    let client = reqwest::Client::new();
    let mut first = aiops(&dir).arg("up").spawn().unwrap();
    let (base, _) = wait_until_up(&mut first).await;
    let second = tokio::time::timeout(Duration::from_secs(60), aiops(&dir).arg("up").output())
        .await
        .expect("the second `up` ends on its own")
        .unwrap();
    assert!(!second.status.success());
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(stderr.contains("another `aiops up` is running"), "{stderr}");
    let ready = client.get(format!("{base}/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), 200);
    terminate(&mut first).await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// SIGTERM while `up` is still starting (its database is running, the platform not yet up)
/// stops it cleanly once the current step is done: the database goes with it (before, the
/// signal killed `up` and left the server running).
#[tokio::test]
async fn a_stop_while_up_starts_stops_its_database_too() {
    let dir = temp_dir("upearly");
    let mut up = aiops(&dir).arg("up").spawn().unwrap();
    let pid_file = dir.join("postgres").join("postmaster.pid");
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !pid_file.exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "the database never started"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Written once the server runs; the postmaster's pid is its first line.
    let postmaster = loop {
        if let Some(pid) = std::fs::read_to_string(&pid_file)
            .ok()
            .and_then(|t| t.lines().next().and_then(|l| l.trim().parse::<i32>().ok()))
        {
            break pid;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    terminate(&mut up).await;
    assert!(
        procs::wait_gone(postmaster).await,
        "the database {postmaster} outlived the `up` that started it"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Run as root, the database runs as the postgres user, which must be able to enter the data
/// directory: one it cannot enter (a umask of 077) is refused with what to do, not with
/// initdb's "Permission denied".
#[tokio::test]
async fn a_data_directory_the_database_user_cannot_enter_is_refused_clearly() {
    use std::os::unix::fs::PermissionsExt;
    let uid = std::fs::metadata("/proc/self").map(|m| std::os::unix::fs::MetadataExt::uid(&m));
    if uid.ok() != Some(0) {
        return; // only root hands the database to another user
    }
    let dir = temp_dir("closed");
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
    let out = tokio::time::timeout(Duration::from_secs(60), aiops(&dir).arg("up").output())
        .await
        .expect("`up` ends on its own")
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("cannot enter this directory"), "{stderr}");
    let _ = std::fs::remove_dir_all(&dir);
}
