//! How ops reach a backend.
//!
//! [`Transport`] is the seam between the engine and a server: the default
//! [`HttpTransport`] speaks wire protocol v1, and an app with another API shape
//! plugs in its own implementation. A transport never returns an error for a
//! request that went wrong: it *classifies* what happened into an [`Outcome`]
//! (DESIGN §4), so every failure, hostile or not, takes one of a few
//! well-defined paths in the engine.

mod auth;
mod body;
mod http;

pub use crate::core::classify::{classify_fetch, classify_mutation, classify_mutation_of, Sent};
pub(crate) use auth::Auth;
pub use auth::{check_token, StaticToken, TokenError, TokenProvider};
pub(crate) use body::{read_bounded, BodyError};
pub use http::{HttpTransport, HttpTransportConfig, TransportBuildError};

use futures::future::BoxFuture;
use guardian_protocol::MutationKind;
use serde_json::Value;

/// One mutation to send, as the engine hands it to a transport.
#[derive(Debug, Clone, PartialEq)]
pub struct OpRequest {
    /// Create, update or delete.
    pub kind: MutationKind,
    /// Entity type.
    pub entity_type: String,
    /// Entity id.
    pub entity_id: String,
    /// Entity data for create and update (ignored for delete).
    pub payload: Value,
    /// Version the change was made against, sent as `If-Match`.
    pub if_match: Option<u64>,
    /// The op's idempotency key: the same on every retry of the same request.
    pub idempotency_key: String,
    /// In a batch: the index of an earlier request of the same batch, on the
    /// same entity, that must succeed before this one is applied (else its
    /// outcome is [`Outcome::DependencyFailed`]). `None` for a lone request.
    pub depends_on: Option<usize>,
    /// With `depends_on`: `If-Match` is the version the request it depends on
    /// left the entity at (version chaining inside one batch); `if_match` is
    /// then unused.
    pub if_match_chained: bool,
}

impl OpRequest {
    /// A lone request: no dependency inside a batch.
    pub fn new(
        kind: MutationKind,
        entity_type: impl Into<String>,
        entity_id: impl Into<String>,
        payload: Value,
        if_match: Option<u64>,
        idempotency_key: impl Into<String>,
    ) -> Self {
        Self {
            kind,
            entity_type: entity_type.into(),
            entity_id: entity_id.into(),
            payload,
            if_match,
            idempotency_key: idempotency_key.into(),
            depends_on: None,
            if_match_chained: false,
        }
    }
}

pub use crate::core::outcome::{Fetched, Outcome, RetryReason, Stored};

/// A backend the engine can send ops to.
///
/// Implementations must send `Idempotency-Key` (or the equivalent of their
/// API) with every mutation and must classify instead of failing: the only
/// way out of `send` is an [`Outcome`].
pub trait Transport: Send + Sync + std::fmt::Debug {
    /// Sends one mutation.
    fn send<'a>(&'a self, op: &'a OpRequest) -> BoxFuture<'a, Outcome>;

    /// Sends several mutations in one request; one outcome per op, in order.
    ///
    /// A failure of the whole request (network, 5xx) is returned as the same
    /// outcome for every op. The default sends them one by one, honoring
    /// dependencies (see [`send_in_order`]).
    fn send_batch<'a>(&'a self, ops: &'a [OpRequest]) -> BoxFuture<'a, Vec<Outcome>> {
        send_in_order(self, ops)
    }

    /// Whether [`Self::send_batch`] is one request of its own, so that the
    /// engine batches by default. False unless a transport says so: the
    /// default `send_batch` sends op by op, one after another, which is
    /// slower than the engine's concurrent lone requests.
    fn native_batch(&self) -> bool {
        false
    }

    /// Whether [`Self::send_batch`] honors [`OpRequest::depends_on`] and
    /// [`OpRequest::if_match_chained`], so the engine may put consecutive
    /// ops of one entity in one batch. False unless a transport says so: a
    /// `send_batch` written without dependencies in mind would apply an op
    /// whose predecessor was refused. (The default `send_batch` honors
    /// them, but sends op by op, so there is nothing to gain.)
    fn batch_dependencies(&self) -> bool {
        false
    }

    /// Sends `ops` as one atomic transaction whose idempotency key is `key`:
    /// the server applies all of them or none. One outcome per op: every
    /// op applied when it committed; when it aborted, the refused op's own
    /// outcome and [`Outcome::DependencyFailed`] for the others (nothing of
    /// them was applied or recorded). A failure of the whole request is the
    /// same outcome for every op. A retry with the same key and ops after a
    /// commit replays it.
    ///
    /// The default refuses: a transport must implement this to carry
    /// transactions (sending their ops one by one would not be atomic).
    fn send_transaction<'a>(
        &'a self,
        key: &'a str,
        ops: &'a [OpRequest],
    ) -> BoxFuture<'a, Vec<Outcome>> {
        let _ = key;
        Box::pin(async move {
            let refused = Outcome::Permanent {
                status: 501,
                problem: None,
                detail: "this transport cannot send atomic transactions".into(),
            };
            vec![refused; ops.len()]
        })
    }

    /// Fetches the server's current state of an entity.
    ///
    /// On failure, returns the classified failure (never `Applied`).
    fn fetch<'a>(
        &'a self,
        entity_type: &'a str,
        entity_id: &'a str,
    ) -> BoxFuture<'a, Result<Fetched, Outcome>>;
}

/// Sends `ops` one by one, in order, each as a lone request: an op whose
/// dependency did not succeed is not sent ([`Outcome::DependencyFailed`]),
/// and a chained op gets the version its dependency's response carried as
/// `If-Match` (none after a delete). What a transport without native
/// batches does, and what [`HttpTransport`] falls back to when a server
/// refuses a whole batch.
pub fn send_in_order<'a, T: Transport + ?Sized>(
    transport: &'a T,
    ops: &'a [OpRequest],
) -> BoxFuture<'a, Vec<Outcome>> {
    Box::pin(async move {
        let mut out: Vec<Outcome> = Vec::with_capacity(ops.len());
        for op in ops {
            let version_after_dependency = match op.depends_on.map(|dep| (dep, out.get(dep))) {
                None => None,
                // Stored with other data than it sent: the chained op must
                // merge onto that instead, so it waits (the dependency's ack
                // gives it the base and `If-Match` to conflict with).
                Some((dep, Some(Outcome::Applied { stored, .. })))
                    if op.if_match_chained
                        && ops
                            .get(dep)
                            .is_some_and(|d| stored.differs_from(&d.payload)) =>
                {
                    out.push(Outcome::DependencyFailed);
                    continue;
                }
                Some((_, Some(Outcome::Applied { stored, .. }))) => Some(stored.version()),
                Some((_, Some(Outcome::AlreadyGone))) => Some(None),
                Some(_) => {
                    out.push(Outcome::DependencyFailed);
                    continue;
                }
            };
            let outcome = match version_after_dependency {
                Some(version) if op.if_match_chained => {
                    let lone = OpRequest {
                        if_match: version,
                        depends_on: None,
                        if_match_chained: false,
                        ..op.clone()
                    };
                    transport.send(&lone).await
                }
                _ => transport.send(op).await,
            };
            out.push(outcome);
        }
        out
    })
}
