//! Secrets at rest: AES-256-GCM envelopes for every `*_encrypted` column, and the keyring that
//! opens them.
//!
//! An envelope is one line of text, `v1:<key id>:<base64(nonce || ciphertext+tag)>`, so it fits a
//! `text` column and says which key sealed it. The table, row id and column are bound as
//! associated data: an envelope copied to another row or column does not open. The keyring holds
//! one current key (new envelopes) and any number of old keys (read only), which is what lets
//! `aiops secrets rotate` re-encrypt row by row while readers keep working. Keys come from the
//! configuration (environment or key file), never from the database. This module knows nothing
//! about SQL or HTTP.

use std::collections::HashMap;
use std::fmt;

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use rand::RngExt;
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::config::Config;

/// The envelope format version written by this build.
const VERSION: &str = "v1";
/// AES-GCM nonce length in bytes.
const NONCE_LEN: usize = 12;

/// A secret could not be sealed or opened, or the keys could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    /// No key is configured, so secrets can be neither stored nor read.
    #[error(
        "no secret key configured: set AIOPS_SECRET_KEY or AIOPS_SECRET_KEY_FILE (32 bytes, hex or base64)"
    )]
    NoKey,
    /// A configured key is not 32 bytes of hex or base64, or its id is malformed.
    #[error("secret key {source_name}: {message}")]
    BadKey {
        /// Where the key came from (`AIOPS_SECRET_KEY`, a file line, ...).
        source_name: String,
        /// What is wrong with it (never the key itself).
        message: String,
    },
    /// The key file could not be read.
    #[error("cannot read secret key file {path}: {source}")]
    KeyFile {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The stored value is not an envelope this build understands.
    #[error("stored secret is not a valid envelope ({0})")]
    Malformed(&'static str),
    /// The envelope names a key id the keyring does not hold.
    #[error("stored secret is sealed with key id `{0}`, which is not configured")]
    UnknownKey(String),
    /// Authentication failed: wrong key, or the envelope was moved or tampered with.
    #[error("stored secret does not open (wrong key, or moved to another row or column)")]
    Tampered,
    /// The plaintext is not UTF-8 where text was expected.
    #[error("stored secret is not valid UTF-8")]
    NotUtf8,
}

/// Where an envelope lives: bound into it as associated data.
#[derive(Debug, Clone, Copy)]
pub struct SecretSlot<'a> {
    /// Table name (`server_credentials`).
    pub table: &'a str,
    /// Primary key of the row.
    pub row_id: Uuid,
    /// Column name (`password_encrypted`).
    pub column: &'a str,
}

impl SecretSlot<'_> {
    fn aad(&self) -> Vec<u8> {
        format!(
            "aiops:{VERSION}:{}:{}:{}",
            self.table, self.row_id, self.column
        )
        .into_bytes()
    }
}

/// One 256-bit key with its id.
struct Key {
    cipher: Aes256Gcm,
}

/// The current key plus old keys still accepted for reading.
pub struct Keyring {
    current: String,
    keys: HashMap<String, Key>,
}

impl fmt::Debug for Keyring {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut ids: Vec<&String> = self.keys.keys().collect();
        ids.sort();
        f.debug_struct("Keyring")
            .field("current", &self.current)
            .field("ids", &ids)
            .finish()
    }
}

/// Whether a key id is 1 to 32 of letters, digits, '_', '-' and '.'.
pub fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 32
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '.')
}

/// Decodes 32 key bytes from 64 hex digits or base64.
fn decode_key(source_name: &str, text: &str) -> Result<[u8; 32], SecretError> {
    let text = text.trim();
    let bad = |message: &str| SecretError::BadKey {
        source_name: source_name.to_owned(),
        message: message.to_owned(),
    };
    let bytes = if text.len() == 64 && text.chars().all(|c| c.is_ascii_hexdigit()) {
        (0..32)
            .map(|i| u8::from_str_radix(&text[2 * i..2 * i + 2], 16))
            .collect::<Result<Vec<u8>, _>>()
            .map_err(|_| bad("not hex"))?
    } else {
        B64.decode(text)
            .map_err(|_| bad("expected 64 hex digits or base64 of 32 bytes"))?
    };
    bytes
        .try_into()
        .map_err(|_| bad("must decode to exactly 32 bytes"))
}

/// The id of a key given without one: derived from the key so every process names it alike.
fn derived_id(key: &[u8; 32]) -> String {
    let digest = Sha256::digest([b"aiops-key-id:".as_slice(), key.as_slice()].concat());
    let hex: String = digest.iter().take(4).map(|b| format!("{b:02x}")).collect();
    format!("k{hex}")
}

/// Parses `id:key` or a bare key (whose id is derived from it).
fn parse_entry(source_name: &str, entry: &str) -> Result<(String, [u8; 32]), SecretError> {
    let entry = entry.trim();
    // A base64 key never contains ':', so the first ':' separates an explicit id.
    match entry.split_once(':') {
        Some((id, key)) => {
            let id = id.trim();
            if !valid_id(id) {
                return Err(SecretError::BadKey {
                    source_name: source_name.to_owned(),
                    message: "key id must be 1 to 32 of letters, digits, '_', '-', '.'".to_owned(),
                });
            }
            Ok((id.to_owned(), decode_key(source_name, key)?))
        }
        None => {
            let key = decode_key(source_name, entry)?;
            Ok((derived_id(&key), key))
        }
    }
}

impl Keyring {
    /// A keyring from explicit entries: the first is current, the rest are old (read only).
    /// Each entry is `id:key` or a bare key (hex or base64 of 32 bytes).
    pub fn from_entries<'a>(
        entries: impl IntoIterator<Item = (String, &'a str)>,
    ) -> Result<Keyring, SecretError> {
        let mut current = None;
        let mut keys = HashMap::new();
        for (source_name, entry) in entries {
            let (id, key) = parse_entry(&source_name, entry)?;
            let cipher = Aes256Gcm::new_from_slice(&key).map_err(|_| SecretError::BadKey {
                source_name: source_name.clone(),
                message: "must be 32 bytes".to_owned(),
            })?;
            if keys.contains_key(&id) {
                return Err(SecretError::BadKey {
                    source_name,
                    message: format!("key id `{id}` appears twice"),
                });
            }
            current.get_or_insert_with(|| id.clone());
            keys.insert(id, Key { cipher });
        }
        let current = current.ok_or(SecretError::NoKey)?;
        Ok(Keyring { current, keys })
    }

    /// The keyring the configuration describes, or `None` when no key is configured.
    ///
    /// `secret_key` (`AIOPS_SECRET_KEY`) is the current key; otherwise the first key line of
    /// `secret_key_file` is. Further lines of the file and every entry of `secret_keys_old`
    /// (`AIOPS_SECRET_KEYS_OLD`, comma-separated) are old keys, accepted for reading.
    pub fn from_config(config: &Config) -> Result<Option<Keyring>, SecretError> {
        let mut entries: Vec<(String, String)> = Vec::new();
        if let Some(key) = &config.secret_key {
            entries.push(("AIOPS_SECRET_KEY".to_owned(), key.clone()));
        }
        if let Some(path) = &config.secret_key_file {
            let text = std::fs::read_to_string(path).map_err(|source| SecretError::KeyFile {
                path: path.display().to_string(),
                source,
            })?;
            for (n, line) in text.lines().enumerate() {
                let line = line.trim();
                if line.is_empty() || line.starts_with('#') {
                    continue;
                }
                entries.push((
                    format!("{} line {}", path.display(), n + 1),
                    line.to_owned(),
                ));
            }
        }
        for (n, entry) in config.secret_keys_old.iter().enumerate() {
            if !entry.trim().is_empty() {
                entries.push((
                    format!("AIOPS_SECRET_KEYS_OLD entry {}", n + 1),
                    entry.clone(),
                ));
            }
        }
        if entries.is_empty() {
            return Ok(None);
        }
        // The same key may legitimately be both in the environment and the file; keep the first.
        // Two different keys under one id are refused: envelopes name their key by id, so one
        // of the two could never open what the other sealed, and a rotation between them would
        // find nothing to do.
        let mut seen: std::collections::HashMap<String, ([u8; 32], String)> =
            std::collections::HashMap::new();
        let mut unique = Vec::new();
        for (name, entry) in &entries {
            let (id, key) = parse_entry(name, entry)?;
            match seen.get(&id) {
                Some((first_key, _)) if *first_key == key => {}
                Some((_, first_name)) => {
                    return Err(SecretError::BadKey {
                        source_name: name.clone(),
                        message: format!(
                            "key id `{id}` is also given by {first_name} with a different key; \
                             give each key its own id (`aiops secrets generate-key --id ...`)"
                        ),
                    });
                }
                None => {
                    seen.insert(id, (key, name.clone()));
                    unique.push((name.clone(), entry.as_str()));
                }
            }
        }
        Keyring::from_entries(unique).map(Some)
    }

    /// The id of the key that seals new envelopes.
    pub fn current_id(&self) -> &str {
        &self.current
    }

    /// Seals `plaintext` for `slot` under the current key.
    pub fn seal(&self, slot: SecretSlot<'_>, plaintext: &[u8]) -> Result<String, SecretError> {
        let key = self
            .keys
            .get(&self.current)
            .ok_or_else(|| SecretError::UnknownKey(self.current.clone()))?;
        let mut nonce = [0u8; NONCE_LEN];
        rand::rng().fill(&mut nonce);
        let aad = slot.aad();
        let sealed = key
            .cipher
            .encrypt(
                &Nonce::from(nonce),
                Payload {
                    msg: plaintext,
                    aad: &aad,
                },
            )
            .map_err(|_| SecretError::Tampered)?;
        let mut blob = Vec::with_capacity(NONCE_LEN + sealed.len());
        blob.extend_from_slice(&nonce);
        blob.extend_from_slice(&sealed);
        Ok(format!("{VERSION}:{}:{}", self.current, B64.encode(blob)))
    }

    /// Seals a text secret.
    pub fn seal_str(&self, slot: SecretSlot<'_>, plaintext: &str) -> Result<String, SecretError> {
        self.seal(slot, plaintext.as_bytes())
    }

    /// Opens an envelope sealed for `slot` under any key of the ring.
    pub fn open(&self, slot: SecretSlot<'_>, envelope: &str) -> Result<Vec<u8>, SecretError> {
        let (key_id, blob) = envelope_parts(envelope)?;
        let key = self
            .keys
            .get(key_id)
            .ok_or_else(|| SecretError::UnknownKey(key_id.to_owned()))?;
        let blob = B64
            .decode(blob)
            .map_err(|_| SecretError::Malformed("body is not base64"))?;
        if blob.len() < NONCE_LEN + 16 {
            return Err(SecretError::Malformed("body too short"));
        }
        let (nonce, sealed) = blob.split_at(NONCE_LEN);
        let nonce: [u8; NONCE_LEN] = nonce
            .try_into()
            .map_err(|_| SecretError::Malformed("nonce length"))?;
        let aad = slot.aad();
        key.cipher
            .decrypt(
                &Nonce::from(nonce),
                Payload {
                    msg: sealed,
                    aad: &aad,
                },
            )
            .map_err(|_| SecretError::Tampered)
    }

    /// Opens a text secret.
    pub fn open_str(&self, slot: SecretSlot<'_>, envelope: &str) -> Result<String, SecretError> {
        String::from_utf8(self.open(slot, envelope)?).map_err(|_| SecretError::NotUtf8)
    }

    /// Whether an envelope is sealed under some key other than the current one.
    pub fn is_stale(&self, envelope: &str) -> bool {
        envelope_key_id(envelope).is_none_or(|id| id != self.current)
    }
}

fn envelope_parts(envelope: &str) -> Result<(&str, &str), SecretError> {
    let mut parts = envelope.splitn(3, ':');
    let version = parts.next().unwrap_or_default();
    if version != VERSION {
        return Err(SecretError::Malformed("unknown version"));
    }
    let key_id = parts.next().ok_or(SecretError::Malformed("no key id"))?;
    let blob = parts.next().ok_or(SecretError::Malformed("no body"))?;
    Ok((key_id, blob))
}

/// The key id an envelope names, when it is an envelope at all.
pub fn envelope_key_id(envelope: &str) -> Option<&str> {
    envelope_parts(envelope).ok().map(|(id, _)| id)
}

/// A fresh random key, hex-encoded, for `aiops secrets generate-key`.
pub fn generate_key_hex() -> String {
    let mut key = [0u8; 32];
    rand::rng().fill(&mut key);
    key.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const K1: &str = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";
    const K2: &str = "1f1e1d1c1b1a191817161514131211100f0e0d0c0b0a09080706050403020100";

    fn slot(row: Uuid) -> SecretSlot<'static> {
        SecretSlot {
            table: "server_credentials",
            row_id: row,
            column: "password_encrypted",
        }
    }

    fn ring(entries: &[&str]) -> Keyring {
        Keyring::from_entries(entries.iter().map(|e| ("test".to_owned(), *e))).unwrap()
    }

    #[test]
    fn round_trip_and_no_plaintext_in_envelope() {
        let ring = ring(&[&format!("a:{K1}")]);
        let row = Uuid::new_v4();
        let env = ring.seal_str(slot(row), "hunter2-secret").unwrap();
        assert!(env.starts_with("v1:a:"), "{env}");
        assert!(!env.contains("hunter2"));
        assert_eq!(ring.open_str(slot(row), &env).unwrap(), "hunter2-secret");
        // Fresh nonce each time.
        assert_ne!(env, ring.seal_str(slot(row), "hunter2-secret").unwrap());
    }

    #[test]
    fn bound_to_row_and_column() {
        let ring = ring(&[K1]);
        let row = Uuid::new_v4();
        let env = ring.seal_str(slot(row), "s").unwrap();
        assert!(matches!(
            ring.open(slot(Uuid::new_v4()), &env),
            Err(SecretError::Tampered)
        ));
        let other_column = SecretSlot {
            column: "ssh_key_encrypted",
            ..slot(row)
        };
        assert!(matches!(
            ring.open(other_column, &env),
            Err(SecretError::Tampered)
        ));
        let mut bytes = env.clone().into_bytes();
        let last = bytes.len() - 2;
        bytes[last] = if bytes[last] == b'A' { b'B' } else { b'A' };
        let tampered = String::from_utf8(bytes).unwrap();
        assert!(ring.open(slot(row), &tampered).is_err());
    }

    #[test]
    fn old_keys_read_current_key_writes() {
        let old = ring(&[&format!("old:{K1}")]);
        let row = Uuid::new_v4();
        let env = old.seal_str(slot(row), "s").unwrap();
        let rotated = ring(&[&format!("new:{K2}"), &format!("old:{K1}")]);
        assert!(rotated.is_stale(&env));
        assert_eq!(rotated.open_str(slot(row), &env).unwrap(), "s");
        let resealed = rotated.seal_str(slot(row), "s").unwrap();
        assert!(!rotated.is_stale(&resealed));
        let new_only = ring(&[&format!("new:{K2}")]);
        assert!(
            matches!(new_only.open(slot(row), &env), Err(SecretError::UnknownKey(id)) if id == "old")
        );
    }

    #[test]
    fn keys_parse_from_hex_and_base64_with_derived_ids() {
        let b64 = B64.encode([7u8; 32]);
        let a = ring(&[&b64]);
        let b = ring(&[&b64]);
        assert_eq!(a.current_id(), b.current_id());
        assert!(a.current_id().starts_with('k'));
        for bad in ["abc", "00", &B64.encode([1u8; 31]), "bad id:00"] {
            let err = Keyring::from_entries([("AIOPS_SECRET_KEY".to_owned(), bad)]).unwrap_err();
            assert!(err.to_string().contains("AIOPS_SECRET_KEY"), "{err}");
            assert!(!err.to_string().contains(bad) || bad.len() < 4, "{err}");
        }
        assert!(matches!(
            Keyring::from_entries([("a".to_owned(), K1), ("b".to_owned(), K1)]),
            Err(SecretError::BadKey { .. })
        ));
    }

    #[test]
    fn from_config_reads_env_file_and_old_keys() {
        let dir = std::env::temp_dir().join(format!("aiops-keys-{}", Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("keys");
        std::fs::write(
            &file,
            format!("# current first\nfile1:{K1}\n\nfile2:{K2}\n"),
        )
        .unwrap();
        let config = Config {
            secret_key_file: Some(file.clone()),
            ..Config::default()
        };
        let ring = Keyring::from_config(&config).unwrap().unwrap();
        assert_eq!(ring.current_id(), "file1");
        let config = Config {
            secret_key: Some(format!("env:{K2}")),
            secret_keys_old: vec![format!("older:{K1}")],
            ..Config::default()
        };
        let ring = Keyring::from_config(&config).unwrap().unwrap();
        assert_eq!(ring.current_id(), "env");
        assert!(Keyring::from_config(&Config::default()).unwrap().is_none());
        assert!(format!("{ring:?}").contains("older"));
        assert!(!format!("{ring:?}").contains(K1));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn one_id_for_two_different_keys_is_refused() {
        // The same key twice (environment and old keys) is fine.
        let config = Config {
            secret_key: Some(format!("k1:{K1}")),
            secret_keys_old: vec![format!("k1:{K1}")],
            ..Config::default()
        };
        assert!(Keyring::from_config(&config).unwrap().is_some());
        let config = Config {
            secret_key: Some(format!("k1:{K2}")),
            secret_keys_old: vec![format!("k1:{K1}")],
            ..Config::default()
        };
        let error = Keyring::from_config(&config).unwrap_err().to_string();
        assert!(
            error.contains("key id `k1`") && error.contains("different key"),
            "{error}"
        );
        assert!(!error.contains(K1) && !error.contains(K2), "{error}");
    }
}
