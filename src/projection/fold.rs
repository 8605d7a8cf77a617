//! Folding row changes into rows in memory.
//!
//! Many events collapse into one row before anything is written (see shared/LIMITS.md: the fold is
//! ~100x cheaper than a statement per event). The same fold serves both write paths: the bulk load
//! starts from empty tables, so a key the store has never seen has no row; the incremental path first
//! loads the current rows of every key a batch touches, so the fold again sees the whole truth.
//!
//! Rows of a table that gathers several partitions (not `per_aggregate`) resolve sets, upserts and
//! deletes by the event's logical time and keep a [`RowClock`] each (see [`super::clock`]); rows of
//! per-aggregate tables come from one partition and keep the plain offset order, at no extra cost.

use rustc_hash::FxHashMap;

use super::change::{Change, Key};
use super::clock::{Accumulation, Deleted, LogicalTime, RowClock, Verdict};
use super::table::TableSpec;
use super::value::{sort_on_prefix, ColumnType, Value};

/// A change that does not fit the table it names: a bug in projection code, reported with enough
/// detail to find it.
#[derive(Debug, thiserror::Error)]
#[error("table {table}: {reason}")]
pub struct FoldError {
    pub table: String,
    pub reason: String,
}

/// The rows of one table that a fold has seen. `None` means the key is known to have no row (it was
/// deleted, or the database had none when the batch started).
#[derive(Default)]
pub struct TableRows {
    pub(super) rows: FxHashMap<Key, Option<Vec<Value>>>,
    /// For a table that gathers several partitions: per key the fold has seen, its clock (a deleted
    /// row keeps one too, so that an older change arriving later cannot bring it back).
    pub(super) clocks: FxHashMap<Key, RowClock>,
    /// Rough heap bytes held, for the memory budget.
    pub(super) approx_bytes: usize,
}

impl TableRows {
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// Rows that exist, in no particular order.
    pub fn live_rows(&self) -> impl Iterator<Item = &Vec<Value>> {
        self.rows.values().filter_map(|r| r.as_ref())
    }

    /// Rows that exist, ordered by their first `key_len` columns, as the bulk load writes them so
    /// that the same log always gives the same physical table. Sorted on each key's first column's
    /// [`Value::order_prefix`] first and on the whole key only where prefixes tie.
    pub fn live_rows_in_key_order(&self, key_len: usize) -> Vec<&Vec<Value>> {
        sort_on_prefix(
            self.live_rows(),
            |row| row.first().map_or((0, 0), Value::order_prefix),
            |a, b| a[..key_len].cmp(&b[..key_len]),
        )
    }

    pub fn entries(&self) -> impl Iterator<Item = (&Key, &Option<Vec<Value>>)> {
        self.rows.iter()
    }

    pub fn keys(&self) -> impl Iterator<Item = &Key> {
        self.rows.keys()
    }

    pub fn contains_key(&self, key: &[Value]) -> bool {
        self.rows.contains_key(key)
    }

    pub fn get(&self, key: &[Value]) -> Option<&Option<Vec<Value>>> {
        self.rows.get(key)
    }

    /// Record what the database holds for a key before the batch's changes are applied.
    pub fn seed(&mut self, key: impl Into<Key>, row: Option<Vec<Value>>) {
        let key = key.into();
        self.approx_bytes += approx_size(&key) + row.as_deref().map_or(0, approx_size);
        self.rows.insert(key, row);
    }

    /// Record the clock the database holds for a key of a table that gathers several partitions.
    pub fn seed_clock(&mut self, key: impl Into<Key>, clock: RowClock) {
        let key = key.into();
        self.approx_bytes += approx_size(&key) + CLOCK_BYTES;
        self.clocks.insert(key, clock);
    }

    /// Whether the fold holds a clock for `key`.
    pub fn has_clock(&self, key: &[Value]) -> bool {
        self.clocks.contains_key(key)
    }

    /// The clocks of the keys seen, in no particular order (empty for per-aggregate tables).
    pub fn clocks(&self) -> impl Iterator<Item = (&Key, &RowClock)> {
        self.clocks.iter()
    }

    pub fn clock_count(&self) -> usize {
        self.clocks.len()
    }

    /// Every key seen, with its row (None: no row) and, for a table that gathers several
    /// partitions, its clock.
    pub fn into_entries(self) -> impl Iterator<Item = (Key, Option<Vec<Value>>, Option<RowClock>)> {
        let mut clocks = self.clocks;
        self.rows.into_iter().map(move |(key, row)| {
            let clock = clocks.remove(&key);
            (key, row, clock)
        })
    }

    /// The clocks, ordered by key, as the bulk load writes them.
    pub fn clocks_in_key_order(&self) -> Vec<(&Key, &RowClock)> {
        sort_on_prefix(
            self.clocks.iter(),
            |(key, _)| key.first().map_or((0, 0), Value::order_prefix),
            |(a, _), (b, _)| a.cmp(b),
        )
    }
}

/// Rough heap bytes of a row clock with a few set columns.
pub const CLOCK_BYTES: usize = 96;

/// Rough heap bytes of a key or row, as the memory budget counts them.
pub fn approx_size(values: &[Value]) -> usize {
    values
        .iter()
        .map(|v| match v {
            Value::Text(s) => 32 + s.len(),
            _ => 32,
        })
        .sum::<usize>()
        + 48
}

/// All tables of one projection, folded.
pub struct RowStore {
    pub(super) tables: Vec<TableRows>,
}

impl RowStore {
    pub fn new(table_count: usize) -> RowStore {
        RowStore {
            tables: (0..table_count).map(|_| TableRows::default()).collect(),
        }
    }

    pub fn table(&self, index: usize) -> &TableRows {
        &self.tables[index]
    }

    pub fn table_mut(&mut self, index: usize) -> &mut TableRows {
        &mut self.tables[index]
    }

    pub fn tables(&self) -> &[TableRows] {
        &self.tables
    }

    pub fn into_tables(self) -> Vec<TableRows> {
        self.tables
    }

    /// What the rows take: their values as counted on the way in, and the hash tables' slots (a
    /// table's allocation is a power of two of them whatever it holds, so that doubling shows).
    pub fn approx_bytes(&self) -> usize {
        const ROW_SLOT: usize = size_of::<(Key, Option<Vec<Value>>)>() + 1;
        const CLOCK_SLOT: usize = size_of::<(Key, RowClock)>() + 1;
        self.tables
            .iter()
            .map(|t| {
                // hashbrown keeps at most 7/8 of its slots full.
                t.approx_bytes
                    + t.rows.capacity() * 8 / 7 * ROW_SLOT
                    + t.clocks.capacity() * 8 / 7 * CLOCK_SLOT
            })
            .sum()
    }

    pub fn clear(&mut self) {
        for t in &mut self.tables {
            t.rows.clear();
            t.clocks.clear();
            t.approx_bytes = 0;
        }
    }

    /// Apply one change of an event at logical time `at`. A key the store has not seen is taken to
    /// have no row.
    pub fn apply(
        &mut self,
        specs: &[TableSpec],
        change: Change,
        at: LogicalTime,
    ) -> Result<(), FoldError> {
        let table_index = change.table();
        let spec = specs.get(table_index).ok_or_else(|| FoldError {
            table: format!("#{table_index}"),
            reason: format!("the projection declares {} tables", specs.len()),
        })?;
        let err = |reason: String| FoldError {
            table: spec.name.to_string(),
            reason,
        };
        let rows = &mut self.tables[table_index];
        if spec.gathers_partitions() {
            return apply_by_logical_time(rows, spec, change, at).map_err(err);
        }
        match change {
            Change::Upsert { row, .. } => {
                check_row(spec, &row).map_err(err)?;
                let key = Key::from(&row[..spec.key_len]);
                rows.approx_bytes += approx_size(&row);
                rows.rows.insert(key, Some(row));
            }
            Change::Delete { key, .. } => {
                check_key(spec, &key).map_err(err)?;
                rows.rows.insert(key, None);
            }
            Change::Set { key, columns, .. } => {
                for (col, value) in &columns {
                    check_cell(spec, *col, value).map_err(err)?;
                }
                let row = row_for(rows, spec, key).map_err(err)?;
                for (col, value) in columns {
                    row[col] = value;
                }
            }
            change @ (Change::Add { .. } | Change::Min { .. } | Change::Max { .. }) => {
                accumulate(rows, spec, change).map_err(err)?
            }
        }
        Ok(())
    }
}

/// Apply a change to a table whose rows gather several partitions: sets, upserts and deletes resolve
/// by logical time through each row's clock; adds, minimums and maximums commute and apply as they
/// come, once the clock has ruled out what no order resolves.
fn apply_by_logical_time(
    rows: &mut TableRows,
    spec: &TableSpec,
    change: Change,
    at: LogicalTime,
) -> Result<(), String> {
    let conflict = |key: &[Value], e| conflict_at(key, at, e);
    let column_name = |column: usize| {
        spec.columns
            .get(column)
            .map_or_else(|| format!("#{column}"), |c| c.name.to_string())
    };
    match change {
        Change::Upsert { row, .. } => {
            check_row(spec, &row)?;
            let key = Key::from(&row[..spec.key_len]);
            let columns = row.into_iter().enumerate().skip(spec.key_len).collect();
            set_by_logical_time(rows, spec, key, columns, at)
        }
        Change::Set { key, columns, .. } => {
            for (col, value) in &columns {
                check_cell(spec, *col, value)?;
            }
            check_key(spec, &key)?;
            set_by_logical_time(rows, spec, key, columns, at)
        }
        Change::Delete { key, .. } => {
            check_key(spec, &key)?;
            let clock = clock_for(rows, &key);
            let Some(Deleted { cleared, live }) = clock
                .delete(at, column_name)
                .map_err(|e| conflict(&key, e))?
            else {
                return Ok(());
            };
            match rows.rows.get_mut(&key[..]) {
                Some(Some(row)) if live => {
                    for column in cleared {
                        row[column] = spec.columns[column].default.clone();
                    }
                }
                Some(slot) => *slot = None,
                None => {
                    rows.rows.insert(key, None);
                }
            }
            Ok(())
        }
        Change::Min {
            value: Value::Null, ..
        }
        | Change::Max {
            value: Value::Null, ..
        } => Ok(()),
        change @ (Change::Add { .. } | Change::Min { .. } | Change::Max { .. }) => {
            let (Change::Add { key, column, .. }
            | Change::Min { key, column, .. }
            | Change::Max { key, column, .. }) = &change
            else {
                return Ok(());
            };
            check_key(spec, key)?;
            let column = *column;
            let how = match &change {
                Change::Min { .. } => Accumulation::Min,
                Change::Max { .. } => Accumulation::Max,
                _ => Accumulation::Add,
            };
            let clock = clock_for(rows, key);
            clock
                .accumulate(column, how, at, || column_name(column))
                .map_err(|e| conflict(key, e))?;
            accumulate(rows, spec, change)
        }
    }
}

/// A clock conflict as the user reads it: the row, the event's time and position, and why.
fn conflict_at(key: &[Value], at: LogicalTime, e: super::clock::ClockConflict) -> String {
    let key: Vec<String> = key.iter().map(Value::to_string).collect();
    format!("row ({}), event at {at}: {e}", key.join(", "))
}

fn set_by_logical_time(
    rows: &mut TableRows,
    spec: &TableSpec,
    key: Key,
    columns: Vec<(usize, Value)>,
    at: LogicalTime,
) -> Result<(), String> {
    let clock = clock_for(rows, &key);
    for (column, _) in &columns {
        clock
            .check_settable(*column, || spec.columns[*column].name.to_string())
            .map_err(|e| conflict_at(&key, at, e))?;
    }
    if clock.touch(at) == Verdict::Ignore {
        return Ok(());
    }
    let wins: smallvec::SmallVec<[bool; 8]> = columns
        .iter()
        .map(|(column, _)| clock.set_column(*column, at))
        .collect();
    let row = row_for(rows, spec, key)?;
    for ((column, value), wins) in columns.into_iter().zip(wins) {
        if wins {
            row[column] = value;
        }
    }
    Ok(())
}

/// Apply an add, min or max. A NULL never wins a min or max: it means "no value".
fn accumulate(rows: &mut TableRows, spec: &TableSpec, change: Change) -> Result<(), String> {
    match change {
        Change::Add {
            key, column, delta, ..
        } => {
            check_cell(spec, column, &delta)?;
            let ty = spec.columns[column].ty;
            if !ty.can_be_summed() {
                return Err(format!(
                    "column {} is {}, which cannot be summed{}",
                    spec.columns[column].name,
                    ty.pg_name(),
                    if ty == ColumnType::Double {
                        " (a floating-point sum depends on the order partitions are read in; use numeric)"
                    } else {
                        ""
                    }
                ));
            }
            let row = row_for(rows, spec, key)?;
            row[column] = row[column]
                .plus(&delta)
                .map_err(|e| format!("column {}: {e}", spec.columns[column].name))?;
        }
        Change::Min {
            value: Value::Null, ..
        }
        | Change::Max {
            value: Value::Null, ..
        } => {}
        Change::Min {
            key, column, value, ..
        } => {
            check_ordered(spec, column, &value)?;
            let row = row_for(rows, spec, key)?;
            if matches!(row[column], Value::Null) || value < row[column] {
                row[column] = value;
            }
        }
        Change::Max {
            key, column, value, ..
        } => {
            check_ordered(spec, column, &value)?;
            let row = row_for(rows, spec, key)?;
            if matches!(row[column], Value::Null) || value > row[column] {
                row[column] = value;
            }
        }
        Change::Upsert { .. } | Change::Set { .. } | Change::Delete { .. } => {}
    }
    Ok(())
}

/// The clock of `key`, a fresh one when the fold has not seen the key.
fn clock_for<'a>(rows: &'a mut TableRows, key: &[Value]) -> &'a mut RowClock {
    use std::collections::hash_map::Entry;
    // Keys of one or two short values live inline, so the copy the lookup takes allocates nothing.
    match rows.clocks.entry(Key::from(key)) {
        Entry::Occupied(entry) => entry.into_mut(),
        Entry::Vacant(entry) => {
            rows.approx_bytes += approx_size(key) + CLOCK_BYTES;
            entry.insert(RowClock::default())
        }
    }
}

/// The row for `key`, created from the table's defaults when there is none.
fn row_for<'a>(
    rows: &'a mut TableRows,
    spec: &TableSpec,
    key: Key,
) -> Result<&'a mut Vec<Value>, String> {
    use std::collections::hash_map::Entry;
    check_key(spec, &key)?;
    let slot = match rows.rows.entry(key) {
        Entry::Occupied(entry) => {
            let fresh = entry.get().is_none().then(|| spec.default_row(entry.key()));
            let slot = entry.into_mut();
            if let Some(row) = fresh {
                rows.approx_bytes += approx_size(&row);
                *slot = Some(row);
            }
            slot
        }
        Entry::Vacant(entry) => {
            let row = spec.default_row(entry.key());
            rows.approx_bytes += approx_size(&row) + approx_size(entry.key());
            entry.insert(Some(row))
        }
    };
    slot.as_mut()
        .ok_or_else(|| "row vanished while folding".to_string())
}

fn check_key(spec: &TableSpec, key: &[Value]) -> Result<(), String> {
    if key.len() != spec.key_len {
        return Err(format!(
            "key has {} values, the table's key has {}",
            key.len(),
            spec.key_len
        ));
    }
    for (i, v) in key.iter().enumerate() {
        if matches!(v, Value::Null) {
            return Err(format!("key column {} is NULL", spec.columns[i].name));
        }
        check_cell(spec, i, v)?;
    }
    Ok(())
}

fn check_row(spec: &TableSpec, row: &[Value]) -> Result<(), String> {
    if row.len() != spec.columns.len() {
        return Err(format!(
            "row has {} values, the table has {} columns",
            row.len(),
            spec.columns.len()
        ));
    }
    check_key(spec, &row[..spec.key_len])?;
    for (i, v) in row.iter().enumerate().skip(spec.key_len) {
        check_cell(spec, i, v)?;
    }
    Ok(())
}

fn check_cell(spec: &TableSpec, column: usize, value: &Value) -> Result<(), String> {
    let col = spec.columns.get(column).ok_or_else(|| {
        format!(
            "column #{column} does not exist ({} columns)",
            spec.columns.len()
        )
    })?;
    if value.fits(col.ty) {
        Ok(())
    } else {
        Err(format!(
            "column {} is {}, got {value:?}",
            col.name,
            type_label(col.ty)
        ))
    }
}

/// A minimum or maximum needs an order the fold and PostgreSQL agree on; jsonb has none.
fn check_ordered(spec: &TableSpec, column: usize, value: &Value) -> Result<(), String> {
    check_cell(spec, column, value)?;
    match spec.columns[column].ty {
        ColumnType::Jsonb => Err(format!(
            "column {} is jsonb, which has no minimum or maximum",
            spec.columns[column].name
        )),
        _ => Ok(()),
    }
}

fn type_label(ty: ColumnType) -> &'static str {
    ty.pg_name()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::projection::table::Column;
    use crate::projection::value::Decimal;

    #[test]
    fn rows_in_key_order_match_a_sort_on_whole_keys() {
        let spec = TableSpec {
            name: "sales",
            columns: vec![
                Column::new("region", ColumnType::Text),
                Column::new("day", ColumnType::Date),
                Column::counter("orders"),
            ],
            key_len: 2,
            bucket_column: None,
            per_aggregate: true,
        };
        let mut store = RowStore::new(1);
        // Regions that share their first eight bytes, or are prefixes of one another, so that most
        // of the order is decided past the prefix; days on both sides of the epoch.
        let regions = [
            "north-east-1",
            "north-east-10",
            "north-east",
            "north-ea",
            "north-e",
            "north-east-1\u{0}",
            "south",
            "",
        ];
        let mut n = 0i64;
        for (i, region) in regions.iter().enumerate() {
            for day in [-3, 0, 7, i32::MIN, i32::MAX] {
                n += 1;
                let key = crate::key![Value::text(*region), Value::Date(day)];
                store
                    .apply(
                        std::slice::from_ref(&spec),
                        Change::Add {
                            table: 0,
                            key,
                            column: 2,
                            delta: Value::BigInt(n * (i as i64 + 1)),
                        },
                        LogicalTime::default(),
                    )
                    .expect("folds");
            }
        }
        store
            .apply(
                std::slice::from_ref(&spec),
                Change::Delete {
                    table: 0,
                    key: crate::key![Value::text("south"), Value::Date(0)],
                },
                LogicalTime::default(),
            )
            .expect("folds");

        let ordered = store.table(0).live_rows_in_key_order(spec.key_len);
        let mut expected: Vec<&Vec<Value>> = store.table(0).live_rows().collect();
        expected.sort_by(|a, b| a[..2].cmp(&b[..2]));
        assert_eq!(ordered.len(), regions.len() * 5 - 1);
        assert_eq!(ordered, expected);
    }

    #[test]
    fn sums_are_exact_and_refused_where_their_order_would_show() {
        let spec = TableSpec {
            name: "amounts",
            columns: vec![
                Column::new("k", ColumnType::Text),
                Column::new("exact", ColumnType::Numeric),
                Column::new("small", ColumnType::Integer),
                Column::new("float", ColumnType::Double),
                Column::new("doc", ColumnType::Jsonb),
            ],
            key_len: 1,
            bucket_column: None,
            per_aggregate: true,
        };
        let specs = std::slice::from_ref(&spec);
        let key = || crate::key![Value::text("k")];
        let add = |column, delta| Change::Add {
            table: 0,
            key: key(),
            column,
            delta,
        };
        let mut store = RowStore::new(1);
        // 0.1 added ten times is exactly 1.0 in numeric (it is not in floating point).
        for _ in 0..10 {
            store
                .apply(
                    specs,
                    add(1, Value::Numeric(Decimal::new(1, 1))),
                    LogicalTime::default(),
                )
                .expect("folds");
        }
        let row = store.table(0).get(&key()).cloned().flatten().expect("row");
        assert_eq!(row[1], Value::Numeric(Decimal::new(10, 1)));
        assert_eq!(row[1].to_string(), "1.0");

        let refused = |store: &mut RowStore, change| {
            store
                .apply(specs, change, LogicalTime::default())
                .expect_err("refused")
                .to_string()
        };
        store
            .apply(
                specs,
                add(2, Value::Integer(i32::MAX)),
                LogicalTime::default(),
            )
            .expect("folds");
        assert!(refused(&mut store, add(2, Value::Integer(1))).contains("overflows"));
        let float = refused(&mut store, add(3, Value::double(0.5)));
        assert!(
            float.contains("float") && float.contains("numeric"),
            "{float}"
        );
        let wrong = refused(&mut store, add(1, Value::BigInt(1)));
        assert!(wrong.contains("exact is numeric"), "{wrong}");
        let min = Change::Min {
            table: 0,
            key: key(),
            column: 4,
            value: Value::json(&serde_json::json!({"a": 1})),
        };
        assert!(refused(&mut store, min).contains("no minimum"));
    }

    /// Interleavings of a few partitions' events: however reads interleave, and however they are cut
    /// into batches that go through the database between them, rows end as a fold of the same events
    /// sorted by logical time says.
    mod interleavings {
        use super::*;
        use crate::projection::{LogicalTime, RowClock};
        use proptest::prelude::*;
        use std::collections::BTreeMap;

        fn text(name: &'static str) -> Column {
            Column::new(name, ColumnType::Text)
        }

        /// Table 0 is set, upserted and deleted; table 1 is added to, min'd and max'd, with one set
        /// column; table 2 gets every kind of change on the same columns.
        fn specs() -> Vec<TableSpec> {
            let table = |name, columns| TableSpec {
                name,
                columns,
                key_len: 1,
                bucket_column: None,
                per_aggregate: false,
            };
            vec![
                table(
                    "registers",
                    vec![text("k"), text("a"), Column::new("b", ColumnType::BigInt)],
                ),
                table(
                    "tallies",
                    vec![
                        text("k"),
                        Column::counter("n"),
                        Column::new("lo", ColumnType::BigInt),
                        Column::new("hi", ColumnType::BigInt),
                        text("label"),
                    ],
                ),
                table("mixed", vec![text("k"), Column::counter("n")]),
                TableSpec {
                    per_aggregate: true,
                    ..table("ledgers", vec![text("k"), Column::counter("n"), text("a")])
                },
            ]
        }

        /// Changes of the per-aggregate table 3, keyed within their partition by
        /// [`owned_by_partition`].
        fn ledger_change() -> impl Strategy<Value = Change> {
            (0u8..3, -5i64..5, 0u8..4).prop_map(|(k, v, kind)| match kind {
                0 | 1 => Change::Add {
                    table: 3,
                    key: key(k),
                    column: 1,
                    delta: Value::BigInt(v),
                },
                2 => Change::Set {
                    table: 3,
                    key: key(k),
                    columns: vec![(2, Value::text(format!("a{v}")))],
                },
                _ => Change::Delete {
                    table: 3,
                    key: key(k),
                },
            })
        }

        /// A change of table 3 moved to keys of partition `p` alone, as an aggregate's events all
        /// live in its one partition.
        fn owned_by_partition(change: Change, p: usize) -> Change {
            let owned = |key: Key| match key.first() {
                Some(Value::Text(k)) => crate::key![Value::text(format!("p{p}{k}"))],
                _ => key,
            };
            match change {
                Change::Add {
                    table: 3,
                    key,
                    column,
                    delta,
                } => Change::Add {
                    table: 3,
                    key: owned(key),
                    column,
                    delta,
                },
                Change::Set {
                    table: 3,
                    key,
                    columns,
                } => Change::Set {
                    table: 3,
                    key: owned(key),
                    columns,
                },
                Change::Delete { table: 3, key } => Change::Delete {
                    table: 3,
                    key: owned(key),
                },
                other => other,
            }
        }

        fn key(k: u8) -> Key {
            crate::key![Value::text(format!("k{k}"))]
        }

        fn register_change() -> impl Strategy<Value = Change> {
            (0u8..3, 0i64..5, 0u8..5).prop_map(|(k, v, kind)| match kind {
                0 => Change::Set {
                    table: 0,
                    key: key(k),
                    columns: vec![(1, Value::text(format!("v{v}")))],
                },
                1 => Change::Set {
                    table: 0,
                    key: key(k),
                    columns: vec![(2, Value::BigInt(v))],
                },
                2 => Change::Upsert {
                    table: 0,
                    row: vec![
                        Value::text(format!("k{k}")),
                        Value::text(format!("u{v}")),
                        Value::BigInt(-v),
                    ],
                },
                3 => Change::Set {
                    table: 0,
                    key: key(k),
                    columns: Vec::new(),
                },
                _ => Change::Delete {
                    table: 0,
                    key: key(k),
                },
            })
        }

        fn tally_change() -> impl Strategy<Value = Change> {
            (0u8..3, -5i64..5, 0u8..4).prop_map(|(k, v, kind)| match kind {
                0 => Change::Add {
                    table: 1,
                    key: key(k),
                    column: 1,
                    delta: Value::BigInt(v),
                },
                1 => Change::Min {
                    table: 1,
                    key: key(k),
                    column: 2,
                    value: Value::BigInt(v),
                },
                2 => Change::Max {
                    table: 1,
                    key: key(k),
                    column: 3,
                    value: Value::BigInt(v),
                },
                _ => Change::Set {
                    table: 1,
                    key: key(k),
                    columns: vec![(4, Value::text(format!("l{v}")))],
                },
            })
        }

        fn mixed_change() -> impl Strategy<Value = Change> {
            (0u8..2, 0i64..3, 0u8..4).prop_map(|(k, v, kind)| match kind {
                0 => Change::Add {
                    table: 2,
                    key: key(k),
                    column: 1,
                    delta: Value::BigInt(v),
                },
                1 => Change::Set {
                    table: 2,
                    key: key(k),
                    columns: vec![(1, Value::BigInt(v))],
                },
                2 => Change::Max {
                    table: 2,
                    key: key(k),
                    column: 1,
                    value: Value::BigInt(v),
                },
                _ => Change::Delete {
                    table: 2,
                    key: key(k),
                },
            })
        }

        type Event = (LogicalTime, Vec<Change>);

        /// Up to four partitions of events with times drawn from a small range, so that ties in
        /// time (broken by partition, then offset) and times running backwards inside a partition
        /// (clock skew) are common.
        fn partitions(change: BoxedStrategy<Change>) -> impl Strategy<Value = Vec<Vec<Event>>> {
            let event = (0i64..12, proptest::collection::vec(change, 1..4));
            proptest::collection::vec(proptest::collection::vec(event, 0..10), 1..5).prop_map(
                |partitions| {
                    partitions
                        .into_iter()
                        .enumerate()
                        .map(|(p, events)| {
                            events
                                .into_iter()
                                .enumerate()
                                .map(|(offset, (time, changes))| {
                                    let at = LogicalTime {
                                        occurred_at_micros: time,
                                        partition: p as i32,
                                        offset: offset as i64,
                                    };
                                    let changes = changes
                                        .into_iter()
                                        .map(|c| owned_by_partition(c, p))
                                        .collect();
                                    (at, changes)
                                })
                                .collect()
                        })
                        .collect()
                },
            )
        }

        /// Merge the partitions as `picks` says, each partition staying in offset order.
        fn interleave(partitions: &[Vec<Event>], picks: &[usize]) -> Vec<Event> {
            let mut cursors = vec![0; partitions.len()];
            let mut out = Vec::new();
            let mut picks = picks.iter().cycle();
            loop {
                let open: Vec<usize> = (0..partitions.len())
                    .filter(|&p| cursors[p] < partitions[p].len())
                    .collect();
                let Some(pick) = picks.next() else { break };
                if open.is_empty() {
                    break;
                }
                let p = open[pick % open.len()];
                out.push(partitions[p][cursors[p]].clone());
                cursors[p] += 1;
            }
            out
        }

        /// What the database would hold: per table and key, the row (None: none, or a tombstone)
        /// and the encoded clock.
        type Stored = BTreeMap<(usize, Key), (Option<Vec<Value>>, Option<Vec<u8>>)>;

        /// Fold `events` in batches of `cut` events; between batches everything goes through
        /// [`Stored`], and each batch starts from a fresh store seeded with the keys it touches, as
        /// the incremental writer does.
        fn fold_in_batches(
            specs: &[TableSpec],
            events: &[Event],
            cut: usize,
        ) -> Result<Stored, String> {
            let mut stored = Stored::new();
            for batch in events.chunks(cut.max(1)) {
                let mut store = RowStore::new(specs.len());
                for (_, changes) in batch {
                    for change in changes {
                        let table = change.table();
                        let key = Key::from(change.key(specs[table].key_len));
                        if store.table(table).contains_key(&key) {
                            continue;
                        }
                        let (row, clock) = stored
                            .get(&(table, key.clone()))
                            .cloned()
                            .unwrap_or_default();
                        store.table_mut(table).seed(key.clone(), row);
                        if let Some(bytes) = clock {
                            let clock = RowClock::decode(&bytes).map_err(|e| e.to_string())?;
                            store.table_mut(table).seed_clock(key, clock);
                        }
                    }
                }
                for (at, changes) in batch {
                    for change in changes {
                        store
                            .apply(specs, change.clone(), *at)
                            .map_err(|e| e.to_string())?;
                    }
                }
                write_out(specs, &store, &mut stored);
            }
            Ok(stored)
        }

        /// Write every row and clock of `store` into `stored`, as a commit writes them.
        fn write_out(specs: &[TableSpec], store: &RowStore, stored: &mut Stored) {
            for (table, _) in specs.iter().enumerate() {
                for (key, row) in store.table(table).entries() {
                    stored.entry((table, key.clone())).or_default().0 = row.clone();
                }
                for (key, clock) in store.table(table).clocks() {
                    stored.entry((table, key.clone())).or_default().1 = Some(clock.encode());
                }
            }
        }

        fn live_rows(stored: &Stored) -> BTreeMap<(usize, Key), Vec<Value>> {
            stored
                .iter()
                .filter_map(|(k, (row, _))| row.clone().map(|r| (k.clone(), r)))
                .collect()
        }

        fn sorted(partitions: &[Vec<Event>]) -> Vec<Event> {
            let mut all: Vec<Event> = partitions.iter().flatten().cloned().collect();
            all.sort_by_key(|(at, _)| *at);
            all
        }

        /// A store seeded with what `stored` holds, as the writer reads a build's rows back.
        fn seeded(specs: &[TableSpec], stored: &Stored) -> Result<RowStore, String> {
            let mut store = RowStore::new(specs.len());
            for ((table, key), (row, clock)) in stored {
                store.table_mut(*table).seed(key.clone(), row.clone());
                if let Some(bytes) = clock {
                    let clock = RowClock::decode(bytes).map_err(|e| e.to_string())?;
                    store.table_mut(*table).seed_clock(key.clone(), clock);
                }
            }
            Ok(store)
        }

        /// The partitions of group `group` of `count` (`groups[p] % count` is partition p's); the
        /// others left empty, so that partition numbers stay.
        fn group_of(
            partitions: &[Vec<Event>],
            groups: &[usize],
            count: usize,
            group: usize,
        ) -> Vec<Vec<Event>> {
            partitions
                .iter()
                .enumerate()
                .map(|(p, events)| {
                    if groups.get(p).copied().unwrap_or(0) % count == group {
                        events.clone()
                    } else {
                        Vec::new()
                    }
                })
                .collect()
        }

        /// Fold each group of partitions apart (`groups[p]` is partition p's), each in its own
        /// interleaving and batches, then merge the groups' folds in `order`.
        fn fold_apart_and_merge(
            specs: &[TableSpec],
            partitions: &[Vec<Event>],
            groups: &[usize],
            picks: &[usize],
            cut: usize,
            order: &[usize],
        ) -> Result<Stored, String> {
            let mut folds = Vec::new();
            for group in 0..3 {
                let mine = group_of(partitions, groups, 3, group);
                let folded = fold_in_batches(specs, &interleave(&mine, picks), cut)?;
                folds.push(Some(seeded(specs, &folded)?));
            }
            let mut merged: Option<RowStore> = None;
            for &i in order.iter().chain(&[0, 1, 2]) {
                let Some(fold) = folds[i % 3].take() else {
                    continue;
                };
                match &mut merged {
                    None => merged = Some(fold),
                    Some(into) => into.merge(specs, fold).map_err(|e| e.to_string())?,
                }
            }
            let merged = merged.ok_or("no folds")?;
            let mut stored = Stored::new();
            write_out(specs, &merged, &mut stored);
            Ok(stored)
        }

        /// Load the partitions in rounds, as processes sharing a build under a memory budget do:
        /// each round takes up to `cut` events of the partitions `steps` gives it (the group's
        /// share of the moment, which moves between rounds), folds them from nothing except the
        /// per-aggregate rows its changes touch, read back from [`Stored`], then writes those rows
        /// back and joins its rows that gather partitions into what is stored.
        fn load_in_rounds(
            specs: &[TableSpec],
            partitions: &[Vec<Event>],
            steps: &[u8],
            cut: usize,
        ) -> Result<Stored, String> {
            let mut cursors = vec![0; partitions.len()];
            let mut stored = Stored::new();
            let mut steps = steps.iter().cycle();
            loop {
                let open: Vec<usize> = (0..partitions.len())
                    .filter(|&p| cursors[p] < partitions[p].len())
                    .collect();
                if open.is_empty() {
                    return Ok(stored);
                }
                let mask = steps.next().copied().unwrap_or(u8::MAX);
                let mut mine: Vec<usize> = open
                    .iter()
                    .copied()
                    .filter(|p| mask & (1 << p) != 0)
                    .collect();
                if mine.is_empty() {
                    mine = open;
                }
                let mut round = Vec::new();
                'read: while round.len() < cut.max(1) {
                    let mut any = false;
                    for &p in &mine {
                        if let Some(event) = partitions[p].get(cursors[p]) {
                            round.push(event.clone());
                            cursors[p] += 1;
                            any = true;
                            if round.len() >= cut.max(1) {
                                break 'read;
                            }
                        }
                    }
                    if !any {
                        break;
                    }
                }
                let mut fold = RowStore::new(specs.len());
                for (at, changes) in &round {
                    for change in changes {
                        let table = change.table();
                        let key = Key::from(change.key(specs[table].key_len));
                        if !specs[table].gathers_partitions()
                            && !fold.table(table).contains_key(&key)
                        {
                            let row = stored.get(&(table, key.clone())).and_then(|s| s.0.clone());
                            fold.table_mut(table).seed(key, row);
                        }
                        fold.apply(specs, change.clone(), *at)
                            .map_err(|e| e.to_string())?;
                    }
                }
                let mut joined = seeded(specs, &stored)?;
                for (table, theirs) in fold.into_tables().into_iter().enumerate() {
                    if specs[table].gathers_partitions() {
                        joined.table_mut(table).merge(&specs[table], theirs)?;
                    } else {
                        for (key, row) in theirs.entries() {
                            joined.table_mut(table).seed(key.clone(), row.clone());
                        }
                    }
                }
                stored = Stored::new();
                write_out(specs, &joined, &mut stored);
            }
        }

        /// Readers sharing a [`ShardedStore`] of `shards` shards: reader `r` owns the partitions
        /// `groups` gives it and folds them in batches of `cut` events, each in its own partition
        /// interleaving; the readers' batches go in as `picks` orders them.
        fn fold_by_readers(
            specs: &[TableSpec],
            partitions: &[Vec<Event>],
            groups: &[usize],
            picks: &[usize],
            cut: usize,
            shards: usize,
        ) -> Result<Stored, String> {
            use crate::projection::{ChangeLog, Changes, ShardBuckets, ShardedStore};
            let sharded = ShardedStore::new(specs.len(), shards);
            let mut batches: Vec<std::collections::VecDeque<ChangeLog>> = (0..2)
                .map(|reader| {
                    interleave(&group_of(partitions, groups, 2, reader), picks)
                        .chunks(cut.max(1))
                        .map(|events| {
                            let mut log = ChangeLog::default();
                            for (at, changes) in events {
                                let mut emitted = Changes::default();
                                for change in changes {
                                    emitted.push(change.clone());
                                }
                                log.record(*at, &mut emitted);
                            }
                            log
                        })
                        .collect()
                })
                .collect();
            let mut buckets = [ShardBuckets::default(), ShardBuckets::default()];
            let mut picks = picks.iter().cycle();
            while batches.iter().any(|b| !b.is_empty()) {
                let pick = picks.next().copied().unwrap_or(0) % 2;
                let reader = if batches[pick].is_empty() {
                    1 - pick
                } else {
                    pick
                };
                let Some(mut log) = batches[reader].pop_front() else {
                    continue;
                };
                sharded
                    .apply(specs, &mut log, &mut buckets[reader], reader)
                    .map_err(|e| e.to_string())?;
            }
            let mut stored = Stored::new();
            write_out(specs, &sharded.into_store(), &mut stored);
            Ok(stored)
        }

        fn cases() -> u32 {
            std::env::var("REPROJECT_FUZZ_CASES")
                .ok()
                .and_then(|n| n.parse().ok())
                .unwrap_or(2_000)
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(cases()))]

            #[test]
            fn rows_gathering_partitions_end_as_logical_time_says(
                partitions in partitions(prop_oneof![register_change(), tally_change()].boxed()),
                picks in proptest::collection::vec(0usize..8, 1..40),
                cut in 1usize..6,
            ) {
                let specs = specs();
                let reference = fold_in_batches(&specs, &sorted(&partitions), usize::MAX)
                    .map_err(TestCaseError::fail)?;
                let interleaved = interleave(&partitions, &picks);
                let whole = fold_in_batches(&specs, &interleaved, usize::MAX)
                    .map_err(TestCaseError::fail)?;
                let batched = fold_in_batches(&specs, &interleaved, cut)
                    .map_err(TestCaseError::fail)?;
                prop_assert_eq!(live_rows(&whole), live_rows(&reference));
                prop_assert_eq!(live_rows(&batched), live_rows(&reference));
            }

            #[test]
            fn folds_of_partitions_read_apart_merge_into_the_fold_of_all(
                partitions in partitions(prop_oneof![register_change(), tally_change()].boxed()),
                groups in proptest::collection::vec(0usize..3, 4),
                picks in proptest::collection::vec(0usize..8, 1..40),
                cut in 1usize..6,
                order in proptest::collection::vec(0usize..3, 0..3),
            ) {
                let specs = specs();
                let reference = fold_in_batches(&specs, &sorted(&partitions), usize::MAX)
                    .map_err(TestCaseError::fail)?;
                let merged = fold_apart_and_merge(&specs, &partitions, &groups, &picks, cut, &order)
                    .map_err(TestCaseError::fail)?;
                prop_assert_eq!(live_rows(&merged), live_rows(&reference));
            }

            #[test]
            fn rounds_cut_anywhere_and_moved_between_processes_load_the_fold_of_all(
                partitions in partitions(
                    prop_oneof![register_change(), tally_change(), ledger_change()].boxed()
                ),
                steps in proptest::collection::vec(0u8..16, 1..12),
                cut in 1usize..8,
            ) {
                let specs = specs();
                // Per-aggregate rows follow their partition's offsets; the others logical time,
                // whatever the interleaving (see the test above).
                let reference = fold_in_batches(&specs, &interleave(&partitions, &[0]), usize::MAX)
                    .map_err(TestCaseError::fail)?;
                let loaded = load_in_rounds(&specs, &partitions, &steps, cut)
                    .map_err(TestCaseError::fail)?;
                prop_assert_eq!(live_rows(&loaded), live_rows(&reference));
            }

            #[test]
            fn readers_folding_into_shared_shards_give_the_fold_of_all(
                partitions in partitions(
                    prop_oneof![register_change(), tally_change(), ledger_change()].boxed()
                ),
                groups in proptest::collection::vec(0usize..2, 4),
                picks in proptest::collection::vec(0usize..8, 1..40),
                cut in 1usize..6,
                shards in 1usize..5,
            ) {
                let specs = specs();
                let reference = fold_in_batches(&specs, &interleave(&partitions, &[0]), usize::MAX)
                    .map_err(TestCaseError::fail)?;
                let shared = fold_by_readers(&specs, &partitions, &groups, &picks, cut, shards)
                    .map_err(TestCaseError::fail)?;
                prop_assert_eq!(live_rows(&shared), live_rows(&reference));
            }

            #[test]
            fn merging_refuses_what_the_fold_of_all_refuses(
                partitions in partitions(mixed_change().boxed()),
                groups in proptest::collection::vec(0usize..3, 4),
                picks in proptest::collection::vec(0usize..8, 1..40),
                cut in 1usize..6,
                order in proptest::collection::vec(0usize..3, 0..3),
            ) {
                let specs = specs();
                let reference = fold_in_batches(&specs, &sorted(&partitions), usize::MAX);
                let merged = fold_apart_and_merge(&specs, &partitions, &groups, &picks, cut, &order);
                match (&reference, &merged) {
                    (Ok(a), Ok(b)) => prop_assert_eq!(live_rows(a), live_rows(b)),
                    (Err(_), Err(_)) => {}
                    _ => prop_assert!(false, "all: {:?}, merged: {:?}", reference, merged),
                }
            }

            #[test]
            fn mixtures_no_order_resolves_are_refused_whatever_the_order(
                partitions in partitions(mixed_change().boxed()),
                picks in proptest::collection::vec(0usize..8, 1..40),
                cut in 1usize..6,
            ) {
                let specs = specs();
                let reference = fold_in_batches(&specs, &sorted(&partitions), usize::MAX);
                let interleaved = interleave(&partitions, &picks);
                let batched = fold_in_batches(&specs, &interleaved, cut);
                match (&reference, &batched) {
                    (Ok(a), Ok(b)) => prop_assert_eq!(live_rows(a), live_rows(b)),
                    (Err(_), Err(_)) => {}
                    _ => prop_assert!(false, "sorted: {:?}, interleaved: {:?}", reference, batched),
                }
            }
        }
    }
}
