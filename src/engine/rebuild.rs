//! `rebuild`: a projection version from offset zero into fresh tables, caught up, and swapped in.
//!
//! 1. Each projection gets a build: new, or the one a previous attempt left. A build interrupted
//!    during its bulk load starts over (nothing of it was committed); one interrupted later resumes
//!    from its stored positions.
//! 2. The log's start and end are read per partition; a log that no longer starts at 0 is refused
//!    unless `allow_truncated_history`.
//! 3. History up to that end is replayed once for all projections being built: decoded, upcast,
//!    projected by reader threads that share the partitions out, folded in memory by one fold
//!    thread, then bulk-loaded with binary COPY (every build at once), sorted by key, committed with
//!    the positions (and dead letters); the aggregate index is written alongside. With a memory
//!    budget the fold is flushed to the tables whenever it outgrows its share (`sink::spill`). Then
//!    keys and indexes (every build at once), ANALYZE.
//! 4. Catch-up: transactional batches with positions until the lag is under the threshold.
//! 5. Swap (unless `swap` is false: the build then waits, caught up, in phase `ready`).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sqlx::Connection;
use tokio_util::sync::CancellationToken;

use super::controls::Controls;
use super::fold::{Fold, FoldBuild, FoldResult};
use super::follow::{self, FollowTarget, Until};
use super::memory::{MemoryShares, BATCHES_QUEUED};
use super::progress::{Progress, Snapshot};
use super::reader::{self, ReaderConfig, Target};
use super::verify::{self, Against, VerifyMode, VerifyPolicy};
use super::{holder_name, Engine, EngineError, Result};
use crate::projection::{DynProjection, RowStore, ShardedStore};
use crate::sink::aggregate_index;
use crate::sink::catalog::{self, Phase, Positions};
use crate::sink::dead_letters;
use crate::sink::lock::{AdvisoryLock, LockKind, LockMode};
use crate::sink::spill::SpillState;
use crate::sink::writer::{self, BuildTables};
use crate::sink::{Build, Context, SliceGate};
use crate::swap::{self, SwapOptions, SwapReport};

#[derive(Clone, Debug)]
pub struct RebuildOptions {
    pub allow_truncated_history: bool,
    /// Swap the new build in once caught up; otherwise leave it `ready` for `reproject swap`.
    pub swap: bool,
    pub swap_options: SwapOptions,
    /// No progress bar (tests, benchmarks).
    pub quiet: bool,
    /// Bytes a build's tables may take on the database server; checked after the load and after the
    /// indexes, stopping the rebuild (resumably) when over. None: no check.
    pub disk_budget: Option<u64>,
    /// Bytes the replay may hold (shared out by [`MemoryShares`]); beyond its share, the fold is
    /// flushed to the build's tables and later changes merged there (see `sink::spill`). None: fold
    /// everything in memory, with a large prefetch.
    pub memory_budget: Option<usize>,
    /// Verify the new build against the live one before the swap (see `engine::verify`): `strict`
    /// refuses the swap when it fails, `report` swaps and keeps the report. None: no verification.
    pub verify: Option<VerifyPolicy>,
}

/// What a rebuild did, per phase, for the report and the benchmarks.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct RebuildReport {
    pub projections: Vec<String>,
    pub builds: Vec<i64>,
    pub events_replayed: u64,
    pub rows_loaded: u64,
    pub replay_seconds: f64,
    pub load_seconds: f64,
    pub index_seconds: f64,
    pub catch_up_events: u64,
    pub catch_up_seconds: f64,
    pub swap_seconds: f64,
    /// Aggregates recorded in the aggregate index, and the time it took to write it.
    pub aggregates_indexed: u64,
    pub aggregate_index_seconds: f64,
    pub swaps: Vec<SwapReport>,
    pub history_truncated: bool,
    /// Times the fold was flushed to PostgreSQL because it outgrew the memory budget (all builds).
    pub spills: u64,
    /// The largest the fold grew (rows and remembered keys of spilled builds), in bytes.
    pub peak_fold_bytes: u64,
    /// The process's peak resident set by the end of the rebuild (0 where /proc is not available),
    /// and the memory budget it was given.
    pub peak_rss_bytes: u64,
    pub memory_budget: Option<u64>,
    /// Bad records stored in `reproject.dead_letters` by the replay and the catch-up (all builds).
    pub dead_letters: u64,
    /// Verifications run before the swaps.
    pub verifications: Vec<verify::Verification>,
}

impl RebuildReport {
    /// The process's peak resident set so far, beside the budget it was given.
    pub(super) fn record_peak_memory(&mut self, budget: Option<usize>) {
        self.peak_rss_bytes = super::memory::peak_rss_bytes(None).unwrap_or(0);
        self.memory_budget = budget.map(|b| b as u64);
    }
}

/// `budget` shared out for a replay of `partitions` by up to `readers` threads (see
/// [`MemoryShares`]), warning when it is below what the process takes whatever its budget.
pub(super) fn budget_shares(budget: usize, partitions: usize, readers: usize) -> MemoryShares {
    // As many readers as `reader::spawn_split` starts: never more than there are partitions.
    let readers = readers.clamp(1, partitions.max(1));
    let smallest = MemoryShares::smallest_budget(partitions);
    if budget < smallest {
        tracing::warn!(
            message = "the memory budget is below the smallest a replay of this many partitions keeps to: it spills often and the process will take more than the budget",
            budget_mib = budget >> 20,
            smallest_mib = smallest.div_ceil(1 << 20),
            partitions
        );
    }
    super::memory::return_freed_memory_at_once();
    MemoryShares::of(budget, partitions, readers)
}

pub(super) struct Job<E> {
    pub(super) projection: DynProjection<E>,
    pub(super) build: Build,
}

pub async fn rebuild<E: Send + Sync + 'static>(
    engine: &Engine<E>,
    names: &[String],
    options: &RebuildOptions,
    cancel: &CancellationToken,
) -> Result<RebuildReport> {
    let holder = holder_name("rebuild");
    let (projections, locks) =
        lock_projections(engine, names, &holder, LockMode::Exclusive).await?;
    let result = rebuild_locked(engine, projections, options, cancel).await;
    for lock in locks {
        lock.release().await;
    }
    result
}

/// The projections named, each checked for its schema files and locked for rebuilding as `mode`
/// says (shared among the processes of one `rebuild --shared`, which keeps out a plain rebuild).
pub(super) async fn lock_projections<E: Send + Sync + 'static>(
    engine: &Engine<E>,
    names: &[String],
    holder: &str,
    mode: LockMode,
) -> Result<(Vec<DynProjection<E>>, Vec<AdvisoryLock>)> {
    let projections = names
        .iter()
        .map(|n| engine.projection(n))
        .collect::<Result<Vec<_>>>()?;
    // A missing or unreadable schema file is a setup mistake: say so before touching anything.
    for p in &projections {
        engine.schemas.load(p.name(), p.version())?;
    }
    let mut locks = Vec::new();
    for p in &projections {
        let lock = AdvisoryLock::acquire(
            &engine.database_url,
            LockKind::Rebuild,
            p.name(),
            holder,
            mode,
        )
        .await;
        match lock {
            Ok(lock) => locks.push(lock),
            Err(e) => {
                for lock in locks {
                    lock.release().await;
                }
                return Err(e.into());
            }
        }
    }
    Ok((projections, locks))
}

/// A build whose replay failed (not interrupted) would be started over by the next rebuild anyway:
/// mark it failed, with why, so that `status` does not show it building with no one at work. Best
/// effort: the error itself is what the caller reports.
async fn mark_failed_replays<E: Send + Sync + 'static>(
    engine: &Engine<E>,
    jobs: &[Job<E>],
    error: &EngineError,
) {
    if matches!(error, EngineError::Interrupted) {
        return;
    }
    for job in jobs.iter().filter(|j| j.build.phase == Phase::Loading) {
        let id = job.build.build_id;
        let marked = async {
            engine.catalog.record_error(id, &error.to_string()).await?;
            engine.catalog.set_phase(id, Phase::Failed).await
        };
        if let Err(e) = marked.await {
            tracing::warn!(message = "could not mark a failed build", build_id = id, error = %e);
        }
    }
}

async fn rebuild_locked<E: Send + Sync + 'static>(
    engine: &Engine<E>,
    projections: Vec<DynProjection<E>>,
    options: &RebuildOptions,
    cancel: &CancellationToken,
) -> Result<RebuildReport> {
    let mut report = RebuildReport {
        projections: projections.iter().map(|p| p.name().to_string()).collect(),
        ..Default::default()
    };
    // The log first: nothing is created for a log that cannot be read.
    engine.log_bounds("reproject").await?;
    let mut to_replay = Vec::new();
    let mut to_resume = Vec::new();
    for projection in projections {
        let job = prepare_build(engine, projection).await?;
        super::metrics::build_phase(&job.build.projection, job.build.build_id, job.build.phase);
        report.builds.push(job.build.build_id);
        if job.build.phase == Phase::Loading {
            to_replay.push(job);
        } else {
            to_resume.push(job);
        }
    }
    let mut aggregate_index = None;
    if !to_replay.is_empty() {
        aggregate_index =
            match replay_and_load(engine, &mut to_replay, options, cancel, &mut report).await {
                Ok(index) => index,
                Err(error) => {
                    mark_failed_replays(engine, &to_replay, &error).await;
                    return Err(error);
                }
            };
    }
    let mut jobs = to_replay;
    jobs.extend(to_resume);
    finish_builds(engine, jobs, aggregate_index, options, cancel, &mut report).await?;
    report.record_peak_memory(options.memory_budget);
    Ok(report)
}

/// From loaded builds to swapped ones: keys and indexes of the builds in phase `indexing` (all at
/// once), the aggregate index being written beside them if there is one, the catch-up with what
/// arrived since the replay, verification and the swap (or phase `ready`).
pub(super) async fn finish_builds<E: Send + Sync + 'static>(
    engine: &Engine<E>,
    mut jobs: Vec<Job<E>>,
    aggregate_index: Option<AggregateIndexTask>,
    options: &RebuildOptions,
    cancel: &CancellationToken,
    report: &mut RebuildReport,
) -> Result<()> {
    // Every build's keys and indexes at once: each CREATE INDEX is one backend on one core.
    let started = Instant::now();
    let indexing = jobs
        .iter_mut()
        .filter(|job| job.build.phase == Phase::Indexing)
        .map(|job| async {
            check_disk_budget(engine, job, options.disk_budget).await?;
            super::metrics::build_phase(&job.build.projection, job.build.build_id, Phase::Indexing);
            // Side by side while production is idle or within budget; one at a time, each on one
            // core, while it suffers.
            let one_at_a_time = match &engine.governor {
                Some(governor) => governor.heavy("index build", cancel).await,
                None => None,
            };
            let busy = engine.governor.as_ref().map(|g| g.busy());
            let single_core = one_at_a_time.is_some();
            build_indexes(engine, job, single_core).await?;
            if let Some(governor) = &engine.governor {
                governor.committed(1);
            }
            drop((busy, one_at_a_time));
            check_disk_budget(engine, job, options.disk_budget).await?;
            super::metrics::build_phase(
                &job.build.projection,
                job.build.build_id,
                Phase::CatchingUp,
            );
            Ok::<_, EngineError>(())
        });
    let indexed = futures::future::try_join_all(indexing).await?;
    if !indexed.is_empty() {
        report.index_seconds = started.elapsed().as_secs_f64();
    }
    if let Some(task) = aggregate_index {
        let (aggregates, seconds) = task.await.map_err(|e| EngineError::Projection {
            projection: "-".into(),
            reason: format!("writing the aggregate index failed: {e}"),
        })??;
        report.aggregates_indexed = aggregates;
        report.aggregate_index_seconds = seconds;
    }

    // Catch up with everything that arrived since the log end the replay read to.
    let started = Instant::now();
    let mut targets = Vec::new();
    for job in &jobs {
        let positions = engine.catalog.positions(job.build.build_id).await?;
        targets.push(FollowTarget {
            build: job.build.clone(),
            projection: job.projection.clone(),
            positions,
        });
    }
    let caught_up = follow::follow(
        engine,
        targets,
        Until::CaughtUp {
            lag_below: engine.tuning.lag_threshold,
        },
        cancel,
        "catching up",
    )
    .await?;
    if cancel.is_cancelled() {
        return Err(EngineError::Interrupted);
    }
    report.catch_up_events = caught_up.events;
    report.dead_letters += caught_up.dead_letters;
    report.catch_up_seconds = started.elapsed().as_secs_f64();

    let started = Instant::now();
    for job in &jobs {
        if options.swap {
            if let Some(policy) = &options.verify {
                let verification =
                    verify_before_swap(engine, &job.build, &job.projection, policy, cancel).await?;
                report.verifications.push(verification);
            }
            let swapped = swap_when_caught_up(
                engine,
                &job.build,
                &job.projection,
                &options.swap_options,
                cancel,
            )
            .await?;
            tracing::info!(message = "swapped", projection = %swapped.projection, build_id = swapped.build_id,
                retired = ?swapped.retired_build_id, attempts = swapped.attempts, commit_ms = swapped.commit_ms);
            super::metrics::build_phase(&job.build.projection, job.build.build_id, Phase::Active);
            if let Some(retired) = swapped.retired_build_id {
                super::metrics::build_phase(&job.build.projection, retired, Phase::Retired);
            }
            report.swaps.push(swapped);
        } else {
            engine
                .catalog
                .set_phase(job.build.build_id, Phase::Ready)
                .await?;
            // Verified now, so the report is there before anyone decides to swap.
            if let Some(policy) = &options.verify {
                let verification =
                    verify_before_swap(engine, &job.build, &job.projection, policy, cancel).await?;
                report.verifications.push(verification);
            }
            tracing::info!(message = "built and caught up; waiting for `reproject swap`", projection = %job.build.projection, build_id = job.build.build_id);
        }
    }
    report.swap_seconds = started.elapsed().as_secs_f64();
    Ok(())
}

/// Verify `build` against the live build; under `strict`, a failed verification stops here with
/// the reasons (the build stays ready and caught up; nothing is swapped).
pub async fn verify_before_swap<E: Send + Sync + 'static>(
    engine: &Engine<E>,
    build: &Build,
    projection: &DynProjection<E>,
    policy: &VerifyPolicy,
    cancel: &CancellationToken,
) -> Result<verify::Verification> {
    let verification =
        verify::verify(engine, projection, build, Against::Active, policy, cancel).await?;
    if verification.passed {
        tracing::info!(message = "verified against the live build", projection = %projection.name(), build_id = build.build_id,
            against = ?verification.baseline_build_id, verification_id = ?verification.verification_id);
    } else if policy.mode == VerifyMode::Strict {
        engine
            .catalog
            .set_phase(build.build_id, Phase::Ready)
            .await?;
        return Err(EngineError::VerificationFailed {
            projection: projection.name().to_string(),
            build_id: build.build_id,
            verification_id: verification.verification_id.unwrap_or_default(),
            failures: verification.failures.join("; "),
        });
    } else {
        tracing::warn!(message = "verification found differences; swapping anyway (--verify report)", projection = %projection.name(),
            build_id = build.build_id, failures = %verification.failures.join("; "), verification_id = ?verification.verification_id);
    }
    Ok(verification)
}

/// Catch `build` up with the log, verify it when asked, then swap it in: what `swap` and
/// `rollback` do.
pub async fn catch_up_and_swap<E: Send + Sync + 'static>(
    engine: &Engine<E>,
    build: &Build,
    projection: &DynProjection<E>,
    swap_options: &SwapOptions,
    verify: Option<&VerifyPolicy>,
    cancel: &CancellationToken,
) -> Result<(SwapReport, Option<verify::Verification>)> {
    // Catching up runs this binary's projection code: it must be the code the build was made with.
    // A build of another version (a rollback across a fix) that already stands where the live one
    // does has nothing to apply: swap it at once. The swap refuses it when it is behind on any
    // partition, and only then is that version's code needed.
    if build.version != projection.version() {
        if verify.is_none() {
            match swap::swap(
                &engine.database_url,
                build,
                projection.tables(),
                swap_options,
            )
            .await
            {
                Ok(report) => return Ok((report, None)),
                Err(swap::SwapError::Behind { .. }) => {}
                Err(e) => return Err(e.into()),
            }
        }
        return Err(EngineError::Projection {
            projection: projection.name().to_string(),
            reason: format!(
                "build {} is version {}, but this binary's code is version {}; catching it up needs \
                 version {}'s code: run this with the binary that has it",
                build.build_id,
                build.version,
                projection.version(),
                build.version
            ),
        });
    }
    match catch_up(
        engine,
        build,
        projection,
        engine.tuning.lag_threshold,
        cancel,
    )
    .await
    {
        Ok(()) => {}
        // A `run` keeps it current (a ready build is followed with the live one): swap as it is;
        // the swap still refuses a build that is behind the live one.
        Err(EngineError::Lock(crate::sink::lock::LockError::Held { holder, .. })) => {
            tracing::info!(message = "kept current by another process; swapping without catching up here", projection = %projection.name(), build_id = build.build_id, %holder);
        }
        Err(e) => return Err(e),
    }
    if cancel.is_cancelled() {
        return Err(EngineError::Interrupted);
    }
    let verification = match verify {
        Some(policy) => Some(verify_before_swap(engine, build, projection, policy, cancel).await?),
        None => None,
    };
    let swapped = swap_when_caught_up(engine, build, projection, swap_options, cancel).await?;
    Ok((swapped, verification))
}

/// Follow one build from its stored positions until its lag is at most `lag_below`.
async fn catch_up<E: Send + Sync + 'static>(
    engine: &Engine<E>,
    build: &Build,
    projection: &DynProjection<E>,
    lag_below: i64,
    cancel: &CancellationToken,
) -> Result<()> {
    let positions = engine.catalog.positions(build.build_id).await?;
    let target = FollowTarget {
        build: build.clone(),
        projection: projection.clone(),
        positions,
    };
    follow::follow(
        engine,
        vec![target],
        Until::CaughtUp { lag_below },
        cancel,
        "catching up",
    )
    .await?;
    Ok(())
}

/// Swap, catching up again first whenever the live build has moved past the new one (a `run`
/// following it meanwhile): the view must never go back in time.
async fn swap_when_caught_up<E: Send + Sync + 'static>(
    engine: &Engine<E>,
    build: &Build,
    projection: &DynProjection<E>,
    swap_options: &SwapOptions,
    cancel: &CancellationToken,
) -> Result<SwapReport> {
    let mut attempts = 0;
    loop {
        match swap::swap(
            &engine.database_url,
            build,
            projection.tables(),
            swap_options,
        )
        .await
        {
            Err(swap::SwapError::Behind { .. }) if attempts < 20 => {
                attempts += 1;
                tracing::info!(
                    message = "the live build moved ahead; catching up again before the swap",
                    projection = projection.name()
                );
                match catch_up(engine, build, projection, 0, cancel).await {
                    Ok(()) => {}
                    // A `run` follows it with the live build: they meet within a batch or two.
                    Err(EngineError::Lock(crate::sink::lock::LockError::Held { .. })) => {
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                    Err(e) => return Err(e),
                }
            }
            result => return Ok(result?),
        }
    }
}

async fn prepare_build<E: Send + Sync + 'static>(
    engine: &Engine<E>,
    projection: DynProjection<E>,
) -> Result<Job<E>> {
    let build = match unfinished_build(engine, &projection).await? {
        Some(build) if build.phase == Phase::Loading => {
            // Nothing of an interrupted load was committed but its empty tables: start it over.
            tracing::info!(
                message = "restarting an interrupted bulk load",
                projection = projection.name(),
                build_id = build.build_id
            );
            let mut conn = engine.catalog.conn().await?;
            writer::drop_schema(&mut conn, &build.schema_name).await?;
            catalog::clear_positions(&mut conn, build.build_id).await?;
            build
        }
        Some(build) => {
            tracing::info!(
                message = "resuming build",
                projection = projection.name(),
                build_id = build.build_id,
                phase = build.phase.as_str()
            );
            build
        }
        None => new_build(engine, &projection, false).await?,
    };
    Ok(Job { projection, build })
}

/// The build of `projection` still in progress at this code's version and topics, if there is one;
/// every other unfinished build of the projection is dropped (its code is not this binary's).
pub(super) async fn unfinished_build<E: Send + Sync + 'static>(
    engine: &Engine<E>,
    projection: &DynProjection<E>,
) -> Result<Option<Build>> {
    let builds = engine.catalog.builds(Some(projection.name())).await?;
    let mut current: Option<Build> = None;
    for build in builds.into_iter().filter(|b| b.phase.in_progress()) {
        if build.version == projection.version()
            && current.is_none()
            && build.topics == engine.topics.names()
        {
            current = Some(build);
        } else {
            tracing::info!(
                message = "abandoning an unfinished build of another version",
                projection = projection.name(),
                build_id = build.build_id,
                version = build.version
            );
            super::gc::drop_build(engine, &build).await?;
        }
    }
    Ok(current)
}

/// Register a new build of `projection` (phase `loading`) over the engine's topics.
pub(super) async fn new_build<E: Send + Sync + 'static>(
    engine: &Engine<E>,
    projection: &DynProjection<E>,
    history_truncated: bool,
) -> Result<Build> {
    Ok(engine
        .catalog
        .create_build(
            projection.name(),
            projection.version(),
            &engine.topics,
            history_truncated,
            engine.definition(projection.name(), projection.version()),
        )
        .await?)
}

/// The partitions whose log no longer starts at offset 0, said for a person; None when history is
/// complete.
pub(super) fn truncation<E>(
    engine: &Engine<E>,
    bounds: &crate::source::LogBounds,
) -> Option<String> {
    let truncated = bounds.truncated();
    (!truncated.is_empty()).then(|| {
        truncated
            .iter()
            .map(|(p, s)| format!("partition {} starts at {s}", engine.topics.label(*p)))
            .collect::<Vec<_>>()
            .join(", ")
    })
}

fn tables<'a, E>(job: &'a Job<E>) -> BuildTables<'a> {
    BuildTables::of(&job.build, &job.projection)
}

async fn replay_and_load<E: Send + Sync + 'static>(
    engine: &Engine<E>,
    jobs: &mut [Job<E>],
    options: &RebuildOptions,
    cancel: &CancellationToken,
    report: &mut RebuildReport,
) -> Result<Option<AggregateIndexTask>> {
    let bounds = engine.log_bounds("reproject").await?;
    if let Some(partitions) = truncation(engine, &bounds) {
        if !options.allow_truncated_history {
            for job in jobs.iter() {
                engine
                    .catalog
                    .set_phase(job.build.build_id, Phase::Failed)
                    .await?;
            }
            return Err(EngineError::TruncatedHistory {
                topic: engine.topics.to_string(),
                partitions,
            });
        }
        tracing::warn!(message = "rebuilding from a truncated log, as asked", topics = %engine.topics, %partitions);
        report.history_truncated = true;
        for job in jobs.iter() {
            engine
                .catalog
                .mark_history_truncated(job.build.build_id)
                .await?;
        }
    }

    let mut conn = sqlx::PgConnection::connect(&engine.database_url)
        .await
        .context(|| "connecting for the bulk load".into())?;
    for job in jobs.iter() {
        let sql = engine
            .schemas
            .load(job.projection.name(), job.projection.version())?;
        writer::create_tables(&mut conn, tables(job), &sql).await?;
    }

    // Replay: reader threads decode, upcast and project, each its share of the partitions; this
    // fold thread folds.
    let started = Instant::now();
    let total: i64 = bounds
        .end
        .iter()
        .map(|(p, e)| e - bounds.start.get(p).copied().unwrap_or(0))
        .sum();
    let stop = Arc::new(AtomicBool::new(false));
    let targets = jobs
        .iter()
        .map(|j| Target::unbounded(j.projection.clone(), bounds.start.clone()))
        .collect();
    let budget = options
        .memory_budget
        .map(|b| budget_shares(b, bounds.end.len(), engine.tuning.replay_readers));
    // Shared with the reader so that `reproject tune --batch-events` reaches it.
    let batch_size = Arc::new(std::sync::atomic::AtomicUsize::new(
        engine.tuning.batch_events,
    ));
    if engine.tuning.fold_in_readers && budget.is_some() {
        tracing::warn!(
            message = "folding on one thread: under a memory budget the fold spills, and a spill needs one thread to own the rows (--fold-in-readers ignored)"
        );
    }
    let shared_fold = (engine.tuning.fold_in_readers && budget.is_none()).then(|| {
        Arc::new(
            jobs.iter()
                .map(|j| ShardedStore::new(j.projection.tables().len(), FOLD_SHARDS))
                .collect::<Vec<_>>(),
        )
    });
    let config = ReaderConfig {
        topics: engine.topics.clone(),
        framing: engine.framing.clone(),
        stop_at: Some(bounds.end.clone()),
        stop_exactly: false,
        // The fold checks its memory budget between steps: a step is what it may overshoot by.
        max_batch_events: batch_size.clone(),
        max_batch_bytes: budget.map(|b| b.batch),
        max_batch_wait: Duration::from_millis(100),
        duplicate_window: budget.map_or(reader::DUPLICATE_WINDOW, |b| b.duplicate_window),
        log_end_every: None,
        stall_timeout: engine.tuning.stall_timeout,
        index_aggregates: true,
        aggregate_index_max_bytes: budget.map(|b| b.aggregate_index),
        measure_processing: false,
        prefetch_max_bytes: budget.map(|b| b.prefetch),
        dead_letters: matches!(
            engine.tuning.bad_records,
            super::BadRecordPolicy::DeadLetter { .. }
        ),
        fold_into: shared_fold.clone(),
    };
    let (mut batches, readers) = reader::spawn_split(
        engine.kafka.clone(),
        engine.registry.clone(),
        targets,
        config,
        stop.clone(),
        // Each batch in the channel holds a batch's changes: few of them under a budget.
        if budget.is_some() { BATCHES_QUEUED } else { 8 },
        engine.tuning.replay_readers,
    );
    let reader_count = readers.len();
    let read_events = Arc::new(AtomicU64::new(0));
    let counter = read_events.clone();
    // Set from the catalog's pause flags by the loop below; the fold waits between batches while
    // it is set, and the bounded channel then holds the reader too.
    let paused = Arc::new(AtomicBool::new(false));
    let fold_paused = paused.clone();
    let builds: Vec<FoldBuild<E>> = jobs
        .iter()
        .map(|j| FoldBuild {
            projection: j.projection.clone(),
            build_id: j.build.build_id,
            schema: j.build.schema_name.clone(),
        })
        .collect();
    let (start, policy) = (bounds.start.clone(), engine.tuning.bad_records);
    let (step, budget) = (budget.map(|b| b.fold_step), budget.map(|b| b.fold));
    let database_url = engine.database_url.clone();
    let runtime = tokio::runtime::Handle::current();
    let governor = engine.governor.clone();
    if let Some(governor) = &governor {
        governor.release_on(cancel);
    }
    let fold = tokio::task::spawn_blocking(move || -> Result<FoldResult> {
        let mut fold = Fold::new(
            builds,
            start,
            reader_count,
            budget,
            policy,
            &database_url,
            runtime,
        )?
        .in_steps_of(step)
        .governed_by(governor);
        while let Some(batch) = batches.blocking_recv() {
            let batch = batch?;
            while fold_paused.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(100));
            }
            let finished = fold.apply(batch)?;
            counter.store(fold.events(), Ordering::Relaxed);
            if finished {
                return Ok(fold.finish());
            }
        }
        Err(EngineError::Interrupted)
    });
    let mut progress = Progress::new("replaying", Some(total.max(0) as u64), options.quiet);
    let writer_name = holder_name("rebuild");
    let names: Vec<&str> = jobs.iter().map(|j| j.projection.name()).collect();
    let mut controls = Controls::new(&names, batch_size.clone(), &engine.tuning);
    tokio::pin!(fold);
    // Its first tick is at once: `status` shows a replay from its start, not after half a second
    // (a short replay would otherwise finish without ever showing).
    let mut every_half_second = tokio::time::interval(Duration::from_millis(500));
    every_half_second.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let folded = loop {
        tokio::select! {
            result = &mut fold => break result.map_err(|e| EngineError::Projection { projection: "-".into(), reason: format!("fold task failed: {e}") })??,
            _ = cancel.cancelled() => {
                stop.store(true, Ordering::Relaxed);
                return Err(EngineError::Interrupted);
            }
            _ = every_half_second.tick() => {
                controls.refresh(&engine.catalog).await?;
                paused.store(!controls.paused().is_empty(), Ordering::Relaxed);
                let done = read_events.load(Ordering::Relaxed);
                progress.update(done, Some(total - done as i64));
                let mut snap = Snapshot::new("loading", done, progress.elapsed(), &Positions::new(), &bounds.end);
                snap.lag = total - done as i64;
                for job in jobs.iter() {
                    engine.catalog.write_progress(job.build.build_id, &writer_name, &snap.to_json()).await;
                }
            }
        }
    };
    progress.finish();
    // The reader threads have sent their last batches and are closing their consumers
    // (`ReaderThreads::close`): the load does not wait for it, unless the consumers' buffers must
    // be gone before it (a memory budget) or the fold is shared with them.
    let closing = readers.close();
    let closing = if options.memory_budget.is_some() || shared_fold.is_some() {
        let _ = closing.await;
        None
    } else {
        Some(closing)
    };
    let FoldResult {
        mut stores,
        spill,
        positions,
        events,
        aggregates,
        source_checks,
        mut peak_bytes,
        dead_letters,
    } = folded;
    if let Some(shared) = shared_fold {
        // The readers are joined: theirs were the only other handles.
        let shards = Arc::try_unwrap(shared).map_err(|_| EngineError::Projection {
            projection: "-".into(),
            reason: "a reader still held the shared fold after the replay".into(),
        })?;
        stores = tokio::task::spawn_blocking(move || {
            shards.into_iter().map(ShardedStore::into_store).collect()
        })
        .await
        .map_err(|e| EngineError::Projection {
            projection: "-".into(),
            reason: format!("joining the fold's shards failed: {e}"),
        })?;
        peak_bytes = stores.iter().map(RowStore::approx_bytes).sum();
    }
    report.events_replayed = events;
    report.peak_fold_bytes = peak_bytes as u64;
    report.replay_seconds = started.elapsed().as_secs_f64();
    tracing::info!(
        message = "replayed history",
        events,
        seconds = report.replay_seconds,
        events_per_second = (events as f64 / report.replay_seconds.max(1e-9)).round()
    );

    // Bulk load each build with its positions, in one transaction per build; the throttle paces
    // the COPY between slices, and holds it from the start while production is measured or hurt.
    // (The governor was released on `cancel` before the replay.)
    if let Some(governor) = &engine.governor {
        governor.remeasure();
        governor.wait_while_held("bulk load", cancel).await;
    }
    // The aggregate index comes free with the replay; `replay` uses it to read only where an
    // aggregate's events lie. It is written on a connection of its own while the builds load and
    // index: on two cores the load alone leaves one of them half idle.
    let aggregate_index = aggregates.map(|index| {
        let (topics, positions) = (engine.topics.clone(), positions.clone());
        // On a blocking thread of its own that drives the write: sqlx's executor bounds are too
        // general for the compiler to prove a spawned task holding this future `Send`.
        let runtime = tokio::runtime::Handle::current();
        tokio::task::spawn_blocking(move || {
            let started = Instant::now();
            let written = runtime.block_on(aggregate_index::replace(
                &mut conn, &topics, &index, &positions,
            ))?;
            Ok((written, started.elapsed().as_secs_f64()))
        })
    });

    let started = Instant::now();
    let loaded = Loaded {
        positions: &positions,
        log_end: &bounds.end,
        events,
        source_checks: source_checks.as_ref(),
        gate: engine.governor.as_deref().map(|g| g as &dyn SliceGate),
    };
    load_all(engine, jobs, stores, spill, &dead_letters, &loaded, report).await?;
    report.load_seconds = started.elapsed().as_secs_f64();
    if let Some(closing) = closing {
        let _ = closing.await;
    }
    Ok(aggregate_index)
}

/// The aggregate index being written alongside the load: aggregates written and seconds taken.
pub(super) type AggregateIndexTask = tokio::task::JoinHandle<Result<(u64, f64)>>;

/// What every build's bulk load records besides its rows.
struct Loaded<'a> {
    positions: &'a Positions,
    log_end: &'a Positions,
    events: u64,
    source_checks: Option<&'a reader::SourceChecks>,
    /// The throttle that paces the COPY between slices.
    gate: Option<&'a dyn SliceGate>,
}

struct LoadOutcome {
    rows: u64,
    dead_letters: u64,
    spills: u64,
}

/// Shards of a fold the reader threads share: enough that two readers seldom want the same one.
const FOLD_SHARDS: usize = 16;

/// Bulk load every build from what the fold holds: builds that spilled one after another on the
/// spill's connection (it holds their staging tables), the others each on a connection of its own,
/// all at once.
async fn load_all<E: Send + Sync + 'static>(
    engine: &Engine<E>,
    jobs: &mut [Job<E>],
    stores: Vec<RowStore>,
    spill: Option<(sqlx::PgConnection, Vec<SpillState>)>,
    dead_letters: &[Vec<reader::DeadLetter>],
    loaded: &Loaded<'_>,
    report: &mut RebuildReport,
) -> Result<()> {
    let outcomes = match spill {
        // Builds that spilled finish on the spill's connection, which holds their staging tables.
        Some((mut spill_conn, mut states)) => {
            let mut outcomes = Vec::new();
            for (i, (job, store)) in jobs.iter_mut().zip(&stores).enumerate() {
                let spilled = states.get_mut(i).filter(|state| state.spills > 0);
                outcomes.push(
                    load_build(
                        &mut spill_conn,
                        job,
                        store,
                        spilled,
                        &dead_letters[i],
                        loaded,
                    )
                    .await?,
                );
            }
            outcomes
        }
        // Otherwise each build loads on a connection of its own, all at once.
        None => {
            let loads = jobs.iter_mut().zip(&stores).zip(dead_letters).map(
                |((job, store), letters)| async {
                    let mut conn = sqlx::PgConnection::connect(&engine.database_url)
                        .await
                        .context(|| format!("connecting to load {}", job.build.schema_name))?;
                    load_build(&mut conn, job, store, None, letters, loaded).await
                },
            );
            futures::future::try_join_all(loads).await?
        }
    };
    for (job, outcome) in jobs.iter().zip(outcomes) {
        report.rows_loaded += outcome.rows;
        report.dead_letters += outcome.dead_letters;
        report.spills += outcome.spills;
        super::metrics::rows_written(job.projection.name(), "bulk_load", outcome.rows);
        super::metrics::events_applied(job.projection.name(), "replay", loaded.events);
        tracing::info!(
            message = "loaded",
            projection = job.projection.name(),
            build_id = job.build.build_id,
            rows = outcome.rows
        );
    }
    // Freeing millions of rows takes seconds: not on a runtime worker.
    tokio::task::spawn_blocking(move || drop(stores));
    Ok(())
}

/// Bulk load one build with its positions, dead letters and source checks, in one transaction
/// (one COPY per table, or the last flush of a build that spilled), leaving it in phase indexing.
async fn load_build<E: Send + Sync + 'static>(
    conn: &mut sqlx::PgConnection,
    job: &mut Job<E>,
    store: &RowStore,
    spilled: Option<&mut SpillState>,
    letters: &[reader::DeadLetter],
    loaded: &Loaded<'_>,
) -> Result<LoadOutcome> {
    let gate = loaded.gate;
    let mut tx = conn
        .begin()
        .await
        .context(|| "starting the bulk load".into())?;
    let (rows, spills) = match spilled {
        Some(state) => {
            state.flush(&mut tx, tables(job), store, gate).await?;
            let rows = SpillState::row_count(&mut tx, tables(job)).await?;
            (rows, u64::from(state.spills))
        }
        None => (
            writer::bulk_load(&mut tx, tables(job), store, gate).await?,
            0,
        ),
    };
    let letters: Vec<_> = letters.iter().map(|l| l.stored()).collect();
    let dead_letters =
        dead_letters::insert(&mut tx, job.build.build_id, job.projection.name(), &letters).await?;
    catalog::insert_positions(
        &mut tx,
        job.build.build_id,
        loaded.positions,
        loaded.log_end,
    )
    .await?;
    catalog::record_load(
        &mut tx,
        job.build.build_id,
        loaded.events,
        rows,
        loaded.source_checks,
    )
    .await?;
    catalog::set_phase(&mut tx, job.build.build_id, Phase::Indexing).await?;
    tx.commit()
        .await
        .context(|| format!("committing the bulk load of {}", job.build.schema_name))?;
    job.build.phase = Phase::Indexing;
    Ok(LoadOutcome {
        rows,
        dead_letters,
        spills,
    })
}

/// Stop, resumably, when a build's tables take more than the disk budget.
async fn check_disk_budget<E: Send + Sync + 'static>(
    engine: &Engine<E>,
    job: &Job<E>,
    budget: Option<u64>,
) -> Result<()> {
    let Some(budget) = budget else {
        return Ok(());
    };
    let bytes: i64 = sqlx::query_scalar(
        "SELECT coalesce(sum(pg_total_relation_size(c.oid)), 0)::bigint FROM pg_class c
         JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = $1 AND c.relkind = 'r'",
    )
    .bind(&job.build.schema_name)
    .fetch_one(engine.catalog.pool())
    .await
    .context(|| format!("measuring the tables of {}", job.build.schema_name))?;
    if bytes as u64 > budget {
        return Err(EngineError::DiskBudget {
            projection: job.projection.name().to_string(),
            build_id: job.build.build_id,
            schema: job.build.schema_name.clone(),
            bytes: bytes as u64,
            budget,
        });
    }
    Ok(())
}

async fn build_indexes<E: Send + Sync + 'static>(
    engine: &Engine<E>,
    job: &mut Job<E>,
    single_core: bool,
) -> Result<()> {
    let sql = engine
        .schemas
        .load(job.projection.name(), job.projection.version())?;
    let mut conn = sqlx::PgConnection::connect(&engine.database_url)
        .await
        .context(|| "connecting to build indexes".into())?;
    writer::build_indexes(&mut conn, tables(job), &sql, single_core).await?;
    job.build.phase = Phase::CatchingUp;
    Ok(())
}
