//! librdkafka clients, configured for replay.

use std::collections::BTreeMap;
use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::producer::{BaseProducer, Producer};
use rdkafka::Offset;
use rdkafka::TopicPartitionList;

use super::Topics;

const METADATA_TIMEOUT: Duration = Duration::from_secs(10);

/// The most one fetch response may carry (100 MiB; `receive.message.max.bytes` is twice that).
pub const MAX_FETCH_BYTES: usize = 100 << 20;

/// How far ahead a consumer may fetch (librdkafka's queue, counted in record bytes): the replay's
/// readers share it. 64 MiB is about half a second of the replay's reading. It was 1 GiB, which
/// librdkafka filled in the replay's first seconds with memory the process had never touched (on
/// the VMs measured, 3-14 us a page to fault in): the same replay speed, ~1 GB more peak RSS
/// (BENCHMARKS.md, issue 20, session 30: "... the prefetch queue: 64 MiB instead of 1 GiB").
pub const PREFETCH_BYTES: usize = 64 << 20;

/// The prefetch cap of each of `readers` consumers sharing a read: together they stay within what one
/// consumer would fetch ahead (`cap`, or [`PREFETCH_BYTES`] when uncapped).
pub fn prefetch_share(cap: Option<usize>, readers: usize) -> Option<usize> {
    let readers = readers.max(1);
    match cap {
        Some(bytes) => Some(bytes / readers),
        None if readers > 1 => Some(PREFETCH_BYTES / readers),
        None => None,
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("Kafka ({brokers}): {context}: {source}")]
    Kafka {
        brokers: String,
        context: String,
        // Boxed: librdkafka's error is large, and every Result of the source carries this.
        #[source]
        source: Box<KafkaError>,
    },
    #[error("topic {topic} does not exist on {brokers}")]
    TopicMissing { topic: String, brokers: String },
    #[error("invalid Kafka setting {0}")]
    BadSetting(String),
    /// Something on this machine, not the broker (a thread that could not start).
    #[error("{0}")]
    Local(String),
}

/// How to reach the brokers: bootstrap servers plus any librdkafka property (`-X key=value`), which
/// is how TLS and SASL (PLAIN, SCRAM) are configured for managed clusters.
#[derive(Clone, Debug)]
pub struct KafkaSettings {
    pub brokers: String,
    pub properties: Vec<(String, String)>,
}

/// Per partition: the first offset the broker still has, and the log end (last offset + 1).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct LogBounds {
    pub start: BTreeMap<i32, i64>,
    pub end: BTreeMap<i32, i64>,
}

impl LogBounds {
    /// Partitions whose history no longer starts at offset zero.
    pub fn truncated(&self) -> Vec<(i32, i64)> {
        self.start
            .iter()
            .filter(|(_, s)| **s > 0)
            .map(|(p, s)| (*p, *s))
            .collect()
    }
}

impl KafkaSettings {
    fn error(&self, context: impl Into<String>) -> impl FnOnce(KafkaError) -> SourceError + '_ {
        let context = context.into();
        move |source| SourceError::Kafka {
            brokers: self.brokers.clone(),
            context,
            source: Box::new(source),
        }
    }

    fn base(&self) -> ClientConfig {
        let mut config = ClientConfig::new();
        config.set("bootstrap.servers", &self.brokers);
        config.set("client.id", "reproject");
        config
    }

    fn with_user_properties(&self, mut config: ClientConfig) -> ClientConfig {
        for (key, value) in &self.properties {
            config.set(key, value);
        }
        config
    }

    /// A consumer tuned for reading history fast (settings measured in shared/LIMITS.md). It never
    /// commits offsets or resets them: positions live in PostgreSQL, and an offset the broker no longer
    /// has is an error, not a silent jump.
    pub fn consumer(&self, group: &str) -> Result<BaseConsumer, SourceError> {
        let mut config = self.base();
        config
            .set("group.id", group)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("enable.partition.eof", "false")
            .set("auto.offset.reset", "error")
            .set("max.partition.fetch.bytes", "10485760")
            .set("fetch.max.bytes", MAX_FETCH_BYTES.to_string())
            .set("receive.message.max.bytes", "209715200")
            .set(
                "queued.max.messages.kbytes",
                (PREFETCH_BYTES / 1024).to_string(),
            )
            .set("queued.min.messages", "1000000")
            .set("fetch.wait.max.ms", "10")
            .set("fetch.queue.backoff.ms", "10")
            .set("isolation.level", "read_committed");
        self.with_user_properties(config)
            .create()
            .map_err(self.error("creating a consumer"))
    }

    /// A client for the brokers' metadata and offsets only (topics, partitions, log bounds), named
    /// `client` in their logs. It reads no records, so it joins no consumer group: rdkafka drops a
    /// group's consumer by closing the group and polling in steps of 100 ms until it is closed,
    /// which took up to 100 ms of every look at the log bounds (an estimate's among them).
    pub fn metadata_client(&self, client: &str) -> Result<BaseConsumer, SourceError> {
        let mut config = self.base();
        config
            .set("client.id", client)
            // As the readers: the log end it is told is the last stable offset, the end a reader
            // can reach while a transaction is open, not the high watermark past it.
            .set("isolation.level", "read_committed");
        self.with_user_properties(config)
            .create()
            .map_err(self.error("creating a metadata client"))
    }

    /// [`KafkaSettings::consumer`] with its prefetch queue (and so its fetch responses) capped at
    /// `prefetch_max_bytes`; None keeps the consumer's default of [`PREFETCH_BYTES`].
    pub fn consumer_with_prefetch(
        &self,
        group: &str,
        prefetch_max_bytes: Option<usize>,
    ) -> Result<BaseConsumer, SourceError> {
        let Some(bytes) = prefetch_max_bytes else {
            return self.consumer(group);
        };
        let mut capped = self.clone();
        let kbytes = (bytes / 1024).max(1024);
        // Put first so that a property the user set (applied in order, last wins) still wins.
        capped.properties.splice(
            0..0,
            [
                ("queued.max.messages.kbytes".to_string(), kbytes.to_string()),
                // Never above the consumer's own fetch limit, which its receive limit allows.
                (
                    "fetch.max.bytes".to_string(),
                    (kbytes * 1024).min(MAX_FETCH_BYTES).to_string(),
                ),
            ],
        );
        capped.consumer(group)
    }

    /// A member of consumer group `group` for sharing partitions out (see `source::group`): it
    /// never commits, and fetches nothing (its partitions are paused). A member that stops
    /// heartbeating for `session.timeout.ms` (10 s here unless set with `-X`) loses its partitions
    /// to the others.
    pub fn group_member<C: rdkafka::consumer::ConsumerContext>(
        &self,
        group: &str,
        context: C,
    ) -> Result<BaseConsumer<C>, SourceError> {
        let mut config = self.base();
        config
            .set("group.id", group)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .set("session.timeout.ms", "10000")
            .set("heartbeat.interval.ms", "1000")
            .set("queued.max.messages.kbytes", "1024");
        self.with_user_properties(config)
            .create_with_context(context)
            .map_err(self.error(format!("joining consumer group {group}")))
    }

    /// A producer for `seed`: compressed (the broker keeps compressed bytes) and batched.
    pub fn producer(&self, partitioner: &str) -> Result<BaseProducer, SourceError> {
        let mut config = self.base();
        config
            .set("compression.type", "zstd")
            .set("linger.ms", "10")
            .set("batch.size", "1000000")
            .set("batch.num.messages", "100000")
            .set("queue.buffering.max.messages", "1000000")
            .set("queue.buffering.max.kbytes", "1048576")
            .set("message.max.bytes", "10000000")
            .set("enable.idempotence", "true")
            .set("partitioner", partitioner);
        self.with_user_properties(config)
            .create()
            .map_err(self.error("creating a producer"))
    }

    /// One topic's partition numbers, sorted.
    pub fn topic_partitions(
        &self,
        consumer: &BaseConsumer,
        topic: &str,
    ) -> Result<Vec<i32>, SourceError> {
        let metadata = consumer
            .fetch_metadata(Some(topic), METADATA_TIMEOUT)
            .map_err(self.error(format!("reading metadata of topic {topic}")))?;
        let Some(t) = metadata.topics().iter().find(|t| t.name() == topic) else {
            return Err(SourceError::TopicMissing {
                topic: topic.into(),
                brokers: self.brokers.clone(),
            });
        };
        if let Some(err) = t.error() {
            let code: rdkafka::types::RDKafkaErrorCode = err.into();
            if code == rdkafka::types::RDKafkaErrorCode::UnknownTopicOrPartition {
                return Err(SourceError::TopicMissing {
                    topic: topic.into(),
                    brokers: self.brokers.clone(),
                });
            }
            return Err(self.error(format!("reading metadata of topic {topic}"))(
                KafkaError::MetadataFetch(code),
            ));
        }
        let mut partitions: Vec<i32> = t.partitions().iter().map(|p| p.id()).collect();
        partitions.sort_unstable();
        if partitions.is_empty() {
            return Err(SourceError::TopicMissing {
                topic: topic.into(),
                brokers: self.brokers.clone(),
            });
        }
        Topics::check_partition_count(topic, partitions.len())?;
        Ok(partitions)
    }

    /// Every partition of every topic, as partition ids (see [`Topics`]), sorted.
    pub fn partitions(
        &self,
        consumer: &BaseConsumer,
        topics: &Topics,
    ) -> Result<Vec<i32>, SourceError> {
        let mut ids = Vec::new();
        for (index, topic) in topics.names().iter().enumerate() {
            let partitions = self.topic_partitions(consumer, topic)?;
            ids.extend(partitions.into_iter().map(|p| topics.id(index, p)));
        }
        Ok(ids)
    }

    /// Log start and end of every partition (ids, see [`Topics`]), asked of the brokers now: one
    /// ListOffsets request per broker for the starts and one for the ends (KIP-79's -2 and -1
    /// "timestamps"). Asking partition by partition took two round trips each, a third of a second
    /// for 128 partitions, paid at the start of every replay and twice by every catch-up. A broker
    /// that refuses the batched form is asked partition by partition.
    pub fn bounds(
        &self,
        consumer: &BaseConsumer,
        topics: &Topics,
        partitions: &[i32],
    ) -> Result<LogBounds, SourceError> {
        match self.bounds_batched(consumer, topics, partitions) {
            Ok(bounds) => Ok(bounds),
            Err(error) => {
                tracing::debug!(message = "batched log bounds failed; asking per partition", %error);
                self.bounds_per_partition(consumer, topics, partitions)
            }
        }
    }

    fn bounds_batched(
        &self,
        consumer: &BaseConsumer,
        topics: &Topics,
        partitions: &[i32],
    ) -> Result<LogBounds, SourceError> {
        let ask = |which: Offset, what: &str| -> Result<BTreeMap<i32, i64>, SourceError> {
            let context = || format!("reading the log {what} of {topics}");
            let list = partition_list(topics, partitions.iter().map(|&id| (id, which)))
                .map_err(self.error(context()))?;
            let answer = consumer
                .offsets_for_times(list, METADATA_TIMEOUT)
                .map_err(self.error(context()))?;
            let mut found = BTreeMap::new();
            for element in answer.elements() {
                let Some(id) = topics.id_of(element.topic(), element.partition()) else {
                    continue;
                };
                element.error().map_err(self.error(format!(
                    "{}, partition {}/{}",
                    context(),
                    element.topic(),
                    element.partition()
                )))?;
                match element.offset() {
                    Offset::Offset(o) => {
                        found.insert(id, o);
                    }
                    other => {
                        return Err(self.error(format!(
                            "{}: partition {}/{} answered {other:?}",
                            context(),
                            element.topic(),
                            element.partition()
                        ))(KafkaError::OffsetFetch(
                            rdkafka::types::RDKafkaErrorCode::InvalidArgument,
                        )));
                    }
                }
            }
            if let Some(missing) = partitions.iter().find(|p| !found.contains_key(p)) {
                return Err(self.error(format!(
                    "{}: no answer for partition {}",
                    context(),
                    topics.label(*missing)
                ))(KafkaError::OffsetFetch(
                    rdkafka::types::RDKafkaErrorCode::UnknownPartition,
                )));
            }
            Ok(found)
        };
        Ok(LogBounds {
            start: ask(Offset::Beginning, "start")?,
            end: ask(Offset::End, "end")?,
        })
    }

    fn bounds_per_partition(
        &self,
        consumer: &BaseConsumer,
        topics: &Topics,
        partitions: &[i32],
    ) -> Result<LogBounds, SourceError> {
        let mut bounds = LogBounds::default();
        for &id in partitions {
            let (topic, p) = (topics.topic_of(id), topics.partition_of(id));
            let (low, high) = consumer
                .fetch_watermarks(topic, p, METADATA_TIMEOUT)
                .map_err(self.error(format!("reading the log bounds of {topic}/{p}")))?;
            bounds.start.insert(id, low);
            bounds.end.insert(id, high);
        }
        Ok(bounds)
    }

    /// Point the consumer at `positions` (next offset to read, per partition id).
    pub fn assign(
        &self,
        consumer: &BaseConsumer,
        topics: &Topics,
        positions: &BTreeMap<i32, i64>,
    ) -> Result<(), SourceError> {
        let list = partition_list(
            topics,
            positions.iter().map(|(&id, &o)| (id, Offset::Offset(o))),
        )
        .map_err(self.error(format!("assigning partitions of {topics}")))?;
        consumer
            .assign(&list)
            .map_err(self.error(format!("assigning partitions of {topics}")))
    }

    /// Make sure `topic` exists, creating it with `partitions` (default 16) through the admin API when
    /// it does not. An existing topic is used as it is; asking for another count only warns.
    pub async fn ensure_topic(
        &self,
        topic: &str,
        partitions: Option<i32>,
    ) -> Result<(), SourceError> {
        use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
        let consumer = self.metadata_client("reproject-admin")?;
        // Look before creating: a broker without CreateTopics support (the mock cluster) leaves the
        // request unanswered until it times out, so an existing topic must not pay for that.
        match self.topic_partitions(&consumer, topic) {
            Ok(existing) => {
                if partitions.is_some_and(|asked| existing.len() as i32 != asked) {
                    tracing::warn!(
                        message = "topic exists with another partition count; using it as it is",
                        topic,
                        partitions = existing.len(),
                        asked = partitions
                    );
                }
                return Ok(());
            }
            Err(SourceError::TopicMissing { .. }) => {}
            Err(e) => return Err(e),
        }
        let admin: AdminClient<_> = self
            .with_user_properties(self.base())
            .create()
            .map_err(self.error("creating an admin client"))?;
        let new = NewTopic::new(topic, partitions.unwrap_or(16), TopicReplication::Fixed(1));
        let options = AdminOptions::new()
            .operation_timeout(Some(METADATA_TIMEOUT))
            .request_timeout(Some(METADATA_TIMEOUT));
        let created = match admin.create_topics([&new], &options).await {
            Ok(results) => results.into_iter().all(|r| match r {
                Ok(_) => true,
                Err((_, code)) => code == rdkafka::types::RDKafkaErrorCode::TopicAlreadyExists,
            }),
            Err(_) => false,
        };
        match self.topic_partitions(&consumer, topic) {
            Ok(_) => Ok(()),
            Err(e) if created => Err(e),
            Err(_) => Err(SourceError::BadSetting(format!(
                "topic {topic} does not exist and {} did not create it (a broker without CreateTopics support, \
                 such as the mock cluster, needs it created up front: `reproject dev-broker --partitions N` does)",
                self.brokers
            ))),
        }
    }

    /// The log end per partition id as the consumer's own fetch responses last reported it
    /// (librdkafka keeps each response's high watermark; asking costs no request). Partitions not
    /// fetched yet are left out.
    pub fn fetched_log_end(
        &self,
        consumer: &BaseConsumer,
        topics: &Topics,
        partitions: &[i32],
    ) -> BTreeMap<i32, i64> {
        let mut out = BTreeMap::new();
        let names: Vec<Option<std::ffi::CString>> = topics
            .names()
            .iter()
            .map(|t| std::ffi::CString::new(t.as_str()).ok())
            .collect();
        for &id in partitions {
            let (index, partition) = Topics::split(id);
            let Some(Some(name)) = names.get(index) else {
                continue;
            };
            let (mut low, mut high) = (-1i64, -1i64);
            // SAFETY: the client pointer is valid while `consumer` is borrowed; librdkafka reads the
            // NUL-terminated topic name and writes the two integers, nothing else. rdkafka 0.39 has
            // no safe wrapper for this cached value (`fetch_watermarks` asks the broker instead).
            let error = unsafe {
                rdkafka::bindings::rd_kafka_get_watermark_offsets(
                    consumer.client().native_ptr(),
                    name.as_ptr(),
                    partition,
                    &mut low,
                    &mut high,
                )
            };
            if error == rdkafka::bindings::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR
                && high >= 0
            {
                out.insert(id, high);
            }
        }
        out
    }

    /// Where the consumer will fetch next, per partition id. Past control records (transaction
    /// markers), which are never delivered as messages.
    pub fn fetch_positions(&self, consumer: &BaseConsumer, topics: &Topics) -> BTreeMap<i32, i64> {
        let mut out = BTreeMap::new();
        if let Ok(list) = consumer.position() {
            for e in list.elements() {
                if let (Offset::Offset(o), Some(id)) =
                    (e.offset(), topics.id_of(e.topic(), e.partition()))
                {
                    out.insert(id, o);
                }
            }
        }
        out
    }

    /// Wait until every queued record is delivered.
    pub fn flush(&self, producer: &BaseProducer) -> Result<(), SourceError> {
        producer
            .flush(Duration::from_secs(60))
            .map_err(self.error("delivering records"))
    }
}

/// A partition whose fetches reported a log end beyond the broker's ListOffsets answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LogEndDisagreement {
    pub partition: i32,
    pub list_offsets: i64,
    pub fetched: i64,
}

/// The log end to trust, per partition: the higher of what ListOffsets answered and what the fetches
/// reported. Kafka-compatible brokers differ: one was seen answering ListOffsets with a high
/// watermark below what its fetches served, which made a rebuild swap in a view a few thousand
/// events short. Returns the ends, and each partition where the two disagreed that way.
pub fn reconcile_log_end(
    list_offsets: &BTreeMap<i32, i64>,
    fetched: &BTreeMap<i32, i64>,
) -> (BTreeMap<i32, i64>, Vec<LogEndDisagreement>) {
    let mut ends = list_offsets.clone();
    let mut disagreements = Vec::new();
    for (&partition, &seen) in fetched {
        match ends.get_mut(&partition) {
            Some(listed) if seen > *listed => {
                disagreements.push(LogEndDisagreement {
                    partition,
                    list_offsets: *listed,
                    fetched: seen,
                });
                *listed = seen;
            }
            Some(_) => {}
            None => {
                ends.insert(partition, seen);
            }
        }
    }
    (ends, disagreements)
}

/// A librdkafka partition list of `(partition id, offset)`.
fn partition_list(
    topics: &Topics,
    offsets: impl Iterator<Item = (i32, Offset)>,
) -> Result<TopicPartitionList, KafkaError> {
    let mut list = TopicPartitionList::new();
    for (id, offset) in offsets {
        list.add_partition_offset(topics.topic_of(id), topics.partition_of(id), offset)?;
    }
    Ok(list)
}

/// Parse `key=value` as given to `-X`.
pub fn parse_property(text: &str) -> Result<(String, String), SourceError> {
    match text.split_once('=') {
        Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_string(), v.to_string())),
        _ => Err(SourceError::BadSetting(format!(
            "{text:?}: expected key=value, e.g. -X security.protocol=SASL_SSL"
        ))),
    }
}

/// A record's headers as a framing reads them (see [`crate::envelope::RawRecord`]). Most records
/// carry a handful, which fit inline.
pub type RecordHeaders<'a> = smallvec::SmallVec<[(&'a str, Option<&'a [u8]>); 8]>;

/// The headers of `message`.
pub fn record_headers<'a>(message: &'a rdkafka::message::BorrowedMessage<'_>) -> RecordHeaders<'a> {
    use rdkafka::message::{Headers, Message};
    match message.headers() {
        Some(headers) => headers.iter().map(|h| (h.key, h.value)).collect(),
        None => RecordHeaders::new(),
    }
}

/// `message` as a framing reads it, with `headers` (from [`record_headers`], or none where the
/// framing does not read them).
pub fn raw_record<'a>(
    message: &'a rdkafka::message::BorrowedMessage<'_>,
    headers: &'a [(&'a str, Option<&'a [u8]>)],
) -> crate::envelope::RawRecord<'a> {
    use rdkafka::message::Message;
    crate::envelope::RawRecord {
        topic: message.topic(),
        partition: message.partition(),
        offset: message.offset(),
        key: message.key(),
        value: message.payload().unwrap_or_default(),
        headers,
        timestamp_millis: message.timestamp().to_millis(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::producer::{BaseRecord, Producer};

    #[test]
    fn the_log_end_is_the_higher_of_list_offsets_and_the_fetches_and_disagreements_are_named() {
        let listed = BTreeMap::from([(0, 100), (1, 50), (2, 7)]);
        // Partition 0: the broker's fetches served past what ListOffsets said (the case seen on a
        // Kafka-compatible broker); 1: ListOffsets is newer than the last fetch (normal while
        // producing); 2: not fetched yet; 3: fetched but not listed.
        let fetched = BTreeMap::from([(0, 103), (1, 40), (3, 9)]);
        let (ends, disagreements) = reconcile_log_end(&listed, &fetched);
        assert_eq!(ends, BTreeMap::from([(0, 103), (1, 50), (2, 7), (3, 9)]));
        assert_eq!(
            disagreements,
            vec![LogEndDisagreement {
                partition: 0,
                list_offsets: 100,
                fetched: 103
            }]
        );
        let (same, none) = reconcile_log_end(&listed, &BTreeMap::new());
        assert_eq!((same, none), (listed, Vec::new()));
    }

    #[test]
    fn the_fetched_log_end_is_what_the_fetches_reported() {
        let broker =
            super::super::dev_broker::DevBroker::start("fetched", 2).expect("mock cluster");
        let settings = KafkaSettings {
            brokers: broker.bootstrap_servers(),
            properties: Vec::new(),
        };
        let producer: BaseProducer = settings.producer("murmur2_random").expect("producer");
        for i in 0..6 {
            producer
                .send(
                    BaseRecord::<str, str>::to("fetched")
                        .partition(0)
                        .key("k")
                        .payload(&format!("{i}")),
                )
                .expect("send");
        }
        producer.flush(Duration::from_secs(10)).expect("flush");
        let consumer = settings.consumer("fetched-test").expect("consumer");
        let topics = Topics::new(["fetched"]).expect("topic");
        assert!(
            settings
                .fetched_log_end(&consumer, &topics, &[0, 1])
                .is_empty(),
            "nothing fetched yet"
        );
        settings
            .assign(&consumer, &topics, &BTreeMap::from([(0, 0), (1, 0)]))
            .expect("assign");
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let mut received = 0;
        while received < 6 && std::time::Instant::now() < deadline {
            if let Some(Ok(_)) = consumer.poll(Duration::from_millis(100)) {
                received += 1;
            }
        }
        assert_eq!(received, 6);
        let fetched = settings.fetched_log_end(&consumer, &topics, &[0, 1]);
        assert_eq!(fetched.get(&0), Some(&6), "{fetched:?}");
    }

    #[test]
    fn log_bounds_asked_for_all_partitions_at_once_match_asking_one_by_one() {
        let broker = super::super::dev_broker::DevBroker::start("bounds", 3).expect("mock cluster");
        let settings = KafkaSettings {
            brokers: broker.bootstrap_servers(),
            properties: Vec::new(),
        };
        let producer: BaseProducer = settings.producer("murmur2_random").expect("producer");
        for (partition, count) in [(0, 5), (2, 7)] {
            for i in 0..count {
                producer
                    .send(
                        BaseRecord::<str, str>::to("bounds")
                            .partition(partition)
                            .key("k")
                            .payload(&format!("{i}")),
                    )
                    .expect("send");
            }
        }
        producer.flush(Duration::from_secs(10)).expect("flush");
        // The client the engine asks the log bounds with: in no consumer group.
        let consumer = settings.metadata_client("bounds-test").expect("client");
        let topics = Topics::new(["bounds"]).expect("topic");
        let partitions = settings.partitions(&consumer, &topics).expect("partitions");
        let batched = settings
            .bounds_batched(&consumer, &topics, &partitions)
            .expect("batched bounds");
        let one_by_one = settings
            .bounds_per_partition(&consumer, &topics, &partitions)
            .expect("per-partition bounds");
        assert_eq!(batched, one_by_one);
        assert_eq!(batched.end, BTreeMap::from([(0, 5), (1, 0), (2, 7)]));
        assert_eq!(batched.start, BTreeMap::from([(0, 0), (1, 0), (2, 0)]));
    }
}
