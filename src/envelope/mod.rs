//! Decoding the stored record: the envelope every record carries, and the versioned type of its
//! payload.
//!
//! A payload's type URL names a versioned message, `type.googleapis.com/shop.v2.OrderPaid`: the part
//! after the last `/` is the full message name, and the package's last segment (`v2`) is its version.

use prost::Message;

use crate::projection::EventMeta;

#[derive(Debug, thiserror::Error)]
pub enum EnvelopeError {
    #[error("the record is not a valid event envelope: {0}")]
    Undecodable(#[from] prost::DecodeError),
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
pub struct Decoded {
    pub meta: EventMeta,
    pub type_url: String,
    pub payload: Vec<u8>,
}

/// The fields of `reproject.v1.EventEnvelope` a projection can see, with the same tags. Decoding
/// into it skips the string metadata map, whose allocations cost more than the rest of the envelope
/// on the replay's hot path; writers use the full
/// [`crate::proto::reproject::v1::EventEnvelope`].
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

/// The message name a type URL points at: `shop.v2.OrderPaid` for
/// `type.googleapis.com/shop.v2.OrderPaid`.
pub fn message_name(type_url: &str) -> &str {
    type_url.rsplit('/').next().unwrap_or(type_url)
}

/// The version of a versioned message name: 2 for `shop.v2.OrderPaid`. None if the package does not
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
                type_url: format!("{TYPE_URL_PREFIX}shop.v2.OrderPaid"),
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
        assert_eq!(decoded.type_url, "type.googleapis.com/shop.v2.OrderPaid");
        assert_eq!(decoded.payload, vec![1, 2, 3]);
    }

    #[test]
    fn type_urls_name_a_message_and_its_version() {
        assert_eq!(
            message_name("type.googleapis.com/shop.v2.OrderPaid"),
            "shop.v2.OrderPaid"
        );
        assert_eq!(
            message_version("type.googleapis.com/shop.v2.OrderPaid"),
            Some(2)
        );
        assert_eq!(message_version("shop.v13.X"), Some(13));
        assert_eq!(message_version("shop.OrderPaid"), None);
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
