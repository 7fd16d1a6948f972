//! Every `*_encrypted` column, for key rotation: find envelopes not sealed under the current
//! key, and read-lock-rewrite them one row at a time. The envelopes are opaque text here.

use sqlx::PgConnection;
use uuid::Uuid;

use super::StoreResult;

/// One encrypted column of one table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SecretColumn {
    /// `server_credentials.ssh_key_encrypted`.
    ServerSshKey,
    /// `server_credentials.password_encrypted`.
    ServerPassword,
    /// `llm_providers.api_key_encrypted`.
    LlmApiKey,
    /// `runbook_executions.secret_vars_encrypted`.
    ExecutionSecretVars,
    /// `step_executions.output_encrypted`.
    StepOutput,
}

impl SecretColumn {
    /// Every encrypted column in the schema.
    pub const ALL: [SecretColumn; 5] = [
        SecretColumn::ServerSshKey,
        SecretColumn::ServerPassword,
        SecretColumn::LlmApiKey,
        SecretColumn::ExecutionSecretVars,
        SecretColumn::StepOutput,
    ];

    /// (table, column), which is also the associated data the envelope is bound to.
    pub fn names(self) -> (&'static str, &'static str) {
        match self {
            SecretColumn::ServerSshKey => ("server_credentials", "ssh_key_encrypted"),
            SecretColumn::ServerPassword => ("server_credentials", "password_encrypted"),
            SecretColumn::LlmApiKey => ("llm_providers", "api_key_encrypted"),
            SecretColumn::ExecutionSecretVars => ("runbook_executions", "secret_vars_encrypted"),
            SecretColumn::StepOutput => ("step_executions", "output_encrypted"),
        }
    }
}

/// Ids (after `after`, in id order, at most `limit`) whose envelope does not start with
/// `current_prefix` (`v1:<current key id>:`).
pub async fn secret_stale_ids(
    conn: &mut PgConnection,
    column: SecretColumn,
    current_prefix: &str,
    after: Uuid,
    limit: i64,
) -> StoreResult<Vec<Uuid>> {
    let sql = match column {
        SecretColumn::ServerSshKey => {
            "SELECT id FROM server_credentials WHERE ssh_key_encrypted IS NOT NULL \
             AND left(ssh_key_encrypted, length($1)) <> $1 AND id > $2 ORDER BY id LIMIT $3"
        }
        SecretColumn::ServerPassword => {
            "SELECT id FROM server_credentials WHERE password_encrypted IS NOT NULL \
             AND left(password_encrypted, length($1)) <> $1 AND id > $2 ORDER BY id LIMIT $3"
        }
        SecretColumn::LlmApiKey => {
            "SELECT id FROM llm_providers WHERE api_key_encrypted IS NOT NULL \
             AND left(api_key_encrypted, length($1)) <> $1 AND id > $2 ORDER BY id LIMIT $3"
        }
        SecretColumn::ExecutionSecretVars => {
            "SELECT id FROM runbook_executions WHERE secret_vars_encrypted IS NOT NULL \
             AND left(secret_vars_encrypted, length($1)) <> $1 AND id > $2 ORDER BY id LIMIT $3"
        }
        SecretColumn::StepOutput => {
            "SELECT id FROM step_executions WHERE output_encrypted IS NOT NULL \
             AND left(output_encrypted, length($1)) <> $1 AND id > $2 ORDER BY id LIMIT $3"
        }
    };
    Ok(sqlx::query_scalar(sql)
        .bind(current_prefix)
        .bind(after)
        .bind(limit)
        .fetch_all(conn)
        .await?)
}

/// The envelope of one row, locked for the rest of the transaction.
pub async fn secret_get_for_update(
    conn: &mut PgConnection,
    column: SecretColumn,
    id: Uuid,
) -> StoreResult<Option<String>> {
    let sql = match column {
        SecretColumn::ServerSshKey => {
            "SELECT ssh_key_encrypted FROM server_credentials WHERE id = $1 FOR UPDATE"
        }
        SecretColumn::ServerPassword => {
            "SELECT password_encrypted FROM server_credentials WHERE id = $1 FOR UPDATE"
        }
        SecretColumn::LlmApiKey => {
            "SELECT api_key_encrypted FROM llm_providers WHERE id = $1 FOR UPDATE"
        }
        SecretColumn::ExecutionSecretVars => {
            "SELECT secret_vars_encrypted FROM runbook_executions WHERE id = $1 FOR UPDATE"
        }
        SecretColumn::StepOutput => {
            "SELECT output_encrypted FROM step_executions WHERE id = $1 FOR UPDATE"
        }
    };
    let value: Option<Option<String>> = sqlx::query_scalar(sql)
        .bind(id)
        .fetch_optional(conn)
        .await?;
    Ok(value.flatten())
}

/// Replaces one envelope (without touching `updated_at` semantics beyond the table trigger).
pub async fn secret_set(
    conn: &mut PgConnection,
    column: SecretColumn,
    id: Uuid,
    envelope: &str,
) -> StoreResult<()> {
    let sql = match column {
        SecretColumn::ServerSshKey => {
            "UPDATE server_credentials SET ssh_key_encrypted = $2 WHERE id = $1"
        }
        SecretColumn::ServerPassword => {
            "UPDATE server_credentials SET password_encrypted = $2 WHERE id = $1"
        }
        SecretColumn::LlmApiKey => "UPDATE llm_providers SET api_key_encrypted = $2 WHERE id = $1",
        SecretColumn::ExecutionSecretVars => {
            "UPDATE runbook_executions SET secret_vars_encrypted = $2 WHERE id = $1"
        }
        SecretColumn::StepOutput => {
            "UPDATE step_executions SET output_encrypted = $2 WHERE id = $1"
        }
    };
    sqlx::query(sql)
        .bind(id)
        .bind(envelope)
        .execute(conn)
        .await?;
    Ok(())
}
