//! The aggregate index: for every aggregate, the first and last offset of its events per partition,
//! recorded while a full replay reads the log anyway, so that `replay` can read just that range.
//!
//! A replay replaces a topic's whole index at once: it is built in a new table without an index,
//! bulk-loaded with COPY, indexed, then renamed over the old one in the same transaction, so readers
//! see the old index or the new one. Its coverage says how far each partition was read; events past
//! that are not in the index and must be looked for by reading on from there.

use std::collections::BTreeMap;

use rustc_hash::FxHashMap;
use sqlx::{Connection, PgConnection, PgPool};

use super::writer::copy_into;
use super::{Context, Result};
use crate::projection::{sort_on_prefix, Value};
use crate::source::Topics;

/// The first and last offset at which an aggregate's events were seen in one partition.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Span {
    /// A partition id (see [`Topics`]).
    pub partition: i32,
    pub first: i64,
    pub last: i64,
}

/// Collected by the reader during a replay: one map per partition, looked up by the record's
/// aggregate id without allocating unless the aggregate is new.
///
/// It also checks each aggregate's sequence numbers as they go by (they start at 1 and grow by one
/// per event): a gap means events are missing from the log, which no projection could notice.
#[derive(Default, Debug)]
pub struct AggregateIndex {
    /// To name partitions in the gap examples.
    topics: Option<Topics>,
    partitions: BTreeMap<i32, FxHashMap<Box<str>, Entry>>,
    /// Rough heap bytes held, for the memory budget.
    approx_bytes: usize,
    /// Partitions read from offset 0, where an aggregate's first event must be sequence 1.
    from_start: std::collections::BTreeSet<i32>,
    pub sequence_gaps: u64,
    /// A sequence number at or below the one before (a copy with another event id, or reordering).
    pub sequence_repeats: u64,
    pub gap_examples: Vec<String>,
}

#[derive(Clone, Copy, Debug)]
struct Entry {
    first: i64,
    last: i64,
    sequence: u64,
}

pub const GAP_EXAMPLES: usize = 5;

impl AggregateIndex {
    /// An empty index of partitions of `topics`.
    pub fn of(topics: Topics) -> AggregateIndex {
        AggregateIndex {
            topics: Some(topics),
            ..AggregateIndex::default()
        }
    }

    /// Expect sequence 1 for an aggregate first seen in `partition` (it is read from offset 0).
    pub fn read_from_start(&mut self, partition: i32) {
        self.from_start.insert(partition);
    }

    /// Note an event of `aggregate_id` at `offset` with its sequence number. Offsets arrive in
    /// increasing order per partition.
    #[inline]
    pub fn record(&mut self, aggregate_id: &str, partition: i32, offset: i64, sequence: u64) {
        let map = self.partitions.entry(partition).or_default();
        let expected = match map.get_mut(aggregate_id) {
            Some(entry) => {
                entry.last = offset;
                let expected = entry.sequence + 1;
                entry.sequence = entry.sequence.max(sequence);
                // Sequence 0: the record carries none (a framing without one); nothing to check.
                (sequence != 0).then_some(expected)
            }
            None => {
                // The id's allocation, its boxed pointer and entry, and the map's slot overhead.
                self.approx_bytes += aggregate_id.len() + 56;
                map.insert(
                    aggregate_id.into(),
                    Entry {
                        first: offset,
                        last: offset,
                        sequence,
                    },
                );
                (sequence != 0 && self.from_start.contains(&partition)).then_some(1)
            }
        };
        match expected {
            Some(e) if sequence > e => {
                self.sequence_gaps += 1;
                if self.gap_examples.len() < GAP_EXAMPLES {
                    let at = match &self.topics {
                        Some(topics) => topics.label(partition),
                        None => format!("partition {partition}"),
                    };
                    self.gap_examples.push(format!(
                        "aggregate {aggregate_id}: sequence {sequence} at {at} offset {offset}, expected {e}"
                    ));
                }
            }
            Some(e) if sequence < e => self.sequence_repeats += 1,
            _ => {}
        }
    }

    pub fn approx_bytes(&self) -> usize {
        self.approx_bytes
    }

    /// Take in the index another reader kept of other partitions (readers never share one).
    pub fn merge(&mut self, other: AggregateIndex) {
        self.partitions.extend(other.partitions);
        self.approx_bytes += other.approx_bytes;
        self.from_start.extend(other.from_start);
        self.sequence_gaps += other.sequence_gaps;
        self.sequence_repeats += other.sequence_repeats;
        self.gap_examples.extend(other.gap_examples);
        self.gap_examples.truncate(GAP_EXAMPLES);
    }

    pub fn len(&self) -> usize {
        self.partitions.values().map(|m| m.len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The rows of the topic at `index` (its partitions' ids are one range).
    fn rows<'a>(
        &'a self,
        topics: &'a Topics,
        index: usize,
    ) -> impl Iterator<Item = [Value; 5]> + 'a {
        let partitions = self.partitions.range(Topics::ids_of_topic(index));
        partitions.flat_map(move |(&partition, map)| {
            map.iter().map(move |(id, entry)| {
                [
                    Value::text(topics.topic_of(partition)),
                    Value::text(&**id),
                    Value::BigInt(i64::from(topics.partition_of(partition))),
                    Value::BigInt(entry.first),
                    Value::BigInt(entry.last),
                ]
            })
        })
    }
}

/// What the index knows about one aggregate: where its events lie, and up to which offset (per
/// partition) the index covers the log.
#[derive(Clone, Debug, Default)]
pub struct Located {
    pub spans: Vec<Span>,
    pub covered_through: BTreeMap<i32, i64>,
}

/// Replace the index of `topics` with `index`, which covers each partition (id) up to
/// `covered_through`.
pub async fn replace(
    conn: &mut PgConnection,
    topics: &Topics,
    index: &AggregateIndex,
    covered_through: &BTreeMap<i32, i64>,
) -> Result<u64> {
    let mut tx = conn
        .begin()
        .await
        .context(|| "starting to write the aggregate index".into())?;
    // Two rebuilds finishing together take turns instead of racing on the rename.
    sqlx::raw_sql(
        "LOCK TABLE reproject.aggregate_index_coverage IN SHARE ROW EXCLUSIVE MODE;
         DROP TABLE IF EXISTS reproject.aggregate_offsets_next;
         CREATE TABLE reproject.aggregate_offsets_next (LIKE reproject.aggregate_offsets);",
    )
    .execute(&mut *tx)
    .await
    .context(|| "preparing the new aggregate index".into())?;
    // In primary-key order: the key is built afterwards, and on rows already in its order
    // PostgreSQL's sort has little to do. Within one topic, by aggregate id first.
    let mut rows = Vec::new();
    for topic in 0..topics.len() {
        rows.extend(sort_on_prefix(
            index.rows(topics, topic),
            |row| row[1].order_prefix(),
            |a, b| a[1..3].cmp(&b[1..3]),
        ));
    }
    let written = copy_into(
        &mut tx,
        "reproject.aggregate_offsets_next",
        5,
        rows.iter(),
        |r| r.as_slice(),
    )
    .await?;
    sqlx::query(
        "INSERT INTO reproject.aggregate_offsets_next SELECT * FROM reproject.aggregate_offsets WHERE topic <> ALL($1)",
    )
    .bind(topics.names())
    .execute(&mut *tx)
    .await
    .context(|| "keeping the index of other topics".into())?;
    sqlx::raw_sql(
        "ALTER TABLE reproject.aggregate_offsets_next ADD PRIMARY KEY (topic, aggregate_id, partition);
         DROP TABLE reproject.aggregate_offsets;
         ALTER TABLE reproject.aggregate_offsets_next RENAME TO aggregate_offsets;
         ALTER INDEX reproject.aggregate_offsets_next_pkey RENAME TO aggregate_offsets_pkey;",
    )
    .execute(&mut *tx)
    .await
    .context(|| "swapping in the new aggregate index".into())?;
    sqlx::query("DELETE FROM reproject.aggregate_index_coverage WHERE topic = ANY($1)")
        .bind(topics.names())
        .execute(&mut *tx)
        .await
        .context(|| "replacing the aggregate index coverage".into())?;
    for (&partition, &through) in covered_through {
        sqlx::query(
            "INSERT INTO reproject.aggregate_index_coverage (topic, partition, covered_through) VALUES ($1, $2, $3)",
        )
        .bind(topics.topic_of(partition))
        .bind(topics.partition_of(partition))
        .bind(through)
        .execute(&mut *tx)
        .await
        .context(|| "recording the aggregate index coverage".into())?;
    }
    tx.commit()
        .await
        .context(|| "committing the aggregate index".into())?;
    Ok(written)
}

/// Where `aggregate_id`'s events lie in `topics`, as far as the index knows. No coverage means no
/// index.
pub async fn locate(pool: &PgPool, topics: &Topics, aggregate_id: &str) -> Result<Located> {
    let spans: Vec<(String, i64, i64, i64)> = sqlx::query_as(
        "SELECT topic, partition, first_offset, last_offset FROM reproject.aggregate_offsets
         WHERE topic = ANY($1) AND aggregate_id = $2 ORDER BY topic, partition",
    )
    .bind(topics.names())
    .bind(aggregate_id)
    .fetch_all(pool)
    .await
    .context(|| format!("looking up aggregate {aggregate_id} in the aggregate index"))?;
    let coverage: Vec<(String, i32, i64)> = sqlx::query_as(
        "SELECT topic, partition, covered_through FROM reproject.aggregate_index_coverage WHERE topic = ANY($1)",
    )
    .bind(topics.names())
    .fetch_all(pool)
    .await
    .context(|| "reading the aggregate index coverage".into())?;
    Ok(Located {
        spans: spans
            .into_iter()
            .filter_map(|(topic, partition, first, last)| {
                Some(Span {
                    partition: topics.id_of(&topic, i32::try_from(partition).ok()?)?,
                    first,
                    last,
                })
            })
            .collect(),
        covered_through: coverage
            .into_iter()
            .filter_map(|(topic, partition, through)| {
                Some((topics.id_of(&topic, partition)?, through))
            })
            .collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sequence_gaps_and_repeats_are_counted_per_aggregate() {
        let mut index = AggregateIndex::default();
        index.read_from_start(0);
        // a: 1, 2, 4 (gap); b: starts at 2 (gap at the start); c on partition 1 (not read from 0).
        index.record("a", 0, 0, 1);
        index.record("a", 0, 1, 2);
        index.record("b", 0, 2, 2);
        index.record("a", 0, 3, 4);
        index.record("a", 0, 4, 4);
        index.record("c", 1, 0, 7);
        index.record("c", 1, 1, 8);
        assert_eq!(index.sequence_gaps, 2);
        assert_eq!(index.sequence_repeats, 1);
        assert!(index.gap_examples[0].contains("aggregate b: sequence 2"));
        assert!(index.gap_examples[1]
            .contains("aggregate a: sequence 4 at partition 0 offset 3, expected 3"));
        assert_eq!(index.len(), 3);
    }
}
