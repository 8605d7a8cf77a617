//! `rebuild --shared`: several processes share one build through a Kafka consumer group, and the
//! tables come out as one process would have made them, even when one of them is killed mid-replay.
//! `run --shared`: several processes share the backfill and the follow; killing one hands its
//! partitions to the other, and nothing is lost or applied twice.

use crate::common;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

use common::*;
use reproject::domain::shop::totals::{actual_totals, differences};
use sqlx::PgPool;

const TABLES: [(&str, &str); 3] = [
    ("order_summary", "order_id"),
    ("customer_stats", "customer_id"),
    ("daily_sales", "day, currency"),
];

/// The number a log line gives as `name=N`.
fn field(line: &str, name: &str) -> Option<u64> {
    let start = line.find(&format!(" {name}="))? + name.len() + 2;
    let digits: String = line[start..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}

/// A `rebuild --all --shared` process logging to a file of its own; `extra` are more flags.
fn spawn_shared(db: &str, kafka: &Kafka, log: &PathBuf, extra: &[&str]) -> Child {
    let file = std::fs::File::create(log).expect("create the worker's log");
    // The report (stdout) goes in the log too, after the log lines.
    let report = file.try_clone().expect("share the worker's log");
    Command::new(env!("CARGO_BIN_EXE_reproject"))
        .args(["rebuild", "--all", "--shared"])
        .args(["--brokers", &kafka.settings.brokers, "--database-url", db])
        .args(["--topic", TOPIC])
        .args(extra)
        .stdout(report)
        .stderr(file)
        .spawn()
        .expect("start a shared rebuild")
}

/// A `run --shared` process logging to a file of its own; `extra` are more flags.
fn spawn_shared_run(db: &str, kafka: &Kafka, log: &PathBuf, extra: &[&str]) -> Child {
    let file = std::fs::File::create(log).expect("create the process's log");
    Command::new(env!("CARGO_BIN_EXE_reproject"))
        .args(["run", "--shared"])
        .args(["--brokers", &kafka.settings.brokers, "--database-url", db])
        .args(["--topic", TOPIC, "--batch-events", "500"])
        .args(extra)
        .stdout(Stdio::null())
        .stderr(file)
        .spawn()
        .expect("start a shared run")
}

/// Processes that are killed when the test ends, whether it passed or not.
struct Processes(Vec<Child>);

impl Drop for Processes {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
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

/// What one process makes of a log: its tables' checksums, its aggregate index's, and its source
/// checks.
struct Reference {
    tables: Vec<String>,
    index: String,
    checks: Vec<String>,
}

/// The reference: the same log rebuilt by one process, in a database of its own.
async fn single_process_checksums(test: &str, kafka: &Kafka) -> Reference {
    let db = fresh_database(&format!("{test}_single")).await;
    let engine = engine(&db, &kafka.settings, tuning()).await;
    rebuild_all(&engine).await.expect("single-process rebuild");
    let pool = engine.catalog.pool();
    let tables = active_checksums(pool).await;
    assert!(tables.iter().all(|s| s != "empty"), "{tables:?}");
    Reference {
        tables,
        index: aggregate_index_checksum(pool).await,
        checks: source_checks(pool).await,
    }
}

/// Per active build, what its replay recorded of the log: partitions, records received, offsets
/// read, offsets skipped, sequence gaps and repeats.
async fn source_checks(pool: &PgPool) -> Vec<String> {
    sqlx::query_scalar(
        "SELECT projection || ': ' || coalesce(concat_ws(' ', source_checks->>'partitions', source_checks->>'records',
                source_checks->>'offsets', source_checks->>'offsets_skipped', source_checks->>'sequence_gaps',
                source_checks->>'sequence_repeats'), 'none')
         FROM reproject.builds WHERE phase = 'active' ORDER BY projection",
    )
    .fetch_all(pool)
    .await
    .expect("source checks")
}

/// The aggregate index (every aggregate's span per partition) and its coverage, as one checksum.
async fn aggregate_index_checksum(pool: &PgPool) -> String {
    sqlx::query_scalar(
        "SELECT count(*) || ' spans ' || coalesce(md5(string_agg(o::text, ',' ORDER BY topic, aggregate_id, partition)), 'none')
              || ' covering ' || (SELECT coalesce(string_agg(partition || ':' || covered_through, ' ' ORDER BY topic, partition), 'nothing')
                                 FROM reproject.aggregate_index_coverage)
         FROM reproject.aggregate_offsets o",
    )
    .fetch_one(pool)
    .await
    .expect("the aggregate index")
}

/// Index pieces of shared builds still recorded (forgotten once joined into the index).
async fn index_pieces_left(pool: &PgPool) -> i64 {
    scalar::<i64>(
        pool,
        "SELECT count(*) FROM reproject.shared_aggregate_ranges",
    )
    .await
    .unwrap_or_default()
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
    assert_eq!(active_checksums(&pool).await, reference.tables);
    assert_eq!(events_replayed(&pool).await, vec![events as i64; 3]);
    // The processes' pieces of the aggregate index make the index one process keeps, and `replay`
    // finds an order through it.
    assert_eq!(aggregate_index_checksum(&pool).await, reference.index);
    assert_eq!(index_pieces_left(&pool).await, 0);
    // So do the checks of what the readers received against the offsets they read.
    assert_eq!(source_checks(&pool).await, reference.checks);
    let order: String = scalar(&pool, "SELECT min(order_id) FROM public.order_summary")
        .await
        .expect("an order");
    let replay = reproject(&db, &kafka, &["replay", &order]);
    assert!(replay.status.success(), "{}", text(&replay.stderr));
    assert!(
        text(&replay.stdout).contains("found via aggregate index"),
        "{}",
        text(&replay.stdout)
    );
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
    assert!(shown.contains("events at"), "{shown}");
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
    assert_eq!(active_checksums(&pool).await, reference.tables);
    assert_eq!(events_replayed(&pool).await, vec![events as i64; 3]);
    // The victim's partitions were read again whole by the others: the index and the source
    // checks are whole too.
    assert_eq!(aggregate_index_checksum(&pool).await, reference.index);
    assert_eq!(source_checks(&pool).await, reference.checks);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn processes_within_a_memory_budget_load_in_rounds_and_survivors_continue_a_killed_one_s() {
    let kafka = Kafka::start(8);
    let events = 150_000;
    append(&kafka.settings, &mut history(events, 29), events);
    let reference = single_process_checksums("sharedbudget", &kafka).await;

    // A budget far below the fold of a third of the log: each process loads its partitions in
    // many rounds, each continuing the per-aggregate rows the earlier ones loaded.
    let db = fresh_database("sharedbudget").await;
    let logs: Vec<PathBuf> = (0..3).map(|i| log_path("sharedbudget", i)).collect();
    let mut workers = Processes(
        logs.iter()
            .map(|log| spawn_shared(&db, &kafka, log, &["--memory-budget", "300KiB"]))
            .collect(),
    );
    wait_until(
        "the victim to load a round cut at its memory budget",
        90,
        || async { read_log(&logs[0]) },
        |log: &String| log.contains("complete=false"),
    )
    .await;
    let mut victim = workers.0.remove(0);
    victim.kill().expect("SIGKILL the victim");
    let _ = victim.wait();
    let victim_log = read_log(&logs[0]);
    assert!(
        !victim_log.contains("every partition loaded"),
        "the victim was killed with partitions left half loaded: {victim_log}"
    );

    for (i, worker) in workers.0.iter_mut().enumerate() {
        let status = wait_for_exit(worker, "a shared rebuild to finish", 180);
        assert!(
            status.success(),
            "worker {}: {}",
            i + 1,
            read_log(&logs[i + 1])
        );
    }
    let pool = pool(&db).await;
    assert_eq!(active_checksums(&pool).await, reference.tables);
    assert_eq!(events_replayed(&pool).await, vec![events as i64; 3]);
    for log in &logs[1..] {
        let log = read_log(log);
        // Under a budget the readers cut their batches by bytes, and a round reads rows back once
        // per step of several batches, not once per batch.
        let gathered = log
            .lines()
            .filter(|line| line.contains("loading the round so far"))
            .filter_map(|line| Some((field(line, "batches")?, field(line, "fold_steps")?)))
            .any(|(batches, steps)| batches > steps);
        assert!(
            gathered,
            "a round folded several batches in one step: {log}"
        );
        let cut = log.matches("complete=false").count();
        assert!(
            cut >= 2,
            "each survivor loaded rounds cut at the budget ({cut})"
        );
        // Its report says so, and what the process took against its budget.
        assert!(
            log.contains(" time(s) to stay within --memory-budget"),
            "the report counts the rounds cut at the budget: {log}"
        );
        assert!(
            log.contains(" resident, over its --memory-budget of 300 KiB"),
            "the report gives the peak resident set against the budget: {log}"
        );
    }
    // Rounds cut at the budget keep no index: none is published from pieces with holes (the
    // database had none), and the pieces are forgotten.
    assert_eq!(
        aggregate_index_checksum(&pool).await,
        "0 spans none covering nothing"
    );
    assert_eq!(index_pieces_left(&pool).await, 0);
}

/// The builds of one shared set need not stand alike. Here `daily_sales`'s build was begun alone,
/// its rounds cut at a memory budget, and only half its partitions loaded (another member of the
/// group held the rest and loaded nothing); the other two builds were created later, over a longer
/// log. The round that goes on reads every partition to the newer end for them: `daily_sales` must
/// take only the partitions it still misses, and only up to its own target (its catch-up brings
/// the rest), or it counts events twice; and the read must go to the newer end, or the new builds
/// miss events.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn builds_of_a_shared_set_left_at_different_positions_each_take_only_what_they_miss() {
    use reproject::engine::rebuild::RebuildOptions;
    use reproject::engine::shared::rebuild_shared;
    use reproject::sink::catalog::read_targets;
    use reproject::source::{group::GroupMember, Topics};
    use tokio_util::sync::CancellationToken;

    let kafka = Kafka::start(4);
    let mut history = history(40_000, 37);
    append(&kafka.settings, &mut history, 20_000);
    let db = fresh_database("sharedapart").await;
    let engine = engine(&db, &kafka.settings, tuning()).await;
    let pool = pool(&db).await;
    let first_end = engine.log_bounds("test").await.expect("the log's end").end;

    // A fresh catalog numbers the first build 1, and its group is named after it.
    let topics = Topics::new([TOPIC]).expect("the topic");
    let idle = GroupMember::join(&kafka.settings, "reproject-shared-1", &topics).expect("join");
    wait_until(
        "the idle member to hold every partition",
        60,
        || async { idle.assignment().partitions.len() },
        |n| *n == 4,
    )
    .await;
    let cancel = CancellationToken::new();
    let alone = RebuildOptions {
        memory_budget: Some(300 << 10),
        ..rebuild_options()
    };
    // Rounds cut at the budget move the positions, never the targets every process replays to.
    let watch = async {
        let loaded_half = "SELECT count(*) FROM reproject.positions WHERE build_id = 1 AND next_offset = log_end_offset AND next_offset > 0";
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
        loop {
            if let Ok(targets) = read_targets(&pool, 1).await {
                if !targets.is_empty() {
                    assert_eq!(targets, first_end, "build 1's targets moved");
                }
            }
            if scalar::<i64>(&pool, loaded_half).await == Some(2) {
                cancel.cancel();
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the process did not load its half of daily_sales in time"
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    };
    let first = ["daily_sales".to_string()];
    let (interrupted, ()) = tokio::join!(rebuild_shared(&engine, &first, &alone, &cancel), watch);
    assert!(
        matches!(
            interrupted,
            Err(reproject::engine::EngineError::Interrupted)
        ),
        "{interrupted:?}"
    );
    drop(idle);

    append(&kafka.settings, &mut history, 20_000);
    let reference = single_process_checksums("sharedapart", &kafka).await;
    let report = rebuild_shared(
        &engine,
        &all_projections(),
        &rebuild_options(),
        &CancellationToken::new(),
    )
    .await
    .expect("the shared rebuild goes on");
    assert_eq!(
        report.builds,
        vec![2, 3, 1],
        "daily_sales's build was joined"
    );
    assert_eq!(active_checksums(&pool).await, reference.tables);
}

/// The worker rows of the active builds written by the `run --shared` process `pid`: its
/// partitions and the events it applied, per build.
async fn follower_rows(pool: &PgPool, pid: u32) -> Vec<(Vec<i32>, i64)> {
    sqlx::query_as(
        "SELECT w.partitions, w.events_replayed FROM reproject.workers w JOIN reproject.builds b USING (build_id)
         WHERE b.phase = 'active' AND w.worker LIKE $1 ORDER BY b.build_id",
    )
    .bind(format!("reproject following pid={pid} %"))
    .fetch_all(pool)
    .await
    .expect("workers")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processes_share_the_follow_and_the_survivor_takes_over_a_killed_one_s_partitions() {
    let kafka = Kafka::start(8);
    let db = fresh_database("sharedrun").await;
    let total = 90_000u64;
    let mut history = history(total, 31);
    append(&kafka.settings, &mut history, 30_000);
    let logs: Vec<PathBuf> = (0..2).map(|i| log_path("sharedrun", i)).collect();
    let mut runs = Processes(
        logs.iter()
            .map(|log| spawn_shared_run(&db, &kafka, log, &[]))
            .collect(),
    );
    let pids: Vec<u32> = runs.0.iter().map(Child::id).collect();
    let pool = pool(&db).await;
    let read_logs = || logs.iter().map(read_log).collect::<Vec<_>>().join("\n");

    // The two backfill the three projections together, one finishes and swaps each, then both
    // follow.
    wait_until(
        "the shared backfills to swap the three projections in",
        180,
        || {
            scalar::<i64>(
                &pool,
                "SELECT count(*) FROM reproject.builds WHERE phase = 'active'",
            )
        },
        |n| *n == Some(3),
    )
    .await;
    let producer = append_in_background(&kafka.settings, history, total - 30_000, 6_000);
    for pid in &pids {
        wait_until(
            &format!("process {pid} to follow its share of the three builds"),
            90,
            || follower_rows(&pool, *pid),
            |rows| {
                rows.len() == 3
                    && rows
                        .iter()
                        .all(|(partitions, events)| !partitions.is_empty() && *events > 0)
            },
        )
        .await;
    }
    let shares: Vec<Vec<i32>> = {
        let mut shares = Vec::new();
        for pid in &pids {
            shares.push(follower_rows(&pool, *pid).await[0].0.clone());
        }
        shares
    };
    assert!(
        shares[0].iter().all(|p| !shares[1].contains(p)),
        "the two follow different partitions: {shares:?}"
    );

    // SIGKILL: no goodbye to the group; its partitions move once its session times out.
    let mut victim = runs.0.remove(0);
    victim.kill().expect("SIGKILL one run");
    let _ = victim.wait();
    let history = tokio::task::spawn_blocking(move || producer.join().expect("producer"))
        .await
        .expect("join the producer");

    // Lag back to zero: every build's positions at the log's end, by the survivor alone.
    wait_until(
        "the survivor to apply the whole log to the three builds",
        120,
        || {
            scalar::<i64>(
                &pool,
                "SELECT min(applied)::bigint FROM (SELECT sum(next_offset) AS applied
                 FROM reproject.positions JOIN reproject.builds USING (build_id)
                 WHERE phase = 'active' GROUP BY build_id) a",
            )
        },
        |n| *n == Some(total as i64),
    )
    .await;
    let survivor = follower_rows(&pool, pids[1]).await;
    assert!(
        survivor.iter().all(|(partitions, _)| partitions.len() == 8),
        "the survivor follows every partition: {survivor:?}\n{}",
        read_logs()
    );
    stop(&mut runs.0[0]);

    let actual = actual_totals(&pool, "public").await.expect("totals");
    assert_eq!(
        differences(&history.expected(), &actual),
        Vec::<String>::new(),
        "{}",
        read_logs()
    );
    let sequences: i64 =
        sqlx::query_scalar("SELECT sum(last_sequence)::bigint FROM public.order_summary")
            .fetch_one(&pool)
            .await
            .expect("sum of sequences");
    assert_eq!(sequences, total as i64, "every event applied exactly once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn processes_sharing_a_follow_exit_when_caught_up_only_once_every_partition_is() {
    let kafka = Kafka::start(8);
    let db = fresh_database("sharedexit").await;
    let total = 60_000u64;
    let mut history = history(total, 37);
    append(&kafka.settings, &mut history, 20_000);
    let engine = engine(&db, &kafka.settings, tuning()).await;
    rebuild_all(&engine).await.expect("rebuild");
    append(&kafka.settings, &mut history, total - 20_000);

    // One process fast, one held to a slow rate: the fast one catches its share up and leaves
    // while the slow one is still behind, and the group hands the slow one its partitions.
    let logs: Vec<PathBuf> = (0..2).map(|i| log_path("sharedexit", i)).collect();
    let flags = ["--no-backfill", "--exit-when-caught-up", "0"];
    let mut runs = Processes(vec![
        spawn_shared_run(&db, &kafka, &logs[0], &flags),
        spawn_shared_run(
            &db,
            &kafka,
            &logs[1],
            &[&flags[..], &["--max-rate", "4000"]].concat(),
        ),
    ]);
    for (i, run) in runs.0.iter_mut().enumerate() {
        let status = wait_for_exit(run, "a shared run to catch up and exit", 120);
        assert!(status.success(), "run {i}: {}", read_log(&logs[i]));
    }
    let pool = pool(&db).await;
    let applied: Vec<i64> = sqlx::query_scalar(
        "SELECT sum(next_offset)::bigint FROM reproject.positions JOIN reproject.builds USING (build_id)
         WHERE phase = 'active' GROUP BY build_id ORDER BY build_id",
    )
    .fetch_all(&pool)
    .await
    .expect("positions");
    assert_eq!(
        applied,
        vec![total as i64; 3],
        "both exited with every build at the log's end\n{}\n{}",
        read_log(&logs[0]),
        read_log(&logs[1])
    );
    let actual = actual_totals(&pool, "public").await.expect("totals");
    assert_eq!(
        differences(&history.expected(), &actual),
        Vec::<String>::new()
    );
}
