//! The limits a rebuild is judged against, measured in the same run, on the same log and the same
//! server: how fast the replay's client settings read the log when nothing is decoded, and how long
//! PostgreSQL takes to COPY the rows the rebuild wrote into unindexed tables and to build the same
//! indexes on them. A phase's ratio to its limit says how much of its time is reproject's own; a
//! figure alone says as much about the machine (shared, noisy) as about the code.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use futures::TryStreamExt;
use rdkafka::consumer::BaseConsumer;
use rdkafka::message::Message;
use serde::Serialize;
use sqlx::{Connection, PgConnection};

use crate::engine::reader::PartitionShares;
use crate::sink::quote_ident;
use crate::source::{KafkaSettings, Topics};

/// The whole log read as the replay reads it, minus everything the replay does with a record.
#[derive(Debug, Default, Serialize)]
pub struct ReadLimit {
    pub records: u64,
    /// Keys and payloads: what a reader receives, before any decoding.
    pub bytes: u64,
    /// Threads, each on a consumer of its own with every `readers`-th partition, as the replay.
    pub readers: usize,
    pub seconds: f64,
    pub records_per_second: f64,
}

/// A read stops, with an error, when nothing arrives for this long before its partitions' ends.
const READ_STALL: Duration = Duration::from_secs(30);

/// Read every partition of `topics` from its start to its end on `readers` threads, splitting the
/// partitions as the replay does, touching only each record's length.
pub fn raw_read(
    kafka: &KafkaSettings,
    topics: &Topics,
    readers: usize,
) -> anyhow::Result<ReadLimit> {
    let consumer: BaseConsumer = kafka.consumer("reproject-bench-raw-read")?;
    let partitions = kafka.partitions(&consumer, topics)?;
    let bounds = kafka.bounds(&consumer, topics, &partitions)?;
    drop(consumer);
    let shares = PartitionShares::new(partitions.iter().copied(), readers);
    let readers = shares.readers();
    let started = Instant::now();
    let threads = (0..readers)
        .map(|share| {
            // partition -> (first offset, end offset), for the partitions that hold records.
            let mine: BTreeMap<i32, (i64, i64)> = partitions
                .iter()
                .filter(|p| shares.owns(share, **p))
                .filter_map(|p| {
                    let (start, end) = (*bounds.start.get(p)?, *bounds.end.get(p)?);
                    (end > start).then_some((*p, (start, end)))
                })
                .collect();
            let (kafka, topics) = (kafka.clone(), topics.clone());
            std::thread::Builder::new()
                .name(format!("reproject-raw-read-{share}"))
                .spawn(move || read_share(&kafka, &topics, &mine))
        })
        .collect::<Result<Vec<_>, _>>()
        .context("starting the raw read's threads")?;
    let mut limit = ReadLimit {
        readers,
        ..ReadLimit::default()
    };
    for thread in threads {
        let (records, bytes) = thread
            .join()
            .map_err(|_| anyhow::anyhow!("a thread of the raw read panicked"))??;
        limit.records += records;
        limit.bytes += bytes;
    }
    limit.seconds = started.elapsed().as_secs_f64();
    limit.records_per_second = limit.records as f64 / limit.seconds.max(1e-9);
    Ok(limit)
}

/// One thread's share of the raw read: its records and bytes.
fn read_share(
    kafka: &KafkaSettings,
    topics: &Topics,
    mine: &BTreeMap<i32, (i64, i64)>,
) -> anyhow::Result<(u64, u64)> {
    if mine.is_empty() {
        return Ok((0, 0));
    }
    let consumer: BaseConsumer = kafka.consumer("reproject-bench-raw-read")?;
    let starts = mine.iter().map(|(p, (start, _))| (*p, *start)).collect();
    kafka.assign(&consumer, topics, &starts)?;
    let mut ends: BTreeMap<i32, i64> = mine.iter().map(|(p, (_, end))| (*p, *end)).collect();
    let (mut records, mut bytes) = (0u64, 0u64);
    let mut last_record = Instant::now();
    while !ends.is_empty() {
        let Some(polled) = consumer.poll(Duration::from_millis(100)) else {
            if last_record.elapsed() > READ_STALL {
                anyhow::bail!(
                    "the raw read of {topics} got nothing for {} s with partitions {:?} short of their ends",
                    READ_STALL.as_secs(),
                    ends.keys().map(|id| Topics::split(*id)).collect::<Vec<_>>()
                );
            }
            continue;
        };
        let message = polled.with_context(|| format!("the raw read of {topics}"))?;
        last_record = Instant::now();
        records += 1;
        bytes += (message.payload_len() + message.key().map_or(0, <[u8]>::len)) as u64;
        if let Some(id) = topics.id_of(message.topic(), message.partition()) {
            if ends
                .get(&id)
                .is_some_and(|end| message.offset() + 1 >= *end)
            {
                ends.remove(&id);
            }
        }
    }
    Ok((records, bytes))
}

/// The rows of the rebuild's tables written again by PostgreSQL alone.
#[derive(Debug, Default, Serialize)]
pub struct WriteLimit {
    pub tables: usize,
    pub rows: u64,
    /// The rows in COPY's binary format.
    pub bytes: u64,
    /// COPY into unindexed tables, one transaction and connection per build, builds side by side.
    pub copy_seconds: f64,
    /// The same indexes (keys included) and ANALYZE, a connection per build, side by side.
    pub index_seconds: f64,
}

/// One table of a build, ready to be written again into the scratch schema.
struct TableCopy {
    name: String,
    rows: Vec<bytes::Bytes>,
    indexes: Vec<String>,
}

/// The scratch schema a build's tables are copied into.
fn scratch_schema(i: usize) -> String {
    format!("rp_bench_limit_{i}")
}

/// COPY the rows of every build in `schemas` (binary, as the bulk load writes them) into unindexed
/// copies of its tables, then build the same indexes on them and ANALYZE: the builds side by side,
/// each on a connection of its own, as the rebuild loads and indexes them. The rows are read out
/// beforehand, outside the timing.
pub async fn raw_write(database_url: &str, schemas: &[String]) -> anyhow::Result<WriteLimit> {
    let mut conn = PgConnection::connect(database_url)
        .await
        .context("connecting to measure the write limit")?;
    let mut builds = Vec::new();
    for (i, schema) in schemas.iter().enumerate() {
        builds.push(prepare(&mut conn, schema, &scratch_schema(i)).await?);
    }
    let mut limit = WriteLimit {
        tables: builds.iter().map(Vec::len).sum(),
        bytes: builds
            .iter()
            .flatten()
            .flat_map(|t| &t.rows)
            .map(|chunk| chunk.len() as u64)
            .sum(),
        ..WriteLimit::default()
    };

    let started = Instant::now();
    let copies = builds
        .iter()
        .enumerate()
        .map(|(i, tables)| copy_build(database_url, scratch_schema(i), tables));
    limit.rows = futures::future::try_join_all(copies)
        .await?
        .into_iter()
        .sum();
    limit.copy_seconds = started.elapsed().as_secs_f64();

    let started = Instant::now();
    let indexes = builds
        .iter()
        .enumerate()
        .map(|(i, tables)| index_build(database_url, scratch_schema(i), tables));
    futures::future::try_join_all(indexes).await?;
    limit.index_seconds = started.elapsed().as_secs_f64();

    for i in 0..schemas.len() {
        let scratch = scratch_schema(i);
        sqlx::raw_sql(&format!("DROP SCHEMA IF EXISTS {scratch} CASCADE"))
            .execute(&mut conn)
            .await
            .with_context(|| format!("dropping the scratch schema {scratch}"))?;
    }
    Ok(limit)
}

/// Create unindexed copies of `schema`'s tables in `scratch`, and read out their rows and the
/// definitions of their indexes, rewritten for the copies.
async fn prepare(
    conn: &mut PgConnection,
    schema: &str,
    scratch: &str,
) -> anyhow::Result<Vec<TableCopy>> {
    sqlx::raw_sql(&format!(
        "DROP SCHEMA IF EXISTS {scratch} CASCADE; CREATE SCHEMA {scratch};"
    ))
    .execute(&mut *conn)
    .await
    .with_context(|| format!("creating the scratch schema {scratch}"))?;
    let names: Vec<String> = sqlx::query_scalar(
        "SELECT tablename::text FROM pg_tables WHERE schemaname = $1 ORDER BY 1",
    )
    .bind(schema)
    .fetch_all(&mut *conn)
    .await
    .with_context(|| format!("listing the tables of {schema}"))?;
    let mut tables = Vec::new();
    for name in names {
        let (from, to) = (
            format!("{}.{}", quote_ident(schema), quote_ident(&name)),
            format!("{scratch}.{}", quote_ident(&name)),
        );
        sqlx::raw_sql(&format!("CREATE TABLE {to} (LIKE {from})"))
            .execute(&mut *conn)
            .await
            .with_context(|| format!("creating {to} like {from}"))?;
        let rows: Vec<bytes::Bytes> = conn
            .copy_out_raw(&format!("COPY {from} TO STDOUT (FORMAT binary)"))
            .await
            .with_context(|| format!("reading the rows of {from}"))?
            .try_collect()
            .await
            .with_context(|| format!("reading the rows of {from}"))?;
        // pg_get_indexdef names the table as `schema.table`, each part quoted where it needs it.
        let definitions: Vec<(String, String)> = sqlx::query_as(
            "SELECT pg_get_indexdef(i.indexrelid), quote_ident(n.nspname) || '.'
             FROM pg_index i JOIN pg_class c ON c.oid = i.indrelid
             JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE n.nspname = $1 AND c.relname = $2 ORDER BY i.indexrelid",
        )
        .bind(schema)
        .bind(&name)
        .fetch_all(&mut *conn)
        .await
        .with_context(|| format!("reading the index definitions of {from}"))?;
        let indexes = definitions
            .into_iter()
            .map(|(definition, prefix)| {
                definition.replacen(&format!(" ON {prefix}"), &format!(" ON {scratch}."), 1)
            })
            .collect();
        tables.push(TableCopy {
            name,
            rows,
            indexes,
        });
    }
    Ok(tables)
}

/// One build's COPY, in one transaction: its rows.
async fn copy_build(
    database_url: &str,
    scratch: String,
    tables: &[TableCopy],
) -> anyhow::Result<u64> {
    let mut conn = PgConnection::connect(database_url)
        .await
        .context("connecting to COPY for the write limit")?;
    let mut tx = conn.begin().await.context("starting the limit's COPY")?;
    let mut rows = 0;
    for table in tables {
        let target = format!("{scratch}.{}", quote_ident(&table.name));
        let mut copy = tx
            .copy_in_raw(&format!("COPY {target} FROM STDIN (FORMAT binary)"))
            .await
            .with_context(|| format!("starting the COPY into {target}"))?;
        for chunk in &table.rows {
            copy.send(chunk.as_ref())
                .await
                .with_context(|| format!("the COPY into {target}"))?;
        }
        rows += copy
            .finish()
            .await
            .with_context(|| format!("finishing the COPY into {target}"))?;
    }
    tx.commit().await.context("committing the limit's COPY")?;
    Ok(rows)
}

/// One build's indexes and ANALYZE, in one transaction.
async fn index_build(
    database_url: &str,
    scratch: String,
    tables: &[TableCopy],
) -> anyhow::Result<()> {
    let mut conn = PgConnection::connect(database_url)
        .await
        .context("connecting to build indexes for the write limit")?;
    let mut tx = conn
        .begin()
        .await
        .context("starting the limit's index build")?;
    for table in tables {
        for index in &table.indexes {
            sqlx::raw_sql(index)
                .execute(&mut *tx)
                .await
                .with_context(|| format!("building {index}"))?;
        }
        let target = format!("{scratch}.{}", quote_ident(&table.name));
        sqlx::raw_sql(&format!("ANALYZE {target}"))
            .execute(&mut *tx)
            .await
            .with_context(|| format!("analyzing {target}"))?;
    }
    tx.commit()
        .await
        .context("committing the limit's index build")
}
