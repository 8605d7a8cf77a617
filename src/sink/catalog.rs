//! reproject's catalog in PostgreSQL (schema `reproject`, see `schemas/catalog.sql`): the builds of
//! each projection version, their phase, and per partition the next offset each build will read.

use std::borrow::Borrow;
use std::collections::BTreeMap;
use std::time::Duration;

use sqlx::{PgConnection, PgPool, Row};

use super::{check_identifier, Context, Result, SinkError};

const CATALOG_SQL: &str = include_str!("../../schemas/catalog.sql");
/// Key of the transaction advisory lock that serialises catalog migrations between processes.
const MIGRATION_LOCK: i64 = 0x5245_5052_4f4a_0001;

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Replaying history into memory and bulk-loading it; nothing is committed until the load is.
    Loading,
    /// Rows and positions are committed; primary keys and indexes are being built.
    Indexing,
    /// Applying what arrived since the load, in transactional batches.
    CatchingUp,
    /// Caught up and waiting for `swap` (built with `--no-swap`).
    Ready,
    /// What the stable name reads.
    Active,
    /// Replaced by a newer build; kept for rollback.
    Retired,
    Failed,
    Dropped,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Loading => "loading",
            Phase::Indexing => "indexing",
            Phase::CatchingUp => "catching_up",
            Phase::Ready => "ready",
            Phase::Active => "active",
            Phase::Retired => "retired",
            Phase::Failed => "failed",
            Phase::Dropped => "dropped",
        }
    }

    pub fn parse(text: &str) -> Option<Phase> {
        Some(match text {
            "loading" => Phase::Loading,
            "indexing" => Phase::Indexing,
            "catching_up" => Phase::CatchingUp,
            "ready" => Phase::Ready,
            "active" => Phase::Active,
            "retired" => Phase::Retired,
            "failed" => Phase::Failed,
            "dropped" => Phase::Dropped,
            _ => return None,
        })
    }

    /// Still being built: a rebuild of the same version resumes it instead of starting over.
    pub fn in_progress(self) -> bool {
        matches!(
            self,
            Phase::Loading | Phase::Indexing | Phase::CatchingUp | Phase::Ready
        )
    }
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct Build {
    pub build_id: i64,
    pub projection: String,
    pub version: u32,
    pub schema_name: String,
    /// The topics it reads, sorted by name: fixed when it was created.
    pub topics: Vec<String>,
    pub phase: Phase,
    pub history_truncated: bool,
    pub events_replayed: i64,
    pub rows_loaded: i64,
}

/// Per partition id (see [`crate::source::Topics`]), the next offset to read. In the catalog each
/// row names its topic and partition number; the SQL here converts, through the build's `topics`.
pub type Positions = BTreeMap<i32, i64>;

/// Move each partition of `positions` to the furthest of where it stands and where `to` says
/// (partitions only `to` names are added). `to` may be another `Positions`, owned or borrowed.
pub fn raise_positions<P, O>(positions: &mut Positions, to: impl IntoIterator<Item = (P, O)>)
where
    P: Borrow<i32>,
    O: Borrow<i64>,
{
    for (partition, offset) in to {
        let (partition, offset) = (*partition.borrow(), *offset.borrow());
        let at = positions.entry(partition).or_insert(offset);
        *at = (*at).max(offset);
    }
}

/// SQL for a partition id's topic and partition number, given the build row `b` and an id `$id`.
macro_rules! id_to_topic_sql {
    ($id:literal) => {
        concat!("b.topics[", $id, " / 1048576 + 1]")
    };
}

// The SQL here spells out 2^20, the ids' stride.
const _: () = assert!(crate::source::PARTITIONS_PER_TOPIC == 1_048_576);

/// The partition id of positions row `p` of build row `b`.
const ID_OF_POSITION_SQL: &str =
    "((array_position(b.topics, p.topic) - 1) * 1048576 + p.partition)";

/// Settings changed while a command runs (`reproject tune`): kept per projection in
/// `reproject.controls` and read by catch-ups and followers at every pause check.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LiveSettings {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_rate: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch_events: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slow_at: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pause_at: Option<f64>,
}

/// The progress a build's writer last reported (see [`Catalog::write_progress`]).
#[derive(Debug, Default)]
pub struct BuildProgress {
    pub writer: Option<String>,
    pub progress: Option<serde_json::Value>,
    pub age_seconds: Option<f64>,
    pub last_error: Option<String>,
}

/// The declaration a build was made from, as [`Catalog::recorded_definitions`] reads it.
#[derive(Debug)]
pub struct RecordedDefinition {
    pub build_id: i64,
    pub projection: String,
    pub version: u32,
    pub phase: String,
    pub hash: String,
    /// NULL for builds made before reproject recorded it.
    pub inputs_hash: Option<String>,
}

/// A verification to keep in `reproject.verifications`: its verdict and whole report.
pub struct NewVerification<'a> {
    pub projection: &'a str,
    pub candidate_build_id: i64,
    pub baseline_build_id: Option<i64>,
    /// `strict` or `report` (the policy it ran under), or `check` (`reproject verify`).
    pub mode: &'a str,
    pub passed: bool,
    pub rows_differing: Option<i64>,
    pub report: serde_json::Value,
}

/// Catalog queries. Reads go through a pool; writes that must commit with rows take the caller's
/// transaction.
#[derive(Clone)]
pub struct Catalog {
    pool: PgPool,
}

const BUILD_COLUMNS: &str =
    "build_id, projection, version, schema_name, topics, phase, history_truncated, events_replayed, rows_loaded";

fn build_from_row(row: &sqlx::postgres::PgRow) -> Result<Build> {
    let phase: String = row
        .try_get("phase")
        .context(|| "reading reproject.builds".into())?;
    Ok(Build {
        build_id: row
            .try_get("build_id")
            .context(|| "reading reproject.builds".into())?,
        projection: row
            .try_get("projection")
            .context(|| "reading reproject.builds".into())?,
        version: row
            .try_get::<i32, _>("version")
            .context(|| "reading reproject.builds".into())? as u32,
        schema_name: row
            .try_get("schema_name")
            .context(|| "reading reproject.builds".into())?,
        topics: row
            .try_get("topics")
            .context(|| "reading reproject.builds".into())?,
        phase: Phase::parse(&phase).ok_or_else(|| {
            SinkError::Invalid(format!("reproject.builds holds an unknown phase {phase:?}"))
        })?,
        history_truncated: row
            .try_get("history_truncated")
            .context(|| "reading reproject.builds".into())?,
        events_replayed: row
            .try_get("events_replayed")
            .context(|| "reading reproject.builds".into())?,
        rows_loaded: row
            .try_get("rows_loaded")
            .context(|| "reading reproject.builds".into())?,
    })
}

impl Catalog {
    pub fn new(pool: PgPool) -> Catalog {
        Catalog { pool }
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// One connection of the catalog's pool, for statements that must share a session.
    pub async fn conn(&self) -> Result<sqlx::pool::PoolConnection<sqlx::Postgres>> {
        self.pool
            .acquire()
            .await
            .context(|| "connecting to the database".into())
    }

    /// Create or update the catalog. Safe to run from many processes at once.
    pub async fn migrate(&self) -> Result<()> {
        let mut tx = self
            .pool
            .begin()
            .await
            .context(|| "starting the catalog migration".into())?;
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(MIGRATION_LOCK)
            .execute(&mut *tx)
            .await
            .context(|| "locking the catalog for migration".into())?;
        sqlx::raw_sql(CATALOG_SQL)
            .execute(&mut *tx)
            .await
            .context(|| "creating reproject's catalog (schema reproject)".into())?;
        tx.commit()
            .await
            .context(|| "committing the catalog migration".into())
    }

    /// Register a new build and name its schema `rp_<projection>_v<version>_b<id>`.
    /// `definition`: the file the version is declared in and what it reads through, if it is.
    pub async fn create_build(
        &self,
        projection: &str,
        version: u32,
        topics: &crate::source::Topics,
        truncated: bool,
        definition: Option<&crate::domain::Definition>,
    ) -> Result<Build> {
        check_identifier("projection", projection)?;
        let row = sqlx::query(&format!(
            "WITH b AS (SELECT nextval(pg_get_serial_sequence('reproject.builds', 'build_id')) AS id)
             INSERT INTO reproject.builds (build_id, projection, version, schema_name, topic, topics, phase, history_truncated, definition_hash, inputs_hash)
             SELECT id, $1, $2, format('rp_%s_v%s_b%s', $1::text, $2::int, id), array_to_string($3::text[], ', '), $3, 'loading', $4, $5, $6 FROM b
             RETURNING {BUILD_COLUMNS}"
        ))
        .bind(projection)
        .bind(version as i32)
        .bind(topics.names())
        .bind(truncated)
        .bind(definition.map(|d| d.hash.as_str()))
        .bind(definition.map(|d| d.inputs_hash.as_str()))
        .fetch_one(&self.pool)
        .await
        .context(|| format!("registering a new build of {projection} v{version}"))?;
        build_from_row(&row)
    }

    /// The declaration hash of every build that holds or will hold rows (not dropped or failed).
    pub async fn recorded_definitions(&self) -> Result<Vec<RecordedDefinition>> {
        let rows = sqlx::query(
            "SELECT build_id, projection, version, phase, definition_hash, inputs_hash FROM reproject.builds
             WHERE definition_hash IS NOT NULL AND phase NOT IN ('dropped', 'failed')
             ORDER BY build_id",
        )
        .fetch_all(&self.pool)
        .await
        .context(|| "reading the builds' definition hashes (reproject.builds)".into())?;
        rows.iter()
            .map(|row| {
                let read = || "reading reproject.builds".to_string();
                Ok(RecordedDefinition {
                    build_id: row.try_get("build_id").context(read)?,
                    projection: row.try_get("projection").context(read)?,
                    version: row.try_get::<i32, _>("version").context(read)? as u32,
                    phase: row.try_get("phase").context(read)?,
                    hash: row.try_get("definition_hash").context(read)?,
                    inputs_hash: row.try_get("inputs_hash").context(read)?,
                })
            })
            .collect()
    }

    pub async fn build(&self, build_id: i64) -> Result<Build> {
        let row = sqlx::query(&format!(
            "SELECT {BUILD_COLUMNS} FROM reproject.builds WHERE build_id = $1"
        ))
        .bind(build_id)
        .fetch_optional(&self.pool)
        .await
        .context(|| format!("reading build {build_id}"))?
        .ok_or_else(|| SinkError::Invalid(format!("build {build_id} does not exist")))?;
        build_from_row(&row)
    }

    /// Every build of a projection (all projections when None), newest first.
    pub async fn builds(&self, projection: Option<&str>) -> Result<Vec<Build>> {
        let rows = sqlx::query(&format!(
            "SELECT {BUILD_COLUMNS} FROM reproject.builds WHERE $1::text IS NULL OR projection = $1
             ORDER BY projection, build_id DESC"
        ))
        .bind(projection)
        .fetch_all(&self.pool)
        .await
        .context(|| "listing builds".into())?;
        rows.iter().map(build_from_row).collect()
    }

    /// Builds that no longer serve and still have tables (retired, or failed), most recently
    /// retired first, each with how long ago it stopped serving (or was created, if it never did).
    pub async fn past_builds(&self, projection: Option<&str>) -> Result<Vec<(Build, Duration)>> {
        let rows = sqlx::query(&format!(
            "SELECT {BUILD_COLUMNS}, extract(epoch FROM now() - coalesce(retired_at, created_at))::float8 AS age
             FROM reproject.builds
             WHERE phase IN ('retired', 'failed') AND ($1::text IS NULL OR projection = $1)
             ORDER BY projection, coalesce(retired_at, created_at) DESC, build_id DESC"
        ))
        .bind(projection)
        .fetch_all(&self.pool)
        .await
        .context(|| "listing retired builds".into())?;
        rows.iter()
            .map(|row| {
                let age: f64 = row
                    .try_get("age")
                    .context(|| "reading reproject.builds".into())?;
                Ok((build_from_row(row)?, Duration::from_secs_f64(age.max(0.0))))
            })
            .collect()
    }

    /// Pause or resume writing to a projection's builds (checked between batches).
    pub async fn set_paused(&self, projection: &str, paused: bool, by: &str) -> Result<()> {
        sqlx::query(
            "INSERT INTO reproject.controls (projection, paused, changed_by) VALUES ($1, $2, $3)
             ON CONFLICT (projection) DO UPDATE SET paused = $2, changed_by = $3, changed_at = now()",
        )
        .bind(projection)
        .bind(paused)
        .bind(by)
        .execute(&self.pool)
        .await
        .context(|| format!("setting the pause flag of {projection}"))?;
        Ok(())
    }

    /// Which of `projections` are paused now.
    pub async fn paused(&self, projections: &[&str]) -> Result<Vec<String>> {
        let names: Vec<String> = projections.iter().map(|p| p.to_string()).collect();
        sqlx::query_scalar(
            "SELECT projection FROM reproject.controls WHERE paused AND projection = ANY($1) ORDER BY projection",
        )
        .bind(&names)
        .fetch_all(&self.pool)
        .await
        .context(|| "reading the pause flags".into())
    }

    pub async fn active_build(&self, projection: &str) -> Result<Option<Build>> {
        Ok(self
            .builds(Some(projection))
            .await?
            .into_iter()
            .find(|b| b.phase == Phase::Active))
    }

    pub async fn set_phase(&self, build_id: i64, phase: Phase) -> Result<()> {
        set_phase(
            &mut *self.pool.acquire().await.context(|| "connecting".into())?,
            build_id,
            phase,
        )
        .await
    }

    pub async fn record_error(&self, build_id: i64, error: &str) -> Result<()> {
        sqlx::query("UPDATE reproject.builds SET last_error = $2 WHERE build_id = $1")
            .bind(build_id)
            .bind(error)
            .execute(&self.pool)
            .await
            .context(|| format!("recording the error of build {build_id}"))?;
        Ok(())
    }

    pub async fn positions(&self, build_id: i64) -> Result<Positions> {
        read_positions(&self.pool, build_id).await
    }

    /// Mark a build as replayed from a log that no longer starts at offset 0.
    pub async fn mark_history_truncated(&self, build_id: i64) -> Result<()> {
        sqlx::query("UPDATE reproject.builds SET history_truncated = true WHERE build_id = $1")
            .bind(build_id)
            .execute(&self.pool)
            .await
            .context(|| format!("marking build {build_id} as built from a truncated log"))?;
        Ok(())
    }

    /// Who last reported progress on a build, what it said, how long ago, and its last error.
    pub async fn build_progress(&self, build_id: i64) -> Result<BuildProgress> {
        #[derive(sqlx::FromRow)]
        struct Row {
            writer: Option<String>,
            progress: Option<sqlx::types::Json<serde_json::Value>>,
            age_seconds: Option<f64>,
            last_error: Option<String>,
        }
        let row: Option<Row> = sqlx::query_as(
            "SELECT writer, progress, extract(epoch FROM now() - progress_at)::float8 AS age_seconds, last_error
             FROM reproject.builds WHERE build_id = $1",
        )
        .bind(build_id)
        .fetch_optional(&self.pool)
        .await
        .context(|| format!("reading progress of build {build_id}"))?;
        Ok(
            row.map_or_else(BuildProgress::default, |row| BuildProgress {
                writer: row.writer,
                progress: row.progress.map(|p| p.0),
                age_seconds: row.age_seconds,
                last_error: row.last_error,
            }),
        )
    }

    /// Change settings of a running projection (`reproject tune`); None values are left as they are.
    pub async fn tune(
        &self,
        projection: &str,
        settings: &LiveSettings,
        by: &str,
    ) -> Result<LiveSettings> {
        let patch = serde_json::to_value(settings)
            .map_err(|e| SinkError::Invalid(format!("encoding settings: {e}")))?;
        let patch: serde_json::Map<String, serde_json::Value> = patch
            .as_object()
            .into_iter()
            .flatten()
            .filter(|(_, v)| !v.is_null())
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let merged: sqlx::types::Json<LiveSettings> = sqlx::query_scalar(
            "INSERT INTO reproject.controls (projection, settings, changed_by) VALUES ($1, $2, $3)
             ON CONFLICT (projection) DO UPDATE SET settings = reproject.controls.settings || $2,
                 changed_by = $3, changed_at = now()
             RETURNING settings",
        )
        .bind(projection)
        .bind(sqlx::types::Json(serde_json::Value::Object(patch)))
        .bind(by)
        .fetch_one(&self.pool)
        .await
        .context(|| format!("changing the settings of {projection}"))?;
        Ok(merged.0)
    }

    /// Forget every setting `tune` made for `projection`.
    pub async fn clear_tuning(&self, projection: &str) -> Result<()> {
        sqlx::query("UPDATE reproject.controls SET settings = '{}', changed_at = now() WHERE projection = $1")
            .bind(projection)
            .execute(&self.pool)
            .await
            .context(|| format!("clearing the settings of {projection}"))?;
        Ok(())
    }

    /// The settings `tune` made for these projections, combined: the strictest of each.
    pub async fn live_settings(&self, projections: &[&str]) -> Result<LiveSettings> {
        let rows: Vec<sqlx::types::Json<LiveSettings>> = sqlx::query_scalar(
            "SELECT settings FROM reproject.controls WHERE projection = ANY($1)",
        )
        .bind(projections)
        .fetch_all(&self.pool)
        .await
        .context(|| "reading the settings of `reproject tune`".into())?;
        let mut out = LiveSettings::default();
        fn min<T: PartialOrd + Copy>(a: Option<T>, b: Option<T>) -> Option<T> {
            match (a, b) {
                (Some(x), Some(y)) => Some(if y < x { y } else { x }),
                (x, None) => x,
                (None, y) => y,
            }
        }
        for s in rows {
            out.max_rate = min(out.max_rate, s.0.max_rate);
            out.batch_events = min(out.batch_events, s.0.batch_events);
            out.slow_at = min(out.slow_at, s.0.slow_at);
            out.pause_at = min(out.pause_at, s.0.pause_at);
        }
        Ok(out)
    }

    /// A kept verification report: `id`, or the newest of `projection`.
    pub async fn verification(
        &self,
        projection: &str,
        id: Option<i64>,
    ) -> Result<Option<serde_json::Value>> {
        let report: Option<sqlx::types::Json<serde_json::Value>> = sqlx::query_scalar(
            "SELECT report FROM reproject.verifications
             WHERE projection = $1 AND ($2::bigint IS NULL OR verification_id = $2)
             ORDER BY verification_id DESC LIMIT 1",
        )
        .bind(projection)
        .bind(id)
        .fetch_optional(&self.pool)
        .await
        .context(|| format!("reading the verifications of {projection}"))?;
        Ok(report.map(|r| r.0))
    }

    /// What the replay of a build recorded about the log, if it did.
    pub async fn source_checks(&self, build_id: i64) -> Result<Option<serde_json::Value>> {
        let value: Option<sqlx::types::Json<serde_json::Value>> =
            sqlx::query_scalar("SELECT source_checks FROM reproject.builds WHERE build_id = $1")
                .bind(build_id)
                .fetch_optional(&self.pool)
                .await
                .context(|| format!("reading the source checks of build {build_id}"))?
                .flatten();
        Ok(value.map(|v| v.0))
    }

    /// Keep a verification's report; returns its id.
    pub async fn record_verification(&self, verification: &NewVerification<'_>) -> Result<i64> {
        sqlx::query_scalar(
            "INSERT INTO reproject.verifications
                 (projection, candidate_build_id, baseline_build_id, mode, passed, rows_differing, report)
             VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING verification_id",
        )
        .bind(verification.projection)
        .bind(verification.candidate_build_id)
        .bind(verification.baseline_build_id)
        .bind(verification.mode)
        .bind(verification.passed)
        .bind(verification.rows_differing)
        .bind(sqlx::types::Json(&verification.report))
        .fetch_one(&self.pool)
        .await
        .context(|| format!("recording the verification of build {}", verification.candidate_build_id))
    }

    /// Progress of a running build, shown by `status`. Best effort: a failure is only logged.
    pub async fn write_progress(&self, build_id: i64, writer: &str, progress: &serde_json::Value) {
        let result = sqlx::query(
            "UPDATE reproject.builds SET progress = $2, writer = $3, progress_at = now() WHERE build_id = $1",
        )
        .bind(build_id)
        .bind(sqlx::types::Json(progress))
        .bind(writer)
        .execute(&self.pool)
        .await;
        if let Err(error) = result {
            tracing::warn!(message = "could not record progress", build_id, %error);
        }
    }
}

/// A build's positions, through a pool or inside the caller's transaction (verification reads them
/// in the same snapshot as the rows).
pub async fn read_positions<'c>(
    executor: impl sqlx::PgExecutor<'c>,
    build_id: i64,
) -> Result<Positions> {
    let rows = sqlx::query(&format!(
        "SELECT {ID_OF_POSITION_SQL} AS id, p.topic, p.next_offset
         FROM reproject.positions p JOIN reproject.builds b USING (build_id) WHERE build_id = $1"
    ))
    .bind(build_id)
    .fetch_all(executor)
    .await
    .context(|| format!("reading the positions of build {build_id}"))?;
    rows.iter()
        .map(|r| {
            let id: Option<i32> = r.try_get("id").context(|| "positions".into())?;
            let Some(id) = id else {
                let topic: String = r.try_get("topic").context(|| "positions".into())?;
                return Err(SinkError::Invalid(format!(
                    "build {build_id} has a position in topic {topic}, which is not among its topics"
                )));
            };
            Ok((
                id,
                r.try_get("next_offset").context(|| "positions".into())?,
            ))
        })
        .collect()
}

/// Per partition id, the log end a build's replay reads up to (`rebuild --shared` records it when
/// it creates the build, so that every worker replays to the same end).
pub async fn read_targets<'c>(
    executor: impl sqlx::PgExecutor<'c>,
    build_id: i64,
) -> Result<Positions> {
    let rows: Vec<(Option<i32>, Option<i64>)> = sqlx::query_as(&format!(
        "SELECT {ID_OF_POSITION_SQL}, p.log_end_offset
         FROM reproject.positions p JOIN reproject.builds b USING (build_id) WHERE build_id = $1"
    ))
    .bind(build_id)
    .fetch_all(executor)
    .await
    .context(|| format!("reading the replay targets of build {build_id}"))?;
    Ok(rows
        .into_iter()
        .filter_map(|(id, end)| Some((id?, end?)))
        .collect())
}

/// One process of a shared build, as it last reported itself (see [`record_worker`]).
#[derive(Clone, Debug, serde::Serialize)]
pub struct Worker {
    pub worker: String,
    /// Partition ids (see [`crate::source::Topics`]) the consumer group gave it.
    pub partitions: Vec<i32>,
    pub events_replayed: i64,
    pub events_per_second: f64,
    pub seen_seconds_ago: f64,
}

/// Record what a process of a shared build is doing: its partitions now, the events it replayed
/// and at what rate.
pub async fn record_worker<'c>(
    executor: impl sqlx::PgExecutor<'c>,
    build_id: i64,
    worker: &str,
    partitions: &[i32],
    events: u64,
    events_per_second: f64,
) -> Result<()> {
    sqlx::query(
        "INSERT INTO reproject.workers (build_id, worker, partitions, events_replayed, events_per_second)
         VALUES ($1, $2, $3, $4, $5)
         ON CONFLICT (build_id, worker) DO UPDATE SET partitions = excluded.partitions,
             events_replayed = excluded.events_replayed, events_per_second = excluded.events_per_second,
             seen_at = now()",
    )
    .bind(build_id)
    .bind(worker)
    .bind(partitions)
    .bind(events as i64)
    .bind(events_per_second)
    .execute(executor)
    .await
    .context(|| format!("recording worker {worker} of build {build_id}"))?;
    Ok(())
}

/// The processes that worked on a shared build, most recently seen first.
pub async fn workers<'c>(
    executor: impl sqlx::PgExecutor<'c>,
    build_id: i64,
) -> Result<Vec<Worker>> {
    let rows: Vec<(String, Vec<i32>, i64, f64, f64)> = sqlx::query_as(
        "SELECT worker, partitions, events_replayed, events_per_second,
                extract(epoch FROM now() - seen_at)::float8
         FROM reproject.workers WHERE build_id = $1 ORDER BY seen_at DESC, worker",
    )
    .bind(build_id)
    .fetch_all(executor)
    .await
    .context(|| format!("reading the workers of build {build_id}"))?;
    Ok(rows
        .into_iter()
        .map(
            |(worker, partitions, events_replayed, events_per_second, seen_seconds_ago)| Worker {
                worker,
                partitions,
                events_replayed,
                events_per_second,
                seen_seconds_ago,
            },
        )
        .collect())
}

/// Count `events` more as replayed into a build, in the loading worker's transaction.
pub async fn add_replayed(conn: &mut PgConnection, build_id: i64, events: u64) -> Result<()> {
    sqlx::query(
        "UPDATE reproject.builds SET events_replayed = events_replayed + $2 WHERE build_id = $1",
    )
    .bind(build_id)
    .bind(events as i64)
    .execute(conn)
    .await
    .context(|| format!("counting the events replayed into build {build_id}"))?;
    Ok(())
}

/// The source checks a build's replay recorded so far, in the caller's transaction (the build's
/// row locked until it ends, so that processes sharing the build add theirs one at a time).
pub async fn source_checks_for_update(
    conn: &mut PgConnection,
    build_id: i64,
) -> Result<Option<serde_json::Value>> {
    let value: Option<Option<sqlx::types::Json<serde_json::Value>>> = sqlx::query_scalar(
        "SELECT source_checks FROM reproject.builds WHERE build_id = $1 FOR UPDATE",
    )
    .bind(build_id)
    .fetch_optional(conn)
    .await
    .context(|| format!("reading the source checks of build {build_id}"))?;
    Ok(value.flatten().map(|v| v.0))
}

/// Record a build's source checks, in the caller's transaction.
pub async fn set_source_checks<T: serde::Serialize>(
    conn: &mut PgConnection,
    build_id: i64,
    checks: &T,
) -> Result<()> {
    sqlx::query("UPDATE reproject.builds SET source_checks = $2 WHERE build_id = $1")
        .bind(build_id)
        .bind(sqlx::types::Json(checks))
        .execute(conn)
        .await
        .context(|| format!("recording the source checks of build {build_id}"))?;
    Ok(())
}

/// Move a build from `loading` to `indexing` if it still is in `loading`, recording its rows: true
/// for the one process that did (it finishes the build), false for every other.
pub async fn claim_loaded(conn: &mut PgConnection, build_id: i64, rows: u64) -> Result<bool> {
    let claimed: Option<i64> = sqlx::query_scalar(
        "UPDATE reproject.builds SET phase = 'indexing', loaded_at = now(), rows_loaded = $2
         WHERE build_id = $1 AND phase = 'loading' RETURNING build_id",
    )
    .bind(build_id)
    .bind(rows as i64)
    .fetch_optional(conn)
    .await
    .context(|| format!("claiming the indexing of build {build_id}"))?;
    Ok(claimed.is_some())
}

pub async fn set_phase(conn: &mut PgConnection, build_id: i64, phase: Phase) -> Result<()> {
    let stamp = match phase {
        Phase::Indexing => ", loaded_at = now()",
        Phase::Active => ", swapped_at = now()",
        Phase::Retired => ", retired_at = now()",
        _ => "",
    };
    sqlx::query(&format!(
        "UPDATE reproject.builds SET phase = $2{stamp} WHERE build_id = $1"
    ))
    .bind(build_id)
    .bind(phase.as_str())
    .execute(conn)
    .await
    .context(|| format!("setting build {build_id} to phase {}", phase.as_str()))?;
    Ok(())
}

/// Record where a freshly loaded build stands, in the load's transaction.
/// Forget a build's positions (an interrupted bulk load starts over).
pub async fn clear_positions(conn: &mut PgConnection, build_id: i64) -> Result<()> {
    sqlx::query("DELETE FROM reproject.positions WHERE build_id = $1")
        .bind(build_id)
        .execute(conn)
        .await
        .context(|| format!("clearing the positions of build {build_id}"))?;
    Ok(())
}

/// What a bulk load put into a build: events replayed, rows loaded and what the replay saw of the
/// log (source checks), in the load's transaction.
pub async fn record_load<T: serde::Serialize>(
    conn: &mut PgConnection,
    build_id: i64,
    events: u64,
    rows: u64,
    source_checks: Option<&T>,
) -> Result<()> {
    sqlx::query("UPDATE reproject.builds SET events_replayed = $2, rows_loaded = $3, source_checks = $4 WHERE build_id = $1")
        .bind(build_id)
        .bind(events as i64)
        .bind(rows as i64)
        .bind(source_checks.map(sqlx::types::Json))
        .execute(conn)
        .await
        .context(|| format!("recording the load of build {build_id}"))?;
    Ok(())
}

pub async fn insert_positions(
    conn: &mut PgConnection,
    build_id: i64,
    positions: &Positions,
    log_end: &Positions,
) -> Result<()> {
    let partitions: Vec<i32> = positions.keys().copied().collect();
    let next: Vec<i64> = positions.values().copied().collect();
    let end: Vec<Option<i64>> = partitions.iter().map(|p| log_end.get(p).copied()).collect();
    sqlx::query(concat!(
        "INSERT INTO reproject.positions (build_id, topic, partition, next_offset, log_end_offset)
         SELECT $1, ",
        id_to_topic_sql!("n.id"),
        ", n.id % 1048576, n.next_offset, n.log_end
         FROM unnest($2::int[], $3::bigint[], $4::bigint[]) AS n(id, next_offset, log_end)
         JOIN reproject.builds b ON b.build_id = $1"
    ))
    .bind(build_id)
    .bind(&partitions)
    .bind(&next)
    .bind(&end)
    .execute(conn)
    .await
    .context(|| format!("recording the positions of build {build_id}"))?;
    Ok(())
}

/// Move a build's positions from `expected` to `next`, in the caller's transaction. Fails, and so
/// rolls the batch back, if any partition is not where this writer left it.
pub async fn advance_positions(
    conn: &mut PgConnection,
    build_id: i64,
    expected: &Positions,
    next: &Positions,
    log_end: &Positions,
) -> Result<()> {
    let moved: Vec<i32> = next
        .iter()
        .filter(|(p, o)| expected.get(p) != Some(o))
        .map(|(p, _)| *p)
        .collect();
    if moved.is_empty() {
        return Ok(());
    }
    let exp: Vec<i64> = moved
        .iter()
        .map(|p| expected.get(p).copied().unwrap_or(-1))
        .collect();
    let new: Vec<i64> = moved
        .iter()
        .map(|p| next.get(p).copied().unwrap_or(-1))
        .collect();
    let end: Vec<Option<i64>> = moved.iter().map(|p| log_end.get(p).copied()).collect();
    let updated: Vec<i32> = sqlx::query_scalar(concat!(
        "UPDATE reproject.positions p SET next_offset = n.next_offset, log_end_offset = coalesce(n.log_end, p.log_end_offset)
         FROM unnest($2::int[], $3::bigint[], $4::bigint[], $5::bigint[]) AS n(id, expected, next_offset, log_end),
              reproject.builds b
         WHERE b.build_id = $1 AND p.build_id = $1 AND p.topic = ",
        id_to_topic_sql!("n.id"),
        " AND p.partition = n.id % 1048576 AND p.next_offset = n.expected
         RETURNING n.id"
    ))
    .bind(build_id)
    .bind(&moved)
    .bind(&exp)
    .bind(&new)
    .bind(&end)
    .fetch_all(&mut *conn)
    .await
    .context(|| format!("advancing the positions of build {build_id}"))?;
    if updated.len() == moved.len() {
        return Ok(());
    }
    let partition = moved
        .iter()
        .copied()
        .find(|p| !updated.contains(p))
        .unwrap_or(-1);
    let found: Option<(String, Option<i64>)> = sqlx::query_as(concat!(
        "SELECT ",
        id_to_topic_sql!("$2"),
        ", (SELECT next_offset FROM reproject.positions p
             WHERE p.build_id = $1 AND p.topic = ",
        id_to_topic_sql!("$2"),
        " AND p.partition = $2 % 1048576)
         FROM reproject.builds b WHERE b.build_id = $1"
    ))
    .bind(build_id)
    .bind(partition)
    .fetch_optional(&mut *conn)
    .await
    .context(|| format!("reading the position of build {build_id}"))?;
    let (topic, found) = found.unwrap_or_default();
    Err(SinkError::PositionConflict {
        build_id,
        topic,
        partition: crate::source::Topics::split(partition).1,
        expected: expected.get(&partition).copied().unwrap_or(-1),
        found: found.map_or_else(|| "missing".to_string(), |o| o.to_string()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_only_move_forward_and_partitions_named_only_by_the_other_side_are_added() {
        let mut positions: Positions = [(0, 10), (1, 5)].into();
        let other: Positions = [(0, 7), (1, 9), (2, 3)].into();
        raise_positions(&mut positions, &other);
        assert_eq!(positions, [(0, 10), (1, 9), (2, 3)].into());
        // Owned pairs, as the follow's furthest offsets come.
        raise_positions(&mut positions, [(2, 1), (3, 4)]);
        assert_eq!(positions, [(0, 10), (1, 9), (2, 3), (3, 4)].into());
    }
}
