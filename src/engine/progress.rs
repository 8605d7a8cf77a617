//! Showing how far a build got: a progress bar on a terminal, log lines otherwise, and a JSON
//! snapshot in the catalog for `status`.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};

use crate::sink::catalog::Positions;

const LOG_EVERY: Duration = Duration::from_secs(5);

pub struct Progress {
    label: String,
    bar: Option<ProgressBar>,
    started: Instant,
    last_log: Instant,
}

/// A snapshot of a running phase.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Snapshot {
    pub phase: &'static str,
    pub events: u64,
    pub events_per_second: f64,
    pub positions: Positions,
    pub log_end: Positions,
    pub lag: i64,
    pub eta_seconds: Option<f64>,
}

impl Snapshot {
    pub fn new(
        phase: &'static str,
        events: u64,
        elapsed: Duration,
        positions: &Positions,
        log_end: &Positions,
    ) -> Snapshot {
        let lag = lag(positions, log_end);
        let rate = events as f64 / elapsed.as_secs_f64().max(1e-3);
        Snapshot {
            phase,
            events,
            events_per_second: rate,
            positions: positions.clone(),
            log_end: log_end.clone(),
            lag,
            eta_seconds: (rate > 0.0).then(|| lag as f64 / rate),
        }
    }

    pub fn to_json(&self) -> serde_json::Value {
        serde_json::to_value(self).unwrap_or(serde_json::Value::Null)
    }
}

/// Events between `positions` and `log_end`, over the partitions both know.
pub fn lag(positions: &Positions, log_end: &Positions) -> i64 {
    log_end
        .iter()
        .map(|(p, end)| (end - positions.get(p).copied().unwrap_or(0)).max(0))
        .sum()
}

impl Progress {
    /// A bar when stderr is a terminal and `quiet` is false; log lines otherwise.
    pub fn new(label: impl Into<String>, total: Option<u64>, quiet: bool) -> Progress {
        let label = label.into();
        let bar = (!quiet && std::io::stderr().is_terminal()).then(|| {
            let bar = match total {
                Some(n) => ProgressBar::new(n),
                None => ProgressBar::new_spinner(),
            };
            let style = ProgressStyle::with_template(
                "{prefix:>14} [{bar:30}] {human_pos}/{human_len} events {rate} eta {eta} {msg}",
            )
            .map(|s| {
                // indicatif's own {per_sec} shows fractions of an event ("375,041.0678/s").
                s.progress_chars("=> ").with_key(
                    "rate",
                    |state: &indicatif::ProgressState, w: &mut dyn std::fmt::Write| {
                        let _ = write!(
                            w,
                            "{}/s",
                            indicatif::HumanCount(state.per_sec().round() as u64)
                        );
                    },
                )
            })
            .unwrap_or_else(|_| ProgressStyle::default_bar());
            bar.set_style(style);
            bar.set_prefix(label.clone());
            bar
        });
        Progress {
            label,
            bar,
            started: Instant::now(),
            last_log: Instant::now(),
        }
    }

    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    pub fn update(&mut self, events: u64, lag: Option<i64>) {
        if let Some(bar) = &self.bar {
            bar.set_position(events);
            if let Some(lag) = lag {
                bar.set_message(format!("lag {lag}"));
            }
        } else if self.last_log.elapsed() >= LOG_EVERY {
            self.last_log = Instant::now();
            let rate = events as f64 / self.started.elapsed().as_secs_f64().max(1e-3);
            tracing::info!(message = "progress", phase = %self.label, events, events_per_second = rate.round(), lag);
        }
    }

    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}
