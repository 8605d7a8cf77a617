//! The ledger end to end, through its own binaries as a team would run them: a dev broker in a process
//! of its own, the real PostgreSQL, seed, rebuild, totals, a projection bug fixed and verified, swap,
//! `run` following both of the ledger's topics, and an account's and a transfer's timelines (one from
//! each topic) with their payloads shown as JSON through the ledger's descriptors.

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
        stdout(&seed).contains("wrote 20000 events to ledger.accounts, ledger.transfers")
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

    // 5. More events arrive on both topics; `run` follows both, and the views agree again.
    let accounts_before = topic_positions(&common, "account_balances", "ledger.accounts");
    let transfers_before = topic_positions(&common, "account_balances", "ledger.transfers");
    let appended = run(
        LEDGER,
        &[
            "seed",
            "--skip",
            "20000",
            "--events",
            "5000",
            "--expected",
            &expected,
        ],
        &common,
    );
    assert!(appended.status.success(), "append: {}", stderr(&appended));
    let followed = run(LEDGER, &["run", "--exit-when-caught-up", "0"], &common);
    assert!(followed.status.success(), "run: {}", stderr(&followed));
    let accounts_after = topic_positions(&common, "account_balances", "ledger.accounts");
    let transfers_after = topic_positions(&common, "account_balances", "ledger.transfers");
    assert!(
        accounts_after > accounts_before && transfers_after > transfers_before,
        "both topics followed: accounts {accounts_before} -> {accounts_after}, transfers {transfers_before} -> {transfers_after}"
    );
    assert_eq!(accounts_after + transfers_after, 25_000);
    let check = run(LEDGER, &["check-totals", "--expected", &expected], &common);
    assert!(
        check.status.success() && stdout(&check).contains("all totals agree"),
        "{}{}",
        stdout(&check),
        stderr(&check)
    );

    // 6. One early transfer (written as v1), traced through the upcaster, with JSON payloads decoded by
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
    let (text, lines) = replay_json(&transfer, &common);
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
    assert_eq!(event["topic"], "ledger.transfers", "{event}");

    // 7. An account's timeline comes from the other topic, and the same replay reads both.
    let closed: String = reproject::sqlx::query_scalar(
        "SELECT account_id FROM public.account_balances WHERE status = 'closed' ORDER BY account_id LIMIT 1",
    )
    .fetch_one(&pool)
    .await
    .expect("a closed account");
    let (text, lines) = replay_json(&closed, &common);
    let events: Vec<&serde_json::Value> = lines
        .iter()
        .filter(|l| l["kind"] == "event")
        .map(|l| &l["event"])
        .collect();
    assert_eq!(events.len(), 2, "opened and closed: {text}");
    assert!(
        events.iter().all(|e| e["topic"] == "ledger.accounts"),
        "{text}"
    );
    assert!(text.contains("AccountOpened") && text.contains("AccountClosed"));
    let summary = lines
        .iter()
        .find(|l| l["kind"] == "summary")
        .expect("a summary");
    assert_eq!(
        summary["topics"],
        serde_json::json!(["ledger.accounts", "ledger.transfers"]),
        "{summary}"
    );
    let _ = std::fs::remove_file(&expected);
}

/// `replay <aggregate> --format json`: its output, and each line parsed.
fn replay_json(aggregate: &str, common: &[&str]) -> (String, Vec<serde_json::Value>) {
    let replay = run(LEDGER, &["replay", aggregate, "--format", "json"], common);
    assert!(replay.status.success(), "replay: {}", stderr(&replay));
    let text = stdout(&replay);
    let lines = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON: {e}: {l}")))
        .collect();
    (text, lines)
}

/// The sum of the active build's next offsets over `topic`'s partitions, as `status` shows them.
fn topic_positions(common: &[&str], projection: &str, topic: &str) -> i64 {
    let status = run(LEDGER, &["status", "--format", "json"], common);
    assert!(status.status.success(), "status: {}", stderr(&status));
    let report: serde_json::Value =
        serde_json::from_slice(&status.stdout).expect("status --format json is JSON");
    let projection = report["projections"]
        .as_array()
        .and_then(|all| all.iter().find(|p| p["name"] == projection))
        .unwrap_or_else(|| panic!("{projection} in {report}"));
    projection["active"]["positions"][topic]
        .as_object()
        .unwrap_or_else(|| panic!("{topic} positions in {projection}"))
        .values()
        .map(|v| v.as_i64().unwrap_or(0))
        .sum()
}
