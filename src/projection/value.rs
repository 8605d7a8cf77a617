//! The values a projection writes into a column, and the PostgreSQL types they map to.

use std::fmt;

use compact_str::CompactString;
pub use rust_decimal::Decimal;
pub use uuid::Uuid;

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
    /// `integer` (32 bits).
    Integer,
    /// `double precision`. Sets, minimums and maximums only: a floating-point sum depends on the
    /// order its terms arrive in, and partitions interleave differently from run to run.
    Double,
    /// `numeric`, exact: up to 28 significant digits (a [`Decimal`]), no float rounding anywhere.
    Numeric,
    /// `uuid`.
    Uuid,
    /// `jsonb`. Compared by meaning (PostgreSQL rewrites the text it stores), so never a key, a
    /// minimum or a maximum.
    Jsonb,
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
            ColumnType::Integer => "integer",
            ColumnType::Double => "double precision",
            ColumnType::Numeric => "numeric",
            ColumnType::Uuid => "uuid",
            ColumnType::Jsonb => "jsonb",
        }
    }

    /// Whether a key column may have this type. A key must compare the same in the fold and in
    /// PostgreSQL's unique index: jsonb's text is rewritten by the server, and a double's `-0` and
    /// `0` (or two NaNs) are one value to PostgreSQL but two bit patterns to the fold.
    pub fn can_be_key(self) -> bool {
        !matches!(self, ColumnType::Jsonb | ColumnType::Double)
    }

    /// Whether [`Change::Add`](super::Change::Add) may add to a column of this type.
    pub fn can_be_summed(self) -> bool {
        matches!(
            self,
            ColumnType::BigInt | ColumnType::Integer | ColumnType::Numeric
        )
    }
}

/// A `double precision` cell. Equal, ordered and hashed by its bits in IEEE 754's total order (as
/// [`f64::total_cmp`]), so that it can sit in a row that is compared, sorted and hashed.
#[derive(Clone, Copy, Debug)]
pub struct Double(pub f64);

impl Double {
    /// The bits as an integer that orders like `total_cmp`.
    fn ordered_bits(self) -> i64 {
        let bits = self.0.to_bits() as i64;
        bits ^ ((((bits >> 63) as u64) >> 1) as i64)
    }
}

impl PartialEq for Double {
    fn eq(&self, other: &Double) -> bool {
        self.0.to_bits() == other.0.to_bits()
    }
}

impl Eq for Double {}

impl PartialOrd for Double {
    fn partial_cmp(&self, other: &Double) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Double {
    fn cmp(&self, other: &Double) -> std::cmp::Ordering {
        self.0.total_cmp(&other.0)
    }
}

impl std::hash::Hash for Double {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.0.to_bits().hash(state);
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
    Integer(i32),
    Double(Double),
    /// Exact; `1.50` keeps its two decimals (and equals `1.5`, as in PostgreSQL).
    Numeric(Decimal),
    Uuid(Uuid),
    /// A JSON document's text. Build one with [`Value::json`].
    Json(CompactString),
}

impl Value {
    /// Heap bytes the value holds beyond its own size (texts past 24 bytes, byte strings), as a
    /// memory budget counts them.
    pub fn heap_bytes(&self) -> usize {
        match self {
            Value::Text(s) | Value::Json(s) if s.is_heap_allocated() => s.capacity(),
            Value::Bytes(b) => b.capacity(),
            _ => 0,
        }
    }

    pub fn text(s: impl Into<CompactString>) -> Value {
        Value::Text(s.into())
    }

    /// A jsonb cell holding `document`.
    pub fn json(document: &serde_json::Value) -> Value {
        Value::Json(document.to_string().into())
    }

    pub fn double(v: f64) -> Value {
        Value::Double(Double(v))
    }

    /// Whether `self` and `other` hold the same value as PostgreSQL sees it. The same as `==`
    /// except for jsonb, whose text the server rewrites (key order, spacing): two documents agree
    /// when they parse to the same JSON.
    pub fn agrees_with(&self, other: &Value) -> bool {
        match (self, other) {
            (Value::Json(a), Value::Json(b)) if a != b => {
                match (
                    serde_json::from_str::<serde_json::Value>(a),
                    serde_json::from_str::<serde_json::Value>(b),
                ) {
                    (Ok(a), Ok(b)) => a == b,
                    _ => false,
                }
            }
            _ => self == other,
        }
    }

    /// `self + delta`, for a counter column; NULL counts as zero. An error says why when the types
    /// do not add up (see [`ColumnType::can_be_summed`]) or the sum overflows.
    pub fn plus(&self, delta: &Value) -> Result<Value, String> {
        let overflow = || format!("overflows: {self} + {delta}");
        match (self, delta) {
            (_, Value::Null) => Ok(self.clone()),
            (Value::Null, Value::BigInt(_) | Value::Integer(_) | Value::Numeric(_)) => {
                Ok(delta.clone())
            }
            (Value::BigInt(a), Value::BigInt(b)) => {
                a.checked_add(*b).map(Value::BigInt).ok_or_else(overflow)
            }
            (Value::Integer(a), Value::Integer(b)) => {
                a.checked_add(*b).map(Value::Integer).ok_or_else(overflow)
            }
            (Value::Numeric(a), Value::Numeric(b)) => {
                a.checked_add(*b).map(Value::Numeric).ok_or_else(overflow)
            }
            _ => Err(format!("cannot add {delta} to {self}")),
        }
    }

    /// `self - delta`, the inverse of [`plus`](Self::plus) (NULL counts as zero): what joining two
    /// sums that each started from a column's default takes off one of them.
    pub fn minus(&self, delta: &Value) -> Result<Value, String> {
        let overflow = || format!("overflows: {self} - {delta}");
        match (self, delta) {
            (_, Value::Null) => Ok(self.clone()),
            (Value::BigInt(a), Value::BigInt(b)) => {
                a.checked_sub(*b).map(Value::BigInt).ok_or_else(overflow)
            }
            (Value::Integer(a), Value::Integer(b)) => {
                a.checked_sub(*b).map(Value::Integer).ok_or_else(overflow)
            }
            (Value::Numeric(a), Value::Numeric(b)) => {
                a.checked_sub(*b).map(Value::Numeric).ok_or_else(overflow)
            }
            (Value::Null, Value::BigInt(b)) => {
                b.checked_neg().map(Value::BigInt).ok_or_else(overflow)
            }
            (Value::Null, Value::Integer(b)) => {
                b.checked_neg().map(Value::Integer).ok_or_else(overflow)
            }
            (Value::Null, Value::Numeric(b)) => Ok(Value::Numeric(-*b)),
            _ => Err(format!("cannot subtract {delta} from {self}")),
        }
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
                | (Value::Integer(_), ColumnType::Integer)
                | (Value::Double(_), ColumnType::Double)
                | (Value::Numeric(_), ColumnType::Numeric)
                | (Value::Uuid(_), ColumnType::Uuid)
                | (Value::Json(_), ColumnType::Jsonb)
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
        let head = |bytes: &[u8]| {
            let mut head = [0u8; 8];
            let n = bytes.len().min(8);
            head[..n].copy_from_slice(&bytes[..n]);
            u64::from_be_bytes(head)
        };
        match self {
            Value::Null => (0, 0),
            Value::BigInt(v) => (1, signed(*v)),
            Value::Text(s) => (2, head(s.as_bytes())),
            Value::Timestamp(us) => (3, signed(*us)),
            Value::Date(d) => (4, signed(i64::from(*d))),
            Value::Bool(b) => (5, u64::from(*b)),
            Value::Bytes(b) => (6, head(b)),
            Value::Integer(v) => (7, signed(i64::from(*v))),
            Value::Double(v) => (8, signed(v.ordered_bits())),
            // The floor orders like the value (never against it) and equal values share it, whatever
            // their scale; i64::MIN/MAX stand for beyond.
            Value::Numeric(d) => (9, signed(decimal_floor(d))),
            Value::Uuid(u) => (10, head(u.as_bytes())),
            Value::Json(s) => (11, head(s.as_bytes())),
        }
    }

    pub fn as_i64(&self) -> Option<i64> {
        match self {
            Value::BigInt(v) => Some(*v),
            _ => None,
        }
    }
}

fn decimal_floor(d: &Decimal) -> i64 {
    let floor = d.floor();
    let scale = 10i128.pow(floor.scale());
    let whole = floor.mantissa() / scale;
    i64::try_from(whole).unwrap_or(if whole < 0 { i64::MIN } else { i64::MAX })
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
            Value::Integer(v) => write!(f, "{v}"),
            Value::Double(v) => write!(f, "{}", v.0),
            Value::Numeric(d) => write!(f, "{d}"),
            Value::Uuid(u) => write!(f, "{u}"),
            Value::Json(s) => f.write_str(s),
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
            any::<i32>().prop_map(Value::Integer),
            prop_oneof![
                any::<f64>(),
                Just(0.0),
                Just(-0.0),
                Just(f64::NAN),
                Just(-f64::NAN)
            ]
            .prop_map(Value::double),
            (any::<i64>(), 0u32..12).prop_map(|(m, scale)| Value::Numeric(Decimal::new(m, scale))),
            (-3i64..3, 0u32..3).prop_map(|(m, scale)| Value::Numeric(Decimal::new(m, scale))),
            any::<[u8; 16]>().prop_map(|b| Value::Uuid(Uuid::from_bytes(b))),
            "[{}\\[\\]a1:,\"]{0,12}".prop_map(|s| Value::Json(s.into())),
        ]
    }

    #[test]
    fn a_cell_stays_32_bytes_with_the_new_types() {
        // Texts and byte vectors (24 bytes) were already the largest payloads; decimals and uuids
        // (16) fit beside them, so rows, keys and changes keep their size.
        assert_eq!(std::mem::size_of::<Value>(), 32);
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
