//! Delivers alert events to a webhook: one JSON POST per event, retried
//! with exponential backoff, by one task.
//!
//! Best effort and bounded: events wait in [`Pending`], at most one per
//! alert (a newer event of an alert replaces its waiting one, so a flapping
//! device holds one place and cannot crowd other alerts out), at most
//! [`MAX_PENDING`] alerts; when they are full, a tenant holding fewer places
//! takes one from the tenant holding the most (so one tenant's big fleet
//! cannot crowd another tenant out), and what is dropped is logged. Each
//! event gets
//! [`ATTEMPTS`] tries, so a dead receiver can slow nothing but its own
//! deliveries. The webhook URL may carry a secret (Slack, Teams and
//! PagerDuty put one in the path), so it is never logged.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::{watch, Notify};

use super::AlertEvent;

/// Alerts whose events may wait for delivery at once: more than a full
/// fleet has at a time in practice, a bound on memory when the receiver is
/// down and devices come and go.
pub(crate) const MAX_PENDING: usize = 4096;
/// Tries per event.
pub(crate) const ATTEMPTS: u32 = 6;
/// Delay before the first retry; doubles each time, up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(200);
const MAX_BACKOFF: Duration = Duration::from_secs(10);
const TIMEOUT: Duration = Duration::from_secs(5);

/// Events waiting for delivery: the latest of each alert, alerts in the
/// order their first waiting event came in.
#[derive(Debug, Default)]
pub(crate) struct Pending {
    events: HashMap<String, AlertEvent>,
    order: VecDeque<String>,
    /// Waiting alerts per tenant.
    held: HashMap<String, usize>,
}

impl Pending {
    /// Queues `event` in place of its alert's waiting one. A new alert
    /// when [`MAX_PENDING`] are waiting takes the place of the newest alert
    /// of the tenant holding the most, if that tenant holds at least two
    /// more than its own; else it is dropped. Returns the key of the alert
    /// dropped, if any.
    pub(crate) fn push(&mut self, event: AlertEvent) -> Option<String> {
        if let Some(waiting) = self.events.get_mut(&event.alert.key) {
            *waiting = event;
            return None;
        }
        let mut dropped = None;
        if self.order.len() >= MAX_PENDING {
            let mine = self.held.get(&event.alert.tenant).copied().unwrap_or(0);
            let most = self
                .held
                .iter()
                .max_by_key(|(_, n)| **n)
                .filter(|(_, n)| **n >= mine + 2)
                .map(|(tenant, _)| tenant.clone());
            let Some(most) = most else {
                return Some(event.alert.key);
            };
            let newest = self
                .order
                .iter()
                .rposition(|key| self.events.get(key).is_some_and(|e| e.alert.tenant == most));
            let Some(newest) = newest.and_then(|i| self.order.remove(i)) else {
                return Some(event.alert.key);
            };
            self.forget(&newest);
            dropped = Some(newest);
        }
        *self.held.entry(event.alert.tenant.clone()).or_default() += 1;
        self.order.push_back(event.alert.key.clone());
        self.events.insert(event.alert.key.clone(), event);
        dropped
    }

    /// The next event to deliver.
    pub(crate) fn pop(&mut self) -> Option<AlertEvent> {
        let key = self.order.pop_front()?;
        self.forget(&key)
    }

    /// Removes the waiting event of `key` (already out of `order`).
    fn forget(&mut self, key: &str) -> Option<AlertEvent> {
        let event = self.events.remove(key)?;
        if let Entry::Occupied(mut n) = self.held.entry(event.alert.tenant.clone()) {
            *n.get_mut() -= 1;
            if *n.get() == 0 {
                n.remove();
            }
        }
        Some(event)
    }
}

#[derive(Debug, Default)]
struct Queue {
    pending: Mutex<Pending>,
    /// Signalled after each push; holds one wake-up for a task not waiting.
    ready: Notify,
}

impl Queue {
    fn lock(&self) -> std::sync::MutexGuard<'_, Pending> {
        // Plain data, each change complete under the lock.
        self.pending.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The sending side; cheap to share.
#[derive(Debug, Clone)]
pub(crate) struct Webhook {
    queue: Arc<Queue>,
}

impl Webhook {
    /// Starts the delivery task for `url`; it ends when `stop` turns true.
    pub(crate) fn start(url: String, stop: watch::Receiver<bool>) -> Result<Self, reqwest::Error> {
        let client = reqwest::Client::builder()
            .timeout(TIMEOUT)
            .connect_timeout(TIMEOUT)
            .redirect(reqwest::redirect::Policy::none())
            .build()?;
        let queue = Arc::new(Queue::default());
        tokio::spawn(deliver_all(client, url, Arc::clone(&queue), stop));
        Ok(Self { queue })
    }

    /// Queues an event (see [`Pending::push`]).
    pub(crate) fn send(&self, event: AlertEvent) {
        let key = event.alert.key.clone();
        let dropped = self.queue.lock().push(event);
        if dropped.as_ref() != Some(&key) {
            self.queue.ready.notify_one();
        }
        if let Some(key) = dropped {
            tracing::warn!(%key, "alert webhook queue full; an alert event was dropped");
        }
    }
}

async fn deliver_all(
    client: reqwest::Client,
    url: String,
    queue: Arc<Queue>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let next = queue.lock().pop();
        let Some(event) = next else {
            tokio::select! {
                () = queue.ready.notified() => continue,
                _ = stop.wait_for(|s| *s) => return,
            }
        };
        tokio::select! {
            () = deliver(&client, &url, &event) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
    }
}

async fn deliver(client: &reqwest::Client, url: &str, event: &AlertEvent) {
    let mut backoff = FIRST_BACKOFF;
    for attempt in 1..=ATTEMPTS {
        match client.post(url).json(event).send().await {
            Ok(r) if r.status().is_success() => return,
            Ok(r) => tracing::debug!(
                status = r.status().as_u16(),
                attempt,
                "alert webhook refused"
            ),
            // reqwest's error names the URL, which may hold a secret.
            Err(e) => {
                tracing::debug!(error = %e.without_url(), attempt, "alert webhook unreachable");
            }
        }
        if attempt < ATTEMPTS {
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }
    tracing::warn!(key = %event.alert.key, "alert webhook gave up after {ATTEMPTS} attempts");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fleet::alerts::{Alert, AlertRule};
    use crate::fleet::AlertStatus;

    fn event(device: &str, status: AlertStatus, at: i64) -> AlertEvent {
        event_of("t", device, status, at)
    }

    fn event_of(tenant: &str, device: &str, status: AlertStatus, at: i64) -> AlertEvent {
        AlertEvent {
            status,
            at,
            alert: Alert {
                key: format!("{tenant}/{device}"),
                rule: AlertRule::DeadLetters,
                tenant: tenant.into(),
                device: Some(device.into()),
                since: None,
                message: String::new(),
            },
        }
    }

    #[test]
    fn a_flapping_alert_holds_one_place_and_delivers_its_latest_state() {
        let mut p = Pending::default();
        assert_eq!(p.push(event("flapper", AlertStatus::Firing, 0)), None);
        for at in 1..1000 {
            let status = if at % 2 == 0 {
                AlertStatus::Firing
            } else {
                AlertStatus::Resolved
            };
            assert_eq!(p.push(event("flapper", status, at)), None);
        }
        assert_eq!(p.push(event("victim", AlertStatus::Firing, 1000)), None);
        let first = p.pop().unwrap();
        assert_eq!(
            (first.alert.key.as_str(), first.at),
            ("t/flapper", 999),
            "in its first place, in its latest state"
        );
        assert_eq!(p.pop().unwrap().alert.key, "t/victim");
        assert_eq!(p.pop(), None);
        // Once taken, a new event of the alert waits behind the others.
        p.push(event("a", AlertStatus::Firing, 0));
        p.push(event("b", AlertStatus::Firing, 0));
        assert_eq!(p.pop().unwrap().alert.key, "t/a");
        p.push(event("a", AlertStatus::Resolved, 1));
        assert_eq!(p.pop().unwrap().alert.key, "t/b");
        assert_eq!(p.pop().unwrap().status, AlertStatus::Resolved);
    }

    #[test]
    fn new_alerts_beyond_the_bound_are_dropped_known_ones_still_update() {
        let mut p = Pending::default();
        for i in 0..MAX_PENDING {
            assert_eq!(p.push(event(&i.to_string(), AlertStatus::Firing, 0)), None);
        }
        assert_eq!(
            p.push(event("one more", AlertStatus::Firing, 0)).as_deref(),
            Some("t/one more")
        );
        assert_eq!(p.push(event("0", AlertStatus::Resolved, 1)), None);
        assert_eq!(p.pop().unwrap().status, AlertStatus::Resolved);
        assert_eq!(p.push(event("one more", AlertStatus::Firing, 0)), None);
    }

    /// One tenant's big fleet fills the queue: another tenant's alerts
    /// still get in, each taking the newest place of the biggest holder,
    /// until the two hold about as many; nothing else moves.
    #[test]
    fn a_full_queue_makes_room_for_a_tenant_holding_fewer() {
        let mut p = Pending::default();
        for i in 0..MAX_PENDING {
            assert_eq!(
                p.push(event_of("big", &i.to_string(), AlertStatus::Firing, 0)),
                None
            );
        }
        let last = MAX_PENDING - 1;
        assert_eq!(
            p.push(event_of("small", "s0", AlertStatus::Firing, 1)),
            Some(format!("big/{last}")),
            "the big tenant's newest alert makes room"
        );
        assert_eq!(
            p.push(event_of("big", "again", AlertStatus::Firing, 2))
                .as_deref(),
            Some("big/again"),
            "the biggest holder cannot take from a smaller one"
        );
        for i in 1..MAX_PENDING / 2 {
            assert!(p
                .push(event_of("small", &format!("s{i}"), AlertStatus::Firing, 1))
                .is_some());
        }
        assert_eq!(p.held["small"], MAX_PENDING / 2);
        assert_eq!(p.held["big"], MAX_PENDING / 2);
        assert_eq!(
            p.push(event_of("small", "one more", AlertStatus::Firing, 1))
                .as_deref(),
            Some("small/one more"),
            "even shares: the newcomer is dropped"
        );
        assert_eq!(p.order.len(), MAX_PENDING);
        assert_eq!(
            p.pop().unwrap().alert.key,
            "big/0",
            "delivery order unchanged"
        );
        let mut delivered = 1;
        while p.pop().is_some() {
            delivered += 1;
        }
        assert_eq!(delivered, MAX_PENDING);
        assert!(p.held.is_empty() && p.events.is_empty());
    }
}
