//! `dead-letters retry`: apply records a build passed over, now that the code refusing them is fixed.
//!
//! Each stored record goes through the same checks as in the reader (envelope, key, upcasters) with
//! this binary's code. One that passes is projected and its changes are applied to the build it was
//! passed over in, with the letter marked resolved in the same transaction, so a retry applies it at
//! most once. It is applied now, after events that came later in the log: changes that add, count or
//! keep a minimum or maximum end up exactly as if it had never failed; a `set` of a column that a
//! later event also set wins over it. One that still fails keeps its new error. Duplicates are
//! marked resolved without being applied: their first copy was.

use super::reader::{BadKind, Coordinates};
use super::{holder_name, Engine, Result};
use crate::projection::{ChangeLog, Changes, Event, LogicalTime};
use crate::sink::dead_letters::{self, StoredDeadLetter};
use crate::sink::lock::writer_lock_subject;
use crate::sink::lock::{AdvisoryLock, LockKind};
use crate::sink::writer::{BatchWriter, BuildTables};
use crate::sink::Phase;

#[derive(Debug, Default)]
pub struct RetryReport {
    /// Applied and resolved.
    pub applied: Vec<i64>,
    /// Duplicates, resolved without applying.
    pub duplicates: Vec<i64>,
    /// Still refused, with the error this binary gives.
    pub still_failing: Vec<(i64, String)>,
    /// Not tried, and why (the build is no longer written, or was made by other code).
    pub skipped: Vec<(i64, String)>,
}

/// Retry the unresolved dead letters of `projection` (only `ids`, when given).
pub async fn retry<E: Send + Sync + 'static>(
    engine: &Engine<E>,
    projection: &str,
    ids: &[i64],
) -> Result<RetryReport> {
    let projection = engine.projection(projection)?;
    let mut conn = engine.catalog.conn().await?;
    let letters: Vec<StoredDeadLetter> =
        dead_letters::list(&mut conn, Some(projection.name()), false)
            .await?
            .into_iter()
            .filter(|l| ids.is_empty() || ids.contains(&l.dead_letter_id))
            .collect();
    drop(conn);
    let mut report = RetryReport::default();
    let mut builds: Vec<i64> = letters.iter().map(|l| l.build_id).collect();
    builds.sort_unstable();
    builds.dedup();
    let mut writer = BatchWriter::connect(&engine.database_url).await?;
    for build_id in builds {
        let build = engine.catalog.build(build_id).await?;
        let topics = crate::source::Topics::new(build.topics.iter().cloned())?;
        let of_build = letters.iter().filter(|l| l.build_id == build_id);
        let writable = matches!(
            build.phase,
            Phase::CatchingUp | Phase::Ready | Phase::Active
        );
        if !writable || build.version != projection.version() {
            let why = if writable {
                format!(
                    "build {build_id} was made by {} v{}, this binary has v{}",
                    build.projection,
                    build.version,
                    projection.version()
                )
            } else {
                format!(
                    "build {build_id} is {}; only a build that is still kept current takes retried records",
                    build.phase.as_str()
                )
            };
            report
                .skipped
                .extend(of_build.map(|l| (l.dead_letter_id, why.clone())));
            continue;
        }
        // Whoever keeps the build current (`run`, a catch-up) must not write it at the same time.
        let lock = AdvisoryLock::try_acquire(
            &engine.database_url,
            LockKind::Writer,
            &writer_lock_subject(&build),
            &holder_name("dead-letters retry"),
        )
        .await?;
        let tables = BuildTables {
            build_id,
            projection: projection.name(),
            version: projection.version(),
            schema: &build.schema_name,
            specs: projection.tables(),
        };
        let result = async {
            for letter in of_build {
                let id = letter.dead_letter_id;
                if letter.kind == BadKind::Duplicate.as_str() {
                    let mut conn = engine.catalog.conn().await?;
                    dead_letters::mark_retried(&mut conn, id, None).await?;
                    report.duplicates.push(id);
                    continue;
                }
                let Some(partition_id) = topics.id_of(&letter.topic, letter.partition) else {
                    let reason = format!(
                        "its topic {} is not among those build {build_id} reads ({topics})",
                        letter.topic
                    );
                    let mut conn = engine.catalog.conn().await?;
                    dead_letters::mark_retried(&mut conn, id, Some(&reason)).await?;
                    report.still_failing.push((id, reason));
                    continue;
                };
                let at = Coordinates {
                    topic: &letter.topic,
                    partition: letter.partition,
                    partition_id,
                    offset: letter.offset,
                    projections: projection.name(),
                };
                let checked = letter
                    .record()
                    .with_raw(|record| at.decode(&engine.framing, record))
                    .and_then(|decoded| {
                        let payload = at.upcast(&engine.registry, &decoded)?;
                        Ok((decoded, payload))
                    });
                let (decoded, payload) = match checked {
                    Ok(ok) => ok,
                    Err(bad) => {
                        let mut conn = engine.catalog.conn().await?;
                        dead_letters::mark_retried(&mut conn, id, Some(&bad.reason)).await?;
                        report.still_failing.push((id, bad.to_string()));
                        continue;
                    }
                };
                let mut emitted = Changes::default();
                projection.apply(
                    &Event {
                        meta: &decoded.meta,
                        payload: &payload,
                    },
                    &mut emitted,
                );
                if let Some(reason) = emitted.take_refusal() {
                    let reason = format!(
                        "projection {} refused the event: {reason}",
                        projection.name()
                    );
                    let mut conn = engine.catalog.conn().await?;
                    dead_letters::mark_retried(&mut conn, id, Some(&reason)).await?;
                    report.still_failing.push((id, reason));
                    continue;
                }
                // At its own logical time: in rows that gather several partitions a retried set
                // still loses to a later one, however late the retry comes.
                let mut changes = ChangeLog::default();
                changes.record(LogicalTime::of(&decoded.meta), &mut emitted);
                writer.apply_retried(tables, &changes, id).await?;
                report.applied.push(id);
            }
            Ok::<_, super::EngineError>(())
        }
        .await;
        lock.release().await;
        result?;
    }
    Ok(report)
}
