//! Folding row changes into rows in memory.
//!
//! Many events collapse into one row before anything is written (see shared/LIMITS.md: the fold is
//! ~100x cheaper than a statement per event). The same fold serves both write paths: the bulk load
//! starts from empty tables, so a key the store has never seen has no row; the incremental path first
//! loads the current rows of every key a batch touches, so the fold again sees the whole truth.

use rustc_hash::FxHashMap;

use super::change::{Change, Key};
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
    rows: FxHashMap<Key, Option<Vec<Value>>>,
    /// Rough heap bytes held, for the memory budget.
    approx_bytes: usize,
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
}

fn approx_size(values: &[Value]) -> usize {
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
    tables: Vec<TableRows>,
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

    pub fn approx_bytes(&self) -> usize {
        self.tables.iter().map(|t| t.approx_bytes).sum()
    }

    pub fn clear(&mut self) {
        for t in &mut self.tables {
            t.rows.clear();
            t.approx_bytes = 0;
        }
    }

    /// Apply one change. A key the store has not seen is taken to have no row.
    pub fn apply(&mut self, specs: &[TableSpec], change: Change) -> Result<(), FoldError> {
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
            Change::Add {
                key, column, delta, ..
            } => {
                check_cell(spec, column, &Value::BigInt(0)).map_err(err)?;
                let row = row_for(rows, spec, key).map_err(err)?;
                row[column] = match &row[column] {
                    Value::Null => Value::BigInt(delta),
                    Value::BigInt(v) => Value::BigInt(v.checked_add(delta).ok_or_else(|| {
                        err(format!(
                            "column {} overflows: {v} + {delta}",
                            spec.columns[column].name
                        ))
                    })?),
                    other => return Err(err(format!("cannot add to {other} in a bigint column"))),
                };
            }
            // A NULL never wins a min or max: it means "no value".
            Change::Min {
                value: Value::Null, ..
            }
            | Change::Max {
                value: Value::Null, ..
            } => {}
            Change::Min {
                key, column, value, ..
            } => {
                check_cell(spec, column, &value).map_err(err)?;
                let row = row_for(rows, spec, key).map_err(err)?;
                if matches!(row[column], Value::Null) || value < row[column] {
                    row[column] = value;
                }
            }
            Change::Max {
                key, column, value, ..
            } => {
                check_cell(spec, column, &value).map_err(err)?;
                let row = row_for(rows, spec, key).map_err(err)?;
                if matches!(row[column], Value::Null) || value > row[column] {
                    row[column] = value;
                }
            }
        }
        Ok(())
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

fn type_label(ty: ColumnType) -> &'static str {
    ty.pg_name()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::projection::table::Column;

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
            per_aggregate: false,
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
                            delta: n * (i as i64 + 1),
                        },
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
            )
            .expect("folds");

        let ordered = store.table(0).live_rows_in_key_order(spec.key_len);
        let mut expected: Vec<&Vec<Value>> = store.table(0).live_rows().collect();
        expected.sort_by(|a, b| a[..2].cmp(&b[..2]));
        assert_eq!(ordered.len(), regions.len() * 5 - 1);
        assert_eq!(ordered, expected);
    }
}
