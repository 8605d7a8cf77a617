//! `replay`: one aggregate's timeline through every schema version, the verdict against a live row
//! that was tampered with, and partitioners that agree with the producers'.

use crate::common;

use std::collections::BTreeMap;

use common::*;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use reproject::engine::rebuild::rebuild;
use reproject::engine::timeline::{trace, Locate, Timeline, TraceOptions, Verdict};
use reproject::engine::EngineError;
use reproject::source::partitioner::Partitioner;
use reproject::source::producer::LogWriter;
use tokio_util::sync::CancellationToken;

/// An order placed in 2022 whose later events came in 2023-2024 and from 2025: stored as v1, v2 and
/// v3.
async fn an_order_that_crossed_all_versions(pool: &sqlx::PgPool) -> String {
    sqlx::query_scalar(
        "SELECT order_id FROM public.order_summary
         WHERE placed_at < '2023-01-01' AND paid_at BETWEEN '2023-01-01' AND '2025-01-01'
           AND updated_at >= '2025-01-01'
         ORDER BY order_id LIMIT 1",
    )
    .fetch_one(pool)
    .await
    .expect("the history has an order that lived from v1 to v3")
}

fn options(
    engine: &reproject::engine::Engine<reproject::domain::shop::ShopEvent>,
    id: &str,
    only: Option<&str>,
    locate: Locate,
) -> TraceOptions<reproject::domain::shop::ShopEvent> {
    TraceOptions {
        aggregate_id: id.to_string(),
        projections: match only {
            Some(name) => vec![engine.projection(name).expect("projection")],
            None => engine.projections.clone(),
        },
        locate,
        scratch: false,
    }
}

fn messages(timeline: &Timeline) -> Vec<Vec<String>> {
    timeline
        .events
        .iter()
        .map(|e| e.steps.iter().map(|s| s.message.clone()).collect())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_timeline_of_an_order_that_crossed_all_three_versions_shows_every_upcast_step() {
    let db = fresh_database("replay_timeline").await;
    let kafka = Kafka::start(4);
    append(&kafka.settings, &mut history(40_000, 5), 40_000);
    let engine = engine(&db, &kafka.settings, tuning()).await;
    rebuild_all(&engine).await.expect("rebuild");
    let pool = engine.catalog.pool().clone();
    let id = an_order_that_crossed_all_versions(&pool).await;

    let partitioner = Locate::Partitioner(Partitioner::ConsistentRandom);
    let timeline = trace(&engine, &options(&engine, &id, None, partitioner))
        .await
        .expect("replay");

    // Found through the aggregate index the rebuild recorded: only the order's own span is read.
    assert!(
        timeline.read.located_by.starts_with("aggregate index"),
        "{}",
        timeline.read.located_by
    );
    assert_eq!(timeline.read.ranges.len(), 1, "{:?}", timeline.read.ranges);
    let range = &timeline.read.ranges[0];
    assert_eq!(range.from, timeline.events[0].offset);
    assert_eq!(range.to, timeline.events.last().expect("events").offset + 1);

    let steps = messages(&timeline);
    assert_eq!(
        steps[0],
        [
            "shop.v1.OrderPlaced",
            "shop.v2.OrderPlaced",
            "shop.v3.OrderPlaced"
        ]
    );
    assert!(
        steps
            .iter()
            .any(|s| s == &["shop.v2.OrderPaid", "shop.v3.OrderPaid"]),
        "{steps:?}"
    );
    let last = steps.last().expect("events");
    assert!(
        last.len() == 1 && last[0].starts_with("shop.v3."),
        "the last event is stored as v3 and needs no step: {steps:?}"
    );
    // Each step's payload is shown as JSON in that version's own shape.
    let placed = &timeline.events[0].steps;
    assert!(
        placed[0].payload["user_id"].is_string(),
        "v1 has user_id: {}",
        placed[0].payload
    );
    assert!(
        placed[1].payload["customer_id"].is_string(),
        "v2 renamed it: {}",
        placed[1].payload
    );
    assert_eq!(
        placed[1].payload["currency"], "EUR",
        "v2 defaults the currency"
    );
    assert!(
        placed[2].payload["ship_to"]["city"].is_string(),
        "v3 nests the address: {}",
        placed[2].payload
    );
    assert_eq!(timeline.events[0].version, Some(1));

    // Every event changed order_summary's row, and the last row is what the live view holds.
    let sequences: Vec<u64> = timeline.events.iter().map(|e| e.sequence).collect();
    assert_eq!(sequences, (1..=sequences.len() as u64).collect::<Vec<_>>());
    assert!(timeline.sequence.is_clean());
    for event in &timeline.events {
        let summary = event
            .projections
            .iter()
            .find(|p| p.projection == "order_summary")
            .expect("order_summary");
        assert!(
            !summary.changes.is_empty(),
            "event {} changed nothing",
            event.offset
        );
        assert_eq!(summary.rows.len(), 1);
    }
    let order_row = timeline
        .comparisons
        .iter()
        .find(|c| c.projection == "order_summary")
        .expect("order_summary compared");
    assert_eq!(
        order_row.verdict,
        Verdict::Agree,
        "{:?}",
        order_row.differences
    );
    // Rows that gather other orders are shown, never judged.
    assert!(timeline
        .comparisons
        .iter()
        .filter(|c| c.projection != "order_summary")
        .all(|c| c.verdict == Verdict::SharedRow));

    // Without the index the key's partition is read whole, with the same result; --scan-all too.
    sqlx::query("DELETE FROM reproject.aggregate_index_coverage")
        .execute(&pool)
        .await
        .expect("drop coverage");
    for locate in [partitioner, Locate::ScanAll] {
        let again = trace(
            &engine,
            &options(&engine, &id, Some("order_summary"), locate),
        )
        .await
        .expect("replay without the index");
        assert_eq!(messages(&again), steps);
        assert!(again.read.records_scanned > timeline.read.records_scanned);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupted_live_row_is_reported_with_exactly_the_columns_that_differ() {
    let db = fresh_database("replay_corrupted").await;
    let kafka = Kafka::start(2);
    append(&kafka.settings, &mut history(10_000, 9), 10_000);
    let engine = engine(&db, &kafka.settings, tuning()).await;
    rebuild(
        &engine,
        &["order_summary".to_string()],
        &rebuild_options(),
        &CancellationToken::new(),
    )
    .await
    .expect("rebuild");
    let pool = engine.catalog.pool().clone();
    let (id, status, total): (String, String, i64) = sqlx::query_as(
        "SELECT order_id, status, total_cents FROM public.order_summary WHERE status = 'shipped' ORDER BY order_id LIMIT 1",
    )
    .fetch_one(&pool)
    .await
    .expect("a shipped order");
    let schema = schema_of(&pool, 1).await;
    sqlx::query(&format!(
        "UPDATE \"{schema}\".order_summary SET status = 'cancelled', total_cents = total_cents + 1 WHERE order_id = $1"
    ))
    .bind(&id)
    .execute(&pool)
    .await
    .expect("corrupt the row");

    let locate = Locate::Partitioner(Partitioner::ConsistentRandom);
    let timeline = trace(
        &engine,
        &options(&engine, &id, Some("order_summary"), locate),
    )
    .await
    .expect("replay");
    let verdict = &timeline.comparisons[0];
    assert_eq!(verdict.verdict, Verdict::Differ);
    let differing: BTreeMap<&str, (&str, &str)> = verdict
        .differences
        .iter()
        .map(|(c, a, b)| (c.as_str(), (a.as_str(), b.as_str())))
        .collect();
    let total_text = total.to_string();
    let total_plus_one = (total + 1).to_string();
    let status_text = format!("{status:?}");
    assert_eq!(
        differing,
        BTreeMap::from([
            ("status", (status_text.as_str(), "\"cancelled\"")),
            (
                "total_cents",
                (total_text.as_str(), total_plus_one.as_str())
            ),
        ])
    );

    // Replay wrote nothing to the projection: the corruption is still there.
    let still: String =
        sqlx::query_scalar("SELECT status FROM public.order_summary WHERE order_id = $1")
            .bind(&id)
            .fetch_one(&pool)
            .await
            .expect("row");
    assert_eq!(still, "cancelled");

    // --scratch puts the computed row where SQL can reach it.
    let mut with_scratch = options(&engine, &id, Some("order_summary"), locate);
    with_scratch.scratch = true;
    let timeline = trace(&engine, &with_scratch)
        .await
        .expect("replay with scratch");
    assert_eq!(
        timeline.scratch_schema.as_deref(),
        Some("rp_replay_order_summary")
    );
    let scratch: (String, i64) = sqlx::query_as(
        "SELECT status, total_cents FROM rp_replay_order_summary.order_summary WHERE order_id = $1",
    )
    .bind(&id)
    .fetch_one(&pool)
    .await
    .expect("scratch row");
    assert_eq!(scratch, (status, total));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_aggregate_with_no_events_is_an_error_naming_where_it_looked() {
    let db = fresh_database("replay_missing").await;
    let kafka = Kafka::start(2);
    append(&kafka.settings, &mut history(2_000, 3), 2_000);
    let engine = engine(&db, &kafka.settings, tuning()).await;
    let locate = Locate::Partitioner(Partitioner::ConsistentRandom);
    let error = trace(&engine, &options(&engine, "no-such-order", None, locate))
        .await
        .expect_err("nothing to replay");
    assert!(
        matches!(error, EngineError::NoSuchAggregate { .. }),
        "{error}"
    );
    let message = error.to_string();
    assert!(
        message.contains("\"no-such-order\"") && message.contains("shop.orders/"),
        "{message}"
    );
}

#[test]
fn both_partitioners_find_the_partition_the_producer_wrote_to() {
    let kafka = Kafka::start(7);
    let keys: Vec<String> = (0..300)
        .map(|i| format!("order-{i:05}-{}", i * 7919))
        .collect();
    for partitioner in [Partitioner::ConsistentRandom, Partitioner::Murmur2Random] {
        let topic = format!("partitioned.{}", partitioner.librdkafka_name());
        kafka.broker.create_topic(&topic, 7).expect("create topic");
        let mut writer = LogWriter::new(&kafka.settings, &topic, partitioner.librdkafka_name())
            .expect("producer");
        for key in &keys {
            writer.send(key, key.as_bytes()).expect("send");
        }
        writer.finish().expect("delivered");

        let consumer: BaseConsumer = kafka
            .settings
            .consumer("partitioner-test")
            .expect("consumer");
        kafka
            .settings
            .assign(
                &consumer,
                &reproject::source::Topics::new([topic.as_str()]).expect("topic"),
                &(0..7).map(|p| (p, 0)).collect(),
            )
            .expect("assign");
        let mut landed = BTreeMap::new();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while landed.len() < keys.len() && std::time::Instant::now() < deadline {
            if let Some(Ok(m)) = consumer.poll(std::time::Duration::from_millis(100)) {
                let key = String::from_utf8(m.key().expect("keyed").to_vec()).expect("utf8");
                landed.insert(key, m.partition());
            }
        }
        assert_eq!(
            landed.len(),
            keys.len(),
            "{partitioner:?}: every record read back"
        );
        let used: std::collections::BTreeSet<i32> = landed.values().copied().collect();
        assert!(used.len() > 3, "{partitioner:?} spread keys over {used:?}");
        for (key, partition) in &landed {
            assert_eq!(
                partitioner.partition(key.as_bytes(), 7),
                *partition,
                "{partitioner:?} put {key} on partition {partition}"
            );
        }
        drop(consumer.unassign());
    }
}
