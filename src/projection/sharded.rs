//! A fold the reader threads share: one projection's rows split by key into shards, each behind its
//! own lock, so that every reader folds its own batches instead of handing them to one fold thread.
//!
//! A row's changes still apply in the order its partition's reader emitted them (one reader owns a
//! partition, and folds its batches one after another), so a per-aggregate row comes out as with one
//! fold; rows that gather partitions resolve by their clocks whatever the interleaving, as always.

use std::hash::{Hash, Hasher};
use std::sync::Mutex;

use super::change::{Change, ChangeLog};
use super::clock::LogicalTime;
use super::fold::{FoldError, RowStore};
use super::table::TableSpec;
use super::value::Value;

/// One projection's rows, split into shards by key.
pub struct ShardedStore {
    shards: Vec<Mutex<RowStore>>,
}

/// A reader's buffers for splitting a batch's changes by shard, kept between batches.
#[derive(Default)]
pub struct ShardBuckets(Vec<Vec<(LogicalTime, Change)>>);

impl ShardedStore {
    pub fn new(table_count: usize, shards: usize) -> ShardedStore {
        ShardedStore {
            shards: (0..shards.max(1))
                .map(|_| Mutex::new(RowStore::new(table_count)))
                .collect(),
        }
    }

    /// The shard of a change: from its table and key, by the high bits of a hash mixed once more,
    /// since the shard's own hash table indexes by the low bits of the same kind of hash.
    fn shard_of(&self, specs: &[TableSpec], change: &Change) -> usize {
        let table = change.table();
        let Some(spec) = specs.get(table) else {
            return 0;
        };
        let key: &[Value] = change.key(spec.key_len);
        let mut hasher = rustc_hash::FxHasher::default();
        table.hash(&mut hasher);
        key.hash(&mut hasher);
        let mixed = hasher.finish().wrapping_mul(0x9E37_79B9_7F4A_7C15);
        ((mixed >> 32) as usize) % self.shards.len()
    }

    /// Fold every change of `log` (emptied, keeping its room), each shard under its lock once.
    /// `reader` numbers the reader folding: readers start at different shards (7 apart, which
    /// meets every shard of a power-of-two count) so that they seldom wait on one another.
    pub fn apply(
        &self,
        specs: &[TableSpec],
        log: &mut ChangeLog,
        buckets: &mut ShardBuckets,
        reader: usize,
    ) -> Result<(), FoldError> {
        let n = self.shards.len();
        let first = reader.wrapping_mul(7) % n;
        buckets.0.resize_with(n, Vec::new);
        for (at, change) in log.drain() {
            let shard = self.shard_of(specs, &change);
            buckets.0[shard].push((at, change));
        }
        for step in 0..n {
            let shard = (first + step) % n;
            let bucket = &mut buckets.0[shard];
            if bucket.is_empty() {
                continue;
            }
            let mut store = self.shards[shard].lock().map_err(|_| FoldError {
                table: "-".into(),
                reason: "another reader failed while folding into the same rows".into(),
            })?;
            for (at, change) in bucket.drain(..) {
                store.apply(specs, change, at)?;
            }
        }
        Ok(())
    }

    /// The shards as one store: their keys are disjoint, so each shard's rows and clocks move in
    /// as they are.
    pub fn into_store(self) -> RowStore {
        let mut shards = self.shards.into_iter().map(|s| {
            s.into_inner()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
        });
        let Some(mut all) = shards.next() else {
            return RowStore::new(0);
        };
        let rest: Vec<RowStore> = shards.collect();
        // Room for every shard's rows at once: growing by doubling would rehash them again.
        for (t, table) in all.tables.iter_mut().enumerate() {
            table
                .rows
                .reserve(rest.iter().map(|s| s.tables[t].rows.len()).sum());
            table
                .clocks
                .reserve(rest.iter().map(|s| s.tables[t].clocks.len()).sum());
        }
        for shard in rest {
            for (mine, theirs) in all.tables.iter_mut().zip(shard.tables) {
                mine.rows.extend(theirs.rows);
                mine.clocks.extend(theirs.clocks);
                mine.approx_bytes += theirs.approx_bytes;
            }
        }
        all
    }
}
