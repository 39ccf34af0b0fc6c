//! Integration tests of wire protocol v1 over real HTTP and WebSocket on
//! 127.0.0.1, against an in-process server on SQLite. One binary, one module
//! per area; `tests/protocol_pg` runs the same modules on PostgreSQL.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::needless_pass_by_value
)]

mod batch;
mod batch_dependencies;
mod changes;
mod common;
mod entities;
mod faults;
mod idempotency;
mod limits;
mod ops;
mod persistence;
mod pg;
mod property;
mod realtime;
mod telemetry;
mod transaction_property;
mod transactions;

/// Whether `common::builder` gives each test a PostgreSQL database.
const POSTGRES: bool = false;
