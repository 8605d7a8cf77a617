//! `/healthz` and `/readyz` beside `/metrics`, so that `run` can sit behind an orchestrator's
//! probes: healthz answers while the process does; readyz is 200 only while the views are caught
//! up, no projection is paused and PostgreSQL and the brokers answer, and otherwise 503 naming the
//! check that failed. Checked against a `run` process that follows, is paused, falls behind, and
//! loses its database (through a proxy the test cuts) and finds it again.

use crate::common;

use common::*;

/// `/readyz` as status and parsed body (a body that is not JSON as a string saying so); status 0
/// while nothing listens yet.
fn readyz(addr: &str) -> (u16, serde_json::Value) {
    match try_http_get(addr, "/readyz") {
        Ok((status, body)) => match serde_json::from_str(&body) {
            Ok(json) => (status, json),
            Err(e) => (status, format!("not JSON ({e}): {body:?}").into()),
        },
        Err(e) => (0, serde_json::Value::String(e.to_string())),
    }
}

/// Poll `/readyz` of the `run` process until `wanted` holds for it (at most `seconds`); the last
/// answer. The process exiting meanwhile fails the test at once, with its exit status.
async fn wait_for_readyz(
    run: &mut std::process::Child,
    addr: &str,
    what: &str,
    seconds: u64,
    wanted: impl Fn(u16, &serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(seconds);
    loop {
        if let Ok(Some(status)) = run.try_wait() {
            panic!("waiting for {what}: run exited ({status}); its stderr is above");
        }
        let (status, body) = readyz(addr);
        if wanted(status, &body) {
            return body;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{what}: not within {seconds} s; last answer {status}: {body:#}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

fn failed(body: &serde_json::Value, check: &str) -> bool {
    body["checks"][check]["ok"] == false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_follows_catching_up_pausing_and_losing_the_database_while_healthz_stays_up() {
    let db = fresh_database("health").await;
    let kafka = Kafka::start(2);
    let mut log = history(40_000, 17);
    append(&kafka.settings, &mut log, 10_000);
    let engine = engine(&db, &kafka.settings, tuning()).await;
    rebuild_all(&engine).await.expect("rebuild");
    // More than --lag-threshold (1,000) events that `run` has yet to apply when it starts.
    append(&kafka.settings, &mut log, 20_000);

    let proxy = CuttableProxy::start("127.0.0.1:5432").await;
    let proxied_db = proxy.url(&db);
    let addr = free_local_addr();
    let mut run = spawn_run(
        &proxied_db,
        &kafka,
        &["--metrics-addr", &addr, "--max-rate", "4000"],
    );

    // Up and catching up: alive, not ready, saying how far behind it is.
    let behind = wait_for_readyz(
        &mut run,
        &addr,
        "readyz to say the views lag",
        30,
        |status, body| status == 503 && failed(body, "caught_up"),
    )
    .await;
    let lag = behind["checks"]["caught_up"]["detail"]
        .as_str()
        .unwrap_or("");
    assert!(lag.contains("order_summary lags"), "{behind:#}");
    assert_eq!(behind["checks"]["database"]["ok"], true, "{behind:#}");
    assert_eq!(behind["checks"]["brokers"]["ok"], true, "{behind:#}");
    assert_eq!(http_get(&addr, "/healthz"), (200, "ok\n".to_string()));

    // Caught up: ready, every check passed.
    let ready = wait_for_readyz(&mut run, &addr, "readyz to say ready", 60, |status, _| {
        status == 200
    })
    .await;
    for check in ["database", "brokers", "not_paused", "caught_up"] {
        assert_eq!(ready["checks"][check]["ok"], true, "{check}: {ready:#}");
    }
    assert_eq!(ready["ready"], true);

    // Paused from another process: not ready, naming the projection.
    let paused = reproject(&db, &kafka, &["pause", "customer_stats"]);
    assert!(paused.status.success(), "{}", text(&paused.stderr));
    let body = wait_for_readyz(
        &mut run,
        &addr,
        "readyz to report the pause",
        10,
        |status, body| status == 503 && failed(body, "not_paused"),
    )
    .await;
    let detail = body["checks"]["not_paused"]["detail"]
        .as_str()
        .unwrap_or("");
    assert!(detail.contains("customer_stats"), "{body:#}");
    let resumed = reproject(&db, &kafka, &["resume", "customer_stats"]);
    assert!(resumed.status.success(), "{}", text(&resumed.stderr));
    wait_for_readyz(
        &mut run,
        &addr,
        "readyz to recover from the pause",
        30,
        |status, _| status == 200,
    )
    .await;

    // The database lost: not ready, naming it, while healthz still answers; found again: ready.
    proxy.cut();
    let lost = wait_for_readyz(
        &mut run,
        &addr,
        "readyz to report the lost database",
        10,
        |status, body| status == 503 && failed(body, "database"),
    )
    .await;
    assert!(
        lost["checks"]["database"]["detail"]
            .as_str()
            .is_some_and(|d| d.contains("PostgreSQL")),
        "{lost:#}"
    );
    assert_eq!(http_get(&addr, "/healthz").0, 200);
    // An outage longer than a handful of retries (a failover takes this long): `run` rides it out
    // instead of exiting after its first few failed rounds.
    tokio::time::sleep(std::time::Duration::from_secs(12)).await;
    assert!(
        matches!(run.try_wait(), Ok(None)),
        "run exited during a 12 s database outage; its stderr is above"
    );
    proxy.restore();
    wait_for_readyz(
        &mut run,
        &addr,
        "readyz to recover with the database",
        30,
        |status, _| status == 200,
    )
    .await;

    // The process that served all this kept following: the rest of the log arrives and is applied.
    append(&kafka.settings, &mut log, 10_000);
    assert_eq!(
        wait_for_applied(engine.catalog.pool(), 1, 40_000, 60).await,
        40_000,
        "run kept following through the outage"
    );
    stop(&mut run);
}
