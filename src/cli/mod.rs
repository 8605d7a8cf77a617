//! The command line: flags (clap), then a checked configuration, then one file per subcommand.
//! Connection settings come from flags, then the environment, then a config file, then defaults that
//! work on a development machine.

mod args;
mod bench;
mod check;
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
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand};

pub use config::Settings;

use crate::domain::Domain;
use crate::engine::{Engine, EngineParts, Tuning};

/// The command ran and found what it was asked to check to be wrong (for example totals differ).
pub const EXIT_CHECK_FAILED: u8 = 1;
/// Anything else stopped the command: bad input, an unreachable broker or database.
pub const EXIT_ERROR: u8 = 2;
/// Stopped by SIGINT or SIGTERM; committed work is kept.
pub const EXIT_INTERRUPTED: u8 = 130;

/// The whole `reproject` command line for `domain`: parse flags, start logging, run the command, and
/// turn its result into one readable line and an exit code. A team's `main.rs` is
///
/// ```text
/// fn main() -> std::process::ExitCode {
///     reproject::cli::main(my_events::MyDomain)
/// }
/// ```
pub fn main<D: Domain>(domain: D) -> ExitCode {
    let matches = Cli::command()
        .before_help(format!("domain: {}", domain.name()))
        .get_matches();
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    init_logging(cli.global.verbose, cli.global.quiet);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("reproject: cannot start the async runtime: {e}");
            return ExitCode::from(EXIT_ERROR);
        }
    };
    let result = runtime.block_on(run(Arc::new(domain), cli));
    // Blocking tasks still talking to a broker that is gone must not hold the exit for minutes.
    runtime.shutdown_timeout(std::time::Duration::from_secs(2));
    match result {
        Ok(Outcome::Success) => ExitCode::SUCCESS,
        Ok(Outcome::Failed) => ExitCode::from(EXIT_CHECK_FAILED),
        Err(error) => {
            let interrupted = error
                .downcast_ref::<crate::engine::EngineError>()
                .is_some_and(|e| matches!(e, crate::engine::EngineError::Interrupted));
            eprintln!("reproject: {}", one_line(&error));
            ExitCode::from(if interrupted {
                EXIT_INTERRUPTED
            } else {
                EXIT_ERROR
            })
        }
    }
}

/// The folder of a file-defined domain, when the command line (`--domain DIR`) or the environment
/// (`REPROJECT_DOMAIN`) names one. Read before the command line is parsed, since which domain runs
/// decides the parser's types.
pub fn requested_domain_dir() -> Option<PathBuf> {
    let mut args = std::env::args_os().skip(1);
    while let Some(arg) = args.next() {
        if arg == "--" {
            break;
        }
        if arg == "--domain" {
            return args.next().map(PathBuf::from);
        }
        if let Some(dir) = arg.to_str().and_then(|a| a.strip_prefix("--domain=")) {
            return Some(PathBuf::from(dir));
        }
    }
    std::env::var_os("REPROJECT_DOMAIN")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
}

/// Runs the domain defined by the files in `dir`, or reports every problem they have.
pub fn main_with_files(dir: &std::path::Path) -> ExitCode {
    match crate::domain::files::FileDomain::load(dir) {
        Ok(domain) => main(domain),
        Err(problems) => {
            eprintln!(
                "reproject: the domain in {} has {} problem(s):\n{}",
                dir.display(),
                problems.len(),
                problems.render(dir)
            );
            ExitCode::from(EXIT_ERROR)
        }
    }
}

/// The whole cause chain on one line, the way users read it in a terminal or a log, each cause once.
fn one_line(error: &anyhow::Error) -> String {
    let mut line = String::new();
    for part in error.chain().map(|c| c.to_string()) {
        if !line.contains(&part) {
            if !line.is_empty() {
                line.push_str(": ");
            }
            line.push_str(&part);
        }
    }
    line
}

fn init_logging(verbose: u8, quiet: bool) {
    let default = match (quiet, verbose) {
        (true, _) => "warn",
        (false, 0) => "info",
        (false, 1) => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        // sqlx warns about every statement over a second; a bulk upsert is meant to take that long.
        tracing_subscriber::EnvFilter::new(format!("reproject={default},sqlx::query=error,warn"))
    });
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colours only for a terminal: a log file or a collector gets plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .init();
}

/// What every subcommand starts from: the global flags and the domain it runs for.
pub struct Cx<D> {
    pub global: GlobalArgs,
    pub domain: Arc<D>,
}

impl<D: Domain> Cx<D> {
    /// Flags, environment, config file and defaults, checked.
    pub fn settings(&self) -> anyhow::Result<Settings> {
        Settings::resolve(&self.global, self.domain.default_topics())
    }

    /// The engine for this domain, connected to the database `settings` names.
    pub async fn engine(
        &self,
        settings: &Settings,
        tuning: Tuning,
    ) -> anyhow::Result<Engine<D::Event>> {
        let mut parts = EngineParts::for_domain(
            &self.domain,
            settings.kafka.clone(),
            settings.topics()?,
            settings.database_url.clone(),
            settings.view_schema.clone(),
            settings.schema_dir.clone(),
            tuning,
        )?;
        if let Some(framing) = &settings.framing {
            parts.framing = Arc::new(framing.clone());
        }
        let mut engine = Engine::connect(parts).await.map_err(|e| {
            anyhow::Error::new(e).context(format!(
                "PostgreSQL at {}",
                config::redact_url(&settings.database_url)
            ))
        })?;
        engine.read_database_url = settings
            .read_database_url
            .as_deref()
            .map(crate::engine::named_connection_url);
        crate::engine::health::register(&engine);
        Ok(engine)
    }

    /// [`Cx::engine`] for a command that replays the log or writes views: refused when a view file
    /// was edited under a version that has builds (status, gc and the like still work, to look).
    pub async fn writing_engine(
        &self,
        settings: &Settings,
        tuning: Tuning,
    ) -> anyhow::Result<Engine<D::Event>> {
        let engine = self.engine(settings, tuning).await?;
        engine.refuse_edited_definitions().await?;
        Ok(engine)
    }

    /// The domain's example history, or an error saying the command needs one.
    pub fn example(&self, command: &str) -> anyhow::Result<&dyn crate::domain::Example> {
        self.domain.example().ok_or_else(|| {
            anyhow::anyhow!(
                "`{command}` needs an example history generator, and the domain {} has none \
                 (see Domain::example); seed, demo, bench and check-totals work only with one",
                self.domain.name()
            )
        })
    }
}

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
    /// A domain defined by files: a folder holding domain.toml, its schemas and
    /// views/<name>/v<N>.toml. The stock binary runs it instead of its built-in example domain
    /// [env: REPROJECT_DOMAIN]
    #[arg(long, global = true, value_name = "DIR")]
    pub domain: Option<PathBuf>,

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

    /// A topic holding the event log; repeatable, or comma-separated, when the log is several topics
    /// (one per aggregate type, say) [env: REPROJECT_TOPIC] [default: the domain's]
    #[arg(long, global = true, value_delimiter = ',')]
    pub topic: Vec<String>,

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
    /// Run the whole job end to end on an embedded broker and the local PostgreSQL: seed the domain's
    /// example history, rebuild every projection while new events arrive, swap, and check the
    /// views against independently computed totals.
    Demo(demo::DemoArgs),
    /// Run librdkafka's mock cluster as a process of its own, for development.
    DevBroker(dev_broker::DevBrokerArgs),
    /// Write the domain's deterministic example history to the topic.
    Seed(seed::SeedArgs),
    /// Rebuild projections from offset zero into fresh tables, catch up, and swap them in.
    Rebuild(rebuild::RebuildArgs),
    /// Predict a rebuild's duration, rows, table size and memory from a pilot over ~2% of the log (--sample).
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
    /// Compare the live views with the totals `seed --expected` wrote.
    CheckTotals(totals::CheckTotalsArgs),
    /// Records passed over under `--on-bad-record dead-letter`: list, show, retry after a fix.
    DeadLetters(dead_letters::DeadLettersArgs),
    /// Check the domain before anything runs: its upcasters, its projections and their tables. With
    /// `--domain DIR`, every problem in the files is reported with its file and line.
    Check(check::CheckArgs),
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

/// Runs one parsed command line for `domain`.
pub async fn run<D: Domain>(domain: Arc<D>, cli: Cli) -> anyhow::Result<Outcome> {
    let cx = Cx {
        global: cli.global,
        domain,
    };
    if let Some(addr) = cx.global.metrics_addr {
        crate::engine::metrics::serve(addr)
            .await
            .map_err(anyhow::Error::msg)?;
    }
    match cli.command {
        Command::Demo(args) => demo::run(&cx, args).await,
        Command::DevBroker(args) => dev_broker::run(&cx, args).await,
        Command::Seed(args) => seed::run(&cx, args).await,
        Command::Rebuild(args) => rebuild::run(&cx, args).await,
        Command::Run(args) => run::run(&cx, args).await,
        Command::Estimate(args) => estimate::run(&cx, args).await,
        Command::Status(args) => status::run(&cx, args).await,
        Command::Swap(args) => swap::run(&cx, args).await,
        Command::CheckTotals(args) => totals::run(&cx, args).await,
        Command::Replay(args) => replay::run(&cx, args).await,
        Command::Verify(args) => verify::run(&cx, args).await,
        Command::Tune(args) => tune::run(&cx, args).await,
        Command::Rollback(args) => rollback::run(&cx, args).await,
        Command::Pause(args) => pause::run(&cx, args, true).await,
        Command::Resume(args) => pause::run(&cx, args, false).await,
        Command::Gc(args) => gc::run(&cx, args).await,
        Command::Bench(args) => bench::run(&cx, args).await,
        Command::DeadLetters(args) => dead_letters::run(&cx, args).await,
        Command::Check(args) => check::run(&cx, args).await,
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::projection::{DynProjection, SchemaSql};
    use crate::upcast::{Registry, RegistryError};

    /// A domain with events and views but no example history, as most teams' are.
    struct NoExample;

    impl Domain for NoExample {
        type Event = ();
        fn name(&self) -> &str {
            "billing"
        }
        fn default_topics(&self) -> &[&str] {
            &["billing.invoices"]
        }
        fn registry(&self) -> Result<Registry<()>, RegistryError> {
            Registry::builder().build()
        }
        fn projections(&self) -> Vec<DynProjection<()>> {
            Vec::new()
        }
        fn schema(&self, _: &str, _: u32) -> Option<SchemaSql> {
            None
        }
        fn descriptors(&self) -> &[u8] {
            &[]
        }
    }

    #[test]
    fn commands_that_need_an_example_history_say_so_and_name_the_domain() {
        let cx = Cx {
            global: GlobalArgs::default(),
            domain: Arc::new(NoExample),
        };
        let error = cx.example("seed").err().map(|e| e.to_string());
        let error = error.expect("no example");
        assert!(
            error.contains("`seed` needs an example history generator")
                && error.contains("the domain billing has none"),
            "{error}"
        );
        let settings = cx.settings().expect("settings");
        assert_eq!(
            settings.topics,
            ["billing.invoices"],
            "the domain's default topic"
        );
    }
}
