//! The latest version of each shop event: what projections are written against.

use super::proto::v3;

#[derive(Clone, Debug, PartialEq)]
pub enum ShopEvent {
    Placed(v3::OrderPlaced),
    ItemAdded(v3::ItemAdded),
    ItemRemoved(v3::ItemRemoved),
    Paid(v3::OrderPaid),
    Shipped(v3::OrderShipped),
    Cancelled(v3::OrderCancelled),
    Refunded(v3::OrderRefunded),
}

impl ShopEvent {
    pub fn order_id(&self) -> &str {
        match self {
            ShopEvent::Placed(e) => &e.order_id,
            ShopEvent::ItemAdded(e) => &e.order_id,
            ShopEvent::ItemRemoved(e) => &e.order_id,
            ShopEvent::Paid(e) => &e.order_id,
            ShopEvent::Shipped(e) => &e.order_id,
            ShopEvent::Cancelled(e) => &e.order_id,
            ShopEvent::Refunded(e) => &e.order_id,
        }
    }
}
