//! `aiops user ...`: account management straight against the database, for the first admin and
//! for recovery when nobody can log in.

use anyhow::{Context, bail};
use clap::Subcommand;
use sqlx::PgPool;

use crate::api::users::{validate_email, validate_full_name, validate_password, validate_username};
use crate::domain::Role;
use crate::store;

/// User subcommands.
#[derive(Debug, Subcommand)]
pub enum UserCommand {
    /// Create a user. Prints a generated password unless --password-stdin is given.
    Create {
        /// Login name.
        #[arg(long)]
        username: String,
        /// Email address (defaults to <username>@localhost).
        #[arg(long)]
        email: Option<String>,
        /// Role: admin, engineer, operator or viewer.
        #[arg(long, default_value = "viewer")]
        role: String,
        /// Display name.
        #[arg(long)]
        full_name: Option<String>,
        /// Read the password from the first line of standard input.
        #[arg(long)]
        password_stdin: bool,
    },
}

fn api_message(e: crate::api::error::ApiError) -> anyhow::Error {
    use crate::api::error::ApiError;
    match e {
        ApiError::Unprocessable(body) => anyhow::anyhow!(body.0.message),
        other => anyhow::anyhow!("invalid input ({})", other.status()),
    }
}

/// Runs a user subcommand.
pub async fn run(command: UserCommand, pool: &PgPool) -> anyhow::Result<()> {
    match command {
        UserCommand::Create {
            username,
            email,
            role,
            full_name,
            password_stdin,
        } => {
            let role: Role = role.parse()?;
            validate_username(&username).map_err(api_message)?;
            let email = email.unwrap_or_else(|| format!("{username}@localhost"));
            validate_email(&email).map_err(api_message)?;
            validate_full_name(full_name.as_deref()).map_err(api_message)?;
            let (password, generated) = if password_stdin {
                let mut line = String::new();
                std::io::stdin()
                    .read_line(&mut line)
                    .context("cannot read the password from standard input")?;
                let line = line.trim_end_matches(['\n', '\r']).to_owned();
                validate_password("password", &line).map_err(api_message)?;
                (line, false)
            } else {
                (crate::crypto::token::random_password(), true)
            };
            let hash = crate::auth::hash_password(password.clone()).await?;
            let mut tx = pool.begin().await?;
            let row = match store::users::user_create(
                &mut tx,
                &store::users::NewUser {
                    username: &username,
                    email: &email,
                    full_name: full_name.as_deref(),
                    password_hash: &hash,
                    role: role.as_str(),
                    is_active: true,
                },
            )
            .await
            {
                Ok(row) => row,
                Err(store::StoreError::Conflict(c)) => {
                    bail!("a user with that username or email already exists ({c})")
                }
                Err(e) => return Err(e.into()),
            };
            store::audit::audit_insert(
                &mut tx,
                &store::audit::NewAuditEntry {
                    user_id: None,
                    action: "user_create",
                    resource_type: "user",
                    resource_id: Some(row.id),
                    details: serde_json::json!({ "username": row.username, "role": row.role, "via": "cli" }),
                    ip_address: None,
                },
            )
            .await?;
            tx.commit().await?;
            outln!(
                "created user {} ({}) with role {}",
                row.username,
                row.id,
                row.role
            );
            if generated {
                outln!("password: {password}");
            }
            Ok(())
        }
    }
}
