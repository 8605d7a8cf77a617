//! The replay's fold: the readers' batches folded into each build's rows in memory, one batch at a
//! time, on a blocking thread of its own.
//!
//! It also keeps the records passed over under the dead-letter policy (stopping at the budget), the
//! memory budget (past it, the rows are flushed into the build's still unpublished tables and read
//! back as later changes need them, see `sink::spill`), and what each reader hands over with its last
//! batch: where each aggregate's events lie and the source checks.

use super::reader::{self, Batch, DeadLetter, SourceChecks};
use super::{BadRecordPolicy, EngineError, Result};
use crate::projection::{DynProjection, RowStore};
use crate::sink::aggregate_index::AggregateIndex;
use crate::sink::catalog::Positions;
use crate::sink::spill::SpillState;
use crate::sink::writer::BuildTables;
use crate::sink::Context;
use crate::sink::SliceGate;

/// What the fold of a whole replay gives the bulk load.
pub struct FoldResult {
    /// Per build, its rows (all of them, or what is left since the last spill).
    pub stores: Vec<RowStore>,
    /// With a memory budget: the spill's connection (it holds the staging tables) and what each
    /// build spilled.
    pub spill: Option<(sqlx::PgConnection, Vec<SpillState>)>,
    /// Next offset per partition: where the replay ended.
    pub positions: Positions,
    pub events: u64,
    /// None when a reader gave it up (over its memory share).
    pub aggregates: Option<AggregateIndex>,
    pub source_checks: Option<SourceChecks>,
    /// The most the fold held, in bytes (rows and remembered keys of spilled builds).
    pub peak_bytes: usize,
    /// Per build, the records passed over under the dead-letter policy.
    pub dead_letters: Vec<Vec<DeadLetter>>,
}

/// One build the fold writes: its code, and where its tables are.
pub struct FoldBuild<E> {
    pub projection: DynProjection<E>,
    pub build_id: i64,
    pub schema: String,
}

impl<E> FoldBuild<E> {
    fn tables(&self) -> BuildTables<'_> {
        BuildTables {
            build_id: self.build_id,
            projection: self.projection.name(),
            version: self.projection.version(),
            schema: &self.schema,
            specs: self.projection.tables(),
        }
    }
}

/// Batches gathered into steps of about a given number of bytes of changes, for a fold that reads
/// rows back from the database before it folds them: a read-back costs a few round trips however
/// few rows it brings, and batches under a budget are small. A reader's last batch ends a step, so
/// a step never waits for batches that will not come.
pub struct Steps {
    bytes: usize,
    pending: Vec<Batch>,
}

impl Steps {
    /// Steps of `bytes` of changes; 0 makes each batch a step of its own.
    pub fn of(bytes: usize) -> Steps {
        Steps {
            bytes,
            pending: Vec::new(),
        }
    }

    /// `batch` added to the step under way: the step's batches, in order, once it is full.
    pub fn push(&mut self, batch: Batch) -> Option<Vec<Batch>> {
        let done = batch.done;
        self.pending.push(batch);
        let bytes: usize = self.pending.iter().map(|b| b.change_bytes).sum();
        (done || bytes >= self.bytes).then(|| std::mem::take(&mut self.pending))
    }
}

pub struct Fold<E> {
    builds: Vec<FoldBuild<E>>,
    /// The fold's share of the memory budget, if there is one.
    budget: Option<usize>,
    /// Under a budget: the batches folded as one step (see [`Fold::apply`]).
    steps: Option<Steps>,
    policy: BadRecordPolicy,
    runtime: tokio::runtime::Handle,
    /// How many readers share the partitions out: each ends with a batch marked done.
    readers: usize,
    readers_done: usize,
    result: FoldResult,
    /// The throttle spills go through: they wait while it holds writes, and their first COPY is
    /// paced in slices.
    governor: Option<std::sync::Arc<super::throttle::Governor>>,
}

impl<E: Send + Sync + 'static> Fold<E> {
    /// A fold of `builds`, starting at `start` (each partition's first offset). With a budget it
    /// connects to `database_url` to spill; call it on a blocking thread of `runtime`.
    pub fn new(
        builds: Vec<FoldBuild<E>>,
        start: Positions,
        readers: usize,
        budget: Option<usize>,
        policy: BadRecordPolicy,
        database_url: &str,
        runtime: tokio::runtime::Handle,
    ) -> Result<Fold<E>> {
        let spill = match budget {
            Some(_) => Some((
                runtime
                    .block_on(<sqlx::PgConnection as sqlx::Connection>::connect(
                        database_url,
                    ))
                    .context(|| "connecting the replay's spill writer".into())?,
                builds
                    .iter()
                    .map(|b| SpillState::new(b.projection.tables().len()))
                    .collect(),
            )),
            None => None,
        };
        let result = FoldResult {
            stores: builds
                .iter()
                .map(|b| RowStore::new(b.projection.tables().len()))
                .collect(),
            spill,
            positions: start,
            events: 0,
            aggregates: Some(AggregateIndex::default()),
            source_checks: None,
            peak_bytes: 0,
            dead_letters: vec![Vec::new(); builds.len()],
        };
        Ok(Fold {
            builds,
            budget,
            policy,
            runtime,
            readers,
            readers_done: 0,
            result,
            governor: None,
            steps: None,
        })
    }

    /// Under a budget, fold batches in steps of about `bytes` of changes (see [`Fold::apply`]).
    pub fn in_steps_of(mut self, bytes: Option<usize>) -> Self {
        self.steps = bytes.map(Steps::of);
        self
    }

    /// Spill through the process's throttle.
    pub fn governed_by(
        mut self,
        governor: Option<std::sync::Arc<super::throttle::Governor>>,
    ) -> Self {
        self.governor = governor;
        self
    }

    /// Events folded so far.
    pub fn events(&self) -> u64 {
        self.result.events
    }

    /// Fold one batch. True once every reader's last batch is in: then [`finish`](Self::finish).
    ///
    /// With a step set (under a memory budget, whose batches are small), batches are gathered until
    /// their changes take a step's bytes, and folded together: rows spilled earlier are read back
    /// once per step, since a read-back costs a few round trips however few rows it brings.
    pub fn apply(&mut self, batch: Batch) -> Result<bool> {
        let Some(steps) = self.steps.as_mut().filter(|_| self.result.spill.is_some()) else {
            return self.fold_step(vec![batch]);
        };
        match steps.push(batch) {
            Some(batches) => self.fold_step(batches),
            None => Ok(false),
        }
    }

    /// Fold `batches` in order: read back what they touch that was spilled, fold them, and spill
    /// if the fold is then over its budget.
    fn fold_step(&mut self, mut batches: Vec<Batch>) -> Result<bool> {
        if let Some((conn, states)) = self.result.spill.as_mut() {
            for (i, state) in states.iter_mut().enumerate() {
                let tables = self.builds[i].tables();
                let changes = batches
                    .iter()
                    .filter_map(|b| b.changes.get(i))
                    .flat_map(|log| log.changes());
                self.runtime.block_on(state.read_back(
                    conn,
                    tables,
                    &mut self.result.stores[i],
                    changes,
                ))?;
            }
        }
        let mut finished = false;
        for batch in batches.drain(..) {
            finished |= self.fold_batch(batch)?;
        }
        let held = self.held_bytes();
        self.result.peak_bytes = self.result.peak_bytes.max(held);
        if !finished && self.budget.is_some_and(|budget| held > budget) {
            self.spill(held)?;
        }
        Ok(finished)
    }

    /// Fold one batch whose spilled rows were read back. True once every reader's last batch is in.
    fn fold_batch(&mut self, batch: Batch) -> Result<bool> {
        for letter in batch.dead_letters {
            for &i in &letter.targets {
                let build = &self.builds[i];
                reader::check_dead_letter_budget(
                    self.policy,
                    build.projection.name(),
                    build.build_id,
                    self.result.dead_letters[i].len() as u64,
                    &[&letter],
                )?;
                self.result.dead_letters[i].push(letter.clone());
            }
        }
        let mut logs = batch.changes;
        for (i, changes) in logs.iter_mut().enumerate() {
            let projection = &self.builds[i].projection;
            for (at, change) in changes.drain() {
                self.result.stores[i]
                    .apply(projection.tables(), change, at)
                    .map_err(|e| EngineError::Projection {
                        projection: projection.name().to_string(),
                        reason: e.to_string(),
                    })?;
            }
        }
        if let Some(recycle) = batch.recycle {
            recycle.give_back(logs);
        }
        self.result.events += batch.events;
        self.result.positions.extend(batch.next);
        if batch.done {
            self.readers_done += 1;
            // A reader that gave its index up (over its memory share) leaves it incomplete.
            self.result.aggregates = match (self.result.aggregates.take(), batch.aggregates) {
                (Some(mut all), Some(mine)) => {
                    all.merge(mine);
                    Some(all)
                }
                _ => None,
            };
            if let Some(checks) = batch.source_checks {
                match self.result.source_checks.as_mut() {
                    Some(all) => all.merge(checks),
                    None => self.result.source_checks = Some(checks),
                }
            }
        }
        Ok(self.readers_done == self.readers)
    }

    pub fn finish(self) -> FoldResult {
        self.result
    }

    /// Build `index`'s tables (in the order the fold was given its builds).
    pub fn build_tables(&self, index: usize) -> BuildTables<'_> {
        self.builds[index].tables()
    }

    /// Build `index`'s tables and its rows so far.
    pub fn tables_and_store(&mut self, index: usize) -> (BuildTables<'_>, &mut RowStore) {
        (self.builds[index].tables(), &mut self.result.stores[index])
    }

    /// What the rows, and the remembered keys of spilled builds, take.
    pub fn held_bytes(&self) -> usize {
        self.result
            .stores
            .iter()
            .map(RowStore::approx_bytes)
            .sum::<usize>()
            + self.result.spill.as_ref().map_or(0, |(_, states)| {
                states.iter().map(SpillState::approx_bytes).sum()
            })
    }

    /// Flush every build's rows into its tables and start its store afresh.
    fn spill(&mut self, held: usize) -> Result<()> {
        for i in 0..self.builds.len() {
            let started = std::time::Instant::now();
            let tables = self.builds[i].tables();
            let Some((conn, states)) = self.result.spill.as_mut() else {
                return Ok(());
            };
            let store = &self.result.stores[i];
            self.runtime.block_on(async {
                let mut tx = sqlx::Connection::begin(conn)
                    .await
                    .context(|| "starting a spill".into())?;
                let gate = self.governor.as_deref();
                if let Some(governor) = gate {
                    governor.wait_while_held("spill", governor.released()).await;
                }
                let rows = states[i]
                    .flush(&mut tx, tables, store, gate.map(|g| g as &dyn SliceGate))
                    .await?;
                tx.commit()
                    .await
                    .context(|| format!("committing a spill to {}", tables.schema))?;
                if let Some(governor) = gate {
                    governor.committed(1);
                }
                tracing::info!(
                    message = "fold over its memory budget: flushed to the build's tables",
                    projection = tables.projection,
                    build_id = tables.build_id,
                    rows,
                    fold_bytes = held,
                    budget = self.budget,
                    seconds = started.elapsed().as_secs_f64()
                );
                Ok::<_, EngineError>(())
            })?;
            self.result.stores[i] = RowStore::new(self.builds[i].projection.tables().len());
        }
        Ok(())
    }
}
