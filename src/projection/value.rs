//! The values a projection writes into a column, and the PostgreSQL types they map to.

use std::fmt;

/// Microseconds between 1970-01-01 and 2000-01-01, PostgreSQL's epoch for timestamps.
pub const PG_EPOCH_OFFSET_MICROS: i64 = 946_684_800_000_000;
/// Days between 1970-01-01 and 2000-01-01, PostgreSQL's epoch for dates.
pub const PG_EPOCH_OFFSET_DAYS: i32 = 10_957;

/// The column types a projection table may use. Each maps to exactly one PostgreSQL type, so that
/// rows can be bulk-loaded with binary COPY without asking the server for type information.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ColumnType {
    BigInt,
    Text,
    /// `timestamptz`, held as microseconds since the Unix epoch.
    Timestamp,
    /// `date`, held as days since the Unix epoch.
    Date,
    Bool,
}

impl ColumnType {
    /// The name PostgreSQL reports for this type in `information_schema.columns.data_type`.
    pub fn pg_name(self) -> &'static str {
        match self {
            ColumnType::BigInt => "bigint",
            ColumnType::Text => "text",
            ColumnType::Timestamp => "timestamp with time zone",
            ColumnType::Date => "date",
            ColumnType::Bool => "boolean",
        }
    }
}

/// One cell of a projection row.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Value {
    Null,
    BigInt(i64),
    Text(String),
    /// Microseconds since the Unix epoch, UTC.
    Timestamp(i64),
    /// Days since the Unix epoch.
    Date(i32),
    Bool(bool),
}

impl Value {
    pub fn text(s: impl Into<String>) -> Value {
        Value::Text(s.into())
    }

    /// Whether this value may be stored in a column of type `ty`.
    pub fn fits(&self, ty: ColumnType) -> bool {
        matches!(
            (self, ty),
            (Value::Null, _)
                | (Value::BigInt(_), ColumnType::BigInt)
                | (Value::Text(_), ColumnType::Text)
                | (Value::Timestamp(_), ColumnType::Timestamp)
                | (Value::Date(_), ColumnType::Date)
                | (Value::Bool(_), ColumnType::Bool)
        )
    }

    pub fn as_i64(&self) -> Option<i64> {
        match self {
            Value::BigInt(v) => Some(*v),
            _ => None,
        }
    }
}

impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::Null => f.write_str("NULL"),
            Value::BigInt(v) => write!(f, "{v}"),
            Value::Text(s) => write!(f, "{s:?}"),
            Value::Timestamp(us) => match chrono::DateTime::from_timestamp_micros(*us) {
                Some(t) => write!(f, "{}", t.format("%Y-%m-%dT%H:%M:%S%.6fZ")),
                None => write!(f, "timestamp({us}us)"),
            },
            Value::Date(d) => match chrono::NaiveDate::from_ymd_opt(1970, 1, 1)
                .and_then(|e| e.checked_add_signed(chrono::Duration::days(i64::from(*d))))
            {
                Some(day) => write!(f, "{day}"),
                None => write!(f, "date({d})"),
            },
            Value::Bool(b) => write!(f, "{b}"),
        }
    }
}
