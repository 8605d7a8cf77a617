//! The binary as users run it: separate processes sharing a `dev-broker`, `run` backfilling and
//! stopping on SIGTERM, and one clear line with a non-zero exit for bad input.

use crate::common;

use std::process::{Command, Stdio};

use common::*;
use reproject::source::dev_broker::DevBrokerProcess;

fn dev_broker(partitions: u32) -> DevBrokerProcess {
    DevBrokerProcess::spawn(env!("CARGO_BIN_EXE_reproject"), partitions).expect("start dev-broker")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seed_rebuild_status_and_check_totals_as_separate_processes_sharing_a_dev_broker() {
    let db = fresh_database("cli").await;
    let broker = dev_broker(4);
    let expected = std::env::temp_dir().join(format!(
        "reproject-cli-expected-{}.json",
        std::process::id()
    ));
    let expected = expected.to_string_lossy().into_owned();
    let common = [
        "--brokers",
        broker.address.as_str(),
        "--database-url",
        db.as_str(),
        "--quiet",
    ];

    let seed = binary(
        &[
            &["seed", "--events", "20000", "--expected", &expected],
            &common[..],
        ]
        .concat(),
    );
    assert!(seed.status.success(), "seed: {}", text(&seed.stderr));
    assert!(
        text(&seed.stdout).contains("wrote 20000 events"),
        "{}",
        text(&seed.stdout)
    );

    let rebuild = binary(&[&["rebuild", "--all"], &common[..]].concat());
    assert!(
        rebuild.status.success(),
        "rebuild: {}",
        text(&rebuild.stderr)
    );
    assert!(
        text(&rebuild.stdout).contains("20000 events replayed"),
        "{}",
        text(&rebuild.stdout)
    );

    let status = binary(&[&["status", "--format", "json"], &common[..]].concat());
    assert!(status.status.success(), "status: {}", text(&status.stderr));
    let report: serde_json::Value =
        serde_json::from_slice(&status.stdout).expect("status --format json is JSON");
    let projections = report["projections"].as_array().expect("projections");
    assert_eq!(projections.len(), 3);
    for p in projections {
        assert_eq!(p["active"]["lag"], 0, "{}", p["name"]);
        assert!(
            p["active"]["positions"]["shop.orders"]
                .as_object()
                .is_some_and(|o| o.len() == 4),
            "{p}"
        );
    }
    let table = binary(&[&["status"], &common[..]].concat());
    assert!(
        text(&table.stdout).contains("order_summary (code v1)"),
        "{}",
        text(&table.stdout)
    );

    let check = binary(&[&["check-totals", "--expected", &expected], &common[..]].concat());
    assert!(
        check.status.success(),
        "check-totals: {}{}",
        text(&check.stdout),
        text(&check.stderr)
    );
    assert!(text(&check.stdout).contains("all totals agree"));
    let _ = std::fs::remove_file(&expected);

    // replay: JSON lines for tools, one clear line and exit 2 for what cannot be answered.
    let pool = pool(&db).await;
    let id: String =
        sqlx::query_scalar("SELECT order_id FROM public.order_summary ORDER BY order_id LIMIT 1")
            .fetch_one(&pool)
            .await
            .expect("an order");
    let replay = binary(&[&["replay", id.as_str(), "--format", "json"], &common[..]].concat());
    assert_eq!(replay.status.code(), Some(0), "{}", text(&replay.stderr));
    let lines: Vec<serde_json::Value> = text(&replay.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("every line is JSON"))
        .collect();
    let kinds: Vec<&str> = lines.iter().filter_map(|l| l["kind"].as_str()).collect();
    assert!(
        kinds.iter().filter(|k| **k == "event").count() >= 3,
        "{kinds:?}"
    );
    assert_eq!(kinds.last(), Some(&"summary"));
    assert!(lines
        .iter()
        .any(|l| l["kind"] == "comparison" && l["comparison"]["verdict"] == "agree"));
    // A reader that goes away before the output comes (`status | head -0`, `replay ID | less` quit at
    // once) ends the command quietly, with success, not with a panic.
    for args in [vec!["status"], vec!["replay", id.as_str()]] {
        let mut child = Command::new(env!("CARGO_BIN_EXE_reproject"))
            .args(&args)
            .args(common)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start reproject");
        drop(child.stdout.take());
        let out = child.wait_with_output().expect("wait for reproject");
        assert_eq!(
            out.status.code(),
            Some(0),
            "{args:?} with its reader gone: {}",
            text(&out.stderr)
        );
        assert!(
            text(&out.stderr).is_empty(),
            "{args:?}: {}",
            text(&out.stderr)
        );
    }
    for (args, expected) in [
        (vec!["replay", "no-such-order"], "has no events"),
        (
            vec!["replay", id.as_str(), "--projection", "nope"],
            "unknown projection \"nope\"",
        ),
    ] {
        let out = binary(&[&args[..], &common[..]].concat());
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert!(
            text(&out.stderr).contains(expected),
            "{args:?}: {}",
            text(&out.stderr)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_backfills_projections_that_were_never_built_and_stops_cleanly_on_sigterm() {
    let db = fresh_database("run_backfill").await;
    let broker = dev_broker(2);
    let common = [
        "--brokers",
        broker.address.as_str(),
        "--database-url",
        db.as_str(),
        "--quiet",
    ];
    let seed = binary(&[&["seed", "--events", "10000"], &common[..]].concat());
    assert!(seed.status.success(), "seed: {}", text(&seed.stderr));

    let mut run = Command::new(env!("CARGO_BIN_EXE_reproject"))
        .args([&["run"], &common[..]].concat())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start run");
    let pool = pool(&db).await;
    wait_until(
        "run to backfill and swap in all three projections",
        60,
        || {
            scalar::<i64>(
                &pool,
                "SELECT count(*) FROM reproject.builds WHERE phase = 'active'",
            )
        },
        |active| *active == Some(3),
    )
    .await;

    // More events while it runs are applied.
    let more = binary(
        &[
            &["seed", "--events", "2000", "--skip", "10000"],
            &common[..],
        ]
        .concat(),
    );
    assert!(more.status.success(), "{}", text(&more.stderr));
    let applied = wait_until(
        "run to apply all 12,000 events",
        30,
        || {
            scalar::<i64>(
                &pool,
                "SELECT coalesce(sum(last_sequence), 0)::bigint FROM public.order_summary",
            )
        },
        |applied| applied.is_some_and(|n| n >= 12_000),
    )
    .await;
    assert_eq!(applied, Some(12_000), "every event, once");

    let term = Command::new("kill")
        .args(["-TERM", &run.id().to_string()])
        .status()
        .expect("kill");
    assert!(term.success());
    let status = wait_for_exit(&mut run, "run to stop after SIGTERM", 15);
    assert!(status.success(), "run exits 0 after SIGTERM: {status:?}");

    // `run` has gone: its last progress report, seconds old, is not shown as a live writer.
    let table = binary(&[&["status"], &common[..]].concat());
    let shown = text(&table.stdout);
    assert!(
        !shown.contains(" by reproject") && shown.contains("no writer running (last: reproject"),
        "{shown}"
    );
}

#[test]
fn bad_input_gets_one_clear_line_and_a_non_zero_exit() {
    let cases: [(&[&str], &str); 7] = [
        (
            &["status", "--database-url", "mysql://u:hunter2@h/db"],
            "must start with postgres://",
        ),
        (
            &[
                "status",
                "--database-url",
                "postgres://u:hunter2@127.0.0.1:1/db",
            ],
            "PostgreSQL at postgres://u:REDACTED@127.0.0.1:1/db",
        ),
        (
            &[
                "rebuild",
                "no_such_projection",
                "--database-url",
                "postgres://postgres@127.0.0.1:5432/postgres",
            ],
            "unknown projection \"no_such_projection\"",
        ),
        (&["seed", "-X", "nonsense"], "expected key=value"),
        (
            &["seed", "--shape", "colour=3"],
            "unknown key \"colour\"; this domain's example knows orders",
        ),
        (
            &[
                "rebuild",
                "order_summary",
                "--schema-dir",
                "/nonexistent/reproject-schemas",
                "--database-url",
                "postgres://postgres@127.0.0.1:5432/postgres",
            ],
            "schema file /nonexistent/reproject-schemas/order_summary/v1",
        ),
        (
            &[
                "replay",
                "x",
                "--database-url",
                "postgres://u:hunter2@127.0.0.1:1/db",
            ],
            "PostgreSQL at postgres://u:REDACTED@127.0.0.1:1/db",
        ),
    ];
    for (args, expected) in cases {
        let out = binary(args);
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
        if args.contains(&"postgres://u:hunter2@127.0.0.1:1/db") {
            // The server's own answer, not a pool's time-out.
            assert!(stderr.contains("refused"), "{args:?}: {stderr}");
        }
        assert!(!stderr.contains("hunter2"), "password leaked: {stderr}");
        assert!(
            !stderr.contains("panicked") && !stderr.contains("RUST_BACKTRACE"),
            "{stderr}"
        );
        assert_eq!(
            stderr
                .trim()
                .lines()
                .filter(|l| l.starts_with("reproject:"))
                .count(),
            1,
            "{stderr}"
        );
    }
    // replay against a broker that is not there: the broker is named, after the metadata timeout.
    let db = "postgres://postgres@127.0.0.1:5432/postgres";
    let out = binary(&[
        "replay",
        "some-order",
        "--brokers",
        "127.0.0.1:1",
        "--database-url",
        db,
        "--quiet",
    ]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("Kafka (127.0.0.1:1)") && stderr.contains("shop.orders"),
        "{stderr}"
    );
    let unknown_flag = binary(&["rebuild", "--no-such-flag"]);
    assert_eq!(unknown_flag.status.code(), Some(2));
    assert!(text(&unknown_flag.stderr).contains("--no-such-flag"));
    for (args, expected) in [
        (
            &["rebuild", "--all", "--memory-budget", "lots"][..],
            "\"lots\" is not a size",
        ),
        (
            &["rebuild", "--all", "--on-bad-record", "ignore"][..],
            "invalid value 'ignore' for '--on-bad-record",
        ),
        (
            &["rebuild", "--all", "--verify", "loose"][..],
            "invalid value 'loose' for '--verify",
        ),
        (
            &["verify", "order_summary", "--against", "yesterday"][..],
            "expected `active`, a version number (3 or v3) or build:ID",
        ),
        (
            &["status", "--read-database", "mysql://replica/db"][..],
            "must start with postgres://",
        ),
        (
            &["estimate", "--all", "--sample", "5"][..],
            "--sample 5: expected a fraction",
        ),
        (
            &[
                "tune",
                "order_summary",
                "--database-url",
                "postgres://postgres@127.0.0.1:5432/postgres",
            ][..],
            "nothing to change",
        ),
    ] {
        let out = binary(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert!(
            text(&out.stderr).contains(expected),
            "{}",
            text(&out.stderr)
        );
    }
}

#[test]
fn bench_reports_every_figure_as_json_with_its_limits_measured_in_the_same_run() {
    let json = std::env::temp_dir().join(format!("reproject-bench-{}.json", std::process::id()));
    let out = binary(&[
        "bench",
        "--events",
        "20000",
        "--partitions",
        "2",
        "--baseline-events",
        "2000",
        "--readers",
        "2",
        "--database",
        "rp_test_bench",
        "--broker",
        "own-process",
        "--json",
        &json.to_string_lossy(),
        "--quiet",
    ]);
    assert!(
        out.status.success(),
        "{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    let figures: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&json).expect("the JSON file")).expect("JSON");
    assert_eq!(figures["rebuild"]["events_replayed"], 20_000);
    assert_eq!(figures["baseline_events"], 2_000);
    assert_eq!(figures["reader_errors"], 0);
    for field in [
        "events_per_second",
        "baseline_events_per_second",
        "speedup",
        "reader_longest_ms",
    ] {
        assert!(
            figures[field].as_f64().is_some_and(|v| v > 0.0),
            "{field}: {figures}"
        );
    }
    assert!(figures["reader_queries"].as_u64().is_some_and(|n| n > 0));
    assert!(figures["peak_rss_bytes"].as_u64().is_some_and(|n| n > 0));
    // The limits: the whole log read raw, and every row the rebuild loaded written again.
    assert_eq!(figures["broker"], "own-process");
    assert_eq!(figures["read_limit"]["records"], 20_000, "{figures}");
    let rows_loaded = figures["rebuild"]["rows_loaded"]
        .as_u64()
        .expect("rows_loaded");
    assert!(
        figures["write_limit"]["rows"]
            .as_u64()
            .is_some_and(|rows| rows >= rows_loaded && rows_loaded > 0),
        "{figures}"
    );
    for field in [
        "replay_share_of_read_limit",
        "load_and_indexes_over_write_limit",
    ] {
        assert!(
            figures[field]
                .as_f64()
                .is_some_and(|v| v > 0.0 && v.is_finite()),
            "{field}: {figures}"
        );
    }
    assert!(figures["write_limit"]["index_seconds"]
        .as_f64()
        .is_some_and(|s| s > 0.0));
    // The estimate made before the rebuild, set against it.
    let estimate = &figures["estimate"];
    for field in [
        "seconds",
        "share_of_rebuild",
        "events_per_second",
        "predicted_seconds",
        "measured_seconds",
        "predicted_over_measured",
    ] {
        assert!(
            estimate[field]
                .as_f64()
                .is_some_and(|v| v > 0.0 && v.is_finite()),
            "estimate.{field}: {figures}"
        );
    }
    // 20,000 events are fewer than a pilot reads at the least: it reads them all, once.
    assert_eq!(estimate["sample_share"].as_f64(), Some(1.0), "{figures}");
    let _ = std::fs::remove_file(&json);
}
