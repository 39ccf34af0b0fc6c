//! Server metrics in the Prometheus text format (hand-formatted).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};

/// Counters and gauges of one server.
#[derive(Debug, Default)]
pub(crate) struct Metrics {
    requests: Mutex<BTreeMap<(String, String, u16), u64>>,
    replays: AtomicU64,
    conflicts: AtomicU64,
    applied: AtomicU64,
    rate_limited: AtomicU64,
    injected_failures: AtomicU64,
    dropped_connections: AtomicU64,
    ws_active: AtomicI64,
    ws_frames: AtomicU64,
}

/// Decrements the active WebSocket gauge when dropped.
#[derive(Debug)]
pub(crate) struct WsClientGuard<'a>(&'a Metrics);

impl Drop for WsClientGuard<'_> {
    fn drop(&mut self) {
        self.0.ws_active.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Metrics {
    pub(crate) fn request(&self, method: &str, route: &str, status: u16) {
        let mut m = self.requests.lock().unwrap_or_else(PoisonError::into_inner);
        *m.entry((method.to_owned(), route.to_owned(), status))
            .or_insert(0) += 1;
    }

    /// Requests answered on `route` (its matched pattern), any method or status.
    pub(crate) fn requests_on(&self, route: &str) -> u64 {
        let m = self.requests.lock().unwrap_or_else(PoisonError::into_inner);
        m.iter()
            .filter(|((_, r, _), _)| r == route)
            .map(|(_, n)| *n)
            .sum()
    }

    /// Requests answered on every route.
    pub(crate) fn requests_total(&self) -> u64 {
        let m = self.requests.lock().unwrap_or_else(PoisonError::into_inner);
        m.values().sum()
    }

    pub(crate) fn replays(&self, n: u64) {
        self.replays.fetch_add(n, Ordering::Relaxed);
    }

    pub(crate) fn conflicts(&self, n: u64) {
        self.conflicts.fetch_add(n, Ordering::Relaxed);
    }

    pub(crate) fn applied(&self, n: u64) {
        self.applied.fetch_add(n, Ordering::Relaxed);
    }

    pub(crate) fn rate_limited(&self) {
        self.rate_limited.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn injected_failure(&self) {
        self.injected_failures.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn dropped_connection(&self) {
        self.dropped_connections.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn ws_frame(&self) {
        self.ws_frames.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn ws_client(&self) -> WsClientGuard<'_> {
        self.ws_active.fetch_add(1, Ordering::Relaxed);
        WsClientGuard(self)
    }

    /// The Prometheus text exposition (format 0.0.4).
    pub(crate) fn render(&self) -> String {
        let mut out = String::new();
        out.push_str(
            "# HELP guardian_http_requests_total HTTP requests by method, route and status.\n",
        );
        out.push_str("# TYPE guardian_http_requests_total counter\n");
        {
            let m = self.requests.lock().unwrap_or_else(PoisonError::into_inner);
            for ((method, route, status), n) in m.iter() {
                let _ = writeln!(
                    out,
                    "guardian_http_requests_total{{method=\"{}\",route=\"{}\",status=\"{status}\"}} {n}",
                    escape(method),
                    escape(route)
                );
            }
        }
        let counters: [(&str, &str, &AtomicU64); 7] = [
            (
                "guardian_idempotent_replays_total",
                "Responses replayed from the idempotency store.",
                &self.replays,
            ),
            (
                "guardian_conflicts_total",
                "Mutations refused with 409 (data conflicts and in-flight keys).",
                &self.conflicts,
            ),
            (
                "guardian_mutations_applied_total",
                "Mutations that took effect.",
                &self.applied,
            ),
            (
                "guardian_rate_limited_total",
                "Requests refused by the rate limit.",
                &self.rate_limited,
            ),
            (
                "guardian_injected_failures_total",
                "Requests failed by fault injection.",
                &self.injected_failures,
            ),
            (
                "guardian_dropped_connections_total",
                "Connections dropped by fault injection.",
                &self.dropped_connections,
            ),
            (
                "guardian_realtime_frames_total",
                "Change frames sent over WebSocket.",
                &self.ws_frames,
            ),
        ];
        for (name, help, value) in counters {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
                value.load(Ordering::Relaxed)
            );
        }
        let _ = writeln!(
            out,
            "# HELP guardian_realtime_clients Active WebSocket clients.\n# TYPE guardian_realtime_clients gauge\nguardian_realtime_clients {}",
            self.ws_active.load(Ordering::Relaxed)
        );
        out
    }
}

fn escape(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_prometheus_text() {
        let m = Metrics::default();
        m.request("GET", "/v1/entities/{type}/{id}", 200);
        m.request("GET", "/v1/entities/{type}/{id}", 200);
        m.replays(2);
        let guard = m.ws_client();
        let text = m.render();
        assert!(text.contains(
            "guardian_http_requests_total{method=\"GET\",route=\"/v1/entities/{type}/{id}\",status=\"200\"} 2"
        ));
        assert!(text.contains("guardian_idempotent_replays_total 2"));
        assert!(text.contains("guardian_realtime_clients 1"));
        drop(guard);
        assert!(m.render().contains("guardian_realtime_clients 0"));
    }
}
