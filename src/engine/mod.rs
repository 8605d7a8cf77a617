//! The engine: a build's whole life, from fresh tables to the live view.
//!
//! ```text
//! rebuild:  create tables -> replay history into memory -> bulk COPY + positions -> indexes
//!           -> catch up in transactional batches -> swap (swap/) -> `run` keeps it current
//! run:      follow every active build from its stored positions; backfill what is new or outdated
//! replay:   one aggregate's events, traced through upcasters and projections, checked against the
//!           live rows; writes nothing to the projection tables
//! ```

pub mod controls;
pub mod dead_letters;
pub mod estimate;
pub mod fold;
pub mod follow;
pub mod gc;
pub mod health;
pub mod memory;
pub mod metrics;
pub mod progress;
pub mod reader;
pub mod rebuild;
pub mod run;
pub mod shared;
pub mod status;
pub mod throttle;
pub mod timeline;
pub mod verify;

use std::path::PathBuf;
use std::sync::Arc;

use prost_reflect::DescriptorPool;
use sqlx::postgres::PgPoolOptions;

use crate::domain::{Definition, Domain};
use crate::projection::{DynProjection, SchemaSql};
use crate::sink::lock::LockError;
use crate::sink::{Catalog, SinkError};
use crate::source::{KafkaSettings, SourceError, Topics};
use crate::swap::SwapError;
use crate::upcast::Registry;

pub use reader::ReadError;

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("unknown projection {name:?} (known: {known})")]
    UnknownProjection { name: String, known: String },
    #[error("{topic}: history is incomplete, the log no longer starts at offset 0 ({partitions}); \
             a rebuild would silently miss those events. Pass --allow-truncated-history to rebuild from what is left")]
    TruncatedHistory { topic: String, partitions: String },
    #[error("schema file {path}: {reason}")]
    SchemaFile { path: String, reason: String },
    #[error("domain {domain}: {reason}")]
    Domain { domain: String, reason: String },
    #[error("{edited}. A view file changed under the same version would mix two definitions in one \
             build's rows: put the change in a new version file (v<N+1>.toml, rebuilt and swapped in \
             beside the old one) and put the old file back as it was; comments, layout and \
             `description` may change freely")]
    EditedDefinition { edited: String },
    #[error("projection {projection}: {reason}")]
    Projection { projection: String, reason: String },
    #[error("aggregate {aggregate_id:?} has no events in {topic} (looked in {looked_in}); check the id, or pass --scan-all if the producers use another partitioner")]
    NoSuchAggregate {
        aggregate_id: String,
        topic: String,
        looked_in: String,
    },
    #[error("projection {projection} (build {build_id}): more than {budget} bad records, the dead-letter budget; the last: {last}. \
             See them with `reproject dead-letters list {projection}`; after fixing the cause, run again (the build resumes) and `reproject dead-letters retry {projection}`")]
    DeadLetterBudget {
        projection: String,
        build_id: i64,
        budget: u64,
        last: String,
    },
    #[error("projection {projection} (build {build_id}): its tables in schema {schema} take {bytes} bytes, over the disk budget of {budget}; \
             free space or raise --disk-budget and run again: the build resumes from what it committed")]
    DiskBudget {
        projection: String,
        build_id: i64,
        schema: String,
        bytes: u64,
        budget: u64,
    },
    #[error("projection {projection}: build {build_id} failed verification, so it was not swapped in: {failures}. \
             The report is verification {verification_id} (`reproject verify {projection} --show {verification_id}` shows it again); \
             the build stays caught up and ready: fix the cause, or swap with `--verify report` if the differences are intended")]
    VerificationFailed {
        projection: String,
        build_id: i64,
        verification_id: i64,
        failures: String,
    },
    #[error("interrupted; committed work is kept and the next run resumes from it")]
    Interrupted,
    #[error(transparent)]
    Sink(#[from] SinkError),
    #[error(transparent)]
    Lock(#[from] LockError),
    // Boxed, as the large variants of ReadError: every Result of the engine carries an EngineError.
    #[error(transparent)]
    Read(Box<ReadError>),
    #[error(transparent)]
    Source(Box<SourceError>),
    #[error(transparent)]
    Swap(#[from] SwapError),
}

impl From<ReadError> for EngineError {
    fn from(e: ReadError) -> Self {
        EngineError::Read(Box::new(e))
    }
}

impl From<SourceError> for EngineError {
    fn from(e: SourceError) -> Self {
        EngineError::Source(Box::new(e))
    }
}

impl EngineError {
    /// Worth retrying from the stored positions: a dropped database connection and the like, or a
    /// read the brokers failed. A bad record or an offset the log no longer has is not: reading
    /// it again gives the same answer.
    pub fn is_retriable(&self) -> bool {
        match self {
            EngineError::Sink(e) => e.is_retriable(),
            EngineError::Swap(SwapError::Sink(e)) => e.is_retriable(),
            EngineError::Read(e) => e.is_transient(),
            _ => false,
        }
    }
}

pub type Result<T, E = EngineError> = std::result::Result<T, E>;

/// Where each projection version's SQL comes from: a directory laid out like `schemas/`, or the copy
/// compiled into the binary.
#[derive(Clone)]
pub struct SchemaSource {
    pub dir: Option<PathBuf>,
    pub embedded: CompiledSchemas,
}

/// The SQL a domain compiles in, per projection and version (see [`crate::domain::Domain::schema`]).
pub type CompiledSchemas = Arc<dyn Fn(&str, u32) -> Option<SchemaSql> + Send + Sync>;

impl SchemaSource {
    /// The SQL compiled in by `embedded`, or read from `dir` when one is given.
    pub fn new(
        dir: Option<PathBuf>,
        embedded: impl Fn(&str, u32) -> Option<SchemaSql> + Send + Sync + 'static,
    ) -> SchemaSource {
        SchemaSource {
            dir,
            embedded: Arc::new(embedded),
        }
    }

    pub fn load(&self, projection: &str, version: u32) -> Result<SchemaSql> {
        match &self.dir {
            Some(dir) => {
                let base = dir.join(projection).join(format!("v{version}"));
                let read = |file: &str| {
                    let path = base.join(file);
                    std::fs::read_to_string(&path).map_err(|e| EngineError::SchemaFile {
                        path: path.display().to_string(),
                        reason: e.to_string(),
                    })
                };
                Ok(SchemaSql {
                    tables: read("tables.sql")?,
                    indexes: read("indexes.sql")?,
                })
            }
            None => (self.embedded)(projection, version).ok_or_else(|| EngineError::SchemaFile {
                path: format!("schemas/{projection}/v{version}/"),
                reason: "no SQL for this version is compiled in".into(),
            }),
        }
    }
}

/// See [`Tuning::catch_up_batch_events`].
pub const DEFAULT_CATCH_UP_BATCH_EVENTS: usize = 100_000;

/// Knobs of the engine that every command shares.
#[derive(Clone, Debug)]
pub struct Tuning {
    /// Events per batch: per transaction when catching up or following; per fold step (and so the
    /// most the fold may overshoot its memory budget by) when replaying.
    pub batch_events: usize,
    /// Stop catching up and swap once the lag to the log end is at most this many events.
    pub lag_threshold: i64,
    /// How long to wait for Kafka to make progress while it reports errors.
    pub stall_timeout: std::time::Duration,
    /// A hard cap on events applied per second when catching up or following (None: no cap).
    pub max_rate: Option<u64>,
    /// What to do with a record that cannot be applied.
    pub bad_records: BadRecordPolicy,
    /// Adapt the write rate of catch-ups and followers to the database's health (None: only the
    /// `max_rate` cap). The CLI turns it on unless `--no-throttle`.
    pub throttle: Option<throttle::ThrottleConfig>,
    /// Reader threads a replay shares the partitions out to (see [`reader::spawn_split`]).
    pub replay_readers: usize,
    /// The replay's reader threads fold their own batches into rows split by key into shards
    /// (`projection::ShardedStore`), instead of handing them to one fold thread. Not under a memory
    /// budget, whose spills need one thread to own the rows. Off by default: on two cores it was
    /// slower (BENCHMARKS.md, "One fold thread against readers folding into shards"); it is for
    /// machines where the one fold thread, not the readers, bounds the replay.
    pub fold_in_readers: bool,
    /// Committed rows a follow's writer keeps for its next batches instead of reading them back
    /// (see [`crate::sink::known`]), in bytes; 0 reads every row a batch touches.
    pub known_rows_bytes: usize,
    /// While a follow is behind and nothing limits its rate (no throttle, no `max_rate`, no batch
    /// size from `reproject tune`), the batches read while its writer was busy are written
    /// together, in transactions of up to this many events: a backlog in fewer, larger writes
    /// (BENCHMARKS.md, "Catch-up in larger transactions"). At or below `batch_events`: off.
    pub catch_up_batch_events: usize,
}

/// One replay reader per core, up to 8: on two cores, two readers took the replay from one core
/// busy and one partly idle to both busy (BENCHMARKS.md).
pub fn default_replay_readers() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get().min(8))
}

/// What a rebuild or follower does with a bad record (see [`reader::BadKind`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum BadRecordPolicy {
    /// Stop with an error naming the record; everything committed so far is kept, and the next run
    /// resumes there once the cause is fixed.
    #[default]
    Fail,
    /// Store the record in `reproject.dead_letters` and go on, until a build holds more than
    /// `budget` of them.
    DeadLetter { budget: u64 },
}

impl Default for Tuning {
    fn default() -> Self {
        Tuning {
            batch_events: 20_000,
            lag_threshold: 1_000,
            stall_timeout: std::time::Duration::from_secs(300),
            max_rate: None,
            bad_records: BadRecordPolicy::Fail,
            throttle: None,
            replay_readers: default_replay_readers(),
            fold_in_readers: false,
            known_rows_bytes: crate::sink::known::DEFAULT_KNOWN_ROWS_BYTES,
            catch_up_batch_events: DEFAULT_CATCH_UP_BATCH_EVENTS,
        }
    }
}

/// Everything a command needs: where the log and the database are, and the domain's code.
pub struct Engine<E> {
    pub kafka: KafkaSettings,
    pub framing: Arc<crate::envelope::Framing>,
    /// The topics every build of this engine reads (a build's are fixed when it is created).
    pub topics: Topics,
    pub database_url: String,
    /// Where verification and other heavy reads go (a replica), when not the primary.
    pub read_database_url: Option<String>,
    pub view_schema: String,
    pub registry: Arc<Registry<E>>,
    pub projections: Vec<DynProjection<E>>,
    pub schemas: SchemaSource,
    /// Where each projection version was declared, for a domain read from files.
    pub definitions: Vec<Definition>,
    /// The domain's Protobuf descriptors, for showing payloads as JSON.
    pub descriptors: DescriptorPool,
    pub catalog: Catalog,
    pub tuning: Tuning,
    /// The throttle every writer of this process goes through (None with `--no-throttle`).
    pub governor: Option<Arc<throttle::Governor>>,
}

pub struct EngineParts<E> {
    pub kafka: KafkaSettings,
    pub topics: Topics,
    /// How records carry events (see [`crate::envelope::framing`]).
    pub framing: Arc<crate::envelope::Framing>,
    pub database_url: String,
    pub view_schema: String,
    pub registry: Arc<Registry<E>>,
    pub projections: Vec<DynProjection<E>>,
    pub schemas: SchemaSource,
    /// Where each projection version was declared (see [`Domain::definitions`]).
    pub definitions: Vec<Definition>,
    /// An encoded `FileDescriptorSet` of the domain's payload messages (may be empty).
    pub descriptors: Vec<u8>,
    pub tuning: Tuning,
}

impl<E: Send + Sync + 'static> EngineParts<E> {
    /// A domain's code, with where to find the log and the database: what every command starts from.
    pub fn for_domain<D: Domain<Event = E>>(
        domain: &Arc<D>,
        kafka: KafkaSettings,
        topics: Topics,
        database_url: String,
        view_schema: String,
        schema_dir: Option<PathBuf>,
        tuning: Tuning,
    ) -> Result<EngineParts<E>> {
        let registry = domain.registry().map_err(|e| EngineError::Domain {
            domain: domain.name().to_string(),
            reason: format!("its upcaster registry is inconsistent: {e}"),
        })?;
        let schemas = {
            let domain = domain.clone();
            SchemaSource::new(schema_dir, move |p, v| domain.schema(p, v))
        };
        Ok(EngineParts {
            kafka,
            topics,
            framing: Arc::new(domain.framing()),
            database_url,
            view_schema,
            registry: Arc::new(registry),
            projections: domain.projections(),
            schemas,
            definitions: domain.definitions(),
            descriptors: domain.descriptors().to_vec(),
            tuning,
        })
    }
}

impl<E: Send + Sync + 'static> Engine<E> {
    /// Connect to PostgreSQL and make sure reproject's catalog exists.
    pub async fn connect(parts: EngineParts<E>) -> Result<Engine<E>> {
        crate::sink::check_identifier("view schema", &parts.view_schema)?;
        let database_url = named_connection_url(&parts.database_url);
        let descriptors = DescriptorPool::decode(parts.descriptors.as_slice()).map_err(|e| {
            EngineError::Domain {
                domain: "-".into(),
                reason: format!(
                    "its Protobuf descriptors are not an encoded FileDescriptorSet: {e}"
                ),
            }
        })?;
        for p in &parts.projections {
            crate::sink::check_identifier("projection", p.name())?;
            for t in p.tables() {
                crate::sink::check_identifier("table", t.name)?;
                t.check().map_err(|reason| EngineError::Projection {
                    projection: p.name().to_string(),
                    reason,
                })?;
            }
        }
        // A pool retries a refused connection until its acquire timeout and then says only that it
        // timed out: one direct attempt first gives the server's real answer, at once.
        match tokio::time::timeout(
            std::time::Duration::from_secs(10),
            <sqlx::PgConnection as sqlx::Connection>::connect(&database_url),
        )
        .await
        {
            Ok(Ok(conn)) => {
                let _ = sqlx::Connection::close(conn).await;
            }
            Ok(Err(source)) => {
                return Err(SinkError::Database {
                    context: "connecting to PostgreSQL".into(),
                    source,
                }
                .into())
            }
            Err(_) => {
                return Err(SinkError::Invalid(
                    "connecting to PostgreSQL: no answer within 10 s".into(),
                )
                .into())
            }
        }
        let pool = PgPoolOptions::new()
            .max_connections(4)
            .acquire_timeout(std::time::Duration::from_secs(10))
            .connect(&database_url)
            .await
            .map_err(|source| SinkError::Database {
                context: "connecting to PostgreSQL".into(),
                source,
            })?;
        let catalog = Catalog::new(pool);
        catalog.migrate().await?;
        metrics::max_rate(parts.tuning.max_rate);
        let governor = parts.tuning.throttle.clone().map(|config| {
            Arc::new(throttle::Governor::start(
                config,
                &database_url,
                parts.tuning.max_rate,
            ))
        });
        Ok(Engine {
            kafka: parts.kafka,
            framing: parts.framing,
            topics: parts.topics,
            database_url,
            read_database_url: None,
            view_schema: parts.view_schema,
            registry: parts.registry,
            projections: parts.projections,
            schemas: parts.schemas,
            definitions: parts.definitions,
            descriptors,
            catalog,
            tuning: parts.tuning,
            governor,
        })
    }

    /// Each partition's log start and end, asked of the brokers now (on a blocking thread: the
    /// client waits for metadata). `client` names the consumer in the brokers' logs.
    pub async fn log_bounds(&self, client: &'static str) -> Result<crate::source::LogBounds> {
        let (kafka, topics) = (self.kafka.clone(), self.topics.clone());
        tokio::task::spawn_blocking(move || {
            let consumer = kafka.metadata_client(client)?;
            let partitions = kafka.partitions(&consumer, &topics)?;
            kafka.bounds(&consumer, &topics, &partitions)
        })
        .await
        .map_err(|e| EngineError::Projection {
            projection: "-".into(),
            reason: format!("reading the log bounds of {} failed: {e}", self.topics),
        })?
        .map_err(EngineError::from)
    }

    /// The declaration `projection` `version` is made from now, if it is declared in a file.
    pub fn definition(&self, projection: &str, version: u32) -> Option<&Definition> {
        definition_of(&self.definitions, projection, version)
    }

    /// Refuse to go on when a projection version's file was changed after builds were made from
    /// it: the rows of those builds would silently mix two definitions under one version (a
    /// resumed build, a follow, a rollback). Commands that only read the catalog do not call it.
    pub async fn refuse_edited_definitions(&self) -> Result<()> {
        refuse_edited_definitions(&self.catalog, &self.definitions).await
    }

    pub fn projection(&self, name: &str) -> Result<DynProjection<E>> {
        self.projections
            .iter()
            .find(|p| p.name() == name)
            .cloned()
            .ok_or_else(|| EngineError::UnknownProjection {
                name: name.to_string(),
                known: self
                    .projections
                    .iter()
                    .map(|p| p.name())
                    .collect::<Vec<_>>()
                    .join(", "),
            })
    }
}

fn definition_of<'a>(
    definitions: &'a [Definition],
    projection: &str,
    version: u32,
) -> Option<&'a Definition> {
    definitions
        .iter()
        .find(|d| d.projection == projection && d.version == version)
}

/// How the builds recorded in the catalog differ from the domain's files now (see [`drift`]).
#[derive(Debug, Default)]
pub struct Drift {
    /// Each definition that is not what a build of its version was made from, said with its file,
    /// the build and both hashes. Only builds that still hold or will hold rows count (not dropped
    /// or failed ones). `status` shows them; [`refuse_edited_definitions`] refuses them.
    pub edited: Vec<String>,
    /// Each active build made through other schemas, event types or upcaster steps than the files
    /// hold now, said with the build and what applies the change. Not an error: fixing an upcaster
    /// is a reason to rebuild, and until then the active build goes on being followed (its new
    /// events read through the files as they are now). `status` shows them and `run` warns.
    pub stale_inputs: Vec<String>,
}

/// Compare `definitions` with what the catalog recorded for the builds made from them (one read of
/// the catalog; none for a domain that declares nothing in files).
pub async fn drift(catalog: &Catalog, definitions: &[Definition]) -> Result<Drift> {
    let mut drift = Drift::default();
    let Some(any) = definitions.first() else {
        return Ok(drift);
    };
    let active = crate::sink::catalog::Phase::Active.as_str();
    for build in catalog.recorded_definitions().await? {
        if let Some(now) = definition_of(definitions, &build.projection, build.version) {
            if now.hash != build.hash {
                drift.edited.push(format!(
                    "{} is not the declaration build {} ({}) of {} v{} was made from \
                     (recorded hash {}, now {})",
                    now.source,
                    build.build_id,
                    build.phase,
                    build.projection,
                    build.version,
                    short(&build.hash),
                    short(&now.hash)
                ));
            }
        }
        let Some(recorded) = build.inputs_hash.as_deref() else {
            continue;
        };
        if build.phase == active && recorded != any.inputs_hash {
            drift.stale_inputs.push(format!(
                "active build {} of {} v{} was made through other schemas or upcaster steps \
                 (recorded hash {}, now {}): `reproject rebuild {}` replays its history through \
                 the files as they are",
                build.build_id,
                build.projection,
                build.version,
                short(recorded),
                short(&any.inputs_hash),
                build.projection
            ));
        }
    }
    Ok(drift)
}

/// [`Drift::edited`] as an error (see [`Engine::refuse_edited_definitions`]); `run` also asks it of
/// the files it reads again.
pub async fn refuse_edited_definitions(
    catalog: &Catalog,
    definitions: &[Definition],
) -> Result<()> {
    let edited = drift(catalog, definitions).await?.edited;
    if edited.is_empty() {
        return Ok(());
    }
    Err(EngineError::EditedDefinition {
        edited: edited.join("; "),
    })
}

/// The first 12 hex digits of a hash, as people compare them.
fn short(hash: &str) -> &str {
    hash.get(..12).unwrap_or(hash)
}

/// The database URL with `application_name=reproject` unless it names the application already:
/// the throttle tells production's backends from reproject's by that name.
pub fn named_connection_url(url: &str) -> String {
    let is_url = url.starts_with("postgres://") || url.starts_with("postgresql://");
    if !is_url || url.contains("application_name=") {
        return url.to_string();
    }
    let separator = if url.contains('?') { '&' } else { '?' };
    format!("{url}{separator}application_name=reproject")
}

/// How this process names itself in locks and progress: command, pid and host.
pub fn holder_name(command: &str) -> String {
    let host = std::fs::read_to_string("/etc/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_default();
    format!("reproject {command} pid={} host={host}", std::process::id())
}
