//! Joining folds of disjoint sets of partitions into the fold of all of them.
//!
//! Several processes may each replay some of a log's partitions into one build; their folds must
//! come together exactly as if one fold had read every partition, in any order. A row of a
//! per-aggregate table comes from one partition, so two such folds never share its key (a key
//! found in both is a broken promise, and refused). A row that gathers partitions carries a
//! [`RowClock`] that says how each of its columns was written, so the join is decided column by
//! column: a set column takes the value of the later write in logical time, an added one adds the
//! two sums (each started from the column's default, counted once), a minimum or maximum keeps the
//! smaller or larger, and a delete clears what it follows and hides the row unless a later write
//! brings it back.

use std::collections::hash_map::Entry;

use super::clock::{Accumulation, RowClock};
use super::fold::{FoldError, RowStore, TableRows};
use super::table::TableSpec;
use super::value::Value;
use super::Key;

impl RowStore {
    /// Fold `other`, the fold of other partitions than this one's, into this one.
    pub fn merge(&mut self, specs: &[TableSpec], other: RowStore) -> Result<(), FoldError> {
        if other.tables.len() != self.tables.len() || specs.len() != self.tables.len() {
            return Err(FoldError {
                table: "-".into(),
                reason: format!(
                    "cannot merge folds of {} and {} tables for a projection of {}",
                    self.tables.len(),
                    other.tables.len(),
                    specs.len()
                ),
            });
        }
        for ((rows, theirs), spec) in self.tables.iter_mut().zip(other.tables).zip(specs) {
            rows.merge(spec, theirs).map_err(|reason| FoldError {
                table: spec.name.to_string(),
                reason,
            })?;
        }
        Ok(())
    }
}

impl TableRows {
    /// Fold `other`, this table's rows folded from other partitions, into these.
    pub fn merge(&mut self, spec: &TableSpec, other: TableRows) -> Result<(), String> {
        self.approx_bytes += other.approx_bytes;
        if !spec.gathers_partitions() {
            for (key, row) in other.rows {
                match self.rows.entry(key) {
                    Entry::Vacant(slot) => {
                        slot.insert(row);
                    }
                    Entry::Occupied(slot) => {
                        return Err(format!(
                            "row ({}) was written by events of partitions folded apart, but the table is declared per_aggregate: each of its rows must come from one aggregate, hence one partition (are the aggregate's events keyed by its id?)",
                            show(slot.key())
                        ))
                    }
                }
            }
            return Ok(());
        }
        let TableRows {
            rows: mut their_rows,
            clocks: their_clocks,
            ..
        } = other;
        for (key, their_clock) in their_clocks {
            let their_row = their_rows.remove(&key);
            let Some(my_clock) = self.clocks.get_mut(&key) else {
                if matches!(self.rows.get(&key), Some(Some(_))) {
                    return Err(unclocked(&key));
                }
                if let Some(row) = their_row {
                    self.rows.insert(key.clone(), row);
                }
                self.clocks.insert(key, their_clock);
                continue;
            };
            let my_row = self.rows.remove(&key);
            let sides = [
                Side {
                    clock: my_clock,
                    row: my_row.as_ref(),
                },
                Side {
                    clock: &their_clock,
                    row: their_row.as_ref(),
                },
            ];
            let mut joined = my_clock.clone();
            joined
                .merge(&their_clock, |c| column_name(spec, c))
                .map_err(|e| format!("row ({}): {e}", show(&key)))?;
            let row = joined_row(spec, &key, &joined, &sides)?;
            if row.is_some() || my_row.is_some() || their_row.is_some() {
                self.rows.insert(key.clone(), row);
            }
            *my_clock = joined;
        }
        // Keys without a clock: known to have no row (a fold seeded with what a table holds), or
        // a row seeded from a build made before clocks.
        for (key, row) in their_rows {
            match (self.rows.entry(key), row) {
                (Entry::Vacant(slot), row) => {
                    slot.insert(row);
                }
                (Entry::Occupied(_), None) => {}
                (Entry::Occupied(slot), Some(_)) => return Err(unclocked(slot.key())),
            }
        }
        Ok(())
    }
}

fn unclocked(key: &[Value]) -> String {
    format!(
        "row ({}) has no clock in one of the folds being merged, so which of its values is later cannot be told",
        show(key)
    )
}

/// One fold's view of a row: its clock and what it holds (None: no entry; Some(None): no row).
struct Side<'a> {
    clock: &'a RowClock,
    row: Option<&'a Option<Vec<Value>>>,
}

impl Side<'_> {
    fn live(&self) -> Option<&Vec<Value>> {
        self.row.and_then(Option::as_ref)
    }
}

/// The row two folds of `key` join into, under their joined clock.
fn joined_row(
    spec: &TableSpec,
    key: &Key,
    joined: &RowClock,
    sides: &[Side<'_>; 2],
) -> Result<Option<Vec<Value>>, String> {
    let exists = match joined.exists() {
        Some(exists) => exists,
        // The latest write and delete are one event, so one fold's: its row says which came last.
        None => sides
            .iter()
            .find(|side| side.clock.written_at() == joined.written_at())
            .is_some_and(|side| side.live().is_some()),
    };
    if !exists {
        return Ok(None);
    }
    let mut row = spec.default_row(key);
    for (column, at) in joined.set_columns() {
        let value = sides
            .iter()
            .find(|side| side.clock.set_at(column) == Some(at))
            .and_then(Side::live)
            .and_then(|r| r.get(column))
            .ok_or_else(|| {
                format!(
                    "row ({}): column {} was set at {at} by a fold that holds no row",
                    show(key),
                    column_name(spec, column)
                )
            })?;
        row[column] = value.clone();
    }
    for (column, how) in joined.accumulated_columns() {
        let default = spec
            .columns
            .get(column)
            .map_or(&Value::Null, |c| &c.default);
        let values: Vec<&Value> = sides
            .iter()
            .filter_map(Side::live)
            .filter_map(|r| r.get(column))
            .collect();
        let value = match values[..] {
            [a, b] => join_accumulated(how, a, b, default).map_err(|e| {
                format!(
                    "row ({}), column {} ({how}): {e}",
                    show(key),
                    column_name(spec, column)
                )
            })?,
            [one] => one.clone(),
            _ => default.clone(),
        };
        if let Some(slot) = row.get_mut(column) {
            *slot = value;
        }
    }
    Ok(Some(row))
}

/// Two partial accumulations of one column, each started from `default`.
fn join_accumulated(
    how: Accumulation,
    a: &Value,
    b: &Value,
    default: &Value,
) -> Result<Value, String> {
    Ok(match how {
        Accumulation::Add => a.plus(b)?.minus(default)?,
        // NULL is "no value" to a minimum or maximum.
        Accumulation::Min | Accumulation::Max if matches!(a, Value::Null) => b.clone(),
        Accumulation::Min | Accumulation::Max if matches!(b, Value::Null) => a.clone(),
        Accumulation::Min => a.min(b).clone(),
        Accumulation::Max => a.max(b).clone(),
        Accumulation::Unrecorded => {
            return Err(
                "how it accumulates was not recorded (a clock from before reproject recorded it); rebuild the projection"
                    .into(),
            )
        }
    })
}

fn column_name(spec: &TableSpec, column: usize) -> String {
    spec.columns
        .get(column)
        .map_or_else(|| format!("#{column}"), |c| c.name.to_string())
}

fn show(key: &[Value]) -> String {
    key.iter()
        .map(Value::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::projection::{Change, Column, ColumnType, LogicalTime};

    fn at(micros: i64, partition: i32, offset: i64) -> LogicalTime {
        LogicalTime {
            occurred_at_micros: micros,
            partition,
            offset,
        }
    }

    fn table(per_aggregate: bool) -> TableSpec {
        let mut starts_at_ten = Column::counter("points");
        starts_at_ten.default = Value::BigInt(10);
        TableSpec {
            name: "scores",
            columns: vec![
                Column::new("player", ColumnType::Text),
                starts_at_ten,
                Column::new("best", ColumnType::BigInt),
            ],
            key_len: 1,
            bucket_column: None,
            per_aggregate,
        }
    }

    fn fold(spec: &TableSpec, changes: &[(LogicalTime, Change)]) -> RowStore {
        let mut store = RowStore::new(1);
        for (at, change) in changes {
            store
                .apply(std::slice::from_ref(spec), change.clone(), *at)
                .expect("folds");
        }
        store
    }

    fn add(points: i64) -> Change {
        Change::Add {
            table: 0,
            key: crate::key![Value::text("ada")],
            column: 1,
            delta: Value::BigInt(points),
        }
    }

    fn best(value: i64) -> Change {
        Change::Max {
            table: 0,
            key: crate::key![Value::text("ada")],
            column: 2,
            value: Value::BigInt(value),
        }
    }

    #[test]
    fn sums_that_each_started_from_the_default_count_it_once() {
        let spec = table(false);
        let mut left = fold(&spec, &[(at(1, 0, 0), add(3)), (at(2, 0, 1), best(7))]);
        let right = fold(&spec, &[(at(1, 1, 0), add(4)), (at(3, 1, 1), best(5))]);
        left.merge(std::slice::from_ref(&spec), right)
            .expect("merges");
        let rows: Vec<_> = left.table(0).live_rows().cloned().collect();
        assert_eq!(
            rows,
            vec![vec![
                Value::text("ada"),
                Value::BigInt(17),
                Value::BigInt(7)
            ]]
        );
    }

    #[test]
    fn a_per_aggregate_row_found_in_two_folds_is_refused_by_name() {
        let spec = table(true);
        let mut left = fold(&spec, &[(at(1, 0, 0), add(3))]);
        let right = fold(&spec, &[(at(1, 1, 0), add(4))]);
        let error = left
            .merge(std::slice::from_ref(&spec), right)
            .expect_err("one aggregate's row from two partitions");
        let message = error.to_string();
        assert!(
            message.contains("scores")
                && message.contains("ada")
                && message.contains("per_aggregate"),
            "{message}"
        );
    }

    #[test]
    fn a_column_added_to_in_one_fold_and_maximised_in_the_other_is_refused() {
        let spec = table(false);
        let mut left = fold(&spec, &[(at(1, 0, 0), add(3))]);
        let right = fold(
            &spec,
            &[(
                at(1, 1, 0),
                Change::Max {
                    table: 0,
                    key: crate::key![Value::text("ada")],
                    column: 1,
                    value: Value::BigInt(9),
                },
            )],
        );
        let message = left
            .merge(std::slice::from_ref(&spec), right)
            .expect_err("add and max do not commute")
            .to_string();
        assert!(
            message.contains("points") && message.contains("two ways"),
            "{message}"
        );
    }

    #[test]
    fn a_clock_stored_before_kinds_were_recorded_takes_the_other_folds_kind_and_two_such_refuse() {
        let spec = table(false);
        let key = crate::key![Value::text("ada")];
        // A fold of `changes` as a build made before kinds were recorded holds it: the row, and
        // its clock in format 1 (no kind byte after each accumulated column).
        let stored_by_an_older_binary = |changes: &[(LogicalTime, Change)]| {
            let folded = fold(&spec, changes);
            let (_, clock) = folded.table(0).clocks().next().expect("a clock");
            let mut old = clock.encode();
            old[0] = 1;
            old.remove(old.len() - 2 - 1);
            let decoded = RowClock::decode(&old).expect("format 1 reads");
            assert_eq!(decoded.accumulation(1), Some(Accumulation::Unrecorded));
            let mut seeded = RowStore::new(1);
            let row = folded.table(0).get(&key).cloned().flatten();
            seeded.table_mut(0).seed(key.clone(), row);
            seeded.table_mut(0).seed_clock(key.clone(), decoded);
            seeded
        };
        let mut old = stored_by_an_older_binary(&[(at(1, 0, 0), add(3))]);
        old.merge(
            std::slice::from_ref(&spec),
            fold(&spec, &[(at(1, 1, 0), add(4))]),
        )
        .expect("the other fold says it is a sum");
        let rows: Vec<_> = old.table(0).live_rows().cloned().collect();
        assert_eq!(rows[0][1], Value::BigInt(17));

        let mut old = stored_by_an_older_binary(&[(at(1, 0, 0), add(3))]);
        let message = old
            .merge(
                std::slice::from_ref(&spec),
                stored_by_an_older_binary(&[(at(1, 1, 0), add(4))]),
            )
            .expect_err("neither says how it accumulates")
            .to_string();
        assert!(
            message.contains("points") && message.contains("rebuild"),
            "{message}"
        );
    }
}
