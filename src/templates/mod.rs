//! Command templates: minijinja with strict undefined, a fuel limit, and every `{{ }}` value
//! quoted for the target shell. Owns rendering (commands, rollbacks, conditions, environment
//! variables) and the template half of runbook validation. Knows nothing about PostgreSQL, HTTP
//! or how commands are executed.
//!
//! Context: `alert` (name, severity, status, source, labels, annotations, ...), `server` (id,
//! name, hostname, port, username, os_type, environment, tags), `vars` (the runbook's
//! `environment_vars`, rendered first from `alert`, `server` and `execution`; each also available
//! under its own name, so `{{ SERVICE_NAME }}` and `{{ vars.SERVICE_NAME }}` are the same),
//! `steps.<name>.stdout` / `.stderr` / `.exit_code` for earlier steps with `capture_output`, and
//! `execution` (id, runbook, version, mode, ...).
//!
//! Quoting: the formatter of the command environment quotes every interpolated value
//! (`quote::quote_posix` for Linux targets, `quote::quote_powershell` for Windows targets), so a
//! value always arrives as exactly one literal argument; `{% autoescape false %}` does not turn
//! it off. The only way to interpolate unquoted text is the `raw` filter, `{{ x | raw }}`, an
//! opt-in meant for trusted fragments (a flag list the runbook itself defines), visible in
//! review. The `safe`, `escape` and `e` filters are removed so that `raw` is the one spelling.
//! Environment variables are rendered as plain text (they are data) and quoted when a command
//! uses them. Conditions are minijinja expressions, evaluated for truth.

pub mod placement;
pub mod quote;

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::sync::Arc;

use minijinja::value::{Object, Serde, Value};
use minijinja::{AutoEscape, Environment, Error, ErrorKind, UndefinedBehavior};
use serde::Serialize;

use crate::domain::runbook::{Issue, RunbookDocument, TargetOs, validate};
pub use placement::{Shell, VALUE_MARK, check_placement, check_rendered};

/// Fuel (instructions) one render or condition may use; stops runaway loops.
pub const FUEL: u64 = 100_000;
/// Largest rendered command, in bytes.
pub const MAX_RENDERED_BYTES: usize = 64 * 1024;

/// Names every template may use besides the context (minijinja's global functions).
const GLOBAL_FUNCTIONS: [&str; 3] = ["range", "dict", "namespace"];

/// A template that cannot be compiled or rendered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TemplateError {
    /// The template does not parse.
    #[error("template syntax error: {0}")]
    Syntax(String),
    /// Rendering failed: an undefined value, a NUL byte, out of fuel, ...
    #[error("cannot render: {0}")]
    Render(String),
    /// The rendered command is too long.
    #[error("the rendered command is {0} bytes, over the limit of {MAX_RENDERED_BYTES}")]
    TooLong(usize),
    /// As rendered, a value stands where the shell would not read it as plain text.
    #[error("as rendered, {0}")]
    Placement(String),
}

fn describe(e: &Error) -> String {
    let detail = e
        .detail()
        .map(str::to_owned)
        .unwrap_or_else(|| e.kind().to_string());
    match e.line() {
        Some(line) => format!("{detail} (line {line})"),
        None => detail,
    }
}

/// The captured result of an earlier step.
#[derive(Debug, Clone, Default, Serialize)]
pub struct StepOutput {
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
    /// Exit code.
    pub exit_code: i32,
}

/// What templates see, before the runbook's own variables are added.
#[derive(Debug, Clone, Default)]
pub struct TemplateContext {
    /// The alert (JSON object).
    pub alert: serde_json::Value,
    /// The target server (JSON object, no secrets).
    pub server: serde_json::Value,
    /// The execution (JSON object).
    pub execution: serde_json::Value,
    /// Outputs of earlier captured steps, by step name.
    pub steps: BTreeMap<String, StepOutput>,
}

/// The marker the `raw` filter wraps its value in; the formatter writes it unquoted.
#[derive(Debug)]
struct RawText(String);

impl Object for RawText {
    fn repr(self: &Arc<Self>) -> minijinja::value::ObjectRepr {
        minijinja::value::ObjectRepr::Plain
    }

    fn render(self: &Arc<Self>, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

fn raw_filter(value: Value) -> Value {
    Value::from_object(RawText(value.to_string()))
}

fn plain_text(value: &Value) -> String {
    if value.is_none() {
        String::new()
    } else if let Some(raw) = value.downcast_object_ref::<RawText>() {
        raw.0.clone()
    } else {
        value.to_string()
    }
}

/// minijinja's filters that would leave a value unquoted; removed so that `raw` is the one
/// spelling of that.
const REMOVED_FILTERS: [&str; 3] = ["safe", "escape", "e"];

fn base_environment() -> Environment<'static> {
    let mut env = Environment::new();
    env.set_undefined_behavior(UndefinedBehavior::Strict);
    env.set_fuel(Some(FUEL));
    env.set_recursion_limit(50);
    for unsafe_filter in REMOVED_FILTERS {
        env.remove_filter(unsafe_filter);
    }
    env.add_filter("raw", raw_filter);
    env
}

/// Renders and checks the templates of runbooks for one target shell.
pub struct Renderer {
    shell: Shell,
    commands: Environment<'static>,
    /// As `commands`, with each value written as [`VALUE_MARK`] (the `raw` filter's as is).
    marked: Environment<'static>,
    text: Environment<'static>,
}

impl Renderer {
    /// Whether the command environment has a filter of this name (asked by applying it: an
    /// unknown filter is an error of its own kind, whatever the arguments).
    fn has_filter(&self, name: &str) -> bool {
        if !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return false;
        }
        match self
            .commands
            .render_str(&format!("{{{{ none | {name} }}}}"), ())
        {
            Err(e) => e.kind() != minijinja::ErrorKind::UnknownFilter,
            Ok(_) => true,
        }
    }

    /// A renderer quoting for `target`.
    pub fn new(target: TargetOs) -> Renderer {
        let shell = match target {
            TargetOs::Linux => Shell::Posix,
            TargetOs::Windows => Shell::PowerShell,
        };
        let mut commands = base_environment();
        let name = match shell {
            Shell::Posix => "posix-sh",
            Shell::PowerShell => "powershell",
        };
        commands.set_auto_escape_callback(move |_| AutoEscape::Custom(name.into()));
        commands.set_formatter(move |out, _state, value| {
            // Deliberately ignores the auto-escape state: nothing in a template can turn
            // quoting off except the `raw` filter.
            let text = if let Some(raw) = value.downcast_object_ref::<RawText>() {
                raw.0.clone()
            } else {
                let plain = plain_text(value);
                let quoted = match shell {
                    Shell::Posix => quote::quote_posix(&plain),
                    Shell::PowerShell => quote::quote_powershell(&plain),
                };
                quoted.map_err(|e| Error::new(ErrorKind::InvalidOperation, e.to_string()))?
            };
            out.write_str(&text)
                .map_err(|_| Error::new(ErrorKind::WriteFailure, "cannot write the output"))
        });
        let mut marked = base_environment();
        marked.set_formatter(|out, _state, value| {
            let written = match value.downcast_object_ref::<RawText>() {
                Some(raw) => out.write_str(&raw.0),
                None => std::fmt::Write::write_char(out, VALUE_MARK),
            };
            written.map_err(|_| Error::new(ErrorKind::WriteFailure, "cannot write the output"))
        });
        let mut text = base_environment();
        text.set_formatter(|out, _state, value| {
            out.write_str(&plain_text(value))
                .map_err(|_| Error::new(ErrorKind::WriteFailure, "cannot write the output"))
        });
        Renderer {
            shell,
            commands,
            marked,
            text,
        }
    }

    /// The shell commands are quoted for.
    pub fn shell(&self) -> Shell {
        self.shell
    }

    fn base_value(ctx: &TemplateContext, vars: Option<&BTreeMap<String, String>>) -> Value {
        let mut map: BTreeMap<String, Value> = BTreeMap::new();
        if let Some(vars) = vars {
            for (k, v) in vars {
                map.insert(k.clone(), Value::from(v.clone()));
            }
            map.insert("vars".into(), Value::from(Serde(vars)));
        }
        map.insert("alert".into(), Value::from(Serde(&ctx.alert)));
        map.insert("server".into(), Value::from(Serde(&ctx.server)));
        map.insert("execution".into(), Value::from(Serde(&ctx.execution)));
        map.insert("steps".into(), Value::from(Serde(&ctx.steps)));
        Value::from(Serde(&map))
    }

    /// Renders the runbook's environment variables (plain text, no quoting). They may use
    /// `alert`, `server` and `execution`. On failure, returns the variable's name and the error.
    pub fn render_vars(
        &self,
        vars: &BTreeMap<String, String>,
        ctx: &TemplateContext,
    ) -> Result<BTreeMap<String, String>, (String, TemplateError)> {
        let value = Self::base_value(ctx, None);
        let mut out = BTreeMap::new();
        for (name, source) in vars {
            let tmpl = self
                .text
                .template_from_str(source)
                .map_err(|e| (name.clone(), TemplateError::Syntax(describe(&e))))?;
            let rendered = tmpl
                .render(&value)
                .map_err(|e| (name.clone(), TemplateError::Render(describe(&e))))?;
            out.insert(name.clone(), rendered);
        }
        Ok(out)
    }

    /// Renders a command (or rollback) template with every value quoted.
    pub fn render_command(
        &self,
        source: &str,
        ctx: &TemplateContext,
        vars: &BTreeMap<String, String>,
    ) -> Result<String, TemplateError> {
        let tmpl = self
            .commands
            .template_from_str(source)
            .map_err(|e| TemplateError::Syntax(describe(&e)))?;
        let value = Self::base_value(ctx, Some(vars));
        let rendered = tmpl
            .render(&value)
            .map_err(|e| TemplateError::Render(describe(&e)))?;
        if rendered.len() > MAX_RENDERED_BYTES {
            return Err(TemplateError::TooLong(rendered.len()));
        }
        // The same command with its values marked: each must stand where the shell reads
        // plain words, whatever the template's text looked like (see `placement`).
        let marked = self
            .marked
            .template_from_str(source)
            .and_then(|t| t.render(&value))
            .map_err(|e| TemplateError::Render(describe(&e)))?;
        placement::check_rendered(&marked, self.shell)
            .map_err(|e| TemplateError::Placement(e.to_string()))?;
        Ok(rendered)
    }

    /// Evaluates a condition expression for truth.
    pub fn eval_condition(
        &self,
        source: &str,
        ctx: &TemplateContext,
        vars: &BTreeMap<String, String>,
    ) -> Result<bool, TemplateError> {
        let expr = self
            .text
            .compile_expression(source)
            .map_err(|e| TemplateError::Syntax(describe(&e)))?;
        let value = expr
            .eval(Self::base_value(ctx, Some(vars)))
            .map_err(|e| TemplateError::Render(describe(&e)))?;
        Ok(value.is_true())
    }
}

/// Every check of a runbook: the structural ones of `domain::runbook::validate`, then template
/// syntax, `{{ }}` placement, variables referenced but never defined, `steps.<name>` references
/// and conditions. Paths use the document's list positions (0-based).
pub fn validate_runbook(doc: &RunbookDocument) -> Vec<Issue> {
    let mut issues = validate_all(doc);
    // A generated document can break one rule thousands of times: the first ones say what to
    // fix, and the answer stays small.
    if issues.len() > MAX_ISSUES {
        let more = issues.len() - MAX_ISSUES;
        issues.truncate(MAX_ISSUES);
        issues.push(Issue::new(
            "runbook",
            format!("has {more} more problem(s) not listed here; fix these first"),
        ));
    }
    issues
}

/// At most this many validation problems are listed for one runbook.
pub const MAX_ISSUES: usize = 100;

fn validate_all(doc: &RunbookDocument) -> Vec<Issue> {
    let mut issues = validate(doc);
    let renderer = Renderer::new(doc.target_os);
    let var_names: HashSet<&str> = doc.environment_vars.keys().map(String::as_str).collect();

    for (name, source) in &doc.environment_vars {
        let path = format!("environment_vars.{name}");
        match renderer.text.template_from_str(source) {
            Err(e) => issues.push(Issue::new(
                path,
                format!("has a template syntax error: {}", describe(&e)),
            )),
            Ok(tmpl) => {
                for root in sorted(tmpl.undeclared_variables(false)) {
                    if !["alert", "server", "execution"].contains(&root.as_str())
                        && !GLOBAL_FUNCTIONS.contains(&root.as_str())
                    {
                        issues.push(Issue::new(
                            path.clone(),
                            format!(
                                "refers to `{root}`; environment variables may use alert, server and execution only"
                            ),
                        ));
                    }
                }
            }
        }
    }

    // Removed filters fail only when rendered, after a run has begun: name them now.
    let mut sources: Vec<(String, &str, bool)> = doc
        .environment_vars
        .iter()
        .map(|(name, source)| (format!("environment_vars.{name}"), source.as_str(), false))
        .collect();
    for (i, step) in doc.steps.iter().enumerate() {
        // A command already over the rendering limit as written could never run.
        for (field, text) in [
            ("command", Some(step.command.as_str())),
            ("rollback_command", step.rollback_command.as_deref()),
        ] {
            if let Some(text) = text.filter(|t| t.len() > MAX_RENDERED_BYTES) {
                issues.push(Issue::new(
                    format!("steps[{i}].{field}"),
                    format!(
                        "is {} bytes, over the limit of {MAX_RENDERED_BYTES} for a rendered \
                         command; put long scripts in a file on the server",
                        text.len()
                    ),
                ));
            }
        }
        sources.push((format!("steps[{i}].command"), step.command.as_str(), false));
        if let Some(rollback) = &step.rollback_command {
            sources.push((
                format!("steps[{i}].rollback_command"),
                rollback.as_str(),
                false,
            ));
        }
        if let Some(condition) = &step.condition {
            sources.push((format!("steps[{i}].condition"), condition.as_str(), true));
        }
    }
    // Text derived from a secret (a filter, a slice, an expression, a loop over it) no longer
    // matches the secret's value, so it could not be masked where it is stored and streamed:
    // a secret variable, or a sensitive step's captured output, is used only as it is.
    let secret_vars: Vec<&str> = doc
        .environment_vars
        .keys()
        .map(String::as_str)
        .filter(|name| crate::domain::runbook::is_secret_name(name))
        .chain(
            doc.config["secret_vars"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(serde_json::Value::as_str),
        )
        .collect();
    let sensitive_steps: Vec<&str> = doc
        .steps
        .iter()
        .filter(|s| s.sensitive)
        .map(|s| s.name.as_str())
        .collect();
    for (path, source, expression) in &sources {
        if *expression {
            // A condition yields true or false, nothing of the value.
            continue;
        }
        for (output, code) in template_tags(source) {
            // `vars` or `steps` taken whole (aliased, filtered, looped over, parenthesized, or
            // subscripted with a computed key) reaches every value by a name no reading of the
            // code can follow: not in a runbook that has secrets of that kind.
            for (root, has_secrets) in [
                ("vars", !secret_vars.is_empty()),
                ("steps", !sensitive_steps.is_empty()),
            ] {
                if has_secrets && takes_namespace_whole(code, root) {
                    issues.push(Issue::new(
                        path.clone(),
                        format!(
                            "uses `{root}` other than as `{root}.NAME` or `{root}['NAME']` \
                             (`{}`): in a runbook with secrets that could derive text from \
                             one, which could not be masked; name each value",
                            code.trim()
                        ),
                    ));
                }
            }
            let Some(secret) = secret_reference(code, &secret_vars, &sensitive_steps) else {
                continue;
            };
            if !(output && is_plain_reference(code)) {
                issues.push(Issue::new(
                    path.clone(),
                    format!(
                        "derives text from the secret {secret} (`{}`): the result would not \
                         match the secret and could not be masked; use it as it is, \
                         `{{{{ NAME }}}}`",
                        code.trim()
                    ),
                ));
            }
        }
    }

    // So do filters that do not exist at all (a typo, one from another template engine).
    let mut known: std::collections::HashMap<String, bool> = std::collections::HashMap::new();
    for (path, source, expression) in sources {
        for filter in filters_used(source, expression) {
            if REMOVED_FILTERS.contains(&filter.as_str()) {
                issues.push(Issue::new(
                    path.clone(),
                    format!(
                        "uses the `{filter}` filter, which does not exist here: values are quoted \
                         for the shell, and `raw` is the one way to leave a value unquoted"
                    ),
                ));
                break;
            }
            let exists = *known
                .entry(filter.clone())
                .or_insert_with(|| renderer.has_filter(&filter));
            if !exists {
                issues.push(Issue::new(
                    path.clone(),
                    format!("uses the filter `{filter}`, which does not exist"),
                ));
            }
        }
    }

    let mut captured_before: HashSet<&str> = HashSet::new();
    let mut earlier: HashSet<&str> = HashSet::new();
    for (i, step) in doc.steps.iter().enumerate() {
        let scope = Scope {
            vars: &var_names,
            captured: &captured_before,
            earlier: &earlier,
        };
        let commands = [
            ("command", Some(step.command.as_str())),
            ("rollback_command", step.rollback_command.as_deref()),
        ];
        for (field, source) in commands {
            let Some(source) = source else { continue };
            let path = format!("steps[{i}].{field}");
            match renderer.commands.template_from_str(source) {
                Err(e) => issues.push(Issue::new(
                    path,
                    format!(
                        "has a template syntax error in step `{}`: {}",
                        step.name,
                        describe(&e)
                    ),
                )),
                Ok(tmpl) => {
                    if let Err(e) = check_placement(source, renderer.shell) {
                        issues.push(Issue::new(
                            path.clone(),
                            format!("in step `{}`: {e}", step.name),
                        ));
                    }
                    let mut nested = tmpl.undeclared_variables(true);
                    nested.extend(subscripted(source, false));
                    scope.check(
                        &mut issues,
                        &path,
                        &step.name,
                        tmpl.undeclared_variables(false),
                        nested,
                    );
                }
            }
        }
        if let Some(condition) = &step.condition {
            let path = format!("steps[{i}].condition");
            match renderer.text.compile_expression(condition) {
                Err(e) => issues.push(Issue::new(
                    path,
                    format!("does not compile in step `{}`: {}", step.name, describe(&e)),
                )),
                Ok(expr) => {
                    let mut nested = expr.undeclared_variables(true);
                    nested.extend(subscripted(condition, true));
                    scope.check(
                        &mut issues,
                        &path,
                        &step.name,
                        expr.undeclared_variables(false),
                        nested,
                    )
                }
            }
        }
        earlier.insert(step.name.as_str());
        if step.capture_output {
            captured_before.insert(step.name.as_str());
        }
    }
    issues
}

/// The code of a template: what stands inside its `{{ }}` and `{% %}` tags, or for an
/// expression (a condition) the whole source.
fn template_code(source: &str, expression: bool) -> Vec<&str> {
    if expression {
        return vec![source];
    }
    template_tags(source)
        .into_iter()
        .map(|(_, code)| code)
        .collect()
}

/// The tags of a template: whether each writes output (`{{ }}`, not `{% %}`) and its code.
fn template_tags(source: &str) -> Vec<(bool, &str)> {
    let mut out = Vec::new();
    let mut rest = source;
    while let Some(open) = rest.find(['{']) {
        let after = &rest[open..];
        let close = match after.get(..2) {
            Some("{{") => "}}",
            Some("{%") => "%}",
            _ => {
                rest = &after[1..];
                continue;
            }
        };
        let Some(end) = after.find(close) else {
            break;
        };
        out.push((close == "}}", &after[2..end]));
        rest = &after[end + 2..];
    }
    out
}

/// The code with string literals blanked (byte for byte, so positions agree), for names
/// written as names.
fn blank_string_literals(code: &str) -> String {
    let mut bare = String::with_capacity(code.len());
    let mut quote: Option<char> = None;
    let mut escaped = false;
    for c in code.chars() {
        let blank = match quote {
            Some(_) if escaped => {
                escaped = false;
                true
            }
            Some(_) if c == '\\' => {
                escaped = true;
                true
            }
            Some(q) if c == q => {
                quote = None;
                true
            }
            Some(_) => true,
            None if c == '"' || c == '\'' => {
                quote = Some(c);
                true
            }
            None => false,
        };
        if blank {
            bare.push_str(&" ".repeat(c.len_utf8()));
        } else {
            bare.push(c);
        }
    }
    bare
}

/// The secret a tag's code refers to, named for a message: a secret variable (by its name,
/// `vars.NAME` or `vars['NAME']`) or a sensitive step's output (`steps.NAME` other than its
/// `exit_code`). Names inside string literals are not references.
fn secret_reference(code: &str, vars: &[&str], steps: &[&str]) -> Option<String> {
    let bare = blank_string_literals(code);
    let word_at = |text: &str, name: &str| -> bool {
        let re = regex::Regex::new(&format!(
            r"(?:^|[^\w.])(?:vars\s*\.\s*)?{}(?:$|[^\w])",
            regex::escape(name)
        ))
        .expect("valid pattern");
        re.is_match(text)
    };
    let subscript = |text: &str, root: &str, name: &str| -> Option<usize> {
        let re = regex::Regex::new(&format!(
            r#"{root}\s*\[\s*(?:"{0}"|'{0}')\s*\]"#,
            regex::escape(name)
        ))
        .expect("valid pattern");
        re.find(text).map(|m| m.end())
    };
    for name in vars {
        if word_at(&bare, name) || subscript(code, "vars", name).is_some() {
            return Some(format!("variable {name}"));
        }
    }
    for name in steps {
        let dotted = regex::Regex::new(&format!(r"steps\s*\.\s*{}\b", regex::escape(name)))
            .expect("valid pattern");
        let end = dotted
            .find(&bare)
            .map(|m| m.end())
            .or_else(|| subscript(code, "steps", name));
        if let Some(end) = end {
            let rest = code.get(end..).unwrap_or("").trim_start();
            let rest = rest.strip_prefix('.').map(str::trim_start).unwrap_or("");
            if !rest.starts_with("exit_code") {
                return Some(format!("output of the sensitive step {name}"));
            }
        }
    }
    None
}

/// Whether a tag's code uses the namespace `root` (`vars`, `steps`) other than through a
/// name right after it: `root.NAME` or `root['NAME']` with a string literal.
fn takes_namespace_whole(code: &str, root: &str) -> bool {
    let bare = blank_string_literals(code);
    let at = regex::Regex::new(&format!(r"(?:^|[^\w.]){}\b", regex::escape(root)))
        .expect("valid pattern");
    static NAMED: std::sync::LazyLock<regex::Regex> = std::sync::LazyLock::new(|| {
        regex::Regex::new(r#"^\s*(?:\.\s*[A-Za-z_]\w*|\[\s*(?:"[^"]*"|'[^']*')\s*\])"#)
            .expect("valid pattern")
    });
    at.find_iter(&bare)
        .any(|m| !NAMED.is_match(code.get(m.end()..).unwrap_or("")))
}

/// Whether a tag's code is one plain reference, optionally through `raw` or `trim` (a secret's
/// trimmed form is masked too): `NAME`, `vars.NAME`, `vars['NAME']`, `steps.NAME.stdout`,
/// `steps['NAME'].stderr | trim`.
fn is_plain_reference(code: &str) -> bool {
    static PLAIN: std::sync::LazyLock<regex::Regex> = std::sync::LazyLock::new(|| {
        regex::Regex::new(
            r#"^\s*(?:(?:vars\s*\.\s*)?[A-Za-z_]\w*|vars\s*\[\s*(?:"[^"]*"|'[^']*')\s*\]|steps\s*(?:\.\s*[A-Za-z_]\w*|\[\s*(?:"[^"]*"|'[^']*')\s*\])\s*\.\s*(?:stdout|stderr))(?:\s*\|\s*(?:raw|trim))*\s*$"#,
        )
        .expect("valid pattern")
    });
    PLAIN.is_match(code)
}

/// The filter names a template applies (`| name`), outside string literals.
fn filters_used(source: &str, expression: bool) -> Vec<String> {
    let mut out = Vec::new();
    for text in template_code(source, expression) {
        // String literals may hold `|`: leave them out.
        let mut code = String::with_capacity(text.len());
        let mut quote: Option<char> = None;
        let mut chars = text.chars();
        while let Some(c) = chars.next() {
            match quote {
                Some(_) if c == '\\' => {
                    chars.next();
                }
                Some(q) if c == q => quote = None,
                Some(_) => {}
                None if c == '"' || c == '\'' => quote = Some(c),
                None => code.push(c),
            }
        }
        for after in code.split('|').skip(1) {
            let name: String = after
                .trim_start()
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            if !name.is_empty() && !out.contains(&name) {
                out.push(name);
            }
        }
    }
    out
}

/// `steps.NAME` and `vars.NAME` for each subscript by a string literal (`steps["NAME"]`,
/// `vars['NAME']`) in a template's code: the same references as the dotted form, which the
/// template engine's list of variables a template reads does not name.
fn subscripted(source: &str, expression: bool) -> HashSet<String> {
    static SUBSCRIPT: std::sync::LazyLock<regex::Regex> = std::sync::LazyLock::new(|| {
        regex::Regex::new(r#"(?:^|[^\w.])(steps|vars)\s*\[\s*(?:"([^"\\]*)"|'([^'\\]*)')\s*\]"#)
            .expect("valid pattern")
    });
    let mut out = HashSet::new();
    for code in template_code(source, expression) {
        for c in SUBSCRIPT.captures_iter(code) {
            let name = c.get(2).or_else(|| c.get(3)).map_or("", |m| m.as_str());
            out.insert(format!("{}.{name}", &c[1]));
        }
    }
    out
}

fn sorted(set: HashSet<String>) -> Vec<String> {
    let mut v: Vec<String> = set.into_iter().collect();
    v.sort();
    v
}

struct Scope<'a> {
    vars: &'a HashSet<&'a str>,
    captured: &'a HashSet<&'a str>,
    earlier: &'a HashSet<&'a str>,
}

impl Scope<'_> {
    fn check(
        &self,
        issues: &mut Vec<Issue>,
        path: &str,
        step: &str,
        roots: HashSet<String>,
        nested: HashSet<String>,
    ) {
        for root in sorted(roots) {
            let known = ["alert", "server", "execution", "steps", "vars"].contains(&root.as_str())
                || GLOBAL_FUNCTIONS.contains(&root.as_str())
                || self.vars.contains(root.as_str());
            if !known {
                issues.push(Issue::new(
                    path,
                    format!(
                        "in step `{step}` refers to `{root}`, which is never defined (define it in environment_vars)"
                    ),
                ));
            }
        }
        for dotted in sorted(nested) {
            let mut parts = dotted.split('.');
            match (parts.next(), parts.next()) {
                (Some("vars"), Some(name)) if !self.vars.contains(name) => issues.push(Issue::new(
                    path,
                    format!(
                        "in step `{step}` refers to `vars.{name}`, which is never defined in environment_vars"
                    ),
                )),
                (Some("steps"), Some(name)) if !self.captured.contains(name) => {
                    let why = if self.earlier.contains(name) {
                        "that step does not set capture_output: true"
                    } else {
                        "no earlier step has that name"
                    };
                    issues.push(Issue::new(
                        path,
                        format!("in step `{step}` refers to `steps.{name}`, but {why}"),
                    ));
                }
                _ => {}
            }
        }
    }
}

/// A condition's outcome in a dry run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConditionOutcome {
    /// The expression.
    pub expression: String,
    /// Its value, or why it could not be evaluated.
    pub result: Result<bool, String>,
}

/// One step as a dry run renders it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RenderedStep {
    /// Step order.
    pub order: i32,
    /// Step name.
    pub name: String,
    /// The condition, when the step has one.
    pub condition: Option<ConditionOutcome>,
    /// The command as it would run, or why it cannot be rendered.
    pub command: Result<String, String>,
    /// The rollback command, when the step has one.
    pub rollback_command: Option<Result<String, String>>,
}

/// A whole runbook rendered without running anything.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RenderedRunbook {
    /// The environment variables, or the first that failed.
    pub vars: Result<BTreeMap<String, String>, String>,
    /// Every step in order.
    pub steps: Vec<RenderedStep>,
}

/// Renders every step of a runbook for a dry run. Earlier captured steps have not run, so
/// `steps.<name>.stdout` is the placeholder `<stdout of step NAME>` and `exit_code` is 0.
pub fn render_dry_run(doc: &RunbookDocument, ctx: &TemplateContext) -> RenderedRunbook {
    let renderer = Renderer::new(doc.target_os);
    let canonical = crate::domain::runbook::canonicalize(doc);
    let vars = renderer
        .render_vars(&doc.environment_vars, ctx)
        .map_err(|(name, e)| format!("environment_vars.{name}: {e}"));
    let vars_or_empty = vars.clone().unwrap_or_default();
    let mut ctx = ctx.clone();
    let mut steps = Vec::new();
    for (i, step) in canonical.steps.iter().enumerate() {
        let render = |source: &str| {
            renderer
                .render_command(source, &ctx, &vars_or_empty)
                .map_err(|e| e.to_string())
        };
        steps.push(RenderedStep {
            order: step.effective_order(i),
            name: step.name.clone(),
            condition: step.condition.as_ref().map(|c| ConditionOutcome {
                expression: c.clone(),
                result: renderer
                    .eval_condition(c, &ctx, &vars_or_empty)
                    .map_err(|e| e.to_string()),
            }),
            command: render(&step.command),
            rollback_command: step.rollback_command.as_deref().map(render),
        });
        if step.capture_output {
            ctx.steps.insert(
                step.name.clone(),
                StepOutput {
                    stdout: format!("<stdout of step {}>", step.name),
                    stderr: String::new(),
                    exit_code: 0,
                },
            );
        }
    }
    RenderedRunbook { vars, steps }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::runbook::parse_yaml;

    fn ctx() -> TemplateContext {
        TemplateContext {
            alert: serde_json::json!({
                "name": "NodeDown",
                "labels": {"service": "nginx", "evil": "$(id)", "n": 5},
            }),
            server: serde_json::json!({"hostname": "web-1"}),
            ..Default::default()
        }
    }

    /// Commands whose template text hides where a value lands: a string literal holding `}}`,
    /// a `{% raw %}` block, text that forms `$((` or a heredoc only once rendered, a nested
    /// substitution inside double quotes, a value right after `\` or `$`, bash's `((` and
    /// `[[`. Whatever the validation scan saw, none of them renders for running.
    #[test]
    fn a_value_that_would_not_stay_plain_text_as_rendered_never_runs() {
        let r = Renderer::new(TargetOs::Linux);
        let vars = BTreeMap::from([("X".to_owned(), "$(touch /tmp/pwned)".to_owned())]);
        for source in [
            "echo {{ \"}}'\" }}' {{ X }} '",
            "echo {% raw %}{{ ' }}{% endraw %} {{ X }} '",
            "echo \\{{ X }}",
            "echo $({% if true %}({% endif %} {{ X }} ))",
            "cat <{% if true %}<{% endif %}EOF\n{{ X }}\nEOF",
            "echo \"$(echo \" {{ X }} \")\"",
            "echo ${{ X }}",
            "if(( {{ X }} > 1 )); then echo big; fi",
            "[[ {{ X }} -eq 1 ]] && echo one",
        ] {
            let e = r.render_command(source, &ctx(), &vars).unwrap_err();
            assert!(matches!(e, TemplateError::Placement(_)), "{source}: {e}");
        }
        // The template scan itself sees through these.
        for source in [
            "echo {{ \"}}'\" }}' {{ X }} '",
            "echo \\{{ X }}",
            "echo \"$(echo \" {{ X }} \")\"",
            "echo ${{ X }}",
            "if(( {{ X }} > 1 )); then echo big; fi",
        ] {
            assert!(check_placement(source, Shell::Posix).is_err(), "{source}");
        }
        // Values inside command substitutions, inside double quotes or not, are plain words.
        for source in [
            "echo \"$(date)\" {{ X }}",
            "echo $(echo {{ X }})",
            "echo \"$(printf '%s' {{ X }})\" done",
            "echo {{ X }}\"$(date)\"",
        ] {
            assert!(check_placement(source, Shell::Posix).is_ok(), "{source}");
            let out = r.render_command(source, &ctx(), &vars).unwrap();
            assert!(out.contains("'$(touch /tmp/pwned)'"), "{source}: {out}");
        }
    }

    #[test]
    fn values_are_quoted_by_default() {
        let r = Renderer::new(TargetOs::Linux);
        let vars = BTreeMap::new();
        let out = r
            .render_command(
                "echo {{ alert.labels.evil }} {{ alert.labels.service }} {{ alert.labels.n }}",
                &ctx(),
                &vars,
            )
            .unwrap();
        assert_eq!(out, "echo '$(id)' nginx 5");
        let out = r
            .render_command(
                "{% autoescape false %}echo {{ alert.labels.evil }}{% endautoescape %}",
                &ctx(),
                &vars,
            )
            .unwrap();
        assert_eq!(
            out, "echo '$(id)'",
            "autoescape blocks cannot disable quoting"
        );
        let out = r
            .render_command("{% set x %}$(id) {% endset %}echo {{ x }}", &ctx(), &vars)
            .unwrap();
        assert_eq!(
            out, "echo '$(id) '",
            "captured blocks (safe strings) are still quoted"
        );
    }

    #[test]
    fn raw_is_the_only_opt_out() {
        let r = Renderer::new(TargetOs::Linux);
        let out = r
            .render_command(
                "ls {{ '-la --color=never' | raw }}",
                &ctx(),
                &BTreeMap::new(),
            )
            .unwrap();
        assert_eq!(out, "ls -la --color=never");
        for removed in ["safe", "escape", "e"] {
            let err = r
                .render_command(
                    &format!("echo {{{{ alert.name | {removed} }}}}"),
                    &ctx(),
                    &BTreeMap::new(),
                )
                .unwrap_err();
            assert!(
                matches!(err, TemplateError::Syntax(_) | TemplateError::Render(_)),
                "{removed}"
            );
        }
    }

    #[test]
    fn powershell_targets_get_powershell_quoting() {
        let r = Renderer::new(TargetOs::Windows);
        let out = r
            .render_command(
                "Restart-Service -Name {{ alert.labels.evil }}",
                &ctx(),
                &BTreeMap::new(),
            )
            .unwrap();
        assert_eq!(out, "Restart-Service -Name '$(id)'");
    }

    #[test]
    fn strict_undefined_and_fuel() {
        let r = Renderer::new(TargetOs::Linux);
        let err = r
            .render_command("echo {{ alert.labels.missing }}", &ctx(), &BTreeMap::new())
            .unwrap_err();
        assert!(matches!(err, TemplateError::Render(_)), "{err:?}");
        let err = r
            .render_command(
                "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
                &ctx(),
                &BTreeMap::new(),
            )
            .unwrap_err();
        assert!(err.to_string().contains("fuel"), "{err}");
    }

    #[test]
    fn vars_render_as_text_and_are_quoted_in_commands() {
        let r = Renderer::new(TargetOs::Linux);
        let vars: BTreeMap<String, String> =
            [("SVC".to_owned(), "{{ alert.labels.evil }}-x".to_owned())].into();
        let rendered = r.render_vars(&vars, &ctx()).unwrap();
        assert_eq!(rendered["SVC"], "$(id)-x");
        let out = r
            .render_command("echo {{ SVC }} {{ vars.SVC }}", &ctx(), &rendered)
            .unwrap();
        assert_eq!(out, "echo '$(id)-x' '$(id)-x'");
    }

    #[test]
    fn conditions_evaluate() {
        let r = Renderer::new(TargetOs::Linux);
        let vars = BTreeMap::new();
        assert!(
            r.eval_condition("alert.labels.service == 'nginx'", &ctx(), &vars)
                .unwrap()
        );
        assert!(
            !r.eval_condition("alert.labels.n > 10", &ctx(), &vars)
                .unwrap()
        );
        assert!(
            r.eval_condition("alert.labels.nope is defined", &ctx(), &vars)
                .is_ok()
        );
        // Variables are text: numbers compare through `int` (as the README says).
        let vars: BTreeMap<String, String> = [
            ("DISK_PCT".to_owned(), "95".to_owned()),
            ("LIMIT".to_owned(), "100".to_owned()),
        ]
        .into();
        assert!(r.eval_condition("DISK_PCT > LIMIT", &ctx(), &vars).unwrap());
        assert!(
            !r.eval_condition("DISK_PCT | int > LIMIT | int", &ctx(), &vars)
                .unwrap()
        );
        assert!(
            r.eval_condition("vars.DISK_PCT | int > 90", &ctx(), &vars)
                .unwrap()
        );
    }

    fn issues(yaml: &str) -> Vec<String> {
        validate_runbook(&parse_yaml(yaml).unwrap())
            .iter()
            .map(ToString::to_string)
            .collect()
    }

    #[test]
    fn text_derived_from_a_secret_is_refused_at_validation() {
        let doc = |command: &str| {
            format!(
                "name: x\nconfig:\n  secret_vars: [DEPLOY_KEY]\nenvironment_vars:\n  API_TOKEN: set-at-start\n  \
                 DEPLOY_KEY: set-at-start\n  SERVICE: web\nsteps:\n  - name: sens\n    command: cat /etc/key\n    \
                 sensitive: true\n    capture_output: true\n  - name: use\n    command: {command}\n    \
                 condition: API_TOKEN | length > 3 and steps.sens.stdout | lower != 'x'\n"
            )
        };
        // Filters, slices, loops and expressions over a secret or a sensitive step's output.
        for command in [
            "echo {{ API_TOKEN | lower }}",
            "echo {{ API_TOKEN | reverse }}",
            "echo {{ API_TOKEN[1:] }}",
            "echo {{ vars.API_TOKEN | replace('e', '3') }}",
            "echo {{ vars['DEPLOY_KEY'] | title }}",
            "echo {{ DEPLOY_KEY ~ 'x' }}",
            "echo {% for c in API_TOKEN %}{{ c }} {% endfor %}",
            "echo {{ steps.sens.stdout | upper }}",
            "echo {{ steps['sens'].stdout[2:] }}",
        ] {
            let found = issues(&doc(command));
            assert!(
                found
                    .iter()
                    .any(|i| i.starts_with("steps[1].command derives text from the secret")),
                "{command}: {found:?}"
            );
        }
        // Used as they are (and in conditions, which yield only true or false): fine. So are
        // the names inside string literals, and a sensitive step's exit code.
        for command in [
            "echo {{ API_TOKEN }} {{ vars.DEPLOY_KEY }} {{ vars['API_TOKEN'] }}",
            "echo {{ steps.sens.stdout | trim }} {{ steps['sens'].stderr | raw }}",
            "echo {{ SERVICE | upper }} {{ 'API_TOKEN' | lower }} {{ steps.sens.exit_code + 1 }}",
        ] {
            let found = issues(&doc(command));
            assert!(found.is_empty(), "{command}: {found:?}");
        }
        // `vars` or `steps` taken whole reaches a secret by a name the code does not spell.
        for (command, root) in [
            ("echo {{ (vars).API_TOKEN | upper }}", "vars"),
            (
                "echo; {% set v = vars %}echo {{ v.API_TOKEN | reverse }}",
                "vars",
            ),
            ("echo {{ vars['API_' ~ 'TOKEN'] | reverse }}", "vars"),
            ("echo {{ vars | items | map('last') | join('-') }}", "vars"),
            ("echo {{ vars | dictsort | list | string | upper }}", "vars"),
            ("echo {{ vars|attr('API_TOKEN') }}", "vars"),
            ("echo {{ (steps).sens.stdout | upper }}", "steps"),
            ("echo {% for s in steps %}{{ s }}{% endfor %}", "steps"),
        ] {
            let found = issues(&doc(command));
            let expected = format!("steps[1].command uses `{root}` other than as");
            assert!(
                found.iter().any(|i| i.starts_with(&expected)),
                "{command}: {found:?}"
            );
        }
        // Without secrets of that kind, the namespace may be used whole.
        let found = issues(
            "name: x\nenvironment_vars:\n  SERVICE: web\nsteps:\n  - name: a\n    \
             command: echo {{ vars | length }} {{ (vars).SERVICE }}\n",
        );
        assert!(found.is_empty(), "{found:?}");
    }

    #[test]
    fn a_command_over_the_rendering_limit_is_refused_at_validation() {
        let long = format!("echo {}", "x".repeat(MAX_RENDERED_BYTES));
        let found = issues(&format!(
            "name: x\nsteps:\n  - name: a\n    command: {long}\n    rollback_command: echo ok\n"
        ));
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(
            found[0].starts_with(&format!(
                "steps[0].command is {} bytes, over the limit of {MAX_RENDERED_BYTES}",
                long.len()
            )),
            "{found:?}"
        );
    }

    #[test]
    fn removed_filters_are_named_at_validation() {
        let found = issues(
            "name: x\nenvironment_vars:\n  A: \"{{ alert.name | e }}\"\nsteps:\n  - name: a\n    command: echo {{ alert.name | safe }}\n    rollback_command: echo {% if x | escape %}y{% endif %}\n    condition: alert.name|safe == 'x'\n",
        );
        for path in [
            "environment_vars.A uses the `e` filter",
            "steps[0].command uses the `safe` filter",
            "steps[0].rollback_command uses the `escape` filter",
            "steps[0].condition uses the `safe` filter",
        ] {
            assert!(
                found.iter().any(|i| i.starts_with(path)),
                "{path}: {found:?}"
            );
        }
        // `raw`, `upper`, a filter whose name only starts like one, and `|` in the shell: fine.
        let fine = issues(
            "name: x\nsteps:\n  - name: a\n    command: echo {{ alert.name | raw }} {{ alert.name | upper | escape_free | default('x') }} | grep e\n",
        );
        assert!(
            !fine.iter().any(|i| i.contains("filter, which")),
            "{fine:?}"
        );
    }

    #[test]
    fn a_document_that_breaks_a_rule_many_times_gets_a_short_list() {
        let zeros = vec!["0"; 151].join(", ");
        let found = issues(&format!(
            "name: x\nsteps:\n  - name: a\n    command: 'true'\n    expected_exit_codes: [{zeros}]\n"
        ));
        assert_eq!(found.len(), MAX_ISSUES + 1, "{}", found.len());
        assert_eq!(
            found.last().unwrap(),
            "runbook has 50 more problem(s) not listed here; fix these first"
        );
    }

    #[test]
    fn unknown_filters_are_named_at_validation() {
        let found = issues(
            "name: x\nsteps:\n  - name: a\n    command: echo {{ alert.name | nosuchfilter }} {{ alert.labels | tojson }}\n    condition: alert.name | lenght > 3\n",
        );
        for expected in [
            "steps[0].command uses the filter `nosuchfilter`, which does not exist",
            "steps[0].command uses the filter `tojson`, which does not exist",
            "steps[0].condition uses the filter `lenght`, which does not exist",
        ] {
            assert!(found.iter().any(|i| i == expected), "{expected}: {found:?}");
        }
        // Real filters, with arguments or not, and `|` inside string literals: fine.
        let fine = issues(
            "name: x\nsteps:\n  - name: a\n    command: echo {{ alert.name | replace('|', '-') | trim | default(\"a|b\") }}\n    condition: alert.name | length > 3\n",
        );
        assert!(
            !fine.iter().any(|i| i.contains("does not exist")),
            "{fine:?}"
        );
    }

    #[test]
    fn template_validation_names_the_step() {
        let found = issues("name: x\nsteps:\n  - name: broken\n    command: echo {{ alert.name \n");
        assert!(
            found[0].starts_with("steps[0].command has a template syntax error in step `broken`"),
            "{found:?}"
        );
        let found =
            issues("name: x\nsteps:\n  - name: q\n    command: echo \"{{ alert.name }}\"\n");
        assert!(found[0].contains("inside double quotes"), "{found:?}");
        let found = issues(
            "name: x\nsteps:\n  - name: u\n    command: echo {{ SERVICE }} {{ vars.OTHER }}\n",
        );
        assert_eq!(found.len(), 2, "{found:?}");
        assert!(
            found[0].contains("refers to `SERVICE`, which is never defined"),
            "{found:?}"
        );
        assert!(found[1].contains("`vars.OTHER`"), "{found:?}");
        let found = issues(
            "name: x\nsteps:\n  - name: c\n    command: 'true'\n    condition: alert.name ==\n",
        );
        assert!(
            found[0].starts_with("steps[0].condition does not compile in step `c`"),
            "{found:?}"
        );
        let found = issues(
            "name: x\nsteps:\n  - name: a\n    command: 'true'\n  - name: b\n    command: echo {{ steps.a.stdout }}\n",
        );
        assert!(
            found[0].contains("does not set capture_output"),
            "{found:?}"
        );
        // A subscript by name is the same reference as the dotted form.
        let found = issues(
            "name: x\nenvironment_vars:\n  V: v\nsteps:\n  - name: a\n    command: 'true'\n    capture_output: true\n  - name: b\n    command: echo {{ steps['a'].stdout }} {{ steps[\"ghost\"].stdout }} {{ vars['V'] }} {{ vars[\"W\"] }}\n    condition: steps[\"gone\"].exit_code == 0\n",
        );
        assert_eq!(found.len(), 3, "{found:?}");
        assert!(
            found[0].contains("refers to `steps.ghost`, but no earlier step has that name"),
            "{found:?}"
        );
        assert!(found[1].contains("`vars.W`"), "{found:?}");
        assert!(
            found[2].starts_with("steps[1].condition") && found[2].contains("`steps.gone`"),
            "{found:?}"
        );
        let found = issues(
            "name: x\nenvironment_vars:\n  A: '{{ vars.B }}'\nsteps:\n  - name: a\n    command: 'true'\n",
        );
        assert!(
            found[0].starts_with("environment_vars.A refers to `vars`"),
            "{found:?}"
        );
    }

    #[test]
    fn dry_run_renders_with_placeholders() {
        let doc = parse_yaml(
            "name: x\nenvironment_vars:\n  SVC: '{{ alert.labels.service }}'\nsteps:\n  - name: check\n    command: systemctl is-active -- {{ SVC }}\n    capture_output: true\n  - name: restart\n    condition: steps.check.stdout != 'active'\n    command: systemctl restart -- {{ SVC }}\n    rollback_command: systemctl stop -- {{ SVC }}\n",
        )
        .unwrap();
        assert!(
            validate_runbook(&doc).is_empty(),
            "{:?}",
            validate_runbook(&doc)
        );
        let out = render_dry_run(&doc, &ctx());
        assert_eq!(
            out.steps[0].command,
            Ok("systemctl is-active -- nginx".into())
        );
        assert_eq!(out.steps[1].condition.as_ref().unwrap().result, Ok(true));
        assert_eq!(
            out.steps[1].rollback_command,
            Some(Ok("systemctl stop -- nginx".into()))
        );
    }
}
