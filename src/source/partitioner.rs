//! Which partition a producer wrote a key to, computed the way the producers do, so that `replay`
//! reads one partition instead of the whole topic.
//!
//! Two partitioners cover nearly every producer: librdkafka's default (`consistent_random`: CRC-32 of
//! the key), used by every librdkafka-based client (C, Go, Python, .NET, Rust), and the Java client's
//! default (`murmur2_random` in librdkafka's terms: murmur2 of the key, made positive). Records
//! without a key are spread at random by both, which is why reproject's records are always keyed.

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Partitioner {
    /// librdkafka's default: CRC32 of the key
    ConsistentRandom,
    /// The Java client's default: murmur2 of the key
    Murmur2Random,
}

impl Partitioner {
    /// The name librdkafka's `partitioner` setting takes.
    pub fn librdkafka_name(self) -> &'static str {
        match self {
            Partitioner::ConsistentRandom => "consistent_random",
            Partitioner::Murmur2Random => "murmur2_random",
        }
    }

    /// The partition, out of `partition_count`, a record with this key goes to.
    pub fn partition(self, key: &[u8], partition_count: i32) -> i32 {
        let count = partition_count.max(1) as u32;
        let hash = match self {
            Partitioner::ConsistentRandom => crc32fast::hash(key),
            Partitioner::Murmur2Random => murmur2(key) & 0x7fff_ffff,
        };
        (hash % count) as i32
    }
}

/// Kafka's murmur2 (`org.apache.kafka.common.utils.Utils.murmur2`), bit for bit.
pub fn murmur2(data: &[u8]) -> u32 {
    const SEED: u32 = 0x9747_b28c;
    const M: u32 = 0x5bd1_e995;
    const R: u32 = 24;
    let mut h = SEED ^ data.len() as u32;
    let mut chunks = data.chunks_exact(4);
    for chunk in chunks.by_ref() {
        let mut k = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> R;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M);
        h ^= k;
    }
    let rest = chunks.remainder();
    if rest.len() >= 3 {
        h ^= u32::from(rest[2]) << 16;
    }
    if rest.len() >= 2 {
        h ^= u32::from(rest[1]) << 8;
    }
    if !rest.is_empty() {
        h ^= u32::from(rest[0]);
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn murmur2_matches_the_java_clients_test_vectors() {
        // From Kafka's UtilsTest.testMurmur2.
        let cases: [(&[u8], i32); 6] = [
            (b"21", -973_932_308),
            (b"foobar", -790_332_482),
            (b"a-little-bit-long-string", -985_981_536),
            (b"a-little-bit-longer-string", -1_486_304_829),
            (
                b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8",
                -58_897_971,
            ),
            (b"abc", 479_470_107),
        ];
        for (key, expected) in cases {
            assert_eq!(
                murmur2(key) as i32,
                expected,
                "{}",
                String::from_utf8_lossy(key)
            );
        }
    }

    #[test]
    fn every_key_lands_within_the_partition_count() {
        for p in [Partitioner::ConsistentRandom, Partitioner::Murmur2Random] {
            for key in ["", "a", "order-1", "9f1c2d3e-0000-4000-8000-000000000001"] {
                let partition = p.partition(key.as_bytes(), 7);
                assert!((0..7).contains(&partition), "{p:?} {key}: {partition}");
            }
        }
    }
}
