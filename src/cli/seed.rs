//! `reproject seed`: append the domain's deterministic example history to the topic.

use super::output::outln;
use std::time::Instant;

use anyhow::Context as _;
use clap::Args;

use super::args::PartitionerArg;
use super::{Cx, Outcome};
use crate::domain::Domain;
use crate::domain::{Example, HistorySize};
use crate::source::producer::LogWriter;

#[derive(Args, Debug)]
pub struct SeedArgs {
    /// Events to write
    #[arg(long, default_value_t = 100_000)]
    pub events: u64,
    /// A knob of the history's shape, repeatable (`orders=N` for an example of orders, say); the domain's
    /// example lists its keys when given one it does not know
    #[arg(long, value_name = "KEY=N")]
    pub shape: Vec<String>,
    /// Random seed: the same arguments write the same log
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Skip the first N events of the history (to append what comes after an earlier seed of N events
    /// made with the same --shape and --seed)
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

/// The size of a history of `events` events drawn from `seed`, with `KEY=N` shape knobs the example
/// knows.
pub fn history_size(
    example: &dyn Example,
    events: u64,
    seed: u64,
    shape: &[String],
) -> anyhow::Result<HistorySize> {
    let mut size = HistorySize::new(events, seed);
    let known = example.shape_keys();
    for knob in shape {
        let (key, value) = knob
            .split_once('=')
            .ok_or_else(|| anyhow::anyhow!("--shape {knob:?}: expected KEY=N"))?;
        if !known.iter().any(|(k, _)| *k == key) {
            let listed: Vec<String> = known
                .iter()
                .map(|(k, what)| format!("{k} ({what})"))
                .collect();
            anyhow::bail!(
                "--shape {knob:?}: unknown key {key:?}; this domain's example knows {}",
                if listed.is_empty() {
                    "none".to_string()
                } else {
                    listed.join(", ")
                }
            );
        }
        let value: u64 = value
            .trim()
            .parse()
            .map_err(|_| anyhow::anyhow!("--shape {knob:?}: {value:?} is not a whole number"))?;
        size.shape.insert(key.to_string(), value);
    }
    Ok(size)
}

pub async fn run<D: Domain>(cx: &Cx<D>, args: SeedArgs) -> anyhow::Result<Outcome> {
    let settings = cx.settings()?;
    let example = cx.example("seed")?;
    // The stream is shaped by the history size it was seeded for (orders, items per order), so an
    // append with `--skip N` shapes it like the earlier seed of N events it continues.
    let shaped_for = if args.skip > 0 {
        args.skip
    } else {
        args.events
    };
    let size = history_size(example, shaped_for, args.seed, &args.shape)?;
    for topic in &settings.topics {
        settings.kafka.ensure_topic(topic, args.partitions).await?;
    }
    let mut history = example.history(&size);
    let (kafka, topics, partitioner) = (
        settings.kafka.clone(),
        settings.topics.clone(),
        crate::source::partitioner::Partitioner::from(args.partitioner),
    );
    let (skip, events) = (args.skip, args.events);
    let started = Instant::now();
    let (written, expected) = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
        for record in history.by_ref().take(skip as usize) {
            let _ = record;
        }
        let written = append_records(
            &kafka,
            &topics,
            partitioner.librdkafka_name(),
            &mut history,
            events,
        )?;
        Ok((written, history.expected()))
    })
    .await??;
    let seconds = started.elapsed().as_secs_f64();
    outln!(
        "wrote {written} events to {} in {seconds:.1}s ({:.0}/s), per version {:?}",
        settings.topics.join(", "),
        written as f64 / seconds.max(1e-9),
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

/// Append the next `events` records of `history` to the topics they name, through one bulk
/// producer that partitions keys as `partitioner` (librdkafka's name) does. Returns the records
/// delivered.
pub(super) fn append_records(
    kafka: &crate::source::KafkaSettings,
    topics: &[String],
    partitioner: &str,
    history: &mut impl Iterator<Item = crate::domain::Record>,
    events: u64,
) -> anyhow::Result<u64> {
    let mut writer = LogWriter::bulk(kafka, &topics[0], partitioner)?;
    for record in history.take(events as usize) {
        append(&mut writer, topics, &record)?;
    }
    Ok(writer.finish()?)
}

/// Append one record of an example history to the topic it names: its index into `topics` (the
/// domain's default topics, or those the user named in their place).
pub(super) fn append(
    writer: &mut LogWriter,
    topics: &[String],
    record: &crate::domain::Record,
) -> anyhow::Result<()> {
    let Some(topic) = topics.get(record.topic) else {
        anyhow::bail!(
            "the example history writes to topic number {} and only {} are named ({}); name them all, in the domain's order, or none",
            record.topic + 1,
            topics.len(),
            topics.join(", ")
        );
    };
    let headers: Vec<(&str, &[u8])> = record
        .headers
        .iter()
        .map(|(name, value)| (name.as_str(), value.as_slice()))
        .collect();
    writer.send_with_headers(
        topic,
        Some(record.key.as_bytes()),
        &record.value,
        &headers,
        None,
    )?;
    Ok(())
}
