//! `estimate`: a pilot over a small share of the log predicts rows, size and time of a rebuild
//! without writing anything, and its row counts are in the right range once the rebuild is done.

use crate::common;

use common::*;
use reproject::engine::estimate::{estimate, PilotSize};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pilot_over_a_sample_predicts_the_rebuild_and_writes_nothing() {
    let db = fresh_database("estimate").await;
    let kafka = Kafka::start(4);
    let mut history = history(60_000, 41);
    append(&kafka.settings, &mut history, 60_000);
    let engine = engine(&db, &kafka.settings, tuning()).await;
    let pool = engine.catalog.pool().clone();

    // A share alone: the least a default pilot reads (200,000 events) is more than this log.
    let share_only = PilotSize {
        share: 0.05,
        least_events: 0,
    };
    let e = estimate(&engine, &all_projections(), share_only)
        .await
        .expect("estimate");
    assert_eq!(e.events_total, 60_000);
    assert!(
        (2_000..=4_000).contains(&e.events_sampled),
        "about 5% sampled: {}",
        e.events_sampled
    );
    assert_eq!(
        e.windows, 4,
        "a window in each of 4 partitions: 3,000 events are too few for a second pass"
    );
    assert!(
        e.events_per_second > 0.0 && e.replay_seconds > 0.0 && e.total_seconds >= e.replay_seconds
    );
    // Passes this small come in a batch or two per reader: their pace still comes from their time
    // (a pass without a streaming stretch once counted as no pace at all, one event a second).
    assert!(
        e.replay_seconds < 600.0,
        "60,000 events predicted to take {} s",
        e.replay_seconds
    );
    assert!(e.fold_bytes > 0);
    let text = e.render();
    assert!(
        text.contains("order_summary") && text.contains("20% margin"),
        "{text}"
    );

    // Nothing written: no build, no schema of its own left behind.
    let builds: i64 = sqlx::query_scalar("SELECT count(*) FROM reproject.builds")
        .fetch_one(&pool)
        .await
        .expect("count");
    assert_eq!(builds, 0);
    let scratch: i64 =
        sqlx::query_scalar("SELECT count(*) FROM pg_namespace WHERE nspname LIKE 'rp\\_%'")
            .fetch_one(&pool)
            .await
            .expect("schemas");
    assert_eq!(scratch, 0, "the scratch copy was rolled back");

    // Against the real rebuild: per-aggregate rows within the margin's reach, the others within a
    // few times (distinct keys estimated from a sample).
    rebuild_all(&engine).await.expect("rebuild");
    for t in &e.tables {
        let actual: i64 = sqlx::query_scalar(&format!("SELECT count(*) FROM public.{}", t.table))
            .fetch_one(&pool)
            .await
            .expect("count");
        let predicted = t.rows as f64;
        assert!(t.bytes > 0, "{}: a size", t.table);
        if t.scaled == "per aggregate" {
            assert!(
                predicted >= actual as f64 * 0.8 && predicted <= actual as f64 * 1.8,
                "{}: predicted {predicted}, actual {actual}\n{text}",
                t.table
            );
        } else {
            // Distinct keys from a sample are estimates, not bounds: within a few times.
            assert!(
                predicted >= actual as f64 * 0.3 && predicted <= actual as f64 * 4.0,
                "{}: predicted {predicted}, actual {actual}\n{text}",
                t.table
            );
        }
    }
}
