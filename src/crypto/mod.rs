//! Cryptographic primitives: password hashing (argon2id), opaque bearer tokens (random, stored
//! only as a SHA-256 hash), and AES-256-GCM envelopes for stored secrets. Knows nothing about the
//! database or HTTP.

pub mod password;
pub mod secrets;
pub mod token;
