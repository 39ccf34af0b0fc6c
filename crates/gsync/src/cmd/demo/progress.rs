//! What the demo shows while it runs: a progress bar per device and a live
//! telemetry line on a terminal, plain timestamped lines otherwise.

use std::time::{Duration, Instant};

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

use super::devices::{Device, EventCounts};

/// Live figures for the telemetry line.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Live {
    pub(crate) online: bool,
    pub(crate) counts: EventCounts,
    pub(crate) phase: &'static str,
}

impl Live {
    fn status(&self) -> String {
        format!(
            "{}, server {}",
            self.phase,
            if self.online {
                "online"
            } else {
                "OFFLINE (refusing connections)"
            }
        )
    }

    fn counters(&self) -> String {
        let c = &self.counts;
        format!(
            "answered {}  retried {}  replayed {}  conflicts {}  scenes committed {}  breaker opened {}  takeovers {}",
            c.answered(),
            c.retried,
            c.replayed,
            c.reconciled,
            c.txns_committed,
            c.breaker_opened,
            c.takeovers,
        )
    }
}

/// The demo's display.
#[derive(Debug)]
pub(crate) struct Ui {
    multi: Option<MultiProgress>,
    bars: Vec<ProgressBar>,
    line: Option<ProgressBar>,
    counters: Option<ProgressBar>,
    started: Instant,
    last_plain: Instant,
}

impl Ui {
    /// Bars when `interactive`, plain lines on stderr otherwise.
    pub(crate) fn new(devices: usize, interactive: bool) -> Self {
        let started = Instant::now();
        if !interactive {
            return Self {
                multi: None,
                bars: Vec::new(),
                line: None,
                counters: None,
                started,
                last_plain: started,
            };
        }
        let multi = MultiProgress::with_draw_target(ProgressDrawTarget::stderr_with_hz(10));
        let style = ProgressStyle::with_template(
            "{prefix:>9} {bar:36.green/white} {pos:>4}/{len:<4} acked  {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("##-");
        let bars = (0..devices)
            .map(|d| {
                let bar = multi.add(ProgressBar::new(0));
                bar.set_style(style.clone());
                bar.set_prefix(format!("device {d}"));
                bar
            })
            .collect();
        let line = multi.add(ProgressBar::new_spinner());
        line.set_style(
            ProgressStyle::with_template("{spinner} {elapsed:>3} {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_spinner()),
        );
        line.enable_steady_tick(Duration::from_millis(120));
        let counters = multi.add(ProgressBar::new_spinner());
        counters.set_style(
            ProgressStyle::with_template("      {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_spinner()),
        );
        Self {
            multi: Some(multi),
            bars,
            line: Some(line),
            counters: Some(counters),
            started,
            last_plain: started,
        }
    }

    /// A one-off line (a phase of the demo).
    pub(crate) fn note(&self, msg: &str) {
        let text = format!("[{:>5.1}s] {msg}", self.started.elapsed().as_secs_f64());
        match &self.multi {
            Some(m) => {
                let _ = m.println(text);
            }
            None => eprintln!("{text}"),
        }
    }

    /// Refreshes the bars (or prints a plain status line every 2 s).
    pub(crate) fn update(&mut self, devices: &[Device], live: &Live) {
        if self.multi.is_some() {
            for (bar, d) in self.bars.iter().zip(devices) {
                bar.set_length(d.model.expected_ops() as u64);
                bar.set_position(d.model.acked);
                bar.set_message(format!("enqueued {}/{}", d.next, d.actions.len()));
            }
            if let Some(line) = &self.line {
                line.set_message(live.status());
            }
            if let Some(counters) = &self.counters {
                counters.set_message(live.counters());
            }
            return;
        }
        if self.last_plain.elapsed() >= Duration::from_secs(2) {
            self.last_plain = Instant::now();
            let acked: u64 = devices.iter().map(|d| d.model.acked).sum();
            let expected: usize = devices.iter().map(|d| d.model.expected_ops()).sum();
            let enqueued: usize = devices.iter().map(|d| d.next).sum();
            let total: usize = devices.iter().map(|d| d.actions.len()).sum();
            self.note(&format!(
                "acked {acked}/{expected}, enqueued {enqueued}/{total}; {}; {}",
                live.status(),
                live.counters()
            ));
        }
    }

    /// Removes the bars.
    pub(crate) fn finish(&self) {
        for bar in &self.bars {
            bar.finish();
        }
        for line in [&self.line, &self.counters].into_iter().flatten() {
            line.finish_and_clear();
        }
    }
}
