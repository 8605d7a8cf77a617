//! `daily_sales`: per UTC day and currency, orders placed and paid, revenue and refunds. Its keys
//! gather events from every partition; each change is a sum, so partition order does not matter.

use super::{utc_day, ShopEvent};
use reproject::key;
use reproject::projection::{Changes, Column, ColumnType, Event, Projection, TableSpec, Value};

const ORDERS_PLACED: usize = 2;
const ORDERS_PAID: usize = 3;
const REVENUE_CENTS: usize = 4;
const REFUNDED_CENTS: usize = 5;

const TABLE: usize = 0;

pub struct DailySales {
    tables: Vec<TableSpec>,
}

impl DailySales {
    pub fn new() -> DailySales {
        let columns = vec![
            Column::new("day", ColumnType::Date),
            Column::new("currency", ColumnType::Text),
            Column::counter("orders_placed"),
            Column::counter("orders_paid"),
            Column::counter("revenue_cents"),
            Column::counter("refunded_cents"),
        ];
        DailySales {
            tables: vec![TableSpec {
                name: "daily_sales",
                columns,
                key_len: 2,
                bucket_column: Some("day"),
                per_aggregate: false,
            }],
        }
    }
}

impl Default for DailySales {
    fn default() -> Self {
        Self::new()
    }
}

impl Projection<ShopEvent> for DailySales {
    fn name(&self) -> &'static str {
        "daily_sales"
    }

    fn version(&self) -> u32 {
        1
    }

    fn tables(&self) -> &[TableSpec] {
        &self.tables
    }

    fn apply(&self, event: &Event<'_, ShopEvent>, out: &mut Changes) {
        let at = event.meta.occurred_at_micros;
        match event.payload {
            ShopEvent::Placed(e) => {
                out.add(
                    TABLE,
                    key![utc_day(&e.placed_at, at), Value::text(&e.currency)],
                    ORDERS_PLACED,
                    1,
                );
            }
            ShopEvent::Paid(e) => {
                let key = || key![utc_day(&e.paid_at, at), Value::text(&e.currency)];
                out.add(TABLE, key(), ORDERS_PAID, 1);
                out.add(TABLE, key(), REVENUE_CENTS, e.amount_cents);
            }
            ShopEvent::Refunded(e) => {
                out.add(
                    TABLE,
                    key![utc_day(&e.refunded_at, at), Value::text(&e.currency)],
                    REFUNDED_CENTS,
                    e.amount_cents,
                );
            }
            ShopEvent::ItemAdded(_)
            | ShopEvent::ItemRemoved(_)
            | ShopEvent::Shipped(_)
            | ShopEvent::Cancelled(_) => {}
        }
    }
}
