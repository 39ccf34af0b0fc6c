//! What gsync prints: standard output that survives a closed pipe, one-line
//! errors, and the exit statuses (listed in the README).

use std::fmt;
use std::io::Write as _;

/// Exit status: an error of gsync or of its input (clap's usage errors
/// exit with 2, unchanged).
pub(crate) const FAILURE: u8 = 1;
/// Exit status of a usage error: arguments that do not parse, or values
/// gsync refuses once they do (a zero interval, a bad URL, an invalid
/// entity type, a payload that is not JSON).
pub(crate) const USAGE: u8 = 2;
/// Exit status of `run --once`: ops remain (due after `--max-wait`, or
/// blocked behind a failed op).
pub(crate) const OPS_REMAIN: u8 = 3;
/// Exit status of `run --once`: this pass moved ops to the failed list.
pub(crate) const DEAD_LETTERED: u8 = 4;
/// Exit status of `run --once`: the server refused the token.
pub(crate) const AUTH_REFUSED: u8 = 5;
/// Exit status of `run --once`: another runner held the processing lock
/// for all of `--max-wait`.
pub(crate) const LOCK_HELD: u8 = 6;

/// A command that ended without an error of its own but not as asked, with
/// the exit status and the one line that says why.
#[derive(Debug)]
pub(crate) struct Stopped {
    /// Exit status.
    pub(crate) code: u8,
    /// Short name for JSON (`ops_remain`, `dead_lettered`, ...).
    pub(crate) kind: &'static str,
    /// Why, in words.
    pub(crate) reason: String,
}

impl fmt::Display for Stopped {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.reason)
    }
}

impl std::error::Error for Stopped {}

/// A usage error (status 2) saying `e` on one line.
pub(crate) fn usage(e: impl Into<anyhow::Error>) -> Stopped {
    Stopped {
        code: USAGE,
        kind: "usage",
        reason: one_line(&e.into()),
    }
}

/// An error and its causes on one line, each cause said once: many errors
/// already repeat their source's text in their own message, and printing
/// the chain as it is would say the same thing twice.
pub(crate) fn one_line(e: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in e.chain() {
        let part = flat(&cause.to_string());
        if part.is_empty() || text.contains(&part) {
            continue;
        }
        if !text.is_empty() {
            text.push_str(": ");
        }
        text.push_str(&part);
    }
    text
}

/// `text` on one line: each run of white space becomes one space.
pub(crate) fn flat(text: &str) -> String {
    printable(&text.split_whitespace().collect::<Vec<_>>().join(" "))
}

/// `text` without control characters, which a server's or a damaged
/// file's text may carry to a terminal: a line break or tab becomes a
/// space, any other is written as an escape (`\u{1b}`).
pub(crate) fn printable(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '\n' | '\r' | '\t' => out.push(' '),
            c if c.is_control() => out.extend(c.escape_default()),
            c => out.push(c),
        }
    }
    out
}

/// The change a command has made, once it has (see [`made`]).
static MADE: std::sync::Mutex<Option<Made>> = std::sync::Mutex::new(None);

/// A change made, in words, and whether warnings are JSON.
struct Made {
    what: String,
    json: bool,
}

/// Records that the command has made its change (`what`, e.g. "op … was
/// stored"): from here on, output that cannot be written is a warning
/// and the status stays 0, since the exit status says whether the change
/// was made and a script retrying on a failure would make it twice.
pub(crate) fn made(what: String, json: bool) {
    if let Ok(mut made) = MADE.lock() {
        *made = Some(Made { what, json });
    }
}

/// Writes to standard output (what `println!` and `print!` expand to).
///
/// A reader that went away (a closed pipe) ends the process at once with
/// status 0, as it would for a program killed by SIGPIPE, minus the noise:
/// nothing is left to say to anybody. Any other write error ends it with
/// one line and status 1, or, once a change is [`made`], with a warning
/// naming it and status 0. Only read-only output, event lines and the
/// results of changes are printed this way; a runner ended here releases
/// its lock through the OS like a killed one.
pub(crate) fn write(args: fmt::Arguments<'_>) {
    let mut out = std::io::stdout().lock();
    let result = out.write_fmt(args).and_then(|()| out.flush());
    if let Err(e) = result {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        let made = MADE.lock().ok().and_then(|mut m| m.take());
        let Some(Made { what, json }) = made else {
            let _ = writeln!(
                std::io::stderr(),
                "gsync: cannot write to standard output: {e}"
            );
            std::process::exit(i32::from(FAILURE));
        };
        let message = flat(&format!(
            "{what}, but its result could not be written to standard output: {e}"
        ));
        // Stderr may be on the same full disk: its failure must not turn
        // the change made into a panic's status.
        let mut err = std::io::stderr().lock();
        let _ = if json {
            let warning =
                serde_json::json!({"warning": {"kind": "output_lost", "message": message}});
            writeln!(err, "{warning}")
        } else {
            writeln!(err, "gsync: warning: {message}")
        };
        std::process::exit(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct Full;

    impl fmt::Display for Full {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("database or disk is full")
        }
    }

    impl std::error::Error for Full {}

    #[derive(Debug)]
    struct Wrapping(Full);

    impl fmt::Display for Wrapping {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            write!(f, "cannot write: {}", self.0)
        }
    }

    impl std::error::Error for Wrapping {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.0)
        }
    }

    #[test]
    fn a_cause_already_in_the_message_is_not_repeated() {
        let e = anyhow::Error::new(Wrapping(Full)).context("cannot enqueue");
        assert_eq!(
            one_line(&e),
            "cannot enqueue: cannot write: database or disk is full"
        );
    }

    #[test]
    fn control_characters_are_escaped_and_breaks_become_spaces() {
        let e = anyhow::anyhow!("line one\nline two\r\n\u{1b}[1mbold\u{1b}[0m\u{7}");
        assert_eq!(
            one_line(&e),
            "line one line two \\u{1b}[1mbold\\u{1b}[0m\\u{7}"
        );
        assert_eq!(printable("a\tb  c\u{9b}"), "a b  c\\u{9b}");
    }

    #[test]
    fn a_multi_line_message_becomes_one_line() {
        let e = anyhow::anyhow!("first\n  second").context("outer");
        assert_eq!(one_line(&e), "outer: first second");
    }
}
