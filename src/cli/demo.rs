//! `reproject demo`: the whole job, end to end, on an embedded broker and the local PostgreSQL.
//!
//! 1. starts librdkafka's mock cluster in this process and creates a fresh database;
//! 2. seeds the domain's deterministic example history (in several schema versions);
//! 3. rebuilds every projection while a producer keeps appending new events, and swaps them in;
//! 4. follows the log until every event is applied, then prints the status and compares the views
//!    with totals the generator computed on its own. Exits non-zero if they differ.

use super::output::outln;
use std::time::{Duration, Instant};

use clap::Args;

use super::report::print_report;
use super::{shutdown_token, status, totals, Cx, Outcome, Settings};
use crate::domain::Domain;
use crate::domain::History;
use crate::engine::rebuild::{self, RebuildOptions};
use crate::engine::run::{self, RunOptions};
use crate::engine::Tuning;
use crate::sink::database::recreate_database;
use crate::source::dev_broker::DevBroker;
use crate::source::producer::LogWriter;
use crate::swap::SwapOptions;

#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Events in the seeded history
    #[arg(long, default_value_t = 1_000_000)]
    pub events: u64,
    /// Events appended while the rebuild runs
    #[arg(long, default_value_t = 50_000)]
    pub live_events: u64,
    /// Rate of the live events, per second
    #[arg(long, default_value_t = 20_000)]
    pub live_rate: u64,
    /// Partitions of the topic (the mock cluster keeps at most 5 MiB per partition: about 100,000
    /// compressed events of 50 bytes)
    #[arg(long, default_value_t = 16)]
    pub partitions: i32,
    /// Random seed of the history
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// The database to (re)create for the demo, on the server DATABASE_URL points at
    #[arg(long, default_value = "reproject_demo")]
    pub database: String,
}

pub async fn run<D: Domain>(cx: &Cx<D>, args: DemoArgs) -> anyhow::Result<Outcome> {
    let mut settings = cx.settings()?;
    let example = cx.example("demo")?;
    outln!(
        "== reproject demo ({}): {} events of history, {} more arriving during the rebuild",
        cx.domain.name(),
        args.events,
        args.live_events
    );

    let broker = DevBroker::start_with(&settings.topics, args.partitions)?;
    settings.kafka.brokers = broker.bootstrap_servers();
    settings.database_url = recreate_database(&settings.database_url, &args.database).await?;
    outln!(
        "   broker: in-process mock cluster at {}, topics {} ({} partitions each)",
        settings.kafka.brokers,
        settings.topics.join(", "),
        args.partitions
    );
    outln!(
        "   database: {} (recreated)",
        super::config::redact_url(&settings.database_url)
    );

    // 1. The history.
    let mut history = example.history(&crate::domain::HistorySize::new(
        args.events + args.live_events,
        args.seed,
    ));
    let (kafka, topics, events) = (settings.kafka.clone(), settings.topics.clone(), args.events);
    let started = Instant::now();
    let (history, versions) = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
        super::seed::append_records(&kafka, &topics, "consistent_random", &mut history, events)?;
        let versions = history.expected().events_by_version;
        Ok((history, versions))
    })
    .await??;
    outln!(
        "== seeded {} events in {:.1}s; per schema version: {versions:?}",
        args.events,
        started.elapsed().as_secs_f64()
    );

    // 2. New events keep arriving while the rebuild runs.
    let (kafka, topics, live, rate) = (
        settings.kafka.clone(),
        settings.topics.clone(),
        args.live_events,
        args.live_rate.max(1),
    );
    // Stopped early when the rebuild fails, so the error is printed now, not after the producer has
    // given up on a broker that went away with the demo.
    let stop_live = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop = stop_live.clone();
    let producer = tokio::task::spawn_blocking(move || -> anyhow::Result<Box<dyn History>> {
        let mut history = history;
        let mut writer = LogWriter::new(&kafka, &topics[0], "consistent_random")?;
        let started = Instant::now();
        for (i, record) in history.by_ref().take(live as usize).enumerate() {
            if stop.load(std::sync::atomic::Ordering::Relaxed) {
                anyhow::bail!("live producer stopped");
            }
            super::seed::append(&mut writer, &topics, &record)?;
            let due = Duration::from_secs_f64(i as f64 / rate as f64);
            if let Some(wait) = due.checked_sub(started.elapsed()) {
                std::thread::sleep(wait.min(Duration::from_millis(50)));
            }
        }
        writer.finish()?;
        Ok(history)
    });

    // 3. Rebuild everything and swap.
    let engine = match rebuild_all(cx, &settings).await {
        Ok(engine) => engine,
        Err(e) => {
            stop_live.store(true, std::sync::atomic::Ordering::Relaxed);
            let _ = producer.await;
            return Err(e);
        }
    };

    // 4. Apply what is left, then check.
    let history = producer.await??;
    outln!("== live producer done; following the log until every event is applied");
    let run_options = RunOptions {
        backfill: false,
        rebuild: rebuild_options(&settings),
        exit_when_caught_up: Some(0),
        shared: false,
    };
    tokio::time::timeout(
        Duration::from_secs(300),
        run::run(engine.clone(), run_options, shutdown_token()),
    )
    .await
    .map_err(|_| anyhow::anyhow!("the views did not catch up with the log within 5 minutes"))??;
    let report = crate::engine::status::collect(&engine).await?;
    outln!("\n== status\n{}", status::render(&report));
    let expected = history.expected();
    let actual = example
        .actual_totals(engine.catalog.pool(), &settings.view_schema)
        .await?;
    outln!(
        "== expected totals (computed by the generator) vs the live views, over {} events",
        expected.events
    );
    Ok(totals::print_comparison(&expected, &actual))
}

fn rebuild_options(settings: &Settings) -> RebuildOptions {
    RebuildOptions {
        allow_truncated_history: false,
        swap: true,
        swap_options: SwapOptions {
            view_schema: settings.view_schema.clone(),
            ..SwapOptions::default()
        },
        quiet: settings.quiet,
        memory_budget: None,
        disk_budget: None,
        verify: None,
    }
}

async fn rebuild_all<D: Domain>(
    cx: &Cx<D>,
    settings: &Settings,
) -> anyhow::Result<std::sync::Arc<crate::engine::Engine<D::Event>>> {
    let engine = std::sync::Arc::new(cx.engine(settings, Tuning::default()).await?);
    let names: Vec<String> = engine
        .projections
        .iter()
        .map(|p| p.name().to_string())
        .collect();
    let options = rebuild_options(settings);
    outln!("== rebuilding {} while events arrive", names.join(", "));
    let report = rebuild::rebuild(&engine, &names, &options, &shutdown_token()).await?;
    print_report(&report);
    Ok(engine)
}
