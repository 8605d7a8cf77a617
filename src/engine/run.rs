//! `run`: keep every active build current from its stored positions, and backfill what is missing.
//!
//! A projection whose code version is newer than its active build, or that has never been built, is
//! rebuilt in the background while the old build keeps serving (and keeps being followed); the
//! rebuild swaps itself in once caught up. Deploying a new projection version is enough to get it
//! backfilled. Builds left ready by `rebuild --no-swap` are followed too, so they stay caught up
//! until `reproject swap`. When the set of active builds changes (a swap, here or by another process), the
//! follower is restarted on the new set: positions are stored, so nothing is missed or repeated.
//!
//! `run --shared`: any number of `run` processes, here or on other machines, share the follow. A
//! Kafka consumer group over the topics gives each process its partitions (membership, failure
//! detection and rebalancing are Kafka's, `source::group`); each follows only those, from the
//! positions in PostgreSQL, which move compare-and-set per partition, so a partition handed over
//! in the middle of a batch is applied by exactly one of the two. Whenever the group moves
//! partitions, every process starts a new round on its new share; a process that dies stops
//! heartbeating, and within the group's session timeout its partitions are followed by the
//! others. Backfills are shared the same way (`rebuild --shared`).

use std::collections::{BTreeSet, HashMap};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::stream::{FuturesUnordered, StreamExt};
use tokio::time::Instant;

use tokio_util::sync::CancellationToken;

use super::follow::{self, FollowTarget, Sharing, Until};
use super::rebuild::{self, RebuildOptions};
use super::{Engine, EngineError, Result};
use crate::sink::lock::{self, LockKind};
use crate::sink::{Phase, SinkError};
use crate::source::group::GroupMember;

#[derive(Clone, Debug)]
pub struct RunOptions {
    /// Rebuild projections whose code version has no active build yet.
    pub backfill: bool,
    pub rebuild: RebuildOptions,
    /// Return once every projection is active at its code version and no build lags by more than this.
    pub exit_when_caught_up: Option<i64>,
    /// Share the follow (and the backfills) with the other `run --shared` processes of the same
    /// projections and database, each following the partitions a consumer group gives it.
    pub shared: bool,
}

const REPLAN_EVERY: Duration = Duration::from_secs(2);
/// How often a shared `run` looks whether the group moved its partitions.
const LOOK_AT_THE_GROUP_EVERY: Duration = Duration::from_millis(250);
/// How long the group's assignment must stay put before a shared `run` follows its share:
/// processes started together join one after another, and every join moves partitions.
const SETTLE: Duration = Duration::from_secs(2);
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
    let group = if options.shared {
        Some(Arc::new(join_group(&engine).await?))
    } else {
        None
    };
    let mut rounds = Rounds {
        engine,
        options,
        cancel: cancel.clone(),
        backfills: FuturesUnordered::new(),
        running: BTreeSet::new(),
        failed_at: HashMap::new(),
        group,
        planned_generation: 0,
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
            Err(e) if rounds.handed_over(&e) => {
                tracing::info!(message = "another process took over partitions of this round; following the new share", error = %e);
                tokio::select! {
                    _ = cancel.cancelled() => return Ok(()),
                    _ = tokio::time::sleep(LOOK_AT_THE_GROUP_EVERY) => {}
                }
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
    /// With `shared`: this process's membership in the group that shares the partitions out.
    group: Option<Arc<GroupMember>>,
    /// The group's generation the current round was planned under.
    planned_generation: u64,
}

impl<E: Send + Sync + 'static> Rounds<E> {
    /// Whether `error` ended a shared round because another process took over some of its
    /// partitions: its positions moved under it (compare-and-set), or the group moved partitions
    /// while the round wrote (a new row of a per-aggregate table written by both). Nothing of the
    /// batch was applied; the next round follows the new share.
    fn handed_over(&self, error: &EngineError) -> bool {
        let Some(group) = &self.group else {
            return false;
        };
        matches!(error, EngineError::Sink(SinkError::PositionConflict { .. }))
            || group.assignment().generation != self.planned_generation
    }

    /// This process's share of the partitions, once the group's assignment has stayed put for
    /// [`SETTLE`]; None until then (a shared run) or when the process follows everything alone.
    fn share(&mut self) -> Option<Sharing> {
        let Some(group) = &self.group else {
            return Some(Sharing::Alone);
        };
        let assignment = group.assignment();
        self.planned_generation = assignment.generation;
        assignment
            .still_for(SETTLE)
            .then_some(Sharing::Partitions(assignment.partitions))
    }

    /// One round: start the backfills that are missing, then follow the active builds until the set
    /// of builds changes, a backfill ends, or (with `exit_when_caught_up`) everything has caught up.
    /// Returns whether `run` is done.
    async fn round(&mut self) -> Result<bool> {
        let pending = self.start_backfills().await?;
        let targets = self.follow_targets().await?;
        let followed: BTreeSet<i64> = targets.iter().map(|t| t.build.build_id).collect();
        let round = self.cancel.child_token();
        let sharing = self.share();
        let watcher = tokio::spawn(cancel_when_builds_change(
            self.engine.clone(),
            followed,
            self.group.clone().map(|g| (g, self.planned_generation)),
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
                match sharing {
                    None => {
                        // The group is still moving partitions: plan again once it has settled.
                        tokio::select! {
                            _ = round.cancelled() => {}
                            _ = tokio::time::sleep(SETTLE) => {}
                        }
                        Ok(None)
                    }
                    Some(Sharing::Partitions(mine)) if mine.is_empty() => {
                        // More processes than partitions, or a group still forming: nothing to
                        // follow until the group moves partitions here.
                        round.cancelled().await;
                        Ok(None)
                    }
                    Some(_) if targets.is_empty() => {
                        round.cancelled().await;
                        Ok(None)
                    }
                    Some(sharing) => {
                        follow::follow_sharing(engine, targets, until, &round, "following", &sharing).await.map(Some)
                    }
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
        // A follow cut short (the builds or the group's partitions changed) has not caught up,
        // whatever it had reached: only one that ended by itself has.
        let ended_by_itself = !round.is_cancelled();
        round.cancel();
        let _ = watcher.await;
        outcome.map(|followed| followed.is_some() && exits_when_caught_up && ended_by_itself)
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
            let shared = match self.group {
                Some(_) => match self.shared_backfill(projection).await? {
                    Some(shared) => shared,
                    None => continue,
                },
                None => false,
            };
            tracing::info!(message = "backfilling in the background", projection = %name, version = projection.version(),
                serving = ?active.map(|b| b.version), shared);
            self.running.insert(name.clone());
            let (engine, opts, cancel) = (
                self.engine.clone(),
                self.options.rebuild.clone(),
                self.cancel.child_token(),
            );
            self.backfills.push(Box::pin(async move {
                let names = std::slice::from_ref(&name);
                let result = if shared {
                    super::shared::rebuild_shared(&engine, names, &opts, &cancel).await
                } else {
                    rebuild::rebuild(&engine, names, &opts, &cancel).await
                };
                (name, result)
            }));
        }
        Ok(pending)
    }

    /// How a shared run backfills `projection`: Some(true) to replay a share of it with the other
    /// processes (`rebuild --shared` joins the build they load, or creates it); Some(false) to
    /// resume alone a build whose loading is over but that nobody finishes (the process that
    /// claimed it died: a plain rebuild resumes it where it stopped); None while another process
    /// finishes it.
    async fn shared_backfill(
        &self,
        projection: &crate::projection::DynProjection<E>,
    ) -> Result<Option<bool>> {
        let unfinished = rebuild::unfinished_build(&self.engine, projection).await?;
        let Some(build) = unfinished.filter(|b| b.phase != Phase::Loading) else {
            return Ok(Some(true));
        };
        let finishing = lock::is_held_by_anyone(
            self.engine.catalog.pool(),
            LockKind::Rebuild,
            projection.name(),
        )
        .await?;
        if finishing {
            tracing::debug!(
                message = "another process finishes the backfill",
                projection = projection.name(),
                build_id = build.build_id
            );
            return Ok(None);
        }
        Ok(Some(false))
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

/// Join the consumer group of every `run --shared` process of these projections on this
/// database: the group's name says both, so that runs of other databases (or other projection
/// sets) on the same brokers never share partitions with these.
async fn join_group<E: Send + Sync + 'static>(engine: &Engine<E>) -> Result<GroupMember> {
    let database: String = sqlx::query_scalar("SELECT current_database()::text")
        .fetch_one(engine.catalog.pool())
        .await
        .map_err(|source| SinkError::Database {
            context: "reading the database's name for the consumer group".into(),
            source,
        })?;
    let mut names: Vec<&str> = engine.projections.iter().map(|p| p.name()).collect();
    names.sort_unstable();
    let group = format!("reproject-run-{database}-{}", names.join("+"));
    let member = super::shared::join_group(engine, &group).await?;
    tracing::info!(message = "sharing the follow", %group);
    Ok(member)
}

fn is_followed(phase: Phase) -> bool {
    matches!(phase, Phase::Active | Phase::Ready)
}

/// Cancel `round` once the followed builds are no longer `followed` (a swap, here or by another
/// process), checking every [`REPLAN_EVERY`], or once the group's generation is no longer the one
/// the round was planned under (`group`), checking every [`LOOK_AT_THE_GROUP_EVERY`]; return when
/// `round` ends.
async fn cancel_when_builds_change<E: Send + Sync + 'static>(
    engine: Arc<Engine<E>>,
    followed: BTreeSet<i64>,
    group: Option<(Arc<GroupMember>, u64)>,
    round: CancellationToken,
) {
    let mut builds_looked_at = Instant::now();
    loop {
        tokio::select! {
            _ = round.cancelled() => return,
            _ = tokio::time::sleep(LOOK_AT_THE_GROUP_EVERY) => {}
        }
        if let Some((member, generation)) = &group {
            if member.assignment().generation != *generation {
                round.cancel();
                return;
            }
        }
        if builds_looked_at.elapsed() < REPLAN_EVERY {
            continue;
        }
        builds_looked_at = Instant::now();
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
