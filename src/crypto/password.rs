//! Password hashing with argon2id and the OWASP-recommended parameters
//! (19 MiB of memory, 2 iterations, 1 lane).

use argon2::{Algorithm, Argon2, Params, PasswordHash, PasswordHasher, PasswordVerifier, Version};
use rand::RngExt;

/// Memory cost in KiB (OWASP Password Storage Cheat Sheet, argon2id minimum configuration).
pub const MEMORY_KIB: u32 = 19 * 1024;
/// Iterations.
pub const ITERATIONS: u32 = 2;
/// Degree of parallelism.
pub const LANES: u32 = 1;

/// A password could not be hashed, or a stored hash is not a valid PHC string.
#[derive(Debug, thiserror::Error)]
#[error("password hashing failed: {0}")]
pub struct PasswordError(String);

impl PasswordError {
    /// The thread that was to compute the hash did not (it is gone).
    pub fn unavailable() -> Self {
        PasswordError("the password threads are not running".to_owned())
    }
}

fn hasher() -> Argon2<'static> {
    // The parameters are constants that argon2 accepts; a failure here is a programming error
    // caught by the unit test below.
    let params = Params::new(MEMORY_KIB, ITERATIONS, LANES, None).unwrap_or_default();
    Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
}

/// Hashes a password into a PHC string (`$argon2id$v=19$m=19456,t=2,p=1$...`).
pub fn hash(password: &str) -> Result<String, PasswordError> {
    let mut salt = [0u8; 16];
    rand::rng().fill(&mut salt);
    hasher()
        .hash_password_with_salt(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| PasswordError(e.to_string()))
}

/// Checks a password against a stored PHC string. A malformed stored hash verifies as false.
pub fn verify(password: &str, stored: &str) -> bool {
    match PasswordHash::new(stored) {
        Ok(parsed) => hasher()
            .verify_password(password.as_bytes(), &parsed)
            .is_ok(),
        Err(_) => false,
    }
}

/// A hash to verify against when the user does not exist, so that a login for an unknown user
/// costs the same time as one with a wrong password.
pub fn dummy_hash() -> &'static str {
    "$argon2id$v=19$m=19456,t=2,p=1$c29tZXNhbHRzb21lc2FsdA$2+Tj3rPCuzXhHNFX3Tg0sTJ3cnSmkv9iBnvNL4kmQ1s"
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_then_verify() {
        let h = hash("correct horse").unwrap();
        assert!(h.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"), "{h}");
        assert!(verify("correct horse", &h));
        assert!(!verify("wrong horse", &h));
        assert!(!verify("x", "not a hash"));
        assert!(!verify("x", dummy_hash()));
    }

    #[test]
    fn verifies_a_standard_phc_string_from_another_implementation() {
        // Made by the reference implementation (libargon2, through argon2-cffi) with the same
        // parameters: hashes stored by any earlier release keep verifying.
        let stored = "$argon2id$v=19$m=19456,t=2,p=1$ZZX40J/MQhwAOWnDSu5KpQ$\
                      +HrxaWkPWsV94x9j/V/qlnORqD2ipa89Iruj7UgYoik";
        assert!(verify("correct horse", stored));
        assert!(!verify("correct horsf", stored));
    }
}
