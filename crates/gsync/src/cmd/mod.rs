//! One module per group of subcommands.

pub(crate) mod demo;
pub(crate) mod out;
pub(crate) mod outbox;
pub(crate) mod progress;
pub(crate) mod run;
pub(crate) mod serve;
pub(crate) mod watch;
