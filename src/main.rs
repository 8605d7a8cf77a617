//! The `reproject` binary: parse flags, start logging, run the command, and turn its result into one
//! readable line and an exit code.

use std::process::ExitCode;

use clap::Parser;

/// The replay allocates small keys and strings for every event on two threads; glibc's allocator
/// spent a fifth of the reader's time in malloc and on arena locks, mimalloc a fraction of that.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
use reproject::cli::{self, Cli, Outcome};

/// The command ran and found what it was asked to check to be wrong (for example totals differ).
const EXIT_CHECK_FAILED: u8 = 1;
/// Anything else stopped the command: bad input, an unreachable broker or database.
const EXIT_ERROR: u8 = 2;
/// Stopped by SIGINT or SIGTERM; committed work is kept.
const EXIT_INTERRUPTED: u8 = 130;

fn main() -> ExitCode {
    let cli = Cli::parse();
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
    let result = runtime.block_on(cli::run(cli));
    // Blocking tasks still talking to a broker that is gone must not hold the exit for minutes.
    runtime.shutdown_timeout(std::time::Duration::from_secs(2));
    match result {
        Ok(Outcome::Success) => ExitCode::SUCCESS,
        Ok(Outcome::Failed) => ExitCode::from(EXIT_CHECK_FAILED),
        Err(error) => {
            let interrupted = error
                .downcast_ref::<reproject::engine::EngineError>()
                .is_some_and(|e| matches!(e, reproject::engine::EngineError::Interrupted));
            // The whole cause chain on one line, the way users read it in a terminal or a log.
            let chain: Vec<String> = error.chain().map(|c| c.to_string()).collect();
            let mut line = String::new();
            for part in chain {
                if !line.contains(&part) {
                    if !line.is_empty() {
                        line.push_str(": ");
                    }
                    line.push_str(&part);
                }
            }
            eprintln!("reproject: {line}");
            ExitCode::from(if interrupted {
                EXIT_INTERRUPTED
            } else {
                EXIT_ERROR
            })
        }
    }
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
        .with_target(false)
        .init();
}
