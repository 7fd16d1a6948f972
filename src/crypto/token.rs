//! Opaque bearer tokens: 256 random bits, shown once to the client, stored only as SHA-256.

use rand::RngExt;
use sha2::{Digest, Sha256};

/// The prefix of every token this product issues; it makes leaked tokens easy to grep for.
pub const PREFIX: &str = "aiops_";

/// A freshly generated token: the secret to hand out once, and the hash to store.
pub struct NewToken {
    /// The bearer secret (`aiops_` + 64 hex digits).
    pub secret: String,
    /// SHA-256 of the secret.
    pub hash: Vec<u8>,
}

/// Generates a token with 256 bits of randomness from the operating system's generator.
pub fn generate() -> NewToken {
    let mut bytes = [0u8; 32];
    rand::rng().fill(&mut bytes);
    let mut secret = String::with_capacity(PREFIX.len() + 64);
    secret.push_str(PREFIX);
    for b in bytes {
        secret.push_str(&format!("{b:02x}"));
    }
    let hash = hash(&secret);
    NewToken { secret, hash }
}

/// The stored form of a token.
pub fn hash(secret: &str) -> Vec<u8> {
    Sha256::digest(secret.as_bytes()).to_vec()
}

/// Random printable password for generated accounts (24 characters, about 140 bits).
pub fn random_password() -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz23456789";
    let mut rng = rand::rng();
    (0..24)
        .map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_long_unique_and_hashed() {
        let a = generate();
        let b = generate();
        assert_eq!(a.secret.len(), PREFIX.len() + 64);
        assert_ne!(a.secret, b.secret);
        assert_eq!(a.hash, hash(&a.secret));
        assert_eq!(a.hash.len(), 32);
        assert_eq!(random_password().len(), 24);
    }
}
