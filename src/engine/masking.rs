//! Masking of secret values in everything the engine stores, logs or streams: step output,
//! rendered commands, error messages and live events.

/// What replaces a secret.
pub const MASK: &str = "********";

use crate::exec::TRUNCATION_MARKER;

/// Replaces every occurrence of each secret with [`MASK`].
#[derive(Debug, Clone, Default)]
pub struct Masker {
    secrets: Vec<String>,
}

impl Masker {
    /// A masker for these secret values (empty and very short values are ignored: masking
    /// "1" would destroy every output without protecting anything).
    ///
    /// A secret is also masked in the form a rendered command carries it: inside a quoted
    /// shell word each `'` of the value is written `'\''` (POSIX) or doubled (PowerShell, which
    /// also reads the typographic single quotes as quotes), so a value with a quote in it never
    /// appears verbatim in the command line.
    ///
    /// Each line of a secret of several lines (a private key, a certificate) is a secret of its
    /// own too: output streamed line by line, or cut into lines by a command, never holds the
    /// whole value at once.
    pub fn new(secrets: impl IntoIterator<Item = String>) -> Masker {
        let mut all = Vec::new();
        for secret in secrets.into_iter().filter(|s| s.len() >= 3) {
            if secret.contains('\n') {
                all.extend(
                    secret
                        .lines()
                        .map(|line| line.trim_end_matches('\r').trim())
                        .filter(|line| line.len() >= 3)
                        .map(str::to_owned),
                );
            }
            all.extend(quoted_forms(&secret));
            // As `trim` leaves it (templates may use a secret through that filter).
            let trimmed = secret.trim();
            if trimmed != secret && trimmed.len() >= 3 {
                all.push(trimmed.to_owned());
            }
            all.push(secret);
        }
        // Longest first, so a secret containing another is masked whole.
        all.sort_by(|a, b| b.len().cmp(&a.len()).then_with(|| a.cmp(b)));
        all.dedup();
        Masker { secrets: all }
    }

    /// The text with every secret masked.
    ///
    /// Output cut at the size cap may end in the first part of a secret, which no longer
    /// matches it whole: a cut-off start of a secret (at least 3 characters) just before the
    /// truncation marker is masked too.
    pub fn mask(&self, text: &str) -> String {
        let out = self.mask_matches(text);
        // The real marker is the last one: output may print the marker's text itself.
        match out.rfind(TRUNCATION_MARKER) {
            Some(at) => {
                let (kept, marker) = out.split_at(at);
                let cut = self.cut_off_secret(kept);
                format!(
                    "{}{}{marker}",
                    &kept[..kept.len() - cut],
                    if cut > 0 { MASK } else { "" }
                )
            }
            None => out,
        }
    }

    /// The text with every occurrence of every secret masked. Occurrences are found in the
    /// text as given and overlapping ones are masked as one, so two secrets that share
    /// characters (`abcdefXYZ9` and `XYZ9876543` in `abcdefXYZ9876543`) leave nothing of
    /// either in clear.
    fn mask_matches(&self, text: &str) -> String {
        let mut found: Vec<(usize, usize)> = Vec::new();
        for secret in &self.secrets {
            let mut from = 0;
            while let Some(at) = text[from..].find(secret.as_str()) {
                let start = from + at;
                found.push((start, start + secret.len()));
                // The next occurrence may overlap this one: go on from its next character.
                from = start + text[start..].chars().next().map_or(1, char::len_utf8);
            }
        }
        if found.is_empty() {
            return text.to_owned();
        }
        found.sort_unstable();
        let mut out = String::with_capacity(text.len());
        let mut copied = 0;
        let mut i = 0;
        while i < found.len() {
            let (start, mut end) = found[i];
            i += 1;
            while i < found.len() && found[i].0 < end {
                end = end.max(found[i].1);
                i += 1;
            }
            out.push_str(&text[copied..start]);
            out.push_str(MASK);
            copied = end;
        }
        out.push_str(&text[copied..]);
        out
    }

    /// [`Masker::mask`], and a cut-off start of a secret (at least 3 characters) at the very
    /// end masked too: for the last, unfinished line of output that the size cap may have cut.
    pub fn mask_cut_end(&self, text: &str) -> String {
        let masked = self.mask(text);
        match self.cut_off_secret(&masked) {
            0 => masked,
            cut => format!("{}{MASK}", &masked[..masked.len() - cut]),
        }
    }

    /// The length of the longest end of `text` (at least 3 bytes) that is the start of a
    /// secret but not the whole of it; 0 when there is none.
    fn cut_off_secret(&self, text: &str) -> usize {
        self.secrets
            .iter()
            .flat_map(|secret| {
                secret
                    .char_indices()
                    .map(|(i, _)| i)
                    .filter(|&i| i >= 3 && text.ends_with(&secret[..i]))
            })
            .max()
            .unwrap_or(0)
    }
}

/// The forms of `secret` inside a quoted POSIX or PowerShell word, where they differ from it.
fn quoted_forms(secret: &str) -> Vec<String> {
    const POWERSHELL_QUOTES: [char; 5] = ['\'', '\u{2018}', '\u{2019}', '\u{201A}', '\u{201B}'];
    let posix = secret.replace('\'', "'\\''");
    let powershell: String = secret
        .chars()
        .flat_map(|c| {
            let doubled = POWERSHELL_QUOTES.contains(&c);
            std::iter::once(c).chain(doubled.then_some(c))
        })
        .collect();
    [posix, powershell]
        .into_iter()
        .filter(|form| form != secret)
        .collect()
}

pub use crate::domain::runbook::is_secret_name;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_line_of_a_secret_of_several_lines_is_masked_on_its_own() {
        let key = "-----BEGIN KEY-----\r\nMULTILINEsecretAAA111\n  MULTILINEsecretBBB222\n-----END KEY-----";
        let m = Masker::new([key.to_owned()]);
        // Streamed one line at a time, as the live log sends it.
        assert_eq!(m.mask("MULTILINEsecretAAA111\n"), "********\n");
        assert_eq!(m.mask("    MULTILINEsecretBBB222\n"), "    ********\n");
        // Whole, it is one mask.
        assert_eq!(m.mask(&format!("key: {key}!")), "key: ********!");
    }

    #[test]
    fn a_secret_cut_off_at_the_end_of_unfinished_output_is_masked() {
        let m = Masker::new(["truncsecretABC".to_owned()]);
        assert_eq!(m.mask_cut_end("AAAtrunc"), "AAA********");
        assert_eq!(m.mask_cut_end("AAAtruncsecretABC"), "AAA********");
        assert_eq!(
            m.mask_cut_end("AAAtr"),
            "AAAtr",
            "two characters say nothing"
        );
        assert_eq!(m.mask_cut_end("trunc AAA"), "trunc AAA", "only at the end");
    }

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

    #[test]
    fn masks_a_secret_with_quotes_as_a_quoted_word_carries_it() {
        let m = Masker::new(["it's-s3cret".to_owned()]);
        let posix = crate::templates::quote::quote_posix("it's-s3cret").unwrap();
        let powershell = crate::templates::quote::quote_powershell("it's-s3cret").unwrap();
        assert_eq!(m.mask(&format!("echo {posix}")), "echo '********'");
        assert_eq!(
            m.mask(&format!("Write-Output {powershell}")),
            "Write-Output '********'"
        );
        assert_eq!(m.mask("raw it's-s3cret"), "raw ********");
    }

    #[test]
    fn masks_the_start_of_a_secret_cut_off_at_the_output_cap() {
        let m = Masker::new(["hunter2-extended".to_owned()]);
        let cut =
            "token hunter2-ex\n[aiops: output truncated at 16 bytes; 9 more bytes discarded]\n";
        assert_eq!(
            m.mask(cut),
            "token ********\n[aiops: output truncated at 16 bytes; 9 more bytes discarded]\n"
        );
        // Two characters are too few to tell a secret from ordinary text.
        let short = "token hu\n[aiops: output truncated at 8 bytes; 9 more bytes discarded]\n";
        assert_eq!(m.mask(short), short);
        // Without a truncation marker the end of the text is left alone.
        assert_eq!(m.mask("token hunter2-ex"), "token hunter2-ex");
        // Output that prints the marker's text itself does not hide the real one.
        let fake = "[aiops: output truncated at 5 bytes; fake]\n";
        assert_eq!(
            m.mask(&format!("{fake}aaa hunter2-ex\n{}", &cut[17..])),
            format!("{fake}aaa ********\n{}", &cut[17..])
        );
    }

    #[test]
    fn overlapping_secrets_are_masked_as_one() {
        let m = Masker::new(["abcdefXYZ9".to_owned(), "XYZ9876543".to_owned()]);
        assert_eq!(m.mask("id=abcdefXYZ9876543."), "id=********.");
        assert_eq!(m.mask("abcdefXYZ9 and XYZ9876543"), "******** and ********");
        // Occurrences that overlap themselves too.
        let m = Masker::new(["aXa".to_owned()]);
        assert_eq!(m.mask("aXaXa-é"), "********-é");
    }
}
