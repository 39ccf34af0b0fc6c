//! `gsync serve` (in progress).

use crate::Global;

/// Arguments of `gsync serve`.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {}

pub(crate) fn run(_global: &Global, _args: Args) -> anyhow::Result<()> {
    anyhow::bail!("not built yet")
}
