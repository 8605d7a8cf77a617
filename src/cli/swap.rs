//! `reproject swap`: make a build that `rebuild --no-swap` left ready the live one.

use super::output::out;
use clap::Args;

use super::args::{SwapArgs as SwapTuning, TuningArgs};
use super::{shutdown_token, Cx, Outcome};
use crate::domain::Domain;
use crate::engine::rebuild::catch_up_and_swap;
use crate::sink::Phase;

#[derive(Args, Debug)]
pub struct SwapArgs {
    /// The projection to swap
    pub projection: String,
    #[command(flatten)]
    pub swap: SwapTuning,
    #[command(flatten)]
    pub verify: super::args::VerifyArgs,
    #[command(flatten)]
    pub tuning: TuningArgs,
}

pub async fn run<D: Domain>(cx: &Cx<D>, args: SwapArgs) -> anyhow::Result<Outcome> {
    let settings = cx.settings()?;
    let engine = cx.writing_engine(&settings, args.tuning.tuning()).await?;
    let projection = engine.projection(&args.projection)?;
    let builds = engine.catalog.builds(Some(projection.name())).await?;
    let Some(build) = builds
        .into_iter()
        .find(|b| matches!(b.phase, Phase::Ready | Phase::CatchingUp))
    else {
        anyhow::bail!("{} has no caught-up build waiting to be swapped in; run `reproject rebuild {} --no-swap` first", args.projection, args.projection);
    };
    // Catch up first: the build may have waited a while.
    let report = catch_up_and_swap(
        &engine,
        &build,
        &projection,
        &args.swap.options(&settings),
        args.verify.policy().as_ref(),
        &shutdown_token(),
    )
    .await?;
    let (report, verification) = report;
    if let Some(v) = verification {
        out!("{}", v.render());
    }
    super::report::print_swapped(&report, "now reads build", "");
    Ok(Outcome::Success)
}
