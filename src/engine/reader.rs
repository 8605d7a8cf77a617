//! The reading half of the pipeline, on a thread of its own: poll Kafka, decode the envelope, upcast
//! the payload, and let every target projection turn the event into row changes. Batches go to the
//! writing half over a bounded channel, so a slow database pushes back on reading instead of
//! buffering the log in memory.
//!
//! Each target has its own positions: an event below a target's position for its partition was
//! already applied to that target and is skipped for it. That lets one read of the log serve builds
//! that stand at different places (after a crash, or when `run` follows several projections).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::consumer::BaseConsumer;
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::types::RDKafkaErrorCode;
use tokio::sync::mpsc;

use crate::envelope::{self, message_version};
use crate::projection::{ChangeLog, Changes, DynProjection, Event, LogicalTime};
use crate::sink::aggregate_index::AggregateIndex;
use crate::sink::catalog::Positions;
use crate::source::{KafkaSettings, SourceError, MAX_FETCH_BYTES};
use crate::upcast::Registry;

/// A record that cannot be turned into row changes, with where it is and who wanted it.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{topic}/{partition} at offset {offset}{typ}, read for {projections}: {reason}",
    typ = type_label(type_url, *version))]
pub struct BadRecord {
    /// What is wrong with it: `envelope`, `key`, `upcast` or `duplicate`.
    pub kind: BadKind,
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub type_url: Option<String>,
    pub version: Option<u32>,
    pub projections: String,
    pub reason: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BadKind {
    /// The bytes are not an event envelope, or the envelope lacks a required field.
    Envelope,
    /// The record has no key, or its key is not the envelope's aggregate id.
    Key,
    /// The payload's type is unknown, it does not decode, or an upcaster step refused it.
    Upcast,
    /// An event id already applied a short while before (a producer's retry, usually).
    Duplicate,
}

impl BadKind {
    pub fn as_str(self) -> &'static str {
        match self {
            BadKind::Envelope => "envelope",
            BadKind::Key => "key",
            BadKind::Upcast => "upcast",
            BadKind::Duplicate => "duplicate",
        }
    }
}

/// A bad record kept instead of stopping (the `dead-letter` policy): its bytes and coordinates, the
/// error, and which of the reader's targets it was meant for.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    pub record: BadRecord,
    pub key: Option<Vec<u8>>,
    pub value: Vec<u8>,
    pub event_id: Option<[u8; 16]>,
    pub targets: Vec<usize>,
}

impl DeadLetter {
    pub fn stored(&self) -> crate::sink::dead_letters::NewDeadLetter<'_> {
        crate::sink::dead_letters::NewDeadLetter {
            topic: &self.record.topic,
            partition: self.record.partition,
            offset: self.record.offset,
            kind: self.record.kind.as_str(),
            type_url: self.record.type_url.as_deref(),
            version: self.record.version,
            reason: &self.record.reason,
            key: self.key.as_deref(),
            value: &self.value,
            event_id: self.event_id,
        }
    }
}

/// Under the dead-letter policy, refuse to go on once a build would hold more than its budget:
/// `held` are stored already, `new` are about to be.
pub fn check_dead_letter_budget(
    policy: super::BadRecordPolicy,
    projection: &str,
    build_id: i64,
    held: u64,
    new: &[&DeadLetter],
) -> Result<(), super::EngineError> {
    if let (super::BadRecordPolicy::DeadLetter { budget }, Some(last)) = (policy, new.last()) {
        if held + new.len() as u64 > budget {
            return Err(super::EngineError::DeadLetterBudget {
                projection: projection.to_string(),
                build_id,
                budget,
                last: last.record.to_string(),
            });
        }
    }
    Ok(())
}

/// The event ids of the last records applied in each partition, to recognise one that comes again:
/// a producer that retried a send writes the same event twice, into the same partition (same key),
/// close together. Bounded: ids older than the window are forgotten, so a copy written further
/// apart than that is not recognised.
///
/// Per partition because records arrive in long runs of one partition: a window that small stays
/// in the CPU's cache, where one big window cost the replay a cache miss or three per record (18%
/// of its time, measured). Ids are kept as 64 bits (both halves of the UUID folded together; random
/// UUIDs collide there about once in 10^11 windows).
pub struct RecentEventIds {
    partitions: rustc_hash::FxHashMap<i32, Window>,
    per_partition: usize,
}

struct Window {
    order: std::collections::VecDeque<u64>,
    /// Folded id -> offset.
    seen: rustc_hash::FxHashMap<u64, i64>,
}

/// Records per partition whose event ids are remembered: about 200 KB per partition.
pub const DUPLICATE_WINDOW: usize = 8_192;

fn folded_id(event_id: &[u8; 16]) -> u64 {
    let id = u128::from_le_bytes(*event_id);
    (id as u64) ^ ((id >> 64) as u64)
}

impl RecentEventIds {
    pub fn new(per_partition: usize) -> RecentEventIds {
        RecentEventIds {
            partitions: rustc_hash::FxHashMap::default(),
            per_partition,
        }
    }

    /// The offset at which this event was applied before in `partition`, if it was lately.
    pub fn seen_at(&self, event_id: &[u8; 16], partition: i32) -> Option<i64> {
        self.partitions
            .get(&partition)?
            .seen
            .get(&folded_id(event_id))
            .copied()
    }

    pub fn remember(&mut self, event_id: &[u8; 16], partition: i32, offset: i64) {
        let capacity = self.per_partition;
        // Full size from the start: growing on the way costs rehashes on the reader's hot path.
        let window = self.partitions.entry(partition).or_insert_with(|| Window {
            order: std::collections::VecDeque::with_capacity(capacity + 1),
            seen: rustc_hash::FxHashMap::with_capacity_and_hasher(capacity + 1, Default::default()),
        });
        let id = folded_id(event_id);
        if let std::collections::hash_map::Entry::Vacant(slot) = window.seen.entry(id) {
            slot.insert(offset);
            window.order.push_back(id);
            if window.order.len() > capacity {
                if let Some(old) = window.order.pop_front() {
                    window.seen.remove(&old);
                }
            }
        }
    }
}

fn type_label(type_url: &Option<String>, version: Option<u32>) -> String {
    match (type_url, version) {
        (Some(url), Some(v)) => format!(" (type {url}, version {v})"),
        (Some(url), None) => format!(" (type {url}, no version in its name)"),
        _ => String::new(),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    // Boxed: a record's coordinates and reason, or a Kafka error, would make every reader Result large.
    #[error("bad record: {0}")]
    BadRecord(Box<BadRecord>),
    #[error(transparent)]
    Source(Box<SourceError>),
    #[error("{topic}/{partition}: the broker no longer has offset {offset} (retention or compaction removed it); \
             rebuild the projection, with --allow-truncated-history if the loss is acceptable")]
    OffsetGone {
        topic: String,
        partition: i32,
        offset: i64,
    },
    #[error("no progress reading {topic} for {seconds}s: {last_error}")]
    Stalled {
        topic: String,
        seconds: u64,
        last_error: String,
    },
}

impl From<BadRecord> for ReadError {
    fn from(record: BadRecord) -> Self {
        ReadError::BadRecord(Box::new(record))
    }
}

impl From<SourceError> for ReadError {
    fn from(e: SourceError) -> Self {
        ReadError::Source(Box::new(e))
    }
}

/// One projection the reader feeds, and the position it stands at.
#[derive(Clone)]
pub struct Target<E> {
    pub projection: DynProjection<E>,
    pub positions: Positions,
}

impl<E> Target<E> {
    /// Whether this target still needs the record at `offset` (it may stand past it).
    fn wants(&self, partition: i32, offset: i64) -> bool {
        self.positions.get(&partition).is_none_or(|&p| offset >= p)
    }
}

/// Where a record was read, to name it in errors.
pub struct Coordinates<'a> {
    pub topic: &'a str,
    pub partition: i32,
    pub offset: i64,
    /// The projections that wanted it, for the error.
    pub projections: &'a str,
}

impl Coordinates<'_> {
    pub fn bad(&self, kind: BadKind, type_url: Option<&str>, reason: String) -> BadRecord {
        super::metrics::error("bad_record");
        BadRecord {
            kind,
            topic: self.topic.to_string(),
            partition: self.partition,
            offset: self.offset,
            type_url: type_url.map(str::to_string),
            version: type_url.and_then(message_version),
            projections: self.projections.to_string(),
            reason,
        }
    }

    /// The record's envelope, checked: it decodes, and the record's key is its aggregate id.
    pub fn decode(&self, key: Option<&[u8]>, value: &[u8]) -> Result<envelope::Decoded, BadRecord> {
        let mut decoded = envelope::Decoded::default();
        self.decode_into(key, value, &mut decoded)?;
        Ok(decoded)
    }

    /// [`Coordinates::decode`] into `decoded`, reusing its buffers.
    pub fn decode_into(
        &self,
        key: Option<&[u8]>,
        value: &[u8],
        decoded: &mut envelope::Decoded,
    ) -> Result<(), BadRecord> {
        envelope::decode_into(value, self.partition, self.offset, decoded)
            .map_err(|e| self.bad(BadKind::Envelope, None, e.to_string()))?;
        if key != Some(decoded.meta.aggregate_id.as_bytes()) {
            let reason = match key {
                None => format!(
                    "the record has no key; its envelope's aggregate id is {:?}",
                    decoded.meta.aggregate_id
                ),
                Some(key) => format!(
                    "the record's key {:?} is not its envelope's aggregate id {:?}",
                    String::from_utf8_lossy(key),
                    decoded.meta.aggregate_id
                ),
            };
            return Err(self.bad(BadKind::Key, Some(&decoded.type_url), reason));
        }
        Ok(())
    }

    /// The payload upcast to the latest version.
    pub fn upcast<E: 'static>(
        &self,
        registry: &Registry<E>,
        decoded: &envelope::Decoded,
    ) -> Result<E, BadRecord> {
        registry
            .upcast(&decoded.type_url, &decoded.payload)
            .map_err(|e| self.bad(BadKind::Upcast, Some(&decoded.type_url), e.to_string()))
    }
}

/// An event id as people write UUIDs.
pub fn event_id_text(id: &[u8; 16]) -> String {
    let h: String = id.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    )
}

#[derive(Clone)]
pub struct ReaderConfig {
    pub topic: String,
    /// Stop once every partition has reached this end (the replay's snapshot of the log end).
    pub stop_at: Option<Positions>,
    /// With `stop_at`: apply nothing at or past a partition's end (records there are read and
    /// dropped), so that every target ends exactly at `stop_at` (lining two builds up to verify them).
    pub stop_exactly: bool,
    /// Shared so that `reproject tune --batch-events` can change it while the reader runs.
    pub max_batch_events: Arc<std::sync::atomic::AtomicUsize>,
    pub max_batch_wait: Duration,
    /// How often to ask the brokers where the log ends (for lag). None: never.
    pub log_end_every: Option<Duration>,
    /// Give up after this long without reading anything while the brokers report errors.
    pub stall_timeout: Duration,
    /// Record where each aggregate's events lie (for `replay`), handed over with the last batch.
    pub index_aggregates: bool,
    /// Give up the aggregate index (with a warning) once it holds more than this many bytes: under
    /// a memory budget it must not grow with the number of aggregates. `replay` then falls back to
    /// the partitioner.
    pub aggregate_index_max_bytes: Option<usize>,
    /// Cap librdkafka's prefetch queue (and a fetch response) at this many bytes; None keeps the
    /// consumer's large default, tuned for speed. A setting the user gave wins.
    pub prefetch_max_bytes: Option<usize>,
    /// Keep bad records in the batch's dead letters and go on (true), or stop at the first (false).
    pub dead_letters: bool,
    /// Time the decoding, upcasting and projecting of every record (`estimate`: its windows are
    /// too short for wall time to mean anything). Costs a clock read per record.
    pub measure_processing: bool,
}

/// What one batch did to each target, and where the reader stands after it.
#[derive(Default)]
pub struct Batch {
    /// Per target, in target order, each event's changes with its logical time.
    pub changes: Vec<ChangeLog>,
    /// Next offset to read per partition, after this batch (the reader's, not a target's).
    pub next: Positions,
    pub events: u64,
    pub bytes: u64,
    /// The log end, when it was asked for with this batch.
    pub log_end: Option<Positions>,
    /// True on the last batch of a bounded read.
    pub done: bool,
    /// On the last batch, when asked for: where each aggregate's events lie.
    pub aggregates: Option<AggregateIndex>,
    /// Bad records passed over under the dead-letter policy.
    pub dead_letters: Vec<DeadLetter>,
    /// On the last batch of a bounded read: what was received against the offsets read.
    pub source_checks: Option<SourceChecks>,
    /// With `measure_processing`: time spent decoding, upcasting and projecting this batch.
    pub processing: Duration,
}

/// Source-side checks of a bounded read: per partition the records received against the range of
/// offsets read (a broker legitimately skips transaction markers and compacted records; anything
/// else missing is lost data), and the aggregates' sequence numbers, when the index was kept.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct SourceChecks {
    pub partitions: usize,
    pub records: i64,
    pub offsets: i64,
    pub offsets_skipped: i64,
    /// Partitions with offsets not received: partition -> how many.
    pub skipped_by_partition: BTreeMap<i32, i64>,
    /// Aggregates whose sequences were checked; None when the aggregate index was given up.
    pub aggregates: Option<u64>,
    pub sequence_gaps: u64,
    pub sequence_repeats: u64,
    pub gap_examples: Vec<String>,
    /// Events with sequence number 1: aggregates that began in the range read.
    pub aggregates_started: u64,
}

impl SourceChecks {
    /// Add the checks of another reader's partitions (readers never share a partition).
    pub fn merge(&mut self, other: SourceChecks) {
        self.partitions += other.partitions;
        self.records += other.records;
        self.offsets += other.offsets;
        self.offsets_skipped += other.offsets_skipped;
        self.skipped_by_partition.extend(other.skipped_by_partition);
        self.aggregates = self.aggregates.zip(other.aggregates).map(|(a, b)| a + b);
        self.sequence_gaps += other.sequence_gaps;
        self.sequence_repeats += other.sequence_repeats;
        self.gap_examples.extend(other.gap_examples);
        self.gap_examples
            .truncate(crate::sink::aggregate_index::GAP_EXAMPLES);
        self.aggregates_started += other.aggregates_started;
    }

    fn of(
        start: &Positions,
        next: &Positions,
        received: &[i64],
        index: Option<&AggregateIndex>,
        aggregates_started: u64,
    ) -> SourceChecks {
        let mut checks = SourceChecks {
            partitions: next.len(),
            aggregates_started,
            ..Default::default()
        };
        for (&p, &end) in next {
            let from = start.get(&p).copied().unwrap_or(end);
            let got = usize::try_from(p)
                .ok()
                .and_then(|i| received.get(i))
                .copied()
                .unwrap_or(0);
            let range = (end - from).max(0);
            checks.records += got;
            checks.offsets += range;
            if range > got {
                checks.offsets_skipped += range - got;
                checks.skipped_by_partition.insert(p, range - got);
            }
        }
        if let Some(index) = index {
            checks.aggregates = Some(index.len() as u64);
            checks.sequence_gaps = index.sequence_gaps;
            checks.sequence_repeats = index.sequence_repeats;
            checks.gap_examples = index.gap_examples.clone();
        }
        checks
    }
}

/// The threads of readers that share the partitions out; see [`spawn_split`].
pub struct ReaderThreads(Vec<std::thread::JoinHandle<()>>);

impl ReaderThreads {
    /// How many last batches (`done`) a bounded read ends with: one per reader.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn join(self) {
        for handle in self.0 {
            let _ = handle.join();
        }
    }
}

/// Start up to `readers` readers (never more than there are partitions), each on a consumer of its
/// own and every `readers`-th partition, sending batches into one channel. One reader thread decoding,
/// upcasting and projecting every record is what bounds a replay (the fold, on its own thread, has
/// time to spare): sharing the partitions out lets the reading use every core. Each partition stays
/// with one reader, so its records still arrive in order; records of different partitions were never
/// ordered among themselves.
///
/// Each thread stops when its share of `stop_at` is reached, when `stop` is set, when the receiver is
/// dropped, or at its first error (which it sends). A bounded read ends with one batch marked `done`
/// per reader, each carrying its own partitions'
/// aggregate index and source checks (see [`AggregateIndex::merge`], [`SourceChecks::merge`]).
/// Under a limit on the aggregate index's bytes or on the prefetch queue, each reader gets its share.
pub fn spawn_split<E: Send + Sync + 'static>(
    settings: KafkaSettings,
    registry: Arc<Registry<E>>,
    targets: Vec<Target<E>>,
    config: ReaderConfig,
    stop: Arc<AtomicBool>,
    capacity: usize,
    readers: usize,
) -> (mpsc::Receiver<Result<Batch, ReadError>>, ReaderThreads) {
    let partitions: std::collections::BTreeSet<i32> = targets
        .iter()
        .flat_map(|t| t.positions.keys().copied())
        .collect();
    let partitions: Vec<i32> = partitions.into_iter().collect();
    let readers = readers.clamp(1, partitions.len().max(1));
    let (tx, batches) = mpsc::channel(capacity);
    let handles = (0..readers)
        .map(|share| {
            // One reader takes everything as given (a stop position may name a partition the
            // targets do not have yet).
            let mine = |p: &i32| {
                readers == 1
                    || partitions
                        .binary_search(p)
                        .is_ok_and(|i| i % readers == share)
            };
            let only_mine = |positions: &Positions| -> Positions {
                positions
                    .iter()
                    .filter(|(p, _)| mine(p))
                    .map(|(p, o)| (*p, *o))
                    .collect()
            };
            let targets = targets
                .iter()
                .map(|t| Target {
                    projection: t.projection.clone(),
                    positions: only_mine(&t.positions),
                })
                .collect();
            let mut config = config.clone();
            config.stop_at = config.stop_at.as_ref().map(only_mine);
            config.aggregate_index_max_bytes =
                config.aggregate_index_max_bytes.map(|b| b / readers);
            // Each consumer fetches ahead on its own: their queues together stay what one had.
            config.prefetch_max_bytes = match config.prefetch_max_bytes {
                Some(bytes) => Some(bytes / readers),
                None if readers > 1 => Some(crate::source::PREFETCH_BYTES / readers),
                None => None,
            };
            spawn_into(
                settings.clone(),
                registry.clone(),
                targets,
                config,
                stop.clone(),
                tx.clone(),
                share,
            )
        })
        .collect();
    (batches, ReaderThreads(handles))
}

fn spawn_into<E: Send + Sync + 'static>(
    settings: KafkaSettings,
    registry: Arc<Registry<E>>,
    targets: Vec<Target<E>>,
    config: ReaderConfig,
    stop: Arc<AtomicBool>,
    tx: mpsc::Sender<Result<Batch, ReadError>>,
    share: usize,
) -> std::thread::JoinHandle<()> {
    std::thread::Builder::new()
        .name(format!("reproject-reader-{share}"))
        .spawn(move || {
            if let Err(e) = read(&settings, &registry, &targets, &config, &stop, &tx) {
                let _ = tx.blocking_send(Err(e));
            }
        })
        .unwrap_or_else(|e| panic!("cannot start the reader thread: {e}"))
}

fn read<E: 'static>(
    settings: &KafkaSettings,
    registry: &Registry<E>,
    targets: &[Target<E>],
    config: &ReaderConfig,
    stop: &AtomicBool,
    tx: &mpsc::Sender<Result<Batch, ReadError>>,
) -> Result<(), ReadError> {
    let topic = config.topic.as_str();
    let consumer: BaseConsumer = match config.prefetch_max_bytes {
        Some(bytes) => {
            let mut capped = settings.clone();
            let kbytes = (bytes / 1024).max(1024);
            // Put first so that a property the user set (applied in order, last wins) still wins.
            capped.properties.splice(
                0..0,
                [
                    ("queued.max.messages.kbytes".to_string(), kbytes.to_string()),
                    // Never above the consumer's own fetch limit, which its receive limit allows.
                    (
                        "fetch.max.bytes".to_string(),
                        (kbytes * 1024).min(MAX_FETCH_BYTES).to_string(),
                    ),
                ],
            );
            capped.consumer("reproject")?
        }
        None => settings.consumer("reproject")?,
    };
    // Start each partition at the lowest position any target needs.
    let mut next: Positions = BTreeMap::new();
    for target in targets {
        for (&p, &o) in &target.positions {
            next.entry(p)
                .and_modify(|cur: &mut i64| *cur = (*cur).min(o))
                .or_insert(o);
        }
    }
    let reached = |next: &Positions| match &config.stop_at {
        Some(end) => end.iter().all(|(p, e)| next.get(p).is_some_and(|n| n >= e)),
        None => false,
    };
    let partitions: Vec<i32> = next.keys().copied().collect();
    let projections = targets
        .iter()
        .map(|t| t.projection.name())
        .collect::<Vec<_>>()
        .join(", ");
    if reached(&next) {
        let _ = tx.blocking_send(Ok(Batch {
            next,
            done: true,
            changes: vec![ChangeLog::default(); targets.len()],
            ..Batch::default()
        }));
        return Ok(());
    }
    settings.assign(&consumer, topic, &next)?;

    let mut scratch = Changes::default();
    // Every record is decoded into this one, reusing its strings and buffers.
    let mut decoded = envelope::Decoded::default();
    let mut recent = RecentEventIds::new(DUPLICATE_WINDOW);
    let mut aggregates = config.index_aggregates.then(AggregateIndex::default);
    if let Some(index) = aggregates.as_mut() {
        for (&p, &o) in &next {
            if o == 0 {
                index.read_from_start(p);
            }
        }
    }
    let read_from = next.clone();
    // Records received per partition (indexed by partition number), for the source checks.
    let mut received: Vec<i64> = Vec::new();
    let mut aggregates_started = 0u64;
    let mut batch_start = next.clone();
    let mut batch = Batch {
        changes: vec![ChangeLog::default(); targets.len()],
        ..Batch::default()
    };
    let mut batch_started = Instant::now();
    let mut last_log_end = Instant::now() - Duration::from_secs(3600);
    // Reading the clock for every record cost 2% of the replay: the time of the last progress is
    // only needed once errors start, so it is taken then.
    let mut last_progress = Instant::now();
    let mut progressed = false;
    let mut last_error: Option<String> = None;

    loop {
        if stop.load(Ordering::Relaxed) {
            return Ok(());
        }
        let polled = consumer.poll(Duration::from_millis(50));
        let polled_nothing = polled.is_none();
        let mut last_of_partition = false;
        match polled {
            None => {
                // Idle: a partition whose last records are transaction markers never delivers them,
                // so take the consumer's own fetch position as where it stands.
                if config.stop_at.is_some() {
                    for (p, o) in settings.fetch_positions(&consumer) {
                        if let Some(n) = next.get_mut(&p) {
                            *n = (*n).max(o);
                        }
                    }
                }
            }
            Some(Err(KafkaError::PartitionEOF(_))) => {}
            Some(Err(KafkaError::MessageConsumption(code)))
                if matches!(
                    code,
                    RDKafkaErrorCode::AutoOffsetReset | RDKafkaErrorCode::OffsetOutOfRange
                ) =>
            {
                // The error does not say which partition: find one whose position the log no longer has.
                let bounds = settings.bounds(&consumer, topic, &partitions)?;
                let (partition, offset) = next
                    .iter()
                    .find(|(p, o)| bounds.start.get(p).is_some_and(|s| **o < *s))
                    .map(|(p, o)| (*p, *o))
                    .unwrap_or((-1, -1));
                tracing::error!(
                    message = "offset out of range",
                    topic,
                    partition,
                    offset,
                    ?code
                );
                return Err(ReadError::OffsetGone {
                    topic: topic.into(),
                    partition,
                    offset,
                });
            }
            Some(Err(error)) => {
                // librdkafka retries broker and network failures itself; remember the error in case
                // nothing moves for too long.
                if progressed {
                    last_progress = Instant::now();
                    progressed = false;
                }
                super::metrics::error("kafka");
                if last_error.is_none() {
                    tracing::warn!(message = "Kafka reports an error; retrying", topic, %error);
                }
                last_error = Some(error.to_string());
            }
            Some(Ok(message))
                if config.stop_exactly
                    && config.stop_at.as_ref().is_some_and(|end| {
                        end.get(&message.partition())
                            .is_none_or(|&e| message.offset() >= e)
                    }) =>
            {
                // Past where this read must end: leave it for whoever reads on from there.
                progressed = true;
                last_error = None;
                last_of_partition = true;
            }
            Some(Ok(message)) => {
                let processing_started = config.measure_processing.then(Instant::now);
                progressed = true;
                last_error = None;
                let partition = message.partition();
                let offset = message.offset();
                let bytes = message.payload().unwrap_or_default();
                batch.bytes += bytes.len() as u64;
                let at = Coordinates {
                    topic,
                    partition,
                    offset,
                    projections: &projections,
                };
                let mut event_id = None;
                let outcome: Result<(), BadRecord> = 'record: {
                    if let Err(e) = at.decode_into(message.key(), bytes, &mut decoded) {
                        break 'record Err(e);
                    }
                    event_id = Some(decoded.meta.event_id);
                    aggregates_started += u64::from(decoded.meta.sequence == 1);
                    let type_url = Some(decoded.type_url.as_str());
                    if let Some(index) = aggregates.as_mut() {
                        index.record(
                            &decoded.meta.aggregate_id,
                            partition,
                            offset,
                            decoded.meta.sequence,
                        );
                        if config
                            .aggregate_index_max_bytes
                            .is_some_and(|max| index.approx_bytes() > max)
                        {
                            tracing::warn!(
                                message = "not recording the aggregate index: it outgrew its share of the memory budget; `replay` will find aggregates through the partitioner",
                                topic = %topic,
                                aggregates = index.len(),
                                bytes = index.approx_bytes()
                            );
                            aggregates = None;
                        }
                    }
                    let payload = match at.upcast(registry, &decoded) {
                        Ok(p) => p,
                        Err(e) => break 'record Err(e),
                    };
                    if let Some(o) = recent.seen_at(&decoded.meta.event_id, partition) {
                        break 'record Err(at.bad(
                            BadKind::Duplicate,
                            type_url,
                            format!(
                                "event id {} was already applied from offset {o} of this partition; not applying it twice",
                                event_id_text(&decoded.meta.event_id)
                            ),
                        ));
                    }
                    let event = Event {
                        meta: &decoded.meta,
                        payload: &payload,
                    };
                    let time = LogicalTime::of(&decoded.meta);
                    for (i, target) in targets.iter().enumerate() {
                        if !target.wants(partition, offset) {
                            continue;
                        }
                        target.projection.apply(&event, &mut scratch);
                        batch.changes[i].record(time, &mut scratch);
                    }
                    recent.remember(&decoded.meta.event_id, partition, offset);
                    Ok(())
                };
                if let Err(record) = outcome {
                    if !config.dead_letters {
                        return Err(record.into());
                    }
                    tracing::warn!(message = "bad record passed to the dead letters", %record);
                    batch.dead_letters.push(DeadLetter {
                        key: message.key().map(<[u8]>::to_vec),
                        value: bytes.to_vec(),
                        event_id,
                        targets: (0..targets.len())
                            .filter(|&i| targets[i].wants(partition, offset))
                            .collect(),
                        record,
                    });
                }
                next.insert(partition, offset + 1);
                if let Ok(i) = usize::try_from(partition) {
                    if i >= received.len() {
                        received.resize(i + 1, 0);
                    }
                    received[i] += 1;
                }
                last_of_partition = config
                    .stop_at
                    .as_ref()
                    .and_then(|end| end.get(&partition))
                    .is_some_and(|&end| offset + 1 >= end);
                batch.events += 1;
                if let Some(started) = processing_started {
                    batch.processing += started.elapsed();
                }
            }
        }
        if last_error.is_some() && last_progress.elapsed() > config.stall_timeout {
            return Err(ReadError::Stalled {
                topic: topic.into(),
                seconds: config.stall_timeout.as_secs(),
                last_error: last_error.unwrap_or_default(),
            });
        }
        // Checking every partition against its end costs as much as decoding with 128 partitions:
        // only when a record is the last one of its partition, or when idle.
        let done =
            config.stop_at.is_some() && (polled_nothing || last_of_partition) && reached(&next);
        let full = batch.events as usize >= config.max_batch_events.load(Ordering::Relaxed);
        // The clock again only every 1,024 records, or when idle.
        let waited = (batch.events % 1_024 == 0 || polled_nothing)
            && batch_started.elapsed() >= config.max_batch_wait;
        let want_log_end = (batch.events % 1_024 == 0 || polled_nothing)
            && config
                .log_end_every
                .is_some_and(|every| last_log_end.elapsed() >= every);
        if done || full || (waited && (batch.events > 0 || want_log_end)) {
            if want_log_end {
                last_log_end = Instant::now();
                match settings.bounds(&consumer, topic, &partitions) {
                    Ok(bounds) => batch.log_end = Some(bounds.end),
                    Err(error) => {
                        tracing::warn!(message = "could not read the log end", topic, %error)
                    }
                }
            }
            for (p, n) in &next {
                let before = batch_start.get(p).copied().unwrap_or(*n);
                if *n > before {
                    super::metrics::events_read(topic, *p, (*n - before) as u64);
                }
            }
            batch_start.clone_from(&next);
            batch.next = next.clone();
            batch.done = done;
            if done {
                batch.source_checks = Some(SourceChecks::of(
                    &read_from,
                    &next,
                    &received,
                    aggregates.as_ref(),
                    aggregates_started,
                ));
                batch.aggregates = aggregates.take();
            }
            // Sized like the last batch: growing 80,000 changes by doubling cost a tenth of the
            // reader's time in copies and fresh pages.
            let fresh = Batch {
                changes: batch.changes.iter().map(ChangeLog::sized_like).collect(),
                ..Batch::default()
            };
            if tx
                .blocking_send(Ok(std::mem::replace(&mut batch, fresh)))
                .is_err()
                || done
            {
                return Ok(());
            }
            batch_started = Instant::now();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u8) -> [u8; 16] {
        let mut id = [0u8; 16];
        id[0] = n;
        id[15] = n.wrapping_mul(7);
        id
    }

    #[test]
    fn an_event_id_is_recognised_in_its_partition_until_it_leaves_the_window() {
        let mut recent = RecentEventIds::new(3);
        recent.remember(&id(1), 7, (1 << 40) + 5);
        recent.remember(&id(2), 7, 6);
        assert_eq!(recent.seen_at(&id(1), 7), Some((1 << 40) + 5));
        assert_eq!(
            recent.seen_at(&id(1), 8),
            None,
            "another partition's window"
        );
        assert_eq!(recent.seen_at(&id(3), 7), None);
        // Remembering an id again does not move it or count twice.
        recent.remember(&id(1), 7, 9);
        recent.remember(&id(3), 7, 10);
        recent.remember(&id(9), 8, 1);
        assert_eq!(recent.seen_at(&id(1), 7), Some((1 << 40) + 5));
        recent.remember(&id(4), 7, 11);
        assert_eq!(recent.seen_at(&id(1), 7), None, "the oldest was forgotten");
        assert_eq!(recent.seen_at(&id(4), 7), Some(11));
        assert_eq!(recent.seen_at(&id(9), 8), Some(1));
    }

    #[test]
    fn source_checks_of_readers_sharing_the_partitions_add_up() {
        let checks = |partition: i32, skipped: i64, aggregates: Option<u64>| SourceChecks {
            partitions: 1,
            records: 10 - skipped,
            offsets: 10,
            offsets_skipped: skipped,
            skipped_by_partition: (skipped > 0)
                .then_some((partition, skipped))
                .into_iter()
                .collect(),
            aggregates,
            sequence_gaps: 1,
            sequence_repeats: 0,
            gap_examples: vec![format!("gap in {partition}"); 4],
            aggregates_started: 3,
        };
        let mut all = checks(0, 0, Some(5));
        all.merge(checks(1, 2, Some(7)));
        assert_eq!(
            (
                all.partitions,
                all.records,
                all.offsets,
                all.offsets_skipped
            ),
            (2, 18, 20, 2)
        );
        assert_eq!(all.skipped_by_partition, BTreeMap::from([(1, 2)]));
        assert_eq!(all.aggregates, Some(12));
        assert_eq!((all.sequence_gaps, all.aggregates_started), (2, 6));
        assert_eq!(all.gap_examples.len(), 5, "examples stay capped");
        all.merge(checks(2, 0, None));
        assert_eq!(
            all.aggregates, None,
            "one reader gave its index up: the count is unknown"
        );
    }

    #[test]
    fn event_ids_print_as_uuids() {
        let mut raw = [0u8; 16];
        raw[0] = 0xab;
        raw[15] = 0x01;
        assert_eq!(event_id_text(&raw), "ab000000-0000-0000-0000-000000000001");
    }
}
