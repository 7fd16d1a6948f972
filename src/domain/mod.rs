//! Pure domain types and rules. This module knows nothing about PostgreSQL, HTTP or tokio I/O:
//! it is plain data and functions, testable without any of them.

pub mod alert;
pub mod blackout;
pub mod circuit;
pub mod execution;
pub mod role;
pub mod runbook;
pub mod targeting;
pub mod text;
pub mod trigger_match;

pub use role::Role;
