//! `reproject estimate <projection>...`: how long a rebuild will take, how many rows and how much
//! disk and memory, from a pilot over about 2% of the log (200,000 events at the least). Writes
//! nothing.

use super::output::{out, outln};
use clap::Args;

use super::args::{Format, TuningArgs};
use super::{Cx, Outcome};
use crate::domain::Domain;
use crate::engine::estimate;

#[derive(Args, Debug)]
pub struct EstimateArgs {
    /// Projections to estimate a rebuild of (together, as `rebuild` runs them in one pass)
    #[arg(required_unless_present = "all", conflicts_with = "all")]
    pub projections: Vec<String>,
    /// Every projection
    #[arg(long)]
    pub all: bool,
    /// The share of the log the pilot reads
    #[arg(long, default_value_t = estimate::DEFAULT_SAMPLE, value_name = "FRACTION")]
    pub sample: f64,
    /// The events the pilot reads at the least, whatever the share (all of a smaller log): its
    /// pace needs a few batches per reader thread to be measured
    #[arg(long, default_value_t = estimate::LEAST_PILOT_EVENTS, value_name = "EVENTS")]
    pub least_events: u64,
    #[arg(long, value_enum, default_value_t = Format::Text)]
    pub format: Format,
    #[command(flatten)]
    pub tuning: TuningArgs,
}

pub async fn run<D: Domain>(cx: &Cx<D>, args: EstimateArgs) -> anyhow::Result<Outcome> {
    if !(args.sample > 0.0 && args.sample <= 1.0) {
        anyhow::bail!(
            "--sample {}: expected a fraction of the log above 0 and at most 1 (0.02 is 2%)",
            args.sample
        );
    }
    let settings = cx.settings()?;
    let engine = cx.writing_engine(&settings, args.tuning.tuning()).await?;
    let names = super::chosen_projections(&engine, args.all, &args.projections);
    let estimate = estimate::estimate(
        &engine,
        &names,
        estimate::PilotSize {
            share: args.sample,
            least_events: args.least_events,
        },
    )
    .await?;
    match args.format {
        Format::Json => outln!("{}", serde_json::to_string_pretty(&estimate)?),
        Format::Text => out!("{}", estimate.render()),
    }
    Ok(Outcome::Success)
}
