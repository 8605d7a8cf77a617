//! What a bounded read checks on the source's side, besides each record: no offsets missing that the
//! broker should have served, and every aggregate's sequence numbers without gaps or repeats.

use std::collections::BTreeMap;

use crate::sink::aggregate_index::AggregateIndex;
use crate::sink::catalog::Positions;
use crate::source::Topics;

/// Source-side checks of a bounded read: per partition the records received against the range of
/// offsets read (a broker legitimately skips transaction markers and compacted records; anything
/// else missing is lost data), and the aggregates' sequence numbers, when the index was kept.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct SourceChecks {
    pub partitions: usize,
    pub records: i64,
    pub offsets: i64,
    pub offsets_skipped: i64,
    /// Partitions with offsets not received: `topic/partition` -> how many.
    pub skipped_by_partition: BTreeMap<String, i64>,
    /// Aggregates whose sequences were checked; None when the aggregate index was given up.
    pub aggregates: Option<u64>,
    pub sequence_gaps: u64,
    pub sequence_repeats: u64,
    pub gap_examples: Vec<String>,
    /// Events with sequence number 1: aggregates that began in the range read.
    pub aggregates_started: u64,
}

impl SourceChecks {
    /// Add the checks of another reader's partitions (readers never share a partition).
    pub fn merge(&mut self, other: SourceChecks) {
        self.partitions += other.partitions;
        self.records += other.records;
        self.offsets += other.offsets;
        self.offsets_skipped += other.offsets_skipped;
        self.skipped_by_partition.extend(other.skipped_by_partition);
        self.aggregates = self.aggregates.zip(other.aggregates).map(|(a, b)| a + b);
        self.sequence_gaps += other.sequence_gaps;
        self.sequence_repeats += other.sequence_repeats;
        self.gap_examples.extend(other.gap_examples);
        self.gap_examples
            .truncate(crate::sink::aggregate_index::GAP_EXAMPLES);
        self.aggregates_started += other.aggregates_started;
    }

    pub(super) fn of(
        topics: &Topics,
        start: &Positions,
        next: &Positions,
        received: &[Vec<i64>],
        index: Option<&AggregateIndex>,
        aggregates_started: u64,
    ) -> SourceChecks {
        let mut checks = SourceChecks {
            partitions: next.len(),
            aggregates_started,
            ..Default::default()
        };
        for (&p, &end) in next {
            let from = start.get(&p).copied().unwrap_or(end);
            let (topic, partition) = Topics::split(p);
            let got = received
                .get(topic)
                .and_then(|counts| counts.get(partition as usize))
                .copied()
                .unwrap_or(0);
            let range = (end - from).max(0);
            checks.records += got;
            checks.offsets += range;
            if range > got {
                checks.offsets_skipped += range - got;
                checks
                    .skipped_by_partition
                    .insert(topics.label(p), range - got);
            }
        }
        if let Some(index) = index {
            checks.aggregates = Some(index.len() as u64);
            checks.sequence_gaps = index.sequence_gaps;
            checks.sequence_repeats = index.sequence_repeats;
            checks.gap_examples = index.gap_examples.clone();
        }
        checks
    }
}
