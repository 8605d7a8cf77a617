//! `customer_stats`: per customer, how many orders, what they are worth, first and last order, and
//! the currency of their latest order. A customer's orders live on many partitions: the sums,
//! minimums and maximums commute, and the currency, a set, resolves by logical time (the latest
//! order placed wins, whichever partition is read first).

use super::{time, ShopEvent};
use reproject::key;
use reproject::projection::{Changes, Column, ColumnType, Event, Projection, TableSpec, Value};

const CURRENCY: usize = 1;
const ORDERS: usize = 2;
const LIFETIME_VALUE_CENTS: usize = 3;
const REFUNDED_CENTS: usize = 4;
const FIRST_ORDER_AT: usize = 5;
const LAST_ORDER_AT: usize = 6;

const TABLE: usize = 0;

pub struct CustomerStats {
    tables: Vec<TableSpec>,
}

impl CustomerStats {
    pub fn new() -> CustomerStats {
        let columns = vec![
            Column::new("customer_id", ColumnType::Text),
            Column::new("currency", ColumnType::Text),
            Column::counter("orders"),
            Column::counter("lifetime_value_cents"),
            Column::counter("refunded_cents"),
            Column::new("first_order_at", ColumnType::Timestamp),
            Column::new("last_order_at", ColumnType::Timestamp),
        ];
        CustomerStats {
            tables: vec![TableSpec {
                name: "customer_stats",
                columns,
                key_len: 1,
                bucket_column: Some("first_order_at"),
                per_aggregate: false,
            }],
        }
    }
}

impl Default for CustomerStats {
    fn default() -> Self {
        Self::new()
    }
}

impl Projection<ShopEvent> for CustomerStats {
    fn name(&self) -> &'static str {
        "customer_stats"
    }

    fn version(&self) -> u32 {
        1
    }

    fn tables(&self) -> &[TableSpec] {
        &self.tables
    }

    fn apply(&self, event: &Event<'_, ShopEvent>, out: &mut Changes) {
        match event.payload {
            ShopEvent::Placed(e) => {
                let key = || key![Value::text(&e.customer_id)];
                out.add(TABLE, key(), ORDERS, 1);
                out.min(TABLE, key(), FIRST_ORDER_AT, time(&e.placed_at));
                out.max(TABLE, key(), LAST_ORDER_AT, time(&e.placed_at));
                out.set(TABLE, key(), vec![(CURRENCY, Value::text(&e.currency))]);
            }
            ShopEvent::Paid(e) => {
                out.add(
                    TABLE,
                    key![Value::text(&e.customer_id)],
                    LIFETIME_VALUE_CENTS,
                    e.amount_cents,
                );
            }
            ShopEvent::Refunded(e) => {
                let key = || key![Value::text(&e.customer_id)];
                out.add(TABLE, key(), LIFETIME_VALUE_CENTS, -e.amount_cents);
                out.add(TABLE, key(), REFUNDED_CENTS, e.amount_cents);
            }
            ShopEvent::ItemAdded(_)
            | ShopEvent::ItemRemoved(_)
            | ShopEvent::Shipped(_)
            | ShopEvent::Cancelled(_) => {}
        }
    }
}
