//! What a batch writer knows its builds' tables hold, so that the next batch need not read it back.
//!
//! A follow holds the writer lock of every build it writes (nothing else writes them meanwhile), so
//! the rows and clocks its last transactions committed are what the tables hold. A batch takes the
//! rows it touches from here and reads only the others from the database; once the batch has
//! committed, the rows it wrote come back here. A row taken by a batch that did not commit is simply
//! not known any more: the next batch reads it. Nothing here is ever more than a shortcut for a read.
//!
//! Bounded by bytes, in two generations: when the newer one is full it becomes the older one and the
//! oldest is dropped, so the rows touched most recently stay (the rows a live log touches next are
//! mostly those of the aggregates it touched last).

use rustc_hash::FxHashMap;

use crate::projection::{approx_size, Key, RowClock, RowStore, Value, CLOCK_BYTES};

/// What a batch writer keeps by default: rows of the last batches, up to this many bytes (roughly,
/// as the memory budget counts them) over every build it writes.
pub const DEFAULT_KNOWN_ROWS_BYTES: usize = 256 << 20;

/// A key's row as committed (None: the table holds no row for it) and, for a table that gathers
/// several partitions, its clock.
pub struct KnownRow {
    pub row: Option<Vec<Value>>,
    pub clock: Option<RowClock>,
}

#[derive(Default)]
struct Generation {
    /// Per build, per table index.
    tables: FxHashMap<i64, Vec<FxHashMap<Key, KnownRow>>>,
    bytes: usize,
}

impl Generation {
    fn take(&mut self, build_id: i64, table: usize, key: &[Value]) -> Option<KnownRow> {
        let known = self
            .tables
            .get_mut(&build_id)?
            .get_mut(table)?
            .remove(key)?;
        self.bytes = self.bytes.saturating_sub(size_of(key, &known));
        Some(known)
    }
}

fn size_of(key: &[Value], known: &KnownRow) -> usize {
    approx_size(key)
        + known.row.as_deref().map_or(0, approx_size)
        + known.clock.as_ref().map_or(0, |_| CLOCK_BYTES)
}

/// The rows a batch writer's builds hold, as far as it knows them.
pub struct KnownRows {
    newer: Generation,
    older: Generation,
    /// Bytes of one generation; 0 keeps nothing.
    generation_bytes: usize,
}

impl KnownRows {
    /// Keep at most about `bytes` (two generations of half of it); 0 keeps nothing.
    pub fn new(bytes: usize) -> KnownRows {
        KnownRows {
            newer: Generation::default(),
            older: Generation::default(),
            generation_bytes: bytes / 2,
        }
    }

    /// The committed row of `key` in table `table` of build `build_id`, if known, taken out: it
    /// comes back with [`KnownRows::remember`] once the batch that took it has committed.
    pub fn take(&mut self, build_id: i64, table: usize, key: &[Value]) -> Option<KnownRow> {
        self.newer
            .take(build_id, table, key)
            .or_else(|| self.older.take(build_id, table, key))
    }

    /// Every row and clock of `store`, just committed to build `build_id`'s tables.
    pub fn remember(&mut self, build_id: i64, store: RowStore) {
        if self.generation_bytes == 0 {
            return;
        }
        for (index, rows) in store.into_tables().into_iter().enumerate() {
            for (key, row, clock) in rows.into_entries() {
                let known = KnownRow { row, clock };
                // Not in the older generation any more: one copy of a key, the latest.
                self.older.take(build_id, index, &key);
                let size = size_of(&key, &known);
                if self.newer.bytes + size > self.generation_bytes {
                    self.older = std::mem::take(&mut self.newer);
                }
                let tables = self.newer.tables.entry(build_id).or_default();
                if tables.len() <= index {
                    tables.resize_with(index + 1, FxHashMap::default);
                }
                if let Some(earlier) = tables[index].insert(key, known) {
                    self.newer.bytes = self.newer.bytes.saturating_sub(size_of(&[], &earlier));
                }
                self.newer.bytes += size;
            }
        }
    }

    /// Forget everything: after a transaction whose outcome is not known.
    pub fn clear(&mut self) {
        self.newer = Generation::default();
        self.older = Generation::default();
    }

    /// Rows known, over every build and table.
    pub fn len(&self) -> usize {
        [&self.newer, &self.older]
            .iter()
            .flat_map(|g| g.tables.values().flatten())
            .map(|t| t.len())
            .sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::projection::{Change, Column, ColumnType, LogicalTime, TableSpec};

    fn spec() -> Vec<TableSpec> {
        vec![TableSpec {
            name: "totals",
            columns: vec![
                Column::new("id", ColumnType::Text),
                Column::counter("total"),
            ],
            key_len: 1,
            bucket_column: None,
            per_aggregate: true,
        }]
    }

    fn committed(ids: &[&str]) -> RowStore {
        let specs = spec();
        let mut store = RowStore::new(1);
        for id in ids {
            store.table_mut(0).seed(vec![Value::text(*id)], None);
            store
                .apply(
                    &specs,
                    Change::Add {
                        table: 0,
                        key: Key::from(vec![Value::text(*id)]),
                        column: 1,
                        delta: Value::BigInt(5),
                    },
                    LogicalTime::default(),
                )
                .expect("a valid change");
        }
        store
    }

    #[test]
    fn a_committed_row_is_known_once_and_taken_out_by_the_batch_that_uses_it() {
        let mut known = KnownRows::new(1 << 20);
        known.remember(7, committed(&["a"]));
        let key = [Value::text("a")];
        let row = known.take(7, 0, &key).expect("known after its commit");
        assert_eq!(row.row, Some(vec![Value::text("a"), Value::BigInt(5)]));
        assert!(
            known.take(7, 0, &key).is_none(),
            "taken out until it commits again"
        );
        assert!(
            known.take(8, 0, &key).is_none(),
            "another build's rows are its own"
        );
    }

    #[test]
    fn the_rows_touched_last_stay_when_the_bound_is_reached() {
        let one = size_of(
            &[Value::text("k0000")],
            &KnownRow {
                row: Some(vec![Value::text("k0000"), Value::BigInt(5)]),
                clock: None,
            },
        );
        // Room for about ten rows per generation.
        let mut known = KnownRows::new(one * 20);
        let ids: Vec<String> = (0..100).map(|i| format!("k{i:04}")).collect();
        for id in &ids {
            known.remember(1, committed(&[id.as_str()]));
        }
        assert!(known.len() <= 20, "bounded: {} rows kept", known.len());
        assert!(known.take(1, 0, &[Value::text("k0099")]).is_some());
        assert!(known.take(1, 0, &[Value::text("k0000")]).is_none());
    }

    #[test]
    fn nothing_is_kept_without_room() {
        let mut known = KnownRows::new(0);
        known.remember(1, committed(&["a"]));
        assert!(known.is_empty());
    }
}
