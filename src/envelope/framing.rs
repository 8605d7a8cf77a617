//! How a record carries its event: which bytes are the Protobuf payload, and where the event's type,
//! id, time, aggregate id and sequence come from.
//!
//! Three framings, chosen by the domain ([`crate::domain::Domain::framing`]) or the config file's
//! `[framing]` table:
//! - **envelope**: reproject's `EventEnvelope` in the value, the payload an `Any`; the record key
//!   must be the envelope's aggregate id.
//! - **cloudevents**: CloudEvents' Kafka binding in binary mode. The value is the bare message;
//!   `ce_type`, `ce_id`, `ce_time`, `ce_subject` (and `ce_sequence`) travel as headers. Which header
//!   holds each (or the key, or the record's timestamp) is configurable, and the event type maps to
//!   a Protobuf message by a table or a template (`"acme.v{version}.{type}"`).
//! - **confluent**: Confluent Schema Registry's wire format: a zero magic byte, a 4-byte schema id,
//!   the message indexes, then the message. A table in the config maps schema ids (and message
//!   indexes) to messages. Metadata comes from the key, headers and the record's timestamp.
//!
//! Every way a record can be framed wrongly is a [`FramingError`] that says what was missing or
//! malformed; the reader turns it into a bad record with its topic, partition and offset.

use std::collections::HashMap;

use serde::Deserialize;

use super::{decode_into, Decoded, TYPE_URL_PREFIX};

/// One record as it came from Kafka: what a framing may read.
#[derive(Clone, Copy, Debug)]
pub struct RawRecord<'a> {
    pub topic: &'a str,
    /// The Kafka partition number.
    pub partition: i32,
    pub offset: i64,
    pub key: Option<&'a [u8]>,
    pub value: &'a [u8],
    /// The record's headers in order (a header without a value has `None`).
    pub headers: &'a [(&'a str, Option<&'a [u8]>)],
    /// The record's timestamp, milliseconds since the Unix epoch, when it has one.
    pub timestamp_millis: Option<i64>,
}

impl<'a> RawRecord<'a> {
    /// A record with a key and a value only (no headers, no timestamp).
    pub fn plain(key: Option<&'a [u8]>, value: &'a [u8]) -> RawRecord<'a> {
        RawRecord {
            topic: "",
            partition: 0,
            offset: 0,
            key,
            value,
            headers: &[],
            timestamp_millis: None,
        }
    }

    /// The last header named `name` (Kafka allows repeats; the last one wins, as in most clients).
    pub fn header(&self, name: &str) -> Option<&'a [u8]> {
        self.headers
            .iter()
            .rev()
            .find(|(n, _)| *n == name)
            .and_then(|(_, v)| *v)
    }
}

/// A [`RawRecord`] kept past the consumer's buffer (a dead letter, a record `replay` collected).
#[derive(Clone, Debug)]
pub struct OwnedRecord {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub value: Vec<u8>,
    pub headers: Vec<(String, Option<Vec<u8>>)>,
    pub timestamp_millis: Option<i64>,
}

impl OwnedRecord {
    pub fn of(record: &RawRecord<'_>) -> OwnedRecord {
        OwnedRecord {
            topic: record.topic.to_string(),
            partition: record.partition,
            offset: record.offset,
            key: record.key.map(<[u8]>::to_vec),
            value: record.value.to_vec(),
            headers: record
                .headers
                .iter()
                .map(|(name, value)| (name.to_string(), value.map(<[u8]>::to_vec)))
                .collect(),
            timestamp_millis: record.timestamp_millis,
        }
    }

    /// Call `f` with this record as a framing reads it.
    pub fn with_raw<R>(&self, f: impl FnOnce(&RawRecord<'_>) -> R) -> R {
        let headers: Vec<(&str, Option<&[u8]>)> = self
            .headers
            .iter()
            .map(|(name, value)| (name.as_str(), value.as_deref()))
            .collect();
        f(&RawRecord {
            topic: &self.topic,
            partition: self.partition,
            offset: self.offset,
            key: self.key.as_deref(),
            value: &self.value,
            headers: &headers,
            timestamp_millis: self.timestamp_millis,
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum FramingError {
    #[error(transparent)]
    Envelope(#[from] super::EnvelopeError),
    #[error("{what} is missing: the record has no {source_label}")]
    Missing {
        what: &'static str,
        source_label: String,
    },
    #[error("{what} from {source_label} is not {expected}: {found:?}")]
    Malformed {
        what: &'static str,
        source_label: String,
        expected: &'static str,
        found: String,
    },
    #[error("not in Confluent's wire format: {0}")]
    Confluent(String),
    #[error("{0}")]
    Registry(String),
    #[error("schema id {schema_id} (message indexes {indexes:?}) is not mapped to a message: add \"{key}\" = \"<package>.<Message>\" under [framing.schema_ids], or give framing.registry_url")]
    UnknownSchema {
        schema_id: u32,
        indexes: Vec<i32>,
        key: String,
    },
}

/// How records carry events. See the module's documentation.
#[derive(Clone, Debug, Default)]
pub enum Framing {
    #[default]
    Envelope,
    CloudEvents(CloudEvents),
    Confluent(Confluent),
}

/// Where the metadata of an event comes from, in the framings that do not carry an envelope.
#[derive(Clone, Debug)]
pub struct Fields {
    pub aggregate_id: Place,
    pub event_id: Place,
    pub time: Place,
    pub sequence: Place,
    pub aggregate_type: Place,
}

/// One place a value can come from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Place {
    /// The record key.
    Key,
    /// A header by name.
    Header(String),
    /// The record's timestamp (time only).
    Timestamp,
    /// The record's position (event id only): a name-based UUID of topic, partition and offset, the
    /// same on every read.
    Position,
    /// Not carried: the sequence is then 0 (sequence checks skip it), an aggregate type empty.
    Nothing,
}

impl Place {
    fn parse(text: &str, what: &str, allowed: &[&str]) -> Result<Place, String> {
        let parsed = match text {
            "key" => Place::Key,
            "timestamp" => Place::Timestamp,
            "position" => Place::Position,
            "none" => Place::Nothing,
            _ => match text.strip_prefix("header:") {
                Some(name) if !name.is_empty() => Place::Header(name.to_string()),
                _ => {
                    return Err(format!(
                        "framing.{what} = {text:?}: expected one of {}",
                        allowed.join(", ")
                    ))
                }
            },
        };
        let kind = match &parsed {
            Place::Header(_) => "header:NAME",
            Place::Key => "key",
            Place::Timestamp => "timestamp",
            Place::Position => "position",
            Place::Nothing => "none",
        };
        if allowed.contains(&kind) {
            Ok(parsed)
        } else {
            Err(format!(
                "framing.{what} = {text:?}: expected one of {}",
                allowed.join(", ")
            ))
        }
    }

    fn label(&self) -> String {
        match self {
            Place::Key => "key".into(),
            Place::Header(name) => format!("header {name}"),
            Place::Timestamp => "timestamp".into(),
            Place::Position => "position".into(),
            Place::Nothing => "source".into(),
        }
    }

    /// The bytes this place holds in `record`, or what is missing.
    fn bytes<'a>(
        &self,
        record: &RawRecord<'a>,
        what: &'static str,
    ) -> Result<Option<&'a [u8]>, FramingError> {
        let found = match self {
            Place::Key => record.key,
            Place::Header(name) => record.header(name),
            Place::Timestamp | Place::Position | Place::Nothing => return Ok(None),
        };
        found.map(Some).ok_or_else(|| FramingError::Missing {
            what,
            source_label: self.label(),
        })
    }

    fn text<'a>(
        &self,
        record: &RawRecord<'a>,
        what: &'static str,
    ) -> Result<Option<&'a str>, FramingError> {
        match self.bytes(record, what)? {
            None => Ok(None),
            Some(bytes) => {
                std::str::from_utf8(bytes)
                    .map(Some)
                    .map_err(|_| FramingError::Malformed {
                        what,
                        source_label: self.label(),
                        expected: "UTF-8 text",
                        found: String::from_utf8_lossy(bytes).into_owned(),
                    })
            }
        }
    }
}

/// CloudEvents' Kafka binding, binary mode.
#[derive(Clone, Debug)]
pub struct CloudEvents {
    pub fields: Fields,
    /// Where the event type is (`header:ce_type`).
    pub event_type: Place,
    /// Where the schema version is, when the type does not name it (`none` by default).
    pub version: Place,
    /// The Protobuf message of an event: `{type}` and `{version}` replaced (`"{type}"` by default:
    /// the type is the full message name).
    pub message: String,
    /// Event types mapped to messages, consulted before `message`.
    pub types: HashMap<String, String>,
}

/// Confluent Schema Registry's wire format.
#[derive(Clone, Debug)]
pub struct Confluent {
    pub fields: Fields,
    /// `"<schema id>"` (message indexes `[0]`) or `"<schema id>:<i>:<j>"` to a message name.
    pub schema_ids: HashMap<String, String>,
    /// Asked for schema ids `schema_ids` does not map, when a URL is given.
    pub registry: Option<std::sync::Arc<super::registry::SchemaRegistry>>,
}

/// The `[framing]` table of the config file, as written.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FramingConfig {
    /// `envelope`, `cloudevents` or `confluent`.
    pub format: String,
    pub aggregate_id: Option<String>,
    pub event_id: Option<String>,
    pub time: Option<String>,
    pub sequence: Option<String>,
    pub aggregate_type: Option<String>,
    #[serde(rename = "type")]
    pub event_type: Option<String>,
    pub version: Option<String>,
    pub message: Option<String>,
    #[serde(default)]
    pub types: HashMap<String, String>,
    #[serde(default)]
    pub schema_ids: HashMap<String, String>,
    /// A Confluent Schema Registry to ask for schema ids `schema_ids` does not map.
    pub registry_url: Option<String>,
}

/// Where CloudEvents keep an event's metadata: `ce_subject`, `ce_id`, `ce_time`, `ce_sequence`,
/// `ce_source` (aggregate id, event id, time, sequence, aggregate type).
const CLOUDEVENTS_FIELDS: [&str; 5] = [
    "header:ce_subject",
    "header:ce_id",
    "header:ce_time",
    "header:ce_sequence",
    "header:ce_source",
];

impl Default for CloudEvents {
    /// CloudEvents' own headers, `ce_type` holding the full message name.
    fn default() -> CloudEvents {
        let header = |name: &str| Place::Header(name.trim_start_matches("header:").to_string());
        CloudEvents {
            fields: Fields {
                aggregate_id: header(CLOUDEVENTS_FIELDS[0]),
                event_id: header(CLOUDEVENTS_FIELDS[1]),
                time: header(CLOUDEVENTS_FIELDS[2]),
                sequence: header(CLOUDEVENTS_FIELDS[3]),
                aggregate_type: header(CLOUDEVENTS_FIELDS[4]),
            },
            event_type: header("ce_type"),
            version: Place::Nothing,
            message: "{type}".into(),
            types: HashMap::new(),
        }
    }
}

impl FramingConfig {
    /// The framing this table describes, every field checked; defaults follow each format's
    /// conventions (CloudEvents' `ce_*` headers; Confluent: the key, the record's timestamp and its
    /// position).
    pub fn framing(&self) -> Result<Framing, String> {
        let headers = &["key", "header:NAME"][..];
        let pick = |value: &Option<String>, default: &str, what: &str, allowed: &[&str]| {
            Place::parse(value.as_deref().unwrap_or(default), what, allowed)
        };
        let fields = |defaults: [&str; 5]| -> Result<Fields, String> {
            Ok(Fields {
                aggregate_id: pick(&self.aggregate_id, defaults[0], "aggregate_id", headers)?,
                event_id: pick(
                    &self.event_id,
                    defaults[1],
                    "event_id",
                    &["header:NAME", "key", "position"],
                )?,
                time: pick(
                    &self.time,
                    defaults[2],
                    "time",
                    &["header:NAME", "timestamp"],
                )?,
                sequence: pick(
                    &self.sequence,
                    defaults[3],
                    "sequence",
                    &["header:NAME", "none"],
                )?,
                aggregate_type: pick(
                    &self.aggregate_type,
                    defaults[4],
                    "aggregate_type",
                    &["header:NAME", "none"],
                )?,
            })
        };
        let refuse_unused = |name: &str, given: bool| {
            if given {
                Err(format!(
                    "framing.{name} does not apply to format {:?}",
                    self.format
                ))
            } else {
                Ok(())
            }
        };
        match self.format.as_str() {
            "envelope" => {
                for (name, given) in [
                    ("aggregate_id", self.aggregate_id.is_some()),
                    ("event_id", self.event_id.is_some()),
                    ("time", self.time.is_some()),
                    ("sequence", self.sequence.is_some()),
                    ("aggregate_type", self.aggregate_type.is_some()),
                    ("type", self.event_type.is_some()),
                    ("version", self.version.is_some()),
                    ("message", self.message.is_some()),
                    ("types", !self.types.is_empty()),
                    ("schema_ids", !self.schema_ids.is_empty()),
                ] {
                    refuse_unused(name, given)?;
                }
                refuse_unused("registry_url", self.registry_url.is_some())?;
                Ok(Framing::Envelope)
            }
            "cloudevents" => {
                refuse_unused("schema_ids", !self.schema_ids.is_empty())?;
                refuse_unused("registry_url", self.registry_url.is_some())?;
                let message = self.message.clone().unwrap_or_else(|| "{type}".into());
                let version = pick(&self.version, "none", "version", &["header:NAME", "none"])?;
                if message.contains("{version}") == (version == Place::Nothing) {
                    return Err(format!(
                        "framing.message = {message:?} and framing.version = {:?}: name a version header exactly when the message template uses {{version}}",
                        self.version.as_deref().unwrap_or("none")
                    ));
                }
                Ok(Framing::CloudEvents(CloudEvents {
                    fields: fields(CLOUDEVENTS_FIELDS)?,
                    event_type: pick(&self.event_type, "header:ce_type", "type", headers)?,
                    version,
                    message,
                    types: self.types.clone(),
                }))
            }
            "confluent" => {
                for (name, given) in [
                    ("type", self.event_type.is_some()),
                    ("version", self.version.is_some()),
                    ("message", self.message.is_some()),
                    ("types", !self.types.is_empty()),
                ] {
                    refuse_unused(name, given)?;
                }
                for key in self.schema_ids.keys() {
                    parse_schema_key(key)?;
                }
                Ok(Framing::Confluent(Confluent {
                    fields: fields(["key", "position", "timestamp", "none", "none"])?,
                    schema_ids: self
                        .schema_ids
                        .iter()
                        .map(|(k, v)| parse_schema_key(k).map(|key| (key, v.clone())))
                        .collect::<Result<_, _>>()?,
                    registry: match &self.registry_url {
                        Some(url) => Some(std::sync::Arc::new(
                            super::registry::SchemaRegistry::new(url)?,
                        )),
                        None => None,
                    },
                }))
            }
            other => Err(format!(
                "framing.format = {other:?}: expected envelope, cloudevents or confluent"
            )),
        }
    }
}

/// `"12"` or `"12:1:0"` in its canonical form (the schema id, then the message indexes; `[0]` is
/// written as the id alone).
fn parse_schema_key(key: &str) -> Result<String, String> {
    let mut parts = key.split(':');
    let id: u32 = parts
        .next()
        .and_then(|id| id.trim().parse().ok())
        .ok_or_else(|| format!("framing.schema_ids: {key:?} is not <schema id>[:<index>...]"))?;
    let indexes: Vec<i32> = parts
        .map(|i| i.trim().parse())
        .collect::<Result<_, _>>()
        .map_err(|_| format!("framing.schema_ids: {key:?} is not <schema id>[:<index>...]"))?;
    Ok(schema_key(id, &indexes))
}

fn schema_key(id: u32, indexes: &[i32]) -> String {
    if indexes.is_empty() || indexes == [0] {
        id.to_string()
    } else {
        let path: Vec<String> = indexes.iter().map(i32::to_string).collect();
        format!("{id}:{}", path.join(":"))
    }
}

/// Namespace of the name-based event ids this module makes (from an id that is not a UUID, or
/// from a record's position). Fixed: the same input gives the same id on every machine.
const EVENT_ID_NAMESPACE: uuid::Uuid =
    uuid::Uuid::from_u128(0x6f1c_8a4e_93b2_4d0c_a1f7_2c5e_8b90_d3a6);

impl Framing {
    /// Whether the record key must equal the aggregate id (the envelope framing: reproject's own
    /// producers key records by aggregate, and `replay` finds an aggregate by its key).
    pub fn key_is_aggregate_id(&self) -> bool {
        match self {
            Framing::Envelope => true,
            Framing::CloudEvents(c) => c.fields.aggregate_id == Place::Key,
            Framing::Confluent(c) => c.fields.aggregate_id == Place::Key,
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Framing::Envelope => "envelope",
            Framing::CloudEvents(_) => "cloudevents",
            Framing::Confluent(_) => "confluent",
        }
    }

    /// Decode `record` into `out` (reusing its buffers); `partition_id` goes into the metadata.
    pub fn decode_into(
        &self,
        record: &RawRecord<'_>,
        partition_id: i32,
        out: &mut Decoded,
    ) -> Result<(), FramingError> {
        match self {
            Framing::Envelope => {
                decode_into(record.value, partition_id, record.offset, out)?;
                Ok(())
            }
            Framing::CloudEvents(c) => {
                let event_type = c
                    .event_type
                    .text(record, "the event type")?
                    .unwrap_or_default();
                out.type_url.clear();
                out.type_url.push_str(TYPE_URL_PREFIX);
                match c.types.get(event_type) {
                    Some(message) => out.type_url.push_str(message),
                    None if c.message == "{type}" => out.type_url.push_str(event_type),
                    None => {
                        let version = c
                            .version
                            .text(record, "the schema version")?
                            .unwrap_or_default();
                        if !version.is_empty() && !version.bytes().all(|b| b.is_ascii_digit()) {
                            return Err(FramingError::Malformed {
                                what: "the schema version",
                                source_label: c.version.label(),
                                expected: "a number",
                                found: version.to_string(),
                            });
                        }
                        out.type_url.push_str(
                            &c.message
                                .replace("{type}", event_type)
                                .replace("{version}", version),
                        );
                    }
                }
                out.payload.clear();
                out.payload.extend_from_slice(record.value);
                c.fields.decode_meta(record, partition_id, out)
            }
            Framing::Confluent(c) => {
                let (schema_id, indexes, payload) = confluent_frame(record.value)?;
                let key = schema_key(schema_id, &indexes);
                out.type_url.clear();
                out.type_url.push_str(TYPE_URL_PREFIX);
                match (c.schema_ids.get(&key), &c.registry) {
                    (Some(message), _) => out.type_url.push_str(message),
                    (None, Some(registry)) => out.type_url.push_str(
                        &registry
                            .message(schema_id, &super::registry::index_key(&indexes))
                            .map_err(FramingError::Registry)?,
                    ),
                    (None, None) => {
                        return Err(FramingError::UnknownSchema {
                            schema_id,
                            indexes: if indexes.is_empty() { vec![0] } else { indexes },
                            key,
                        })
                    }
                }
                out.payload.clear();
                out.payload.extend_from_slice(payload);
                c.fields.decode_meta(record, partition_id, out)
            }
        }
    }
}

impl Fields {
    fn decode_meta(
        &self,
        record: &RawRecord<'_>,
        partition_id: i32,
        out: &mut Decoded,
    ) -> Result<(), FramingError> {
        let meta = &mut out.meta;
        meta.partition = partition_id;
        meta.offset = record.offset;
        meta.aggregate_id.clear();
        meta.aggregate_id.push_str(
            self.aggregate_id
                .text(record, "the aggregate id")?
                .unwrap_or_default(),
        );
        meta.aggregate_type.clear();
        if let Some(t) = self
            .aggregate_type
            .text(record, "the aggregate type")
            .ok()
            .flatten()
        {
            meta.aggregate_type.push_str(t);
        }
        meta.event_id = match &self.event_id {
            Place::Position => *uuid::Uuid::new_v5(
                &EVENT_ID_NAMESPACE,
                format!("{}/{}/{}", record.topic, record.partition, record.offset).as_bytes(),
            )
            .as_bytes(),
            from => {
                let id = from.text(record, "the event id")?.unwrap_or_default();
                match uuid::Uuid::parse_str(id) {
                    Ok(uuid) => *uuid.as_bytes(),
                    Err(_) => *uuid::Uuid::new_v5(&EVENT_ID_NAMESPACE, id.as_bytes()).as_bytes(),
                }
            }
        };
        meta.occurred_at_micros = match &self.time {
            Place::Timestamp => record
                .timestamp_millis
                .and_then(|ms| ms.checked_mul(1_000))
                .ok_or_else(|| FramingError::Missing {
                    what: "the event time",
                    source_label: "timestamp".into(),
                })?,
            from => {
                let text = from.text(record, "the event time")?.unwrap_or_default();
                chrono::DateTime::parse_from_rfc3339(text)
                    .map(|t| t.timestamp_micros())
                    .map_err(|_| FramingError::Malformed {
                        what: "the event time",
                        source_label: from.label(),
                        expected: "an RFC 3339 time",
                        found: text.to_string(),
                    })?
            }
        };
        meta.sequence = match &self.sequence {
            Place::Nothing => 0,
            from => {
                let text = from.text(record, "the sequence")?.unwrap_or_default();
                text.parse().map_err(|_| FramingError::Malformed {
                    what: "the sequence",
                    source_label: from.label(),
                    expected: "a whole number",
                    found: text.to_string(),
                })?
            }
        };
        Ok(())
    }
}

/// Split a value in Confluent's wire format: the schema id, the message indexes (empty for the
/// common `[0]`), and the message.
fn confluent_frame(value: &[u8]) -> Result<(u32, Vec<i32>, &[u8]), FramingError> {
    let bad = |what: String| FramingError::Confluent(what);
    match value.first() {
        None => return Err(bad("the value is empty".into())),
        Some(0) => {}
        Some(other) => return Err(bad(format!("magic byte {other}, expected 0"))),
    }
    let id_bytes: [u8; 4] = value
        .get(1..5)
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| bad(format!("{} bytes, too short for a schema id", value.len())))?;
    let schema_id = u32::from_be_bytes(id_bytes);
    let truncated = |at: usize| {
        bad(format!(
            "the message indexes of schema id {schema_id} are cut short at byte {at}"
        ))
    };
    // Message indexes: a count, then that many indexes, each a zigzag varint; a count of zero
    // stands for [0].
    let mut at = 5;
    let mut varint = || -> Result<i64, FramingError> {
        let mut raw = 0u64;
        for shift in (0..64).step_by(7) {
            let byte = *value.get(at).ok_or_else(|| truncated(at))?;
            at += 1;
            raw |= u64::from(byte & 0x7f) << shift;
            if byte < 0x80 {
                return Ok((raw >> 1) as i64 ^ -((raw & 1) as i64));
            }
        }
        Err(bad(format!(
            "a message index of schema id {schema_id} is longer than 64 bits"
        )))
    };
    let count = varint()?;
    if !(0..=64).contains(&count) {
        return Err(bad(format!(
            "{count} message indexes for schema id {schema_id}; a message is nested at most 64 deep"
        )));
    }
    let mut indexes = Vec::with_capacity(count as usize);
    for _ in 0..count {
        let index = varint()?;
        indexes.push(i32::try_from(index).map_err(|_| {
            bad(format!(
                "message index {index} of schema id {schema_id} is out of range"
            ))
        })?);
    }
    Ok((schema_id, indexes, &value[at..]))
}

/// Encode `value` as Confluent's serializer does (for tests and the example's writer).
pub fn confluent_value(schema_id: u32, indexes: &[i32], message: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(message.len() + 8);
    out.push(0);
    out.extend_from_slice(&schema_id.to_be_bytes());
    let mut zigzag = |v: i64| {
        let mut raw = ((v << 1) ^ (v >> 63)) as u64;
        loop {
            if raw < 0x80 {
                out.push(raw as u8);
                return;
            }
            out.push((raw as u8 & 0x7f) | 0x80);
            raw >>= 7;
        }
    };
    if indexes == [0] {
        zigzag(0);
    } else {
        zigzag(indexes.len() as i64);
        for &i in indexes {
            zigzag(i64::from(i));
        }
    }
    out.extend_from_slice(message);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(text: &str) -> Framing {
        let parsed: FramingConfig = toml::from_str(text).expect("toml");
        parsed.framing().expect("valid")
    }

    #[test]
    fn confluent_frames_split_into_schema_id_indexes_and_message() {
        for indexes in [vec![0], vec![1], vec![2, 1], vec![-3, 70_000]] {
            let value = confluent_value(7, &indexes, b"msg");
            let (id, read, rest) = confluent_frame(&value).expect("frame");
            assert_eq!(id, 7);
            assert_eq!(rest, b"msg");
            let expected: Vec<i32> = if indexes == [0] {
                vec![]
            } else {
                indexes.clone()
            };
            assert_eq!(read, expected, "{indexes:?}");
        }
        for (value, says) in [
            (vec![], "empty"),
            (vec![1, 0, 0, 0, 1, 0], "magic byte 1"),
            (vec![0, 0, 0], "too short"),
            (vec![0, 0, 0, 0, 1, 2], "cut short"),
            (vec![0, 0, 0, 0, 1, 0xff], "cut short"),
        ] {
            let error = confluent_frame(&value).expect_err("refused").to_string();
            assert!(error.contains(says), "{value:?}: {error}");
        }
    }

    #[test]
    fn cloudevents_metadata_comes_from_the_configured_headers() {
        let framing = config(
            "format = \"cloudevents\"\naggregate_id = \"key\"\n[types]\n\"com.acme.paid\" = \"acme.v2.Paid\"\n",
        );
        let headers = [
            ("ce_type", Some(&b"com.acme.paid"[..])),
            ("ce_id", Some(&b"not-a-uuid"[..])),
            ("ce_time", Some(&b"2025-01-02T03:04:05.5+01:00"[..])),
            ("ce_sequence", Some(&b"1"[..])),
            ("ce_sequence", Some(&b"4"[..])),
        ];
        let record = RawRecord {
            topic: "t",
            partition: 3,
            offset: 9,
            key: Some(b"acct-1"),
            value: b"\x08\x01",
            headers: &headers,
            timestamp_millis: None,
        };
        let mut out = Decoded::default();
        framing.decode_into(&record, 3, &mut out).expect("decodes");
        assert_eq!(out.type_url, "type.googleapis.com/acme.v2.Paid");
        assert_eq!(out.payload, b"\x08\x01");
        assert_eq!(out.meta.aggregate_id, "acct-1");
        assert_eq!(out.meta.sequence, 4, "the last of repeated headers wins");
        assert_eq!(out.meta.occurred_at_micros, 1_735_783_445_500_000);
        let again = {
            let mut again = Decoded::default();
            framing
                .decode_into(&record, 3, &mut again)
                .expect("decodes");
            again.meta.event_id
        };
        assert_eq!(
            out.meta.event_id, again,
            "a non-UUID id maps to the same UUID every time"
        );
        assert!(framing.key_is_aggregate_id());

        // An unmapped type is taken as the message name: the upcaster registry then refuses it by
        // that name, as it refuses an envelope's unknown type URL.
        let other = [
            ("ce_type", Some(&b"com.acme.other"[..])),
            headers[1],
            headers[2],
            headers[4],
        ];
        let unmapped = RawRecord {
            headers: &other,
            ..record
        };
        framing
            .decode_into(&unmapped, 3, &mut out)
            .expect("decodes");
        assert_eq!(out.type_url, "type.googleapis.com/com.acme.other");
        let no_id = RawRecord {
            headers: &headers[..1],
            ..record
        };
        let error = framing
            .decode_into(&no_id, 3, &mut out)
            .expect_err("no id")
            .to_string();
        assert_eq!(
            error,
            "the event id is missing: the record has no header ce_id"
        );
    }
}
