//! Test harness shared by every integration test.
//!
//! - [`fresh_pool`]: a brand-new, fully migrated database per test, so tests run in parallel
//!   without seeing each other's rows.
//! - [`spawn_app`]: the real HTTP server on port 0 against such a database, with a logged-in
//!   admin and helpers to make users of every role.
//!
//! The server comes from `DATABASE_URL` when it is set; otherwise the harness starts (once, for
//! every test binary, under a file lock) a private cluster under `target/test-pg` with the
//! product's own embedded-PostgreSQL code. `scripts/test.sh` stops that cluster afterwards.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use aiops::config::Config;
use aiops::startup::Application;
use aiops::startup::embedded_pg::EmbeddedPostgres;
use serde_json::{Value, json};
use sqlx::postgres::PgConnectOptions;
use sqlx::{ConnectOptions, Connection, PgPool};

static SERVER_URL: OnceLock<String> = OnceLock::new();

/// A fresh directory under the system temp dir for one test's files (`aiops-<tag>-<uuid>`),
/// removed with everything in it when dropped, also when the test fails.
pub struct Scratch(PathBuf);

impl Scratch {
    pub fn new(tag: &str) -> Scratch {
        let dir =
            std::env::temp_dir().join(format!("aiops-{tag}-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }
}

impl std::ops::Deref for Scratch {
    type Target = std::path::Path;

    fn deref(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target"))
}

/// URL of the server-level connection (the `DATABASE_URL` or the private test cluster).
pub async fn server_url() -> String {
    if let Some(url) = SERVER_URL.get() {
        return url.clone();
    }
    let url = match std::env::var("DATABASE_URL") {
        Ok(url) if !url.is_empty() => url,
        _ => {
            let dir = target_dir().join("test-pg");
            std::fs::create_dir_all(&dir).expect("create target/test-pg");
            let lock = std::fs::File::create(dir.join("lock")).expect("create the lock file");
            lock.lock().expect("lock target/test-pg");
            let pg = EmbeddedPostgres::start(&dir, None)
                .await
                .expect("start the private test cluster");
            let url = pg.url();
            // The cluster outlives this process on purpose: other test binaries reuse it and the
            // test script stops it at the end.
            std::mem::forget(pg);
            drop(lock);
            url
        }
    };
    SERVER_URL.get_or_init(|| url).clone()
}

/// Creates an empty database and returns its URL.
pub async fn fresh_database_url() -> String {
    let base = server_url().await;
    let options: PgConnectOptions = base.parse().expect("DATABASE_URL parses");
    let mut admin = options.connect().await.expect("connect to the test server");
    let name = format!("aiops_test_{}", uuid::Uuid::new_v4().simple());
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&mut admin)
        .await
        .expect("create the test database");
    admin.close().await.ok();
    replace_database(&base, &name)
}

fn replace_database(url: &str, name: &str) -> String {
    // postgres://user@host:port/db?query -> same with /name
    let (head, query) = match url.split_once('?') {
        Some((h, q)) => (h, Some(q)),
        None => (url, None),
    };
    let scheme_end = head.find("://").map(|i| i + 3).unwrap_or(0);
    let path_start = head[scheme_end..]
        .find('/')
        .map(|i| i + scheme_end)
        .unwrap_or(head.len());
    let mut out = format!("{}/{}", &head[..path_start], name);
    if let Some(q) = query {
        out.push('?');
        out.push_str(q);
    }
    out
}

/// A pool on a brand-new database with every migration applied.
pub async fn fresh_pool() -> PgPool {
    let url = fresh_database_url().await;
    let pool = aiops::store::connect(&url, 10)
        .await
        .expect("connect to the test database");
    aiops::store::migrate(&pool)
        .await
        .expect("migrate the test database");
    pool
}

/// A running server and a client logged in as an admin.
pub struct TestApp {
    /// Where the server listens.
    pub addr: SocketAddr,
    /// The test database.
    pub pool: PgPool,
    /// An HTTP client.
    pub client: reqwest::Client,
    /// Bearer token of the admin.
    pub admin_token: String,
    /// The admin's id.
    pub admin_id: uuid::Uuid,
    /// The configuration the server runs with.
    pub config: Arc<Config>,
    /// URL of the test database (for worker processes).
    pub database_url: String,
}

/// The password every harness-made user gets.
pub const PASSWORD: &str = "correct-horse-battery";

/// Starts the real server on port 0 with the default configuration.
pub async fn spawn_app() -> TestApp {
    spawn_app_with(|_| {}).await
}

/// The fixed secret key of test apps and test workers (`id:hex`, as AIOPS_SECRET_KEY takes it).
pub const TEST_SECRET_KEY: &str =
    "test:000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";

/// What the test process has logged (warn and above), kept to be read by [`logged`].
static LOG: std::sync::Mutex<Vec<u8>> = std::sync::Mutex::new(Vec::new());

/// A writer that copies the log to stderr (shown for failing tests) and to [`LOG`].
struct LogTee;

impl std::io::Write for LogTee {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        LOG.lock().unwrap().extend_from_slice(buf);
        std::io::stderr().write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

/// Logs warnings and errors of the in-process servers, as a service does, and keeps them for
/// [`logged`].
fn init_log_capture() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new("warn"))
        .with_ansi(false)
        .with_writer(|| LogTee)
        .try_init();
}

/// Everything logged so far by this test binary (all of its tests).
#[allow(dead_code)]
pub fn logged() -> String {
    String::from_utf8_lossy(&LOG.lock().unwrap()).into_owned()
}

/// Starts the real server on port 0 after letting the test adjust the configuration.
pub async fn spawn_app_with(adjust: impl FnOnce(&mut Config)) -> TestApp {
    spawn_app_on(fresh_database_url().await, adjust).await
}

/// Starts the real server on port 0 on the (empty or migrated) database at `database_url`.
pub async fn spawn_app_on(database_url: String, adjust: impl FnOnce(&mut Config)) -> TestApp {
    init_log_capture();
    let pool = aiops::store::connect(&database_url, 10)
        .await
        .expect("connect to the test database");
    aiops::store::migrate(&pool)
        .await
        .expect("migrate the test database");
    let mut config = Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        // A fixed test key so that endpoints storing secrets work; tests may replace it.
        secret_key: Some(TEST_SECRET_KEY.to_owned()),
        ..Config::default()
    };
    adjust(&mut config);
    let config = Arc::new(config);
    let app = Application::build(config.clone(), pool.clone())
        .await
        .expect("bind the test server");
    let addr = app.local_addr();
    tokio::spawn(app.run_until(std::future::pending()));
    let mut test_app = TestApp {
        addr,
        pool,
        client: reqwest::Client::new(),
        admin_token: String::new(),
        admin_id: uuid::Uuid::nil(),
        config,
        database_url,
    };
    let (id, token) = test_app.user_with_role("admin").await;
    test_app.admin_id = id;
    test_app.admin_token = token;
    test_app
}

impl TestApp {
    /// `aiops worker` on this app's database, polling every 50 ms with maintenance every
    /// 200 ms, then `extra_args`; output discarded and killed on drop. Callers add environment
    /// (or other stdio) and spawn it.
    pub fn worker_command(&self, extra_args: &[&str]) -> tokio::process::Command {
        let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_aiops"));
        command
            .args(["worker", "--poll-ms", "50", "--maintenance-ms", "200"])
            .args(extra_args)
            .env("DATABASE_URL", &self.database_url)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true);
        command
    }

    /// Absolute URL of an API path (`/users` -> `http://addr/api/v1/users`).
    pub fn api(&self, path: &str) -> String {
        format!("http://{}/api/v1{}", self.addr, path)
    }

    /// Absolute URL of a path outside the API.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// Creates a user with the given role straight in the database and logs it in through the
    /// API; returns its id and bearer token.
    pub async fn user_with_role(&self, role: &str) -> (uuid::Uuid, String) {
        let username = format!(
            "{role}-{}",
            &uuid::Uuid::new_v4().simple().to_string()[..10]
        );
        let hash = aiops::auth::hash_password(PASSWORD.to_owned())
            .await
            .unwrap();
        let mut conn = self.pool.acquire().await.unwrap();
        let row = aiops::store::users::user_create(
            &mut conn,
            &aiops::store::users::NewUser {
                username: &username,
                email: &format!("{username}@example.test"),
                full_name: None,
                password_hash: &hash,
                role,
                is_active: true,
            },
        )
        .await
        .unwrap();
        let token = self.login(&username, PASSWORD).await;
        (row.id, token)
    }

    /// Logs in and returns the token; panics on failure.
    pub async fn login(&self, username: &str, password: &str) -> String {
        let resp = self
            .client
            .post(self.api("/auth/login"))
            .json(&json!({ "username": username, "password": password }))
            .send()
            .await
            .unwrap();
        assert_eq!(
            resp.status(),
            200,
            "login of {username} failed: {:?}",
            resp.text().await
        );
        let body: Value = resp.json().await.unwrap();
        body["token"].as_str().unwrap().to_owned()
    }

    /// Sends a request with a bearer token and returns (status, JSON body or Null).
    pub async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> (u16, Value) {
        let mut req = self.client.request(method, self.api(path));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap();
        let value = serde_json::from_str(&text).unwrap_or(Value::Null);
        (status, value)
    }

    /// GET as the admin.
    pub async fn get(&self, path: &str) -> (u16, Value) {
        self.call(reqwest::Method::GET, path, Some(&self.admin_token), None)
            .await
    }

    /// Audit rows for an action, newest first, straight from the database.
    pub async fn audit_rows(
        &self,
        action: &str,
    ) -> Vec<(
        Option<uuid::Uuid>,
        Option<String>,
        Option<uuid::Uuid>,
        Option<Value>,
        Option<String>,
    )> {
        sqlx::query_as(
            "SELECT user_id, resource_type, resource_id, details_json, ip_address \
             FROM audit_log WHERE action = $1 ORDER BY created_at DESC",
        )
        .bind(action)
        .fetch_all(&self.pool)
        .await
        .unwrap()
    }
}

impl TestApp {
    /// Issues a session token for a user straight in the database (no password round trip), for
    /// tests that need many tokens.
    pub async fn mint_token(&self, user_id: uuid::Uuid) -> String {
        let new = aiops::crypto::token::generate();
        let mut conn = self.pool.acquire().await.unwrap();
        aiops::store::tokens::token_insert(
            &mut conn,
            &aiops::store::tokens::NewTokenRow {
                user_id,
                kind: "session",
                name: None,
                token_hash: &new.hash,
                expires_at: Some(chrono::Utc::now() + chrono::Duration::hours(1)),
                created_with: None,
            },
        )
        .await
        .unwrap();
        new.secret
    }
}

/// A real worker runtime running in this process against the test database, with short poll
/// and lease intervals. Stopped when dropped.
pub struct TestWorker {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    handle: Option<tokio::task::JoinHandle<()>>,
}

impl TestWorker {
    /// Starts a worker with the product's registry (engine kinds included), running steps on
    /// this host only.
    pub async fn start(pool: &PgPool) -> TestWorker {
        Self::start_with(pool, None).await
    }

    /// Starts a worker that also runs steps on managed servers over SSH, opening credentials
    /// with the keyring of `config`.
    pub async fn start_ssh(pool: &PgPool, config: &Config) -> TestWorker {
        Self::start_with(pool, Some(config)).await
    }

    /// Starts a worker (as [`TestWorker::start`]) after letting the test adjust its options.
    pub async fn start_adjusted(
        pool: &PgPool,
        adjust: impl FnOnce(&mut aiops::worker::WorkerOptions),
    ) -> TestWorker {
        Self::start_inner(pool, None, adjust).await
    }

    async fn start_with(pool: &PgPool, config: Option<&Config>) -> TestWorker {
        Self::start_inner(pool, config, |_| {}).await
    }

    async fn start_inner(
        pool: &PgPool,
        config: Option<&Config>,
        adjust: impl FnOnce(&mut aiops::worker::WorkerOptions),
    ) -> TestWorker {
        let options = aiops::worker::WorkerOptions {
            queue: aiops::queue::WorkerConfig {
                concurrency: 4,
                lease: std::time::Duration::from_secs(5),
                heartbeat_interval: std::time::Duration::from_millis(500),
                poll_interval: std::time::Duration::from_millis(50),
                maintenance_interval: std::time::Duration::from_millis(200),
                grace_period: std::time::Duration::from_secs(2),
                ..aiops::queue::WorkerConfig::default()
            },
            ..aiops::worker::WorkerOptions::default()
        };
        let options = match config {
            Some(c) => options.with_ssh(pool, c).expect("ssh options"),
            None => options
                .with_keyring(&Config {
                    secret_key: Some(TEST_SECRET_KEY.to_owned()),
                    ..Config::default()
                })
                .expect("the test keyring"),
        };
        let mut options = options;
        adjust(&mut options);
        let registry = aiops::worker::registry(&options, pool).expect("registry");
        let worker = aiops::queue::Worker::start(pool.clone(), registry, options.queue)
            .await
            .expect("start the worker");
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let handle = tokio::spawn(async move {
            let _ = worker
                .run(async move {
                    let _ = rx.await;
                })
                .await;
        });
        TestWorker {
            stop: Some(tx),
            handle: Some(handle),
        }
    }

    /// Stops the worker gracefully and waits for it.
    pub async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(h) = self.handle.take() {
            let _ = h.await;
        }
    }
}

impl Drop for TestWorker {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }
}

impl TestApp {
    /// Imports a runbook from YAML through the API; returns its id.
    pub async fn runbook_from_yaml(&self, yaml: &str) -> uuid::Uuid {
        let (status, body) = self
            .call(
                reqwest::Method::POST,
                "/runbooks/import",
                Some(&self.admin_token),
                Some(json!({ "yaml": yaml })),
            )
            .await;
        assert!(
            status == 200 || status == 201,
            "import failed: {status} {body}"
        );
        body["runbook"]["id"].as_str().unwrap().parse().unwrap()
    }

    /// POSTs `body` to `path` as the admin and returns what was created (the status must be 201).
    pub async fn create(&self, path: &str, body: Value) -> Value {
        let (status, created) = self
            .call(
                reqwest::Method::POST,
                path,
                Some(&self.admin_token),
                Some(body),
            )
            .await;
        assert_eq!(status, 201, "POST {path} failed: {created}");
        created
    }

    /// Registers a server through the API; returns its id.
    pub async fn create_server(&self, body: Value) -> uuid::Uuid {
        let created = self.create("/servers", body).await;
        created["id"].as_str().unwrap().parse().unwrap()
    }

    /// Creates a blackout window named `name`, in force from a minute ago for an hour, with
    /// `selectors` (`affected_servers` and/or `affected_runbooks`); returns it.
    pub async fn blackout_now(&self, name: &str, selectors: Value) -> Value {
        let now = chrono::Utc::now();
        let mut body = json!({ "name": name, "start_time": now - chrono::Duration::minutes(1),
                               "end_time": now + chrono::Duration::hours(1) });
        for (key, value) in selectors.as_object().expect("selectors are an object") {
            body[key] = value.clone();
        }
        self.create("/blackout-windows", body).await
    }

    /// Starts an execution through the API; returns its id.
    pub async fn start_execution(&self, body: Value) -> uuid::Uuid {
        let created = self.create("/executions", body).await;
        created["execution_ids"][0]
            .as_str()
            .unwrap()
            .parse()
            .unwrap()
    }

    /// Polls an execution until its status is one of `statuses` (or the deadline passes).
    pub async fn wait_for_status(&self, id: uuid::Uuid, statuses: &[&str], seconds: u64) -> Value {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(seconds);
        loop {
            let (_, body) = self.get(&format!("/executions/{id}")).await;
            if statuses.iter().any(|s| body["status"] == *s) {
                return body;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "execution {id} did not reach {statuses:?} in {seconds} s: {body}"
            );
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }

    /// Polls an execution until it waits for approval; returns it.
    pub async fn wait_awaiting_approval(&self, id: uuid::Uuid) -> Value {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        loop {
            let (_, e) = self.get(&format!("/executions/{id}")).await;
            if e["awaiting_approval"] == true {
                return e;
            }
            assert!(std::time::Instant::now() < deadline, "{e}");
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }

    /// Approves an execution with a token; returns (status, body).
    pub async fn approve(&self, id: uuid::Uuid, token: &str) -> (u16, Value) {
        self.call(
            reqwest::Method::POST,
            &format!("/executions/{id}/approve"),
            Some(token),
            None,
        )
        .await
    }

    /// Polls an execution until an attempt of the step named `step` is running.
    pub async fn wait_step_running(&self, id: uuid::Uuid, step: &str) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while !self
            .steps(id)
            .await
            .iter()
            .any(|s| s["step_name"] == step && s["status"] == "running")
        {
            assert!(
                std::time::Instant::now() < deadline,
                "step {step} never started"
            );
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }

    /// The step attempts of an execution.
    pub async fn steps(&self, id: uuid::Uuid) -> Vec<Value> {
        let (status, body) = self.get(&format!("/executions/{id}/steps")).await;
        assert_eq!(status, 200, "{body}");
        body.as_array().unwrap().clone()
    }
}

/// Checks that the product's worker registry schedules `kind`, then enqueues one job of it and
/// runs it on a worker with that registry (retention 7 days) until it completes.
pub async fn run_scheduled_job(pool: &PgPool, kind: &str) {
    let options = aiops::worker::WorkerOptions {
        retention: std::time::Duration::from_secs(7 * 24 * 3600),
        ..aiops::worker::WorkerOptions::default()
    };
    run_scheduled_job_with(pool, kind, &options).await;
}

/// [`run_scheduled_job`] on a worker with `options`.
pub async fn run_scheduled_job_with(
    pool: &PgPool,
    kind: &str,
    options: &aiops::worker::WorkerOptions,
) {
    let registry = aiops::worker::registry(options, pool).unwrap();
    assert!(
        registry.cron_entries().iter().any(|c| c.name == kind),
        "{kind} is scheduled"
    );
    let worker = aiops::queue::Worker::start(
        pool.clone(),
        registry,
        aiops::queue::WorkerConfig::default(),
    )
    .await
    .unwrap();
    let mut tx = pool.begin().await.unwrap();
    let id = aiops::store::jobs::job_enqueue(
        &mut tx,
        &aiops::queue::NewJob::new(kind, serde_json::json!({})),
    )
    .await
    .unwrap()
    .unwrap();
    tx.commit().await.unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        worker.tick().await.unwrap();
        let state: String = sqlx::query_scalar("SELECT state FROM jobs WHERE id = $1")
            .bind(id)
            .fetch_one(pool)
            .await
            .unwrap();
        if state == "completed" {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the {kind} job did not complete: {state}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// A runbook named `name` of four steps that append `1`..`4` to `file`, step 2 sleeping
/// `sleep_seconds` after its line: what the crash tests interrupt during step 2 and count.
pub fn appending_runbook(name: &str, file: &std::path::Path, sleep_seconds: u32) -> String {
    format!(
        r#"
name: {name}
mode: auto
environment_vars:
  F: "{file}"
steps:
  - name: one
    command: echo 1 >> {{{{ F }}}}
  - name: two
    command: echo 2 >> {{{{ F }}}}; echo two started; sleep {sleep_seconds}
  - name: three
    command: echo 3 >> {{{{ F }}}}
  - name: four
    command: echo 4 >> {{{{ F }}}}
"#,
        file = file.display()
    )
}

/// A one-step runbook named `name` whose command starts `sleep 300` in the background, writes
/// its pid to `pidfile` and waits for it: a step that runs until something kills it.
pub fn background_sleep_runbook(name: &str, pidfile: &std::path::Path) -> String {
    format!(
        r#"
name: {name}
mode: auto
environment_vars:
  F: "{file}"
steps:
  - name: long
    command: sleep 300 & echo $! > {{{{ F }}}}; wait
"#,
        file = pidfile.display()
    )
}

/// The statuses an execution ends in.
pub const FINISHED: &[&str] = &["completed", "failed", "cancelled", "timeout"];

/// Waits (up to 30 s) until `file` holds exactly `content`.
pub async fn wait_for_file(file: &std::path::Path, content: &str) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while std::fs::read_to_string(file).unwrap_or_default() != content {
        assert!(
            std::time::Instant::now() < deadline,
            "{} never held {content:?}: {:?}",
            file.display(),
            std::fs::read_to_string(file)
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// How many step attempt rows execution `id` has.
pub async fn step_rows<'e>(db: impl sqlx::PgExecutor<'e>, id: uuid::Uuid) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM step_executions WHERE execution_id = $1")
        .bind(id)
        .fetch_one(db)
        .await
        .unwrap()
}
