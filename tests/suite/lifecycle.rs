//! After the swap: rolling back to the previous build, and dropping the builds nobody needs.

use crate::common;

use std::sync::Arc;

use common::*;
use reproject::domain::shop::totals::{actual_totals, differences};
use reproject::domain::shop::{self, ShopEvent};
use reproject::engine::rebuild::{catch_up_and_swap, rebuild};
use reproject::engine::Engine;
use reproject::projection::{Changes, DynProjection, Event, Projection, TableSpec};
use reproject::swap::SwapOptions;
use tokio_util::sync::CancellationToken;

async fn phase_of(pool: &sqlx::PgPool, build_id: i64) -> String {
    sqlx::query_scalar("SELECT phase FROM reproject.builds WHERE build_id = $1")
        .bind(build_id)
        .fetch_one(pool)
        .await
        .expect("build")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollback_restores_the_previous_build_with_every_event_applied_and_gc_drops_what_is_left() {
    let db = fresh_database("rollback_gc").await;
    let kafka = Kafka::start(4);
    let mut history = history(40_000, 21);
    append(&kafka.settings, &mut history, 20_000);
    let engine = Arc::new(engine(&db, &kafka.settings, tuning()).await);
    let pool = engine.catalog.pool().clone();
    rebuild_all(&engine).await.expect("first builds 1-3");

    // A second build of order_summary goes live; build 1 is retired at the position it had.
    append(&kafka.settings, &mut history, 5_000);
    let cancel = CancellationToken::new();
    let second = rebuild(
        &engine,
        &["order_summary".to_string()],
        &rebuild_options(),
        &cancel,
    )
    .await
    .expect("second build of order_summary");
    assert_eq!(second.builds, vec![4]);
    assert_eq!(phase_of(&pool, 1).await, "retired");

    // Events keep arriving; then the rollback catches build 1 up before it goes live again.
    append(&kafka.settings, &mut history, 5_000);
    let out = reproject(&db, &kafka, &["rollback", "order_summary"]);
    assert!(
        out.status.success(),
        "{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    assert!(
        text(&out.stdout).contains("reads build 1 again; build 4 retired"),
        "{}",
        text(&out.stdout)
    );
    assert_eq!(phase_of(&pool, 1).await, "active");
    assert_eq!(phase_of(&pool, 4).await, "retired");
    let schema: String = sqlx::query_scalar(
        "SELECT substring(definition from 'FROM (rp_[a-z_0-9]+)\\.') FROM pg_views WHERE schemaname = 'public' AND viewname = 'order_summary'",
    )
    .fetch_one(&pool)
    .await
    .expect("view definition");
    assert_eq!(schema, schema_of(&pool, 1).await);
    drain(engine.clone()).await;
    let actual = actual_totals(&pool, "public").await.expect("totals");
    assert_eq!(
        differences(&history.expected(), &actual),
        Vec::<String>::new(),
        "every event, once"
    );

    // gc: a dry run drops nothing; keeping none drops build 4 only, never an active build.
    let dry = reproject(
        &db,
        &kafka,
        &["gc", "--keep", "0", "--older-than-hours", "0", "--dry-run"],
    );
    assert!(dry.status.success(), "{}", text(&dry.stderr));
    assert!(
        text(&dry.stdout).contains("would drop build 4"),
        "{}",
        text(&dry.stdout)
    );
    assert_eq!(phase_of(&pool, 4).await, "retired");
    let kept = reproject(
        &db,
        &kafka,
        &["gc", "--keep", "1", "--older-than-hours", "0"],
    );
    assert!(
        text(&kept.stdout).contains("0 build(s) dropped"),
        "{}",
        text(&kept.stdout)
    );
    let gc = reproject(
        &db,
        &kafka,
        &["gc", "--keep", "0", "--older-than-hours", "0"],
    );
    assert!(gc.status.success(), "{}", text(&gc.stderr));
    assert_eq!(phase_of(&pool, 4).await, "dropped");
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM pg_namespace WHERE nspname = $1")
        .bind(schema_of(&pool, 4).await)
        .fetch_one(&pool)
        .await
        .expect("schemas");
    assert_eq!(left, 0, "build 4's schema is gone");
    for build in [1, 2, 3] {
        assert_eq!(phase_of(&pool, build).await, "active");
    }

    // Nothing retired is left to roll back to: one clear line.
    let none = reproject(&db, &kafka, &["rollback", "order_summary"]);
    assert_eq!(none.status.code(), Some(2));
    assert!(
        text(&none.stderr).contains("no retired build to roll back to"),
        "{}",
        text(&none.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_and_resume_from_another_process_stop_and_restart_a_running_follower() {
    let db = fresh_database("pause_resume").await;
    let kafka = Kafka::start(2);
    let mut history = history(20_000, 8);
    append(&kafka.settings, &mut history, 10_000);
    let engine = engine(&db, &kafka.settings, tuning()).await;
    let pool = engine.catalog.pool().clone();
    rebuild_all(&engine).await.expect("builds");
    assert_eq!(applied(&pool, 1).await, 10_000);

    let paused = reproject(&db, &kafka, &["pause", "order_summary"]);
    assert!(paused.status.success(), "{}", text(&paused.stderr));
    append(&kafka.settings, &mut history, 10_000);
    let metrics_addr = free_local_addr();
    let mut run = spawn_run(&db, &kafka, &["--metrics-addr", &metrics_addr]);

    // Paused: the follower comes up and waits, nothing moves, and status says so.
    wait_until(
        "the follower to report that it waits, paused",
        30,
        || {
            scalar::<String>(
                &pool,
                "SELECT progress->>'phase' FROM reproject.builds WHERE build_id = 1",
            )
        },
        |phase| phase.as_deref() == Some("paused"),
    )
    .await;
    assert_eq!(
        applied(&pool, 1).await,
        10_000,
        "a paused projection is not written"
    );
    let status = reproject(&db, &kafka, &["status", "--format", "json"]);
    let report: serde_json::Value = serde_json::from_slice(&status.stdout).expect("status JSON");
    let order_summary = report["projections"]
        .as_array()
        .and_then(|ps| ps.iter().find(|p| p["name"] == "order_summary"))
        .expect("order_summary in status");
    assert_eq!(order_summary["paused"], true);
    // ...and the follower is there, waiting, not merely slow to start.
    let phase: Option<String> =
        sqlx::query_scalar("SELECT progress->>'phase' FROM reproject.builds WHERE build_id = 1")
            .fetch_one(&pool)
            .await
            .expect("progress");
    assert_eq!(phase.as_deref(), Some("paused"));

    // Resumed: it catches up within seconds.
    let resumed = reproject(&db, &kafka, &["resume", "order_summary"]);
    assert!(resumed.status.success(), "{}", text(&resumed.stderr));
    assert_eq!(
        wait_for_applied(&pool, 1, 20_000, 20).await,
        20_000,
        "resumed and caught up"
    );

    // What happened is visible to Prometheus (a moment after the commit the test saw).
    let expected = [
        "reproject_events_applied_total{projection=\"order_summary\",phase=\"follow\"} 10000",
        "reproject_lag_events{projection=\"order_summary\",topic=\"shop.orders\",partition=\"0\"} 0",
        "reproject_paused{projection=\"order_summary\"} 0",
        "reproject_events_read_total{",
        "reproject_batch_duration_seconds_bucket{",
    ];
    wait_until(
        "the metrics to show the follow, its lag and the resume",
        10,
        || async { http_get(&metrics_addr, "/metrics").1 },
        |metrics| expected.iter().all(|e| metrics.contains(e)),
    )
    .await;
    stop(&mut run);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_build_left_ready_stays_caught_up_under_run_and_is_verified_and_swapped_from_another_process(
) {
    let db = fresh_database("ready_stays_current").await;
    let kafka = Kafka::start(2);
    let mut history = history(16_000, 12);
    append(&kafka.settings, &mut history, 10_000);
    let engine = engine(&db, &kafka.settings, tuning()).await;
    let pool = engine.catalog.pool().clone();
    let live = rebuild_all(&engine).await.expect("builds");
    let no_swap = reproject::engine::rebuild::RebuildOptions {
        swap: false,
        ..rebuild_options()
    };
    let ready = rebuild(
        &engine,
        &["order_summary".to_string()],
        &no_swap,
        &CancellationToken::new(),
    )
    .await
    .expect("rebuild --no-swap");
    let ready_build = ready.builds[0];
    assert_eq!(phase_of(&pool, ready_build).await, "ready");

    let mut run = spawn_run(&db, &kafka, &["--no-backfill"]);

    // New events reach the ready build as well as the live one.
    append(&kafka.settings, &mut history, 5_000);
    wait_for_applied(&pool, 1, 15_000, 30).await;
    assert_eq!(
        wait_for_applied(&pool, ready_build, 15_000, 30).await,
        15_000,
        "the ready build stays caught up"
    );
    assert_eq!(
        phase_of(&pool, ready_build).await,
        "ready",
        "and does not go live by itself"
    );

    // `swap` from another process while `run` holds the build: verified (strict) and swapped.
    let swapped = reproject(
        &db,
        &kafka,
        &[
            "swap",
            "order_summary",
            "--verify",
            "strict",
            "--verify-seed",
            "3",
        ],
    );
    assert!(
        swapped.status.success(),
        "{}\n{}",
        text(&swapped.stdout),
        text(&swapped.stderr)
    );
    assert!(
        text(&swapped.stdout).contains("verdict: PASSED"),
        "{}",
        text(&swapped.stdout)
    );
    assert_eq!(phase_of(&pool, ready_build).await, "active");
    assert_eq!(phase_of(&pool, 1).await, "retired");

    // `run` follows the new live build.
    append(&kafka.settings, &mut history, 1_000);
    assert_eq!(
        wait_for_applied(&pool, ready_build, 16_000, 30).await,
        16_000
    );
    // Each build is written on a connection of its own: the other views' last batch may commit
    // after order_summary's.
    for (projection, &build) in live.projections.iter().zip(&live.builds) {
        if projection != "order_summary" {
            wait_for_applied(&pool, build, 16_000, 30).await;
        }
    }
    let actual = actual_totals(&pool, "public").await.expect("totals");
    stop(&mut run);
    assert_eq!(
        differences(&history.expected(), &actual),
        Vec::<String>::new()
    );
}

/// The shop's `daily_sales` code under another version number: what a binary with a fixed v2 of
/// it would run (same tables, so v1's SQL serves as v2's).
struct AsVersion(DynProjection<ShopEvent>, u32);

impl Projection<ShopEvent> for AsVersion {
    fn name(&self) -> &'static str {
        self.0.name()
    }
    fn version(&self) -> u32 {
        self.1
    }
    fn tables(&self) -> &[TableSpec] {
        self.0.tables()
    }
    fn apply(&self, event: &Event<'_, ShopEvent>, out: &mut Changes) {
        self.0.apply(event, out)
    }
}

/// An engine whose only projection is `daily_sales` at `version`.
async fn daily_sales_at(version: u32, db: &str, kafka: &Kafka) -> Engine<ShopEvent> {
    let dir = std::env::temp_dir().join("rp_test_daily_sales_versions");
    for v in [1, 2] {
        let sql = shop::projections::embedded_schema("daily_sales", 1).expect("v1 SQL");
        let path = dir.join("daily_sales").join(format!("v{v}"));
        std::fs::create_dir_all(&path).expect("schema dir");
        std::fs::write(path.join("tables.sql"), &sql.tables).expect("tables.sql");
        std::fs::write(path.join("indexes.sql"), &sql.indexes).expect("indexes.sql");
    }
    let daily_sales = shop::projections()
        .into_iter()
        .find(|p| p.name() == "daily_sales")
        .expect("daily_sales");
    let mut parts = common::shop_parts(db, &kafka.settings, tuning(), Some(dir));
    parts.projections = vec![Arc::new(AsVersion(daily_sales, version))];
    Engine::connect(parts).await.expect("engine connects")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollback_across_versions_needs_the_old_code_only_when_there_is_something_to_apply() {
    let db = fresh_database("rollback_versions").await;
    let kafka = Kafka::start(2);
    let mut history = history(4_000, 29);
    append(&kafka.settings, &mut history, 3_000);
    let v1 = daily_sales_at(1, &db, &kafka).await;
    let v2 = daily_sales_at(2, &db, &kafka).await;
    let names = ["daily_sales".to_string()];
    let cancel = CancellationToken::new();
    let first = rebuild(&v1, &names, &rebuild_options(), &cancel)
        .await
        .expect("v1")
        .builds[0];
    let fixed = rebuild(&v2, &names, &rebuild_options(), &cancel)
        .await
        .expect("v2")
        .builds[0];
    let pool = v1.catalog.pool().clone();
    assert_eq!(phase_of(&pool, first).await, "retired");

    // Roll back to v1 with v2's binary: v1's build stands where v2's does, nothing to apply.
    let retired = v2.catalog.build(first).await.expect("build");
    let projection = v2.projection("daily_sales").expect("projection");
    let (swapped, _) = catch_up_and_swap(
        &v2,
        &retired,
        &projection,
        &SwapOptions::default(),
        None,
        &cancel,
    )
    .await
    .expect("a rollback with nothing to apply needs no old code");
    assert_eq!(swapped.build_id, first);
    assert_eq!(phase_of(&pool, first).await, "active");

    // v1 goes on (its binary follows it); v2's build falls behind. Back to it with v1's binary
    // would apply events with v1's code: refused, naming the version it needs.
    append(&kafka.settings, &mut history, 1_000);
    drain(Arc::new(v1)).await;
    let behind = v2.catalog.build(fixed).await.expect("build");
    let v1 = daily_sales_at(1, &db, &kafka).await;
    let projection = v1.projection("daily_sales").expect("projection");
    let err = catch_up_and_swap(
        &v1,
        &behind,
        &projection,
        &SwapOptions::default(),
        None,
        &cancel,
    )
    .await
    .expect_err("behind, and this binary has v1's code only");
    assert!(err.to_string().contains("needs version 2's code"), "{err}");
    assert_eq!(phase_of(&pool, first).await, "active");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_catalog_from_before_several_topics_is_upgraded_in_place_and_positions_keep_their_topic()
{
    use reproject::sink::catalog::{advance_positions, insert_positions};
    use reproject::source::Topics;
    use std::collections::BTreeMap;

    let db = fresh_database("catalog_upgrade").await;
    let pool = pool(&db).await;
    sqlx::raw_sql(include_str!("fixtures/catalog-before-topics.sql"))
        .execute(&pool)
        .await
        .expect("the catalog as it was before several topics");
    sqlx::raw_sql(
        "INSERT INTO reproject.builds (build_id, projection, version, schema_name, topic, phase)
             VALUES (7, 'order_summary', 1, 'rp_order_summary_v1_b7', 'shop.orders', 'active');
         INSERT INTO reproject.positions (build_id, partition, next_offset) VALUES (7, 0, 10), (7, 1, 20);
         SELECT setval(pg_get_serial_sequence('reproject.builds', 'build_id'), 7);",
    )
    .execute(&pool)
    .await
    .expect("a build of that time");
    let catalog = reproject::sink::Catalog::new(pool.clone());
    catalog.migrate().await.expect("the upgrade");
    catalog
        .migrate()
        .await
        .expect("the upgrade again: it is idempotent");
    let old = catalog.build(7).await.expect("the old build");
    assert_eq!(old.topics, ["shop.orders"]);
    assert_eq!(
        catalog.positions(7).await.expect("positions"),
        BTreeMap::from([(0, 10), (1, 20)]),
        "with one topic, partition ids are the partition numbers"
    );

    // A build of two topics stores each position under its topic and partition number.
    let topics = Topics::new(["shop.payments", "shop.customers"]).expect("topics");
    let two = catalog
        .create_build("order_summary", 2, &topics, false, None)
        .await
        .expect("a build of two topics");
    assert_eq!(two.topics, ["shop.customers", "shop.payments"]);
    let (customers, payments) = (topics.id(0, 3), topics.id(1, 3));
    let start = BTreeMap::from([(customers, 5), (payments, 7)]);
    let mut conn = catalog.conn().await.expect("connection");
    insert_positions(&mut conn, two.build_id, &start, &BTreeMap::new())
        .await
        .expect("insert positions");
    let moved = BTreeMap::from([(customers, 5), (payments, 9)]);
    advance_positions(&mut conn, two.build_id, &start, &moved, &BTreeMap::new())
        .await
        .expect("advance positions");
    assert_eq!(
        catalog.positions(two.build_id).await.expect("positions"),
        moved
    );
    let rows: Vec<(String, i32, i64)> = sqlx::query_as(
        "SELECT topic, partition, next_offset FROM reproject.positions WHERE build_id = $1 ORDER BY topic",
    )
    .bind(two.build_id)
    .fetch_all(&pool)
    .await
    .expect("rows");
    assert_eq!(
        rows,
        [
            ("shop.customers".to_string(), 3, 5),
            ("shop.payments".to_string(), 3, 9)
        ]
    );
    let conflict = advance_positions(&mut conn, two.build_id, &start, &moved, &BTreeMap::new())
        .await
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(
        conflict.contains("partition shop.payments/3 was expected at offset 7")
            && conflict.contains("now 9"),
        "{conflict}"
    );
}
