//! Dropping the tables of builds that no longer serve.
//!
//! Retired builds are kept for rollback; failed ones for a look at what went wrong. Per projection,
//! the newest [`GcPolicy::keep`] of them stay, and so does any that stopped serving less than
//! [`GcPolicy::min_age`] ago; the rest lose their schema and are marked dropped. Active builds and
//! builds in progress are never touched.

use std::time::Duration;

use super::{Engine, Result};
use crate::sink::{catalog, writer, Build, Phase};

#[derive(Clone, Debug)]
pub struct GcPolicy {
    /// Past builds to keep per projection, newest first.
    pub keep: usize,
    /// Past builds that stopped serving less than this long ago are kept.
    pub min_age: Duration,
}

impl Default for GcPolicy {
    fn default() -> Self {
        GcPolicy {
            keep: 1,
            min_age: Duration::from_secs(168 * 3600),
        }
    }
}

/// A past build the policy lets go, and how long ago it stopped serving.
pub struct Collectable {
    pub build: Build,
    pub age: Duration,
}

/// The past builds `policy` lets go, per projection from the most recently retired.
pub async fn collectable<E>(engine: &Engine<E>, policy: &GcPolicy) -> Result<Vec<Collectable>> {
    let mut kept_per_projection = std::collections::BTreeMap::<String, usize>::new();
    let mut out = Vec::new();
    for (build, age) in engine.catalog.past_builds(None).await? {
        let kept = kept_per_projection
            .entry(build.projection.clone())
            .or_default();
        if *kept < policy.keep || age < policy.min_age {
            *kept += 1;
            continue;
        }
        out.push(Collectable { build, age });
    }
    Ok(out)
}

/// Drop a past build's schema and mark it dropped.
pub async fn drop_build<E>(engine: &Engine<E>, build: &Build) -> Result<()> {
    let mut conn = engine.catalog.conn().await?;
    writer::drop_schema(&mut conn, &build.schema_name).await?;
    catalog::set_phase(&mut conn, build.build_id, Phase::Dropped).await?;
    Ok(())
}
