//! A deterministic ledger history, and the totals it must produce, computed from the generator's own
//! bookkeeping: never through the upcasters or the projections.
//!
//! Events come at an even pace from 2022 on, in time order. Accounts open in three currencies; money
//! moves between two open accounts of the same currency; now and then an account closes. Events before
//! 2024 are written as v1 (cents, `holder`, from/to), later ones as v2 (micros, some with sub-cent
//! amounts, `owner`, debit/credit). The stream is endless: the first N events are "the history", what
//! follows is what arrives while a rebuild runs.

use std::collections::BTreeMap;

use chrono::DateTime;
use prost::Message;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use reproject::domain::{Record, Totals};

use crate::proto::{v1, v2};
use crate::upcasters::MICROS_PER_CENT;

/// 2022-01-01T00:00:00Z: the first event.
pub const START: i64 = 1_640_995_200;
/// 2024-01-01T00:00:00Z: events from here on are written as v2.
pub const V2_FROM: i64 = 1_704_067_200;
/// 2026-06-30T00:00:00Z: the history of `events` events ends about here.
pub const END: i64 = 1_782_777_600;

pub const CURRENCIES: [&str; 3] = ["EUR", "USD", "GBP"];

#[derive(Clone, Debug)]
pub struct HistoryConfig {
    /// The history length the stream is shaped for: it sets the pace of events and of openings.
    pub events: u64,
    /// Accounts opened over those events.
    pub accounts: u64,
    pub seed: u64,
}

struct Account {
    currency: usize,
    open: bool,
    balance_micros: i64,
    transfers: i64,
}

#[derive(Clone, Copy, Default)]
struct Day {
    transfers: i64,
    volume_micros: i64,
    largest_micros: i64,
}

/// Endless, deterministic stream of ledger events in time order.
pub struct History {
    config: HistoryConfig,
    rng: ChaCha8Rng,
    seconds_per_event: i64,
    emitted: u64,
    accounts: Vec<Account>,
    /// Per currency, the indexes of its open accounts.
    open: [Vec<usize>; 3],
    days: BTreeMap<(String, &'static str), Day>,
    by_version: BTreeMap<String, u64>,
}

impl History {
    pub fn new(config: HistoryConfig) -> History {
        let seconds_per_event = ((END - START) / config.events.max(1) as i64).max(1);
        History {
            rng: ChaCha8Rng::seed_from_u64(config.seed),
            config,
            seconds_per_event,
            emitted: 0,
            accounts: Vec::new(),
            open: [Vec::new(), Vec::new(), Vec::new()],
            days: BTreeMap::new(),
            by_version: BTreeMap::new(),
        }
    }

    fn account_id(index: usize) -> String {
        format!("acc-{index:06}")
    }

    fn next_record(&mut self) -> Record {
        let at = START + self.emitted as i64 * self.seconds_per_event;
        let v2 = at >= V2_FROM;
        let still_to_open = self
            .config
            .accounts
            .saturating_sub(self.accounts.len() as u64);
        let remaining = self.config.events.saturating_sub(self.emitted).max(1);
        let thin = self.open.iter().any(|o| o.len() < 2);
        let (aggregate_type, aggregate_id, sequence, name, payload) =
            if still_to_open > 0 && (thin || self.rng.random_range(0..remaining) < still_to_open) {
                self.open_account(v2)
            } else if self.rng.random_range(0..100) == 0 {
                match self.close_account() {
                    Some(closed) => closed,
                    None => self.transfer(at, v2),
                }
            } else {
                self.transfer(at, v2)
            };
        *self
            .by_version
            .entry(if v2 { "v2" } else { "v1" }.to_string())
            .or_default() += 1;
        let mut event_id = [0u8; 16];
        self.rng.fill(&mut event_id);
        // CloudEvents in binary mode (see `crate::framing`): the value is the bare message; the
        // type (without its version), the version, id, time, subject and sequence are headers.
        let (package, event_type) = name.rsplit_once('.').unwrap_or(("", &name));
        let version = package.rsplit_once(".v").map_or("", |(_, v)| v);
        let time = DateTime::from_timestamp(at, 0)
            .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
            .unwrap_or_default();
        let header = |name: &str, value: &str| (name.to_string(), value.as_bytes().to_vec());
        let headers = vec![
            header("ce_specversion", "1.0"),
            header("ce_type", event_type),
            header(crate::SCHEMA_VERSION_HEADER, version),
            header("ce_id", &uuid::Uuid::from_bytes(event_id).to_string()),
            header("ce_time", &time),
            header("ce_subject", &aggregate_id),
            header("ce_sequence", &sequence.to_string()),
            header("ce_source", aggregate_type),
        ];
        self.emitted += 1;
        Record {
            topic: if aggregate_type == "Account" {
                crate::ACCOUNTS_TOPIC
            } else {
                crate::TRANSFERS_TOPIC
            },
            key: aggregate_id,
            value: payload,
            headers,
            occurred_at: at,
        }
    }

    fn open_account(&mut self, v2: bool) -> (&'static str, String, u64, String, Vec<u8>) {
        let index = self.accounts.len();
        // Fill the thinnest currency first so that every currency soon has two accounts to move
        // money between; then spread at random.
        let currency = match (0..CURRENCIES.len()).find(|&c| self.open[c].len() < 2) {
            Some(c) => c,
            None => self.rng.random_range(0..CURRENCIES.len()),
        };
        let limit_cents = self.rng.random_range(0..=5_000) * 100;
        self.accounts.push(Account {
            currency,
            open: true,
            balance_micros: 0,
            transfers: 0,
        });
        self.open[currency].push(index);
        let (account_id, owner) = (Self::account_id(index), format!("owner-{}", index % 977));
        let (name, payload) = if v2 {
            let message = v2::AccountOpened {
                account_id: account_id.clone(),
                owner,
                currency: CURRENCIES[currency].into(),
                overdraft_limit_micros: limit_cents * MICROS_PER_CENT,
            };
            ("ledger.v2.AccountOpened", message.encode_to_vec())
        } else {
            let message = v1::AccountOpened {
                account_id: account_id.clone(),
                holder: owner,
                currency: CURRENCIES[currency].into(),
                overdraft_limit_cents: limit_cents,
            };
            ("ledger.v1.AccountOpened", message.encode_to_vec())
        };
        ("Account", account_id, 1, name.into(), payload)
    }

    /// Closes a random open account of a currency that keeps at least three open; None when none may.
    fn close_account(&mut self) -> Option<(&'static str, String, u64, String, Vec<u8>)> {
        let currency = self.rng.random_range(0..CURRENCIES.len());
        if self.open[currency].len() < 4 {
            return None;
        }
        let position = self.rng.random_range(0..self.open[currency].len());
        let index = self.open[currency].swap_remove(position);
        self.accounts[index].open = false;
        let account_id = Self::account_id(index);
        let name = if self.emitted as i64 * self.seconds_per_event + START >= V2_FROM {
            "ledger.v2.AccountClosed"
        } else {
            "ledger.v1.AccountClosed"
        };
        // v1 and v2 AccountClosed have the same fields and numbers, so one encoding serves both.
        let payload = v2::AccountClosed {
            account_id: account_id.clone(),
            reason: "customer request".into(),
        }
        .encode_to_vec();
        Some(("Account", account_id, 2, name.into(), payload))
    }

    fn transfer(&mut self, at: i64, v2: bool) -> (&'static str, String, u64, String, Vec<u8>) {
        let candidates: Vec<usize> = (0..CURRENCIES.len())
            .filter(|&c| self.open[c].len() >= 2)
            .collect();
        if candidates.is_empty() {
            // Too few accounts asked for to move money yet: open one more, whatever the shape said.
            return self.open_account(v2);
        }
        let currency = candidates[self.rng.random_range(0..candidates.len())];
        let pool = &self.open[currency];
        let a = self.rng.random_range(0..pool.len());
        let mut b = self.rng.random_range(0..pool.len() - 1);
        if b >= a {
            b += 1;
        }
        let (debit, credit) = (pool[a], pool[b]);
        let amount_micros = if v2 {
            // Interest and FX postings carry sub-cent amounts since v2.
            self.rng.random_range(1..=2_000_000_000)
        } else {
            self.rng.random_range(1..=200_000) * MICROS_PER_CENT
        };
        let transfer_id = uuid::Uuid::from_u128(self.rng.random()).to_string();
        let day = DateTime::from_timestamp(at, 0)
            .map(|t| t.format("%Y-%m-%d").to_string())
            .unwrap_or_default();
        let totals = self.days.entry((day, CURRENCIES[currency])).or_default();
        totals.transfers += 1;
        totals.volume_micros += amount_micros;
        totals.largest_micros = totals.largest_micros.max(amount_micros);
        self.accounts[debit].balance_micros -= amount_micros;
        self.accounts[debit].transfers += 1;
        self.accounts[credit].balance_micros += amount_micros;
        self.accounts[credit].transfers += 1;
        let (debit, credit) = (Self::account_id(debit), Self::account_id(credit));
        let (name, payload) = if v2 {
            let message = v2::TransferPosted {
                transfer_id: transfer_id.clone(),
                debit_account: debit,
                credit_account: credit,
                amount_micros,
                currency: CURRENCIES[currency].into(),
            };
            ("ledger.v2.TransferPosted", message.encode_to_vec())
        } else {
            let message = v1::TransferPosted {
                transfer_id: transfer_id.clone(),
                from_account: debit,
                to_account: credit,
                amount_cents: amount_micros / MICROS_PER_CENT,
                currency: CURRENCIES[currency].into(),
            };
            ("ledger.v1.TransferPosted", message.encode_to_vec())
        };
        ("Transfer", transfer_id, 1, name.into(), payload)
    }

    /// What the views must show after every event emitted so far.
    pub fn expected(&self) -> Totals {
        let mut totals = Totals {
            events: self.emitted,
            events_by_version: self.by_version.clone(),
            figures: Vec::new(),
        };
        let open = self.accounts.iter().filter(|a| a.open).count() as i64;
        totals.figure("accounts", self.accounts.len() as i64);
        totals.figure("  open", open);
        totals.figure("  closed", self.accounts.len() as i64 - open);
        totals.figure(
            "transfers",
            self.days.values().map(|d| d.transfers).sum::<i64>(),
        );
        totals.figure(
            "accounts overdrawn",
            self.accounts
                .iter()
                .filter(|a| a.balance_micros < 0)
                .count() as i64,
        );
        for (c, currency) in CURRENCIES.iter().enumerate() {
            totals.figure(
                format!("positive balances in {currency} (micros)"),
                self.accounts
                    .iter()
                    .filter(|a| a.currency == c && a.balance_micros > 0)
                    .map(|a| a.balance_micros)
                    .sum(),
            );
            let days = self.days.iter().filter(|((_, cur), _)| cur == currency);
            totals.figure(
                format!("volume in {currency} (micros)"),
                days.clone().map(|(_, d)| d.volume_micros).sum(),
            );
            totals.figure(
                format!("largest transfer in {currency} (micros)"),
                days.map(|(_, d)| d.largest_micros).max().unwrap_or(0),
            );
        }
        totals.figure("days x currencies", self.days.len() as i64);
        for (index, account) in self.accounts.iter().enumerate() {
            totals.detail(
                format!("balance of {} (micros)", Self::account_id(index)),
                account.balance_micros,
            );
            totals.detail(
                format!("transfers of {}", Self::account_id(index)),
                account.transfers,
            );
        }
        for ((day, currency), d) in &self.days {
            totals.detail(format!("{day} {currency}: transfers"), d.transfers);
            totals.detail(
                format!("{day} {currency}: volume (micros)"),
                d.volume_micros,
            );
            totals.detail(
                format!("{day} {currency}: largest (micros)"),
                d.largest_micros,
            );
        }
        totals
    }
}

impl Iterator for History {
    type Item = Record;

    fn next(&mut self) -> Option<Record> {
        Some(self.next_record())
    }
}

impl reproject::domain::History for History {
    fn expected(&self) -> Totals {
        History::expected(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn history(events: u64, seed: u64) -> History {
        History::new(HistoryConfig {
            events,
            accounts: events / 20,
            seed,
        })
    }

    #[test]
    fn records_are_cloudevents_that_the_ledgers_framing_reads_back() {
        use reproject::domain::Domain;
        let framing = crate::Ledger::default().framing();
        let mut versions = std::collections::BTreeSet::new();
        for record in history(2_000, 3).take(2_000) {
            let headers: Vec<(&str, Option<&[u8]>)> = record
                .headers
                .iter()
                .map(|(n, v)| (n.as_str(), Some(v.as_slice())))
                .collect();
            assert!(headers.iter().any(|(n, _)| *n == "ce_specversion"));
            let raw = reproject::envelope::RawRecord {
                headers: &headers,
                ..reproject::envelope::RawRecord::plain(Some(record.key.as_bytes()), &record.value)
            };
            let mut decoded = reproject::envelope::Decoded::default();
            framing
                .decode_into(&raw, 0, &mut decoded)
                .expect("the framing reads what the generator writes");
            assert_eq!(decoded.meta.aggregate_id, record.key);
            assert_eq!(
                decoded.meta.occurred_at_micros,
                record.occurred_at * 1_000_000
            );
            assert!(decoded.type_url.starts_with("type.googleapis.com/ledger.v"));
            // The value is the bare message, not an envelope around it.
            assert_eq!(decoded.payload, record.value);
            versions.insert(reproject::envelope::message_version(&decoded.type_url));
        }
        assert_eq!(
            versions.len(),
            2,
            "v1 and v2 both travel as CloudEvents: {versions:?}"
        );
    }

    #[test]
    fn the_same_seed_writes_the_same_log_and_both_versions_appear() {
        let a: Vec<Vec<u8>> = history(5_000, 7).take(5_000).map(|r| r.value).collect();
        let b: Vec<Vec<u8>> = history(5_000, 7).take(5_000).map(|r| r.value).collect();
        assert_eq!(a, b);
        let mut h = history(5_000, 7);
        h.by_ref().take(5_000).for_each(drop);
        let totals = h.expected();
        assert!(totals
            .events_by_version
            .get("v1")
            .is_some_and(|&n| n > 1_000));
        assert!(totals
            .events_by_version
            .get("v2")
            .is_some_and(|&n| n > 1_000));
        assert_eq!(totals.get("accounts"), 250);
    }

    #[test]
    fn money_is_only_moved_never_made() {
        let mut h = history(20_000, 3);
        h.by_ref().take(20_000).for_each(drop);
        for (c, currency) in CURRENCIES.iter().enumerate() {
            let sum: i64 = h
                .accounts
                .iter()
                .filter(|a| a.currency == c)
                .map(|a| a.balance_micros)
                .sum();
            assert_eq!(sum, 0, "{currency}");
        }
    }
}
