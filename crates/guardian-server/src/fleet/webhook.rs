//! Delivers alert events to a webhook: one JSON POST per event, retried
//! with exponential backoff, by one task.
//!
//! Best effort and bounded: events wait in [`Pending`], at most one per
//! alert (a newer event of an alert replaces its waiting one, so a flapping
//! device holds one place and cannot crowd other alerts out), at most
//! [`MAX_PENDING`] alerts (more are dropped and logged); each event gets
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
}

impl Pending {
    /// Queues `event` in place of its alert's waiting one; false (dropped)
    /// when it is a new alert and [`MAX_PENDING`] are waiting.
    pub(crate) fn push(&mut self, event: AlertEvent) -> bool {
        match self.events.entry(event.alert.key.clone()) {
            Entry::Occupied(mut waiting) => {
                waiting.insert(event);
                true
            }
            Entry::Vacant(_) if self.order.len() >= MAX_PENDING => false,
            Entry::Vacant(slot) => {
                self.order.push_back(slot.key().clone());
                slot.insert(event);
                true
            }
        }
    }

    /// The next event to deliver.
    pub(crate) fn pop(&mut self) -> Option<AlertEvent> {
        let key = self.order.pop_front()?;
        self.events.remove(&key)
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
        if self.queue.lock().push(event) {
            self.queue.ready.notify_one();
        } else {
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
        AlertEvent {
            status,
            at,
            alert: Alert {
                key: format!("k/{device}"),
                rule: AlertRule::DeadLetters,
                tenant: "t".into(),
                device: Some(device.into()),
                since: None,
                message: String::new(),
            },
        }
    }

    #[test]
    fn a_flapping_alert_holds_one_place_and_delivers_its_latest_state() {
        let mut p = Pending::default();
        assert!(p.push(event("flapper", AlertStatus::Firing, 0)));
        for at in 1..1000 {
            let status = if at % 2 == 0 {
                AlertStatus::Firing
            } else {
                AlertStatus::Resolved
            };
            assert!(p.push(event("flapper", status, at)));
        }
        assert!(p.push(event("victim", AlertStatus::Firing, 1000)));
        let first = p.pop().unwrap();
        assert_eq!(
            (first.alert.key.as_str(), first.at),
            ("k/flapper", 999),
            "in its first place, in its latest state"
        );
        assert_eq!(p.pop().unwrap().alert.key, "k/victim");
        assert_eq!(p.pop(), None);
        // Once taken, a new event of the alert waits behind the others.
        p.push(event("a", AlertStatus::Firing, 0));
        p.push(event("b", AlertStatus::Firing, 0));
        assert_eq!(p.pop().unwrap().alert.key, "k/a");
        p.push(event("a", AlertStatus::Resolved, 1));
        assert_eq!(p.pop().unwrap().alert.key, "k/b");
        assert_eq!(p.pop().unwrap().status, AlertStatus::Resolved);
    }

    #[test]
    fn new_alerts_beyond_the_bound_are_dropped_known_ones_still_update() {
        let mut p = Pending::default();
        for i in 0..MAX_PENDING {
            assert!(p.push(event(&i.to_string(), AlertStatus::Firing, 0)));
        }
        assert!(!p.push(event("one more", AlertStatus::Firing, 0)));
        assert!(p.push(event("0", AlertStatus::Resolved, 1)));
        assert_eq!(p.pop().unwrap().status, AlertStatus::Resolved);
        assert!(p.push(event("one more", AlertStatus::Firing, 0)));
    }
}
