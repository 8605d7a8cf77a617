//! The throttle against a real PostgreSQL: it slows down and pauses when the probe's latency or a
//! load query of the operator's crosses its thresholds, and speeds up again when they fall; a
//! running follower really stops writing while throttled, says why in `status`, and takes settings
//! changed with `reproject tune` while it runs. With PostgreSQL's own benchmark (pgbench) as
//! production on the same server, a catch-up and a whole rebuild leave full speed while it runs,
//! naming what production lost, and speed up again once it stops.

mod common;

use std::time::{Duration, Instant};

use common::*;
use reproject::engine::throttle::{
    Governor, ImpactBudget, LiveSettings, Throttle, ThrottleConfig, ThrottleState,
};

/// The throttle watches the whole server: a test that needs no other production backend takes it
/// alone, the others share it.
static SERVER: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

async fn set(pool: &sqlx::PgPool, sql: &str) {
    sqlx::query(sql).execute(pool).await.expect(sql);
}

/// A production backend that stays active (in `pg_sleep`) while the guard lives: production is
/// present, so the throttle judges its budget signals.
struct ActiveBackend {
    pid: i32,
    pool: sqlx::PgPool,
}

impl ActiveBackend {
    async fn start(pool: &sqlx::PgPool) -> ActiveBackend {
        let mut conn = pool.acquire().await.expect("a connection").detach();
        let pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
            .fetch_one(&mut conn)
            .await
            .expect("pid");
        tokio::spawn(async move {
            let _ = sqlx::query("SELECT pg_sleep(60)").execute(&mut conn).await;
        });
        ActiveBackend {
            pid,
            pool: pool.clone(),
        }
    }

    async fn stop(self) {
        set(
            &self.pool,
            &format!("SELECT pg_terminate_backend({})", self.pid),
        )
        .await;
    }
}

/// Only the signals a test sets up count: the budget is out of reach, and so is "production grew".
fn only_explicit_signals() -> ThrottleConfig {
    ThrottleConfig {
        check_every: Duration::from_millis(10),
        budget: ImpactBudget {
            throughput_loss: 1e6,
            latency_rise: 1e6,
        },
        min_production_tps: 1e9,
        max_active_backends: Some(1_000_000),
        ..ThrottleConfig::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_load_query_slows_the_rate_multiplicatively_pauses_at_the_limit_and_resumes_additively() {
    let _shared = SERVER.read().await;
    let db = fresh_database("throttle_load_query").await;
    let pool = pool(&db).await;
    set(&pool, "CREATE TABLE test_load (value float8 NOT NULL)").await;
    set(&pool, "INSERT INTO test_load VALUES (0)").await;
    let config = ThrottleConfig {
        load_query: Some("SELECT value FROM test_load".into()),
        load_limit: 100.0,
        slow_at: 0.7,
        pause_at: 1.0,
        increase_step: 1_000.0,
        ..only_explicit_signals()
    };
    // Production is there (else the throttle lifts the rate limit as soon as the load falls).
    let production = ActiveBackend::start(&pool).await;
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

    // Healthy again: it resumes at half the rate that led to the pause, then adds a step per
    // check.
    set(&pool, "UPDATE test_load SET value = 10").await;
    let resumed = throttle.check(&live, None).await.expect("check").clone();
    assert_eq!(resumed.state, ThrottleState::Running, "{}", resumed.reason);
    let r3 = (r2 / 2.0).max(100.0);
    assert_eq!(resumed.rate, Some(r3));
    let up = throttle.check(&live, None).await.expect("check").clone();
    assert_eq!(up.rate, Some(r3 + 1_000.0));

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

    // Production gone and every signal low: nobody to protect, no limit but the cap.
    production.stop().await;
    // Other tests' connections count as production too: wait for a check without any.
    let deadline = Instant::now() + Duration::from_secs(60);
    let free = loop {
        let d = throttle.check(&live, None).await.expect("check").clone();
        if !d.reading.figures.production_active || Instant::now() > deadline {
            break d;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(free.state, ThrottleState::Running, "{}", free.reason);
    assert!(
        free.rate.is_some_and(f64::is_infinite),
        "{:?}: {}",
        free.rate,
        free.reason
    );
    assert!(
        free.reason.contains("no production traffic"),
        "{}",
        free.reason
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn production_arriving_beside_full_speed_writes_holds_them_within_the_window_not_at_its_end()
{
    // Production is every other backend of the server: the other tests' must not be there.
    let _alone = SERVER.write().await;
    let db = fresh_database("throttle_arrival").await;
    let pool = pool(&db).await;
    // A long window: the check that ends it comes 6 s after the first; production arriving must
    // be acted on well before that.
    let window = Duration::from_secs(6);
    let config = ThrottleConfig {
        check_every: window,
        ..ThrottleConfig::default()
    };
    let governor = Governor::start(config, &db, None);
    let first = wait_until(
        "the throttle's first decision",
        10,
        || std::future::ready(governor.last()),
        |d| d.is_some(),
    )
    .await
    .expect("a decision");
    assert_eq!(first.state, ThrottleState::Running, "{}", first.reason);
    assert!(
        first.rate.is_some_and(f64::is_infinite),
        "nobody to protect: {first:?}"
    );
    // Writing at full speed when production arrives.
    governor.pace(1_000).await;
    let arrived = Instant::now();
    let production = ActiveBackend::start(&pool).await;
    let held = wait_until(
        "writes held once production arrived",
        10,
        || std::future::ready(governor.holds_writes()),
        |held| *held,
    )
    .await;
    let after = arrived.elapsed();
    assert!(held);
    assert!(
        after < window / 2,
        "production was acted on {after:?} after it arrived: a window is {window:?}"
    );
    let reason = governor.last().map(|d| d.reason).unwrap_or_default();
    assert!(reason.contains("production became active"), "{reason}");
    production.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn production_that_cannot_be_measured_alone_is_not_written_beside_at_full_speed() {
    let _shared = SERVER.read().await;
    let db = fresh_database("throttle_unmeasured").await;
    let pool = pool(&db).await;
    let production = ActiveBackend::start(&pool).await;
    let config = ThrottleConfig {
        check_every: Duration::from_secs(3),
        ..ThrottleConfig::default()
    };
    let mut throttle = Throttle::new(config, &db);
    let live = LiveSettings::default();
    // A statement that cannot be paced (an index build) runs through every window: none is quiet,
    // so production is never measured alone, and the throttle stops waiting for it after a few
    // windows.
    let busy = throttle.activity().busy();
    let mut decision = throttle.check(&live, None).await.expect("check").clone();
    for _ in 0..10 {
        if decision.state != ThrottleState::Measuring {
            break;
        }
        decision = throttle.check(&live, None).await.expect("check").clone();
    }
    assert_eq!(decision.state, ThrottleState::Slowed, "{}", decision.reason);
    assert!(
        decision.reason.contains("not measured alone"),
        "{}",
        decision.reason
    );
    assert!(
        decision.rate.is_some_and(f64::is_finite),
        "a limited rate: {decision:?}"
    );
    drop(busy);
    production.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_probe_pauses_writes_until_its_latency_returns_to_the_baseline() {
    let _shared = SERVER.read().await;
    let db = fresh_database("throttle_probe").await;
    let pool = pool(&db).await;
    set(&pool, "CREATE TABLE probe_delay (seconds float8 NOT NULL)").await;
    set(&pool, "INSERT INTO probe_delay VALUES (0)").await;
    let config = ThrottleConfig {
        probe_sql: "SELECT pg_sleep(seconds) FROM probe_delay".into(),
        budget: ImpactBudget {
            throughput_loss: 1e6,
            latency_rise: 0.5,
        },
        ..only_explicit_signals()
    };
    let production = ActiveBackend::start(&pool).await;
    let mut throttle = Throttle::new(config, &db);
    let live = LiveSettings::default();
    // Quiet checks (nothing written): production's latency alone, with no floor under it.
    for _ in 0..3 {
        throttle.check(&live, None).await.expect("baseline");
    }
    let alone = throttle
        .last()
        .and_then(|d| d.reading.alone.clone())
        .expect("measured alone");
    assert!(
        alone.production_active && alone.probe_ms < 300.0,
        "{alone:?}"
    );
    // While writing, the probe takes 300 ms: far beyond +50% of what production saw alone.
    set(&pool, "UPDATE probe_delay SET seconds = 0.3").await;
    throttle.pace(1).await;
    let slow = throttle.check(&live, None).await.expect("check").clone();
    assert_eq!(slow.state, ThrottleState::Paused, "{}", slow.reason);
    assert!(slow.reason.contains("probe latency p50"), "{}", slow.reason);
    assert!(slow.reading.probe_ms >= 300.0);
    set(&pool, "UPDATE probe_delay SET seconds = 0").await;
    // Back to its baseline: writing resumes. (A sub-millisecond probe on a machine busy with the
    // other tests can sit above +50% for a check or two: a few seconds of checks.)
    let deadline = Instant::now() + Duration::from_secs(5);
    let back = loop {
        let d = throttle.check(&live, None).await.expect("check").clone();
        if d.state == ThrottleState::Running || Instant::now() > deadline {
            break d;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(back.state, ThrottleState::Running, "{}", back.reason);
    assert!(back.reading.probe_ms < 300.0);
    production.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_probe_that_is_slow_alone_too_is_not_reproject_s_doing() {
    let _shared = SERVER.read().await;
    let db = fresh_database("throttle_slow_alone").await;
    let pool = pool(&db).await;
    set(&pool, "CREATE TABLE probe_delay (seconds float8 NOT NULL)").await;
    set(&pool, "INSERT INTO probe_delay VALUES (0.05)").await;
    let config = ThrottleConfig {
        probe_sql: "SELECT pg_sleep(seconds) FROM probe_delay".into(),
        budget: ImpactBudget {
            throughput_loss: 1e6,
            latency_rise: 0.5,
        },
        ..only_explicit_signals()
    };
    let production = ActiveBackend::start(&pool).await;
    let mut throttle = Throttle::new(config, &db);
    let live = LiveSettings::default();
    throttle.check(&live, None).await.expect("baseline");
    // Writing, and the probe is as slow as it was alone: within budget, and the rate grows.
    throttle.pace(1).await;
    let writing = throttle.check(&live, None).await.expect("check").clone();
    assert_eq!(writing.state, ThrottleState::Running, "{}", writing.reason);
    assert!(
        writing.reason.contains("within budget"),
        "{}",
        writing.reason
    );
    production.stop().await;
}

/// `run`, checking its throttle five times a second against `test_load` (loaded at 1).
const THROTTLED_BY_TEST_LOAD: [&str; 7] = [
    "--no-backfill",
    "--throttle-check-every",
    "0.2",
    "--throttle-load-query",
    "SELECT value FROM test_load",
    "--throttle-load-limit",
    "1",
];

/// Builds of the first 10,000 events of a history of `events`, a table `test_load` holding `load`
/// for `--throttle-load-query`, and `backlog` more events in the log for a follower.
async fn built_with_a_backlog(
    name: &str,
    events: u64,
    seed: u64,
    backlog: u64,
    load: f64,
) -> (
    String,
    Kafka,
    reproject::domain::shop::generator::History,
    sqlx::PgPool,
) {
    let db = fresh_database(name).await;
    let kafka = Kafka::start(2);
    let mut history = history(events, seed);
    append(&kafka.settings, &mut history, 10_000);
    let engine = engine(&db, &kafka.settings, tuning()).await;
    let pool = engine.catalog.pool().clone();
    rebuild_all(&engine).await.expect("builds");
    set(&pool, "CREATE TABLE test_load (value float8 NOT NULL)").await;
    set(&pool, &format!("INSERT INTO test_load VALUES ({load})")).await;
    append(&kafka.settings, &mut history, backlog);
    (db, kafka, history, pool)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_follower_stops_writing_while_throttled_and_takes_tuned_settings_live() {
    let _shared = SERVER.read().await;
    let (db, kafka, mut history, pool) =
        built_with_a_backlog("throttle_follower", 16_000, 31, 3_000, 5.0).await;

    let mut run = spawn_run(&db, &kafka, &THROTTLED_BY_TEST_LOAD);

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
    // 3,000 events at 1,000/s is 3 s of pacing, less the second of credit the pacer grants after
    // idling, less the last batch's 250 ms pause, which comes after its commit (the follower
    // publishes first): at least ~1.75 s. Uncapped, they apply in a small fraction of a second.
    assert!(
        took >= Duration::from_millis(1_000),
        "capped at 1,000 events/s, took {took:?}"
    );

    stop(&mut run);
}

/// A Prometheus counter's or gauge's value (0 before it is first set).
fn counter(metrics: &str, name: &str) -> f64 {
    metrics
        .lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_under_way_when_writes_are_held_is_stopped_there_and_written_again_once() {
    // The writer waiting on a lock is a wait the throttle sees on the server: the other tests'
    // throttles must not see it.
    let _alone = SERVER.write().await;
    let (db, kafka, history, pool) =
        built_with_a_backlog("throttle_cut_short", 15_000, 37, 5_000, 0.0).await;

    // Production holds a lock on one of the build's tables: the follower's batch gets as far as
    // writing its rows back, and waits there, in the middle of its transaction.
    let schema: String =
        sqlx::query_scalar("SELECT schema_name FROM reproject.builds WHERE build_id = 1")
            .fetch_one(&pool)
            .await
            .expect("build 1");
    let mut holder = pool.acquire().await.expect("a connection").detach();
    set_on(&mut holder, "BEGIN").await;
    set_on(
        &mut holder,
        &format!("LOCK TABLE \"{schema}\".order_summary IN SHARE MODE"),
    )
    .await;

    let metrics_addr = free_local_addr();
    let mut run = spawn_run(
        &db,
        &kafka,
        &[
            &THROTTLED_BY_TEST_LOAD[..],
            &["--metrics-addr", &metrics_addr],
        ]
        .concat(),
    );
    wait_until(
        "the follower's batch to wait on the lock",
        30,
        || scalar::<i64>(&pool, "SELECT count(*) FROM pg_locks WHERE NOT granted"),
        |waiting| waiting.is_some_and(|n| n > 0),
    )
    .await;

    // The operator's load query says the database is overloaded: writes are held, and the batch
    // under way is stopped where it stands rather than finished.
    set(&pool, "UPDATE test_load SET value = 5").await;
    let (_, metrics) = wait_until(
        "the batch under way to be cut short",
        30,
        || async { try_http_get(&metrics_addr, "/metrics").unwrap_or_default() },
        |(_, metrics)| counter(metrics, "reproject_batches_cut_short_total") >= 1.0,
    )
    .await;
    assert_eq!(
        counter(&metrics, "reproject_throttle_state"),
        2.0,
        "paused:\n{metrics}"
    );
    assert_eq!(
        scalar::<i64>(&pool, "SELECT count(*) FROM pg_locks WHERE NOT granted").await,
        Some(0),
        "the stopped batch no longer waits"
    );
    assert_eq!(applied(&pool, 1).await, 10_000, "nothing of it committed");

    // The lock goes, the load falls: the batch is written again, once.
    set_on(&mut holder, "COMMIT").await;
    set(&pool, "UPDATE test_load SET value = 0").await;
    assert_eq!(wait_for_applied(&pool, 1, 15_000, 60).await, 15_000);
    stop(&mut run);
    let expected = history.expected();
    let actual = reproject::domain::shop::totals::actual_totals(&pool, "public")
        .await
        .expect("totals");
    assert_eq!(
        reproject::domain::shop::totals::differences(&expected, &actual),
        Vec::<String>::new()
    );
}

async fn set_on(conn: &mut sqlx::PgConnection, sql: &str) {
    sqlx::query(sql).execute(conn).await.expect(sql);
}
