//! The values a projection writes into a column, and the PostgreSQL types they map to.

use std::fmt;

use compact_str::CompactString;

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
    /// `bytea`.
    Bytea,
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
            ColumnType::Bytea => "bytea",
        }
    }
}

/// One cell of a projection row.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Value {
    Null,
    BigInt(i64),
    /// Short texts (up to 24 bytes: most ids, codes, statuses) live inline, without an allocation.
    Text(CompactString),
    /// Microseconds since the Unix epoch, UTC.
    Timestamp(i64),
    /// Days since the Unix epoch.
    Date(i32),
    Bool(bool),
    Bytes(Vec<u8>),
}

impl Value {
    pub fn text(s: impl Into<CompactString>) -> Value {
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
                | (Value::Bytes(_), ColumnType::Bytea)
        )
    }

    /// A summary of this value that orders like it: `a < b` implies `a.order_prefix() <=
    /// b.order_prefix()`, so sorting on the prefix first and comparing whole values only on ties gives
    /// the same order as comparing whole values. The prefix lives inline, where a text's bytes are
    /// behind a pointer: sorting a million keys on it avoids the cache misses that made the sort most
    /// of the bulk load.
    pub fn order_prefix(&self) -> (u8, u64) {
        // Ranks follow the variants' declaration order, which is how the derived `Ord` compares them.
        let signed = |v: i64| (v as u64) ^ (1 << 63);
        match self {
            Value::Null => (0, 0),
            Value::BigInt(v) => (1, signed(*v)),
            Value::Text(s) => {
                let mut head = [0u8; 8];
                let n = s.len().min(8);
                head[..n].copy_from_slice(&s.as_bytes()[..n]);
                (2, u64::from_be_bytes(head))
            }
            Value::Timestamp(us) => (3, signed(*us)),
            Value::Date(d) => (4, signed(i64::from(*d))),
            Value::Bool(b) => (5, u64::from(*b)),
            Value::Bytes(b) => {
                let mut head = [0u8; 8];
                let n = b.len().min(8);
                head[..n].copy_from_slice(&b[..n]);
                (6, u64::from_be_bytes(head))
            }
        }
    }

    pub fn as_i64(&self) -> Option<i64> {
        match self {
            Value::BigInt(v) => Some(*v),
            _ => None,
        }
    }
}

/// Sort `items` in the order `cmp` gives, comparing each item's `prefix` (a
/// [`Value::order_prefix`] of its leading key value) first and calling `cmp` only where prefixes
/// tie. `prefix` must never contradict `cmp`. The prefixes sit next to the items, so most comparisons
/// touch no text behind a pointer; sorting a million rows by a text key this way takes a small part
/// of the time a plain sort did (it was most of the bulk load).
pub fn sort_on_prefix<T>(
    items: impl Iterator<Item = T>,
    prefix: impl Fn(&T) -> (u8, u64),
    cmp: impl Fn(&T, &T) -> std::cmp::Ordering,
) -> Vec<T> {
    let mut keyed: Vec<((u8, u64), T)> = items.map(|item| (prefix(&item), item)).collect();
    keyed.sort_unstable_by(|(prefix_a, a), (prefix_b, b)| {
        prefix_a.cmp(prefix_b).then_with(|| cmp(a, b))
    });
    keyed.into_iter().map(|(_, item)| item).collect()
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
            Value::Bytes(b) => {
                f.write_str("\\x")?;
                b.iter().try_for_each(|byte| write!(f, "{byte:02x}"))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn any_value() -> impl Strategy<Value = Value> {
        prop_oneof![
            Just(Value::Null),
            any::<i64>().prop_map(Value::BigInt),
            // Short alphabets so that many texts share their first eight bytes, and NULs so that
            // zero padding meets real zeros.
            "[ab\\x00]{0,12}".prop_map(Value::text),
            "\\PC{0,10}".prop_map(Value::text),
            any::<i64>().prop_map(Value::Timestamp),
            any::<i32>().prop_map(Value::Date),
            any::<bool>().prop_map(Value::Bool),
            proptest::collection::vec(prop_oneof![Just(0u8), Just(1u8), any::<u8>()], 0..12)
                .prop_map(Value::Bytes),
        ]
    }

    proptest! {
        #[test]
        fn the_order_prefix_never_contradicts_the_order_of_values(a in any_value(), b in any_value()) {
            if a < b {
                prop_assert!(a.order_prefix() <= b.order_prefix(), "{a:?} < {b:?}");
            }
            if a == b {
                prop_assert_eq!(a.order_prefix(), b.order_prefix());
            }
        }
    }
}
