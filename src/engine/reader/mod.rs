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

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::types::RDKafkaErrorCode;
use tokio::sync::mpsc;

use crate::envelope;
use crate::projection::{
    ChangeLog, Changes, DynProjection, Event, FoldError, LogicalTime, Recycled, ShardBuckets,
    ShardedStore,
};
use crate::sink::aggregate_index::AggregateIndex;
use crate::sink::catalog::Positions;
use crate::source::{KafkaSettings, SourceError, Topics};
use crate::upcast::Registry;

mod checks;
mod duplicates;
mod record;

pub use checks::SourceChecks;
pub use duplicates::{window_bytes, RecentEventIds, DUPLICATE_WINDOW};
pub use record::{
    check_dead_letter_budget, event_id_text, BadKind, BadRecord, Coordinates, DeadLetter,
};

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
    #[error("projection {projection}: {error}")]
    Fold {
        projection: String,
        error: FoldError,
    },
    #[error("no progress reading {topic} for {seconds}s: {last_error}")]
    Stalled {
        topic: String,
        seconds: u64,
        last_error: String,
    },
}

impl ReadError {
    /// The brokers failed or stopped answering: the same read may work later.
    pub fn is_transient(&self) -> bool {
        matches!(self, ReadError::Source(_) | ReadError::Stalled { .. })
    }
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
    /// Where a bounded target stops: it takes only the partitions named here, each up to (not
    /// including) its offset, however far the read goes for the other targets. None: every
    /// partition read, as far as the read goes.
    pub ends: Option<Positions>,
}

impl<E> Target<E> {
    /// A target fed from `positions` (and any partition the read finds besides) to the read's end.
    pub fn unbounded(projection: DynProjection<E>, positions: Positions) -> Target<E> {
        Target {
            projection,
            positions,
            ends: None,
        }
    }

    /// Whether this target still needs the record at `offset` (it may stand past it, or stop
    /// before it).
    fn wants(&self, partition: i32, offset: i64) -> bool {
        self.positions.get(&partition).is_none_or(|&p| offset >= p)
            && self
                .ends
                .as_ref()
                .is_none_or(|ends| ends.get(&partition).is_some_and(|&end| offset < end))
    }
}

#[derive(Clone)]
pub struct ReaderConfig {
    /// The topics read; positions and stop positions name partitions by id (see [`Topics`]).
    pub topics: Topics,
    /// How records carry events.
    pub framing: Arc<crate::envelope::Framing>,
    /// Stop once every partition has reached this end (the replay's snapshot of the log end).
    pub stop_at: Option<Positions>,
    /// With `stop_at`: apply nothing at or past a partition's end (records there are read and
    /// dropped), so that every target ends exactly at `stop_at` (lining two builds up to verify them).
    pub stop_exactly: bool,
    /// Shared so that `reproject tune --batch-events` can change it while the reader runs.
    pub max_batch_events: Arc<std::sync::atomic::AtomicUsize>,
    /// Under a memory budget: hand a batch over once its changes take about this many bytes.
    pub max_batch_bytes: Option<usize>,
    pub max_batch_wait: Duration,
    /// Event ids remembered per partition for the duplicate check: [`DUPLICATE_WINDOW`], or fewer
    /// under a memory budget (see [`RecentEventIds::window_for`]).
    pub duplicate_window: usize,
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
    /// Fold each batch's changes into these stores (one per target) on the reader's own thread,
    /// before handing the batch over without them: the replay without a memory budget, whose
    /// readers share the fold instead of feeding one fold thread.
    pub fold_into: Option<Arc<Vec<ShardedStore>>>,
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
    /// What `changes` take, counted only under a byte cap on batches (`max_batch_bytes`), else 0.
    pub change_bytes: usize,
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
    /// Where the fold gives `changes` back, emptied, for the reader's next batch.
    pub recycle: Option<Arc<Recycled>>,
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

    /// Join the threads on a blocking thread of the runtime, which the caller may await or not:
    /// they close their consumers, which rdkafka does by polling in steps of 100 ms.
    pub fn close(self) -> tokio::task::JoinHandle<()> {
        tokio::task::spawn_blocking(move || self.join())
    }
}

/// How the partitions are shared out to reader threads: in partition order, round robin, so that
/// each of `readers` threads gets every `readers`-th partition. The replay and the bench's raw read
/// of the same log split it the same way.
pub struct PartitionShares {
    /// Sorted, without duplicates.
    partitions: Vec<i32>,
    readers: usize,
}

impl PartitionShares {
    /// `readers` is clamped to 1..=the number of partitions.
    pub fn new(partitions: impl IntoIterator<Item = i32>, readers: usize) -> PartitionShares {
        let mut partitions: Vec<i32> = partitions.into_iter().collect();
        partitions.sort_unstable();
        partitions.dedup();
        let readers = readers.clamp(1, partitions.len().max(1));
        PartitionShares {
            partitions,
            readers,
        }
    }

    pub fn readers(&self) -> usize {
        self.readers
    }

    /// Whether thread `share` reads `partition`.
    pub fn owns(&self, share: usize, partition: i32) -> bool {
        self.partitions
            .binary_search(&partition)
            .is_ok_and(|i| i % self.readers == share)
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
    let shares = PartitionShares::new(
        targets.iter().flat_map(|t| t.positions.keys().copied()),
        readers,
    );
    let readers = shares.readers();
    let (tx, batches) = mpsc::channel(capacity);
    let handles = (0..readers)
        .map(|share| {
            // One reader takes everything as given (a stop position may name a partition the
            // targets do not have yet).
            let mine = |p: &i32| readers == 1 || shares.owns(share, *p);
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
                    ends: t.ends.as_ref().map(only_mine),
                })
                .collect();
            let mut config = config.clone();
            config.stop_at = config.stop_at.as_ref().map(only_mine);
            config.aggregate_index_max_bytes =
                config.aggregate_index_max_bytes.map(|b| b / readers);
            config.prefetch_max_bytes =
                crate::source::prefetch_share(config.prefetch_max_bytes, readers);
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
            if let Err(e) = read(&settings, &registry, &targets, &config, &stop, &tx, share) {
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
    share: usize,
) -> Result<(), ReadError> {
    let consumer: BaseConsumer =
        settings.consumer_with_prefetch("reproject", config.prefetch_max_bytes)?;
    let mut reading = Reading::new(registry, targets, config);
    if reading.reached() {
        let _ = tx.blocking_send(Ok(Batch {
            next: reading.next.clone(),
            done: true,
            changes: vec![ChangeLog::default(); targets.len()],
            ..Batch::default()
        }));
        return Ok(());
    }
    settings.assign(&consumer, &config.topics, &reading.next)?;
    let wants_headers = !matches!(*config.framing, envelope::Framing::Envelope);
    loop {
        if stop.load(Ordering::Relaxed) {
            return Ok(());
        }
        let polled = consumer.poll(Duration::from_millis(50));
        let idle = polled.is_none();
        let last_of_partition = match polled {
            None => {
                reading.on_idle(settings, &consumer);
                false
            }
            Some(Err(KafkaError::PartitionEOF(_))) => false,
            Some(Err(KafkaError::MessageConsumption(code)))
                if matches!(
                    code,
                    RDKafkaErrorCode::AutoOffsetReset | RDKafkaErrorCode::OffsetOutOfRange
                ) =>
            {
                return Err(reading.offset_gone(settings, &consumer, code));
            }
            Some(Err(error)) => {
                reading.on_error(&error);
                false
            }
            Some(Ok(message)) => {
                // Headers are read only where the framing keeps metadata in them.
                let headers = if wants_headers {
                    crate::source::record_headers(&message)
                } else {
                    Default::default()
                };
                let id = reading.partition_id(message.topic(), message.partition());
                let last =
                    reading.on_message(id, &crate::source::raw_record(&message, &headers))?;
                // Only the first time: the records a fetch brought past a window's end (an
                // estimate's, a verify's) arrive after it, and checking every partition's end
                // for each of them cost more than decoding the window.
                let reached_now = last && reading.finished.insert(id);
                if reached_now {
                    stop_fetching(&consumer, message.topic(), message.partition());
                }
                reached_now
            }
        };
        reading.check_stalled()?;
        if let Some(done) = reading.batch_due(idle, last_of_partition) {
            let want_log_end = reading.log_end_due(idle);
            let mut batch = reading.take_batch(done);
            if let Some(stores) = &config.fold_into {
                reading.fold(stores, &mut batch, share)?;
            }
            if want_log_end {
                reading.last_log_end = Instant::now();
                batch.log_end = reading.log_end(settings, &consumer);
            }
            if tx.blocking_send(Ok(batch)).is_err() || done {
                return Ok(());
            }
        }
    }
}

/// Stop fetching a partition a bounded read has read to its end. librdkafka prefetches up to
/// `queued.max.messages.kbytes` per partition, so without this a read that ends early in a
/// partition (the estimate's windows, a partition reaching its end before the others) goes on
/// fetching and decompressing the rest of it only to drop it: the estimate's pilot read most of
/// the log that way. Pausing is an optimisation; if it fails the records past the end are dropped
/// as before.
fn stop_fetching(consumer: &BaseConsumer, topic: &str, partition: i32) {
    let mut list = rdkafka::TopicPartitionList::new();
    list.add_partition(topic, partition);
    if let Err(error) = consumer.pause(&list) {
        tracing::debug!(message = "could not pause a partition read to its end", topic, partition, %error);
    }
}

/// Count a record of partition `id` in `received` (indexed by topic, then partition number).
fn count_received(received: &mut Vec<Vec<i64>>, id: i32) {
    let (topic, partition) = Topics::split(id);
    let partition = partition as usize;
    if topic >= received.len() {
        received.resize_with(topic + 1, Vec::new);
    }
    let counts = &mut received[topic];
    if partition >= counts.len() {
        counts.resize(partition + 1, 0);
    }
    counts[partition] += 1;
}

/// Lowest position any target needs, per partition: where the reader starts.
fn lowest_positions<E>(targets: &[Target<E>]) -> Positions {
    let mut next: Positions = BTreeMap::new();
    for target in targets {
        for (&p, &o) in &target.positions {
            next.entry(p)
                .and_modify(|cur: &mut i64| *cur = (*cur).min(o))
                .or_insert(o);
        }
    }
    next
}

/// One reader's state between polls: where it stands, the batch it is filling, and what it keeps
/// for the source checks and the aggregate index.
struct Reading<'a, E> {
    registry: &'a Registry<E>,
    targets: &'a [Target<E>],
    config: &'a ReaderConfig,
    /// The targets' names, for errors.
    projections: String,
    /// Next offset to read, per partition.
    next: Positions,
    partitions: Vec<i32>,
    read_from: Positions,
    /// Records received per partition, indexed by topic then partition number, for the source
    /// checks.
    received: Vec<Vec<i64>>,
    aggregates: Option<AggregateIndex>,
    aggregates_started: u64,
    recent: RecentEventIds,
    scratch: Changes,
    /// The projections that recorded the current event's changes, to undo them when a later one
    /// refuses it.
    recorded: Vec<usize>,
    /// Every record is decoded into this one, reusing its strings and buffers.
    decoded: envelope::Decoded,
    batch: Batch,
    /// The change logs of batches the fold is done with.
    recycled: Arc<Recycled>,
    /// Where a batch's changes are split by shard, with `fold_into`.
    buckets: ShardBuckets,
    batch_start: Positions,
    batch_started: Instant,
    last_log_end: Instant,
    // Reading the clock for every record cost 2% of the replay: the time of the last progress is
    // only needed once errors start, so it is taken then.
    last_progress: Instant,
    progressed: bool,
    last_error: Option<String>,
    /// Partitions whose ListOffsets answer was found below their fetches' (warned once each).
    warned_log_end: std::collections::BTreeSet<i32>,
    /// Partitions a bounded read has read to their end, no longer fetched (see [`stop_fetching`]).
    finished: std::collections::BTreeSet<i32>,
}

impl<'a, E: 'static> Reading<'a, E> {
    fn new(registry: &'a Registry<E>, targets: &'a [Target<E>], config: &'a ReaderConfig) -> Self {
        let next = lowest_positions(targets);
        let mut aggregates = config
            .index_aggregates
            .then(|| AggregateIndex::of(config.topics.clone()));
        if let Some(index) = aggregates.as_mut() {
            for (&p, &o) in &next {
                if o == 0 {
                    index.read_from_start(p);
                }
            }
        }
        Reading {
            registry,
            targets,
            config,
            projections: targets
                .iter()
                .map(|t| t.projection.name())
                .collect::<Vec<_>>()
                .join(", "),
            partitions: next.keys().copied().collect(),
            read_from: next.clone(),
            batch_start: next.clone(),
            next,
            received: Vec::new(),
            aggregates,
            aggregates_started: 0,
            recent: RecentEventIds::new(config.duplicate_window),
            scratch: Changes::default(),
            recorded: Vec::new(),
            decoded: envelope::Decoded::default(),
            batch: Batch {
                changes: vec![ChangeLog::default(); targets.len()],
                ..Batch::default()
            },
            recycled: Arc::default(),
            buckets: ShardBuckets::default(),
            batch_started: Instant::now(),
            last_log_end: Instant::now() - Duration::from_secs(3600),
            last_progress: Instant::now(),
            progressed: false,
            last_error: None,
            warned_log_end: Default::default(),
            finished: Default::default(),
        }
    }

    fn topics(&self) -> &'a Topics {
        &self.config.topics
    }

    /// A record's partition id. The reader is assigned only partitions of its topics.
    fn partition_id(&self, topic: &str, partition: i32) -> i32 {
        self.topics().id_of(topic, partition).unwrap_or(partition)
    }

    /// Whether every partition has reached the end of a bounded read.
    fn reached(&self) -> bool {
        match &self.config.stop_at {
            Some(end) => end
                .iter()
                .all(|(p, e)| self.next.get(p).is_some_and(|n| n >= e)),
            None => false,
        }
    }

    /// Idle: a partition whose last records are transaction markers never delivers them, so take
    /// the consumer's own fetch position as where it stands.
    fn on_idle(&mut self, settings: &KafkaSettings, consumer: &BaseConsumer) {
        if self.config.stop_at.is_some() {
            for (p, o) in settings.fetch_positions(consumer, self.topics()) {
                if let Some(n) = self.next.get_mut(&p) {
                    *n = (*n).max(o);
                }
            }
        }
    }

    /// The broker no longer has a position this reader needs. The error does not say which
    /// partition: find one whose position the log no longer has.
    fn offset_gone(
        &self,
        settings: &KafkaSettings,
        consumer: &BaseConsumer,
        code: RDKafkaErrorCode,
    ) -> ReadError {
        let topics = self.topics();
        let bounds = match settings.bounds(consumer, topics, &self.partitions) {
            Ok(bounds) => bounds,
            Err(e) => return e.into(),
        };
        let (topic, partition, offset) = self
            .next
            .iter()
            .find(|(p, o)| bounds.start.get(p).is_some_and(|s| **o < *s))
            .map(|(p, o)| (topics.topic_of(*p).to_string(), topics.partition_of(*p), *o))
            .unwrap_or((topics.to_string(), -1, -1));
        tracing::error!(
            message = "offset out of range",
            topic,
            partition,
            offset,
            ?code
        );
        ReadError::OffsetGone {
            topic,
            partition,
            offset,
        }
    }

    /// librdkafka retries broker and network failures itself; remember the error in case nothing
    /// moves for too long.
    fn on_error(&mut self, error: &KafkaError) {
        if self.progressed {
            self.last_progress = Instant::now();
            self.progressed = false;
        }
        super::metrics::error("kafka");
        if self.last_error.is_none() {
            tracing::warn!(message = "Kafka reports an error; retrying", topics = %self.topics(), %error);
        }
        self.last_error = Some(error.to_string());
    }

    fn check_stalled(&mut self) -> Result<(), ReadError> {
        if self.last_error.is_some() && self.last_progress.elapsed() > self.config.stall_timeout {
            return Err(ReadError::Stalled {
                topic: self.topics().to_string(),
                seconds: self.config.stall_timeout.as_secs(),
                last_error: self.last_error.take().unwrap_or_default(),
            });
        }
        Ok(())
    }

    /// One record read: applied to the targets that want it, or kept as a dead letter, or (under
    /// the fail policy) the error. Returns whether it was the last record of its partition in a
    /// bounded read.
    fn on_message(
        &mut self,
        partition: i32,
        record: &envelope::RawRecord<'_>,
    ) -> Result<bool, ReadError> {
        let offset = record.offset;
        self.progressed = true;
        self.last_error = None;
        if self.config.stop_exactly
            && self
                .config
                .stop_at
                .as_ref()
                .is_some_and(|end| end.get(&partition).is_none_or(|&e| offset >= e))
        {
            // Past where this read must end: leave it for whoever reads on from there.
            return Ok(true);
        }
        let processing_started = self.config.measure_processing.then(Instant::now);
        self.batch.bytes += record.value.len() as u64;
        let mut event_id = None;
        if let Err(bad) = self.apply(partition, record, &mut event_id) {
            if !self.config.dead_letters {
                return Err(bad.into());
            }
            tracing::warn!(message = "bad record passed to the dead letters", record = %bad);
            self.batch.dead_letters.push(DeadLetter {
                raw: envelope::OwnedRecord::of(record),
                event_id,
                targets: (0..self.targets.len())
                    .filter(|&i| self.targets[i].wants(partition, offset))
                    .collect(),
                record: bad,
            });
        }
        self.next.insert(partition, offset + 1);
        count_received(&mut self.received, partition);
        self.batch.events += 1;
        if let Some(started) = processing_started {
            self.batch.processing += started.elapsed();
        }
        Ok(self
            .config
            .stop_at
            .as_ref()
            .and_then(|end| end.get(&partition))
            .is_some_and(|&end| offset + 1 >= end))
    }

    /// Decode, check, upcast and project one record into the batch; `event_id` is set once the
    /// envelope decodes, for a dead letter.
    fn apply(
        &mut self,
        partition: i32,
        record: &envelope::RawRecord<'_>,
        event_id: &mut Option<[u8; 16]>,
    ) -> Result<(), BadRecord> {
        let offset = record.offset;
        let topics = self.topics();
        let at = Coordinates {
            topic: topics.topic_of(partition),
            partition: topics.partition_of(partition),
            partition_id: partition,
            offset,
            projections: &self.projections,
        };
        at.decode_into(&self.config.framing, record, &mut self.decoded)?;
        let decoded = &self.decoded;
        *event_id = Some(decoded.meta.event_id);
        self.aggregates_started += u64::from(decoded.meta.sequence == 1);
        if let Some(index) = self.aggregates.as_mut() {
            index.record(
                &decoded.meta.aggregate_id,
                partition,
                offset,
                decoded.meta.sequence,
            );
            if self
                .config
                .aggregate_index_max_bytes
                .is_some_and(|max| index.approx_bytes() > max)
            {
                tracing::warn!(
                    message = "not recording the aggregate index: it outgrew its share of the memory budget; `replay` will find aggregates through the partitioner",
                    topics = %self.config.topics,
                    aggregates = index.len(),
                    bytes = index.approx_bytes()
                );
                self.aggregates = None;
            }
        }
        let payload = at.upcast(self.registry, decoded)?;
        if let Some(o) = self.recent.seen_at(&decoded.meta.event_id, partition) {
            return Err(at.bad(
                BadKind::Duplicate,
                Some(decoded.type_url.as_str()),
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
        self.recorded.clear();
        for (i, target) in self.targets.iter().enumerate() {
            if !target.wants(partition, offset) {
                continue;
            }
            target.projection.apply(&event, &mut self.scratch);
            if let Some(reason) = self.scratch.take_refusal() {
                // None of the event's changes is applied, to any projection: a dead letter retried
                // after the fix applies it whole.
                for &j in &self.recorded {
                    self.batch.changes[j].pop_event();
                }
                return Err(at.bad(
                    BadKind::Projection,
                    Some(decoded.type_url.as_str()),
                    format!(
                        "projection {} refused the event: {reason}",
                        target.projection.name()
                    ),
                ));
            }
            if self.batch.changes[i].record(time, &mut self.scratch) {
                self.recorded.push(i);
                if self.config.max_batch_bytes.is_some() {
                    self.batch.change_bytes += self.batch.changes[i].last_event_bytes();
                }
            }
        }
        self.recent
            .remember(&decoded.meta.event_id, partition, offset);
        Ok(())
    }

    /// Whether to hand the batch over now: Some(true) when a bounded read is done, Some(false) when
    /// the batch is full or has waited long enough, None to keep filling it.
    fn batch_due(&self, idle: bool, last_of_partition: bool) -> Option<bool> {
        // Checking every partition against its end costs as much as decoding with 128 partitions:
        // only when a record is the last one of its partition, or when idle.
        let done = self.config.stop_at.is_some() && (idle || last_of_partition) && self.reached();
        let full = self.batch.events as usize
            >= self.config.max_batch_events.load(Ordering::Relaxed)
            || self
                .config
                .max_batch_bytes
                .is_some_and(|max| self.batch.change_bytes >= max);
        // The clock again only every 1,024 records, or when idle.
        let waited = (self.batch.events % 1_024 == 0 || idle)
            && self.batch_started.elapsed() >= self.config.max_batch_wait;
        (done || full || (waited && (self.batch.events > 0 || self.log_end_due(idle))))
            .then_some(done)
    }

    /// Where the log ends now, for lag: ListOffsets' answer, raised to what this consumer's fetches
    /// reported where a broker's two answers disagree (said once per partition, in the log).
    fn log_end(&mut self, settings: &KafkaSettings, consumer: &BaseConsumer) -> Option<Positions> {
        let topics = self.topics();
        let listed = match settings.bounds(consumer, topics, &self.partitions) {
            Ok(bounds) => bounds.end,
            Err(error) => {
                tracing::warn!(message = "could not read the log end", %topics, %error);
                return None;
            }
        };
        let fetched = settings.fetched_log_end(consumer, topics, &self.partitions);
        let (ends, disagreements) = crate::source::reconcile_log_end(&listed, &fetched);
        for d in disagreements {
            if self.warned_log_end.insert(d.partition) {
                tracing::warn!(
                    message = "the broker's ListOffsets answer is below what its fetches report; trusting the fetches, so that \"caught up\" is never short",
                    topic = topics.topic_of(d.partition),
                    partition = topics.partition_of(d.partition),
                    list_offsets = d.list_offsets,
                    fetches = d.fetched
                );
            }
        }
        Some(ends)
    }

    /// Whether this batch should carry the log end (for lag).
    fn log_end_due(&self, idle: bool) -> bool {
        (self.batch.events % 1_024 == 0 || idle)
            && self
                .config
                .log_end_every
                .is_some_and(|every| self.last_log_end.elapsed() >= every)
    }

    /// Fold the batch's changes into the shared stores, leaving its logs empty for the fold thread
    /// to give back.
    fn fold(
        &mut self,
        stores: &[ShardedStore],
        batch: &mut Batch,
        share: usize,
    ) -> Result<(), ReadError> {
        for ((store, log), target) in stores.iter().zip(&mut batch.changes).zip(self.targets) {
            let projection = &target.projection;
            store
                .apply(projection.tables(), log, &mut self.buckets, share)
                .map_err(|error| ReadError::Fold {
                    projection: projection.name().to_string(),
                    error,
                })?;
        }
        Ok(())
    }

    /// The batch filled so far, with where the reader stands; a fresh one takes its place.
    fn take_batch(&mut self, done: bool) -> Batch {
        let topics = self.topics();
        for (p, n) in &self.next {
            let before = self.batch_start.get(p).copied().unwrap_or(*n);
            if *n > before {
                super::metrics::events_read(
                    topics.topic_of(*p),
                    topics.partition_of(*p),
                    (*n - before) as u64,
                );
            }
        }
        self.batch_start.clone_from(&self.next);
        if done {
            self.batch.source_checks = Some(SourceChecks::of(
                self.topics(),
                &self.read_from,
                &self.next,
                &self.received,
                self.aggregates.as_ref(),
                self.aggregates_started,
            ));
            self.batch.aggregates = self.aggregates.take();
        }
        // The logs of a batch the fold is done with, or sized like the last batch: growing 80,000
        // changes by doubling cost a tenth of the reader's time in copies and fresh pages.
        let changes = self
            .recycled
            .take()
            .filter(|logs| logs.len() == self.targets.len())
            .unwrap_or_else(|| {
                self.batch
                    .changes
                    .iter()
                    .map(ChangeLog::sized_like)
                    .collect()
            });
        let fresh = Batch {
            changes,
            ..Batch::default()
        };
        self.batch_started = Instant::now();
        let mut batch = std::mem::replace(&mut self.batch, fresh);
        batch.next = self.next.clone();
        batch.done = done;
        batch.recycle = Some(self.recycled.clone());
        batch
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_brokers_failing_is_worth_reading_again() {
        let stalled = ReadError::Stalled {
            topic: "events".into(),
            seconds: 30,
            last_error: "broker transport failure".into(),
        };
        let gone = ReadError::OffsetGone {
            topic: "events".into(),
            partition: 3,
            offset: 17,
        };
        assert!(stalled.is_transient());
        assert!(!gone.is_transient());
        assert!(crate::engine::EngineError::from(stalled).is_retriable());
        assert!(!crate::engine::EngineError::from(gone).is_retriable());
    }

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
    fn a_budget_shrinks_the_duplicate_windows_to_what_fits_and_no_further_than_the_least() {
        use duplicates::{window_bytes, MIN_DUPLICATE_WINDOW};
        assert_eq!(
            RecentEventIds::window_for(usize::MAX, 128),
            DUPLICATE_WINDOW
        );
        for (bytes, partitions) in [
            (40 << 20, 128),
            (4 << 20, 128),
            (1 << 20, 64),
            (300 << 10, 3),
        ] {
            let ids = RecentEventIds::window_for(bytes, partitions);
            assert!(
                (MIN_DUPLICATE_WINDOW..DUPLICATE_WINDOW).contains(&ids),
                "{ids}"
            );
            assert!(
                window_bytes(ids) * partitions <= bytes,
                "{ids} ids in {bytes} bytes"
            );
            // The next size up would not have fitted, and a window fills its table.
            assert!(window_bytes(2 * ids + 1) * partitions > bytes);
            assert!(window_bytes(ids) < window_bytes(ids + 1));
        }
        assert_eq!(RecentEventIds::window_for(0, 128), MIN_DUPLICATE_WINDOW);
    }

    #[test]
    fn a_window_takes_the_bytes_it_is_counted_at() {
        // hashbrown's table for a capacity: a power of two at most 7/8 full.
        let map =
            rustc_hash::FxHashMap::<u64, i64>::with_capacity_and_hasher(7_168, Default::default());
        assert_eq!(map.capacity(), 7_168);
        assert_eq!(duplicates::window_bytes(7_167), 8_192 * 17 + 7_168 * 8);
    }

    #[test]
    fn source_checks_of_readers_sharing_the_partitions_add_up() {
        let checks = |partition: i32, skipped: i64, aggregates: Option<u64>| SourceChecks {
            partitions: 1,
            records: 10 - skipped,
            offsets: 10,
            offsets_skipped: skipped,
            skipped_by_partition: (skipped > 0)
                .then_some((format!("t/{partition}"), skipped))
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
        assert_eq!(
            all.skipped_by_partition,
            BTreeMap::from([("t/1".to_string(), 2)])
        );
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

    #[test]
    fn partitions_are_shared_round_robin_in_partition_order_each_to_one_reader() {
        let shares = PartitionShares::new([7, 3, 5, 3, 1], 2);
        assert_eq!(shares.readers(), 2);
        let of = |share| {
            [1, 3, 5, 7]
                .into_iter()
                .filter(|p| shares.owns(share, *p))
                .collect::<Vec<_>>()
        };
        assert_eq!(of(0), [1, 5]);
        assert_eq!(of(1), [3, 7]);
        assert!(!shares.owns(0, 2) && !shares.owns(1, 2), "not a partition");
        assert_eq!(PartitionShares::new([4], 8).readers(), 1);
        assert_eq!(PartitionShares::new([], 8).readers(), 1);
    }
}
