//! `reproject tune <projection>`: change the rate cap, the batch size and the throttle's thresholds
//! of running catch-ups and followers, from any process. They read the settings at every pause
//! check (every second at most); `--clear` goes back to what each command was started with.

use super::output::outln;
use clap::Args;

use super::{Cx, Outcome};
use crate::domain::Domain;
use crate::engine::throttle::LiveSettings;
use crate::engine::{holder_name, Tuning};

#[derive(Args, Debug)]
pub struct TuneArgs {
    /// The projection whose running commands to tune
    pub projection: String,
    /// Apply at most this many events per second
    #[arg(long, value_name = "EVENTS")]
    pub max_rate: Option<u64>,
    /// Events per batch (per transaction)
    #[arg(long, value_name = "EVENTS", value_parser = clap::value_parser!(u64).range(1..))]
    pub batch_events: Option<u64>,
    /// The throttle slows down above this fraction of a limit (and resumes below it)
    #[arg(long, value_name = "FRACTION")]
    pub throttle_slow_at: Option<f64>,
    /// The throttle pauses at this fraction of a limit
    #[arg(long, value_name = "FRACTION")]
    pub throttle_pause_at: Option<f64>,
    /// Forget the settings made with `tune`
    #[arg(long, conflicts_with_all = ["max_rate", "batch_events", "throttle_slow_at", "throttle_pause_at"])]
    pub clear: bool,
}

pub async fn run<D: Domain>(cx: &Cx<D>, args: TuneArgs) -> anyhow::Result<Outcome> {
    if args.clear {
        let settings = cx.settings()?;
        let engine = cx.engine(&settings, Tuning::default()).await?;
        let projection = engine.projection(&args.projection)?;
        engine.catalog.clear_tuning(projection.name()).await?;
        outln!("{}: settings from `tune` cleared", projection.name());
        return Ok(Outcome::Success);
    }
    for (flag, value) in [
        ("--throttle-slow-at", args.throttle_slow_at),
        ("--throttle-pause-at", args.throttle_pause_at),
    ] {
        if let Some(v) = value {
            if !(v > 0.0 && v.is_finite()) {
                anyhow::bail!("{flag} {v}: expected a fraction above 0 (0.7 is 70% of a limit)");
            }
        }
    }
    let change = LiveSettings {
        max_rate: args.max_rate,
        batch_events: args.batch_events.map(|n| n as usize),
        slow_at: args.throttle_slow_at,
        pause_at: args.throttle_pause_at,
    };
    if change == LiveSettings::default() {
        anyhow::bail!("nothing to change: give --max-rate, --batch-events, --throttle-slow-at or --throttle-pause-at (or --clear)");
    }
    let settings = cx.settings()?;
    let engine = cx.engine(&settings, Tuning::default()).await?;
    let projection = engine.projection(&args.projection)?;
    let now = engine
        .catalog
        .tune(projection.name(), &change, &holder_name("tune"))
        .await?;
    outln!(
        "{}: {} (running commands pick this up within seconds)",
        projection.name(),
        serde_json::to_string(&now)?
    );
    Ok(Outcome::Success)
}
