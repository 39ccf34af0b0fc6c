//! `gsync`: inspect and drain guardian-sync outboxes, run the reference server, demo.

mod cmd;
mod logging;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

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
    /// Print machine-readable JSON instead of tables.
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
    let cli = Cli::parse();
    // Logs go to stderr; RUST_LOG overrides the quiet default. Tokens and
    // payloads are never logged at info level by the libraries.
    logging::init("warn");
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
            eprintln!("gsync: {e:#}");
            ExitCode::FAILURE
        }
    }
}
