//! The protocol suite of `tests/protocol` on PostgreSQL: the same modules,
//! each test on a fresh database of its own (see `protocol/pg.rs`).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::needless_pass_by_value
)]

#[path = "../protocol/batch.rs"]
mod batch;
#[path = "../protocol/batch_dependencies.rs"]
mod batch_dependencies;
#[path = "../protocol/changes.rs"]
mod changes;
#[path = "../protocol/common.rs"]
mod common;
#[path = "../protocol/entities.rs"]
mod entities;
#[path = "../protocol/faults.rs"]
mod faults;
#[path = "../protocol/idempotency.rs"]
mod idempotency;
#[path = "../protocol/limits.rs"]
mod limits;
#[path = "../protocol/ops.rs"]
mod ops;
#[path = "../protocol/pg.rs"]
mod pg;
#[path = "../protocol/property.rs"]
mod property;
#[path = "../protocol/realtime.rs"]
mod realtime;
#[path = "../protocol/transaction_property.rs"]
mod transaction_property;
#[path = "../protocol/transactions.rs"]
mod transactions;

/// Whether `common::builder` gives each test a PostgreSQL database.
const POSTGRES: bool = true;
