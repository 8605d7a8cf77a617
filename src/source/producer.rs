//! Appending records to the log (for `seed` and the demo's live traffic). Every record's delivery is
//! checked: a record the broker refused fails the command, it is never dropped quietly.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use rdkafka::error::KafkaError;
use rdkafka::producer::{BaseProducer, BaseRecord, DeliveryResult, Producer, ProducerContext};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::ClientContext;

use super::{KafkaSettings, SourceError};

#[derive(Default)]
struct DeliveryTracker {
    failed: Mutex<(u64, Option<String>)>,
}

impl ClientContext for DeliveryTracker {}

impl ProducerContext for DeliveryTracker {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        if let Err((error, _)) = result {
            if let Ok(mut failed) = self.failed.lock() {
                failed.0 += 1;
                failed.1.get_or_insert_with(|| error.to_string());
            }
        }
    }
}

/// Writes records and reports how many were delivered.
pub struct LogWriter {
    settings: KafkaSettings,
    producer: BaseProducer<DeliveryTracker>,
    /// Where `send` and `send_raw` append.
    topic: String,
    /// Every topic appended to, for errors.
    written_to: std::collections::BTreeSet<String>,
    sent: u64,
}

impl LogWriter {
    /// `partitioner` is librdkafka's name: `consistent_random` (its default) or `murmur2_random` (the
    /// Java client's). Records leave within 10 ms: for live traffic.
    pub fn new(
        settings: &KafkaSettings,
        topic: &str,
        partitioner: &str,
    ) -> Result<LogWriter, SourceError> {
        Self::with_linger(settings, topic, partitioner, 10)
    }

    /// For writing a whole history at once: records wait up to a second to fill large batches. A
    /// consumer of the mock cluster gets one batch per partition per fetch, so batch size sets the
    /// replay speed there; larger batches also compress better (the mock keeps 5 MiB per partition).
    pub fn bulk(
        settings: &KafkaSettings,
        topic: &str,
        partitioner: &str,
    ) -> Result<LogWriter, SourceError> {
        Self::with_linger(settings, topic, partitioner, 1_000)
    }

    fn with_linger(
        settings: &KafkaSettings,
        topic: &str,
        partitioner: &str,
        linger_ms: u32,
    ) -> Result<LogWriter, SourceError> {
        let mut config = rdkafka::ClientConfig::new();
        config
            .set("bootstrap.servers", &settings.brokers)
            .set("client.id", "reproject-seed")
            .set("compression.type", "zstd")
            .set("linger.ms", linger_ms.to_string())
            .set("batch.size", "1000000")
            .set("batch.num.messages", "100000")
            .set("queue.buffering.max.messages", "1000000")
            .set("queue.buffering.max.kbytes", "1048576")
            .set("enable.idempotence", "true")
            .set("partitioner", partitioner);
        for (k, v) in &settings.properties {
            config.set(k, v);
        }
        let producer = config
            .create_with_context(DeliveryTracker::default())
            .map_err(|source| SourceError::Kafka {
                brokers: settings.brokers.clone(),
                context: "creating a producer".into(),
                source: Box::new(source),
            })?;
        Ok(LogWriter {
            settings: settings.clone(),
            producer,
            topic: topic.to_string(),
            written_to: Default::default(),
            sent: 0,
        })
    }

    pub fn send(&mut self, key: &str, value: &[u8]) -> Result<(), SourceError> {
        let topic = std::mem::take(&mut self.topic);
        let sent = self.send_to(&topic, key, value);
        self.topic = topic;
        sent
    }

    /// Append a record to another topic than the writer's own (a log kept in several topics).
    pub fn send_to(&mut self, topic: &str, key: &str, value: &[u8]) -> Result<(), SourceError> {
        self.send_raw_to(topic, Some(key.as_bytes()), value)
    }

    /// Append a record with headers and, when given, a timestamp (milliseconds since the Unix
    /// epoch): how CloudEvents' binary mode, and producers that keep metadata beside the value,
    /// write.
    pub fn send_with_headers(
        &mut self,
        topic: &str,
        key: Option<&[u8]>,
        value: &[u8],
        headers: &[(&str, &[u8])],
        timestamp_millis: Option<i64>,
    ) -> Result<(), SourceError> {
        let mut owned = rdkafka::message::OwnedHeaders::new_with_capacity(headers.len());
        for (name, value) in headers {
            owned = owned.insert(rdkafka::message::Header {
                key: name,
                value: Some(*value),
            });
        }
        self.send_record(topic, key, value, Some(owned), timestamp_millis)
    }

    /// Append a record as given, key or none: how a misbehaving producer writes (tests use it).
    pub fn send_raw(&mut self, key: Option<&[u8]>, value: &[u8]) -> Result<(), SourceError> {
        let topic = std::mem::take(&mut self.topic);
        let sent = self.send_raw_to(&topic, key, value);
        self.topic = topic;
        sent
    }

    fn send_raw_to(
        &mut self,
        topic: &str,
        key: Option<&[u8]>,
        value: &[u8],
    ) -> Result<(), SourceError> {
        self.send_record(topic, key, value, None, None)
    }

    fn send_record(
        &mut self,
        topic: &str,
        key: Option<&[u8]>,
        value: &[u8],
        headers: Option<rdkafka::message::OwnedHeaders>,
        timestamp_millis: Option<i64>,
    ) -> Result<(), SourceError> {
        if !self.written_to.contains(topic) {
            self.written_to.insert(topic.to_string());
        }
        let mut record = BaseRecord::<[u8], [u8]>::to(topic).payload(value);
        if let Some(key) = key {
            record = record.key(key);
        }
        if let Some(headers) = headers {
            record = record.headers(headers);
        }
        if let Some(ms) = timestamp_millis {
            record = record.timestamp(ms);
        }
        loop {
            match self.producer.send(record) {
                Ok(()) => break,
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    record = back;
                    self.producer.poll(Duration::from_millis(10));
                }
                Err((source, _)) => {
                    return Err(SourceError::Kafka {
                        brokers: self.settings.brokers.clone(),
                        context: format!("appending to {topic}"),
                        source: Box::new(source),
                    })
                }
            }
        }
        self.sent += 1;
        if self.sent % 10_000 == 0 {
            self.producer.poll(Duration::ZERO);
        }
        Ok(())
    }

    fn topics(&self) -> String {
        self.written_to
            .iter()
            .cloned()
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Wait for every record to be delivered; fail if any was not.
    pub fn finish(&mut self) -> Result<u64, SourceError> {
        let deadline = Instant::now() + Duration::from_secs(120);
        while self.producer.in_flight_count() > 0 && Instant::now() < deadline {
            self.producer.poll(Duration::from_millis(50));
        }
        self.producer
            .flush(Duration::from_secs(10))
            .map_err(|source| SourceError::Kafka {
                brokers: self.settings.brokers.clone(),
                context: format!("delivering records to {}", self.topics()),
                source: Box::new(source),
            })?;
        let failed = self
            .producer
            .context()
            .failed
            .lock()
            .map(|f| f.clone())
            .unwrap_or((0, None));
        if failed.0 > 0 {
            return Err(SourceError::BadSetting(format!(
                "{} of {} records were not delivered to {}: {}",
                failed.0,
                self.sent,
                self.topics(),
                failed.1.unwrap_or_default()
            )));
        }
        Ok(self.sent)
    }
}
