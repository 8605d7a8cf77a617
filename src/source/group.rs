//! Which partitions this process owns among the processes that share a build: Kafka's consumer
//! group protocol decides (membership, failure detection, rebalancing), nothing home-made.
//!
//! The group member only holds the membership: it subscribes to the build's topics, pauses every
//! partition it is given so that it never fetches a record, and publishes its assignment. Records
//! are read by the replay's own readers from the positions stored in PostgreSQL; the group's
//! committed offsets are never used (nor written). An assignment can change at any moment, so a
//! worker's commit is guarded by the positions' compare-and-set, not by the assignment it saw.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance};
use rdkafka::ClientContext;

use super::{KafkaSettings, SourceError, Topics};

/// What the group last gave this process: partition ids (see [`Topics`]) and a count of the
/// rebalances seen, which changes whenever the assignment may have, and when the last one was.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Assignment {
    pub partitions: BTreeSet<i32>,
    pub generation: u64,
    changed_at: Option<Instant>,
}

impl Assignment {
    /// Whether the group has given this assignment and left it alone for at least `settle`:
    /// processes started together join one after another, and every join moves partitions.
    pub fn still_for(&self, settle: Duration) -> bool {
        self.changed_at.is_some_and(|at| at.elapsed() >= settle)
    }
}

struct Membership {
    group: String,
    topics: Topics,
    assignment: Mutex<Assignment>,
}

impl ClientContext for Membership {}

impl ConsumerContext for Membership {
    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let Ok(mut assignment) = self.assignment.lock() else {
            return;
        };
        assignment.generation += 1;
        assignment.changed_at = Some(Instant::now());
        match rebalance {
            Rebalance::Assign(list) => {
                assignment.partitions = list
                    .elements()
                    .iter()
                    .filter_map(|e| self.topics.id_of(e.topic(), e.partition()))
                    .collect();
                // Membership only: the readers fetch.
                if let Err(error) = consumer.pause(list) {
                    tracing::warn!(message = "could not pause the group member's partitions", %error);
                }
            }
            Rebalance::Revoke(_) => assignment.partitions.clear(),
            Rebalance::Error(error) => {
                tracing::warn!(message = "consumer group rebalance failed", %error);
                assignment.partitions.clear();
            }
        }
        tracing::info!(message = "group assignment", group = %self.group, partitions = ?assignment.partitions, generation = assignment.generation);
    }
}

/// This process's membership in a consumer group over `topics`, kept alive by a thread of its own
/// until dropped (leaving the group, so that the others take its partitions at once).
pub struct GroupMember {
    membership: Arc<BaseConsumer<Membership>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl GroupMember {
    pub fn join(
        kafka: &KafkaSettings,
        group: &str,
        topics: &Topics,
    ) -> Result<GroupMember, SourceError> {
        let context = Membership {
            group: group.to_string(),
            topics: topics.clone(),
            assignment: Mutex::new(Assignment::default()),
        };
        let consumer = Arc::new(kafka.group_member(group, context)?);
        let names: Vec<&str> = topics.names().iter().map(String::as_str).collect();
        consumer
            .subscribe(&names)
            .map_err(|source| SourceError::Kafka {
                brokers: kafka.brokers.clone(),
                context: format!("joining consumer group {group} over {topics}"),
                source: Box::new(source),
            })?;
        let stop = Arc::new(AtomicBool::new(false));
        let (polled, stopping) = (consumer.clone(), stop.clone());
        let thread = std::thread::Builder::new()
            .name("group-member".into())
            .spawn(move || {
                // Polling serves the group's callbacks and heartbeats; no record is ever fetched.
                while !stopping.load(Ordering::Relaxed) {
                    if let Some(Err(error)) = polled.poll(Duration::from_millis(100)) {
                        tracing::debug!(message = "group member", %error);
                    }
                }
            })
            .map_err(|e| SourceError::Local(format!("starting the group member thread: {e}")))?;
        Ok(GroupMember {
            membership: consumer,
            stop,
            thread: Some(thread),
        })
    }

    /// What the group gives this process now.
    pub fn assignment(&self) -> Assignment {
        self.membership
            .context()
            .assignment
            .lock()
            .map(|a| a.clone())
            .unwrap_or_default()
    }
}

impl Drop for GroupMember {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        // Leave the group now rather than when the session times out.
        self.membership.unsubscribe();
    }
}
