//! Telemetry: the summary's JSON shape is stable (snapshot), and every
//! record reaches the `metrics` facade.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use guardian_sync::breaker::{BreakerState, BreakerTransition};
use guardian_sync::telemetry::{Counter, MetricsSummary, SyncMetrics};
use metrics::{
    Counter as FacadeCounter, CounterFn, Gauge, GaugeFn, Histogram, HistogramFn, Key, KeyName,
    Metadata, Recorder, SharedString, Unit,
};

/// The committed shape of `summary()` as JSON. Changing it breaks scripts
/// using `--json`: add fields, never rename or remove them.
const EXPECTED_SUMMARY: &str = r#"{
  "operations": {
    "enqueued": 5,
    "coalesced": 1,
    "sent": 4,
    "succeeded": 3,
    "failed": 0,
    "retried": 1,
    "conflicts_resolved": 1,
    "breaker_trips": 0,
    "realtime_reconnects": 2,
    "messages_received": 10,
    "stalls": 0
  },
  "latency": {
    "count": 4,
    "avg_ms": 1.5,
    "p50_ms": 1.0,
    "p95_ms": 2.0,
    "p99_ms": 2.0,
    "max_ms": 2.0
  },
  "queue_depth": 7,
  "success_rate": 0.75,
  "health_score": 93,
  "breaker_state": "closed"
}"#;

fn scripted() -> SyncMetrics {
    let m = SyncMetrics::new();
    m.add(Counter::Enqueued, 5);
    m.incr(Counter::Coalesced);
    m.add(Counter::Sent, 4);
    m.add(Counter::Succeeded, 3);
    m.incr(Counter::Retried);
    m.incr(Counter::ConflictsResolved);
    m.add(Counter::RealtimeReconnects, 2);
    m.add(Counter::MessagesReceived, 10);
    // Values below 2.048 ms are exact in the histogram.
    for ms in [1, 1, 2, 2] {
        m.record_latency(Duration::from_millis(ms));
    }
    m.set_queue_depth(7);
    m
}

#[test]
fn summary_json_shape_is_stable() {
    let summary = scripted().summary();
    let json = serde_json::to_string_pretty(&summary).unwrap();
    assert_eq!(json, EXPECTED_SUMMARY);
    let back: MetricsSummary = serde_json::from_str(EXPECTED_SUMMARY).unwrap();
    assert_eq!(back, summary);
}

#[test]
fn readable_report() {
    let text = scripted().summary().to_string();
    let expected = "\
sync telemetry
  operations  enqueued 5  coalesced 1  sent 4  succeeded 3  retried 1  failed 0
              conflicts resolved 1  breaker trips 0  stalls 0
  realtime    reconnects 2  messages 10
  latency     n 4  avg 1.5 ms  p50 1.0 ms  p95 2.0 ms  p99 2.0 ms  max 2.0 ms
  queue depth 7
  success     75.0 %
  health      93/100 (breaker closed)";
    assert_eq!(text, expected);
}

/// A recorder that keeps the last value of every metric by name.
#[derive(Default)]
struct Capture {
    counters: Mutex<HashMap<String, Arc<Cell>>>,
    gauges: Mutex<HashMap<String, Arc<Cell>>>,
    histograms: Mutex<HashMap<String, Arc<Cell>>>,
}

/// Counter total, gauge value (f64 bits) or histogram sample count.
#[derive(Default)]
struct Cell(AtomicU64);

impl CounterFn for Cell {
    fn increment(&self, value: u64) {
        self.0.fetch_add(value, Ordering::SeqCst);
    }
    fn absolute(&self, value: u64) {
        self.0.store(value, Ordering::SeqCst);
    }
}

impl GaugeFn for Cell {
    fn increment(&self, _: f64) {}
    fn decrement(&self, _: f64) {}
    fn set(&self, value: f64) {
        self.0.store(value.to_bits(), Ordering::SeqCst);
    }
}

impl HistogramFn for Cell {
    fn record(&self, _: f64) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

fn cell(map: &Mutex<HashMap<String, Arc<Cell>>>, key: &Key) -> Arc<Cell> {
    map.lock()
        .unwrap()
        .entry(key.name().to_owned())
        .or_default()
        .clone()
}

impl Recorder for Capture {
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> FacadeCounter {
        FacadeCounter::from_arc(cell(&self.counters, key))
    }
    fn register_gauge(&self, key: &Key, _: &Metadata<'_>) -> Gauge {
        Gauge::from_arc(cell(&self.gauges, key))
    }
    fn register_histogram(&self, key: &Key, _: &Metadata<'_>) -> Histogram {
        Histogram::from_arc(cell(&self.histograms, key))
    }
}

impl Capture {
    fn counter(&self, name: &str) -> u64 {
        self.counters.lock().unwrap()[name].0.load(Ordering::SeqCst)
    }
    fn gauge(&self, name: &str) -> f64 {
        f64::from_bits(self.gauges.lock().unwrap()[name].0.load(Ordering::SeqCst))
    }
    fn samples(&self, name: &str) -> u64 {
        self.histograms.lock().unwrap()[name]
            .0
            .load(Ordering::SeqCst)
    }
}

#[test]
fn every_record_reaches_the_metrics_facade() {
    let capture = Capture::default();
    metrics::with_local_recorder(&capture, || {
        let m = scripted();
        m.record_breaker_transition(&BreakerTransition {
            from: BreakerState::Closed,
            to: BreakerState::Open {
                until: Duration::from_secs(60),
            },
            at: Duration::ZERO,
        });
        m.incr(Counter::Stalls);
        m.incr(Counter::Failed);
        let _ = m.summary();
    });
    for (name, value) in [
        ("gsync_ops_enqueued_total", 5),
        ("gsync_ops_coalesced_total", 1),
        ("gsync_ops_sent_total", 4),
        ("gsync_ops_succeeded_total", 3),
        ("gsync_ops_failed_total", 1),
        ("gsync_ops_retried_total", 1),
        ("gsync_conflicts_resolved_total", 1),
        ("gsync_breaker_trips_total", 1),
        ("gsync_realtime_reconnects_total", 2),
        ("gsync_realtime_messages_total", 10),
        ("gsync_stalls_total", 1),
    ] {
        assert_eq!(capture.counter(name), value, "{name}");
    }
    assert_eq!(capture.samples("gsync_request_latency_seconds"), 4);
    assert_eq!(capture.gauge("gsync_queue_depth"), 7.0);
    assert_eq!(capture.gauge("gsync_breaker_state"), 1.0);
    assert!(capture.gauge("gsync_health_score") <= 20.0);
}
