//! The timeline of one aggregate (the `replay <aggregate-id>` command): its events, traced through
//! the upcasters and the projections, to explain why its rows look the way they do. Writes nothing to
//! the projection tables. (In the engine, "replay" is the rebuild's phase; this is the debugger.)
//!
//! 1. Locate: read only where the aggregate's events can be. The aggregate index a full replay left
//!    gives its offsets; past the index's coverage, and without an index, the partition the producer's
//!    partitioner sends the key to; `--scan-all` reads every partition.
//! 2. Trace each event: the stored type and version, every upcaster step with the payload after it,
//!    the row changes each projection emitted, and the rows after them (folded in memory).
//! 3. Check: gaps and repeats in the sequence numbers, event ids seen twice, and the computed rows
//!    against the live view's, column by column.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use prost_reflect::{DescriptorPool, DynamicMessage, SerializeOptions};
use rdkafka::consumer::BaseConsumer;
use rdkafka::message::Message;
use serde::Serialize;
use sqlx::Connection;

use super::{Engine, EngineError, Result};
use crate::envelope::{self, message_name, message_version};
use crate::projection::{
    Change, Changes, DynProjection, Event, LogicalTime, RowStore, TableSpec, Value,
};
use crate::sink::aggregate_index::{self, Located};
use crate::sink::writer::{self, BuildTables};
use crate::sink::{qualified, Context};
use crate::source::partitioner::Partitioner;
use crate::source::{KafkaSettings, SourceError, Topics};

/// How to find the partitions an aggregate's events are in, beyond what the aggregate index knows.
#[derive(Clone, Copy, Debug)]
pub enum Locate {
    /// The producers' partitioner: only the partition it sends the key to is read.
    Partitioner(Partitioner),
    /// Every partition (when the producers' partitioner is unknown).
    ScanAll,
}

pub struct TraceOptions<E> {
    pub aggregate_id: String,
    pub projections: Vec<DynProjection<E>>,
    pub locate: Locate,
    /// Also write the computed rows into a scratch schema, for inspection with SQL.
    pub scratch: bool,
}

/// The whole answer, as `--format json` emits it (one line per event, then the rest).
#[derive(Debug, Serialize)]
pub struct Timeline {
    /// The topics read, sorted by name.
    pub topics: Vec<String>,
    pub aggregate_id: String,
    pub read: ReadSummary,
    pub events: Vec<TimelineEvent>,
    pub sequence: SequenceCheck,
    pub comparisons: Vec<RowComparison>,
    pub scratch_schema: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct ReadSummary {
    /// Why these ranges: "aggregate index", "partitioner murmur2_random", "scan of all partitions".
    pub located_by: String,
    pub ranges: Vec<RangeRead>,
    pub records_scanned: u64,
    pub seconds: f64,
}

/// Offsets `from..to` (end exclusive) of one partition.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct RangeRead {
    pub topic: String,
    pub partition: i32,
    pub from: i64,
    pub to: i64,
    /// The partition's id (see [`Topics`]).
    #[serde(skip)]
    pub id: i32,
}

impl RangeRead {
    fn of(topics: &Topics, id: i32, from: i64, to: i64) -> RangeRead {
        RangeRead {
            topic: topics.topic_of(id).to_string(),
            partition: topics.partition_of(id),
            from,
            to,
            id,
        }
    }
}

impl std::fmt::Display for RangeRead {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}/{} offsets {}..{}",
            self.topic, self.partition, self.from, self.to
        )
    }
}

#[derive(Debug, Serialize)]
pub struct TimelineEvent {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub occurred_at: String,
    pub sequence: u64,
    pub event_id: String,
    pub type_url: String,
    pub version: Option<u32>,
    /// The stored message first, then the message after each upcaster step.
    pub steps: Vec<Step>,
    /// Set when the record could not be decoded or upcast: the projections did not see it.
    pub error: Option<String>,
    pub projections: Vec<ProjectionEffect>,
}

#[derive(Debug, Serialize)]
pub struct Step {
    pub message: String,
    pub version: Option<u32>,
    pub payload: serde_json::Value,
}

#[derive(Debug, Serialize)]
pub struct ProjectionEffect {
    pub projection: String,
    pub changes: Vec<String>,
    /// The rows those changes touched, after them (None: deleted).
    pub rows: Vec<RowAfter>,
}

#[derive(Debug, Serialize)]
pub struct RowAfter {
    pub table: String,
    pub key: String,
    pub row: Option<serde_json::Map<String, serde_json::Value>>,
}

#[derive(Debug, Default, Serialize)]
pub struct SequenceCheck {
    /// Missing sequence numbers, as inclusive ranges.
    pub gaps: Vec<(u64, u64)>,
    /// Sequence numbers seen more than once.
    pub repeats: Vec<u64>,
    /// Event ids seen more than once, with where they were seen (`topic/partition`, offset).
    pub duplicate_event_ids: Vec<(String, Vec<(String, i64)>)>,
}

impl SequenceCheck {
    pub fn is_clean(&self) -> bool {
        self.gaps.is_empty() && self.repeats.is_empty() && self.duplicate_event_ids.is_empty()
    }
}

/// One row the replay computed, next to what the live view holds for its key.
#[derive(Debug, Serialize)]
pub struct RowComparison {
    pub projection: String,
    pub view: String,
    pub key: String,
    pub verdict: Verdict,
    /// Columns whose values differ: (column, computed, live).
    pub differences: Vec<(String, String, String)>,
    pub computed: Option<serde_json::Map<String, serde_json::Value>>,
    pub live: Option<serde_json::Map<String, serde_json::Value>>,
}

#[derive(Debug, Serialize, PartialEq, Eq, Clone, Copy)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    Agree,
    Differ,
    /// The row gathers other aggregates' events too: the live row is shown, not judged.
    SharedRow,
}

pub async fn trace<E: Send + Sync + 'static>(
    engine: &Engine<E>,
    options: &TraceOptions<E>,
) -> Result<Timeline> {
    let id = options.aggregate_id.clone();
    let located = aggregate_index::locate(engine.catalog.pool(), &engine.topics, &id).await?;

    // 1. Read.
    let started = Instant::now();
    let (kafka, topics, framing) = (
        engine.kafka.clone(),
        engine.topics.clone(),
        engine.framing.clone(),
    );
    // A key that is not the aggregate id says nothing about where the aggregate's events are.
    let locate = match options.locate {
        Locate::Partitioner(_) if !framing.key_is_aggregate_id() => Locate::ScanAll,
        other => other,
    };
    let (records, located_by, ranges, scanned) = tokio::task::spawn_blocking(move || {
        read_aggregate(&kafka, &topics, &framing, &id, locate, &located)
    })
    .await
    .map_err(|e| EngineError::Projection {
        projection: "-".into(),
        reason: format!("replay reader failed: {e}"),
    })??;
    let read = ReadSummary {
        located_by,
        ranges,
        records_scanned: scanned,
        seconds: started.elapsed().as_secs_f64(),
    };
    if records.is_empty() {
        return Err(EngineError::NoSuchAggregate {
            aggregate_id: options.aggregate_id.clone(),
            topic: engine.topics.to_string(),
            looked_in: read
                .ranges
                .iter()
                .map(RangeRead::to_string)
                .collect::<Vec<_>>()
                .join(", "),
        });
    }

    // 2. Trace.
    let pool = &engine.descriptors;
    let mut stores: Vec<RowStore> = options
        .projections
        .iter()
        .map(|p| RowStore::new(p.tables().len()))
        .collect();
    let mut events = Vec::new();
    let mut sequences = Vec::new();
    let mut event_ids: BTreeMap<String, Vec<(String, i64)>> = BTreeMap::new();
    let mut scratch = Changes::default();
    let topics = &engine.topics;
    for record in &records {
        let (partition, offset) = (&record.partition, &record.record.offset);
        let decoded = match record.decode(&engine.framing) {
            Ok(d) => d,
            Err(e) => {
                events.push(TimelineEvent {
                    topic: topics.topic_of(*partition).to_string(),
                    partition: topics.partition_of(*partition),
                    offset: *offset,
                    occurred_at: String::new(),
                    sequence: 0,
                    event_id: String::new(),
                    type_url: String::new(),
                    version: None,
                    steps: Vec::new(),
                    error: Some(e.to_string()),
                    projections: Vec::new(),
                });
                continue;
            }
        };
        let event_id = uuid::Uuid::from_bytes(decoded.meta.event_id).to_string();
        event_ids
            .entry(event_id.clone())
            .or_default()
            .push((topics.label(*partition), *offset));
        sequences.push(decoded.meta.sequence);
        let (trace, upcast) = engine
            .registry
            .upcast_traced(&decoded.type_url, &decoded.payload);
        let steps = trace
            .iter()
            .map(|step| Step {
                message: step.name.clone(),
                version: message_version(&step.name),
                payload: payload_json(pool, &step.name, &step.encoded),
            })
            .collect();
        let mut entry = TimelineEvent {
            topic: topics.topic_of(*partition).to_string(),
            partition: topics.partition_of(*partition),
            offset: *offset,
            occurred_at: Value::Timestamp(decoded.meta.occurred_at_micros).to_string(),
            sequence: decoded.meta.sequence,
            event_id,
            type_url: decoded.type_url.clone(),
            version: message_version(&decoded.type_url),
            steps,
            error: None,
            projections: Vec::new(),
        };
        let payload = match upcast {
            Ok(p) => p,
            Err(e) => {
                entry.error = Some(e.to_string());
                events.push(entry);
                continue;
            }
        };
        let event = Event {
            meta: &decoded.meta,
            payload: &payload,
        };
        for (projection, store) in options.projections.iter().zip(stores.iter_mut()) {
            projection.apply(&event, &mut scratch);
            if let Some(reason) = scratch.take_refusal() {
                entry.error = Some(format!(
                    "projection {} refused the event: {reason}",
                    projection.name()
                ));
                continue;
            }
            let specs = projection.tables();
            let changes: Vec<Change> = scratch.drain().collect();
            let described = changes.iter().map(|c| describe_change(specs, c)).collect();
            let touched: BTreeSet<(usize, Vec<Value>)> = changes
                .iter()
                .map(|c| (c.table(), change_key(specs, c)))
                .collect();
            let at = LogicalTime::of(&decoded.meta);
            for change in changes {
                store
                    .apply(specs, change, at)
                    .map_err(|e| EngineError::Projection {
                        projection: projection.name().to_string(),
                        reason: format!("{} at offset {offset}: {e}", topics.label(*partition)),
                    })?;
            }
            let rows = touched
                .into_iter()
                .map(|(table, key)| {
                    let spec = &specs[table];
                    RowAfter {
                        table: spec.name.to_string(),
                        key: key_text(&key),
                        row: store
                            .table(table)
                            .get(&key)
                            .and_then(|r| r.as_ref())
                            .map(|r| row_json(spec, r)),
                    }
                })
                .collect();
            entry.projections.push(ProjectionEffect {
                projection: projection.name().to_string(),
                changes: described,
                rows,
            });
        }
        events.push(entry);
    }

    // 3. Check.
    let sequence = check_sequence(&sequences, event_ids);
    let comparisons = compare_with_live(engine, &options.projections, &stores).await?;
    let scratch_schema = if options.scratch {
        Some(write_scratch(engine, options, &stores).await?)
    } else {
        None
    };
    Ok(Timeline {
        topics: engine.topics.names().to_vec(),
        aggregate_id: options.aggregate_id.clone(),
        read,
        events,
        sequence,
        comparisons,
        scratch_schema,
    })
}

/// A record read for the aggregate: its partition id among the build's topics, and the record.
struct ReadRecord {
    partition: i32,
    record: envelope::OwnedRecord,
}

impl ReadRecord {
    fn decode(
        &self,
        framing: &envelope::Framing,
    ) -> std::result::Result<envelope::Decoded, envelope::FramingError> {
        let mut decoded = envelope::Decoded::default();
        self.record
            .with_raw(|raw| framing.decode_into(raw, self.partition, &mut decoded))?;
        Ok(decoded)
    }
}

type Records = Vec<ReadRecord>;

/// Which ranges to read: the index's spans and, past its coverage, the tail of each partition the
/// aggregate can be in (in every topic); without an index, those partitions from their start.
pub fn plan_ranges(
    locate: Locate,
    aggregate_id: &str,
    located: &Located,
    topics: &Topics,
    start: &BTreeMap<i32, i64>,
    end: &BTreeMap<i32, i64>,
) -> (String, Vec<RangeRead>) {
    let mut partitions: BTreeSet<i32> = match locate {
        Locate::ScanAll => end.keys().copied().collect(),
        Locate::Partitioner(p) => (0..topics.len())
            .filter_map(|index| {
                let count = end.range(Topics::ids_of_topic(index)).count() as i32;
                (count > 0).then(|| topics.id(index, p.partition(aggregate_id.as_bytes(), count)))
            })
            .collect(),
    };
    let indexed = !located.covered_through.is_empty();
    let mut ranges = Vec::new();
    if indexed {
        for span in &located.spans {
            partitions.insert(span.partition);
            ranges.push(RangeRead::of(
                topics,
                span.partition,
                span.first,
                span.last + 1,
            ));
        }
    }
    for &p in &partitions {
        let first = start.get(&p).copied().unwrap_or(0);
        let last = end.get(&p).copied().unwrap_or(0);
        let from = if indexed {
            located.covered_through.get(&p).copied().unwrap_or(first)
        } else {
            first
        };
        ranges.push(RangeRead::of(topics, p, from.max(first), last));
    }
    ranges.retain(|r| r.from < r.to);
    ranges.sort_by_key(|r| (r.id, r.from));
    let how = match (indexed, locate) {
        (true, Locate::ScanAll) => "aggregate index, then every partition past its coverage".into(),
        (true, Locate::Partitioner(p)) => format!(
            "aggregate index, then past its coverage the partition {} picks",
            p.librdkafka_name()
        ),
        (false, Locate::ScanAll) => "scan of every partition (no aggregate index)".into(),
        (false, Locate::Partitioner(p)) => format!(
            "the partition {} picks for the key (no aggregate index: run a rebuild to record one)",
            p.librdkafka_name()
        ),
    };
    (how, ranges)
}

fn read_aggregate(
    kafka: &KafkaSettings,
    topics: &Topics,
    framing: &envelope::Framing,
    aggregate_id: &str,
    locate: Locate,
    located: &Located,
) -> Result<(Records, String, Vec<RangeRead>, u64)> {
    let consumer = kafka.consumer("reproject-replay")?;
    let partitions = kafka.partitions(&consumer, topics)?;
    let bounds = kafka.bounds(&consumer, topics, &partitions)?;
    let (how, ranges) = plan_ranges(
        locate,
        aggregate_id,
        located,
        topics,
        &bounds.start,
        &bounds.end,
    );
    let mut records = Vec::new();
    let mut scanned = 0;
    let mut seen = BTreeSet::new();
    // One pass per range of the same partition (a span, then the unindexed tail); each pass reads
    // all its partitions at once.
    let mut passes: Vec<BTreeMap<i32, RangeRead>> = Vec::new();
    for range in &ranges {
        match passes.iter_mut().find(|p| !p.contains_key(&range.id)) {
            Some(pass) => {
                pass.insert(range.id, range.clone());
            }
            None => passes.push([(range.id, range.clone())].into()),
        }
    }
    for pass in &passes {
        scanned += read_ranges(kafka, &consumer, topics, pass, |partition, raw| {
            let matches = match raw.key {
                Some(k) if framing.key_is_aggregate_id() => k == aggregate_id.as_bytes(),
                // An unkeyed record, or one keyed otherwise, is only ours if its framing says
                // so.
                _ => {
                    let mut decoded = envelope::Decoded::default();
                    framing.decode_into(&raw, partition, &mut decoded).is_ok()
                        && decoded.meta.aggregate_id == aggregate_id
                }
            };
            if matches && seen.insert((partition, raw.offset)) {
                records.push(ReadRecord {
                    partition,
                    record: envelope::OwnedRecord::of(&raw),
                });
            }
        })?;
    }
    records.sort_by_key(|r| (r.partition, r.record.offset));
    Ok((records, how, ranges, scanned))
}

/// Read `from..to` of every partition in `ranges` (one range per partition) at once, handing each
/// record to `on_record`. Returns the records read.
fn read_ranges(
    kafka: &KafkaSettings,
    consumer: &BaseConsumer,
    topics: &Topics,
    ranges: &BTreeMap<i32, RangeRead>,
    mut on_record: impl FnMut(i32, envelope::RawRecord<'_>),
) -> Result<u64> {
    let starts = ranges.iter().map(|(&p, r)| (p, r.from)).collect();
    kafka.assign(consumer, topics, &starts)?;
    let mut open: BTreeSet<i32> = ranges.keys().copied().collect();
    let mut read = 0;
    let mut last_progress = Instant::now();
    let describe = || {
        ranges
            .values()
            .map(RangeRead::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    };
    while !open.is_empty() {
        match consumer.poll(Duration::from_millis(50)) {
            Some(Ok(message)) => {
                last_progress = Instant::now();
                let Some(partition) = topics.id_of(message.topic(), message.partition()) else {
                    continue;
                };
                let offset = message.offset();
                let Some(range) = ranges.get(&partition) else {
                    continue;
                };
                if offset < range.to {
                    read += 1;
                    let headers = crate::source::record_headers(&message);
                    on_record(partition, crate::source::raw_record(&message, &headers));
                }
                if offset + 1 >= range.to {
                    open.remove(&partition);
                }
            }
            Some(Err(error)) => {
                if last_progress.elapsed() > Duration::from_secs(30) {
                    return Err(SourceError::Kafka {
                        brokers: kafka.brokers.clone(),
                        context: format!("reading {}", describe()),
                        source: Box::new(error),
                    }
                    .into());
                }
            }
            None => {
                // Transaction markers at the end of a range are never delivered: the fetch position
                // says whether the range is done.
                for (p, position) in kafka.fetch_positions(consumer, topics) {
                    if ranges.get(&p).is_some_and(|r| position >= r.to) {
                        open.remove(&p);
                    }
                }
                if !open.is_empty() && last_progress.elapsed() > Duration::from_secs(30) {
                    return Err(EngineError::Projection {
                        projection: "-".into(),
                        reason: format!("no records for 30s while reading {}", describe()),
                    });
                }
            }
        }
    }
    Ok(read)
}

fn check_sequence(
    sequences: &[u64],
    event_ids: BTreeMap<String, Vec<(String, i64)>>,
) -> SequenceCheck {
    let mut check = SequenceCheck::default();
    let mut counts: BTreeMap<u64, u32> = BTreeMap::new();
    for &s in sequences {
        *counts.entry(s).or_default() += 1;
    }
    check.repeats = counts
        .iter()
        .filter(|(_, &n)| n > 1)
        .map(|(&s, _)| s)
        .collect();
    let mut expected = 1;
    for &s in counts.keys() {
        if s > expected {
            check.gaps.push((expected, s - 1));
        }
        expected = s + 1;
    }
    check.duplicate_event_ids = event_ids
        .into_iter()
        .filter(|(_, at)| at.len() > 1)
        .collect();
    check
}

async fn compare_with_live<E: Send + Sync + 'static>(
    engine: &Engine<E>,
    projections: &[DynProjection<E>],
    stores: &[RowStore],
) -> Result<Vec<RowComparison>> {
    let mut conn = sqlx::PgConnection::connect(&engine.database_url)
        .await
        .context(|| "connecting to compare with the live views".into())?;
    let mut out = Vec::new();
    for (projection, store) in projections.iter().zip(stores) {
        let active = engine.catalog.active_build(projection.name()).await?;
        for (index, spec) in projection.tables().iter().enumerate() {
            let keys: Vec<Vec<Value>> = store.table(index).keys().map(|k| k.to_vec()).collect();
            if keys.is_empty() {
                continue;
            }
            let view = qualified(&engine.view_schema, spec.name);
            let view_label = format!("{}.{}", engine.view_schema, spec.name);
            let live_rows = match &active {
                // The live view is another version's: its columns may differ from this code's.
                Some(build) if build.version == projection.version() => {
                    let mut tx = conn
                        .begin()
                        .await
                        .context(|| "starting the comparison".into())?;
                    writer::create_key_table(&mut tx, &view, "rp_replay_keys", spec).await?;
                    let rows =
                        writer::rows_by_key(&mut tx, &view, "rp_replay_keys", spec, &keys).await?;
                    tx.commit()
                        .await
                        .context(|| "ending the comparison".into())?;
                    Some(rows)
                }
                _ => None,
            };
            let Some(live_rows) = live_rows else {
                return Err(EngineError::Projection {
                    projection: projection.name().to_string(),
                    reason: format!(
                        "no live build of version {} to compare with (active: {}); the computed rows are in the timeline",
                        projection.version(),
                        active
                            .map(|b| format!("build {} of version {}", b.build_id, b.version))
                            .unwrap_or_else(|| "none".into())
                    ),
                });
            };
            let live: BTreeMap<&[Value], &Vec<Value>> =
                live_rows.iter().map(|r| (&r[..spec.key_len], r)).collect();
            for key in &keys {
                let computed = store.table(index).get(key).and_then(|r| r.as_ref());
                let live_row = live.get(key.as_slice()).copied();
                out.push(compare_row(
                    projection.name(),
                    &view_label,
                    spec,
                    key,
                    computed,
                    live_row,
                ));
            }
        }
    }
    Ok(out)
}

fn compare_row(
    projection: &str,
    view: &str,
    spec: &TableSpec,
    key: &[Value],
    computed: Option<&Vec<Value>>,
    live: Option<&Vec<Value>>,
) -> RowComparison {
    let mut differences = Vec::new();
    let show = |row: Option<&Vec<Value>>, i: usize| {
        row.map(|r| r[i].to_string())
            .unwrap_or_else(|| "(no row)".into())
    };
    for (i, column) in spec.columns.iter().enumerate() {
        let agree = match (computed.map(|r| &r[i]), live.map(|r| &r[i])) {
            (Some(a), Some(b)) => a.agrees_with(b),
            (a, b) => a == b,
        };
        if !agree {
            differences.push((column.name.to_string(), show(computed, i), show(live, i)));
        }
    }
    let verdict = if !spec.per_aggregate {
        Verdict::SharedRow
    } else if differences.is_empty() {
        Verdict::Agree
    } else {
        Verdict::Differ
    };
    if verdict == Verdict::SharedRow {
        differences.clear();
    }
    RowComparison {
        projection: projection.to_string(),
        view: view.to_string(),
        key: key_text(key),
        verdict,
        differences,
        computed: computed.map(|r| row_json(spec, r)),
        live: live.map(|r| row_json(spec, r)),
    }
}

/// Create `rp_replay_<projection>` afresh with the projection's tables and the computed rows.
async fn write_scratch<E: Send + Sync + 'static>(
    engine: &Engine<E>,
    options: &TraceOptions<E>,
    stores: &[RowStore],
) -> Result<String> {
    let mut conn = sqlx::PgConnection::connect(&engine.database_url)
        .await
        .context(|| "connecting to write the scratch schema".into())?;
    let mut schemas = Vec::new();
    for (projection, store) in options.projections.iter().zip(stores) {
        let schema = format!("rp_replay_{}", projection.name());
        let tables = BuildTables {
            build_id: 0,
            projection: projection.name(),
            version: projection.version(),
            schema: &schema,
            specs: projection.tables(),
        };
        let sql = engine
            .schemas
            .load(projection.name(), projection.version())?;
        writer::drop_schema(&mut conn, &schema).await?;
        writer::create_tables(&mut conn, tables, &sql).await?;
        let mut tx = conn
            .begin()
            .await
            .context(|| format!("starting to fill {schema}"))?;
        writer::bulk_load(&mut tx, tables, store, None).await?;
        tx.commit()
            .await
            .context(|| format!("committing {schema}"))?;
        schemas.push(schema);
    }
    Ok(schemas.join(", "))
}

/// A stored or upcast payload as canonical protobuf JSON (field names as in the .proto files).
fn payload_json(pool: &DescriptorPool, name: &str, encoded: &[u8]) -> serde_json::Value {
    let Some(descriptor) = pool.get_message_by_name(message_name(name)) else {
        return serde_json::Value::String(format!(
            "({} bytes of {name}: no descriptor)",
            encoded.len()
        ));
    };
    let options = SerializeOptions::new()
        .use_proto_field_name(true)
        .stringify_64_bit_integers(false);
    match DynamicMessage::decode(descriptor, encoded) {
        Ok(message) => message
            .serialize_with_options(serde_json::value::Serializer, &options)
            .unwrap_or_else(|e| serde_json::Value::String(format!("(not representable: {e})"))),
        Err(e) => serde_json::Value::String(format!("(undecodable {name}: {e})")),
    }
}

fn json_value(value: &Value) -> serde_json::Value {
    match value {
        Value::Null => serde_json::Value::Null,
        Value::BigInt(v) => (*v).into(),
        Value::Text(s) => s.as_str().into(),
        Value::Bool(b) => (*b).into(),
        Value::Integer(v) => (*v).into(),
        Value::Double(v) => serde_json::Number::from_f64(v.0)
            .map(serde_json::Value::Number)
            .unwrap_or_else(|| value.to_string().into()),
        Value::Json(text) => serde_json::from_str(text).unwrap_or_else(|_| text.as_str().into()),
        // Exact decimals stay strings, as protobuf's JSON writes 64-bit integers: a JSON number
        // would pass through a float in most readers.
        Value::Timestamp(_)
        | Value::Date(_)
        | Value::Bytes(_)
        | Value::Numeric(_)
        | Value::Uuid(_) => value.to_string().into(),
    }
}

fn row_json(spec: &TableSpec, row: &[Value]) -> serde_json::Map<String, serde_json::Value> {
    spec.columns
        .iter()
        .zip(row)
        .map(|(c, v)| (c.name.to_string(), json_value(v)))
        .collect()
}

fn key_text(key: &[Value]) -> String {
    key.iter()
        .map(|v| v.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

fn change_key(specs: &[TableSpec], change: &Change) -> Vec<Value> {
    let key_len = specs.get(change.table()).map_or(0, |s| s.key_len);
    change.key(key_len).to_vec()
}

/// One change as a line a person reads: `order_summary[abc] set status = "paid"`.
pub fn describe_change(specs: &[TableSpec], change: &Change) -> String {
    let Some(spec) = specs.get(change.table()) else {
        return format!("{change:?}");
    };
    let column = |i: &usize| spec.columns.get(*i).map_or("?", |c| c.name);
    let target = format!("{}[{}]", spec.name, key_text(&change_key(specs, change)));
    match change {
        Change::Upsert { row, .. } => format!(
            "{target} upsert {}",
            spec.columns
                .iter()
                .zip(row)
                .skip(spec.key_len)
                .map(|(c, v)| format!("{} = {v}", c.name))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        Change::Set { columns, .. } => format!(
            "{target} set {}",
            columns
                .iter()
                .map(|(i, v)| format!("{} = {v}", column(i)))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        Change::Add {
            column: i, delta, ..
        } => format!("{target} add {} {delta:+}", column(i)),
        Change::Min {
            column: i, value, ..
        } => format!("{target} {} = least(it, {value})", column(i)),
        Change::Max {
            column: i, value, ..
        } => format!("{target} {} = greatest(it, {value})", column(i)),
        Change::Delete { .. } => format!("{target} delete"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sink::aggregate_index::Span;

    fn bounds(n: i32, end: i64) -> (BTreeMap<i32, i64>, BTreeMap<i32, i64>) {
        (
            (0..n).map(|p| (p, 0)).collect(),
            (0..n).map(|p| (p, end)).collect(),
        )
    }

    #[test]
    fn without_an_index_one_partition_is_read_whole_or_every_partition_when_asked() {
        let (start, end) = bounds(4, 100);
        let p = Partitioner::Murmur2Random;
        let expected = p.partition(b"order-7", 4);
        let topics = Topics::new(["t"]).expect("topic");
        let (_, ranges) = plan_ranges(
            Locate::Partitioner(p),
            "order-7",
            &Located::default(),
            &topics,
            &start,
            &end,
        );
        assert_eq!(ranges, vec![RangeRead::of(&topics, expected, 0, 100)]);
        let (_, ranges) = plan_ranges(
            Locate::ScanAll,
            "order-7",
            &Located::default(),
            &topics,
            &start,
            &end,
        );
        assert_eq!(ranges.len(), 4);
    }

    #[test]
    fn with_an_index_only_the_recorded_span_and_the_unindexed_tail_are_read() {
        let (start, end) = bounds(4, 1_000);
        let p = Partitioner::ConsistentRandom;
        let partition = p.partition(b"order-7", 4);
        let located = Located {
            spans: vec![Span {
                partition,
                first: 10,
                last: 20,
            }],
            covered_through: (0..4).map(|p| (p, 900)).collect(),
        };
        let topics = Topics::new(["t"]).expect("topic");
        let (_, ranges) = plan_ranges(
            Locate::Partitioner(p),
            "order-7",
            &located,
            &topics,
            &start,
            &end,
        );
        assert_eq!(
            ranges,
            vec![
                RangeRead::of(&topics, partition, 10, 21),
                RangeRead::of(&topics, partition, 900, 1_000)
            ]
        );
    }

    #[test]
    fn gaps_repeats_and_twice_seen_event_ids_are_reported() {
        let at = |offset| ("t/0".to_string(), offset);
        let ids: BTreeMap<String, Vec<(String, i64)>> = [
            ("a".to_string(), vec![at(1)]),
            ("b".to_string(), vec![at(2), at(9)]),
        ]
        .into();
        let check = check_sequence(&[1, 2, 2, 5, 6], ids);
        assert_eq!(check.gaps, vec![(3, 4)]);
        assert_eq!(check.repeats, vec![2]);
        assert_eq!(
            check.duplicate_event_ids,
            vec![("b".to_string(), vec![at(2), at(9)])]
        );
        assert!(check_sequence(&[1, 2, 3], BTreeMap::new()).is_clean());
    }
}
