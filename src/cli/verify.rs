//! `reproject verify <projection>`: compare a build with the live one (or a version, or a build) at
//! the same log position.

use super::output::{out, outln};
use clap::Args;

use super::args::{CompareArgs, Format, TuningArgs};
use super::{shutdown_token, Cx, Outcome};
use crate::domain::Domain;
use crate::engine::verify::{self, Against, VerifyMode};
use crate::sink::Phase;

#[derive(Args, Debug)]
pub struct VerifyCommandArgs {
    /// The projection whose new build to verify
    pub projection: String,
    /// What to compare with: `active` (the live build), a version number, or `build:ID`
    #[arg(long, default_value = "active", value_parser = parse_against)]
    pub against: Against,
    /// The build to verify [default: the newest caught-up build that is not live]
    #[arg(long)]
    pub build: Option<i64>,
    /// Show a kept report instead of verifying: this verification id, or the newest of the projection
    #[arg(long, value_name = "ID", num_args = 0..=1, conflicts_with_all = ["build", "against"])]
    pub show: Option<Option<i64>>,
    #[arg(long, value_enum, default_value_t = Format::Text)]
    pub format: Format,
    #[command(flatten)]
    pub compare: CompareArgs,
    #[command(flatten)]
    pub tuning: TuningArgs,
}

fn parse_against(text: &str) -> Result<Against, String> {
    if text == "active" {
        return Ok(Against::Active);
    }
    if let Some(id) = text.strip_prefix("build:") {
        return id
            .parse()
            .map(Against::Build)
            .map_err(|_| format!("{id:?} is not a build id"));
    }
    text.trim_start_matches('v')
        .parse()
        .map(Against::Version)
        .map_err(|_| format!("{text:?}: expected `active`, a version number (3 or v3) or build:ID"))
}

pub async fn run<D: Domain>(cx: &Cx<D>, args: VerifyCommandArgs) -> anyhow::Result<Outcome> {
    let settings = cx.settings()?;
    let engine = cx.writing_engine(&settings, args.tuning.tuning()).await?;
    let projection = engine.projection(&args.projection)?;
    if let Some(id) = args.show {
        let Some(kept) = engine.catalog.verification(projection.name(), id).await? else {
            anyhow::bail!(
                "{}: no kept verification{} (see reproject.verifications)",
                args.projection,
                id.map(|i| format!(" {i}")).unwrap_or_default()
            );
        };
        let verification: verify::Verification =
            serde_json::from_value(kept.clone()).map_err(|e| {
                anyhow::anyhow!(
                    "verification report of {} is unreadable: {e}",
                    args.projection
                )
            })?;
        match args.format {
            Format::Json => outln!("{}", serde_json::to_string_pretty(&kept)?),
            Format::Text => out!("{}", verification.render()),
        }
        return Ok(if verification.passed {
            Outcome::Success
        } else {
            Outcome::Failed
        });
    }
    let builds = engine.catalog.builds(Some(projection.name())).await?;
    let candidate = match args.build {
        Some(id) => builds.into_iter().find(|b| b.build_id == id).ok_or_else(|| {
            anyhow::anyhow!("{}: no build {id} (see `reproject status`)", args.projection)
        })?,
        None => builds
            .into_iter()
            .filter(|b| matches!(b.phase, Phase::Ready | Phase::CatchingUp))
            .max_by_key(|b| b.build_id)
            .ok_or_else(|| {
                anyhow::anyhow!(
                    "{}: no caught-up build to verify; build one with `reproject rebuild {} --no-swap`, or name one with --build",
                    args.projection,
                    args.projection
                )
            })?,
    };
    let policy = args.compare.policy(VerifyMode::Report);
    let verification = verify::verify(
        &engine,
        &projection,
        &candidate,
        args.against,
        &policy,
        &shutdown_token(),
    )
    .await?;
    match args.format {
        Format::Json => outln!("{}", serde_json::to_string_pretty(&verification)?),
        Format::Text => out!("{}", verification.render()),
    }
    Ok(if verification.passed {
        Outcome::Success
    } else {
        Outcome::Failed
    })
}
