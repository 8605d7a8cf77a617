//! The shop's projections. Each file declares its tables (matching `schemas/<name>/v<N>/` in this folder) and the
//! changes each event makes.

mod customer_stats;
mod daily_sales;
mod order_summary;

pub use customer_stats::CustomerStats;
pub use daily_sales::DailySales;
pub use order_summary::OrderSummary;

use std::sync::Arc;

use super::ShopEvent;
use reproject::envelope::timestamp_micros;
use reproject::projection::{DynProjection, Value};

pub fn all() -> Vec<DynProjection<ShopEvent>> {
    vec![
        Arc::new(OrderSummary::new()),
        Arc::new(CustomerStats::new()),
        Arc::new(DailySales::new()),
    ]
}

/// A payload timestamp as a column value; an absent or out-of-range one is NULL.
fn time(ts: &Option<prost_types::Timestamp>) -> Value {
    ts.as_ref()
        .and_then(timestamp_micros)
        .map_or(Value::Null, Value::Timestamp)
}

/// The UTC day of a payload timestamp, falling back to the event's own time when the payload has none.
fn utc_day(ts: &Option<prost_types::Timestamp>, occurred_at_micros: i64) -> Value {
    let micros = ts
        .as_ref()
        .and_then(timestamp_micros)
        .unwrap_or(occurred_at_micros);
    Value::Date(micros.div_euclid(86_400_000_000) as i32)
}

/// The SQL of each projection version, compiled in from this folder's `schemas/`.
pub fn embedded_schema(projection: &str, version: u32) -> Option<reproject::projection::SchemaSql> {
    macro_rules! sql {
        ($name:literal, $v:literal) => {
            reproject::projection::SchemaSql {
                tables: include_str!(concat!("../schemas/", $name, "/v", $v, "/tables.sql"))
                    .to_string(),
                indexes: include_str!(concat!("../schemas/", $name, "/v", $v, "/indexes.sql"))
                    .to_string(),
            }
        };
    }
    Some(match (projection, version) {
        ("order_summary", 1) => sql!("order_summary", "1"),
        ("customer_stats", 1) => sql!("customer_stats", "1"),
        ("daily_sales", 1) => sql!("daily_sales", "1"),
        _ => return None,
    })
}
