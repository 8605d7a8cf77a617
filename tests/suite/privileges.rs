//! reproject runs as a role with only the privileges the README lists, and an application role with
//! only SELECT on the views keeps reading across swaps.

use crate::common;

use common::*;
use reproject::domain::shop::totals::{actual_totals, differences};
use sqlx::Connection;

/// `url` with its user replaced (local trust authentication, as on these machines and in CI).
fn as_role(url: &str, role: &str) -> String {
    let mut parsed = url::Url::parse(url).expect("database url");
    parsed.set_username(role).expect("set user");
    parsed.set_password(None).expect("no password");
    parsed.to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_role_with_only_the_documented_privileges_rebuilds_and_swaps_and_readers_keep_reading() {
    let db = fresh_database("privileges").await;
    let database = url::Url::parse(&db)
        .expect("url")
        .path()
        .trim_start_matches('/')
        .to_string();
    let admin = pool(&db).await;
    // Roles are cluster-wide: create them once, grant on this database.
    sqlx::raw_sql(&format!(
        r#"DO $$ BEGIN
             CREATE ROLE rp_test_writer LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE;
           EXCEPTION WHEN duplicate_object THEN NULL; END $$;
           DO $$ BEGIN
             CREATE ROLE rp_test_reader LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE;
           EXCEPTION WHEN duplicate_object THEN NULL; END $$;
           REVOKE ALL ON DATABASE "{database}" FROM PUBLIC;
           GRANT CONNECT, CREATE ON DATABASE "{database}" TO rp_test_writer;
           GRANT CONNECT ON DATABASE "{database}" TO rp_test_reader;
           REVOKE ALL ON SCHEMA public FROM PUBLIC;
           GRANT USAGE, CREATE ON SCHEMA public TO rp_test_writer;
           GRANT USAGE ON SCHEMA public TO rp_test_reader;"#
    ))
    .execute(&admin)
    .await
    .expect("roles and grants");

    let kafka = Kafka::start(2);
    let mut history = history(6_000, 43);
    append(&kafka.settings, &mut history, 4_000);
    let writer_url = as_role(&db, "rp_test_writer");
    let engine = engine(&writer_url, &kafka.settings, tuning()).await;
    let superuser: bool =
        sqlx::query_scalar("SELECT rolsuper FROM pg_roles WHERE rolname = current_user")
            .fetch_one(engine.catalog.pool())
            .await
            .expect("role");
    assert!(!superuser);
    rebuild_all(&engine)
        .await
        .expect("rebuild as the limited role");

    // The application's role: SELECT on the views, granted by their owner, reproject's role.
    sqlx::raw_sql("GRANT SELECT ON public.order_summary, public.customer_stats, public.daily_sales TO rp_test_reader")
        .execute(engine.catalog.pool())
        .await
        .expect("grant select");
    let mut reader = sqlx::PgConnection::connect(&as_role(&db, "rp_test_reader"))
        .await
        .expect("reader connects");
    let count = |n: i64| n > 0;
    let before: i64 = sqlx::query_scalar("SELECT count(*) FROM public.order_summary")
        .fetch_one(&mut reader)
        .await
        .expect("reader selects");
    assert!(count(before));

    // A second rebuild swaps new tables in; the reader's grant comes along.
    append(&kafka.settings, &mut history, 2_000);
    rebuild_all(&engine).await.expect("second rebuild");
    let after: i64 = sqlx::query_scalar("SELECT count(*) FROM public.order_summary")
        .fetch_one(&mut reader)
        .await
        .expect("reader selects after the swap");
    assert!(after >= before);
    // Reading the build schemas directly is not something the reader can do, nor needs to.
    let direct = sqlx::query("SELECT 1 FROM reproject.builds")
        .fetch_optional(&mut reader)
        .await;
    assert!(direct.is_err(), "the reader could read reproject's catalog");
    let actual = actual_totals(engine.catalog.pool(), "public")
        .await
        .expect("totals");
    assert_eq!(
        differences(&history.expected(), &actual),
        Vec::<String>::new()
    );

    // gc as the limited role drops the retired build's schema.
    let gc = std::process::Command::new(env!("CARGO_BIN_EXE_reproject"))
        .args([
            "gc",
            "--keep",
            "0",
            "--older-than-hours",
            "0",
            "--database-url",
            &writer_url,
        ])
        .output()
        .expect("run gc");
    assert!(
        gc.status.success(),
        "{}",
        String::from_utf8_lossy(&gc.stderr)
    );
}
