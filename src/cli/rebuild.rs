//! `reproject rebuild`: rebuild projections and swap them in.

use clap::Args;

use super::args::{MemoryArgs, SwapArgs, TuningArgs, VerifyArgs};
use super::{shutdown_token, Cx, Outcome};
use crate::domain::Domain;
use crate::engine::rebuild::{self, RebuildOptions};

#[derive(Args, Debug)]
pub struct RebuildArgs {
    /// Projections to rebuild
    #[arg(required_unless_present = "all", conflicts_with = "all")]
    pub projections: Vec<String>,
    /// Rebuild every projection (in one pass over the log)
    #[arg(long)]
    pub all: bool,
    /// Rebuild even though the log no longer starts at offset 0 (the view will miss the lost events)
    #[arg(long)]
    pub allow_truncated_history: bool,
    /// Build and catch up, but leave the current view live until `reproject swap`
    #[arg(long)]
    pub no_swap: bool,
    /// Share one build with every other process started with --shared on the same projections,
    /// here or on other machines: Kafka's consumer group shares the partitions out, each process
    /// loads what it replayed, and one of them finishes the build (indexes, catch-up, swap)
    #[arg(long)]
    pub shared: bool,
    #[command(flatten)]
    pub memory: MemoryArgs,
    #[command(flatten)]
    pub swap: SwapArgs,
    #[command(flatten)]
    pub verify: VerifyArgs,
    #[command(flatten)]
    pub tuning: TuningArgs,
}

pub async fn run<D: Domain>(cx: &Cx<D>, args: RebuildArgs) -> anyhow::Result<Outcome> {
    let settings = cx.settings()?;
    let engine = cx.writing_engine(&settings, args.tuning.tuning()).await?;
    let names = super::chosen_projections(&engine, args.all, &args.projections);
    let options = RebuildOptions {
        allow_truncated_history: args.allow_truncated_history,
        swap: !args.no_swap,
        swap_options: args.swap.options(&settings),
        quiet: settings.quiet,
        memory_budget: args.memory.memory_budget,
        disk_budget: args.memory.disk_budget.map(|b| b as u64),
        verify: args.verify.policy(),
    };
    let report = if args.shared {
        crate::engine::shared::rebuild_shared(&engine, &names, &options, &shutdown_token()).await?
    } else {
        rebuild::rebuild(&engine, &names, &options, &shutdown_token()).await?
    };
    super::report::print_report(&report);
    Ok(Outcome::Success)
}
