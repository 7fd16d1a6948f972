//! `aiops secrets ...`: key generation and rotation of every encrypted column.
//!
//! Rotation works without downtime: each envelope is re-sealed under the current key in its own
//! short transaction (row lock, open with whichever key sealed it, seal with the current key,
//! write), so API servers and workers keep running; while it runs they must hold both the new
//! current key and the old keys (`AIOPS_SECRET_KEYS_OLD`), which they need anyway to read rows
//! not yet rotated. Rerunning it is safe: rows already under the current key are skipped.

use anyhow::Context;
use clap::Subcommand;
use sqlx::PgPool;
use uuid::Uuid;

use crate::crypto::secrets::{Keyring, SecretSlot, generate_key_hex};
use crate::store::secrets::{self, SecretColumn};

/// Secrets subcommands.
#[derive(Debug, Subcommand)]
pub enum SecretsCommand {
    /// Print a new random 32-byte key (hex) with a key id, ready for AIOPS_SECRET_KEY.
    GenerateKey {
        /// Key id to prefix (letters, digits, '_', '-', '.').
        #[arg(long, default_value = "k1")]
        id: String,
    },
    /// Re-encrypt every stored secret under the current key (AIOPS_SECRET_KEY or the first key of
    /// AIOPS_SECRET_KEY_FILE); old keys come from AIOPS_SECRET_KEYS_OLD or the key file.
    Rotate,
}

/// What a rotation did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RotationReport {
    /// Envelopes re-sealed under the current key.
    pub rotated: u64,
    /// Rows that changed under us and were already current when locked.
    pub skipped: u64,
}

/// Re-seals every envelope not under the current key, one row per transaction.
pub async fn rotate(pool: &PgPool, keyring: &Keyring) -> anyhow::Result<RotationReport> {
    let prefix = format!("v1:{}:", keyring.current_id());
    let mut report = RotationReport::default();
    for column in SecretColumn::ALL {
        let (table, name) = column.names();
        let mut after = Uuid::nil();
        loop {
            let ids = {
                let mut conn = pool.acquire().await?;
                secrets::secret_stale_ids(&mut conn, column, &prefix, after, 200).await?
            };
            let Some(last) = ids.last().copied() else {
                break;
            };
            for id in ids {
                let mut tx = pool.begin().await?;
                let Some(envelope) = secrets::secret_get_for_update(&mut tx, column, id).await?
                else {
                    report.skipped += 1;
                    continue;
                };
                if !keyring.is_stale(&envelope) {
                    report.skipped += 1;
                    continue;
                }
                let slot = SecretSlot {
                    table,
                    row_id: id,
                    column: name,
                };
                let plaintext = keyring
                    .open(slot, &envelope)
                    .with_context(|| format!("{table}.{name} of row {id}"))?;
                let sealed = keyring.seal(slot, &plaintext)?;
                secrets::secret_set(&mut tx, column, id, &sealed).await?;
                tx.commit().await?;
                report.rotated += 1;
            }
            after = last;
        }
    }
    // One audit entry per rotation, after its last row.
    let mut conn = pool.acquire().await?;
    crate::store::audit::audit_insert(
        &mut conn,
        &crate::store::audit::NewAuditEntry {
            user_id: None,
            action: "secrets_rotate",
            resource_type: "secret_key",
            resource_id: None,
            details: serde_json::json!({
                "key_id": keyring.current_id(),
                "rotated": report.rotated,
                "source": "cli",
            }),
            ip_address: None,
        },
    )
    .await?;
    Ok(report)
}

/// Runs a secrets subcommand.
pub async fn run(
    command: SecretsCommand,
    config: &crate::config::Config,
    pool: Option<&PgPool>,
) -> anyhow::Result<()> {
    match command {
        SecretsCommand::GenerateKey { id } => {
            // A key whose id AIOPS_SECRET_KEY would refuse is of no use.
            if !crate::crypto::secrets::valid_id(&id) {
                anyhow::bail!("--id `{id}`: a key id is 1 to 32 of letters, digits, '_', '-', '.'");
            }
            outln!("{id}:{}", generate_key_hex());
            Ok(())
        }
        SecretsCommand::Rotate => {
            let keyring = Keyring::from_config(config)?
                .context("no secret key configured (AIOPS_SECRET_KEY or AIOPS_SECRET_KEY_FILE)")?;
            let pool = pool.context("rotation needs DATABASE_URL")?;
            let report = rotate(pool, &keyring).await?;
            outln!(
                "rotated {} secret(s) to key {}; every other stored secret is already under it",
                report.rotated,
                keyring.current_id(),
            );
            Ok(())
        }
    }
}
