//! `aiops runbook validate | apply | export | diff | dry-run`: runbooks as code.
//!
//! `validate`, `diff` (of two files) and `dry-run` work offline on files. `apply`, `export` and
//! `diff` of one file (against what is stored) talk to the database named by DATABASE_URL
//! directly, like `aiops user`, and audit every change with no user and `source: cli`. A path may
//! be a file or a folder (its `*.yaml` / `*.yml` files, sorted by name, not recursive).
//! Problems are printed as `file:line:column: message`.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use clap::Subcommand;
use serde::Deserialize;
use sqlx::PgPool;

use crate::api::runbooks::{SampleAlert, dry_run_report, unified_diff};
use crate::config::Config;
use crate::domain::runbook::{
    RunbookDocument, locate, parse_yaml_partial, strip_position, to_canonical_yaml, yaml_locations,
};
use crate::store::{self, audit::NewAuditEntry};
use crate::templates::validate_runbook;

/// Runbook subcommands.
#[derive(Debug, Subcommand)]
pub enum RunbookCommand {
    /// Check files or folders offline; prints every problem as file:line:column: message.
    Validate {
        /// Files or folders.
        #[arg(required = true)]
        paths: Vec<PathBuf>,
    },
    /// Create or update runbooks by name from files or folders (DATABASE_URL). Idempotent: an
    /// unchanged document makes no new version.
    Apply {
        /// Files or folders.
        #[arg(required = true)]
        paths: Vec<PathBuf>,
        /// Also delete stored runbooks whose names are not in these files.
        #[arg(long)]
        prune: bool,
        /// Change summary for the new versions (default: generated from what changed).
        #[arg(long)]
        message: Option<String>,
    },
    /// Print stored runbooks as canonical YAML, or write them to a folder (DATABASE_URL).
    Export {
        /// Runbook names (default: all).
        names: Vec<String>,
        /// Write NAME.yaml files into this folder instead of printing.
        #[arg(long, value_name = "DIR")]
        out: Option<PathBuf>,
    },
    /// Unified diff of the canonical YAML of two files or folders (runbooks paired by name), or
    /// of each runbook of one file or folder against the stored runbook of the same name
    /// (DATABASE_URL). Only runbooks that differ are shown. Exits 0 when all are the same and 1
    /// when any differs (or on an error, which is printed), so CI can detect drift.
    Diff {
        /// The old side (or the only file).
        old: PathBuf,
        /// The new side.
        new: Option<PathBuf>,
    },
    /// Render every step for a sample alert without running anything, and show which triggers
    /// would match and why not.
    DryRun {
        /// The runbook file.
        path: PathBuf,
        /// YAML or JSON file with the alert: name, severity, source, labels, annotations.
        #[arg(long, value_name = "FILE")]
        alert: PathBuf,
        /// Host name of the sample server.
        #[arg(long, default_value = "localhost")]
        host: String,
        /// Time to evaluate trigger windows at (RFC 3339; default now).
        #[arg(long)]
        at: Option<chrono::DateTime<chrono::Utc>>,
        /// IANA timezone of trigger time windows, as the `alerts.timezone` setting gives it
        /// to alert matching (default UTC).
        #[arg(long, default_value = "UTC")]
        timezone: String,
    },
}

/// `diff` found differences: the command fails (exit status 1) without an error message.
#[derive(Debug, thiserror::Error)]
#[error("the runbooks differ")]
pub struct Differences;

/// A file that was read and checked.
struct Loaded {
    path: PathBuf,
    doc: RunbookDocument,
}

/// Expands folders into their YAML files, subfolders included (hidden ones, such as `.git`,
/// left out), sorted by path: a runbook kept in a subfolder is part of the folder, so
/// `apply --prune` never deletes it.
fn expand(paths: &[PathBuf]) -> anyhow::Result<Vec<PathBuf>> {
    fn walk(dir: &std::path::Path, out: &mut Vec<PathBuf>) -> anyhow::Result<()> {
        for entry in std::fs::read_dir(dir)
            .with_context(|| format!("cannot read folder {}", dir.display()))?
        {
            let path = entry
                .with_context(|| format!("cannot read folder {}", dir.display()))?
                .path();
            let hidden = path
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with('.'));
            if hidden {
                continue;
            }
            if path.is_dir() {
                walk(&path, out)?;
            } else if path.is_file() && path.extension().is_some_and(|e| e == "yaml" || e == "yml")
            {
                out.push(path);
            }
        }
        Ok(())
    }
    let mut out = Vec::new();
    for path in paths {
        if path.is_dir() {
            let mut files = Vec::new();
            walk(path, &mut files)?;
            files.sort();
            out.extend(files);
        } else {
            out.push(path.clone());
        }
    }
    Ok(out)
}

/// The YAML documents of a file (separated by `---` lines, as `export` prints several
/// runbooks), each with the number of lines before it; documents holding only blanks or
/// comments are left out.
fn yaml_documents(text: &str) -> Vec<(u32, String)> {
    let mut docs = Vec::new();
    let mut current = String::new();
    let mut start = 0u32;
    for (n, line) in text.split_inclusive('\n').enumerate() {
        let n = u32::try_from(n).unwrap_or(u32::MAX);
        let bare = line.trim_end_matches(['\n', '\r']);
        let marker =
            bare == "---" || bare.starts_with("--- ") || bare.starts_with("---\t") || bare == "...";
        // Directives (`%YAML 1.2`) belong to the document their `---` begins.
        let only_directives = current.lines().any(|l| l.starts_with('%'))
            && current.lines().all(|l| {
                let l = l.trim();
                l.is_empty() || l.starts_with('%') || l.starts_with('#')
            });
        if marker && bare != "..." && only_directives {
            current.push_str(line);
        } else if marker {
            docs.push((start, std::mem::take(&mut current)));
            // The marker line stays in the next document as a blank line, so that a
            // document's own line numbers count from its first line.
            current.push('\n');
            start = n;
        } else {
            current.push_str(line);
        }
    }
    docs.push((start, current));
    docs.into_iter()
        .filter(|(_, doc)| {
            doc.lines()
                .any(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#'))
        })
        .collect()
}

/// One problem as a `file:line:column: message` line (`file: message` without a position);
/// `offset` is the line of the file its document starts at.
fn line(shown: &impl std::fmt::Display, offset: u32, at: Option<(u32, u32)>, text: &str) -> String {
    match at {
        Some((l, c)) => format!("{shown}:{}:{c}: {text}", l + offset),
        None => format!("{shown}: {text}"),
    }
}

/// Where a runbook's `name` stands in its file (line, column), when known.
type Position = Option<(u32, u32)>;

/// Reads and validates one file, each runbook of it; returns the problems as
/// `file:line:column: message` lines.
fn load_file(path: &Path) -> Result<Vec<(RunbookDocument, Position)>, Vec<String>> {
    let shown = path.display();
    let text = std::fs::read_to_string(path).map_err(|e| vec![format!("{shown}: {e}")])?;
    let mut docs = Vec::new();
    let mut problems = Vec::new();
    let parts = yaml_documents(&text);
    if parts.is_empty() {
        // Nothing but blanks and comments: no runbook at all.
        problems.push(format!(
            "{shown}:1:1: holds no runbook (only blank lines or comments)"
        ));
    }
    for (offset, part) in parts {
        let locations = yaml_locations(&part);
        let (doc, mut found, partial) = match parse_yaml_partial(&part) {
            Ok(doc) => (Some(doc), Vec::new(), None),
            Err((errors, partial)) => {
                let found: Vec<(Option<(u32, u32)>, String)> = errors
                    .iter()
                    .map(|e| (e.line.zip(e.column), e.described()))
                    .collect();
                (None, found, partial)
            }
        };
        // A document with field problems is checked as read past them too, so that every
        // problem of the file is reported at once.
        let (checked, keeps): (&RunbookDocument, &dyn Fn(&str) -> bool) = match (&doc, &partial) {
            (Some(doc), _) => (doc, &|_| true),
            (None, Some(partial)) => (&partial.doc, &|path| partial.keeps(path)),
            (None, None) => {
                problems.extend(
                    found
                        .into_iter()
                        .map(|(at, text)| line(&shown, offset, at, &text)),
                );
                continue;
            }
        };
        found.extend(
            validate_runbook(checked)
                .iter()
                .filter(|i| keeps(&i.path))
                .map(|i| (locate(&locations, &i.path), i.to_string())),
        );
        if found.is_empty()
            && let Some(doc) = doc
        {
            // Where its name stands, for a message about two runbooks of one name.
            let at = locations.get("name").map(|(l, c)| (l + offset, *c));
            docs.push((doc, at));
            continue;
        }
        found.sort_by_key(|(at, _)| (at.is_none(), *at));
        problems.extend(
            found
                .into_iter()
                .map(|(at, text)| line(&shown, offset, at, &text)),
        );
    }
    if problems.is_empty() {
        Ok(docs)
    } else {
        Err(problems)
    }
}

/// Loads every file; prints every problem and fails when there is any, including two files
/// with the same runbook name.
fn load_all(paths: &[PathBuf]) -> anyhow::Result<Vec<Loaded>> {
    let files = expand(paths)?;
    if files.is_empty() {
        bail!("no runbook files (*.yaml, *.yml) found");
    }
    let mut loaded = Vec::new();
    let mut problems = Vec::new();
    let mut names: HashMap<String, String> = HashMap::new();
    for path in files {
        match load_file(&path) {
            Ok(docs) => {
                for (doc, at) in docs {
                    let here = match at {
                        Some((l, c)) => format!("{}:{l}:{c}", path.display()),
                        None => path.display().to_string(),
                    };
                    // Names are unique regardless of case, as the database keeps them.
                    if let Some(first) = names.insert(doc.name.to_lowercase(), here.clone()) {
                        problems.push(format!(
                            "{here}: name `{}` is already used by the runbook at {first} (names \
                             are unique regardless of case)",
                            doc.name,
                        ));
                    }
                    loaded.push(Loaded {
                        path: path.clone(),
                        doc,
                    });
                }
            }
            Err(p) => problems.extend(p),
        }
    }
    for p in &problems {
        eprintln!("{p}");
    }
    if !problems.is_empty() {
        bail!("{} problem(s) found", problems.len());
    }
    Ok(loaded)
}

/// What applying a set of documents did.
#[derive(Debug, Default)]
pub struct ApplyReport {
    /// One line per runbook: `created NAME v1`, `updated NAME v3: ...`, `unchanged NAME v2`,
    /// `deleted NAME`.
    pub lines: Vec<String>,
}

/// Applies documents in one transaction, auditing each change with `source`; with `prune`,
/// deletes stored runbooks not among them.
pub async fn apply_documents(
    pool: &PgPool,
    docs: &[RunbookDocument],
    prune: bool,
    message: Option<&str>,
    source: &str,
) -> anyhow::Result<ApplyReport> {
    let mut tx = pool.begin().await?;
    // Every name this apply writes is locked first, in one order for all applies: two applies
    // of the same runbooks listed in different orders (a folder and its export) take turns
    // instead of deadlocking.
    let mut names: Vec<String> = docs.iter().map(|d| d.name.clone()).collect();
    if prune {
        names.extend(
            store::runbooks::runbook_names(&mut tx)
                .await?
                .into_iter()
                .map(|(_, name)| name),
        );
    }
    store::runbooks::runbook_lock_names(&mut tx, names).await?;
    let mut report = ApplyReport::default();
    for doc in docs {
        let out = store::runbooks::runbook_apply(&mut tx, doc, message, None)
            .await
            .with_context(|| format!("cannot apply runbook `{}`", doc.name))?;
        if out.changed {
            store::audit::audit_insert(
                &mut tx,
                &NewAuditEntry {
                    user_id: None,
                    action: "runbook_apply",
                    resource_type: "runbook",
                    resource_id: Some(out.id),
                    details: serde_json::json!({
                        "name": doc.name,
                        "created": out.created,
                        "version": out.version,
                        "change_summary": out.change_summary,
                        "source": source,
                    }),
                    ip_address: None,
                },
            )
            .await?;
        }
        report.lines.push(match (out.created, out.changed) {
            (true, _) => format!("created {} v{}", doc.name, out.version),
            (false, true) => format!(
                "updated {} v{}: {}",
                doc.name,
                out.version,
                out.change_summary.unwrap_or_default()
            ),
            (false, false) => format!("unchanged {} v{}", doc.name, out.version),
        });
    }
    if prune {
        let keep: HashSet<&str> = docs.iter().map(|d| d.name.as_str()).collect();
        for (id, name) in store::runbooks::runbook_names(&mut tx).await? {
            if keep.contains(name.as_str()) {
                continue;
            }
            // As the API's delete: runs waiting for approval are cancelled with it.
            if store::runbooks::runbook_lock(&mut tx, id).await?.is_none() {
                continue;
            }
            let cancelled = crate::engine::control::delete_runbook(&mut tx, id, &name, None)
                .await
                .with_context(|| format!("cannot delete runbook `{name}`"))?;
            store::audit::audit_insert(
                &mut tx,
                &NewAuditEntry {
                    user_id: None,
                    action: "runbook_delete",
                    resource_type: "runbook",
                    resource_id: Some(id),
                    details: serde_json::json!({ "name": name, "source": source, "pruned": true,
                                                 "cancelled_executions": cancelled }),
                    ip_address: None,
                },
            )
            .await?;
            report.lines.push(format!("deleted {name}"));
        }
    }
    tx.commit().await?;
    Ok(report)
}

/// `aiops up`: applies the workflows folder when it exists (no prune). Invalid files stop the
/// start with their `file:line:column` problems printed.
pub async fn apply_workflows_at_start(pool: &PgPool, dir: &Path) -> anyhow::Result<()> {
    if !dir.is_dir() {
        tracing::info!(dir = %dir.display(), "no workflows folder; nothing to apply");
        return Ok(());
    }
    let loaded = load_all(&[dir.to_path_buf()])
        .with_context(|| format!("runbooks in {} are invalid", dir.display()))?;
    let docs: Vec<RunbookDocument> = loaded.into_iter().map(|l| l.doc).collect();
    let report = apply_documents(pool, &docs, false, None, "startup").await?;
    for line in &report.lines {
        tracing::info!(dir = %dir.display(), "{line}");
    }
    Ok(())
}

/// The alert file of `dry-run`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AlertFile {
    name: String,
    severity: Option<String>,
    source: Option<String>,
    status: Option<String>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(default)]
    annotations: BTreeMap<String, String>,
}

/// Runs a runbook subcommand.
pub async fn run(command: RunbookCommand, config: &Config) -> anyhow::Result<()> {
    match command {
        RunbookCommand::Validate { paths } => {
            let loaded = load_all(&paths)?;
            for l in &loaded {
                outln!("{}: ok ({})", l.path.display(), l.doc.name);
            }
            Ok(())
        }
        RunbookCommand::Apply {
            paths,
            prune,
            message,
        } => {
            let loaded = load_all(&paths)?;
            let docs: Vec<RunbookDocument> = loaded.into_iter().map(|l| l.doc).collect();
            let pool = super::connect(config).await?;
            let report = apply_documents(&pool, &docs, prune, message.as_deref(), "cli").await?;
            for line in report.lines {
                outln!("{line}");
            }
            Ok(())
        }
        RunbookCommand::Export { names, out } => {
            let pool = super::connect(config).await?;
            let mut conn = pool.acquire().await?;
            let stored = store::runbooks::runbook_names(&mut conn).await?;
            let wanted: Vec<(uuid::Uuid, String)> = if names.is_empty() {
                stored
            } else {
                let by_name: HashMap<String, uuid::Uuid> =
                    stored.into_iter().map(|(id, n)| (n, id)).collect();
                let mut picked = Vec::new();
                for name in names {
                    let id = by_name
                        .get(&name)
                        .with_context(|| format!("no runbook named `{name}`"))?;
                    picked.push((*id, name));
                }
                picked
            };
            if let Some(dir) = &out {
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("cannot create {}", dir.display()))?;
            }
            for (i, (id, name)) in wanted.iter().enumerate() {
                let Some(runbook) = store::runbooks::runbook_load(&mut conn, *id).await? else {
                    continue;
                };
                let yaml = to_canonical_yaml(&runbook.document());
                match &out {
                    Some(dir) => {
                        let file = dir.join(format!("{name}.yaml"));
                        std::fs::write(&file, &yaml)
                            .with_context(|| format!("cannot write {}", file.display()))?;
                        outln!("wrote {}", file.display());
                    }
                    None => {
                        if i > 0 {
                            outln!("---");
                        }
                        out!("{yaml}");
                    }
                }
            }
            Ok(())
        }
        RunbookCommand::Diff { old, new } => {
            let old_loaded = load_all(std::slice::from_ref(&old))?;
            // (old label, old text, new label, new text) per runbook, by name.
            let mut sides: Vec<(String, String, String, String)> = Vec::new();
            match new {
                Some(new) => {
                    let new_loaded = load_all(std::slice::from_ref(&new))?;
                    if let ([one_old], [one_new]) = (&old_loaded[..], &new_loaded[..]) {
                        sides.push((
                            old.display().to_string(),
                            to_canonical_yaml(&one_old.doc),
                            new.display().to_string(),
                            to_canonical_yaml(&one_new.doc),
                        ));
                    } else {
                        // Several runbooks a side: paired by name; one on a side only is
                        // compared with nothing.
                        let names: std::collections::BTreeSet<&str> = old_loaded
                            .iter()
                            .chain(&new_loaded)
                            .map(|l| l.doc.name.as_str())
                            .collect();
                        let side = |loaded: &[Loaded], name: &str| -> (String, String) {
                            match loaded.iter().find(|l| l.doc.name == name) {
                                Some(l) => (
                                    format!("{} ({})", name, l.path.display()),
                                    to_canonical_yaml(&l.doc),
                                ),
                                None => (format!("{name} (absent)"), String::new()),
                            }
                        };
                        for name in names {
                            let (old_label, old_text) = side(&old_loaded, name);
                            let (new_label, new_text) = side(&new_loaded, name);
                            sides.push((old_label, old_text, new_label, new_text));
                        }
                    }
                }
                None => {
                    // Each runbook of the file or folder against what is stored under its name.
                    let pool = super::connect(config).await?;
                    let mut conn = pool.acquire().await?;
                    for loaded in &old_loaded {
                        let name = &loaded.doc.name;
                        let stored =
                            match store::runbooks::runbook_get_by_name(&mut conn, name).await? {
                                Some(row) => store::runbooks::runbook_load(&mut conn, row.id)
                                    .await?
                                    .map(|s| (s.row.version, to_canonical_yaml(&s.document()))),
                                None => None,
                            };
                        let (label, text) = match stored {
                            Some((v, text)) => (format!("{name}@v{v} (stored)"), text),
                            None => (format!("{name} (not stored)"), String::new()),
                        };
                        sides.push((
                            label,
                            text,
                            loaded.path.display().to_string(),
                            to_canonical_yaml(&loaded.doc),
                        ));
                    }
                }
            }
            let mut differ = false;
            for (old_name, old_text, new_name, new_text) in &sides {
                if old_text != new_text {
                    differ = true;
                    out!("{}", unified_diff(old_text, new_text, old_name, new_name));
                }
            }
            if differ {
                Err(Differences.into())
            } else {
                Ok(())
            }
        }
        RunbookCommand::DryRun {
            path,
            alert,
            host,
            at,
            timezone,
        } => {
            let tz: chrono_tz::Tz = timezone
                .parse()
                .map_err(|_| anyhow::anyhow!("--timezone: `{timezone}` is not an IANA timezone"))?;
            let loaded = load_all(std::slice::from_ref(&path))?;
            let [runbook] = <[Loaded; 1]>::try_from(loaded)
                .map_err(|_| anyhow::anyhow!("dry-run takes one file of one runbook"))?;
            let text = std::fs::read_to_string(&alert)
                .with_context(|| format!("cannot read {}", alert.display()))?;
            let a: AlertFile = serde_saphyr::from_str(&text).map_err(|e| {
                let pos = e
                    .location()
                    .map(|l| format!("{}:{}:", l.line(), l.column()))
                    .unwrap_or_default();
                let message = strip_position(&e.without_snippet().to_string());
                anyhow::anyhow!("{}:{pos} {message}", alert.display())
            })?;
            let sample = SampleAlert {
                name: a.name,
                severity: a.severity,
                source: a.source,
                status: a.status,
                labels: Some(a.labels),
                annotations: Some(a.annotations),
            };
            let server = serde_json::json!({
                "name": host, "hostname": host, "port": 22,
                "os_type": runbook.doc.target_os.as_str(), "tags": [],
            });
            let report = dry_run_report(
                &runbook.doc,
                &sample,
                server,
                0,
                (at.unwrap_or_else(chrono::Utc::now), tz),
                &HashMap::new(),
            );
            print_dry_run(&report);
            Ok(())
        }
    }
}

fn print_dry_run(report: &crate::api::runbooks::DryRunReport) {
    outln!("runbook {} (dry run, nothing executed)", report.runbook);
    if let Some(e) = &report.vars_error {
        outln!("  variables: ERROR {e}");
    }
    for (k, v) in &report.vars {
        outln!("  var {k} = {v:?}");
    }
    for s in &report.steps {
        outln!("step {} {}", s.order, s.name);
        if let Some(c) = &s.condition {
            match (&s.condition_result, &s.condition_error) {
                (Some(r), _) => outln!("  when {c} -> {r}"),
                (_, Some(e)) => outln!("  when {c} -> ERROR {e}"),
                _ => {}
            }
        }
        match (&s.command, &s.command_error) {
            (Some(c), _) => outln!("  run: {c}"),
            (_, Some(e)) => outln!("  run: ERROR {e}"),
            _ => {}
        }
        match (&s.rollback_command, &s.rollback_error) {
            (Some(c), _) => outln!("  rollback: {c}"),
            (_, Some(e)) => outln!("  rollback: ERROR {e}"),
            _ => {}
        }
    }
    for t in &report.triggers {
        if t.matched {
            outln!("trigger {:?} (priority {}): matches", t.name, t.priority);
        } else {
            outln!(
                "trigger {:?} (priority {}): no match: {}",
                t.name,
                t.priority,
                t.reasons.join("; ")
            );
        }
    }
    match &report.matched_trigger {
        Some(t) => outln!("would start through trigger {t:?}"),
        None => outln!("no trigger matches this alert"),
    }
    for n in &report.notes {
        outln!("note: {n}");
    }
}
