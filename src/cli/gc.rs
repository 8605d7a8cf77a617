//! `reproject gc`: drop the tables of builds that no longer serve, as `engine::gc`'s policy says.

use super::output::outln;
use std::time::Duration;

use clap::Args;

use super::{Cx, Outcome};
use crate::domain::Domain;
use crate::engine::gc::{self, Collectable, GcPolicy};
use crate::engine::Tuning;

#[derive(Args, Debug)]
pub struct GcArgs {
    /// Past builds to keep per projection, newest first
    #[arg(long, default_value_t = GcPolicy::default().keep)]
    pub keep: usize,
    /// Keep past builds that stopped serving less than this many hours ago
    #[arg(long, default_value_t = GcPolicy::default().min_age.as_secs_f64() / 3600.0, value_name = "HOURS")]
    pub older_than_hours: f64,
    /// Only say what would be dropped
    #[arg(long)]
    pub dry_run: bool,
}

pub async fn run<D: Domain>(cx: &Cx<D>, args: GcArgs) -> anyhow::Result<Outcome> {
    let settings = cx.settings()?;
    let engine = cx.engine(&settings, Tuning::default()).await?;
    let policy = GcPolicy {
        keep: args.keep,
        min_age: Duration::from_secs_f64(args.older_than_hours.max(0.0) * 3600.0),
    };
    let collectable = gc::collectable(&engine, &policy).await?;
    for Collectable { build, age } in &collectable {
        let age_hours = age.as_secs_f64() / 3600.0;
        if !args.dry_run {
            gc::drop_build(&engine, build).await?;
        }
        outln!(
            "{} build {} of {} v{} ({}, {age_hours:.1} h ago): schema {}",
            if args.dry_run {
                "would drop"
            } else {
                "dropped"
            },
            build.build_id,
            build.projection,
            build.version,
            build.phase.as_str(),
            build.schema_name
        );
    }
    outln!(
        "{} build(s) {}; kept the newest {} per projection and any younger than {} h",
        collectable.len(),
        if args.dry_run { "to drop" } else { "dropped" },
        args.keep,
        args.older_than_hours
    );
    Ok(Outcome::Success)
}
