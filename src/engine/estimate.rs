//! `estimate`: what a rebuild will take, from a pilot over about 2% of the log (200,000 events at
//! the least, all of a smaller log), before starting it.
//!
//! The pilot reads windows spread over every partition and over time (a window per partition,
//! staggered from the start to the end, or several per partition where there are few), with the
//! rebuild's reader threads, through the same decoding, upcasters, projections and fold as a
//! rebuild. The folded rows are bulk-loaded and indexed in a scratch schema inside a transaction
//! that is rolled back, to measure the load's speed and the bytes per row on this database:
//! nothing is written to projection tables or the catalog.
//!
//! Scaling up: events and time scale with the share of the log read. Rows of a table whose rows
//! each come from one aggregate scale with the number of aggregates, estimated from the events
//! that start one (sequence 1); rows of other tables (per customer, per day) from how many windows
//! met each key (the larger of the GEE and Chao1 estimators): a window is one draw, because the
//! events of one aggregate, close together in one partition, would otherwise count one key many
//! times. The replay's pace is the pilot's, by the clock, while its windows stream in (fetch,
//! decode, upcast, project, fold, many partitions at once as in a rebuild; see
//! [`streaming_stretch`]), timed over the later half of its reads only (see [`pilot_reads`]), plus
//! the wait for the brokers' first answers once, as the pilot's first read met it.
//! Every figure gets a 20% margin for periods denser than the sample.

use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicBool, AtomicUsize};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sqlx::Connection;

use super::memory::size_text;
use super::reader::{self, ReaderConfig, SourceChecks, Target};
use super::{Engine, EngineError, Result};
use crate::projection::{DynProjection, RowStore, Value};
use crate::sink::catalog::Positions;
use crate::sink::writer::{self, BuildTables};
use crate::sink::Context;
use rustc_hash::FxHashMap;

/// Points in time the pilot wants its windows at, at least: with one window per partition and
/// many partitions, one pass covers them; with few partitions each gets several (one per pass).
const POINTS_IN_TIME: i64 = 128;
/// Windows per partition, at most: each pass waits once for the brokers' first answer.
const MAX_PASSES: i64 = 10;
/// The events a pass brings at the least (where the pilot reads that many): a read gets under
/// way partition by partition before it reaches its pace, which a rebuild pays once. With 16
/// partitions, 8 passes of 25,000 events predicted 0.77-1.59x of the rebuild's replay, 2 passes of
/// 100,000 0.92-0.99x; the 10M-event bench log's passes are 100,000 (BENCHMARKS.md, "The estimate
/// on logs smaller than the bench's").
const LEAST_READ_EVENTS: i64 = 100_000;
/// The share of the log the pilot reads unless told otherwise. On the 10M-event bench log (128
/// partitions) 2% took 0.5-0.8 s of reading (the whole estimate 0.7-1.1 s) where the rebuild takes
/// 20 s. Its pace, like the replay's, is its fold thread's (busy 95% of a pass), and varied from
/// 290k to 590k events/s in runs minutes apart where the replay ran at 610k-645k; 1% varied as
/// much and overestimated the per-day table's rows 5x (its windows were too short to meet a day
/// in more than one).
pub const DEFAULT_SAMPLE: f64 = 0.02;
/// The margin added for periods denser than the sample.
pub const MARGIN: f64 = 1.2;
/// The events the pilot reads at the least, however small the share: a pace is the time of a few
/// batches per reader thread in the timed half of the reads, and a read pays ~0.1 s for the
/// brokers' first answers besides. On a 200,000-event log (128 partitions) 2% was one batch per
/// reader thread and its pace came out at 24k-146k events/s where the rebuild replayed at 324k
/// (BENCHMARKS.md, "The estimate on logs smaller than the bench's"); 200,000 is what 2% is of the
/// 10M-event bench log, where the prediction is within 25%. On a smaller log the pilot reads all
/// of it.
pub const LEAST_PILOT_EVENTS: u64 = 200_000;

/// How much of the log the pilot reads: `share` of it, but at least `least_events` (or all of it).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PilotSize {
    pub share: f64,
    pub least_events: u64,
}

impl Default for PilotSize {
    fn default() -> Self {
        PilotSize {
            share: DEFAULT_SAMPLE,
            least_events: LEAST_PILOT_EVENTS,
        }
    }
}

impl PilotSize {
    /// The share of a log of `events` the pilot reads.
    fn share_of(&self, events: i64) -> f64 {
        let least = self.least_events as f64 / events.max(1) as f64;
        self.share.max(least).min(1.0)
    }
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct Estimate {
    pub projections: Vec<String>,
    pub events_total: i64,
    pub events_sampled: u64,
    pub sample_share: f64,
    pub windows: usize,
    /// Reading the windows (fetch, decode, upcast, project, fold).
    pub pilot_seconds: f64,
    /// The whole estimate: the log's bounds, the pilot, the scratch load and its rollback.
    pub seconds: f64,
    /// The replay's pace, timed while the pilot's windows streamed.
    pub events_per_second: f64,
    pub replay_seconds: f64,
    pub load_and_index_seconds: f64,
    /// Replay, load and indexes, with the margin (catch-up and swap are extra, and small).
    pub total_seconds: f64,
    pub aggregates: Option<u64>,
    pub tables: Vec<TableEstimate>,
    /// The fold's memory without a budget; a budget makes the rebuild spill instead.
    pub fold_bytes: u64,
    pub margin: f64,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct TableEstimate {
    pub projection: String,
    pub table: String,
    pub rows: u64,
    pub bytes: u64,
    pub sample_rows: u64,
    /// How the rows were scaled: per aggregate, or from the keys' repeats in the sample.
    pub scaled: String,
}

pub async fn estimate<E: Send + Sync + 'static>(
    engine: &Engine<E>,
    names: &[String],
    size: PilotSize,
) -> Result<Estimate> {
    let started = Instant::now();
    let projections = names
        .iter()
        .map(|n| engine.projection(n))
        .collect::<Result<Vec<_>>>()?;
    for p in &projections {
        engine.schemas.load(p.name(), p.version())?;
    }
    let bounds = engine.log_bounds("reproject-estimate").await?;
    tracing::debug!(
        message = "estimate: log bounds read",
        ms = started.elapsed().as_millis() as u64
    );
    let events_total: i64 = bounds
        .end
        .iter()
        .map(|(p, e)| e - bounds.start.get(p).copied().unwrap_or(0))
        .sum();
    let share = size.share_of(events_total);

    // Window i of every partition is read in pass i: windows spread evenly from start to end.
    let partitions = bounds.end.len() as i64;
    let windows_per_partition = pilot_passes(partitions, share, events_total);
    let mut passes: Vec<(Positions, Positions)> = Vec::new();
    for i in 0..windows_per_partition {
        let (mut from, mut to) = (Positions::new(), Positions::new());
        for (index, (&p, &end)) in bounds.end.iter().enumerate() {
            let index = index as i64;
            let start = bounds.start.get(&p).copied().unwrap_or(0);
            let range = end - start;
            let window =
                ((range as f64 * share / windows_per_partition as f64).ceil() as i64).min(range);
            // Staggered by partition, so that together the partitions' windows cover
            // passes x partitions points in time rather than passes.
            let slots = windows_per_partition * partitions - 1;
            let slot = i * partitions + index;
            let gap = if slots > 0 {
                (range - window).max(0) * slot / slots
            } else {
                0
            };
            from.insert(p, start + gap);
            to.insert(p, start + gap + window);
        }
        passes.push((from, to));
    }

    let mut sample = Sample {
        stores: projections
            .iter()
            .map(|p| RowStore::new(p.tables().len()))
            .collect(),
        key_counts: projections
            .iter()
            .map(|p| vec![Default::default(); p.tables().len()])
            .collect(),
    };
    let mut sampled = 0u64;
    let mut checks = SourceChecks::default();
    let pilot_started = Instant::now();
    let (reads, first_timed) = pilot_reads(passes);
    // Each read's streaming stretch (see [`streaming_stretch`]): events and time.
    let mut stretches: Vec<(u64, Duration)> = Vec::new();
    // The wait for the brokers' first answers, as the pilot's first read (a fresh process's, as
    // a rebuild's) met it: a rebuild pays it once, and on a small log it is a good part of the
    // replay (0.1-0.13 s of 0.7 s on 200,000 events).
    let mut first_answer: Option<Duration> = None;
    // The reads' consumers closing, awaited last (see [`read_window`]).
    let mut closing = Vec::new();
    for (from, to) in reads {
        let read = read_window(engine, &projections, &mut sample, from, to).await?;
        closing.push(read.closing);
        stretches.push(read.stretch);
        first_answer = first_answer.or(read.first_batch);
        sampled += read.events;
        checks.aggregates_started += read.checks.aggregates_started;
        checks.aggregates =
            Some(checks.aggregates.unwrap_or(0) + read.checks.aggregates.unwrap_or(0));
    }
    let stores = &sample.stores;
    let pilot_seconds = pilot_started.elapsed().as_secs_f64();
    let scale = if sampled > 0 {
        events_total as f64 / sampled as f64
    } else {
        0.0
    };
    let sum = |stretches: &[(u64, Duration)]| {
        stretches
            .iter()
            .fold((0u64, Duration::ZERO), |(e, t), &(events, took)| {
                (e + events, t + took)
            })
    };
    // The timed reads' pace; every read's for a log whose timed half brought nothing.
    let (streamed, took) = match sum(stretches.get(first_timed..).unwrap_or_default()) {
        (0, _) => sum(&stretches),
        timed => timed,
    };
    let events_per_second = streamed as f64 / took.as_secs_f64().max(1e-6);
    let root_scale = scale.max(1.0).sqrt();
    let aggregates_est = (checks.aggregates_started > 0)
        .then(|| (checks.aggregates_started as f64 * scale).round() as u64);
    // Aggregates seen in the sample (each window's distinct aggregates, summed: an aggregate seen
    // in two windows counts twice, as its rows would in the windows' folds).
    let aggregates_seen = checks.aggregates.unwrap_or(0).max(1) as f64;

    // Measure the load and the bytes per row on a scratch copy that is rolled back.
    let mut conn = sqlx::PgConnection::connect(&engine.database_url)
        .await
        .context(|| "estimate: connecting to PostgreSQL".into())?;
    let mut tables = Vec::new();
    let mut load_seconds = 0.0;
    let mut fold_bytes = 0.0;
    for ((projection, store), key_counts) in projections.iter().zip(stores).zip(&sample.key_counts)
    {
        let schema = format!("rp_estimate_{}", std::process::id());
        let sql = engine
            .schemas
            .load(projection.name(), projection.version())?;
        let mut tx = conn
            .begin()
            .await
            .context(|| "estimate: starting the scratch load".into())?;
        let build = BuildTables {
            build_id: -1,
            projection: projection.name(),
            version: projection.version(),
            schema: &schema,
            specs: projection.tables(),
        };
        // As a build's: the schema, its tables (and row clocks), checked against the code; inside
        // this transaction (as a savepoint), so that all of it rolls back.
        writer::create_tables(&mut tx, build, &sql).await?;
        let started = Instant::now();
        writer::bulk_load(&mut tx, build, store, None).await?;
        sqlx::raw_sql(&sql.indexes)
            .execute(&mut *tx)
            .await
            .context(|| {
                format!(
                    "estimate: running indexes.sql of {} v{}",
                    projection.name(),
                    projection.version()
                )
            })?;
        let seconds = started.elapsed().as_secs_f64();
        let mut sample_rows_all = 0u64;
        let mut rows_all = 0u64;
        for (i, spec) in projection.tables().iter().enumerate() {
            let sample_rows = store.table(i).live_rows().count() as u64;
            let bytes: i64 = sqlx::query_scalar(
                "SELECT pg_total_relation_size(format('%I.%I', $1::text, $2::text)::regclass)",
            )
            .bind(&schema)
            .bind(spec.name)
            .fetch_one(&mut *tx)
            .await
            .context(|| format!("estimate: measuring the scratch copy of {}", spec.name))?;
            let (rows, scaled) = match aggregates_est {
                Some(aggs) if spec.per_aggregate => (
                    (sample_rows as f64 / aggregates_seen * aggs as f64 * MARGIN) as u64,
                    "per aggregate".to_string(),
                ),
                _ => {
                    // Two estimators of the number of distinct keys from how often the sample
                    // met each: GEE (Charikar et al., 2000) is good when keys cluster in time
                    // (per day), Chao1 when they are spread evenly (per customer). Both tend to
                    // fall short, so the larger is taken; never more than scaling like events.
                    let counts = key_counts.get(i).map(|k| &k.windows);
                    let count = |f: &dyn Fn(u32) -> bool| {
                        counts.map_or(0.0, |c| c.values().filter(|&&n| f(n)).count() as f64)
                    };
                    let (once, twice, seen) =
                        (count(&|n| n == 1), count(&|n| n == 2), count(&|_| true));
                    let gee = root_scale * once + (seen - once);
                    let chao1 = if twice > 0.0 {
                        seen + once * once / (2.0 * twice)
                    } else {
                        seen + once * (once - 1.0).max(0.0) / 2.0
                    };
                    let distinct = gee.max(chao1).min(sample_rows as f64 * scale);
                    (
                        (distinct * MARGIN) as u64,
                        "from the keys' repeats in the sample (GEE, Chao1)".to_string(),
                    )
                }
            };
            let per_row = if sample_rows > 0 {
                bytes as f64 / sample_rows as f64
            } else {
                0.0
            };
            sample_rows_all += sample_rows;
            rows_all += rows;
            tables.push(TableEstimate {
                projection: projection.name().to_string(),
                table: spec.name.to_string(),
                rows,
                bytes: (per_row * rows as f64) as u64,
                sample_rows,
                scaled,
            });
        }
        tx.rollback()
            .await
            .context(|| "estimate: dropping the scratch copy".into())?;
        if sample_rows_all > 0 {
            let ratio = rows_all as f64 / sample_rows_all as f64;
            load_seconds += seconds * ratio;
            fold_bytes += store.approx_bytes() as f64 * ratio;
        }
    }
    tracing::debug!(
        message = "estimate: scratch loads measured",
        ms = started.elapsed().as_millis() as u64,
        pilot_ms = (pilot_seconds * 1000.0) as u64
    );
    for close in closing {
        let _ = close.await;
    }
    let replay_seconds = (first_answer.unwrap_or_default().as_secs_f64()
        + events_total as f64 / events_per_second.max(1.0))
        * MARGIN;
    Ok(Estimate {
        projections: projections.iter().map(|p| p.name().to_string()).collect(),
        events_total,
        events_sampled: sampled,
        sample_share: if events_total > 0 {
            sampled as f64 / events_total as f64
        } else {
            0.0
        },
        windows: (windows_per_partition as usize) * bounds.end.len(),
        pilot_seconds,
        seconds: started.elapsed().as_secs_f64(),
        events_per_second,
        replay_seconds,
        load_and_index_seconds: load_seconds,
        total_seconds: replay_seconds + load_seconds,
        aggregates: aggregates_est.map(|a| (a as f64 * MARGIN) as u64),
        tables,
        fold_bytes: fold_bytes as u64,
        margin: MARGIN,
    })
}

/// Windows per partition the pilot reads, one per pass: enough passes that the partitions'
/// windows together stand at [`POINTS_IN_TIME`] points, at most [`MAX_PASSES`], and few enough
/// that each pass brings [`LEAST_READ_EVENTS`] of the pilot's `share` of the log's `events`. A
/// pilot over half the log or more takes one pass: several windows per partition would overlap.
fn pilot_passes(partitions: i64, share: f64, events: i64) -> i64 {
    if share >= 0.5 {
        return 1;
    }
    let events = (events as f64 * share) as i64;
    let partitions = partitions.max(1);
    let for_points = (POINTS_IN_TIME + partitions - 1) / partitions;
    for_points
        .min(events / LEAST_READ_EVENTS)
        .clamp(1, MAX_PASSES)
}

/// The pilot's reads, in the order it makes them, and the index of the first whose pace is timed.
///
/// A process's first read runs at a fraction of its later pace on a host where touching memory
/// the process never had is dear: on the 10M-event bench log (128 partitions, `dev-broker`), a
/// pilot read in two halves paced 316k-335k events/s in its first half and 462k-515k in its
/// second, against a replay of 536k (BENCHMARKS.md, session 33). A rebuild pays that once, in its
/// first seconds; the pilot would pay it throughout. So the first half of the reads (rounded down)
/// brings the memory in, and only the rest is timed; both count in the sample. Each read holds
/// windows from the whole span of the log, early events (older versions, more upcasting) as much
/// as late ones: a single pass (many partitions) is read as its even partitions, then its odd
/// ones; several passes are read along diagonals, read j taking partition k's window of pass
/// (j + k) mod n, so that every read has every partition once, with windows in as many of the
/// passes' stretches of time as there are partitions (all of them from 10 partitions up).
fn pilot_reads(passes: Vec<(Positions, Positions)>) -> (Vec<(Positions, Positions)>, usize) {
    let Some((first, _)) = passes.first() else {
        return (Vec::new(), 0);
    };
    let partitions: Vec<i32> = first.keys().copied().collect();
    // A read: partition k's window from the pass `pass_of(k)` names, if it names one.
    let read = |pass_of: &dyn Fn(usize) -> Option<usize>| -> (Positions, Positions) {
        let (mut from, mut to) = (Positions::new(), Positions::new());
        for (k, p) in partitions.iter().enumerate() {
            let Some((pass_from, pass_to)) = pass_of(k).and_then(|i| passes.get(i)) else {
                continue;
            };
            if let (Some(&f), Some(&t)) = (pass_from.get(p), pass_to.get(p)) {
                from.insert(*p, f);
                to.insert(*p, t);
            }
        }
        (from, to)
    };
    let n = passes.len();
    let reads: Vec<(Positions, Positions)> = if n == 1 {
        (0..2)
            .map(|parity| read(&|k| (k % 2 == parity).then_some(0)))
            .collect()
    } else {
        (0..n).map(|j| read(&|k| Some((j + k) % n))).collect()
    };
    // A read with no partition (a log without any) is left out.
    let reads: Vec<_> = reads
        .into_iter()
        .filter(|(from, _)| !from.is_empty())
        .collect();
    let first_timed = reads.len() / 2;
    (reads, first_timed)
}

/// How many of the pilot's windows met each key of a table.
#[derive(Clone, Default)]
struct KeyCounts {
    /// Windows per key, by the key's [`key_hash`].
    windows: FxHashMap<u64, u32>,
    /// The keys the current pass met, with the partition (a pass reads a window of each), counted
    /// once the pass is over: the pilot's fold, where they are met, is what sets its pace (busy
    /// 95% of a pass on the bench's log), so it does no more there than keep them.
    met: Vec<(i32, u64)>,
}

impl KeyCounts {
    /// Count the keys the pass met, once per window.
    fn end_pass(&mut self) {
        let mut met = std::mem::take(&mut self.met);
        met.sort_unstable();
        met.dedup();
        for (_, key) in met {
            *self.windows.entry(key).or_insert(0) += 1;
        }
    }
}

/// A key as the pilot counts it: a 64-bit hash stands for it, so that counting allocates nothing
/// (an owned key per change was the pilot's costliest step, and it slowed the pace it measures).
/// Two keys of a table share a hash with a chance of about n^2 / 2^65: 1e-9 for 200,000 keys.
fn key_hash(key: &[Value]) -> u64 {
    let mut hasher = rustc_hash::FxHasher::default();
    key.hash(&mut hasher);
    hasher.finish()
}

/// What the pilot gathered: the folded rows, and how often each key was touched.
struct Sample {
    stores: Vec<RowStore>,
    /// Per projection and table.
    key_counts: Vec<Vec<KeyCounts>>,
}

/// The stretch of a pass that shows its pace: from the batch that brings its first tenth of events
/// in to the one that brings its ninth tenth. Before it, the brokers' first answers and the
/// fetches of every partition getting under way, which a rebuild pays once; after it, the last
/// partitions finishing one by one. `arrivals` is each batch's arrival with the events received
/// so far; returns the stretch's events and time, or None when a pass brought nothing.
fn streaming_stretch(arrivals: &[(Instant, u64)]) -> Option<(u64, Duration)> {
    let total = arrivals.last()?.1;
    let at = |share: u64| {
        arrivals
            .iter()
            .position(|&(_, events)| events * 10 >= total * share)
    };
    let (from, to) = (at(1)?, at(9)?);
    if to > from {
        let (start, before) = arrivals[from];
        let (end, after) = arrivals[to];
        Some((after - before, end - start))
    } else {
        // Too few batches for a stretch: first batch to last.
        let (start, before) = arrivals[0];
        let elapsed = arrivals.last()?.0 - start;
        (elapsed > Duration::ZERO).then(|| (total - before, elapsed))
    }
}

/// One of the pilot's reads, folded into the sample.
struct WindowRead {
    events: u64,
    checks: SourceChecks,
    /// The events and time of its streaming stretch.
    stretch: (u64, Duration),
    /// From its start to its first batch, if one came.
    first_batch: Option<Duration>,
    /// Its reader threads closing their consumers (`ReaderThreads::close`), which took 100 ms of
    /// most reads once their last batch was in; the next read, the scratch loads and the rest of
    /// the estimate need nothing from them, so they close meanwhile.
    closing: tokio::task::JoinHandle<()>,
}

/// Read one window of each partition in `from` and fold it into the sample.
async fn read_window<E: Send + Sync + 'static>(
    engine: &Engine<E>,
    projections: &[DynProjection<E>],
    sample: &mut Sample,
    from: Positions,
    to: Positions,
) -> Result<WindowRead> {
    let stores = &mut sample.stores;
    let targets = projections
        .iter()
        .map(|p| Target::unbounded(p.clone(), from.clone()))
        .collect();
    let config = ReaderConfig {
        topics: engine.topics.clone(),
        framing: engine.framing.clone(),
        stop_at: Some(to),
        stop_exactly: true,
        max_batch_events: Arc::new(AtomicUsize::new(engine.tuning.batch_events)),
        max_batch_bytes: None,
        max_batch_wait: Duration::from_millis(100),
        duplicate_window: reader::DUPLICATE_WINDOW,
        log_end_every: None,
        stall_timeout: engine.tuning.stall_timeout,
        index_aggregates: true,
        aggregate_index_max_bytes: None,
        measure_processing: false,
        prefetch_max_bytes: Some(16 << 20),
        // A bad record does not stop an estimate: it is counted out of the sample.
        dead_letters: true,
        fold_into: None,
    };
    let stop = Arc::new(AtomicBool::new(false));
    let pass_started = Instant::now();
    let (mut batches, readers) = reader::spawn_split(
        engine.kafka.clone(),
        engine.registry.clone(),
        targets,
        config,
        stop.clone(),
        2,
        // As many as the rebuild's, so that the pilot's pace is the rebuild's.
        engine.tuning.replay_readers,
    );
    let mut unfinished = readers.len();
    let mut events = 0;
    let mut checks = SourceChecks::default();
    let mut aggregates: Option<u64> = None;
    let mut arrivals: Vec<(Instant, u64)> = Vec::new();

    let outcome = loop {
        let Some(batch) = batches.recv().await else {
            break Err(EngineError::Interrupted);
        };
        let batch = match batch {
            Ok(b) => b,
            Err(e) => break Err(e.into()),
        };
        events += batch.events;
        arrivals.push((Instant::now(), events));

        for (((store, projection), changes), keys) in stores
            .iter_mut()
            .zip(projections)
            .zip(batch.changes)
            .zip(sample.key_counts.iter_mut())
        {
            for (at, change) in changes {
                if let (Some(counts), Some(spec)) = (
                    keys.get_mut(change.table()),
                    projection.tables().get(change.table()),
                ) {
                    let key = key_hash(change.key(spec.key_len));
                    counts.met.push((at.partition, key));
                }
                if let Err(e) = store.apply(projection.tables(), change, at) {
                    stop.store(true, std::sync::atomic::Ordering::Relaxed);
                    return Err(EngineError::Projection {
                        projection: projection.name().to_string(),
                        reason: e.to_string(),
                    });
                }
            }
        }
        if batch.done {
            // Each reader thread ends with a batch marked done, carrying its partitions' checks.
            if let Some(c) = batch.source_checks {
                checks.aggregates_started += c.aggregates_started;
                checks.aggregates =
                    Some(checks.aggregates.unwrap_or(0) + c.aggregates.unwrap_or(0));
            }
            if let Some(index) = &batch.aggregates {
                *aggregates.get_or_insert(0) += index.len() as u64;
            }
            unfinished -= 1;
            if unfinished == 0 {
                break Ok(());
            }
        }
    };
    // A pass that came in one batch (a small log, one reader) has no stretch: its whole time,
    // the brokers' first answers included, is the best there is.
    let stretch = streaming_stretch(&arrivals).unwrap_or_else(|| (events, pass_started.elapsed()));
    for counts in sample.key_counts.iter_mut().flatten() {
        counts.end_pass();
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    drop(batches);
    let closing = readers.close();
    // Where a read's time goes besides its stretch: the brokers' first answers, its last
    // partitions.
    let since_start = |at: Option<&(Instant, u64)>| {
        at.map_or(0, |(at, _)| (*at - pass_started).as_millis() as u64)
    };
    tracing::debug!(
        message = "estimate: pilot read",
        events,
        batches = arrivals.len(),
        first_batch_ms = since_start(arrivals.first()),
        last_batch_ms = since_start(arrivals.last()),
        stretch_events = stretch.0,
        stretch_ms = stretch.1.as_millis() as u64,
    );
    if let Err(e) = outcome {
        let _ = closing.await;
        return Err(e);
    }
    checks.aggregates = aggregates.or(checks.aggregates);
    Ok(WindowRead {
        events,
        checks,
        stretch,
        first_batch: arrivals.first().map(|(at, _)| *at - pass_started),
        closing,
    })
}

fn duration(seconds: f64) -> String {
    if seconds < 90.0 {
        format!("{seconds:.0} s")
    } else if seconds < 5400.0 {
        format!("{:.0} min", seconds / 60.0)
    } else {
        format!("{:.1} h", seconds / 3600.0)
    }
}

impl Estimate {
    pub fn render(&self) -> String {
        let mut s = format!(
            "estimate for {}: pilot read {} of {} events ({:.1}%) in {} windows across partitions and time, {:.1} s\n",
            self.projections.join(", "),
            self.events_sampled,
            self.events_total,
            self.sample_share * 100.0,
            self.windows,
            self.pilot_seconds
        );
        s.push_str(&format!(
            "  replay            ~{}   ({:.0} events/s read, decoded, upcast, projected and folded while the pilot's windows streamed)\n",
            duration(self.replay_seconds),
            self.events_per_second
        ));
        s.push_str(&format!(
            "  load and indexes  ~{}\n",
            duration(self.load_and_index_seconds)
        ));
        s.push_str(&format!(
            "  total             ~{}   (plus catch-up and swap)\n",
            duration(self.total_seconds)
        ));
        if let Some(a) = self.aggregates {
            s.push_str(&format!("  aggregates        ~{a}\n"));
        }
        for t in &self.tables {
            s.push_str(&format!(
                "  {:<18} ~{} rows, ~{}   (scaled {})\n",
                t.table,
                t.rows,
                size_text(t.bytes),
                t.scaled
            ));
        }
        s.push_str(&format!(
            "  memory (fold)     ~{}   (without --memory-budget; with one the rebuild spills instead)\n",
            size_text(self.fold_bytes)
        ));
        s.push_str(&format!(
            "  every figure includes a {:.0}% margin for periods denser than the sample\n",
            (self.margin - 1.0) * 100.0
        ));
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pilot_reads_its_share_but_never_fewer_than_its_least_events_nor_more_than_the_log() {
        let size = PilotSize::default();
        assert_eq!(size.share_of(100_000_000), DEFAULT_SAMPLE);
        assert_eq!(size.share_of(10_000_000), DEFAULT_SAMPLE);
        assert_eq!(size.share_of(1_000_000), 0.2);
        assert_eq!(size.share_of(200_000), 1.0);
        assert_eq!(size.share_of(20_000), 1.0);
        assert_eq!(size.share_of(0), 1.0);
        let share_only = PilotSize {
            share: 0.05,
            least_events: 0,
        };
        assert_eq!(share_only.share_of(60_000), 0.05);
    }

    #[test]
    fn many_partitions_take_one_pass_and_few_take_several_up_to_ten_of_their_least_events_each() {
        // A pilot of `n` events over a log of a billion.
        let share = |n: i64| n as f64 / 1e9;
        const LOG: i64 = 1_000_000_000;
        let plenty = share(10 * LEAST_READ_EVENTS);
        assert_eq!(pilot_passes(128, plenty, LOG), 1);
        assert_eq!(pilot_passes(200, plenty, LOG), 1);
        assert_eq!(pilot_passes(64, plenty, LOG), 2);
        assert_eq!(pilot_passes(16, plenty, LOG), 8);
        assert_eq!(pilot_passes(4, plenty, LOG), 10);
        assert_eq!(pilot_passes(1, plenty, LOG), 10);
        assert_eq!(pilot_passes(0, plenty, LOG), 10);
        // No pass under its least events: a small pilot takes fewer, and always one.
        assert_eq!(pilot_passes(16, share(2 * LEAST_READ_EVENTS), LOG), 2);
        assert_eq!(pilot_passes(16, share(2 * LEAST_READ_EVENTS - 1), LOG), 1);
        assert_eq!(pilot_passes(4, 0.05, 60_000), 1);
    }

    fn positions(pairs: &[(i32, i64)]) -> Positions {
        pairs.iter().copied().collect()
    }

    #[test]
    fn one_pass_is_read_as_its_even_then_its_odd_partitions_and_the_odd_are_timed() {
        let from = positions(&[(0, 0), (1, 10), (2, 20), (3, 30), (4, 40)]);
        let to = positions(&[(0, 5), (1, 15), (2, 25), (3, 35), (4, 45)]);
        let (reads, first_timed) = pilot_reads(vec![(from, to)]);
        assert_eq!(
            reads,
            vec![
                (
                    positions(&[(0, 0), (2, 20), (4, 40)]),
                    positions(&[(0, 5), (2, 25), (4, 45)])
                ),
                (
                    positions(&[(1, 10), (3, 30)]),
                    positions(&[(1, 15), (3, 35)])
                ),
            ]
        );
        assert_eq!(first_timed, 1);
    }

    #[test]
    fn several_passes_are_read_along_diagonals_and_the_later_half_is_timed() {
        // Three passes over partitions 0, 1 and 2: pass n's window of partition p starts at
        // n * 100 + p.
        let pass = |n: i64| {
            let at = |offset: i64| positions(&[(0, offset), (1, offset + 1), (2, offset + 2)]);
            (at(n * 100), at(n * 100 + 10))
        };
        let (reads, first_timed) = pilot_reads((0..3).map(pass).collect());
        let starts: Vec<Vec<i64>> = reads
            .iter()
            .map(|(from, _)| from.values().copied().collect())
            .collect();
        // Read j takes partition k's window of pass (j + k) mod 3: each read has every partition
        // once, and a window of every pass.
        assert_eq!(
            starts,
            vec![vec![0, 101, 202], vec![100, 201, 2], vec![200, 1, 102]]
        );
        assert_eq!(reads[1].1, positions(&[(0, 110), (1, 211), (2, 12)]));
        // Three reads: the first warms up, the other two are timed.
        assert_eq!(first_timed, 1);
        let (reads, first_timed) = pilot_reads(Vec::new());
        assert!(reads.is_empty());
        assert_eq!(first_timed, 0);
    }

    #[test]
    fn the_pace_leaves_out_the_first_answers_and_the_last_partitions() {
        let t0 = Instant::now();
        let at = |ms: u64, events: u64| (t0 + Duration::from_millis(ms), events);
        // A slow start (100 ms for the first 1,000 events), 8,000 events in 80 ms, a slow tail.
        let arrivals = [
            at(0, 500),
            at(100, 1_000),
            at(120, 3_000),
            at(140, 5_000),
            at(160, 7_000),
            at(180, 9_000),
            at(300, 9_500),
            at(400, 10_000),
        ];
        let (events, took) = streaming_stretch(&arrivals).expect("a stretch");
        assert_eq!(events, 8_000);
        assert_eq!(took, Duration::from_millis(80));
        // Too few batches for a stretch: first batch to last.
        let (events, took) =
            streaming_stretch(&[at(0, 4_000), at(50, 10_000)]).expect("first to last");
        assert_eq!((events, took), (6_000, Duration::from_millis(50)));
        assert_eq!(streaming_stretch(&[]), None);
        assert_eq!(streaming_stretch(&[at(0, 10_000)]), None);
    }

    #[test]
    fn a_key_counts_by_its_hash_and_equal_keys_hash_equal() {
        let a = [Value::Text("c-1".into()), Value::BigInt(7)];
        let b = [Value::Text("c-1".into()), Value::BigInt(7)];
        let c = [Value::Text("c-1".into()), Value::BigInt(8)];
        assert_eq!(key_hash(&a), key_hash(&b));
        assert_ne!(key_hash(&a), key_hash(&c));
    }
}
