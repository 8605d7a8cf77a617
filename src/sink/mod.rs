//! Writing to PostgreSQL: binary COPY, reproject's catalog, advisory locks, bulk loads and
//! transactional batches that commit rows and log positions together.

pub mod aggregate_index;
pub mod catalog;
pub mod clocks;
pub mod copy;
pub mod database;
pub mod dead_letters;
pub mod known;
pub mod lock;
pub mod merge;
pub mod spill;
pub mod writer;

pub use catalog::{Build, Catalog, Phase};

/// Between the slices of a bulk write, the throttle's chance to pace it or hold it (see
/// `engine::throttle::Governor`). Bulk writes without one go in whole.
pub trait SliceGate: Sync {
    /// A slice that took `took` was written; returns when the next may start.
    fn after_slice(&self, took: std::time::Duration) -> futures::future::BoxFuture<'_, ()>;
}

/// What went wrong talking to PostgreSQL, with what reproject was doing at the time.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("{context}: {source}")]
    Database {
        context: String,
        #[source]
        source: sqlx::Error,
    },
    #[error("{step} COPY into {target}: no progress for {seconds:.0} s, so the connection is taken to have stalled; \
             the transaction it ran in is rolled back and nothing of it is kept. Run the command again (a rebuild resumes \
             or starts its load over)")]
    CopyStalled {
        target: String,
        step: String,
        seconds: f64,
    },
    #[error("build {build_id}: partition {topic}/{partition} was expected at offset {expected}, but another writer moved it (now {found}); stopping so that no event is applied twice")]
    PositionConflict {
        build_id: i64,
        topic: String,
        partition: i32,
        expected: i64,
        found: String,
    },
    #[error("projection {projection} v{version}, table {table}: {detail}")]
    SchemaMismatch {
        projection: String,
        version: u32,
        table: String,
        detail: String,
    },
    #[error("{0}")]
    Copy(#[from] copy::CopyDecodeError),
    #[error("{0}")]
    Invalid(String),
}

impl SinkError {
    /// Transient failures worth retrying from the stored position: the connection dropped or timed
    /// out, a serialization failure or deadlock, the server shutting down. Everything else is a bug
    /// or bad data and retrying would only repeat it.
    ///
    /// A connection cut while it is being set up (a proxy or load balancer restarting, a failover)
    /// shows as a TLS error or as a garbled handshake, which sqlx reports as a protocol error; those
    /// are retried too. A retry is harmless even where the cause is not transient: writes are
    /// guarded by their positions, and the retries are bounded.
    pub fn is_retriable(&self) -> bool {
        match self {
            SinkError::Database { source, .. } => match source {
                sqlx::Error::Io(_)
                | sqlx::Error::Tls(_)
                | sqlx::Error::Protocol(_)
                | sqlx::Error::PoolTimedOut
                | sqlx::Error::PoolClosed => true,
                sqlx::Error::Database(db) => matches!(
                    db.code().as_deref(),
                    Some(
                        "40001"
                            | "40P01"
                            | "57P01"
                            | "57P02"
                            | "57P03"
                            | "08000"
                            | "08003"
                            | "08006"
                    )
                ),
                _ => false,
            },
            _ => false,
        }
    }
}

/// How long to wait before retrying a [retriable](SinkError::is_retriable) error the `attempt`-th
/// time: 100 ms, doubling, at most 10 s, with up to 50% jitter so that many writers do not retry in
/// step.
pub fn backoff(attempt: u32) -> std::time::Duration {
    use rand::Rng;
    let base = 100u64.saturating_mul(1 << attempt.min(7)).min(10_000);
    let jitter = rand::rng().random_range(0..=base / 2);
    std::time::Duration::from_millis(base + jitter)
}

pub type Result<T, E = SinkError> = std::result::Result<T, E>;

/// Attach what reproject was doing to a database error.
pub trait Context<T> {
    fn context(self, what: impl FnOnce() -> String) -> Result<T>;
}

impl<T> Context<T> for std::result::Result<T, sqlx::Error> {
    fn context(self, what: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|source| {
            let mut context = what();
            // Out of a resource on the server: say which, and that waiting or freeing it helps.
            if let sqlx::Error::Database(db) = &source {
                let hint = match db.code().as_deref() {
                    Some("53100") => Some("the database server's disk is full; free space and run again, committed work is kept"),
                    Some("53200") => Some("the database server is out of memory"),
                    Some("53300") => Some("the database server has no connection slots left"),
                    _ => None,
                };
                if let Some(hint) = hint {
                    context = format!("{context} ({hint})");
                }
            }
            SinkError::Database { context, source }
        })
    }
}

/// `"name"`, with embedded quotes doubled: the only way a name reaches SQL text.
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

pub fn qualified(schema: &str, table: &str) -> String {
    format!("{}.{}", quote_ident(schema), quote_ident(table))
}

/// Names reproject puts into SQL (projection, table and schema names) must be plain lowercase
/// identifiers: no quoting surprises, no injection, and within PostgreSQL's 63-byte limit.
pub fn check_identifier(kind: &str, name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 32
        && name
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_lowercase() || b == b'_')
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(SinkError::Invalid(format!(
            "{kind} name {name:?} is not allowed: use 1-32 characters of a-z, 0-9 and _, starting with a letter or _"
        )))
    }
}

/// A stable 32-bit FNV-1a hash, for advisory lock keys that every process must agree on.
pub fn stable_hash(text: &str) -> i32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in text.bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    h as i32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_identifiers_reach_sql() {
        assert!(check_identifier("projection", "order_summary").is_ok());
        for bad in [
            "",
            "Order",
            "a-b",
            "x\"; DROP TABLE y; --",
            "1abc",
            "a b",
            &"a".repeat(33),
        ] {
            assert!(check_identifier("projection", bad).is_err(), "{bad:?}");
        }
        assert_eq!(quote_ident("we\"ird"), "\"we\"\"ird\"");
    }

    fn failed(source: sqlx::Error) -> SinkError {
        Err::<(), _>(source)
            .context(|| "reading the pause flags".into())
            .expect_err("an error")
    }

    #[test]
    fn a_connection_lost_or_garbled_while_it_is_set_up_is_retried_and_bad_sql_is_not() {
        let lost = std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "peer closed");
        assert!(failed(sqlx::Error::Io(lost)).is_retriable());
        assert!(failed(sqlx::Error::Tls("no close_notify".into())).is_retriable());
        assert!(failed(sqlx::Error::Protocol(
            "unexpected response from SSLRequest: 0x00".into()
        ))
        .is_retriable());
        assert!(failed(sqlx::Error::PoolTimedOut).is_retriable());
        assert!(!failed(sqlx::Error::RowNotFound).is_retriable());
        assert!(!failed(sqlx::Error::ColumnNotFound("total".into())).is_retriable());
        assert!(!SinkError::Invalid("bad name".into()).is_retriable());
    }
}
