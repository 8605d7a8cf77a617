//! What the throttle reads from PostgreSQL, and what it makes of a window of readings.
//!
//! A sample (every `sample_every`, 100 ms by default) times the probe query and counts production's
//! backends in `pg_stat_activity` (active ones, and those waiting on a lock, a lightweight lock,
//! I/O or a buffer pin) and reads the server's transaction counter from `pg_stat_database`. A window
//! (every `check_every`) turns its samples into [`Figures`]: the probe's percentile, the mean
//! active and waiting backends, and production's commits per second with reproject's own
//! transactions taken out.
//!
//! Why samples over a window: the probe takes 0.1 ms on a local server and one reading of it is
//! noise, and `pg_stat_database` is flushed by each backend about once a second, so a counter read
//! once per check would tell more about flush timing than about throughput.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sqlx::{Connection, PgConnection};

use super::{ImpactBudget, Signal, ThrottleConfig};
use crate::sink::{Context, Result, SinkError};

/// What reproject's writers did during the current window: whether it was quiet (nothing written,
/// so production's figures are its own), and the transactions reproject committed, which the
/// server's counter includes.
#[derive(Debug, Default)]
pub struct Activity {
    events: AtomicU64,
    wrote: AtomicBool,
    busy: AtomicUsize,
    own_transactions: AtomicU64,
    measure: AtomicBool,
    /// Written since the last sample: each sample knows whether reproject wrote around it.
    wrote_since_sample: AtomicBool,
}

impl Activity {
    /// `events` were written (0 for a slice of rows that is not counted in events).
    pub fn wrote(&self, events: u64) {
        self.events.fetch_add(events, Ordering::Relaxed);
        self.wrote.store(true, Ordering::Relaxed);
        self.wrote_since_sample.store(true, Ordering::Relaxed);
    }

    /// Transactions reproject committed.
    pub fn committed(&self, transactions: u64) {
        self.own_transactions
            .fetch_add(transactions, Ordering::Relaxed);
    }

    /// While the guard lives a statement that cannot be paced runs (an index build): no window
    /// during it is quiet.
    pub fn busy(self: &Arc<Self>) -> BusyGuard {
        self.busy.fetch_add(1, Ordering::Relaxed);
        self.wrote.store(true, Ordering::Relaxed);
        self.wrote_since_sample.store(true, Ordering::Relaxed);
        BusyGuard(self.clone())
    }

    /// End a window: the events written in it, and whether it was quiet.
    pub(super) fn take_window(&self) -> (u64, bool) {
        let events = self.events.swap(0, Ordering::Relaxed);
        let wrote = self.wrote.swap(false, Ordering::Relaxed);
        (events, !wrote && self.busy.load(Ordering::Relaxed) == 0)
    }

    /// Ask for production to be measured alone before the next writes (a new phase starts).
    pub fn request_measure(&self) {
        self.measure.store(true, Ordering::Relaxed);
    }

    pub fn measure_requested(&self) -> bool {
        self.measure.load(Ordering::Relaxed)
    }

    pub(super) fn take_measure_request(&self) -> bool {
        self.measure.swap(false, Ordering::Relaxed)
    }

    /// Whether reproject wrote since the last call (or is inside a statement now).
    fn take_sample_mark(&self) -> bool {
        self.wrote_since_sample.swap(false, Ordering::Relaxed)
            || self.busy.load(Ordering::Relaxed) > 0
    }

    fn own_transactions(&self) -> u64 {
        self.own_transactions.load(Ordering::Relaxed)
    }
}

pub struct BusyGuard(Arc<Activity>);

impl Drop for BusyGuard {
    fn drop(&mut self) {
        self.0.busy.fetch_sub(1, Ordering::Relaxed);
        self.0.wrote.store(true, Ordering::Relaxed);
        self.0.wrote_since_sample.store(true, Ordering::Relaxed);
    }
}

/// A window's figures.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Figures {
    pub samples: usize,
    /// The probe's latency at the configured percentile, in milliseconds.
    pub probe_ms: f64,
    /// Production's commits (and rollbacks) per second, reproject's own taken out.
    pub production_tps: f64,
    /// Seconds of samples `production_tps` was measured over, all beside reproject's writes (or
    /// all quiet: see `tps_beside_writes`); 0 when too few to tell. Short spans are noise: each
    /// backend flushes its counts to `pg_stat_database` about once a second.
    pub tps_seconds: f64,
    /// Whether `production_tps` was measured beside reproject's writes (or within
    /// `WRITE_SHADOW` of one) rather than with reproject quiet.
    pub tps_beside_writes: bool,
    /// Production's commits per second over the last seconds, whatever reproject did.
    pub commits_seen: f64,
    /// Mean active production backends, and the mean of those waiting on locks or I/O.
    pub active: f64,
    pub waiting: f64,
    /// Production did something this window.
    pub production_active: bool,
    pub max_connections: i64,
    pub replica_lag_seconds: Option<f64>,
    pub load_query: Option<f64>,
}

impl Figures {
    /// The share of production's active time spent waiting on locks or I/O.
    pub fn wait_share(&self) -> f64 {
        if self.active > 0.0 {
            (self.waiting / self.active).min(1.0)
        } else {
            0.0
        }
    }

    /// Production's solo figures after one more quiet window (`newer`). The probe and the
    /// backends are averaged with what was known, halving one window's noise. Throughput is
    /// taken from the newer window only when it spans enough seconds to tell (or more than what
    /// was known): a pause of half a second is quiet, but its throughput is flush timing, and it
    /// must not replace a solo figure measured over seconds.
    pub(super) fn updated_with(&self, newer: &Figures) -> Figures {
        let mean = |a: f64, b: f64| (a + b) / 2.0;
        let (production_tps, tps_seconds) =
            if newer.tps_seconds >= MIN_TPS_SECONDS || newer.tps_seconds >= self.tps_seconds {
                (newer.production_tps, newer.tps_seconds)
            } else {
                (self.production_tps, self.tps_seconds)
            };
        Figures {
            samples: self.samples + newer.samples,
            probe_ms: mean(self.probe_ms, newer.probe_ms),
            production_tps,
            tps_seconds,
            active: mean(self.active, newer.active),
            waiting: mean(self.waiting, newer.waiting),
            ..newer.clone()
        }
    }
}

/// Production's latency and throughput now against its figures alone, as loads of the budget.
pub fn budget_signals(
    now: &Figures,
    alone: &Figures,
    budget: &ImpactBudget,
    percentile: f64,
    min_production_tps: f64,
) -> Vec<Signal> {
    let mut signals = Vec::new();
    let p = (percentile * 100.0).round();
    if alone.probe_ms > 0.0 {
        let rise = now.probe_ms / alone.probe_ms - 1.0;
        signals.push(Signal {
            name: "latency",
            load: rise.max(0.0) / budget.latency_rise,
            detail: format!(
                "probe latency p{p} {:.3} ms (alone {:.3} ms: {:+.0}%, budget +{:.0}%)",
                now.probe_ms,
                alone.probe_ms,
                rise * 100.0,
                budget.latency_rise * 100.0
            ),
        });
    }
    // Only throughput beside reproject's writes is a loss it caused: a quiet run against the solo
    // figure is production against itself (noise, on a trickle of commits). And a production
    // that commits next to nothing with no backend active has stopped, not been slowed down (one
    // held up by reproject has backends active, waiting).
    let production_stopped = now.production_tps < min_production_tps && now.active < 0.1;
    if alone.production_tps >= min_production_tps
        && !production_stopped
        && now.tps_beside_writes
        && now.tps_seconds >= MIN_TPS_SECONDS
        && alone.tps_seconds >= MIN_TPS_SECONDS
    {
        let change = now.production_tps / alone.production_tps - 1.0;
        signals.push(Signal {
            name: "throughput",
            load: (-change).max(0.0) / budget.throughput_loss,
            detail: format!(
                "production throughput {:.0} commits/s (alone {:.0}: {:+.0}%, budget -{:.0}%)",
                now.production_tps,
                alone.production_tps,
                change * 100.0,
                budget.throughput_loss * 100.0
            ),
        });
    }
    if now.active > 0.0 {
        // If the time production spends not waiting is unchanged, waiting more stretches its
        // active time, and so its latency, by this much.
        let (share, share_alone) = (now.wait_share().min(0.95), alone.wait_share().min(0.95));
        let rise = (1.0 - share_alone) / (1.0 - share) - 1.0;
        signals.push(Signal {
            name: "waits",
            load: rise.max(0.0) / budget.latency_rise,
            detail: format!(
                "production waits on locks and I/O {:.0}% of its active time (alone {:.0}%: latency {:+.0}% by that, budget +{:.0}%)",
                share * 100.0,
                share_alone * 100.0,
                rise * 100.0,
                budget.latency_rise * 100.0
            ),
        });
    }
    signals
}

/// Throughput measured over less than this is not judged.
pub const MIN_TPS_SECONDS: f64 = 2.0;

/// Samples kept for throughput.
const TPS_HISTORY: Duration = Duration::from_secs(8);

/// Production's throughput beside reproject's writes is taken over at most the last few seconds,
/// so that a rate that just went up shows within a check or two (alone, over the whole quiet
/// run: there accuracy counts more than speed).
const TPS_BESIDE_WRITES: Duration = Duration::from_secs(4);

/// How long after a write a sample still counts as beside reproject's writes. A writer that
/// commits a batch every few hundred milliseconds is writing all along, not quiet between its
/// batches; and what it wrote is still felt for a moment (its WAL flushed, its buffers written).
const WRITE_SHADOW: Duration = Duration::from_secs(1);

/// When reproject last wrote, to tell samples beside its writes from quiet ones.
#[derive(Debug, Default)]
struct WriteShadow {
    last_write: Option<Instant>,
}

impl WriteShadow {
    /// Whether a sample taken `at`, after a write since the previous sample or not, is beside
    /// reproject's writes.
    fn beside_writes(&mut self, wrote: bool, at: Instant) -> bool {
        if wrote {
            self.last_write = Some(at);
        }
        self.last_write
            .is_some_and(|t| at.duration_since(t) < WRITE_SHADOW)
    }
}

#[derive(Clone, Copy, Debug)]
struct Sample {
    at: Instant,
    /// Reproject wrote since the previous sample.
    writing: bool,
    probe_ms: f64,
    active: i64,
    waiting: i64,
    transactions: i64,
    own: u64,
}

/// Takes samples on a connection of its own and turns a window of them into [`Figures`].
pub(super) struct Sampler {
    database_url: String,
    probe_sql: String,
    load_query: Option<String>,
    percentile: f64,
    sample_every: Duration,
    min_production_tps: f64,
    activity: Arc<Activity>,
    conn: Option<PgConnection>,
    samples: Vec<Sample>,
    /// The last few seconds of samples, for throughput.
    history: std::collections::VecDeque<Sample>,
    max_connections: Option<i64>,
    shadow: WriteShadow,
}

/// Fewer samples than this in a window (a check called directly, or a sampler that could not keep
/// up): take the rest at once.
const MIN_SAMPLES: usize = 3;

impl Sampler {
    pub(super) fn new(
        config: &ThrottleConfig,
        database_url: &str,
        activity: Arc<Activity>,
    ) -> Sampler {
        Sampler {
            database_url: database_url.to_string(),
            probe_sql: config.probe_sql.clone(),
            load_query: config.load_query.clone(),
            percentile: config.probe_percentile.clamp(0.0, 1.0),
            sample_every: config.sample_every,
            min_production_tps: config.min_production_tps,
            activity,
            conn: None,
            samples: Vec::new(),
            history: std::collections::VecDeque::new(),
            max_connections: None,
            shadow: WriteShadow::default(),
        }
    }

    pub(super) fn reconnect(&mut self) {
        self.conn = None;
        self.samples.clear();
        self.history.clear();
    }

    async fn connection(&mut self) -> Result<&mut PgConnection> {
        if self.conn.is_none() {
            let mut conn = PgConnection::connect(&self.database_url)
                .await
                .context(|| "throttle: connecting to watch the database's health".into())?;
            sqlx::query("SET application_name = 'reproject throttle'")
                .execute(&mut conn)
                .await
                .context(|| "throttle: naming its connection".into())?;
            self.conn = Some(conn);
        }
        self.conn
            .as_mut()
            .ok_or_else(|| SinkError::Invalid("throttle: no connection".into()))
    }

    /// Take one sample; returns whether production is there now ([`Sampler::production_now`]).
    pub(super) async fn sample(&mut self) -> Result<bool> {
        let probe_sql = self.probe_sql.clone();
        let activity = self.activity.clone();
        let conn = self.connection().await?;
        let started = Instant::now();
        sqlx::query(&probe_sql)
            .execute(&mut *conn)
            .await
            .context(|| format!("throttle: the probe query {probe_sql:?}"))?;
        let probe_ms = started.elapsed().as_secs_f64() * 1e3;
        // Backends of other clients than reproject (all its connections are named reproject...).
        let (active, waiting, transactions): (i64, i64, i64) = sqlx::query_as(
            "SELECT count(*) FILTER (WHERE state = 'active'),
                    count(*) FILTER (WHERE state = 'active'
                                     AND wait_event_type IN ('Lock', 'LWLock', 'IO', 'BufferPin')),
                    (SELECT coalesce(sum(xact_commit + xact_rollback), 0)::bigint FROM pg_stat_database)
             FROM pg_stat_activity
             WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()
               AND coalesce(application_name, '') NOT LIKE 'reproject%'",
        )
        .fetch_one(&mut *conn)
        .await
        .context(|| "throttle: reading pg_stat_activity and pg_stat_database".into())?;
        // The probe and this query are transactions of the server's counter too.
        activity.committed(2);
        let at = Instant::now();
        let sample = Sample {
            at,
            writing: self.shadow.beside_writes(activity.take_sample_mark(), at),
            probe_ms,
            active,
            waiting,
            transactions,
            own: activity.own_transactions(),
        };
        self.samples.push(sample);
        self.history.push_back(sample);
        while self
            .history
            .front()
            .is_some_and(|s| sample.at.duration_since(s.at) > TPS_HISTORY)
        {
            self.history.pop_front();
        }
        Ok(self.production_now())
    }

    /// Whether the last two samples (100 ms apart by default) both saw a production backend active:
    /// production there now, before it moves a window's mean. One sample alone may be one short
    /// statement (an operator's query).
    fn production_now(&self) -> bool {
        self.history.len() >= 2 && self.history.iter().rev().take(2).all(|s| s.active > 0)
    }

    /// Production's commits per second over the trailing samples of one kind (all beside
    /// reproject's writes, or all quiet, as the latest), measured between the first and the last
    /// change of the server's counter: backends flush their counts about once a second, so the
    /// counter moves in steps, and the rate between steps is the rate. With the seconds it spans
    /// and whether the run was beside writes.
    fn production_tps(&self) -> (f64, f64, bool) {
        let Some(latest) = self.history.back() else {
            return (0.0, 0.0, false);
        };
        let beside = latest.writing;
        let run: Vec<&Sample> = self
            .history
            .iter()
            .rev()
            .take_while(|s| {
                s.writing == latest.writing
                    && (!beside || latest.at.duration_since(s.at) <= TPS_BESIDE_WRITES)
            })
            .collect();
        // Oldest first; the steps are the samples whose counter moved since the one before.
        let steps: Vec<&Sample> = run
            .iter()
            .rev()
            .zip(run.iter().rev().skip(1))
            .filter(|(before, after)| after.transactions != before.transactions)
            .map(|(_, after)| *after)
            .collect();
        let (Some(first), Some(last)) = (steps.first(), steps.last()) else {
            return (0.0, 0.0, beside);
        };
        let seconds = last.at.duration_since(first.at).as_secs_f64();
        if seconds <= 0.0 {
            return (0.0, 0.0, beside);
        }
        let theirs = (last.transactions - first.transactions) as f64
            - last.own.saturating_sub(first.own) as f64;
        ((theirs / seconds).max(0.0), seconds, beside)
    }

    /// Whether production committed anything over the whole history, whatever reproject did.
    fn production_seen(&self) -> f64 {
        match (self.history.front(), self.history.back()) {
            (Some(first), Some(last)) if last.at > first.at => {
                let theirs = (last.transactions - first.transactions) as f64
                    - last.own.saturating_sub(first.own) as f64;
                (theirs / last.at.duration_since(first.at).as_secs_f64()).max(0.0)
            }
            _ => 0.0,
        }
    }

    /// End the window: its figures, and a fresh window.
    pub(super) async fn window(&mut self) -> Result<Figures> {
        while self.samples.len() < MIN_SAMPLES {
            self.sample().await?;
            if self.samples.len() < MIN_SAMPLES {
                tokio::time::sleep(self.sample_every.min(Duration::from_millis(20))).await;
            }
        }
        let load_query = self.load_query.clone();
        let known_max = self.max_connections;
        let activity = self.activity.clone();
        let conn = self.connection().await?;
        let max_connections = match known_max {
            Some(m) => m,
            None => sqlx::query_scalar(
                "SELECT setting::bigint FROM pg_settings WHERE name = 'max_connections'",
            )
            .fetch_one(&mut *conn)
            .await
            .context(|| "throttle: reading max_connections".into())?,
        };
        // Seconds the slowest replica is behind; NULL without replicas (or without the right to
        // see them: then this signal is simply absent).
        let replica_lag_seconds: Option<f64> = sqlx::query_scalar(
            "SELECT max(extract(epoch FROM greatest(write_lag, flush_lag, replay_lag)))::float8 FROM pg_stat_replication",
        )
        .fetch_one(&mut *conn)
        .await
        .context(|| "throttle: reading replica lag from pg_stat_replication".into())?;
        let load_value: Option<f64> = match &load_query {
            Some(sql) => Some(
                sqlx::query_scalar::<_, f64>(&format!("SELECT ({sql})::float8"))
                    .fetch_one(&mut *conn)
                    .await
                    .context(|| format!("throttle: the load query {sql:?}"))?,
            ),
            None => None,
        };
        activity.committed(2 + u64::from(known_max.is_none()));
        self.max_connections = Some(max_connections);

        let samples = std::mem::take(&mut self.samples);
        let mut probes: Vec<f64> = samples.iter().map(|s| s.probe_ms).collect();
        probes.sort_by(f64::total_cmp);
        let at = ((probes.len() - 1) as f64 * self.percentile).round() as usize;
        let probe_ms = probes.get(at).copied().unwrap_or(0.0);
        let n = samples.len() as f64;
        let active = samples.iter().map(|s| s.active as f64).sum::<f64>() / n;
        let waiting = samples.iter().map(|s| s.waiting as f64).sum::<f64>() / n;
        let (production_tps, tps_seconds, tps_beside_writes) = self.production_tps();
        let seen_tps = self.production_seen();
        Ok(Figures {
            samples: samples.len(),
            probe_ms,
            production_tps,
            tps_seconds,
            tps_beside_writes,
            commits_seen: seen_tps,
            active,
            waiting,
            production_active: seen_tps.max(production_tps) >= self.min_production_tps
                || active >= 0.1
                // Production arriving late in a window is there before it moves the mean.
                || self.production_now(),
            max_connections,
            replica_lag_seconds,
            load_query: load_value,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn figures(probe_ms: f64, tps: f64, active: f64, waiting: f64) -> Figures {
        Figures {
            probe_ms,
            production_tps: tps,
            tps_seconds: 5.0,
            tps_beside_writes: true,
            active,
            waiting,
            production_active: true,
            ..Figures::default()
        }
    }

    fn load(signals: &[Signal], name: &str) -> f64 {
        signals
            .iter()
            .find(|s| s.name == name)
            .map(|s| s.load)
            .unwrap_or(f64::NAN)
    }

    #[test]
    fn the_budget_turns_production_losses_into_loads() {
        let budget = ImpactBudget::default();
        let alone = figures(0.20, 20_000.0, 2.0, 0.2);
        // The figures: 23.7k -> 15.3k tps is a 35% loss, 3.5 times a 10% budget.
        let now = figures(0.30, 13_000.0, 2.0, 0.2);
        let signals = budget_signals(&now, &alone, &budget, 0.5, 50.0);
        assert!((load(&signals, "throughput") - 3.5).abs() < 1e-9);
        // +50% latency is exactly the budget.
        assert!((load(&signals, "latency") - 1.0).abs() < 1e-9);
        assert_eq!(load(&signals, "waits"), 0.0);
        // More throughput or less latency than alone is no load at all.
        let better = figures(0.10, 25_000.0, 2.0, 0.0);
        let signals = budget_signals(&better, &alone, &budget, 0.5, 50.0);
        assert!(signals.iter().all(|s| s.load == 0.0), "{signals:?}");
    }

    #[test]
    fn waiting_more_is_read_as_the_latency_it_adds() {
        let budget = ImpactBudget::default();
        let alone = figures(0.2, 1_000.0, 2.0, 0.0);
        // Half of the active time now spent waiting doubles the active time: +100%, twice +50%.
        let now = figures(0.2, 1_000.0, 2.0, 1.0);
        let signals = budget_signals(&now, &alone, &budget, 0.5, 50.0);
        assert!((load(&signals, "waits") - 2.0).abs() < 1e-9, "{signals:?}");
        assert!(signals
            .iter()
            .any(|s| s.detail.contains("waits on locks and I/O 50%")));
    }

    #[test]
    fn throughput_is_judged_only_beside_writes() {
        let alone = figures(0.2, 66.0, 0.0, 0.0);
        // A trickle of commits, measured while reproject was quiet: lower than alone, but not a
        // loss reproject caused.
        let quiet = Figures {
            tps_beside_writes: false,
            ..figures(0.2, 56.0, 0.0, 0.0)
        };
        let signals = budget_signals(&quiet, &alone, &ImpactBudget::default(), 0.5, 50.0);
        assert!(
            signals.iter().all(|s| s.name != "throughput"),
            "{signals:?}"
        );
    }

    #[test]
    fn a_production_that_stopped_is_not_a_throughput_loss() {
        let alone = figures(0.2, 23_000.0, 2.0, 0.0);
        // pgbench ended: 24 commits/s (reproject's own neighbours), nobody active.
        let stopped = figures(0.2, 24.0, 0.0, 0.0);
        let signals = budget_signals(&stopped, &alone, &ImpactBudget::default(), 0.5, 50.0);
        assert!(
            signals.iter().all(|s| s.name != "throughput"),
            "{signals:?}"
        );
        // The same throughput with backends active is production held up: a loss.
        let held_up = figures(0.2, 24.0, 4.0, 4.0);
        let signals = budget_signals(&held_up, &alone, &ImpactBudget::default(), 0.5, 50.0);
        assert!(load(&signals, "throughput") > 9.0, "{signals:?}");
    }

    #[test]
    fn a_short_quiet_window_keeps_the_solo_throughput_measured_over_seconds() {
        let alone = figures(0.2, 30_000.0, 2.0, 0.0);
        // Half a second of pause: quiet, but too short to tell throughput.
        let pause = Figures {
            tps_seconds: 0.4,
            ..figures(0.4, 0.0, 2.0, 0.0)
        };
        let updated = alone.updated_with(&pause);
        assert_eq!(updated.production_tps, 30_000.0);
        assert_eq!(updated.tps_seconds, 5.0);
        assert!((updated.probe_ms - 0.3).abs() < 1e-9, "probe averaged");
        // A longer quiet run measures throughput anew.
        let measured = figures(0.2, 20_000.0, 2.0, 0.0);
        assert_eq!(alone.updated_with(&measured).production_tps, 20_000.0);
    }

    #[test]
    fn a_quiet_production_gives_no_throughput_signal() {
        let alone = figures(0.2, 10.0, 0.0, 0.0);
        let now = figures(0.2, 0.0, 0.0, 0.0);
        let signals = budget_signals(&now, &alone, &ImpactBudget::default(), 0.5, 50.0);
        assert!(signals.iter().all(|s| s.name != "throughput"));
    }

    #[test]
    fn a_writer_between_two_batches_is_still_writing() {
        let mut shadow = WriteShadow::default();
        let start = Instant::now();
        let at = |ms: u64| start + Duration::from_millis(ms);
        assert!(!shadow.beside_writes(false, at(0)), "nothing written yet");
        // A batch every 300 ms, sampled every 50 ms: every sample is beside the writes.
        for ms in (300..3_000).step_by(50) {
            assert!(shadow.beside_writes(ms % 300 == 0, at(ms)), "at {ms} ms");
        }
        // The last batch was at 2,700 ms: quiet once its shadow has passed.
        assert!(shadow.beside_writes(false, at(3_650)));
        assert!(!shadow.beside_writes(false, at(3_750)));
    }

    #[test]
    fn a_window_is_quiet_only_without_writes_or_busy_statements() {
        let activity = Arc::new(Activity::default());
        assert_eq!(activity.take_window(), (0, true));
        activity.wrote(10);
        assert_eq!(activity.take_window(), (10, false));
        assert_eq!(activity.take_window(), (0, true));
        let guard = activity.busy();
        let _ = activity.take_window();
        assert_eq!(activity.take_window(), (0, false), "busy all along");
        drop(guard);
        assert_eq!(
            activity.take_window(),
            (0, false),
            "ended within the window"
        );
        assert_eq!(activity.take_window(), (0, true));
    }
}
