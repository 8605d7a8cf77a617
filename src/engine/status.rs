//! What `status` shows: per projection, the active build, builds in progress with their phase, and
//! per partition the stored position, the log end and the lag; rows, rate and an ETA.

use std::collections::BTreeMap;

use super::{Engine, Result};
use crate::sink::catalog::Positions;
use crate::sink::lock::{self, writer_lock_subject, LockKind};
use crate::sink::{qualified, Build, Context, Phase};
use crate::source::{ByTopic, Topics};

#[derive(Debug, serde::Serialize)]
pub struct StatusReport {
    /// The topics this command reads.
    pub topics: Vec<String>,
    /// The log end per topic and partition, from the brokers now (None if they could not be
    /// reached).
    pub log_end: Option<ByTopic>,
    pub broker_error: Option<String>,
    /// View files changed under a version that has builds: what the commands that write refuse.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub edited_definitions: Option<String>,
    /// Active builds made through other schemas or upcaster steps than the files hold now.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stale_inputs: Option<String>,
    pub projections: Vec<ProjectionStatus>,
}

#[derive(Debug, serde::Serialize)]
pub struct ProjectionStatus {
    pub name: String,
    pub code_version: Option<u32>,
    /// Set by `reproject pause`: its builds wait between batches.
    pub paused: bool,
    /// Settings changed with `reproject tune` (running commands use them).
    pub tuned: super::throttle::LiveSettings,
    pub active: Option<BuildStatus>,
    pub building: Vec<BuildStatus>,
    pub retired: Vec<BuildStatus>,
}

#[derive(Debug, serde::Serialize)]
pub struct BuildStatus {
    pub build: Build,
    /// Per topic and partition, the next offset the build will read.
    pub positions: ByTopic,
    pub lag: Option<i64>,
    pub rows: i64,
    pub writer: Option<String>,
    /// Whether a process holds the build's writer lock or its projection's rebuild lock now: when
    /// not, `writer` and `progress` are what a writer that has stopped last reported.
    pub writer_running: bool,
    pub progress: Option<serde_json::Value>,
    pub progress_age_seconds: Option<f64>,
    pub last_error: Option<String>,
    /// Bad records this build passed over and that are not resolved yet.
    pub dead_letters: i64,
    /// The processes of a `rebuild --shared` that worked on it, with their partitions and rates.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub workers: Vec<crate::sink::catalog::Worker>,
}

pub async fn collect<E: Send + Sync + 'static>(engine: &Engine<E>) -> Result<StatusReport> {
    let (log_end, broker_error) = match engine.log_bounds("reproject-status").await {
        Ok(bounds) => (Some(bounds.end), None),
        Err(e) => (None, Some(e.to_string())),
    };
    let builds = engine.catalog.builds(None).await?;
    let mut by_projection: BTreeMap<String, Vec<Build>> = BTreeMap::new();
    for p in &engine.projections {
        by_projection.entry(p.name().to_string()).or_default();
    }
    for b in builds {
        by_projection
            .entry(b.projection.clone())
            .or_default()
            .push(b);
    }
    let names: Vec<&str> = by_projection.keys().map(String::as_str).collect();
    let paused = engine.catalog.paused(&names).await?;
    let mut projections = Vec::new();
    for (name, builds) in by_projection {
        let mut status = ProjectionStatus {
            paused: paused.contains(&name),
            tuned: engine.catalog.live_settings(&[name.as_str()]).await?,
            code_version: engine.projection(&name).ok().map(|p| p.version()),
            name,
            active: None,
            building: Vec::new(),
            retired: Vec::new(),
        };
        for build in builds {
            let phase = build.phase;
            if matches!(phase, Phase::Dropped | Phase::Failed) && status.retired.len() >= 3 {
                continue;
            }
            let s = build_status(engine, build, log_end.as_ref()).await?;
            match phase {
                Phase::Active => status.active = Some(s),
                p if p.in_progress() => status.building.push(s),
                _ => status.retired.push(s),
            }
        }
        projections.push(status);
    }
    let drift = super::drift(&engine.catalog, &engine.definitions).await?;
    let joined = |list: Vec<String>| (!list.is_empty()).then(|| list.join("; "));
    let edited_definitions = joined(drift.edited);
    let stale_inputs = joined(drift.stale_inputs);
    Ok(StatusReport {
        topics: engine.topics.names().to_vec(),
        log_end: log_end.as_ref().map(|end| engine.topics.by_topic(end)),
        broker_error,
        edited_definitions,
        stale_inputs,
        projections,
    })
}

async fn build_status<E: Send + Sync + 'static>(
    engine: &Engine<E>,
    build: Build,
    log_end: Option<&Positions>,
) -> Result<BuildStatus> {
    let positions = engine.catalog.positions(build.build_id).await?;
    // Positions name partitions by the build's topics; its lag is known when this command reads
    // the same ones.
    let same_topics = build.topics == engine.topics.names();
    let lag = match (log_end, positions.is_empty()) {
        (Some(end), false) if same_topics => Some(super::progress::lag(&positions, end)),
        _ => None,
    };
    let positions = match Topics::new(build.topics.iter().cloned()) {
        Ok(topics) => topics.by_topic(&positions),
        Err(_) => ByTopic::new(),
    };
    let mut rows = 0;
    if matches!(
        build.phase,
        Phase::Active | Phase::CatchingUp | Phase::Ready | Phase::Retired | Phase::Indexing
    ) {
        if let Ok(p) = engine.projection(&build.projection) {
            for t in p.tables() {
                let n: Option<i64> = sqlx::query_scalar(
                    "SELECT n_live_tup FROM pg_stat_user_tables WHERE schemaname = $1 AND relname = $2",
                )
                .bind(&build.schema_name)
                .bind(t.name)
                .fetch_optional(engine.catalog.pool())
                .await
                .context(|| format!("counting rows of {}", qualified(&build.schema_name, t.name)))?;
                rows += n.unwrap_or(0);
            }
        }
    }
    let reported = engine.catalog.build_progress(build.build_id).await?;
    let pool = engine.catalog.pool();
    let writer_running =
        lock::is_held_by_anyone(pool, LockKind::Writer, &writer_lock_subject(&build)).await?
            || lock::is_held_by_anyone(pool, LockKind::Rebuild, &build.projection).await?;
    let dead_letters: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM reproject.dead_letters WHERE build_id = $1 AND resolved_at IS NULL",
    )
    .bind(build.build_id)
    .fetch_one(engine.catalog.pool())
    .await
    .context(|| format!("counting dead letters of build {}", build.build_id))?;
    let workers = crate::sink::catalog::workers(engine.catalog.pool(), build.build_id).await?;
    Ok(BuildStatus {
        build,
        positions,
        lag,
        rows,
        writer: reported.writer,
        writer_running,
        progress: reported.progress,
        progress_age_seconds: reported.age_seconds,
        last_error: reported.last_error,
        dead_letters,
        workers,
    })
}
