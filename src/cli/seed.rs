//! `reproject seed`: append a deterministic shop history to the topic.

use super::output::outln;
use std::time::Instant;

use anyhow::Context as _;
use clap::Args;

use super::args::PartitionerArg;
use super::{GlobalArgs, Outcome, Settings};
use crate::domain::shop::generator::{History, HistoryConfig};
use crate::source::producer::LogWriter;

#[derive(Args, Debug)]
pub struct SeedArgs {
    /// Events to write
    #[arg(long, default_value_t = 100_000)]
    pub events: u64,
    /// Orders the history is spread over [default: a tenth of --events, or of --skip when appending]
    #[arg(long)]
    pub orders: Option<u64>,
    /// Customers placing them [default: orders / 5]
    #[arg(long)]
    pub customers: Option<u64>,
    /// Random seed: the same arguments write the same log
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Skip the first N events of the history (to append what comes after an earlier seed of N events
    /// made with the same --orders, --customers and --seed)
    #[arg(long, default_value_t = 0)]
    pub skip: u64,
    /// Partitions to create the topic with, where the broker supports creating topics [default: 16]; an
    /// existing topic is used as it is
    #[arg(long)]
    pub partitions: Option<i32>,
    /// How records are assigned to partitions by key
    #[arg(long, value_enum, default_value_t = PartitionerArg::ConsistentRandom)]
    pub partitioner: PartitionerArg,
    /// Write the totals the views must show after these events to this JSON file
    #[arg(long, value_name = "FILE")]
    pub expected: Option<std::path::PathBuf>,
}

pub fn history_config(
    events: u64,
    orders: Option<u64>,
    customers: Option<u64>,
    seed: u64,
) -> HistoryConfig {
    let orders = orders.unwrap_or((events / 10).max(1));
    HistoryConfig::new(
        events,
        orders,
        customers.unwrap_or((orders / 5).max(5)),
        seed,
    )
}

pub async fn run(global: &GlobalArgs, args: SeedArgs) -> anyhow::Result<Outcome> {
    let settings = Settings::resolve(global)?;
    settings
        .kafka
        .ensure_topic(&settings.topic, args.partitions)
        .await?;
    // The stream is shaped by the history size it was seeded for (orders, items per order), so an
    // append with `--skip N` shapes it like the earlier seed of N events it continues.
    let shaped_for = if args.skip > 0 {
        args.skip
    } else {
        args.events
    };
    let config = history_config(shaped_for, args.orders, args.customers, args.seed);
    let (kafka, topic, partitioner) = (
        settings.kafka.clone(),
        settings.topic.clone(),
        crate::source::partitioner::Partitioner::from(args.partitioner),
    );
    let (skip, events) = (args.skip, args.events);
    let started = Instant::now();
    let (written, expected) = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
        let mut history = History::new(config);
        let mut writer = LogWriter::bulk(&kafka, &topic, partitioner.librdkafka_name())?;
        for record in history.by_ref().take(skip as usize) {
            let _ = record;
        }
        for record in history.by_ref().take(events as usize) {
            writer.send(&record.key, &record.value)?;
        }
        let written = writer.finish()?;
        Ok((written, history.expected()))
    })
    .await??;
    let seconds = started.elapsed().as_secs_f64();
    outln!(
        "wrote {written} events to {} in {seconds:.1}s ({:.0}/s): {} orders, versions {:?}",
        settings.topic,
        written as f64 / seconds.max(1e-9),
        expected.orders,
        expected.events_by_version
    );
    if let Some(path) = args.expected {
        let json = serde_json::to_string_pretty(&expected)?;
        std::fs::write(&path, json)
            .with_context(|| format!("writing expected totals to {}", path.display()))?;
        outln!(
            "expected totals after {} events written to {}",
            expected.events,
            path.display()
        );
    }
    Ok(Outcome::Success)
}
