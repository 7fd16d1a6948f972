//! aiops: an auto-remediation platform for teams that run Prometheus and Alertmanager.
//!
//! Alerts come in through a webhook, are stored and matched, and runbooks run on the affected
//! servers as durable workflows in PostgreSQL. `ARCHITECTURE.md` at the repository root is the map
//! of this crate; every module below opens with a paragraph saying what it owns.

pub mod api;
pub mod auth;
pub mod cli;
pub mod config;
pub mod crypto;
pub mod domain;
pub mod engine;
pub mod exec;
pub mod queue;
pub mod servers;
pub mod startup;
pub mod store;
pub mod telemetry;
pub mod templates;
pub mod worker;

/// The crate version, as reported by `GET /api/v1/version` and `aiops --version`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
