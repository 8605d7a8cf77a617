//! Rebuilding projections from the log: correctness against independently computed totals,
//! determinism, events arriving during the rebuild, and refusing a truncated log.

use crate::common;

use std::sync::Arc;

use common::*;
use reproject::domain::shop::totals::{actual_totals, differences};
use reproject::engine::rebuild::{rebuild, RebuildOptions};
use reproject::engine::{EngineError, Tuning};
use tokio_util::sync::CancellationToken;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rebuilt_views_equal_the_generators_totals_across_all_three_schema_versions() {
    let db = fresh_database("totals").await;
    let kafka = Kafka::start(4);
    let mut history = history(60_000, 7);
    append(&kafka.settings, &mut history, 60_000);
    let expected = history.expected();
    for version in ["v1", "v2", "v3"] {
        assert!(
            expected
                .events_by_version
                .get(version)
                .copied()
                .unwrap_or(0)
                > 1_000,
            "history lacks {version}: {:?}",
            expected.events_by_version
        );
    }

    let engine = engine(&db, &kafka.settings, tuning()).await;
    let report = rebuild_all(&engine).await.expect("rebuild");

    assert_eq!(report.events_replayed, 60_000);
    assert_eq!(report.swaps.len(), 3);
    let actual = actual_totals(engine.catalog.pool(), "public")
        .await
        .expect("totals");
    assert_eq!(differences(&expected, &actual), Vec::<String>::new());
    assert_eq!(actual.orders, expected.orders);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rebuilding_the_same_log_twice_gives_identical_tables() {
    let db = fresh_database("determinism").await;
    let kafka = Kafka::start(4);
    append(&kafka.settings, &mut history(30_000, 11), 30_000);
    let engine = engine(&db, &kafka.settings, tuning()).await;
    let pool = engine.catalog.pool().clone();

    let first = rebuild_all(&engine).await.expect("first");
    let second = rebuild_all(&engine).await.expect("second");
    assert_ne!(
        first.builds, second.builds,
        "the second rebuild made new builds"
    );

    assert_same_rows(&pool, &first.builds, &second.builds, "the second rebuild").await;
    // The second swap retired the first builds, which stay for rollback.
    let retired: i64 =
        sqlx::query_scalar("SELECT count(*) FROM reproject.builds WHERE phase = 'retired'")
            .fetch_one(&pool)
            .await
            .expect("count");
    assert_eq!(retired, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_appended_during_a_rebuild_are_in_the_new_view_once_each() {
    let db = fresh_database("live_events").await;
    let kafka = Kafka::start(4);
    let mut history = history(80_000, 5);
    append(&kafka.settings, &mut history, 60_000);
    let producer = append_in_background(&kafka.settings, history, 20_000, 10_000);

    let engine = Arc::new(engine(&db, &kafka.settings, tuning()).await);
    let report = rebuild_all(&engine).await.expect("rebuild");
    let history = producer.join().expect("producer");
    drain(engine.clone()).await;

    assert!(report.events_replayed >= 60_000);
    let expected = history.expected();
    assert_eq!(expected.events, 80_000);
    let actual = actual_totals(engine.catalog.pool(), "public")
        .await
        .expect("totals");
    assert_eq!(
        differences(&expected, &actual),
        Vec::<String>::new(),
        "counters would double if an event were applied twice"
    );
    // Each order's row has seen exactly its last event: no event skipped or applied out of turn.
    let applied: i64 =
        sqlx::query_scalar("SELECT sum(last_sequence)::bigint FROM public.order_summary")
            .fetch_one(engine.catalog.pool())
            .await
            .expect("sum");
    assert_eq!(
        applied, 80_000,
        "the sequence numbers of the last events add up to every event"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_that_no_longer_starts_at_offset_zero_is_refused() {
    let db = fresh_database("truncated").await;
    let kafka = Kafka::start(1);
    // The mock keeps 5 MiB per partition and drops the oldest batches beyond that, as retention does.
    let producer: rdkafka::producer::BaseProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &kafka.settings.brokers)
        .set("compression.type", "none")
        .set("linger.ms", "0")
        .create()
        .expect("producer");
    let noise: Vec<u8> = (0..200_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    for _ in 0..40 {
        producer
            .send(
                rdkafka::producer::BaseRecord::<str, [u8]>::to(TOPIC)
                    .key("k")
                    .payload(&noise),
            )
            .expect("send");
        rdkafka::producer::Producer::flush(&producer, std::time::Duration::from_secs(10))
            .expect("flush");
    }
    let engine = engine(&db, &kafka.settings, tuning()).await;
    let error = rebuild(
        &engine,
        &["order_summary".to_string()],
        &rebuild_options(),
        &CancellationToken::new(),
    )
    .await
    .expect_err("a truncated log must be refused");
    assert!(
        matches!(error, EngineError::TruncatedHistory { .. }),
        "{error}"
    );
    let message = error.to_string();
    assert!(
        message.contains("partition shop.orders/0 starts at")
            && message.contains("--allow-truncated-history"),
        "{message}"
    );
    let views: i64 =
        sqlx::query_scalar("SELECT count(*) FROM pg_views WHERE schemaname = 'public'")
            .fetch_one(engine.catalog.pool())
            .await
            .expect("count");
    assert_eq!(views, 0, "nothing was swapped in");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_of_unknown_type_stops_the_rebuild_naming_where_it_is_and_who_read_it() {
    use prost::Message;
    use reproject::proto::reproject::v1::EventEnvelope;
    let db = fresh_database("unknown_type").await;
    let kafka = Kafka::start(1);
    append(&kafka.settings, &mut history(1_000, 9), 1_000);
    let envelope = EventEnvelope {
        event_id: vec![7; 16],
        aggregate_type: "Order".into(),
        aggregate_id: "o-future".into(),
        sequence: 1,
        occurred_at: Some(prost_types::Timestamp {
            seconds: 1_800_000_000,
            nanos: 0,
        }),
        payload: Some(prost_types::Any {
            type_url: "type.googleapis.com/shop.v9.OrderPlaced".into(),
            value: vec![],
        }),
        metadata: Default::default(),
    };
    let mut writer =
        reproject::source::producer::LogWriter::new(&kafka.settings, TOPIC, "consistent_random")
            .expect("producer");
    writer
        .send("o-future", &envelope.encode_to_vec())
        .expect("send");
    writer.finish().expect("delivered");

    let engine = engine(&db, &kafka.settings, tuning()).await;
    let error = rebuild_all(&engine)
        .await
        .expect_err("an unknown type must stop the rebuild");
    let message = error.to_string();
    for part in [
        "shop.orders/0 at offset 1000",
        "type.googleapis.com/shop.v9.OrderPlaced",
        "version 9",
        "order_summary",
        "customer_stats",
        "daily_sales",
        "no upcaster knows",
    ] {
        assert!(message.contains(part), "missing {part:?} in: {message}");
    }
    let active: i64 =
        sqlx::query_scalar("SELECT count(*) FROM reproject.builds WHERE phase = 'active'")
            .fetch_one(engine.catalog.pool())
            .await
            .expect("count");
    assert_eq!(active, 0, "nothing went live");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fold_over_its_memory_budget_spills_to_postgres_and_gives_the_same_tables() {
    let db = fresh_database("spill").await;
    let kafka = Kafka::start(4);
    let mut history = history(60_000, 13);
    append(&kafka.settings, &mut history, 60_000);
    let expected = history.expected();
    let engine = engine(&db, &kafka.settings, tuning()).await;
    let pool = engine.catalog.pool().clone();

    let in_memory = rebuild_all(&engine).await.expect("rebuild in memory");
    assert_eq!(in_memory.spills, 0);
    let full_fold = in_memory.peak_fold_bytes as usize;
    assert!(full_fold > 1_000_000, "the fold held {full_fold} bytes");

    let budget = full_fold / 10;
    let options = RebuildOptions {
        memory_budget: Some(budget),
        ..rebuild_options()
    };
    let spilled = rebuild(
        &engine,
        &all_projections(),
        &options,
        &CancellationToken::new(),
    )
    .await
    .expect("rebuild within a tenth of the memory");

    // Each of the three builds flushed several times, and the fold never held much more than the
    // budget (it is checked between steps of a few batches).
    assert!(spilled.spills >= 3 * 3, "only {} spills", spilled.spills);
    assert!(
        (spilled.peak_fold_bytes as usize) < full_fold / 3,
        "the fold peaked at {} bytes with a budget of {budget} (unbounded: {full_fold})",
        spilled.peak_fold_bytes
    );
    assert_eq!(spilled.events_replayed, 60_000);
    assert_eq!(spilled.rows_loaded, in_memory.rows_loaded);

    let schemas = assert_same_rows(
        &pool,
        &in_memory.builds,
        &spilled.builds,
        "the spilled build",
    )
    .await;
    for sb in schemas {
        // The spill's own key index is gone; indexes.sql's primary key took its place.
        let spill_indexes: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_indexes WHERE schemaname = $1 AND indexname LIKE 'rp_spill_%'",
        )
        .bind(&sb)
        .fetch_one(&pool)
        .await
        .expect("indexes");
        assert_eq!(spill_indexes, 0, "{sb} kept its spill index");
    }
    let actual = actual_totals(&pool, "public").await.expect("totals");
    assert_eq!(differences(&expected, &actual), Vec::<String>::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebuild_over_its_disk_budget_stops_saying_so_and_the_next_run_resumes() {
    let db = fresh_database("disk_budget").await;
    let kafka = Kafka::start(4);
    let mut history = history(20_000, 19);
    append(&kafka.settings, &mut history, 20_000);
    let engine = engine(&db, &kafka.settings, tuning()).await;
    let options = RebuildOptions {
        disk_budget: Some(64 * 1024),
        ..rebuild_options()
    };
    let err = rebuild(
        &engine,
        &all_projections(),
        &options,
        &CancellationToken::new(),
    )
    .await
    .expect_err("over the disk budget");
    let message = err.to_string();
    assert!(matches!(err, EngineError::DiskBudget { .. }), "{message}");
    assert!(
        message.contains("over the disk budget of 65536") && message.contains("--disk-budget"),
        "{message}"
    );
    // Its load is committed: the next run, with room, does not replay again.
    let report = rebuild_all(&engine).await.expect("resumed with room");
    assert_eq!(report.events_replayed, 0);
    assert_eq!(report.swaps.len(), 3);
    let actual = actual_totals(engine.catalog.pool(), "public")
        .await
        .expect("totals");
    assert_eq!(
        differences(&history.expected(), &actual),
        Vec::<String>::new()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readers_folding_their_own_batches_build_the_tables_one_fold_thread_builds() {
    let db = fresh_database("fold_in_readers").await;
    let kafka = Kafka::start(8);
    let mut history = history(40_000, 17);
    append(&kafka.settings, &mut history, 40_000);
    let expected = history.expected();
    let one_thread = engine(&db, &kafka.settings, tuning()).await;
    let pool = one_thread.catalog.pool().clone();
    let by_thread = rebuild_all(&one_thread)
        .await
        .expect("rebuild, one fold thread");

    // Three readers on eight partitions, in small batches: their folds into the shared shards
    // interleave, and rows of customer_stats and daily_sales gather several readers' partitions.
    let readers = engine(
        &db,
        &kafka.settings,
        Tuning {
            fold_in_readers: true,
            replay_readers: 3,
            batch_events: 700,
            ..tuning()
        },
    )
    .await;
    let by_readers = rebuild_all(&readers).await.expect("rebuild, readers fold");
    assert_eq!(by_readers.events_replayed, 40_000);
    assert_eq!(by_readers.rows_loaded, by_thread.rows_loaded);
    assert!(
        by_readers.peak_fold_bytes > 0,
        "the shards' size is reported"
    );

    assert_same_rows(
        &pool,
        &by_thread.builds,
        &by_readers.builds,
        "the readers' fold",
    )
    .await;
    let actual = actual_totals(&pool, "public").await.expect("totals");
    assert_eq!(differences(&expected, &actual), Vec::<String>::new());
}

/// Assert that `b`'s builds hold row for row what `a`'s hold (one build per shop table each, in
/// `rebuild_all`'s order) and that none is empty; returns `b`'s schemas.
async fn assert_same_rows(pool: &sqlx::PgPool, a: &[i64], b: &[i64], what: &str) -> Vec<String> {
    let tables = [
        ("order_summary", "order_id"),
        ("customer_stats", "customer_id"),
        ("daily_sales", "day, currency"),
    ];
    assert_eq!((a.len(), b.len()), (tables.len(), tables.len()));
    let mut schemas = Vec::new();
    for ((table, key), (a, b)) in tables.iter().zip(a.iter().zip(b)) {
        let (sa, sb) = (schema_of(pool, *a).await, schema_of(pool, *b).await);
        let (ca, cb) = (
            checksum(pool, &sa, table, key).await,
            checksum(pool, &sb, table, key).await,
        );
        assert_ne!(ca, "empty", "{table} is empty");
        assert_eq!(ca, cb, "{table}: {what} (build {b}) differs from build {a}");
        schemas.push(sb);
    }
    schemas
}
