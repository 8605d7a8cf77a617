//! Row changes: what a projection emits for one event. They name a table by its index in the
//! projection's table list and a row by its key; the engine decides how they reach PostgreSQL.

use super::value::Value;

/// A row's primary key, in key-column order. Keys of one or two values (most keys) live inline: a
/// projection makes a key for nearly every change, and a heap allocation each, made by a reader and
/// freed by the fold, was a large part of the replay. Build one with [`key!`](crate::key).
pub type Key = smallvec::SmallVec<[Value; 2]>;

/// A row key from its values, in key-column order: `key![Value::text(order_id)]`.
#[macro_export]
macro_rules! key {
    ($($value:expr),* $(,)?) => {
        $crate::projection::Key::from_iter([$($value),*])
    };
}

#[derive(Clone, Debug, PartialEq)]
pub enum Change {
    /// Replace the whole row (key columns included, first).
    Upsert { table: usize, row: Vec<Value> },
    /// Set some columns; a missing row is first created from the table's defaults.
    Set {
        table: usize,
        key: Key,
        columns: Vec<(usize, Value)>,
    },
    /// Add to a bigint column; a missing row is first created from the table's defaults.
    Add {
        table: usize,
        key: Key,
        column: usize,
        delta: i64,
    },
    /// Keep the smaller (or larger) of the stored value and this one; NULL counts as absent.
    Min {
        table: usize,
        key: Key,
        column: usize,
        value: Value,
    },
    Max {
        table: usize,
        key: Key,
        column: usize,
        value: Value,
    },
    /// Remove the row.
    Delete { table: usize, key: Key },
}

impl Change {
    /// The key of the row this change touches; `key_len` is its table's (an upsert carries the key
    /// as the first columns of its row).
    pub fn key(&self, key_len: usize) -> &[Value] {
        match self {
            Change::Upsert { row, .. } => &row[..key_len.min(row.len())],
            Change::Set { key, .. }
            | Change::Add { key, .. }
            | Change::Min { key, .. }
            | Change::Max { key, .. }
            | Change::Delete { key, .. } => key,
        }
    }

    pub fn table(&self) -> usize {
        match self {
            Change::Upsert { table, .. }
            | Change::Set { table, .. }
            | Change::Add { table, .. }
            | Change::Min { table, .. }
            | Change::Max { table, .. }
            | Change::Delete { table, .. } => *table,
        }
    }
}

/// The buffer a projection writes its changes into. Kept between events so that it allocates once.
#[derive(Default, Debug)]
pub struct Changes {
    changes: Vec<Change>,
}

impl Changes {
    pub fn upsert(&mut self, table: usize, row: Vec<Value>) {
        self.changes.push(Change::Upsert { table, row });
    }

    pub fn set(&mut self, table: usize, key: impl Into<Key>, columns: Vec<(usize, Value)>) {
        self.changes.push(Change::Set {
            table,
            key: key.into(),
            columns,
        });
    }

    pub fn add(&mut self, table: usize, key: impl Into<Key>, column: usize, delta: i64) {
        self.changes.push(Change::Add {
            table,
            key: key.into(),
            column,
            delta,
        });
    }

    pub fn min(&mut self, table: usize, key: impl Into<Key>, column: usize, value: Value) {
        self.changes.push(Change::Min {
            table,
            key: key.into(),
            column,
            value,
        });
    }

    pub fn max(&mut self, table: usize, key: impl Into<Key>, column: usize, value: Value) {
        self.changes.push(Change::Max {
            table,
            key: key.into(),
            column,
            value,
        });
    }

    pub fn delete(&mut self, table: usize, key: impl Into<Key>) {
        self.changes.push(Change::Delete {
            table,
            key: key.into(),
        });
    }

    pub fn as_slice(&self) -> &[Change] {
        &self.changes
    }

    pub fn drain(&mut self) -> std::vec::Drain<'_, Change> {
        self.changes.drain(..)
    }

    pub fn len(&self) -> usize {
        self.changes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.changes.is_empty()
    }

    pub fn clear(&mut self) {
        self.changes.clear()
    }
}
