//! Upcasters and views defined by files, run by the stock binary (`--domain DIR`): the shop's
//! upcasters and three views written as files (domains/shop-as-files) give tables identical to the
//! compiled ones on the same log, in all three schema versions; mistakes in the files are refused
//! before anything runs, each with its file and line; an expression that fails on one event refuses
//! that event, naming the view, the file, the offset.

use crate::common;

use std::path::{Path, PathBuf};

use common::*;
use reproject::domain::shop::generator::{History, HistoryConfig, V3_FROM};

const EVENTS: u64 = 8_000;

fn shop_as_files() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("domains/shop-as-files")
}

/// A shop history written entirely in the latest schema version (orders placed from 2025 on).
fn latest_version_history() -> History {
    let mut config = HistoryConfig::new(EVENTS, EVENTS / 10, EVENTS / 50, 31);
    config.start = V3_FROM;
    History::new(config)
}

const TABLES: [(&str, &str); 3] = [
    ("order_summary", "order_id"),
    ("customer_stats", "customer_id"),
    ("daily_sales", "day, currency"),
];

async fn checksums(pool: &sqlx::PgPool) -> Vec<String> {
    let mut out = Vec::new();
    for (table, key) in TABLES {
        out.push(checksum(pool, "public", table, key).await);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_shops_views_as_files_give_the_compiled_views_tables_on_the_same_log() {
    let kafka = Kafka::start(4);
    let mut history = history(EVENTS, 31);
    append(&kafka.settings, &mut history, EVENTS);
    let expected = history.expected();
    assert_eq!(
        expected.events_by_version.keys().collect::<Vec<_>>(),
        ["v1", "v2", "v3"],
        "the history is written in all three versions"
    );

    // Both through the binary: a test that built engines here would compile the whole engine
    // into this test binary once per domain, minutes of CI for nothing the binary does not do.
    let compiled_db = fresh_database("file_views_compiled").await;
    let out = reproject(&compiled_db, &kafka, &["rebuild", "--all"]);
    assert!(
        out.status.success(),
        "the compiled rebuild: {}",
        text(&out.stderr)
    );

    // The stock binary, pointed at the files.
    let files_db = fresh_database("file_views_files").await;
    let domain_dir = shop_as_files();
    let domain_arg = domain_dir.to_string_lossy().into_owned();
    let out = reproject(
        &files_db,
        &kafka,
        &["--domain", &domain_arg, "rebuild", "--all"],
    );
    assert!(
        out.status.success(),
        "rebuild --all of the file-defined views: {}{}",
        text(&out.stdout),
        text(&out.stderr)
    );

    let compiled_pool = pool(&compiled_db).await;
    let files_pool = pool(&files_db).await;
    let from_code = checksums(&compiled_pool).await;
    let from_files = checksums(&files_pool).await;
    assert!(from_code.iter().all(|c| c != "empty"), "{from_code:?}");
    assert_eq!(
        from_files, from_code,
        "order_summary, customer_stats, daily_sales"
    );
    let orders: i64 = scalar(&files_pool, "SELECT count(*) FROM order_summary")
        .await
        .expect("rows");
    assert_eq!(orders as u64, expected.orders);

    // replay works on the file-defined views as on compiled ones: every step of the upcast chain
    // and each view's rows, which agree with the live ones.
    let id: String = scalar(
        &files_pool,
        "SELECT order_id FROM order_summary ORDER BY placed_at LIMIT 1",
    )
    .await
    .expect("the oldest order");
    let replay = reproject(
        &files_db,
        &kafka,
        &["--domain", &domain_arg, "replay", &id, "--format", "json"],
    );
    assert_eq!(replay.status.code(), Some(0), "{}", text(&replay.stderr));
    let lines: Vec<serde_json::Value> = text(&replay.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("every line is JSON"))
        .collect();
    let verdicts: Vec<&str> = lines
        .iter()
        .filter(|l| l["kind"] == "comparison")
        .filter_map(|l| l["comparison"]["verdict"].as_str())
        .collect();
    // order_summary's row is the order's alone and agrees; customer_stats' and daily_sales' rows
    // gather other aggregates, which a replay of one order cannot recompute.
    assert_eq!(verdicts, ["shared_row", "shared_row", "agree"]);
    assert!(
        text(&replay.stdout).contains("shop.v1.OrderPlaced"),
        "the oldest order was placed in v1 and upcast through the steps"
    );

    // The derived SQL made the same keys and indexes as the shop's hand-written SQL.
    let indexes = |pool: sqlx::PgPool| async move {
        let rows: Vec<String> = sqlx::query_scalar(
            "SELECT regexp_replace(indexdef, ' ON \\S+ ', ' ON t ') FROM pg_indexes
             WHERE schemaname = 'public' AND tablename = 'order_summary' ORDER BY 1",
        )
        .fetch_all(&pool)
        .await
        .expect("indexes");
        rows.len()
    };
    let (code_indexes, file_indexes) = (
        indexes(compiled_pool.clone()).await,
        indexes(files_pool.clone()).await,
    );
    assert_eq!(file_indexes, code_indexes);
}

/// A domain folder in the temp dir whose domain.toml reads the shop's schemas, with these views.
fn domain_with_views(test: &str, views: &[(&str, &str)]) -> PathBuf {
    domain_with(test, views, None)
}

fn domain_with(test: &str, views: &[(&str, &str)], upcasters: Option<&str>) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("rp-{test}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let protos = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/domain/shop/protos");
    std::fs::create_dir_all(&dir).expect("domain dir");
    std::fs::write(
        dir.join("domain.toml"),
        format!(
            "name = \"broken\"\ntopics = [\"{TOPIC}\"]\nschemas = {:?}\nevents = [\"shop.v3.OrderPlaced\", \"shop.v3.OrderPaid\"]\n",
            protos.to_string_lossy()
        ),
    )
    .expect("domain.toml");
    if let Some(text) = upcasters {
        std::fs::write(dir.join("upcasters.toml"), text).expect("upcasters.toml");
    }
    for (name, text) in views {
        let folder = dir.join("views").join(name);
        std::fs::create_dir_all(&folder).expect("view folder");
        std::fs::write(folder.join("v1.toml"), text).expect("view file");
    }
    dir
}

/// Make the domain in `dir` take every event type of the shop's latest version, as a history has.
fn every_event_type(dir: &Path) {
    let path = dir.join("domain.toml");
    let text = std::fs::read_to_string(&path).expect("domain.toml");
    let every = r#"events = ["shop.v3.OrderPlaced", "shop.v3.ItemAdded", "shop.v3.ItemRemoved", "shop.v3.OrderPaid", "shop.v3.OrderShipped", "shop.v3.OrderCancelled", "shop.v3.OrderRefunded"]"#;
    let text: String = text
        .lines()
        .map(|l| if l.starts_with("events = ") { every } else { l })
        .collect::<Vec<_>>()
        .join("\n");
    std::fs::write(&path, text).expect("domain.toml");
}

const MISTAKES: &str = r#"[[tables]]
name = "orders_by_customer"
key = ["customer_id"]
columns = [
  { name = "customer_id", type = "text" },
  { name = "orders", type = "bigint", counter = true },
  { name = "last_placed", type = "timestamptz" },
  { name = "currency", type = "text" },
]

[[on]]
events = ["shop.v3.OrderPlaced"]
key = ["payload.customer"]
add = { orders = "1" }

[[on]]
events = ["shop.v3.OrderPaid"]
key = ["payload.customer_id"]
set = { last_placed = "payload.currency" }

[[on]]
events = ["shop.v3.OrderPaid"]
key = ["payload.customer_id"]
set = { currency = "payload.currency +" }

[[on]]
events = ["shop.v9.Nothing"]
key = ["payload.customer_id"]
add = { orders = "1" }

[[on]]
events = ["shop.v3.OrderPaid"]
key = ["payload.customer_id"]
set = { currency = "now()" }
"#;

const INJECTION: &str = r#"[[tables]]
name = "x\"; DROP TABLE reproject.builds; --"
key = ["id"]
columns = [{ name = "id", type = "text" }]
"#;

#[test]
fn check_refuses_each_mistake_with_its_file_line_and_what_is_wrong() {
    let dir = domain_with_views(
        "file-views-mistakes",
        &[("orders_by_customer", MISTAKES), ("sneaky", INJECTION)],
    );
    let out = binary(&["--domain", &dir.to_string_lossy(), "check"]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    let view = dir.join("views/orders_by_customer/v1.toml");
    let at = |line: usize| format!("{}:{line}: ", view.display());
    for (line, what) in [
        (13, "key customer_id = \"payload.customer\", for shop.v3.OrderPlaced: message shop.v3.OrderPlaced has no field `customer`"),
        (19, "set.last_placed = \"payload.currency\", for shop.v3.OrderPaid: the expression is a string and the column is timestamp with time zone"),
        (24, "does not parse as CEL"),
        (27, "shop.v9.Nothing is not an event type of this domain"),
        (34, "unknown function now()"),
    ] {
        assert!(
            err.lines().any(|l| l.starts_with(&at(line)) && l.contains(what)),
            "expected {}{what} in:\n{err}",
            at(line)
        );
    }
    let sneaky = dir.join("views/sneaky/v1.toml");
    assert!(
        err.contains(&format!("{}:2: table name", sneaky.display()))
            && err.contains("is not a valid name"),
        "{err}"
    );
    // Nothing ran: no command got as far as the database or the broker.
    assert!(!err.contains("connect"), "{err}");
}

const STEP_MISTAKES: &str = r#"[[step]]
from = "shop.v2.OrderPaid"
to = "shop.v3.OrderPaid"
set = { customer_id = "payload.customer", currency = "event.aggregate_id" }

[[step]]
from = "shop.v1.OrderPaid"
to = "shop.v2.OrderPaid"
set = { amount_cents = "payload.amount" }

[[step]]
from = "shop.v1.ItemAdded"
to = "shop.v2.ItemAdded"
set = { "unit_price_cents" = "cents(payload.unit_price)", nested = "1" }
"#;

#[test]
fn check_refuses_upcaster_steps_that_cannot_work() {
    let dir = domain_with(
        "file-views-steps",
        &[("sneaky_but_fine", "[[tables]]\nname = \"ok\"\nkey = [\"id\"]\ncolumns = [{ name = \"id\", type = \"text\" }]\n")],
        Some(STEP_MISTAKES),
    );
    let out = binary(&["--domain", &dir.to_string_lossy(), "check"]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    let file = dir.join("upcasters.toml");
    for (line, what) in [
        (Some(4), "step shop.v2.OrderPaid -> shop.v3.OrderPaid: set.customer_id = \"payload.customer\": message shop.v2.OrderPaid has no field `customer`"),
        (Some(4), "set.currency = \"event.aggregate_id\": an upcaster step sees the message alone"),
        // paid_at changes from a local-time string to a timestamp and is not said how.
        (Some(2), "field paid_at changes type"),
        (Some(9), "set.amount_cents = \"payload.amount\": the expression is a string and the field is a int"),
        (Some(14), "set.nested: shop.v2.ItemAdded has no such field"),
        (None, "shop.v1.ItemAdded has no path to a latest version: shop.v1.ItemAdded -> shop.v2.ItemAdded is neither an event type"),
    ] {
        let prefix = match line {
            Some(l) => format!("{}:{l}: ", file.display()),
            None => format!("{}: ", file.display()),
        };
        assert!(
            err.lines().any(|l| l.starts_with(&prefix) && l.contains(what)),
            "expected {prefix}{what} in:\n{err}"
        );
    }
}

#[test]
fn check_describes_a_domain_whose_files_are_right() {
    let out = binary(&["--domain", &shop_as_files().to_string_lossy(), "check"]);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", text(&out.stderr));
    assert!(
        stdout.contains("domain shop-as-files: 21 message type(s), 7 of them latest versions"),
        "{stdout}"
    );
    assert!(
        stdout.contains("order_summary v1: order_summary (16 columns)"),
        "{stdout}"
    );
}

const UNCONVERTIBLE: &str = r#"[[tables]]
name = "numbered_customers"
key = ["order_id"]
per_aggregate = true
columns = [
  { name = "order_id", type = "text" },
  { name = "customer_number", type = "bigint" },
]

[[on]]
events = ["shop.v3.OrderPlaced"]
key = ["payload.order_id"]
set = { customer_number = "int(payload.customer_id)" }
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_expression_that_fails_on_an_event_refuses_it_naming_view_file_and_offset() {
    let kafka = Kafka::start(1);
    let mut history = latest_version_history();
    append(&kafka.settings, &mut history, 200);
    let dir = domain_with_views(
        "file-views-refusal",
        &[("numbered_customers", UNCONVERTIBLE)],
    );
    let db = fresh_database("file_views_refusal").await;
    let out = reproject(
        &db,
        &kafka,
        &["--domain", &dir.to_string_lossy(), "rebuild", "--all"],
    );
    assert_eq!(out.status.code(), Some(2), "customer ids are not numbers");
    let error = text(&out.stderr);
    for what in [
        "projection numbered_customers refused the event",
        "views/numbered_customers/v1.toml:11",
        "column customer_number = \"int(payload.customer_id)\"",
        "not an integer",
        "offset 0",
        TOPIC,
    ] {
        assert!(error.contains(what), "{what:?} in: {error}");
    }
}

const ORDERS_PER_CUSTOMER: &str = r#"[[tables]]
name = "orders_per_customer"
key = ["customer_id"]
columns = [
  { name = "customer_id", type = "text" },
  { name = "orders", type = "bigint", counter = true },
]

[[on]]
events = ["shop.v3.OrderPlaced"]
key = ["payload.customer_id"]
add = { orders = "1" }
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_view_file_changed_under_its_version_is_refused_until_the_change_gets_a_version_of_its_own(
) {
    let kafka = Kafka::start(2);
    let mut history = latest_version_history();
    append(&kafka.settings, &mut history, 1_000);
    let dir = domain_with_views(
        "file-views-edited",
        &[("orders_per_customer", ORDERS_PER_CUSTOMER)],
    );
    every_event_type(&dir);
    let domain_arg = dir.to_string_lossy().into_owned();
    let db = fresh_database("file_views_edited").await;
    let rebuild = || reproject(&db, &kafka, &["--domain", &domain_arg, "rebuild", "--all"]);
    let out = rebuild();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let pool = pool(&db).await;
    let hashes: Vec<Option<String>> =
        sqlx::query_scalar("SELECT definition_hash FROM reproject.builds ORDER BY build_id")
            .fetch_all(&pool)
            .await
            .expect("builds");
    assert_eq!(hashes.len(), 1);
    let first = hashes[0]
        .clone()
        .expect("the build recorded its file's hash");
    assert_eq!(first.len(), 64, "SHA-256, hex: {first}");

    // A comment, a description and another layout are not a change of the view.
    let v1 = dir.join("views/orders_per_customer/v1.toml");
    let relaid = format!(
        "# Orders per customer.\ndescription = \"how many orders each customer placed\"\n\n{}",
        ORDERS_PER_CUSTOMER.replace(
            "add = { orders = \"1\" }",
            "add = {orders=\"1\"}  # one each"
        )
    );
    std::fs::write(&v1, &relaid).expect("v1.toml");
    let out = rebuild();
    assert!(out.status.success(), "{}", text(&out.stderr));

    // Counting each order twice is: every command that writes refuses, naming the file and the
    // build; status still shows where things are.
    let changed = ORDERS_PER_CUSTOMER.replace("orders = \"1\"", "orders = \"2\"");
    std::fs::write(&v1, &changed).expect("v1.toml");
    for command in [
        &["rebuild", "--all"][..],
        &["run", "--exit-when-caught-up", "0"][..],
        &["rollback", "orders_per_customer"][..],
    ] {
        let mut args = vec!["--domain", &domain_arg];
        args.extend_from_slice(command);
        let out = reproject(&db, &kafka, &args);
        assert!(
            !out.status.success(),
            "{command:?} went on with an edited view"
        );
        let error = text(&out.stderr);
        for what in [
            "views/orders_per_customer/v1.toml is not the declaration build",
            "of orders_per_customer v1 was made from",
            "new version file",
        ] {
            assert!(error.contains(what), "{command:?}: {what:?} in: {error}");
        }
    }
    let status = reproject(&db, &kafka, &["--domain", &domain_arg, "status"]);
    assert!(status.status.success(), "{}", text(&status.stderr));
    assert!(
        text(&status.stdout).contains(
            "EDITED VIEW FILES: views/orders_per_customer/v1.toml is not the declaration build"
        ),
        "{}",
        text(&status.stdout)
    );
    let orders: i64 = scalar(&pool, "SELECT sum(orders)::bigint FROM orders_per_customer")
        .await
        .expect("orders");
    assert_eq!(
        orders as u64,
        history.expected().orders,
        "the view is untouched"
    );

    // The change as v2, v1 as it was: v2 is built from offset zero and swapped in.
    std::fs::write(dir.join("views/orders_per_customer/v2.toml"), &changed).expect("v2.toml");
    std::fs::write(&v1, ORDERS_PER_CUSTOMER).expect("v1.toml");
    let out = rebuild();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let orders: i64 = scalar(&pool, "SELECT sum(orders)::bigint FROM orders_per_customer")
        .await
        .expect("orders");
    assert_eq!(orders as u64, 2 * history.expected().orders);
    let active: Option<String> = scalar(
        &pool,
        "SELECT definition_hash FROM reproject.builds WHERE phase = 'active'",
    )
    .await;
    assert!(
        active.is_some_and(|h| h != first),
        "v2 recorded its own hash"
    );
}

const REVENUE_BY_CURRENCY: &str = r#"[[tables]]
name = "revenue_by_currency"
key = ["currency"]
columns = [
  { name = "currency", type = "text" },
  { name = "revenue_cents", type = "bigint", counter = true },
]

[[on]]
events = ["shop.v3.OrderPaid"]
key = ["payload.currency"]
add = { revenue_cents = "payload.amount_cents" }
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_view_file_dropped_next_to_a_running_run_is_backfilled_and_swapped_in_without_a_restart()
{
    let kafka = Kafka::start(2);
    let mut history = latest_version_history();
    append(&kafka.settings, &mut history, 1_500);
    let dir = domain_with_views(
        "file-views-live",
        &[("orders_per_customer", ORDERS_PER_CUSTOMER)],
    );
    every_event_type(&dir);
    let domain_arg = dir.to_string_lossy().into_owned();
    let db = fresh_database("file_views_live").await;
    let pool = pool(&db).await;
    let log_path = dir.with_extension("log");
    let log = std::fs::File::create(&log_path).expect("run's log");
    let mut run = std::process::Command::new(env!("CARGO_BIN_EXE_reproject"))
        .args(["run", "--quiet", "--domain", &domain_arg, "--brokers"])
        .args([&kafka.settings.brokers, "--database-url", &db])
        .stderr(log)
        .spawn()
        .expect("start run");
    let logged = || std::fs::read_to_string(&log_path).unwrap_or_default();
    let orders = "SELECT sum(orders)::bigint FROM orders_per_customer";
    let expected = history.expected().orders as i64;
    wait_until(
        "orders_per_customer caught up",
        60,
        || scalar::<i64>(&pool, orders),
        |n| *n == Some(expected),
    )
    .await;
    let first_build: i64 = scalar(&pool, "SELECT build_id FROM reproject.builds")
        .await
        .expect("one build");

    // A view file with a mistake: reported, and the running view goes on.
    let broken = dir.join("views/broken");
    std::fs::create_dir_all(&broken).expect("views/broken");
    std::fs::write(
        broken.join("v1.toml"),
        REVENUE_BY_CURRENCY.replace("payload.amount_cents", "payload.amount"),
    )
    .expect("broken v1.toml");
    append(&kafka.settings, &mut history, 300);
    let expected = history.expected().orders as i64;
    wait_until(
        "orders_per_customer to follow the new events",
        60,
        || scalar::<i64>(&pool, orders),
        |n| *n == Some(expected),
    )
    .await;
    let report = wait_until(
        "run to report the broken file",
        30,
        || async { logged() },
        |log| log.contains("the domain's files changed and are refused"),
    )
    .await;
    assert!(
        report.contains("views/broken/v1.toml") && report.contains("has no field `amount`"),
        "{report}"
    );
    assert!(matches!(run.try_wait(), Ok(None)), "run went on");
    std::fs::remove_dir_all(&broken).expect("remove views/broken");

    // A new view: backfilled from offset zero and swapped in by the same process, while events
    // keep arriving; the other view keeps its build.
    let folder = dir.join("views/revenue_by_currency");
    std::fs::create_dir_all(&folder).expect("view folder");
    std::fs::write(folder.join("v1.toml"), REVENUE_BY_CURRENCY).expect("v1.toml");
    append(&kafka.settings, &mut history, 300);
    let expected = history.expected();
    let revenue: i64 = expected.daily_sales.values().map(|d| d.revenue_cents).sum();
    assert!(revenue > 0);
    wait_until(
        "revenue_by_currency backfilled and swapped in",
        90,
        || {
            scalar::<i64>(
                &pool,
                "SELECT sum(revenue_cents)::bigint FROM revenue_by_currency",
            )
        },
        |n| *n == Some(revenue),
    )
    .await;
    wait_until(
        "orders_per_customer to follow",
        60,
        || scalar::<i64>(&pool, orders),
        |n| *n == Some(expected.orders as i64),
    )
    .await;
    assert!(
        matches!(run.try_wait(), Ok(None)),
        "no restart: the same process"
    );
    let builds: Vec<(String, i64, String)> = sqlx::query_as(
        "SELECT projection, build_id, phase FROM reproject.builds ORDER BY build_id",
    )
    .fetch_all(&pool)
    .await
    .expect("builds");
    assert_eq!(builds.len(), 2, "{builds:?}");
    assert_eq!(
        (builds[0].1, builds[0].2.as_str()),
        (first_build, "active"),
        "{builds:?}"
    );
    assert_eq!(
        (builds[1].0.as_str(), builds[1].2.as_str()),
        ("revenue_by_currency", "active")
    );
    stop(&mut run);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn check_with_a_sample_of_the_log_names_event_types_no_upcaster_knows_and_none_reads() {
    let kafka = Kafka::start(2);
    let mut history = latest_version_history();
    append(&kafka.settings, &mut history, 400);
    // The domain declares OrderPlaced and OrderPaid only; the log has every event type.
    let dir = domain_with_views(
        "file-views-sample",
        &[("orders_per_customer", ORDERS_PER_CUSTOMER)],
    );
    let db = fresh_database("file_views_sample").await;
    let domain_arg = dir.to_string_lossy().into_owned();
    let check = || {
        reproject(
            &db,
            &kafka,
            &["--domain", &domain_arg, "check", "--sample", "100"],
        )
    };
    let out = check();
    let stdout = text(&out.stdout);
    assert!(!out.status.success(), "{stdout}");
    assert!(
        stdout.contains("sample: 200 record(s) of shop.orders"),
        "{stdout}"
    );
    assert!(
        stdout
            .lines()
            .any(|l| l.starts_with("problem: event type shop.v3.ItemAdded (")
                && l.contains("is known to no upcaster: a replay would refuse each one")
                && l.contains("shop.orders/")),
        "{stdout}"
    );
    assert!(
        stdout
            .lines()
            .any(|l| l.trim_start().starts_with("shop.v3.OrderPlaced: ")
                && l.ends_with("read by orders_per_customer")),
        "{stdout}"
    );
    assert!(
        stdout
            .lines()
            .any(|l| l.trim_start().starts_with("shop.v3.OrderPaid: ")
                && l.ends_with("read by no view")),
        "{stdout}"
    );

    // Every type declared: nothing is refused, and the types no view reads are only named.
    every_event_type(&dir);
    let out = check();
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", text(&out.stderr));
    assert!(!stdout.contains("problem:"), "{stdout}");
    assert!(
        stdout
            .lines()
            .any(|l| l.trim_start().starts_with("shop.v3.ItemAdded: ")
                && l.ends_with("read by no view")),
        "{stdout}"
    );
}

const EVENTS_PER_ORDER: &str = r#"[[tables]]
name = "events_per_order"
key = ["order_id"]
columns = [
  { name = "order_id", type = "text" },
  { name = "events", type = "bigint", counter = true },
]

[[on]]
events = ["*"]
key = ["event.aggregate_id"]
add = { events = "1" }
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dead_letters_retry_verify_and_estimate_work_on_file_defined_views() {
    let kafka = Kafka::start(2);
    let mut history = latest_version_history();
    append(&kafka.settings, &mut history, 600);
    // Only OrderPlaced and OrderPaid are declared: the other events are bad records.
    let dir = domain_with_views(
        "file-views-retry",
        &[("events_per_order", EVENTS_PER_ORDER)],
    );
    let domain_arg = dir.to_string_lossy().into_owned();
    let db = fresh_database("file_views_retry").await;
    let pool = pool(&db).await;
    let cli = |args: &[&str]| {
        let mut all = vec!["--domain", &domain_arg];
        all.extend_from_slice(args);
        let out = reproject(&db, &kafka, &all);
        assert!(out.status.success(), "{args:?}: {}", text(&out.stderr));
        text(&out.stdout)
    };
    cli(&["rebuild", "--all", "--on-bad-record", "dead-letter"]);
    let events = "SELECT sum(events)::bigint FROM events_per_order";
    let applied: i64 = scalar(&pool, events).await.expect("events");
    let letters: i64 = scalar(
        &pool,
        "SELECT count(*) FROM reproject.dead_letters WHERE resolved_at IS NULL",
    )
    .await
    .expect("dead letters");
    assert!(
        applied > 0 && letters > 0,
        "{applied} applied, {letters} dead letters"
    );
    assert_eq!(applied + letters, 600);

    // The fix is in domain.toml (declare every event type): the view file is untouched, and the
    // dead letters are applied to the live build.
    every_event_type(&dir);
    cli(&["dead-letters", "retry", "events_per_order"]);
    let applied: i64 = scalar(&pool, events).await.expect("events");
    assert_eq!(applied, 600, "every event counted once");
    let unresolved: i64 = scalar(
        &pool,
        "SELECT count(*) FROM reproject.dead_letters WHERE resolved_at IS NULL",
    )
    .await
    .expect("dead letters");
    assert_eq!(unresolved, 0);

    // A fresh build from the fixed files, not swapped in, agrees with the live build the retry
    // repaired (verify exits 1 when rows differ); estimate predicts a rebuild from a pilot.
    cli(&["rebuild", "events_per_order", "--no-swap"]);
    let verified = cli(&["verify", "events_per_order"]);
    assert!(
        verified.contains("verdict: PASSED") && !verified.contains("nothing to compare with"),
        "{verified}"
    );
    let estimated = cli(&["estimate", "--all"]);
    assert!(estimated.contains("events_per_order"), "{estimated}");
}

/// A copy of domains/shop-as-files in the temp dir (its schemas still read from the source tree).
fn shop_as_files_copy(test: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("rp-{test}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let from = shop_as_files();
    for file in [
        "upcasters.toml",
        "views/order_summary/v1.toml",
        "views/customer_stats/v1.toml",
        "views/daily_sales/v1.toml",
    ] {
        let to = dir.join(file);
        std::fs::create_dir_all(to.parent().expect("a folder")).expect("domain folder");
        std::fs::copy(from.join(file), &to).expect("copy");
    }
    let protos = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/domain/shop/protos");
    let settings = std::fs::read_to_string(from.join("domain.toml"))
        .expect("domain.toml")
        .replace(
            "\"../../src/domain/shop/protos\"",
            &format!("{:?}", protos.to_string_lossy()),
        );
    std::fs::write(dir.join("domain.toml"), settings).expect("domain.toml");
    dir
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_changed_upcaster_is_named_by_status_for_the_builds_made_before_and_a_rebuild_applies_it()
{
    let kafka = Kafka::start(2);
    let mut history = history(EVENTS, 37);
    append(&kafka.settings, &mut history, EVENTS);
    let dir = shop_as_files_copy("file-views-upcaster-changed");
    let domain_arg = dir.to_string_lossy().into_owned();
    let db = fresh_database("file_views_upcasters").await;
    let pool = pool(&db).await;
    let command = |args: &[&str]| {
        let mut all = vec!["--domain", &domain_arg];
        all.extend_from_slice(args);
        let out = reproject(&db, &kafka, &all);
        assert!(out.status.success(), "{args:?}: {}", text(&out.stderr));
        text(&out.stdout)
    };
    const CHANGED: &str = "SCHEMAS OR UPCASTERS CHANGED";
    command(&["rebuild", "--all"]);
    let recorded: Vec<Option<String>> = sqlx::query_scalar(
        "SELECT DISTINCT inputs_hash FROM reproject.builds WHERE phase = 'active'",
    )
    .fetch_all(&pool)
    .await
    .expect("builds");
    assert!(
        recorded.len() == 1 && recorded[0].as_ref().is_some_and(|h| h.len() == 64),
        "every build recorded the one hash of the schemas and upcasters: {recorded:?}"
    );
    assert!(!command(&["status"]).contains(CHANGED));

    // A comment is not a change.
    let upcasters = dir.join("upcasters.toml");
    let text_before = std::fs::read_to_string(&upcasters).expect("upcasters.toml");
    std::fs::write(&upcasters, format!("# reviewed\n{text_before}")).expect("upcasters.toml");
    assert!(!command(&["status"]).contains(CHANGED));

    // v1 payments were in another currency after all: not refused (a fixed upcaster is a reason to
    // rebuild), but status names every active build made before, and a rebuild applies it.
    let fixed = text_before.replacen(
        "currency = \"'EUR'\", paid_at",
        "currency = \"'XXX'\", paid_at",
        1,
    );
    assert_ne!(
        fixed, text_before,
        "the v1 OrderPaid step sets its currency"
    );
    std::fs::write(&upcasters, fixed).expect("upcasters.toml");
    let status = command(&["status"]);
    for view in ["order_summary", "customer_stats", "daily_sales"] {
        assert!(
            status.contains(&format!(
                "of {view} v1 was made through other schemas or upcaster steps"
            )),
            "{view} in: {status}"
        );
    }
    assert!(
        status.contains(&format!("{CHANGED}: active build")),
        "{status}"
    );
    let in_xxx = "SELECT count(*) FROM daily_sales WHERE currency = 'XXX'";
    assert_eq!(scalar::<i64>(&pool, in_xxx).await, Some(0));

    command(&["rebuild", "--all"]);
    assert!(!command(&["status"]).contains(CHANGED));
    assert!(
        scalar::<i64>(&pool, in_xxx).await.is_some_and(|n| n > 0),
        "the rebuild read v1 payments through the fixed step"
    );
}
