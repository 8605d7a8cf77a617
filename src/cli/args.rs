//! Flags that several commands share, and the values flags take, apart from the library's types:
//! the engine knows nothing of the command line. Defaults come from the library's own `Default`s,
//! so that they are written once.

use std::time::Duration;

use clap::{Args, ValueEnum};

use super::Settings;
use crate::engine::throttle::{parse_share, ImpactBudget, ThrottleConfig};
use crate::engine::verify::{VerifyMode, VerifyPolicy};
use crate::engine::{BadRecordPolicy, Tuning};
use crate::source::partitioner::Partitioner;
use crate::swap::SwapOptions;
use crate::verify::BucketBy;

/// `--format` of every command that prints a report.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// For people (`table` is accepted too)
    #[value(alias = "table")]
    Text,
    /// For tools: JSON (`replay` prints one object per line: each event, then the sequence check,
    /// the comparisons and a summary)
    Json,
}

/// `--partitioner`: how the producers chose a record's partition from its key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum PartitionerArg {
    /// librdkafka's default: CRC32 of the key
    #[value(name = "consistent_random")]
    ConsistentRandom,
    /// The Java client's default: murmur2 of the key
    #[value(name = "murmur2_random")]
    Murmur2Random,
}

impl From<PartitionerArg> for Partitioner {
    fn from(arg: PartitionerArg) -> Partitioner {
        match arg {
            PartitionerArg::ConsistentRandom => Partitioner::ConsistentRandom,
            PartitionerArg::Murmur2Random => Partitioner::Murmur2Random,
        }
    }
}

/// `--verify`: what a failed verification does to the swap.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum VerifyModeArg {
    /// Refuse the swap
    Strict,
    /// Swap anyway and keep the report
    Report,
}

impl From<VerifyModeArg> for VerifyMode {
    fn from(arg: VerifyModeArg) -> VerifyMode {
        match arg {
            VerifyModeArg::Strict => VerifyMode::Strict,
            VerifyModeArg::Report => VerifyMode::Report,
        }
    }
}

/// `--verify-bucket`
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum BucketArg {
    Day,
    Month,
}

impl From<BucketArg> for BucketBy {
    fn from(arg: BucketArg) -> BucketBy {
        match arg {
            BucketArg::Day => BucketBy::Day,
            BucketArg::Month => BucketBy::Month,
        }
    }
}

#[derive(Args, Debug, Clone)]
pub struct SwapArgs {
    /// How long the swap may wait for a reader's lock before it backs off and retries
    #[arg(long, default_value_t = SwapOptions::default().lock_timeout.as_millis() as u64, value_name = "MS")]
    pub swap_lock_timeout_ms: u64,
    /// How many times to try the swap before giving up
    #[arg(long, default_value_t = SwapOptions::default().max_attempts)]
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
    /// flushed to the new tables and later events merged there (with --shared: per process, which
    /// then loads its partitions in rounds that fit). Default: fold all in memory
    #[arg(long, value_name = "SIZE", value_parser = super::config::parse_size)]
    pub memory_budget: Option<usize>,
    /// Stop (resumably) when a build's tables take more than this on the database server
    #[arg(long, value_name = "SIZE", value_parser = super::config::parse_size)]
    pub disk_budget: Option<usize>,
}

#[derive(Args, Debug, Clone)]
pub struct TuningArgs {
    /// Events per batch: per transaction while catching up and following, per fold step while replaying
    #[arg(long, default_value_t = Tuning::default().batch_events)]
    pub batch_events: usize,
    /// Rows the writer keeps in memory, as committed, for the next batches of a catch-up or follow
    /// instead of reading them back from the database (0: read every row a batch touches)
    #[arg(long, value_name = "SIZE", value_parser = super::config::parse_size_or_zero, default_value = "256MiB")]
    pub writer_memory: usize,
    /// While behind and unthrottled (--no-throttle, no --max-rate), write what was read while the
    /// writer was busy in transactions of up to this many events (0: every batch on its own)
    #[arg(long, default_value_t = Tuning::default().catch_up_batch_events, value_name = "EVENTS")]
    pub catch_up_batch_events: usize,
    /// Swap once the new build lags the log end by at most this many events
    #[arg(long, default_value_t = Tuning::default().lag_threshold)]
    pub lag_threshold: i64,
    /// Give up when Kafka makes no progress for this long while reporting errors
    #[arg(long, default_value_t = Tuning::default().stall_timeout.as_secs(), value_name = "SECONDS")]
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
    /// The replay's reader threads fold their own batches into rows shared by key, instead of one
    /// fold thread folding them all: for machines with more cores than two, where that one thread
    /// bounds the replay (slower on two cores, see BENCHMARKS.md). Ignored under --memory-budget
    #[arg(long)]
    pub fold_in_readers: bool,
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
    #[arg(long, default_value_t = ThrottleConfig::default().check_every.as_secs_f64(), value_name = "SECONDS")]
    pub throttle_check_every: f64,
    /// The impact budget: the share of its throughput production may lose to reproject's writes,
    /// compared with its throughput alone (e.g. 10%)
    #[arg(long, default_value = "10%", value_parser = parse_share, value_name = "PERCENT")]
    pub max_throughput_loss: f64,
    /// The impact budget: how far production's latency may rise, compared with its latency alone
    /// (e.g. 50%: at most 1.5 times)
    #[arg(long, default_value = "50%", value_parser = parse_share, value_name = "PERCENT")]
    pub max_latency_rise: f64,
    /// The probe query whose latency stands for production's
    #[arg(long, default_value_t = ThrottleConfig::default().probe_sql, value_name = "SQL")]
    pub throttle_probe: String,
    /// Which percentile of a check's probe samples counts, 1-99
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u8).range(1..=99), value_name = "PERCENTILE")]
    pub throttle_probe_percentile: u8,
    /// Active backends (other than reproject's) that count as full load [default: max_connections / 5]
    #[arg(long, value_name = "N")]
    pub throttle_max_active_backends: Option<u32>,
    /// Replica lag (pg_stat_replication) that counts as full load
    #[arg(long, default_value_t = ThrottleConfig::default().max_replica_lag.as_secs_f64(), value_name = "SECONDS")]
    pub throttle_max_replica_lag: f64,
    /// A query of your own returning one number, the database's load as you measure it
    #[arg(long, value_name = "SQL")]
    pub throttle_load_query: Option<String>,
    /// The value of --throttle-load-query that counts as full load
    #[arg(long, default_value_t = ThrottleConfig::default().load_limit, value_name = "VALUE")]
    pub throttle_load_limit: f64,
    /// Halve the write rate when a signal is above this fraction of its limit
    #[arg(long, default_value_t = ThrottleConfig::default().slow_at, value_name = "FRACTION")]
    pub throttle_slow_at: f64,
    /// Pause writing when a signal reaches this fraction of its limit (resume below --throttle-slow-at)
    #[arg(long, default_value_t = ThrottleConfig::default().pause_at, value_name = "FRACTION")]
    pub throttle_pause_at: f64,
    /// Events per second added at each healthy check once the rate is back at its last overload (at most a quarter of the rate)
    #[arg(long, default_value_t = ThrottleConfig::default().increase_step, value_name = "EVENTS")]
    pub throttle_step: f64,
}

impl ThrottleArgs {
    pub fn config(&self) -> Option<ThrottleConfig> {
        (!self.no_throttle).then(|| ThrottleConfig {
            check_every: Duration::from_secs_f64(self.throttle_check_every.clamp(0.1, 3600.0)),
            // About ten samples a check, at most ten a second.
            sample_every: Duration::from_secs_f64(
                (self.throttle_check_every / 10.0).clamp(0.02, 0.1),
            ),
            probe_sql: self.throttle_probe.clone(),
            probe_percentile: f64::from(self.throttle_probe_percentile) / 100.0,
            budget: ImpactBudget {
                throughput_loss: self.max_throughput_loss,
                latency_rise: self.max_latency_rise,
            },
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
            fold_in_readers: self.fold_in_readers,
            known_rows_bytes: self.writer_memory,
            catch_up_batch_events: self.catch_up_batch_events,
        }
    }
}

/// How two builds are compared and what counts as a failure.
#[derive(Args, Debug, Clone)]
pub struct CompareArgs {
    /// Rows allowed to differ (on one side only, or with other values) before verification fails
    #[arg(long, default_value_t = VerifyPolicy::default().max_rows_differing, value_name = "ROWS")]
    pub verify_max_rows: i64,
    /// Keys sampled and compared column by column (the examples in the report)
    #[arg(long, default_value_t = VerifyPolicy::default().sample_keys, value_name = "KEYS")]
    pub verify_sample: usize,
    /// Buckets for per-bucket checksums and sums: by day or month of the table's time column
    #[arg(long, value_enum, default_value_t = BucketArg::Day)]
    pub verify_bucket: BucketArg,
    /// The sample's seed, to repeat a verification [default: random]
    #[arg(long)]
    pub verify_seed: Option<i64>,
    /// The topic has transaction markers or is compacted: offsets the replay did not receive are
    /// not a failure
    #[arg(long)]
    pub allow_offset_gaps: bool,
}

impl CompareArgs {
    pub fn policy(&self, mode: VerifyMode) -> VerifyPolicy {
        VerifyPolicy {
            mode,
            max_rows_differing: self.verify_max_rows.max(0),
            bucket_by: self.verify_bucket.into(),
            sample_keys: self.verify_sample,
            seed: self.verify_seed,
            allow_offset_gaps: self.allow_offset_gaps,
        }
    }
}

/// `--verify strict|report` for the commands that swap.
#[derive(Args, Debug, Clone)]
pub struct VerifyArgs {
    /// Before swapping, compare the new build with the live one: `strict` refuses the swap when they
    /// differ beyond --verify-max-rows, `report` swaps anyway and keeps the report in the catalog
    #[arg(long, value_enum, value_name = "MODE")]
    pub verify: Option<VerifyModeArg>,
    #[command(flatten)]
    pub compare: CompareArgs,
}

impl VerifyArgs {
    pub fn policy(&self) -> Option<VerifyPolicy> {
        self.verify.map(|mode| self.compare.policy(mode.into()))
    }
}
