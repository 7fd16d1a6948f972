//! Quoting of one interpolated value as exactly one literal shell word.
//!
//! POSIX `sh`: values made only of `[A-Za-z0-9_@%+:,./-]` are written bare (they contain
//! nothing the shell interprets); anything else is wrapped in single quotes, inside which `sh`
//! interprets nothing, and each `'` is written as `'\''` (close, escaped quote, reopen). The empty
//! string is `''`. A NUL byte cannot be part of a command line at all, so it is refused.
//!
//! PowerShell: every value is wrapped in single quotes (a verbatim string: no `$` expansion, no
//! backtick escapes, no subexpressions). PowerShell treats the typographic quotes U+2018, U+2019,
//! U+201A and U+201B as single quotes too, so each of those and `'` is doubled.
//!
//! Quoting makes a value one argument; it does not stop a program from reading an argument that
//! starts with `-` as an option. Runbooks put `--` before alert-supplied operands where the program
//! supports it.

/// A value that cannot be passed to a shell.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a value contains a NUL byte, which no shell argument can carry")]
pub struct NulByte;

/// Quotes for POSIX `sh`.
pub fn quote_posix(value: &str) -> Result<String, NulByte> {
    if value.contains('\0') {
        return Err(NulByte);
    }
    if value.is_empty() {
        return Ok("''".to_owned());
    }
    let bare = value
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"_@%+:,./-".contains(&b));
    if bare {
        return Ok(value.to_owned());
    }
    let mut out = String::with_capacity(value.len() + 2);
    out.push('\'');
    for c in value.chars() {
        if c == '\'' {
            out.push_str("'\\''");
        } else {
            out.push(c);
        }
    }
    out.push('\'');
    Ok(out)
}

/// The characters PowerShell accepts as a single quote.
const POWERSHELL_SINGLE_QUOTES: [char; 5] = ['\'', '\u{2018}', '\u{2019}', '\u{201A}', '\u{201B}'];

/// Quotes for PowerShell.
pub fn quote_powershell(value: &str) -> Result<String, NulByte> {
    if value.contains('\0') {
        return Err(NulByte);
    }
    let mut out = String::with_capacity(value.len() + 2);
    out.push('\'');
    for c in value.chars() {
        if POWERSHELL_SINGLE_QUOTES.contains(&c) {
            out.push(c);
        }
        out.push(c);
    }
    out.push('\'');
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn posix_bare_words_stay_bare() {
        assert_eq!(quote_posix("nginx.service").unwrap(), "nginx.service");
        assert_eq!(quote_posix("/var/log").unwrap(), "/var/log");
        assert_eq!(quote_posix("").unwrap(), "''");
    }

    #[test]
    fn posix_quotes_everything_else() {
        assert_eq!(quote_posix("a b").unwrap(), "'a b'");
        assert_eq!(quote_posix("$(id)").unwrap(), "'$(id)'");
        assert_eq!(quote_posix("it's").unwrap(), r"'it'\''s'");
        assert_eq!(quote_posix("a=b").unwrap(), "'a=b'");
        assert_eq!(quote_posix("~root").unwrap(), "'~root'");
        assert_eq!(quote_posix("*").unwrap(), "'*'");
        assert_eq!(quote_posix("é").unwrap(), "'é'");
        assert_eq!(quote_posix("a\0b"), Err(NulByte));
    }

    /// pwsh is not installed here, so this checks the output against PowerShell's rules for
    /// verbatim strings: it starts and ends with `'`; inside, every single-quote character
    /// (ASCII and the four typographic ones) appears in pairs, so none ends the string; `$`,
    /// backticks, `"` and newlines are left as they are (they are literal in a verbatim string).
    #[test]
    fn powershell_rules() {
        let hostile =
            "a'b\u{2018}c\u{2019}d\u{201A}e\u{201B}f $(Get-Process) `n \"x\" ; & | @{}\nline2";
        let q = quote_powershell(hostile).unwrap();
        assert!(q.starts_with('\'') && q.ends_with('\''));
        let inner: Vec<char> = q[1..q.len() - 1].chars().collect();
        let mut i = 0;
        let mut decoded = String::new();
        while i < inner.len() {
            let c = inner[i];
            if POWERSHELL_SINGLE_QUOTES.contains(&c) {
                assert!(
                    i + 1 < inner.len() && POWERSHELL_SINGLE_QUOTES.contains(&inner[i + 1]),
                    "unpaired quote at {i} in {q}"
                );
                decoded.push(c);
                i += 2;
            } else {
                decoded.push(c);
                i += 1;
            }
        }
        assert_eq!(decoded, hostile);
        assert_eq!(quote_powershell("").unwrap(), "''");
        assert_eq!(quote_powershell("nginx").unwrap(), "'nginx'");
        assert_eq!(quote_powershell("it's").unwrap(), "'it''s'");
        assert_eq!(quote_powershell("x\0"), Err(NulByte));
    }
}
