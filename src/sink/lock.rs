//! Advisory locks that keep two writers off the same thing.
//!
//! Session-scoped locks on a connection of their own: the lock lives exactly as long as that
//! connection, so a process that dies (even by SIGKILL) releases it, and nothing has to be cleaned up
//! by hand. The connection's `application_name` says who holds it, so a process refused the lock can
//! name the one that has it.
//!
//! - one per projection for rebuilding it (`rebuild`, and `run` when it backfills);
//! - one per build for writing its rows (`rebuild`'s catch-up, `run`'s follower).

use sqlx::{Connection, PgConnection};

use super::{stable_hash, Context, SinkError};

/// The first key of every reproject advisory lock ("RP" and a kind), so ours never collide with an
/// application's own advisory locks that use the single-bigint form.
const REBUILD_LOCK: i32 = 0x5250_0001;
const WRITER_LOCK: i32 = 0x5250_0002;
const SHARED_BUILD_LOCK: i32 = 0x5250_0004;

#[derive(Debug, Clone, Copy)]
pub enum LockKind {
    /// Rebuilding a projection.
    Rebuild,
    /// Writing one build's tables.
    Writer,
    /// Finding or creating the build that `rebuild --shared` processes work on, one at a time.
    SharedBuild,
}

/// What the writer lock of a build is taken on: whoever writes a build's tables (`run`, a rebuild's
/// catch-up, `swap`, `rollback`, `dead-letters retry`) holds it, so two processes never write one
/// build at once.
pub fn writer_lock_subject(build: &super::Build) -> String {
    format!(
        "build {} ({} v{})",
        build.build_id, build.projection, build.version
    )
}

pub struct AdvisoryLock {
    conn: PgConnection,
    what: String,
}

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("{what} is already locked by another process: {holder}")]
    Held { what: String, holder: String },
    #[error(transparent)]
    Sink(#[from] SinkError),
}

/// The two keys of a lock and what it protects, readable.
fn keys(kind: LockKind, subject: &str) -> (i32, i32, String) {
    match kind {
        LockKind::Rebuild => (
            REBUILD_LOCK,
            stable_hash(subject),
            format!("rebuilding projection {subject}"),
        ),
        LockKind::Writer => (
            WRITER_LOCK,
            stable_hash(subject),
            format!("writing {subject}"),
        ),
        LockKind::SharedBuild => (
            SHARED_BUILD_LOCK,
            stable_hash(subject),
            format!("preparing the shared build of {subject}"),
        ),
    }
}

/// Whether some process holds this lock now, in this database: a writer whose lock is free has
/// stopped, whatever progress it last reported.
pub async fn is_held_by_anyone<'c>(
    executor: impl sqlx::PgExecutor<'c>,
    kind: LockKind,
    subject: &str,
) -> Result<bool, SinkError> {
    let (class, object, what) = keys(kind, subject);
    sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM pg_locks
                        WHERE locktype = 'advisory' AND classid = $1::int::oid AND objid = $2::int::oid
                          AND objsubid = 2 AND granted
                          AND database = (SELECT oid FROM pg_database WHERE datname = current_database()))",
    )
    .bind(class)
    .bind(object)
    .fetch_one(executor)
    .await
    .context(|| format!("looking for the lock on {what}"))
}

/// How a lock is taken: alone, or shared with others who take it shared (the processes of one
/// `rebuild --shared`), which keeps out whoever wants it alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockMode {
    Exclusive,
    Shared,
    /// Exclusive, waiting for it as long as it takes.
    ExclusiveWaiting,
}

impl AdvisoryLock {
    /// Take the lock or fail at once, naming whoever holds it.
    pub async fn try_acquire(
        database_url: &str,
        kind: LockKind,
        subject: &str,
        holder: &str,
    ) -> std::result::Result<AdvisoryLock, LockError> {
        Self::acquire(database_url, kind, subject, holder, LockMode::Exclusive).await
    }

    /// Take the lock as `mode` says; a mode that does not wait fails at once, naming whoever holds
    /// the lock.
    pub async fn acquire(
        database_url: &str,
        kind: LockKind,
        subject: &str,
        holder: &str,
        mode: LockMode,
    ) -> std::result::Result<AdvisoryLock, LockError> {
        let (class, object, what) = keys(kind, subject);
        let mut conn = PgConnection::connect(database_url)
            .await
            .context(|| format!("connecting to PostgreSQL to lock {what}"))?;
        let name: String = holder.chars().take(60).collect();
        sqlx::query("SELECT set_config('application_name', $1, false)")
            .bind(&name)
            .execute(&mut conn)
            .await
            .context(|| "naming the lock connection".into())?;
        let take = match mode {
            LockMode::Exclusive => "SELECT pg_try_advisory_lock($1, $2)",
            LockMode::Shared => "SELECT pg_try_advisory_lock_shared($1, $2)",
            LockMode::ExclusiveWaiting => "SELECT pg_advisory_lock($1, $2) IS NOT NULL",
        };
        let got: bool = sqlx::query_scalar(take)
            .bind(class)
            .bind(object)
            .fetch_one(&mut conn)
            .await
            .context(|| format!("locking {what}"))?;
        if got {
            return Ok(AdvisoryLock { conn, what });
        }
        let holder: Option<String> = sqlx::query_scalar(
            "SELECT format('%s (PostgreSQL backend pid %s, connected since %s)',
                           coalesce(nullif(a.application_name, ''), 'unnamed client'), a.pid,
                           to_char(a.backend_start, 'YYYY-MM-DD HH24:MI:SS TZ'))
             FROM pg_locks l JOIN pg_stat_activity a USING (pid)
             WHERE l.locktype = 'advisory' AND l.classid = $1::int::oid AND l.objid = $2::int::oid
               AND l.objsubid = 2 AND l.granted
               -- Advisory locks are per database: another database's holder of the same key is not ours.
               AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
             LIMIT 1",
        )
        .bind(class)
        .bind(object)
        .fetch_optional(&mut conn)
        .await
        .context(|| format!("finding who holds the lock on {what}"))?;
        Err(LockError::Held {
            what,
            holder: holder.unwrap_or_else(|| "a process that has since gone".into()),
        })
    }

    /// Whether the lock is still held: false once its connection is gone (the server restarted or
    /// the connection was killed), after which the holder must stop writing.
    pub async fn is_held(&mut self) -> bool {
        self.conn.ping().await.is_ok()
    }

    pub fn what(&self) -> &str {
        &self.what
    }

    pub async fn release(self) {
        let _ = self.conn.close().await;
    }
}
