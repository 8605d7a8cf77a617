//! A rebuild killed with SIGKILL, during the bulk load and during catch-up, then started again,
//! finishes with correct views and nothing applied twice. The rebuild runs as the real binary, so
//! the kill is a real one; the mock broker lives in this test process and is reached over TCP.

use crate::common;

use std::sync::Arc;

use common::*;
use reproject::domain::shop::totals::{actual_totals, differences};
use sqlx::{Connection, PgPool};

async fn assert_no_duplicate_rows(pool: &PgPool) {
    for (table, key) in [
        ("order_summary", "order_id"),
        ("customer_stats", "customer_id"),
        ("daily_sales", "day, currency"),
    ] {
        let (rows, keys): (i64, i64) = sqlx::query_as(&format!(
            "SELECT count(*), count(DISTINCT ({key})) FROM public.{table}"
        ))
        .fetch_one(pool)
        .await
        .expect("count");
        assert_eq!(rows, keys, "{table} has duplicate keys");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebuild_killed_during_the_bulk_load_starts_over_and_finishes_correctly() {
    let db = fresh_database("kill_during_load").await;
    let kafka = Kafka::start(4);
    let mut history = history(300_000, 21);
    append(&kafka.settings, &mut history, 300_000);
    let pool = pool(&db).await;

    let mut child = spawn_rebuild(&db, &kafka.settings.brokers, &["--all"], &[]);
    let replaying = wait_for_sql_while_running(
        &pool,
        &mut child,
        "SELECT bool_or(phase = 'loading' AND progress IS NOT NULL) FROM reproject.builds",
    )
    .await;
    child.kill().expect("SIGKILL");
    let _ = child.wait();
    assert!(
        replaying,
        "the rebuild never reached its bulk load, or finished before it could be killed"
    );
    let loading: i64 =
        sqlx::query_scalar("SELECT count(*) FROM reproject.builds WHERE phase = 'loading'")
            .fetch_one(&pool)
            .await
            .expect("count");
    assert_eq!(loading, 3, "killed while loading");

    let engine = engine(&db, &kafka.settings, tuning()).await;
    let report = rebuild_all(&engine).await.expect("second attempt");
    assert_eq!(
        report.events_replayed, 300_000,
        "the load started over from offset 0"
    );
    let ids: Vec<i64> = sqlx::query_scalar(
        "SELECT build_id FROM reproject.builds WHERE phase = 'active' ORDER BY build_id",
    )
    .fetch_all(&pool)
    .await
    .expect("ids");
    assert_eq!(ids, vec![1, 2, 3], "the interrupted builds were reused");
    let actual = actual_totals(&pool, "public").await.expect("totals");
    assert_eq!(
        differences(&history.expected(), &actual),
        Vec::<String>::new()
    );
    assert_no_duplicate_rows(&pool).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebuild_killed_during_catch_up_resumes_from_its_positions_and_applies_nothing_twice() {
    let db = fresh_database("kill_during_catch_up").await;
    let kafka = Kafka::start(4);
    let mut history = history(90_000, 23);
    append(&kafka.settings, &mut history, 50_000);
    let producer = append_in_background(&kafka.settings, history, 40_000, 8_000);
    let pool = pool(&db).await;
    // The producer must be running before the rebuild starts: if its first records came after the
    // rebuild's first look at the log end, the rebuild could catch up and finish before any arrived.
    let consumer = kafka.settings.consumer("crash-test").expect("consumer");
    let topics = reproject::source::Topics::new([TOPIC]).expect("topic");
    wait_until(
        "the background producer to write its first 2,000 events",
        30,
        || async {
            kafka
                .settings
                .bounds(&consumer, &topics, &[0, 1, 2, 3])
                .expect("log bounds")
                .end
                .values()
                .sum::<i64>()
        },
        |written| *written >= 52_000,
    )
    .await;

    // A rate cap keeps the catch-up going for seconds, so the kill lands in the middle of it.
    let mut child = spawn_rebuild(
        &db,
        &kafka.settings.brokers,
        &["--all"],
        &[
            "--batch-events",
            "200",
            "--lag-threshold",
            "0",
            "--max-rate",
            "4000",
        ],
    );
    let mid_catch_up = wait_for_sql_while_running(
        &pool,
        &mut child,
        "SELECT count(*) = 3 AND bool_and(b.phase = 'catching_up' AND p.applied > b.events_replayed + 2000)
         FROM reproject.builds b
         JOIN (SELECT build_id, sum(next_offset) AS applied FROM reproject.positions GROUP BY build_id) p USING (build_id)",
    )
    .await;
    child.kill().expect("SIGKILL");
    let _ = child.wait();
    assert!(
        mid_catch_up,
        "the rebuild never reached catch-up with committed batches, or finished first"
    );
    let (phase_count, applied): (i64, i64) = sqlx::query_as(
        "SELECT count(*), (SELECT sum(next_offset)::bigint FROM reproject.positions WHERE build_id = 1)
         FROM reproject.builds WHERE phase = 'catching_up'",
    )
    .fetch_one(&pool)
    .await
    .expect("state");
    assert_eq!(phase_count, 3);
    assert!(
        applied > 52_000 && applied < 90_000,
        "killed with some, not all, catch-up batches committed ({applied})"
    );

    let history = tokio::task::spawn_blocking(move || producer.join().expect("producer"))
        .await
        .expect("join");
    let engine = Arc::new(engine(&db, &kafka.settings, tuning()).await);
    let report = rebuild_all(&engine).await.expect("resumed");
    assert_eq!(
        report.events_replayed, 0,
        "resumed from the stored positions, no second replay"
    );
    drain(engine.clone()).await;
    let actual = actual_totals(&pool, "public").await.expect("totals");
    assert_eq!(
        differences(&history.expected(), &actual),
        Vec::<String>::new()
    );
    let applied: i64 =
        sqlx::query_scalar("SELECT sum(last_sequence)::bigint FROM public.order_summary")
            .fetch_one(&pool)
            .await
            .expect("sum");
    assert_eq!(applied, 90_000);
    assert_no_duplicate_rows(&pool).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebuild_killed_inside_its_swap_leaves_the_old_view_whole_and_the_next_run_swaps() {
    let db = fresh_database("kill_during_swap").await;
    let kafka = Kafka::start(4);
    let mut history = history(30_000, 29);
    append(&kafka.settings, &mut history, 30_000);
    let pool = pool(&db).await;
    let engine = engine(&db, &kafka.settings, tuning()).await;
    rebuild_all(&engine).await.expect("first rebuild");
    let view_before: String =
        sqlx::query_scalar("SELECT pg_get_viewdef('public.order_summary'::regclass)")
            .fetch_one(&pool)
            .await
            .expect("view definition");

    // A reader's open transaction keeps the swap waiting inside its own transaction, where the
    // kill lands: catalog rows locked, view not yet replaced.
    let mut long_reader = sqlx::PgConnection::connect(&db).await.expect("connect");
    sqlx::raw_sql("BEGIN; SELECT count(*) FROM public.order_summary;")
        .execute(&mut long_reader)
        .await
        .expect("long read");
    let mut child = spawn_rebuild(&db, &kafka.settings.brokers, &["order_summary"], &[]);
    let in_swap = wait_for_sql_while_running(
        &pool,
        &mut child,
        "SELECT EXISTS (SELECT 1 FROM pg_locks l JOIN pg_class c ON c.oid = l.relation
          WHERE NOT l.granted AND c.relname = 'order_summary' AND c.relkind = 'v')",
    )
    .await;
    child.kill().expect("SIGKILL");
    let _ = child.wait();
    assert!(in_swap, "the rebuild never waited in its swap");
    sqlx::raw_sql("COMMIT")
        .execute(&mut long_reader)
        .await
        .expect("end the long read");

    // Not done at all: the view, the catalog and the old build are as they were.
    let view_after: String =
        sqlx::query_scalar("SELECT pg_get_viewdef('public.order_summary'::regclass)")
            .fetch_one(&pool)
            .await
            .expect("view definition");
    assert_eq!(view_before, view_after);
    let phases: Vec<(i64, String)> = sqlx::query_as(
        "SELECT build_id, phase FROM reproject.builds WHERE projection = 'order_summary' ORDER BY build_id",
    )
    .fetch_all(&pool)
    .await
    .expect("phases");
    assert_eq!(phases[0].1, "active", "{phases:?}");
    assert_eq!(phases.len(), 2, "{phases:?}");
    assert_eq!(phases[1].1, "catching_up", "{phases:?}");

    // The same command again: resumes the built tables, swaps, nothing replayed twice.
    let report = reproject::engine::rebuild::rebuild(
        &engine,
        &["order_summary".to_string()],
        &rebuild_options(),
        &tokio_util::sync::CancellationToken::new(),
    )
    .await
    .expect("rebuild again");
    assert_eq!(
        report.builds,
        vec![phases[1].0],
        "the killed build was resumed"
    );
    assert_eq!(report.events_replayed, 0);
    assert_eq!(report.swaps[0].retired_build_id, Some(phases[0].0));
    let actual = actual_totals(&pool, "public").await.expect("totals");
    assert_eq!(
        differences(&history.expected(), &actual),
        Vec::<String>::new()
    );
    assert_no_duplicate_rows(&pool).await;
}
