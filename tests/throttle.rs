//! The throttle against a real PostgreSQL: it slows down and pauses when the probe's latency or a
//! load query of the operator's crosses its thresholds, and speeds up again when they fall; a
//! running follower really stops writing while throttled, says why in `status`, and takes settings
//! changed with `reproject tune` while it runs.

mod common;

use std::time::{Duration, Instant};

use common::*;
use reproject::engine::throttle::{LiveSettings, Throttle, ThrottleConfig, ThrottleState};

async fn set(pool: &sqlx::PgPool, sql: &str) {
    sqlx::query(sql).execute(pool).await.expect(sql);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_load_query_slows_the_rate_multiplicatively_pauses_at_the_limit_and_resumes_additively() {
    let db = fresh_database("throttle_load_query").await;
    let pool = pool(&db).await;
    set(&pool, "CREATE TABLE test_load (value float8 NOT NULL)").await;
    set(&pool, "INSERT INTO test_load VALUES (0)").await;
    let config = ThrottleConfig {
        check_every: Duration::from_millis(10),
        load_query: Some("SELECT value FROM test_load".into()),
        load_limit: 100.0,
        slow_at: 0.7,
        pause_at: 1.0,
        increase_step: 1_000.0,
        // Other signals must not interfere on a busy test machine.
        latency_factor: 1e6,
        max_active_backends: Some(1_000_000),
        ..ThrottleConfig::default()
    };
    let mut throttle = Throttle::new(config, &db);
    let live = LiveSettings::default();

    let first = throttle.check(&live, None).await.expect("check").clone();
    assert_eq!(first.state, ThrottleState::Running, "{}", first.reason);
    assert_eq!(first.reading.load_query, Some(0.0));

    // Writing at some rate, then the load crosses 70%: the rate is halved from what was reached.
    throttle.pace(20_000).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    set(&pool, "UPDATE test_load SET value = 80").await;
    let slowed = throttle.check(&live, None).await.expect("check").clone();
    assert_eq!(slowed.state, ThrottleState::Slowed, "{}", slowed.reason);
    let r1 = slowed.rate.expect("a rate");
    assert!(r1.is_finite() && r1 >= 100.0, "{r1}");
    assert!(
        slowed.reason.contains("load query") && slowed.reason.contains("80%"),
        "{}",
        slowed.reason
    );
    let again = throttle.check(&live, None).await.expect("check").clone();
    assert_eq!(again.state, ThrottleState::Slowed);
    let r2 = again.rate.expect("a rate");
    assert!(
        (r2 - (r1 / 2.0).max(100.0)).abs() < 1e-6,
        "halved: {r1} -> {r2}"
    );

    // At the limit: paused; below the limit but above 70%: still paused (no flapping).
    set(&pool, "UPDATE test_load SET value = 120").await;
    let paused = throttle.check(&live, None).await.expect("check").clone();
    assert_eq!(paused.state, ThrottleState::Paused, "{}", paused.reason);
    assert_eq!(paused.rate, None);
    assert!(paused.reason.contains("pause at 100%"), "{}", paused.reason);
    set(&pool, "UPDATE test_load SET value = 80").await;
    assert_eq!(
        throttle.check(&live, None).await.expect("check").state,
        ThrottleState::Paused
    );

    // Healthy again: it resumes at the rate it had, then adds a step per check.
    set(&pool, "UPDATE test_load SET value = 10").await;
    let resumed = throttle.check(&live, None).await.expect("check").clone();
    assert_eq!(resumed.state, ThrottleState::Running, "{}", resumed.reason);
    assert_eq!(resumed.rate, Some(r2));
    let up = throttle.check(&live, None).await.expect("check").clone();
    assert_eq!(up.rate, Some(r2 + 1_000.0));

    // Thresholds changed while running (`reproject tune`) apply at the next check.
    let stricter = LiveSettings {
        slow_at: Some(0.05),
        ..LiveSettings::default()
    };
    let tuned = throttle
        .check(&stricter, None)
        .await
        .expect("check")
        .clone();
    assert_eq!(tuned.state, ThrottleState::Slowed, "{}", tuned.reason);
    // And the rate never exceeds a cap.
    set(&pool, "UPDATE test_load SET value = 0").await;
    for _ in 0..3 {
        throttle.check(&live, Some(1_500)).await.expect("check");
    }
    assert_eq!(throttle.last().and_then(|d| d.rate), Some(1_500.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_probe_pauses_writes_until_its_latency_returns_to_the_baseline() {
    let db = fresh_database("throttle_probe").await;
    let pool = pool(&db).await;
    set(&pool, "CREATE TABLE probe_delay (seconds float8 NOT NULL)").await;
    set(&pool, "INSERT INTO probe_delay VALUES (0)").await;
    let config = ThrottleConfig {
        check_every: Duration::from_millis(10),
        probe_sql: "SELECT pg_sleep(seconds) FROM probe_delay".into(),
        latency_factor: 20.0,
        max_active_backends: Some(1_000_000),
        ..ThrottleConfig::default()
    };
    let mut throttle = Throttle::new(config, &db);
    let live = LiveSettings::default();
    for _ in 0..3 {
        throttle.check(&live, None).await.expect("baseline");
    }
    // The baseline is at least 1 ms, so the limit is at least 20 ms: 300 ms is far beyond it.
    set(&pool, "UPDATE probe_delay SET seconds = 0.3").await;
    let slow = throttle.check(&live, None).await.expect("check").clone();
    assert_eq!(slow.state, ThrottleState::Paused, "{}", slow.reason);
    assert!(slow.reason.contains("probe latency"), "{}", slow.reason);
    assert!(slow.reading.probe_ms >= 300.0);
    set(&pool, "UPDATE probe_delay SET seconds = 0").await;
    let back = throttle.check(&live, None).await.expect("check").clone();
    assert_eq!(back.state, ThrottleState::Running, "{}", back.reason);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_follower_stops_writing_while_throttled_and_takes_tuned_settings_live() {
    let db = fresh_database("throttle_follower").await;
    let kafka = Kafka::start(2);
    let mut history = history(16_000, 31);
    append(&kafka.settings, &mut history, 10_000);
    let engine = engine(&db, &kafka.settings, tuning()).await;
    let pool = engine.catalog.pool().clone();
    rebuild_all(&engine).await.expect("builds");
    set(&pool, "CREATE TABLE test_load (value float8 NOT NULL)").await;
    set(&pool, "INSERT INTO test_load VALUES (5)").await;
    append(&kafka.settings, &mut history, 3_000);

    let mut run = spawn_run(
        &db,
        &kafka,
        &[
            "--no-backfill",
            "--throttle-check-every",
            "0.2",
            "--throttle-load-query",
            "SELECT value FROM test_load",
            "--throttle-load-limit",
            "1",
        ],
    );

    // Load 500% of the limit: the follower waits, and status says why.
    wait_until(
        "the follower to report its throttle paused",
        30,
        || {
            scalar::<String>(
                &pool,
                "SELECT progress->'throttle'->>'state' FROM reproject.builds WHERE build_id = 1",
            )
        },
        |state| state.as_deref() == Some("paused"),
    )
    .await;
    assert_eq!(
        applied(&pool, 1).await,
        10_000,
        "nothing written while throttled"
    );
    let status = reproject(&db, &kafka, &["status"]);
    let shown = String::from_utf8_lossy(&status.stdout).into_owned();
    assert!(
        shown.contains("throttle paused") && shown.contains("load query"),
        "status explains the pause:\n{shown}"
    );

    // The load falls: it resumes and catches up.
    set(&pool, "UPDATE test_load SET value = 0").await;
    assert_eq!(
        wait_for_applied(&pool, 1, 13_000, 30).await,
        13_000,
        "resumed and caught up"
    );

    // A rate cap set with `tune` while it runs: 3,000 events at 1,000/s take seconds, not moments.
    let tuned = reproject(
        &db,
        &kafka,
        &[
            "tune",
            "order_summary",
            "--max-rate",
            "1000",
            "--batch-events",
            "250",
        ],
    );
    assert!(
        tuned.status.success(),
        "{}",
        String::from_utf8_lossy(&tuned.stderr)
    );
    let status = reproject(&db, &kafka, &["status"]);
    let shown = String::from_utf8_lossy(&status.stdout).into_owned();
    assert!(
        shown.contains(r#"tuned     {"max_rate":1000,"batch_events":250}"#),
        "{shown}"
    );
    // The follower takes the cap at its next check (within a second): its rate shows it.
    wait_until(
        "the follower to take the tuned rate cap",
        30,
        || {
            scalar::<f64>(
                &pool,
                "SELECT (progress->'throttle'->>'rate')::float8 FROM reproject.builds WHERE build_id = 1",
            )
        },
        |rate| rate.is_some_and(|r| r <= 1_000.0),
    )
    .await;
    let started = Instant::now();
    append(&kafka.settings, &mut history, 3_000);
    let reached = wait_for_applied(&pool, 1, 16_000, 30).await;
    let took = started.elapsed();
    assert_eq!(reached, 16_000);
    assert!(
        took >= Duration::from_millis(1_500),
        "capped at 1,000 events/s, took {took:?}"
    );

    stop(&mut run);
}
