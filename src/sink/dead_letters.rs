//! The dead-letter table (`reproject.dead_letters`): bad records a build passed over under the
//! `dead-letter` policy, kept with their raw bytes so that nothing is lost, and resolved by
//! `reproject dead-letters retry` once the code that refused them is fixed.

use sqlx::PgConnection;

use super::{Context, Result};

/// One bad record as stored, for one build.
#[derive(Debug, Clone, sqlx::FromRow, serde::Serialize)]
pub struct StoredDeadLetter {
    pub dead_letter_id: i64,
    pub build_id: i64,
    pub projection: String,
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub kind: String,
    pub type_url: Option<String>,
    pub version: Option<i32>,
    pub reason: String,
    #[serde(skip)]
    pub record_key: Option<Vec<u8>>,
    #[serde(skip)]
    pub record_value: Vec<u8>,
    /// The record's headers, names and values in order (a header without a value: NULL).
    pub header_names: Vec<String>,
    #[serde(skip)]
    pub header_values: Vec<Option<Vec<u8>>>,
    pub record_timestamp_ms: Option<i64>,
    pub event_id: Option<uuid::Uuid>,
    pub recorded_at: chrono::DateTime<chrono::Utc>,
    pub retried_at: Option<chrono::DateTime<chrono::Utc>>,
    pub retry_error: Option<String>,
    pub resolved_at: Option<chrono::DateTime<chrono::Utc>>,
}

impl StoredDeadLetter {
    /// The record as it was read, for its framing to decode again.
    pub fn record(&self) -> crate::envelope::OwnedRecord {
        crate::envelope::OwnedRecord {
            topic: self.topic.clone(),
            partition: self.partition,
            offset: self.offset,
            key: self.record_key.clone(),
            value: self.record_value.clone(),
            headers: self
                .header_names
                .iter()
                .cloned()
                .zip(self.header_values.iter().cloned())
                .collect(),
            timestamp_millis: self.record_timestamp_ms,
        }
    }
}

/// A bad record about to be stored.
pub struct NewDeadLetter<'a> {
    pub topic: &'a str,
    pub partition: i32,
    pub offset: i64,
    pub kind: &'a str,
    pub type_url: Option<&'a str>,
    pub version: Option<u32>,
    pub reason: &'a str,
    pub key: Option<&'a [u8]>,
    pub value: &'a [u8],
    pub headers: &'a [(String, Option<Vec<u8>>)],
    pub timestamp_millis: Option<i64>,
    pub event_id: Option<[u8; 16]>,
}

/// Store `letters` for a build, in the caller's transaction. A record stored before (a batch retried
/// after a dropped connection) is kept once. Returns how many were new.
pub async fn insert(
    conn: &mut PgConnection,
    build_id: i64,
    projection: &str,
    letters: &[NewDeadLetter<'_>],
) -> Result<u64> {
    let mut added = 0;
    for l in letters {
        let result = sqlx::query(
            r#"INSERT INTO reproject.dead_letters
                 (build_id, projection, topic, partition, "offset", kind, type_url, version, reason,
                  record_key, record_value, event_id, header_names, header_values,
                  record_timestamp_ms)
               VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15)
               ON CONFLICT (build_id, topic, partition, "offset") DO NOTHING"#,
        )
        .bind(build_id)
        .bind(projection)
        .bind(l.topic)
        .bind(l.partition)
        .bind(l.offset)
        .bind(l.kind)
        .bind(l.type_url)
        .bind(l.version.map(|v| v as i32))
        .bind(l.reason)
        .bind(l.key)
        .bind(l.value)
        .bind(l.event_id.map(uuid::Uuid::from_bytes))
        .bind(
            l.headers
                .iter()
                .map(|(n, _)| n.clone())
                .collect::<Vec<String>>(),
        )
        .bind(
            l.headers
                .iter()
                .map(|(_, v)| v.clone())
                .collect::<Vec<Option<Vec<u8>>>>(),
        )
        .bind(l.timestamp_millis)
        .execute(&mut *conn)
        .await
        .context(|| {
            format!(
                "storing the dead letter {}/{} at offset {} of build {build_id}",
                l.topic, l.partition, l.offset
            )
        })?;
        added += result.rows_affected();
    }
    Ok(added)
}

/// Dead letters a build holds (resolved or not): what its budget is measured against.
pub async fn count(conn: &mut PgConnection, build_id: i64) -> Result<u64> {
    let n: i64 =
        sqlx::query_scalar("SELECT count(*) FROM reproject.dead_letters WHERE build_id = $1")
            .bind(build_id)
            .fetch_one(conn)
            .await
            .context(|| format!("counting the dead letters of build {build_id}"))?;
    Ok(n as u64)
}

/// Unresolved dead letters per build, for `status`.
pub async fn unresolved_by_build(conn: &mut PgConnection) -> Result<Vec<(i64, i64)>> {
    sqlx::query_as(
        "SELECT build_id, count(*) FROM reproject.dead_letters WHERE resolved_at IS NULL GROUP BY build_id",
    )
    .fetch_all(conn)
    .await
    .context(|| "counting dead letters".into())
}

/// Dead letters of a projection (every projection when None), oldest first; resolved ones only
/// when `include_resolved`.
pub async fn list(
    conn: &mut PgConnection,
    projection: Option<&str>,
    include_resolved: bool,
) -> Result<Vec<StoredDeadLetter>> {
    sqlx::query_as(
        r#"SELECT * FROM reproject.dead_letters
           WHERE ($1::text IS NULL OR projection = $1) AND ($2 OR resolved_at IS NULL)
           ORDER BY dead_letter_id"#,
    )
    .bind(projection)
    .bind(include_resolved)
    .fetch_all(conn)
    .await
    .context(|| "listing dead letters".into())
}

pub async fn get(conn: &mut PgConnection, id: i64) -> Result<Option<StoredDeadLetter>> {
    sqlx::query_as("SELECT * FROM reproject.dead_letters WHERE dead_letter_id = $1")
        .bind(id)
        .fetch_optional(conn)
        .await
        .context(|| format!("reading dead letter {id}"))
}

/// Record the outcome of a retry: resolved, or the error it still gives.
pub async fn mark_retried(conn: &mut PgConnection, id: i64, error: Option<&str>) -> Result<()> {
    sqlx::query(
        "UPDATE reproject.dead_letters SET retried_at = now(), retry_error = $2,
                resolved_at = CASE WHEN $2::text IS NULL THEN now() END
         WHERE dead_letter_id = $1",
    )
    .bind(id)
    .bind(error)
    .execute(conn)
    .await
    .context(|| format!("recording the retry of dead letter {id}"))?;
    Ok(())
}
