//! Reading the event log from Kafka: client settings, partitions and watermarks, a consumer that
//! starts at stored positions, the topics a build reads (and how one integer names a partition of
//! any of them), and a development broker.
//!
//! An offset here always means "the next one to read"; a log end (high watermark) is last + 1; a log
//! start is the first offset the broker still has. History is complete only if every partition's
//! log start is 0.

pub mod dev_broker;
pub mod group;
mod kafka;
pub mod partitioner;
pub mod producer;
mod topics;

pub use kafka::{
    parse_property, prefetch_share, raw_record, reconcile_log_end, record_headers, KafkaSettings,
    LogBounds, LogEndDisagreement, RecordHeaders, SourceError, MAX_FETCH_BYTES, PREFETCH_BYTES,
};
pub use topics::{check_topic_name, ByTopic, Topics, MAX_TOPICS, PARTITIONS_PER_TOPIC};
