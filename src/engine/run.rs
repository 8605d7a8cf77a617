//! `run`: keep every active build current from its stored positions, and backfill what is missing.
//!
//! A projection whose code version is newer than its active build, or that has never been built, is
//! rebuilt in the background while the old build keeps serving (and keeps being followed); the
//! rebuild swaps itself in once caught up. Deploying a new projection version is enough to get it
//! backfilled. Builds left ready by `rebuild --no-swap` are followed too, so they stay caught up
//! until `reproject swap`. When the set of active builds changes (a swap, here or by another process), the
//! follower is restarted on the new set: positions are stored, so nothing is missed or repeated.

use std::collections::BTreeSet;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use futures::stream::{FuturesUnordered, StreamExt};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::follow::{self, FollowTarget, Until};
use super::rebuild::{self, RebuildOptions};
use super::{Engine, Result};
use crate::sink::Phase;

#[derive(Clone, Debug)]
pub struct RunOptions {
    /// Rebuild projections whose code version has no active build yet.
    pub backfill: bool,
    pub rebuild: RebuildOptions,
    /// Return once every projection is active at its code version and no build lags by more than this.
    pub exit_when_caught_up: Option<i64>,
}

const REPLAN_EVERY: Duration = Duration::from_secs(2);
const RETRY_BACKFILL_AFTER: Duration = Duration::from_secs(30);
/// How long `run` rides out a database or broker that fails every round (a failover, a restarted
/// proxy) before it gives up and exits with the error: long enough for a managed PostgreSQL to fail
/// over, short enough that an orchestrator hears of an outage that is not going away.
const RIDE_OUT: Duration = Duration::from_secs(300);

pub async fn run<E: Send + Sync + 'static>(
    engine: Arc<Engine<E>>,
    options: RunOptions,
    cancel: CancellationToken,
) -> Result<()> {
    // Backfills run on this task (polled alongside the follower), not spawned: no Send bound needed.
    type Backfill = Pin<Box<dyn Future<Output = (String, Result<rebuild::RebuildReport>)>>>;
    let mut backfills: FuturesUnordered<Backfill> = FuturesUnordered::new();
    let mut running: BTreeSet<String> = BTreeSet::new();
    let mut failed_at: std::collections::HashMap<String, tokio::time::Instant> = Default::default();
    let mut attempt = 0u32;
    let mut failing_since: Option<tokio::time::Instant> = None;
    loop {
        if cancel.is_cancelled() {
            return Ok(());
        }
        let outcome = async {
        // Start backfills for projections whose code version is not active.
        let mut pending = false;
        for projection in &engine.projections {
            let active = engine.catalog.active_build(projection.name()).await?;
            if active
                .as_ref()
                .is_some_and(|b| b.version == projection.version())
            {
                continue;
            }
            pending = true;
            let name = projection.name().to_string();
            let recently_failed = failed_at
                .get(&name)
                .is_some_and(|t| t.elapsed() < RETRY_BACKFILL_AFTER);
            if options.backfill && !running.contains(&name) && !recently_failed {
                tracing::info!(message = "backfilling in the background", projection = %name, version = projection.version(),
                    serving = ?active.map(|b| b.version));
                running.insert(name.clone());
                let (engine, opts, cancel) = (
                    engine.clone(),
                    options.rebuild.clone(),
                    cancel.child_token(),
                );
                backfills.push(Box::pin(async move {
                    let result =
                        rebuild::rebuild(&engine, std::slice::from_ref(&name), &opts, &cancel)
                            .await;
                    (name, result)
                }));
            }
        }

        // Follow the active builds, and the ready ones (`rebuild --no-swap`) so that they stay caught
        // up until `reproject swap`, until something changes. Both are followed by one reader, each
        // build's share of a slice in its own transaction with its positions (verification lines
        // builds up by positions).
        let active: Vec<_> = engine
            .catalog
            .builds(None)
            .await?
            .into_iter()
            .filter(|b| matches!(b.phase, Phase::Active | Phase::Ready))
            .collect();
        let mut targets = Vec::new();
        for build in &active {
            let Ok(projection) = engine.projection(&build.projection) else {
                tracing::warn!(message = "an active build has no projection code in this binary; not following it", projection = %build.projection);
                continue;
            };
            if projection.version() != build.version {
                // The old version keeps serving while its successor is built, but this binary only
                // has the new version's code, which may not fit the old tables: the old view stays
                // as it is until the swap, which the backfill performs as soon as it has caught up.
                tracing::debug!(message = "active build is an older version; it serves as is until the swap", projection = %build.projection);
                continue;
            }
            let positions = engine.catalog.positions(build.build_id).await?;
            targets.push(FollowTarget {
                build: build.clone(),
                projection,
                positions,
            });
        }
        let followed: BTreeSet<i64> = targets.iter().map(|t| t.build.build_id).collect();
        let round = cancel.child_token();
        let watcher = {
            let (engine, round) = (engine.clone(), round.clone());
            let followed = followed.clone();
            tokio::spawn(async move {
                loop {
                    tokio::select! {
                        _ = round.cancelled() => return,
                        _ = tokio::time::sleep(REPLAN_EVERY) => {}
                    }
                    if let Ok(builds) = engine.catalog.builds(None).await {
                        let now: BTreeSet<i64> = builds
                            .iter()
                            .filter(|b| matches!(b.phase, Phase::Active | Phase::Ready))
                            .map(|b| b.build_id)
                            .collect();
                        if now != followed {
                            round.cancel();
                            return;
                        }
                    }
                }
            })
        };
        let until = match options.exit_when_caught_up {
            Some(lag) if !pending && running.is_empty() => Until::CaughtUp { lag_below: lag },
            _ => Until::Cancelled,
        };
        let exits_when_caught_up = matches!(until, Until::CaughtUp { .. });
        let outcome = tokio::select! {
            outcome = async {
                if targets.is_empty() {
                    round.cancelled().await;
                    Ok(None)
                } else {
                    follow::follow(&engine, targets, until, &round, "following").await.map(Some)
                }
            } => outcome,
            Some(done) = backfills.next(), if !backfills.is_empty() => {
                round.cancel();
                match done {
                    (name, Ok(report)) => {
                        tracing::info!(message = "backfill done", projection = %name, events = report.events_replayed, swapped = !report.swaps.is_empty());
                        running.remove(&name);
                    }
                    (name, Err(error)) => {
                        tracing::error!(message = "backfill failed; the current build keeps serving", projection = %name, %error);
                        running.remove(&name);
                        failed_at.insert(name, tokio::time::Instant::now());
                    }
                }
                Ok(None)
            }
        };
        round.cancel();
        let _ = watcher.await;
        outcome.map(|followed| followed.is_some() && exits_when_caught_up)
        }
        .await;
        match outcome {
            Ok(true) if !cancel.is_cancelled() => return Ok(()),
            Ok(_) => {
                attempt = 0;
                failing_since = None;
            }
            Err(e) if e.is_retriable() => {
                let since = *failing_since.get_or_insert_with(tokio::time::Instant::now);
                if since.elapsed() >= RIDE_OUT {
                    tracing::error!(message = "giving up: every round failed", seconds = since.elapsed().as_secs(), error = %e);
                    return Err(e);
                }
                attempt += 1;
                let delay = crate::sink::backoff(attempt);
                tracing::warn!(message = "following failed; resuming from the stored positions", error = %e, attempt, delay_ms = delay.as_millis() as u64);
                tokio::select! {
                    _ = cancel.cancelled() => return Ok(()),
                    _ = tokio::time::sleep(delay) => {}
                }
            }
            Err(e) => return Err(e),
        }
    }
}
