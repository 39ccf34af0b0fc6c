//! Outbox inspection commands (in progress).

use crate::Global;

/// Outbox commands.
#[derive(Debug, clap::Subcommand)]
pub(crate) enum Command {
    /// Show counts by state.
    Status,
}

pub(crate) fn run(_global: &Global, _command: Command) -> anyhow::Result<()> {
    anyhow::bail!("not built yet")
}
