//! Keeping builds current: read from their stored positions and apply each batch in one transaction
//! that also moves the positions. Used to catch a fresh build up to the log's head before it is
//! swapped in, and by `run` to keep active builds current.
//!
//! Every build followed is locked for writing (an advisory lock per build), so `run` and `rebuild`
//! never both write one build. `run --shared` processes hold that lock together, each following the
//! partitions its consumer group gave it: positions move compare-and-set per partition, and rows
//! that gather partitions are read and written one process at a time (see `sink::writer`). A transient database error rolls the batch back; the same batch is
//! retried on a new connection with exponential backoff and jitter, so nothing is lost or applied
//! twice.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use super::controls::{Controls, CONTROLS_CHECK_EVERY};
use super::progress::{lag, Progress, Snapshot};
use super::reader::{self, ReaderConfig, Target};
use super::{holder_name, Engine, EngineError, Result};
use crate::projection::{ChangeLog, DynProjection};
use crate::sink::catalog::{raise_positions, Positions};
use crate::sink::lock::{writer_lock_subject, AdvisoryLock, LockKind, LockMode};
use crate::sink::writer::{self, BatchWriter, BuildBatch, BuildTables};
use crate::sink::Build;

/// What a follow's consumer reads ahead of its writer: seconds of writing at the writer's pace.
const FOLLOW_PREFETCH_BYTES: usize = 64 << 20;

/// A build to keep current, and where it stands.
pub struct FollowTarget<E> {
    pub build: Build,
    pub projection: DynProjection<E>,
    pub positions: Positions,
}

#[derive(Clone, Debug)]
pub enum Until {
    /// Return once the lag to the log end is at most this many events.
    CaughtUp { lag_below: i64 },
    /// Return once exactly these positions are reached (nothing past them is applied): to line a
    /// build up with another one before comparing them.
    Reached(Positions),
    /// Return when cancelled (or when the catalog shows a build is no longer ours to write: see run).
    Cancelled,
}

pub struct FollowOutcome {
    pub positions: Vec<Positions>,
    pub events: u64,
    pub rows_written: u64,
    pub lag: Option<i64>,
    /// Bad records stored in the dead letters.
    pub dead_letters: u64,
    /// How long the writer waited for the next batch to be read: what reading costs the follow
    /// beyond what it overlaps with writing.
    pub read_wait: Duration,
    /// The most events written in one transaction (see [`super::Tuning::catch_up_batch_events`]).
    pub largest_write: u64,
}

const MAX_RETRIES: u32 = 8;

/// Whether this process writes its builds alone, or shares them with other processes, each
/// following the partitions a consumer group gave it (`run --shared`).
#[derive(Clone, Debug, Default)]
pub enum Sharing {
    #[default]
    Alone,
    /// The partitions (ids, see [`crate::source::Topics`]) this process follows.
    Partitions(BTreeSet<i32>),
}

impl Sharing {
    /// Sharing processes hold a build's writer lock together, which still keeps out whoever
    /// writes it alone (a rebuild's catch-up, `swap`, `dead-letters retry`).
    fn lock_mode(&self) -> LockMode {
        match self {
            Sharing::Alone => LockMode::Exclusive,
            Sharing::Partitions(_) => LockMode::Shared,
        }
    }

    /// The part of `positions` (or of a log end) that this process follows.
    fn restrict(&self, mut positions: Positions) -> Positions {
        if let Sharing::Partitions(mine) = self {
            positions.retain(|p, _| mine.contains(p));
        }
        positions
    }

    fn is_shared(&self) -> bool {
        matches!(self, Sharing::Partitions(_))
    }
}

/// A build's positions name partitions of the topics it was created with: following it while
/// reading other topics would misread them, and silently leave a new topic's history out.
fn check_same_topics<E>(engine: &Engine<E>, build: &crate::sink::Build) -> Result<()> {
    if build.topics == engine.topics.names() {
        return Ok(());
    }
    Err(EngineError::Projection {
        projection: build.projection.clone(),
        reason: format!(
            "build {} reads topics {}, and this command reads {}: name the build's topics (--topic), or rebuild the projection to read the new ones from offset zero",
            build.build_id,
            build.topics.join(", "),
            engine.topics
        ),
    })
}

/// Follow `targets` alone: see [`follow_sharing`].
pub async fn follow<E: Send + Sync + 'static>(
    engine: &Engine<E>,
    targets: Vec<FollowTarget<E>>,
    until: Until,
    cancel: &CancellationToken,
    label: &str,
) -> Result<FollowOutcome> {
    follow_sharing(engine, targets, until, cancel, label, &Sharing::Alone).await
}

/// Keep `targets` current until `until`, alone or, as `sharing` says, following only this
/// process's partitions beside other processes that follow the rest.
pub async fn follow_sharing<E: Send + Sync + 'static>(
    engine: &Engine<E>,
    mut targets: Vec<FollowTarget<E>>,
    until: Until,
    cancel: &CancellationToken,
    label: &str,
    sharing: &Sharing,
) -> Result<FollowOutcome> {
    for t in &targets {
        check_same_topics(engine, &t.build)?;
    }
    let holder = holder_name(label);
    let mut locks = Vec::new();
    for t in &targets {
        let subject = writer_lock_subject(&t.build);
        locks.push(
            AdvisoryLock::acquire(
                &engine.database_url,
                LockKind::Writer,
                &subject,
                &holder,
                sharing.lock_mode(),
            )
            .await?,
        );
    }
    // Positions may have moved while we waited for the locks: read them again under the locks.
    for t in &mut targets {
        t.positions = sharing.restrict(engine.catalog.positions(t.build.build_id).await?);
    }
    // The code may have changed since the build was made (a column retyped without a new
    // version): refuse before writing a row that the table would misread.
    let mut conn = engine.catalog.pool().acquire().await.map_err(|source| {
        crate::sink::SinkError::Database {
            context: "checking the tables before following".into(),
            source,
        }
    })?;
    for t in &targets {
        writer::verify_tables(&mut conn, BuildTables::of(&t.build, &t.projection)).await?;
    }
    drop(conn);
    let result = follow_locked(engine, &mut targets, until, cancel, label, sharing).await;
    for lock in locks {
        lock.release().await;
    }
    result
}

async fn follow_locked<E: Send + Sync + 'static>(
    engine: &Engine<E>,
    targets: &mut [FollowTarget<E>],
    until: Until,
    cancel: &CancellationToken,
    label: &str,
    sharing: &Sharing,
) -> Result<FollowOutcome> {
    // Nothing to catch up with (the usual case right after a replay): no reader to start, no first
    // batch to wait for. Only when nothing at all is new: a small lag within `lag_below` is still
    // read, as it was before this shortcut.
    if let Until::CaughtUp { .. } = until {
        let behind = furthest_behind(targets, &sharing.restrict(fresh_log_end(engine).await?));
        if behind == 0 {
            let tally = Tally {
                last_lag: Some(behind),
                ..Tally::default()
            };
            return Ok(finished(targets, &tally));
        }
    }
    let stop = Arc::new(AtomicBool::new(false));
    let batch_size = Arc::new(AtomicUsize::new(engine.tuning.batch_events));
    let catch_up = catch_up_limit(engine);
    let reader_targets = targets
        .iter()
        .map(|t| Target::unbounded(t.projection.clone(), t.positions.clone()))
        .collect();
    let config = ReaderConfig {
        topics: engine.topics.clone(),
        framing: engine.framing.clone(),
        stop_at: match &until {
            Until::Reached(at) => Some(at.clone()),
            _ => None,
        },
        stop_exactly: matches!(until, Until::Reached(_)),
        max_batch_events: batch_size.clone(),
        max_batch_bytes: None,
        max_batch_wait: Duration::from_millis(200),
        duplicate_window: reader::DUPLICATE_WINDOW,
        log_end_every: Some(Duration::from_millis(500)),
        stall_timeout: engine.tuning.stall_timeout,
        index_aggregates: false,
        aggregate_index_max_bytes: None,
        measure_processing: false,
        // The database paces a follow, not the log: more read-ahead would only be memory held
        // while the throttle holds the writes.
        prefetch_max_bytes: Some(FOLLOW_PREFETCH_BYTES),
        dead_letters: matches!(
            engine.tuning.bad_records,
            super::BadRecordPolicy::DeadLetter { .. }
        ),
        fold_into: None,
    };
    let (mut batches, readers) = reader::spawn_split(
        engine.kafka.clone(),
        engine.registry.clone(),
        reader_targets,
        config,
        stop.clone(),
        // Under a throttle, one batch waiting beside the one the reader builds: batches are built
        // at the size the throttle allowed when they were read, so every batch queued at full
        // speed is a full-size burst production feels once the throttle has cut the rate.
        // Unthrottled, as many as one catch-up write takes.
        catch_up.map_or(1, |limit| {
            (limit / engine.tuning.batch_events.max(1)).clamp(1, MAX_QUEUED_CATCH_UP_BATCHES)
        }),
        // One reader: a bounded read here ends at the first batch marked done, and these reads
        // are short or paced by the database.
        1,
    );
    let outcome = apply_batches(
        engine,
        targets,
        until,
        cancel,
        label,
        Feed {
            batches: &mut batches,
            batch_size,
            catch_up,
        },
        sharing,
    )
    .await;
    stop.store(true, Ordering::Relaxed);
    drop(batches);
    let _ = readers.close().await;
    outcome
}

/// Where a follow's reader queues its batches.
type BatchQueue =
    tokio::sync::mpsc::Receiver<std::result::Result<reader::Batch, reader::ReadError>>;

/// What a follow's reader hands its writer: the batches, and the size the reader builds them at
/// (which the throttle and `reproject tune` change).
struct Feed<'a> {
    batches: &'a mut BatchQueue,
    batch_size: Arc<AtomicUsize>,
    /// See [`catch_up_limit`].
    catch_up: Option<usize>,
}

/// Batches queued for one catch-up write at most: with tiny batches (`--batch-events 7`) a deep
/// queue would hold little and cost a channel slot per batch.
const MAX_QUEUED_CATCH_UP_BATCHES: usize = 64;

/// The most events a follow writes in one transaction while behind, when nothing limits its rate
/// (see [`super::Tuning::catch_up_batch_events`]); None: each batch is written on its own, in
/// slices the throttle sizes. `reproject tune` may still set a rate or a batch size later: checked
/// again per batch ([`catching_up`]).
fn catch_up_limit<E>(engine: &Engine<E>) -> Option<usize> {
    let limit = engine.tuning.catch_up_batch_events;
    (engine.governor.is_none()
        && engine.tuning.max_rate.is_none()
        && limit > engine.tuning.batch_events)
        .then_some(limit)
}

/// Whether the next batch may take in the batches queued behind it: `reproject tune` has set
/// neither a rate nor a batch size since the follow started.
fn catching_up(limit: Option<usize>, controls: &Controls) -> Option<usize> {
    let live = controls.live();
    limit.filter(|_| live.max_rate.is_none() && live.batch_events.is_none())
}

/// Join the batches already queued behind `batch` into it, while it holds fewer than `limit`
/// events: what the reader read while the writer was busy, written in one transaction. Never
/// waits for a batch; stops after a bounded read's last one.
fn take_queued(batches: &mut BatchQueue, batch: &mut reader::Batch, limit: usize) -> Result<()> {
    // Per target, the logs of the batches joined, appended at the end in one go.
    let mut later: Vec<Vec<ChangeLog>> = batch.changes.iter().map(|_| Vec::new()).collect();
    while !batch.done && (batch.events as usize) < limit {
        let Ok(next) = batches.try_recv() else {
            break;
        };
        let next = next?;
        for (logs, log) in later.iter_mut().zip(next.changes) {
            logs.push(log);
        }
        raise_positions(&mut batch.next, next.next);
        batch.events += next.events;
        batch.bytes += next.bytes;
        batch.change_bytes += next.change_bytes;
        if next.log_end.is_some() {
            batch.log_end = next.log_end;
        }
        batch.done = next.done;
        batch.dead_letters.extend(next.dead_letters);
        batch.processing += next.processing;
        // What only a bounded read's last batch carries (a follow asks for none of it today).
        if next.aggregates.is_some() {
            batch.aggregates = next.aggregates;
        }
        if next.source_checks.is_some() {
            batch.source_checks = next.source_checks;
        }
    }
    for (log, later) in batch.changes.iter_mut().zip(later) {
        log.append_all(later);
    }
    Ok(())
}

async fn apply_batches<E: Send + Sync + 'static>(
    engine: &Engine<E>,
    targets: &mut [FollowTarget<E>],
    until: Until,
    cancel: &CancellationToken,
    label: &str,
    feed: Feed<'_>,
    sharing: &Sharing,
) -> Result<FollowOutcome> {
    let Feed {
        batches,
        batch_size,
        catch_up,
    } = feed;
    // A writer (a connection, a transaction per slice) per build: the builds' writes run side by
    // side on the server, and beside the fold of the next build's share.
    let shared = sharing.is_shared();
    let mut writers = Vec::with_capacity(targets.len());
    for _ in targets.iter() {
        writers.push(connect_writer(engine, targets.len(), shared).await?);
    }
    let mut progress = Progress::new(label.to_string(), None, false);
    let mut tally = Tally::default();
    let mut log_end = Positions::new();
    let mut last_snapshot = Instant::now() - Duration::from_secs(60);
    let mut last_controls_check = Instant::now() - Duration::from_secs(60);
    let writer_name = holder_name(label);
    let names: Vec<&str> = targets.iter().map(|t| t.projection.name()).collect();
    // The size of a slice: the batch size the throttle's rate allows now (see `limit_batches`).
    let slice_limit = batch_size.clone();
    let mut controls = Controls::new(&names, batch_size, &engine.tuning);
    loop {
        // `reproject pause` and `reproject tune` take effect here, between batches: nothing is
        // half-applied.
        if last_controls_check.elapsed() >= CONTROLS_CHECK_EVERY {
            controls.refresh(&engine.catalog).await?;
            wait_while_paused(engine, &mut controls, targets, &writer_name, cancel).await?;
            last_controls_check = Instant::now();
        }
        wait_while_throttled(engine, &mut controls, targets, &writer_name, cancel).await?;
        let waiting = Instant::now();
        let mut batch = tokio::select! {
            _ = cancel.cancelled() => {
                progress.finish();
                return Ok(finished(targets, &tally));
            }
            next = batches.recv() => match next {
                Some(batch) => batch?,
                None => return Err(EngineError::Interrupted),
            },
        };
        tally.read_wait += waiting.elapsed();
        let joining = catching_up(catch_up, &controls);
        if let Some(limit) = joining {
            take_queued(batches, &mut batch, limit)?;
        }
        let last = batch.done;
        if let Some(end) = &batch.log_end {
            log_end = sharing.restrict(end.clone());
        }
        let nexts: Vec<Positions> = targets
            .iter()
            .map(|t| {
                let mut next = t.positions.clone();
                raise_positions(&mut next, &batch.next);
                next
            })
            .collect();
        // Each target's share of the batch's dead letters, within its budget.
        let mut letters: Vec<Vec<&reader::DeadLetter>> = vec![Vec::new(); targets.len()];
        for letter in &batch.dead_letters {
            for &i in &letter.targets {
                if let Some(list) = letters.get_mut(i) {
                    list.push(letter);
                }
            }
        }
        for ((t, new), writer) in targets.iter().zip(&letters).zip(&mut writers) {
            if !new.is_empty() {
                let held = writer.dead_letter_count(t.build.build_id).await?;
                reader::check_dead_letter_budget(
                    engine.tuning.bad_records,
                    t.projection.name(),
                    t.build.build_id,
                    held,
                    new,
                )?;
            }
        }
        let stored: Vec<Vec<_>> = letters
            .iter()
            .map(|list| list.iter().map(|l| l.stored()).collect())
            .collect();
        // The batch goes in slices of what the throttle allows now: a batch read at full speed
        // just before production arrived is not written in one burst beside it. Each slice
        // commits with the positions of its last events; the dead letters go with the first
        // (stored once however often it is written).
        let mut unwritten = Unwritten::new(batch.changes, batch.events);
        let mut last_slice_events = 0;
        let mut letters_stored = vec![false; targets.len()];
        loop {
            let from: Vec<&Positions> = targets.iter().map(|t| &t.positions).collect();
            // Caught up or not, an unthrottled batch goes in whole: it holds at most what one
            // catch-up write may.
            let limit = match joining {
                Some(_) => u64::MAX,
                None => slice_limit.load(Ordering::Relaxed) as u64,
            };
            let Some(slice) = unwritten.take(limit, &from, &nexts) else {
                break;
            };
            let with: Vec<&[_]> = stored
                .iter()
                .zip(&letters_stored)
                .map(|(letters, done)| if *done { &[][..] } else { &letters[..] })
                .collect();
            let written = write_slice(
                engine,
                &mut writers,
                targets,
                &slice,
                &with,
                &log_end,
                shared,
            )
            .await?;
            for (i, (t, rows)) in targets.iter_mut().zip(&written).enumerate() {
                if let Some(rows) = rows {
                    tally.rows_written += rows;
                    t.positions = slice.next[i].clone();
                    if !letters_stored[i] {
                        tally.dead_letters += stored[i].len() as u64;
                        letters_stored[i] = true;
                    }
                }
            }
            if written.iter().all(Option::is_some) {
                tally.events += slice.events;
                tally.largest_write = tally.largest_write.max(slice.events);
                for t in targets.iter() {
                    super::metrics::events_applied(t.projection.name(), "follow", slice.events);
                }
                if let Some(governor) = engine.governor.as_deref() {
                    if !unwritten.is_empty() {
                        governor.pace(slice.events).await;
                    } else {
                        // The last slice is paced once positions, lag and progress are out.
                        last_slice_events = slice.events;
                    }
                }
            } else {
                // Cut short by the throttle and rolled back, for some builds at least: their
                // shares are written again once writes may go on.
                let committed: Vec<bool> = written.iter().map(Option::is_some).collect();
                unwritten.put_back(slice, &committed);
            }
            if unwritten.is_empty() {
                break;
            }
            wait_while_throttled(engine, &mut controls, targets, &writer_name, cancel).await?;
            if cancel.is_cancelled() {
                progress.finish();
                return Ok(finished(targets, &tally));
            }
        }
        for (t, next) in targets.iter_mut().zip(nexts) {
            // Positions past the last slice's events: records that emitted nothing.
            t.positions = next;
        }
        if !log_end.is_empty() {
            for t in targets.iter() {
                for (p, end) in &log_end {
                    let at = t.positions.get(p).copied().unwrap_or(0);
                    super::metrics::lag(
                        t.projection.name(),
                        engine.topics.topic_of(*p),
                        engine.topics.partition_of(*p),
                        (end - at).max(0),
                    );
                }
            }
        }
        let min_lag = targets.iter().map(|t| lag(&t.positions, &log_end)).max();
        if !log_end.is_empty() {
            tally.last_lag = min_lag;
        }
        progress.update(tally.events, tally.last_lag);
        if last_snapshot.elapsed() >= Duration::from_secs(2) {
            last_snapshot = Instant::now();
            for t in targets.iter() {
                let snap = Snapshot::new(
                    "following",
                    tally.events,
                    progress.elapsed(),
                    &t.positions,
                    &log_end,
                );
                let mut json = snap.to_json();
                if let (Some(decision), Some(map)) = (
                    engine.governor.as_ref().and_then(|g| g.last()),
                    json.as_object_mut(),
                ) {
                    map.insert("throttle".into(), decision.summary());
                }
                engine
                    .catalog
                    .write_progress(t.build.build_id, &writer_name, &json)
                    .await;
                if let Sharing::Partitions(mine) = sharing {
                    // One line per process in `status`: the build's progress is the last writer's.
                    let partitions: Vec<i32> = mine.iter().copied().collect();
                    let rate = tally.events as f64 / progress.elapsed().as_secs_f64().max(1e-3);
                    crate::sink::catalog::record_worker(
                        engine.catalog.pool(),
                        t.build.build_id,
                        &writer_name,
                        &partitions,
                        tally.events,
                        rate,
                    )
                    .await?;
                }
            }
        }
        // Paced after the batch's positions, lag and progress are out: what is committed shows at
        // once, however long the throttle or the cap holds the next batch.
        if batch.events > 0 {
            if let Some(governor) = engine.governor.as_deref() {
                governor.pace(last_slice_events).await;
            } else if let Some(rate) = controls
                .live()
                .max_rate
                .or(engine.tuning.max_rate)
                .filter(|r| *r > 0)
            {
                // Hold the average at the cap: sleep until this many events are due.
                let due = Duration::from_secs_f64(tally.events as f64 / rate as f64);
                if let Some(wait) = due.checked_sub(progress.elapsed()) {
                    tokio::time::sleep(wait).await;
                }
            }
        }
        let reached = last && matches!(until, Until::Reached(_));
        let caught_up = if let (Until::CaughtUp { lag_below }, Some(l)) = (&until, tally.last_lag) {
            let lag_below = *lag_below;
            // A batch's log end was measured when it was read; batches may have waited since. Ask
            // the brokers again before calling it caught up.
            let confirmed = l <= lag_below && !log_end.is_empty() && {
                // ListOffsets now, but never below what the reader's fetches last reported (kept in
                // `log_end`): a broker whose two answers disagree must not make this short.
                let mut fresh = sharing.restrict(fresh_log_end(engine).await?);
                raise_positions(&mut fresh, &log_end);
                let fresh_lag = furthest_behind(targets, &fresh);
                log_end = fresh;
                tally.last_lag = Some(fresh_lag);
                fresh_lag <= lag_below
            };
            confirmed
        } else {
            false
        };
        if reached || caught_up {
            progress.finish();
            return Ok(finished(targets, &tally));
        }
    }
}

/// Where a follow ended: the targets' positions and what it did.
fn finished<E>(targets: &[FollowTarget<E>], tally: &Tally) -> FollowOutcome {
    FollowOutcome {
        read_wait: tally.read_wait,
        positions: targets.iter().map(|t| t.positions.clone()).collect(),
        events: tally.events,
        rows_written: tally.rows_written,
        lag: tally.last_lag,
        dead_letters: tally.dead_letters,
        largest_write: tally.largest_write,
    }
}

/// What a follow has done so far.
#[derive(Default)]
struct Tally {
    events: u64,
    rows_written: u64,
    dead_letters: u64,
    read_wait: Duration,
    last_lag: Option<i64>,
    largest_write: u64,
}

/// While the throttle holds writes, wait, recording it in the builds' progress; then size the
/// batches (and slices) to the rate it allows.
async fn wait_while_throttled<E: Send + Sync + 'static>(
    engine: &Engine<E>,
    controls: &mut Controls,
    targets: &[FollowTarget<E>],
    writer_name: &str,
    cancel: &CancellationToken,
) -> Result<()> {
    let Some(governor) = engine.governor.as_deref() else {
        return Ok(());
    };
    governor.set_live(controls.live());
    while governor.holds_writes() && !cancel.is_cancelled() {
        let snap = serde_json::json!({
            "phase": "throttled",
            "throttle": governor.last().map(|d| d.summary()),
        });
        for target in targets {
            engine
                .catalog
                .write_progress(target.build.build_id, writer_name, &snap)
                .await;
        }
        tokio::select! {
            _ = cancel.cancelled() => {}
            _ = governor.next_decision() => {}
        }
        controls.refresh(&engine.catalog).await?;
        governor.set_live(controls.live());
    }
    controls.limit_batches(governor.rate());
    Ok(())
}

/// What is left to write of a batch: per target, the changes of the events not yet written.
struct Unwritten {
    changes: Vec<ChangeLog>,
    events: u64,
}

/// A run of a batch's events written in one transaction: per target its changes and where its
/// positions stand once they are in.
struct Slice {
    changes: Vec<ChangeLog>,
    next: Vec<Positions>,
    events: u64,
}

impl Unwritten {
    fn new(changes: Vec<ChangeLog>, events: u64) -> Unwritten {
        Unwritten { changes, events }
    }

    fn is_empty(&self) -> bool {
        self.events == 0
    }

    /// The next slice of at most `limit` of the batch's events (the rest, when that is all there
    /// is): of each target, the same share of the events it recorded, its positions (`from`)
    /// moved past them. `whole` is where each target's positions stand after the whole batch.
    fn take(&mut self, limit: u64, from: &[&Positions], whole: &[Positions]) -> Option<Slice> {
        if self.events == 0 {
            return None;
        }
        let nothing_recorded = self.changes.iter().all(|log| log.event_count() == 0);
        if self.events <= limit.max(1) || nothing_recorded {
            return Some(Slice {
                changes: self.changes.iter_mut().map(std::mem::take).collect(),
                next: whole.to_vec(),
                events: std::mem::take(&mut self.events),
            });
        }
        let share = limit as f64 / self.events as f64;
        let changes: Vec<ChangeLog> = self
            .changes
            .iter_mut()
            .map(|log| {
                let first = (log.event_count() as f64 * share).ceil() as usize;
                let rest = log.split_off_events(first);
                std::mem::replace(log, rest)
            })
            .collect();
        let next = from
            .iter()
            .zip(&changes)
            .map(|(from, log)| {
                let mut next = (*from).clone();
                raise_positions(
                    &mut next,
                    log.times().map(|at| (at.partition, at.offset + 1)),
                );
                next
            })
            .collect();
        self.events -= limit;
        Some(Slice {
            changes,
            next,
            events: limit,
        })
    }

    /// A slice that was not written goes back in front of the rest, but for the targets whose
    /// share of it `committed`.
    fn put_back(&mut self, slice: Slice, committed: &[bool]) {
        for ((log, mut earlier), committed) in
            self.changes.iter_mut().zip(slice.changes).zip(committed)
        {
            if !committed {
                earlier.append(std::mem::take(log));
                *log = earlier;
            }
        }
        self.events += slice.events;
    }
}

/// A new writer for one of a follow's `writers` builds, keeping its share of what the tuning says
/// the follow may keep of what it commits; `shared` when other processes write the builds too.
async fn connect_writer<E>(
    engine: &Engine<E>,
    writers: usize,
    shared: bool,
) -> Result<BatchWriter> {
    let writer = BatchWriter::connect(&engine.database_url)
        .await?
        .keeping_known_rows(engine.tuning.known_rows_bytes / writers.max(1));
    Ok(if shared {
        writer.shared_with_other_processes()
    } else {
        writer
    })
}

/// Write a slice, each build's share in a transaction of its own (on its own writer, side by side)
/// that also moves that build's positions, retrying transient errors on a new connection. Returns
/// per build the rows written, or None when the throttle held writes before that build's share
/// committed: its transaction is stopped there and rolled back (production does not wait for the
/// end of a batch begun at full speed), to be written again once writes may go on.
async fn write_slice<E: Send + Sync + 'static>(
    engine: &Engine<E>,
    writers: &mut [BatchWriter],
    targets: &[FollowTarget<E>],
    slice: &Slice,
    dead_letters: &[&[crate::sink::dead_letters::NewDeadLetter<'_>]],
    log_end: &Positions,
    shared: bool,
) -> Result<Vec<Option<u64>>> {
    let shares = writers
        .iter_mut()
        .zip(targets)
        .zip(&slice.next)
        .zip(&slice.changes)
        .zip(dead_letters)
        .map(|((((writer, t), next), changes), dead_letters)| {
            let share = BuildBatch {
                tables: BuildTables::of(&t.build, &t.projection),
                changes,
                dead_letters,
                expected: &t.positions,
                next,
                log_end,
            };
            write_share(engine, writer, share, slice.events, targets.len(), shared)
        });
    futures::future::try_join_all(shares).await
}

/// One build's share of a slice: see [`write_slice`].
async fn write_share<E: Send + Sync + 'static>(
    engine: &Engine<E>,
    writer: &mut BatchWriter,
    share: BuildBatch<'_>,
    events: u64,
    builds: usize,
    shared: bool,
) -> Result<Option<u64>> {
    let mut attempt = 0;
    loop {
        let started = Instant::now();
        let backend = writer.backend_pid();
        let applied = match engine.governor.as_deref() {
            Some(governor) => {
                let apply = writer.apply(&share);
                tokio::pin!(apply);
                tokio::select! {
                    biased;
                    applied = &mut apply => Some(applied),
                    _ = governor.until_held() => None,
                }
            }
            None => Some(writer.apply(&share).await),
        };
        match applied {
            Some(Ok(rows)) => {
                super::metrics::batch_duration("follow", started.elapsed().as_secs_f64());
                return Ok(Some(rows));
            }
            None => {
                writer::stop_backend(engine.catalog.pool(), backend).await?;
                // The commit may have gone through just before the stop: the positions say.
                let moved = *share.next != *share.expected;
                let stored = engine.catalog.positions(share.tables.build_id).await?;
                let committed = moved && share.next.iter().all(|(p, o)| stored.get(p) == Some(o));
                super::metrics::batch_cut_short();
                tracing::info!(
                    message = "throttle: writes held in the middle of a batch; stopped it there",
                    projection = share.tables.projection,
                    events,
                    committed,
                    held_after_ms = started.elapsed().as_millis() as u64
                );
                *writer = connect_writer(engine, builds, shared).await?;
                return Ok(committed.then_some(0));
            }
            Some(Err(e)) if e.is_retriable() && attempt < MAX_RETRIES => {
                super::metrics::error("database_retry");
                attempt += 1;
                let delay = crate::sink::backoff(attempt);
                tracing::warn!(message = "batch failed; retrying on a new connection", projection = share.tables.projection, error = %e, attempt, delay_ms = delay.as_millis() as u64);
                tokio::time::sleep(delay).await;
                match connect_writer(engine, builds, shared).await {
                    Ok(w) => *writer = w,
                    Err(e) => tracing::warn!(message = "reconnecting failed", error = %e),
                }
            }
            Some(Err(e)) => return Err(e.into()),
        }
    }
}

/// While any of the projections is paused (as `controls` last read), wait, recording it in the
/// builds' progress, until none is or until cancelled.
async fn wait_while_paused<E: Send + Sync + 'static>(
    engine: &Engine<E>,
    controls: &mut Controls,
    targets: &[FollowTarget<E>],
    writer_name: &str,
    cancel: &CancellationToken,
) -> Result<()> {
    let mut recorded = false;
    while !controls.paused().is_empty() && !cancel.is_cancelled() {
        if !recorded {
            let snap = serde_json::json!({"phase": "paused", "paused": controls.paused()});
            for t in targets {
                engine
                    .catalog
                    .write_progress(t.build.build_id, writer_name, &snap)
                    .await;
            }
            recorded = true;
        }
        tokio::select! {
            _ = cancel.cancelled() => {}
            _ = tokio::time::sleep(CONTROLS_CHECK_EVERY) => {}
        }
        controls.refresh(&engine.catalog).await?;
    }
    Ok(())
}

/// The lag of the target furthest behind `log_end`.
fn furthest_behind<E>(targets: &[FollowTarget<E>], log_end: &Positions) -> i64 {
    targets
        .iter()
        .map(|t| lag(&t.positions, log_end))
        .max()
        .unwrap_or(0)
}

async fn fresh_log_end<E: Send + Sync + 'static>(engine: &Engine<E>) -> Result<Positions> {
    Ok(engine.log_bounds("reproject-lag").await?.end)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::projection::{Changes, LogicalTime, Value};

    /// A target's changes: one per event at `offsets` of partition `offset % 2`.
    fn recorded(offsets: impl IntoIterator<Item = i64>) -> ChangeLog {
        let mut log = ChangeLog::default();
        let mut changes = Changes::default();
        for offset in offsets {
            changes.add(0, crate::key![Value::text("k")], 1, offset);
            let at = LogicalTime {
                occurred_at_micros: offset,
                partition: (offset % 2) as i32,
                offset: offset / 2,
            };
            assert!(log.record(at, &mut changes));
        }
        log
    }

    /// A reader's batch of `events` one-change events from `first`, per target, ending each
    /// partition at `next`.
    fn batch(first: i64, events: i64, next: &[(i32, i64)], done: bool) -> reader::Batch {
        reader::Batch {
            changes: vec![
                recorded(first..first + events),
                recorded(first..first + events),
            ],
            next: next.iter().copied().collect(),
            events: events as u64,
            done,
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn queued_batches_join_the_one_taken_in_log_order_up_to_the_limit_and_never_past_the_last(
    ) {
        let (tx, mut queue) = tokio::sync::mpsc::channel(8);
        for queued in [
            batch(10, 10, &[(0, 8), (1, 7)], false),
            batch(20, 10, &[(0, 13), (1, 12)], false),
            batch(30, 10, &[(0, 18), (1, 17)], false),
        ] {
            tx.send(Ok(queued)).await.expect("queue a batch");
        }
        let mut taken = batch(0, 10, &[(0, 3), (1, 2)], false);
        take_queued(&mut queue, &mut taken, 25).expect("join the queued batches");
        // 10 events, then 20: below 25, so the next one joins too; at 30 it stops there.
        assert_eq!(taken.events, 30);
        assert_eq!(
            taken.next,
            [(0, 13), (1, 12)].into_iter().collect::<Positions>()
        );
        for log in &taken.changes {
            let offsets: Vec<i64> = log.times().map(|at| at.occurred_at_micros).collect();
            assert_eq!(offsets, (0..30).collect::<Vec<_>>());
        }

        // The last batch of a bounded read ends the join, whatever is queued behind it.
        tx.send(Ok(batch(40, 10, &[(0, 23), (1, 22)], true)))
            .await
            .expect("queue a last batch");
        tx.send(Ok(batch(50, 10, &[(0, 28), (1, 27)], false)))
            .await
            .expect("queue a batch past it");
        let mut taken = batch(30, 0, &[], false);
        take_queued(&mut queue, &mut taken, 1_000).expect("join up to the last batch");
        assert!(taken.done);
        // The batch left queued by the first join, and the last one.
        assert_eq!(taken.events, 20);
        let behind = queue.try_recv().expect("a batch left queued");
        assert_eq!(behind.expect("a batch").events, 10);

        // Nothing queued: the batch taken is left as it is, without waiting.
        let mut alone = batch(60, 5, &[(0, 31)], false);
        take_queued(&mut queue, &mut alone, 1_000).expect("nothing to join");
        assert_eq!(alone.events, 5);
    }

    #[test]
    fn a_batch_in_slices_moves_each_target_s_positions_exactly_past_the_events_written() {
        // Twenty events over two partitions; one target records every event, the other every
        // third (the rest emit nothing for it).
        let logs = vec![recorded(0..20), recorded((0..20).step_by(3))];
        let start: Positions = [(0, 0), (1, 0)].into();
        let whole: Positions = [(0, 10), (1, 10)].into();
        let mut unwritten = Unwritten::new(logs.clone(), 20);
        let mut at = vec![start.clone(), start.clone()];
        let mut written: Vec<ChangeLog> = vec![ChangeLog::default(), ChangeLog::default()];
        let mut sizes = Vec::new();
        let mut later = logs.clone();
        while let Some(slice) = {
            let from: Vec<&Positions> = at.iter().collect();
            unwritten.take(6, &from, &[whole.clone(), whole.clone()])
        } {
            sizes.push(slice.events);
            for (target, (log, next)) in slice.changes.into_iter().zip(slice.next).enumerate() {
                // Every event of this slice and before lies below the positions; every later one
                // at or above them: a restart from them reads each event exactly once.
                let rest = later[target].split_off_events(log.event_count());
                later[target] = rest;
                for t in log.times().chain(written[target].times()) {
                    assert!(t.offset < next[&t.partition], "{t:?} is before {next:?}");
                }
                for t in later[target].times() {
                    assert!(t.offset >= next[&t.partition], "{t:?} is after {next:?}");
                }
                written[target].append(log);
                at[target] = next;
            }
        }
        assert_eq!(sizes, [6, 6, 6, 2]);
        assert_eq!(written, logs, "the slices are the batch, in order");
        assert_eq!(
            at,
            [whole.clone(), whole],
            "the last slice ends at the batch's end"
        );
    }

    #[test]
    fn a_slice_cut_short_goes_back_in_front_of_the_rest() {
        let logs = vec![recorded(0..10)];
        let start: Positions = [(0, 0), (1, 0)].into();
        let whole: Positions = [(0, 5), (1, 5)].into();
        let mut unwritten = Unwritten::new(logs.clone(), 10);
        let first = unwritten
            .take(4, &[&start], std::slice::from_ref(&whole))
            .expect("a slice");
        unwritten.put_back(first, &[false]);
        // Written again at a smaller size, it is the same batch from its first event.
        let mut again = Vec::new();
        while let Some(slice) = unwritten.take(3, &[&start], std::slice::from_ref(&whole)) {
            again.push(slice.changes.into_iter().next().expect("one target"));
        }
        let mut joined = ChangeLog::default();
        for log in again {
            joined.append(log);
        }
        assert_eq!(vec![joined], logs);
        assert!(unwritten.is_empty());
    }

    #[test]
    fn a_slice_cut_short_for_one_build_goes_back_for_that_build_only() {
        let logs = vec![recorded(0..10), recorded(0..10)];
        let start: Positions = [(0, 0), (1, 0)].into();
        let whole: Positions = [(0, 5), (1, 5)].into();
        let mut unwritten = Unwritten::new(logs.clone(), 10);
        let first = unwritten
            .take(4, &[&start, &start], &[whole.clone(), whole.clone()])
            .expect("a slice");
        let committed_first = first.changes[0].clone();
        let after_first = first.next[0].clone();
        // The first build's share committed; the second's was stopped and rolled back.
        unwritten.put_back(first, &[true, false]);
        let mut again = [ChangeLog::default(), ChangeLog::default()];
        while let Some(slice) = unwritten.take(
            100,
            &[&after_first, &start],
            &[whole.clone(), whole.clone()],
        ) {
            for (log, share) in again.iter_mut().zip(slice.changes) {
                log.append(share);
            }
        }
        let mut first_build = committed_first;
        first_build.append(std::mem::take(&mut again[0]));
        assert_eq!(
            first_build, logs[0],
            "the committed share is not written twice"
        );
        assert_eq!(
            again[1], logs[1],
            "the stopped share is written again, whole"
        );
        assert!(unwritten.is_empty());
    }
}
