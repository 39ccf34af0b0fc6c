//! The default [`Transport`]: wire protocol v1 over reqwest with rustls.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use guardian_protocol::{header, MutationKind};
use reqwest::{header as h, Method, StatusCode};
use serde_json::value::RawValue;

use super::auth::Auth;
use super::{
    read_bounded, BodyError, Fetched, OpRequest, Outcome, RetryReason, TokenProvider, Transport,
};
use crate::core::classify::{classify_fetch, classify_mutation, classify_mutation_of, Sent};

/// Settings of [`HttpTransport`].
#[derive(Debug, Clone)]
pub struct HttpTransportConfig {
    /// Base URL of the backend, e.g. `http://127.0.0.1:8080`.
    pub base_url: String,
    /// Time allowed to establish a connection.
    pub connect_timeout: Duration,
    /// Time allowed for a whole request, body included.
    pub request_timeout: Duration,
    /// Largest response body read; a larger one is a protocol error.
    pub max_response_bytes: usize,
}

impl HttpTransportConfig {
    /// Defaults for a backend at `base_url`: 5 s connect, 30 s request, 4 MiB responses.
    pub fn new(base_url: impl Into<String>) -> Self {
        Self {
            base_url: base_url.into(),
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(30),
            max_response_bytes: 4 << 20,
        }
    }
}

/// Why an [`HttpTransport`] could not be built.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TransportBuildError {
    /// The base URL is not an absolute http(s) URL.
    #[error("invalid server URL {url:?}: {reason}")]
    BadUrl {
        /// The URL given.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The HTTP client could not be created (TLS setup).
    #[error("cannot create the HTTP client: {0}")]
    Client(#[from] reqwest::Error),
}

// Typed once: a name given as text is parsed again on every request.
const IDEMPOTENCY_KEY: h::HeaderName = h::HeaderName::from_static(header::IDEMPOTENCY_KEY);
const IDEMPOTENT_REPLAYED: h::HeaderName = h::HeaderName::from_static(header::IDEMPOTENT_REPLAYED);

/// Wire protocol v1 over HTTP.
///
/// Never follows redirects (a mutation must not be replayed somewhere else),
/// bounds every response, and reads the bearer token from the app's
/// [`TokenProvider`] for each request.
#[derive(Debug, Clone)]
pub struct HttpTransport {
    client: reqwest::Client,
    base: reqwest::Url,
    max_response_bytes: usize,
    auth: Arc<Auth>,
    /// Set when the server answered a batch with 404, 405 or 501: it has no
    /// batch route, so later batches go op by op without asking again.
    no_batch_route: Arc<AtomicBool>,
}

impl HttpTransport {
    /// Builds a transport; fails on a malformed URL or TLS setup error.
    pub fn new(
        config: &HttpTransportConfig,
        tokens: Arc<dyn TokenProvider>,
    ) -> Result<Self, TransportBuildError> {
        let bad = |reason: &str| TransportBuildError::BadUrl {
            url: config.base_url.clone(),
            reason: reason.to_owned(),
        };
        let mut base = reqwest::Url::parse(&config.base_url).map_err(|e| bad(&e.to_string()))?;
        if !matches!(base.scheme(), "http" | "https") || base.cannot_be_a_base() {
            return Err(bad("expected an http:// or https:// URL"));
        }
        if !base.path().ends_with('/') {
            let path = format!("{}/", base.path());
            base.set_path(&path);
        }
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(config.connect_timeout)
            .timeout(config.request_timeout)
            .user_agent(concat!("guardian-sync/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(Self {
            client,
            base,
            max_response_bytes: config.max_response_bytes,
            auth: Arc::new(Auth::new(tokens)),
            no_batch_route: Arc::new(AtomicBool::new(false)),
        })
    }

    fn url(&self, segments: &[&str]) -> reqwest::Url {
        let mut url = self.base.clone();
        if let Ok(mut path) = url.path_segments_mut() {
            path.pop_if_empty().extend(segments);
        }
        url
    }

    /// Sends a request built by `build` with the current token; on 401
    /// refreshes once (shared with concurrent requests) and retries.
    async fn exchange(
        &self,
        build: impl Fn(&str) -> reqwest::RequestBuilder,
    ) -> Result<Response, Outcome> {
        let token = self.auth.token().await.map_err(|_| Outcome::AuthRequired)?;
        let first = self.round_trip(build(&token)).await?;
        if first.status != StatusCode::UNAUTHORIZED {
            return Ok(first);
        }
        tracing::debug!("401 from server; refreshing the token once");
        let fresh = self
            .auth
            .refreshed(&token)
            .await
            .map_err(|_| Outcome::AuthRequired)?;
        let second = self.round_trip(build(&fresh)).await?;
        if second.status == StatusCode::UNAUTHORIZED {
            return Err(Outcome::AuthRequired);
        }
        Ok(second)
    }

    async fn round_trip(&self, request: reqwest::RequestBuilder) -> Result<Response, Outcome> {
        let response = request.send().await.map_err(|e| network_outcome(&e))?;
        let status = response.status();
        let headers = response.headers();
        let retry_after = headers
            .get(h::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let replayed = headers
            .get(IDEMPOTENT_REPLAYED)
            .is_some_and(|v| v.as_bytes() == b"true");
        let body = match read_bounded(response, self.max_response_bytes).await {
            Ok(body) => body,
            Err(BodyError::TooLarge(_)) => {
                return Err(Outcome::protocol(
                    Some(status.as_u16()),
                    "response larger than the limit",
                ))
            }
            Err(BodyError::Network(e)) => return Err(network_outcome(&e)),
        };
        Ok(Response {
            status,
            retry_after,
            replayed,
            body,
        })
    }

    /// The request for `op`, its body already serialized (none for a delete).
    fn mutation(
        &self,
        op: &OpRequest,
        body: Option<&MutationBody>,
        token: &str,
    ) -> reqwest::RequestBuilder {
        let builder = match op.kind {
            MutationKind::Create => {
                self.client
                    .post(self.url(&["v1", "entities", &op.entity_type]))
            }
            MutationKind::Update => {
                self.client
                    .put(self.url(&["v1", "entities", &op.entity_type, &op.entity_id]))
            }
            MutationKind::Delete => {
                self.client
                    .delete(self.url(&["v1", "entities", &op.entity_type, &op.entity_id]))
            }
        };
        let builder = match body {
            Some(body) => builder
                .header(
                    h::CONTENT_TYPE,
                    h::HeaderValue::from_static("application/json"),
                )
                .body(body.bytes.clone()),
            None => builder,
        };
        let builder = builder
            .bearer_auth(token)
            .header(IDEMPOTENCY_KEY, &op.idempotency_key);
        match (op.kind, op.if_match) {
            (MutationKind::Update | MutationKind::Delete, Some(v)) => {
                builder.header(h::IF_MATCH, format!("\"{v}\""))
            }
            _ => builder,
        }
    }
}

/// A single op's body, serialized once for every attempt: byte for byte
/// [`guardian_protocol::CreateRequest`] or
/// [`guardian_protocol::UpdateRequest`], so idempotency fingerprints
/// match. `data` is where the op's data lies in it: what an answer that
/// stored it unchanged echoes.
struct MutationBody {
    bytes: bytes::Bytes,
    data: std::ops::Range<usize>,
}

impl MutationBody {
    /// `None` for a delete, which has no body.
    fn of(op: &OpRequest) -> Result<Option<Self>, Outcome> {
        let mut body = Vec::with_capacity(op.entity_id.len() + 256);
        match op.kind {
            MutationKind::Create => {
                body.extend_from_slice(br#"{"id":"#);
                serde_json::to_writer(&mut body, &op.entity_id).map_err(|e| unserializable(&e))?;
                body.extend_from_slice(br#","data":"#);
            }
            MutationKind::Update => body.extend_from_slice(br#"{"data":"#),
            MutationKind::Delete => return Ok(None),
        }
        let start = body.len();
        serde_json::to_writer(&mut body, &op.payload).map_err(|e| unserializable(&e))?;
        let data = start..body.len();
        body.push(b'}');
        Ok(Some(Self {
            bytes: body.into(),
            data,
        }))
    }

    fn data(&self) -> Option<&str> {
        std::str::from_utf8(self.bytes.get(self.data.clone())?).ok()
    }
}

struct Response {
    status: StatusCode,
    retry_after: Option<String>,
    replayed: bool,
    body: Vec<u8>,
}

/// True when the error is, or was caused by, a timeout. reqwest reports a
/// body cut off by the request timeout as a decode/body error whose cause
/// is the timeout, so the whole source chain is inspected.
fn caused_by_timeout(e: &reqwest::Error) -> bool {
    if e.is_timeout() {
        return true;
    }
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        let io_timeout = s
            .downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::TimedOut);
        // reqwest's own timeout error type is private; its text is stable.
        if io_timeout || s.to_string().contains("timed out") {
            return true;
        }
        source = s.source();
    }
    false
}

/// The error followed by its causes, each said once. reqwest's own message
/// ("error sending request for url (…)") leaves out the cause a user acts
/// on, such as "Connection refused".
fn with_causes(e: &reqwest::Error) -> String {
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        let cause = s.to_string();
        if !text.contains(&cause) {
            text.push_str(": ");
            text.push_str(&cause);
        }
        source = s.source();
    }
    text
}

fn network_outcome(e: &reqwest::Error) -> Outcome {
    let reason = if caused_by_timeout(e) {
        RetryReason::Timeout
    } else if e.is_decode() || e.is_body() {
        RetryReason::Protocol
    } else {
        RetryReason::Network
    };
    // reqwest errors never include bodies or headers, so they are safe to log.
    let detail = if reason == RetryReason::Timeout {
        format!("timed out: {}", with_causes(e))
    } else {
        with_causes(e)
    };
    Outcome::network(reason, detail)
}

impl Transport for HttpTransport {
    fn send<'a>(&'a self, op: &'a OpRequest) -> BoxFuture<'a, Outcome> {
        Box::pin(async move {
            let body = match MutationBody::of(op) {
                Ok(body) => body,
                Err(outcome) => return outcome,
            };
            match self
                .exchange(|token| self.mutation(op, body.as_ref(), token))
                .await
            {
                Ok(r) => classify_mutation_of(
                    op.kind,
                    r.status.as_u16(),
                    r.retry_after.as_deref(),
                    r.replayed,
                    &r.body,
                    Some(Sent {
                        entity_type: &op.entity_type,
                        entity_id: &op.entity_id,
                        data: body.as_ref().and_then(MutationBody::data),
                    }),
                ),
                Err(outcome) => outcome,
            }
        })
    }

    fn send_batch<'a>(&'a self, ops: &'a [OpRequest]) -> BoxFuture<'a, Vec<Outcome>> {
        Box::pin(async move {
            if self.no_batch_route.load(Ordering::Relaxed) {
                return super::send_in_order(self, ops).await;
            }
            let sent = match sent_data(ops) {
                Ok(sent) => sent,
                Err(outcome) => return vec![outcome; ops.len()],
            };
            let request = BatchBody {
                ops: batch_ops(ops, &sent),
            };
            let url = self.url(&["v1", "batch"]);
            let answer = self
                .exchange(|token| {
                    self.client
                        .request(Method::POST, url.clone())
                        .bearer_auth(token)
                        .json(&request)
                })
                .await;
            let whole = match answer {
                Ok(r) if r.status == StatusCode::OK => {
                    match serde_json::from_slice::<BatchAnswer<'_>>(&r.body) {
                        Ok(b) if b.results.len() == ops.len() => {
                            return classify_results(ops, &sent, b.results)
                        }
                        Ok(b) => Outcome::protocol(
                            Some(200),
                            format!(
                                "batch answered {} results for {} ops",
                                b.results.len(),
                                ops.len()
                            ),
                        ),
                        Err(e) => {
                            Outcome::protocol(Some(200), format!("malformed batch response: {e}"))
                        }
                    }
                }
                // The batch as a whole failed: every op shares the outcome.
                Ok(r) => {
                    if matches!(
                        r.status,
                        StatusCode::NOT_FOUND
                            | StatusCode::METHOD_NOT_ALLOWED
                            | StatusCode::NOT_IMPLEMENTED
                    ) {
                        tracing::info!(status = %r.status, "no batch route; sending ops one by one");
                        self.no_batch_route.store(true, Ordering::Relaxed);
                    }
                    whole_failure(&r)
                }
                Err(outcome) => outcome,
            };
            let whole = match whole {
                // A 4xx for the whole batch (e.g. 413) must not fail ops that
                // are fine on their own: send them one by one instead.
                Outcome::Permanent { .. } | Outcome::Conflict { .. } | Outcome::AlreadyGone => {
                    return super::send_in_order(self, ops).await;
                }
                other => other,
            };
            vec![whole; ops.len()]
        })
    }

    fn send_transaction<'a>(
        &'a self,
        key: &'a str,
        ops: &'a [OpRequest],
    ) -> BoxFuture<'a, Vec<Outcome>> {
        Box::pin(async move {
            let sent = match sent_data(ops) {
                Ok(sent) => sent,
                Err(outcome) => return vec![outcome; ops.len()],
            };
            let request = TransactionBody {
                transaction_key: key,
                ops: batch_ops(ops, &sent),
            };
            let url = self.url(&["v1", "transactions"]);
            let answer = self
                .exchange(|token| {
                    self.client
                        .request(Method::POST, url.clone())
                        .bearer_auth(token)
                        .json(&request)
                })
                .await;
            let whole = match answer {
                Ok(r) if r.status == StatusCode::OK => {
                    match serde_json::from_slice::<TransactionAnswer<'_>>(&r.body) {
                        Ok(t) if t.results.len() == ops.len() => {
                            return transaction_outcomes(ops, &sent, t);
                        }
                        Ok(t) => Outcome::protocol(
                            Some(200),
                            format!(
                                "transaction answered {} results for {} ops",
                                t.results.len(),
                                ops.len()
                            ),
                        ),
                        Err(e) => Outcome::protocol(
                            Some(200),
                            format!("malformed transaction response: {e}"),
                        ),
                    }
                }
                // Nothing was applied, or it is not known: the transaction
                // shares one outcome (unlike a batch, it is never split).
                Ok(r) => whole_failure(&r),
                Err(outcome) => outcome,
            };
            vec![whole; ops.len()]
        })
    }

    fn native_batch(&self) -> bool {
        true
    }

    fn batch_dependencies(&self) -> bool {
        true
    }

    fn fetch<'a>(
        &'a self,
        entity_type: &'a str,
        entity_id: &'a str,
    ) -> BoxFuture<'a, Result<Fetched, Outcome>> {
        Box::pin(async move {
            let url = self.url(&["v1", "entities", entity_type, entity_id]);
            let r = self
                .exchange(|token| self.client.get(url.clone()).bearer_auth(token))
                .await?;
            classify_fetch(r.status.as_u16(), r.retry_after.as_deref(), &r.body)
        })
    }
}

/// An op's data serialized once: in a batch, what an answer that stored it
/// unchanged echoes.
fn serialized(payload: &serde_json::Value) -> Result<Box<RawValue>, Outcome> {
    serde_json::value::to_raw_value(payload).map_err(|e| unserializable(&e))
}

/// Not reachable for a `Value`; handled as reqwest's own serialization
/// failure was.
fn unserializable(e: &serde_json::Error) -> Outcome {
    Outcome::network(
        RetryReason::Network,
        format!("cannot serialize the request: {e}"),
    )
}

/// Each op's data [`serialized`] (`None` for a delete).
fn sent_data(ops: &[OpRequest]) -> Result<Vec<Option<Box<RawValue>>>, Outcome> {
    ops.iter()
        .map(|op| {
            (op.kind != MutationKind::Delete)
                .then(|| serialized(&op.payload))
                .transpose()
        })
        .collect()
}

/// The ops as a batch or transaction carries them.
fn batch_ops<'a>(ops: &'a [OpRequest], sent: &'a [Option<Box<RawValue>>]) -> Vec<BatchOpBody<'a>> {
    ops.iter()
        .zip(sent)
        .map(|(op, data)| BatchOpBody {
            op: op.kind,
            entity_type: &op.entity_type,
            id: &op.entity_id,
            data: data.as_deref(),
            if_match: if op.kind == MutationKind::Create || op.if_match_chained {
                None
            } else {
                op.if_match
            },
            idempotency_key: &op.idempotency_key,
            depends_on: op.depends_on.and_then(|i| u32::try_from(i).ok()),
            if_match_chained: op.if_match_chained && op.depends_on.is_some(),
        })
        .collect()
}

/// [`BatchOp`] serialized from borrowed parts: byte for byte the same JSON
/// (idempotency fingerprints match), without a copy of any payload.
///
/// [`BatchOp`]: guardian_protocol::BatchOp
#[derive(serde::Serialize)]
struct BatchOpBody<'a> {
    op: MutationKind,
    #[serde(rename = "type")]
    entity_type: &'a str,
    id: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    data: Option<&'a RawValue>,
    #[serde(skip_serializing_if = "Option::is_none")]
    if_match: Option<u64>,
    idempotency_key: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    depends_on: Option<u32>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    if_match_chained: bool,
}

/// [`guardian_protocol::BatchRequest`] from borrowed parts.
#[derive(serde::Serialize)]
struct BatchBody<'a> {
    ops: Vec<BatchOpBody<'a>>,
}

/// [`guardian_protocol::TransactionRequest`] from borrowed parts.
#[derive(serde::Serialize)]
struct TransactionBody<'a> {
    transaction_key: &'a str,
    ops: Vec<BatchOpBody<'a>>,
}

/// A [`BatchResult`] read in place: each body stays text, classified as
/// the answer to a lone request without being decoded and re-encoded.
///
/// [`BatchResult`]: guardian_protocol::BatchResult
#[derive(serde::Deserialize)]
struct ResultAnswer<'a> {
    status: u16,
    #[serde(default, borrow)]
    body: Option<&'a RawValue>,
    #[serde(default)]
    replayed: bool,
}

/// A [`guardian_protocol::BatchResponse`] read in place.
#[derive(serde::Deserialize)]
struct BatchAnswer<'a> {
    #[serde(borrow)]
    results: Vec<ResultAnswer<'a>>,
}

/// A [`guardian_protocol::TransactionResponse`] read in place.
#[derive(serde::Deserialize)]
struct TransactionAnswer<'a> {
    committed: bool,
    #[serde(default)]
    failed_op: Option<u32>,
    #[serde(borrow)]
    results: Vec<ResultAnswer<'a>>,
    #[serde(default)]
    replayed: bool,
}

/// Each op's result classified as the answer to a lone request.
fn classify_results(
    ops: &[OpRequest],
    sent: &[Option<Box<RawValue>>],
    results: Vec<ResultAnswer<'_>>,
) -> Vec<Outcome> {
    ops.iter()
        .zip(sent)
        .zip(results)
        .map(|((op, sent), res)| {
            // An absent body is JSON null, as the protocol type defaults it.
            let body = res.body.map_or("null", RawValue::get);
            // Only a refusal's body names a delay (`retry_after`, seconds).
            let retry_after = (!(200..300).contains(&res.status))
                .then(|| serde_json::from_str::<serde_json::Value>(body).ok())
                .flatten()
                .and_then(|b| b.get("retry_after").and_then(serde_json::Value::as_u64))
                .map(|s| s.to_string());
            classify_mutation_of(
                op.kind,
                res.status,
                retry_after.as_deref(),
                res.replayed,
                body.as_bytes(),
                Some(Sent {
                    entity_type: &op.entity_type,
                    entity_id: &op.entity_id,
                    data: sent.as_deref().map(RawValue::get),
                }),
            )
        })
        .collect()
}

/// A whole request's failure (not 200), shared by all its ops.
fn whole_failure(r: &Response) -> Outcome {
    classify_mutation(
        MutationKind::Update,
        r.status.as_u16(),
        r.retry_after.as_deref(),
        false,
        &r.body,
    )
}

/// A transaction's outcomes: every op applied when it committed; when it
/// aborted, the refused op's own outcome and
/// [`Outcome::DependencyFailed`] (not applied, nothing recorded) for the
/// others. An answer that contradicts itself is a protocol error for all.
fn transaction_outcomes(
    ops: &[OpRequest],
    sent: &[Option<Box<RawValue>>],
    t: TransactionAnswer<'_>,
) -> Vec<Outcome> {
    let committed = t.committed;
    // A replay answers each op as it was first answered: the whole
    // response's flag says the ops were applied by an earlier attempt.
    let replayed = t.replayed;
    let failed = t.failed_op.and_then(|i| usize::try_from(i).ok());
    let outcomes = classify_results(ops, sent, t.results);
    let consistent = if committed {
        failed.is_none()
            && outcomes
                .iter()
                .all(|o| matches!(o, Outcome::Applied { .. }))
    } else {
        failed.is_some_and(|f| {
            outcomes
                .get(f)
                .is_some_and(|o| !matches!(o, Outcome::Applied { .. } | Outcome::DependencyFailed))
        })
    };
    if !consistent {
        let detail =
            "transaction answer contradicts itself (committed flag, failed op and results)";
        return vec![Outcome::protocol(Some(200), detail); ops.len()];
    }
    outcomes
        .into_iter()
        .enumerate()
        .map(|(i, o)| match (failed, o) {
            (Some(f), _) if i != f => Outcome::DependencyFailed,
            (_, Outcome::Applied { stored, .. }) if replayed => Outcome::Applied {
                stored,
                replayed: true,
            },
            (_, o) => o,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use guardian_protocol::{
        BatchOp, BatchRequest, BatchResponse, BatchResult, CreateRequest, MutationKind,
        TransactionRequest, TransactionResponse, UpdateRequest,
    };
    use serde_json::json;

    use super::{
        batch_ops, classify_results, sent_data, transaction_outcomes, BatchAnswer, BatchBody,
        MutationBody, TransactionAnswer, TransactionBody,
    };
    use crate::core::classify::classify_mutation;
    use crate::transport::{OpRequest, Outcome, Stored};

    fn op(kind: MutationKind, id: &str, if_match: Option<u64>) -> OpRequest {
        OpRequest {
            kind,
            entity_type: "device".into(),
            entity_id: id.into(),
            payload: json!({"on": true, "level": 1.50, "name": "café \"x\"\n"}),
            if_match,
            idempotency_key: format!("key-{id}"),
            depends_on: None,
            if_match_chained: false,
        }
    }

    fn protocol_op(op: &OpRequest) -> BatchOp {
        BatchOp {
            op: op.kind,
            entity_type: op.entity_type.clone(),
            id: op.entity_id.clone(),
            data: (op.kind != MutationKind::Delete).then(|| op.payload.clone()),
            if_match: if op.kind == MutationKind::Create || op.if_match_chained {
                None
            } else {
                op.if_match
            },
            idempotency_key: op.idempotency_key.clone(),
            depends_on: op.depends_on.and_then(|i| u32::try_from(i).ok()),
            if_match_chained: op.if_match_chained && op.depends_on.is_some(),
        }
    }

    fn ops() -> Vec<OpRequest> {
        let mut chained = op(MutationKind::Update, "a", Some(9));
        chained.depends_on = Some(0);
        chained.if_match_chained = true;
        vec![
            op(MutationKind::Create, "a", Some(3)),
            chained,
            op(MutationKind::Update, "b", Some(4)),
            op(MutationKind::Update, "c", None),
            op(MutationKind::Delete, "d", Some(2)),
        ]
    }

    /// Batch and transaction bodies are byte for byte the protocol types'.
    #[test]
    fn borrowed_batch_bodies_serialize_like_the_protocol_types() {
        let ops = ops();
        let sent = sent_data(&ops).unwrap();
        let protocol: Vec<BatchOp> = ops.iter().map(protocol_op).collect();
        assert_eq!(
            serde_json::to_vec(&BatchBody {
                ops: batch_ops(&ops, &sent)
            })
            .unwrap(),
            serde_json::to_vec(&BatchRequest {
                ops: protocol.clone()
            })
            .unwrap()
        );
        assert_eq!(
            serde_json::to_vec(&TransactionBody {
                transaction_key: "t-1",
                ops: batch_ops(&ops, &sent)
            })
            .unwrap(),
            serde_json::to_vec(&TransactionRequest {
                transaction_key: "t-1".into(),
                ops: protocol
            })
            .unwrap()
        );
    }

    /// Results read in place classify as the decoded protocol type did,
    /// except that an entity echoing the data sent is stored as sent.
    #[test]
    fn results_read_in_place_classify_like_decoded_ones() {
        let ops = ops();
        let sent = sent_data(&ops).unwrap();
        let entity = |id: &str, version: u64, data: serde_json::Value| {
            json!({"type": "device", "id": id, "version": version, "data": data,
                   "updated_at": "2026-12-05T00:00:00Z", "deleted": false})
        };
        let results = vec![
            BatchResult {
                status: 201,
                body: entity("a", 1, ops[0].payload.clone()),
                replayed: false,
            },
            BatchResult {
                status: 200,
                body: entity("a", 2, json!({"merged": true})),
                replayed: true,
            },
            BatchResult {
                status: 429,
                body: json!({"type": "about:blank", "title": "t", "status": 429, "retry_after": 7}),
                replayed: false,
            },
            BatchResult {
                status: 424,
                body: json!({"type": "batch:dependency-failed", "title": "t", "status": 424}),
                replayed: false,
            },
            BatchResult {
                status: 204,
                body: serde_json::Value::Null,
                replayed: false,
            },
        ];
        let body = serde_json::to_vec(&BatchResponse {
            results: results.clone(),
        })
        .unwrap();
        let answer: BatchAnswer<'_> = serde_json::from_slice(&body).unwrap();
        let read = classify_results(&ops, &sent, answer.results);
        let decoded: Vec<Outcome> = ops
            .iter()
            .zip(&results)
            .map(|(op, r)| {
                let retry_after = r
                    .body
                    .get("retry_after")
                    .and_then(serde_json::Value::as_u64)
                    .map(|s| s.to_string());
                classify_mutation(
                    op.kind,
                    r.status,
                    retry_after.as_deref(),
                    r.replayed,
                    &serde_json::to_vec(&r.body).unwrap(),
                )
            })
            .collect();
        assert_eq!(
            read[0],
            Outcome::Applied {
                stored: Stored::AsSent { version: 1 },
                replayed: false
            }
        );
        assert!(matches!(
            decoded[0],
            Outcome::Applied {
                stored: Stored::Entity(_),
                ..
            }
        ));
        assert_eq!(read[1..], decoded[1..]);
        assert!(matches!(
            &read[2],
            Outcome::Retryable { retry_after: Some(s), .. } if s == "7"
        ));
        // A body left out is null, as the protocol type defaults it.
        let bare = br#"{"results":[{"status":204}]}"#;
        let answer: BatchAnswer<'_> = serde_json::from_slice(bare).unwrap();
        assert_eq!(
            classify_results(&ops[4..], &sent[4..], answer.results),
            vec![Outcome::Applied {
                stored: Stored::Nothing,
                replayed: false
            }]
        );
        // A transaction's answer keeps its replay flag over each op.
        let t = TransactionResponse {
            committed: true,
            failed_op: None,
            results: vec![BatchResult {
                status: 201,
                body: entity("a", 1, ops[0].payload.clone()),
                replayed: false,
            }],
            replayed: true,
        };
        let body = serde_json::to_vec(&t).unwrap();
        let answer: TransactionAnswer<'_> = serde_json::from_slice(&body).unwrap();
        assert_eq!(
            transaction_outcomes(&ops[..1], &sent[..1], answer),
            vec![Outcome::Applied {
                stored: Stored::AsSent { version: 1 },
                replayed: true
            }]
        );
        // Not an answer at all: refused whole by the caller.
        assert!(
            serde_json::from_slice::<BatchAnswer<'_>>(br#"{"results":[{"status":"x"}]}"#).is_err()
        );
    }

    /// A single op's body is byte for byte the protocol's: a retry by
    /// this build of an op first sent by an older one must replay, not
    /// mismatch its idempotency fingerprint.
    #[test]
    fn single_op_bodies_serialize_like_the_protocol_types() {
        let data =
            json!({"on": true, "level": 7, "room": "kitchen", "nested": {"b": [1, 2], "a": null}});
        let request = |kind| OpRequest {
            entity_id: "lamp \"1\"\n".into(),
            payload: data.clone(),
            ..op(kind, "x", None)
        };
        let create = CreateRequest {
            id: "lamp \"1\"\n".into(),
            data: data.clone(),
        };
        let update = UpdateRequest { data: data.clone() };
        let raw = serde_json::to_string(&data).unwrap();
        for (kind, expected) in [
            (MutationKind::Create, serde_json::to_vec(&create).unwrap()),
            (MutationKind::Update, serde_json::to_vec(&update).unwrap()),
        ] {
            let body = MutationBody::of(&request(kind)).unwrap().unwrap();
            assert_eq!(body.bytes.as_ref(), expected.as_slice(), "{kind:?}");
            assert_eq!(body.data(), Some(raw.as_str()), "{kind:?}");
        }
        assert!(MutationBody::of(&request(MutationKind::Delete))
            .unwrap()
            .is_none());
    }
}
