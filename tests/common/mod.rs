//! Shared fixtures: a fresh database per test (left behind for debugging, dropped at the next run),
//! an in-process mock Kafka cluster per test, a seeded shop history, and an engine wired to both.

#![allow(dead_code)]

use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use reproject::domain::shop::{self, generator::History, generator::HistoryConfig, ShopEvent};
use reproject::engine::rebuild::RebuildOptions;
use reproject::engine::{Engine, EngineParts, Tuning};
use reproject::sink::database::recreate_database;
use reproject::source::dev_broker::DevBroker;
use reproject::source::producer::LogWriter;
use reproject::source::KafkaSettings;
use reproject::swap::SwapOptions;
use sqlx::postgres::PgPoolOptions;
use sqlx::PgPool;

pub const TOPIC: &str = "shop.orders";

/// The server tests run against: TEST_DATABASE_URL, else the local one.
pub fn admin_url() -> String {
    std::env::var("TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

/// A fresh, empty database named after the test.
pub async fn fresh_database(test: &str) -> String {
    recreate_database(&admin_url(), &format!("rp_test_{test}"))
        .await
        .unwrap_or_else(|e| {
            panic!("cannot create a database for {test} (is PostgreSQL running? see README): {e}")
        })
}

pub async fn pool(url: &str) -> PgPool {
    PgPoolOptions::new()
        .max_connections(4)
        .connect(url)
        .await
        .expect("connect to the test database")
}

pub struct Kafka {
    pub broker: DevBroker,
    pub settings: KafkaSettings,
}

impl Kafka {
    pub fn start(partitions: i32) -> Kafka {
        let broker = DevBroker::start(TOPIC, partitions).expect("start the mock cluster");
        let settings = KafkaSettings {
            brokers: broker.bootstrap_servers(),
            properties: Vec::new(),
        };
        Kafka { broker, settings }
    }
}

pub fn history(events: u64, seed: u64) -> History {
    History::new(HistoryConfig::new(
        events,
        (events / 10).max(1),
        (events / 50).max(5),
        seed,
    ))
}

/// Append the next `count` events of `history` to the topic.
pub fn append(kafka: &KafkaSettings, history: &mut History, count: u64) {
    let mut writer = LogWriter::new(kafka, TOPIC, "consistent_random").expect("producer");
    for record in history.by_ref().take(count as usize) {
        writer.send(&record.key, &record.value).expect("send");
    }
    writer.finish().expect("every record delivered");
}

/// Append at about `rate` events per second from a thread; returns the history when done.
pub fn append_in_background(
    kafka: &KafkaSettings,
    mut history: History,
    count: u64,
    rate: u64,
) -> std::thread::JoinHandle<History> {
    let kafka = kafka.clone();
    std::thread::spawn(move || {
        let mut writer = LogWriter::new(&kafka, TOPIC, "consistent_random").expect("producer");
        let started = std::time::Instant::now();
        for (i, record) in history.by_ref().take(count as usize).enumerate() {
            writer.send(&record.key, &record.value).expect("send");
            if i % 100 == 0 {
                let due = Duration::from_secs_f64(i as f64 / rate as f64);
                if let Some(wait) = due.checked_sub(started.elapsed()) {
                    std::thread::sleep(wait);
                }
            }
        }
        writer.finish().expect("every record delivered");
        history
    })
}

pub fn tuning() -> Tuning {
    Tuning {
        batch_events: 5_000,
        lag_threshold: 0,
        stall_timeout: Duration::from_secs(60),
        max_rate: None,
        bad_records: reproject::engine::BadRecordPolicy::Fail,
        throttle: None,
        // More than one, so that every multi-partition replay in the tests shares its partitions out.
        replay_readers: 2,
        fold_in_readers: false,
        known_rows_bytes: reproject::sink::known::DEFAULT_KNOWN_ROWS_BYTES,
        // Off, so that the tests' small batches are each written as one: the suite test
        // `a_backlog_is_written_in_larger_transactions_and_gives_the_same_tables` turns it on.
        catch_up_batch_events: 0,
    }
}

pub async fn engine(
    database_url: &str,
    kafka: &KafkaSettings,
    tuning: Tuning,
) -> Engine<ShopEvent> {
    engine_with(
        database_url,
        kafka,
        tuning,
        shop::registry().expect("registry"),
    )
    .await
}

/// An engine with these upcasters (a deliberately broken chain, say).
pub async fn engine_with(
    database_url: &str,
    kafka: &KafkaSettings,
    tuning: Tuning,
    registry: reproject::upcast::Registry<ShopEvent>,
) -> Engine<ShopEvent> {
    let mut parts = shop_parts(database_url, kafka, tuning, None);
    parts.registry = Arc::new(registry);
    Engine::connect(parts).await.expect("engine connects")
}

/// The shop's engine parts, as the stock binary builds them, for tests to adjust.
pub fn shop_parts(
    database_url: &str,
    kafka: &KafkaSettings,
    tuning: Tuning,
    schema_dir: Option<std::path::PathBuf>,
) -> EngineParts<ShopEvent> {
    EngineParts::for_domain(
        &Arc::new(shop::Shop),
        kafka.clone(),
        reproject::source::Topics::new([TOPIC]).expect("the shop's topic"),
        database_url.into(),
        "public".into(),
        schema_dir,
        tuning,
    )
    .expect("the shop's parts")
}

pub fn rebuild_options() -> RebuildOptions {
    RebuildOptions {
        allow_truncated_history: false,
        swap: true,
        swap_options: SwapOptions::default(),
        quiet: true,
        memory_budget: None,
        disk_budget: None,
        verify: None,
    }
}

/// Rebuild every projection and swap it in, as `reproject rebuild --all` does.
pub async fn rebuild_all(
    engine: &Engine<ShopEvent>,
) -> reproject::engine::Result<reproject::engine::rebuild::RebuildReport> {
    reproject::engine::rebuild::rebuild(
        engine,
        &all_projections(),
        &rebuild_options(),
        &tokio_util::sync::CancellationToken::new(),
    )
    .await
}

pub fn all_projections() -> Vec<String> {
    shop::projections()
        .iter()
        .map(|p| p.name().to_string())
        .collect()
}

/// md5 over every row of a table, in key order: equal checksums mean equal tables.
pub async fn checksum(pool: &PgPool, schema: &str, table: &str, key: &str) -> String {
    sqlx::query_scalar(&format!(
        "SELECT coalesce(md5(string_agg(t::text, E'\\n' ORDER BY {key})), 'empty') FROM \"{schema}\".\"{table}\" t"
    ))
    .fetch_one(pool)
    .await
    .expect("checksum")
}

pub async fn schema_of(pool: &PgPool, build_id: i64) -> String {
    sqlx::query_scalar("SELECT schema_name FROM reproject.builds WHERE build_id = $1")
        .bind(build_id)
        .fetch_one(pool)
        .await
        .expect("build exists")
}

/// Follow every active build until nothing is left to apply.
pub async fn drain(engine: Arc<Engine<ShopEvent>>) {
    let options = reproject::engine::run::RunOptions {
        backfill: false,
        rebuild: rebuild_options(),
        exit_when_caught_up: Some(0),
        shared: false,
    };
    tokio::time::timeout(
        Duration::from_secs(120),
        reproject::engine::run::run(engine, options, Default::default()),
    )
    .await
    .expect("caught up within 2 minutes")
    .expect("run succeeds");
}

/// Run the reproject binary with exactly these arguments.
pub fn binary(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_reproject"))
        .args(args)
        .output()
        .expect("run reproject")
}

/// A process's output as text, for messages and `contains`.
pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Run the reproject binary against this test's database and broker.
pub fn reproject(db: &str, kafka: &Kafka, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_reproject"))
        .args(args)
        .args([
            "--brokers",
            &kafka.settings.brokers,
            "--database-url",
            db,
            "--quiet",
        ])
        .output()
        .expect("run reproject")
}

/// Events a build has applied: the sum of its next offsets.
pub async fn applied(pool: &PgPool, build_id: i64) -> i64 {
    sqlx::query_scalar(
        "SELECT coalesce(sum(next_offset), 0)::bigint FROM reproject.positions WHERE build_id = $1",
    )
    .bind(build_id)
    .fetch_one(pool)
    .await
    .expect("positions")
}

/// `reproject run` as a process of its own against this test's database and broker.
pub fn spawn_run(db: &str, kafka: &Kafka, extra: &[&str]) -> std::process::Child {
    Command::new(env!("CARGO_BIN_EXE_reproject"))
        .args([
            "run",
            "--brokers",
            &kafka.settings.brokers,
            "--database-url",
            db,
            "--quiet",
        ])
        .args(extra)
        .spawn()
        .expect("start run")
}

/// `reproject rebuild` with `what` (`--all`, or projection names) and `extra` flags.
pub fn spawn_rebuild(db: &str, brokers: &str, what: &[&str], extra: &[&str]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_reproject"))
        .arg("rebuild")
        .args(what)
        .args([
            "--quiet",
            "--brokers",
            brokers,
            "--database-url",
            db,
            "--topic",
            TOPIC,
        ])
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start reproject")
}

/// Poll until the query `sql` returns true (true), or the child exits or 60 s pass (false): for
/// tests that kill a process once it has reached a given point.
pub async fn wait_for_sql_while_running(pool: &PgPool, child: &mut Child, sql: &str) -> bool {
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if let Ok(Some(status)) = child.try_wait() {
            eprintln!("the rebuild exited before the condition held: {status}");
            return false;
        }
        let hit: Option<bool> = sqlx::query_scalar(sql)
            .fetch_optional(pool)
            .await
            .unwrap_or(None);
        if hit == Some(true) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    false
}

/// Stop a process as an operator would: SIGTERM, then wait (at most 30 s) for it to exit, and
/// check that it stopped cleanly, with success.
pub fn stop(child: &mut std::process::Child) {
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let status = wait_for_exit(child, "a clean stop after SIGTERM", 30);
    assert!(
        status.success(),
        "stopped by SIGTERM, it exited with {status}"
    );
}

/// Wait at most `seconds` for `child` to exit; kill it and fail the test, naming `what` was
/// awaited, if it does not.
pub fn wait_for_exit(
    child: &mut std::process::Child,
    what: &str,
    seconds: u64,
) -> std::process::ExitStatus {
    let deadline = std::time::Instant::now() + Duration::from_secs(seconds);
    loop {
        if let Some(status) = child.try_wait().expect("the process can be waited for") {
            return status;
        }
        if std::time::Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "waited {seconds} s for {what}: the process (pid {}) was still running",
                child.id()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Wait until `probe` gives a value that `done` accepts, checking every 50 ms; fail the test,
/// naming `what` and the last value seen, if none does within `seconds`. Tests wait on what they
/// need, not for fixed times.
pub async fn wait_until<T, Probe, Next>(
    what: &str,
    seconds: u64,
    mut probe: Probe,
    done: impl Fn(&T) -> bool,
) -> T
where
    T: std::fmt::Debug,
    Probe: FnMut() -> Next,
    Next: std::future::Future<Output = T>,
{
    let deadline = std::time::Instant::now() + Duration::from_secs(seconds);
    loop {
        let value = probe().await;
        if done(&value) {
            return value;
        }
        if std::time::Instant::now() >= deadline {
            panic!("waited {seconds} s for {what}; last seen: {value:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// One value of a query, or None when it fails (a table or build that does not exist yet).
pub async fn scalar<T>(pool: &PgPool, sql: &str) -> Option<T>
where
    T: Send + Unpin + for<'r> sqlx::Decode<'r, sqlx::Postgres> + sqlx::Type<sqlx::Postgres>,
{
    sqlx::query_scalar(sql)
        .fetch_optional(pool)
        .await
        .ok()
        .flatten()
}

/// Wait up to `seconds` until `build_id` has applied `events` (fails the test otherwise); returns
/// what it has applied.
pub async fn wait_for_applied(pool: &PgPool, build_id: i64, events: i64, seconds: u64) -> i64 {
    wait_until(
        &format!("build {build_id} to apply {events} events"),
        seconds,
        || applied(pool, build_id),
        |now| *now >= events,
    )
    .await
}

/// GET `path` from `addr` over a plain TCP connection: the status code and the body.
pub fn http_get(addr: &str, path: &str) -> (u16, String) {
    try_http_get(addr, path).expect("the HTTP endpoint accepts")
}

/// [`http_get`], or the error connecting (a process that is not listening yet, say).
pub fn try_http_get(addr: &str, path: &str) -> std::io::Result<(u16, String)> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr)?;
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .expect("request");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("response");
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or(0);
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

/// A free local port for a process to listen on, as `127.0.0.1:<port>`.
pub fn free_local_addr() -> String {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    format!("127.0.0.1:{port}")
}

/// A TCP forwarder to PostgreSQL that a test can cut (every connection dropped, new ones closed at
/// once) and restore: a database lost and found again, for one process, while the server stays up
/// for the other tests.
pub struct CuttableProxy {
    pub port: u16,
    up: tokio::sync::watch::Sender<bool>,
}

impl CuttableProxy {
    pub async fn start(target: &str) -> CuttableProxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the proxy");
        let port = listener.local_addr().expect("proxy address").port();
        let (up, _) = tokio::sync::watch::channel(true);
        let watch = up.clone();
        let target = target.to_string();
        tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                if !*watch.borrow() {
                    continue; // dropped: the client sees the connection closed
                }
                let (target, mut cut) = (target.clone(), watch.subscribe());
                tokio::spawn(async move {
                    let Ok(mut server) = tokio::net::TcpStream::connect(&target).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                        _ = cut.wait_for(|up| !*up) => {}
                    }
                });
            }
        });
        CuttableProxy { port, up }
    }

    /// `url` (a PostgreSQL URL) pointed at this proxy.
    pub fn url(&self, url: &str) -> String {
        let mut url = url::Url::parse(url).expect("a database URL");
        url.set_port(Some(self.port)).expect("a URL with a port");
        url.to_string()
    }

    pub fn cut(&self) {
        self.up.send_replace(false);
    }

    pub fn restore(&self) {
        self.up.send_replace(true);
    }
}
