//! What a projection declares about each table it writes: columns, their types, the key, and the
//! defaults a row starts from when a change touches a key that has no row yet.

use super::value::{ColumnType, Value};

#[derive(Clone, Debug)]
pub struct Column {
    pub name: &'static str,
    pub ty: ColumnType,
    /// The value a freshly created row holds before any change sets this column. Counters start at 0.
    pub default: Value,
}

impl Column {
    pub fn new(name: &'static str, ty: ColumnType) -> Column {
        Column {
            name,
            ty,
            default: Value::Null,
        }
    }

    pub fn counter(name: &'static str) -> Column {
        Column {
            name,
            ty: ColumnType::BigInt,
            default: Value::BigInt(0),
        }
    }
}

/// A table of a projection. The first `key_len` columns form the primary key, so a row's key is always
/// a prefix of the row: this keeps the fold and the COPY encoder free of column lookups.
#[derive(Clone, Debug)]
pub struct TableSpec {
    pub name: &'static str,
    pub columns: Vec<Column>,
    pub key_len: usize,
    /// A time column that buckets rows for verification (by day or month), if the table has one.
    pub bucket_column: Option<&'static str>,
    /// Every row is made from one aggregate's events alone (one row per order, say), so `replay` can
    /// compare the row it computes with the live one, and its changes come from one partition and
    /// apply in offset order. False for rows that gather many aggregates (per customer, per day):
    /// replay then shows the aggregate's contribution, without a verdict, and sets, upserts and
    /// deletes resolve by logical time (see `projection::clock`).
    pub per_aggregate: bool,
}

impl TableSpec {
    /// Whether a row may gather events of several partitions: then its sets, upserts and deletes
    /// resolve by logical time and it keeps a clock (see `projection::clock`). Rows of a
    /// per-aggregate table come from one partition and keep offset order.
    pub fn gathers_partitions(&self) -> bool {
        !self.per_aggregate
    }

    /// What is wrong with this declaration, if anything, checked before a projection runs: a key
    /// must exist within the columns and have types that compare exactly (see
    /// [`ColumnType::can_be_key`]).
    pub fn check(&self) -> Result<(), String> {
        if self.key_len == 0 || self.key_len > self.columns.len() {
            return Err(format!(
                "table {}: its key has {} columns of {}",
                self.name,
                self.key_len,
                self.columns.len()
            ));
        }
        for column in self.key_columns() {
            if !column.ty.can_be_key() {
                return Err(format!(
                    "table {}: key column {} is {}, which cannot be a key (PostgreSQL and the fold would disagree on which values are equal)",
                    self.name,
                    column.name,
                    column.ty.pg_name()
                ));
            }
        }
        for column in &self.columns {
            if !column.default.fits(column.ty) {
                return Err(format!(
                    "table {}: column {} is {} but its default is {:?}",
                    self.name,
                    column.name,
                    column.ty.pg_name(),
                    column.default
                ));
            }
        }
        Ok(())
    }

    pub fn column_index(&self, name: &str) -> Option<usize> {
        self.columns.iter().position(|c| c.name == name)
    }

    pub fn key_columns(&self) -> &[Column] {
        &self.columns[..self.key_len]
    }

    /// The row a key starts from: the key itself followed by each column's default.
    pub fn default_row(&self, key: &[super::value::Value]) -> Vec<Value> {
        let mut row = Vec::with_capacity(self.columns.len());
        row.extend_from_slice(key);
        row.extend(
            self.columns[self.key_len..]
                .iter()
                .map(|c| c.default.clone()),
        );
        row
    }
}
