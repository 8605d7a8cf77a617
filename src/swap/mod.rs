//! The cut-over: point the stable names applications read (a view per table, by default
//! `public.<table>`) at a new build, in one short transaction.
//!
//! Why a lock timeout and retries: replacing a view takes an ACCESS EXCLUSIVE lock on it. While that
//! request waits for a long-running reader to finish, every new reader queues behind it. So the swap
//! waits at most `lock_timeout` (default 50 ms), then gives up, rolls back, backs off and tries again:
//! a long reader can delay the swap, but never makes other readers wait longer than the timeout.
//! Readers see the old view or the new one, never an empty or half-built one: the new build is
//! complete and caught up before it is swapped in, and the whole change commits at once.
//!
//! The previous build is marked retired and its tables stay, for rollback. Grants on the view are
//! carried over to the new one.

use std::time::{Duration, Instant};

use sqlx::{Connection, PgConnection, Row};

use crate::projection::TableSpec;
use crate::sink::catalog::{self, Phase};
use crate::sink::{backoff, qualified, Build, Context, SinkError};

#[derive(Debug, thiserror::Error)]
pub enum SwapError {
    #[error("swap of {projection}: {name} exists and is not a view (it is a {kind}); reproject only replaces views it manages. Rename or drop it first")]
    NotAView {
        projection: String,
        name: String,
        kind: String,
    },
    #[error("swap of {projection} to build {build_id}: readers held locks on its views through {attempts} attempts over {seconds:.1}s; try again at a quieter moment or raise --swap-attempts")]
    LockTimeouts {
        projection: String,
        build_id: i64,
        attempts: u32,
        seconds: f64,
    },
    #[error(
        "swap of {projection}: build {build_id} is {phase}, only a caught-up build can go live"
    )]
    NotReady {
        projection: String,
        build_id: i64,
        phase: String,
    },
    #[error("swap of {projection}: build {build_id} is behind the live build {active} on partition {topic}/{partition} ({behind} < {ahead}); it must catch up first")]
    Behind {
        projection: String,
        build_id: i64,
        active: i64,
        topic: String,
        partition: i32,
        behind: i64,
        ahead: i64,
    },
    #[error(transparent)]
    Sink(#[from] SinkError),
}

#[derive(Clone, Debug)]
pub struct SwapOptions {
    pub view_schema: String,
    pub lock_timeout: Duration,
    pub max_attempts: u32,
}

impl Default for SwapOptions {
    fn default() -> Self {
        SwapOptions {
            view_schema: "public".into(),
            lock_timeout: Duration::from_millis(50),
            max_attempts: 200,
        }
    }
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct SwapReport {
    pub projection: String,
    pub build_id: i64,
    pub retired_build_id: Option<i64>,
    pub attempts: u32,
    /// How long the successful transaction took, start to commit.
    pub commit_ms: f64,
}

/// Make `build` the active build of its projection.
pub async fn swap(
    database_url: &str,
    build: &Build,
    specs: &[TableSpec],
    options: &SwapOptions,
) -> Result<SwapReport, SwapError> {
    let mut conn = PgConnection::connect(database_url)
        .await
        .context(|| "connecting to swap".into())?;
    let started = Instant::now();
    let mut attempt = 0;
    loop {
        attempt += 1;
        let began = Instant::now();
        match try_swap(&mut conn, build, specs, options).await {
            Ok(retired) => {
                return Ok(SwapReport {
                    projection: build.projection.clone(),
                    build_id: build.build_id,
                    retired_build_id: retired,
                    attempts: attempt,
                    commit_ms: began.elapsed().as_secs_f64() * 1e3,
                })
            }
            Err(SwapError::Sink(SinkError::Database {
                source: sqlx::Error::Database(db),
                ..
            })) if db.code().as_deref() == Some("55P03") && attempt < options.max_attempts => {
                let delay = backoff(attempt.min(4));
                tracing::info!(message = "a reader holds the view; swap will retry", projection = %build.projection, attempt, delay_ms = delay.as_millis() as u64);
                tokio::time::sleep(delay).await;
            }
            Err(SwapError::Sink(SinkError::Database {
                source: sqlx::Error::Database(db),
                ..
            })) if db.code().as_deref() == Some("55P03") => {
                return Err(SwapError::LockTimeouts {
                    projection: build.projection.clone(),
                    build_id: build.build_id,
                    attempts: attempt,
                    seconds: started.elapsed().as_secs_f64(),
                })
            }
            Err(e) => return Err(e),
        }
    }
}

async fn try_swap(
    conn: &mut PgConnection,
    build: &Build,
    specs: &[TableSpec],
    options: &SwapOptions,
) -> Result<Option<i64>, SwapError> {
    let mut tx = conn.begin().await.context(|| "starting the swap".into())?;
    sqlx::query(&format!(
        "SET LOCAL lock_timeout = '{}ms'",
        options.lock_timeout.as_millis().max(1)
    ))
    .execute(&mut *tx)
    .await
    .context(|| "setting the swap's lock timeout".into())?;
    // Serialise swaps of one projection, and re-check the build under the lock.
    let rows = sqlx::query("SELECT build_id, phase FROM reproject.builds WHERE projection = $1 ORDER BY build_id FOR UPDATE")
        .bind(&build.projection)
        .fetch_all(&mut *tx)
        .await
        .context(|| format!("locking the catalog rows of {}", build.projection))?;
    let mut retired = None;
    for row in &rows {
        let id: i64 = row
            .try_get("build_id")
            .context(|| "reading builds".into())?;
        let phase: String = row.try_get("phase").context(|| "reading builds".into())?;
        if id == build.build_id
            && !matches!(
                Phase::parse(&phase),
                Some(Phase::CatchingUp | Phase::Ready | Phase::Retired)
            )
        {
            return Err(SwapError::NotReady {
                projection: build.projection.clone(),
                build_id: id,
                phase,
            });
        }
        if phase == "active" && id != build.build_id {
            retired = Some(id);
        }
    }
    if let Some(old) = retired {
        // Readers must never see the view go back in time: the new build must stand at or past the
        // live one on every partition (a topic the live build reads and the new one does not counts
        // as offset -1). Lock the live build's positions so its follower cannot move them until this
        // commits.
        let rows: Vec<(i64, String, i32, i64)> = sqlx::query_as(
            "SELECT build_id, topic, partition, next_offset FROM reproject.positions WHERE build_id = ANY($1) ORDER BY build_id, topic, partition FOR UPDATE",
        )
        .bind(vec![old, build.build_id])
        .fetch_all(&mut *tx)
        .await
        .context(|| format!("comparing the positions of builds {old} and {}", build.build_id))?;
        for (id, topic, partition, ahead) in rows.iter().filter(|r| r.0 == old) {
            let behind = rows
                .iter()
                .find(|r| r.0 == build.build_id && r.1 == *topic && r.2 == *partition)
                .map_or(-1, |r| r.3);
            if behind < *ahead {
                return Err(SwapError::Behind {
                    projection: build.projection.clone(),
                    build_id: build.build_id,
                    active: *id,
                    topic: topic.clone(),
                    partition: *partition,
                    behind,
                    ahead: *ahead,
                });
            }
        }
    }
    for spec in specs {
        point_view(&mut tx, build, spec, &options.view_schema).await?;
    }
    if let Some(old) = retired {
        catalog::set_phase(&mut tx, old, Phase::Retired).await?;
    }
    catalog::set_phase(&mut tx, build.build_id, Phase::Active).await?;
    tx.commit()
        .await
        .context(|| format!("committing the swap of {}", build.projection))?;
    Ok(retired)
}

async fn point_view(
    conn: &mut PgConnection,
    build: &Build,
    spec: &TableSpec,
    view_schema: &str,
) -> Result<(), SwapError> {
    let view = qualified(view_schema, spec.name);
    let existing: Option<(String, Vec<String>)> = sqlx::query_as(
        "SELECT c.relkind::text,
                coalesce(array_agg(format('GRANT %s ON %s TO %s', a.privilege_type, $3::text,
                    CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE quote_ident(pg_get_userbyid(a.grantee)) END))
                    FILTER (WHERE a.grantee IS NOT NULL AND a.grantee <> c.relowner), '{}')
         FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
         LEFT JOIN LATERAL aclexplode(c.relacl) a ON true
         WHERE n.nspname = $1 AND c.relname = $2
         GROUP BY c.relkind",
    )
    .bind(view_schema)
    .bind(spec.name)
    .bind(&view)
    .fetch_optional(&mut *conn)
    .await
    .context(|| format!("looking at {view}"))?;
    let grants = match existing {
        Some((kind, grants)) if kind == "v" => {
            sqlx::query(&format!("DROP VIEW {view}"))
                .execute(&mut *conn)
                .await
                .context(|| format!("replacing {view}"))?;
            grants
        }
        Some((kind, _)) => {
            let kind = match kind.as_str() {
                "r" => "table",
                "m" => "materialized view",
                "p" => "partitioned table",
                "f" => "foreign table",
                _ => "relation",
            };
            return Err(SwapError::NotAView {
                projection: build.projection.clone(),
                name: view,
                kind: kind.into(),
            });
        }
        None => Vec::new(),
    };
    sqlx::query(&format!(
        "CREATE VIEW {view} AS SELECT * FROM {}",
        qualified(&build.schema_name, spec.name)
    ))
    .execute(&mut *conn)
    .await
    .context(|| format!("creating {view}"))?;
    sqlx::query(&format!(
        "COMMENT ON VIEW {view} IS 'reproject: {} v{} build {} ({})'",
        build.projection, build.version, build.build_id, build.schema_name
    ))
    .execute(&mut *conn)
    .await
    .context(|| format!("commenting {view}"))?;
    for grant in grants {
        sqlx::query(&grant)
            .execute(&mut *conn)
            .await
            .context(|| format!("carrying a grant over to {view}"))?;
    }
    Ok(())
}
