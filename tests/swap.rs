//! The cut-over under load: readers querying the stable names in a loop never get an error or an
//! empty result, and never see `order_summary` shrink, while `run` keeps the old build current and a
//! rebuild swaps the new one in.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use reproject::domain::shop::totals::{actual_totals, differences};
use reproject::engine::run::{run, RunOptions};
use sqlx::Connection;
use tokio_util::sync::CancellationToken;

#[derive(Default, Debug)]
struct ReaderLog {
    queries: u64,
    errors: Vec<String>,
    empty: u64,
    decreases: Vec<(i64, i64)>,
    longest: Duration,
}

async fn read_in_a_loop(url: String, stop: Arc<AtomicBool>) -> ReaderLog {
    let mut log = ReaderLog::default();
    let mut conn = sqlx::PgConnection::connect(&url)
        .await
        .expect("reader connects");
    let mut last = 0i64;
    while !stop.load(Ordering::Relaxed) {
        let started = Instant::now();
        let result: Result<(i64, i64, i64), sqlx::Error> = sqlx::query_as(
            "SELECT (SELECT count(*) FROM public.order_summary),
                    (SELECT count(*) FROM public.customer_stats),
                    (SELECT count(*) FROM public.daily_sales)",
        )
        .fetch_one(&mut conn)
        .await;
        log.longest = log.longest.max(started.elapsed());
        log.queries += 1;
        match result {
            Ok((orders, customers, days)) => {
                if orders == 0 || customers == 0 || days == 0 {
                    log.empty += 1;
                }
                if orders < last {
                    log.decreases.push((last, orders));
                }
                last = orders;
            }
            Err(e) => log.errors.push(e.to_string()),
        }
    }
    log
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readers_never_see_an_error_an_empty_view_or_fewer_orders_during_rebuild_and_swap() {
    let db = fresh_database("swap_under_load").await;
    let kafka = Kafka::start(4);
    let mut history = history(70_000, 3);
    append(&kafka.settings, &mut history, 30_000);
    let engine = Arc::new(engine(&db, &kafka.settings, tuning()).await);
    let first = rebuild_all(&engine).await.expect("first build");

    // Readers start once the views exist; `run` keeps the live builds current meanwhile.
    let stop = Arc::new(AtomicBool::new(false));
    let readers: Vec<_> = (0..4)
        .map(|_| tokio::spawn(read_in_a_loop(db.clone(), stop.clone())))
        .collect();
    let follower_cancel = CancellationToken::new();
    let options = RunOptions {
        backfill: false,
        rebuild: rebuild_options(),
        exit_when_caught_up: None,
    };
    let follower = run(engine.clone(), options, follower_cancel.clone());
    let producer = append_in_background(&kafka.settings, history, 40_000, 8_000);
    let work = async {
        let second = rebuild_all(&engine).await.expect("second build");
        let history = tokio::task::spawn_blocking(move || producer.join().expect("producer"))
            .await
            .expect("join");
        tokio::time::sleep(Duration::from_millis(300)).await;
        stop.store(true, Ordering::Relaxed);
        follower_cancel.cancel();
        (second, history)
    };
    let (followed, (second, history)) = tokio::join!(follower, work);
    followed.expect("the follower ran cleanly");
    let logs: Vec<ReaderLog> = futures::future::join_all(readers)
        .await
        .into_iter()
        .map(|r| r.expect("reader task"))
        .collect();

    assert_eq!(second.swaps.len(), 3);
    for (swap, old) in second.swaps.iter().zip(&first.builds) {
        assert_eq!(
            swap.retired_build_id,
            Some(*old),
            "{} retired its previous build",
            swap.projection
        );
    }
    for (i, log) in logs.iter().enumerate() {
        assert!(
            log.queries > 20,
            "reader {i} ran only {} queries",
            log.queries
        );
        assert!(
            log.errors.is_empty(),
            "reader {i} got errors: {:?}",
            &log.errors[..log.errors.len().min(3)]
        );
        assert_eq!(log.empty, 0, "reader {i} saw an empty view");
        assert!(
            log.decreases.is_empty(),
            "reader {i} saw order_summary shrink: {:?}",
            log.decreases
        );
    }
    let longest = logs.iter().map(|l| l.longest).max().unwrap_or_default();
    eprintln!("longest reader query during the swap: {longest:?}");

    drain(engine.clone()).await;
    let actual = actual_totals(engine.catalog.pool(), "public")
        .await
        .expect("totals");
    assert_eq!(
        differences(&history.expected(), &actual),
        Vec::<String>::new()
    );
}
