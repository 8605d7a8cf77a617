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

/// Where a new index's rows come from.
enum Source<'a> {
    /// An index a replay kept in memory.
    Kept(&'a AggregateIndex),
    /// The pieces processes sharing a build recorded under its lead build, each partition's up to
    /// its coverage.
    Pieces { lead_build: i64 },
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
    let written = replace_within(&mut tx, topics, Source::Kept(index), covered_through).await?;
    tx.commit()
        .await
        .context(|| "committing the aggregate index".into())?;
    Ok(written)
}

/// Two rebuilds finishing together take turns on the index instead of racing on its rename; so do
/// two processes joining a shared build's pieces.
async fn take_turn_on_the_index(tx: &mut PgConnection) -> Result<()> {
    sqlx::query("LOCK TABLE reproject.aggregate_index_coverage IN SHARE ROW EXCLUSIVE MODE")
        .execute(tx)
        .await
        .context(|| "waiting for another process writing the aggregate index".into())?;
    Ok(())
}

/// Replace the index as [`replace`] says, from `source`, in the caller's transaction.
async fn replace_within(
    tx: &mut PgConnection,
    topics: &Topics,
    source: Source<'_>,
    covered_through: &BTreeMap<i32, i64>,
) -> Result<u64> {
    take_turn_on_the_index(&mut *tx).await?;
    sqlx::raw_sql(
        "DROP TABLE IF EXISTS reproject.aggregate_offsets_next;
         CREATE TABLE reproject.aggregate_offsets_next (LIKE reproject.aggregate_offsets);",
    )
    .execute(&mut *tx)
    .await
    .context(|| "preparing the new aggregate index".into())?;
    let written = match source {
        Source::Kept(index) => {
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
            copy_into(
                &mut *tx,
                "reproject.aggregate_offsets_next",
                5,
                rows.iter(),
                |r| r.as_slice(),
            )
            .await?
        }
        Source::Pieces { lead_build } => {
            // Pieces of rounds that were dropped repeat what others recorded: the first and last
            // offsets over all of them are the same facts about the log.
            let (mut names, mut partitions, mut through) = (Vec::new(), Vec::new(), Vec::new());
            for (&id, &end) in covered_through {
                names.push(topics.topic_of(id).to_string());
                partitions.push(i64::from(topics.partition_of(id)));
                through.push(end);
            }
            sqlx::query(
                "INSERT INTO reproject.aggregate_offsets_next
                 SELECT o.topic, o.aggregate_id, o.partition, min(o.first_offset), max(o.last_offset)
                 FROM reproject.shared_aggregate_offsets o
                 JOIN unnest($2::text[], $3::bigint[], $4::bigint[]) AS c(topic, partition, through)
                   ON c.topic = o.topic AND c.partition = o.partition AND o.first_offset < c.through
                 WHERE o.lead_build = $1
                 GROUP BY o.topic, o.aggregate_id, o.partition
                 ORDER BY o.topic, o.aggregate_id, o.partition",
            )
            .bind(lead_build)
            .bind(&names)
            .bind(&partitions)
            .bind(&through)
            .execute(&mut *tx)
            .await
            .context(|| format!("joining the aggregate index pieces of shared build {lead_build}"))?
            .rows_affected()
        }
    };
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
    Ok(written)
}

/// Record the piece of the aggregate index one round of a shared build read: `index`, of the
/// offsets `ranges` gives per partition id (from, to exclusive), under the shared set's
/// `lead_build`. Its own transaction: a piece is true of the log whether or not the round's rows
/// are kept.
pub async fn record_piece(
    conn: &mut PgConnection,
    lead_build: i64,
    topics: &Topics,
    index: &AggregateIndex,
    ranges: &BTreeMap<i32, (i64, i64)>,
) -> Result<u64> {
    let mut tx = conn
        .begin()
        .await
        .context(|| format!("starting to record an aggregate index piece of build {lead_build}"))?;
    let lead = Value::BigInt(lead_build);
    let mut rows = Vec::with_capacity(index.len());
    for topic in 0..topics.len() {
        rows.extend(
            index
                .rows(topics, topic)
                .map(|[t, id, p, first, last]| [lead.clone(), t, id, p, first, last]),
        );
    }
    let written = copy_into(
        &mut tx,
        "reproject.shared_aggregate_offsets",
        6,
        rows.iter(),
        |r| r.as_slice(),
    )
    .await?;
    for (&partition, &(from, to)) in ranges {
        sqlx::query(
            "INSERT INTO reproject.shared_aggregate_ranges (lead_build, partition, from_offset, to_offset) VALUES ($1, $2, $3, $4)",
        )
        .bind(lead_build)
        .bind(partition)
        .bind(from)
        .bind(to)
        .execute(&mut *tx)
        .await
        .context(|| format!("recording the offsets an aggregate index piece of build {lead_build} covers"))?;
    }
    tx.commit()
        .await
        .context(|| format!("committing an aggregate index piece of build {lead_build}"))?;
    Ok(written)
}

/// Join the pieces recorded under `lead_build` into the index of `topics`, if, from `start`, they
/// cover every partition (id) up to `targets` without a hole; then forget them. Returns the rows
/// written, or None when the pieces leave part of the log unindexed (rounds cut at a memory
/// budget keep no index): the index stays as it was.
pub async fn publish_pieces(
    conn: &mut PgConnection,
    lead_build: i64,
    topics: &Topics,
    start: &BTreeMap<i32, i64>,
    targets: &BTreeMap<i32, i64>,
) -> Result<Option<u64>> {
    // Read, join and forget the pieces in one turn: a second process finishing another build of
    // the set then finds none, rather than an index joined from pieces already forgotten.
    let mut tx = conn.begin().await.context(|| {
        format!("starting to join the aggregate index pieces of shared build {lead_build}")
    })?;
    take_turn_on_the_index(&mut tx).await?;
    let ranges: Vec<(i32, i64, i64)> = sqlx::query_as(
        "SELECT partition, from_offset, to_offset FROM reproject.shared_aggregate_ranges
         WHERE lead_build = $1 ORDER BY partition, from_offset",
    )
    .bind(lead_build)
    .fetch_all(&mut *tx)
    .await
    .context(|| format!("reading the aggregate index pieces of shared build {lead_build}"))?;
    let covered = covered_through(start, &ranges);
    let whole = targets
        .iter()
        .all(|(p, end)| covered.get(p).is_some_and(|c| c >= end));
    let written = if whole {
        Some(replace_within(&mut tx, topics, Source::Pieces { lead_build }, &covered).await?)
    } else {
        None
    };
    sqlx::raw_sql(&format!(
        "DELETE FROM reproject.shared_aggregate_offsets WHERE lead_build = {lead_build};
         DELETE FROM reproject.shared_aggregate_ranges WHERE lead_build = {lead_build};"
    ))
    .execute(&mut *tx)
    .await
    .context(|| format!("forgetting the aggregate index pieces of shared build {lead_build}"))?;
    tx.commit()
        .await
        .context(|| format!("committing the aggregate index of shared build {lead_build}"))?;
    Ok(written)
}

/// Per partition, how far from its `start` the ranges (partition, from, to), sorted, reach
/// without a hole.
fn covered_through(start: &BTreeMap<i32, i64>, ranges: &[(i32, i64, i64)]) -> BTreeMap<i32, i64> {
    let mut covered = start.clone();
    for &(partition, from, to) in ranges {
        if let Some(reached) = covered.get_mut(&partition) {
            if from <= *reached {
                *reached = (*reached).max(to);
            }
        }
    }
    covered
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
    fn pieces_cover_a_partition_only_as_far_as_they_reach_without_a_hole() {
        let start = BTreeMap::from([(0, 0), (1, 0), (2, 5)]);
        // Partition 0: two pieces that overlap (a round done twice), out of order; 1: a hole at
        // 10..20; 2: nothing.
        let ranges = [(0, 0, 10), (0, 5, 30), (0, 30, 40), (1, 0, 10), (1, 20, 30)];
        let mut sorted = ranges.to_vec();
        sorted.sort();
        let covered = covered_through(&start, &sorted);
        assert_eq!(covered, BTreeMap::from([(0, 40), (1, 10), (2, 5)]));
    }

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
