//! `reproject gc`: drop the tables of builds that no longer serve.
//!
//! Retired builds are kept for rollback; failed ones for a look at what went wrong. Per projection,
//! the newest `--keep` of them stay, and so does any younger than `--older-than-hours`; the rest lose
//! their schema and are marked dropped. Active builds and builds in progress are never touched.

use std::time::Duration;

use clap::Args;

use super::{GlobalArgs, Outcome, Settings};
use crate::engine::Tuning;
use crate::sink::{writer, Phase};

#[derive(Args, Debug)]
pub struct GcArgs {
    /// Past builds to keep per projection, newest first
    #[arg(long, default_value_t = 1)]
    pub keep: usize,
    /// Keep past builds that stopped serving less than this many hours ago
    #[arg(long, default_value_t = 168.0, value_name = "HOURS")]
    pub older_than_hours: f64,
    /// Only say what would be dropped
    #[arg(long)]
    pub dry_run: bool,
}

pub async fn run(global: &GlobalArgs, args: GcArgs) -> anyhow::Result<Outcome> {
    let settings = Settings::resolve(global)?;
    let engine = settings.engine(Tuning::default()).await?;
    let min_age = Duration::from_secs_f64(args.older_than_hours.max(0.0) * 3600.0);
    let past = engine.catalog.past_builds(None).await?;
    let mut kept_per_projection = std::collections::BTreeMap::<String, usize>::new();
    let mut dropped = 0;
    let mut conn = engine.catalog.conn().await?;
    for (build, age) in past {
        let kept = kept_per_projection
            .entry(build.projection.clone())
            .or_default();
        if *kept < args.keep || age < min_age {
            *kept += 1;
            continue;
        }
        let age_hours = age.as_secs_f64() / 3600.0;
        if args.dry_run {
            println!(
                "would drop build {} of {} v{} ({}, {age_hours:.1} h ago): schema {}",
                build.build_id,
                build.projection,
                build.version,
                build.phase.as_str(),
                build.schema_name
            );
        } else {
            writer::drop_schema(&mut conn, &build.schema_name).await?;
            crate::sink::catalog::set_phase(&mut conn, build.build_id, Phase::Dropped).await?;
            println!(
                "dropped build {} of {} v{} ({}, {age_hours:.1} h ago): schema {}",
                build.build_id,
                build.projection,
                build.version,
                build.phase.as_str(),
                build.schema_name
            );
        }
        dropped += 1;
    }
    println!(
        "{dropped} build(s) {}; kept the newest {} per projection and any younger than {} h",
        if args.dry_run { "to drop" } else { "dropped" },
        args.keep,
        args.older_than_hours
    );
    Ok(Outcome::Success)
}
