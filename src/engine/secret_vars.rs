//! Secret variables at rest. A variable is secret when its name looks like one (`password`,
//! `token`, ...: [`is_secret_name`]) or the runbook lists it in `config.secret_vars`. Its value is
//! never stored in plaintext: `context_vars` keeps the name with [`MASK`], and
//! `runbook_executions.secret_vars_encrypted` holds one envelope (AES-256-GCM, bound to the
//! execution's row and that column) of a JSON object of every secret value. Only the worker
//! running the steps opens it, in memory; the values then reach the command's environment and
//! templates and are masked in everything stored or streamed.

use std::collections::BTreeMap;

use serde_json::{Map, Value};
use uuid::Uuid;

use super::EngineError;
use super::masking::{MASK, is_secret_name};
use super::snapshot::RunbookSnapshot;
use crate::crypto::secrets::{Keyring, SecretSlot};

fn slot(execution_id: Uuid) -> SecretSlot<'static> {
    SecretSlot {
        table: "runbook_executions",
        row_id: execution_id,
        column: "secret_vars_encrypted",
    }
}

/// A masker for text a user writes about an execution (a cancel or reject reason), which is
/// stored and audited: the runbook's secret variables as written and the execution's sealed
/// ones (when `keyring` opens them; otherwise only the former).
pub fn reason_masker(
    row: &crate::store::executions::ExecutionRow,
    keyring: Option<&Keyring>,
) -> super::masking::Masker {
    let mut secrets: Vec<String> = Vec::new();
    if let Ok(snapshot) = super::control::snapshot_of(row) {
        secrets.extend(
            snapshot
                .environment_vars
                .iter()
                .filter(|(name, _)| is_secret_var(&snapshot, name))
                .map(|(_, value)| value.clone()),
        );
    }
    if let Ok(sealed) = open(row.id, row.secret_vars_encrypted.as_deref(), keyring) {
        secrets.extend(sealed.into_values());
    }
    super::masking::Masker::new(secrets)
}

/// Whether `name` is a secret variable of this runbook.
pub fn is_secret_var(snapshot: &RunbookSnapshot, name: &str) -> bool {
    is_secret_name(name) || snapshot.secret_var_names().iter().any(|n| n == name)
}

/// A variable's value as a command sees it: strings as they are, anything else as JSON text.
pub fn value_text(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Splits an execution's variables into what `context_vars` stores (secret values replaced by
/// [`MASK`]) and the envelope of the secret values (`None` when there are none). Secret values
/// without a configured key are refused, naming the variable.
pub fn seal(
    execution_id: Uuid,
    snapshot: &RunbookSnapshot,
    variables: &Map<String, Value>,
    keyring: Option<&Keyring>,
) -> Result<(Map<String, Value>, Option<String>), EngineError> {
    let mut stored = Map::new();
    let mut secrets = Map::new();
    for (name, value) in variables {
        if is_secret_var(snapshot, name) {
            secrets.insert(name.clone(), value.clone());
            stored.insert(name.clone(), Value::String(MASK.to_owned()));
        } else {
            stored.insert(name.clone(), value.clone());
        }
    }
    if secrets.is_empty() {
        return Ok((stored, None));
    }
    let Some(keyring) = keyring else {
        let name = secrets.keys().next().cloned().unwrap_or_default();
        return Err(EngineError::Invalid {
            field: format!("variables.{name}"),
            reason: "secret variables are stored encrypted, and no secret key is configured \
                     (AIOPS_SECRET_KEY or AIOPS_SECRET_KEY_FILE)"
                .into(),
        });
    };
    let envelope = keyring
        .seal_str(slot(execution_id), &Value::Object(secrets).to_string())
        .map_err(|e| EngineError::Invalid {
            field: "variables".into(),
            reason: e.to_string(),
        })?;
    Ok((stored, Some(envelope)))
}

/// Opens an execution's secret variables (empty when it has none).
pub fn open(
    execution_id: Uuid,
    envelope: Option<&str>,
    keyring: Option<&Keyring>,
) -> Result<BTreeMap<String, String>, String> {
    let Some(envelope) = envelope else {
        return Ok(BTreeMap::new());
    };
    let keyring = keyring.ok_or_else(|| {
        "the execution has secret variables and this worker has no secret key configured \
         (AIOPS_SECRET_KEY or AIOPS_SECRET_KEY_FILE)"
            .to_owned()
    })?;
    let text = keyring
        .open_str(slot(execution_id), envelope)
        .map_err(|e| format!("secret variables: {e}"))?;
    let Ok(Value::Object(map)) = serde_json::from_str::<Value>(&text) else {
        return Err("secret variables: the opened envelope is not a JSON object".to_owned());
    };
    Ok(map
        .iter()
        .map(|(k, v)| (k.clone(), value_text(v)))
        .collect())
}

/// Seals the captured output of a `sensitive` step (stored in `step_executions.output_encrypted`
/// of its attempt row `step_row`; stdout and stderr keep only a mask).
pub fn seal_step_output(
    keyring: &Keyring,
    step_row: Uuid,
    stdout: &str,
    stderr: &str,
) -> Result<String, String> {
    keyring
        .seal_str(
            SecretSlot {
                table: "step_executions",
                row_id: step_row,
                column: "output_encrypted",
            },
            &serde_json::json!({ "stdout": stdout, "stderr": stderr }).to_string(),
        )
        .map_err(|e| e.to_string())
}

/// Opens what [`seal_step_output`] sealed: (stdout, stderr).
pub fn open_step_output(
    keyring: Option<&Keyring>,
    step_row: Uuid,
    envelope: &str,
) -> Result<(String, String), String> {
    let keyring = keyring.ok_or_else(|| {
        "a sensitive step's captured output is sealed and this worker has no secret key".to_owned()
    })?;
    let text = keyring
        .open_str(
            SecretSlot {
                table: "step_executions",
                row_id: step_row,
                column: "output_encrypted",
            },
            envelope,
        )
        .map_err(|e| format!("captured output: {e}"))?;
    let value: Value = serde_json::from_str(&text).map_err(|e| format!("captured output: {e}"))?;
    let field = |name: &str| value[name].as_str().unwrap_or_default().to_owned();
    Ok((field("stdout"), field("stderr")))
}
