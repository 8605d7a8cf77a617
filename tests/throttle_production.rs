//! The throttle with PostgreSQL's own benchmark as production, on the same server: `run` catching
//! up a backlog, and a whole `rebuild --all`, leave full speed within seconds of pgbench starting,
//! naming what production lost; once pgbench stops they go back to full speed within seconds; the
//! work completes with the generator's totals. The decisions show in the log, `status` and the
//! metrics. (The figures, production's tps and latency beside reproject, are a benchmark:
//! `cargo bench --bench throttle`.)

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use common::*;
use reproject::domain::shop::totals::{actual_totals, differences};

/// The two tests load the server as production does: never side by side.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A child process killed when the test ends, passed or not: a panicking test must not leave a
/// follower holding its build's lock (or pgbench loading the server) for the next test.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

impl std::ops::Deref for Killed {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for Killed {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

/// Prints the throttle's decisions when a test fails: a timed-out wait says what it waited for,
/// the log says why the throttle did what it did.
struct ShowLogOnFailure(PathBuf);

impl Drop for ShowLogOnFailure {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("the throttle's decisions, in order ({}):", self.0.display());
            for line in log_text(&self.0)
                .lines()
                .filter(|l| l.contains("throttle:"))
            {
                eprintln!("{line}");
            }
        }
    }
}

/// The budget the tests hold the throttle to: tighter than the defaults, so that what a catch-up
/// costs pgbench on any machine (a few percent on a fast one, half on a loaded one) is over it;
/// whether the defaults keep production within them is the benchmark's question.
const TEST_BUDGET: [&str; 4] = ["--max-throughput-loss", "3", "--max-latency-rise", "15"];

fn pgbench(db: &str, args: &[&str]) -> Command {
    let mut command = Command::new("pgbench");
    command.args(args).arg(db);
    command
}

fn pgbench_init(db: &str) {
    let out = pgbench(db, &["-i", "-s", "5", "-q"])
        .output()
        .expect("pgbench is installed (it comes with PostgreSQL's server package)");
    assert!(out.status.success(), "pgbench -i: {}", text(&out.stderr));
}

/// pgbench select-only with 4 clients for up to two minutes: production.
fn start_production(db: &str) -> Killed {
    Killed(
        pgbench(db, &["-S", "-c", "4", "-j", "2", "-T", "120"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start pgbench"),
    )
}

fn stop_production(pgbench: &mut Killed) {
    let _ = pgbench.kill();
    let _ = pgbench.wait();
}

/// A reproject command whose log (info level: every throttle decision) goes to a file.
fn spawn_logged(db: &str, kafka: &Kafka, args: &[&str], log: &Path) -> Killed {
    let file = std::fs::File::create(log).expect("log file");
    Killed(
        Command::new(env!("CARGO_BIN_EXE_reproject"))
            .args(args)
            .args(TEST_BUDGET)
            .args(["--brokers", &kafka.settings.brokers, "--database-url", db])
            .env("NO_COLOR", "1")
            .env(
                "RUST_LOG",
                std::env::var("THROTTLE_TEST_LOG").unwrap_or_else(|_| "reproject=info,warn".into()),
            )
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .expect("start reproject"),
    )
}

/// A gauge's value in Prometheus text.
fn gauge(metrics: &str, name: &str) -> Option<f64> {
    metrics
        .lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<f64>().ok())
}

fn log_text(log: &Path) -> String {
    std::fs::read_to_string(log).unwrap_or_default()
}

fn log_path(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("reproject-{name}-{}.log", std::process::id()))
}

/// The log's throttle lines that slowed or paused writing because of production's budget.
fn budget_actions(log: &str) -> Vec<&str> {
    log.lines()
        .filter(|l| {
            (l.contains("throttle: slowing down") || l.contains("throttle: pausing writes"))
                && (l.contains("production throughput")
                    || l.contains("probe latency")
                    || l.contains("waits on locks"))
        })
        .collect()
}

/// For `--nocapture`: what the throttle decided, in order.
fn print_throttle_lines(log: &Path) {
    for line in log_text(log).lines().filter(|l| l.contains("throttle:")) {
        println!("{line}");
    }
}

async fn wait_for_log(log: &Path, what: &str, seconds: u64, found: impl Fn(&str) -> bool) {
    wait_until(
        what,
        seconds,
        || async { log_text(log) },
        |text| found(text),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_catch_up_beside_pgbench_slows_down_naming_the_signal_and_speeds_up_when_it_stops() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let db = fresh_database("throttle_pgbench_run").await;
    let pool = pool(&db).await;
    let kafka = Kafka::start(32);
    let mut history = history(2_000_000, 53);
    append(&kafka.settings, &mut history, 20_000);
    {
        let engine = engine(&db, &kafka.settings, tuning()).await;
        rebuild_all(&engine).await.expect("builds");
    }
    pgbench_init(&db);
    append(&kafka.settings, &mut history, 800_000);
    let total = 820_000;

    let log = log_path("throttle-run");
    let _show = ShowLogOnFailure(log.clone());
    let metrics_addr = free_local_addr();
    let mut run = spawn_logged(
        &db,
        &kafka,
        &[
            "run",
            "--no-backfill",
            "--throttle-check-every",
            "0.5",
            "--metrics-addr",
            &metrics_addr,
        ],
        &log,
    );
    wait_until(
        "run to be catching up",
        60,
        || applied(&pool, 1),
        |n| *n > 30_000,
    )
    .await;
    let mut production = start_production(&db);

    // Within seconds the throttle slows or pauses, naming what production lost.
    wait_for_log(
        &log,
        "the throttle to act on production's loss",
        20,
        |text| !budget_actions(text).is_empty(),
    )
    .await;
    let before_stop = applied(&pool, 1).await;
    assert!(
        before_stop < total,
        "the catch-up was still going when the throttle acted"
    );
    let status = reproject(&db, &kafka, &["status"]);
    let shown = text(&status.stdout);
    assert!(
        shown.contains("throttle "),
        "status shows the throttle:\n{shown}"
    );
    // The metrics show pgbench measured alone (a few thousand commits/s, not the trickle of this
    // test's own polling) and production judged against it. Which budget signal shows depends on
    // the machine: throughput is judged only over 2 s of writing, and where the probe's latency
    // pauses the catch-up every other check, it is latency alone.
    let metrics = wait_until(
        "the metrics to show production measured alone and judged against its solo figures",
        20,
        || async { http_get(&metrics_addr, "/metrics") },
        |(code, metrics)| {
            *code == 200
                && gauge(metrics, "reproject_production_alone_commits_per_second")
                    .is_some_and(|tps| tps > 1_000.0)
                && ["throughput", "latency"].iter().any(|signal| {
                    metrics.contains(&format!(
                        "reproject_throttle_signal_load_ratio{{signal=\"{signal}\"}}"
                    ))
                })
        },
    )
    .await;
    assert!(gauge(&metrics.1, "reproject_production_commits_per_second").is_some());

    // pgbench stops: full speed again within seconds, and the catch-up completes.
    let acted = log_text(&log).len();
    stop_production(&mut production);
    wait_for_log(&log, "the throttle to lift its limit", 15, |text| {
        text.get(acted..)
            .is_some_and(|new| new.contains("no production traffic"))
    })
    .await;
    assert_eq!(wait_for_applied(&pool, 1, total, 180).await, total);
    stop(&mut run.0);
    let expected = history.expected();
    let actual = actual_totals(&pool, "public").await.expect("totals");
    assert_eq!(differences(&expected, &actual), Vec::<String>::new());
    print_throttle_lines(&log);
    let _ = std::fs::remove_file(&log);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebuild_beside_pgbench_paces_its_bulk_load_and_index_builds() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let db = fresh_database("throttle_pgbench_rebuild").await;
    let pool = pool(&db).await;
    let kafka = Kafka::start(32);
    let mut history = history(1_500_000, 59);
    append(&kafka.settings, &mut history, 1_500_000);
    pgbench_init(&db);

    let log = log_path("throttle-rebuild");
    let _show = ShowLogOnFailure(log.clone());
    let mut production = start_production(&db);
    let mut rebuild = spawn_logged(
        &db,
        &kafka,
        &["rebuild", "--all", "--throttle-check-every", "0.5"],
        &log,
    );
    // The bulk load waits for production to be measured alone, then goes in paced slices; the
    // index builds go one at a time while production suffers.
    let status = wait_for_exit(&mut rebuild.0, "the rebuild", 300);
    stop_production(&mut production);
    let text = log_text(&log);
    assert!(status.success(), "rebuild failed:\n{text}");
    assert!(
        text.contains("throttle: waiting before writing") && text.contains("bulk load"),
        "the bulk load waited for the throttle:\n{text}"
    );
    assert!(
        !budget_actions(&text).is_empty(),
        "the throttle acted on production's loss during the rebuild:\n{text}"
    );
    let expected = history.expected();
    let actual = actual_totals(&pool, "public").await.expect("totals");
    assert_eq!(differences(&expected, &actual), Vec::<String>::new());
    print_throttle_lines(&log);
    let _ = std::fs::remove_file(&log);
}
