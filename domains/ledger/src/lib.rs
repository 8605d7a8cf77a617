//! A bank ledger, as a team would bring it to reproject: its own Protobuf events in two versions,
//! the upcasters between them, three projections with their SQL, and a history generator whose
//! totals are computed without the upcasters or the projections. It depends on reproject exactly as
//! any team's crate would, and uses nothing but its public API.
//!
//! | version | years | amounts | account holder | transfer's accounts |
//! |---------|-------|---------|----------------|---------------------|
//! | v1      | 2022-2023 | integer cents  | `holder` | `from_account` -> `to_account` |
//! | v2      | 2024-     | integer micros | `owner`  | `debit_account` -> `credit_account` |

pub mod events;
pub mod generator;
pub mod projections;
pub mod totals;
pub mod upcasters;

/// The types prost-build generated from `proto/`.
pub mod proto {
    #![allow(clippy::all, missing_docs)]
    pub mod v1 {
        include!(concat!(env!("OUT_DIR"), "/ledger.v1.rs"));
    }
    pub mod v2 {
        include!(concat!(env!("OUT_DIR"), "/ledger.v2.rs"));
    }
    /// The encoded descriptor set of every ledger message, for `replay`'s JSON.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/ledger_descriptors.bin"));
}

pub use events::LedgerEvent;

use reproject::domain::{BoxFuture, Domain, Example, HistorySize, Totals};
use reproject::envelope::framing::{CloudEvents, Place};
use reproject::envelope::Framing;
use reproject::projection::{DynProjection, SchemaSql};
use reproject::upcast::{Registry, RegistryError};

/// The ledger keeps one topic per aggregate type, as many teams do: accounts (opened, closed) and
/// transfers. `account_balances` joins them: an account's row gets its owner and currency from the
/// first topic and its balance from the second.
pub const TOPICS: [&str; 2] = ["ledger.accounts", "ledger.transfers"];
/// The CloudEvents extension header holding an event's schema version (`1`, `2`).
pub const SCHEMA_VERSION_HEADER: &str = "ce_schemaversion";
/// Index of the accounts' topic in [`TOPICS`] (what an example record names).
pub const ACCOUNTS_TOPIC: usize = 0;
/// Index of the transfers' topic in [`TOPICS`].
pub const TRANSFERS_TOPIC: usize = 1;

/// The ledger. `Ledger::default()` is the current code; [`Ledger::before_daily_volume_fix`] is the
/// release before `daily_volume` v2.
#[derive(Clone, Copy, Debug)]
pub struct Ledger {
    daily_volume_version: u32,
}

impl Default for Ledger {
    fn default() -> Self {
        Ledger {
            daily_volume_version: projections::DailyVolume::CURRENT,
        }
    }
}

impl Ledger {
    /// The ledger whose `daily_volume` v1 summed transfers into `largest_micros` instead of keeping
    /// the largest: what a team runs before fixing a projection bug.
    pub fn before_daily_volume_fix() -> Ledger {
        Ledger {
            daily_volume_version: 1,
        }
    }
}

/// reproject's command line for a ledger, as both of this crate's binaries run it. A team's binary
/// calls `reproject::cli::main` itself; here it sits in the library because the command line is
/// compiled for the domain in the crate that calls it, and two binaries calling it compiled it twice
/// (100 s each of CI's build).
pub fn command_line(ledger: Ledger) -> std::process::ExitCode {
    reproject::cli::main(ledger)
}

impl Domain for Ledger {
    type Event = LedgerEvent;

    fn name(&self) -> &str {
        "ledger"
    }

    fn default_topics(&self) -> &[&str] {
        &TOPICS
    }

    fn registry(&self) -> Result<Registry<LedgerEvent>, RegistryError> {
        upcasters::register(Registry::builder()).build()
    }

    fn projections(&self) -> Vec<DynProjection<LedgerEvent>> {
        projections::all(self.daily_volume_version)
    }

    fn schema(&self, projection: &str, version: u32) -> Option<SchemaSql> {
        projections::schema(projection, version)
    }

    fn descriptors(&self) -> &[u8] {
        proto::FILE_DESCRIPTOR_SET
    }

    /// CloudEvents in binary mode, as many teams write them: `ce_type` is the event's name
    /// (`TransferPosted`), its schema version travels in an extension header, and the message is
    /// `ledger.v<version>.<type>`.
    fn framing(&self) -> Framing {
        Framing::CloudEvents(CloudEvents {
            version: Place::Header(SCHEMA_VERSION_HEADER.into()),
            message: "ledger.v{version}.{type}".into(),
            ..CloudEvents::default()
        })
    }

    fn example(&self) -> Option<&dyn Example> {
        Some(&LedgerHistory)
    }
}

/// The ledger's generator, for `seed`, `demo`, `bench` and `check-totals`.
struct LedgerHistory;

impl Example for LedgerHistory {
    fn shape_keys(&self) -> &[(&'static str, &'static str)] {
        &[(
            "accounts",
            "accounts opened over the history [default: a twentieth of the events]",
        )]
    }

    fn history(&self, size: &HistorySize) -> Box<dyn reproject::domain::History> {
        let accounts = size
            .shape
            .get("accounts")
            .copied()
            .unwrap_or(size.events / 20);
        Box::new(generator::History::new(generator::HistoryConfig {
            events: size.events,
            accounts: accounts.max(6),
            seed: size.seed,
        }))
    }

    fn actual_totals<'a>(
        &'a self,
        pool: &'a reproject::sqlx::PgPool,
        view_schema: &'a str,
    ) -> BoxFuture<'a, anyhow::Result<Totals>> {
        Box::pin(async move { totals::actual(pool, view_schema).await })
    }
}
