//! `order_summary`: one row per order with its customer, status, items, totals and milestones.

use super::{time, ShopEvent};
use reproject::key;
use reproject::projection::{Changes, Column, ColumnType, Event, Projection, TableSpec, Value};

// Column 0 is order_id, the key.
const CUSTOMER_ID: usize = 1;
const STATUS: usize = 2;
const ITEM_COUNT: usize = 3;
const TOTAL_CENTS: usize = 4;
const CURRENCY: usize = 5;
const PAID_CENTS: usize = 6;
const REFUNDED_CENTS: usize = 7;
const PLACED_AT: usize = 8;
const PAID_AT: usize = 9;
const SHIPPED_AT: usize = 10;
const CANCELLED_AT: usize = 11;
const SHIP_CITY: usize = 12;
const SHIP_COUNTRY: usize = 13;
const LAST_SEQUENCE: usize = 14;
const UPDATED_AT: usize = 15;

const TABLE: usize = 0;

pub struct OrderSummary {
    tables: Vec<TableSpec>,
}

impl OrderSummary {
    pub fn new() -> OrderSummary {
        let columns = vec![
            Column::new("order_id", ColumnType::Text),
            Column::new("customer_id", ColumnType::Text),
            Column::new("status", ColumnType::Text),
            Column::counter("item_count"),
            Column::counter("total_cents"),
            Column::new("currency", ColumnType::Text),
            Column::counter("paid_cents"),
            Column::counter("refunded_cents"),
            Column::new("placed_at", ColumnType::Timestamp),
            Column::new("paid_at", ColumnType::Timestamp),
            Column::new("shipped_at", ColumnType::Timestamp),
            Column::new("cancelled_at", ColumnType::Timestamp),
            Column::new("ship_city", ColumnType::Text),
            Column::new("ship_country", ColumnType::Text),
            Column::new("last_sequence", ColumnType::BigInt),
            Column::new("updated_at", ColumnType::Timestamp),
        ];
        debug_assert_eq!(columns[UPDATED_AT].name, "updated_at");
        OrderSummary {
            tables: vec![TableSpec {
                name: "order_summary",
                columns,
                key_len: 1,
                bucket_column: Some("placed_at"),
                per_aggregate: true,
            }],
        }
    }
}

impl Default for OrderSummary {
    fn default() -> Self {
        Self::new()
    }
}

impl Projection<ShopEvent> for OrderSummary {
    fn name(&self) -> &'static str {
        "order_summary"
    }

    fn version(&self) -> u32 {
        1
    }

    fn tables(&self) -> &[TableSpec] {
        &self.tables
    }

    fn apply(&self, event: &Event<'_, ShopEvent>, out: &mut Changes) {
        let key = || key![Value::text(event.payload.order_id())];
        let mut columns = vec![
            (LAST_SEQUENCE, Value::BigInt(event.meta.sequence as i64)),
            (UPDATED_AT, Value::Timestamp(event.meta.occurred_at_micros)),
        ];
        match event.payload {
            ShopEvent::Placed(e) => {
                columns.extend([
                    (CUSTOMER_ID, Value::text(&e.customer_id)),
                    (STATUS, Value::text("placed")),
                    (CURRENCY, Value::text(&e.currency)),
                    (PLACED_AT, time(&e.placed_at)),
                ]);
                if let Some(a) = &e.ship_to {
                    columns.push((SHIP_CITY, Value::text(&a.city)));
                    columns.push((SHIP_COUNTRY, Value::text(&a.country)));
                }
            }
            ShopEvent::ItemAdded(e) => {
                out.add(TABLE, key(), ITEM_COUNT, i64::from(e.quantity));
                out.add(
                    TABLE,
                    key(),
                    TOTAL_CENTS,
                    i64::from(e.quantity) * e.unit_price_cents,
                );
            }
            ShopEvent::ItemRemoved(e) => {
                out.add(TABLE, key(), ITEM_COUNT, -i64::from(e.quantity));
                out.add(
                    TABLE,
                    key(),
                    TOTAL_CENTS,
                    -i64::from(e.quantity) * e.unit_price_cents,
                );
            }
            ShopEvent::Paid(e) => {
                columns.extend([(STATUS, Value::text("paid")), (PAID_AT, time(&e.paid_at))]);
                out.add(TABLE, key(), PAID_CENTS, e.amount_cents);
            }
            ShopEvent::Shipped(e) => {
                columns.extend([
                    (STATUS, Value::text("shipped")),
                    (SHIPPED_AT, time(&e.shipped_at)),
                ]);
            }
            ShopEvent::Cancelled(e) => {
                columns.extend([
                    (STATUS, Value::text("cancelled")),
                    (CANCELLED_AT, time(&e.cancelled_at)),
                ]);
            }
            ShopEvent::Refunded(e) => {
                columns.push((STATUS, Value::text("refunded")));
                out.add(TABLE, key(), REFUNDED_CENTS, e.amount_cents);
            }
        }
        out.set(TABLE, key(), columns);
    }
}
