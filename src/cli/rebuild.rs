//! `reproject rebuild`: rebuild projections and swap them in.

use std::time::Duration;

use clap::Args;

use super::{shutdown_token, GlobalArgs, Outcome, Settings};
use crate::engine::rebuild::{self, RebuildOptions, RebuildReport};
use crate::engine::{BadRecordPolicy, Tuning};
use crate::swap::SwapOptions;

#[derive(Args, Debug, Clone)]
pub struct SwapArgs {
    /// How long the swap may wait for a reader's lock before it backs off and retries
    #[arg(long, default_value_t = 50, value_name = "MS")]
    pub swap_lock_timeout_ms: u64,
    /// How many times to try the swap before giving up
    #[arg(long, default_value_t = 200)]
    pub swap_attempts: u32,
}

impl SwapArgs {
    pub fn options(&self, settings: &Settings) -> SwapOptions {
        SwapOptions {
            view_schema: settings.view_schema.clone(),
            lock_timeout: Duration::from_millis(self.swap_lock_timeout_ms),
            max_attempts: self.swap_attempts.max(1),
        }
    }
}

#[derive(Args, Debug, Clone)]
pub struct MemoryArgs {
    /// Memory the replay's fold may hold (for example 512MiB, 2GB); beyond it, folded rows are
    /// flushed to the new tables and later events merged there. Default: fold all in memory
    #[arg(long, value_name = "SIZE", value_parser = super::config::parse_size)]
    pub memory_budget: Option<usize>,
    /// Stop (resumably) when a build's tables take more than this on the database server
    #[arg(long, value_name = "SIZE", value_parser = super::config::parse_size)]
    pub disk_budget: Option<usize>,
}

#[derive(Args, Debug, Clone)]
pub struct TuningArgs {
    /// Events per batch: per transaction while catching up and following, per fold step while replaying
    #[arg(long, default_value_t = 20_000)]
    pub batch_events: usize,
    /// Swap once the new build lags the log end by at most this many events
    #[arg(long, default_value_t = 1_000)]
    pub lag_threshold: i64,
    /// Give up when Kafka makes no progress for this long while reporting errors
    #[arg(long, default_value_t = 300, value_name = "SECONDS")]
    pub stall_timeout: u64,
    /// Apply at most this many events per second while catching up and following
    #[arg(long, value_name = "EVENTS")]
    pub max_rate: Option<u64>,
    /// A record that cannot be applied (undecodable, wrong key, no upcaster, an upcaster refusing
    /// it, an event id seen twice): stop there, or keep it in reproject.dead_letters and go on
    #[arg(long, value_enum, default_value_t = OnBadRecord::Fail)]
    pub on_bad_record: OnBadRecord,
    /// With --on-bad-record dead-letter: stop once a build holds more dead letters than this
    #[arg(long, default_value_t = 1_000, value_name = "RECORDS")]
    pub dead_letter_budget: u64,
    /// Reader threads a replay shares the partitions out to (decoding, upcasting and projecting
    /// run on them). Default: one per core, up to 8
    #[arg(long, value_name = "THREADS", value_parser = clap::value_parser!(u16).range(1..=64))]
    pub replay_readers: Option<u16>,
    #[command(flatten)]
    pub throttle: ThrottleArgs,
}

/// The throttle: how catch-ups and followers adapt their write rate to the database's health.
#[derive(Args, Debug, Clone)]
pub struct ThrottleArgs {
    /// Do not watch the database's health; write as fast as --max-rate allows
    #[arg(long)]
    pub no_throttle: bool,
    /// How often to read the health signals
    #[arg(long, default_value_t = 2.0, value_name = "SECONDS")]
    pub throttle_check_every: f64,
    /// The probe query whose latency is compared with its baseline
    #[arg(long, default_value = "SELECT 1", value_name = "SQL")]
    pub throttle_probe: String,
    /// The probe's latency limit, as a multiple of its fastest time (at least 1 ms)
    #[arg(long, default_value_t = 10.0, value_name = "FACTOR")]
    pub throttle_latency_factor: f64,
    /// Active backends (other than reproject's) that count as full load [default: max_connections / 5]
    #[arg(long, value_name = "N")]
    pub throttle_max_active_backends: Option<u32>,
    /// Replica lag (pg_stat_replication) that counts as full load
    #[arg(long, default_value_t = 30.0, value_name = "SECONDS")]
    pub throttle_max_replica_lag: f64,
    /// A query of your own returning one number, the database's load as you measure it
    #[arg(long, value_name = "SQL")]
    pub throttle_load_query: Option<String>,
    /// The value of --throttle-load-query that counts as full load
    #[arg(long, default_value_t = 1.0, value_name = "VALUE")]
    pub throttle_load_limit: f64,
    /// Halve the write rate when a signal is above this fraction of its limit
    #[arg(long, default_value_t = 0.7, value_name = "FRACTION")]
    pub throttle_slow_at: f64,
    /// Pause writing when a signal reaches this fraction of its limit (resume below --throttle-slow-at)
    #[arg(long, default_value_t = 1.0, value_name = "FRACTION")]
    pub throttle_pause_at: f64,
    /// Events per second added at each healthy check after a slow-down
    #[arg(long, default_value_t = 5_000.0, value_name = "EVENTS")]
    pub throttle_step: f64,
}

impl ThrottleArgs {
    pub fn config(&self) -> Option<crate::engine::throttle::ThrottleConfig> {
        (!self.no_throttle).then(|| crate::engine::throttle::ThrottleConfig {
            check_every: Duration::from_secs_f64(self.throttle_check_every.clamp(0.1, 3600.0)),
            probe_sql: self.throttle_probe.clone(),
            latency_factor: self.throttle_latency_factor.max(1.0),
            max_active_backends: self.throttle_max_active_backends,
            max_replica_lag: Duration::from_secs_f64(
                self.throttle_max_replica_lag.clamp(0.001, 1e6),
            ),
            load_query: self.throttle_load_query.clone(),
            load_limit: self.throttle_load_limit,
            slow_at: self.throttle_slow_at,
            pause_at: self.throttle_pause_at.max(self.throttle_slow_at),
            increase_step: self.throttle_step.max(1.0),
            ..Default::default()
        })
    }
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnBadRecord {
    Fail,
    DeadLetter,
}

impl TuningArgs {
    pub fn tuning(&self) -> Tuning {
        Tuning {
            batch_events: self.batch_events.max(1),
            lag_threshold: self.lag_threshold.max(0),
            stall_timeout: Duration::from_secs(self.stall_timeout.max(1)),
            max_rate: self.max_rate,
            bad_records: match self.on_bad_record {
                OnBadRecord::Fail => BadRecordPolicy::Fail,
                OnBadRecord::DeadLetter => BadRecordPolicy::DeadLetter {
                    budget: self.dead_letter_budget,
                },
            },
            throttle: self.throttle.config(),
            replay_readers: self
                .replay_readers
                .map_or_else(crate::engine::default_replay_readers, usize::from),
        }
    }
}

#[derive(Args, Debug)]
pub struct RebuildArgs {
    /// Projections to rebuild
    #[arg(required_unless_present = "all", conflicts_with = "all")]
    pub projections: Vec<String>,
    /// Rebuild every projection (in one pass over the log)
    #[arg(long)]
    pub all: bool,
    /// Rebuild even though the log no longer starts at offset 0 (the view will miss the lost events)
    #[arg(long)]
    pub allow_truncated_history: bool,
    /// Build and catch up, but leave the current view live until `reproject swap`
    #[arg(long)]
    pub no_swap: bool,
    #[command(flatten)]
    pub memory: MemoryArgs,
    #[command(flatten)]
    pub swap: SwapArgs,
    #[command(flatten)]
    pub verify: super::verify::VerifyArgs,
    #[command(flatten)]
    pub tuning: TuningArgs,
}

pub async fn run(global: &GlobalArgs, args: RebuildArgs) -> anyhow::Result<Outcome> {
    let settings = Settings::resolve(global)?;
    let engine = settings.engine(args.tuning.tuning()).await?;
    let names = super::chosen_projections(&engine, args.all, &args.projections);
    let options = RebuildOptions {
        allow_truncated_history: args.allow_truncated_history,
        swap: !args.no_swap,
        swap_options: args.swap.options(&settings),
        quiet: settings.quiet,
        memory_budget: args.memory.memory_budget,
        disk_budget: args.memory.disk_budget.map(|b| b as u64),
        verify: args.verify.policy(),
    };
    let report = rebuild::rebuild(&engine, &names, &options, &shutdown_token()).await?;
    print_report(&report);
    Ok(Outcome::Success)
}

pub fn print_report(report: &RebuildReport) {
    let rate = report.events_replayed as f64 / report.replay_seconds.max(1e-9);
    println!(
        "rebuilt {} (builds {:?}): {} events replayed in {:.2}s ({:.0}/s), {} rows loaded in {:.2}s, indexes {:.2}s, \
         caught up {} events in {:.2}s, swap {:.2}s",
        report.projections.join(", "),
        report.builds,
        report.events_replayed,
        report.replay_seconds,
        rate,
        report.rows_loaded,
        report.load_seconds,
        report.index_seconds,
        report.catch_up_events,
        report.catch_up_seconds,
        report.swap_seconds
    );
    for s in &report.swaps {
        println!(
            "  {} now reads build {}{} (swap took {} attempt(s), {:.1} ms to commit)",
            s.projection,
            s.build_id,
            s.retired_build_id
                .map(|r| format!("; build {r} retired, kept for rollback"))
                .unwrap_or_default(),
            s.attempts,
            s.commit_ms
        );
    }
    if report.aggregates_indexed > 0 {
        println!(
            "  aggregate index: {} aggregates recorded in {:.2}s (for `reproject replay`)",
            report.aggregates_indexed, report.aggregate_index_seconds
        );
    }
    if report.events_replayed > 0 {
        println!(
            "  the fold peaked at {:.0} MB{}",
            report.peak_fold_bytes as f64 / 1e6,
            if report.spills > 0 {
                format!(
                    " and was flushed to PostgreSQL {} time(s) to stay within --memory-budget",
                    report.spills
                )
            } else {
                String::new()
            }
        );
    }
    if report.dead_letters > 0 {
        println!(
            "  {} bad record(s) passed over and kept in reproject.dead_letters (`reproject dead-letters list`)",
            report.dead_letters
        );
    }
    if report.history_truncated {
        println!("  warning: built from a truncated log (--allow-truncated-history); events before the log start are missing");
    }
    for verification in &report.verifications {
        print!("\n{}", verification.render());
    }
}
