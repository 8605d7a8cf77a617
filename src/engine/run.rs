//! `run`: keep every active build current from its stored positions, and backfill what is missing.
//!
//! A projection whose code version is newer than its active build, or that has never been built, is
//! rebuilt in the background while the old build keeps serving (and keeps being followed); the
//! rebuild swaps itself in once caught up. Deploying a new projection version is enough to get it
//! backfilled. Builds left ready by `rebuild --no-swap` are followed too, so they stay caught up
//! until `reproject swap`. When the set of active builds changes (a swap, here or by another process), the
//! follower is restarted on the new set: positions are stored, so nothing is missed or repeated.

use std::collections::{BTreeSet, HashMap};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::stream::{FuturesUnordered, StreamExt};
use tokio::time::Instant;

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
    let mut rounds = Rounds {
        engine,
        options,
        cancel: cancel.clone(),
        backfills: FuturesUnordered::new(),
        running: BTreeSet::new(),
        failed_at: HashMap::new(),
    };
    let mut attempt = 0u32;
    let mut failing_since: Option<Instant> = None;
    loop {
        if cancel.is_cancelled() {
            return Ok(());
        }
        match rounds.round().await {
            Ok(true) if !cancel.is_cancelled() => return Ok(()),
            Ok(_) => {
                attempt = 0;
                failing_since = None;
            }
            Err(e) if e.is_retriable() => {
                let since = *failing_since.get_or_insert_with(Instant::now);
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

// Backfills run on run's task (polled alongside the follower), not spawned: no Send bound needed.
type Backfill = Pin<Box<dyn Future<Output = (String, Result<rebuild::RebuildReport>)>>>;

/// What `run` carries from one round to the next: the backfills under way, and when each
/// projection's last backfill failed.
struct Rounds<E> {
    engine: Arc<Engine<E>>,
    options: RunOptions,
    cancel: CancellationToken,
    backfills: FuturesUnordered<Backfill>,
    running: BTreeSet<String>,
    failed_at: HashMap<String, Instant>,
}

impl<E: Send + Sync + 'static> Rounds<E> {
    /// One round: start the backfills that are missing, then follow the active builds until the set
    /// of builds changes, a backfill ends, or (with `exit_when_caught_up`) everything has caught up.
    /// Returns whether `run` is done.
    async fn round(&mut self) -> Result<bool> {
        let pending = self.start_backfills().await?;
        let targets = self.follow_targets().await?;
        let followed: BTreeSet<i64> = targets.iter().map(|t| t.build.build_id).collect();
        let round = self.cancel.child_token();
        let watcher = tokio::spawn(cancel_when_builds_change(
            self.engine.clone(),
            followed,
            round.clone(),
        ));
        let until = match self.options.exit_when_caught_up {
            Some(lag) if !pending && self.running.is_empty() => Until::CaughtUp { lag_below: lag },
            _ => Until::Cancelled,
        };
        let exits_when_caught_up = matches!(until, Until::CaughtUp { .. });
        let engine = &self.engine;
        let outcome = tokio::select! {
            outcome = async {
                if targets.is_empty() {
                    round.cancelled().await;
                    Ok(None)
                } else {
                    follow::follow(engine, targets, until, &round, "following").await.map(Some)
                }
            } => outcome,
            Some(done) = self.backfills.next(), if !self.backfills.is_empty() => {
                round.cancel();
                match done {
                    (name, Ok(report)) => {
                        tracing::info!(message = "backfill done", projection = %name, events = report.events_replayed, swapped = !report.swaps.is_empty());
                        self.running.remove(&name);
                    }
                    (name, Err(error)) => {
                        tracing::error!(message = "backfill failed; the current build keeps serving", projection = %name, %error);
                        self.running.remove(&name);
                        self.failed_at.insert(name, Instant::now());
                    }
                }
                Ok(None)
            }
        };
        round.cancel();
        let _ = watcher.await;
        outcome.map(|followed| followed.is_some() && exits_when_caught_up)
    }

    /// Start a backfill for each projection whose code version is not active (unless one runs, or
    /// failed a moment ago). Returns whether any projection is not active at its code version.
    async fn start_backfills(&mut self) -> Result<bool> {
        let mut pending = false;
        for projection in &self.engine.projections {
            let active = self.engine.catalog.active_build(projection.name()).await?;
            if active
                .as_ref()
                .is_some_and(|b| b.version == projection.version())
            {
                continue;
            }
            pending = true;
            let name = projection.name().to_string();
            let recently_failed = self
                .failed_at
                .get(&name)
                .is_some_and(|t| t.elapsed() < RETRY_BACKFILL_AFTER);
            if !self.options.backfill || self.running.contains(&name) || recently_failed {
                continue;
            }
            tracing::info!(message = "backfilling in the background", projection = %name, version = projection.version(),
                serving = ?active.map(|b| b.version));
            self.running.insert(name.clone());
            let (engine, opts, cancel) = (
                self.engine.clone(),
                self.options.rebuild.clone(),
                self.cancel.child_token(),
            );
            self.backfills.push(Box::pin(async move {
                let result =
                    rebuild::rebuild(&engine, std::slice::from_ref(&name), &opts, &cancel).await;
                (name, result)
            }));
        }
        Ok(pending)
    }

    /// The active builds, and the ready ones (`rebuild --no-swap`) so that they stay caught up until
    /// `reproject swap`, each at its stored positions. One reader follows them all, each build's
    /// share of a slice in its own transaction with its positions (verification lines builds up by
    /// positions).
    async fn follow_targets(&self) -> Result<Vec<FollowTarget<E>>> {
        let builds = self.engine.catalog.builds(None).await?;
        let mut targets = Vec::new();
        for build in builds.iter().filter(|b| is_followed(b.phase)) {
            let Ok(projection) = self.engine.projection(&build.projection) else {
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
            let positions = self.engine.catalog.positions(build.build_id).await?;
            targets.push(FollowTarget {
                build: build.clone(),
                projection,
                positions,
            });
        }
        Ok(targets)
    }
}

fn is_followed(phase: Phase) -> bool {
    matches!(phase, Phase::Active | Phase::Ready)
}

/// Cancel `round` once the followed builds are no longer `followed` (a swap, here or by another
/// process), checking every [`REPLAN_EVERY`]; return when `round` ends.
async fn cancel_when_builds_change<E: Send + Sync + 'static>(
    engine: Arc<Engine<E>>,
    followed: BTreeSet<i64>,
    round: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = round.cancelled() => return,
            _ = tokio::time::sleep(REPLAN_EVERY) => {}
        }
        if let Ok(builds) = engine.catalog.builds(None).await {
            let now: BTreeSet<i64> = builds
                .iter()
                .filter(|b| is_followed(b.phase))
                .map(|b| b.build_id)
                .collect();
            if now != followed {
                round.cancel();
                return;
            }
        }
    }
}
