//! `rebuild --shared`: several processes share one build through a Kafka consumer group, and the
//! tables come out as one process would have made them, even when one of them is killed mid-replay.

use crate::common;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

use common::*;
use sqlx::PgPool;

const TABLES: [(&str, &str); 3] = [
    ("order_summary", "order_id"),
    ("customer_stats", "customer_id"),
    ("daily_sales", "day, currency"),
];

/// A `rebuild --all --shared` process logging to a file of its own; `extra` are more flags.
fn spawn_shared(db: &str, kafka: &Kafka, log: &PathBuf, extra: &[&str]) -> Child {
    let file = std::fs::File::create(log).expect("create the worker's log");
    Command::new(env!("CARGO_BIN_EXE_reproject"))
        .args(["rebuild", "--all", "--shared"])
        .args(["--brokers", &kafka.settings.brokers, "--database-url", db])
        .args(["--topic", TOPIC])
        .args(extra)
        .stdout(Stdio::null())
        .stderr(file)
        .spawn()
        .expect("start a shared rebuild")
}

fn log_path(test: &str, worker: usize) -> PathBuf {
    std::env::temp_dir().join(format!(
        "reproject-{test}-{}-worker{worker}.log",
        std::process::id()
    ))
}

fn read_log(path: &PathBuf) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// Per table, the checksum of the rows the active build of its projection holds.
async fn active_checksums(pool: &PgPool) -> Vec<String> {
    let mut sums = Vec::new();
    for (table, key) in TABLES {
        let schema: String = sqlx::query_scalar(
            "SELECT schema_name FROM reproject.builds WHERE projection = $1 AND phase = 'active'",
        )
        .bind(table)
        .fetch_one(pool)
        .await
        .expect("an active build");
        sums.push(checksum(pool, &schema, table, key).await);
    }
    sums
}

/// Events each active build counts as replayed: exactly the log's, if nothing was applied twice.
async fn events_replayed(pool: &PgPool) -> Vec<i64> {
    sqlx::query_scalar(
        "SELECT events_replayed FROM reproject.builds WHERE phase = 'active' ORDER BY build_id",
    )
    .fetch_all(pool)
    .await
    .expect("builds")
}

/// The reference: the same log rebuilt by one process, in a database of its own.
async fn single_process_checksums(test: &str, kafka: &Kafka) -> Vec<String> {
    let db = fresh_database(&format!("{test}_single")).await;
    let engine = engine(&db, &kafka.settings, tuning()).await;
    rebuild_all(&engine).await.expect("single-process rebuild");
    let sums = active_checksums(engine.catalog.pool()).await;
    assert!(sums.iter().all(|s| s != "empty"), "{sums:?}");
    sums
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_processes_sharing_one_rebuild_make_the_tables_one_process_makes() {
    let kafka = Kafka::start(8);
    let events = 60_000;
    append(&kafka.settings, &mut history(events, 19), events);
    let reference = single_process_checksums("shared3", &kafka).await;

    let db = fresh_database("shared3").await;
    let logs: Vec<PathBuf> = (0..3).map(|i| log_path("shared3", i)).collect();
    let mut workers: Vec<Child> = logs
        .iter()
        .map(|log| spawn_shared(&db, &kafka, log, &[]))
        .collect();
    for (i, worker) in workers.iter_mut().enumerate() {
        let status = wait_for_exit(worker, "a shared rebuild to finish", 180);
        assert!(status.success(), "worker {i}: {}", read_log(&logs[i]));
    }
    let logs: Vec<String> = logs.iter().map(read_log).collect();

    let pool = pool(&db).await;
    assert_eq!(active_checksums(&pool).await, reference);
    assert_eq!(events_replayed(&pool).await, vec![events as i64; 3]);
    let loading = logs.iter().filter(|l| l.contains("loaded a round")).count();
    assert!(
        loading >= 2,
        "the group shared the partitions out: {loading} of 3 processes loaded rows\n{}",
        logs.join("\n")
    );
    // `status` names each process of each build with the partitions the group gave it.
    let status = reproject(&db, &kafka, &["status"]);
    assert!(status.status.success(), "{}", text(&status.stderr));
    let shown = text(&status.stdout);
    let workers = shown.matches("worker reproject rebuild --shared").count();
    assert_eq!(
        workers, 9,
        "three processes for each of three builds:\n{shown}"
    );
    assert!(shown.contains("events replayed at"), "{shown}");
    let finishing: usize = logs
        .iter()
        .map(|l| l.matches("finishing the build here").count())
        .sum();
    assert_eq!(
        finishing, 3,
        "each of the 3 builds is finished by one process"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_process_killed_mid_replay_hands_its_partitions_to_the_others() {
    let kafka = Kafka::start(8);
    // Enough that a third of it takes the victim about a second to replay.
    let events = 150_000;
    append(&kafka.settings, &mut history(events, 23), events);
    let reference = single_process_checksums("sharedkill", &kafka).await;

    let db = fresh_database("sharedkill").await;
    let logs: Vec<PathBuf> = (0..3).map(|i| log_path("sharedkill", i)).collect();
    let mut workers: Vec<Child> = logs
        .iter()
        .map(|log| spawn_shared(&db, &kafka, log, &[]))
        .collect();
    let mut others = workers.split_off(1);
    let mut victim = workers.remove(0);
    wait_until(
        "the victim to start replaying its partitions",
        60,
        || async { read_log(&logs[0]) },
        |log: &String| log.contains("replaying a round"),
    )
    .await;
    victim.kill().expect("SIGKILL the victim");
    let _ = victim.wait();
    let victim_log = read_log(&logs[0]);
    assert!(
        !victim_log.contains("loaded a round"),
        "the victim was killed before loading anything: {victim_log}"
    );

    for (i, worker) in others.iter_mut().enumerate() {
        let status = wait_for_exit(worker, "a shared rebuild to finish", 180);
        assert!(
            status.success(),
            "worker {}: {}",
            i + 1,
            read_log(&logs[i + 1])
        );
    }
    let pool = pool(&db).await;
    assert_eq!(active_checksums(&pool).await, reference);
    assert_eq!(events_replayed(&pool).await, vec![events as i64; 3]);
}
