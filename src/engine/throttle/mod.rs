//! The throttle: while reproject writes, it watches what production feels and sets the write rate
//! from it, so that a rebuild never becomes the production incident.
//!
//! "Production" is every client backend of the server that is not reproject's (reproject names all
//! its connections `reproject...`). Its figures are sampled several times a second
//! ([`signals`]) and judged against an **impact budget** stated in production's own terms: how much
//! of its throughput it may lose and how much its latency may rise, compared with what it does
//! **alone**. Its solo figures come from quiet windows, checks during which reproject wrote
//! nothing: the first one before anything is written, every pause, every idle moment of a
//! follower, and a window the throttle asks for when production appears, grows, or its figures are
//! a minute old (state `measuring`: writers wait one check). Production appearing beside writes at
//! full speed is acted on within two samples, not at the end of the window ([`Throttle::sample`]).
//!
//! Signals, each a fraction of its limit (the load):
//! - while production is active: the probe query's latency (a percentile of the window's samples)
//!   against production's solo figure, limit `1 + latency budget`; production's commit throughput
//!   (`pg_stat_database`, reproject's own transactions taken out) against its solo throughput,
//!   limit the throughput budget; the share of production's active time spent waiting on locks,
//!   lightweight locks, I/O or buffer pins (`pg_stat_activity` wait events), turned into the
//!   latency rise it implies;
//! - always: active production backends against a limit, replicas' lag (`pg_stat_replication`),
//!   and an optional load query of the operator's.
//!
//! The highest load decides: at `pause_at` pause (and halve the rate it will resume at); above
//! `slow_at` halve the rate (multiplicative decrease); otherwise add a step (additive increase), or,
//! with no production active and every signal low, lift the rate limit entirely: there is nobody to
//! protect. Every change is logged with the signal behind it, shown by `status`, and exported as
//! metrics. Thresholds and the cap can be changed while a command runs with `reproject tune`.
//!
//! Writers do not talk to the controller: they go through a [`Governor`] (see [`governor`]).

pub mod governor;
pub mod signals;

use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

pub use governor::Governor;
pub use signals::{Activity, Figures};

use crate::sink::Result;

/// How much production may suffer from reproject's writes, compared with its figures alone.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
pub struct ImpactBudget {
    /// The share of its commit throughput production may lose (0.10: at most 10% fewer).
    pub throughput_loss: f64,
    /// How far its latency may rise (0.50: at most 1.5 times its solo latency).
    pub latency_rise: f64,
}

impl Default for ImpactBudget {
    fn default() -> Self {
        ImpactBudget {
            throughput_loss: 0.10,
            latency_rise: 0.50,
        }
    }
}

/// A share written as a percentage (`10%`, `10`) or a fraction below 1 with a leading `0.`
/// (`0.1`): what `--max-throughput-loss` and `--max-latency-rise` take.
pub fn parse_share(text: &str) -> std::result::Result<f64, String> {
    let trimmed = text.trim();
    let (number, percent) = match trimmed.strip_suffix('%') {
        Some(n) => (n.trim(), true),
        None => (trimmed, false),
    };
    let value = f64::from_str(number)
        .map_err(|_| format!("{text:?} is not a share: write it as a percentage, e.g. 10%"))?;
    let share = if percent || value >= 1.0 {
        value / 100.0
    } else {
        value
    };
    if !(share > 0.0 && share.is_finite()) {
        return Err(format!("{text:?}: the share must be above 0%"));
    }
    Ok(share)
}

/// What the throttle watches and where it acts.
#[derive(Clone, Debug)]
pub struct ThrottleConfig {
    /// How often a decision is made (a window of samples).
    pub check_every: Duration,
    /// How often the signals are sampled within a window.
    pub sample_every: Duration,
    /// The probe whose latency stands for production's; `SELECT 1` by default.
    pub probe_sql: String,
    /// Which percentile of a window's probe samples counts (0.5: the median).
    pub probe_percentile: f64,
    /// How much production may suffer.
    pub budget: ImpactBudget,
    /// Production counts as active at this many commits per second (reproject's own taken out) or
    /// when any of its backends is seen active.
    pub min_production_tps: f64,
    /// Production's solo figures are measured again after this long while it is active.
    pub remeasure_every: Duration,
    /// Active production backends at which the database counts as fully loaded.
    /// None: a fifth of `max_connections`.
    pub max_active_backends: Option<u32>,
    /// Replica replay lag at which the database counts as fully loaded.
    pub max_replica_lag: Duration,
    /// A query returning one number, and the value of it that counts as fully loaded.
    pub load_query: Option<String>,
    pub load_limit: f64,
    /// Slow down above this fraction of a limit; pause at `pause_at`, resume below `slow_at`.
    pub slow_at: f64,
    pub pause_at: f64,
    /// Events per second added per check while healthy (at most a quarter of the rate), and where
    /// the rate starts (unbounded by default: nobody to protect until production shows up).
    pub increase_step: f64,
    pub start_rate: f64,
    /// The rate never goes below this while not paused.
    pub min_rate: f64,
}

impl Default for ThrottleConfig {
    fn default() -> Self {
        ThrottleConfig {
            check_every: Duration::from_secs(2),
            sample_every: Duration::from_millis(100),
            probe_sql: "SELECT 1".into(),
            probe_percentile: 0.5,
            budget: ImpactBudget::default(),
            min_production_tps: 50.0,
            remeasure_every: Duration::from_secs(60),
            max_active_backends: None,
            max_replica_lag: Duration::from_secs(30),
            load_query: None,
            load_limit: 1.0,
            slow_at: 0.7,
            pause_at: 1.0,
            increase_step: 5_000.0,
            start_rate: f64::INFINITY,
            min_rate: 100.0,
        }
    }
}

pub use crate::sink::catalog::LiveSettings;

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ThrottleState {
    /// Healthy: the rate grows by a step per check up to the cap (or is unlimited while production
    /// is idle).
    Running,
    /// Over `slow_at`: the rate was cut.
    Slowed,
    /// At `pause_at`: nothing is written until the load is below `slow_at`.
    Paused,
    /// Nothing is written for a check, to measure production alone.
    Measuring,
}

impl ThrottleState {
    fn gauge(self) -> f64 {
        match self {
            ThrottleState::Running => 0.0,
            ThrottleState::Slowed => 1.0,
            ThrottleState::Paused => 2.0,
            ThrottleState::Measuring => 3.0,
        }
    }

    /// Whether writers must wait.
    pub fn holds_writes(self) -> bool {
        matches!(self, ThrottleState::Paused | ThrottleState::Measuring)
    }
}

/// One signal's reading.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Signal {
    /// Short name: `latency`, `throughput`, `waits`, `active backends`, `replica lag`, `load query`.
    pub name: &'static str,
    /// The figure as a fraction of its limit.
    pub load: f64,
    /// Readable: `probe latency p50 0.31 ms (alone 0.20 ms, budget +50%: limit 0.30 ms)`.
    pub detail: String,
}

/// One reading of the signals: the highest load and what it came from.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Reading {
    pub load: f64,
    /// The signal behind `load`, readable.
    pub signal: String,
    /// Every signal read, highest first.
    pub signals: Vec<Signal>,
    /// This window's figures, and production's alone (from the last quiet window).
    pub figures: Figures,
    pub alone: Option<Figures>,
    /// Nothing was written during this window.
    pub quiet: bool,
    pub probe_ms: f64,
    pub active_backends: f64,
    pub replica_lag_seconds: Option<f64>,
    pub load_query: Option<f64>,
}

/// What the throttle decided at its last check, for `status`, the logs and the writers.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Decision {
    pub state: ThrottleState,
    /// Events per second allowed now (None while writes are held; infinite = unlimited, shown as
    /// null in JSON).
    pub rate: Option<f64>,
    /// The share of time a writer that cannot be paced per event (a bulk COPY in slices, spills)
    /// may spend writing: 1 at full speed, cut with the rate.
    pub duty: f64,
    pub reading: Reading,
    pub reason: String,
}

impl Decision {
    /// What `status` shows of it (the progress a writer reports): state, rate, reason, and
    /// production's figures now and alone.
    pub fn summary(&self) -> serde_json::Value {
        let alone = self.reading.alone.as_ref();
        serde_json::json!({
            "state": self.state,
            "rate": self.rate,
            "duty": self.duty,
            "reason": self.reason,
            "signal": self.reading.signal,
            "production_tps": self.reading.figures.production_tps.round(),
            "production_tps_alone": alone.map(|a| a.production_tps.round()),
            "probe_ms": self.reading.figures.probe_ms,
            "probe_ms_alone": alone.map(|a| a.probe_ms),
        })
    }
}

/// Why a measurement is asked for when production shows up; unlike a re-measurement it is never
/// put off.
const PRODUCTION_APPEARED: &str = "production became active";

/// The longest writers are held to measure production alone.
const MEASURE_FOR: Duration = Duration::from_secs(6);

/// Production's solo figures, from quiet windows.
#[derive(Clone, Debug)]
struct Alone {
    figures: Figures,
    at: Instant,
}

pub struct Throttle {
    config: ThrottleConfig,
    sampler: signals::Sampler,
    activity: Arc<Activity>,
    alone: Option<Alone>,
    /// When a quiet window was last asked for (at most one per `check_every * 5`).
    measure_asked: Option<Instant>,
    /// Windows spent measuring without getting a quiet one (a long statement could not stop).
    measuring_windows: u32,
    rate: f64,
    /// Below this the rate grows by half per healthy check, above it by a step: the rate at
    /// the last overload (TCP's slow-start threshold).
    threshold: f64,
    /// Events per second written in the last window that wrote.
    last_written_rate: f64,
    duty: f64,
    state: ThrottleState,
    last_check: Option<Instant>,
    last: Option<Decision>,
    /// For tests and single writers that drive the throttle themselves: the pacer of [`Throttle::pace`].
    pacer: governor::Pacer,
}

impl Throttle {
    pub fn new(config: ThrottleConfig, database_url: &str) -> Throttle {
        let activity = Arc::new(Activity::default());
        Throttle {
            rate: config.start_rate,
            threshold: f64::INFINITY,
            last_written_rate: 0.0,
            duty: 1.0,
            sampler: signals::Sampler::new(&config, database_url, activity.clone()),
            config,
            activity,
            alone: None,
            measure_asked: None,
            measuring_windows: 0,
            state: ThrottleState::Measuring,
            last_check: None,
            last: None,
            pacer: governor::Pacer::default(),
        }
    }

    pub fn last(&self) -> Option<&Decision> {
        self.last.as_ref()
    }

    /// What writers report their work to (shared with the [`Governor`]).
    pub fn activity(&self) -> &Arc<Activity> {
        &self.activity
    }

    pub fn check_every(&self) -> Duration {
        self.config.check_every
    }

    pub fn sample_every(&self) -> Duration {
        self.config.sample_every
    }

    /// Take one sample of the signals into the current window. Returns true when production is
    /// there now (two samples in a row) while the last decision had none to protect (writers may
    /// be going at full speed): the caller should check now rather than at the end of the window.
    pub async fn sample(&mut self) -> Result<bool> {
        let production_now = self.sampler.sample().await?;
        Ok(production_now
            && self
                .last
                .as_ref()
                .is_some_and(|d| !d.reading.figures.production_active && !d.state.holds_writes()))
    }

    /// Sleep as long as `events` take at the current rate, and count them as written.
    pub async fn pace(&mut self, events: u64) {
        self.activity.wrote(events);
        self.pacer.pace(self.rate, events).await;
    }

    /// Read the window's signals now and decide.
    pub async fn check(&mut self, live: &LiveSettings, hard_cap: Option<u64>) -> Result<&Decision> {
        let (events, quiet) = self.activity.take_window();
        let measure_requested = self.activity.take_measure_request();
        let observed = match self.last_check {
            Some(t) => events as f64 / t.elapsed().as_secs_f64().max(1e-3),
            None => 0.0,
        };
        self.last_check = Some(Instant::now());
        let slow_at = live.slow_at.unwrap_or(self.config.slow_at);
        let pause_at = live.pause_at.unwrap_or(self.config.pause_at).max(slow_at);
        let reading = match self.read(quiet).await {
            Ok(r) => r,
            Err(e) => {
                // A probe that fails is a signal too: the database is in trouble, or the
                // connection is gone. Reconnect next time; slow down meanwhile.
                self.sampler.reconnect();
                let signal = format!("the health probe failed: {e}");
                Reading {
                    load: slow_at + f64::EPSILON,
                    signals: vec![Signal {
                        name: "probe",
                        load: slow_at + f64::EPSILON,
                        detail: signal.clone(),
                    }],
                    signal,
                    figures: Figures::default(),
                    alone: None,
                    quiet,
                    probe_ms: 0.0,
                    active_backends: 0.0,
                    replica_lag_seconds: None,
                    load_query: None,
                }
            }
        };
        let cap = live
            .max_rate
            .or(hard_cap)
            .map(|c| c as f64)
            .unwrap_or(f64::INFINITY);
        let before = self.state;
        let was_limited = self.rate.is_finite();
        if !quiet && observed > 0.0 {
            self.last_written_rate = observed;
        }
        // What the writers reached: the rate, or less when they wrote less than it allowed.
        let reached = if observed > 0.0 {
            observed.min(self.rate)
        } else if self.rate.is_finite() {
            self.rate
        } else {
            self.last_written_rate
        }
        .max(self.config.min_rate);
        // An overload cuts the rate by how far over budget production is, at least by half: a
        // loss of 4 times the budget cuts it to a quarter.
        let cut = (1.0 / reading.load.max(f64::EPSILON)).clamp(0.1, 0.5);
        let reason;
        if let Some(why) = self.measure_needed(&reading, measure_requested) {
            self.state = ThrottleState::Measuring;
            self.measuring_windows += 1;
            reason = format!("{why}: holding writes to measure production alone");
        } else if reading.load >= pause_at
            || (before == ThrottleState::Paused && reading.load >= slow_at)
        {
            if before != ThrottleState::Paused {
                // What was written before the pause hurt: resume at a cut of it.
                self.rate = (reached * cut).max(self.config.min_rate);
                self.threshold = self.rate;
                self.duty = (self.duty * cut).max(0.05);
            }
            self.state = ThrottleState::Paused;
            reason = format!(
                "{} is {:.0}% of its limit (pause at {:.0}%, resume below {:.0}%)",
                reading.signal,
                reading.load * 100.0,
                pause_at * 100.0,
                slow_at * 100.0
            );
        } else if reading.load > slow_at {
            self.rate = (reached * cut).max(self.config.min_rate);
            self.threshold = self.rate;
            self.duty = (self.duty * cut).max(0.05);
            self.state = ThrottleState::Slowed;
            reason = format!(
                "{} is {:.0}% of its limit (slow down above {:.0}%): rate cut to {:.0} events/s",
                reading.signal,
                reading.load * 100.0,
                slow_at * 100.0,
                self.rate
            );
        } else if reading.figures.production_active
            && !reading.alone.as_ref().is_some_and(|a| a.production_active)
            && !self.rate.is_finite()
        {
            // Production is there but could not be measured alone (a statement that cannot stop
            // ran through the measurement): its budget cannot be judged, so do not go on at full
            // speed beside it.
            self.restart_at_an_eighth();
            self.threshold = f64::INFINITY;
            self.state = ThrottleState::Slowed;
            reason = format!(
                "production is active ({:.0} commits/s, {:.1} active backends) and not measured alone yet: rate cut to an eighth, {:.0} events/s",
                reading.figures.production_tps, reading.figures.active, self.rate
            );
        } else if !reading.figures.production_active {
            // Nobody to protect: full speed.
            self.rate = self.config.start_rate;
            self.threshold = f64::INFINITY;
            self.duty = 1.0;
            self.state = ThrottleState::Running;
            reason = format!(
                "no production traffic ({:.0} commits/s, {:.1} active backends): full speed; highest signal {}",
                reading.figures.production_tps, reading.figures.active, reading.signal
            );
        } else {
            if before == ThrottleState::Measuring
                && !self.rate.is_finite()
                && self.last_written_rate > 0.0
            {
                // Production has just been measured alone, and reproject wrote without limit
                // before: start again at an eighth of that and find production's limit upwards
                // rather than by hurting it first.
                self.restart_at_an_eighth();
            } else if !before.holds_writes() {
                self.rate += if self.rate < self.threshold {
                    (self.rate / 2.0).min(self.threshold - self.rate)
                } else {
                    self.config.increase_step.min(self.rate / 4.0)
                };
                self.duty = (self.duty + 0.1).min(1.0);
            }
            self.state = ThrottleState::Running;
            reason = format!(
                "within budget: {} is {:.0}% of its limit",
                reading.signal,
                reading.load * 100.0
            );
        }
        if self.state != ThrottleState::Measuring {
            self.measuring_windows = 0;
        }
        tracing::debug!(
            message = "throttle: check",
            state = ?self.state,
            quiet,
            production_tps = reading.figures.production_tps,
            tps_seconds = reading.figures.tps_seconds,
            alone_tps = reading.alone.as_ref().map(|a| a.production_tps),
            probe_ms = reading.figures.probe_ms,
            alone_probe_ms = reading.alone.as_ref().map(|a| a.probe_ms),
            %reason,
        );
        self.rate = self.rate.min(cap.max(self.config.min_rate));
        if self.state != before {
            match self.state {
                ThrottleState::Running => {
                    tracing::info!(message = "throttle: writing again", %reason, rate = self.rate)
                }
                ThrottleState::Slowed => {
                    tracing::warn!(message = "throttle: slowing down", %reason, rate = self.rate)
                }
                ThrottleState::Paused => {
                    tracing::warn!(message = "throttle: pausing writes", %reason)
                }
                ThrottleState::Measuring => {
                    tracing::info!(message = "throttle: measuring production alone", %reason)
                }
            }
        } else if self.state == ThrottleState::Slowed {
            tracing::info!(message = "throttle: slowing down further", %reason, rate = self.rate);
        } else if was_limited && !self.rate.is_finite() {
            tracing::info!(message = "throttle: rate limit lifted", %reason);
        }
        export(self.state, self.rate, &reading);
        let decision = Decision {
            state: self.state,
            rate: (!self.state.holds_writes()).then_some(self.rate),
            duty: if self.state.holds_writes() {
                0.0
            } else {
                self.duty
            },
            reading,
            reason,
        };
        Ok(self.last.insert(decision))
    }

    /// Limit writing to an eighth of the rate written without limit: where production's limit is
    /// looked for from below once production is there.
    fn restart_at_an_eighth(&mut self) {
        self.rate = (self.last_written_rate / 8.0).max(self.config.min_rate);
        self.duty = 0.125;
    }

    /// Whether production's solo figures must be measured before the signals can be judged, and why.
    fn measure_needed(&mut self, reading: &Reading, requested: bool) -> Option<&'static str> {
        // A measurement takes a few seconds of quiet (production's throughput is only known over
        // seconds); a writer in a statement that cannot stop (an index build) is not waited for
        // longer than that.
        let most_windows =
            (MEASURE_FOR.as_secs_f64() / self.config.check_every.as_secs_f64()).ceil() as u32 + 1;
        if self.measuring_windows >= most_windows {
            return None;
        }
        if self.state == ThrottleState::Measuring && !reading.quiet {
            // A batch was under way when writes were held: the measurement starts once it is in.
            return Some("measuring production alone once the writes under way are in");
        }
        if reading.quiet {
            // Quiet, but still within the shadow of the last writes, or not yet long enough to
            // tell production's throughput: go on measuring.
            let unfinished = self.state == ThrottleState::Measuring
                && (reading.figures.tps_beside_writes
                    || (reading.figures.commits_seen >= self.config.min_production_tps
                        && reading.figures.tps_seconds < signals::MIN_TPS_SECONDS));
            return unfinished.then_some("measuring production alone");
        }
        let now = Instant::now();
        if requested && reading.figures.production_active {
            self.measure_asked = Some(now);
            return Some("a new phase of writing starts");
        }
        let why = match &self.alone {
            None => "nothing measured yet",
            Some(alone) if reading.figures.production_active => {
                if !alone.figures.production_active {
                    PRODUCTION_APPEARED
                } else if reading.figures.tps_seconds >= signals::MIN_TPS_SECONDS
                    && reading.figures.production_tps
                        > alone.figures.production_tps * (1.0 + self.config.budget.throughput_loss)
                            + self.config.min_production_tps
                {
                    "production does more than when it was measured alone"
                } else if now.duration_since(alone.at) >= self.config.remeasure_every {
                    "production's solo figures are old"
                } else {
                    return None;
                }
            }
            Some(_) => return None,
        };
        if self.state == ThrottleState::Measuring {
            return Some(why);
        }
        // At most one quiet window asked for per five checks to measure a production already
        // measured (the first, and production appearing, are always granted: until it is measured
        // nothing protects it).
        if why != PRODUCTION_APPEARED
            && self.alone.is_some()
            && self
                .measure_asked
                .is_some_and(|t| now.duration_since(t) < self.config.check_every * 5)
        {
            return None;
        }
        self.measure_asked = Some(now);
        Some(why)
    }

    async fn read(&mut self, quiet: bool) -> Result<Reading> {
        let figures = self.sampler.window().await?;
        // Production alone: a window with nothing written, whose samples are out of the shadow of
        // the last writes (a writer between two batches is not quiet).
        if quiet && !figures.tps_beside_writes {
            // Production alone: update the previous solo figures while production's activity
            // is unchanged (a pause's short quiet window refines the probe's figure but cannot
            // tell throughput); start again when production appeared or went idle.
            let merged = match &self.alone {
                Some(previous)
                    if previous.figures.production_active == figures.production_active =>
                {
                    previous.figures.updated_with(&figures)
                }
                _ => figures.clone(),
            };
            self.alone = Some(Alone {
                figures: merged,
                at: Instant::now(),
            });
        } else if self
            .alone
            .as_ref()
            .is_some_and(|a| a.figures.production_active && !figures.production_active)
        {
            // Production went idle: its solo figures no longer describe it.
            self.alone = None;
        }
        let alone = self.alone.as_ref().map(|a| a.figures.clone());
        let mut signals = Vec::new();
        if figures.production_active {
            if let Some(alone) = alone.as_ref().filter(|a| a.production_active) {
                signals.extend(signals::budget_signals(
                    &figures,
                    alone,
                    &self.config.budget,
                    self.config.probe_percentile,
                    self.config.min_production_tps,
                ));
            }
        }
        let max_active = self
            .config
            .max_active_backends
            .map(f64::from)
            .unwrap_or((figures.max_connections as f64 / 5.0).max(1.0));
        signals.push(Signal {
            name: "active backends",
            load: figures.active / max_active,
            detail: format!(
                "{:.1} active production backends (limit {max_active:.0})",
                figures.active
            ),
        });
        if let Some(lag) = figures.replica_lag_seconds {
            let limit = self.config.max_replica_lag.as_secs_f64().max(0.001);
            signals.push(Signal {
                name: "replica lag",
                load: lag / limit,
                detail: format!("replica lag {lag:.1} s (limit {limit:.0} s)"),
            });
        }
        if let Some(value) = figures.load_query {
            let limit = if self.config.load_limit > 0.0 {
                self.config.load_limit
            } else {
                1.0
            };
            signals.push(Signal {
                name: "load query",
                load: value / limit,
                detail: format!("the load query's figure {value} (limit {limit})"),
            });
        }
        signals.sort_by(|a, b| b.load.total_cmp(&a.load));
        let (load, signal) = signals
            .first()
            .map(|s| (s.load, s.detail.clone()))
            .unwrap_or((0.0, "nothing".into()));
        Ok(Reading {
            load,
            signal,
            signals,
            probe_ms: figures.probe_ms,
            active_backends: figures.active,
            replica_lag_seconds: figures.replica_lag_seconds,
            load_query: figures.load_query,
            figures,
            alone,
            quiet,
        })
    }
}

fn export(state: ThrottleState, rate: f64, reading: &Reading) {
    metrics::gauge!("reproject_throttle_state").set(state.gauge());
    metrics::gauge!("reproject_throttle_load_ratio").set(reading.load);
    metrics::gauge!("reproject_throttle_rate_events_per_second").set(
        if state.holds_writes() || !rate.is_finite() {
            0.0
        } else {
            rate
        },
    );
    for signal in &reading.signals {
        metrics::gauge!("reproject_throttle_signal_load_ratio", "signal" => signal.name)
            .set(signal.load);
    }
    metrics::gauge!("reproject_production_commits_per_second").set(reading.figures.production_tps);
    metrics::gauge!("reproject_production_probe_latency_seconds")
        .set(reading.figures.probe_ms / 1e3);
    if let Some(alone) = &reading.alone {
        metrics::gauge!("reproject_production_alone_commits_per_second").set(alone.production_tps);
        metrics::gauge!("reproject_production_alone_probe_latency_seconds")
            .set(alone.probe_ms / 1e3);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_read_as_percentages_or_fractions() {
        assert_eq!(parse_share("10%"), Ok(0.10));
        assert_eq!(parse_share("50"), Ok(0.50));
        assert_eq!(parse_share("0.25"), Ok(0.25));
        assert_eq!(parse_share(" 5 % "), Ok(0.05));
        assert!(parse_share("0%").is_err());
        assert!(parse_share("ten").unwrap_err().contains("percentage"));
    }
}
