//! Example domains. `shop` is an online shop's orders, with a history whose schemas really evolved
//! (see `proto/shop/`).

pub mod shop;
