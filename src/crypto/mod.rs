//! Cryptographic primitives: password hashing (argon2id), opaque bearer tokens (random, stored
//! only as a SHA-256 hash). Knows nothing about the database or HTTP.

pub mod password;
pub mod token;
