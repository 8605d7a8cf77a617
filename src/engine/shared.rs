//! `rebuild --shared`: one build of each projection, replayed by every process started on it, on
//! this machine or many.
//!
//! 1. One process at a time (an advisory lock), each finds the shared build of each projection, a
//!    build in phase `loading` whose positions are recorded, or creates it: its tables with their
//!    keys indexed for merging, and per partition a position at the log's start and a target at
//!    the log's end of that moment, which every process replays to.
//! 2. A Kafka consumer group over the build's topics shares the partitions out among the processes
//!    (`source::group`): membership, failure detection and rebalancing are Kafka's. The group's
//!    offsets are never used; positions live in PostgreSQL with the rows.
//! 3. Rounds: a process replays the partitions it is given that are not loaded yet, from their
//!    positions to their targets, folds them in memory, and loads the fold (`sink::merge`: rows
//!    that gather partitions are joined with what other processes loaded) with the positions moved
//!    compare-and-set, one transaction per build. A round whose partitions the group moved
//!    meanwhile is dropped and redone; one whose positions another process moved first is dropped
//!    (that work is in already). A process that dies loses only its open round: the group gives its
//!    partitions to the others after its session timeout, and they replay them from their stored
//!    positions, so nothing is applied twice and nothing is lost.
//!    With a memory budget (per process) a round ends early where its fold outgrows the budget,
//!    and loads what it folded up to that point of each partition; the next round goes on from
//!    there (`sink::merge::Continued`).
//!    A round that reads its partitions to their targets also records its piece of the aggregate
//!    index (`sink::aggregate_index::record_piece`).
//! 4. Once every partition of a build has reached its target, the first process to move the build
//!    to `indexing` (compare-and-set in the catalog) joins the index pieces into the aggregate
//!    index and finishes the build as `rebuild` does: keys and indexes, catch-up, verification,
//!    swap. The others leave it to that process.

use std::collections::BTreeSet;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use sqlx::Connection;
use tokio_util::sync::CancellationToken;

use super::fold::{Fold, FoldBuild, Steps};
use super::memory::BATCHES_QUEUED;
use super::reader::{self, ReaderConfig, SourceChecks, Target};
use super::rebuild::{
    budget_shares, finish_builds, lock_projections, new_build, truncation, unfinished_build, Job,
    RebuildOptions, RebuildReport,
};
use super::{holder_name, Engine, EngineError, Result};
use crate::sink::aggregate_index;
use crate::sink::catalog::{self, Phase, Positions};
use crate::sink::lock::{AdvisoryLock, LockKind, LockMode};
use crate::sink::merge;
use crate::sink::spill::{self, SpillState};
use crate::sink::writer::{self, BuildTables};
use crate::sink::{dead_letters, Context};
use crate::source::group::GroupMember;

/// How long the group's assignment must stay put before a round starts: processes started together
/// join one after another, and every join moves partitions.
const SETTLE: Duration = Duration::from_secs(3);

/// How often a process records itself in `reproject.workers` for `status` while it waits.
const REPORT_EVERY: Duration = Duration::from_secs(2);

pub async fn rebuild_shared<E: Send + Sync + 'static>(
    engine: &Engine<E>,
    names: &[String],
    options: &RebuildOptions,
    cancel: &CancellationToken,
) -> Result<RebuildReport> {
    let holder = holder_name("rebuild --shared");
    let (projections, locks) = lock_projections(engine, names, &holder, LockMode::Shared).await?;
    let result = rebuild_shared_locked(engine, projections, options, cancel, &holder).await;
    for lock in locks {
        lock.release().await;
    }
    result
}

async fn rebuild_shared_locked<E: Send + Sync + 'static>(
    engine: &Engine<E>,
    projections: Vec<crate::projection::DynProjection<E>>,
    options: &RebuildOptions,
    cancel: &CancellationToken,
    holder: &str,
) -> Result<RebuildReport> {
    let mut report = RebuildReport {
        projections: projections.iter().map(|p| p.name().to_string()).collect(),
        ..Default::default()
    };
    let bounds = engine.log_bounds("reproject").await?;
    let truncated = truncation(engine, &bounds);
    if let (Some(partitions), false) = (&truncated, options.allow_truncated_history) {
        return Err(EngineError::TruncatedHistory {
            topic: engine.topics.to_string(),
            partitions: partitions.clone(),
        });
    }
    let mut jobs = Vec::new();
    for projection in projections {
        let job = join_or_create(engine, projection, &bounds, truncated.is_some(), holder).await?;
        report.builds.push(job.build.build_id);
        jobs.push(job);
    }
    // Fixed when each build was created: where every process replays its partitions to.
    let mut targets = Vec::new();
    for job in &jobs {
        targets.push(catalog::read_targets(engine.catalog.pool(), job.build.build_id).await?);
    }
    let ids: Vec<String> = jobs.iter().map(|j| j.build.build_id.to_string()).collect();
    let group = format!("reproject-shared-{}", ids.join("-"));
    let member = join_group(engine, &group).await?;
    // The aggregate index's pieces are recorded under the set's first build, the same for every
    // process of the group.
    let lead_build = report.builds.iter().copied().min().unwrap_or_default();
    tracing::info!(message = "sharing the replay", %group, builds = ?report.builds);

    let started = Instant::now();
    let mut reported = None::<Instant>;
    loop {
        if cancel.is_cancelled() {
            return Err(EngineError::Interrupted);
        }
        if reported.is_none_or(|at| at.elapsed() >= REPORT_EVERY) {
            let replaying = started.elapsed().as_secs_f64() - report.load_seconds;
            let rate = report.events_replayed as f64 / replaying.max(1e-3);
            let partitions: Vec<i32> = member.assignment().partitions.into_iter().collect();
            for job in &jobs {
                catalog::record_worker(
                    engine.catalog.pool(),
                    job.build.build_id,
                    holder,
                    &partitions,
                    report.events_replayed,
                    rate,
                )
                .await?;
            }
            reported = Some(Instant::now());
        }
        // Per build, the partitions not at their targets yet, at their positions.
        let mut remaining: Vec<Positions> = Vec::new();
        for (job, ends) in jobs.iter().zip(&targets) {
            let positions = engine.catalog.positions(job.build.build_id).await?;
            remaining.push(
                positions
                    .into_iter()
                    .filter(|(p, next)| ends.get(p).is_some_and(|end| next < end))
                    .collect(),
            );
        }
        if remaining.iter().all(Positions::is_empty) {
            break;
        }
        let assignment = member.assignment();
        let mine: BTreeSet<i32> = assignment
            .partitions
            .iter()
            .copied()
            .filter(|p| remaining.iter().any(|open| open.contains_key(p)))
            .collect();
        if mine.is_empty() || !assignment.still_for(SETTLE) {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(250)) => {}
                _ = cancel.cancelled() => return Err(EngineError::Interrupted),
            }
            continue;
        }
        let round = Round {
            starts: remaining
                .into_iter()
                .map(|mut open| {
                    open.retain(|p, _| mine.contains(p));
                    open
                })
                .collect(),
            targets: &targets,
            log_start: &bounds.start,
            lead_build,
            generation: assignment.generation,
        };
        tracing::info!(message = "replaying a round", partitions = ?mine, generation = round.generation);
        match replay_round(
            engine,
            &jobs,
            &round,
            options.memory_budget,
            &member,
            cancel,
        )
        .await?
        {
            Some(loaded) => {
                report.events_replayed += loaded.events;
                report.load_seconds += loaded.load_seconds;
                report.peak_fold_bytes = report.peak_fold_bytes.max(loaded.peak_fold_bytes as u64);
                // A round cut at the budget is what a spill is to one process's rebuild.
                report.spills += u64::from(loaded.cut_at_budget);
                reported = None;
            }
            None => continue,
        }
    }
    report.replay_seconds = started.elapsed().as_secs_f64() - report.load_seconds;
    drop(member);

    // Every partition is in: the first process to claim a build finishes it.
    let mut mine = Vec::new();
    // The claimed builds' targets: the index pieces must cover the log up to the furthest.
    let mut reach = Positions::new();
    let mut conn = engine.catalog.conn().await?;
    for (mut job, ends) in jobs.into_iter().zip(&targets) {
        let rows =
            SpillState::row_count(&mut conn, BuildTables::of(&job.build, &job.projection)).await?;
        if catalog::claim_loaded(&mut conn, job.build.build_id, rows).await? {
            tracing::info!(
                message = "every partition loaded; finishing the build here",
                projection = job.projection.name(),
                build_id = job.build.build_id,
                rows
            );
            report.rows_loaded += rows;
            job.build.phase = Phase::Indexing;
            mine.push(job);
            catalog::raise_positions(&mut reach, ends);
        } else {
            tracing::info!(
                message = "every partition loaded; another process finishes the build",
                projection = job.projection.name(),
                build_id = job.build.build_id
            );
        }
    }
    if !mine.is_empty() {
        match aggregate_index::publish_pieces(
            &mut conn,
            lead_build,
            &engine.topics,
            &bounds.start,
            &reach,
        )
        .await?
        {
            Some(rows) => {
                report.aggregates_indexed = rows;
                tracing::info!(message = "joined the processes' aggregate index pieces", rows);
            }
            None => tracing::info!(
                message = "the shared replay left part of the log unindexed (rounds cut at the memory budget keep no index): the aggregate index stays as it was, and `replay` reads the aggregate's partition instead"
            ),
        }
    }
    drop(conn);
    if !mine.is_empty() {
        finish_builds(engine, mine, None, options, cancel, &mut report).await?;
    }
    report.record_peak_memory(options.memory_budget);
    Ok(report)
}

/// Join consumer group `group` over the engine's topics (see [`GroupMember`]).
pub(super) async fn join_group<E>(engine: &Engine<E>, group: &str) -> Result<GroupMember> {
    let (kafka, topics, name) = (
        engine.kafka.clone(),
        engine.topics.clone(),
        group.to_string(),
    );
    tokio::task::spawn_blocking(move || GroupMember::join(&kafka, &name, &topics))
        .await
        .map_err(|e| EngineError::Projection {
            projection: "-".into(),
            reason: format!("joining consumer group {group} failed: {e}"),
        })?
        .map_err(|e| EngineError::Source(Box::new(e)))
}

/// Per build in job order: where this round starts each of its partitions, and where every
/// partition ends; where the log started when this process began (a partition past it continues
/// what earlier rounds loaded); the assignment it was planned under.
struct Round<'a> {
    starts: Vec<Positions>,
    targets: &'a [Positions],
    log_start: &'a Positions,
    lead_build: i64,
    generation: u64,
}

/// How a round's fold ended.
struct Folded {
    result: super::fold::FoldResult,
    /// Per build the round replays, what it read back of rows earlier rounds loaded.
    continued: Vec<merge::Continued>,
    /// True when it reached every target; false when it was cut at the memory budget.
    complete: bool,
    /// The most the fold held (rows, and rows read back), in bytes.
    peak_bytes: usize,
}

/// What a round that was loaded did, for the report.
struct RoundLoaded {
    events: u64,
    load_seconds: f64,
    /// The most its fold held, in bytes.
    peak_fold_bytes: usize,
    /// Cut where its fold outgrew the memory budget, and loaded so far.
    cut_at_budget: bool,
}

/// The shared build of `projection` in phase `loading`, or a new one, one process at a time.
async fn join_or_create<E: Send + Sync + 'static>(
    engine: &Engine<E>,
    projection: crate::projection::DynProjection<E>,
    bounds: &crate::source::LogBounds,
    truncated: bool,
    holder: &str,
) -> Result<Job<E>> {
    let lock = AdvisoryLock::acquire(
        &engine.database_url,
        LockKind::SharedBuild,
        projection.name(),
        holder,
        LockMode::ExclusiveWaiting,
    )
    .await?;
    let result = async {
        let mut conn = engine.catalog.conn().await?;
        match unfinished_build(engine, &projection).await? {
            // A plain rebuild's load records its positions only as it commits.
            Some(build)
                if build.phase == Phase::Loading
                    && !catalog::read_positions(&mut *conn, build.build_id)
                        .await?
                        .is_empty() =>
            {
                tracing::info!(
                    message = "joining the shared build",
                    projection = projection.name(),
                    build_id = build.build_id
                );
                return Ok(Job { projection, build });
            }
            Some(build) if build.phase == Phase::Loading => {
                tracing::info!(
                    message = "abandoning an interrupted bulk load for a shared build",
                    projection = projection.name(),
                    build_id = build.build_id
                );
                super::gc::drop_build(engine, &build).await?;
            }
            Some(build) => {
                return Err(EngineError::Projection {
                    projection: projection.name().to_string(),
                    reason: format!(
                        "build {} is already loaded (phase {}); `reproject rebuild {}` resumes it",
                        build.build_id,
                        build.phase.as_str(),
                        projection.name()
                    ),
                });
            }
            None => {}
        }
        let build = new_build(engine, &projection, truncated).await?;
        let sql = engine
            .schemas
            .load(projection.name(), projection.version())?;
        let mut tx = conn
            .begin()
            .await
            .context(|| "starting to create a shared build".into())?;
        let tables = BuildTables::of(&build, &projection);
        writer::create_tables(&mut tx, tables, &sql).await?;
        spill::index_keys(&mut tx, tables).await?;
        catalog::insert_positions(&mut tx, build.build_id, &bounds.start, &bounds.end).await?;
        tx.commit()
            .await
            .context(|| format!("committing the shared build {}", build.schema_name))?;
        tracing::info!(
            message = "created the shared build",
            projection = projection.name(),
            build_id = build.build_id
        );
        Ok(Job { projection, build })
    }
    .await;
    lock.release().await;
    result
}

/// Replay this round's partitions to their targets (or, under a memory budget, until the fold
/// outgrows it) and load them. None when the group moved partitions during the round, or another
/// process loaded them first: nothing of it was kept. Otherwise the events replayed and the
/// seconds the loads took.
async fn replay_round<E: Send + Sync + 'static>(
    engine: &Engine<E>,
    jobs: &[Job<E>],
    round: &Round<'_>,
    budget: Option<usize>,
    member: &GroupMember,
    cancel: &CancellationToken,
) -> Result<Option<RoundLoaded>> {
    let busy: Vec<usize> = (0..jobs.len())
        .filter(|&i| !round.starts[i].is_empty())
        .collect();
    // The builds of a set need not stand alike: a process that died between its builds' loads, or
    // a build joined from an earlier start beside builds created now, leaves one build past a
    // partition (or with an earlier target) that another still replays. The read spans them all;
    // each build takes only its own partitions, from its position to its target.
    let mut start = Positions::new();
    let mut stop_at = Positions::new();
    let mut ends: Vec<Positions> = Vec::new();
    for &i in &busy {
        let mut own = Positions::new();
        for (p, o) in &round.starts[i] {
            let first = start.entry(*p).or_insert(*o);
            *first = (*first).min(*o);
            if let Some(end) = round.targets[i].get(p) {
                own.insert(*p, *end);
            }
        }
        // The read goes to the furthest of the builds' targets.
        catalog::raise_positions(&mut stop_at, &own);
        ends.push(own);
    }
    // Per build replayed, the partitions earlier rounds loaded part of.
    let continuing: Vec<BTreeSet<i32>> = busy
        .iter()
        .map(|&i| {
            round.starts[i]
                .iter()
                .filter(|(p, at)| round.log_start.get(p).is_none_or(|first| *at > first))
                .map(|(p, _)| *p)
                .collect()
        })
        .collect();
    let targets = busy
        .iter()
        .zip(ends)
        .map(|(&i, ends)| Target {
            projection: jobs[i].projection.clone(),
            positions: round.starts[i].clone(),
            ends: Some(ends),
        })
        .collect();
    // What a whole round reads, for its piece of the aggregate index.
    let read: std::collections::BTreeMap<i32, (i64, i64)> = start
        .iter()
        .filter_map(|(p, from)| Some((*p, (*from, *stop_at.get(p)?))))
        .collect();
    let shares = budget.map(|b| budget_shares(b, stop_at.len(), engine.tuning.replay_readers));
    let config = ReaderConfig {
        topics: engine.topics.clone(),
        framing: engine.framing.clone(),
        stop_at: Some(stop_at),
        // Every process replays to the targets recorded with the build, whatever came since.
        stop_exactly: true,
        // The fold checks its memory budget between batches: a batch is what it may overshoot by.
        max_batch_events: Arc::new(std::sync::atomic::AtomicUsize::new(
            engine.tuning.batch_events,
        )),
        // Under a budget, cut by bytes as the plain rebuild's are: the round reads rows back once
        // per fold step of several batches (`merge::Continued`), not once per batch.
        max_batch_bytes: shares.map(|s| s.batch),
        max_batch_wait: Duration::from_millis(100),
        duplicate_window: shares.map_or(reader::DUPLICATE_WINDOW, |s| s.duplicate_window),
        log_end_every: None,
        stall_timeout: engine.tuning.stall_timeout,
        index_aggregates: true,
        aggregate_index_max_bytes: shares.map(|s| s.aggregate_index),
        measure_processing: false,
        prefetch_max_bytes: shares.map(|s| s.prefetch),
        dead_letters: matches!(
            engine.tuning.bad_records,
            super::BadRecordPolicy::DeadLetter { .. }
        ),
        fold_into: None,
    };
    let stop = Arc::new(AtomicBool::new(false));
    let (mut batches, readers) = reader::spawn_split(
        engine.kafka.clone(),
        engine.registry.clone(),
        targets,
        config,
        stop.clone(),
        // Each batch in the channel holds a batch's changes: few of them under a budget.
        if shares.is_some() { BATCHES_QUEUED } else { 8 },
        engine.tuning.replay_readers,
    );
    let reader_count = readers.len();
    let builds: Vec<FoldBuild<E>> = busy
        .iter()
        .map(|&i| FoldBuild {
            projection: jobs[i].projection.clone(),
            build_id: jobs[i].build.build_id,
            schema: jobs[i].build.schema_name.clone(),
        })
        .collect();
    let mut conn = sqlx::PgConnection::connect(&engine.database_url)
        .await
        .context(|| "connecting to load a round".into())?;
    let (fold_budget, fold_step) = (shares.map(|s| s.fold), shares.map_or(0, |s| s.fold_step));
    let (policy, database_url) = (engine.tuning.bad_records, engine.database_url.clone());
    let runtime = tokio::runtime::Handle::current();
    let fold = tokio::task::spawn_blocking(move || {
        let mut fold = Fold::new(
            builds,
            start,
            reader_count,
            None,
            policy,
            &database_url,
            runtime.clone(),
        )?;
        let mut peak_bytes = 0;
        let mut continued: Vec<merge::Continued> = (0..continuing.len())
            .map(|b| merge::Continued::new(fold.build_tables(b).specs.len()))
            .collect();
        let mut steps = Steps::of(fold_step);
        let (mut steps_folded, mut batches_folded) = (0usize, 0usize);
        while let Some(batch) = batches.blocking_recv() {
            let Some(step) = steps.push(batch?) else {
                continue;
            };
            steps_folded += 1;
            batches_folded += step.len();
            for (b, continuing) in continuing.iter().enumerate() {
                if continuing.is_empty() {
                    continue;
                }
                let changes = step
                    .iter()
                    .filter_map(|batch| batch.changes.get(b))
                    .flat_map(|log| log.iter());
                let (tables, store) = fold.tables_and_store(b);
                runtime.block_on(continued[b].read_back(
                    &mut conn,
                    tables,
                    store,
                    changes,
                    |p| continuing.contains(&p),
                ))?;
            }
            let mut complete = false;
            for batch in step {
                complete |= fold.apply(batch)?;
            }
            let held = fold.held_bytes()
                + continued
                    .iter()
                    .map(merge::Continued::approx_bytes)
                    .sum::<usize>();
            peak_bytes = peak_bytes.max(held);
            let over_budget = fold_budget.is_some_and(|budget| held > budget);
            if over_budget && !complete {
                tracing::info!(
                    message = "fold over its memory budget: loading the round so far",
                    fold_bytes = held,
                    budget = fold_budget,
                    batches = batches_folded,
                    fold_steps = steps_folded
                );
            }
            if complete || over_budget {
                let result = fold.finish();
                let folded = Folded {
                    result,
                    continued,
                    complete,
                    peak_bytes,
                };
                return Ok((folded, conn));
            }
        }
        Err(EngineError::Interrupted)
    });
    tokio::pin!(fold);
    let folded = loop {
        tokio::select! {
            result = &mut fold => break result.map_err(|e| EngineError::Projection { projection: "-".into(), reason: format!("fold task failed: {e}") })?,
            _ = cancel.cancelled() => {
                stop.store(true, std::sync::atomic::Ordering::Relaxed);
                return Err(EngineError::Interrupted);
            }
            _ = tokio::time::sleep(Duration::from_millis(200)) => {
                if member.assignment().generation != round.generation {
                    stop.store(true, std::sync::atomic::Ordering::Relaxed);
                    tracing::info!(message = "the group moved partitions during the round; dropping it and starting again");
                    let _ = readers.close().await;
                    return Ok(None);
                }
            }
        }
    };
    // A round cut at the budget leaves readers mid-read.
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = readers.close().await;
    let (folded, mut conn) = folded?;
    if member.assignment().generation != round.generation {
        tracing::info!(
            message =
                "the group moved partitions as the round ended; dropping it and starting again"
        );
        return Ok(None);
    }

    let started = Instant::now();
    let Folded {
        result,
        continued,
        complete,
        peak_bytes,
    } = folded;
    // A round cut at the budget has no index: its readers hand theirs over only at the end.
    if let (true, Some(index)) = (complete, &result.aggregates) {
        aggregate_index::record_piece(&mut conn, round.lead_build, &engine.topics, index, &read)
            .await?;
    }
    let loads = result
        .stores
        .into_iter()
        .zip(&result.dead_letters)
        .zip(continued.iter().zip(&busy));
    for ((store, letters), (continued, &i)) in loads {
        let job = &jobs[i];
        let tables = BuildTables::of(&job.build, &job.projection);
        // A whole round ends every partition at its target (whatever offsets it skipped); one cut
        // at the budget ends each where the fold got to.
        let next: Positions = round.starts[i]
            .iter()
            .filter_map(|(p, from)| {
                let end = *round.targets[i].get(p)?;
                let reached = if complete {
                    end
                } else {
                    result
                        .positions
                        .get(p)
                        .copied()
                        .unwrap_or(*from)
                        .clamp(*from, end)
                };
                Some((*p, reached))
            })
            .collect();
        let events: i64 = next
            .iter()
            .map(|(p, end)| end - round.starts[i].get(p).copied().unwrap_or(*end))
            .sum();
        let mut tx = conn
            .begin()
            .await
            .context(|| format!("starting to load a round into {}", tables.schema))?;
        // The recorded log ends are the targets every process replays to, read by processes
        // that join later: a round moves the positions only.
        match catalog::advance_positions(
            &mut tx,
            job.build.build_id,
            &round.starts[i],
            &next,
            &Positions::new(),
        )
        .await
        {
            Ok(()) => {}
            Err(crate::sink::SinkError::PositionConflict { .. }) => {
                tracing::info!(
                    message =
                        "another process loaded these partitions first; dropping this round's rows",
                    projection = job.projection.name(),
                    build_id = job.build.build_id
                );
                continue;
            }
            Err(e) => return Err(e.into()),
        }
        let rows = merge::merge_into(&mut tx, tables, store, Some(continued)).await?;
        // What the readers received against the offsets they read, added up over the rounds (a
        // round cut at the budget has none: its readers hand them over only at its end).
        if let (true, Some(checks)) = (complete, &result.source_checks) {
            let recorded = catalog::source_checks_for_update(&mut tx, job.build.build_id).await?;
            let all = match recorded.and_then(|v| serde_json::from_value::<SourceChecks>(v).ok()) {
                Some(mut all) => {
                    all.merge(checks.clone());
                    all
                }
                None => checks.clone(),
            };
            catalog::set_source_checks(&mut tx, job.build.build_id, &all).await?;
        }
        let stored: Vec<_> = letters.iter().map(|l| l.stored()).collect();
        dead_letters::insert(&mut tx, job.build.build_id, job.projection.name(), &stored).await?;
        catalog::add_replayed(&mut tx, job.build.build_id, events.max(0) as u64).await?;
        tx.commit()
            .await
            .context(|| format!("committing a round into {}", tables.schema))?;
        tracing::info!(
            message = "loaded a round",
            projection = job.projection.name(),
            build_id = job.build.build_id,
            partitions = next.len(),
            rows,
            events,
            complete
        );
    }
    Ok(Some(RoundLoaded {
        events: result.events,
        load_seconds: started.elapsed().as_secs_f64(),
        peak_fold_bytes: peak_bytes,
        cut_at_budget: !complete,
    }))
}
