//! `gsync`: inspect and drain guardian-sync outboxes, run the reference server, demo.

// Every `println!` and `print!` of the commands goes through `cmd::out`, so
// that a closed stdout (`gsync ops | head -1`) ends the process quietly
// instead of panicking. Defined before `mod cmd` so that the commands' plain
// `println!` resolves to these (a macro in textual scope shadows the
// prelude's).
macro_rules! println {
    () => {
        $crate::cmd::out::write(format_args!("\n"))
    };
    ($($arg:tt)*) => {
        $crate::cmd::out::write(format_args!("{}\n", format_args!($($arg)*)))
    };
}

macro_rules! print {
    ($($arg:tt)*) => {
        $crate::cmd::out::write(format_args!($($arg)*))
    };
}

mod cmd;
mod logging;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use crate::cmd::out::{one_line, Stopped, FAILURE, USAGE};

/// Command-line tool for guardian-sync.
#[derive(Debug, Parser)]
#[command(name = "gsync", version, about)]
struct Cli {
    #[command(flatten)]
    global: Global,
    #[command(subcommand)]
    command: Command,
}

/// Options every subcommand understands.
#[derive(Debug, Args)]
pub(crate) struct Global {
    /// Outbox file to work on.
    #[arg(long, global = true, env = "GSYNC_OUTBOX", default_value = "gsync.db")]
    pub(crate) outbox: PathBuf,
    /// Print machine-readable JSON instead of tables (errors too: one JSON
    /// object on stderr).
    #[arg(long, global = true)]
    pub(crate) json: bool,
}

#[derive(Debug, Subcommand)]
enum Command {
    #[command(flatten)]
    Outbox(cmd::outbox::Command),
    /// Run the reference backend (wire protocol v1).
    Serve(Box<cmd::serve::Args>),
    /// Drain the outbox to a server (holds the processing lock while running).
    Run(cmd::run::Args),
    /// Follow a server's change feed live (WebSocket, falling back to polling).
    Watch(cmd::watch::Args),
    /// Show the whole engine under chaos (server faults, an outage, a killed
    /// runner) and check every op against a model; exit 0 only if no op was
    /// lost, duplicated or reordered.
    Demo(cmd::demo::Args),
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return usage_error(&e),
    };
    logging::init(log_default(&cli.command));
    let on_outbox = matches!(cli.command, Command::Outbox(_) | Command::Run(_));
    let result = match cli.command {
        Command::Outbox(c) => cmd::outbox::run(&cli.global, c),
        Command::Serve(args) => cmd::serve::run(&cli.global, *args),
        Command::Run(args) => cmd::run::run(&cli.global, args),
        Command::Demo(args) => cmd::demo::run(&cli.global, args),
        Command::Watch(args) => cmd::watch::run(&cli.global, args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line, no backtrace: user errors are not crashes.
            let (code, kind) = match e.downcast_ref::<Stopped>() {
                Some(stopped) => (stopped.code, stopped.kind),
                None => (FAILURE, "error"),
            };
            let mut message = one_line(&e);
            if on_outbox {
                message.push_str(&disk_full_hint(&message, &cli.global.outbox));
            }
            report(cli.global.json, kind, &message, code)
        }
    }
}

/// `"; the disk holding <dir> is full"` when SQLite's message says I/O
/// failed or the disk is full and the outbox's file system has (almost) no
/// room: its own words for both ("disk I/O error" from mapping a
/// shared-memory file, say) do not tell the user what to do. SQLite's
/// "full" with room found now (the failed write's log was removed since,
/// or a file size limit stopped it) says so in the past.
fn disk_full_hint(message: &str, outbox: &std::path::Path) -> String {
    let full = message.contains("database or disk is full");
    if !full && !message.contains("disk I/O error") {
        return String::new();
    }
    let dir = match outbox.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => std::path::Path::new("."),
    };
    match nix::sys::statvfs::statvfs(dir) {
        // Less than one 64 KiB write: SQLite's next page or WAL frame, or
        // its shared-memory file, cannot be written.
        Ok(fs) if fs.blocks_available().saturating_mul(fs.fragment_size()) < 65_536 => {
            format!(
                "; the disk holding {} is full: free some space and try again",
                dir.display()
            )
        }
        _ if full => format!(
            "; the disk holding {} was full when it was written (or a file size limit \
             stopped the write): free some space and try again",
            dir.display()
        ),
        _ => String::new(),
    }
}

/// Prints an error as one line on stderr, or as one JSON object with
/// `--json`, and gives the exit status.
fn report(json: bool, kind: &str, message: &str, code: u8) -> ExitCode {
    if json {
        let error = serde_json::json!({
            "error": { "kind": kind, "message": message, "exit_code": code }
        });
        eprintln!("{error}");
    } else {
        eprintln!("gsync: {message}");
    }
    ExitCode::from(code)
}

/// A usage error as every other error: one line on stderr (one JSON object
/// with `--json`), exit status 2, a missing command included. `--help`
/// and `--version` print as clap prints them.
fn usage_error(e: &clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
        let _ = e.print();
        return ExitCode::from(u8::try_from(e.exit_code()).unwrap_or(USAGE));
    }
    let line = if matches!(
        e.kind(),
        ErrorKind::MissingSubcommand | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
    ) {
        // Only the top level requires a command; clap would print its help.
        let commands: Vec<String> = <Cli as clap::CommandFactory>::command()
            .get_subcommands()
            .map(|c| c.get_name().to_owned())
            .filter(|name| name != "help")
            .collect();
        format!(
            "a command is required ({}); see gsync --help",
            commands.join(", ")
        )
    } else {
        e.render()
            .to_string()
            .lines()
            .map(str::trim)
            .filter(|l| {
                !l.is_empty() && !l.starts_with("Usage:") && !l.starts_with("For more information")
            })
            .collect::<Vec<_>>()
            .join(" ")
    };
    let message = line.strip_prefix("error: ").unwrap_or(&line);
    // The arguments did not parse, so `--json` is looked for by hand
    // (before a `--`, where it is a flag and not a value).
    let json = std::env::args_os()
        .skip(1)
        .take_while(|a| a != "--")
        .any(|a| a == "--json");
    report(json, "usage", message, USAGE)
}

/// Logs go to stderr, without colours off a terminal. By default the outbox
/// commands and `run` log nothing: they print what a user needs themselves,
/// and a log record would break their one-line errors. `RUST_LOG` overrides
/// the default.
/// The log level of a command when `RUST_LOG` is not set: commands whose
/// output is the answer stay silent, the server says what it serves.
fn log_default(command: &Command) -> &'static str {
    match command {
        Command::Serve(_) => "info",
        Command::Watch(_) | Command::Demo(_) => "warn",
        Command::Outbox(_) | Command::Run(_) => "off",
    }
}
