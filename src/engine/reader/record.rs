//! One record as the reader sees it: where it was read (topic, partition, offset, and who wanted it),
//! the checks it must pass (its envelope decodes, its key is its aggregate id, its payload upcasts),
//! and what is wrong with it when one fails, under either bad-record policy.

use crate::engine::metrics;
use crate::envelope::{self, message_version};
use crate::upcast::Registry;

/// A record that cannot be turned into row changes, with where it is and who wanted it.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{topic}/{partition} at offset {offset}{typ}, read for {projections}: {reason}",
    typ = type_label(type_url, *version))]
pub struct BadRecord {
    /// What is wrong with it: `envelope`, `key`, `upcast` or `duplicate`.
    pub kind: BadKind,
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub type_url: Option<String>,
    pub version: Option<u32>,
    pub projections: String,
    pub reason: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BadKind {
    /// The bytes are not framed as the domain says (an event envelope, CloudEvents headers,
    /// Confluent's wire format), or the framing lacks a required field.
    Envelope,
    /// The record has no key, or its key is not the envelope's aggregate id.
    Key,
    /// The payload's type is unknown, it does not decode, or an upcaster step refused it.
    Upcast,
    /// An event id already applied a short while before (a producer's retry, usually).
    Duplicate,
    /// A projection could not project the event (an expression of a file-defined view failed on
    /// it, say).
    Projection,
}

impl BadKind {
    pub fn as_str(self) -> &'static str {
        match self {
            BadKind::Envelope => "envelope",
            BadKind::Key => "key",
            BadKind::Upcast => "upcast",
            BadKind::Duplicate => "duplicate",
            BadKind::Projection => "projection",
        }
    }
}

/// A bad record kept instead of stopping (the `dead-letter` policy): its bytes and coordinates, the
/// error, and which of the reader's targets it was meant for.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    pub record: BadRecord,
    /// The record as read: key, value, headers (where CloudEvents keep the event's type, id and
    /// time) and timestamp.
    pub raw: envelope::OwnedRecord,
    pub event_id: Option<[u8; 16]>,
    pub targets: Vec<usize>,
}

impl DeadLetter {
    pub fn stored(&self) -> crate::sink::dead_letters::NewDeadLetter<'_> {
        crate::sink::dead_letters::NewDeadLetter {
            topic: &self.record.topic,
            partition: self.record.partition,
            offset: self.record.offset,
            kind: self.record.kind.as_str(),
            type_url: self.record.type_url.as_deref(),
            version: self.record.version,
            reason: &self.record.reason,
            key: self.raw.key.as_deref(),
            value: &self.raw.value,
            headers: &self.raw.headers,
            timestamp_millis: self.raw.timestamp_millis,
            event_id: self.event_id,
        }
    }
}

/// Under the dead-letter policy, refuse to go on once a build would hold more than its budget:
/// `held` are stored already, `new` are about to be.
pub fn check_dead_letter_budget(
    policy: crate::engine::BadRecordPolicy,
    projection: &str,
    build_id: i64,
    held: u64,
    new: &[&DeadLetter],
) -> Result<(), crate::engine::EngineError> {
    if let (crate::engine::BadRecordPolicy::DeadLetter { budget }, Some(last)) =
        (policy, new.last())
    {
        if held + new.len() as u64 > budget {
            return Err(crate::engine::EngineError::DeadLetterBudget {
                projection: projection.to_string(),
                build_id,
                budget,
                last: last.record.to_string(),
            });
        }
    }
    Ok(())
}

fn type_label(type_url: &Option<String>, version: Option<u32>) -> String {
    match (type_url, version) {
        (Some(url), Some(v)) => format!(" (type {url}, version {v})"),
        (Some(url), None) => format!(" (type {url}, no version in its name)"),
        _ => String::new(),
    }
}

/// Where a record was read, to name it in errors.
pub struct Coordinates<'a> {
    pub topic: &'a str,
    /// The Kafka partition number.
    pub partition: i32,
    /// The partition's id among the build's topics (see [`crate::source::Topics`]): what the
    /// event's metadata and logical time carry.
    pub partition_id: i32,
    pub offset: i64,
    /// The projections that wanted it, for the error.
    pub projections: &'a str,
}

impl Coordinates<'_> {
    pub fn bad(&self, kind: BadKind, type_url: Option<&str>, reason: String) -> BadRecord {
        metrics::error("bad_record");
        BadRecord {
            kind,
            topic: self.topic.to_string(),
            partition: self.partition,
            offset: self.offset,
            type_url: type_url.map(str::to_string),
            version: type_url.and_then(message_version),
            projections: self.projections.to_string(),
            reason,
        }
    }

    /// The record's event, checked: its framing holds everything an event needs, and (where the
    /// framing says so) the record's key is its aggregate id.
    pub fn decode(
        &self,
        framing: &envelope::Framing,
        record: &envelope::RawRecord<'_>,
    ) -> Result<envelope::Decoded, BadRecord> {
        let mut decoded = envelope::Decoded::default();
        self.decode_into(framing, record, &mut decoded)?;
        Ok(decoded)
    }

    /// [`Coordinates::decode`] into `decoded`, reusing its buffers.
    pub fn decode_into(
        &self,
        framing: &envelope::Framing,
        record: &envelope::RawRecord<'_>,
        decoded: &mut envelope::Decoded,
    ) -> Result<(), BadRecord> {
        framing
            .decode_into(record, self.partition_id, decoded)
            .map_err(|e| {
                let reason = match framing {
                    envelope::Framing::Envelope => e.to_string(),
                    other => format!("{} framing: {e}", other.name()),
                };
                self.bad(BadKind::Envelope, None, reason)
            })?;
        let key = record.key;
        if framing.key_is_aggregate_id() && key != Some(decoded.meta.aggregate_id.as_bytes()) {
            let reason = match key {
                None => format!(
                    "the record has no key; its envelope's aggregate id is {:?}",
                    decoded.meta.aggregate_id
                ),
                Some(key) => format!(
                    "the record's key {:?} is not its envelope's aggregate id {:?}",
                    String::from_utf8_lossy(key),
                    decoded.meta.aggregate_id
                ),
            };
            return Err(self.bad(BadKind::Key, Some(&decoded.type_url), reason));
        }
        Ok(())
    }

    /// The payload upcast to the latest version.
    pub fn upcast<E: 'static>(
        &self,
        registry: &Registry<E>,
        decoded: &envelope::Decoded,
    ) -> Result<E, BadRecord> {
        registry
            .upcast(&decoded.type_url, &decoded.payload)
            .map_err(|e| self.bad(BadKind::Upcast, Some(&decoded.type_url), e.to_string()))
    }
}

/// An event id as people write UUIDs.
pub fn event_id_text(id: &[u8; 16]) -> String {
    let h: String = id.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    )
}
