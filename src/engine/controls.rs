//! What operators say to running commands through the catalog, read between batches: `reproject
//! pause` / `resume` (the pause flags) and `reproject tune` (batch size, rate cap, throttle limits).
//! The replay's fold and the catch-up/follow loop look at them the same way, through [`Controls`].

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::{metrics, Result, Tuning};
use crate::sink::catalog::LiveSettings;
use crate::sink::Catalog;

/// How often followers and rebuilds look at the pause flags and the live settings.
pub const CONTROLS_CHECK_EVERY: Duration = Duration::from_secs(1);

/// The smallest batch a throttled rate makes: smaller ones cost more in round trips than they
/// spread.
const MIN_LIMITED_BATCH: usize = 200;

/// The controls of a set of projections as last read, applied to the batch size the reader uses.
pub struct Controls {
    names: Vec<String>,
    /// Shared with the reader, which sizes its batches from it.
    batch_size: Arc<AtomicUsize>,
    default_batch_events: usize,
    default_max_rate: Option<u64>,
    live: LiveSettings,
    paused: Vec<String>,
}

impl Controls {
    pub fn new(names: &[&str], batch_size: Arc<AtomicUsize>, tuning: &Tuning) -> Controls {
        Controls {
            names: names.iter().map(|n| n.to_string()).collect(),
            batch_size,
            default_batch_events: tuning.batch_events,
            default_max_rate: tuning.max_rate,
            live: LiveSettings::default(),
            paused: Vec::new(),
        }
    }

    /// Reads the pause flags and `reproject tune`'s settings now; applies a new batch size and rate
    /// cap, and says in the log what changed.
    pub async fn refresh(&mut self, catalog: &Catalog) -> Result<()> {
        let names: Vec<&str> = self.names.iter().map(String::as_str).collect();
        let paused = catalog.paused(&names).await?;
        for name in &names {
            metrics::paused(name, paused.iter().any(|p| p == name));
        }
        if paused.is_empty() != self.paused.is_empty() {
            if paused.is_empty() {
                tracing::info!(message = "resumed", projections = ?names);
            } else {
                tracing::info!(message = "paused by `reproject pause`; waiting for `reproject resume`", projections = ?paused);
            }
        }
        self.paused = paused;
        let live = catalog.live_settings(&names).await?;
        if live != self.live {
            tracing::info!(message = "settings changed by `reproject tune`", settings = ?live);
            metrics::max_rate(live.max_rate.or(self.default_max_rate));
            self.live = live;
            self.batch_size
                .store(self.configured_batch(), Ordering::Relaxed);
        }
        Ok(())
    }

    /// Batches of at most a quarter of a second at the throttle's `rate`: at a limited rate a
    /// batch is written in one burst and production feels the burst, so many small ones spread
    /// the same events more evenly.
    pub fn limit_batches(&self, rate: f64) {
        let configured = self.configured_batch();
        let limited = if rate.is_finite() {
            configured.min(((rate / 4.0) as usize).max(MIN_LIMITED_BATCH))
        } else {
            configured
        };
        self.batch_size.store(limited, Ordering::Relaxed);
    }

    /// The batch size `reproject tune` set, or the command's.
    fn configured_batch(&self) -> usize {
        self.live
            .batch_events
            .unwrap_or(self.default_batch_events)
            .max(1)
    }

    /// The projections paused when last read (empty: none).
    pub fn paused(&self) -> &[String] {
        &self.paused
    }

    /// `reproject tune`'s settings when last read.
    pub fn live(&self) -> &LiveSettings {
        &self.live
    }
}
