//! Where row clocks live in PostgreSQL: for every projection table whose rows gather several
//! partitions, a table beside it in the build's schema, `<table>__rp_clock`, with the table's key
//! columns and the encoded [`RowClock`] of each key.
//!
//! Beside, not inside: the projection's own table keeps exactly the columns its SQL declares, so
//! views, verification and applications never see bookkeeping, and per-aggregate tables pay
//! nothing. A deleted row keeps its clock here (a tombstone) so that an older change arriving later
//! cannot bring it back. The bulk load writes clocks with one COPY like rows; catch-up, `run`,
//! spills and dead-letter retries read them with the rows they touch and write them back in the same
//! transaction.

use futures::TryStreamExt;
use rustc_hash::FxHashSet;
use sqlx::PgConnection;

use super::copy::decode_rows;
use super::writer::{copy_into, copy_or_upsert, key_list, UpsertThrough};
use super::{qualified, quote_ident, Context, Result, SinkError};
use crate::projection::{ColumnType, Key, RowClock, TableRows, TableSpec, Value};

/// The clock column of a clock table.
const CLOCK_COLUMN: &str = "rp_clock";

/// The name of the table that holds `table`'s row clocks.
pub fn table_name(table: &str) -> String {
    format!("{table}__rp_clock")
}

/// The tables of `spec` that keep rows by key in a build: the table itself and, when its rows
/// gather partitions, its clock table (what a spill indexes, and the index build replaces).
pub fn keyed_tables(spec: &TableSpec) -> Vec<String> {
    let mut tables = vec![spec.name.to_string()];
    if spec.gathers_partitions() {
        tables.push(table_name(spec.name));
    }
    tables
}

/// Create the clock table of `spec` (a table that gathers partitions) in `schema` if it is not there:
/// a build made before clocks existed gets an empty one, and its existing rows then take the next
/// change of each column as it comes. Keyed, so that later writes can upsert.
pub async fn ensure_table(conn: &mut PgConnection, schema: &str, spec: &TableSpec) -> Result<()> {
    let clock = qualified(schema, &table_name(spec.name));
    let exists: Option<String> = sqlx::query_scalar("SELECT to_regclass($1)::text")
        .bind(&clock)
        .fetch_one(&mut *conn)
        .await
        .context(|| format!("looking for {clock}"))?;
    if exists.is_some() {
        return Ok(());
    }
    create_table(conn, schema, spec).await?;
    add_key(conn, schema, spec).await
}

/// Create the (unkeyed, empty) clock table of `spec` beside its table, for a bulk load.
pub async fn create_table(conn: &mut PgConnection, schema: &str, spec: &TableSpec) -> Result<()> {
    let target = qualified(schema, spec.name);
    let name = table_name(spec.name);
    // PostgreSQL cuts longer names silently, and two tables could then share one clock table.
    if name.len() > 63 {
        return Err(SinkError::Invalid(format!(
            "table {} gathers several partitions, so its rows keep clocks in {name}, a name longer than PostgreSQL's 63 bytes; shorten the table's name to 53 bytes or less",
            spec.name
        )));
    }
    let clock = qualified(schema, &name);
    sqlx::raw_sql(&format!(
        "CREATE TABLE {clock} AS SELECT {keys} FROM {target} WITH NO DATA;
         ALTER TABLE {clock} ADD COLUMN {CLOCK_COLUMN} bytea NOT NULL;",
        keys = key_list(spec, None),
    ))
    .execute(conn)
    .await
    .context(|| format!("creating {clock}, the row clocks of {target}"))?;
    Ok(())
}

/// The clock table's primary key, added after its bulk load like the table's own.
pub async fn add_key(conn: &mut PgConnection, schema: &str, spec: &TableSpec) -> Result<()> {
    let clock = qualified(schema, &table_name(spec.name));
    sqlx::query(&format!(
        "ALTER TABLE {clock} ADD PRIMARY KEY ({})",
        key_list(spec, None)
    ))
    .execute(&mut *conn)
    .await
    .context(|| format!("adding the primary key of {clock}"))?;
    sqlx::query(&format!("ANALYZE {clock}"))
        .execute(conn)
        .await
        .context(|| format!("analyzing {clock}"))?;
    Ok(())
}

/// A key's row followed by its encoded clock: a row of the clock table.
fn clock_row(key: &Key, clock: &RowClock) -> Vec<Value> {
    let mut row = Vec::with_capacity(key.len() + 1);
    row.extend(key.iter().cloned());
    row.push(Value::Bytes(clock.encode()));
    row
}

/// COPY every clock the fold holds for `spec`'s table, in key order, into its (unkeyed) clock table.
pub async fn bulk_load(
    conn: &mut PgConnection,
    schema: &str,
    spec: &TableSpec,
    rows: &TableRows,
) -> Result<u64> {
    let clocks: Vec<Vec<Value>> = rows
        .clocks_in_key_order()
        .into_iter()
        .map(|(key, clock)| clock_row(key, clock))
        .collect();
    copy_into(
        conn,
        &qualified(schema, &table_name(spec.name)),
        spec.key_len + 1,
        clocks.iter(),
        |row| row.as_slice(),
    )
    .await
}

/// Seed `rows` with the stored clocks of the keys in `keys_table` (a temp table of `spec`'s `keys`
/// key columns, already filled in this transaction). Keys without a stored clock keep a fresh one.
pub async fn read(
    conn: &mut PgConnection,
    schema: &str,
    spec: &TableSpec,
    keys_table: &str,
    keys: usize,
    rows: &mut TableRows,
) -> Result<()> {
    let clock_table = qualified(schema, &table_name(spec.name));
    let from = super::writer::rows_of_keys(conn, &clock_table, "c", keys_table, spec, keys)
        .await?
        .sql;
    let statement = format!(
        "COPY (SELECT {keys}, c.{CLOCK_COLUMN} FROM {from}) TO STDOUT (FORMAT binary)",
        keys = key_list(spec, Some("c")),
    );
    let chunks: Vec<bytes::Bytes> = conn
        .copy_out_raw(&statement)
        .await
        .context(|| format!("reading row clocks from {clock_table}"))?
        .try_collect()
        .await
        .context(|| format!("reading row clocks from {clock_table}"))?;
    let mut types: Vec<ColumnType> = spec.key_columns().iter().map(|c| c.ty).collect();
    types.push(ColumnType::Bytea);
    for mut row in decode_rows(&chunks.concat(), &types)? {
        let Some(Value::Bytes(bytes)) = row.pop() else {
            continue;
        };
        let clock = RowClock::decode(&bytes).map_err(|reason| {
            SinkError::Invalid(format!(
                "{clock_table}: the clock of row ({}) is unreadable: {reason}",
                row.iter()
                    .map(Value::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
        })?;
        rows.seed_clock(Key::from(row), clock);
    }
    Ok(())
}

/// The session temp table a batch stages its clocks in before upserting them, emptied at commit.
pub fn staging_name(build_id: i64, table: usize) -> String {
    format!("rp_clocks_{build_id}_{table}")
}

pub async fn create_staging(
    conn: &mut PgConnection,
    schema: &str,
    spec: &TableSpec,
    staging: &str,
) -> Result<()> {
    ensure_table(conn, schema, spec).await?;
    let clock = qualified(schema, &table_name(spec.name));
    sqlx::query(&format!(
        "CREATE TEMP TABLE IF NOT EXISTS {} (LIKE {clock}) ON COMMIT DELETE ROWS",
        quote_ident(staging)
    ))
    .execute(conn)
    .await
    .context(|| format!("creating a staging table for {clock}"))?;
    Ok(())
}

/// Write every clock the fold holds for `spec`'s table (tombstones included), in the caller's
/// transaction: COPY those of the keys in `absent` (the clock table holds none for them), upsert the
/// others through `staging` (see [`create_staging`]).
pub async fn write_back(
    conn: &mut PgConnection,
    schema: &str,
    spec: &TableSpec,
    staging: &str,
    rows: &TableRows,
    absent: &FxHashSet<Key>,
) -> Result<()> {
    if rows.clock_count() == 0 {
        return Ok(());
    }
    let clock = qualified(schema, &table_name(spec.name));
    let (new, changed): (Vec<Vec<Value>>, Vec<Vec<Value>>) = rows
        .clocks()
        .map(|(key, clock)| clock_row(key, clock))
        .partition(|row| absent.contains(&row[..spec.key_len]));
    let staged = UpsertThrough {
        staging,
        keys: &key_list(spec, None),
        updated: &[CLOCK_COLUMN],
        what: "row clocks",
    };
    copy_or_upsert(conn, &clock, spec.key_len + 1, &new, &changed, staged).await?;
    Ok(())
}
