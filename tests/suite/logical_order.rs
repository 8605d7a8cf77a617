//! Same log, same tables, whatever order partitions are read in.
//!
//! Kafka orders a partition, not a topic. A row fed by several partitions must come out the same
//! however reads interleave: a `set`, an upsert or a delete resolves by the event's time, then its
//! partition and offset. These tests write each customer's two events to different partitions (or
//! different topics), the one that happened later written (and, when `run` follows, applied) first.

use crate::common;

use std::path::PathBuf;
use std::sync::Arc;

use common::*;
use prost::Message;
use reproject::domain::shop::proto::v3;
use reproject::domain::shop::{self, ShopEvent};
use reproject::engine::rebuild::{rebuild, RebuildOptions};
use reproject::engine::{Engine, Tuning};
use reproject::envelope::{micros_timestamp, TYPE_URL_PREFIX};
use reproject::key;
use reproject::projection::{
    Changes, Column, ColumnType, DynProjection, Event, Projection, TableSpec, Value,
};
use reproject::proto::reproject::v1::EventEnvelope;
use reproject::source::partitioner::Partitioner;
use reproject::source::producer::LogWriter;
use reproject::source::{KafkaSettings, Topics};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

const PARTITIONS: i32 = 2;
const CUSTOMERS: u64 = 120;
/// 2025-06-01T00:00:00Z: v3, so payloads go through no upcaster.
const START: i64 = 1_748_736_000;

/// One record: its key (the order id) and the envelope's bytes.
type Record = (String, Vec<u8>);

/// An order id that the default partitioner puts on `partition`.
fn order_id_on(partition: i32, label: &str) -> String {
    (0..)
        .map(|n| format!("{label}-{n}"))
        .find(|id| Partitioner::ConsistentRandom.partition(id.as_bytes(), PARTITIONS) == partition)
        .unwrap_or_default()
}

fn envelope(order_id: &str, at_secs: i64, type_name: &str, payload: Vec<u8>) -> Vec<u8> {
    let mut event_id = [0u8; 16];
    event_id[..8].copy_from_slice(&at_secs.to_be_bytes());
    event_id[8..].copy_from_slice(&crc32fast::hash(order_id.as_bytes()).to_be_bytes().repeat(2));
    EventEnvelope {
        event_id: event_id.to_vec(),
        aggregate_type: shop::AGGREGATE_TYPE.into(),
        aggregate_id: order_id.into(),
        sequence: 1,
        occurred_at: Some(micros_timestamp(at_secs * 1_000_000)),
        payload: Some(prost_types::Any {
            type_url: format!("{TYPE_URL_PREFIX}{type_name}"),
            value: payload,
        }),
        metadata: Default::default(),
    }
    .encode_to_vec()
}

fn placed(customer: u64, order_id: &str, at_secs: i64, currency: &str) -> Record {
    let payload = v3::OrderPlaced {
        order_id: order_id.into(),
        customer_id: format!("cust-{customer}"),
        placed_at: Some(micros_timestamp(at_secs * 1_000_000)),
        ship_to: None,
        currency: currency.into(),
    };
    let value = envelope(
        order_id,
        at_secs,
        "shop.v3.OrderPlaced",
        payload.encode_to_vec(),
    );
    (order_id.to_string(), value)
}

fn refunded(customer: u64, order_id: &str, at_secs: i64) -> Record {
    let payload = v3::OrderRefunded {
        order_id: order_id.into(),
        amount_cents: 100,
        currency: "EUR".into(),
        refunded_at: Some(micros_timestamp(at_secs * 1_000_000)),
        customer_id: format!("cust-{customer}"),
    };
    let value = envelope(
        order_id,
        at_secs,
        "shop.v3.OrderRefunded",
        payload.encode_to_vec(),
    );
    (order_id.to_string(), value)
}

fn write(kafka: &KafkaSettings, records: &[Record]) {
    write_to(kafka, TOPIC, records);
}

fn write_to(kafka: &KafkaSettings, topic: &str, records: &[Record]) {
    let mut writer = LogWriter::new(kafka, topic, "consistent_random").expect("producer");
    for (key, value) in records {
        writer.send(key, value).expect("send");
    }
    writer.finish().expect("every record delivered");
}

/// Every customer places two orders an hour apart, on different partitions: first in EUR, then in
/// USD. Which partition holds the later order alternates between customers, so whichever partition
/// a reader takes first, for half the customers it reads the later order first. Returns the later
/// orders and the earlier ones.
fn two_orders_per_customer() -> (Vec<Record>, Vec<Record>) {
    let (mut later, mut earlier) = (Vec::new(), Vec::new());
    for customer in 0..CUSTOMERS {
        let at = START + customer as i64 * 600;
        let late_partition = (customer % 2) as i32;
        let late_id = order_id_on(late_partition, &format!("late-{customer}"));
        let early_id = order_id_on(1 - late_partition, &format!("early-{customer}"));
        later.push(placed(customer, &late_id, at + 3_600, "USD"));
        earlier.push(placed(customer, &early_id, at, "EUR"));
    }
    (later, earlier)
}

fn small_batches() -> Tuning {
    Tuning {
        batch_events: 7,
        ..tuning()
    }
}

async fn customer_currencies(pool: &PgPool) -> Vec<(String, Option<String>, i64)> {
    sqlx::query_as("SELECT customer_id, currency, orders FROM customer_stats ORDER BY customer_id")
        .fetch_all(pool)
        .await
        .expect("read customer_stats")
}

/// Rebuild every shop projection from `records`, written in that order, with these settings;
/// returns the pool of the database the views went live in.
async fn rebuilt(
    name: &str,
    records: &[Record],
    tuning: Tuning,
    options: RebuildOptions,
) -> PgPool {
    let db = fresh_database(name).await;
    let kafka = Kafka::start(PARTITIONS);
    write(&kafka.settings, records);
    let engine = engine(&db, &kafka.settings, tuning).await;
    let report = rebuild(
        &engine,
        &all_projections(),
        &options,
        &CancellationToken::new(),
    )
    .await
    .expect("rebuild");
    assert_eq!(report.events_replayed, records.len() as u64);
    if options.memory_budget.is_some() {
        assert!(report.spills > 0, "the budget made nothing spill");
    }
    engine.catalog.pool().clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_set_gathered_from_two_partitions_keeps_the_later_event_whatever_the_read_order() {
    let (later, earlier) = two_orders_per_customer();
    let later_first: Vec<Record> = later.iter().chain(&earlier).cloned().collect();
    let earlier_first: Vec<Record> = earlier.iter().chain(&later).cloned().collect();
    let one_reader = Tuning {
        replay_readers: 1,
        ..tuning()
    };
    let spilling = RebuildOptions {
        memory_budget: Some(8 << 10),
        ..rebuild_options()
    };

    let variants = [
        (
            "two readers, later written first",
            rebuilt(
                "order_two_readers",
                &later_first,
                tuning(),
                rebuild_options(),
            )
            .await,
        ),
        (
            "one reader, later written first",
            rebuilt(
                "order_one_reader",
                &later_first,
                one_reader,
                rebuild_options(),
            )
            .await,
        ),
        (
            "earlier written first",
            rebuilt(
                "order_reversed",
                &earlier_first,
                tuning(),
                rebuild_options(),
            )
            .await,
        ),
        (
            "spilling under a memory budget",
            rebuilt("order_spill", &later_first, small_batches(), spilling).await,
        ),
        ("run following, later applied first", {
            // Built on an empty log; `run` then applies the later orders in small batches, and
            // only afterwards the earlier ones: every earlier set arrives after the later one.
            let db = fresh_database("order_follow").await;
            let kafka = Kafka::start(PARTITIONS);
            let engine = Arc::new(engine(&db, &kafka.settings, small_batches()).await);
            rebuild_all(&engine).await.expect("rebuild an empty log");
            write(&kafka.settings, &later);
            drain(engine.clone()).await;
            write(&kafka.settings, &earlier);
            drain(engine.clone()).await;
            engine.catalog.pool().clone()
        }),
    ];

    let reference = checksum(&variants[0].1, "public", "customer_stats", "customer_id").await;
    for (name, pool) in &variants {
        let rows = customer_currencies(pool).await;
        assert_eq!(rows.len() as u64, CUSTOMERS, "{name}");
        let wrong: Vec<_> = rows
            .iter()
            .filter(|(_, currency, orders)| currency.as_deref() != Some("USD") || *orders != 2)
            .collect();
        assert!(
            wrong.is_empty(),
            "{name}: {} customers do not hold their later order's currency, e.g. {:?}",
            wrong.len(),
            wrong.first()
        );
        assert_eq!(
            checksum(pool, "public", "customer_stats", "customer_id").await,
            reference,
            "{name}: customer_stats differs from a rebuild with two readers"
        );
    }
}

/// The shop's engine reading `TOPIC` and `OTHER_TOPIC`.
async fn two_topic_engine(db: &str, kafka: &Kafka, tuning: Tuning) -> Engine<ShopEvent> {
    kafka
        .broker
        .create_topic(OTHER_TOPIC, PARTITIONS)
        .expect("a second topic");
    let mut parts = shop_parts(db, &kafka.settings, tuning, None);
    parts.topics = Topics::new([TOPIC, OTHER_TOPIC]).expect("two topics");
    Engine::connect(parts).await.expect("engine connects")
}

/// Sorts after `TOPIC`: a tie in time goes to it.
const OTHER_TOPIC: &str = "shop.orders.imported";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_set_gathered_from_two_topics_keeps_the_later_event_whatever_topic_holds_it() {
    let (later, earlier) = two_orders_per_customer();
    let one_topic: Vec<Record> = later.iter().chain(&earlier).cloned().collect();
    let reference = rebuilt("topics_reference", &one_topic, tuning(), rebuild_options()).await;
    let reference = checksum(&reference, "public", "customer_stats", "customer_id").await;

    for (case, (name, later_topic, earlier_topic)) in [
        ("later orders in the first topic", TOPIC, OTHER_TOPIC),
        ("later orders in the second topic", OTHER_TOPIC, TOPIC),
    ]
    .into_iter()
    .enumerate()
    {
        // Rebuilt from both topics at once.
        let db = fresh_database(&format!("topics_rebuild_{case}")).await;
        let kafka = Kafka::start(PARTITIONS);
        let engine = two_topic_engine(&db, &kafka, tuning()).await;
        write_to(&kafka.settings, later_topic, &later);
        write_to(&kafka.settings, earlier_topic, &earlier);
        let report = rebuild(
            &engine,
            &all_projections(),
            &rebuild_options(),
            &CancellationToken::new(),
        )
        .await
        .expect("rebuild");
        assert_eq!(report.events_replayed, one_topic.len() as u64, "{name}");
        let rebuilt = engine.catalog.pool().clone();

        // Followed: the later orders' topic applied first, in small batches.
        let db = fresh_database(&format!("topics_follow_{case}")).await;
        let kafka = Kafka::start(PARTITIONS);
        let engine = Arc::new(two_topic_engine(&db, &kafka, small_batches()).await);
        rebuild_all(&engine).await.expect("rebuild an empty log");
        write_to(&kafka.settings, later_topic, &later);
        drain(engine.clone()).await;
        write_to(&kafka.settings, earlier_topic, &earlier);
        drain(engine.clone()).await;
        let followed = engine.catalog.pool().clone();

        for (how, pool) in [("rebuilt", &rebuilt), ("followed", &followed)] {
            let rows = customer_currencies(pool).await;
            assert_eq!(rows.len() as u64, CUSTOMERS, "{name}, {how}");
            assert!(
                rows.iter()
                    .all(|(_, currency, orders)| currency.as_deref() == Some("USD") && *orders == 2),
                "{name}, {how}: a customer does not hold their later order's currency: {rows:?}"
            );
            assert_eq!(
                checksum(pool, "public", "customer_stats", "customer_id").await,
                reference,
                "{name}, {how}: customer_stats differs from the same orders in one topic"
            );
        }
    }
}

/// A test projection whose rows gather partitions and get deleted: per customer, their latest
/// order; a refund of any of their orders forgets them.
struct LastOrder {
    tables: Vec<TableSpec>,
}

impl LastOrder {
    fn projection() -> DynProjection<ShopEvent> {
        Arc::new(LastOrder {
            tables: vec![TableSpec {
                name: "last_order",
                columns: vec![
                    Column::new("customer_id", ColumnType::Text),
                    Column::new("order_id", ColumnType::Text),
                    Column::new("currency", ColumnType::Text),
                ],
                key_len: 1,
                bucket_column: None,
                per_aggregate: false,
            }],
        })
    }

    fn schema_dir() -> PathBuf {
        let dir = std::env::temp_dir().join("rp_test_last_order_schemas");
        let version = dir.join("last_order").join("v1");
        std::fs::create_dir_all(&version).expect("schema dir");
        std::fs::write(
            version.join("tables.sql"),
            "CREATE TABLE last_order (customer_id text NOT NULL, order_id text, currency text);",
        )
        .expect("tables.sql");
        std::fs::write(
            version.join("indexes.sql"),
            "ALTER TABLE last_order ADD PRIMARY KEY (customer_id);",
        )
        .expect("indexes.sql");
        dir
    }
}

impl Projection<ShopEvent> for LastOrder {
    fn name(&self) -> &'static str {
        "last_order"
    }

    fn version(&self) -> u32 {
        1
    }

    fn tables(&self) -> &[TableSpec] {
        &self.tables
    }

    fn apply(&self, event: &Event<'_, ShopEvent>, out: &mut Changes) {
        match event.payload {
            ShopEvent::Placed(e) => out.set(
                0,
                key![Value::text(&e.customer_id)],
                vec![(1, Value::text(&e.order_id)), (2, Value::text(&e.currency))],
            ),
            ShopEvent::Refunded(e) => out.delete(0, key![Value::text(&e.customer_id)]),
            _ => {}
        }
    }
}

async fn last_order_engine(db: &str, kafka: &KafkaSettings, tuning: Tuning) -> Engine<ShopEvent> {
    let mut parts = common::shop_parts(db, kafka, tuning, Some(LastOrder::schema_dir()));
    parts.projections = vec![LastOrder::projection()];
    Engine::connect(parts).await.expect("engine connects")
}

/// Customers 0..40: an order placed, then (later in time, on the other partition) a refund: gone.
/// Customers 40..80: a refund, then later an order placed on the other partition: there, with that
/// order. Returns the later events and the earlier ones.
fn deletes_and_sets() -> (Vec<Record>, Vec<Record>) {
    let (mut later, mut earlier) = (Vec::new(), Vec::new());
    for customer in 0..80u64 {
        let at = START + customer as i64 * 600;
        let late_partition = (customer % 2) as i32;
        let late_id = order_id_on(late_partition, &format!("late-{customer}"));
        let early_id = order_id_on(1 - late_partition, &format!("early-{customer}"));
        if customer < 40 {
            earlier.push(placed(customer, &early_id, at, "EUR"));
            later.push(refunded(customer, &late_id, at + 60));
        } else {
            earlier.push(refunded(customer, &early_id, at));
            later.push(placed(customer, &late_id, at + 60, "GBP"));
        }
    }
    (later, earlier)
}

async fn last_orders(pool: &PgPool) -> Vec<(String, String)> {
    sqlx::query_as("SELECT customer_id, order_id FROM last_order ORDER BY customer_id")
        .fetch_all(pool)
        .await
        .expect("read last_order")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delete_and_a_set_from_two_partitions_end_as_the_later_one_says() {
    let (later, earlier) = deletes_and_sets();
    let mut expected: Vec<(String, String)> = (40..80u64)
        .map(|customer| {
            let partition = (customer % 2) as i32;
            (
                format!("cust-{customer}"),
                order_id_on(partition, &format!("late-{customer}")),
            )
        })
        .collect();
    expected.sort();

    // A rebuild that reads both partitions, later events written first.
    let db = fresh_database("delete_rebuild").await;
    let kafka = Kafka::start(PARTITIONS);
    write(
        &kafka.settings,
        &later.iter().chain(&earlier).cloned().collect::<Vec<_>>(),
    );
    let rebuilt = last_order_engine(&db, &kafka.settings, tuning()).await;
    rebuild(
        &rebuilt,
        &["last_order".to_string()],
        &rebuild_options(),
        &CancellationToken::new(),
    )
    .await
    .expect("rebuild");
    let rebuilt_pool = rebuilt.catalog.pool().clone();
    assert_eq!(last_orders(&rebuilt_pool).await, expected, "rebuild");

    // `run` applying the later events first, then the earlier ones: a row deleted before it ever
    // existed must stay deleted when the older set arrives, and an older delete must not remove
    // a row set later.
    let db = fresh_database("delete_follow").await;
    let kafka = Kafka::start(PARTITIONS);
    let followed = Arc::new(last_order_engine(&db, &kafka.settings, small_batches()).await);
    rebuild(
        &followed,
        &["last_order".to_string()],
        &rebuild_options(),
        &CancellationToken::new(),
    )
    .await
    .expect("rebuild an empty log");
    write(&kafka.settings, &later);
    drain(followed.clone()).await;
    write(&kafka.settings, &earlier);
    drain(followed.clone()).await;
    let followed_pool = followed.catalog.pool().clone();
    assert_eq!(last_orders(&followed_pool).await, expected, "run");
    assert_eq!(
        checksum(&followed_pool, "public", "last_order", "customer_id").await,
        checksum(&rebuilt_pool, "public", "last_order", "customer_id").await,
    );

    // The deleted customers are remembered beside the table (tombstones), not in it.
    let schema: String = sqlx::query_scalar(
        "SELECT schema_name FROM reproject.builds WHERE projection = 'last_order' AND phase = 'active'",
    )
    .fetch_one(&followed_pool)
    .await
    .expect("active build");
    let clocks: i64 = sqlx::query_scalar(&format!(
        "SELECT count(*) FROM \"{schema}\".last_order__rp_clock"
    ))
    .fetch_one(&followed_pool)
    .await
    .expect("clock table");
    assert_eq!(clocks, 80);
}
