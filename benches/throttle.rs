//! What production feels while reproject writes beside it: pgbench (select-only, then TPC-B-like,
//! 4 clients) alone, beside `reproject run` catching up a backlog with the default throttle, and
//! beside it with `--no-throttle`, in the same run, three rounds each, on the same server.
//!
//! `cargo bench --bench throttle` (about 10 minutes). Prints one line per measurement and a summary
//! of medians: production's tps and latency (average, p99) as a share of its solo figures, and the
//! catch-up rate each mode leaves reproject. Environment: `THROTTLE_BENCH_SECONDS` (pgbench's
//! duration, default 15), `THROTTLE_BENCH_BACKLOG` (events appended before each catch-up, default
//! 3,000,000), `THROTTLE_BENCH_ROUNDS` (default 3), `THROTTLE_BENCH_WORKLOADS` (`select-only`,
//! `TPC-B-like` or both, comma-separated; default both), `THROTTLE_BENCH_LOGS` (a folder: each
//! `run`'s log goes there, with the throttle's every check, to see what it decided and why, and
//! pgbench's tps per second beside it),
//! `THROTTLE_BENCH_BINARY` (the `reproject` to run instead of this build's: an earlier commit's,
//! to compare the two on the same day).

#[path = "../tests/common/mod.rs"]
mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Instant;

use common::*;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn setting(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[derive(Clone, Copy, Debug, Default)]
struct Production {
    tps: f64,
    latency_ms: f64,
    p99_ms: f64,
}

/// Run pgbench for `seconds` and read its tps, average latency and (from its per-transaction log)
/// the 99th percentile latency. With `progress`, pgbench's tps per second goes to that file.
fn pgbench(
    db: &str,
    workload: &[&str],
    seconds: u64,
    logs: &Path,
    progress: Option<std::path::PathBuf>,
) -> Production {
    let _ = std::fs::remove_dir_all(logs);
    std::fs::create_dir_all(logs).expect("log dir");
    let prefix = logs.join("tx");
    let mut command = Command::new("pgbench");
    command
        .args(workload)
        .args(["-c", "4", "-j", "2", "-T", &seconds.to_string(), "-l"])
        .arg(format!("--log-prefix={}", prefix.display()));
    if progress.is_some() {
        command.args(["-P", "1", "--progress-timestamp"]);
    }
    let out = command.arg(db).output().expect("pgbench is installed");
    if let Some(path) = progress {
        let _ = std::fs::write(path, &out.stderr);
    }
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "pgbench: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let figure = |label: &str| {
        report
            .lines()
            .find(|l| l.starts_with(label))
            .and_then(|l| l.split('=').nth(1))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(f64::NAN)
    };
    let mut latencies: Vec<u64> = Vec::new();
    for entry in std::fs::read_dir(logs).expect("pgbench logs").flatten() {
        let text = std::fs::read_to_string(entry.path()).unwrap_or_default();
        latencies.extend(
            text.lines()
                .filter_map(|l| l.split_whitespace().nth(2))
                .filter_map(|v| v.parse::<u64>().ok()),
        );
    }
    latencies.sort_unstable();
    let p99 = latencies
        .get((latencies.len() as f64 * 0.99) as usize)
        .map_or(f64::NAN, |us| *us as f64 / 1e3);
    Production {
        tps: figure("tps"),
        latency_ms: figure("latency average"),
        p99_ms: p99,
    }
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(f64::NAN)
}

struct Measured {
    production: Production,
    catch_up_rate: f64,
}

fn spawn_run(db: &str, kafka: &Kafka, throttle: bool, log: Option<std::path::PathBuf>) -> Child {
    let binary = std::env::var_os("THROTTLE_BENCH_BINARY")
        .unwrap_or_else(|| env!("CARGO_BIN_EXE_reproject").into());
    let mut command = Command::new(binary);
    if let Some(path) = log {
        let file = std::fs::File::create(&path).expect("a log file in THROTTLE_BENCH_LOGS");
        command
            .env(
                "RUST_LOG",
                "reproject=info,reproject::engine::throttle=debug",
            )
            .stderr(file);
    }
    command.args([
        "run",
        "--no-backfill",
        "--quiet",
        "--brokers",
        &kafka.settings.brokers,
        "--database-url",
        db,
    ]);
    if !throttle {
        command.arg("--no-throttle");
    }
    command
        .stdout(Stdio::null())
        .spawn()
        .expect("start reproject run")
}

fn main() {
    let seconds = setting("THROTTLE_BENCH_SECONDS", 15);
    let backlog = setting("THROTTLE_BENCH_BACKLOG", 3_000_000);
    let rounds = setting("THROTTLE_BENCH_ROUNDS", 3);
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(async {
        let db = fresh_database("bench_throttle").await;
        let pool = pool(&db).await;
        let kafka = Kafka::start(128);
        let mut history = history(40_000_000, 61);
        append(&kafka.settings, &mut history, 20_000);
        {
            let engine = engine(&db, &kafka.settings, tuning()).await;
            rebuild_all(&engine).await.expect("the first builds");
        }
        let init = Command::new("pgbench")
            .args(["-i", "-s", "10", "-q"])
            .arg(&db)
            .output()
            .expect("pgbench is installed");
        assert!(init.status.success(), "pgbench -i failed");
        let logs = std::env::temp_dir().join(format!("reproject-bench-throttle-{}", std::process::id()));
        let mut appended = 20_000i64;
        println!(
            "pgbench -c 4 -j 2 -T {seconds}, reproject run catching up {backlog} events; {rounds} rounds"
        );
        let only = std::env::var("THROTTLE_BENCH_WORKLOADS").unwrap_or_default();
        for (name, workload) in [("select-only", vec!["-S"]), ("TPC-B-like", vec![])] {
            if !only.is_empty() && !only.split(',').any(|w| w.trim() == name) {
                continue;
            }
            let mut alone = Vec::new();
            let mut beside: [Vec<Measured>; 2] = [Vec::new(), Vec::new()];
            for round in 1..=rounds {
                let progress = |mode: &str| {
                    std::env::var_os("THROTTLE_BENCH_LOGS").map(|dir| {
                        std::path::Path::new(&dir).join(format!("{name}-{round}-{mode}.pgbench"))
                    })
                };
                let solo = pgbench(&db, &workload, seconds, &logs, progress("alone"));
                println!(
                    "{name} round {round} alone: {:.0} tps, {:.3} ms avg, {:.3} ms p99",
                    solo.tps, solo.latency_ms, solo.p99_ms
                );
                alone.push(solo);
                for (i, throttle) in [true, false].into_iter().enumerate() {
                    append(&kafka.settings, &mut history, backlog);
                    appended += backlog as i64;
                    let log = std::env::var_os("THROTTLE_BENCH_LOGS").map(|dir| {
                        let mode = if throttle { "throttle" } else { "no-throttle" };
                        std::path::Path::new(&dir).join(format!("{name}-{round}-{mode}.log"))
                    });
                    let mut run = spawn_run(&db, &kafka, throttle, log);
                    let start = applied(&pool, 1).await;
                    wait_until("run to be writing", 60, || applied(&pool, 1), |n| *n > start)
                        .await;
                    let from = applied(&pool, 1).await;
                    let started = Instant::now();
                    if std::env::var_os("THROTTLE_BENCH_LOGS").is_some() {
                        println!(
                            "  pgbench starts at {} UTC",
                            chrono::Utc::now().format("%H:%M:%S%.3f")
                        );
                    }
                    let mode = if throttle { "throttle" } else { "no-throttle" };
                    let production = pgbench(&db, &workload, seconds, &logs, progress(mode));
                    let events = applied(&pool, 1).await - from;
                    let rate = events as f64 / started.elapsed().as_secs_f64();
                    // Whatever is left goes in at full speed once production has stopped.
                    wait_for_applied(&pool, 1, appended, 600).await;
                    stop(&mut run);
                    let mode = if throttle { "throttle" } else { "--no-throttle" };
                    let finished = if from + events >= appended {
                        " (the backlog ran out before pgbench ended)"
                    } else {
                        ""
                    };
                    println!(
                        "{name} round {round} beside run, {mode}: {:.0} tps ({:.0}%), {:.3} ms avg, {:.3} ms p99; catch-up {:.0} events/s{finished}",
                        production.tps,
                        production.tps / solo.tps * 100.0,
                        production.latency_ms,
                        production.p99_ms,
                        rate
                    );
                    beside[i].push(Measured {
                        production,
                        catch_up_rate: rate,
                    });
                }
            }
            let tps_alone = median(&mut alone.iter().map(|p| p.tps).collect::<Vec<_>>());
            let lat_alone = median(&mut alone.iter().map(|p| p.latency_ms).collect::<Vec<_>>());
            let p99_alone = median(&mut alone.iter().map(|p| p.p99_ms).collect::<Vec<_>>());
            println!("\n{name}: medians of {rounds}");
            // Beside the medians, each round against its own solo run (the solo figures drift
            // from round to round by as much as the effect measured).
            println!("| production | tps | latency avg | latency p99 | catch-up events/s | tps kept per round (median) |");
            println!("|---|---|---|---|---|---|");
            println!("| alone | {tps_alone:.0} | {lat_alone:.3} ms | {p99_alone:.3} ms | - | - |");
            for (i, mode) in ["beside run, throttle (defaults)", "beside run, --no-throttle"]
                .iter()
                .enumerate()
            {
                let m = &beside[i];
                let tps = median(&mut m.iter().map(|x| x.production.tps).collect::<Vec<_>>());
                let lat = median(&mut m.iter().map(|x| x.production.latency_ms).collect::<Vec<_>>());
                let p99 = median(&mut m.iter().map(|x| x.production.p99_ms).collect::<Vec<_>>());
                let rate = median(&mut m.iter().map(|x| x.catch_up_rate).collect::<Vec<_>>());
                let mut kept: Vec<f64> = m
                    .iter()
                    .zip(&alone)
                    .map(|(x, solo)| x.production.tps / solo.tps * 100.0)
                    .collect();
                let rounds_kept = kept
                    .iter()
                    .map(|k| format!("{k:.0}%"))
                    .collect::<Vec<_>>()
                    .join(", ");
                println!(
                    "| {mode} | {tps:.0} ({:+.0}%) | {lat:.3} ms ({:+.0}%) | {p99:.3} ms ({:+.0}%) | {rate:.0} | {rounds_kept} ({:.0}%) |",
                    (tps / tps_alone - 1.0) * 100.0,
                    (lat / lat_alone - 1.0) * 100.0,
                    (p99 / p99_alone - 1.0) * 100.0,
                    median(&mut kept)
                );
            }
            println!();
        }
        let _ = std::fs::remove_dir_all(&logs);
    });
}
