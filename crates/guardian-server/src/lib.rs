//! guardian-server: the reference backend of guardian-sync's wire protocol v1.
//!
//! It speaks DESIGN §10 exactly: entities with versions and `If-Match`,
//! idempotency keys with stored responses, batches (whose ops may depend on
//! an earlier op of the same entity: `depends_on`, `if_match_chained`, 424
//! `batch:dependency-failed`), atomic transactions over several entities
//! (`POST /v1/transactions`: all or nothing, replayed whole), a gap-free per-tenant change feed over HTTP
//! and WebSocket, bearer-token tenancy, limits, and fault injection for tests
//! and demos. Storage is SQLite (a WAL file, or in
//! memory), or PostgreSQL shared by several instances
//! ([`ServerBuilder::postgres`]). Start it in-process with [`ServerBuilder`]:
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use guardian_server::{Faults, ServerBuilder};
//!
//! let server = ServerBuilder::new()
//!     .token("acme", "t0k3n")
//!     .admin_token("admin")
//!     .faults(Faults { drop_after_commit_next: 1, ..Faults::default() })
//!     .bind("127.0.0.1:0")
//!     .await?;
//! // ... drive a client against server.url() ...
//! let log = server.applied_log().await?; // each applied mutation once
//! # drop(log);
//! server.shutdown().await;
//! # Ok(()) }
//! ```
//!
//! The protocol as built (fingerprints, tombstones, faults, admin routes) is
//! described in `docs/design/server.md`; the OpenAPI document is
//! [`openapi::document_json`].
#![warn(missing_docs)]

mod auth;
mod budget;
pub mod clock;
mod config;
mod conn;
mod faults;
pub mod fleet;
mod inflight;
mod limits;
mod metrics;
mod problem;
mod proxy;
mod routes;
mod server;
mod state;
mod store;

pub use config::{
    BindError, RateLimit, ServerBuilder, DEFAULT_ANSWER_BUDGET, DEFAULT_BODY_BUDGET,
    DEFAULT_TENANT_SHARE_PERCENT,
};
pub use faults::{Faults, FaultsError, RetryAfter, RetryAfterForm};
pub use fleet::alerts::AlertRules;
pub use fleet::FleetLimits;
pub use proxy::{IpNet, IpNetError};
pub use routes::openapi;
pub use server::{RunningServer, ShutdownHandle};
pub use store::{AppliedMutation, PurgeReport, Storage, StoreError, Synchronous};
