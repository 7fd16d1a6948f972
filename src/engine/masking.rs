//! Masking of secret values in everything the engine stores, logs or streams: step output,
//! rendered commands, error messages and live events.

/// What replaces a secret.
pub const MASK: &str = "********";

/// Replaces every occurrence of each secret with [`MASK`].
#[derive(Debug, Clone, Default)]
pub struct Masker {
    secrets: Vec<String>,
}

impl Masker {
    /// A masker for these secret values (empty and very short values are ignored: masking
    /// "1" would destroy every output without protecting anything).
    pub fn new(secrets: impl IntoIterator<Item = String>) -> Masker {
        let mut secrets: Vec<String> = secrets.into_iter().filter(|s| s.len() >= 3).collect();
        // Longest first, so a secret containing another is masked whole.
        secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
        secrets.dedup();
        Masker { secrets }
    }

    /// The text with every secret masked.
    pub fn mask(&self, text: &str) -> String {
        let mut out = text.to_owned();
        for secret in &self.secrets {
            if out.contains(secret.as_str()) {
                out = out.replace(secret.as_str(), MASK);
            }
        }
        out
    }
}

/// Whether a variable name says its value is a secret.
pub fn is_secret_name(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    [
        "password",
        "passwd",
        "secret",
        "token",
        "api_key",
        "apikey",
        "private_key",
        "credential",
    ]
    .iter()
    .any(|m| lower.contains(m))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_every_occurrence_longest_first() {
        let m = Masker::new([
            "hunter2".to_owned(),
            "hunter2-extended".to_owned(),
            "x".to_owned(),
        ]);
        assert_eq!(
            m.mask("a hunter2 b hunter2-extended x"),
            "a ******** b ******** x"
        );
        assert!(is_secret_name("DB_PASSWORD"));
        assert!(is_secret_name("slack_token"));
        assert!(!is_secret_name("SERVICE_NAME"));
    }
}
