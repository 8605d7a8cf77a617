//! The shop: order events in three schema versions, the upcasters between them, three projections,
//! and a deterministic history generator with independently computed expected totals.
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
pub mod totals;
pub mod upcasters;

pub use events::ShopEvent;

use crate::projection::DynProjection;
use crate::upcast::{Registry, RegistryError};

/// The aggregate type every shop event carries in its envelope.
pub const AGGREGATE_TYPE: &str = "Order";

/// The registry of every shop message version and the steps between them.
pub fn registry() -> Result<Registry<ShopEvent>, RegistryError> {
    upcasters::register(Registry::builder()).build()
}

/// Every projection of the shop, at its current code version.
pub fn projections() -> Vec<DynProjection<ShopEvent>> {
    projections::all()
}
