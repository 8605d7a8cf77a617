//! The ledger's projections, and the SQL of each version (in `schemas/<name>/v<N>/`).
//!
//! - `account_balances`: per account, its owner, currency, status and limit (sets, from the account's
//!   own events) and its balance and number of transfers (sums over every transfer that touched it:
//!   its rows gather many aggregates, from every partition).
//! - `daily_volume`: per UTC day and currency, the transfers posted, their volume and the largest.
//! - `transfers`: one row per transfer, as posted (per aggregate).

use std::sync::Arc;

use crate::events::LedgerEvent;
use reproject::key;
use reproject::projection::{
    Changes, Column, ColumnType, DynProjection, Event, Projection, SchemaSql, TableSpec, Value,
};

const TABLE: usize = 0;
const MICROS_PER_DAY: i64 = 86_400_000_000;

/// Every projection at its current version, with `daily_volume` at `daily_volume_version`.
pub fn all(daily_volume_version: u32) -> Vec<DynProjection<LedgerEvent>> {
    vec![
        Arc::new(AccountBalances::new()),
        Arc::new(DailyVolume::at(daily_volume_version)),
        Arc::new(Transfers::new()),
    ]
}

/// The SQL of each projection version, compiled in from `schemas/`.
pub fn schema(projection: &str, version: u32) -> Option<SchemaSql> {
    macro_rules! sql {
        ($name:literal, $v:literal) => {
            SchemaSql {
                tables: include_str!(concat!("../schemas/", $name, "/v", $v, "/tables.sql")).into(),
                indexes: include_str!(concat!("../schemas/", $name, "/v", $v, "/indexes.sql"))
                    .into(),
            }
        };
    }
    Some(match (projection, version) {
        ("account_balances", 1) => sql!("account_balances", "1"),
        ("daily_volume", 1) => sql!("daily_volume", "1"),
        ("daily_volume", 2) => sql!("daily_volume", "2"),
        ("transfers", 1) => sql!("transfers", "1"),
        _ => return None,
    })
}

pub struct AccountBalances {
    tables: Vec<TableSpec>,
}

impl AccountBalances {
    const OWNER: usize = 1;
    const CURRENCY: usize = 2;
    const STATUS: usize = 3;
    const OVERDRAFT_LIMIT_MICROS: usize = 4;
    const BALANCE_MICROS: usize = 5;
    const TRANSFERS: usize = 6;

    pub fn new() -> AccountBalances {
        AccountBalances {
            tables: vec![TableSpec {
                name: "account_balances",
                columns: vec![
                    Column::new("account_id", ColumnType::Text),
                    Column::new("owner", ColumnType::Text),
                    Column::new("currency", ColumnType::Text),
                    Column::new("status", ColumnType::Text),
                    Column::new("overdraft_limit_micros", ColumnType::BigInt),
                    Column::counter("balance_micros"),
                    Column::counter("transfers"),
                ],
                key_len: 1,
                bucket_column: None,
                per_aggregate: false,
            }],
        }
    }
}

impl Default for AccountBalances {
    fn default() -> Self {
        Self::new()
    }
}

impl Projection<LedgerEvent> for AccountBalances {
    fn name(&self) -> &'static str {
        "account_balances"
    }

    fn version(&self) -> u32 {
        1
    }

    fn tables(&self) -> &[TableSpec] {
        &self.tables
    }

    fn apply(&self, event: &Event<'_, LedgerEvent>, out: &mut Changes) {
        match event.payload {
            LedgerEvent::Opened(e) => out.set(
                TABLE,
                key![Value::text(&e.account_id)],
                vec![
                    (Self::OWNER, Value::text(&e.owner)),
                    (Self::CURRENCY, Value::text(&e.currency)),
                    (Self::STATUS, Value::text("open")),
                    (
                        Self::OVERDRAFT_LIMIT_MICROS,
                        Value::BigInt(e.overdraft_limit_micros),
                    ),
                ],
            ),
            LedgerEvent::Closed(e) => out.set(
                TABLE,
                key![Value::text(&e.account_id)],
                vec![(Self::STATUS, Value::text("closed"))],
            ),
            LedgerEvent::Posted(e) => {
                let debit = || key![Value::text(&e.debit_account)];
                let credit = || key![Value::text(&e.credit_account)];
                out.add(TABLE, debit(), Self::BALANCE_MICROS, -e.amount_micros);
                out.add(TABLE, debit(), Self::TRANSFERS, 1);
                out.add(TABLE, credit(), Self::BALANCE_MICROS, e.amount_micros);
                out.add(TABLE, credit(), Self::TRANSFERS, 1);
            }
        }
    }
}

/// Per UTC day and currency. v1 added every amount into `largest_micros` (a copy of the volume line
/// where a maximum was meant); v2 keeps the largest.
pub struct DailyVolume {
    version: u32,
    tables: Vec<TableSpec>,
}

impl DailyVolume {
    /// The version with the largest-transfer fix.
    pub const CURRENT: u32 = 2;
    const TRANSFERS: usize = 2;
    const VOLUME_MICROS: usize = 3;
    const LARGEST_MICROS: usize = 4;

    pub fn at(version: u32) -> DailyVolume {
        DailyVolume {
            version,
            tables: vec![TableSpec {
                name: "daily_volume",
                columns: vec![
                    Column::new("day", ColumnType::Date),
                    Column::new("currency", ColumnType::Text),
                    Column::counter("transfers"),
                    Column::counter("volume_micros"),
                    if version == 1 {
                        Column::counter("largest_micros")
                    } else {
                        Column::new("largest_micros", ColumnType::BigInt)
                    },
                ],
                key_len: 2,
                bucket_column: Some("day"),
                per_aggregate: false,
            }],
        }
    }
}

impl Projection<LedgerEvent> for DailyVolume {
    fn name(&self) -> &'static str {
        "daily_volume"
    }

    fn version(&self) -> u32 {
        self.version
    }

    fn tables(&self) -> &[TableSpec] {
        &self.tables
    }

    fn apply(&self, event: &Event<'_, LedgerEvent>, out: &mut Changes) {
        let LedgerEvent::Posted(e) = event.payload else {
            return;
        };
        let day = (event.meta.occurred_at_micros.div_euclid(MICROS_PER_DAY)) as i32;
        let key = || key![Value::Date(day), Value::text(&e.currency)];
        out.add(TABLE, key(), Self::TRANSFERS, 1);
        out.add(TABLE, key(), Self::VOLUME_MICROS, e.amount_micros);
        if self.version == 1 {
            out.add(TABLE, key(), Self::LARGEST_MICROS, e.amount_micros);
        } else {
            out.max(
                TABLE,
                key(),
                Self::LARGEST_MICROS,
                Value::BigInt(e.amount_micros),
            );
        }
    }
}

pub struct Transfers {
    tables: Vec<TableSpec>,
}

impl Transfers {
    pub fn new() -> Transfers {
        Transfers {
            tables: vec![TableSpec {
                name: "transfers",
                columns: vec![
                    Column::new("transfer_id", ColumnType::Text),
                    Column::new("debit_account", ColumnType::Text),
                    Column::new("credit_account", ColumnType::Text),
                    Column::new("amount_micros", ColumnType::BigInt),
                    Column::new("currency", ColumnType::Text),
                    Column::new("posted_at", ColumnType::Timestamp),
                ],
                key_len: 1,
                bucket_column: Some("posted_at"),
                per_aggregate: true,
            }],
        }
    }
}

impl Default for Transfers {
    fn default() -> Self {
        Self::new()
    }
}

impl Projection<LedgerEvent> for Transfers {
    fn name(&self) -> &'static str {
        "transfers"
    }

    fn version(&self) -> u32 {
        1
    }

    fn tables(&self) -> &[TableSpec] {
        &self.tables
    }

    fn apply(&self, event: &Event<'_, LedgerEvent>, out: &mut Changes) {
        if let LedgerEvent::Posted(e) = event.payload {
            out.upsert(
                TABLE,
                vec![
                    Value::text(&e.transfer_id),
                    Value::text(&e.debit_account),
                    Value::text(&e.credit_account),
                    Value::BigInt(e.amount_micros),
                    Value::text(&e.currency),
                    Value::Timestamp(event.meta.occurred_at_micros),
                ],
            );
        }
    }
}
