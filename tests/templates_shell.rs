//! Hostile alert values through real command templates, run by a real `/bin/sh`: each value must
//! arrive as exactly one argument, byte for byte, and nothing in it may run.

mod common;

use std::collections::BTreeMap;
use std::process::Command;

use aiops::domain::runbook::{TargetOs, parse_yaml};
use aiops::templates::{Renderer, TemplateContext, validate_runbook};
use serde_json::json;

const HOSTILE: &[&str] = &[
    "$(id)",
    "`id`",
    "; touch /tmp/aiops-pwned",
    "&& echo pwned",
    "| cat /etc/passwd",
    "> /tmp/aiops-pwned",
    "'",
    "\"",
    "it's \"both\" kinds",
    "'\\''",
    "a\nb",
    "line\n$(id)\n'",
    "trailing newline\n",
    "--option",
    "-n",
    "-e",
    "--",
    "ünïcødé ✓ 日本語 \u{2019}quote\u{2019}",
    "",
    " leading and trailing ",
    "*",
    "~root",
    "$HOME ${PATH} $1 $@",
    "\\",
    "tab\there",
    "!!",
    "a=b",
    "{{ alert.name }}",
    "{% raw %}",
    "\u{1b}[31mred",
];

/// Runs a command line under `/bin/sh -c` and splits its stdout on NUL.
fn run_sh(command: &str) -> Vec<String> {
    let out = Command::new("/bin/sh")
        .arg("-c")
        .arg(command)
        .output()
        .expect("run /bin/sh");
    assert!(
        out.status.success(),
        "sh failed for {command:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).expect("utf-8 output");
    let mut parts: Vec<String> = stdout.split('\0').map(str::to_owned).collect();
    assert_eq!(parts.pop().as_deref(), Some(""), "output ends with NUL");
    parts
}

fn context(value: &str) -> TemplateContext {
    TemplateContext {
        alert: json!({
            "name": "HostileAlert",
            "labels": {"x": value, "y": "second"},
            "annotations": {"summary": value},
        }),
        server: json!({"hostname": value}),
        ..Default::default()
    }
}

#[test]
fn each_hostile_value_arrives_as_one_literal_argument() {
    let renderer = Renderer::new(TargetOs::Linux);
    let vars = BTreeMap::new();
    for value in HOSTILE {
        let ctx = context(value);
        let command = renderer
            .render_command("printf '%s\\0' {{ alert.labels.x }}", &ctx, &vars)
            .unwrap();
        assert_eq!(run_sh(&command), vec![value.to_string()], "via {command:?}");

        // Several values on one line stay separate, and neighbours are not disturbed.
        let command = renderer
            .render_command(
                "printf '%s\\0' {{ alert.labels.x }} {{ alert.labels.y }} {{ server.hostname }}{{ alert.annotations.summary }}",
                &ctx,
                &vars,
            )
            .unwrap();
        assert_eq!(
            run_sh(&command),
            vec![
                value.to_string(),
                "second".to_owned(),
                format!("{value}{value}")
            ],
            "via {command:?}"
        );
    }
    assert!(
        !std::path::Path::new("/tmp/aiops-pwned").exists(),
        "a hostile value ran a command"
    );
}

#[test]
fn environment_vars_carry_hostile_values_safely() {
    let doc = parse_yaml(
        "name: hostile\nenvironment_vars:\n  TARGET: '{{ alert.labels.x }}'\n  COMBINED: 'svc-{{ alert.labels.x }}'\nsteps:\n  - name: show\n    command: printf '%s\\0' {{ TARGET }} {{ vars.COMBINED }}\n",
    )
    .unwrap();
    assert!(
        validate_runbook(&doc).is_empty(),
        "{:?}",
        validate_runbook(&doc)
    );
    let renderer = Renderer::new(TargetOs::Linux);
    for value in HOSTILE {
        let ctx = context(value);
        let vars = renderer.render_vars(&doc.environment_vars, &ctx).unwrap();
        let command = renderer
            .render_command(&doc.steps[0].command, &ctx, &vars)
            .unwrap();
        assert_eq!(
            run_sh(&command),
            vec![value.to_string(), format!("svc-{value}")],
            "via {command:?}"
        );
    }
}

#[test]
fn raw_opt_in_is_unquoted_and_quoted_contexts_are_refused() {
    let renderer = Renderer::new(TargetOs::Linux);
    let ctx = context("x");
    let command = renderer
        .render_command(
            "printf '%s\\0' {{ 'a b' | raw }} {{ 'a b' }}",
            &ctx,
            &BTreeMap::new(),
        )
        .unwrap();
    assert_eq!(run_sh(&command), vec!["a", "b", "a b"]);

    // The placements quoting cannot protect are refused before anything renders.
    for command in [
        "printf '%s\\0' \"{{ alert.labels.x }}\"",
        "printf '%s\\0' '{{ alert.labels.x }}'",
        "echo ok # {{ alert.labels.x }}",
        "cat <<EOF\n{{ alert.labels.x }}\nEOF",
    ] {
        let doc = parse_yaml(&format!(
            "name: placed\nsteps:\n  - name: s\n    command: {}\n",
            serde_json::to_string(command).unwrap()
        ))
        .unwrap();
        let issues = validate_runbook(&doc);
        assert_eq!(issues.len(), 1, "{command}: {issues:?}");
        assert!(issues[0].message.contains("inside"), "{issues:?}");
    }
}

#[test]
fn nul_bytes_are_refused_not_truncated() {
    let renderer = Renderer::new(TargetOs::Linux);
    let err = renderer
        .render_command(
            "printf '%s\\0' {{ alert.labels.x }}",
            &context("a\0b"),
            &BTreeMap::new(),
        )
        .unwrap_err();
    assert!(err.to_string().contains("NUL"), "{err}");
}
