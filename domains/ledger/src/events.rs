//! The latest version of each ledger event: what projections are written against.

use crate::proto::v2;

#[derive(Clone, Debug, PartialEq)]
pub enum LedgerEvent {
    Opened(v2::AccountOpened),
    Posted(v2::TransferPosted),
    Closed(v2::AccountClosed),
}
