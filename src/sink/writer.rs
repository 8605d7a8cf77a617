//! Getting folded rows into a build's tables.
//!
//! Two paths, one codec:
//! - **Bulk load** during a rebuild: the tables were just created without keys or indexes; every row
//!   goes in with one binary COPY per table, sorted by key so that the same log always gives the same
//!   physical table; positions commit in the same transaction.
//! - **Incremental batches** when catching up or following the log: one transaction per batch reads
//!   the current rows of every key the batch touches, folds the batch's changes into them, and writes
//!   the results back (upsert, or delete where the fold removed the row) together with the new
//!   positions, compare-and-set, so a batch is applied exactly once or not at all.

use std::collections::HashSet;
use std::time::Duration;

use futures::TryStreamExt;
use rustc_hash::FxHashSet;

use sqlx::{Connection, PgConnection};

use super::catalog::{self, Positions};
use super::clocks;
use super::copy::{decode_rows, CopyEncoder};
use super::known::{KnownRows, DEFAULT_KNOWN_ROWS_BYTES};
use super::{qualified, quote_ident, Context, Result, SinkError, SliceGate};
use crate::projection::{ChangeLog, Key, RowStore, SchemaSql, TableSpec, Value};

/// Bytes of COPY data sent to the server at a time.
pub const COPY_CHUNK: usize = 4 << 20;

/// A build's tables: where they live and what the projection says they look like.
#[derive(Clone, Copy)]
pub struct BuildTables<'a> {
    pub build_id: i64,
    pub projection: &'a str,
    pub version: u32,
    pub schema: &'a str,
    pub specs: &'a [TableSpec],
}

impl<'a> BuildTables<'a> {
    /// The tables of `build`, made by `projection`.
    pub fn of<E>(
        build: &'a super::Build,
        projection: &'a crate::projection::DynProjection<E>,
    ) -> BuildTables<'a> {
        BuildTables {
            build_id: build.build_id,
            projection: projection.name(),
            version: projection.version(),
            schema: &build.schema_name,
            specs: projection.tables(),
        }
    }

    fn mismatch(&self, table: &str, detail: String) -> SinkError {
        SinkError::SchemaMismatch {
            projection: self.projection.to_string(),
            version: self.version,
            table: table.to_string(),
            detail,
        }
    }
}

/// Create the build's schema and run its `tables.sql` there, then check that the tables have exactly
/// the columns, in the order and of the types, that the projection code declares.
pub async fn create_tables(
    conn: &mut PgConnection,
    build: BuildTables<'_>,
    sql: &SchemaSql,
) -> Result<()> {
    let mut tx = conn
        .begin()
        .await
        .context(|| "starting to create tables".into())?;
    sqlx::raw_sql(&format!(
        "CREATE SCHEMA {schema}; SET LOCAL search_path TO {schema};",
        schema = quote_ident(build.schema)
    ))
    .execute(&mut *tx)
    .await
    .context(|| format!("creating schema {}", build.schema))?;
    sqlx::raw_sql(&sql.tables)
        .execute(&mut *tx)
        .await
        .context(|| {
            format!(
                "running tables.sql of {} v{} in schema {}",
                build.projection, build.version, build.schema
            )
        })?;
    verify_tables(&mut tx, build).await?;
    for spec in build.specs.iter().filter(|s| s.gathers_partitions()) {
        clocks::create_table(&mut tx, build.schema, spec).await?;
    }
    tx.commit()
        .await
        .context(|| format!("committing the tables of {}", build.schema))
}

/// Compare the tables in the build's schema with the projection's declarations.
pub async fn verify_tables(conn: &mut PgConnection, build: BuildTables<'_>) -> Result<()> {
    let rows: Vec<(String, String, String)> = sqlx::query_as(
        "SELECT table_name::text, column_name::text, data_type::text FROM information_schema.columns
         WHERE table_schema = $1 ORDER BY table_name, ordinal_position",
    )
    .bind(build.schema)
    .fetch_all(&mut *conn)
    .await
    .context(|| format!("reading the columns of schema {}", build.schema))?;
    for spec in build.specs {
        let actual: Vec<(&str, &str)> = rows
            .iter()
            .filter(|(t, _, _)| t == spec.name)
            .map(|(_, c, ty)| (c.as_str(), ty.as_str()))
            .collect();
        if actual.is_empty() {
            return Err(build.mismatch(spec.name, "tables.sql does not create this table".into()));
        }
        let declared: Vec<(&str, &str)> = spec
            .columns
            .iter()
            .map(|c| (c.name, c.ty.pg_name()))
            .collect();
        let retyped = declared
            .iter()
            .zip(&actual)
            .find(|((dc, dt), (ac, at))| dc == ac && dt != at);
        if let (Some(((column, code), (_, sql))), true) = (retyped, actual.len() == declared.len())
        {
            return Err(build.mismatch(
                spec.name,
                format!(
                    "column {column}: the code declares {code} but the table's SQL creates {sql}"
                ),
            ));
        }
        if actual != declared {
            let fmt = |cols: &[(&str, &str)]| {
                cols.iter()
                    .map(|(c, t)| format!("{c} {t}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            return Err(build.mismatch(
                spec.name,
                format!(
                    "the code declares ({}) but tables.sql creates ({})",
                    fmt(&declared),
                    fmt(&actual)
                ),
            ));
        }
    }
    Ok(())
}

pub async fn drop_schema(conn: &mut PgConnection, schema: &str) -> Result<()> {
    sqlx::query(&format!(
        "DROP SCHEMA IF EXISTS {} CASCADE",
        quote_ident(schema)
    ))
    .execute(conn)
    .await
    .context(|| format!("dropping schema {schema}"))?;
    Ok(())
}

/// COPY every row of `store` into the build's tables, in the caller's transaction, in slices that
/// `gate` paces when given. Returns rows written.
pub async fn bulk_load(
    conn: &mut PgConnection,
    build: BuildTables<'_>,
    store: &RowStore,
    gate: Option<&dyn SliceGate>,
) -> Result<u64> {
    let mut written = 0;
    for (index, spec) in build.specs.iter().enumerate() {
        // Sorting a million rows takes a while: let the runtime's other tasks (progress, signals,
        // followers) move to another worker meanwhile.
        let table = store.table(index);
        let sort = || table.live_rows_in_key_order(spec.key_len);
        let rows = match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
            Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(sort),
            _ => sort(),
        };
        written += copy_sliced(
            conn,
            &qualified(build.schema, spec.name),
            spec.columns.len(),
            rows.into_iter(),
            |row| row.as_slice(),
            gate,
        )
        .await?;
        if spec.gathers_partitions() {
            clocks::bulk_load(conn, build.schema, spec, table).await?;
        }
    }
    Ok(written)
}

/// Rows per COPY statement when a bulk write is paced: a fraction of a second each on a local
/// server, so a pause takes effect quickly.
pub const SLICE_ROWS: usize = 100_000;

/// [`copy_into`], as several COPY statements of [`SLICE_ROWS`] rows in the caller's transaction with
/// `gate` between them; one statement without a gate.
pub async fn copy_sliced<'r, T: 'r>(
    conn: &mut PgConnection,
    target: &str,
    columns: usize,
    items: impl Iterator<Item = &'r T>,
    cells: impl Fn(&'r T) -> &'r [Value] + Copy,
    gate: Option<&dyn SliceGate>,
) -> Result<u64> {
    let Some(gate) = gate else {
        return copy_into(conn, target, columns, items, cells).await;
    };
    let mut items = items.peekable();
    let mut written = 0;
    // An empty table still gets its (empty) COPY, as without a gate.
    loop {
        let started = std::time::Instant::now();
        written += copy_into(
            conn,
            target,
            columns,
            items.by_ref().take(SLICE_ROWS),
            cells,
        )
        .await?;
        if items.peek().is_none() {
            return Ok(written);
        }
        gate.after_slice(started.elapsed()).await;
    }
}

/// How long one step of a COPY (starting it, sending a chunk of [`COPY_CHUNK`] bytes, finishing it)
/// may make no progress before the load stops with [`SinkError::CopyStalled`] instead of waiting
/// forever. Far above what a step takes on a loaded server (a chunk is 4 MiB).
pub const COPY_STALL: Duration = Duration::from_secs(300);

/// COPY `items` into `target` (already quoted) in binary, `cells` giving each item's row.
pub async fn copy_into<'r, T: 'r>(
    conn: &mut PgConnection,
    target: &str,
    columns: usize,
    items: impl Iterator<Item = &'r T>,
    cells: impl Fn(&'r T) -> &'r [Value],
) -> Result<u64> {
    copy_into_within(conn, target, columns, items, cells, COPY_STALL).await
}

/// [`copy_into`], giving up after `stall` without progress in one step. A COPY was once seen to hang
/// with the server waiting for data and the client waiting for nothing (a TLS connection; see
/// BENCHMARKS.md): an error the operator can act on beats a rebuild that never ends.
pub async fn copy_into_within<'r, T: 'r>(
    conn: &mut PgConnection,
    target: &str,
    columns: usize,
    items: impl Iterator<Item = &'r T>,
    cells: impl Fn(&'r T) -> &'r [Value],
    stall: Duration,
) -> Result<u64> {
    // One step of the COPY, given up after `stall` without an answer.
    async fn step<T>(
        stall: Duration,
        work: impl std::future::Future<Output = std::result::Result<T, sqlx::Error>>,
        target: &str,
        what: &str,
    ) -> Result<T> {
        tokio::time::timeout(stall, work)
            .await
            .map_err(|_| SinkError::CopyStalled {
                target: target.to_string(),
                step: what.to_string(),
                seconds: stall.as_secs_f64(),
            })?
            .context(|| format!("{what} COPY into {target}"))
    }
    let statement = format!("COPY {target} FROM STDIN (FORMAT binary)");
    let mut copy = step(stall, conn.copy_in_raw(&statement), target, "starting").await?;
    let mut encoder = CopyEncoder::new(columns);
    for item in items {
        encoder.row(cells(item));
        if encoder.buffered() >= COPY_CHUNK {
            step(
                stall,
                copy.send(encoder.take_chunk()),
                target,
                "sending data of",
            )
            .await?;
        }
    }
    step(
        stall,
        copy.send(encoder.finish()),
        target,
        "sending data of",
    )
    .await?;
    step(stall, copy.finish(), target, "finishing").await
}

/// Run `indexes.sql` and ANALYZE the tables, in one transaction: a crash leaves no half-built index.
/// With `single_core`, without parallel workers: the throttle's choice while production suffers.
pub async fn build_indexes(
    conn: &mut PgConnection,
    build: BuildTables<'_>,
    sql: &SchemaSql,
    single_core: bool,
) -> Result<()> {
    let mut tx = conn
        .begin()
        .await
        .context(|| "starting the index build".into())?;
    if single_core {
        sqlx::query("SET LOCAL max_parallel_maintenance_workers = 0")
            .execute(&mut *tx)
            .await
            .context(|| "limiting the index build to one core".into())?;
    }
    sqlx::raw_sql(&format!(
        "SET LOCAL search_path TO {};",
        quote_ident(build.schema)
    ))
    .execute(&mut *tx)
    .await
    .context(|| "setting the search path".into())?;
    // A load that spilled indexed the keys for its upserts; indexes.sql declares the real ones.
    for spec in build.specs {
        for table in clocks::keyed_tables(spec) {
            sqlx::query(&format!(
                "DROP INDEX IF EXISTS {}",
                qualified(build.schema, &super::spill::spill_index_name(&table))
            ))
            .execute(&mut *tx)
            .await
            .context(|| format!("dropping the spill index of {table}"))?;
        }
    }
    sqlx::raw_sql(&sql.indexes)
        .execute(&mut *tx)
        .await
        .context(|| {
            format!(
                "running indexes.sql of {} v{} in schema {}",
                build.projection, build.version, build.schema
            )
        })?;
    for spec in build.specs {
        let table = qualified(build.schema, spec.name);
        sqlx::query(&format!("ANALYZE {table}"))
            .execute(&mut *tx)
            .await
            .context(|| format!("analyzing {table}"))?;
        if spec.gathers_partitions() {
            clocks::add_key(&mut tx, build.schema, spec).await?;
        }
    }
    catalog::set_phase(&mut tx, build.build_id, catalog::Phase::CatchingUp).await?;
    tx.commit()
        .await
        .context(|| format!("committing the indexes of {}", build.schema))
}

/// One build's share of an incremental batch.
pub struct BuildBatch<'a> {
    pub tables: BuildTables<'a>,
    pub changes: &'a ChangeLog,
    /// Bad records passed over in this batch, stored with it.
    pub dead_letters: &'a [super::dead_letters::NewDeadLetter<'a>],
    /// Where the build's positions stand now, and where they move to when this batch commits.
    pub expected: &'a Positions,
    pub next: &'a Positions,
    pub log_end: &'a Positions,
}

/// Applies incremental batches over one dedicated connection, which keeps its staging tables.
pub struct BatchWriter {
    conn: PgConnection,
    staging: HashSet<String>,
    backend_pid: i32,
    /// What its last transactions committed (see [`KnownRows`]).
    known: KnownRows,
    /// Other processes write the same builds, each its own partitions (`run --shared`).
    shared: bool,
}

impl BatchWriter {
    pub async fn connect(database_url: &str) -> Result<BatchWriter> {
        let mut conn = PgConnection::connect(database_url)
            .await
            .context(|| "connecting the batch writer".into())?;
        let backend_pid = sqlx::query_scalar("SELECT pg_backend_pid()")
            .fetch_one(&mut conn)
            .await
            .context(|| "reading the batch writer's backend".into())?;
        Ok(BatchWriter {
            conn,
            staging: HashSet::new(),
            backend_pid,
            known: KnownRows::new(DEFAULT_KNOWN_ROWS_BYTES),
            shared: false,
        })
    }

    /// Write builds that other processes write too, each following its own partitions: rows of
    /// per-aggregate tables are still this writer's alone (one partition feeds each), but a row
    /// that gathers partitions may have changed since this writer last wrote it, so it is read
    /// again every batch, under the build's merge lock, which the other writers take too.
    pub fn shared_with_other_processes(mut self) -> BatchWriter {
        self.shared = true;
        self
    }

    /// Keep about `bytes` of committed rows for the next batches instead of the default (0: read
    /// every row a batch touches from the database).
    pub fn keeping_known_rows(mut self, bytes: usize) -> BatchWriter {
        self.known = KnownRows::new(bytes);
        self
    }

    /// The server process behind the writer's connection: what [`stop_backend`] stops.
    pub fn backend_pid(&self) -> i32 {
        self.backend_pid
    }

    pub async fn dead_letter_count(&mut self, build_id: i64) -> Result<u64> {
        super::dead_letters::count(&mut self.conn, build_id).await
    }

    /// Apply one retried dead letter's changes to a build, out of log order, and mark the letter
    /// resolved, in one transaction. Positions do not move: the record was passed over long ago.
    pub async fn apply_retried(
        &mut self,
        tables: BuildTables<'_>,
        changes: &ChangeLog,
        dead_letter_id: i64,
    ) -> Result<u64> {
        let mut tx = self
            .conn
            .begin()
            .await
            .context(|| format!("starting the retry of dead letter {dead_letter_id}"))?;
        let (written, store) = write_changes(
            &mut tx,
            &mut self.staging,
            tables,
            changes,
            &mut self.known,
            self.shared,
        )
        .await?;
        super::dead_letters::mark_retried(&mut tx, dead_letter_id, None).await?;
        commit(tx, &mut self.known, tables.build_id, store, || {
            format!("committing the retry of dead letter {dead_letter_id}")
        })
        .await?;
        Ok(written)
    }

    /// Apply one build's changes and advance its positions, in one transaction. Returns the rows
    /// written (upserted or deleted). On error nothing is applied and the batch may be retried.
    pub async fn apply(&mut self, batch: &BuildBatch<'_>) -> Result<u64> {
        let mut tx = self
            .conn
            .begin()
            .await
            .context(|| "starting a batch".into())?;
        let (written, store) = write_changes(
            &mut tx,
            &mut self.staging,
            batch.tables,
            batch.changes,
            &mut self.known,
            self.shared,
        )
        .await?;
        if !batch.dead_letters.is_empty() {
            super::dead_letters::insert(
                &mut tx,
                batch.tables.build_id,
                batch.tables.projection,
                batch.dead_letters,
            )
            .await?;
        }
        catalog::advance_positions(
            &mut tx,
            batch.tables.build_id,
            batch.expected,
            batch.next,
            batch.log_end,
        )
        .await?;
        commit(tx, &mut self.known, batch.tables.build_id, store, || {
            "committing a batch".into()
        })
        .await?;
        Ok(written)
    }
}

/// Commit a batch writer's transaction, then keep what it wrote as known. A commit that fails may
/// still have gone through: then nothing is known any more.
async fn commit(
    tx: sqlx::Transaction<'_, sqlx::Postgres>,
    known: &mut KnownRows,
    build_id: i64,
    written: RowStore,
    what: impl FnOnce() -> String,
) -> Result<()> {
    if let Err(e) = tx.commit().await {
        known.clear();
        return Err(e).context(what);
    }
    known.remember(build_id, written);
    Ok(())
}

/// How long [`stop_backend`] waits for a stopped writer's server process to be gone.
const BACKEND_GONE_WITHIN: Duration = Duration::from_secs(30);

/// Stop a writer's transaction where it stands, from another connection, and return once its
/// server process is gone: whatever the transaction did is then either committed (its commit was
/// under way) or rolled back, and the catalog's positions tell which. Used to cut a batch short
/// when the throttle holds writes in the middle of it (a statement cannot be interrupted from the
/// connection that runs it, and between statements a cancel request would be ignored).
pub async fn stop_backend(pool: &sqlx::PgPool, pid: i32) -> Result<()> {
    sqlx::query("SELECT pg_terminate_backend($1)")
        .bind(pid)
        .execute(pool)
        .await
        .context(|| format!("stopping the batch writer's server process {pid}"))?;
    let started = std::time::Instant::now();
    loop {
        let there: bool =
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_stat_activity WHERE pid = $1)")
                .bind(pid)
                .fetch_one(pool)
                .await
                .context(|| {
                    format!("waiting for the batch writer's server process {pid} to end")
                })?;
        if !there {
            return Ok(());
        }
        if started.elapsed() >= BACKEND_GONE_WITHIN {
            return Err(SinkError::Invalid(format!(
                "the batch writer's server process {pid} was told to stop and is still there after {} s: \
                 whether its last batch committed cannot be told yet; stopping here (the positions in the catalog \
                 say where a restart reads from)",
                BACKEND_GONE_WITHIN.as_secs()
            )));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Fold `changes` into the current rows of the keys they touch and write the results back, in the
/// caller's transaction. `staging` is which staging tables the connection has created. Rows in
/// `known` are taken from there instead of read; the folded rows are returned, for `known` once the
/// transaction has committed. `shared`: other processes write these tables too (see
/// [`BatchWriter::shared_with_other_processes`]).
async fn write_changes(
    tx: &mut PgConnection,
    staging: &mut HashSet<String>,
    tables: BuildTables<'_>,
    changes: &ChangeLog,
    known: &mut KnownRows,
    shared: bool,
) -> Result<(u64, RowStore)> {
    let mut store = RowStore::new(tables.specs.len());
    let mut absent: Vec<Option<Absent>> = (0..tables.specs.len()).map(|_| None).collect();
    let touched: Vec<Vec<Vec<Value>>> = tables
        .specs
        .iter()
        .enumerate()
        .map(|(index, spec)| touched_keys(spec, index, changes))
        .collect();
    let gathers = tables
        .specs
        .iter()
        .zip(&touched)
        .any(|(spec, keys)| spec.gathers_partitions() && !keys.is_empty());
    if shared && gathers {
        // Before anything is read or written: a writer holding a row lock never waits for this.
        super::merge::take_turn(tx, tables.build_id, tables.schema).await?;
    }
    for ((index, spec), keys) in tables.specs.iter().enumerate().zip(touched) {
        if keys.is_empty() {
            continue;
        }
        // Another process may have written a row that gathers partitions since this one did.
        let trust_known = !(shared && spec.gathers_partitions());
        let names = StagingNames::new(tables.build_id, index);
        if !staging.contains(&names.keys) {
            create_staging(tx, tables.schema, spec, &names).await?;
            staging.insert(names.keys.clone());
        }
        let rows = store.table_mut(index);
        let mut table_absent = Absent::default();
        let mut unknown = Vec::new();
        for key in keys {
            let cached = if trust_known {
                known.take(tables.build_id, index, &key)
            } else {
                None
            };
            match cached {
                Some(row) => {
                    if let Some(clock) = row.clock {
                        rows.seed_clock(key.as_slice(), clock);
                    }
                    if row.row.is_none() {
                        table_absent.rows.insert(Key::from(key.as_slice()));
                    }
                    rows.seed(key, row.row);
                }
                None => unknown.push(key),
            }
        }
        if !unknown.is_empty() {
            load_current_rows(tx, tables.schema, spec, &names, &unknown, rows).await?;
            // Read in this transaction, under the writer lock: what is not there now is not there
            // when the batch writes.
            for key in &unknown {
                if matches!(rows.get(key), Some(None)) {
                    table_absent.rows.insert(Key::from(key.as_slice()));
                }
                if spec.gathers_partitions() && !rows.has_clock(key) {
                    table_absent.clocks.insert(Key::from(key.as_slice()));
                }
            }
        }
        absent[index] = Some(table_absent);
    }
    // In log order across tables, each change at its event's logical time.
    for (at, change) in changes.iter() {
        store.apply(tables.specs, change.clone(), at).map_err(|e| {
            SinkError::Invalid(format!(
                "projection {} v{}: {e}",
                tables.projection, tables.version
            ))
        })?;
    }
    let mut written = 0;
    for (index, spec) in tables.specs.iter().enumerate() {
        if let Some(absent) = &absent[index] {
            let names = StagingNames::new(tables.build_id, index);
            written += write_back(tx, tables.schema, spec, &names, &store, index, absent).await?;
        }
        if shared && spec.gathers_partitions() {
            // Never taken from `known` (above): not worth remembering either.
            *store.table_mut(index) = Default::default();
        }
    }
    Ok((written, store))
}

/// Keys a batch knows its table does not hold, from the rows it read in its own transaction or
/// knew from its writer's last commits: their rows (and, for a table that gathers partitions,
/// their clocks) go in with a plain COPY instead of through staging and an upsert, and a row the
/// fold removed that was never there is not deleted. A key not listed is upserted, which is right
/// whether or not the table holds it.
#[derive(Default)]
pub(super) struct Absent {
    pub(super) rows: FxHashSet<Key>,
    pub(super) clocks: FxHashSet<Key>,
}

pub(super) struct StagingNames {
    pub(super) keys: String,
    pub(super) rows: String,
    /// For a table that gathers partitions: its row clocks.
    pub(super) clocks: String,
}

impl StagingNames {
    pub(super) fn new(build_id: i64, table: usize) -> StagingNames {
        StagingNames {
            keys: format!("rp_keys_{build_id}_{table}"),
            rows: format!("rp_rows_{build_id}_{table}"),
            clocks: clocks::staging_name(build_id, table),
        }
    }
}

/// Session temp tables that empty themselves at every commit: the keys a batch touches, and the rows
/// it writes back.
pub(super) async fn create_staging(
    conn: &mut PgConnection,
    schema: &str,
    spec: &TableSpec,
    names: &StagingNames,
) -> Result<()> {
    let target = qualified(schema, spec.name);
    let key_columns = key_list(spec, None);
    sqlx::raw_sql(&format!(
        "CREATE TEMP TABLE IF NOT EXISTS {keys} ON COMMIT DELETE ROWS AS SELECT {key_columns} FROM {target} WITH NO DATA;
         CREATE TEMP TABLE IF NOT EXISTS {rows} (LIKE {target}) ON COMMIT DELETE ROWS;",
        keys = quote_ident(&names.keys),
        rows = quote_ident(&names.rows),
    ))
    .execute(&mut *conn)
    .await
    .context(|| format!("creating staging tables for {target}"))?;
    if spec.gathers_partitions() {
        clocks::create_staging(conn, schema, spec, &names.clocks).await?;
    }
    Ok(())
}

pub(super) fn key_list(spec: &TableSpec, alias: Option<&str>) -> String {
    spec.key_columns()
        .iter()
        .map(|c| match alias {
            Some(a) => format!("{a}.{}", quote_ident(c.name)),
            None => quote_ident(c.name),
        })
        .collect::<Vec<_>>()
        .join(", ")
}

pub(super) fn key_match(spec: &TableSpec, left: &str, right: &str) -> String {
    spec.key_columns()
        .iter()
        .map(|c| format!("{left}.{col} = {right}.{col}", col = quote_ident(c.name)))
        .collect::<Vec<_>>()
        .join(" AND ")
}

/// The keys of table `index` that `changes` touch, each once.
fn touched_keys(spec: &TableSpec, index: usize, changes: &ChangeLog) -> Vec<Vec<Value>> {
    let mut seen: FxHashSet<&[Value]> = FxHashSet::default();
    let mut keys = Vec::new();
    for change in changes.changes().iter().filter(|c| c.table() == index) {
        let key = change.key(spec.key_len);
        if seen.insert(key) {
            keys.push(key.to_vec());
        }
    }
    keys
}

/// Seed the fold with what the table holds for every touched key (or that it holds nothing), and for
/// a table that gathers partitions, with the keys' clocks.
pub(super) async fn load_current_rows(
    conn: &mut PgConnection,
    schema: &str,
    spec: &TableSpec,
    names: &StagingNames,
    keys: &[Vec<Value>],
    rows: &mut crate::projection::TableRows,
) -> Result<()> {
    let target = qualified(schema, spec.name);
    let current = rows_by_key(conn, &target, &names.keys, spec, keys).await?;
    for key in keys {
        rows.seed(key.as_slice(), None);
    }
    for row in current {
        let key = crate::projection::Key::from(&row[..spec.key_len]);
        rows.seed(key, Some(row));
    }
    if spec.gathers_partitions() {
        clocks::read(conn, schema, spec, &names.keys, keys.len(), rows).await?;
    }
    Ok(())
}

/// Key tables of at most this many keys are analyzed before they are joined (above it the planner's
/// guess of a large table is right enough, and ANALYZE's cost grows: 60 ms for 30k keys).
const ANALYZE_KEYS_UP_TO: usize = 5_000;

/// Keys are looked up one by one in the table's key index when they are at most this share of its
/// rows; more, and one pass over the table costs less.
const LOOK_UP_KEYS_BELOW_SHARE: f64 = 1.0 / 8.0;

/// Where a batch's rows (or clocks) are read from: `target` (alias `alias`) joined with the temp
/// table `keys_table` of `keys` keys. When the keys are few against the table, one index look-up
/// per key, whatever the planner thinks: with its default costs (random_page_cost 4) it reads a
/// whole table of 300k rows to find 2,500 keys (105 ms, where 2,500 look-ups take ~20 ms), and the
/// gap grows with the table while the batch stays the same.
pub(super) async fn rows_of_keys(
    conn: &mut PgConnection,
    target: &str,
    alias: &str,
    keys_table: &str,
    spec: &TableSpec,
    keys: usize,
) -> Result<RowsOfKeys> {
    let rows: Option<f32> =
        sqlx::query_scalar("SELECT reltuples FROM pg_class WHERE oid = to_regclass($1)")
            .bind(target)
            .fetch_optional(&mut *conn)
            .await
            .context(|| format!("reading the size of {target}"))?;
    let keys_table = quote_ident(keys_table);
    let on = key_match(spec, alias, "k");
    // reltuples is -1 before the first ANALYZE, 0 for a view: then the planner decides.
    Ok(match rows {
        Some(rows) if rows > 0.0 && (keys as f64) < rows as f64 * LOOK_UP_KEYS_BELOW_SHARE => {
            RowsOfKeys {
                // LIMIT 1 (a key has one row) keeps the planner from flattening the look-up into
                // a join.
                sql: format!("{keys_table} k CROSS JOIN LATERAL (SELECT * FROM {target} {alias} WHERE {on} LIMIT 1) {alias}"),
                joined: false,
            }
        }
        _ => RowsOfKeys {
            sql: format!("{target} {alias} JOIN {keys_table} k ON {on}"),
            joined: true,
        },
    })
}

/// The FROM clause [`rows_of_keys`] chose, and whether it leaves the plan to the planner.
pub(super) struct RowsOfKeys {
    pub(super) sql: String,
    pub(super) joined: bool,
}

/// The rows of `target` (a quoted table or view with `spec`'s columns) whose keys are in `keys`, read
/// with binary COPY through `keys_table`, a temp table of the key columns that is emptied on commit.
pub async fn rows_by_key(
    conn: &mut PgConnection,
    target: &str,
    keys_table: &str,
    spec: &TableSpec,
    keys: &[Vec<Value>],
) -> Result<Vec<Vec<Value>>> {
    copy_into(
        conn,
        &quote_ident(keys_table),
        spec.key_len,
        keys.iter(),
        |k| k.as_slice(),
    )
    .await?;
    let from = rows_of_keys(conn, target, "t", keys_table, spec, keys.len()).await?;
    if from.joined && keys.len() <= ANALYZE_KEYS_UP_TO {
        // A temp table has no statistics: the planner guesses ~1,400 keys and, against a table of
        // 100k rows, reads all of it in key order (a merge join: 170 ms for 300 keys, where 300
        // index look-ups take 9 ms). With its statistics (ANALYZE of 300 keys: ~1 ms) it looks the
        // few keys up, and still scans for many. Keys looked up one by one need no plan.
        sqlx::query(&format!("ANALYZE {}", quote_ident(keys_table)))
            .execute(&mut *conn)
            .await
            .context(|| format!("analyzing the keys read from {target}"))?;
    }
    let columns = spec
        .columns
        .iter()
        .map(|c| format!("t.{}", quote_ident(c.name)))
        .collect::<Vec<_>>()
        .join(", ");
    let from = from.sql;
    let statement = format!("COPY (SELECT {columns} FROM {from}) TO STDOUT (FORMAT binary)");
    let chunks: Vec<bytes::Bytes> = conn
        .copy_out_raw(&statement)
        .await
        .context(|| format!("reading rows of {target}"))?
        .try_collect()
        .await
        .context(|| format!("reading rows of {target}"))?;
    let types: Vec<_> = spec.columns.iter().map(|c| c.ty).collect();
    Ok(decode_rows(&chunks.concat(), &types)?)
}

/// A temp table for [`rows_by_key`] with `target`'s key columns, dropped at commit.
pub async fn create_key_table(
    conn: &mut PgConnection,
    target: &str,
    keys_table: &str,
    spec: &TableSpec,
) -> Result<()> {
    sqlx::query(&format!(
        "CREATE TEMP TABLE {keys} ON COMMIT DROP AS SELECT {key_columns} FROM {target} WITH NO DATA",
        keys = quote_ident(keys_table),
        key_columns = key_list(spec, None),
    ))
    .execute(conn)
    .await
    .context(|| format!("creating a key table for {target}"))?;
    Ok(())
}

/// Write table `index`'s rows of `store` back, in the caller's transaction: delete what the fold
/// removed, COPY the rows of keys `absent` says the table does not hold, upsert the others.
/// Returns the rows written.
pub(super) async fn write_back(
    conn: &mut PgConnection,
    schema: &str,
    spec: &TableSpec,
    names: &StagingNames,
    store: &RowStore,
    index: usize,
    absent: &Absent,
) -> Result<u64> {
    let target = qualified(schema, spec.name);
    let rows = store.table(index);
    if spec.gathers_partitions() {
        clocks::write_back(conn, schema, spec, &names.clocks, rows, &absent.clocks).await?;
    }
    let mut written = 0;
    let mut removed: Vec<&Key> = Vec::new();
    let mut new: Vec<&Vec<Value>> = Vec::new();
    let mut changed: Vec<&Vec<Value>> = Vec::new();
    for (key, row) in rows.entries() {
        let was_absent = absent.rows.contains(key.as_slice());
        match row {
            // The fold removed it, or found none: only a row that is there needs deleting.
            None if !was_absent => removed.push(key),
            None => {}
            Some(row) if was_absent => new.push(row),
            Some(row) => changed.push(row),
        }
    }
    if !removed.is_empty() {
        // The keys table may hold the keys this batch read: only the removed ones go in it now.
        let keys = quote_ident(&names.keys);
        sqlx::query(&format!("DELETE FROM {keys}"))
            .execute(&mut *conn)
            .await
            .context(|| format!("emptying {keys}"))?;
        copy_into(conn, &keys, spec.key_len, removed.into_iter(), |k| {
            k.as_slice()
        })
        .await?;
        let deleted = sqlx::query(&format!(
            "DELETE FROM {target} t USING {keys} k WHERE {on}",
            on = key_match(spec, "t", "k"),
        ))
        .execute(&mut *conn)
        .await
        .context(|| format!("deleting rows from {target}"))?;
        written += deleted.rows_affected();
    }
    let updated: Vec<&str> = spec.columns[spec.key_len..]
        .iter()
        .map(|c| c.name)
        .collect();
    let staged = UpsertThrough {
        staging: &names.rows,
        keys: &key_list(spec, None),
        updated: &updated,
        what: "rows",
    };
    Ok(written + copy_or_upsert(conn, &target, spec.columns.len(), &new, &changed, staged).await?)
}

/// How [`copy_or_upsert`] upserts: through which staging table, on which key columns (a
/// [`key_list`]), replacing which columns (none: an existing row is kept), and what the rows are,
/// for errors.
pub(super) struct UpsertThrough<'a> {
    pub(super) staging: &'a str,
    pub(super) keys: &'a str,
    pub(super) updated: &'a [&'a str],
    pub(super) what: &'a str,
}

/// Write rows of `columns` columns into `target` (qualified): `new` ones, of keys the table is
/// known not to hold, with a plain COPY; `changed` ones COPYed into the staging table and then
/// upserted. Returns the rows written.
pub(super) async fn copy_or_upsert<R: AsRef<[Value]>>(
    conn: &mut PgConnection,
    target: &str,
    columns: usize,
    new: &[R],
    changed: &[R],
    through: UpsertThrough<'_>,
) -> Result<u64> {
    let mut written = 0;
    if !new.is_empty() {
        written += copy_into(conn, target, columns, new.iter(), |r| r.as_ref()).await?;
    }
    if changed.is_empty() {
        return Ok(written);
    }
    let staged = quote_ident(through.staging);
    copy_into(conn, &staged, columns, changed.iter(), |r| r.as_ref()).await?;
    let on_conflict = if through.updated.is_empty() {
        "DO NOTHING".to_string()
    } else {
        let updates: Vec<String> = through
            .updated
            .iter()
            .map(|c| format!("{col} = EXCLUDED.{col}", col = quote_ident(c)))
            .collect();
        format!("DO UPDATE SET {}", updates.join(", "))
    };
    let upserted = sqlx::query(&format!(
        "INSERT INTO {target} SELECT * FROM {staged} ON CONFLICT ({keys}) {on_conflict}",
        keys = through.keys,
    ))
    .execute(&mut *conn)
    .await
    .context(|| format!("upserting {} into {target}", through.what))?;
    Ok(written + upserted.rows_affected())
}
