//! `run`'s follow keeps the rows it committed for its next batches instead of reading them back,
//! and writes a backlog in larger transactions than its batches: the tables it leaves must be those
//! a rebuild of the same log gives, byte for byte, as when it reads every row back and writes every
//! batch on its own.

use crate::common;

use std::sync::Arc;

use common::*;
use reproject::engine::Tuning;
use sqlx::PgPool;

/// A statistic of the builds' tables, once the statistics of an ended follow have settled (a
/// backend reports them when it ends).
async fn settled(pool: &PgPool, sql: &str) -> i64 {
    let read = || async {
        sqlx::query_scalar::<_, i64>(sql)
            .fetch_one(pool)
            .await
            .unwrap_or_else(|e| panic!("read the statistics ({sql}): {e}"))
    };
    let mut last = read().await;
    for _ in 0..20 {
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        let now = read().await;
        if now == last {
            return now;
        }
        last = now;
    }
    last
}

/// Index look-ups and heap fetches through them on the build's tables.
async fn rows_fetched_by_index(pool: &PgPool) -> i64 {
    settled(
        pool,
        "SELECT coalesce(sum(idx_tup_fetch), 0)::int8 FROM pg_stat_user_tables
         WHERE schemaname LIKE 'rp\\_%' AND relname IN ('order_summary', 'customer_stats', 'daily_sales')",
    )
    .await
}

/// Position updates the builds' writers made (each transaction updates the partitions it moved).
async fn position_updates(pool: &PgPool) -> i64 {
    settled(
        pool,
        "SELECT coalesce(sum(n_tup_upd), 0)::int8 FROM pg_stat_user_tables
         WHERE schemaname = 'reproject' AND relname = 'positions'",
    )
    .await
}

/// The log rebuilt whole into a database of its own: each of the shop's tables followed into
/// `pools` (with what each followed that way, for messages) must hold exactly its rows.
async fn assert_as_a_rebuild_of_the_whole_log(
    kafka: &Kafka,
    name: &str,
    pools: [(&PgPool, &str); 2],
) {
    let whole_db = fresh_database(name).await;
    let whole = engine(&whole_db, &kafka.settings, tuning()).await;
    rebuild_all(&whole).await.expect("rebuild the whole log");
    for (table, key) in [
        ("order_summary", "order_id"),
        ("customer_stats", "customer_id"),
        ("daily_sales", "day, currency"),
    ] {
        let expected = checksum(whole.catalog.pool(), "public", table, key).await;
        for (pool, how) in pools {
            assert_eq!(
                checksum(pool, "public", table, key).await,
                expected,
                "{table}, {how}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follow_that_keeps_its_rows_leaves_the_tables_a_rebuild_of_the_same_log_leaves() {
    let kafka = Kafka::start(4);
    let mut history = history(40_000, 11);
    append(&kafka.settings, &mut history, 10_000);
    // Small batches: an order's events, and each customer's and day's, fall in many of them.
    let small_batches = Tuning {
        batch_events: 400,
        ..tuning()
    };
    let kept_db = fresh_database("follow_kept").await;
    let kept = Arc::new(engine(&kept_db, &kafka.settings, small_batches.clone()).await);
    let read_db = fresh_database("follow_read_back").await;
    let read_back = Arc::new(
        engine(
            &read_db,
            &kafka.settings,
            Tuning {
                known_rows_bytes: 0,
                ..small_batches
            },
        )
        .await,
    );
    for engine in [&kept, &read_back] {
        rebuild_all(engine).await.expect("rebuild the first events");
    }

    append(&kafka.settings, &mut history, 30_000);
    drain(kept.clone()).await;
    drain(read_back.clone()).await;

    let (kept_pool, read_pool) = (kept.catalog.pool(), read_back.catalog.pool());
    assert_as_a_rebuild_of_the_whole_log(
        &kafka,
        "follow_whole",
        [
            (kept_pool, "rows kept by the writer"),
            (read_pool, "rows read back"),
        ],
    )
    .await;

    // The rows kept were used: the follow that kept them looked fewer up.
    let (kept_fetched, read_fetched) = (
        rows_fetched_by_index(kept_pool).await,
        rows_fetched_by_index(read_pool).await,
    );
    assert!(
        kept_fetched < read_fetched,
        "rows fetched by index: {kept_fetched} keeping rows, {read_fetched} reading them back"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_is_written_in_larger_transactions_and_gives_the_same_tables() {
    let kafka = Kafka::start(4);
    let mut history = history(40_000, 23);
    append(&kafka.settings, &mut history, 10_000);
    let small_batches = Tuning {
        batch_events: 400,
        ..tuning()
    };
    let one_by_one_db = fresh_database("follow_batch_by_batch").await;
    let one_by_one = Arc::new(engine(&one_by_one_db, &kafka.settings, small_batches.clone()).await);
    let joined_db = fresh_database("follow_catching_up").await;
    let joined = Arc::new(
        engine(
            &joined_db,
            &kafka.settings,
            Tuning {
                catch_up_batch_events: 12_000,
                ..small_batches
            },
        )
        .await,
    );
    for engine in [&one_by_one, &joined] {
        rebuild_all(engine).await.expect("rebuild the first events");
    }
    let (one_pool, joined_pool) = (one_by_one.catalog.pool(), joined.catalog.pool());
    let before = (
        position_updates(one_pool).await,
        position_updates(joined_pool).await,
    );

    append(&kafka.settings, &mut history, 30_000);
    drain(one_by_one.clone()).await;
    drain(joined.clone()).await;

    assert_as_a_rebuild_of_the_whole_log(
        &kafka,
        "follow_catching_up_whole",
        [
            (one_pool, "every batch written on its own"),
            (joined_pool, "batches joined while the writer was busy"),
        ],
    )
    .await;

    // 30,000 events in batches of 400 are at least 75 transactions per build, each moving one
    // partition at least (246 updates in one run); joined, the reader runs ahead of the writer and
    // the batches queued meanwhile go in together (30 in that run).
    let one_by_one_updates = position_updates(one_pool).await - before.0;
    let joined_updates = position_updates(joined_pool).await - before.1;
    assert!(
        joined_updates * 2 < one_by_one_updates,
        "position updates: {joined_updates} joining batches, {one_by_one_updates} batch by batch"
    );
}
