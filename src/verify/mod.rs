//! Verification: compare two builds of a projection table by table, in one database snapshot, before
//! the candidate goes live. Owns the comparison queries, the report and the verdict against the
//! configured thresholds; lining the builds up at the same log position is the engine's job
//! (`engine::verify`), since it means catching one of them up.
//!
//! What is compared, per table: row counts; per bucket (day or month of the time column the table
//! declares) the row count, an order-independent checksum of the rows and the sum of every numeric
//! column; rows whose key is on one side only; rows whose key is on both sides but whose values
//! differ, counted per column; and a random sample of keys compared column by column, which gives
//! the examples. Only columns present on both sides are compared (a new version may add or drop
//! some); those are listed.
//!
//! Everything runs in one REPEATABLE READ transaction that also reads both builds' positions, and a
//! build's rows and positions commit together, so the positions reported are exactly those of the
//! rows compared.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use sqlx::{Connection, PgConnection, Row};

mod render;

use crate::projection::TableSpec;
use crate::sink::catalog::{read_positions, Positions};
use crate::sink::{qualified, quote_ident, Build, Context, Result};

/// Bucket rows by the day or the month of the table's declared time column.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BucketBy {
    #[default]
    Day,
    Month,
}

impl BucketBy {
    fn unit(self) -> &'static str {
        match self {
            BucketBy::Day => "day",
            BucketBy::Month => "month",
        }
    }
}

/// What to compare and how much.
#[derive(Clone, Debug)]
pub struct CompareRequest<'a> {
    pub projection: &'a str,
    pub candidate: &'a Build,
    pub baseline: &'a Build,
    /// The candidate's tables (this binary's code); the baseline's are read from the database.
    pub specs: &'a [TableSpec],
    pub bucket_by: BucketBy,
    /// Keys sampled for the column-by-column comparison.
    pub sample_keys: usize,
    pub seed: i64,
}

#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct BuildRef {
    pub build_id: i64,
    pub version: u32,
    pub phase: String,
    pub schema: String,
    /// Events up to these positions are in the rows compared.
    pub positions: Positions,
}

impl BuildRef {
    fn of(build: &Build, positions: Positions) -> BuildRef {
        BuildRef {
            build_id: build.build_id,
            version: build.version,
            phase: build.phase.as_str().to_string(),
            schema: build.schema_name.clone(),
            positions,
        }
    }
}

/// The comparison of two builds, table by table.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Comparison {
    pub projection: String,
    pub candidate: BuildRef,
    pub baseline: BuildRef,
    /// Both builds hold exactly the same events (equal positions on every partition).
    pub same_position: bool,
    pub tables: Vec<TableComparison>,
    pub seed: i64,
}

#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct TableComparison {
    pub table: String,
    pub rows_baseline: i64,
    pub rows_candidate: i64,
    /// Compared columns, and columns found on one side only (not compared).
    pub columns_compared: Vec<String>,
    pub columns_only_in_baseline: Vec<String>,
    pub columns_only_in_candidate: Vec<String>,
    /// None when the key columns are not on both sides: then only counts and buckets are compared.
    pub keys: Option<KeyComparison>,
    pub bucket_column: Option<String>,
    pub buckets_compared: usize,
    /// Buckets that differ in rows, checksum or a numeric sum; at most [`MAX_BUCKETS_LISTED`].
    pub buckets_differing: Vec<BucketDifference>,
    pub buckets_differing_count: usize,
}

#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct KeyComparison {
    pub only_in_baseline: i64,
    pub only_in_candidate: i64,
    pub examples_only_in_baseline: Vec<String>,
    pub examples_only_in_candidate: Vec<String>,
    /// Rows with the key on both sides and at least one compared column different.
    pub rows_differing: i64,
    /// Per compared column, how many rows differ in it (columns with no difference left out).
    pub columns: Vec<ColumnDifference>,
    pub sample: SampleComparison,
}

#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct ColumnDifference {
    pub column: String,
    pub rows: i64,
    /// From the sample: key, baseline value, candidate value.
    pub examples: Vec<ValueDifference>,
}

#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct ValueDifference {
    pub key: String,
    pub baseline: Option<String>,
    pub candidate: Option<String>,
}

#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct SampleComparison {
    pub keys: usize,
    pub differing: usize,
    pub only_one_side: usize,
}

#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct BucketDifference {
    /// The bucket's start (`2024-03-01`), or `(none)` for rows without a time.
    pub bucket: String,
    pub rows_baseline: i64,
    pub rows_candidate: i64,
    pub checksum_equal: bool,
    /// Numeric columns whose sums differ: column, baseline sum, candidate sum.
    pub sums: Vec<(String, String, String)>,
}

pub const MAX_BUCKETS_LISTED: usize = 20;
const MAX_EXAMPLES: usize = 3;
const MAX_ONE_SIDE_EXAMPLES: i64 = 5;

impl TableComparison {
    /// Rows that are not the same on both sides: on one side only, or with different values. When
    /// keys cannot be matched, the difference in row counts plus the rows of buckets that differ.
    pub fn rows_differing(&self) -> i64 {
        match &self.keys {
            Some(k) => k.only_in_baseline + k.only_in_candidate + k.rows_differing,
            None => {
                let bucket_rows: i64 = self
                    .buckets_differing
                    .iter()
                    .map(|b| b.rows_baseline.max(b.rows_candidate))
                    .sum();
                (self.rows_baseline - self.rows_candidate)
                    .abs()
                    .max(bucket_rows)
            }
        }
    }
}

impl Comparison {
    pub fn rows_differing(&self) -> i64 {
        self.tables.iter().map(|t| t.rows_differing()).sum()
    }

    /// Events one build holds that the other does not, summed over partitions.
    pub fn position_gap(&self) -> i64 {
        let mut gap = 0;
        let parts: std::collections::BTreeSet<_> = self
            .candidate
            .positions
            .keys()
            .chain(self.baseline.positions.keys())
            .collect();
        for p in parts {
            let a = self.candidate.positions.get(p).copied().unwrap_or(0);
            let b = self.baseline.positions.get(p).copied().unwrap_or(0);
            gap += (a - b).abs();
        }
        gap
    }
}

/// Compare the two builds in one snapshot.
pub async fn compare(conn: &mut PgConnection, request: &CompareRequest<'_>) -> Result<Comparison> {
    let mut tx = conn
        .begin()
        .await
        .context(|| format!("verify {}: starting a transaction", request.projection))?;
    // One snapshot for positions and every table; UTC so that day buckets do not depend on the
    // session's time zone.
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        .execute(&mut *tx)
        .await
        .context(|| format!("verify {}: setting the snapshot", request.projection))?;
    sqlx::query("SET LOCAL TimeZone = 'UTC'")
        .execute(&mut *tx)
        .await
        .context(|| format!("verify {}: setting the time zone", request.projection))?;
    let candidate_positions = read_positions(&mut *tx, request.candidate.build_id).await?;
    let baseline_positions = read_positions(&mut *tx, request.baseline.build_id).await?;
    let mut comparison = Comparison {
        projection: request.projection.to_string(),
        same_position: candidate_positions == baseline_positions,
        candidate: BuildRef::of(request.candidate, candidate_positions),
        baseline: BuildRef::of(request.baseline, baseline_positions),
        tables: Vec::new(),
        seed: request.seed,
    };
    for spec in request.specs {
        let table = compare_table(&mut tx, request, spec).await?;
        comparison.tables.push(table);
    }
    tx.rollback()
        .await
        .context(|| format!("verify {}: ending the snapshot", request.projection))?;
    Ok(comparison)
}

/// A table's columns and their types, in table order. Empty when the table does not exist.
async fn columns(
    conn: &mut PgConnection,
    schema: &str,
    table: &str,
) -> Result<Vec<(String, String)>> {
    let rows = sqlx::query(
        "SELECT column_name::text, data_type::text FROM information_schema.columns
         WHERE table_schema = $1 AND table_name = $2 ORDER BY ordinal_position",
    )
    .bind(schema)
    .bind(table)
    .fetch_all(&mut *conn)
    .await
    .context(|| format!("verify: reading the columns of {schema}.{table}"))?;
    rows.iter()
        .map(|r| {
            Ok((
                r.try_get(0).context(|| "columns".into())?,
                r.try_get(1).context(|| "columns".into())?,
            ))
        })
        .collect()
}

fn is_numeric(data_type: &str) -> bool {
    matches!(
        data_type,
        "smallint" | "integer" | "bigint" | "numeric" | "real" | "double precision"
    )
}

/// `ROW(a."x", a."y")::text`: a row's text, the same for equal values whatever the column types.
fn row_text(alias: &str, columns: &[String]) -> String {
    let list: Vec<String> = columns
        .iter()
        .map(|c| format!("{alias}.{}", quote_ident(c)))
        .collect();
    format!("ROW({})::text", list.join(", "))
}

async fn compare_table(
    conn: &mut PgConnection,
    request: &CompareRequest<'_>,
    spec: &TableSpec,
) -> Result<TableComparison> {
    let pair = Pair::new(request, spec);
    let (base_table, cand_table) = (&pair.baseline, &pair.candidate);
    let where_ = || pair.whence();
    let base_cols = columns(conn, &request.baseline.schema_name, spec.name).await?;
    let cand_cols = columns(conn, &request.candidate.schema_name, spec.name).await?;
    let mut out = TableComparison {
        table: spec.name.to_string(),
        ..Default::default()
    };
    if cand_cols.is_empty() {
        return Err(crate::sink::SinkError::Invalid(format!(
            "{}: the candidate has no table {}.{}",
            where_(),
            request.candidate.schema_name,
            spec.name
        )));
    }
    let common: Vec<(String, String)> = cand_cols
        .iter()
        .filter(|(name, _)| base_cols.iter().any(|(b, _)| b == name))
        .cloned()
        .collect();
    out.columns_compared = common.iter().map(|(n, _)| n.clone()).collect();
    out.columns_only_in_candidate = cand_cols
        .iter()
        .filter(|(n, _)| !out.columns_compared.contains(n))
        .map(|(n, _)| n.clone())
        .collect();
    out.columns_only_in_baseline = base_cols
        .iter()
        .filter(|(n, _)| !out.columns_compared.contains(n))
        .map(|(n, _)| n.clone())
        .collect();

    for (side, table) in [(0, base_table), (1, cand_table)] {
        if side == 0 && base_cols.is_empty() {
            continue;
        }
        let n: i64 = sqlx::query_scalar(&format!("SELECT count(*) FROM {table}"))
            .fetch_one(&mut *conn)
            .await
            .context(|| format!("{}: counting rows", where_()))?;
        if side == 0 {
            out.rows_baseline = n;
        } else {
            out.rows_candidate = n;
        }
    }
    if base_cols.is_empty() {
        return Ok(out);
    }

    compare_buckets(conn, &pair, &common, &mut out).await?;
    let names = &out.columns_compared;
    let key_cols: Vec<String> = spec
        .key_columns()
        .iter()
        .map(|c| c.name.to_string())
        .collect();
    if !key_cols.iter().all(|k| names.contains(k)) {
        return Ok(out);
    }
    let keyed = KeyedColumns {
        values: names
            .iter()
            .filter(|n| !key_cols.contains(n))
            .cloned()
            .collect(),
        keys: key_cols,
    };
    let mut keys = compare_keys(conn, &pair, &keyed).await?;
    if request.sample_keys > 0 {
        compare_sample(conn, &pair, &keyed, &mut keys).await?;
    }
    out.keys = Some(keys);
    Ok(out)
}

/// One table of both builds, as the comparison's queries name it.
struct Pair<'a> {
    request: &'a CompareRequest<'a>,
    spec: &'a TableSpec,
    baseline: String,
    candidate: String,
}

impl<'a> Pair<'a> {
    fn new(request: &'a CompareRequest<'a>, spec: &'a TableSpec) -> Pair<'a> {
        Pair {
            request,
            spec,
            baseline: qualified(&request.baseline.schema_name, spec.name),
            candidate: qualified(&request.candidate.schema_name, spec.name),
        }
    }

    /// Where a failing query was, for its error.
    fn whence(&self) -> String {
        format!(
            "verify {}: table {} (build {} against build {})",
            self.request.projection,
            self.spec.name,
            self.request.candidate.build_id,
            self.request.baseline.build_id
        )
    }
}

/// A table's key columns (all on both sides) and its other compared columns, with the SQL that
/// joins and shows rows by key.
struct KeyedColumns {
    keys: Vec<String>,
    values: Vec<String>,
}

impl KeyedColumns {
    /// `l.k1 = r.k1 AND ...`
    fn on(&self, l: &str, r: &str) -> String {
        self.keys
            .iter()
            .map(|k| format!("{l}.{q} = {r}.{q}", q = quote_ident(k)))
            .collect::<Vec<_>>()
            .join(" AND ")
    }

    fn first_key(&self) -> String {
        quote_ident(&self.keys[0])
    }

    /// The key as one text, as the report shows it.
    fn key_text(&self, alias: &str) -> String {
        if self.keys.len() == 1 {
            format!("{alias}.{}::text", self.first_key())
        } else {
            row_text(alias, &self.keys)
        }
    }

    /// `alias.k1, alias.k2`
    fn key_list(&self, alias: &str) -> String {
        self.keys
            .iter()
            .map(|k| format!("{alias}.{}", quote_ident(k)))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// Per bucket (day or month of the table's time column, or one bucket): rows, an order-independent
/// checksum of the rows and the sum of every numeric column, on both sides; the buckets that differ.
async fn compare_buckets(
    conn: &mut PgConnection,
    pair: &Pair<'_>,
    common: &[(String, String)],
    out: &mut TableComparison,
) -> Result<()> {
    let (request, spec) = (pair.request, pair.spec);
    let (base_table, cand_table) = (&pair.baseline, &pair.candidate);
    let where_ = || pair.whence();
    let names: Vec<String> = out.columns_compared.clone();
    let numeric: Vec<String> = common
        .iter()
        .filter(|(_, t)| is_numeric(t))
        .map(|(n, _)| n.clone())
        .collect();
    let bucket_col = spec
        .bucket_column
        .filter(|c| names.iter().any(|n| n == c))
        .map(str::to_string);
    out.bucket_column = bucket_col.clone();
    let bucket_expr = match &bucket_col {
        Some(c) => format!(
            "coalesce(to_char(date_trunc('{}', t.{}), 'YYYY-MM-DD'), '(none)')",
            request.bucket_by.unit(),
            quote_ident(c)
        ),
        None => "'(all rows)'".to_string(),
    };
    // Floating-point columns are summed as numeric: a float sum depends on the order the rows are
    // scanned in, and two tables with the same rows must give the same figure.
    let sums: String = common
        .iter()
        .filter(|(_, t)| is_numeric(t))
        .map(|(c, t)| {
            let cast = if matches!(t.as_str(), "real" | "double precision") {
                "::numeric"
            } else {
                ""
            };
            format!(", coalesce(sum(t.{}{cast})::text, '0')", quote_ident(c))
        })
        .collect();
    // Per bucket: rows, the rows' checksum and the sum of each numeric column.
    type Bucket = (i64, String, Vec<String>);
    let mut sides: [BTreeMap<String, Bucket>; 2] = Default::default();
    for (side, table) in [(0usize, base_table), (1, cand_table)] {
        let sql = format!(
            "SELECT {bucket_expr} AS bucket, count(*), coalesce(sum(hashtextextended({}, 0)::numeric), 0)::text{sums}
             FROM {table} t GROUP BY 1",
            row_text("t", &names)
        );
        let rows = sqlx::query(&sql)
            .fetch_all(&mut *conn)
            .await
            .context(|| format!("{}: per-bucket checksums", where_()))?;
        for r in rows {
            let bucket: String = r.try_get(0).context(where_)?;
            let count: i64 = r.try_get(1).context(where_)?;
            let checksum: String = r.try_get(2).context(where_)?;
            let mut values = Vec::with_capacity(numeric.len());
            for i in 0..numeric.len() {
                values.push(r.try_get::<String, _>(3 + i).context(where_)?);
            }
            sides[side].insert(bucket, (count, checksum, values));
        }
    }
    let all_buckets: std::collections::BTreeSet<&String> =
        sides[0].keys().chain(sides[1].keys()).collect();
    out.buckets_compared = all_buckets.len();
    let empty = (0i64, String::new(), vec!["0".to_string(); numeric.len()]);
    for bucket in all_buckets {
        let b = sides[0].get(bucket).unwrap_or(&empty);
        let c = sides[1].get(bucket).unwrap_or(&empty);
        if b == c {
            continue;
        }
        out.buckets_differing_count += 1;
        if out.buckets_differing.len() < MAX_BUCKETS_LISTED {
            out.buckets_differing.push(BucketDifference {
                bucket: bucket.clone(),
                rows_baseline: b.0,
                rows_candidate: c.0,
                checksum_equal: b.1 == c.1,
                sums: numeric
                    .iter()
                    .zip(b.2.iter().zip(&c.2))
                    .filter(|(_, (x, y))| x != y)
                    .map(|(n, (x, y))| (n.clone(), x.clone(), y.clone()))
                    .collect(),
            });
        }
    }
    Ok(())
}

/// Rows matched by key: on one side only (with examples), and, per column, rows whose values differ.
async fn compare_keys(
    conn: &mut PgConnection,
    pair: &Pair<'_>,
    keyed: &KeyedColumns,
) -> Result<KeyComparison> {
    let (base_table, cand_table) = (&pair.baseline, &pair.candidate);
    let where_ = || pair.whence();
    let value_cols = &keyed.values;
    let first_key = keyed.first_key();
    let both = format!("a.{first_key} IS NOT NULL AND b.{first_key} IS NOT NULL");
    let mut select = format!(
        "count(*) FILTER (WHERE b.{first_key} IS NULL), count(*) FILTER (WHERE a.{first_key} IS NULL), \
         count(*) FILTER (WHERE {both} AND {} IS DISTINCT FROM {})",
        row_text("a", value_cols),
        row_text("b", value_cols)
    );
    for c in value_cols {
        let q = quote_ident(c);
        write!(
            select,
            ", count(*) FILTER (WHERE {both} AND a.{q} IS DISTINCT FROM b.{q})"
        )
        .ok();
    }
    let sql = format!(
        "SELECT {select} FROM {base_table} a FULL JOIN {cand_table} b ON {}",
        keyed.on("a", "b")
    );
    let row = sqlx::query(&sql)
        .fetch_one(&mut *conn)
        .await
        .context(|| format!("{}: matching rows by key", where_()))?;
    let mut keys = KeyComparison {
        only_in_baseline: row.try_get(0).context(where_)?,
        only_in_candidate: row.try_get(1).context(where_)?,
        rows_differing: row.try_get(2).context(where_)?,
        ..Default::default()
    };
    for (i, c) in value_cols.iter().enumerate() {
        let rows: i64 = row.try_get(3 + i).context(where_)?;
        if rows > 0 {
            keys.columns.push(ColumnDifference {
                column: c.clone(),
                rows,
                examples: Vec::new(),
            });
        }
    }
    for (side, (from, other)) in [(base_table, cand_table), (cand_table, base_table)]
        .into_iter()
        .enumerate()
    {
        let count = if side == 0 {
            keys.only_in_baseline
        } else {
            keys.only_in_candidate
        };
        if count == 0 {
            continue;
        }
        let sql = format!(
            "SELECT {} FROM {from} a WHERE NOT EXISTS (SELECT 1 FROM {other} b WHERE {}) ORDER BY 1 LIMIT {MAX_ONE_SIDE_EXAMPLES}",
            keyed.key_text("a"),
            keyed.on("a", "b")
        );
        let examples: Vec<String> = sqlx::query_scalar(&sql)
            .fetch_all(&mut *conn)
            .await
            .context(|| format!("{}: examples of rows on one side", where_()))?;
        if side == 0 {
            keys.examples_only_in_baseline = examples;
        } else {
            keys.examples_only_in_candidate = examples;
        }
    }
    Ok(keys)
}

/// A sample of keys from both sides, in an order set by the seed, compared column by column: the
/// examples of the report.
async fn compare_sample(
    conn: &mut PgConnection,
    pair: &Pair<'_>,
    keyed: &KeyedColumns,
    keys: &mut KeyComparison,
) -> Result<()> {
    let request = pair.request;
    let (base_table, cand_table) = (&pair.baseline, &pair.candidate);
    let where_ = || pair.whence();
    let value_cols = &keyed.values;
    let first_key = keyed.first_key();
    let mut values = String::new();
    for c in value_cols {
        let q = quote_ident(c);
        write!(values, ", a.{q}::text, b.{q}::text").ok();
    }
    let sql = format!(
        "WITH keys AS (
             SELECT * FROM (SELECT {kl_t} FROM {base_table} t UNION SELECT {kl_t} FROM {cand_table} t) u
             ORDER BY hashtextextended({key_u}, $1) LIMIT $2)
         SELECT {key_k}, a.{first_key} IS NOT NULL, b.{first_key} IS NOT NULL{values}
         FROM keys k LEFT JOIN {base_table} a ON {on_a} LEFT JOIN {cand_table} b ON {on_b}",
        kl_t = keyed.key_list("t"),
        key_u = row_text("u", &keyed.keys),
        key_k = keyed.key_text("k"),
        on_a = keyed.on("a", "k"),
        on_b = keyed.on("b", "k"),
    );
    let rows = sqlx::query(&sql)
        .bind(request.seed)
        .bind(request.sample_keys as i64)
        .fetch_all(&mut *conn)
        .await
        .context(|| format!("{}: comparing a sample of keys", where_()))?;
    keys.sample.keys = rows.len();
    for r in rows {
        let key: String = r.try_get(0).context(where_)?;
        let in_base: bool = r.try_get(1).context(where_)?;
        let in_cand: bool = r.try_get(2).context(where_)?;
        if !(in_base && in_cand) {
            keys.sample.only_one_side += 1;
            continue;
        }
        let mut differs = false;
        for (i, c) in value_cols.iter().enumerate() {
            let a: Option<String> = r.try_get(3 + 2 * i).context(where_)?;
            let b: Option<String> = r.try_get(4 + 2 * i).context(where_)?;
            if a == b {
                continue;
            }
            differs = true;
            if let Some(col) = keys.columns.iter_mut().find(|d| &d.column == c) {
                if col.examples.len() < MAX_EXAMPLES {
                    col.examples.push(ValueDifference {
                        key: key.clone(),
                        baseline: a,
                        candidate: b,
                    });
                }
            }
        }
        if differs {
            keys.sample.differing += 1;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_differing_counts_one_side_and_changed_rows() {
        let t = TableComparison {
            keys: Some(KeyComparison {
                only_in_baseline: 3,
                only_in_candidate: 1,
                rows_differing: 5,
                ..Default::default()
            }),
            ..Default::default()
        };
        assert_eq!(t.rows_differing(), 9);
        let unkeyed = TableComparison {
            rows_baseline: 10,
            rows_candidate: 7,
            ..Default::default()
        };
        assert_eq!(unkeyed.rows_differing(), 3);
    }
}
