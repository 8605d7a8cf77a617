//! Records framed the way teams write them: the same history written as reproject's envelope, as
//! CloudEvents in binary mode (metadata in `ce_*` headers, a key that is not the aggregate id, the
//! message named by a template) and in Confluent Schema Registry's wire format (schema ids and
//! message indexes mapped in the config, time from the record's timestamp) rebuilds to identical
//! tables; a record whose framing is broken is a bad record naming what is missing, under both
//! policies.

use crate::common;

use std::collections::BTreeMap;
use std::sync::Arc;

use common::*;
use reproject::domain::shop::ShopEvent;
use reproject::engine::{BadRecordPolicy, Engine, Tuning};
use reproject::envelope::framing::confluent_value;
use reproject::envelope::{self, Framing, FramingConfig};
use reproject::source::producer::LogWriter;
use sqlx::PgPool;

const EVENTS: u64 = 6_000;

/// One record of the shop's history, taken apart: what every framing writes somewhere.
struct Event {
    aggregate_id: String,
    event_id: String,
    occurred_at_micros: i64,
    sequence: u64,
    aggregate_type: String,
    /// `shop.v2.OrderPaid`
    message: String,
    payload: Vec<u8>,
}

fn shop_events() -> (Vec<(String, Vec<u8>)>, Vec<Event>) {
    let records: Vec<(String, Vec<u8>)> = history(EVENTS, 77)
        .take(EVENTS as usize)
        .map(|r| (r.key, r.value))
        .collect();
    let events = records
        .iter()
        .map(|(_, value)| {
            let d = envelope::decode(value, 0, 0).expect("the generator writes envelopes");
            Event {
                aggregate_id: d.meta.aggregate_id.clone(),
                event_id: uuid::Uuid::from_bytes(d.meta.event_id).to_string(),
                occurred_at_micros: d.meta.occurred_at_micros,
                sequence: d.meta.sequence,
                aggregate_type: d.meta.aggregate_type.clone(),
                message: envelope::message_name(&d.type_url).to_string(),
                payload: d.payload,
            }
        })
        .collect();
    (records, events)
}

fn rfc3339(micros: i64) -> String {
    chrono::DateTime::from_timestamp_micros(micros)
        .expect("a time in range")
        .to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
}

fn framing(toml_text: &str) -> Framing {
    toml::from_str::<FramingConfig>(toml_text)
        .expect("a [framing] table")
        .framing()
        .expect("a valid framing")
}

/// CloudEvents, binary mode: `ce_type` is the bare message (`OrderPaid`), its version in an
/// extension header, and the record key is not the aggregate id.
const CLOUDEVENTS: &str = r#"
format = "cloudevents"
message = "shop.v{version}.{type}"
version = "header:ce_schemaversion"
"#;

fn write_cloudevents(kafka: &Kafka, events: &[Event]) {
    let mut writer = LogWriter::new(&kafka.settings, TOPIC, "consistent_random").expect("producer");
    for e in events {
        let (package, name) = e.message.rsplit_once('.').expect("a qualified name");
        let version = package
            .rsplit('.')
            .next()
            .and_then(|v| v.strip_prefix('v'))
            .expect("vN");
        let (time, sequence) = (rfc3339(e.occurred_at_micros), e.sequence.to_string());
        let headers: [(&str, &[u8]); 8] = [
            ("ce_specversion", b"1.0"),
            ("ce_type", name.as_bytes()),
            ("ce_schemaversion", version.as_bytes()),
            ("ce_id", e.event_id.as_bytes()),
            ("ce_time", time.as_bytes()),
            ("ce_subject", e.aggregate_id.as_bytes()),
            ("ce_sequence", sequence.as_bytes()),
            ("ce_source", e.aggregate_type.as_bytes()),
        ];
        let key = format!("key-of-{}", e.aggregate_id);
        writer
            .send_with_headers(TOPIC, Some(key.as_bytes()), &e.payload, &headers, None)
            .expect("send");
    }
    // Broken: no ce_time.
    let headers: [(&str, &[u8]); 4] = [
        ("ce_id", b"broken-1"),
        ("ce_type", b"OrderCancelled"),
        ("ce_schemaversion", b"3"),
        ("ce_subject", b"order-without-time"),
    ];
    writer
        .send_with_headers(TOPIC, Some(b"k"), b"", &headers, None)
        .expect("send");
    writer.finish().expect("delivered");
}

/// Confluent's wire format. Every message gets a schema id; odd ids put the message at indexes
/// [2, 1] of their schema (a nested message), even ids at [0] (written as a single zero).
fn confluent_schemas(events: &[Event]) -> BTreeMap<String, (u32, Vec<i32>)> {
    let mut names: Vec<&str> = events.iter().map(|e| e.message.as_str()).collect();
    names.sort();
    names.dedup();
    names
        .into_iter()
        .enumerate()
        .map(|(i, name)| {
            let id = 100 + i as u32;
            let indexes = if id % 2 == 1 { vec![2, 1] } else { vec![0] };
            (name.to_string(), (id, indexes))
        })
        .collect()
}

fn confluent_config(schemas: &BTreeMap<String, (u32, Vec<i32>)>) -> String {
    let mut text = String::from(
        "format = \"confluent\"\nevent_id = \"header:event_id\"\nsequence = \"header:sequence\"\n[schema_ids]\n",
    );
    for (name, (id, indexes)) in schemas {
        let key = if indexes == &[0] {
            id.to_string()
        } else {
            format!(
                "{id}:{}",
                indexes
                    .iter()
                    .map(i32::to_string)
                    .collect::<Vec<_>>()
                    .join(":")
            )
        };
        text.push_str(&format!("\"{key}\" = \"{name}\"\n"));
    }
    text
}

fn write_confluent(kafka: &Kafka, events: &[Event], schemas: &BTreeMap<String, (u32, Vec<i32>)>) {
    let mut writer = LogWriter::new(&kafka.settings, TOPIC, "consistent_random").expect("producer");
    for e in events {
        let (id, indexes) = &schemas[&e.message];
        let sequence = e.sequence.to_string();
        let headers: [(&str, &[u8]); 2] = [
            ("event_id", e.event_id.as_bytes()),
            ("sequence", sequence.as_bytes()),
        ];
        writer
            .send_with_headers(
                TOPIC,
                Some(e.aggregate_id.as_bytes()),
                &confluent_value(*id, indexes, &e.payload),
                &headers,
                Some(e.occurred_at_micros / 1_000),
            )
            .expect("send");
    }
    // Broken: an unknown schema id, then message indexes cut short (two announced, none given).
    let good: [(&str, &[u8]); 2] = [("event_id", b"x"), ("sequence", b"1")];
    for value in [confluent_value(999, &[0], b""), vec![0, 0, 0, 0, 100, 4]] {
        writer
            .send_with_headers(TOPIC, Some(b"order-broken"), &value, &good, Some(1))
            .expect("send");
    }
    writer.finish().expect("delivered");
}

async fn framed_engine(
    db: &str,
    kafka: &Kafka,
    framing: Framing,
    tuning: Tuning,
) -> Engine<ShopEvent> {
    let mut parts = shop_parts(db, &kafka.settings, tuning, None);
    parts.framing = Arc::new(framing);
    Engine::connect(parts).await.expect("engine")
}

fn dead_lettering() -> Tuning {
    Tuning {
        bad_records: BadRecordPolicy::DeadLetter { budget: 10 },
        ..tuning()
    }
}

async fn shop_checksums(pool: &PgPool) -> Vec<String> {
    vec![
        checksum(pool, "public", "order_summary", "order_id").await,
        checksum(pool, "public", "customer_stats", "customer_id").await,
        checksum(pool, "public", "daily_sales", "day, currency").await,
    ]
}

async fn dead_letter_reasons(pool: &PgPool) -> Vec<String> {
    sqlx::query_scalar("SELECT DISTINCT reason FROM reproject.dead_letters ORDER BY reason")
        .fetch_all(pool)
        .await
        .expect("dead letters")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_same_history_in_three_framings_rebuilds_to_identical_tables_and_broken_frames_are_bad_records(
) {
    let (records, events) = shop_events();

    // Reproject's envelope: the reference.
    let db = fresh_database("framing_envelope").await;
    let kafka = Kafka::start(4);
    let mut writer = LogWriter::new(&kafka.settings, TOPIC, "consistent_random").expect("producer");
    for (key, value) in &records {
        writer.send(key, value).expect("send");
    }
    writer.finish().expect("delivered");
    let engine = framed_engine(&db, &kafka, Framing::Envelope, tuning()).await;
    rebuild_all(&engine).await.expect("rebuild");
    let reference = shop_checksums(engine.catalog.pool()).await;
    let orders: i64 = scalar(engine.catalog.pool(), "SELECT count(*) FROM order_summary")
        .await
        .unwrap_or(0);
    assert!(orders > 300, "{orders} orders");

    // CloudEvents.
    let kafka = Kafka::start(4);
    write_cloudevents(&kafka, &events);
    let db = fresh_database("framing_cloudevents").await;
    let engine = framed_engine(&db, &kafka, framing(CLOUDEVENTS), dead_lettering()).await;
    rebuild_all(&engine).await.expect("rebuild");
    let pool = engine.catalog.pool();
    assert_eq!(shop_checksums(pool).await, reference, "cloudevents");
    let reasons = dead_letter_reasons(pool).await;
    assert_eq!(reasons.len(), 1, "{reasons:?}");
    assert!(
        reasons[0].contains("cloudevents framing") && reasons[0].contains("header ce_time"),
        "{reasons:?}"
    );
    let kept_headers: Vec<String> = sqlx::query_scalar(
        "SELECT DISTINCT unnest(header_names) FROM reproject.dead_letters ORDER BY 1",
    )
    .fetch_all(pool)
    .await
    .expect("headers");
    assert_eq!(
        kept_headers,
        ["ce_id", "ce_schemaversion", "ce_subject", "ce_type"],
        "a dead letter keeps its headers"
    );
    // Under the fail policy the same log stops at that record, naming where it is and what is
    // missing.
    let db = fresh_database("framing_cloudevents_fail").await;
    let failing = framed_engine(&db, &kafka, framing(CLOUDEVENTS), tuning()).await;
    let error = rebuild_all(&failing)
        .await
        .expect_err("a broken frame stops the replay")
        .to_string();
    for part in [
        TOPIC,
        "offset",
        "the event time is missing",
        "header ce_time",
    ] {
        assert!(error.contains(part), "{part:?} missing from: {error}");
    }

    // Confluent's wire format.
    let schemas = confluent_schemas(&events);
    let kafka = Kafka::start(4);
    write_confluent(&kafka, &events, &schemas);
    let db = fresh_database("framing_confluent").await;
    let engine = framed_engine(
        &db,
        &kafka,
        framing(&confluent_config(&schemas)),
        dead_lettering(),
    )
    .await;
    rebuild_all(&engine).await.expect("rebuild");
    let pool = engine.catalog.pool();
    assert_eq!(shop_checksums(pool).await, reference, "confluent");
    let reasons = dead_letter_reasons(pool).await;
    assert_eq!(reasons.len(), 2, "{reasons:?}");
    assert!(
        reasons
            .iter()
            .any(|r| r.contains("schema id 999") && r.contains("not mapped")),
        "{reasons:?}"
    );
    assert!(
        reasons
            .iter()
            .any(|r| r.contains("message indexes") && r.contains("cut short")),
        "{reasons:?}"
    );
    let db = fresh_database("framing_confluent_fail").await;
    let failing = framed_engine(&db, &kafka, framing(&confluent_config(&schemas)), tuning()).await;
    let error = rebuild_all(&failing)
        .await
        .expect_err("a broken frame stops the replay")
        .to_string();
    for part in [TOPIC, "offset", "confluent framing", "schema id 999"] {
        assert!(error.contains(part), "{part:?} missing from: {error}");
    }
}

#[test]
fn a_framing_table_that_cannot_work_is_refused_naming_the_setting() {
    let refused = |text: &str| {
        toml::from_str::<FramingConfig>(text)
            .map_err(|e| e.to_string())
            .and_then(|c| c.framing())
            .expect_err(text)
    };
    assert!(refused("format = \"avro\"").contains("expected envelope, cloudevents or confluent"));
    assert!(refused("format = \"cloudevents\"\ntime = \"key\"").contains("framing.time"));
    assert!(
        refused("format = \"cloudevents\"\nmessage = \"a.v{version}.{type}\"")
            .contains("{version}")
    );
    assert!(
        refused("format = \"confluent\"\n[schema_ids]\n\"x\" = \"a.v1.B\"").contains("schema_ids")
    );
    assert!(refused("format = \"envelope\"\nevent_id = \"position\"").contains("does not apply"));
    assert!(refused("format = \"confluent\"\ncolour = \"red\"").contains("colour"));
}

/// The mock registry's schemas by id, and how many requests it answered.
type RegistryState = (
    Arc<BTreeMap<u32, String>>,
    Arc<std::sync::atomic::AtomicUsize>,
);

/// A Confluent Schema Registry on a local port answering `/schemas/ids/<id>` from `schemas`
/// (message name -> id): each schema declares a padding message first, so the event's message is
/// at index 1. Returns its URL and the count of requests it answered.
async fn schema_registry(
    schemas: &BTreeMap<String, (u32, Vec<i32>)>,
) -> (String, Arc<std::sync::atomic::AtomicUsize>) {
    use axum::extract::{Path, State};
    let by_id: Arc<BTreeMap<u32, String>> = Arc::new(
        schemas
            .iter()
            .map(|(name, (id, _))| {
                let (package, message) = name.rsplit_once('.').expect("qualified");
                let text = format!(
                    "syntax = \"proto3\";\npackage {package};\nmessage Padding {{}}\nmessage {message} {{ string order_id = 1; }}\n"
                );
                (*id, serde_json::json!({"schemaType": "PROTOBUF", "schema": text}).to_string())
            })
            .collect(),
    );
    let asked = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let app = axum::Router::new()
        .route(
            "/schemas/ids/{id}",
            axum::routing::get(
                |State((by_id, asked)): State<RegistryState>, Path(id): Path<u32>| async move {
                    asked.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    match by_id.get(&id) {
                        Some(body) => (axum::http::StatusCode::OK, body.clone()),
                        None => (
                            axum::http::StatusCode::NOT_FOUND,
                            "{\"error_code\":40403,\"message\":\"Schema not found\"}".to_string(),
                        ),
                    }
                },
            ),
        )
        .with_state((by_id, asked.clone()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("address"));
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, asked)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unmapped_schema_ids_are_asked_of_the_schema_registry_once_each() {
    let (_, events) = shop_events();
    let schemas: BTreeMap<String, (u32, Vec<i32>)> = confluent_schemas(&events)
        .into_iter()
        .map(|(name, (id, _))| (name, (id, vec![1])))
        .collect();
    let (url, asked) = schema_registry(&schemas).await;
    let kafka = Kafka::start(4);
    write_confluent(&kafka, &events, &schemas);
    let config = format!(
        "format = \"confluent\"\nevent_id = \"header:event_id\"\nsequence = \"header:sequence\"\nregistry_url = \"{url}\"\n"
    );
    let db = fresh_database("framing_registry").await;
    let engine = framed_engine(&db, &kafka, framing(&config), dead_lettering()).await;
    rebuild_all(&engine).await.expect("rebuild");
    let pool = engine.catalog.pool();

    // The envelope log of the same history, for reference.
    let reference_db = fresh_database("framing_registry_ref").await;
    let reference_kafka = Kafka::start(4);
    append(&reference_kafka.settings, &mut history(EVENTS, 77), EVENTS);
    let reference =
        framed_engine(&reference_db, &reference_kafka, Framing::Envelope, tuning()).await;
    rebuild_all(&reference).await.expect("rebuild");
    assert_eq!(
        shop_checksums(pool).await,
        shop_checksums(reference.catalog.pool()).await
    );
    // Every id once, and the unknown 999 once (then remembered): never once per record.
    let distinct = schemas.len() + 1;
    assert_eq!(asked.load(std::sync::atomic::Ordering::Relaxed), distinct);
    let reasons = dead_letter_reasons(pool).await;
    assert!(
        reasons
            .iter()
            .any(|r| r.contains("schema registry") && r.contains("/schemas/ids/999")),
        "{reasons:?}"
    );
}
