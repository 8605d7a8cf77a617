//! The topics a build reads, and how one `i32` names a partition of any of them.
//!
//! Event-sourced systems often keep one topic per aggregate type, and a read model joins them. Inside
//! the engine a partition is named by one `i32`, its *partition id*: its topic's index in the build's
//! topics (sorted by name) times [`PARTITIONS_PER_TOPIC`], plus its partition number. With one topic,
//! which is the common case, the id is the partition number itself. Keeping it one integer keeps
//! positions, logical times and row clocks as small and fast as they were with one topic, and ordering
//! ids orders partitions by topic name, then partition: the logical-time rule's tie-break across
//! topics.
//!
//! An id means something only with the build's topics: every place that speaks to a person, to
//! Kafka or to the catalog turns it back into a topic name and a partition number
//! ([`Topics::topic_of`], [`Topics::partition_of`]). A build's topics are fixed when it is created.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use super::SourceError;

/// How many partition ids each topic spans: more partitions than any Kafka topic has in practice
/// (a cluster's limit is in the hundreds of thousands across all its topics).
pub const PARTITIONS_PER_TOPIC: i32 = 1 << 20;

/// At most this many topics per build, so that every id stays a positive `i32`.
pub const MAX_TOPICS: usize = (i32::MAX / PARTITIONS_PER_TOPIC) as usize;

/// Values per topic, then partition number.
pub type ByTopic = BTreeMap<String, BTreeMap<i32, i64>>;

/// The topics a build reads, sorted by name, without repeats. Cheap to clone.
#[derive(Clone, PartialEq, Eq)]
pub struct Topics(Arc<[String]>);

impl Topics {
    /// `names` in any order; repeats are dropped. Refuses an empty list and invalid names.
    pub fn new<S: Into<String>>(names: impl IntoIterator<Item = S>) -> Result<Topics, SourceError> {
        let mut names: Vec<String> = names.into_iter().map(Into::into).collect();
        names.sort();
        names.dedup();
        if names.is_empty() {
            return Err(SourceError::BadSetting(
                "no topic to read: name at least one (--topic, REPROJECT_TOPIC or `topics` in the config file)".into(),
            ));
        }
        if names.len() > MAX_TOPICS {
            return Err(SourceError::BadSetting(format!(
                "{} topics: a build reads at most {MAX_TOPICS}",
                names.len()
            )));
        }
        for name in &names {
            check_topic_name(name)?;
        }
        Ok(Topics(names.into()))
    }

    /// Sorted by name.
    pub fn names(&self) -> &[String] {
        &self.0
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The id of partition `partition` of the topic at `index` in [`Topics::names`].
    pub fn id(&self, index: usize, partition: i32) -> i32 {
        Self::ids_of_topic(index).start + partition
    }

    /// The id of `partition` of `topic`, if the build reads that topic.
    pub fn id_of(&self, topic: &str, partition: i32) -> Option<i32> {
        self.index_of(topic).map(|i| self.id(i, partition))
    }

    /// Where `topic` sits in [`Topics::names`]. With one topic, no string is compared.
    pub fn index_of(&self, topic: &str) -> Option<usize> {
        if self.0.len() == 1 {
            return (self.0[0] == topic).then_some(0);
        }
        self.0.binary_search_by(|t| t.as_str().cmp(topic)).ok()
    }

    /// A partition id's topic index (into [`Topics::names`]) and Kafka partition number.
    pub fn split(id: i32) -> (usize, i32) {
        (
            (id / PARTITIONS_PER_TOPIC) as usize,
            id % PARTITIONS_PER_TOPIC,
        )
    }

    /// The ids of every partition of the topic at `index`, in order.
    pub fn ids_of_topic(index: usize) -> std::ops::Range<i32> {
        let first = index as i32 * PARTITIONS_PER_TOPIC;
        first..first + PARTITIONS_PER_TOPIC
    }

    /// The topic of a partition id.
    pub fn topic_of(&self, id: i32) -> &str {
        self.0.get(Self::split(id).0).map_or("?", String::as_str)
    }

    /// The Kafka partition number of a partition id.
    pub fn partition_of(&self, id: i32) -> i32 {
        Self::split(id).1
    }

    /// A partition id as people write it: `topic/partition`.
    pub fn label(&self, id: i32) -> String {
        format!("{}/{}", self.topic_of(id), self.partition_of(id))
    }

    /// Per-partition-id values (positions, log ends) grouped by topic name, then partition number:
    /// how they are shown to people and in JSON.
    pub fn by_topic(&self, values: &BTreeMap<i32, i64>) -> ByTopic {
        let mut out = ByTopic::new();
        for (&id, &value) in values {
            out.entry(self.topic_of(id).to_string())
                .or_default()
                .insert(self.partition_of(id), value);
        }
        out
    }

    /// Check that a topic's partition numbers fit under [`PARTITIONS_PER_TOPIC`].
    pub fn check_partition_count(topic: &str, partitions: usize) -> Result<(), SourceError> {
        if partitions > PARTITIONS_PER_TOPIC as usize {
            return Err(SourceError::BadSetting(format!(
                "topic {topic} has {partitions} partitions; reproject reads at most {PARTITIONS_PER_TOPIC} per topic"
            )));
        }
        Ok(())
    }
}

impl fmt::Display for Topics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0.join(", "))
    }
}

impl fmt::Debug for Topics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.0.iter()).finish()
    }
}

/// A Kafka topic name: letters, digits, '.', '_', '-', at most 249 characters.
pub fn check_topic_name(topic: &str) -> Result<(), SourceError> {
    let valid = !topic.is_empty()
        && topic.len() <= 249
        && topic
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if valid {
        Ok(())
    } else {
        Err(SourceError::BadSetting(format!(
            "topic {topic:?} is not a valid Kafka topic name (letters, digits, '.', '_', '-', at most 249)"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_topic_keeps_partition_numbers_as_ids() {
        let topics = Topics::new(["billing.invoices"]).expect("valid");
        assert_eq!(topics.id_of("billing.invoices", 7), Some(7));
        assert_eq!(topics.id_of("other", 7), None);
        assert_eq!(topics.label(7), "billing.invoices/7");
    }

    #[test]
    fn ids_order_partitions_by_topic_name_then_partition_whatever_order_topics_are_given_in() {
        let topics = Topics::new(["ledger.transfers", "ledger.accounts", "ledger.transfers"])
            .expect("valid");
        assert_eq!(topics.names(), ["ledger.accounts", "ledger.transfers"]);
        let accounts_last = topics.id_of("ledger.accounts", 200_000).expect("known");
        let transfers_first = topics.id_of("ledger.transfers", 0).expect("known");
        assert!(accounts_last < transfers_first);
        assert_eq!(topics.topic_of(transfers_first + 3), "ledger.transfers");
        assert_eq!(topics.partition_of(transfers_first + 3), 3);
        assert_eq!(topics.label(accounts_last), "ledger.accounts/200000");
    }

    #[test]
    fn bad_topic_lists_are_refused_with_the_reason() {
        let empty = Topics::new(Vec::<String>::new())
            .err()
            .map(|e| e.to_string());
        assert!(empty.is_some_and(|e| e.contains("no topic")));
        let bad = Topics::new(["ok", "not ok"]).err().map(|e| e.to_string());
        assert!(
            bad.is_some_and(|e| e.contains("\"not ok\"")),
            "names the bad one"
        );
        assert!(Topics::check_partition_count("t", 2_000_000).is_err());
    }
}
