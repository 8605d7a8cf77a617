//! Verification before the swap: a rebuilt view is compared with the live one at the same log
//! position, differences are reported with columns, counts and examples, `strict` refuses to swap a
//! build that differs, `report` swaps and keeps the report, and the replay's source checks notice
//! events missing from the log.

use crate::common;

use common::*;
use reproject::engine::rebuild::{catch_up_and_swap, rebuild};
use reproject::engine::verify::{verify, Against, VerifyMode, VerifyPolicy};
use reproject::engine::EngineError;
use reproject::sink::Phase;
use reproject::source::producer::LogWriter;
use reproject::swap::SwapOptions;
use tokio_util::sync::CancellationToken;

fn policy(mode: VerifyMode) -> VerifyPolicy {
    VerifyPolicy {
        mode,
        seed: Some(7),
        ..VerifyPolicy::default()
    }
}

fn no_swap() -> reproject::engine::rebuild::RebuildOptions {
    reproject::engine::rebuild::RebuildOptions {
        swap: false,
        ..rebuild_options()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn verification_finds_a_dropped_bucket_and_an_altered_column_and_strict_refuses_the_swap() {
    let db = fresh_database("verify_differences").await;
    let kafka = Kafka::start(4);
    let mut history = history(20_000, 23);
    append(&kafka.settings, &mut history, 18_000);
    let engine = engine(&db, &kafka.settings, tuning()).await;
    let pool = pool(&db).await;
    let live = rebuild_all(&engine).await.expect("first rebuild");
    let live_build = live.builds[0];

    // More events arrive; a second build of order_summary is made but not swapped in. The live
    // build is now behind it: verification must line them up before comparing.
    append(&kafka.settings, &mut history, 2_000);
    let ready = rebuild(
        &engine,
        &["order_summary".to_string()],
        &no_swap(),
        &CancellationToken::new(),
    )
    .await
    .expect("rebuild --no-swap");
    let candidate = engine.catalog.build(ready.builds[0]).await.expect("build");
    assert_eq!(candidate.phase, Phase::Ready);
    let projection = engine.projection("order_summary").expect("projection");
    let cancel = CancellationToken::new();

    let clean = verify(
        &engine,
        &projection,
        &candidate,
        Against::Active,
        &policy(VerifyMode::Strict),
        &cancel,
    )
    .await
    .expect("verify");
    let comparison = clean.comparison.as_ref().expect("compared");
    assert!(comparison.same_position, "lined up: {}", clean.render());
    assert_eq!(comparison.baseline.build_id, live_build);
    assert_eq!(comparison.candidate.positions.values().sum::<i64>(), 20_000);
    assert_eq!(comparison.rows_differing(), 0, "{}", clean.render());
    assert!(clean.passed, "{}", clean.render());
    let source = clean
        .source
        .as_ref()
        .expect("the replay recorded source checks");
    assert_eq!(source["offsets_skipped"], 0);
    assert_eq!(source["records"], 20_000);
    assert_eq!(source["sequence_gaps"], 0);
    assert!(source["aggregates"].as_u64().unwrap_or(0) > 1_000);

    // Break the candidate on purpose: drop the busiest day's rows, alter `status` in 150 others.
    let schema = schema_of(&pool, candidate.build_id).await;
    let table = format!("\"{schema}\".order_summary");
    let day: String = sqlx::query_scalar(&format!(
        "SELECT to_char(date_trunc('day', placed_at AT TIME ZONE 'UTC'), 'YYYY-MM-DD') FROM {table}
         WHERE placed_at IS NOT NULL GROUP BY 1 ORDER BY count(*) DESC, 1 LIMIT 1"
    ))
    .fetch_one(&pool)
    .await
    .expect("busiest day");
    let dropped = sqlx::query(&format!(
        "DELETE FROM {table} WHERE to_char(date_trunc('day', placed_at AT TIME ZONE 'UTC'), 'YYYY-MM-DD') = $1"
    ))
    .bind(&day)
    .execute(&pool)
    .await
    .expect("drop a bucket")
    .rows_affected() as i64;
    assert!(dropped > 0);
    let altered = sqlx::query(&format!(
        "UPDATE {table} SET status = 'tampered' WHERE order_id IN (SELECT order_id FROM {table} ORDER BY order_id LIMIT 150)"
    ))
    .execute(&pool)
    .await
    .expect("alter a column")
    .rows_affected() as i64;
    assert_eq!(altered, 150);

    let tampered = verify(
        &engine,
        &projection,
        &candidate,
        Against::Active,
        &policy(VerifyMode::Strict),
        &cancel,
    )
    .await
    .expect("verify");
    let text = tampered.render();
    assert!(!tampered.passed, "{text}");
    let t = &tampered.comparison.as_ref().expect("compared").tables[0];
    let keys = t.keys.as_ref().expect("keys compared");
    assert_eq!(keys.only_in_baseline, dropped, "{text}");
    assert_eq!(keys.only_in_candidate, 0, "{text}");
    assert_eq!(keys.rows_differing, 150, "{text}");
    assert_eq!(keys.columns.len(), 1, "only status differs: {text}");
    assert_eq!(keys.columns[0].column, "status");
    assert_eq!(keys.columns[0].rows, 150);
    assert!(
        keys.sample.differing > 0,
        "the sample met an altered row: {text}"
    );
    let example = keys.columns[0]
        .examples
        .first()
        .expect("an example from the sample");
    assert_eq!(example.candidate.as_deref(), Some("tampered"));
    assert_ne!(example.baseline.as_deref(), Some("tampered"));
    let bucket = t
        .buckets_differing
        .iter()
        .find(|b| b.bucket == day)
        .unwrap_or_else(|| panic!("the dropped day {day} is reported: {text}"));
    assert_eq!(bucket.rows_candidate, 0);
    assert_eq!(bucket.rows_baseline, dropped);
    assert!(!bucket.sums.is_empty(), "sums of that day differ: {text}");
    assert!(
        text.contains(&day) && text.contains("status") && text.contains("tampered"),
        "{text}"
    );
    assert!(
        tampered.failures[0].contains(&format!("{} rows differ", dropped + 150)),
        "{:?}",
        tampered.failures
    );

    // The command prints the same as JSON and exits 1.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_reproject"))
        .args([
            "verify",
            "order_summary",
            "--verify-seed",
            "7",
            "--format",
            "json",
            "--quiet",
            "--brokers",
            &kafka.settings.brokers,
            "--database-url",
            &db,
            "--read-database",
            &db,
        ])
        .output()
        .expect("run reproject verify");
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON report");
    assert_eq!(json["passed"], false);
    assert_eq!(json["candidate_build_id"], candidate.build_id);
    assert_eq!(
        json["comparison"]["tables"][0]["keys"]["only_in_baseline"],
        dropped
    );
    assert_eq!(
        json["comparison"]["tables"][0]["keys"]["columns"][0]["column"],
        "status"
    );

    // Strict: the swap is refused and the live view is untouched.
    let refused = catch_up_and_swap(
        &engine,
        &candidate,
        &projection,
        &SwapOptions::default(),
        Some(&policy(VerifyMode::Strict)),
        &cancel,
    )
    .await
    .expect_err("strict refuses");
    assert!(
        matches!(refused, EngineError::VerificationFailed { .. }),
        "{refused}"
    );
    assert!(refused.to_string().contains("rows differ"), "{refused}");
    let active = engine
        .catalog
        .active_build("order_summary")
        .await
        .expect("active")
        .expect("one");
    assert_eq!(active.build_id, live_build);
    let live_rows: i64 = sqlx::query_scalar("SELECT count(*) FROM public.order_summary")
        .fetch_one(&pool)
        .await
        .expect("count");
    assert_eq!(
        live_rows, t.rows_baseline,
        "readers still see the live build"
    );

    // Report: the swap goes ahead and the report is kept in the catalog.
    let (swapped, report) = catch_up_and_swap(
        &engine,
        &candidate,
        &projection,
        &SwapOptions::default(),
        Some(&policy(VerifyMode::Report)),
        &cancel,
    )
    .await
    .expect("report mode swaps");
    assert_eq!(swapped.build_id, candidate.build_id);
    let report = report.expect("verified");
    assert!(!report.passed);
    let (mode, passed, rows, kept): (String, bool, i64, serde_json::Value) = sqlx::query_as(
        "SELECT mode, passed, rows_differing, report FROM reproject.verifications WHERE verification_id = $1",
    )
    .bind(report.verification_id.expect("kept"))
    .fetch_one(&pool)
    .await
    .expect("kept in the catalog");
    assert_eq!(
        (mode.as_str(), passed, rows),
        ("report", false, dropped + 150)
    );
    assert_eq!(
        kept["comparison"]["tables"][0]["keys"]["rows_differing"],
        150
    );
    // ...and shown again as it was, after the swap.
    let id = report.verification_id.unwrap_or_default().to_string();
    let shown = reproject(&db, &kafka, &["verify", "order_summary", "--show", &id]);
    assert_eq!(shown.status.code(), Some(1));
    let text = String::from_utf8_lossy(&shown.stdout);
    assert!(
        text.contains("verdict: FAILED") && text.contains("tampered"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_missing_event_shows_as_a_sequence_gap_and_fails_verification() {
    let db = fresh_database("verify_sequence_gap").await;
    let kafka = Kafka::start(2);
    // Every record but one in the middle of the history: one aggregate's sequence jumps.
    let records: Vec<_> = history(3_000, 5).take(3_000).collect();
    let mut writer = LogWriter::new(&kafka.settings, TOPIC, "consistent_random").expect("producer");
    let mut skipped_key = None;
    let mut seen_keys = std::collections::HashMap::<String, usize>::new();
    for record in &records {
        let n = seen_keys.entry(record.key.clone()).or_default();
        *n += 1;
        // The second event of some aggregate that has a third.
        if skipped_key.is_none()
            && *n == 2
            && records.iter().filter(|r| r.key == record.key).count() > 2
        {
            skipped_key = Some(record.key.clone());
            continue;
        }
        writer.send(&record.key, &record.value).expect("send");
    }
    writer.finish().expect("delivered");
    let skipped_key = skipped_key.expect("an aggregate to break");

    let engine = engine(&db, &kafka.settings, tuning()).await;
    let first = rebuild_all(&engine).await.expect("rebuild");
    let ready = rebuild(
        &engine,
        &["daily_sales".to_string()],
        &no_swap(),
        &CancellationToken::new(),
    )
    .await
    .expect("second build");
    let candidate = engine.catalog.build(ready.builds[0]).await.expect("build");
    let projection = engine.projection("daily_sales").expect("projection");
    let v = verify(
        &engine,
        &projection,
        &candidate,
        Against::Active,
        &policy(VerifyMode::Strict),
        &CancellationToken::new(),
    )
    .await
    .expect("verify");
    let text = v.render();
    let live = first
        .projections
        .iter()
        .position(|p| p == "daily_sales")
        .expect("built");
    assert_eq!(v.baseline_build_id, Some(first.builds[live]));
    assert_eq!(
        v.comparison.as_ref().expect("compared").rows_differing(),
        0,
        "{text}"
    );
    assert!(!v.passed, "{text}");
    let source = v.source.as_ref().expect("source checks");
    assert_eq!(source["sequence_gaps"], 1, "{text}");
    assert!(
        source["gap_examples"][0]
            .as_str()
            .unwrap_or_default()
            .contains(&skipped_key),
        "{text}"
    );
    assert!(
        v.failures
            .iter()
            .any(|f| f.contains("1 gaps in aggregates' sequence numbers")),
        "{:?}",
        v.failures
    );
}
