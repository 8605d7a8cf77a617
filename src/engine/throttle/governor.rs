//! The governor: one throttle per process, shared by every writer in it (catch-up, `run`'s follow,
//! the rebuild's bulk load, index builds and spills).
//!
//! A task of its own samples the signals and decides every check; writers only read the last
//! decision and report what they wrote. Sharing one controller matters: two writers each pacing
//! themselves to "the" rate would write twice it, and a window is quiet (production measured alone)
//! only if no writer in the process wrote during it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use tokio::sync::{watch, Mutex, MutexGuard};
use tokio_util::sync::CancellationToken;

use super::signals::{Activity, BusyGuard};
use super::{Decision, LiveSettings, Throttle, ThrottleConfig, ThrottleState};
use crate::sink::SliceGate;

/// Spaces writes out to a rate: each call reserves its events' share of time after the previous.
#[derive(Debug, Default)]
pub struct Pacer {
    next_due: Option<Instant>,
}

impl Pacer {
    /// When `events` written now are due at `rate` (None: at once, e.g. with an unlimited rate).
    pub fn reserve(&mut self, rate: f64, events: u64) -> Option<Instant> {
        if !rate.is_finite() || rate <= 0.0 {
            self.next_due = None;
            return None;
        }
        let now = Instant::now();
        // Credit for idle time is limited to a second, so a burst after a pause stays a burst of
        // at most a second's worth.
        let from = match self.next_due {
            Some(due) if due + Duration::from_secs(1) > now => due,
            _ => now - Duration::from_secs(1),
        };
        let due = from + Duration::from_secs_f64(events as f64 / rate);
        self.next_due = Some(due);
        (due > now).then_some(due)
    }

    pub async fn pace(&mut self, rate: f64, events: u64) {
        if let Some(due) = self.reserve(rate, events) {
            tokio::time::sleep_until(due.into()).await;
        }
    }
}

pub struct Governor {
    activity: Arc<Activity>,
    decisions: watch::Receiver<Option<Decision>>,
    live: watch::Sender<LiveSettings>,
    pacer: std::sync::Mutex<Pacer>,
    one_at_a_time: Mutex<()>,
    check_every: Duration,
    task: tokio::task::JoinHandle<()>,
    /// Set when the command stops: writers held by the throttle stop waiting.
    released: CancellationToken,
}

impl Drop for Governor {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Governor {
    /// Start watching the database at `database_url`; call inside the runtime. `hard_cap` is the
    /// command's `--max-rate`.
    pub fn start(config: ThrottleConfig, database_url: &str, hard_cap: Option<u64>) -> Governor {
        let check_every = config.check_every;
        let mut throttle = Throttle::new(config, database_url);
        let activity = throttle.activity().clone();
        let (decided, decisions) = watch::channel(None);
        let (live, live_settings) = watch::channel(LiveSettings::default());
        let task = tokio::spawn(async move {
            // The first decision (production measured before anything is written) comes sooner
            // than the later ones: writers wait for it.
            let mut next_check =
                Instant::now() + throttle.check_every().min(Duration::from_millis(500));
            // When production shows up while writers go at full speed, a check comes at once
            // (not up to a window later): the first seconds of a full-speed catch-up are what
            // production feels most. At most one such early check per quarter window, so a
            // production that comes and goes does not turn every sample into a check.
            let mut last_early_check: Option<Instant> = None;
            loop {
                let production_appeared = match throttle.sample().await {
                    Ok(appeared) => appeared,
                    Err(e) => {
                        // The check that ends the window reports it (and slows down).
                        tracing::debug!(message = "throttle: a sample failed", error = %e);
                        false
                    }
                };
                let early = production_appeared
                    && last_early_check.is_none_or(|t| t.elapsed() >= throttle.check_every() / 4);
                if early {
                    last_early_check = Some(Instant::now());
                }
                if early || Instant::now() >= next_check {
                    next_check = Instant::now() + throttle.check_every();
                    let live = live_settings.borrow().clone();
                    match throttle.check(&live, hard_cap).await {
                        Ok(decision) => {
                            decided.send_replace(Some(decision.clone()));
                        }
                        Err(e) => tracing::warn!(message = "throttle: a check failed", error = %e),
                    }
                }
                tokio::time::sleep(throttle.sample_every()).await;
            }
        });
        Governor {
            activity,
            decisions,
            live,
            pacer: std::sync::Mutex::new(Pacer::default()),
            one_at_a_time: Mutex::new(()),
            check_every,
            task,
            released: CancellationToken::new(),
        }
    }

    /// Stop holding writers once `cancel` fires (the command is stopping), also where a writer
    /// cannot pass its own token (between the slices of a bulk load, before a spill).
    pub fn release_on(&self, cancel: &CancellationToken) {
        let (cancel, released) = (cancel.clone(), self.released.clone());
        tokio::spawn(async move {
            cancel.cancelled().await;
            released.cancel();
        });
    }

    /// The token [`Governor::release_on`] fires.
    pub fn released(&self) -> &CancellationToken {
        &self.released
    }

    /// The last decision (None before the first check).
    pub fn last(&self) -> Option<Decision> {
        self.decisions.borrow().clone()
    }

    fn state(&self) -> ThrottleState {
        self.decisions
            .borrow()
            .as_ref()
            .map_or(ThrottleState::Measuring, |d| d.state)
    }

    /// Whether writers must wait now (paused, measuring production alone, or not decided yet).
    pub fn holds_writes(&self) -> bool {
        self.state().holds_writes() || self.activity.measure_requested()
    }

    /// Before a new phase of heavy writing (a bulk load after a replay, whose own load on the
    /// machine the last figures include): measure production alone first, if it is active.
    pub fn remeasure(&self) {
        let active = self
            .last()
            .is_some_and(|d| d.reading.figures.production_active);
        if active {
            self.activity.request_measure();
        }
    }

    /// The thresholds and cap `reproject tune` set, for the next checks.
    pub fn set_live(&self, live: &LiveSettings) {
        if *self.live.borrow() != *live {
            self.live.send_replace(live.clone());
        }
    }

    /// Wait for the next decision, or at most a check's time.
    pub async fn next_decision(&self) {
        let mut decisions = self.decisions.clone();
        // A clone has seen what the original had: mark the current decision seen, or `changed`
        // would return at once.
        decisions.borrow_and_update();
        let _ = tokio::time::timeout(self.check_every * 2, decisions.changed()).await;
    }

    /// Return once writes are held (at once if they are now): a writer in the middle of a batch
    /// stops it then, rather than finish it beside the production the hold is for.
    pub async fn until_held(&self) {
        while !self.holds_writes() {
            self.next_decision().await;
        }
    }

    /// Wait while writes are held; logs once what `what` waits for.
    pub async fn wait_while_held(&self, what: &str, cancel: &CancellationToken) {
        if !self.holds_writes() {
            return;
        }
        let reason = self
            .last()
            .map(|d| d.reason)
            .unwrap_or_else(|| "measuring the database before writing".into());
        tracing::info!(message = "throttle: waiting before writing", what, %reason);
        while self.holds_writes() && !cancel.is_cancelled() {
            tokio::select! {
                _ = cancel.cancelled() => {}
                _ = self.next_decision() => {}
            }
        }
    }

    /// The events per second writers may write now (infinite: no limit; while writes are held
    /// it is the rate they resume at).
    pub fn rate(&self) -> f64 {
        // Only the rate: not a clone of the whole decision per batch.
        self.decisions
            .borrow()
            .as_ref()
            .and_then(|d| d.rate)
            .unwrap_or(f64::INFINITY)
    }

    /// After `events` were written in a transaction: count them, and sleep as long as they take
    /// at the allowed rate.
    pub async fn pace(&self, events: u64) {
        self.activity.wrote(events);
        self.activity.committed(1);
        let mut rate = self.rate();
        let due = match self.pacer.lock() {
            Ok(mut pacer) => pacer.reserve(rate, events),
            Err(_) => None,
        };
        let Some(mut due) = due else {
            return;
        };
        // A batch paced at a low rate can owe many seconds; when the rate goes up (production
        // left, or a pause ended at a cut rate) what is left of the wait shrinks with it.
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(due.into()) => return,
                _ = self.next_decision() => {}
            }
            let now = Instant::now();
            if due <= now {
                return;
            }
            let new = self.rate();
            if new > rate {
                let left = due.duration_since(now);
                due = now
                    + if new.is_finite() {
                        left.mul_f64(rate / new)
                    } else {
                        Duration::ZERO
                    };
                if let Ok(mut pacer) = self.pacer.lock() {
                    pacer.next_due = new.is_finite().then_some(due);
                }
                rate = new;
            }
        }
    }

    /// A statement that cannot be paced (an index build) runs while the guard lives.
    pub fn busy(&self) -> BusyGuard {
        self.activity.busy()
    }

    /// Transactions reproject committed outside [`Governor::pace`].
    pub fn committed(&self, transactions: u64) {
        self.activity.committed(transactions);
    }

    /// Before a heavy statement (an index build): wait while writes are held, then, unless the
    /// throttle runs freely, take the one-at-a-time lock so such statements do not run side by
    /// side while production suffers. Returns the lock if taken.
    pub async fn heavy(
        &self,
        what: &str,
        cancel: &CancellationToken,
    ) -> Option<MutexGuard<'_, ()>> {
        self.wait_while_held(what, cancel).await;
        if self.state() == ThrottleState::Running {
            return None;
        }
        let guard = self.one_at_a_time.lock().await;
        // The wait may have been long: the database may need a pause again.
        self.wait_while_held(what, cancel).await;
        Some(guard)
    }
}

impl SliceGate for Governor {
    /// Between slices of a bulk write: hold while paused, and while slowed sleep so that writing
    /// takes only the duty share of the time.
    fn after_slice(&self, took: Duration) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            self.activity.wrote(0);
            let duty = self.decisions.borrow().as_ref().map_or(1.0, |d| d.duty);
            if duty > 0.0 && duty < 1.0 {
                let rest = took.as_secs_f64() * (1.0 - duty) / duty;
                tokio::time::sleep(Duration::from_secs_f64(rest.min(30.0))).await;
            }
            while self.holds_writes() && !self.released.is_cancelled() {
                self.next_decision().await;
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pacer_spaces_events_out_to_the_rate_with_a_second_of_credit() {
        let mut pacer = Pacer::default();
        assert_eq!(pacer.reserve(f64::INFINITY, 1_000), None);
        // A second of credit: 1,000 events at 1,000/s are due now; the next 500 half a second on.
        assert_eq!(pacer.reserve(1_000.0, 1_000), None);
        let due = pacer.reserve(1_000.0, 500).expect("due later");
        let ahead = due.saturating_duration_since(Instant::now());
        assert!(
            ahead > Duration::from_millis(400) && ahead <= Duration::from_millis(500),
            "{ahead:?}"
        );
    }
}
