//! The fleet: the latest telemetry snapshot of each device, a short history,
//! the events a dashboard shows, and the alerts.
//!
//! Everything is in memory and bounded: devices per tenant (the tenant's
//! least recently seen device makes room), devices in total (a new device
//! beyond it is refused), history points per device, the event logs, and
//! what the dashboard is sent. Times are the server's clock (`Clock`), not
//! the devices', so a device with a wrong clock cannot hide a stall or an
//! open breaker; a device's clock only tells a late snapshot from a
//! restarted runner's.

pub mod alerts;
pub(crate) mod webhook;

use std::collections::{BTreeMap, VecDeque};
use std::fmt::Write as _;
use std::sync::{Mutex, MutexGuard, PoisonError};

use guardian_protocol::telemetry::{BreakerStateName, QueueDepth, TelemetrySnapshot};
use serde::Serialize;
use tokio::sync::watch;

use alerts::{Alert, AlertRule, AlertRules};

/// Bounds of the fleet's memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FleetLimits {
    /// Devices kept per tenant; the least recently seen makes room.
    pub devices_per_tenant: usize,
    /// Devices kept in total. When full, a new device takes the place of
    /// the least recently seen device of the tenant that holds the most,
    /// if that tenant holds at least two more than the new device's; else
    /// the new device is refused (503). So no tenant can lock another out:
    /// each can always keep its share of the total.
    pub devices_total: usize,
    /// History points kept per device.
    pub history: usize,
}

impl Default for FleetLimits {
    fn default() -> Self {
        Self {
            devices_per_tenant: 1000,
            devices_total: 10_000,
            history: 120,
        }
    }
}

/// `tenant`'s devices, in key order.
fn tenant_devices<'a>(
    devices: &'a BTreeMap<(String, String), Device>,
    tenant: &'a str,
) -> impl Iterator<Item = (&'a (String, String), &'a Device)> {
    devices
        .range((tenant.to_owned(), String::new())..)
        .take_while(move |((t, _), _)| t == tenant)
}

/// Makes room for a new device of `tenant` in a full fleet (see
/// [`FleetLimits::devices_total`]), or refuses it; returns the device
/// evicted.
fn make_room_fairly(
    devices: &mut BTreeMap<(String, String), Device>,
    tenant: &str,
) -> Result<Option<(String, String)>, Refused> {
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for (t, _) in devices.keys() {
        *counts.entry(t.as_str()).or_default() += 1;
    }
    let mine = counts.get(tenant).copied().unwrap_or(0);
    let Some((largest, n)) = counts.into_iter().max_by_key(|&(_, n)| n) else {
        return Err(Refused::Full);
    };
    if n < mine + 2 {
        return Err(Refused::Full);
    }
    let largest = largest.to_owned();
    let oldest = tenant_devices(devices, &largest)
        .min_by_key(|(_, d)| d.view.last_seen)
        .map(|(k, _)| k.clone());
    if let Some(k) = &oldest {
        devices.remove(k);
    }
    Ok(oldest)
}

/// Entries kept in each event log (breaker timeline, incidents, alerts).
const LOG_LEN: usize = 200;
/// Points kept in the fleet's one-per-second series.
const SERIES_LEN: usize = 180;
/// Devices (the worst by health) and firing alerts the dashboard is sent:
/// its state goes whole to every open page several times a second, so it
/// must not grow with the fleet. `aggregates` counts them all.
pub(crate) const DASHBOARD_DEVICES: usize = 100;
/// See [`DASHBOARD_DEVICES`].
pub(crate) const DASHBOARD_ALERTS: usize = 100;
/// How long (server ms) after a device's snapshot one with a lower `seq`
/// may still be a late one of its run ([`is_late`]): far beyond the
/// device's send timeout (5 s) and the server's request timeout (30 s), and
/// the longest a restarted runner whose clock was ahead goes unheard.
const REORDER_WINDOW_MS: i64 = 60_000;

/// One device as alerts and the dashboard see it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DeviceView {
    /// Tenant of the token that sent the snapshots.
    pub tenant: String,
    /// The runner id.
    pub runner_id: String,
    /// The app's labels.
    pub labels: BTreeMap<String, String>,
    /// Breaker state.
    pub breaker: BreakerStateName,
    /// Since when (server ms) the breaker has been in this state.
    pub breaker_since: i64,
    /// Since when (server ms) the breaker has not been closed (open or
    /// half-open, however often it cycled); `None` while closed.
    pub not_closed_since: Option<i64>,
    /// Health score 0-100.
    pub health_score: u8,
    /// Ops by state.
    pub queue: QueueDepth,
    /// Age of the oldest queued op when reported, ms.
    pub oldest_pending_age_ms: Option<u64>,
    /// Latest dead-letter reasons.
    pub last_failures: Vec<String>,
    /// Median latency, ms.
    pub latency_p50_ms: Option<f64>,
    /// p95 latency, ms.
    pub latency_p95_ms: Option<f64>,
    /// Acknowledged ops since the runner started.
    pub succeeded: u64,
    /// Conflicts since the runner started.
    pub conflicts: u64,
    /// Breaker trips since the runner started.
    pub breaker_trips: u64,
    /// The device's last successful sync (device clock, Unix ms).
    pub last_sync_at: Option<i64>,
    /// Last snapshot received (server ms).
    pub last_seen: i64,
    /// Last time (server ms) the device was seen acknowledging ops or with
    /// an empty queue.
    pub last_progress_at: i64,
}

/// One history point of a device.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct HistoryPoint {
    /// Server ms.
    pub at: i64,
    /// Breaker state.
    pub breaker: BreakerStateName,
    /// Health score.
    pub health_score: u8,
    /// Pending plus in flight.
    pub queue: u64,
}

#[derive(Debug)]
struct Device {
    view: DeviceView,
    history: VecDeque<HistoryPoint>,
    /// `seq` of the snapshot applied last.
    seq: u64,
    /// `at` (device clock) of the snapshot applied last.
    at: i64,
}

/// Whether `snap`, received at `now`, is older than the snapshot `d` holds:
/// a lower `seq`, taken no later, within [`REORDER_WINDOW_MS`] of it (a
/// request that timed out at the device but still reached the server, a
/// retrying proxy). Applied, it would roll the device back and count its
/// counters again as a restart's. A restarted runner numbers from 1 again
/// but takes its snapshots later; the same `seq` is the same snapshot again
/// (nothing in it is new, so nothing counts twice) or a restart's.
fn is_late(d: &Device, snap: &TelemetrySnapshot, now: i64) -> bool {
    snap.seq < d.seq && snap.at <= d.at && now.saturating_sub(d.view.last_seen) < REORDER_WINDOW_MS
}

/// A breaker change seen in the fleet.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BreakerChange {
    /// Server ms.
    pub at: i64,
    /// Tenant.
    pub tenant: String,
    /// Device.
    pub device: String,
    /// Previous state (`None` for a new device).
    pub from: Option<BreakerStateName>,
    /// New state.
    pub to: BreakerStateName,
}

/// A conflict or dead letter a device reported.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Incident {
    /// Server ms.
    pub at: i64,
    /// Tenant.
    pub tenant: String,
    /// Device.
    pub device: String,
    /// `conflict` or `dead_letter`.
    pub kind: &'static str,
    /// How many since the previous snapshot.
    pub count: u64,
    /// The latest reason (dead letters).
    pub reason: Option<String>,
}

/// What happened to an alert.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AlertStatus {
    /// Its condition began to hold.
    Firing,
    /// Its condition no longer holds.
    Resolved,
    /// Its device is no longer kept (the least recently seen made room for
    /// another), so whether the condition holds is unknown: a broken device
    /// that went silent is just the one evicted, and is not recovered.
    Evicted,
}

impl AlertStatus {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Firing => "firing",
            Self::Resolved => "resolved",
            Self::Evicted => "evicted",
        }
    }
}

/// An alert firing, resolving or evicted.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AlertEvent {
    /// What happened.
    pub status: AlertStatus,
    /// Server ms.
    pub at: i64,
    /// The alert.
    pub alert: Alert,
}

/// One second of the fleet.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct SeriesPoint {
    /// Server ms.
    pub at: i64,
    /// Ops acknowledged by devices (from their counters) in this second.
    pub acked: u64,
    /// Requests this server answered in this second.
    pub requests: u64,
    /// Mean of the devices' median latency, ms.
    pub p50_ms: Option<f64>,
    /// Highest p95 latency of any device, ms.
    pub p95_ms: Option<f64>,
}

/// Fleet-wide totals (`/metrics` and the dashboard).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Aggregates {
    /// Devices.
    pub devices: u64,
    /// Devices by breaker state.
    pub closed: u64,
    /// Open breakers.
    pub open: u64,
    /// Half-open breakers.
    pub half_open: u64,
    /// Pending plus in-flight ops over all devices.
    pub queue_depth: u64,
    /// Dead letters over all devices.
    pub dead_letters: u64,
    /// Devices stalled longer than the stall rule (or 5 min without one).
    pub stalled: u64,
    /// Alerts firing.
    pub alerts: u64,
}

/// Why a snapshot was not kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refused {
    /// The fleet holds its total of devices.
    Full,
}

#[derive(Debug, Default)]
struct State {
    devices: BTreeMap<(String, String), Device>,
    timeline: VecDeque<BreakerChange>,
    incidents: VecDeque<Incident>,
    active: Vec<Alert>,
    alert_log: VecDeque<AlertEvent>,
    series: VecDeque<SeriesPoint>,
    acked_since_tick: u64,
    requests_at_tick: Option<u64>,
}

impl State {
    /// The alert's device is no longer kept (evicted to make room).
    fn is_gone(&self, alert: &Alert) -> bool {
        alert.device.as_ref().is_some_and(|d| {
            !self
                .devices
                .contains_key(&(alert.tenant.clone(), d.clone()))
        })
    }
}

/// The fleet store; see the module docs.
#[derive(Debug)]
pub(crate) struct Fleet {
    limits: FleetLimits,
    pub(crate) rules: AlertRules,
    state: Mutex<State>,
    /// Bumped on every change, for the dashboard's live stream.
    changed: watch::Sender<u64>,
}

/// Dashboard order: lowest health first, then by name.
fn worse(a: &&Device, b: &&Device) -> std::cmp::Ordering {
    let (a, b) = (&a.view, &b.view);
    (a.health_score, &a.tenant, &a.runner_id).cmp(&(b.health_score, &b.tenant, &b.runner_id))
}

fn push_bounded<T>(q: &mut VecDeque<T>, item: T, len: usize) {
    if q.len() >= len {
        q.pop_front();
    }
    q.push_back(item);
}

impl Fleet {
    pub(crate) fn new(limits: FleetLimits, rules: AlertRules) -> Self {
        Self {
            limits,
            rules,
            state: Mutex::new(State::default()),
            changed: watch::Sender::new(0),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Plain data, each update complete under the lock.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn bump(&self) {
        self.changed.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// A receiver that sees every change.
    pub(crate) fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// Records a validated snapshot of `tenant`'s device at server time
    /// `now`; a late one ([`is_late`]) is ignored. Returns the devices
    /// evicted to make room for a new one.
    pub(crate) fn record(
        &self,
        tenant: &str,
        snap: TelemetrySnapshot,
        now: i64,
    ) -> Result<Vec<(String, String)>, Refused> {
        let mut st = self.lock();
        let key = (tenant.to_owned(), snap.runner_id.clone());
        let mut evicted = Vec::new();
        match st.devices.get(&key) {
            Some(d) if is_late(d, &snap, now) => return Ok(evicted),
            Some(_) => {}
            None => {
                // The tenant's devices only, and no key copied but the one
                // evicted.
                let (n, oldest) = tenant_devices(&st.devices, tenant).fold(
                    (0usize, None::<(i64, &(String, String))>),
                    |(n, oldest), (k, d)| {
                        let this = (d.view.last_seen, k);
                        (n + 1, Some(oldest.map_or(this, |o| o.min(this))))
                    },
                );
                let oldest = oldest.map(|(_, k)| k.clone());
                if n >= self.limits.devices_per_tenant {
                    if let Some(oldest) = oldest {
                        st.devices.remove(&oldest);
                        evicted.push(oldest);
                    }
                }
                if st.devices.len() >= self.limits.devices_total {
                    evicted.extend(make_room_fairly(&mut st.devices, tenant)?);
                }
            }
        }
        let queued = snap.queue.queued();
        let prev = st.devices.remove(&key);
        let prev_breaker = prev.as_ref().map(|p| p.view.breaker);
        let not_closed_since = (snap.breaker != BreakerStateName::Closed).then(|| {
            prev.as_ref()
                .and_then(|p| p.view.not_closed_since)
                .unwrap_or(now)
        });
        let (mut history, breaker_since, last_progress_at, acked, conflicts, dead) = match prev {
            Some(p) => {
                let v = &p.view;
                // Counters restart with the runner: a smaller value is a
                // new run, all of it new.
                let delta = |new: u64, old: u64| if new >= old { new - old } else { new };
                let acked = delta(snap.succeeded, v.succeeded);
                let progressed = acked > 0 || queued == 0;
                let since = if v.breaker == snap.breaker {
                    v.breaker_since
                } else {
                    now
                };
                let conflicts = delta(snap.conflicts, v.conflicts);
                let dead = snap.queue.failed.saturating_sub(v.queue.failed);
                let progress_at = if progressed { now } else { v.last_progress_at };
                (p.history, since, progress_at, acked, conflicts, dead)
            }
            None => (VecDeque::new(), now, now, 0, 0, 0),
        };
        if prev_breaker != Some(snap.breaker) {
            push_bounded(
                &mut st.timeline,
                BreakerChange {
                    at: now,
                    tenant: tenant.to_owned(),
                    device: snap.runner_id.clone(),
                    from: prev_breaker,
                    to: snap.breaker,
                },
                LOG_LEN,
            );
        }
        if conflicts > 0 {
            push_bounded(
                &mut st.incidents,
                Incident {
                    at: now,
                    tenant: tenant.to_owned(),
                    device: snap.runner_id.clone(),
                    kind: "conflict",
                    count: conflicts,
                    reason: None,
                },
                LOG_LEN,
            );
        }
        if dead > 0 {
            push_bounded(
                &mut st.incidents,
                Incident {
                    at: now,
                    tenant: tenant.to_owned(),
                    device: snap.runner_id.clone(),
                    kind: "dead_letter",
                    count: dead,
                    reason: snap.last_failures.last().cloned(),
                },
                LOG_LEN,
            );
        }
        st.acked_since_tick = st.acked_since_tick.saturating_add(acked);
        push_bounded(
            &mut history,
            HistoryPoint {
                at: now,
                breaker: snap.breaker,
                health_score: snap.health_score,
                queue: queued,
            },
            self.limits.history.max(1),
        );
        let view = DeviceView {
            tenant: tenant.to_owned(),
            runner_id: snap.runner_id,
            labels: snap.labels,
            breaker: snap.breaker,
            breaker_since,
            not_closed_since,
            health_score: snap.health_score,
            queue: snap.queue,
            oldest_pending_age_ms: snap.oldest_pending_age_ms,
            last_failures: snap.last_failures,
            latency_p50_ms: snap.latency_p50_ms,
            latency_p95_ms: snap.latency_p95_ms,
            succeeded: snap.succeeded,
            conflicts: snap.conflicts,
            breaker_trips: snap.breaker_trips,
            last_sync_at: snap.last_sync_at,
            last_seen: now,
            last_progress_at,
        };
        let device = Device {
            view,
            history,
            seq: snap.seq,
            at: snap.at,
        };
        st.devices.insert(key, device);
        drop(st);
        self.bump();
        Ok(evicted)
    }

    /// Evaluates the rules at `now`; returns what started and stopped firing.
    pub(crate) fn evaluate(&self, now: i64) -> Vec<AlertEvent> {
        let mut st = self.lock();
        let firing = alerts::evaluate(st.devices.values().map(|d| &d.view), &self.rules, now);
        let event = |status, alert: &Alert| AlertEvent {
            status,
            at: now,
            alert: alert.clone(),
        };
        // Both lists are sorted by key.
        let known =
            |list: &[Alert], key: &str| list.binary_search_by(|a| a.key.as_str().cmp(key)).is_ok();
        let mut events: Vec<_> = firing
            .iter()
            .filter(|a| !known(&st.active, &a.key))
            .map(|a| event(AlertStatus::Firing, a))
            .collect();
        for b in st.active.iter().filter(|b| !known(&firing, &b.key)) {
            let status = if st.is_gone(b) {
                AlertStatus::Evicted
            } else {
                AlertStatus::Resolved
            };
            events.push(event(status, b));
        }
        // Messages carry durations: refresh them without an event.
        st.active = firing;
        self.log_alert_events(st, &events);
        events
    }

    /// Appends `events` to the alert log and tells the dashboard.
    fn log_alert_events(&self, mut st: MutexGuard<'_, State>, events: &[AlertEvent]) {
        for e in events {
            push_bounded(&mut st.alert_log, e.clone(), LOG_LEN);
        }
        drop(st);
        if !events.is_empty() {
            self.bump();
        }
    }

    /// Evaluates what a snapshot from `runner_id` may have changed at `now`:
    /// its own rules, the alerts of the devices `evicted` to make room for
    /// it (they end as evicted), and the fleet health of their tenants.
    /// Reading those tenants' devices, not the fleet, keeps a report cheap
    /// when thousands of devices report and fire at once (a backend
    /// outage); the rules of the other devices move with time alone, and
    /// [`Self::evaluate`] sees them once a second.
    pub(crate) fn evaluate_device(
        &self,
        tenant: &str,
        runner_id: &str,
        evicted: &[(String, String)],
        now: i64,
    ) -> Vec<AlertEvent> {
        let mut st = self.lock();
        let reporter = (tenant.to_owned(), runner_id.to_owned());
        let devices: Vec<&(String, String)> = std::iter::once(&reporter).chain(evicted).collect();
        let mut tenants: Vec<&str> = devices.iter().map(|(t, _)| t.as_str()).collect();
        tenants.sort_unstable();
        tenants.dedup();
        let mut firing = Vec::new();
        let mut scope = Vec::new();
        for key in &devices {
            if let Some(d) = st.devices.get(*key) {
                alerts::device_alerts(&d.view, &self.rules, now, &mut firing);
            }
            scope.extend(
                AlertRule::PER_DEVICE
                    .into_iter()
                    .map(|rule| alerts::alert_key(rule, &key.0, Some(&key.1))),
            );
        }
        for t in tenants {
            let (sum, n) = tenant_devices(&st.devices, t).fold((0u64, 0u64), |(sum, n), (_, d)| {
                (sum + u64::from(d.view.health_score), n + 1)
            });
            firing.extend(alerts::fleet_health_alert(t, sum, n, &self.rules));
            scope.push(alerts::alert_key(AlertRule::FleetHealth, t, None));
        }
        scope.sort();
        scope.dedup();
        let mut events = Vec::new();
        let mut ended = Vec::new();
        for key in &scope {
            let now_firing = firing
                .iter()
                .position(|a| &a.key == key)
                .map(|i| firing.swap_remove(i));
            let at = st.active.binary_search_by(|a| a.key.as_str().cmp(key));
            match (at, now_firing) {
                (Ok(i), Some(alert)) => st.active[i] = alert,
                (Err(i), Some(alert)) => {
                    events.push(AlertEvent {
                        status: AlertStatus::Firing,
                        at: now,
                        alert: alert.clone(),
                    });
                    st.active.insert(i, alert);
                }
                (Ok(i), None) => {
                    let alert = st.active.remove(i);
                    let status = if st.is_gone(&alert) {
                        AlertStatus::Evicted
                    } else {
                        AlertStatus::Resolved
                    };
                    ended.push(AlertEvent {
                        status,
                        at: now,
                        alert,
                    });
                }
                (Err(_), None) => {}
            }
        }
        events.extend(ended);
        self.log_alert_events(st, &events);
        events
    }

    /// Closes one second of the series: ops acknowledged since the last
    /// tick and requests answered (`requests_total`, a running counter).
    pub(crate) fn tick(&self, now: i64, requests_total: u64) {
        let mut st = self.lock();
        let views = st.devices.values().map(|d| &d.view);
        let (mut p50_sum, mut p50_n, mut p95) = (0.0, 0u64, None::<f64>);
        for v in views {
            if let Some(p50) = v.latency_p50_ms {
                p50_sum += p50;
                p50_n += 1;
            }
            if let Some(v) = v.latency_p95_ms {
                p95 = Some(p95.map_or(v, |m| m.max(v)));
            }
        }
        let requests = requests_total.saturating_sub(st.requests_at_tick.unwrap_or(requests_total));
        st.requests_at_tick = Some(requests_total);
        let point = SeriesPoint {
            at: now,
            acked: std::mem::take(&mut st.acked_since_tick),
            requests,
            p50_ms: (p50_n > 0).then(|| p50_sum / p50_n as f64),
            p95_ms: p95,
        };
        push_bounded(&mut st.series, point, SERIES_LEN);
        drop(st);
        self.bump();
    }

    /// Fleet-wide totals at `now`.
    pub(crate) fn aggregates(&self, now: i64) -> Aggregates {
        self.aggregates_of(&self.lock(), now)
    }

    fn aggregates_of(&self, st: &State, now: i64) -> Aggregates {
        let stall_ms = self.rules.stalled_for.map_or(300_000, |d| {
            i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
        });
        let mut a = Aggregates {
            devices: st.devices.len() as u64,
            alerts: st.active.len() as u64,
            ..Aggregates::default()
        };
        for d in st.devices.values().map(|d| &d.view) {
            match d.breaker {
                BreakerStateName::Closed => a.closed += 1,
                BreakerStateName::Open => a.open += 1,
                BreakerStateName::HalfOpen => a.half_open += 1,
            }
            // Sums of what devices report: saturate, never wrap or panic.
            a.queue_depth = a.queue_depth.saturating_add(d.queue.queued());
            a.dead_letters = a.dead_letters.saturating_add(d.queue.failed);
            if alerts::stalled_for_ms(d, now).is_some_and(|s| s >= stall_ms) {
                a.stalled += 1;
            }
        }
        a
    }

    /// The Prometheus text of the fleet gauges.
    pub(crate) fn render(&self, now: i64) -> String {
        let a = self.aggregates(now);
        let mut out = String::new();
        out.push_str("# HELP guardian_fleet_devices Devices reporting telemetry, by breaker state.\n# TYPE guardian_fleet_devices gauge\n");
        for (state, n) in [
            ("closed", a.closed),
            ("open", a.open),
            ("half_open", a.half_open),
        ] {
            let _ = writeln!(out, "guardian_fleet_devices{{breaker=\"{state}\"}} {n}");
        }
        for (name, help, v) in [
            (
                "guardian_fleet_queue_depth",
                "Ops pending or in flight over all devices.",
                a.queue_depth,
            ),
            (
                "guardian_fleet_dead_letters",
                "Dead-letter ops over all devices.",
                a.dead_letters,
            ),
            (
                "guardian_fleet_stalled_devices",
                "Devices with queued ops and no progress for the stall time.",
                a.stalled,
            ),
            ("guardian_fleet_alerts_firing", "Alerts firing.", a.alerts),
        ] {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
        }
        out
    }

    /// What the dashboard shows at `now`: totals of the whole fleet, the
    /// [`DASHBOARD_DEVICES`] worst devices (lowest health first) and at
    /// most [`DASHBOARD_ALERTS`] firing alerts (tenant-wide ones first).
    /// Only those are cloned, under the lock.
    pub(crate) fn dashboard(&self, now: i64) -> DashboardData {
        let st = self.lock();
        let aggregates = self.aggregates_of(&st, now);
        let mut worst: Vec<&Device> = st.devices.values().collect();
        if worst.len() > DASHBOARD_DEVICES {
            worst.select_nth_unstable_by(DASHBOARD_DEVICES, worse);
            worst.truncate(DASHBOARD_DEVICES);
        }
        worst.sort_unstable_by(worse);
        let devices = worst
            .into_iter()
            .map(|d| DashboardDevice {
                view: d.view.clone(),
                history: d.history.iter().copied().collect(),
            })
            .collect();
        let (fleet_wide, per_device): (Vec<&Alert>, Vec<&Alert>) =
            st.active.iter().partition(|a| a.device.is_none());
        DashboardData {
            now,
            aggregates,
            devices,
            timeline: st.timeline.iter().cloned().collect(),
            incidents: st.incidents.iter().rev().take(50).cloned().collect(),
            alerts: fleet_wide
                .into_iter()
                .chain(per_device)
                .take(DASHBOARD_ALERTS)
                .cloned()
                .collect(),
            alert_log: st.alert_log.iter().rev().take(50).cloned().collect(),
            series: st.series.iter().copied().collect(),
        }
    }
}

/// A device with its history, for the dashboard.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct DashboardDevice {
    #[serde(flatten)]
    view: DeviceView,
    history: Vec<HistoryPoint>,
}

/// The dashboard's data (JSON of `/dashboard/state` and of each SSE event);
/// see [`Fleet::dashboard`].
#[derive(Debug, Clone, Serialize)]
pub(crate) struct DashboardData {
    now: i64,
    aggregates: Aggregates,
    devices: Vec<DashboardDevice>,
    timeline: Vec<BreakerChange>,
    incidents: Vec<Incident>,
    alerts: Vec<Alert>,
    alert_log: Vec<AlertEvent>,
    series: Vec<SeriesPoint>,
}

/// Evaluates the alert rules at `now` and hands new events to the webhook.
pub(crate) fn evaluate_alerts(fleet: &Fleet, webhook: Option<&webhook::Webhook>, now: i64) {
    announce(fleet.evaluate(now), webhook);
}

/// [`evaluate_alerts`] for what one device's snapshot may have changed
/// ([`Fleet::evaluate_device`]).
pub(crate) fn evaluate_device_alerts(
    fleet: &Fleet,
    webhook: Option<&webhook::Webhook>,
    tenant: &str,
    runner_id: &str,
    evicted: &[(String, String)],
    now: i64,
) {
    announce(
        fleet.evaluate_device(tenant, runner_id, evicted, now),
        webhook,
    );
}

fn announce(events: Vec<AlertEvent>, webhook: Option<&webhook::Webhook>) {
    for event in events {
        tracing::info!(status = event.status.as_str(), key = %event.alert.key, "fleet alert");
        if let Some(hook) = webhook {
            hook.send(event);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snap(id: &str, seq: u64, at: i64, breaker: BreakerStateName) -> TelemetrySnapshot {
        TelemetrySnapshot {
            runner_id: id.into(),
            labels: BTreeMap::new(),
            at,
            seq,
            queue: QueueDepth::default(),
            oldest_pending_age_ms: None,
            last_failures: vec![],
            breaker,
            health_score: 90,
            latency_p50_ms: None,
            latency_p95_ms: None,
            succeeded: seq,
            failed: 0,
            conflicts: 0,
            breaker_trips: 0,
            last_sync_at: None,
        }
    }

    fn view(f: &Fleet, id: &str) -> DeviceView {
        let st = f.lock();
        st.devices[&("t".to_owned(), id.to_owned())].view.clone()
    }

    fn no_rules() -> AlertRules {
        AlertRules {
            breaker_open_for: None,
            stalled_for: None,
            dead_letters_above: None,
            fleet_health_below: None,
        }
    }

    #[test]
    fn a_late_snapshot_is_ignored_a_restarted_runners_is_not() {
        use BreakerStateName::{Closed, Open};
        let f = Fleet::new(FleetLimits::default(), no_rules());
        f.record("t", snap("d", 5, 5_000, Open), 0).unwrap();
        // Lower seq, taken earlier (or at the same time): late.
        for (seq, at) in [(4, 4_000), (4, 5_000)] {
            f.record("t", snap("d", seq, at, Closed), 1_000).unwrap();
            assert_eq!(view(&f, "d").breaker, Open, "seq {seq} at {at}");
        }
        // The same seq again is the same snapshot again, or a restart's.
        f.record("t", snap("d", 5, 5_000, Open), 2_000).unwrap();
        assert_eq!(view(&f, "d").last_seen, 2_000);
        // A restarted runner numbers from 1 again, later.
        f.record("t", snap("d", 1, 9_000, Closed), 3_000).unwrap();
        assert_eq!(
            (view(&f, "d").breaker, view(&f, "d").succeeded),
            (Closed, 1)
        );
        // A lower seq long after the device's last snapshot cannot be a
        // late one of its run: a restart whose clock is behind.
        f.record("t", snap("d", 9, 9_500, Open), 4_000).unwrap();
        f.record("t", snap("d", 2, 0, Closed), 4_000 + REORDER_WINDOW_MS - 1)
            .unwrap();
        assert_eq!(view(&f, "d").breaker, Open);
        f.record("t", snap("d", 2, 0, Closed), 4_000 + REORDER_WINDOW_MS)
            .unwrap();
        assert_eq!(view(&f, "d").breaker, Closed);
    }

    #[test]
    fn a_breaker_is_not_closed_from_its_trip_until_it_closes() {
        use BreakerStateName::{Closed, HalfOpen, Open};
        let f = Fleet::new(FleetLimits::default(), no_rules());
        f.record("t", snap("d", 1, 0, Closed), 0).unwrap();
        assert_eq!(view(&f, "d").not_closed_since, None);
        for (seq, state, now) in [(2, Open, 10), (3, HalfOpen, 60_010), (4, Open, 60_200)] {
            f.record("t", snap("d", seq, 0, state), now).unwrap();
            assert_eq!(view(&f, "d").not_closed_since, Some(10), "{state:?}");
        }
        assert_eq!(view(&f, "d").breaker_since, 60_200);
        f.record("t", snap("d", 5, 0, Closed), 70_000).unwrap();
        assert_eq!(view(&f, "d").not_closed_since, None);
        // A device first seen open has not been closed since then.
        f.record("t", snap("e", 1, 0, HalfOpen), 80_000).unwrap();
        assert_eq!(view(&f, "e").not_closed_since, Some(80_000));
    }

    #[test]
    fn an_evicted_devices_alert_ends_as_evicted_a_recovered_ones_as_resolved() {
        let limits = FleetLimits {
            devices_per_tenant: 2,
            ..FleetLimits::default()
        };
        let rules = AlertRules {
            dead_letters_above: Some(0),
            ..no_rules()
        };
        let f = Fleet::new(limits, rules);
        let mut broken = snap("broken", 1, 0, BreakerStateName::Closed);
        broken.queue.failed = 1;
        f.record("t", broken.clone(), 0).unwrap();
        let mut healed = broken.clone();
        healed.runner_id = "healed".into();
        f.record("t", healed.clone(), 1).unwrap();
        let fired = f.evaluate(1);
        assert_eq!(fired.len(), 2);
        assert!(fired.iter().all(|e| e.status == AlertStatus::Firing));
        healed.seq = 2;
        healed.queue.failed = 0;
        f.record("t", healed, 2).unwrap();
        f.record("t", snap("new", 1, 0, BreakerStateName::Closed), 3)
            .unwrap();
        let ended: Vec<_> = f
            .evaluate(3)
            .into_iter()
            .map(|e| (e.alert.device.unwrap_or_default(), e.status))
            .collect();
        assert_eq!(
            ended,
            [
                ("broken".to_owned(), AlertStatus::Evicted),
                ("healed".to_owned(), AlertStatus::Resolved)
            ]
        );
    }

    /// The keys and statuses of `events`.
    fn keyed(events: &[AlertEvent]) -> Vec<(&str, AlertStatus)> {
        events
            .iter()
            .map(|e| (e.alert.key.as_str(), e.status))
            .collect()
    }

    /// A report settles its device's alerts and its tenant's health at
    /// once; another device's alert, which only time changed, waits for the
    /// full evaluation.
    #[test]
    fn a_report_settles_its_own_device_and_tenant_only() {
        use AlertStatus::{Firing, Resolved};
        use BreakerStateName::{Closed, Open};
        let rules = AlertRules {
            breaker_open_for: Some(std::time::Duration::from_secs(60)),
            fleet_health_below: Some(50),
            ..no_rules()
        };
        let f = Fleet::new(FleetLimits::default(), rules);
        f.record("t", snap("a", 1, 0, Open), 0).unwrap();
        f.record("t", snap("b", 1, 0, Open), 0).unwrap();
        assert!(f.evaluate_device("t", "a", &[], 0).is_empty());
        // A minute on, b reports: b's alert fires, a's waits for the tick.
        f.record("t", snap("b", 2, 0, Open), 60_000).unwrap();
        let fired = f.evaluate_device("t", "b", &[], 60_000);
        assert_eq!(keyed(&fired), [("BreakerOpen/t/b", Firing)]);
        assert_eq!(keyed(&f.evaluate(60_000)), [("BreakerOpen/t/a", Firing)]);
        // A sick device of another tenant fires that tenant's health, and
        // nothing of t's; its recovery resolves it.
        let mut sick = snap("c", 1, 0, Closed);
        for (seq, health, status) in [(1, 10, Firing), (2, 90, Resolved)] {
            let now = 60_000 + i64::try_from(seq).unwrap();
            sick.seq = seq;
            sick.health_score = health;
            f.record("u", sick.clone(), now).unwrap();
            let fired = f.evaluate_device("u", "c", &[], now);
            assert_eq!(keyed(&fired), [("FleetHealth/u", status)]);
        }
        assert!(f.evaluate(60_002).is_empty());
    }

    /// Once every device has reported at the same time, the per-report
    /// evaluations hold what a full one finds: it fires and resolves
    /// nothing more.
    #[test]
    fn reports_of_every_device_agree_with_a_full_evaluation() {
        let mut rng = 0x9e37_79b9_7f4a_7c15_u64;
        let mut next = |n: u64| {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng % n
        };
        // Room for every device, then for fewer than report: new devices
        // evict the least recently seen of their tenant (t has 30 devices,
        // u and v/w 15 each), and then the largest tenant's.
        for limits in [
            FleetLimits::default(),
            FleetLimits {
                devices_per_tenant: 25,
                devices_total: 50,
                history: 4,
            },
        ] {
            agree_with_full_evaluation(limits, &mut next);
        }
    }

    fn agree_with_full_evaluation(limits: FleetLimits, next: &mut impl FnMut(u64) -> u64) {
        let f = Fleet::new(limits, AlertRules::default());
        for round in 0..5_u64 {
            let now = i64::try_from(round).unwrap() * 120_000;
            for i in 0..60 {
                // Every device once a round, in another order each round.
                let n = (usize::try_from(round).unwrap() * 7 + i) % 60;
                let tenant = ["t", "t", "u", "v/w"][n % 4];
                let id = format!("d{n}");
                let mut s = snap(&id, round + 1, now, BreakerStateName::Closed);
                s.breaker = [BreakerStateName::Closed, BreakerStateName::Open][next(2) as usize];
                s.health_score = u8::try_from(next(101)).unwrap();
                s.queue.failed = next(2);
                s.queue.pending = next(3);
                s.succeeded = if next(2) == 0 { 0 } else { round + 1 };
                let Ok(evicted) = f.record(tenant, s, now) else {
                    continue;
                };
                f.evaluate_device(tenant, &id, &evicted, now);
            }
            // Health is settled by each report of the tenant, the last one
            // seeing every device.
            let full = f.evaluate(now);
            assert!(full.is_empty(), "{limits:?}, round {round}: {full:?}");
        }
    }

    #[test]
    fn the_dashboard_holds_the_worst_devices_and_counts_them_all() {
        let f = Fleet::new(FleetLimits::default(), AlertRules::default());
        let n = DASHBOARD_DEVICES * 3 / 2;
        for i in 0..n {
            let mut s = snap(&format!("d{i:03}"), 1, 0, BreakerStateName::Closed);
            s.health_score = u8::try_from(99 - i % 100).unwrap();
            f.record("t", s, 0).unwrap();
        }
        let d = f.dashboard(0);
        assert_eq!(d.aggregates.devices, n as u64);
        assert_eq!(d.devices.len(), DASHBOARD_DEVICES);
        let health: Vec<u8> = d.devices.iter().map(|d| d.view.health_score).collect();
        assert!(health.windows(2).all(|w| w[0] <= w[1]), "{health:?}");
        // Every device left out is at least as healthy as every one shown.
        let shown_worst = health.last().copied().unwrap();
        let st = f.lock();
        let left_out = st.devices.values().filter(|x| {
            !d.devices
                .iter()
                .any(|s| s.view.runner_id == x.view.runner_id)
        });
        assert!(left_out
            .into_iter()
            .all(|x| x.view.health_score >= shown_worst));
    }
}
