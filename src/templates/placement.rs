//! Where `{{ }}` may stand in a command: only where the shell reads plain words.
//!
//! Interpolated values arrive already quoted (`quote`). Inside shell quotes, a comment, a heredoc
//! body, backticks or a PowerShell here-string that quoting no longer holds: `"{{ x }}"` with
//! `x = $(id)` renders `"'$(id)'"` and the shell runs `id`; after `#`, a value with a newline ends
//! the comment and its second line runs. So a template that puts `{{ }}` in any of those places
//! is rejected at validation, whatever the value. The scanner reads the template's literal text
//! with the target shell's quoting rules and skips `{% %}` and `{# #}` blocks.
//!
//! What the template engine outputs can differ from what a reading of the template's text
//! sees (a branch taken or not, a string literal holding `}}`, a `{% raw %}` block, text that
//! only forms `$((` or `<<` once rendered). So every command is checked again as rendered, just
//! before it runs ([`check_rendered`]): the renderer writes it once more with each value
//! replaced by [`VALUE_MARK`], and every mark must stand where the shell reads plain words.

/// The shell a command template is written for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shell {
    /// POSIX `sh` (Linux targets).
    Posix,
    /// PowerShell (Windows targets).
    PowerShell,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Word,
    SingleQuoted,
    DoubleQuoted,
    AnsiCQuoted,
    Backticks,
    Comment,
    BlockComment,
    Heredoc,
    HereString {
        double: bool,
    },
    /// `$(( ))`, `(( ))` or `$[ ]`: arithmetic, where quotes do not make text literal (`$((
    /// 'a[$(id)]' ))` runs `id`); `depth` counts the open brackets.
    Arithmetic {
        depth: u32,
        close: char,
    },
    /// `${ }`: a parameter expansion, parts of which (offsets, subscripts) are arithmetic.
    Parameter {
        depth: u32,
    },
    /// `[[ ]]`: bash's test, whose `-eq`, `-lt`, ... operands are read as arithmetic.
    Test {
        depth: u32,
    },
}

impl State {
    fn describe(self) -> &'static str {
        match self {
            State::Word => "a word",
            State::SingleQuoted => "single quotes",
            State::DoubleQuoted => "double quotes",
            State::AnsiCQuoted => "$'...' quotes",
            State::Backticks => "backticks",
            State::Comment | State::BlockComment => "a comment",
            State::Heredoc => "a heredoc body",
            State::HereString { .. } => "a here-string",
            State::Arithmetic { .. } => "an arithmetic expansion, where quoting does not hold",
            State::Parameter { .. } => "a parameter expansion ${...}",
            State::Test { .. } => {
                "a [[ ]] test, whose operands bash may read as arithmetic (use [ ] instead)"
            }
        }
    }
}

/// Template syntax found where the quoting check could not vouch for the command.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", self.explain())]
pub struct Misplaced {
    /// 1-based line within the template.
    pub line: usize,
    /// 1-based column within the template.
    pub column: usize,
    /// Where it was found (`double quotes`, `a comment`, ...).
    pub context: &'static str,
    /// What was found there.
    pub kind: MisplacedKind,
}

/// What [`Misplaced`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MisplacedKind {
    /// `{{ }}` where the shell does not read plain words.
    Interpolation,
    /// Whitespace control (`{{-`, `-}}`, `{%-`, `-%}`, `+%}`, ...): it removes text (a newline
    /// ending a comment or a heredoc) after the check has read it.
    WhitespaceControl,
    /// A `{% %}` tag where the shell is not reading plain words, or with a heredoc waiting for
    /// its body: the text of a branch that is not rendered would still count.
    BlockTag,
    /// `{% set x %}...{% endset %}` or `{% filter %}`: what they capture is quoted, and quoted
    /// again where it is used.
    Capture,
    /// `{{ }}` in a plain word that the command it belongs to reads as code: an argument of
    /// `eval` or `let`, a variable name or a `-i`/`-a`/`-A` value of `declare`, `local`, ...,
    /// the name after `printf -v` or `[ -v`, the script after `sh -c`. The context names the
    /// command.
    EvaluatedArgument,
}

impl Misplaced {
    fn explain(&self) -> String {
        let at = format!(
            "at line {}, column {} of the command",
            self.line, self.column
        );
        match self.kind {
            MisplacedKind::Interpolation => format!(
                "`{{{{ }}}}` {at} is inside {}; interpolated values are quoted already, so \
                 write them as plain words outside quotes",
                self.context
            ),
            MisplacedKind::WhitespaceControl => format!(
                "whitespace control (`{{{{-`, `-}}}}`, `{{%-`, `-%}}`) {at} is not allowed in a \
                 command: it removes text, such as the line break that ends a comment or a \
                 heredoc, that decides how the shell reads the values"
            ),
            MisplacedKind::BlockTag => format!(
                "`{{% %}}` {at} is inside {}; put template tags where the shell reads plain \
                 words (outside quotes, comments and heredocs), so that every branch leaves the \
                 shell reading plain words",
                self.context
            ),
            MisplacedKind::EvaluatedArgument => format!(
                "`{{{{ }}}}` {at} is an argument that `{}` reads as code (arithmetic, an array \
                 subscript or a script), where quoting does not hold; give the value to the \
                 command as the value of an environment variable or of a plain assignment \
                 (`x={{{{ v }}}}`) instead, and compare numbers with `[ ]` or `case`",
                self.context
            ),
            MisplacedKind::Capture => format!(
                "`{{% set %}}...{{% endset %}}` and `{{% filter %}}` {at} are not allowed in a \
                 command: the values they capture are quoted, and quoted again where they are \
                 used; use `{{% set x = ... %}}`"
            ),
        }
    }
}

/// What the renderer writes in place of each value for [`check_rendered`] (a character of
/// Unicode's private use area; one written in the template itself counts as a value too).
pub const VALUE_MARK: char = '\u{E000}';

/// What [`scan`] reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// A template's source: `{{ }}`, `{% %}` and `{# #}` are template syntax.
    Template,
    /// A rendered command with each value written as [`VALUE_MARK`]; braces are shell text.
    Rendered,
}

/// Checks every `{{` of a template against the shell's quoting state at that point.
pub fn check_placement(source: &str, shell: Shell) -> Result<(), Misplaced> {
    scan(source, shell, Mode::Template)
}

/// Checks a rendered command, its values written as [`VALUE_MARK`]: each must stand where the
/// shell reads plain words.
pub fn check_rendered(marked: &str, shell: Shell) -> Result<(), Misplaced> {
    scan(marked, shell, Mode::Rendered)
}

fn scan(source: &str, shell: Shell, mode: Mode) -> Result<(), Misplaced> {
    let chars: Vec<char> = source.chars().collect();
    // Whether the character at `k` begins a value: a mark, or in a template `{{`.
    let value_at = |k: usize| match mode {
        Mode::Rendered => chars.get(k) == Some(&VALUE_MARK),
        Mode::Template => chars.get(k) == Some(&'{') && chars.get(k + 1) == Some(&'{'),
    };
    // Command substitutions `$( )` entered, innermost last: the state to return to at their
    // `)` and the parentheses open inside them.
    let mut outer: Vec<State> = Vec::new();
    let mut parens: Vec<u32> = Vec::new();
    let mut state = State::Word;
    let mut at_word_start = true;
    // The words of the simple command being read (quotes removed), and those of the commands
    // around the `$( )` entered; a value stands for [`VALUE_MARK`] in them.
    let mut words = CommandWords::default();
    let mut outer_words: Vec<CommandWords> = Vec::new();
    let mut pending_heredocs: Vec<(String, bool)> = Vec::new();
    let mut heredoc: Option<(String, bool)> = None;
    let mut line = 1;
    let mut line_start = 0;
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        let next = chars.get(i + 1).copied();
        if mode == Mode::Rendered && c == VALUE_MARK {
            if state != State::Word {
                return Err(Misplaced {
                    line,
                    column: i - line_start + 1,
                    context: state.describe(),
                    kind: MisplacedKind::Interpolation,
                });
            }
            if let Some(command) = words.evaluates_next_value(shell) {
                return Err(Misplaced {
                    line,
                    column: i - line_start + 1,
                    context: command,
                    kind: MisplacedKind::EvaluatedArgument,
                });
            }
            words.current.push(VALUE_MARK);
            at_word_start = false;
            i += 1;
            continue;
        }
        // Template syntax first: it is not shell text.
        if mode == Mode::Template && c == '{' && matches!(next, Some('%') | Some('#') | Some('{')) {
            let close = match next {
                Some('%') => '%',
                Some('#') => '#',
                _ => '}',
            };
            // The tag ends at the first closing delimiter outside its string literals.
            let mut j = i + 2;
            let mut quote: Option<char> = None;
            while j + 1 < chars.len() {
                let d = chars[j];
                match quote {
                    Some(_) if d == '\\' => j += 1,
                    Some(q) if d == q => quote = None,
                    Some(_) => {}
                    None if close != '#' && (d == '\'' || d == '"') => quote = Some(d),
                    None if d == close && chars[j + 1] == '}' => break,
                    None => {}
                }
                j += 1;
            }
            let inner: String = chars[(i + 2).min(j)..j].iter().collect();
            let misplaced = |context: &'static str, kind: MisplacedKind| Misplaced {
                line,
                column: i - line_start + 1,
                context,
                kind,
            };
            if inner.starts_with(['-', '+']) || inner.ends_with(['-', '+']) {
                return Err(misplaced("", MisplacedKind::WhitespaceControl));
            }
            match next {
                Some('{') => {
                    if state != State::Word {
                        return Err(misplaced(state.describe(), MisplacedKind::Interpolation));
                    }
                    if let Some(command) = words.evaluates_next_value(shell) {
                        return Err(misplaced(command, MisplacedKind::EvaluatedArgument));
                    }
                    words.current.push(VALUE_MARK);
                    at_word_start = false;
                }
                Some('%') => {
                    if state != State::Word {
                        return Err(misplaced(state.describe(), MisplacedKind::BlockTag));
                    }
                    if !pending_heredocs.is_empty() {
                        return Err(misplaced(
                            "a line whose heredoc body has not begun",
                            MisplacedKind::BlockTag,
                        ));
                    }
                    let mut words = inner.split_whitespace();
                    let capture = match words.next() {
                        Some("filter") => true,
                        Some("set") => !inner.contains('='),
                        _ => false,
                    };
                    if capture {
                        return Err(misplaced("", MisplacedKind::Capture));
                    }
                }
                _ => {}
            }
            i = j + 2;
            continue;
        }
        if c == '\n' {
            words.read(c, state, shell, next);
            line += 1;
            line_start = i + 1;
            match state {
                State::Comment => state = State::Word,
                State::Word if !pending_heredocs.is_empty() => {
                    heredoc = Some(pending_heredocs.remove(0));
                    state = State::Heredoc;
                }
                State::Heredoc => {}
                _ => {}
            }
            if state == State::Heredoc {
                // Does the line that starts here end the heredoc?
                let end = chars[i + 1..]
                    .iter()
                    .position(|&c| c == '\n')
                    .map_or(chars.len(), |p| i + 1 + p);
                let text: String = chars[i + 1..end].iter().collect();
                if let Some((delimiter, strip_tabs)) = &heredoc {
                    let candidate = if *strip_tabs {
                        text.trim_start_matches('\t')
                    } else {
                        text.as_str()
                    };
                    if candidate == delimiter {
                        i = end;
                        heredoc = None;
                        state = if pending_heredocs.is_empty() {
                            State::Word
                        } else {
                            heredoc = Some(pending_heredocs.remove(0));
                            State::Heredoc
                        };
                        at_word_start = true;
                        continue;
                    }
                }
            }
            at_word_start = true;
            i += 1;
            continue;
        }
        words.read(c, state, shell, next);
        match shell {
            Shell::Posix => match state {
                // A value right after `\` or `$` would not begin its own quoting: `\'` is a
                // literal quote, `$'` begins ANSI-C quoting in bash.
                State::Word if matches!(c, '\\' | '$') && value_at(i + 1) => {
                    return Err(Misplaced {
                        line,
                        column: i - line_start + 2,
                        context: if c == '\\' {
                            "an escape (right after `\\`)"
                        } else {
                            "an expansion (right after `$`)"
                        },
                        kind: MisplacedKind::Interpolation,
                    });
                }
                State::Word => match c {
                    '\\' => i += 1,
                    '\'' => state = State::SingleQuoted,
                    '"' => state = State::DoubleQuoted,
                    '`' => state = State::Backticks,
                    '$' if next == Some('\'') => {
                        state = State::AnsiCQuoted;
                        i += 1;
                    }
                    '$' if next == Some('(') && chars.get(i + 2) == Some(&'(') => {
                        state = State::Arithmetic {
                            depth: 2,
                            close: ')',
                        };
                        i += 2;
                    }
                    '$' if next == Some('(') => {
                        // A command substitution: plain words again until its `)`.
                        outer.push(State::Word);
                        parens.push(0);
                        outer_words.push(std::mem::take(&mut words));
                        i += 1;
                    }
                    // `((` is arithmetic in bash wherever a command may begin (`if((`), and
                    // `[[` a test whose operands bash may evaluate as arithmetic.
                    '(' if next == Some('(') => {
                        state = State::Arithmetic {
                            depth: 2,
                            close: ')',
                        };
                        i += 1;
                    }
                    '[' if at_word_start && next == Some('[') => {
                        state = State::Test { depth: 2 };
                        i += 1;
                    }
                    '(' if !parens.is_empty() => {
                        if let Some(open) = parens.last_mut() {
                            *open += 1;
                        }
                    }
                    ')' if parens.last().is_some_and(|open| *open == 0) => {
                        parens.pop();
                        state = outer.pop().unwrap_or(State::Word);
                        words = outer_words.pop().unwrap_or_default();
                        // The substitution is part of the word being read.
                        words.current.push('$');
                    }
                    ')' if !parens.is_empty() => {
                        if let Some(open) = parens.last_mut() {
                            *open -= 1;
                        }
                    }
                    '$' if next == Some('[') => {
                        state = State::Arithmetic {
                            depth: 1,
                            close: ']',
                        };
                        i += 1;
                    }
                    '$' if next == Some('{') => {
                        state = State::Parameter { depth: 1 };
                        i += 1;
                    }
                    '#' if at_word_start => state = State::Comment,
                    '<' if next == Some('<') && chars.get(i + 2) != Some(&'<') => {
                        let (delimiter, strip_tabs, consumed) = heredoc_delimiter(&chars[i + 2..]);
                        if !delimiter.is_empty() {
                            pending_heredocs.push((delimiter, strip_tabs));
                        }
                        i += 1 + consumed;
                    }
                    _ => {}
                },
                State::SingleQuoted if c == '\'' => state = State::Word,
                State::Arithmetic { depth, close } => {
                    let open = if close == ')' { '(' } else { '[' };
                    if c == open {
                        state = State::Arithmetic {
                            depth: depth + 1,
                            close,
                        };
                    } else if c == close {
                        state = match depth {
                            0 | 1 => State::Word,
                            _ => State::Arithmetic {
                                depth: depth - 1,
                                close,
                            },
                        };
                    }
                }
                State::Test { depth } => match c {
                    '[' => state = State::Test { depth: depth + 1 },
                    ']' if depth <= 1 => state = State::Word,
                    ']' => state = State::Test { depth: depth - 1 },
                    _ => {}
                },
                State::Parameter { depth } => match c {
                    '\\' => i += 1,
                    '{' => state = State::Parameter { depth: depth + 1 },
                    '}' if depth <= 1 => state = State::Word,
                    '}' => state = State::Parameter { depth: depth - 1 },
                    _ => {}
                },
                State::DoubleQuoted | State::Backticks | State::AnsiCQuoted if c == '\\' => i += 1,
                State::DoubleQuoted if c == '"' => state = State::Word,
                // `"$( ... )"`: inside, the shell reads words and quotes of its own (`"$(echo "
                // x ")"` opens a second pair of double quotes), until the `)`.
                State::DoubleQuoted
                    if c == '$' && next == Some('(') && chars.get(i + 2) != Some(&'(') =>
                {
                    outer.push(State::DoubleQuoted);
                    parens.push(0);
                    outer_words.push(std::mem::take(&mut words));
                    state = State::Word;
                    i += 1;
                }
                State::AnsiCQuoted if c == '\'' => state = State::Word,
                State::Backticks if c == '`' => state = State::Word,
                _ => {}
            },
            Shell::PowerShell => match state {
                State::Word => match c {
                    '`' => i += 1,
                    '\'' => state = State::SingleQuoted,
                    '"' => state = State::DoubleQuoted,
                    '@' if next == Some('\'') || next == Some('"') => {
                        state = State::HereString {
                            double: next == Some('"'),
                        };
                        i += 1;
                    }
                    '<' if next == Some('#') => {
                        state = State::BlockComment;
                        i += 1;
                    }
                    '#' if at_word_start => state = State::Comment,
                    _ => {}
                },
                State::SingleQuoted if is_powershell_single_quote(c) => state = State::Word,
                State::DoubleQuoted if c == '`' => i += 1,
                State::DoubleQuoted if c == '"' => state = State::Word,
                State::BlockComment if c == '#' && next == Some('>') => {
                    state = State::Word;
                    i += 1;
                }
                State::HereString { double } => {
                    let quote = if double { '"' } else { '\'' };
                    let starts_line = i == line_start;
                    if starts_line && c == quote && next == Some('@') {
                        state = State::Word;
                        i += 1;
                    }
                }
                _ => {}
            },
        }
        at_word_start = c.is_whitespace() || matches!(c, ';' | '|' | '&' | '(' | ')');
        i += 1;
    }
    Ok(())
}

/// The words of the simple command being read, to know what reads a value as code.
#[derive(Debug, Default)]
struct CommandWords {
    /// Finished words.
    done: Vec<String>,
    /// The word being read.
    current: String,
}

/// Commands (bash builtins) that read every argument as code: arithmetic, or a script.
const EVALUATING_COMMANDS: [&str; 3] = ["eval", "let", "trap"];

/// Builtins whose arguments name variables, whose array subscripts bash evaluates as
/// arithmetic (`unset 'a[$(id)]'` runs `id`).
const NAMING_COMMANDS: [&str; 5] = ["read", "unset", "mapfile", "readarray", "getopts"];

/// Builtins that declare variables: a value in a variable's name (before `=`) has its subscript
/// evaluated, and with `-i`, `-a` or `-A` the value itself is arithmetic or an array
/// assignment that bash parses (`declare -a a='($(id))'` runs `id`).
const DECLARING_COMMANDS: [&str; 5] = ["declare", "typeset", "local", "readonly", "export"];

/// Shells whose `-c` argument is a script.
const SHELLS: [&str; 7] = ["sh", "bash", "dash", "ash", "ksh", "zsh", "busybox"];

/// Words that run the command after them (with options of their own): what comes after is
/// the command the check looks at. With the options that take a separate argument.
const PREFIX_COMMANDS: [(&str, &[&str]); 14] = [
    ("command", &[]),
    ("builtin", &[]),
    ("exec", &["-a"]),
    ("time", &[]),
    ("coproc", &[]),
    ("nohup", &[]),
    ("nice", &["-n"]),
    ("env", &["-u", "-C", "--unset", "--chdir"]),
    (
        "sudo",
        &["-u", "-g", "-C", "-D", "-h", "-p", "-r", "-t", "-U", "-T"],
    ),
    ("doas", &["-u", "-C"]),
    ("setsid", &[]),
    ("stdbuf", &["-i", "-o", "-e"]),
    // Their first operand (a duration, a directory) comes before the command.
    ("timeout", &["-s", "-k", "--signal", "--kill-after"]),
    ("chroot", &["--userspec", "--groups"]),
];

/// Shell reserved words that may come before a command.
const RESERVED_BEFORE_COMMAND: [&str; 9] = [
    "if", "then", "else", "elif", "do", "while", "until", "!", "{",
];

/// Whether a word is a redirection (`>f`, `2>/dev/null`, `<<<x`, `&>f`), and whether it is
/// only the operator, so that the next word is its target.
fn redirection(word: &str) -> Option<bool> {
    let rest = word.trim_start_matches(|c: char| c.is_ascii_digit());
    let rest = rest.strip_prefix('&').unwrap_or(rest);
    if !rest.starts_with(['<', '>']) {
        return None;
    }
    let target = rest.trim_start_matches(['<', '>', '&', '|', '-']);
    Some(target.is_empty())
}

impl CommandWords {
    /// Takes in the character `c` read in `state` (before the state machine moves on).
    fn read(&mut self, c: char, state: State, shell: Shell, next: Option<char>) {
        match state {
            State::Word => {
                // `&` right after `>` or `<`, or before `>`, belongs to a redirection.
                let in_redirection =
                    c == '&' && (self.current.ends_with(['<', '>']) || next == Some('>'));
                let separator = match shell {
                    Shell::Posix => {
                        matches!(c, ';' | '|' | '&' | '(' | ')' | '\n') && !in_redirection
                    }
                    Shell::PowerShell => matches!(c, ';' | '|' | '(' | ')' | '{' | '}' | '\n'),
                };
                if separator {
                    self.done.clear();
                    self.current.clear();
                } else if c.is_whitespace() {
                    if !self.current.is_empty() {
                        self.done.push(std::mem::take(&mut self.current));
                    }
                } else if shell == Shell::Posix && c == '\\' {
                    // The escaped character is part of the word (`\eval` is `eval`); the
                    // scanner steps over it.
                    if let Some(n) = next.filter(|n| *n != '\n') {
                        self.current.push(n);
                    }
                } else if !matches!(c, '\'' | '"') {
                    // `$(` begins a substitution, read as a command of its own; `$'` and `$"`
                    // begin quotes.
                    if !(c == '$' && matches!(next, Some('(') | Some('\'') | Some('"'))) {
                        self.current.push(c);
                    }
                }
            }
            State::SingleQuoted | State::DoubleQuoted | State::AnsiCQuoted
                if !matches!(c, '\'' | '"') =>
            {
                self.current.push(c);
            }
            _ => {}
        }
    }

    /// The command, when the value about to be read is an argument it reads as code.
    fn evaluates_next_value(&self, shell: Shell) -> Option<&'static str> {
        static SUBSCRIPT: std::sync::LazyLock<regex::Regex> = std::sync::LazyLock::new(|| {
            regex::Regex::new(r"^[A-Za-z_][A-Za-z0-9_]*\[[^\]]*$").expect("valid pattern")
        });
        if shell == Shell::Posix && SUBSCRIPT.is_match(&self.current) {
            // `a[{{ n }}]=1`, `declare a[{{ n }}]`: an array subscript is arithmetic.
            return Some("an array subscript");
        }
        // A redirection's target is a file name, whatever the command.
        if redirection(&self.current).is_some()
            || self.done.last().and_then(|w| redirection(w)) == Some(true)
        {
            return None;
        }
        // The words of the command without its redirections.
        let mut words: Vec<&str> = Vec::new();
        let mut skip_target = false;
        for w in &self.done {
            if skip_target {
                skip_target = false;
                continue;
            }
            match redirection(w) {
                Some(bare) => skip_target = bare,
                None => words.push(w),
            }
        }
        // The command word: past reserved words, assignments and the commands that run the
        // command after them (`command`, `sudo -u x`, `env A=1`, `timeout 5`, ...).
        let assignment = |w: &str| {
            w.split_once('=').is_some_and(|(name, _)| {
                !name.is_empty()
                    && !name.starts_with(|c: char| c.is_ascii_digit())
                    && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
            })
        };
        let mut i = 0;
        while i < words.len() {
            let w = words[i];
            if RESERVED_BEFORE_COMMAND.contains(&w) || assignment(w) {
                i += 1;
                continue;
            }
            let base = w.rsplit('/').next().unwrap_or(w);
            let Some((name, with_argument)) = PREFIX_COMMANDS.iter().find(|(n, _)| *n == base)
            else {
                break;
            };
            i += 1;
            // Its options (and their arguments), then its own operand where it has one.
            while i < words.len() && words[i].starts_with('-') {
                let option = words[i];
                i += 1;
                if option == "--" {
                    break;
                }
                if with_argument.contains(&option) {
                    i += 1;
                }
            }
            if matches!(*name, "timeout" | "chroot") {
                i += 1;
            }
            while i < words.len() && *name == "env" && assignment(words[i]) {
                i += 1;
            }
        }
        let Some(command_word) = words.get(i).copied() else {
            // The value is itself at the command's place: it names the program to run.
            return None;
        };
        let command = command_word.rsplit('/').next().unwrap_or(command_word);
        let args = &words[i + 1..];
        let find = |list: &[&'static str]| list.iter().copied().find(|n| *n == command);
        if shell == Shell::PowerShell {
            let lower = command.to_ascii_lowercase();
            return ["invoke-expression", "iex"]
                .iter()
                .any(|n| *n == lower)
                .then_some("Invoke-Expression");
        }
        if let Some(name) = find(&EVALUATING_COMMANDS).or_else(|| find(&NAMING_COMMANDS)) {
            return Some(name);
        }
        if let Some(name) = find(&DECLARING_COMMANDS) {
            let typed = args.iter().any(|a| {
                a.len() > 1
                    && (a.starts_with('-') || a.starts_with('+'))
                    && a[1..].contains(['i', 'a', 'A', 'n'])
            });
            // Before `=`, the value is (part of) a variable's name.
            return (typed || !self.current.contains('=')).then_some(name);
        }
        let previous = args.last().copied();
        let short_options = |a: &str| {
            a.len() > 1
                && a.starts_with('-')
                && !a.starts_with("--")
                && a[1..].chars().all(char::is_alphanumeric)
        };
        match command {
            "printf" | "test" | "[" if previous == Some("-v") || self.current == "-v" => {
                Some(if command == "printf" {
                    "printf -v"
                } else {
                    "test -v"
                })
            }
            "wait" if previous == Some("-p") => Some("wait -p"),
            _ if SHELLS.contains(&command) && self.current.is_empty() => {
                // The first operand after an option cluster holding `c` (`-c`, `-ec`, `-lc`)
                // is the script; `--` may come between.
                let script_next = args
                    .iter()
                    .rposition(|a| short_options(a) && a[1..].contains('c'))
                    .is_some_and(|at| {
                        args[at + 1..]
                            .iter()
                            .all(|a| *a == "--" || short_options(a))
                    });
                script_next.then_some("sh -c")
            }
            _ => None,
        }
    }
}

fn is_powershell_single_quote(c: char) -> bool {
    matches!(c, '\'' | '\u{2018}' | '\u{2019}' | '\u{201A}' | '\u{201B}')
}

/// Reads the delimiter after `<<` (with `-`, blanks and quotes); returns it, whether leading tabs
/// are stripped, and how many characters were read.
fn heredoc_delimiter(rest: &[char]) -> (String, bool, usize) {
    let mut i = 0;
    let strip_tabs = rest.first() == Some(&'-');
    if strip_tabs {
        i += 1;
    }
    while rest.get(i).is_some_and(|c| *c == ' ' || *c == '\t') {
        i += 1;
    }
    let mut delimiter = String::new();
    while let Some(&c) = rest.get(i) {
        if c.is_whitespace() || matches!(c, ';' | '|' | '&' | '<' | '>' | '(' | ')') {
            break;
        }
        if !matches!(c, '\'' | '"' | '\\') {
            delimiter.push(c);
        }
        i += 1;
    }
    (delimiter, strip_tabs, i)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn posix(s: &str) -> Result<(), Misplaced> {
        check_placement(s, Shell::Posix)
    }

    #[test]
    fn plain_words_are_fine() {
        assert!(posix("systemctl restart -- {{ vars.SERVICE }}").is_ok());
        assert!(posix("echo 'fixed text' {{ x }} \"more\" {{ y }}").is_ok());
        assert!(posix("echo \"it's\" {{ x }}").is_ok());
        assert!(posix("echo $(cat {{ file }})").is_ok());
        assert!(posix("echo $(( 1 + 2 )) {{ x }} ${HOME} {{ y }}").is_ok());
        assert!(posix("( (true) ) && echo {{ x }}").is_ok());
        assert!(posix("{% if x %}echo 'a'{% endif %} {{ y }}").is_ok());
        assert!(
            posix("a#b {{ x }}").is_ok(),
            "# inside a word is not a comment"
        );
        assert!(posix("cat <<'EOF'\nliteral\nEOF\necho {{ x }}").is_ok());
        assert!(
            posix("echo {{ \"it's\" }}").is_ok(),
            "quotes inside the tag are template syntax"
        );
    }

    #[test]
    fn quoted_contexts_are_rejected() {
        for (src, context) in [
            ("echo '{{ x }}'", "single quotes"),
            ("echo \"{{ x }}\"", "double quotes"),
            ("echo \"a \\\" {{ x }}\"", "double quotes"),
            ("echo $'{{ x }}'", "$'...' quotes"),
            ("echo `cat {{ x }}`", "backticks"),
            ("echo ok # note {{ x }}", "a comment"),
            ("cat <<EOF\n{{ x }}\nEOF", "a heredoc body"),
            ("cat <<-EOF\n\t{{ x }}\n\tEOF", "a heredoc body"),
            ("sh -c 'systemctl restart {{ x }}'", "single quotes"),
            (
                "echo $(( {{ x }} ))",
                "an arithmetic expansion, where quoting does not hold",
            ),
            (
                "echo $(( 1 + (2 * {{ x }}) ))",
                "an arithmetic expansion, where quoting does not hold",
            ),
            (
                "(( n = {{ x }} ))",
                "an arithmetic expansion, where quoting does not hold",
            ),
            (
                "echo $[ {{ x }} ]",
                "an arithmetic expansion, where quoting does not hold",
            ),
            ("echo ${X:{{ x }}}", "a parameter expansion ${...}"),
            ("echo ${A[{{ x }}]}", "a parameter expansion ${...}"),
        ] {
            let err = posix(src).unwrap_err();
            assert_eq!(err.context, context, "{src}");
        }
        let err = posix("echo ok\necho \"{{ x }}\"").unwrap_err();
        assert_eq!((err.line, err.column), (2, 7));
    }

    #[test]
    fn arguments_a_builtin_reads_as_code_are_rejected() {
        for (src, command) in [
            ("let n={{ x }}", "let"),
            ("eval echo {{ x }}", "eval"),
            ("x=1 command eval {{ x }}", "eval"),
            ("trap {{ x }} EXIT", "trap"),
            ("declare -i m; m=1; declare -i n={{ x }}", "declare"),
            ("declare -a arr={{ x }}", "declare"),
            ("typeset -i t={{ x }}", "typeset"),
            ("f() { local -i v={{ x }}; }", "local"),
            ("export {{ x }}", "export"),
            ("readonly {{ x }}=1", "readonly"),
            ("unset {{ x }}", "unset"),
            ("read -r {{ x }} < /etc/hostname", "read"),
            ("printf -v {{ x }} '%s' 1", "printf -v"),
            ("[ -v {{ x }} ]", "test -v"),
            ("if test -v {{ x }}; then echo y; fi", "test -v"),
            ("echo ok; bash -c {{ x }}", "sh -c"),
            ("echo $(let n={{ x }})", "let"),
            // Other spellings of the same commands.
            ("\\eval echo {{ x }}", "eval"),
            ("$'eval' {{ x }}", "eval"),
            ("2>/dev/null eval echo {{ x }}", "eval"),
            ("2>&1 eval {{ x }}", "eval"),
            ("> /tmp/out eval {{ x }}", "eval"),
            ("command -- eval echo {{ x }}", "eval"),
            ("command -p eval {{ x }}", "eval"),
            ("time -p eval {{ x }}", "eval"),
            ("coproc eval {{ x }}", "eval"),
            ("exec eval {{ x }}", "eval"),
            ("sudo -u root sh -c {{ x }}", "sh -c"),
            ("env A=1 bash -c {{ x }}", "sh -c"),
            ("timeout 5 sh -c {{ x }}", "sh -c"),
            ("/bin/sh -c {{ x }}", "sh -c"),
            ("bash -lc {{ x }}", "sh -c"),
            ("sh -ec {{ x }}", "sh -c"),
            ("bash -c -- {{ x }}", "sh -c"),
            ("a[{{ x }}]=1", "an array subscript"),
            ("declare -n r={{ x }}", "declare"),
            ("f() { local -n ref={{ x }}; }", "local"),
            ("sleep 1 & wait -n -p {{ x }}", "wait -p"),
            ("echo \"$(eval {{ x }})\"", "eval"),
        ] {
            let err = posix(src)
                .err()
                .unwrap_or_else(|| panic!("accepted: {src}"));
            assert_eq!(
                (err.kind, err.context),
                (MisplacedKind::EvaluatedArgument, command),
                "{src}"
            );
            assert!(err.to_string().contains(command), "{err}");
        }
        // The same commands with values where bash reads them as plain text.
        for src in [
            "export PGPASSWORD={{ x }}",
            "local name={{ x }}",
            "declare -r v={{ x }}",
            "printf -v out '%s' {{ x }}",
            "printf '%s\\n' {{ x }}",
            "[ {{ x }} -gt 90 ]",
            "sh -c 'echo \"$1\"' sh {{ x }}",
            "let n=1\necho {{ x }}",
            "eval true; echo {{ x }}",
            "echo $(eval true) {{ x }}",
            "{{ cmd }} --flag {{ x }}",
            "read -r line < {{ x }}",
            "mapfile -t lines < {{ x }}",
            "eval true 2> {{ x }}",
            "sudo -u {{ x }} systemctl restart nginx",
            "timeout {{ x }} curl -sf http://localhost/",
            "env LANG=C sort {{ x }}",
            "bash -c 'echo \"$1\"' bash {{ x }}",
        ] {
            assert!(posix(src).is_ok(), "{src}: {:?}", posix(src));
        }
        // The rendered command is checked the same way.
        let marked = format!("let n={VALUE_MARK}");
        assert_eq!(
            check_rendered(&marked, Shell::Posix).unwrap_err().kind,
            MisplacedKind::EvaluatedArgument
        );
        let ps = |s| check_placement(s, Shell::PowerShell);
        assert_eq!(
            ps("Invoke-Expression {{ x }}").unwrap_err().kind,
            MisplacedKind::EvaluatedArgument
        );
        assert!(ps("Write-Output {{ x }}").is_ok());
    }

    #[test]
    fn whitespace_control_and_branches_cannot_move_a_value_out_of_place() {
        for (src, kind) in [
            (
                "echo hello # note\n{{- x }}",
                MisplacedKind::WhitespaceControl,
            ),
            (
                "cat <<EOF\nhello\nEOF\n{{- x }}",
                MisplacedKind::WhitespaceControl,
            ),
            ("echo a {{ x -}}\n", MisplacedKind::WhitespaceControl),
            (
                "echo a # {%- if x %}\n{% endif %}",
                MisplacedKind::WhitespaceControl,
            ),
            ("echo a {#- note -#}", MisplacedKind::WhitespaceControl),
            (
                "echo {% if true %}\"{% else %}\"{% endif %} {{ x }} \"",
                MisplacedKind::BlockTag,
            ),
            ("echo ok # {% if x %}{% endif %}", MisplacedKind::BlockTag),
            (
                "cat <<EOF {% if x %}\n{% endif %}EOF",
                MisplacedKind::BlockTag,
            ),
            (
                "{% set y %}{{ x }}{% endset %}echo {{ y }}",
                MisplacedKind::Capture,
            ),
            (
                "{% filter upper %}{{ x }}{% endfilter %}",
                MisplacedKind::Capture,
            ),
        ] {
            let err = posix(src).unwrap_err();
            assert_eq!(err.kind, kind, "{src}: {err}");
        }
        // Tags where the shell reads plain words are fine, in loops and branches alike.
        assert!(posix("{% for h in hosts %}ping -c1 {{ h }}; {% endfor %}").is_ok());
        assert!(posix("{% set y = x ~ '.conf' %}cat {{ y }}").is_ok());
        assert!(posix("echo {{ -1 }} {{ a - b }}").is_ok());
    }

    #[test]
    fn powershell_contexts() {
        let ps = |s| check_placement(s, Shell::PowerShell);
        assert!(ps("Restart-Service -Name {{ vars.SERVICE }} -Force").is_ok());
        assert!(ps("Write-Output 'it''s' {{ x }}").is_ok());
        assert_eq!(
            ps("Write-Output \"{{ x }}\"").unwrap_err().context,
            "double quotes"
        );
        assert_eq!(
            ps("Write-Output '{{ x }}'").unwrap_err().context,
            "single quotes"
        );
        assert_eq!(ps("# {{ x }}").unwrap_err().context, "a comment");
        assert_eq!(ps("<# {{ x }} #>").unwrap_err().context, "a comment");
        assert_eq!(ps("@'\n{{ x }}\n'@").unwrap_err().context, "a here-string");
        assert!(ps("@'\nfixed\n'@\n{{ x }}").is_ok());
    }
}
