//! Delivers alert events to a webhook: one JSON POST per event, retried
//! with exponential backoff, in order, by one task.
//!
//! Best effort and bounded: the queue holds [`QUEUE_LEN`] events (more are
//! dropped and logged), each event gets [`ATTEMPTS`] tries, so a dead
//! receiver can slow nothing but its own deliveries.

use std::time::Duration;

use tokio::sync::{mpsc, watch};

use super::AlertEvent;

/// Events waiting for delivery.
pub(crate) const QUEUE_LEN: usize = 256;
/// Tries per event.
pub(crate) const ATTEMPTS: u32 = 6;
/// Delay before the first retry; doubles each time, up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(200);
const MAX_BACKOFF: Duration = Duration::from_secs(10);
const TIMEOUT: Duration = Duration::from_secs(5);

/// The sending side; cheap to share.
#[derive(Debug, Clone)]
pub(crate) struct Webhook {
    tx: mpsc::Sender<AlertEvent>,
}

impl Webhook {
    /// Starts the delivery task for `url`; it ends when `stop` turns true.
    pub(crate) fn start(url: String, stop: watch::Receiver<bool>) -> Result<Self, reqwest::Error> {
        let client = reqwest::Client::builder()
            .timeout(TIMEOUT)
            .connect_timeout(TIMEOUT)
            .redirect(reqwest::redirect::Policy::none())
            .build()?;
        let (tx, rx) = mpsc::channel(QUEUE_LEN);
        tokio::spawn(deliver_all(client, url, rx, stop));
        Ok(Self { tx })
    }

    /// Queues an event; drops it when the queue is full.
    pub(crate) fn send(&self, event: AlertEvent) {
        if self.tx.try_send(event).is_err() {
            tracing::warn!("alert webhook queue full or closed; an alert event was dropped");
        }
    }
}

async fn deliver_all(
    client: reqwest::Client,
    url: String,
    mut rx: mpsc::Receiver<AlertEvent>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let event = tokio::select! {
            e = rx.recv() => match e { Some(e) => e, None => return },
            _ = stop.wait_for(|s| *s) => return,
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
            Err(e) => tracing::debug!(error = %e, attempt, "alert webhook unreachable"),
        }
        if attempt < ATTEMPTS {
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }
    tracing::warn!(key = %event.alert.key, "alert webhook gave up after {ATTEMPTS} attempts");
}
