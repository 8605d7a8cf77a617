//! Outages and contention: the broker going away and coming back mid-rebuild, brokers answering
//! fetches with errors, two writers wanting the same projection at once, and a COPY that makes no
//! progress.

use crate::common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
use reproject::domain::shop::totals::{actual_totals, differences};
use reproject::engine::rebuild::rebuild;
use reproject::engine::{holder_name, EngineError};
use reproject::sink::lock::writer_lock_subject;
use reproject::sink::lock::{AdvisoryLock, LockKind};
use tokio_util::sync::CancellationToken;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebuild_waits_out_a_broker_that_goes_away_and_comes_back_and_gives_correct_views() {
    let db = fresh_database("broker_down").await;
    let kafka = Kafka::start(4);
    let mut history = history(80_000, 17);
    append(&kafka.settings, &mut history, 80_000);
    let expected = history.expected();
    let engine = Arc::new(engine(&db, &kafka.settings, tuning()).await);
    let pool = engine.catalog.pool().clone();

    // Fetches fail first with errors a broker sends during a leader change, then the broker goes.
    let cluster = kafka.broker.cluster();
    cluster.request_errors(
        RDKafkaApiKey::Fetch,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_LEADER_FOR_PARTITION; 20],
    );
    // The rebuild future is not Send (it holds borrows across awaits): run it beside the outage.
    let finished = AtomicBool::new(false);
    let rebuild = async {
        let report = rebuild_all(&engine).await;
        finished.store(true, Ordering::SeqCst);
        report
    };
    let outage = async {
        // Take the broker down once the rebuild has started reading.
        wait_until(
            "the rebuild to start its replay",
            30,
            || {
                scalar::<bool>(
                    &pool,
                    "SELECT EXISTS (SELECT 1 FROM reproject.builds WHERE phase = 'loading')",
                )
            },
            |started| *started == Some(true),
        )
        .await;
        cluster.broker_down(1).expect("broker down");
        let down_at = Instant::now();
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert!(
            !finished.load(Ordering::SeqCst),
            "the rebuild finished while the broker was down"
        );
        cluster.broker_up(1).expect("broker up");
        down_at
    };
    let (report, down_at) = tokio::join!(rebuild, outage);
    let report = report.expect("rebuild after the outage");
    assert!(down_at.elapsed() >= Duration::from_secs(3));
    assert_eq!(report.events_replayed, 80_000);
    assert_eq!(report.swaps.len(), 3);
    let actual = actual_totals(&pool, "public").await.expect("totals");
    assert_eq!(differences(&expected, &actual), Vec::<String>::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_rebuild_of_the_same_projection_refuses_naming_the_first() {
    let db = fresh_database("two_rebuilds").await;
    let kafka = Kafka::start(2);
    append(&kafka.settings, &mut history(2_000, 3), 2_000);
    let engine = engine(&db, &kafka.settings, tuning()).await;

    // Another process is rebuilding order_summary.
    let first = AdvisoryLock::try_acquire(
        &db,
        LockKind::Rebuild,
        "order_summary",
        "reproject rebuild pid=4242 host=elsewhere",
    )
    .await
    .expect("the first rebuild's lock");
    let err = rebuild(
        &engine,
        &["customer_stats".to_string(), "order_summary".to_string()],
        &rebuild_options(),
        &CancellationToken::new(),
    )
    .await
    .expect_err("a second rebuild of order_summary");
    let message = err.to_string();
    assert!(
        message.contains("order_summary") && message.contains("pid=4242 host=elsewhere"),
        "{message}"
    );
    // It refused before doing anything: no build of either projection was started.
    let builds: i64 = sqlx::query_scalar("SELECT count(*) FROM reproject.builds")
        .fetch_one(engine.catalog.pool())
        .await
        .expect("count");
    assert_eq!(builds, 0);

    // Once the first is done, the same command goes through.
    first.release().await;
    rebuild(
        &engine,
        &["order_summary".to_string()],
        &rebuild_options(),
        &CancellationToken::new(),
    )
    .await
    .expect("the rebuild, now alone");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_and_rebuild_never_write_the_same_build_at_once() {
    let db = fresh_database("one_writer").await;
    let kafka = Kafka::start(2);
    let mut history = history(4_000, 5);
    append(&kafka.settings, &mut history, 3_000);
    let engine = Arc::new(engine(&db, &kafka.settings, tuning()).await);
    let report = rebuild_all(&engine).await.expect("rebuild");
    append(&kafka.settings, &mut history, 1_000);

    // Someone else (a `run`) is writing order_summary's active build.
    let build = engine
        .catalog
        .build(report.builds[0])
        .await
        .expect("the build");
    let held = AdvisoryLock::try_acquire(
        &db,
        LockKind::Writer,
        &writer_lock_subject(&build),
        &holder_name("run"),
    )
    .await;
    let held = match held {
        Ok(lock) => lock,
        Err(e) => panic!("taking the writer lock of build {}: {e}", build.build_id),
    };
    let options = reproject::engine::run::RunOptions {
        backfill: false,
        rebuild: rebuild_options(),
        exit_when_caught_up: Some(0),
        shared: false,
    };
    let err = reproject::engine::run::run(engine.clone(), options, CancellationToken::new())
        .await
        .expect_err("a second writer of the same build");
    assert!(
        matches!(&err, EngineError::Lock(_)) || err.to_string().contains("already locked"),
        "{err}"
    );
    assert!(err.to_string().contains("reproject run pid="), "{err}");
    held.release().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebuild_against_a_broker_that_cannot_be_reached_creates_nothing() {
    let db = fresh_database("no_broker").await;
    let unreachable = reproject::source::KafkaSettings {
        // Nothing listens on port 1.
        brokers: "127.0.0.1:1".into(),
        properties: Vec::new(),
    };
    let engine = engine(&db, &unreachable, tuning()).await;
    let err = rebuild_all(&engine)
        .await
        .expect_err("no broker to read from");
    assert!(!matches!(err, EngineError::Interrupted), "{err}");
    let builds: i64 = sqlx::query_scalar("SELECT count(*) FROM reproject.builds")
        .fetch_one(engine.catalog.pool())
        .await
        .expect("count");
    assert_eq!(
        builds, 0,
        "no build was created for a log that cannot be read: {err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_that_makes_no_progress_stops_with_an_error_naming_its_table_instead_of_hanging() {
    use reproject::projection::Value;
    use reproject::sink::writer::copy_into_within;
    use sqlx::Connection;

    let db = fresh_database("copy_stall").await;
    let pool = pool(&db).await;
    sqlx::query("CREATE TABLE stalled (id bigint)")
        .execute(&pool)
        .await
        .expect("a table");
    // Another session holds the table, so the COPY cannot even start: no progress, as when a
    // connection stalls.
    let mut holder = pool.begin().await.expect("a transaction");
    sqlx::query("LOCK TABLE stalled IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *holder)
        .await
        .expect("lock");
    let mut conn = sqlx::PgConnection::connect(&db).await.expect("connect");
    let rows = [[Value::BigInt(1)]];
    let started = Instant::now();
    let error = copy_into_within(
        &mut conn,
        "stalled",
        1,
        rows.iter(),
        |r| r.as_slice(),
        Duration::from_secs(1),
    )
    .await
    .err()
    .map(|e| e.to_string())
    .unwrap_or_default();
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "gave up after {:?}",
        started.elapsed()
    );
    assert!(
        error.contains("starting COPY into stalled: no progress for 1 s"),
        "{error}"
    );
    holder.rollback().await.expect("rollback");
}
