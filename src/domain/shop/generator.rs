//! A deterministic order history, and the totals it must produce, computed without the upcasters or
//! the projections.
//!
//! Orders are placed at an even rate from `start` to `end`; each order's whole life (customer, items,
//! payment, shipping, cancellation, refund and when each happens) is drawn at placement from an RNG
//! seeded by the run's seed and the order's number, so the same arguments give the same log byte for
//! byte. Events come out in time order, like a real log, and each is written in the schema version of
//! its era: v1 before 2023, v2 before 2025, v3 after. A few orders live for years and so cross all
//! three versions. The history is an endless stream: the first N events are "the history", what
//! follows is what arrives while a rebuild runs.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap, VecDeque};

use chrono::{DateTime, TimeZone, Utc};
use chrono_tz::Tz;
use prost::Message;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::proto::{v1, v2, v3};
use super::AGGREGATE_TYPE;
use reproject::envelope::{micros_timestamp, TYPE_URL_PREFIX};
use reproject::proto::reproject::v1::EventEnvelope;

/// 2023-01-01T00:00:00Z: events from here on are written as v2.
pub const V2_FROM: i64 = 1_672_531_200;
/// 2025-01-01T00:00:00Z: events from here on are written as v3.
pub const V3_FROM: i64 = 1_735_689_600;
/// 2021-01-01T00:00:00Z
pub const DEFAULT_START: i64 = 1_609_459_200;
/// 2026-07-01T00:00:00Z
pub const DEFAULT_END: i64 = 1_782_864_000;

const DAY: i64 = 86_400;

#[derive(Clone, Debug)]
pub struct HistoryConfig {
    /// The history size the stream is shaped for: with `orders` it sets the items per order. The
    /// stream itself is endless; `History::expected` covers whatever was emitted.
    pub events: u64,
    pub orders: u64,
    pub customers: u64,
    pub seed: u64,
    /// Unix seconds of the first and the last order's placement.
    pub start: i64,
    pub end: i64,
}

impl HistoryConfig {
    pub fn new(events: u64, orders: u64, customers: u64, seed: u64) -> HistoryConfig {
        HistoryConfig {
            events,
            orders,
            customers,
            seed,
            start: DEFAULT_START,
            end: DEFAULT_END,
        }
    }
}

pub use reproject::domain::Record;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Placed,
    ItemAdded { sku: u32, quantity: i32 },
    ItemRemoved { sku: u32, quantity: i32 },
    Paid { cents: i64 },
    Shipped,
    Cancelled,
    Refunded { cents: i64 },
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Status {
    Placed,
    Paid,
    Shipped,
    Cancelled,
    Refunded,
}

impl Status {
    fn name(self) -> &'static str {
        match self {
            Status::Placed => "placed",
            Status::Paid => "paid",
            Status::Shipped => "shipped",
            Status::Cancelled => "cancelled",
            Status::Refunded => "refunded",
        }
    }
}

struct Planned {
    at: i64,
    kind: Kind,
    event_id: [u8; 16],
}

struct Order {
    id: String,
    customer: u64,
    /// Every event of an order is in one currency; most customers always use theirs, travellers
    /// change (see [`order_currency`]).
    currency: &'static str,
    sequence: u64,
    events: VecDeque<Planned>,
}

/// Totals the generated history must produce, computed from the generator's own numbers.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct ExpectedTotals {
    pub events: u64,
    pub events_by_version: BTreeMap<String, u64>,
    pub orders: u64,
    pub orders_by_status: BTreeMap<String, u64>,
    pub customers: u64,
    /// Customers per currency of their latest order (by the time it was placed): what a `set` fed by
    /// several partitions must resolve to, whatever order they are read in.
    #[serde(default)]
    pub customers_by_currency: BTreeMap<String, u64>,
    /// Sum over customers of paid minus refunded, grouped by the currency of each customer's latest
    /// order (a traveller's sum mixes currencies, as `customer_stats` does).
    pub lifetime_value_cents: BTreeMap<String, i64>,
    /// Per "YYYY-MM-DD CUR": orders placed and paid, revenue and refunds on that UTC day.
    pub daily_sales: BTreeMap<String, DailyTotals>,
}

#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct DailyTotals {
    pub orders_placed: i64,
    pub orders_paid: i64,
    pub revenue_cents: i64,
    pub refunded_cents: i64,
}

/// Endless, deterministic stream of shop events in time order.
pub struct History {
    config: HistoryConfig,
    due: BinaryHeap<Reverse<(i64, u64)>>,
    open: HashMap<u64, Order>,
    next_order: u64,
    emitted: u64,
    status: Vec<Status>,
    customers: HashMap<u64, CustomerTotals>,
    expected: ExpectedTotals,
}

/// What the generator tracks of one customer, for the totals.
#[derive(Default)]
struct CustomerTotals {
    /// The latest placement planned so far, to keep two orders of a customer from being placed at
    /// the same second (their order in logical time would then depend on partitions).
    latest_planned_at: Option<i64>,
    /// Of the orders emitted so far: the latest placement and its currency.
    latest_placed_at: Option<i64>,
    currency: &'static str,
    value_cents: i64,
}

const SKUS: u32 = 500;

fn sku_price_cents(sku: u32) -> i64 {
    // Deterministic catalogue: 1.99 .. 199.99
    199 + i64::from(sku.wrapping_mul(2_654_435_761) % 19_800)
}

fn currency_of(customer: u64) -> &'static str {
    match customer % 5 {
        0..=2 => "EUR",
        3 => "USD",
        _ => "GBP",
    }
}

/// Every seventh customer travels: from 2023 on (v1 had no currency) each of their orders is in a
/// currency drawn for that order, so `customer_stats.currency`, a `set` on a row fed by many
/// partitions, changes over time and must end as the latest order says.
fn is_traveller(customer: u64) -> bool {
    customer % 7 == 3
}

fn order_currency(customer: u64, placed_at: i64, rng: &mut ChaCha8Rng) -> &'static str {
    if is_traveller(customer) && placed_at >= V2_FROM {
        ["EUR", "USD", "GBP"][rng.random_range(0..3)]
    } else {
        currency_of(customer)
    }
}

fn zone_of(customer: u64) -> Tz {
    match (currency_of(customer), customer / 5 % 4) {
        ("EUR", 0) => chrono_tz::Europe::Berlin,
        ("EUR", 1) => chrono_tz::Europe::Paris,
        ("EUR", 2) => chrono_tz::Europe::Madrid,
        ("EUR", _) => chrono_tz::Europe::Amsterdam,
        ("USD", 0 | 1) => chrono_tz::America::New_York,
        ("USD", 2) => chrono_tz::America::Chicago,
        ("USD", _) => chrono_tz::America::Los_Angeles,
        _ => chrono_tz::Europe::London,
    }
}

fn address_of(customer: u64) -> (String, String, &'static str, &'static str) {
    let (city, country) = match zone_of(customer) {
        chrono_tz::Europe::Berlin => ("Berlin", "DE"),
        chrono_tz::Europe::Paris => ("Paris", "FR"),
        chrono_tz::Europe::Madrid => ("Madrid", "ES"),
        chrono_tz::Europe::Amsterdam => ("Amsterdam", "NL"),
        chrono_tz::America::New_York => ("New York", "US"),
        chrono_tz::America::Chicago => ("Chicago", "US"),
        chrono_tz::America::Los_Angeles => ("Los Angeles", "US"),
        _ => ("London", "GB"),
    };
    (
        format!("{} Market Street", customer % 200 + 1),
        format!("{:05}", 10_000 + customer % 89_999),
        city,
        country,
    )
}

fn customer_id(customer: u64) -> String {
    format!("cust-{customer:07}")
}

fn uuid_from(rng: &mut ChaCha8Rng) -> [u8; 16] {
    let mut bytes: [u8; 16] = rng.random();
    bytes[6] = (bytes[6] & 0x0f) | 0x40;
    bytes[8] = (bytes[8] & 0x3f) | 0x80;
    bytes
}

fn local_string(at: i64, zone: Tz) -> String {
    match Utc.timestamp_opt(at, 0).single() {
        Some(t) => format!(
            "{} {}",
            t.with_timezone(&zone).format("%Y-%m-%d %H:%M:%S"),
            zone.name()
        ),
        None => String::new(),
    }
}

fn cents_string(cents: i64) -> String {
    let sign = if cents < 0 { "-" } else { "" };
    format!("{sign}{}.{:02}", cents.abs() / 100, cents.abs() % 100)
}

fn day_string(at: i64) -> String {
    DateTime::<Utc>::from_timestamp(at, 0)
        .map(|t| t.format("%Y-%m-%d").to_string())
        .unwrap_or_default()
}

impl History {
    pub fn new(config: HistoryConfig) -> History {
        let orders = config.orders.max(1);
        History {
            status: Vec::with_capacity(orders.min(10_000_000) as usize),
            config: HistoryConfig {
                orders,
                customers: config.customers.max(5),
                ..config
            },
            due: BinaryHeap::new(),
            open: HashMap::new(),
            next_order: 0,
            emitted: 0,
            customers: HashMap::new(),
            expected: ExpectedTotals::default(),
        }
    }

    /// Totals over every event emitted so far.
    pub fn expected(&self) -> ExpectedTotals {
        let mut totals = self.expected.clone();
        totals.events = self.emitted;
        totals.orders = self.status.len() as u64;
        totals.orders_by_status.clear();
        for s in &self.status {
            *totals
                .orders_by_status
                .entry(s.name().to_string())
                .or_default() += 1;
        }
        totals.customers_by_currency.clear();
        totals.lifetime_value_cents.clear();
        // Customers with an order emitted (others only have one planned).
        let emitted = self
            .customers
            .values()
            .filter(|c| c.latest_placed_at.is_some());
        totals.customers = emitted.clone().count() as u64;
        for customer in emitted {
            *totals
                .customers_by_currency
                .entry(customer.currency.to_string())
                .or_default() += 1;
            *totals
                .lifetime_value_cents
                .entry(customer.currency.to_string())
                .or_default() += customer.value_cents;
        }
        totals
    }

    fn placement_time(&self, order: u64) -> i64 {
        let span = (self.config.end - self.config.start).max(1) as i128;
        self.config.start + (span * i128::from(order) / i128::from(self.config.orders)) as i64
    }

    /// Draw an order's whole life.
    fn place(&mut self, index: u64) {
        let mut rng =
            ChaCha8Rng::seed_from_u64(self.config.seed ^ index.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let mut placed_at = self.placement_time(index) + rng.random_range(0..60);
        // Before currencies existed (v1) every customer paid in EUR: pick one of those.
        let customer = loop {
            let c = rng.random_range(0..self.config.customers);
            if placed_at >= V2_FROM || currency_of(c) == "EUR" {
                break c;
            }
        };
        let latest = &mut self
            .customers
            .entry(customer)
            .or_default()
            .latest_planned_at;
        if *latest == Some(placed_at) {
            placed_at += 1;
        }
        *latest = (*latest).max(Some(placed_at));
        let currency = order_currency(customer, placed_at, &mut rng);
        let per_order = (self.config.events as f64 / self.config.orders as f64).max(3.0);
        let base_items = (per_order - 3.3).round().max(1.0) as i64;
        let items = (base_items + rng.random_range(-1..=1)).max(1);
        // Every 400th order placed in 2022 lives for years: paid in 2023, shipped in 2024, refunded
        // in 2025, one event in each schema version.
        let slow = index % 400 == 7 && placed_at < V2_FROM && placed_at + 3 * 400 * DAY >= V3_FROM;
        let mut at = placed_at;
        let mut events = VecDeque::new();
        let mut plan = |at: i64, kind: Kind, rng: &mut ChaCha8Rng| {
            events.push_back(Planned {
                at,
                kind,
                event_id: uuid_from(rng),
            })
        };
        plan(at, Kind::Placed, &mut rng);
        let mut basket: Vec<(u32, i32)> = Vec::new();
        for _ in 0..items {
            at += rng.random_range(60..1_800);
            let sku = rng.random_range(0..SKUS);
            let quantity = rng.random_range(1..=3);
            basket.push((sku, quantity));
            plan(at, Kind::ItemAdded { sku, quantity }, &mut rng);
        }
        if basket.len() > 1 && rng.random_bool(0.1) {
            at += rng.random_range(60..1_800);
            let (sku, quantity) = basket.remove(rng.random_range(0..basket.len()));
            plan(at, Kind::ItemRemoved { sku, quantity }, &mut rng);
        }
        let total: i64 = basket
            .iter()
            .map(|(sku, q)| sku_price_cents(*sku) * i64::from(*q))
            .sum();
        if !slow && rng.random_bool(0.08) {
            at += rng.random_range(300..DAY);
            plan(at, Kind::Cancelled, &mut rng);
        } else {
            let gap = |rng: &mut ChaCha8Rng, normal: std::ops::Range<i64>| {
                if slow {
                    400 * DAY + rng.random_range(0..30 * DAY)
                } else {
                    rng.random_range(normal)
                }
            };
            at += gap(&mut rng, 300..2 * DAY);
            plan(at, Kind::Paid { cents: total }, &mut rng);
            if slow || rng.random_bool(0.95) {
                at += gap(&mut rng, 3_600..5 * DAY);
                plan(at, Kind::Shipped, &mut rng);
            }
            if slow || rng.random_bool(0.05) {
                at += gap(&mut rng, DAY..30 * DAY);
                let cents = if rng.random_bool(0.5) {
                    total
                } else {
                    total / 2
                };
                plan(at, Kind::Refunded { cents }, &mut rng);
            }
        }
        let mut id_rng = rng;
        let id = uuid::Uuid::from_bytes(uuid_from(&mut id_rng)).to_string();
        self.due.push(Reverse((placed_at, index)));
        self.open.insert(
            index,
            Order {
                id,
                customer,
                currency,
                sequence: 0,
                events,
            },
        );
    }

    fn next_record(&mut self) -> Option<Record> {
        // Place every order whose time has come before the next due event, so events stay in order.
        loop {
            let next_placement = self.placement_time(self.next_order);
            let placement_due = match self.due.peek() {
                Some(Reverse((at, _))) => next_placement <= *at,
                None => true,
            };
            if placement_due && self.next_order < u64::MAX {
                let index = self.next_order;
                self.next_order += 1;
                self.place(index);
            } else {
                break;
            }
        }
        let Reverse((_, index)) = self.due.pop()?;
        let order = self.open.get_mut(&index)?;
        let planned = order.events.pop_front()?;
        order.sequence += 1;
        let sequence = order.sequence;
        let (key, customer, currency) = (order.id.clone(), order.customer, order.currency);
        if let Some(next) = order.events.front() {
            self.due.push(Reverse((next.at, index)));
        } else {
            self.open.remove(&index);
        }
        let (type_url, payload) = self.encode_payload(&key, customer, currency, &planned);
        self.account(index, customer, currency, &planned, &type_url);
        let envelope = EventEnvelope {
            event_id: planned.event_id.to_vec(),
            aggregate_type: AGGREGATE_TYPE.to_string(),
            aggregate_id: key.clone(),
            sequence,
            occurred_at: Some(micros_timestamp(planned.at * 1_000_000)),
            payload: Some(prost_types::Any {
                type_url,
                value: payload,
            }),
            metadata: [("source".to_string(), "reproject-seed".to_string())]
                .into_iter()
                .collect(),
        };
        self.emitted += 1;
        Some(Record {
            topic: 0,
            key,
            headers: Vec::new(),
            value: envelope.encode_to_vec(),
            occurred_at: planned.at,
        })
    }

    /// The generator's own bookkeeping of what the projections must end up showing.
    fn account(
        &mut self,
        index: u64,
        customer: u64,
        currency: &'static str,
        planned: &Planned,
        type_url: &str,
    ) {
        let version = type_url
            .rsplit('/')
            .next()
            .and_then(|n| n.split('.').nth(1))
            .unwrap_or("?");
        *self
            .expected
            .events_by_version
            .entry(version.to_string())
            .or_default() += 1;
        let day = |at: i64, cur: &str| format!("{} {cur}", day_string(at));
        let totals = self.customers.entry(customer).or_default();
        match planned.kind {
            Kind::Placed => {
                debug_assert_eq!(self.status.len() as u64, index);
                self.status.push(Status::Placed);
                if totals.latest_placed_at < Some(planned.at) {
                    totals.latest_placed_at = Some(planned.at);
                    totals.currency = currency;
                }
                self.expected
                    .daily_sales
                    .entry(day(planned.at, currency))
                    .or_default()
                    .orders_placed += 1;
            }
            Kind::Paid { cents } => {
                let cur = currency;
                totals.value_cents += cents;
                self.set_status(index, Status::Paid);
                let d = self
                    .expected
                    .daily_sales
                    .entry(day(planned.at, cur))
                    .or_default();
                d.orders_paid += 1;
                d.revenue_cents += cents;
            }
            Kind::Shipped => self.set_status(index, Status::Shipped),
            Kind::Cancelled => self.set_status(index, Status::Cancelled),
            Kind::Refunded { cents } => {
                let cur = currency;
                totals.value_cents -= cents;
                self.set_status(index, Status::Refunded);
                self.expected
                    .daily_sales
                    .entry(day(planned.at, cur))
                    .or_default()
                    .refunded_cents += cents;
            }
            Kind::ItemAdded { .. } | Kind::ItemRemoved { .. } => {}
        }
    }

    fn set_status(&mut self, index: u64, status: Status) {
        if let Some(s) = self.status.get_mut(index as usize) {
            *s = status;
        }
    }

    fn encode_payload(
        &self,
        order_id: &str,
        customer: u64,
        placed_currency: &str,
        planned: &Planned,
    ) -> (String, Vec<u8>) {
        let at = planned.at;
        let zone = zone_of(customer);
        let cust = customer_id(customer);
        let (street, postal, city, country) = address_of(customer);
        let order_id = order_id.to_string();
        let local = || local_string(at, zone);
        let ts = || Some(micros_timestamp(at * 1_000_000));
        macro_rules! out {
            ($name:literal, $msg:expr) => {
                (format!("{TYPE_URL_PREFIX}{}", $name), $msg.encode_to_vec())
            };
        }
        let era = if at < V2_FROM {
            1
        } else if at < V3_FROM {
            2
        } else {
            3
        };
        match (era, planned.kind) {
            (1, Kind::Placed) => out!(
                "shop.v1.OrderPlaced",
                v1::OrderPlaced {
                    order_id,
                    user_id: cust,
                    placed_at: local(),
                    ship_to: format!("{street}, {postal} {city}, {country}"),
                }
            ),
            (2, Kind::Placed) => out!(
                "shop.v2.OrderPlaced",
                v2::OrderPlaced {
                    order_id,
                    customer_id: cust,
                    placed_at: local(),
                    ship_to: format!("{street}, {postal} {city}, {country}"),
                    currency: placed_currency.into(),
                }
            ),
            (_, Kind::Placed) => out!(
                "shop.v3.OrderPlaced",
                v3::OrderPlaced {
                    order_id,
                    customer_id: cust,
                    placed_at: ts(),
                    currency: placed_currency.into(),
                    ship_to: Some(v3::Address {
                        street,
                        postal_code: postal,
                        city: city.into(),
                        country: country.into()
                    }),
                }
            ),
            (1, Kind::ItemAdded { sku, quantity }) => out!(
                "shop.v1.ItemAdded",
                v1::ItemAdded {
                    order_id,
                    sku: format!("SKU-{sku:04}"),
                    quantity,
                    unit_price: cents_string(sku_price_cents(sku)),
                }
            ),
            (2, Kind::ItemAdded { sku, quantity }) => out!(
                "shop.v2.ItemAdded",
                v2::ItemAdded {
                    order_id,
                    sku: format!("SKU-{sku:04}"),
                    quantity,
                    unit_price_cents: sku_price_cents(sku),
                    currency: placed_currency.into(),
                }
            ),
            (_, Kind::ItemAdded { sku, quantity }) => out!(
                "shop.v3.ItemAdded",
                v3::ItemAdded {
                    order_id,
                    sku: format!("SKU-{sku:04}"),
                    quantity,
                    unit_price_cents: sku_price_cents(sku),
                    currency: placed_currency.into(),
                }
            ),
            (1, Kind::ItemRemoved { sku, quantity }) => out!(
                "shop.v1.ItemRemoved",
                v1::ItemRemoved {
                    order_id,
                    sku: format!("SKU-{sku:04}"),
                    quantity,
                    unit_price: cents_string(sku_price_cents(sku)),
                }
            ),
            (2, Kind::ItemRemoved { sku, quantity }) => out!(
                "shop.v2.ItemRemoved",
                v2::ItemRemoved {
                    order_id,
                    sku: format!("SKU-{sku:04}"),
                    quantity,
                    unit_price_cents: sku_price_cents(sku),
                    currency: placed_currency.into(),
                }
            ),
            (_, Kind::ItemRemoved { sku, quantity }) => out!(
                "shop.v3.ItemRemoved",
                v3::ItemRemoved {
                    order_id,
                    sku: format!("SKU-{sku:04}"),
                    quantity,
                    unit_price_cents: sku_price_cents(sku),
                    currency: placed_currency.into(),
                }
            ),
            (1, Kind::Paid { cents }) => out!(
                "shop.v1.OrderPaid",
                v1::OrderPaid {
                    order_id,
                    amount: cents_string(cents),
                    paid_at: local(),
                    user_id: cust,
                }
            ),
            (2, Kind::Paid { cents }) => out!(
                "shop.v2.OrderPaid",
                v2::OrderPaid {
                    order_id,
                    amount_cents: cents,
                    currency: placed_currency.into(),
                    paid_at: local(),
                    customer_id: cust,
                }
            ),
            (_, Kind::Paid { cents }) => out!(
                "shop.v3.OrderPaid",
                v3::OrderPaid {
                    order_id,
                    amount_cents: cents,
                    currency: placed_currency.into(),
                    paid_at: ts(),
                    customer_id: cust,
                }
            ),
            (1, Kind::Shipped) => out!(
                "shop.v1.OrderShipped",
                v1::OrderShipped {
                    order_id,
                    carrier: "DHL".into(),
                    shipped_at: local(),
                }
            ),
            (2, Kind::Shipped) => out!(
                "shop.v2.OrderShipped",
                v2::OrderShipped {
                    order_id,
                    carrier: "DHL".into(),
                    shipped_at: local(),
                }
            ),
            (_, Kind::Shipped) => out!(
                "shop.v3.OrderShipped",
                v3::OrderShipped {
                    order_id,
                    carrier: "DHL".into(),
                    shipped_at: ts(),
                }
            ),
            (1, Kind::Cancelled) => out!(
                "shop.v1.OrderCancelled",
                v1::OrderCancelled {
                    order_id,
                    reason: "customer request".into(),
                    cancelled_at: local(),
                }
            ),
            (2, Kind::Cancelled) => out!(
                "shop.v2.OrderCancelled",
                v2::OrderCancelled {
                    order_id,
                    reason: "customer request".into(),
                    cancelled_at: local(),
                }
            ),
            (_, Kind::Cancelled) => out!(
                "shop.v3.OrderCancelled",
                v3::OrderCancelled {
                    order_id,
                    reason: "customer request".into(),
                    cancelled_at: ts(),
                }
            ),
            (1, Kind::Refunded { cents }) => out!(
                "shop.v1.OrderRefunded",
                v1::OrderRefunded {
                    order_id,
                    amount: cents_string(cents),
                    refunded_at: local(),
                    user_id: cust,
                }
            ),
            (2, Kind::Refunded { cents }) => out!(
                "shop.v2.OrderRefunded",
                v2::OrderRefunded {
                    order_id,
                    amount_cents: cents,
                    currency: placed_currency.into(),
                    refunded_at: local(),
                    customer_id: cust,
                }
            ),
            (_, Kind::Refunded { cents }) => out!(
                "shop.v3.OrderRefunded",
                v3::OrderRefunded {
                    order_id,
                    amount_cents: cents,
                    currency: placed_currency.into(),
                    refunded_at: ts(),
                    customer_id: cust,
                }
            ),
        }
    }
}

impl Iterator for History {
    type Item = Record;

    fn next(&mut self) -> Option<Record> {
        self.next_record()
    }
}

impl reproject::domain::History for History {
    fn expected(&self) -> reproject::domain::Totals {
        super::totals::figures(&History::expected(self))
    }
}
