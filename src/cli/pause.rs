//! `reproject pause <projection>` / `resume`: stop and restart writing to a projection's builds from
//! any process. Rebuilds, catch-ups and followers check the flag between batches (every second at
//! most), so a pause takes effect within seconds and never leaves a batch half-applied.

use super::output::outln;
use clap::Args;

use super::{Cx, Outcome};
use crate::domain::Domain;
use crate::engine::{holder_name, Tuning};

#[derive(Args, Debug)]
pub struct PauseArgs {
    /// The projection to pause or resume
    pub projection: String,
}

pub async fn run<D: Domain>(cx: &Cx<D>, args: PauseArgs, paused: bool) -> anyhow::Result<Outcome> {
    let settings = cx.settings()?;
    let engine = cx.engine(&settings, Tuning::default()).await?;
    let projection = engine.projection(&args.projection)?;
    let by = holder_name(if paused { "pause" } else { "resume" });
    engine
        .catalog
        .set_paused(projection.name(), paused, &by)
        .await?;
    outln!(
        "{} {}",
        projection.name(),
        if paused {
            "paused: its rebuilds and followers wait at their next batch; `reproject resume` continues"
        } else {
            "resumed"
        }
    );
    Ok(Outcome::Success)
}
