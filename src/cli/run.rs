//! `reproject run`: keep projections current and backfill new versions.

use std::sync::Arc;

use clap::Args;

use super::args::{MemoryArgs, SwapArgs, TuningArgs};
use super::{shutdown_token, Cx, Outcome};
use crate::domain::Domain;
use crate::engine::rebuild::RebuildOptions;
use crate::engine::run::{self, RunOptions};

#[derive(Args, Debug)]
pub struct RunArgs {
    /// Only follow active builds; do not backfill missing or outdated projection versions
    #[arg(long)]
    pub no_backfill: bool,
    /// Exit once everything is active and lags by at most this many events (for scripts and tests)
    #[arg(long, value_name = "EVENTS")]
    pub exit_when_caught_up: Option<i64>,
    /// Rebuild even though the log no longer starts at offset 0
    #[arg(long)]
    pub allow_truncated_history: bool,
    #[command(flatten)]
    pub memory: MemoryArgs,
    #[command(flatten)]
    pub swap: SwapArgs,
    #[command(flatten)]
    pub verify: super::args::VerifyArgs,
    #[command(flatten)]
    pub tuning: TuningArgs,
}

pub async fn run<D: Domain>(cx: &Cx<D>, args: RunArgs) -> anyhow::Result<Outcome> {
    let settings = cx.settings()?;
    let engine = Arc::new(cx.writing_engine(&settings, args.tuning.tuning()).await?);
    let options = RunOptions {
        backfill: !args.no_backfill,
        rebuild: RebuildOptions {
            allow_truncated_history: args.allow_truncated_history,
            swap: true,
            swap_options: args.swap.options(&settings),
            quiet: true,
            memory_budget: args.memory.memory_budget,
            disk_budget: args.memory.disk_budget.map(|b| b as u64),
            verify: args.verify.policy(),
        },
        exit_when_caught_up: args.exit_when_caught_up,
    };
    run::run(engine, options, shutdown_token()).await?;
    Ok(Outcome::Success)
}
