//! Loading one worker's fold into a build that other workers load too (`rebuild --shared`).
//!
//! Each worker folds only its partitions, so its rows are partial wherever a row gathers
//! partitions. A worker's load reads back what the table already holds for each of its keys (rows
//! and clocks), joins its fold into it (`RowStore::merge`: sums added, minimums and maximums kept,
//! sets by logical time) and writes the result, all in the caller's transaction, which also moves
//! the worker's positions (compare-and-set). Loads of one build take turns on a transaction-level
//! advisory lock: two joins of the same key must not both read the old row. Rows of per-aggregate
//! tables come from one partition, hence one worker: they go in with a plain COPY, and a key that
//! is already there is a broken `per_aggregate` promise, refused by the table's unique index.
//!
//! Under a memory budget a worker loads its partitions in several rounds, each cut where its fold
//! outgrew the budget. A round that continues partitions earlier rounds loaded reads back, before
//! folding a step of batches, the per-aggregate rows their changes touch ([`Continued`]): those
//! rows hold exactly the earlier events of their one partition, so the fold goes on from them, and
//! the load upserts them. Rows that gather partitions are never read back: each round folds them
//! from nothing and joins them in like another worker's.

use rustc_hash::FxHashSet;
use sqlx::PgConnection;

use super::spill;
use super::writer::{self, Absent, BuildTables, StagingNames};
use super::{qualified, stable_hash, Context, Result, SinkError};
use crate::projection::{Change, Key, LogicalTime, RowStore, Value};

/// The first key of the transaction advisory lock that serialises one build's merges.
const MERGE_LOCK: i32 = 0x5250_0003;

/// Wait for the build's merge lock, held until the caller's transaction ends: whoever reads and
/// writes rows that gather partitions while other processes write them too (loads of
/// `rebuild --shared`, batches of `run --shared`) takes it first.
pub(super) async fn take_turn(conn: &mut PgConnection, build_id: i64, schema: &str) -> Result<()> {
    sqlx::query("SELECT pg_advisory_xact_lock($1, $2)")
        .bind(MERGE_LOCK)
        .bind(stable_hash(&build_id.to_string()))
        .execute(&mut *conn)
        .await
        .context(|| format!("waiting for the other processes' writes into {schema}"))?;
    Ok(())
}

/// What a round that continues partitions read back of its per-aggregate tables.
#[derive(Debug)]
pub struct Continued {
    /// Per table, the keys read back that the table holds (their rows are upserted at the load).
    present: Vec<FxHashSet<Key>>,
    /// Whether this connection's staging tables exist.
    staging_ready: bool,
}

impl Continued {
    pub fn new(tables: usize) -> Continued {
        Continued {
            present: (0..tables).map(|_| FxHashSet::default()).collect(),
            staging_ready: false,
        }
    }

    /// Bytes the remembered keys take, roughly: a key of a few short values and its slot.
    pub fn approx_bytes(&self) -> usize {
        self.present.iter().map(|s| s.capacity() * 64).sum()
    }

    /// Before `changes` (a step's, with their events' times: one batch or several) are folded into
    /// `store`: read back the rows of per-aggregate tables they touch, of events of partitions
    /// `continues` says earlier rounds loaded, that the fold does not hold yet (or that the table
    /// does not hold them).
    pub async fn read_back<'c>(
        &mut self,
        conn: &mut PgConnection,
        tables: BuildTables<'_>,
        store: &mut RowStore,
        changes: impl IntoIterator<Item = (LogicalTime, &'c Change)>,
        continues: impl Fn(i32) -> bool,
    ) -> Result<()> {
        let mut wanted: Vec<Vec<Vec<Value>>> = vec![Vec::new(); tables.specs.len()];
        let mut seen: Vec<FxHashSet<&'c [Value]>> = vec![FxHashSet::default(); tables.specs.len()];
        for (at, change) in changes {
            let index = change.table();
            let Some(spec) = tables.specs.get(index) else {
                continue;
            };
            if spec.gathers_partitions() || !continues(at.partition) {
                continue;
            }
            let key = change.key(spec.key_len);
            if !store.table(index).contains_key(key) && seen[index].insert(key) {
                wanted[index].push(key.to_vec());
            }
        }
        if wanted.iter().all(Vec::is_empty) {
            return Ok(());
        }
        spill::read_back_keys(conn, tables, store, &wanted, &mut self.staging_ready).await?;
        for (index, keys) in wanted.into_iter().enumerate() {
            let (rows, present) = (store.table(index), &mut self.present[index]);
            present.extend(
                keys.into_iter()
                    .filter(|key| matches!(rows.get(key), Some(Some(_))))
                    .map(Key::from),
            );
        }
        Ok(())
    }
}

/// Join `store` into the build's tables, in the caller's transaction; `continued`, what the round
/// read back, if it continues partitions. Returns the rows written.
pub async fn merge_into(
    conn: &mut PgConnection,
    tables: BuildTables<'_>,
    store: RowStore,
    continued: Option<&Continued>,
) -> Result<u64> {
    take_turn(conn, tables.build_id, tables.schema).await?;
    let mut written = 0;
    for (index, (spec, theirs)) in tables.specs.iter().zip(store.into_tables()).enumerate() {
        if theirs.is_empty() && theirs.clock_count() == 0 {
            continue;
        }
        let target = qualified(tables.schema, spec.name);
        let read_back = continued
            .map(|c| &c.present[index])
            .filter(|p| !p.is_empty());
        if let (false, Some(present)) = (spec.gathers_partitions(), read_back) {
            // Rows read back go in as upserts (or deletes), the others as for a first round.
            let names = StagingNames::new(tables.build_id, index);
            writer::create_staging(conn, tables.schema, spec, &names).await?;
            let absent = Absent {
                rows: theirs
                    .keys()
                    .filter(|k| !present.contains(k.as_slice()))
                    .cloned()
                    .collect(),
                clocks: FxHashSet::default(),
            };
            let mut continued = RowStore::new(tables.specs.len());
            *continued.table_mut(index) = theirs;
            written += writer::write_back(
                conn,
                tables.schema,
                spec,
                &names,
                &continued,
                index,
                &absent,
            )
            .await
            .map_err(|e| per_aggregate_clash(e, &target))?;
            continue;
        }
        if !spec.gathers_partitions() {
            let rows = theirs.live_rows_in_key_order(spec.key_len);
            written +=
                writer::copy_into(conn, &target, spec.columns.len(), rows.into_iter(), |r| {
                    r.as_slice()
                })
                .await
                .map_err(|e| per_aggregate_clash(e, &target))?;
            continue;
        }
        let names = StagingNames::new(tables.build_id, index);
        writer::create_staging(conn, tables.schema, spec, &names).await?;
        // Every key with a row or a clock (a tombstone, or a change its row's clock ignored).
        let mut seen: FxHashSet<&[Value]> = FxHashSet::default();
        let keys: Vec<Vec<Value>> = theirs
            .keys()
            .chain(theirs.clocks().map(|(k, _)| k))
            .filter(|k| seen.insert(k.as_slice()))
            .map(|k| k.to_vec())
            .collect();
        drop(seen);
        let mut joined = RowStore::new(tables.specs.len());
        let rows = joined.table_mut(index);
        writer::load_current_rows(conn, tables.schema, spec, &names, &keys, rows).await?;
        let mut absent = Absent::default();
        for key in &keys {
            if matches!(rows.get(key), Some(None)) {
                absent.rows.insert(Key::from(key.as_slice()));
            }
            if !rows.has_clock(key) {
                absent.clocks.insert(Key::from(key.as_slice()));
            }
        }
        rows.merge(spec, theirs).map_err(|reason| {
            SinkError::Invalid(format!(
                "projection {} v{}, table {}: {reason}",
                tables.projection, tables.version, spec.name
            ))
        })?;
        written +=
            writer::write_back(conn, tables.schema, spec, &names, &joined, index, &absent).await?;
    }
    Ok(written)
}

/// A unique-key violation while loading a per-aggregate table means two workers' partitions wrote
/// one row: say so, rather than only what PostgreSQL says.
fn per_aggregate_clash(error: SinkError, target: &str) -> SinkError {
    let unique_violation = matches!(
        &error,
        SinkError::Database { source: sqlx::Error::Database(db), .. } if db.code().as_deref() == Some("23505")
    );
    if unique_violation {
        SinkError::Invalid(format!(
            "{target} is declared per_aggregate, but a row of it was written by events of partitions that different workers read: each of its rows must come from one aggregate, hence one partition (are the aggregate's events keyed by its id?); {error}"
        ))
    } else {
        error
    }
}
