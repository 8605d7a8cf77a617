//! The throttle: while reproject writes, it watches the database's health every few seconds and sets
//! the write rate from it, so that a rebuild never becomes the production incident.
//!
//! Signals, each read as a fraction of its limit (the load): the latency of a small probe query
//! against its own baseline; the number of active backends (`pg_stat_activity`); the replay lag of
//! replicas (`pg_stat_replication`), when there are any; and an optional user query that returns a
//! load figure. The highest fraction decides:
//!
//! - at or above `pause_at`: pause (nothing is written until the load is below `slow_at`);
//! - above `slow_at`: halve the rate (multiplicative decrease);
//! - otherwise: raise the rate by a step (additive increase), up to the cap.
//!
//! Every change of state is logged with the signal that caused it, shown by `status` (in the
//! build's progress) and exported as metrics. Thresholds, the cap and the batch size can be changed
//! while a command runs with `reproject tune`; they are read from the catalog at each check.

use std::time::{Duration, Instant};

use sqlx::{Connection, PgConnection};

use crate::sink::{Context, Result};

/// What the throttle watches and where it acts.
#[derive(Clone, Debug)]
pub struct ThrottleConfig {
    /// How often the signals are read.
    pub check_every: Duration,
    /// The probe whose latency is compared with its baseline; `SELECT 1` by default.
    pub probe_sql: String,
    /// The probe's latency limit, as a multiple of its baseline (the fastest seen, at least 1 ms).
    pub latency_factor: f64,
    /// Active backends (other than reproject's) at which the database counts as fully loaded.
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
    /// Events per second added per check while healthy, and where the rate starts (unbounded by
    /// default: the first slow-down halves the rate actually reached).
    pub increase_step: f64,
    pub start_rate: f64,
    /// The rate never goes below this while not paused.
    pub min_rate: f64,
}

impl Default for ThrottleConfig {
    fn default() -> Self {
        ThrottleConfig {
            check_every: Duration::from_secs(2),
            probe_sql: "SELECT 1".into(),
            latency_factor: 10.0,
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
    /// Healthy: the rate grows by a step per check up to the cap.
    Running,
    /// Over `slow_at`: the rate was cut.
    Slowed,
    /// At `pause_at`: nothing is written until the load is below `slow_at`.
    Paused,
}

impl ThrottleState {
    fn gauge(self) -> f64 {
        match self {
            ThrottleState::Running => 0.0,
            ThrottleState::Slowed => 1.0,
            ThrottleState::Paused => 2.0,
        }
    }
}

/// One reading of the signals: the highest load and what it came from.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Reading {
    pub load: f64,
    /// The signal behind `load`, readable: `probe latency 45.1 ms (limit 12.0 ms)`.
    pub signal: String,
    pub probe_ms: f64,
    pub probe_baseline_ms: f64,
    pub active_backends: i64,
    pub replica_lag_seconds: Option<f64>,
    pub load_query: Option<f64>,
}

/// What the throttle decided at its last check, for `status` and the logs.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Decision {
    pub state: ThrottleState,
    /// Events per second allowed now (None while paused).
    pub rate: Option<f64>,
    pub reading: Reading,
    pub reason: String,
}

pub struct Throttle {
    config: ThrottleConfig,
    database_url: String,
    conn: Option<PgConnection>,
    baseline_ms: Option<f64>,
    max_active: Option<f64>,
    rate: f64,
    state: ThrottleState,
    last_check: Option<Instant>,
    last: Option<Decision>,
    /// When the next events are due, for pacing.
    next_due: Option<Instant>,
    /// Events paced since the last check, for the rate actually reached.
    paced: u64,
}

impl Throttle {
    pub fn new(config: ThrottleConfig, database_url: &str) -> Throttle {
        Throttle {
            rate: config.start_rate,
            config,
            database_url: database_url.to_string(),
            conn: None,
            baseline_ms: None,
            max_active: None,
            state: ThrottleState::Running,
            last_check: None,
            last: None,
            next_due: None,
            paced: 0,
        }
    }

    pub fn last(&self) -> Option<&Decision> {
        self.last.as_ref()
    }

    /// Read the signals and decide, if a check is due. Returns the decision when one was made.
    pub async fn check_if_due(
        &mut self,
        live: &LiveSettings,
        hard_cap: Option<u64>,
    ) -> Result<Option<&Decision>> {
        if self
            .last_check
            .is_some_and(|t| t.elapsed() < self.config.check_every)
        {
            return Ok(None);
        }
        self.check(live, hard_cap).await.map(Some)
    }

    /// Read the signals now and decide.
    pub async fn check(&mut self, live: &LiveSettings, hard_cap: Option<u64>) -> Result<&Decision> {
        let observed = match self.last_check {
            Some(t) => self.paced as f64 / t.elapsed().as_secs_f64().max(1e-3),
            None => 0.0,
        };
        self.paced = 0;
        self.last_check = Some(Instant::now());
        let reading = match self.read().await {
            Ok(r) => r,
            Err(e) => {
                // A probe that fails is a signal too: the database is in trouble, or the
                // connection is gone. Reconnect next time; slow down meanwhile.
                self.conn = None;
                Reading {
                    load: self.slow_at(live) + f64::EPSILON,
                    signal: format!("the health probe failed: {e}"),
                    probe_ms: 0.0,
                    probe_baseline_ms: self.baseline_ms.unwrap_or(0.0),
                    active_backends: 0,
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
        let (slow_at, pause_at) = (
            self.slow_at(live),
            live.pause_at.unwrap_or(self.config.pause_at),
        );
        let before = self.state;
        let reason;
        if reading.load >= pause_at || (before == ThrottleState::Paused && reading.load >= slow_at)
        {
            self.state = ThrottleState::Paused;
            reason = format!(
                "{} is {:.0}% of its limit (pause at {:.0}%, resume below {:.0}%)",
                reading.signal,
                reading.load * 100.0,
                pause_at * 100.0,
                slow_at * 100.0
            );
        } else if reading.load > slow_at {
            let reached = if self.rate.is_finite() {
                self.rate
            } else {
                observed
            };
            self.rate = (reached / 2.0).max(self.config.min_rate);
            self.state = ThrottleState::Slowed;
            reason = format!(
                "{} is {:.0}% of its limit (slow down above {:.0}%): rate halved to {:.0} events/s",
                reading.signal,
                reading.load * 100.0,
                slow_at * 100.0,
                self.rate
            );
        } else {
            if before != ThrottleState::Paused {
                self.rate += self.config.increase_step;
            }
            self.state = ThrottleState::Running;
            reason = format!(
                "healthy: {} is {:.0}% of its limit",
                reading.signal,
                reading.load * 100.0
            );
        }
        self.rate = self.rate.min(cap.max(self.config.min_rate));
        if self.state != before {
            match self.state {
                ThrottleState::Running => {
                    tracing::info!(message = "throttle: resuming full speed", %reason, rate = self.rate)
                }
                ThrottleState::Slowed => {
                    tracing::warn!(message = "throttle: slowing down", %reason, rate = self.rate)
                }
                ThrottleState::Paused => {
                    tracing::warn!(message = "throttle: pausing writes", %reason)
                }
            }
        } else if self.state == ThrottleState::Slowed {
            tracing::info!(message = "throttle: slowing down further", %reason, rate = self.rate);
        }
        metrics::gauge!("reproject_throttle_state").set(self.state.gauge());
        metrics::gauge!("reproject_throttle_load_ratio").set(reading.load);
        metrics::gauge!("reproject_throttle_rate_events_per_second").set(
            if self.state == ThrottleState::Paused {
                0.0
            } else if self.rate.is_finite() {
                self.rate
            } else {
                0.0
            },
        );
        let decision = Decision {
            state: self.state,
            rate: (self.state != ThrottleState::Paused).then_some(self.rate),
            reading,
            reason,
        };
        Ok(self.last.insert(decision))
    }

    fn slow_at(&self, live: &LiveSettings) -> f64 {
        live.slow_at.unwrap_or(self.config.slow_at)
    }

    pub fn check_every(&self) -> Duration {
        self.config.check_every
    }

    pub fn paused(&self) -> bool {
        self.state == ThrottleState::Paused
    }

    /// Sleep as long as `events` take at the current rate (a running average, so a slow batch is
    /// not punished twice). Nothing while the rate is unbounded.
    pub async fn pace(&mut self, events: u64) {
        self.paced += events;
        if !self.rate.is_finite() || self.rate <= 0.0 {
            return;
        }
        let now = Instant::now();
        // Credit for idle time is limited to a second, so a burst after a pause stays a burst of
        // at most a second's worth.
        let from = match self.next_due {
            Some(due) if due + Duration::from_secs(1) > now => due,
            _ => now - Duration::from_secs(1),
        };
        let due = from + Duration::from_secs_f64(events as f64 / self.rate);
        self.next_due = Some(due);
        if due > now {
            tokio::time::sleep(due - now).await;
        }
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
            .ok_or_else(|| crate::sink::SinkError::Invalid("throttle: no connection".into()))
    }

    async fn read(&mut self) -> Result<Reading> {
        let probe_sql = self.config.probe_sql.clone();
        let load_query = self.config.load_query.clone();
        let conn = self.connection().await?;
        let started = Instant::now();
        sqlx::query(&probe_sql)
            .execute(&mut *conn)
            .await
            .context(|| format!("throttle: the probe query {probe_sql:?}"))?;
        let probe_ms = started.elapsed().as_secs_f64() * 1e3;
        let active_backends: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity
             WHERE state = 'active' AND backend_type = 'client backend' AND pid <> pg_backend_pid()
               AND application_name NOT LIKE 'reproject%'",
        )
        .fetch_one(&mut *conn)
        .await
        .context(|| "throttle: counting active backends in pg_stat_activity".into())?;
        let max_connections: i64 = sqlx::query_scalar(
            "SELECT setting::bigint FROM pg_settings WHERE name = 'max_connections'",
        )
        .fetch_one(&mut *conn)
        .await
        .context(|| "throttle: reading max_connections".into())?;
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

        let baseline = self
            .baseline_ms
            .map_or(probe_ms, |b| b.min(probe_ms))
            .max(1.0);
        self.baseline_ms = Some(self.baseline_ms.map_or(probe_ms, |b| b.min(probe_ms)));
        let latency_limit = baseline * self.config.latency_factor;
        let max_active = *self.max_active.get_or_insert_with(|| {
            self.config
                .max_active_backends
                .map(f64::from)
                .unwrap_or((max_connections as f64 / 5.0).max(1.0))
        });
        let mut signals: Vec<(f64, String)> = vec![
            (
                probe_ms / latency_limit,
                format!("probe latency {probe_ms:.1} ms (baseline {baseline:.1} ms, limit {latency_limit:.1} ms)"),
            ),
            (
                active_backends as f64 / max_active,
                format!("{active_backends} active backends (limit {max_active:.0})"),
            ),
        ];
        if let Some(lag) = replica_lag_seconds {
            let limit = self.config.max_replica_lag.as_secs_f64().max(0.001);
            signals.push((
                lag / limit,
                format!("replica lag {lag:.1} s (limit {limit:.0} s)"),
            ));
        }
        if let Some(value) = load_value {
            let limit = if self.config.load_limit > 0.0 {
                self.config.load_limit
            } else {
                1.0
            };
            signals.push((
                value / limit,
                format!("the load query's figure {value} (limit {limit})"),
            ));
        }
        let (load, signal) = signals
            .into_iter()
            .max_by(|a, b| a.0.total_cmp(&b.0))
            .unwrap_or((0.0, "nothing".into()));
        Ok(Reading {
            load,
            signal,
            probe_ms,
            probe_baseline_ms: baseline,
            active_backends,
            replica_lag_seconds,
            load_query: load_value,
        })
    }
}

/// Before a heavy statement the throttle cannot pace (a bulk COPY, an index build): wait while the
/// database is over its pause threshold. Returns at once without a throttle.
pub async fn wait_until_healthy(
    config: Option<&ThrottleConfig>,
    database_url: &str,
    what: &str,
    cancel: &tokio_util::sync::CancellationToken,
) -> Result<()> {
    let Some(config) = config else {
        return Ok(());
    };
    let mut throttle = Throttle::new(config.clone(), database_url);
    let live = LiveSettings::default();
    throttle.check(&live, None).await?;
    while throttle.paused() && !cancel.is_cancelled() {
        tokio::select! {
            _ = cancel.cancelled() => {}
            _ = tokio::time::sleep(config.check_every) => {}
        }
        let decision = throttle.check(&live, None).await?;
        if decision.state != ThrottleState::Paused {
            tracing::info!(
                message = "throttle: the database is healthy again; going on",
                what
            );
        }
    }
    Ok(())
}
