//! The shop: order events in three schema versions, the upcasters between them, three projections,
//! and a deterministic history generator with independently computed expected totals. It is the domain
//! of the stock `reproject` binary and uses only reproject's public API (`reproject::` paths), as a
//! team's own crate would.
//!
//! | version | years     | money                     | times                        | buyer         |
//! |---------|-----------|---------------------------|------------------------------|---------------|
//! | v1      | 2021-2022 | decimal string, EUR only  | local string + IANA zone     | `user_id`     |
//! | v2      | 2023-2024 | integer cents + currency  | local string + IANA zone     | `customer_id` |
//! | v3      | 2025-     | integer cents + currency  | UTC `Timestamp`              | `customer_id` |
//!
//! v3 also replaced the one-line shipping address with a nested `Address`.

pub mod events;
pub mod generator;
pub mod projections;
pub mod proto;
pub mod totals;
pub mod upcasters;

pub use events::ShopEvent;

use reproject::domain::{BoxFuture, Domain, Example, HistorySize, Totals};
use reproject::projection::{DynProjection, SchemaSql};
use reproject::upcast::{Registry, RegistryError};

/// The aggregate type every shop event carries in its envelope.
pub const AGGREGATE_TYPE: &str = "Order";

/// The topic the shop's events are written to unless configured otherwise.
pub const DEFAULT_TOPIC: &str = "shop.orders";

/// The registry of every shop message version and the steps between them.
pub fn registry() -> Result<Registry<ShopEvent>, RegistryError> {
    upcasters::register(Registry::builder()).build()
}

/// Every projection of the shop, at its current code version.
pub fn projections() -> Vec<DynProjection<ShopEvent>> {
    projections::all()
}

/// The shop as a [`Domain`]: what the stock binary runs.
#[derive(Clone, Copy, Debug, Default)]
pub struct Shop;

impl Domain for Shop {
    type Event = ShopEvent;

    fn name(&self) -> &str {
        "shop"
    }

    fn default_topics(&self) -> &[&str] {
        &[DEFAULT_TOPIC]
    }

    fn registry(&self) -> Result<Registry<ShopEvent>, RegistryError> {
        registry()
    }

    fn projections(&self) -> Vec<DynProjection<ShopEvent>> {
        projections()
    }

    fn schema(&self, projection: &str, version: u32) -> Option<SchemaSql> {
        projections::embedded_schema(projection, version)
    }

    fn descriptors(&self) -> &[u8] {
        proto::FILE_DESCRIPTOR_SET
    }

    fn example(&self) -> Option<&dyn Example> {
        Some(&ShopHistory)
    }
}

/// The shop's generator, for `seed`, `demo`, `bench` and `check-totals`.
struct ShopHistory;

impl Example for ShopHistory {
    fn shape_keys(&self) -> &[(&'static str, &'static str)] {
        &[
            (
                "orders",
                "orders the history is spread over [default: a tenth of the events]",
            ),
            ("customers", "customers placing them [default: orders / 5]"),
        ]
    }

    fn history(&self, size: &HistorySize) -> Box<dyn reproject::domain::History> {
        let orders = size
            .shape
            .get("orders")
            .copied()
            .unwrap_or((size.events / 10).max(1));
        let customers = size
            .shape
            .get("customers")
            .copied()
            .unwrap_or((orders / 5).max(5));
        Box::new(generator::History::new(generator::HistoryConfig::new(
            size.events,
            orders,
            customers,
            size.seed,
        )))
    }

    fn actual_totals<'a>(
        &'a self,
        pool: &'a sqlx::PgPool,
        view_schema: &'a str,
    ) -> BoxFuture<'a, anyhow::Result<Totals>> {
        Box::pin(async move {
            let totals = totals::actual_totals(pool, view_schema).await?;
            Ok(totals::figures(&totals))
        })
    }
}
