//! `aiops runbook ...` as a user runs it: the real binary, real files, real PostgreSQL.

mod common;

use std::path::Path;
use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_aiops");

fn aiops(dir: &Path, database_url: Option<&str>, args: &[&str]) -> Output {
    let mut cmd = Command::new(BIN);
    cmd.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("AIOPS_DATA_DIR", dir)
        .env("AIOPS_LOG", "warn")
        .current_dir(dir)
        .arg("runbook")
        .args(args);
    if let Some(url) = database_url {
        cmd.env("DATABASE_URL", url);
    }
    cmd.output().unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

const GOOD: &str = "name: cli-one\nsteps:\n  - name: a\n    command: echo {{ alert.name }}\ntriggers:\n  - name: t\n    alert_name_pattern: 'Node*'\n";

#[test]
fn validate_prints_file_line_column() {
    let dir = common::Scratch::new("rb-validate");
    std::fs::write(dir.join("good.yaml"), GOOD).unwrap();
    std::fs::write(
        dir.join("bad.yaml"),
        "name: cli-bad\nsteps:\n  - name: a\n    command: 'true'\n    timeout_seconds: -5\n",
    )
    .unwrap();
    std::fs::write(
        dir.join("broken.yaml"),
        "name: cli-broken\nsteps:\n  - name: [a\n    command: x\n",
    )
    .unwrap();
    let out = aiops(&dir, None, &["validate", "."]);
    assert!(!out.status.success());
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("./bad.yaml:5:22: steps[0].timeout_seconds must be > 0"),
        "{stderr}"
    );
    assert!(
        stderr.lines().any(|l| l.starts_with("./broken.yaml:")
            && l.split(':')
                .nth(1)
                .is_some_and(|n| n.parse::<u32>().is_ok())),
        "{stderr}"
    );
    assert!(!stderr.contains("good.yaml"), "{stderr}");
    // Every field problem of a file, each on its line, named by its path.
    std::fs::write(
        dir.join("typos.yaml"),
        "name: cli-typos\nsteps:\n  - name: a\n    comand: 'true'\n    timeout_seconds: soon\n",
    )
    .unwrap();
    let out = aiops(&dir, None, &["validate", "typos.yaml"]);
    assert!(!out.status.success());
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("typos.yaml:4:5: steps[0].comand is not a field here;")
            && stderr.contains("typos.yaml:5:22: steps[0].timeout_seconds must be a whole number"),
        "{stderr}"
    );
    std::fs::remove_file(dir.join("typos.yaml")).unwrap();
    // A field problem does not hide the file's other problems.
    std::fs::write(
        dir.join("mixed.yaml"),
        "name: cli-mixed\nbogus: 1\nsteps:\n  - name: a\n    command: 'true'\n  \
         - name: a\n    command: 'true'\n    timeout_seconds: -5\n",
    )
    .unwrap();
    let out = aiops(&dir, None, &["validate", "mixed.yaml"]);
    assert!(!out.status.success());
    let stderr = text(&out.stderr);
    for expected in [
        "mixed.yaml:2:1: bogus is not a field here",
        "mixed.yaml:6:11: steps[1].name repeats the name `a` of steps[0]",
        "mixed.yaml:8:22: steps[1].timeout_seconds must be > 0",
    ] {
        assert!(stderr.contains(expected), "{expected}: {stderr}");
    }
    std::fs::remove_file(dir.join("mixed.yaml")).unwrap();

    let out = aiops(&dir, None, &["validate", "good.yaml"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("good.yaml: ok (cli-one)"));

    // Several runbooks in one file, as `export` prints them: each is read, and a problem in
    // the second is placed on its line in the file.
    let second = "name: cli-two\nsteps:\n  - name: b\n    command: 'true'\n";
    std::fs::write(dir.join("multi.yml"), format!("{GOOD}---\n{second}")).unwrap();
    let out = aiops(&dir, None, &["validate", "multi.yml"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains("(cli-one)") && stdout.contains("(cli-two)"),
        "{stdout}"
    );
    let broken_second = format!(
        "{GOOD}---\n{}",
        second.replace(
            "command: 'true'",
            "command: 'true'\n    timeout_seconds: -5"
        )
    );
    std::fs::write(dir.join("multi.yml"), broken_second).unwrap();
    let out = aiops(&dir, None, &["validate", "multi.yml"]);
    assert!(!out.status.success());
    let stderr = text(&out.stderr);
    // GOOD has 7 lines, the marker is line 8, the bad value line 13.
    assert!(
        stderr.contains("multi.yml:13:22: steps[0].timeout_seconds must be > 0"),
        "{stderr}"
    );
    std::fs::remove_file(dir.join("multi.yml")).unwrap();

    // Shipped workflows validate offline.
    let workflows = Path::new(env!("CARGO_MANIFEST_DIR")).join("workflows");
    let out = aiops(&dir, None, &["validate", workflows.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
}

#[test]
fn diff_and_dry_run_work_offline() {
    let dir = common::Scratch::new("rb-offline");
    std::fs::write(dir.join("old.yaml"), GOOD).unwrap();
    std::fs::write(
        dir.join("new.yaml"),
        GOOD.replace("echo {{", "printf '%s\\n' {{"),
    )
    .unwrap();
    let out = aiops(&dir, None, &["diff", "old.yaml", "new.yaml"]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "they differ: {}",
        text(&out.stderr)
    );
    assert!(text(&out.stderr).is_empty(), "{}", text(&out.stderr));
    let same = aiops(&dir, None, &["diff", "old.yaml", "old.yaml"]);
    assert!(same.status.success(), "{}", text(&same.stderr));
    assert!(text(&same.stdout).is_empty(), "{}", text(&same.stdout));
    let diff = text(&out.stdout);
    assert!(
        diff.contains("--- old.yaml") && diff.contains("+++ new.yaml"),
        "{diff}"
    );
    assert!(diff.contains("-  command: echo {{ alert.name }}"), "{diff}");
    // Files of several runbooks are paired by name.
    std::fs::write(
        dir.join("both.yaml"),
        format!("{GOOD}---\n{}", GOOD.replace("cli-one", "cli-two")),
    )
    .unwrap();
    std::fs::write(
        dir.join("both-edited.yaml"),
        format!(
            "{}---\n{GOOD}",
            GOOD.replace("cli-one", "cli-two")
                .replace("'Node*'", "'Disk*'")
        ),
    )
    .unwrap();
    let out = aiops(&dir, None, &["diff", "both.yaml", "both-edited.yaml"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    let diff = text(&out.stdout);
    assert!(diff.contains("--- cli-two (both.yaml)"), "{diff}");
    assert!(diff.contains("+  alert_name_pattern: Disk*"), "{diff}");
    assert!(!diff.contains("cli-one"), "{diff}");
    // A folder includes its subfolders (not hidden ones).
    for (path, name) in [
        ("a/one.yaml", "cli-one"),
        ("b/sub/one.yaml", "cli-one"),
        ("b/.hidden/x.yaml", "cli-hidden"),
    ] {
        let file = dir.join(path);
        std::fs::create_dir_all(file.parent().unwrap()).unwrap();
        std::fs::write(file, GOOD.replace("cli-one", name)).unwrap();
    }
    let out = aiops(&dir, None, &["diff", "a", "b"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stdout));

    std::fs::write(
        dir.join("alert.yaml"),
        "name: NodeDown\nlabels:\n  instance: 'a$(id)'\n",
    )
    .unwrap();
    let out = aiops(
        &dir,
        None,
        &["dry-run", "new.yaml", "--alert", "alert.yaml"],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let report = text(&out.stdout);
    assert!(report.contains("run: printf '%s\\n' NodeDown"), "{report}");
    assert!(
        report.contains("would start through trigger \"t\""),
        "{report}"
    );
}

/// A document may begin with YAML directives, as the API takes it; a file without any
/// runbook is one problem with a position.
#[test]
fn directives_are_read_and_an_empty_file_is_named() {
    let dir = common::Scratch::new("rb-directives");
    std::fs::write(
        dir.join("dir.yaml"),
        "%YAML 1.2\n---\nname: d1\nsteps:\n  - name: s\n    command: echo\n---\nname: d2\nsteps:\n  - name: s\n    command: echo\n    timeout_seconds: -1\n",
    )
    .unwrap();
    std::fs::write(dir.join("empty.yaml"), "# nothing here yet\n\n").unwrap();
    let out = aiops(&dir, None, &["validate", "."]);
    assert!(!out.status.success());
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("./dir.yaml:12:22: steps[0].timeout_seconds must be > 0"),
        "{stderr}"
    );
    assert!(
        !stderr.contains("./dir.yaml:1:") && !stderr.contains("./dir.yaml:2:"),
        "{stderr}"
    );
    assert!(
        stderr.contains("./empty.yaml:1:1: holds no runbook (only blank lines or comments)"),
        "{stderr}"
    );
    assert!(stderr.contains("error: 2 problem(s) found"), "{stderr}");
}

/// Runbook names are unique regardless of case: a folder naming one runbook twice in two
/// cases is refused, an apply in another case updates the stored runbook (and its name's
/// case), and the API refuses a second runbook whose name differs only in case.
#[tokio::test]
async fn runbook_names_are_unique_regardless_of_case() {
    let url = common::fresh_database_url().await;
    let pool = aiops::store::connect(&url, 2).await.unwrap();
    aiops::store::migrate(&pool).await.unwrap();
    let dir = common::Scratch::new("rb-case");
    let flows = dir.join("flows");
    std::fs::create_dir_all(&flows).unwrap();
    let doc = |name: &str| format!("name: {name}\nsteps:\n  - name: s\n    command: echo x\n");
    std::fs::write(flows.join("a.yaml"), doc("Restart-Web")).unwrap();
    std::fs::write(flows.join("b.yaml"), doc("restart-web")).unwrap();
    let out = aiops(&dir, None, &["validate", "flows"]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains(
            "flows/b.yaml:1:7: name `restart-web` is already used by the runbook at \
             flows/a.yaml:1:7"
        ),
        "{}",
        text(&out.stderr)
    );
    std::fs::remove_file(flows.join("b.yaml")).unwrap();
    let out = aiops(&dir, Some(&url), &["apply", "flows"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    std::fs::write(flows.join("a.yaml"), doc("restart-WEB")).unwrap();
    let out = aiops(&dir, Some(&url), &["apply", "flows", "--prune"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).starts_with("updated restart-WEB v2"),
        "{}",
        text(&out.stdout)
    );
    let names: Vec<String> = sqlx::query_scalar("SELECT name FROM runbooks")
        .fetch_all(&pool)
        .await
        .unwrap();
    assert_eq!(names, ["restart-WEB"]);
    // A second runbook under the same name in another case is refused by the database too.
    let refused =
        sqlx::query("INSERT INTO runbooks (name, description) VALUES ('RESTART-web', '')")
            .execute(&pool)
            .await
            .unwrap_err();
    assert!(
        refused.to_string().contains("runbooks_lower_name_key"),
        "{refused}"
    );
}

/// `apply --prune` deletes a runbook as the API does: a run of it waiting for approval is
/// cancelled with it, not left to be approved into a runbook that is gone.
#[tokio::test]
async fn a_pruned_runbook_takes_its_runs_waiting_for_approval_with_it() {
    let app = common::spawn_app().await;
    let worker = common::TestWorker::start(&app.pool).await;
    let dir = common::Scratch::new("rb-prune-approval");
    let flows = dir.join("flows");
    let others = dir.join("others");
    std::fs::create_dir_all(&flows).unwrap();
    std::fs::create_dir_all(&others).unwrap();
    std::fs::write(
        flows.join("a.yaml"),
        "name: needs-approval\nrequires_approval: true\nsteps:\n  - name: s\n    command: echo x\n",
    )
    .unwrap();
    std::fs::write(others.join("b.yaml"), GOOD).unwrap();
    let out = aiops(&dir, Some(&app.database_url), &["apply", "flows"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let runbook: uuid::Uuid =
        sqlx::query_scalar("SELECT id FROM runbooks WHERE name = 'needs-approval'")
            .fetch_one(&app.pool)
            .await
            .unwrap();
    let id = app
        .start_execution(serde_json::json!({ "runbook_id": runbook }))
        .await;
    app.wait_awaiting_approval(id).await;
    let out = aiops(
        &dir,
        Some(&app.database_url),
        &["apply", "others", "--prune"],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("deleted needs-approval"),
        "{}",
        text(&out.stdout)
    );
    let (_, run) = app.get(&format!("/executions/{id}")).await;
    assert_eq!(run["status"], "cancelled", "{run}");
    assert!(
        run["error_message"]
            .as_str()
            .unwrap_or_default()
            .contains("was deleted while the run waited for approval"),
        "{run}"
    );
    worker.stop().await;
}

/// Two applies of the same runbooks listed in opposite orders (a folder and its export) at
/// the same moment both succeed: they take turns instead of deadlocking.
#[tokio::test]
async fn applies_of_the_same_runbooks_in_opposite_orders_take_turns() {
    let url = common::fresh_database_url().await;
    let pool = aiops::store::connect(&url, 8).await.unwrap();
    aiops::store::migrate(&pool).await.unwrap();
    for round in 0..4 {
        let docs: Vec<_> = (0..20)
            .map(|i| {
                aiops::domain::runbook::parse_yaml(&format!(
                    "name: order-{i:02}\nsteps:\n  - name: s\n    command: echo {round}\n"
                ))
                .unwrap()
            })
            .collect();
        let mut reversed = docs.clone();
        reversed.reverse();
        for d in &mut reversed {
            d.steps[0].command = format!("echo {round} again");
        }
        let (a, b) = tokio::join!(
            aiops::cli::runbook::apply_documents(&pool, &docs, false, None, "test"),
            aiops::cli::runbook::apply_documents(&pool, &reversed, false, None, "test"),
        );
        assert!(a.is_ok(), "round {round}: {:#}", a.unwrap_err());
        assert!(b.is_ok(), "round {round}: {:#}", b.unwrap_err());
    }
}

#[tokio::test]
async fn apply_folder_is_idempotent_prunes_on_request_and_exports() {
    let url = common::fresh_database_url().await;
    let pool = aiops::store::connect(&url, 2).await.unwrap();
    aiops::store::migrate(&pool).await.unwrap();
    let dir = common::Scratch::new("rb-apply");
    let flows = dir.join("flows");
    std::fs::create_dir_all(&flows).unwrap();
    std::fs::write(flows.join("one.yaml"), GOOD).unwrap();
    std::fs::write(flows.join("two.yaml"), GOOD.replace("cli-one", "cli-two")).unwrap();

    let out = aiops(&dir, Some(&url), &["apply", "flows"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout),
        "created cli-one v1\ncreated cli-two v1\n"
    );

    let out = aiops(&dir, Some(&url), &["apply", "flows"]);
    assert_eq!(
        text(&out.stdout),
        "unchanged cli-one v1\nunchanged cli-two v1\n"
    );

    std::fs::remove_file(flows.join("two.yaml")).unwrap();
    std::fs::write(flows.join("one.yaml"), GOOD.replace("'Node*'", "'Host*'")).unwrap();
    let out = aiops(&dir, Some(&url), &["apply", "flows"]);
    assert_eq!(
        text(&out.stdout),
        "updated cli-one v2: modified triggers `t`\n",
        "without --prune nothing is deleted"
    );
    let out = aiops(&dir, Some(&url), &["apply", "--prune", "flows"]);
    assert_eq!(text(&out.stdout), "unchanged cli-one v2\ndeleted cli-two\n");

    let out = aiops(&dir, Some(&url), &["export", "cli-one"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let exported = text(&out.stdout);
    let doc = aiops::domain::runbook::parse_yaml(
        &std::fs::read_to_string(flows.join("one.yaml")).unwrap(),
    )
    .unwrap();
    assert_eq!(exported, aiops::domain::runbook::to_canonical_yaml(&doc));

    // Diff of a file against what is stored.
    std::fs::write(dir.join("edited.yaml"), GOOD.replace("'Node*'", "'Disk*'")).unwrap();
    let out = aiops(&dir, Some(&url), &["diff", "edited.yaml"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    let diff = text(&out.stdout);
    assert!(diff.contains("--- cli-one@v2 (stored)"), "{diff}");
    assert!(diff.contains("+  alert_name_pattern: Disk*"), "{diff}");
    // A folder: each runbook against its stored version; only those that differ are shown.
    let drift = dir.join("drift");
    std::fs::create_dir_all(&drift).unwrap();
    std::fs::copy(flows.join("one.yaml"), drift.join("one.yaml")).unwrap();
    let out = aiops(&dir, Some(&url), &["diff", "drift"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(text(&out.stdout).is_empty(), "{}", text(&out.stdout));
    std::fs::write(drift.join("two.yaml"), GOOD.replace("cli-one", "cli-new")).unwrap();
    let out = aiops(&dir, Some(&url), &["diff", "drift"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    let diff = text(&out.stdout);
    assert!(diff.contains("--- cli-new (not stored)"), "{diff}");
    assert!(!diff.contains("cli-one"), "{diff}");

    // Every change was audited as coming from the CLI.
    let audited: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM audit_log WHERE action IN ('runbook_apply', 'runbook_delete') \
         AND details_json->>'source' = 'cli'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(audited, 4);

    // An invalid file stops the whole apply before anything is written.
    std::fs::write(flows.join("zzz.yaml"), "name: cli-z\nsteps: []\n").unwrap();
    let out = aiops(&dir, Some(&url), &["apply", "flows"]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("flows/zzz.yaml:2:1: steps must contain at least one step"),
        "{}",
        text(&out.stderr)
    );
}

#[tokio::test]
async fn up_applies_the_workflows_folder() {
    let pool = common::fresh_pool().await;
    let workflows = Path::new(env!("CARGO_MANIFEST_DIR")).join("workflows");
    aiops::cli::runbook::apply_workflows_at_start(&pool, &workflows)
        .await
        .unwrap();
    let count: i64 = sqlx::query_scalar("SELECT count(*) FROM runbooks")
        .fetch_one(&pool)
        .await
        .unwrap();
    let files = std::fs::read_dir(&workflows).unwrap().count() as i64;
    assert_eq!(count, files);
    // A second start writes no new versions.
    aiops::cli::runbook::apply_workflows_at_start(&pool, &workflows)
        .await
        .unwrap();
    let versions: i64 = sqlx::query_scalar("SELECT count(*) FROM runbook_versions")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(versions, files);
}

#[test]
fn a_reader_that_goes_away_ends_the_command_quietly() {
    use std::io::Read;
    let mut child = std::process::Command::new(BIN)
        .arg("openapi")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = [0u8; 16];
    child.stdout.take().unwrap().read_exact(&mut first).unwrap();
    // The pipe's read end is closed here; the document is far larger than the pipe's buffer.
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(141), "{}", text(&out.stderr));
    assert!(out.stderr.is_empty(), "{}", text(&out.stderr));
}

#[tokio::test]
async fn a_database_that_was_never_migrated_is_named_with_what_to_do() {
    let dir = common::Scratch::new("rb-unmigrated");
    std::fs::write(dir.join("good.yaml"), GOOD).unwrap();
    let url = common::fresh_database_url().await;
    let out = aiops(&dir, Some(&url), &["apply", "good.yaml"]);
    assert!(!out.status.success());
    let stderr = text(&out.stderr);
    assert_eq!(
        stderr,
        "error: cannot apply runbook `cli-one`: the database refused: relation \"runbooks\" \
         does not exist\nhint: this database has no aiops tables yet; run `aiops migrate` first\n"
    );
}
