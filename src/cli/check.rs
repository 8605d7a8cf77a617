//! `reproject check`: what the domain defines, checked before anything runs and without a broker or
//! a database: its upcaster chains, its projections, their tables and their SQL. A domain defined by
//! files was already compiled to get here (`--domain DIR` reports every problem in the files, with
//! its file and line, before any command runs). With `--sample N` it also reads the first N records
//! of every partition and names the event types there that no upcaster knows (each would be a bad
//! record in a replay) and those no view reads.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use clap::Args;

use super::output::outln;
use super::{Cx, Outcome};
use crate::domain::Domain;
use crate::envelope::{message_name, Decoded, Framing};
use crate::source::{KafkaSettings, Topics};

#[derive(Args, Debug)]
pub struct CheckArgs {
    /// Also read the first N records of every partition of the log (needs the brokers) and name the
    /// event types in them that no upcaster knows or no view reads
    #[arg(long, value_name = "N")]
    pub sample: Option<u64>,
}

/// How long the sample may take to arrive before `check` says so.
const SAMPLE_WITHIN: Duration = Duration::from_secs(60);

/// An event type met in the sample: how often, and where first.
struct Seen {
    records: u64,
    first: String,
}

/// The first `per_partition` records of every partition, by event type (the message name), and the
/// records whose framing could not be read, with their positions.
fn sample_log(
    kafka: &KafkaSettings,
    topics: &Topics,
    framing: &Framing,
    per_partition: u64,
) -> anyhow::Result<(BTreeMap<String, Seen>, Vec<String>)> {
    use rdkafka::consumer::Consumer;
    use rdkafka::Message;
    let consumer = kafka.consumer("reproject-check")?;
    let partitions = kafka.partitions(&consumer, topics)?;
    let bounds = kafka.bounds(&consumer, topics, &partitions)?;
    let mut stop: BTreeMap<i32, i64> = BTreeMap::new();
    let mut positions: BTreeMap<i32, i64> = BTreeMap::new();
    for id in &partitions {
        let start = bounds.start.get(id).copied().unwrap_or(0);
        let end = bounds.end.get(id).copied().unwrap_or(0);
        let last = end.min(start.saturating_add(per_partition as i64));
        if last > start {
            positions.insert(*id, start);
            stop.insert(*id, last);
        }
    }
    let mut seen: BTreeMap<String, Seen> = BTreeMap::new();
    let mut unreadable = Vec::new();
    if stop.is_empty() {
        return Ok((seen, unreadable));
    }
    kafka.assign(&consumer, topics, &positions)?;
    let mut decoded = Decoded::default();
    let deadline = Instant::now() + SAMPLE_WITHIN;
    while !stop.is_empty() {
        if Instant::now() > deadline {
            anyhow::bail!(
                "the sample of {topics} did not arrive within {} s ({} partition(s) still short)",
                SAMPLE_WITHIN.as_secs(),
                stop.len()
            );
        }
        let Some(result) = consumer.poll(Duration::from_millis(200)) else {
            continue;
        };
        let message = result.map_err(|e| anyhow::anyhow!("reading a sample of {topics}: {e}"))?;
        let Some(id) = topics.id_of(message.topic(), message.partition()) else {
            continue;
        };
        let Some(&last) = stop.get(&id) else {
            continue;
        };
        let offset = message.offset();
        if offset >= last {
            stop.remove(&id);
            continue;
        }
        if offset + 1 >= last {
            stop.remove(&id);
        }
        let at = format!(
            "{}/{} at offset {offset}",
            message.topic(),
            message.partition()
        );
        let headers = crate::source::record_headers(&message);
        let record = crate::source::raw_record(&message, &headers);
        match framing.decode_into(&record, id, &mut decoded) {
            Ok(()) => {
                let name = message_name(&decoded.type_url).to_string();
                seen.entry(name)
                    .or_insert(Seen {
                        records: 0,
                        first: at,
                    })
                    .records += 1;
            }
            Err(e) => unreadable.push(format!("{at}: {e}")),
        }
    }
    let _ = consumer.unassign();
    Ok((seen, unreadable))
}

pub async fn run<D: Domain>(cx: &Cx<D>, args: CheckArgs) -> anyhow::Result<Outcome> {
    let domain = &cx.domain;
    let registry = domain
        .registry()
        .map_err(|e| anyhow::anyhow!("domain {}: its upcasters: {e}", domain.name()))?;
    let chains = registry.chains();
    let latest = chains.values().filter(|chain| chain.len() == 1).count();
    outln!(
        "domain {}: {} message type(s), {} of them latest versions",
        domain.name(),
        chains.len(),
        latest
    );
    let schemas = {
        let domain = domain.clone();
        crate::engine::SchemaSource::new(cx.global.schema_dir.clone(), move |p, v| {
            domain.schema(p, v)
        })
    };
    let mut problems = Vec::new();
    for projection in domain.projections() {
        let name = projection.name();
        let version = projection.version();
        for spec in projection.tables() {
            if let Err(e) = spec.check() {
                problems.push(format!("projection {name} v{version}: {e}"));
            }
        }
        if let Err(e) = schemas.load(name, version) {
            problems.push(format!("projection {name} v{version}: {e}"));
        }
        let tables: Vec<String> = projection
            .tables()
            .iter()
            .map(|t| format!("{} ({} columns)", t.name, t.columns.len()))
            .collect();
        outln!("  {name} v{version}: {}", tables.join(", "));
    }
    if let Some(per_partition) = args.sample {
        let settings = cx.settings()?;
        let topics = settings.topics()?;
        let framing = settings.framing.clone().unwrap_or_else(|| domain.framing());
        let kafka = settings.kafka.clone();
        let (seen, unreadable) = {
            let topics = topics.clone();
            tokio::task::spawn_blocking(move || {
                sample_log(&kafka, &topics, &framing, per_partition)
            })
            .await??
        };
        let records: u64 = seen.values().map(|s| s.records).sum();
        outln!(
            "sample: {records} record(s) of {topics}, the first {per_partition} of each partition"
        );
        let projections = domain.projections();
        for (name, s) in &seen {
            let Some(latest) = chains.get(name.as_str()).and_then(|c| c.last()) else {
                problems.push(format!(
                    "event type {name} ({} record(s) of the sample, first {}) is known to no upcaster: a replay would refuse each one as a bad record",
                    s.records, s.first
                ));
                continue;
            };
            let readers: Vec<&str> = projections
                .iter()
                .filter(|p| p.handles(latest) != Some(false))
                .map(|p| p.name())
                .collect();
            let via = if latest == name {
                String::new()
            } else {
                format!(" (as {latest})")
            };
            if readers.is_empty() {
                outln!("  {name}{via}: {} record(s), read by no view", s.records);
            } else {
                outln!(
                    "  {name}{via}: {} record(s), read by {}",
                    s.records,
                    readers.join(", ")
                );
            }
        }
        for u in &unreadable {
            problems.push(format!("a record of the sample cannot be read: {u}"));
        }
    }
    if problems.is_empty() {
        outln!("ok");
        Ok(Outcome::Success)
    } else {
        for p in &problems {
            outln!("problem: {p}");
        }
        Ok(Outcome::Failed)
    }
}
