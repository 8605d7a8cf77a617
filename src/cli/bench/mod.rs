//! `reproject bench`: the end-to-end benchmark. Seeds a history into the in-process mock cluster,
//! estimates a rebuild of every projection (`reproject estimate --all`), rebuilds every projection
//! and swaps, then, on the same log and database:
//! - a baseline that does what a hand-written backfill script does: the same decoding and upcasters,
//!   then one `INSERT .. ON CONFLICT DO UPDATE` per event in transactions of 1,000;
//! - the swap's effect on readers: 8 connections query the stable name in a loop while
//!   the domain's first projection is rebuilt and swapped again.
//!
//! - the limits, on the same log and server (see [`limits`]): a raw read of the log, and a raw COPY
//!   and index build of the rows the rebuild wrote, each phase reported as a ratio to its limit;
//! - the follow: the history's next events appended as a backlog, then every active build caught
//!   up to the log's head as `run` does it (no throttle), timed.
//!
//! Prints the figures and, with `--json FILE`, writes them for scripts to compare runs.

mod limits;
mod workers;

use super::output::outln;
use crate::engine::memory::size_text;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Args;
use rdkafka::consumer::BaseConsumer;
use rdkafka::message::Message;
use serde::Serialize;
use sqlx::Connection;

use super::report::print_report;
use super::seed::append_records;
use super::{Cx, Outcome};
use crate::domain::Domain;
use crate::engine::rebuild::{self, RebuildOptions, RebuildReport};
use crate::engine::{Engine, Tuning};
use crate::envelope;
use crate::projection::{Changes, Event, RowStore, Value};
use crate::sink::database::recreate_database;
use crate::source::dev_broker::{DevBroker, DevBrokerProcess};
use crate::swap::SwapOptions;

/// How the bench's producer partitions keys: librdkafka's default, as most producers do.
const HISTORY_PARTITIONER: &str = "consistent_random";

/// Where the bench's broker runs.
#[derive(clap::ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum BrokerPlace {
    /// librdkafka's mock cluster inside the bench's process: its threads share the bench's cores
    /// and its copy of the log counts in the bench's memory
    #[default]
    InProcess,
    /// The same mock cluster as `reproject dev-broker`, a process of its own, reached over
    /// loopback TCP as a production broker is
    OwnProcess,
}

#[derive(Args, Debug)]
pub struct BenchArgs {
    /// Where the broker runs
    #[arg(long, value_enum, default_value_t = BrokerPlace::InProcess)]
    pub broker: BrokerPlace,
    /// Events in the history (orders: a tenth of it)
    #[arg(long, default_value_t = 2_000_000)]
    pub events: u64,
    /// Partitions of the topic: the mock cluster keeps 5 MiB per partition (about 78,000 events)
    #[arg(long, default_value_t = 32)]
    pub partitions: i32,
    /// Events the per-event baseline writes (at least 100,000 for a fair rate)
    #[arg(long, default_value_t = 100_000)]
    pub baseline_events: u64,
    /// Events of the history's continuation appended after the rebuild, as a backlog the follow
    /// catches up (0: no follow phase). Default: half the history, at most 1,000,000, so that the
    /// log still fits the mock cluster's 5 MiB per partition
    #[arg(long)]
    pub follow_events: Option<u64>,
    /// Readers querying the stable name while the swap happens
    #[arg(long, default_value_t = 8)]
    pub readers: usize,
    /// The database to (re)create, on the server DATABASE_URL points at
    #[arg(long, default_value = "reproject_bench")]
    pub database: String,
    /// Also write the figures as JSON to this file
    #[arg(long, value_name = "FILE")]
    pub json: Option<std::path::PathBuf>,
    /// Reader threads the replay shares the partitions out to. Default: one per core, up to 8
    #[arg(long, value_name = "THREADS", value_parser = clap::value_parser!(u16).range(1..=64))]
    pub replay_readers: Option<u16>,
    /// The replay's readers fold their own batches into shared shards instead of one fold thread
    /// (as `rebuild --fold-in-readers`): to compare the two on this machine
    #[arg(long)]
    pub fold_in_readers: bool,
    /// Events per batch: per transaction of the follow phase, per fold step of the replays
    #[arg(long, default_value_t = Tuning::default().batch_events)]
    pub batch_events: usize,
    /// Committed rows the follow's writer keeps for its next batches (0: reads every row back)
    #[arg(long, value_name = "SIZE", value_parser = super::config::parse_size_or_zero, default_value = "256MiB")]
    pub writer_memory: usize,
    /// The follow phase writes what was read while its writer was busy in transactions of up to
    /// this many events (0: every batch on its own)
    #[arg(long, default_value_t = Tuning::default().catch_up_batch_events, value_name = "EVENTS")]
    pub catch_up_batch_events: usize,
    /// Also rebuild the same log with this many processes of this program sharing one build
    /// (`rebuild --all --shared`), and with one process on that path, for the ratio (0: not)
    #[arg(long, default_value_t = 0, value_name = "N")]
    pub workers: usize,
    #[command(flatten)]
    pub memory: super::args::MemoryArgs,
}

#[derive(Debug, Default, Serialize)]
pub struct BenchFigures {
    pub events: u64,
    pub partitions: i32,
    pub broker: BrokerPlace,
    pub seed_seconds: f64,
    /// From the rebuild's first fetch to the end of the last swap.
    pub rebuild_seconds: f64,
    pub events_per_second: f64,
    pub rebuild: RebuildReport,
    pub peak_rss_bytes: u64,
    pub baseline_events: u64,
    pub baseline_seconds: f64,
    pub baseline_events_per_second: f64,
    /// reproject's rate over the baseline's, in the same run.
    pub speedup: f64,
    pub readers: usize,
    pub reader_queries: u64,
    pub reader_errors: u64,
    /// The longest query of any reader while the swap's transaction(s) ran: time blocked by the swap.
    pub reader_longest_during_swap_ms: f64,
    /// The longest query over the whole second rebuild (bulk load and index builds compete for the
    /// two cores), and the median.
    pub reader_longest_ms: f64,
    pub reader_median_ms: f64,
    /// Reader queries over 100 ms, by the phase of the second rebuild they started in, with the
    /// longest of each.
    pub slow_reader_queries_by_phase: std::collections::BTreeMap<String, (u64, f64)>,
    pub swap_commit_ms: f64,
    /// The same log read with nothing decoded, on as many threads as the replay.
    pub read_limit: limits::ReadLimit,
    /// The replay's events per second as a share of the raw read's records per second.
    pub replay_share_of_read_limit: f64,
    /// The rebuild's rows written again by PostgreSQL alone: COPY into unindexed tables, then the
    /// same indexes.
    pub write_limit: limits::WriteLimit,
    /// The rebuild's bulk load and index builds over the write limit's COPY and index builds.
    pub load_and_indexes_over_write_limit: f64,
    /// The backlog appended after the rebuild, and every active build caught up with it.
    pub follow: FollowFigures,
    /// `estimate --all` before the rebuild, against what the rebuild then took.
    pub estimate: EstimateFigures,
    /// With `--workers N`: the same log rebuilt by 1 and by N processes sharing one build.
    pub shared_rebuilds: Vec<workers::SharedRebuild>,
}

/// The estimate's prediction against the rebuild it predicted, on the same log, in the same run.
#[derive(Debug, Default, Serialize)]
pub struct EstimateFigures {
    pub sample_share: f64,
    /// The whole estimate (pilot and scratch load), and that over the rebuild's time.
    pub seconds: f64,
    pub share_of_rebuild: f64,
    /// The pilot's pace against the replay's.
    pub events_per_second: f64,
    pub replay_events_per_second: f64,
    /// Replay, load and indexes as predicted, before the margin, and as the rebuild took them.
    pub predicted_seconds: f64,
    pub measured_seconds: f64,
    pub predicted_over_measured: f64,
    pub margin: f64,
}

/// The follow phase: a backlog caught up as `run` does it, every active build at once.
#[derive(Debug, Default, Serialize)]
pub struct FollowFigures {
    pub backlog_events: u64,
    pub builds: usize,
    /// From the follow's start (locks, checks, reader) until every build reached the log's head.
    pub seconds: f64,
    pub events_per_second: f64,
    pub rows_written: u64,
    /// Of `seconds`, how long the writer waited for the log to be read.
    pub read_wait_seconds: f64,
    /// The most events one transaction wrote (see `--catch-up-batch-events`).
    pub largest_write_events: u64,
}

pub async fn run<D: Domain>(cx: &Cx<D>, args: BenchArgs) -> anyhow::Result<Outcome> {
    let mut settings = cx.settings()?;
    let broker = start_broker(args.broker, &settings.topics, args.partitions)?;
    settings.kafka.brokers = broker.bootstrap_servers();
    settings.database_url = recreate_database(&settings.database_url, &args.database).await?;
    settings.quiet = true;
    let mut figures = BenchFigures {
        events: args.events,
        partitions: args.partitions,
        baseline_events: args.baseline_events.min(args.events),
        readers: args.readers,
        broker: args.broker,
        ..BenchFigures::default()
    };
    outln!(
        "== bench: {} events over {} partitions ({}), database {}",
        args.events,
        args.partitions,
        match args.broker {
            BrokerPlace::InProcess => "mock cluster in this process",
            BrokerPlace::OwnProcess => "mock cluster in a process of its own",
        },
        args.database
    );

    // The history.
    let mut history = cx
        .example("bench")?
        .history(&crate::domain::HistorySize::new(args.events, 42));
    let (kafka, topics, events) = (settings.kafka.clone(), settings.topics.clone(), args.events);
    let started = Instant::now();
    let history = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
        append_records(&kafka, &topics, HISTORY_PARTITIONER, &mut history, events)?;
        Ok(history)
    })
    .await??;
    figures.seed_seconds = started.elapsed().as_secs_f64();
    outln!("   seeded in {:.1}s", figures.seed_seconds);

    // The rebuild, end to end.
    let tuning = Tuning {
        replay_readers: args
            .replay_readers
            .map_or_else(crate::engine::default_replay_readers, usize::from),
        fold_in_readers: args.fold_in_readers,
        batch_events: args.batch_events.max(1),
        known_rows_bytes: args.writer_memory,
        catch_up_batch_events: args.catch_up_batch_events,
        ..Tuning::default()
    };
    let engine = Arc::new(cx.engine(&settings, tuning).await?);
    let names: Vec<String> = engine
        .projections
        .iter()
        .map(|p| p.name().to_string())
        .collect();
    let options = RebuildOptions {
        allow_truncated_history: false,
        swap: true,
        swap_options: SwapOptions {
            view_schema: settings.view_schema.clone(),
            ..SwapOptions::default()
        },
        quiet: true,
        memory_budget: args.memory.memory_budget,
        disk_budget: None,
        verify: None,
    };
    let cancel = super::shutdown_token();
    let estimate = crate::engine::estimate::estimate(&engine, &names, Default::default()).await?;
    let started = Instant::now();
    let report = rebuild::rebuild(&engine, &names, &options, &cancel).await?;
    figures.rebuild_seconds = started.elapsed().as_secs_f64();
    figures.events_per_second = report.events_replayed as f64 / figures.rebuild_seconds;
    figures.peak_rss_bytes = crate::engine::memory::peak_rss_bytes(None).unwrap_or(0);
    print_report(&report);
    figures.estimate = estimate_against(&estimate, &report, figures.rebuild_seconds);
    figures.rebuild = report;

    // The limits, on the same log and the rows just written.
    let (kafka, topics, readers) = (
        engine.kafka.clone(),
        engine.topics.clone(),
        engine.tuning.replay_readers,
    );
    figures.read_limit =
        tokio::task::spawn_blocking(move || limits::raw_read(&kafka, &topics, readers)).await??;
    let replay_rate = figures.rebuild.events_replayed as f64 / figures.rebuild.replay_seconds;
    figures.replay_share_of_read_limit = replay_rate / figures.read_limit.records_per_second;
    let mut schemas = Vec::new();
    for name in &names {
        if let Some(build) = engine.catalog.active_build(name).await? {
            schemas.push(build.schema_name);
        }
    }
    figures.write_limit = limits::raw_write(&settings.database_url, &schemas).await?;
    figures.load_and_indexes_over_write_limit = (figures.rebuild.load_seconds
        + figures.rebuild.index_seconds)
        / (figures.write_limit.copy_seconds + figures.write_limit.index_seconds);

    // The baseline, on the first events of the same log.
    let started = Instant::now();
    baseline(&engine, figures.baseline_events).await?;
    figures.baseline_seconds = started.elapsed().as_secs_f64();
    figures.baseline_events_per_second = figures.baseline_events as f64 / figures.baseline_seconds;
    figures.speedup = figures.events_per_second / figures.baseline_events_per_second;

    // Readers during a swap, of the first projection's first table by its first key column.
    let stop = Arc::new(AtomicBool::new(false));
    let showcase = showcase_projection(&engine)?;
    let table = showcase.tables()[0].clone();
    let key = table.columns[0].clone();
    let view = crate::sink::qualified(&settings.view_schema, table.name);
    let id: String = sqlx::query_scalar(&format!("SELECT {}::text FROM {view} LIMIT 1", key.name))
        .fetch_one(engine.catalog.pool())
        .await
        .with_context(|| format!("picking a row of {view} for the readers"))?;
    let lookup = format!(
        "SELECT 1::int4 FROM {view} WHERE {} = CAST($1 AS {}) LIMIT 1",
        key.name,
        key.ty.pg_name()
    );
    let origin = Instant::now();
    // The readers stand for applications: a thread and a runtime of their own, so that they see the
    // database as an outside client does, not the rebuild's scheduling.
    let readers = {
        let (url, id, stop, count, lookup) = (
            settings.database_url.clone(),
            id.clone(),
            stop.clone(),
            args.readers,
            lookup.clone(),
        );
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            Ok::<_, std::io::Error>(runtime.block_on(futures::future::join_all((0..count).map(
                |_| {
                    read_in_a_loop(
                        url.clone(),
                        lookup.clone(),
                        id.clone(),
                        stop.clone(),
                        origin,
                    )
                },
            ))))
        })
    };
    let again = rebuild::rebuild(&engine, &[showcase.name().to_string()], &options, &cancel).await;
    let swap_end = origin.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    let mut queries = Vec::new();
    let results = tokio::task::spawn_blocking(move || readers.join())
        .await?
        .map_err(|_| anyhow::anyhow!("the readers' thread panicked"))?
        .context("starting the readers' runtime")?;
    for (times, errors) in results {
        queries.extend(times);
        figures.reader_errors += errors;
    }
    let again = again?;
    figures.swap_commit_ms = again.swaps.first().map_or(0.0, |s| s.commit_ms);
    // The swap is the rebuild's last phase: queries that overlap it are the ones it could block.
    let swap_start = swap_end - again.swap_seconds;
    figures.reader_longest_during_swap_ms = queries
        .iter()
        .filter(|(start, ms)| *start <= swap_end && start + ms / 1e3 >= swap_start)
        .map(|(_, ms)| *ms)
        .fold(0.0, f64::max);
    // Phases run one after another and end with the swap: lay them out back from its end. (The
    // aggregate index is written alongside the bulk load and the indexes.)
    let phases = [
        ("replay", again.replay_seconds),
        ("bulk load", again.load_seconds),
        ("indexes", again.index_seconds),
        ("catch-up", again.catch_up_seconds),
        ("swap", again.swap_seconds),
    ];
    let mut bounds = Vec::new();
    let mut end = swap_end;
    for (name, seconds) in phases.iter().rev() {
        bounds.push((*name, end - seconds));
        end -= seconds;
    }
    for (start, ms) in queries.iter().filter(|(_, ms)| *ms > 100.0) {
        let phase = bounds
            .iter()
            .find(|(_, from)| start >= from)
            .map_or("before the replay", |(name, _)| name);
        let entry = figures
            .slow_reader_queries_by_phase
            .entry(phase.to_string())
            .or_default();
        entry.0 += 1;
        entry.1 = entry.1.max(*ms);
    }
    let mut latencies: Vec<f64> = queries.iter().map(|(_, ms)| *ms).collect();
    latencies.sort_by(f64::total_cmp);
    figures.reader_queries = latencies.len() as u64;
    figures.reader_longest_ms = latencies.last().copied().unwrap_or(0.0);
    figures.reader_median_ms = latencies.get(latencies.len() / 2).copied().unwrap_or(0.0);

    // Several processes sharing one rebuild of the same log, before the follow phase adds to it.
    if args.workers > 0 {
        let common = workers::child_args(cx, &settings, args.memory.memory_budget);
        let mut counts = vec![1];
        if args.workers > 1 {
            counts.push(args.workers);
        }
        for count in counts {
            figures
                .shared_rebuilds
                .push(workers::shared_rebuild(&common, count, args.events).await?);
        }
    }

    // The follow: the history goes on while the views serve; `run` catches them up.
    let follow_events = args
        .follow_events
        .unwrap_or_else(|| (args.events / 2).min(1_000_000));
    if follow_events > 0 {
        figures.follow = follow_backlog(
            &engine,
            history,
            settings.topics.clone(),
            follow_events,
            &cancel,
        )
        .await?;
    }

    print_figures(&figures);
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&figures)?)
            .with_context(|| format!("writing {}", path.display()))?;
        outln!("figures written to {}", path.display());
    }
    drop(broker);
    Ok(if figures.reader_errors == 0 {
        Outcome::Success
    } else {
        Outcome::Failed
    })
}

/// What the estimate predicted for replay, load and indexes (before its margin), against what the
/// rebuild took for them.
fn estimate_against(
    estimate: &crate::engine::estimate::Estimate,
    rebuild: &RebuildReport,
    rebuild_seconds: f64,
) -> EstimateFigures {
    let predicted_seconds = estimate.total_seconds / estimate.margin;
    let measured_seconds = rebuild.replay_seconds + rebuild.load_seconds + rebuild.index_seconds;
    EstimateFigures {
        sample_share: estimate.sample_share,
        seconds: estimate.seconds,
        share_of_rebuild: estimate.seconds / rebuild_seconds,
        events_per_second: estimate.events_per_second,
        replay_events_per_second: rebuild.events_replayed as f64 / rebuild.replay_seconds,
        predicted_seconds,
        measured_seconds,
        predicted_over_measured: predicted_seconds / measured_seconds,
        margin: estimate.margin,
    }
}

fn print_figures(f: &BenchFigures) {
    let r = &f.rebuild;
    outln!("\n== figures");
    outln!(
        "rebuild, first fetch to swap: {} events in {:.2}s = {:.0} events/s",
        r.events_replayed,
        f.rebuild_seconds,
        f.events_per_second
    );
    outln!(
        "  replay {:.2}s, load {:.2}s ({} rows), indexes {:.2}s, aggregate index {:.2}s (alongside load and indexes), catch-up {:.2}s, swap {:.2}s",
        r.replay_seconds,
        r.load_seconds,
        r.rows_loaded,
        r.index_seconds,
        r.aggregate_index_seconds,
        r.catch_up_seconds,
        r.swap_seconds
    );
    let e = &f.estimate;
    outln!(
        "estimate before it ({:.0}% pilot): {:.2}s = {:.1}% of the rebuild; replay, load and indexes predicted {:.2}s before its {:.0}% margin, took {:.2}s: {:.2}x (pace {:.0} against the replay's {:.0} events/s)",
        e.sample_share * 100.0,
        e.seconds,
        e.share_of_rebuild * 100.0,
        e.predicted_seconds,
        (e.margin - 1.0) * 100.0,
        e.measured_seconds,
        e.predicted_over_measured,
        e.events_per_second,
        e.replay_events_per_second
    );
    outln!(
        "  peak RSS {}{}",
        size_text(f.peak_rss_bytes),
        if f.broker == BrokerPlace::InProcess {
            " (the in-process mock cluster's copy of the log included)"
        } else {
            ""
        }
    );
    let (read, write) = (&f.read_limit, &f.write_limit);
    outln!(
        "limits, same run: raw read of the log ({} threads, nothing decoded) {} records, {} in {:.2}s = {:.0} records/s; the replay ran at {:.0}% of it",
        read.readers,
        read.records,
        size_text(read.bytes),
        read.seconds,
        read.records_per_second,
        f.replay_share_of_read_limit * 100.0
    );
    outln!(
        "  raw COPY of the rebuild's {} tables ({} rows, row clocks included, {} binary) into unindexed tables {:.2}s, the same indexes and ANALYZE {:.2}s; the rebuild's load + indexes took {:.2}x that",
        write.tables,
        write.rows,
        size_text(write.bytes),
        write.copy_seconds,
        write.index_seconds,
        f.load_and_indexes_over_write_limit
    );
    outln!(
        "baseline (one upsert per event, transactions of 1,000): {} events in {:.2}s = {:.0} events/s",
        f.baseline_events, f.baseline_seconds, f.baseline_events_per_second
    );
    outln!("speed-up over the baseline: {:.0}x", f.speedup);
    outln!(
        "readers during a rebuild and swap of the first projection: {} readers, {} queries, {} errors; longest while the swap ran {:.1} ms (swap commit {:.1} ms); longest over the whole rebuild {:.1} ms, median {:.2} ms",
        f.readers,
        f.reader_queries,
        f.reader_errors,
        f.reader_longest_during_swap_ms,
        f.swap_commit_ms,
        f.reader_longest_ms,
        f.reader_median_ms
    );
    for (phase, (count, longest)) in &f.slow_reader_queries_by_phase {
        outln!("  reader queries over 100 ms during {phase}: {count}, longest {longest:.0} ms");
    }
    for shared in &f.shared_rebuilds {
        outln!(
            "{} process(es) sharing one rebuild (`rebuild --all --shared`, start to last exit): {:.2}s = {:.0} events/s, {:.2}x the plain rebuild's time; largest peak RSS of one process {}",
            shared.workers,
            shared.seconds,
            shared.events_per_second,
            shared.seconds / f.rebuild_seconds,
            size_text(shared.largest_peak_rss_bytes)
        );
    }
    let follow = &f.follow;
    if follow.backlog_events > 0 {
        outln!(
            "follow: a backlog of {} events caught up by {} builds in {:.2}s = {:.0} events/s ({} rows written, up to {} events a transaction; the writer waited {:.2}s for reads)",
            follow.backlog_events,
            follow.builds,
            follow.seconds,
            follow.events_per_second,
            follow.rows_written,
            follow.largest_write_events,
            follow.read_wait_seconds
        );
    }
}

/// Append `events` more of `history` while every build is active, then catch every active build up
/// to the log's head as `run`'s follow does (one follower for all of them), timed from its start.
async fn follow_backlog<E: Send + Sync + 'static>(
    engine: &Engine<E>,
    mut history: Box<dyn crate::domain::History>,
    topics: Vec<String>,
    events: u64,
    cancel: &tokio_util::sync::CancellationToken,
) -> anyhow::Result<FollowFigures> {
    let kafka = engine.kafka.clone();
    tokio::task::spawn_blocking(move || {
        append_records(&kafka, &topics, HISTORY_PARTITIONER, &mut history, events)
    })
    .await??;
    let mut targets = Vec::new();
    for projection in &engine.projections {
        let Some(build) = engine.catalog.active_build(projection.name()).await? else {
            continue;
        };
        let positions = engine.catalog.positions(build.build_id).await?;
        targets.push(crate::engine::follow::FollowTarget {
            build,
            projection: projection.clone(),
            positions,
        });
    }
    let builds = targets.len();
    let started = Instant::now();
    let outcome = crate::engine::follow::follow(
        engine,
        targets,
        crate::engine::follow::Until::CaughtUp { lag_below: 0 },
        cancel,
        "bench follow",
    )
    .await?;
    let seconds = started.elapsed().as_secs_f64();
    if outcome.events != events {
        anyhow::bail!(
            "the follow applied {} events of a backlog of {events}",
            outcome.events
        );
    }
    Ok(FollowFigures {
        backlog_events: events,
        builds,
        seconds,
        events_per_second: events as f64 / seconds,
        rows_written: outcome.rows_written,
        read_wait_seconds: outcome.read_wait.as_secs_f64(),
        largest_write_events: outcome.largest_write,
    })
}

/// The broker the bench seeds and reads, in this process or in one of its own; dropped at the end.
enum Broker {
    InProcess(DevBroker),
    OwnProcess(DevBrokerProcess),
}

impl Broker {
    fn bootstrap_servers(&self) -> String {
        match self {
            Broker::InProcess(broker) => broker.bootstrap_servers(),
            Broker::OwnProcess(process) => process.address.clone(),
        }
    }
}

fn start_broker(place: BrokerPlace, topics: &[String], partitions: i32) -> anyhow::Result<Broker> {
    Ok(match place {
        BrokerPlace::InProcess => Broker::InProcess(DevBroker::start_with(topics, partitions)?),
        BrokerPlace::OwnProcess => {
            let program =
                std::env::current_exe().context("finding this program to run dev-broker")?;
            let partitions = u32::try_from(partitions)
                .map_err(|_| anyhow::anyhow!("--partitions must be positive, got {partitions}"))?;
            Broker::OwnProcess(
                DevBrokerProcess::spawn_with_topics(&program.to_string_lossy(), partitions, topics)
                    .context("starting dev-broker in a process of its own")?,
            )
        }
    })
}

/// The projection the baseline and the readers use: the domain's first.
fn showcase_projection<E>(
    engine: &Engine<E>,
) -> anyhow::Result<crate::projection::DynProjection<E>> {
    engine
        .projections
        .first()
        .filter(|p| !p.tables().is_empty())
        .cloned()
        .ok_or_else(|| anyhow::anyhow!("bench needs a projection with at least one table"))
}

/// What a hand-written backfill does: consume, decode, upcast, project the first projection's first
/// table, and write each event's resulting row with its own `INSERT .. ON CONFLICT DO UPDATE`,
/// committing every 1,000.
async fn baseline<E: Send + Sync + 'static>(engine: &Engine<E>, events: u64) -> anyhow::Result<()> {
    let projection = showcase_projection(engine)?;
    let spec = projection.tables()[0].clone();
    let mut conn = sqlx::PgConnection::connect(&engine.database_url).await?;
    let sql = engine
        .schemas
        .load(projection.name(), projection.version())?;
    sqlx::raw_sql(&format!(
        "DROP SCHEMA IF EXISTS rp_bench_baseline CASCADE; CREATE SCHEMA rp_bench_baseline;
         SET search_path TO rp_bench_baseline; {} {}; RESET search_path;",
        sql.tables, sql.indexes
    ))
    .execute(&mut conn)
    .await
    .context("creating the baseline's table")?;
    let columns: Vec<&str> = spec.columns.iter().map(|c| c.name).collect();
    let placeholders: Vec<String> = spec
        .columns
        .iter()
        .enumerate()
        .map(|(i, c)| {
            format!(
                "${}::{}",
                i + 1,
                c.ty.pg_name()
                    .replace("timestamp with time zone", "timestamptz")
            )
        })
        .collect();
    let statement = format!(
        "INSERT INTO rp_bench_baseline.{} ({}) VALUES ({}) ON CONFLICT ({}) DO UPDATE SET {}",
        spec.name,
        columns.join(", "),
        placeholders.join(", "),
        columns[..spec.key_len].join(", "),
        columns[spec.key_len..]
            .iter()
            .map(|c| format!("{c} = EXCLUDED.{c}"))
            .collect::<Vec<_>>()
            .join(", ")
    );

    // Read the slice on a thread, as the script's consumer loop would.
    let (kafka, topics, registry, framing) = (
        engine.kafka.clone(),
        engine.topics.clone(),
        engine.registry.clone(),
        engine.framing.clone(),
    );
    let specs = [spec.clone()];
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<Vec<Value>>>(64);
    let reader = tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
        let consumer: BaseConsumer = kafka.consumer("reproject-bench-baseline")?;
        let partitions = kafka.partitions(&consumer, &topics)?;
        kafka.assign(
            &consumer,
            &topics,
            &partitions.iter().map(|&p| (p, 0)).collect(),
        )?;
        let mut store = RowStore::new(1);
        let mut changes = Changes::default();
        let mut read = 0;
        let mut chunk = Vec::new();
        while read < events {
            let Some(message) = consumer.poll(Duration::from_secs(10)) else {
                anyhow::bail!("the baseline's consumer got nothing for 10 s");
            };
            let message = message?;
            let headers = crate::source::record_headers(&message);
            let mut decoded = envelope::Decoded::default();
            framing.decode_into(
                &crate::source::raw_record(&message, &headers),
                message.partition(),
                &mut decoded,
            )?;
            let payload = registry.upcast(&decoded.type_url, &decoded.payload)?;
            projection.apply(
                &Event {
                    meta: &decoded.meta,
                    payload: &payload,
                },
                &mut changes,
            );
            let mut key = None;
            let at = crate::projection::LogicalTime::of(&decoded.meta);
            for change in changes.drain() {
                key = Some(change.key(specs[0].key_len).to_vec());
                store.apply(&specs, change, at)?;
            }
            if let Some(row) = key.and_then(|k| store.table(0).get(&k).cloned().flatten()) {
                chunk.push(row);
            }
            read += 1;
            if chunk.len() == 1_000 && tx.blocking_send(std::mem::take(&mut chunk)).is_err() {
                return Ok(());
            }
        }
        let _ = tx.blocking_send(chunk);
        Ok(())
    });
    while let Some(rows) = rx.recv().await {
        let mut transaction = conn.begin().await?;
        for row in rows {
            let mut query = sqlx::query(&statement);
            for value in row {
                query = match value {
                    Value::Null => query.bind(None::<String>),
                    Value::BigInt(v) => query.bind(v.to_string()),
                    Value::Bool(b) => query.bind(b.to_string()),
                    Value::Text(s) => query.bind(s.into_string()),
                    other => query.bind(other.to_string()),
                };
            }
            query
                .execute(&mut *transaction)
                .await
                .context("the baseline's upsert")?;
        }
        transaction.commit().await?;
    }
    reader.await??;
    Ok(())
}

/// Query the stable name until stopped; each query's start (seconds since `origin`) and duration (ms).
async fn read_in_a_loop(
    url: String,
    lookup: String,
    id: String,
    stop: Arc<AtomicBool>,
    origin: Instant,
) -> (Vec<(f64, f64)>, u64) {
    let mut times = Vec::new();
    let mut errors = 0;
    let Ok(mut conn) = sqlx::PgConnection::connect(&url).await else {
        return (times, 1);
    };
    while !stop.load(Ordering::Relaxed) {
        let started = Instant::now();
        let result: Result<Option<i32>, _> = sqlx::query_scalar(&lookup)
            .bind(&id)
            .fetch_optional(&mut conn)
            .await;
        times.push((
            (started - origin).as_secs_f64(),
            started.elapsed().as_secs_f64() * 1e3,
        ));
        if !matches!(result, Ok(Some(_))) {
            errors += 1;
        }
    }
    (times, errors)
}
