//! Alert rules and their evaluation: a pure function of the devices' views,
//! the rules and the time, so every rule is tested without a server.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::DeviceView;

/// When alerts fire. A rule left `None` is off.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct AlertRules {
    /// A device's breaker has not been closed (open, or half-open for a
    /// trial) at least this long.
    pub breaker_open_for: Option<Duration>,
    /// A device has had queued ops and no progress at least this long.
    pub stalled_for: Option<Duration>,
    /// A device has more dead letters than this.
    pub dead_letters_above: Option<u64>,
    /// A tenant's mean health score is below this (0-100).
    pub fleet_health_below: Option<u8>,
}

impl Default for AlertRules {
    /// Breaker open 60 s, stalled 5 min, any dead letter, fleet health
    /// below 50.
    fn default() -> Self {
        Self {
            breaker_open_for: Some(Duration::from_secs(60)),
            stalled_for: Some(Duration::from_secs(300)),
            dead_letters_above: Some(0),
            fleet_health_below: Some(50),
        }
    }
}

/// Which rule an alert comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AlertRule {
    /// [`AlertRules::breaker_open_for`].
    BreakerOpen,
    /// [`AlertRules::stalled_for`].
    Stalled,
    /// [`AlertRules::dead_letters_above`].
    DeadLetters,
    /// [`AlertRules::fleet_health_below`].
    FleetHealth,
}

impl AlertRule {
    /// The rules [`device_alerts`] evaluates, one alert per device each.
    pub(crate) const PER_DEVICE: [Self; 3] = [Self::BreakerOpen, Self::Stalled, Self::DeadLetters];
}

/// A firing alert.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Alert {
    /// Stable identity: rule, tenant and device (none for fleet rules); see
    /// [`alert_key`].
    pub key: String,
    /// The rule.
    pub rule: AlertRule,
    /// The tenant.
    pub tenant: String,
    /// The device, for per-device rules.
    pub device: Option<String>,
    /// When the condition began (server clock, Unix ms) where known.
    pub since: Option<i64>,
    /// What is wrong, for people.
    pub message: String,
}

/// The key of `rule`'s alert on `tenant` (and `device`): the parts joined
/// by `/`, each with `%` and `/` percent-escaped. Tenant names and runner
/// ids may hold both, so without the escape two tenants' alerts could share
/// a key and one would hide the other.
pub fn alert_key(rule: AlertRule, tenant: &str, device: Option<&str>) -> String {
    let mut key = format!("{rule:?}");
    for part in std::iter::once(tenant).chain(device) {
        key.push('/');
        for c in part.chars() {
            match c {
                '%' => key.push_str("%25"),
                '/' => key.push_str("%2F"),
                c => key.push(c),
            }
        }
    }
    key
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// How long a device has had queued ops without progress at `now`, if it has
/// queued ops at all.
pub(crate) fn stalled_for_ms(d: &DeviceView, now: i64) -> Option<i64> {
    (d.queue.queued() > 0).then(|| now.saturating_sub(d.last_progress_at).max(0))
}

/// The alerts firing at `now`, sorted by key. One pass over `devices`.
pub fn evaluate<'a>(
    devices: impl IntoIterator<Item = &'a DeviceView>,
    rules: &AlertRules,
    now: i64,
) -> Vec<Alert> {
    let mut out = Vec::new();
    let mut by_tenant: BTreeMap<&str, (u64, u64)> = BTreeMap::new();
    for d in devices {
        device_alerts(d, rules, now, &mut out);
        let e = by_tenant.entry(&d.tenant).or_default();
        e.0 += u64::from(d.health_score);
        e.1 += 1;
    }
    for (tenant, (sum, n)) in by_tenant {
        out.extend(fleet_health_alert(tenant, sum, n, rules));
    }
    out.sort_by(|a, b| a.key.cmp(&b.key));
    out
}

/// The per-device rules that fire for `d` at `now`, appended to `out`.
pub(crate) fn device_alerts(d: &DeviceView, rules: &AlertRules, now: i64, out: &mut Vec<Alert>) {
    let alert = |rule: AlertRule, since: Option<i64>, message: String| Alert {
        key: alert_key(rule, &d.tenant, Some(&d.runner_id)),
        rule,
        tenant: d.tenant.clone(),
        device: Some(d.runner_id.clone()),
        since,
        message,
    };
    // Not closed rather than open: a breaker whose backend stays down
    // cycles open, half-open, open, and each trial must not restart the
    // clock (nor resolve the alert until the next trip).
    if let (Some(x), Some(since)) = (rules.breaker_open_for, d.not_closed_since) {
        let for_ms = now.saturating_sub(since);
        if for_ms >= millis(x) {
            out.push(alert(
                AlertRule::BreakerOpen,
                Some(since),
                format!(
                    "breaker not closed for {} s on {} (now {})",
                    for_ms / 1000,
                    d.runner_id,
                    d.breaker.as_str()
                ),
            ));
        }
    }
    if let (Some(y), Some(stalled)) = (rules.stalled_for, stalled_for_ms(d, now)) {
        if stalled >= millis(y) {
            out.push(alert(
                AlertRule::Stalled,
                Some(d.last_progress_at),
                format!(
                    "{} ops queued and no progress for {} s on {}",
                    d.queue.queued(),
                    stalled / 1000,
                    d.runner_id
                ),
            ));
        }
    }
    if let Some(z) = rules.dead_letters_above {
        if d.queue.failed > z {
            out.push(alert(
                AlertRule::DeadLetters,
                None,
                format!(
                    "{} dead letters on {} (limit {z})",
                    d.queue.failed, d.runner_id
                ),
            ));
        }
    }
}

/// The fleet-health alert of `tenant`, whose `n` devices' health scores
/// add up to `sum`, if it fires.
pub(crate) fn fleet_health_alert(
    tenant: &str,
    sum: u64,
    n: u64,
    rules: &AlertRules,
) -> Option<Alert> {
    let w = rules.fleet_health_below?;
    if n == 0 {
        return None;
    }
    let mean = sum as f64 / n as f64;
    (mean < f64::from(w)).then(|| Alert {
        key: alert_key(AlertRule::FleetHealth, tenant, None),
        rule: AlertRule::FleetHealth,
        tenant: tenant.to_owned(),
        device: None,
        since: None,
        message: format!("fleet health {mean:.0} below {w} over {n} devices"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use guardian_protocol::telemetry::{BreakerStateName, QueueDepth};

    fn device(tenant: &str, id: &str) -> DeviceView {
        DeviceView {
            tenant: tenant.into(),
            runner_id: id.into(),
            labels: BTreeMap::new(),
            breaker: BreakerStateName::Closed,
            breaker_since: 0,
            not_closed_since: None,
            health_score: 100,
            queue: QueueDepth::default(),
            oldest_pending_age_ms: None,
            last_failures: vec![],
            latency_p50_ms: None,
            latency_p95_ms: None,
            succeeded: 0,
            conflicts: 0,
            breaker_trips: 0,
            last_sync_at: None,
            last_seen: 0,
            last_progress_at: 0,
        }
    }

    fn rules() -> AlertRules {
        AlertRules {
            breaker_open_for: Some(Duration::from_secs(30)),
            stalled_for: Some(Duration::from_secs(60)),
            dead_letters_above: Some(2),
            fleet_health_below: Some(50),
        }
    }

    fn rules_of(alerts: &[Alert]) -> Vec<AlertRule> {
        alerts.iter().map(|a| a.rule).collect()
    }

    #[test]
    fn a_healthy_fleet_raises_nothing() {
        let d = vec![device("t", "a"), device("t", "b")];
        assert!(evaluate(&d, &rules(), 1_000_000).is_empty());
        assert!(evaluate(&[], &rules(), 0).is_empty());
    }

    #[test]
    fn breaker_not_closed_fires_only_after_its_duration() {
        let mut d = device("t", "a");
        d.breaker = BreakerStateName::Open;
        d.not_closed_since = Some(10_000);
        assert!(evaluate(&[d.clone()], &rules(), 39_999).is_empty());
        let fired = evaluate(&[d.clone()], &rules(), 40_000);
        assert_eq!(rules_of(&fired), [AlertRule::BreakerOpen]);
        assert_eq!(fired[0].since, Some(10_000));
        assert_eq!(fired[0].device.as_deref(), Some("a"));
        // A half-open trial of a breaker open since then is not closed.
        d.breaker = BreakerStateName::HalfOpen;
        d.breaker_since = 39_000;
        assert_eq!(
            rules_of(&evaluate(&[d.clone()], &rules(), 40_000)),
            [AlertRule::BreakerOpen]
        );
        d.breaker = BreakerStateName::Closed;
        d.not_closed_since = None;
        assert!(evaluate(&[d], &rules(), 100_000).is_empty());
    }

    #[test]
    fn keys_of_different_alerts_differ_whatever_the_names_hold() {
        let rule = AlertRule::DeadLetters;
        let names = [
            "org", "org/team", "team/d1", "d1", "team", "%2F", "/", "%", "",
        ];
        let mut keys = Vec::new();
        for tenant in names {
            keys.push(alert_key(AlertRule::FleetHealth, tenant, None));
            for device in names {
                keys.push(alert_key(rule, tenant, Some(device)));
            }
        }
        let n = keys.len();
        keys.sort();
        keys.dedup();
        assert_eq!(keys.len(), n);
        // Names without `/` or `%` keep the plain form.
        assert_eq!(alert_key(rule, "acme", Some("d1")), "DeadLetters/acme/d1");
    }

    #[test]
    fn stalled_needs_queued_ops_and_no_progress() {
        let mut d = device("t", "a");
        d.last_progress_at = 0;
        // Nothing queued: an idle device is not stalled.
        assert!(evaluate(&[d.clone()], &rules(), 120_000).is_empty());
        d.queue.pending = 3;
        assert!(evaluate(&[d.clone()], &rules(), 59_999).is_empty());
        assert_eq!(
            rules_of(&evaluate(&[d.clone()], &rules(), 60_000)),
            [AlertRule::Stalled]
        );
        d.queue = QueueDepth {
            pending: 0,
            in_flight: 1,
            failed: 0,
        };
        assert_eq!(
            rules_of(&evaluate(&[d], &rules(), 60_000)),
            [AlertRule::Stalled]
        );
    }

    #[test]
    fn dead_letters_fire_above_the_limit() {
        let mut d = device("t", "a");
        d.queue.failed = 2;
        assert!(evaluate(&[d.clone()], &rules(), 0).is_empty());
        d.queue.failed = 3;
        assert_eq!(
            rules_of(&evaluate(&[d], &rules(), 0)),
            [AlertRule::DeadLetters]
        );
    }

    #[test]
    fn fleet_health_is_a_mean_per_tenant() {
        let mut a = device("t1", "a");
        a.health_score = 20;
        let mut b = device("t1", "b");
        b.health_score = 79;
        // Mean 49.5 < 50: fires for t1 only; t2's healthy device is apart.
        let c = device("t2", "c");
        let fired = evaluate(&[a.clone(), b.clone(), c], &rules(), 0);
        assert_eq!(rules_of(&fired), [AlertRule::FleetHealth]);
        assert_eq!(fired[0].tenant, "t1");
        assert_eq!(fired[0].device, None);
        b.health_score = 80;
        assert!(evaluate(&[a, b], &rules(), 0).is_empty());
    }

    #[test]
    fn rules_set_to_none_are_off() {
        let mut d = device("t", "a");
        d.breaker = BreakerStateName::Open;
        d.not_closed_since = Some(0);
        d.queue.pending = 1;
        d.queue.failed = 100;
        d.health_score = 0;
        let off = AlertRules {
            breaker_open_for: None,
            stalled_for: None,
            dead_letters_above: None,
            fleet_health_below: None,
        };
        assert!(evaluate(&[d.clone()], &off, i64::MAX).is_empty());
        let all = evaluate(&[d], &rules(), 1_000_000);
        assert_eq!(
            rules_of(&all),
            [
                AlertRule::BreakerOpen,
                AlertRule::DeadLetters,
                AlertRule::FleetHealth,
                AlertRule::Stalled
            ]
        );
    }
}
