//! Hostile input through envelope decoding, the upcaster chain, the projections and the fold:
//! random bytes, mutated valid records, mutated payloads under valid envelopes, and the strings the
//! v1 -> v2 -> v3 steps parse. Any of them may be refused; none may panic, and a refusal must say
//! what was wrong.

use std::sync::OnceLock;

use proptest::prelude::*;
use prost::Message;
use reproject::domain::shop::generator::{History, HistoryConfig};
use reproject::domain::shop::upcasters::{parse_address, parse_decimal_cents, parse_local_time};
use reproject::domain::shop::{self, ShopEvent};
use reproject::envelope;
use reproject::projection::{Changes, DynProjection, Event, LogicalTime, RowStore};
use reproject::proto::reproject::v1::EventEnvelope;
use reproject::upcast::Registry;

/// How many cases each property runs: `REPROJECT_FUZZ_CASES`, else `default`.
fn fuzz_cases(default: u32) -> u32 {
    std::env::var("REPROJECT_FUZZ_CASES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(default)
}

struct Fixture {
    registry: Registry<ShopEvent>,
    projections: Vec<DynProjection<ShopEvent>>,
    /// Valid records of all three schema versions, from the seed generator.
    records: Vec<Vec<u8>>,
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| Fixture {
        registry: shop::registry().expect("registry"),
        projections: shop::projections(),
        records: History::new(HistoryConfig::new(3_000, 300, 50, 5))
            .take(3_000)
            .map(|r| r.value)
            .collect(),
    })
}

/// What the pipeline made of one record.
#[derive(Debug, PartialEq)]
enum Outcome {
    BadEnvelope,
    BadPayload,
    BadChange,
    Applied,
}

/// Everything the replay does to one record, without the log or the database.
fn through_the_pipeline(bytes: &[u8]) -> Outcome {
    let f = fixture();
    let decoded = match envelope::decode(bytes, 0, 0) {
        Ok(d) => d,
        Err(e) => {
            assert!(!e.to_string().is_empty());
            return Outcome::BadEnvelope;
        }
    };
    let payload = match f.registry.upcast(&decoded.type_url, &decoded.payload) {
        Ok(p) => p,
        Err(e) => {
            // The refusal names the type it was given.
            let message = e.to_string();
            assert!(!message.is_empty());
            return Outcome::BadPayload;
        }
    };
    let event = Event {
        meta: &decoded.meta,
        payload: &payload,
    };
    let mut outcome = Outcome::Applied;
    for projection in &f.projections {
        let mut changes = Changes::default();
        projection.apply(&event, &mut changes);
        let mut store = RowStore::new(projection.tables().len());
        for change in changes.drain() {
            if store
                .apply(projection.tables(), change, LogicalTime::of(&decoded.meta))
                .is_err()
            {
                outcome = Outcome::BadChange;
            }
        }
    }
    outcome
}

#[derive(Clone, Debug)]
enum Mutation {
    Flip { at: usize, mask: u8 },
    Truncate { at: usize },
    Insert { at: usize, bytes: Vec<u8> },
    Remove { at: usize, len: usize },
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), 1u8..=255).prop_map(|(at, mask)| Mutation::Flip { at, mask }),
        any::<usize>().prop_map(|at| Mutation::Truncate { at }),
        (any::<usize>(), prop::collection::vec(any::<u8>(), 1..8))
            .prop_map(|(at, bytes)| Mutation::Insert { at, bytes }),
        (any::<usize>(), 1usize..8).prop_map(|(at, len)| Mutation::Remove { at, len }),
    ]
}

fn mutate(mut bytes: Vec<u8>, mutations: &[Mutation]) -> Vec<u8> {
    for m in mutations {
        let len = bytes.len().max(1);
        match m {
            Mutation::Flip { at, mask } => {
                if let Some(b) = bytes.get_mut(at % len) {
                    *b ^= mask;
                }
            }
            Mutation::Truncate { at } => bytes.truncate(at % len),
            Mutation::Insert { at, bytes: extra } => {
                let at = (at % len).min(bytes.len());
                bytes.splice(at..at, extra.iter().copied());
            }
            Mutation::Remove { at, len: n } => {
                let at = (at % len).min(bytes.len());
                let end = (at + n).min(bytes.len());
                bytes.drain(at..end);
            }
        }
    }
    bytes
}

proptest! {
    // 4,000 cases each in CI; REPROJECT_FUZZ_CASES=1000000 for a long run.
    #![proptest_config(ProptestConfig { cases: fuzz_cases(4_000), .. ProptestConfig::default() })]

    #[test]
    fn random_bytes_are_refused_or_applied_never_a_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        through_the_pipeline(&bytes);
    }

    #[test]
    fn mutated_valid_records_are_refused_or_applied_never_a_panic(
        pick in any::<prop::sample::Index>(),
        mutations in prop::collection::vec(mutation(), 1..4),
    ) {
        let f = fixture();
        let record = f.records[pick.index(f.records.len())].clone();
        through_the_pipeline(&mutate(record, &mutations));
    }

    /// The envelope stays valid; only the payload is damaged, so every case reaches the upcasters.
    #[test]
    fn mutated_payloads_reach_the_upcasters_and_never_panic(
        pick in any::<prop::sample::Index>(),
        mutations in prop::collection::vec(mutation(), 1..4),
    ) {
        let f = fixture();
        let mut envelope = EventEnvelope::decode(f.records[pick.index(f.records.len())].as_slice())
            .expect("generator records are valid");
        if let Some(payload) = envelope.payload.as_mut() {
            payload.value = mutate(std::mem::take(&mut payload.value), &mutations);
        }
        let outcome = through_the_pipeline(&envelope.encode_to_vec());
        prop_assert_ne!(outcome, Outcome::BadEnvelope);
    }

    #[test]
    fn decimal_strings_parse_exactly_or_are_refused(text in "-?[0-9]{0,20}([.,][0-9]{0,4})?|\\PC{0,12}") {
        match parse_decimal_cents("amount", &text) {
            Ok(cents) => {
                // What parsed prints back as the same amount.
                let back = format!("{}{}.{:02}", if cents < 0 { "-" } else { "" }, (cents / 100).abs(), (cents % 100).abs());
                let normalized = if text.contains('.') { text.clone() } else { format!("{text}.00") };
                let (whole, frac) = normalized.split_once('.').expect("has a dot");
                let frac = format!("{frac:0<2}");
                let whole = whole.trim_start_matches('-').trim_start_matches('0');
                let expected = format!("{}{}.{}", if text.starts_with('-') && cents != 0 { "-" } else { "" }, if whole.is_empty() { "0" } else { whole }, frac);
                prop_assert_eq!(back, expected);
            }
            Err(e) => prop_assert!(e.to_string().contains("amount"), "{}", e),
        }
    }

    #[test]
    fn local_times_and_addresses_parse_or_are_refused_never_a_panic(
        time in "[0-9]{4}-[0-9]{2}-[0-9]{2}[ T][0-9]{2}:[0-9]{2}(:[0-9]{2})? [A-Za-z/_+-]{0,20}|\\PC{0,30}",
        address in "\\PC{0,40}",
    ) {
        if let Err(e) = parse_local_time("placed_at", &time) {
            prop_assert!(e.to_string().contains("placed_at"), "{}", e);
        }
        let _ = parse_address(&address);
    }
}

/// The known-bad inputs the issue names, each refused with a reason naming the field.
#[test]
fn the_classic_bad_values_are_refused_with_the_field_named() {
    for text in ["12,50", "1e3", "", "12.505", "--1", "12.", "€12"] {
        let err = parse_decimal_cents("total", text).expect_err(text);
        assert!(err.to_string().contains("total"), "{text}: {err}");
    }
    for text in [
        "2021-03-01 10:00 Mars/Olympus_Mons",
        "2021-02-30 10:00 Europe/Berlin",
        "yesterday",
    ] {
        let err = parse_local_time("placed_at", text).expect_err(text);
        assert!(err.to_string().contains("placed_at"), "{text}: {err}");
    }
}
