//! The column types teams keep in read models (integer, double precision, exact numeric, uuid,
//! jsonb, bytea) go through every path a row takes: the rebuild's bulk load, spilling under a memory
//! budget, `run`'s incremental batches, verification and `replay`'s comparison with the live row.
//! Their values are checked against the shop's own bigint views over the same log, and a
//! declaration whose types disagree with its table's SQL is refused before anything is written.

use crate::common;

use std::sync::Arc;

use common::*;
use reproject::domain::shop::{self, ShopEvent};
use reproject::domain::Domain;
use reproject::engine::rebuild::{rebuild, RebuildOptions};
use reproject::engine::timeline::{trace, Locate, TraceOptions, Verdict};
use reproject::engine::verify::{verify, Against, VerifyMode, VerifyPolicy};
use reproject::engine::{Engine, SchemaSource, Tuning};
use reproject::key;
use reproject::projection::{
    Changes, Column, ColumnType, Decimal, DynProjection, Event, Projection, SchemaSql, TableSpec,
    Uuid, Value,
};
use reproject::source::partitioner::Partitioner;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

const ORDERS: usize = 0;
const CUSTOMERS: usize = 1;

// typed_orders
const FIRST_EVENT: usize = 1;
const ITEMS: usize = 2;
const TOTAL: usize = 3;
const PAID: usize = 4;
const UNIT_PRICE: usize = 5;
const SHIP_TO: usize = 6;
const CARRIER: usize = 7;

// typed_customers
const ORDER_COUNT: usize = 1;
const LIFETIME: usize = 2;
const BIGGEST: usize = 3;
const SMALLEST: usize = 4;
const LAST_ORDER: usize = 5;
const PROFILE: usize = 6;
const LAST_EVENT: usize = 7;

const TABLES_SQL: &str = "
CREATE TABLE typed_orders (
    order_id text NOT NULL, first_event uuid, items integer NOT NULL, total numeric NOT NULL,
    paid numeric NOT NULL, unit_price double precision, ship_to jsonb, carrier bytea);
CREATE TABLE typed_customers (
    customer_id text NOT NULL, orders integer NOT NULL, lifetime numeric NOT NULL,
    biggest_payment numeric, smallest_payment double precision, last_order uuid, profile jsonb,
    last_event bytea);";
const INDEXES_SQL: &str = "
ALTER TABLE typed_orders ADD PRIMARY KEY (order_id);
ALTER TABLE typed_customers ADD PRIMARY KEY (customer_id);";

/// The shop's history, projected into every new column type.
struct Typed {
    tables: Vec<TableSpec>,
}

impl Typed {
    fn projection(paid_type: ColumnType) -> DynProjection<ShopEvent> {
        let zero = Value::Numeric(Decimal::new(0, 2));
        let counted = |name, ty, default| Column { name, ty, default };
        Arc::new(Typed {
            tables: vec![
                TableSpec {
                    name: "typed_orders",
                    columns: vec![
                        Column::new("order_id", ColumnType::Text),
                        Column::new("first_event", ColumnType::Uuid),
                        counted("items", ColumnType::Integer, Value::Integer(0)),
                        counted("total", ColumnType::Numeric, zero.clone()),
                        counted(
                            "paid",
                            paid_type,
                            if paid_type == ColumnType::Numeric {
                                zero.clone()
                            } else {
                                Value::Null
                            },
                        ),
                        Column::new("unit_price", ColumnType::Double),
                        Column::new("ship_to", ColumnType::Jsonb),
                        Column::new("carrier", ColumnType::Bytea),
                    ],
                    key_len: 1,
                    bucket_column: None,
                    per_aggregate: true,
                },
                TableSpec {
                    name: "typed_customers",
                    columns: vec![
                        Column::new("customer_id", ColumnType::Text),
                        counted("orders", ColumnType::Integer, Value::Integer(0)),
                        counted("lifetime", ColumnType::Numeric, zero),
                        Column::new("biggest_payment", ColumnType::Numeric),
                        Column::new("smallest_payment", ColumnType::Double),
                        Column::new("last_order", ColumnType::Uuid),
                        Column::new("profile", ColumnType::Jsonb),
                        Column::new("last_event", ColumnType::Bytea),
                    ],
                    key_len: 1,
                    bucket_column: None,
                    per_aggregate: false,
                },
            ],
        })
    }
}

fn euros(cents: i64) -> Value {
    Value::Numeric(Decimal::new(cents, 2))
}

impl Projection<ShopEvent> for Typed {
    fn name(&self) -> &'static str {
        "typed_orders"
    }

    fn version(&self) -> u32 {
        1
    }

    fn tables(&self) -> &[TableSpec] {
        &self.tables
    }

    fn apply(&self, event: &Event<'_, ShopEvent>, out: &mut Changes) {
        let order = || key![Value::text(event.payload.order_id())];
        let event_id = Value::Uuid(Uuid::from_bytes(event.meta.event_id));
        match event.payload {
            ShopEvent::Placed(e) => {
                let ship_to = match &e.ship_to {
                    Some(a) => Value::json(&serde_json::json!({
                        "city": a.city, "country": a.country, "lines": [a.street, a.postal_code],
                    })),
                    None => Value::Null,
                };
                out.set(
                    ORDERS,
                    order(),
                    vec![(FIRST_EVENT, event_id.clone()), (SHIP_TO, ship_to)],
                );
                let customer = || key![Value::text(&e.customer_id)];
                out.add_value(CUSTOMERS, customer(), ORDER_COUNT, Value::Integer(1));
                out.set(
                    CUSTOMERS,
                    customer(),
                    vec![
                        (LAST_ORDER, event_id),
                        (
                            PROFILE,
                            Value::json(
                                &serde_json::json!({"currency": e.currency, "order": e.order_id}),
                            ),
                        ),
                        (LAST_EVENT, Value::Bytes(event.meta.event_id.to_vec())),
                    ],
                );
            }
            ShopEvent::ItemAdded(e) => {
                out.add_value(ORDERS, order(), ITEMS, Value::Integer(e.quantity));
                out.add_value(
                    ORDERS,
                    order(),
                    TOTAL,
                    euros(i64::from(e.quantity) * e.unit_price_cents),
                );
                out.set(
                    ORDERS,
                    order(),
                    vec![(UNIT_PRICE, Value::double(e.unit_price_cents as f64 / 100.0))],
                );
            }
            ShopEvent::ItemRemoved(e) => {
                out.add_value(ORDERS, order(), ITEMS, Value::Integer(-e.quantity));
                out.add_value(
                    ORDERS,
                    order(),
                    TOTAL,
                    euros(-i64::from(e.quantity) * e.unit_price_cents),
                );
            }
            ShopEvent::Paid(e) => {
                out.add_value(ORDERS, order(), PAID, euros(e.amount_cents));
                let customer = || key![Value::text(&e.customer_id)];
                out.add_value(CUSTOMERS, customer(), LIFETIME, euros(e.amount_cents));
                out.max(CUSTOMERS, customer(), BIGGEST, euros(e.amount_cents));
                out.min(
                    CUSTOMERS,
                    customer(),
                    SMALLEST,
                    Value::double(e.amount_cents as f64 / 100.0),
                );
            }
            ShopEvent::Refunded(e) => {
                out.add_value(
                    CUSTOMERS,
                    key![Value::text(&e.customer_id)],
                    LIFETIME,
                    euros(-e.amount_cents),
                );
            }
            ShopEvent::Shipped(e) => out.set(
                ORDERS,
                order(),
                vec![(CARRIER, Value::Bytes(e.carrier.as_bytes().to_vec()))],
            ),
            ShopEvent::Cancelled(_) => {}
        }
    }
}

/// The shop's engine with its three projections and `typed_orders`, whose SQL is `tables_sql`.
async fn typed_engine(
    db: &str,
    kafka: &Kafka,
    tuning: Tuning,
    paid_type: ColumnType,
    tables_sql: &'static str,
) -> Result<Engine<ShopEvent>, reproject::engine::EngineError> {
    let mut parts = shop_parts(db, &kafka.settings, tuning, None);
    parts.projections.push(Typed::projection(paid_type));
    parts.schemas = SchemaSource::new(None, move |projection, version| match projection {
        "typed_orders" => Some(SchemaSql {
            tables: tables_sql.into(),
            indexes: INDEXES_SQL.into(),
        }),
        _ => shop::Shop.schema(projection, version),
    });
    Engine::connect(parts).await
}

fn every_projection() -> Vec<String> {
    let mut names = all_projections();
    names.push("typed_orders".into());
    names
}

async fn rebuild_every(engine: &Engine<ShopEvent>, options: &RebuildOptions) -> u64 {
    rebuild(
        engine,
        &every_projection(),
        options,
        &CancellationToken::new(),
    )
    .await
    .expect("rebuild")
    .spills
}

/// Row checksums of both typed tables, for comparing one way of building them with another.
async fn typed_checksums(pool: &PgPool) -> (String, String) {
    (
        checksum(pool, "public", "typed_orders", "order_id").await,
        checksum(pool, "public", "typed_customers", "customer_id").await,
    )
}

async fn count(pool: &PgPool, sql: &str) -> i64 {
    sqlx::query_scalar(sql)
        .fetch_one(pool)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
}

/// The typed views hold what the shop's bigint views say, to the cent, and their values went in
/// and came out as their own types.
async fn assert_agrees_with_the_shop(pool: &PgPool, label: &str) {
    let orders = count(pool, "SELECT count(*) FROM typed_orders").await;
    assert!(orders > 500, "{label}: {orders} orders");
    let wrong_orders = count(
        pool,
        "SELECT count(*) FROM typed_orders t FULL JOIN order_summary o USING (order_id)
         WHERE t.items IS DISTINCT FROM o.item_count
            OR t.total * 100 IS DISTINCT FROM o.total_cents
            OR t.paid * 100 IS DISTINCT FROM o.paid_cents
            OR (t.ship_to->>'city') IS DISTINCT FROM o.ship_city
            OR (t.ship_to->>'country') IS DISTINCT FROM o.ship_country
            OR (t.first_event IS NULL) <> (o.placed_at IS NULL)
            OR (t.carrier IS NULL) <> (o.shipped_at IS NULL)",
    )
    .await;
    assert_eq!(
        wrong_orders, 0,
        "{label}: typed_orders differs from order_summary"
    );
    let wrong_customers = count(
        pool,
        "SELECT count(*) FROM typed_customers t FULL JOIN customer_stats c USING (customer_id)
         WHERE t.orders IS DISTINCT FROM c.orders
            OR t.lifetime * 100 IS DISTINCT FROM c.lifetime_value_cents
            OR (t.profile->>'currency') IS DISTINCT FROM c.currency
            OR t.smallest_payment > t.biggest_payment::float8
            OR (t.last_order IS NULL) <> (c.orders = 0)
            OR length(t.last_event) <> 16",
    )
    .await;
    assert_eq!(
        wrong_customers, 0,
        "{label}: typed_customers differs from customer_stats"
    );
    // Exact decimals keep their scale (no float on the way): every total ends in two decimals.
    let scales = count(
        pool,
        "SELECT count(*) FROM typed_orders WHERE scale(total) <> 2 OR scale(paid) <> 2",
    )
    .await;
    assert_eq!(scales, 0, "{label}: numerics lost their scale");
    let fractional = count(
        pool,
        "SELECT count(*) FROM typed_orders WHERE total <> trunc(total)",
    )
    .await;
    assert!(
        fractional > 0,
        "{label}: no total has cents, the check proves nothing"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_column_type_round_trips_through_rebuild_spill_follow_verify_and_replay() {
    const EVENTS: u64 = 12_000;
    let kafka = Kafka::start(4);
    let mut log = history(EVENTS, 41);
    append(&kafka.settings, &mut log, EVENTS / 2);

    // Built on half the log, then `run` applies the rest in small batches.
    let db = fresh_database("types_follow").await;
    let small_batches = Tuning {
        batch_events: 250,
        ..tuning()
    };
    let followed = Arc::new(
        typed_engine(&db, &kafka, small_batches, ColumnType::Numeric, TABLES_SQL)
            .await
            .expect("engine"),
    );
    rebuild_every(&followed, &rebuild_options()).await;
    append(&kafka.settings, &mut log, EVENTS / 2);
    drain(followed.clone()).await;
    let followed_pool = followed.catalog.pool().clone();
    assert_agrees_with_the_shop(&followed_pool, "followed").await;

    // The whole log in memory, and again spilling under an 8 KiB budget.
    let db = fresh_database("types_rebuild").await;
    let engine = typed_engine(&db, &kafka, tuning(), ColumnType::Numeric, TABLES_SQL)
        .await
        .expect("engine");
    rebuild_every(&engine, &rebuild_options()).await;
    let pool = engine.catalog.pool().clone();
    assert_agrees_with_the_shop(&pool, "rebuilt").await;

    let db = fresh_database("types_spill").await;
    let spilling = typed_engine(
        &db,
        &kafka,
        Tuning {
            batch_events: 500,
            ..tuning()
        },
        ColumnType::Numeric,
        TABLES_SQL,
    )
    .await
    .expect("engine");
    let budget = RebuildOptions {
        memory_budget: Some(8 << 10),
        ..rebuild_options()
    };
    assert!(
        rebuild_every(&spilling, &budget).await > 0,
        "nothing spilled"
    );
    let spilled_pool = spilling.catalog.pool().clone();
    assert_agrees_with_the_shop(&spilled_pool, "spilled").await;

    let reference = typed_checksums(&pool).await;
    assert_eq!(typed_checksums(&spilled_pool).await, reference, "spilled");
    assert_eq!(typed_checksums(&followed_pool).await, reference, "followed");

    // Verification compares a second build with the live one, type by type.
    let ready = rebuild(
        &engine,
        &["typed_orders".to_string()],
        &RebuildOptions {
            swap: false,
            ..rebuild_options()
        },
        &CancellationToken::new(),
    )
    .await
    .expect("rebuild --no-swap");
    let candidate = engine.catalog.build(ready.builds[0]).await.expect("build");
    let projection = engine.projection("typed_orders").expect("projection");
    let verification = verify(
        &engine,
        &projection,
        &candidate,
        Against::Active,
        &VerifyPolicy {
            mode: VerifyMode::Strict,
            seed: Some(3),
            ..VerifyPolicy::default()
        },
        &CancellationToken::new(),
    )
    .await
    .expect("verify");
    assert!(verification.passed, "{}", verification.render());
    assert_eq!(
        verification.comparison.as_ref().map(|c| c.rows_differing()),
        Some(0),
        "{}",
        verification.render()
    );

    // `replay` reads the live row back through the binary codec and agrees with its own fold,
    // jsonb included (the server rewrote its text).
    let order: String = sqlx::query_scalar(
        "SELECT order_id FROM typed_orders WHERE ship_to IS NOT NULL AND carrier IS NOT NULL
           AND total <> trunc(total) AND unit_price IS NOT NULL ORDER BY order_id LIMIT 1",
    )
    .fetch_one(&pool)
    .await
    .expect("an order with every column set");
    let timeline = trace(
        &engine,
        &TraceOptions {
            aggregate_id: order.clone(),
            projections: vec![projection],
            locate: Locate::Partitioner(Partitioner::ConsistentRandom),
            scratch: false,
        },
    )
    .await
    .expect("replay");
    let row = timeline
        .comparisons
        .iter()
        .find(|c| c.view.ends_with("typed_orders"))
        .expect("the order's row was compared");
    assert_eq!(row.verdict, Verdict::Agree, "{:?}", row.differences);
    let computed = row.computed.as_ref().expect("computed row");
    assert!(computed["ship_to"].is_object(), "{computed:?}");
    assert!(
        computed["total"].as_str().is_some_and(|t| t.contains('.')),
        "{computed:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_column_whose_type_differs_from_its_tables_sql_is_refused_naming_both() {
    let kafka = Kafka::start(2);
    let mut log = history(1_000, 42);
    append(&kafka.settings, &mut log, 500);

    // At a rebuild's start: the code says numeric, the SQL double precision.
    let db = fresh_database("types_mismatch").await;
    let sql_says_double = "
CREATE TABLE typed_orders (
    order_id text NOT NULL, first_event uuid, items integer NOT NULL, total numeric NOT NULL,
    paid double precision NOT NULL, unit_price double precision, ship_to jsonb, carrier bytea);
CREATE TABLE typed_customers (
    customer_id text NOT NULL, orders integer NOT NULL, lifetime numeric NOT NULL,
    biggest_payment numeric, smallest_payment double precision, last_order uuid, profile jsonb,
    last_event bytea);";
    let engine = typed_engine(&db, &kafka, tuning(), ColumnType::Numeric, sql_says_double)
        .await
        .expect("engine");
    let error = rebuild(
        &engine,
        &["typed_orders".to_string()],
        &rebuild_options(),
        &CancellationToken::new(),
    )
    .await
    .expect_err("a mismatched column is refused")
    .to_string();
    for part in ["typed_orders", "column paid", "numeric", "double precision"] {
        assert!(error.contains(part), "{part:?} missing from: {error}");
    }

    // When `run` starts following a build made by other code: a column retyped without a new
    // version.
    let db = fresh_database("types_mismatch_follow").await;
    let engine = typed_engine(&db, &kafka, tuning(), ColumnType::Numeric, TABLES_SQL)
        .await
        .expect("engine");
    rebuild_every(&engine, &rebuild_options()).await;
    append(&kafka.settings, &mut log, 500);
    let retyped = Arc::new(
        typed_engine(&db, &kafka, tuning(), ColumnType::Double, TABLES_SQL)
            .await
            .expect("engine"),
    );
    let error = reproject::engine::run::run(
        retyped,
        reproject::engine::run::RunOptions {
            backfill: false,
            rebuild: rebuild_options(),
            exit_when_caught_up: Some(0),
            shared: false,
        },
        Default::default(),
    )
    .await
    .expect_err("following a table of another type is refused")
    .to_string();
    for part in ["typed_orders", "column paid", "double precision", "numeric"] {
        assert!(error.contains(part), "{part:?} missing from: {error}");
    }
    let applied_after: i64 = sqlx::query_scalar(
        "SELECT coalesce(sum(p.next_offset), 0)::bigint FROM reproject.positions p
         JOIN reproject.builds b USING (build_id) WHERE b.projection = 'typed_orders'",
    )
    .fetch_one(engine.catalog.pool())
    .await
    .expect("positions");
    assert_eq!(
        applied_after, 500,
        "nothing was applied by the refused follow"
    );

    // A key that PostgreSQL and the fold would compare differently never gets as far as a table.
    let mut parts = shop_parts(&db, &kafka.settings, tuning(), None);
    parts.projections = vec![Arc::new(JsonKeyed {
        tables: vec![TableSpec {
            name: "by_document",
            columns: vec![Column::new("document", ColumnType::Jsonb)],
            key_len: 1,
            bucket_column: None,
            per_aggregate: false,
        }],
    })];
    let error = match Engine::connect(parts).await {
        Ok(_) => panic!("a jsonb key was accepted"),
        Err(e) => e.to_string(),
    };
    for part in [
        "json_keyed",
        "by_document",
        "document",
        "jsonb",
        "cannot be a key",
    ] {
        assert!(error.contains(part), "{part:?} missing from: {error}");
    }
}

struct JsonKeyed {
    tables: Vec<TableSpec>,
}

impl Projection<ShopEvent> for JsonKeyed {
    fn name(&self) -> &'static str {
        "json_keyed"
    }

    fn version(&self) -> u32 {
        1
    }

    fn tables(&self) -> &[TableSpec] {
        &self.tables
    }

    fn apply(&self, _: &Event<'_, ShopEvent>, _: &mut Changes) {}
}
