//! The command line: flags (clap), then a checked configuration, then one file per subcommand.
//! Connection settings come from flags, then the environment, then a config file, then defaults that
//! work on a development machine.

mod args;
mod bench;
mod config;
mod dead_letters;
mod demo;
mod dev_broker;
mod estimate;
mod gc;
mod output;
mod pause;
mod rebuild;
mod replay;
mod report;
mod rollback;
mod run;
mod seed;
mod status;
mod swap;
mod totals;
mod tune;
mod verify;

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

pub use config::Settings;

#[derive(Parser, Debug)]
#[command(
    name = "reproject",
    version,
    about = "Rebuild PostgreSQL read models from a Kafka event log, and swap them in without downtime",
    long_about = "reproject replays an event log from offset zero through versioned Protobuf upcasters into \
freshly created projection tables, keeps them current, and swaps a rebuilt view in atomically once it has \
caught up with the live head of the log.\n\nStart with `reproject demo`."
)]
pub struct Cli {
    #[command(flatten)]
    pub global: GlobalArgs,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Args, Debug, Clone, Default)]
pub struct GlobalArgs {
    /// Kafka bootstrap servers, comma separated [env: REPROJECT_BROKERS] [default: 127.0.0.1:9092]
    #[arg(long, global = true, value_name = "HOST:PORT")]
    pub brokers: Option<String>,

    /// PostgreSQL URL [env: DATABASE_URL] [default: postgres://postgres@127.0.0.1:5432/postgres]
    #[arg(long, global = true, value_name = "URL")]
    pub database_url: Option<String>,

    /// A replica for verification and other heavy reads, instead of the primary
    /// [env: REPROJECT_READ_DATABASE_URL]
    #[arg(long, global = true, value_name = "URL")]
    pub read_database: Option<String>,

    /// The topic holding the event log [env: REPROJECT_TOPIC] [default: shop.orders]
    #[arg(long, global = true)]
    pub topic: Option<String>,

    /// Any librdkafka setting, as kcat takes it; repeatable. For example
    /// `-X security.protocol=SASL_SSL -X sasl.mechanisms=SCRAM-SHA-512 -X sasl.username=app -X sasl.password=...`
    #[arg(short = 'X', global = true, value_name = "KEY=VALUE")]
    pub kafka_property: Vec<String>,

    /// Serve Prometheus metrics at http://ADDR/metrics while the command runs (useful with run and
    /// rebuild), e.g. 127.0.0.1:9464
    #[arg(long, global = true, value_name = "ADDR")]
    pub metrics_addr: Option<std::net::SocketAddr>,

    /// A TOML config file [env: REPROJECT_CONFIG] [default: ./reproject.toml when it exists]
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Schema of the stable views applications read [default: public]
    #[arg(long, global = true)]
    pub view_schema: Option<String>,

    /// Read projection SQL from this directory (laid out like schemas/) instead of the copy built in
    #[arg(long, global = true, value_name = "DIR")]
    pub schema_dir: Option<PathBuf>,

    /// More log output (-v debug, -vv trace); RUST_LOG overrides
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,

    /// Only warnings and errors, and no progress bar
    #[arg(short, long, global = true)]
    pub quiet: bool,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the whole job end to end on an embedded broker and the local PostgreSQL: seed a history in
    /// three schema versions, rebuild every projection while new events arrive, swap, and check the
    /// views against independently computed totals.
    Demo(demo::DemoArgs),
    /// Run librdkafka's mock cluster as a process of its own, for development.
    DevBroker(dev_broker::DevBrokerArgs),
    /// Write a deterministic shop history to the topic.
    Seed(seed::SeedArgs),
    /// Rebuild projections from offset zero into fresh tables, catch up, and swap them in.
    Rebuild(rebuild::RebuildArgs),
    /// Predict a rebuild's duration, rows, table size and memory from a pilot over ~1% of the log.
    Estimate(estimate::EstimateArgs),
    /// Keep every active projection current; backfill new or outdated projection versions.
    Run(run::RunArgs),
    /// Show each projection's builds, positions, lag and progress.
    Status(status::StatusArgs),
    /// Make a caught-up build (built with `rebuild --no-swap`) the live one.
    Swap(swap::SwapArgs),
    /// Pause writing to a projection's builds (rebuild, catch-up, follow) at the next batch.
    Pause(pause::PauseArgs),
    /// Resume a paused projection.
    Resume(pause::PauseArgs),
    /// Compare a new build with the live one (or a version, or a build) at the same log position:
    /// counts, per-bucket checksums and sums, rows on one side only, a sample column by column.
    Verify(verify::VerifyCommandArgs),
    /// Change the rate cap, batch size or throttle thresholds of a projection's running commands.
    Tune(tune::TuneArgs),
    /// Make the previously live build of a projection live again, after catching it up.
    Rollback(rollback::RollbackArgs),
    /// Drop the tables of retired and failed builds beyond --keep and older than --older-than-hours.
    Gc(gc::GcArgs),
    /// Replay one aggregate's events through the upcasters and projections, and compare with the live
    /// rows: why does this row look the way it does?
    Replay(replay::ReplayArgs),
    /// The end-to-end benchmark: seed, rebuild and swap, a per-event baseline on the same log, and
    /// readers during a swap. `--json FILE` writes the figures.
    Bench(bench::BenchArgs),
    /// Compare the live shop views with the totals `seed --expected` wrote.
    CheckTotals(totals::CheckTotalsArgs),
    /// Records passed over under `--on-bad-record dead-letter`: list, show, retry after a fix.
    DeadLetters(dead_letters::DeadLettersArgs),
}

/// The projections a command names, or all of them with `--all`.
fn chosen_projections<E>(
    engine: &crate::engine::Engine<E>,
    all: bool,
    named: &[String],
) -> Vec<String> {
    if all {
        engine
            .projections
            .iter()
            .map(|p| p.name().to_string())
            .collect()
    } else {
        named.to_vec()
    }
}

/// How a command ended, for the exit code.
pub enum Outcome {
    Success,
    /// The command ran but found a problem it reports (totals differ).
    Failed,
}

pub async fn run(cli: Cli) -> anyhow::Result<Outcome> {
    let global = cli.global;
    if let Some(addr) = global.metrics_addr {
        crate::engine::metrics::serve(addr).map_err(anyhow::Error::msg)?;
    }
    match cli.command {
        Command::Demo(args) => demo::run(&global, args).await,
        Command::DevBroker(args) => dev_broker::run(&global, args).await,
        Command::Seed(args) => seed::run(&global, args).await,
        Command::Rebuild(args) => rebuild::run(&global, args).await,
        Command::Run(args) => run::run(&global, args).await,
        Command::Estimate(args) => estimate::run(&global, args).await,
        Command::Status(args) => status::run(&global, args).await,
        Command::Swap(args) => swap::run(&global, args).await,
        Command::CheckTotals(args) => totals::run(&global, args).await,
        Command::Replay(args) => replay::run(&global, args).await,
        Command::Verify(args) => verify::run(&global, args).await,
        Command::Tune(args) => tune::run(&global, args).await,
        Command::Rollback(args) => rollback::run(&global, args).await,
        Command::Pause(args) => pause::run(&global, args, true).await,
        Command::Resume(args) => pause::run(&global, args, false).await,
        Command::Gc(args) => gc::run(&global, args).await,
        Command::Bench(args) => bench::run(&global, args).await,
        Command::DeadLetters(args) => dead_letters::run(&global, args).await,
    }
}

/// A token cancelled on SIGINT or SIGTERM: commands stop at the next batch boundary.
pub fn shutdown_token() -> tokio_util::sync::CancellationToken {
    let token = tokio_util::sync::CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        let ctrl_c = tokio::signal::ctrl_c();
        #[cfg(unix)]
        {
            let mut term =
                match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                    Ok(s) => s,
                    Err(_) => {
                        let _ = ctrl_c.await;
                        t.cancel();
                        return;
                    }
                };
            tokio::select! {
                _ = ctrl_c => {}
                _ = term.recv() => {}
            }
        }
        #[cfg(not(unix))]
        let _ = ctrl_c.await;
        tracing::info!(message = "stopping at the next batch boundary");
        t.cancel();
    });
    token
}
