//! Decoding the stored record: the envelope every record carries, and the versioned type of its
//! payload.
//!
//! A payload's type URL names a versioned message, `type.googleapis.com/acme.v2.OrderPaid`: the part
//! after the last `/` is the full message name, and the package's last segment (`v2`) is its version.

pub mod framing;
pub mod registry;

use crate::projection::EventMeta;

pub use framing::{Framing, FramingConfig, FramingError, OwnedRecord, RawRecord};

#[derive(Debug, thiserror::Error)]
pub enum EnvelopeError {
    #[error("the record is not a valid event envelope: {0}")]
    Undecodable(#[from] prost::DecodeError),
    #[error("the record is not a valid event envelope: {what} at byte {at}")]
    Malformed { what: &'static str, at: usize },
    #[error("the envelope has no payload")]
    MissingPayload,
    #[error("the envelope's event_id has {0} bytes; a UUID has 16")]
    BadEventId(usize),
    #[error("the envelope has no occurred_at time")]
    MissingTime,
    #[error("the envelope's occurred_at is out of range: {seconds}s {nanos}ns")]
    TimeOutOfRange { seconds: i64, nanos: i32 },
}

/// A decoded envelope with its payload still encoded.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Decoded {
    pub meta: EventMeta,
    pub type_url: String,
    pub payload: Vec<u8>,
}

/// The fields of `reproject.v1.EventEnvelope` a projection can see, with the same tags, decoded by
/// prost: the reference [`decode_into`] is tested against.
#[cfg(test)]
use prost::Message;

#[cfg(test)]
#[derive(Clone, PartialEq, prost::Message)]
struct EnvelopeFields {
    #[prost(bytes = "vec", tag = "1")]
    event_id: Vec<u8>,
    #[prost(string, tag = "2")]
    aggregate_type: String,
    #[prost(string, tag = "3")]
    aggregate_id: String,
    #[prost(uint64, tag = "4")]
    sequence: u64,
    #[prost(message, optional, tag = "5")]
    occurred_at: Option<prost_types::Timestamp>,
    #[prost(message, optional, tag = "6")]
    payload: Option<prost_types::Any>,
}

/// Decode one record's value. `partition` and `offset` are only copied into the metadata.
pub fn decode(bytes: &[u8], partition: i32, offset: i64) -> Result<Decoded, EnvelopeError> {
    let mut decoded = Decoded::default();
    decode_into(bytes, partition, offset, &mut decoded)?;
    Ok(decoded)
}

/// [`decode`] into `out`, reusing its strings and buffers: the replay's readers decode every
/// record into the same one, where allocating five strings and buffers per record (and freeing
/// them) cost more than parsing them. The wire format is read by hand for that; the result is the
/// same as prost's for every input (a test compares them on mutated envelopes). On error `out`
/// holds partial values.
pub fn decode_into(
    bytes: &[u8],
    partition: i32,
    offset: i64,
    out: &mut Decoded,
) -> Result<(), EnvelopeError> {
    let mut wire = Wire { bytes, at: 0 };
    let (mut event_id, mut time, mut have_payload) = (&[][..], None, false);
    out.meta.aggregate_type.clear();
    out.meta.aggregate_id.clear();
    out.meta.sequence = 0;
    out.type_url.clear();
    out.payload.clear();
    while !wire.done() {
        let (field, kind) = wire.key()?;
        match (field, kind) {
            (1, LEN) => event_id = wire.len_delimited()?,
            (2, LEN) => set_str(&mut out.meta.aggregate_type, &mut wire)?,
            (3, LEN) => set_str(&mut out.meta.aggregate_id, &mut wire)?,
            (4, VARINT) => out.meta.sequence = wire.varint()?,
            (5, LEN) => {
                // A message field given twice is merged, as protobuf says.
                let mut inner = Wire {
                    bytes: wire.len_delimited()?,
                    at: 0,
                };
                let (mut seconds, mut nanos) = time.unwrap_or((0i64, 0i32));
                while !inner.done() {
                    match inner.key()? {
                        (1, VARINT) => seconds = inner.varint()? as i64,
                        (2, VARINT) => nanos = inner.varint()? as i32,
                        (1..=2, _) => {
                            return Err(inner.malformed("a time with the wrong wire type"))
                        }
                        (field, kind) => inner.skip_field(field, kind)?,
                    }
                }
                time = Some((seconds, nanos));
            }
            (6, LEN) => {
                have_payload = true;
                let mut inner = Wire {
                    bytes: wire.len_delimited()?,
                    at: 0,
                };
                while !inner.done() {
                    match inner.key()? {
                        (1, LEN) => set_str(&mut out.type_url, &mut inner)?,
                        (2, LEN) => {
                            out.payload.clear();
                            out.payload.extend_from_slice(inner.len_delimited()?);
                        }
                        (1..=2, _) => {
                            return Err(inner.malformed("a payload with the wrong wire type"))
                        }
                        (field, kind) => inner.skip_field(field, kind)?,
                    }
                }
            }
            (1..=6, _) => {
                return Err(EnvelopeError::Malformed {
                    what: "a field with the wrong wire type",
                    at: wire.at,
                })
            }
            (field, kind) => wire.skip_field(field, kind)?,
        }
    }
    if !have_payload {
        return Err(EnvelopeError::MissingPayload);
    }
    out.meta.event_id = event_id
        .try_into()
        .map_err(|_| EnvelopeError::BadEventId(event_id.len()))?;
    let (seconds, nanos) = time.ok_or(EnvelopeError::MissingTime)?;
    let at = prost_types::Timestamp { seconds, nanos };
    out.meta.occurred_at_micros = timestamp_micros(&at).ok_or(EnvelopeError::TimeOutOfRange {
        seconds: at.seconds,
        nanos: at.nanos,
    })?;
    out.meta.partition = partition;
    out.meta.offset = offset;
    Ok(())
}

const VARINT: u8 = 0;
const I64: u8 = 1;
const LEN: u8 = 2;
const START_GROUP: u8 = 3;
const END_GROUP: u8 = 4;
const I32: u8 = 5;

/// A cursor over protobuf wire format.
struct Wire<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Wire<'a> {
    fn done(&self) -> bool {
        self.at >= self.bytes.len()
    }

    fn malformed(&self, what: &'static str) -> EnvelopeError {
        EnvelopeError::Malformed { what, at: self.at }
    }

    fn varint(&mut self) -> Result<u64, EnvelopeError> {
        let mut value = 0u64;
        for i in 0..10 {
            let Some(&byte) = self.bytes.get(self.at) else {
                return Err(self.malformed("a number cut short"));
            };
            self.at += 1;
            // The tenth byte may only hold the 64th bit.
            if i == 9 && byte > 1 {
                return Err(self.malformed("a number longer than 64 bits"));
            }
            value |= u64::from(byte & 0x7f) << (7 * i);
            if byte < 0x80 {
                return Ok(value);
            }
        }
        Err(self.malformed("a number longer than 64 bits"))
    }

    /// A field's number and wire type.
    fn key(&mut self) -> Result<(u32, u8), EnvelopeError> {
        let key = self.varint()?;
        if key > u64::from(u32::MAX) {
            return Err(self.malformed("a field key out of range"));
        }
        let (field, kind) = ((key >> 3) as u32, (key & 7) as u8);
        if field == 0 {
            return Err(self.malformed("field number 0"));
        }
        Ok((field, kind))
    }

    fn take(&mut self, len: usize) -> Result<&'a [u8], EnvelopeError> {
        let end = self
            .at
            .checked_add(len)
            .filter(|&end| end <= self.bytes.len())
            .ok_or_else(|| self.malformed("a field longer than the record"))?;
        let taken = &self.bytes[self.at..end];
        self.at = end;
        Ok(taken)
    }

    fn len_delimited(&mut self) -> Result<&'a [u8], EnvelopeError> {
        let len = self.varint()?;
        let len =
            usize::try_from(len).map_err(|_| self.malformed("a field longer than the record"))?;
        self.take(len)
    }

    /// Pass over a field this reader does not need (the metadata map, fields added later).
    fn skip(&mut self, kind: u8) -> Result<(), EnvelopeError> {
        match kind {
            VARINT => self.varint().map(drop),
            I64 => self.take(8).map(drop),
            LEN => self.len_delimited().map(drop),
            I32 => self.take(4).map(drop),
            _ => Err(self.malformed("an invalid wire type")),
        }
    }

    /// Pass over a field of any wire type, a (deprecated) group included: its fields up to the
    /// matching end.
    fn skip_field(&mut self, field: u32, kind: u8) -> Result<(), EnvelopeError> {
        match kind {
            START_GROUP => loop {
                if self.done() {
                    return Err(self.malformed("a group without its end"));
                }
                let (inner, inner_kind) = self.key()?;
                if inner_kind == END_GROUP {
                    if inner != field {
                        return Err(self.malformed("a group ended by another field"));
                    }
                    return Ok(());
                }
                self.skip_field(inner, inner_kind)?;
            },
            END_GROUP => Err(self.malformed("a group's end without its start")),
            _ => self.skip(kind),
        }
    }
}

fn set_str(out: &mut String, wire: &mut Wire<'_>) -> Result<(), EnvelopeError> {
    let at = wire.at;
    let text =
        std::str::from_utf8(wire.len_delimited()?).map_err(|_| EnvelopeError::Malformed {
            what: "a string that is not UTF-8",
            at,
        })?;
    out.clear();
    out.push_str(text);
    Ok(())
}

/// prost's decoding of the same fields, kept as the reference the hand-written one is tested against.
#[cfg(test)]
fn decode_with_prost(bytes: &[u8], partition: i32, offset: i64) -> Result<Decoded, EnvelopeError> {
    let env = EnvelopeFields::decode(bytes)?;
    let payload = env.payload.ok_or(EnvelopeError::MissingPayload)?;
    let event_id: [u8; 16] = env
        .event_id
        .as_slice()
        .try_into()
        .map_err(|_| EnvelopeError::BadEventId(env.event_id.len()))?;
    let at = env.occurred_at.ok_or(EnvelopeError::MissingTime)?;
    let occurred_at_micros = timestamp_micros(&at).ok_or(EnvelopeError::TimeOutOfRange {
        seconds: at.seconds,
        nanos: at.nanos,
    })?;
    Ok(Decoded {
        meta: EventMeta {
            partition,
            offset,
            event_id,
            aggregate_type: env.aggregate_type,
            aggregate_id: env.aggregate_id,
            sequence: env.sequence,
            occurred_at_micros,
        },
        type_url: payload.type_url,
        payload: payload.value,
    })
}

/// Microseconds since the Unix epoch, or None when the timestamp is out of range or malformed.
pub fn timestamp_micros(ts: &prost_types::Timestamp) -> Option<i64> {
    if !(0..1_000_000_000).contains(&ts.nanos) {
        return None;
    }
    ts.seconds
        .checked_mul(1_000_000)?
        .checked_add(i64::from(ts.nanos / 1_000))
}

pub fn micros_timestamp(micros: i64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: micros.div_euclid(1_000_000),
        nanos: (micros.rem_euclid(1_000_000) * 1_000) as i32,
    }
}

/// The message name a type URL points at: `acme.v2.OrderPaid` for
/// `type.googleapis.com/acme.v2.OrderPaid`.
pub fn message_name(type_url: &str) -> &str {
    type_url.rsplit('/').next().unwrap_or(type_url)
}

/// The version of a versioned message name: 2 for `acme.v2.OrderPaid`. None if the package does not
/// end in `v<N>`.
pub fn message_version(type_url: &str) -> Option<u32> {
    let name = message_name(type_url);
    let mut parts = name.rsplit('.');
    parts.next()?; // the message itself
    parts.next()?.strip_prefix('v')?.parse().ok()
}

pub const TYPE_URL_PREFIX: &str = "type.googleapis.com/";

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::reproject::v1::EventEnvelope;

    #[test]
    fn a_full_envelope_decodes_to_the_fields_projections_see_metadata_skipped() {
        let full = EventEnvelope {
            event_id: vec![7; 16],
            aggregate_type: "Order".into(),
            aggregate_id: "order-1".into(),
            sequence: 3,
            occurred_at: Some(micros_timestamp(1_700_000_000_123_456)),
            payload: Some(prost_types::Any {
                type_url: format!("{TYPE_URL_PREFIX}acme.v2.OrderPaid"),
                value: vec![1, 2, 3],
            }),
            metadata: [("source".to_string(), "test".to_string())]
                .into_iter()
                .collect(),
        };
        let decoded = decode(&full.encode_to_vec(), 4, 99).expect("decodes");
        assert_eq!(decoded.meta.event_id, [7; 16]);
        assert_eq!(decoded.meta.aggregate_type, "Order");
        assert_eq!(decoded.meta.aggregate_id, "order-1");
        assert_eq!(decoded.meta.sequence, 3);
        assert_eq!(decoded.meta.occurred_at_micros, 1_700_000_000_123_456);
        assert_eq!((decoded.meta.partition, decoded.meta.offset), (4, 99));
        assert_eq!(decoded.type_url, "type.googleapis.com/acme.v2.OrderPaid");
        assert_eq!(decoded.payload, vec![1, 2, 3]);
    }

    #[test]
    fn the_hand_written_decoder_agrees_with_prost_on_mutated_envelopes() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        let mut reused = Decoded::default();
        let (mut agreed_ok, mut agreed_err) = (0, 0);
        for round in 0..20_000 {
            let full = EventEnvelope {
                event_id: (0..if rng.random_bool(0.95) { 16 } else { 15 })
                    .map(|_| rng.random())
                    .collect(),
                aggregate_type: "Order".into(),
                aggregate_id: format!("order-{}", rng.random::<u32>()),
                sequence: rng.random_range(0..1_000_000),
                occurred_at: rng.random_bool(0.95).then(|| {
                    micros_timestamp(rng.random_range(-1_000_000_000..2_000_000_000_000_000))
                }),
                payload: rng.random_bool(0.95).then(|| prost_types::Any {
                    type_url: format!("{TYPE_URL_PREFIX}acme.v{}.OrderPaid", round % 4),
                    value: (0..rng.random_range(0..40)).map(|_| rng.random()).collect(),
                }),
                metadata: (0..rng.random_range(0..3))
                    .map(|i| (format!("k{i}"), "v".repeat(i)))
                    .collect(),
            };
            let mut bytes = full.encode_to_vec();
            // Mutate most of them: flip bytes, cut the end, or splice in random bytes.
            let mutations = if rng.random_bool(0.4) {
                0
            } else {
                rng.random_range(1..4)
            };
            for _ in 0..mutations {
                if bytes.is_empty() {
                    break;
                }
                let at = rng.random_range(0..bytes.len());
                match rng.random_range(0..3) {
                    0 => bytes[at] = rng.random(),
                    1 => bytes.truncate(at),
                    _ => {
                        let noise: Vec<u8> =
                            (0..rng.random_range(1..6)).map(|_| rng.random()).collect();
                        bytes.splice(at..at, noise);
                    }
                }
            }
            let expected = decode_with_prost(&bytes, 3, round);
            let got = decode_into(&bytes, 3, round, &mut reused);
            match (expected, got) {
                (Ok(expected), Ok(())) => {
                    assert_eq!(reused, expected, "round {round}: {bytes:?}");
                    agreed_ok += 1;
                }
                (Err(_), Err(_)) => agreed_err += 1,
                (expected, got) => panic!(
                    "round {round}: prost gave {expected:?}, the hand-written decoder {got:?}, for {bytes:?}"
                ),
            }
        }
        // Both outcomes were exercised.
        assert!(
            agreed_ok > 5_000 && agreed_err > 5_000,
            "{agreed_ok} ok, {agreed_err} errors"
        );
    }

    #[test]
    fn type_urls_name_a_message_and_its_version() {
        assert_eq!(
            message_name("type.googleapis.com/acme.v2.OrderPaid"),
            "acme.v2.OrderPaid"
        );
        assert_eq!(
            message_version("type.googleapis.com/acme.v2.OrderPaid"),
            Some(2)
        );
        assert_eq!(message_version("acme.v13.X"), Some(13));
        assert_eq!(message_version("acme.OrderPaid"), None);
        assert_eq!(message_version("OrderPaid"), None);
    }

    #[test]
    fn timestamps_round_trip_through_micros() {
        for micros in [0, 1, -1, 1_700_000_000_123_456, -86_400_000_001] {
            assert_eq!(timestamp_micros(&micros_timestamp(micros)), Some(micros));
        }
        assert_eq!(
            timestamp_micros(&prost_types::Timestamp {
                seconds: 1,
                nanos: -5
            }),
            None
        );
        assert_eq!(
            timestamp_micros(&prost_types::Timestamp {
                seconds: i64::MAX,
                nanos: 0
            }),
            None
        );
    }
}
