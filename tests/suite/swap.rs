//! The cut-over under load: readers querying the stable names in a loop never get an error or an
//! empty result, and never see `order_summary` shrink, while `run` keeps the old build current and a
//! rebuild swaps the new one in.

use crate::common;

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
        shared: false,
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

/// A reader that keeps a transaction open on `order_summary` blocks the swap's exclusive lock. The
/// swap must not wait behind it for long: other readers queue behind a waiting exclusive lock, so
/// the swap gives up after its lock timeout, backs off and retries, until the long reader is done.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_holding_the_view_delays_the_swap_but_never_queues_other_readers_beyond_the_lock_timeout(
) {
    let db = fresh_database("swap_lock").await;
    let kafka = Kafka::start(4);
    append(&kafka.settings, &mut history(20_000, 21), 20_000);
    let engine = Arc::new(engine(&db, &kafka.settings, tuning()).await);
    rebuild_all(&engine).await.expect("first rebuild");
    let pool = engine.catalog.pool().clone();

    // The long reader: a transaction that has read the view and stays open.
    let mut long_reader = sqlx::PgConnection::connect(&db).await.expect("connect");
    sqlx::raw_sql("BEGIN; SELECT count(*) FROM public.order_summary;")
        .execute(&mut long_reader)
        .await
        .expect("long read");

    let stop = Arc::new(AtomicBool::new(false));
    let readers = tokio::spawn(read_in_a_loop(db.clone(), stop.clone()));
    let lock_timeout = Duration::from_millis(50);
    let options = reproject::engine::rebuild::RebuildOptions {
        swap_options: reproject::swap::SwapOptions {
            lock_timeout,
            ..Default::default()
        },
        ..rebuild_options()
    };
    let finished = AtomicBool::new(false);
    let rebuild = async {
        let report = reproject::engine::rebuild::rebuild(
            &engine,
            &["order_summary".to_string()],
            &options,
            &CancellationToken::new(),
        )
        .await;
        finished.store(true, Ordering::SeqCst);
        report
    };
    let control = async {
        // Wait until the swap has been seen waiting for the lock, then hold on a while longer.
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut waits_seen = 0;
        while waits_seen < 3 && Instant::now() < deadline {
            let waiting: bool = sqlx::query_scalar(
                "SELECT EXISTS (SELECT 1 FROM pg_locks l JOIN pg_class c ON c.oid = l.relation
              WHERE NOT l.granted AND c.relname = 'order_summary')",
            )
            .fetch_one(&pool)
            .await
            .expect("pg_locks");
            if waiting {
                waits_seen += 1;
                tokio::time::sleep(Duration::from_millis(60)).await;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert!(
            waits_seen >= 3,
            "the swap was never seen waiting for the lock"
        );
        assert!(
            !finished.load(Ordering::SeqCst),
            "the swap went through a held lock"
        );
        let held_for = Instant::now();
        tokio::time::sleep(Duration::from_millis(500)).await;
        sqlx::raw_sql("COMMIT")
            .execute(&mut long_reader)
            .await
            .expect("end the long read");
        held_for
    };
    let (report, held_for) = tokio::join!(rebuild, control);
    let report = report.expect("rebuild and swap");
    stop.store(true, Ordering::Relaxed);
    let log = readers.await.expect("readers");
    let swap = &report.swaps[0];
    assert!(
        swap.attempts >= 3,
        "the swap took {} attempts",
        swap.attempts
    );
    assert!(log.errors.is_empty(), "reader errors: {:?}", log.errors);
    // The long reader held the view for well over a second; the others waited at most about one
    // lock timeout (plus scheduling on a busy 2-core machine), never for the long reader.
    assert!(held_for.elapsed() >= Duration::from_millis(500));
    assert!(
        log.longest < Duration::from_millis(400),
        "a reader waited {:?} (lock timeout {lock_timeout:?}, {} queries)",
        log.longest,
        log.queries
    );
    let active: i64 = sqlx::query_scalar(
        "SELECT build_id FROM reproject.builds WHERE projection = 'order_summary' AND phase = 'active'",
    )
    .fetch_one(&pool)
    .await
    .expect("active build");
    assert_eq!(active, report.builds[0]);
}
