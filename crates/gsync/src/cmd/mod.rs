//! One module per group of subcommands.

pub(crate) mod demo;
pub(crate) mod outbox;
pub(crate) mod run;
pub(crate) mod serve;
pub(crate) mod watch;
