//! Server metrics, exposed in the Prometheus text format (0.0.4) by
//! `metrics-exporter-prometheus`. Each server records into a recorder of its
//! own, never the process-wide one: several servers share a test process,
//! and the client library records through the `metrics` facade too.

use metrics::{Counter, Gauge, Key, KeyName, Label, Level, Metadata, Recorder, SharedString};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle, PrometheusRecorder};

const REQUESTS: &str = "guardian_http_requests_total";
const CLIENTS: &str = "guardian_realtime_clients";
const METADATA: Metadata<'static> =
    Metadata::new(module_path!(), Level::INFO, Some(module_path!()));

/// The counters: name and help.
const COUNTERS: [(&str, &str); 7] = [
    (
        "guardian_idempotent_replays_total",
        "Responses replayed from the idempotency store.",
    ),
    (
        "guardian_conflicts_total",
        "Mutations refused with 409 (data conflicts and in-flight keys).",
    ),
    (
        "guardian_mutations_applied_total",
        "Mutations that took effect.",
    ),
    (
        "guardian_rate_limited_total",
        "Requests refused by the rate limit.",
    ),
    (
        "guardian_injected_failures_total",
        "Requests failed by fault injection.",
    ),
    (
        "guardian_dropped_connections_total",
        "Connections dropped by fault injection.",
    ),
    (
        "guardian_realtime_frames_total",
        "Change frames sent over WebSocket.",
    ),
];

/// Counters and gauges of one server.
pub(crate) struct Metrics {
    recorder: PrometheusRecorder,
    handle: PrometheusHandle,
    replays: Counter,
    conflicts: Counter,
    applied: Counter,
    rate_limited: Counter,
    injected_failures: Counter,
    dropped_connections: Counter,
    ws_frames: Counter,
    ws_active: Gauge,
    /// The same count as `ws_active`, for tests to wait on.
    ws_sessions: tokio::sync::watch::Sender<usize>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

/// Decrements the active WebSocket gauge when dropped.
#[derive(Debug)]
pub(crate) struct WsClientGuard<'a>(&'a Metrics);

impl Drop for WsClientGuard<'_> {
    fn drop(&mut self) {
        self.0.ws_active.decrement(1.0);
        self.0.ws_sessions.send_modify(|n| *n = n.saturating_sub(1));
    }
}

impl Metrics {
    /// Registers every metric, so that each shows (at 0) before it moves.
    pub(crate) fn new() -> Self {
        let recorder = PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        recorder.describe_counter(
            KeyName::from_const_str(REQUESTS),
            None,
            SharedString::const_str("HTTP requests by method, route and status."),
        );
        let [replays, conflicts, applied, rate_limited, injected_failures, dropped_connections, ws_frames] =
            COUNTERS.map(|(name, help)| {
                recorder.describe_counter(
                    KeyName::from_const_str(name),
                    None,
                    SharedString::const_str(help),
                );
                recorder.register_counter(&Key::from_static_name(name), &METADATA)
            });
        recorder.describe_gauge(
            KeyName::from_const_str(CLIENTS),
            None,
            SharedString::const_str("Active WebSocket clients."),
        );
        let ws_active = recorder.register_gauge(&Key::from_static_name(CLIENTS), &METADATA);
        ws_active.set(0.0);
        Self {
            recorder,
            handle,
            replays,
            conflicts,
            applied,
            rate_limited,
            injected_failures,
            dropped_connections,
            ws_frames,
            ws_active,
            ws_sessions: tokio::sync::watch::Sender::new(0),
        }
    }

    pub(crate) fn request(&self, method: &str, route: &str, status: u16) {
        let labels = vec![
            Label::new("method", method.to_owned()),
            Label::new("route", route.to_owned()),
            Label::new("status", status.to_string()),
        ];
        self.recorder
            .register_counter(&Key::from_parts(REQUESTS, labels), &METADATA)
            .increment(1);
    }

    /// Requests answered on `route` (its matched pattern), any method or status.
    pub(crate) fn requests_on(&self, route: &str) -> u64 {
        let label = format!("route=\"{route}\"");
        self.sum_requests(|labels| labels.split(',').any(|l| l == label))
    }

    /// Requests answered on every route.
    pub(crate) fn requests_total(&self) -> u64 {
        self.sum_requests(|_| true)
    }

    /// The sum of the request counters whose labels match, read back from
    /// the exposition (the recorder keeps no other way to read a value).
    fn sum_requests(&self, matches: impl Fn(&str) -> bool) -> u64 {
        let prefix = format!("{REQUESTS}{{");
        self.render()
            .lines()
            .filter_map(|l| l.strip_prefix(&prefix)?.rsplit_once("} "))
            .filter(|(labels, _)| matches(labels))
            .filter_map(|(_, n)| n.parse::<u64>().ok())
            .sum()
    }

    pub(crate) fn replays(&self, n: u64) {
        self.replays.increment(n);
    }

    pub(crate) fn conflicts(&self, n: u64) {
        self.conflicts.increment(n);
    }

    pub(crate) fn applied(&self, n: u64) {
        self.applied.increment(n);
    }

    pub(crate) fn rate_limited(&self) {
        self.rate_limited.increment(1);
    }

    pub(crate) fn injected_failure(&self) {
        self.injected_failures.increment(1);
    }

    pub(crate) fn dropped_connection(&self) {
        self.dropped_connections.increment(1);
    }

    pub(crate) fn ws_frame(&self) {
        self.ws_frames.increment(1);
    }

    pub(crate) fn ws_client(&self) -> WsClientGuard<'_> {
        self.ws_active.increment(1.0);
        self.ws_sessions.send_modify(|n| *n += 1);
        WsClientGuard(self)
    }

    /// Follows the number of open realtime sessions.
    pub(crate) fn ws_sessions(&self) -> tokio::sync::watch::Receiver<usize> {
        self.ws_sessions.subscribe()
    }

    /// The Prometheus text exposition (format 0.0.4).
    pub(crate) fn render(&self) -> String {
        self.handle.render()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_prometheus_text() {
        let m = Metrics::new();
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
