//! Spilling a rebuild's fold to its tables when the fold outgrows the memory budget.
//!
//! Without a budget the replay folds the whole history in memory and bulk-loads it once. With one,
//! the fold is flushed into the build's (still unpublished) tables whenever it grows past the budget,
//! and forgotten. A later change to a row that was flushed first reads that row back, for all such
//! keys of a fold step (a batch or several) in one query, so the fold again starts from the whole
//! truth; the next flush upserts. Flushed keys are remembered as 64-bit hashes (about 16 bytes
//! each, counted against the budget), so a key that was never flushed costs no lookup; a hash
//! collision only costs a lookup that finds nothing.
//!
//! The flushes commit as they go: a build in the `loading` phase is started over from scratch after a
//! crash anyway, and nothing reads its tables until its load, positions included, has committed.

use std::hash::{Hash, Hasher};

use rustc_hash::{FxHashSet, FxHasher};
use sqlx::{Connection, PgConnection};

use super::clocks;
use super::writer::{self, BuildTables, StagingNames};
use super::{qualified, quote_ident, Context, Result};
use crate::projection::{Change, RowStore, Value};

/// What one build's fold has flushed so far.
#[derive(Debug, Default)]
pub struct SpillState {
    /// Per table, the hashes of the keys flushed.
    flushed: Vec<FxHashSet<u64>>,
    /// Flushes done; after the first the tables carry a unique index on their keys for upserts.
    pub spills: u32,
    /// Staging tables this state's connection has created.
    staging_ready: bool,
}

fn key_hash(key: &[Value]) -> u64 {
    let mut hasher = FxHasher::default();
    key.hash(&mut hasher);
    hasher.finish()
}

/// The index a spilled build's table carries during the load, so that later flushes can upsert and
/// read rows back by key. `indexes.sql` adds the real keys afterwards; this one is dropped first.
pub fn spill_index_name(table: &str) -> String {
    format!("rp_spill_{table}")
}

/// Index the keys of a build's tables (and clock tables) during its load, so that rows can be read
/// back and upserted by key: what spills and workers sharing a build need before `indexes.sql`.
pub async fn index_keys(conn: &mut PgConnection, tables: BuildTables<'_>) -> Result<()> {
    for spec in tables.specs {
        let key_columns = spec
            .key_columns()
            .iter()
            .map(|c| quote_ident(c.name))
            .collect::<Vec<_>>()
            .join(", ");
        for table in clocks::keyed_tables(spec) {
            let target = qualified(tables.schema, &table);
            sqlx::query(&format!(
                "CREATE UNIQUE INDEX {} ON {target} ({key_columns})",
                quote_ident(&spill_index_name(&table))
            ))
            .execute(&mut *conn)
            .await
            .context(|| format!("indexing the keys of {target} for the load"))?;
        }
    }
    Ok(())
}

impl SpillState {
    pub fn new(tables: usize) -> SpillState {
        SpillState {
            flushed: (0..tables).map(|_| FxHashSet::default()).collect(),
            spills: 0,
            staging_ready: false,
        }
    }

    /// Bytes the remembered key hashes take (a hash set slot is the hash plus a control byte, at
    /// most 7/8 full).
    pub fn approx_bytes(&self) -> usize {
        self.flushed.iter().map(|s| s.capacity() * 9).sum()
    }

    /// Before changes are folded (a step's: one batch or several): read back every row they touch
    /// that was flushed and is not in the fold, so the fold continues from it.
    pub async fn read_back<'c>(
        &mut self,
        conn: &mut PgConnection,
        tables: BuildTables<'_>,
        store: &mut RowStore,
        changes: impl IntoIterator<Item = &'c Change>,
    ) -> Result<()> {
        if self.spills == 0 {
            return Ok(());
        }
        let mut wanted: Vec<Vec<Vec<Value>>> = vec![Vec::new(); tables.specs.len()];
        let mut seen: Vec<FxHashSet<&'c [Value]>> = vec![FxHashSet::default(); tables.specs.len()];
        for change in changes {
            let index = change.table();
            let Some(spec) = tables.specs.get(index) else {
                continue;
            };
            let key = change.key(spec.key_len);
            // A key of a table that gathers partitions may be flushed as a tombstone: it is then
            // known to the fold only by its clock, which the read-back brings along.
            if self.flushed[index].contains(&key_hash(key))
                && !store.table(index).contains_key(key)
                && seen[index].insert(key)
            {
                wanted[index].push(key.to_vec());
            }
        }
        if wanted.iter().all(Vec::is_empty) {
            return Ok(());
        }
        read_back_keys(conn, tables, store, &wanted, &mut self.staging_ready).await
    }

    /// Write the fold's rows to the build's tables, in the caller's transaction, and remember their
    /// keys. The first flush COPYs into the empty tables and then indexes their keys; later ones
    /// upsert, and delete rows the fold removed. Returns the rows written.
    pub async fn flush(
        &mut self,
        conn: &mut PgConnection,
        tables: BuildTables<'_>,
        store: &RowStore,
        gate: Option<&dyn super::SliceGate>,
    ) -> Result<u64> {
        let mut written = 0;
        if self.spills == 0 {
            written += writer::bulk_load(conn, tables, store, gate).await?;
            index_keys(conn, tables).await?;
        } else {
            ensure_staging(conn, tables, &mut self.staging_ready).await?;
            for (index, spec) in tables.specs.iter().enumerate() {
                let rows = store.table(index);
                if rows.is_empty() {
                    continue;
                }
                let names = StagingNames::new(tables.build_id, index);
                // Keys never flushed are not in the tables either, but the flushed set holds
                // hashes: every row is upserted, which is right either way.
                written += writer::write_back(
                    conn,
                    tables.schema,
                    spec,
                    &names,
                    store,
                    index,
                    &writer::Absent::default(),
                )
                .await?;
            }
        }
        for (index, flushed) in self.flushed.iter_mut().enumerate() {
            let rows = store.table(index);
            flushed.reserve(rows.len());
            flushed.extend(rows.keys().map(|k| key_hash(k)));
        }
        self.spills += 1;
        Ok(written)
    }

    /// Rows in the build's tables, once the last flush has committed (upserts do not count them).
    pub async fn row_count(conn: &mut PgConnection, tables: BuildTables<'_>) -> Result<u64> {
        let mut rows = 0;
        for spec in tables.specs {
            let target = qualified(tables.schema, spec.name);
            let (count,): (i64,) = sqlx::query_as(&format!("SELECT count(*) FROM {target}"))
                .fetch_one(&mut *conn)
                .await
                .context(|| format!("counting the rows of {target}"))?;
            rows += count as u64;
        }
        Ok(rows)
    }
}

/// Create this connection's staging tables for every table of the build, unless `ready` says they
/// exist.
async fn ensure_staging(
    conn: &mut PgConnection,
    tables: BuildTables<'_>,
    ready: &mut bool,
) -> Result<()> {
    if !*ready {
        for (index, spec) in tables.specs.iter().enumerate() {
            let names = StagingNames::new(tables.build_id, index);
            writer::create_staging(conn, tables.schema, spec, &names).await?;
        }
        *ready = true;
    }
    Ok(())
}

/// Seed `store` with what the build's tables hold for the `wanted` keys of each table (rows, and
/// clocks of tables that gather partitions), in one transaction on `conn`, whose staging tables
/// `staging_ready` says exist or not.
pub(super) async fn read_back_keys(
    conn: &mut PgConnection,
    tables: BuildTables<'_>,
    store: &mut RowStore,
    wanted: &[Vec<Vec<Value>>],
    staging_ready: &mut bool,
) -> Result<()> {
    let mut tx = conn
        .begin()
        .await
        .context(|| format!("starting to read back rows of {}", tables.schema))?;
    ensure_staging(&mut tx, tables, staging_ready).await?;
    for (index, keys) in wanted.iter().enumerate() {
        let Some(spec) = tables.specs.get(index).filter(|_| !keys.is_empty()) else {
            continue;
        };
        let names = StagingNames::new(tables.build_id, index);
        writer::load_current_rows(
            &mut tx,
            tables.schema,
            spec,
            &names,
            keys,
            store.table_mut(index),
        )
        .await?;
    }
    tx.commit()
        .await
        .context(|| format!("finishing the read-back from {}", tables.schema))
}
