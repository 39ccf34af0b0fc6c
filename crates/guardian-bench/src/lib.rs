//! Helpers of guardian-sync's benchmark suite (`cargo bench -p guardian-bench`).
//!
//! The scenarios themselves live in `benches/all/`; this library holds what
//! they share and what is worth unit-testing: medians and per-run ratios
//! ([`stats`]), the machine description printed above every table
//! ([`machine`]), Markdown tables ([`report`]), counters from the server's Prometheus text ([`prom`]) and a loopback TCP proxy that
//! counts bytes and notes when the first request arrived ([`proxy`]).
//!
//! Peers measured against (the `queue-file` crate, bare rusqlite, bare
//! reqwest) are dev-dependencies of this crate only, never of the library.
#![warn(missing_docs)]

pub mod machine;
pub mod prom;
pub mod proxy;
pub mod report;
pub mod stats;
