//! The fault layer: a tower layer over `/v1` that fails requests (with the
//! configured statuses and `Retry-After`) and delays reads, before the
//! request reaches its handler. Mutations get their latency inside the
//! pipeline (after the key is reserved); the WebSocket is exempt.

use std::sync::Arc;
use std::task::{Context, Poll};

use axum::extract::Request;
use axum::http::{header, Method};
use axum::response::{IntoResponse, Response};
use futures::future::BoxFuture;
use guardian_protocol::problem_type;
use tower::{Layer, Service};

use super::FaultInjector;
use crate::clock::SharedClock;
use crate::metrics::Metrics;
use crate::problem::ApiError;

/// Wraps a service with injected failures and read latency.
#[derive(Debug, Clone)]
pub(crate) struct FaultLayer {
    faults: Arc<FaultInjector>,
    metrics: Arc<Metrics>,
    clock: SharedClock,
}

impl FaultLayer {
    pub(crate) fn new(
        faults: Arc<FaultInjector>,
        metrics: Arc<Metrics>,
        clock: SharedClock,
    ) -> Self {
        Self {
            faults,
            metrics,
            clock,
        }
    }
}

impl<S> Layer<S> for FaultLayer {
    type Service = FaultService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        FaultService {
            layer: self.clone(),
            inner,
        }
    }
}

/// The service of [`FaultLayer`].
#[derive(Debug, Clone)]
pub(crate) struct FaultService<S> {
    layer: FaultLayer,
    inner: S,
}

impl<S> Service<Request> for FaultService<S>
where
    S: Service<Request, Response = Response> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = Response;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request) -> Self::Future {
        // The clone that was polled ready serves this request (tower's rule).
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let layer = self.layer.clone();
        Box::pin(async move {
            if req.uri().path() == "/v1/realtime" {
                return inner.call(req).await;
            }
            if let Some(failure) = layer.faults.request_failure() {
                layer.metrics.injected_failure();
                let (problem_type, title) = match failure.status {
                    429 => (problem_type::RATE_LIMITED, "Too many requests"),
                    500 => (problem_type::INTERNAL, "Internal server error"),
                    _ => (problem_type::UNAVAILABLE, "Service unavailable"),
                };
                let mut err = ApiError::new(
                    problem_type,
                    failure.status,
                    title,
                    "failure injected by the server's fault settings; nothing was applied",
                );
                if let Some(ra) = failure.retry_after {
                    err = err.with_header(
                        header::RETRY_AFTER,
                        ra.header_value(layer.clock.now_millis()),
                    );
                }
                return Ok(err.into_response());
            }
            if req.method() == Method::GET || req.method() == Method::HEAD {
                let latency = layer.faults.latency();
                if !latency.is_zero() {
                    tokio::time::sleep(latency).await;
                }
            }
            inner.call(req).await
        })
    }
}
