//! `estimate`: what a rebuild will take, from a pilot over about 1% of the log, before starting it.
//!
//! The pilot reads short windows spread over every partition and over time (the start, the end and
//! evenly between), through the same decoding, upcasters, projections and fold as a rebuild. The
//! folded rows are bulk-loaded and indexed in a scratch schema inside a transaction that is rolled
//! back, to measure the load's speed and the bytes per row on this database: nothing is written to
//! projection tables or the catalog.
//!
//! Scaling up: events and time scale with the share of the log read. Rows of a table whose rows
//! each come from one aggregate scale with the number of aggregates, estimated from the events
//! that start one (sequence 1); rows of other tables (per customer, per day) from how often the
//! sample met each key (the larger of the GEE and Chao1 estimators). The replay's speed is the pilot's processing speed
//! (decode, upcast, project, fold); Kafka's fetch time is not in it. Every figure gets a 20% margin
//! for periods denser than the sample.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sqlx::Connection;

use super::reader::{self, ReaderConfig, SourceChecks, Target};
use super::{Engine, EngineError, Result};
use crate::projection::{DynProjection, Key, RowStore};
use crate::sink::catalog::Positions;
use crate::sink::writer::{self, BuildTables};
use crate::sink::Context;

/// Windows read per partition.
const WINDOWS: i64 = 10;
/// The margin added for periods denser than the sample.
pub const MARGIN: f64 = 1.2;

#[derive(Clone, Debug, serde::Serialize)]
pub struct Estimate {
    pub projections: Vec<String>,
    pub events_total: i64,
    pub events_sampled: u64,
    pub sample_share: f64,
    pub windows: usize,
    pub pilot_seconds: f64,
    /// Decode, upcast, project and fold, as measured in the pilot.
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
    share: f64,
) -> Result<Estimate> {
    let projections = names
        .iter()
        .map(|n| engine.projection(n))
        .collect::<Result<Vec<_>>>()?;
    for p in &projections {
        engine.schemas.load(p.name(), p.version())?;
    }
    let bounds = engine.log_bounds("reproject-estimate").await?;
    let events_total: i64 = bounds
        .end
        .iter()
        .map(|(p, e)| e - bounds.start.get(p).copied().unwrap_or(0))
        .sum();

    // Window i of every partition is read in pass i: windows spread evenly from start to end.
    let partitions = bounds.end.len() as i64;
    let mut passes: Vec<(Positions, Positions)> = Vec::new();
    for i in 0..WINDOWS {
        let (mut from, mut to) = (Positions::new(), Positions::new());
        for (index, (&p, &end)) in bounds.end.iter().enumerate() {
            let index = index as i64;
            let start = bounds.start.get(&p).copied().unwrap_or(0);
            let range = end - start;
            let window = ((range as f64 * share / WINDOWS as f64).ceil() as i64).min(range);
            // Staggered by partition, so that together the partitions' windows cover
            // WINDOWS x partitions points in time rather than WINDOWS.
            let slots = WINDOWS * partitions - 1;
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
            .map(|p| vec![HashMap::new(); p.tables().len()])
            .collect(),
        reader_busy: Duration::ZERO,
        fold_busy: Duration::ZERO,
    };
    let mut sampled = 0u64;
    let mut checks = SourceChecks::default();
    let pilot_started = Instant::now();
    for (from, to) in passes {
        let (events, pass_checks) =
            read_window(engine, &projections, &mut sample, from, to).await?;
        sampled += events;
        checks.aggregates_started += pass_checks.aggregates_started;
        checks.aggregates =
            Some(checks.aggregates.unwrap_or(0) + pass_checks.aggregates.unwrap_or(0));
    }
    // The reader thread and the fold thread of a rebuild work side by side: the slower one sets
    // the pace. Fetching from Kafka is not in it (the pilot's windows are too short to measure it).
    let busy = sample.reader_busy.max(sample.fold_busy);
    let stores = &sample.stores;
    let pilot_seconds = pilot_started.elapsed().as_secs_f64();
    let scale = if sampled > 0 {
        events_total as f64 / sampled as f64
    } else {
        0.0
    };
    let events_per_second = sampled as f64 / busy.as_secs_f64().max(1e-6);
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
                    let counts = key_counts.get(i);
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
    let replay_seconds = events_total as f64 / events_per_second.max(1.0) * MARGIN;
    Ok(Estimate {
        projections: projections.iter().map(|p| p.name().to_string()).collect(),
        events_total,
        events_sampled: sampled,
        sample_share: if events_total > 0 {
            sampled as f64 / events_total as f64
        } else {
            0.0
        },
        windows: (WINDOWS as usize) * bounds.end.len(),
        pilot_seconds,
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

/// What the pilot gathered: the folded rows, how often each key was touched, and time spent.
struct Sample {
    stores: Vec<RowStore>,
    /// Per projection and table: changes per key.
    key_counts: Vec<Vec<HashMap<Key, u32>>>,
    reader_busy: Duration,
    fold_busy: Duration,
}

/// Read one window of every partition and fold it into the sample; returns events and source checks.
async fn read_window<E: Send + Sync + 'static>(
    engine: &Engine<E>,
    projections: &[DynProjection<E>],
    sample: &mut Sample,
    from: Positions,
    to: Positions,
) -> Result<(u64, SourceChecks)> {
    let stores = &mut sample.stores;
    let targets = projections
        .iter()
        .map(|p| Target {
            projection: p.clone(),
            positions: from.clone(),
        })
        .collect();
    let config = ReaderConfig {
        topics: engine.topics.clone(),
        framing: engine.framing.clone(),
        stop_at: Some(to),
        stop_exactly: true,
        max_batch_events: Arc::new(AtomicUsize::new(engine.tuning.batch_events)),
        max_batch_wait: Duration::from_millis(100),
        log_end_every: None,
        stall_timeout: engine.tuning.stall_timeout,
        index_aggregates: true,
        aggregate_index_max_bytes: None,
        measure_processing: true,
        prefetch_max_bytes: Some(16 << 20),
        // A bad record does not stop an estimate: it is counted out of the sample.
        dead_letters: true,
    };
    let stop = Arc::new(AtomicBool::new(false));
    let (mut batches, readers) = reader::spawn_split(
        engine.kafka.clone(),
        engine.registry.clone(),
        targets,
        config,
        stop.clone(),
        2,
        // One reader: a bounded read here ends at the first batch marked done, and these reads
        // are short or paced by the database.
        1,
    );
    let mut events = 0;
    let mut checks = SourceChecks::default();
    let mut aggregates: Option<u64> = None;
    let outcome = loop {
        let Some(batch) = batches.recv().await else {
            break Err(EngineError::Interrupted);
        };
        let batch = match batch {
            Ok(b) => b,
            Err(e) => break Err(e.into()),
        };
        events += batch.events;
        sample.reader_busy += batch.processing;
        let folding = Instant::now();
        for (((store, projection), changes), keys) in stores
            .iter_mut()
            .zip(projections)
            .zip(batch.changes)
            .zip(sample.key_counts.iter_mut())
        {
            let mut previous: Vec<Option<Key>> = vec![None; projection.tables().len()];
            for (at, change) in changes {
                // One event often makes several changes to one row: count a key once per run
                // of changes, so that the counts are about events.
                if let (Some(counts), Some(spec)) = (
                    keys.get_mut(change.table()),
                    projection.tables().get(change.table()),
                ) {
                    let key = change.key(spec.key_len);
                    let last = &mut previous[change.table()];
                    if last.as_deref() != Some(key) {
                        *counts.entry(Key::from(key)).or_insert(0) += 1;
                        *last = Some(Key::from(key));
                    }
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
        sample.fold_busy += folding.elapsed();
        if batch.done {
            if let Some(c) = batch.source_checks {
                checks = c;
            }
            aggregates = batch.aggregates.as_ref().map(|index| index.len() as u64);
            break Ok(());
        }
    };
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    drop(batches);
    let _ = tokio::task::spawn_blocking(move || readers.join()).await;
    outcome?;
    checks.aggregates = aggregates.or(checks.aggregates);
    Ok((events, checks))
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

fn bytes(n: u64) -> String {
    let n = n as f64;
    if n >= 1e9 {
        format!("{:.1} GB", n / 1e9)
    } else if n >= 1e6 {
        format!("{:.0} MB", n / 1e6)
    } else {
        format!("{:.0} kB", n / 1e3)
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
            "  replay            ~{}   ({:.0} events/s decoded, upcast, projected and folded in the pilot; Kafka fetch time not included)\n",
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
                bytes(t.bytes),
                t.scaled
            ));
        }
        s.push_str(&format!(
            "  memory (fold)     ~{}   (without --memory-budget; with one the rebuild spills instead)\n",
            bytes(self.fold_bytes)
        ));
        s.push_str(&format!(
            "  every figure includes a {:.0}% margin for periods denser than the sample\n",
            (self.margin - 1.0) * 100.0
        ));
        s
    }
}
