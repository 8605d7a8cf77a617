//! Bad records in the log, under both policies: `fail` stops at the first one, naming it, and keeps
//! what was committed; `dead-letter` keeps each one with its bytes and goes on, within a budget;
//! `dead-letters retry` applies them once the upcaster is fixed, and a duplicate event id is applied
//! once. Totals are checked against the generator's, which never saw the bad records.

use crate::common;

use std::collections::BTreeMap;
use std::sync::Arc;

use common::*;
use prost::Message;
use reproject::domain::shop::proto::{v1, v2};
use reproject::domain::shop::totals::{actual_totals, differences};
use reproject::domain::shop::{self, ShopEvent};
use reproject::engine::{BadRecordPolicy, EngineError, Tuning};
use reproject::envelope::micros_timestamp;
use reproject::proto::reproject::v1::EventEnvelope;
use reproject::source::producer::LogWriter;
use reproject::upcast::Registry;

fn envelope(aggregate_id: &str, type_name: &str, payload: Vec<u8>) -> Vec<u8> {
    EventEnvelope {
        event_id: uuid::Uuid::new_v4().as_bytes().to_vec(),
        aggregate_type: "order".into(),
        aggregate_id: aggregate_id.into(),
        sequence: 1,
        occurred_at: Some(micros_timestamp(1_600_000_000_000_000)),
        payload: Some(prost_types::Any {
            type_url: format!("type.googleapis.com/{type_name}"),
            value: payload,
        }),
        metadata: Default::default(),
    }
    .encode_to_vec()
}

/// A bad record: key, value, kind, and words its reason must contain.
type BadRecordCase = (Option<Vec<u8>>, Vec<u8>, &'static str, &'static str);

/// One bad record of each kind the issue names.
fn bad_records(duplicate: (String, Vec<u8>)) -> Vec<BadRecordCase> {
    let placed_v1 = |user_id: &str| {
        v1::OrderPlaced {
            order_id: "bad-4".into(),
            user_id: user_id.into(),
            placed_at: "2020-01-01 10:00:00 Europe/Berlin".into(),
            ship_to: String::new(),
        }
        .encode_to_vec()
    };
    vec![
        (
            Some(b"bad-1".to_vec()),
            b"\xff\xff\xff not an envelope".to_vec(),
            "envelope",
            "not a valid event envelope",
        ),
        (
            Some(b"bad-2".to_vec()),
            envelope("bad-2", "shop.v9.OrderTeleported", vec![1, 2, 3]),
            "upcast",
            "no upcaster knows the payload type type.googleapis.com/shop.v9.OrderTeleported",
        ),
        (
            Some(b"bad-3".to_vec()),
            envelope(
                "bad-3",
                "shop.v1.ItemAdded",
                v1::ItemAdded {
                    order_id: "bad-3".into(),
                    sku: "SKU-1".into(),
                    quantity: 1,
                    unit_price: "12,50".into(),
                }
                .encode_to_vec(),
            ),
            "upcast",
            "\"12,50\" is not a decimal amount",
        ),
        (
            Some(b"bad-5".to_vec()),
            envelope(
                "bad-5",
                "shop.v2.OrderPlaced",
                v2::OrderPlaced {
                    order_id: "bad-5".into(),
                    customer_id: "c-1".into(),
                    placed_at: "2021-03-01 10:00:00 Mars/Olympus_Mons".into(),
                    ship_to: String::new(),
                    currency: "EUR".into(),
                }
                .encode_to_vec(),
            ),
            "upcast",
            "unknown time zone",
        ),
        (
            Some(b"bad-4".to_vec()),
            envelope("bad-4", "shop.v1.OrderPlaced", placed_v1("")),
            "upcast",
            "required field user_id is missing",
        ),
        (
            None,
            envelope("bad-6", "shop.v1.OrderPlaced", placed_v1("u-1")),
            "key",
            "has no key",
        ),
        (
            Some(b"bad-7".to_vec()),
            envelope("bad-8", "shop.v1.OrderPlaced", placed_v1("u-1")),
            "key",
            "is not its envelope's aggregate id",
        ),
        (
            Some(duplicate.0.into_bytes()),
            duplicate.1,
            "duplicate",
            "already applied",
        ),
    ]
}

fn dead_letter_tuning() -> Tuning {
    Tuning {
        bad_records: BadRecordPolicy::DeadLetter { budget: 10_000 },
        ..tuning()
    }
}

/// The shop's upcasters with a bug: no step for v1 refunds, so every v1 refund is refused.
fn registry_missing_v1_refunds() -> Registry<ShopEvent> {
    shop::upcasters::register(Registry::builder())
        .without("shop.v1.OrderRefunded")
        .build()
        .expect("registry")
}

async fn dead_letters_by_kind(pool: &sqlx::PgPool, projection: &str) -> BTreeMap<String, i64> {
    sqlx::query_as::<_, (String, i64)>(
        "SELECT kind, count(*) FROM reproject.dead_letters WHERE projection = $1 AND resolved_at IS NULL GROUP BY kind",
    )
    .bind(projection)
    .fetch_all(pool)
    .await
    .expect("dead letters")
    .into_iter()
    .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_records_are_dead_lettered_with_their_bytes_and_applied_once_fixed() {
    let db = fresh_database("dead_letters").await;
    let kafka = Kafka::start(4);
    let mut history = history(12_000, 31);
    append(&kafka.settings, &mut history, 7_000);
    // A copy of a record already written: same key, same bytes, same event id.
    let duplicate = {
        let mut again = common::history(12_000, 31);
        let record = again.nth(100).expect("record");
        (record.key, record.value)
    };
    let bad = bad_records(duplicate);
    let mut writer = LogWriter::new(&kafka.settings, TOPIC, "consistent_random").expect("producer");
    for (key, value, _, _) in &bad {
        writer.send_raw(key.as_deref(), value).expect("send");
    }
    writer.finish().expect("delivered");
    append(&kafka.settings, &mut history, 5_000);
    let expected = history.expected();
    let v1_refunds = common::history(12_000, 31)
        .take(12_000)
        .filter(|r| {
            reproject::envelope::decode(&r.value, 0, 0)
                .is_ok_and(|d| d.type_url.ends_with("/shop.v1.OrderRefunded"))
        })
        .count() as u64;
    assert!(v1_refunds > 0, "the history has no v1 refunds");

    // The rebuild passes over every bad record, and every v1 refund (the bug), and finishes.
    let buggy = engine_with(
        &db,
        &kafka.settings,
        dead_letter_tuning(),
        registry_missing_v1_refunds(),
    )
    .await;
    let report = rebuild_all(&buggy)
        .await
        .expect("rebuild with dead letters");
    let pool = buggy.catalog.pool().clone();
    assert_eq!(report.events_replayed, 12_000 + bad.len() as u64);
    assert_eq!(
        report.dead_letters,
        3 * (bad.len() as u64 + v1_refunds),
        "every bad record and v1 refund, once per projection"
    );
    for projection in all_projections() {
        let kinds = dead_letters_by_kind(&pool, &projection).await;
        let want: BTreeMap<String, i64> = [
            ("envelope".to_string(), 1),
            ("upcast".to_string(), 4 + v1_refunds as i64),
            ("key".to_string(), 2),
            ("duplicate".to_string(), 1),
        ]
        .into();
        assert_eq!(kinds, want, "{projection}");
    }
    // Each is stored with its coordinates, its bytes and a reason that says what was wrong.
    for (key, value, kind, words) in &bad {
        let (reason, stored_key, partition, offset): (String, Option<Vec<u8>>, i32, i64) =
            sqlx::query_as(
                "SELECT reason, record_key, partition, \"offset\" FROM reproject.dead_letters
             WHERE projection = 'order_summary' AND record_value = $1 AND kind = $2",
            )
            .bind(value)
            .bind(kind)
            .fetch_one(&pool)
            .await
            .unwrap_or_else(|e| panic!("the {kind} record ({words}) was not stored: {e}"));
        assert!(reason.contains(words), "{kind}: {reason}");
        assert_eq!(&stored_key, key);
        assert!(partition >= 0 && offset >= 0);
    }
    let refund_reason: String = sqlx::query_scalar(
        "SELECT reason FROM reproject.dead_letters WHERE kind = 'upcast' AND type_url LIKE '%shop.v1.OrderRefunded' LIMIT 1",
    )
    .fetch_one(&pool)
    .await
    .expect("a refund dead letter");
    assert!(
        refund_reason.contains("shop.v1.OrderRefunded"),
        "{refund_reason}"
    );

    // What a user sees: the list, one letter whole, and the count in `status`.
    let cli = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_reproject"))
            .args(args)
            .args([
                "--database-url",
                &db,
                "--brokers",
                &kafka.settings.brokers,
                "--topic",
                TOPIC,
            ])
            .output()
            .expect("run reproject");
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let listed = cli(&["dead-letters", "list", "customer_stats"]);
    assert!(
        listed.contains("12,50") && listed.contains("duplicate"),
        "{listed}"
    );
    assert_eq!(
        listed.lines().count(),
        1 + bad.len() + v1_refunds as usize,
        "{listed}"
    );
    let id: i64 = sqlx::query_scalar("SELECT min(dead_letter_id) FROM reproject.dead_letters WHERE kind = 'key' AND record_key IS NULL")
        .fetch_one(&pool)
        .await
        .expect("id");
    let shown = cli(&["dead-letters", "show", &id.to_string()]);
    for words in ["has no key", "key:        (none)", "value:", "0000  "] {
        assert!(shown.contains(words), "{words:?} missing from: {shown}");
    }
    let status = cli(&["status"]);
    assert!(status.contains("dead letter(s) unresolved"), "{status}");

    // Before the fix the views lack the v1 refunds, and nothing else.
    let actual = actual_totals(&pool, "public").await.expect("totals");
    assert!(!differences(&expected, &actual).is_empty());

    // The fix: the real upcasters. Retrying applies the refunds, resolves the duplicate without
    // applying it, and leaves the records that are still bad with their new error.
    let fixed = engine(&db, &kafka.settings, dead_letter_tuning()).await;
    for projection in all_projections() {
        let retried = reproject::engine::dead_letters::retry(&fixed, &projection, &[])
            .await
            .expect("retry");
        assert_eq!(retried.applied.len() as u64, v1_refunds, "{projection}");
        assert_eq!(retried.duplicates.len(), 1, "{projection}");
        assert_eq!(retried.still_failing.len(), bad.len() - 1, "{projection}");
        assert!(
            retried.skipped.is_empty(),
            "{projection}: {:?}",
            retried.skipped
        );
    }
    let actual = actual_totals(&pool, "public").await.expect("totals");
    assert_eq!(differences(&expected, &actual), Vec::<String>::new());
    // A second retry applies nothing twice.
    let again = reproject::engine::dead_letters::retry(&fixed, "order_summary", &[])
        .await
        .expect("retry again");
    assert!(again.applied.is_empty() && again.duplicates.is_empty());
    let actual = actual_totals(&pool, "public").await.expect("totals");
    assert_eq!(differences(&expected, &actual), Vec::<String>::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_the_fail_policy_a_follower_stops_at_the_bad_record_and_resumes_there_after_the_fix()
{
    let db = fresh_database("fail_policy").await;
    let kafka = Kafka::start(2);
    let mut history = history(6_000, 37);
    append(&kafka.settings, &mut history, 3_000);
    let strict = Arc::new(engine(&db, &kafka.settings, tuning()).await);
    rebuild_all(&strict).await.expect("rebuild");
    let pool = strict.catalog.pool().clone();

    // A record no upcaster knows, between valid ones.
    let mut writer = LogWriter::new(&kafka.settings, TOPIC, "consistent_random").expect("producer");
    writer
        .send_raw(
            Some(b"bad-9"),
            &envelope("bad-9", "shop.v1.OrderTeleported", vec![]),
        )
        .expect("send");
    writer.finish().expect("delivered");
    append(&kafka.settings, &mut history, 3_000);

    let options = reproject::engine::run::RunOptions {
        backfill: false,
        rebuild: rebuild_options(),
        exit_when_caught_up: Some(0),
        shared: false,
    };
    let err = reproject::engine::run::run(strict.clone(), options.clone(), Default::default())
        .await
        .expect_err("stops at the bad record");
    let message = err.to_string();
    assert!(
        matches!(err, EngineError::Read(_)) || message.contains("bad record"),
        "{message}"
    );
    for words in [
        "shop.orders/",
        "at offset",
        "shop.v1.OrderTeleported",
        "version 1",
        "no upcaster knows",
    ] {
        assert!(message.contains(words), "{words:?} missing from: {message}");
    }
    // Everything before the bad record is committed: on its partition the builds stand exactly at it.
    let (partition, offset): (i32, i64) = message
        .split("shop.orders/")
        .nth(1)
        .and_then(|rest| {
            let (p, rest) = rest.split_once(" at offset ")?;
            let o: String = rest.chars().take_while(char::is_ascii_digit).collect();
            Some((p.parse().ok()?, o.parse().ok()?))
        })
        .expect("the error names partition and offset");
    let positions: Vec<i64> = sqlx::query_scalar(
        "SELECT next_offset FROM reproject.positions p JOIN reproject.builds b USING (build_id)
         WHERE b.phase = 'active' AND p.partition = $1",
    )
    .bind(partition)
    .fetch_all(&pool)
    .await
    .expect("positions");
    assert_eq!(
        positions,
        vec![offset; 3],
        "stopped right before the bad record"
    );

    // The fix here is the policy: the same follower, told to dead-letter, goes on from there.
    let lenient = Arc::new(engine(&db, &kafka.settings, dead_letter_tuning()).await);
    reproject::engine::run::run(lenient, options, Default::default())
        .await
        .expect("resumes");
    let actual = actual_totals(&pool, "public").await.expect("totals");
    assert_eq!(
        differences(&history.expected(), &actual),
        Vec::<String>::new()
    );
    let stored: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM reproject.dead_letters WHERE \"offset\" = $1 AND partition = $2",
    )
    .bind(offset)
    .bind(partition)
    .fetch_one(&pool)
    .await
    .expect("count");
    assert_eq!(stored, 3, "one dead letter per projection");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebuild_stops_when_the_dead_letter_budget_is_used_up_and_says_so() {
    let db = fresh_database("dead_letter_budget").await;
    let kafka = Kafka::start(2);
    let mut history = history(3_000, 41);
    append(&kafka.settings, &mut history, 3_000);
    let mut writer = LogWriter::new(&kafka.settings, TOPIC, "consistent_random").expect("producer");
    for i in 0..5 {
        let key = format!("junk-{i}");
        writer
            .send_raw(Some(key.as_bytes()), b"junk")
            .expect("send");
    }
    writer.finish().expect("delivered");
    let tight = Tuning {
        bad_records: BadRecordPolicy::DeadLetter { budget: 3 },
        ..tuning()
    };
    let engine = engine(&db, &kafka.settings, tight).await;
    let err = rebuild_all(&engine).await.expect_err("over budget");
    let message = err.to_string();
    assert!(
        matches!(err, EngineError::DeadLetterBudget { budget: 3, .. }),
        "{message}"
    );
    assert!(message.contains("dead-letters list"), "{message}");
    assert!(message.contains("not a valid event envelope"), "{message}");
    // Nothing was published: the live views do not exist yet, and no build is active.
    let active: i64 =
        sqlx::query_scalar("SELECT count(*) FROM reproject.builds WHERE phase = 'active'")
            .fetch_one(engine.catalog.pool())
            .await
            .expect("count");
    assert_eq!(active, 0);
    // The builds that failed in their replay say so, and why (`status` shows it), instead of
    // staying "loading" with no one at work.
    let builds: Vec<(String, Option<String>)> =
        sqlx::query_as("SELECT phase, last_error FROM reproject.builds ORDER BY build_id")
            .fetch_all(engine.catalog.pool())
            .await
            .expect("builds");
    assert_eq!(builds.len(), 3);
    for (phase, error) in builds {
        assert_eq!(phase, "failed");
        assert!(
            error
                .as_deref()
                .is_some_and(|e| e.contains("dead-letters list")),
            "{error:?}"
        );
    }
}
