//! The ledger end to end, through its own binaries as a team would run them: a dev broker in a process
//! of its own, the real PostgreSQL, seed, rebuild, totals, a projection bug fixed and verified, swap,
//! and one transfer's timeline with its payloads shown as JSON through the ledger's descriptors.

use std::process::{Command, Output};

use reproject::source::dev_broker::DevBrokerProcess;

const LEDGER: &str = env!("CARGO_BIN_EXE_reproject-ledger");
const BEFORE_FIX: &str = env!("CARGO_BIN_EXE_ledger-before-fix");

fn dev_broker(partitions: u32) -> DevBrokerProcess {
    DevBrokerProcess::spawn(LEDGER, partitions).expect("start the ledger's dev-broker")
}

async fn fresh_database(name: &str) -> String {
    let admin = std::env::var("TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
    reproject::sink::database::recreate_database(&admin, name)
        .await
        .unwrap_or_else(|e| panic!("cannot create database {name} (is PostgreSQL running?): {e}"))
}

fn run(program: &str, args: &[&str], common: &[&str]) -> Output {
    Command::new(program)
        .args(args)
        .args(common)
        .output()
        .expect("run the ledger binary")
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seed_rebuild_fix_a_projection_bug_verify_swap_and_replay_a_transfer() {
    let db = fresh_database("rp_test_ledger").await;
    let broker = dev_broker(4);
    let expected =
        std::env::temp_dir().join(format!("ledger-expected-{}.json", std::process::id()));
    let expected = expected.to_string_lossy().into_owned();
    let common = [
        "--brokers",
        broker.address.as_str(),
        "--database-url",
        db.as_str(),
        "--quiet",
    ];

    // 1. A history in two schema versions, and what its views must show.
    let seed = run(
        LEDGER,
        &["seed", "--events", "20000", "--expected", &expected],
        &common,
    );
    assert!(seed.status.success(), "seed: {}", stderr(&seed));
    assert!(
        stdout(&seed).contains("wrote 20000 events to ledger.events")
            && stdout(&seed).contains("\"v1\""),
        "{}",
        stdout(&seed)
    );

    // 2. The release before the fix rebuilds everything: its daily_volume v1 sums where it meant max.
    let rebuild = run(BEFORE_FIX, &["rebuild", "--all"], &common);
    assert!(rebuild.status.success(), "rebuild: {}", stderr(&rebuild));
    let check = run(LEDGER, &["check-totals", "--expected", &expected], &common);
    assert_eq!(
        check.status.code(),
        Some(1),
        "{}{}",
        stdout(&check),
        stderr(&check)
    );
    assert!(
        stdout(&check).contains("largest transfer in EUR (micros): expected"),
        "{}",
        stdout(&check)
    );
    assert!(
        !stdout(&check).contains("volume in EUR (micros): expected"),
        "{}",
        stdout(&check)
    );

    // 3. The fixed release rebuilds daily_volume as v2; verification shows exactly the fixed column.
    let fixed = run(
        LEDGER,
        &["rebuild", "daily_volume", "--verify", "report"],
        &common,
    );
    assert!(fixed.status.success(), "rebuild v2: {}", stderr(&fixed));
    let report = stdout(&fixed);
    let differing: Vec<&str> = report
        .lines()
        .skip_while(|l| !l.contains("rows with other values"))
        .skip(1)
        .take_while(|l| l.starts_with("      ") && l.contains(" rows"))
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    assert_eq!(differing, ["largest_micros"], "{report}");
    assert!(report.contains("daily_volume now reads build"), "{report}");

    // 4. Now every figure agrees.
    let check = run(LEDGER, &["check-totals", "--expected", &expected], &common);
    assert!(
        check.status.success(),
        "{}{}",
        stdout(&check),
        stderr(&check)
    );
    assert!(
        stdout(&check).contains("all totals agree"),
        "{}",
        stdout(&check)
    );

    // 5. One early transfer (written as v1), traced through the upcaster, with JSON payloads decoded by
    //    the ledger's own descriptors.
    let pool = reproject::sqlx::PgPool::connect(&db)
        .await
        .expect("connect");
    let transfer: String = reproject::sqlx::query_scalar(
        "SELECT transfer_id FROM public.transfers ORDER BY posted_at LIMIT 1",
    )
    .fetch_one(&pool)
    .await
    .expect("a transfer");
    let replay = run(LEDGER, &["replay", &transfer, "--format", "json"], &common);
    assert!(replay.status.success(), "replay: {}", stderr(&replay));
    let text = stdout(&replay);
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON: {e}: {l}")))
        .collect();
    assert!(lines.iter().any(|l| l["kind"] == "event"), "{text}");
    let shown = serde_json::Value::Array(lines.clone()).to_string();
    for needle in [
        "ledger.v1.TransferPosted",
        "ledger.v2.TransferPosted",
        "amount_cents",
        "amount_micros",
        "debit_account",
        "from_account",
    ] {
        assert!(shown.contains(needle), "{needle} missing from {text}");
    }
    let event = lines
        .iter()
        .find(|l| l["kind"] == "event")
        .map(|l| &l["event"])
        .expect("an event");
    let (v1, v2) = (&event["steps"][0]["payload"], &event["steps"][1]["payload"]);
    assert_eq!(
        v1["amount_cents"].as_i64().map(|c| c * 10_000),
        v2["amount_micros"].as_i64(),
        "the upcaster turns cents into micros: {event}"
    );
    assert_eq!(v1["from_account"], v2["debit_account"], "{event}");
    let _ = std::fs::remove_file(&expected);
}
