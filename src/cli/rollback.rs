//! `reproject rollback <projection>`: make the previous build live again, caught up first.
//!
//! The retired build's tables are where the swap left them, with their positions; it is caught up
//! from there with this binary's projection code, so that code must be the retired build's version
//! (roll back with the binary you rolled forward from; `catch_up_and_swap` checks it).

use clap::Args;

use super::args::{SwapArgs as SwapTuning, TuningArgs};
use super::{shutdown_token, Cx, Outcome};
use crate::domain::Domain;
use crate::engine::rebuild::catch_up_and_swap;
use crate::sink::Phase;

#[derive(Args, Debug)]
pub struct RollbackArgs {
    /// The projection to roll back
    pub projection: String,
    /// The retired build to make live [default: the one retired last]
    #[arg(long)]
    pub build: Option<i64>,
    #[command(flatten)]
    pub swap: SwapTuning,
    #[command(flatten)]
    pub tuning: TuningArgs,
}

pub async fn run<D: Domain>(cx: &Cx<D>, args: RollbackArgs) -> anyhow::Result<Outcome> {
    let settings = cx.settings()?;
    let engine = cx.writing_engine(&settings, args.tuning.tuning()).await?;
    let projection = engine.projection(&args.projection)?;
    let retired: Vec<_> = engine
        .catalog
        .past_builds(Some(projection.name()))
        .await?
        .into_iter()
        .map(|(build, _)| build)
        .filter(|b| b.phase == Phase::Retired)
        .collect();
    let build = match args.build {
        Some(id) => retired
            .into_iter()
            .find(|b| b.build_id == id)
            .ok_or_else(|| {
                anyhow::anyhow!(
                    "{}: build {id} is not a retired build of it (see `reproject status`)",
                    args.projection
                )
            })?,
        None => retired.into_iter().next().ok_or_else(|| {
            anyhow::anyhow!(
                "{}: no retired build to roll back to (`reproject gc` may have dropped it)",
                args.projection
            )
        })?,
    };
    let report = catch_up_and_swap(
        &engine,
        &build,
        &projection,
        &args.swap.options(&settings),
        None,
        &shutdown_token(),
    )
    .await?;
    let (report, _) = report;
    super::report::print_swapped(&report, "rolled back: it now reads build", " again");
    Ok(Outcome::Success)
}
