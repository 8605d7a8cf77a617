//! Recognising an event that comes again: a producer that retried a send writes it twice, close
//! together, into the same partition.

/// The event ids of the last records applied in each partition, to recognise one that comes again:
/// a producer that retried a send writes the same event twice, into the same partition (same key),
/// close together. Bounded: ids older than the window are forgotten, so a copy written further
/// apart than that is not recognised.
///
/// Per partition because records arrive in long runs of one partition: a window that small stays
/// in the CPU's cache, where one big window cost the replay a cache miss or three per record (18%
/// of its time, measured). Ids are kept as 64 bits (both halves of the UUID folded together; random
/// UUIDs collide there about once in 10^11 windows).
pub struct RecentEventIds {
    partitions: rustc_hash::FxHashMap<i32, Window>,
    per_partition: usize,
}

struct Window {
    order: std::collections::VecDeque<u64>,
    /// Folded id -> offset.
    seen: rustc_hash::FxHashMap<u64, i64>,
}

/// Records per partition whose event ids are remembered: about 340 KB per partition.
pub const DUPLICATE_WINDOW: usize = 8_192;

/// The fewest ids a memory budget shrinks a partition's window to (about 12 KB): a producer's
/// retried write lands within a few records of the first, far inside it.
pub const MIN_DUPLICATE_WINDOW: usize = 447;

/// Bytes a window of `ids` takes: the ring of ids, and a hash table of id and offset (16 bytes and
/// a control byte a slot) whose slots are a power of two at most 7/8 full.
pub fn window_bytes(ids: usize) -> usize {
    let held = ids + 1;
    let slots = (held * 8).div_ceil(7).next_power_of_two();
    slots * 17 + held * 8
}

fn folded_id(event_id: &[u8; 16]) -> u64 {
    let id = u128::from_le_bytes(*event_id);
    (id as u64) ^ ((id >> 64) as u64)
}

impl RecentEventIds {
    /// The largest window, at most [`DUPLICATE_WINDOW`] and at least [`MIN_DUPLICATE_WINDOW`], whose
    /// `partitions` copies fit in `bytes`; sizes just under 7/8 of a power of two fill their table.
    pub fn window_for(bytes: usize, partitions: usize) -> usize {
        let per_partition = bytes / partitions.max(1);
        if window_bytes(DUPLICATE_WINDOW) <= per_partition {
            return DUPLICATE_WINDOW;
        }
        let mut ids = DUPLICATE_WINDOW / 8 * 7 - 1;
        while ids > MIN_DUPLICATE_WINDOW && window_bytes(ids) > per_partition {
            ids = ids.div_ceil(2) - 1;
        }
        ids.max(MIN_DUPLICATE_WINDOW)
    }

    pub fn new(per_partition: usize) -> RecentEventIds {
        RecentEventIds {
            partitions: rustc_hash::FxHashMap::default(),
            per_partition,
        }
    }

    /// The offset at which this event was applied before in `partition`, if it was lately.
    pub fn seen_at(&self, event_id: &[u8; 16], partition: i32) -> Option<i64> {
        self.partitions
            .get(&partition)?
            .seen
            .get(&folded_id(event_id))
            .copied()
    }

    pub fn remember(&mut self, event_id: &[u8; 16], partition: i32, offset: i64) {
        let capacity = self.per_partition;
        // Full size from the start: growing on the way costs rehashes on the reader's hot path.
        let window = self.partitions.entry(partition).or_insert_with(|| Window {
            order: std::collections::VecDeque::with_capacity(capacity + 1),
            seen: rustc_hash::FxHashMap::with_capacity_and_hasher(capacity + 1, Default::default()),
        });
        let id = folded_id(event_id);
        if let std::collections::hash_map::Entry::Vacant(slot) = window.seen.entry(id) {
            slot.insert(offset);
            window.order.push_back(id);
            if window.order.len() > capacity {
                if let Some(old) = window.order.pop_front() {
                    window.seen.remove(&old);
                }
            }
        }
    }
}
