//! Faults while writing: connections killed by the server mid-batch.

use crate::common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use reproject::domain::shop::totals::{actual_totals, differences};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_killed_mid_batch_roll_back_and_the_batch_is_applied_once_on_retry() {
    let db = fresh_database("killed_connections").await;
    let kafka = Kafka::start(2);
    let mut history = history(40_000, 13);
    append(&kafka.settings, &mut history, 10_000);
    let mut small_batches = tuning();
    small_batches.batch_events = 1_000;
    let engine = Arc::new(engine(&db, &kafka.settings, small_batches).await);
    rebuild_all(&engine).await.expect("builds");
    append(&kafka.settings, &mut history, 30_000);

    // A second connection terminates whatever backend is in the middle of a batch (staging keys,
    // reading current rows, writing them back), polling every 5 ms, while the views catch up.
    let stop = Arc::new(AtomicBool::new(false));
    let kills = Arc::new(AtomicU64::new(0));
    let killer = {
        let (pool, stop, kills) = (pool(&db).await, stop.clone(), kills.clone());
        tokio::spawn(async move {
            // Polled often enough to catch short batches, and stopped after a few kills so that
            // retries are not killed forever.
            while !stop.load(Ordering::Relaxed) && kills.load(Ordering::Relaxed) < 5 {
                let killed: Vec<bool> = sqlx::query_scalar(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
                     WHERE datname = current_database() AND pid <> pg_backend_pid()
                       AND xact_start IS NOT NULL
                       AND (query LIKE '%rp_keys_%' OR query LIKE '%rp_rows_%')",
                )
                .fetch_all(&pool)
                .await
                .unwrap_or_default();
                kills.fetch_add(
                    killed.iter().filter(|k| **k).count() as u64,
                    Ordering::Relaxed,
                );
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    drain(engine.clone()).await;
    stop.store(true, Ordering::Relaxed);
    let _ = killer.await;

    let kills = kills.load(Ordering::Relaxed);
    println!("{kills} backends killed mid-batch");
    assert!(kills > 0, "the killer never hit a batch");
    let actual = actual_totals(engine.catalog.pool(), "public")
        .await
        .expect("totals");
    assert_eq!(
        differences(&history.expected(), &actual),
        Vec::<String>::new(),
        "every event once"
    );
    let positions: i64 = sqlx::query_scalar(
        "SELECT sum(next_offset)::bigint FROM reproject.positions p JOIN reproject.builds b USING (build_id) WHERE b.phase = 'active'",
    )
    .fetch_one(engine.catalog.pool())
    .await
    .expect("positions");
    assert_eq!(positions, 3 * 40_000, "every build stands at the log end");
}
