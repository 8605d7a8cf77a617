//! The memory budget (`--memory-budget`): how it is shared out over what a replay holds, so that
//! it bounds the whole process and not only the fold, and what the process has held (its peak
//! resident set, from /proc).
//!
//! What a replay holds whatever the budget is taken off first: the program and its runtime, the
//! PostgreSQL connections, librdkafka's threads, and per partition read librdkafka's state and the
//! reader's. The rest goes to the parts that grow with the log and can be bounded: the fold (3/8,
//! spilled to PostgreSQL past it), the aggregate index (1/8, given up past it), librdkafka's
//! prefetch queues (1/8), the batches between the readers and the fold (1/8), and the duplicate-id
//! windows (1/16), with the last 3/16 for what the allocators keep besides the live heap. The
//! fixed costs were measured on the 10M-event, 128-partition example log (BENCHMARKS.md, "A memory
//! budget for the whole process").

use super::reader::RecentEventIds;

/// What a replaying process holds whatever its budget: the binary and its libraries (~27 MiB
/// resident), librdkafka's allocations at the smallest prefetch queues (~34 MiB with 128
/// partitions), the runtime, the connections, and what the allocator keeps besides the live heap.
pub const PROCESS_BYTES: usize = 96 << 20;

/// What each partition read adds whatever the budget: librdkafka's state and fetch buffers for it,
/// the reader's positions and checks (its duplicate-id window is counted apart). An allowance, not
/// a measurement: only 128 partitions were measured, where it is 20 MiB of the fixed costs.
pub const PARTITION_BYTES: usize = 160 << 10;

/// The least of the budget left for the parts that grow with the log: below it a replay spills at
/// almost every step, and the smallest budget needs the room (at 32 MiB a replay of 128
/// partitions peaked at 147 MiB of its 148).
const LEAST_GROWING_BYTES: usize = 48 << 20;

/// A batch is handed to the fold at this many bytes of changes at the least, whatever the budget.
const LEAST_BATCH_BYTES: usize = 256 << 10;

/// The fold folds at least this many bytes of changes in a step: several of the smallest batches.
const LEAST_FOLD_STEP_BYTES: usize = 4 * LEAST_BATCH_BYTES;

/// What librdkafka holds for a queued record against the payload bytes its queue limit counts:
/// about 3.5x for the example domain's records of a hundred-odd bytes (the queue's per-record
/// operation and message structures, the fetch buffers), measured as RSS against
/// `queued.max.messages.kbytes`.
/// Larger records need less; the queue is then only smaller than it could be.
pub const QUEUED_RECORD_OVERHEAD: usize = 4;

/// Batches the channel between the readers and the fold holds under a budget.
pub const BATCHES_QUEUED: usize = 2;

/// How a replay's memory budget is shared out.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MemoryShares {
    /// The fold's rows (and the keys of spilled rows it remembers); past it, it spills.
    pub fold: usize,
    /// The aggregate index; past it, it is given up.
    pub aggregate_index: usize,
    /// librdkafka's prefetch queues, all readers together, as librdkafka counts them: by payload
    /// bytes, a [`QUEUED_RECORD_OVERHEAD`]th of their share of the budget.
    pub prefetch: usize,
    /// A reader hands its batch over at this many bytes of changes.
    pub batch: usize,
    /// The fold folds batches in steps of this many bytes of changes (one read-back per step).
    pub fold_step: usize,
    /// Event ids remembered per partition for the duplicate check.
    pub duplicate_window: usize,
}

impl MemoryShares {
    /// What a replay of `partitions` holds whatever its budget.
    pub fn fixed_bytes(partitions: usize) -> usize {
        PROCESS_BYTES + partitions * PARTITION_BYTES
    }

    /// The smallest budget a replay of `partitions` keeps to: its fixed costs and the least share
    /// for the parts that grow.
    pub fn smallest_budget(partitions: usize) -> usize {
        Self::fixed_bytes(partitions) + LEAST_GROWING_BYTES
    }

    /// `budget` shared out for a replay of `partitions` by `readers` reader threads. Below
    /// [`smallest_budget`](Self::smallest_budget) the shares are those of the smallest budget's
    /// least share (the process then takes more than it was given; the caller says so).
    pub fn of(budget: usize, partitions: usize, readers: usize) -> MemoryShares {
        let growing = budget
            .saturating_sub(Self::fixed_bytes(partitions))
            .max(LEAST_GROWING_BYTES.min(budget));
        // An eighth to the batches in flight: half to the fold's step, the other half to the ones
        // queued and those the readers are filling.
        let batches = growing / 8;
        let in_flight = BATCHES_QUEUED + readers.max(1);
        MemoryShares {
            fold: growing / 8 * 3,
            aggregate_index: growing / 8,
            // No more than without a budget: a larger queue costs memory and buys no speed.
            prefetch: (growing / 8 / QUEUED_RECORD_OVERHEAD).min(crate::source::PREFETCH_BYTES),
            batch: (batches / 2 / in_flight).max(LEAST_BATCH_BYTES),
            fold_step: (batches / 2).max(LEAST_FOLD_STEP_BYTES),
            // A sixteenth. The last 3/16 are for what the allocators keep besides the live heap,
            // and the fold's hash tables while they double (an eighth left the process 1 MiB over
            // a 512 MiB budget on the example log).
            duplicate_window: RecentEventIds::window_for(growing / 16, partitions),
        }
    }
}

/// mimalloc's `mi_option_purge_delay` (its place in `mi_option_e`, v2 and v3 alike; the Rust
/// bindings do not name it).
const MIMALLOC_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Have the allocator hand memory back to the system as soon as it is freed. mimalloc (v3), the
/// stock binary's allocator, otherwise keeps freed pages for a second (its arenas longer) for
/// reuse, and a replay that spills frees its whole fold at once: under a 256 MiB budget on the
/// example's 10M-event log that was ~36 MiB of the peak, at no measurable cost in time. Without
/// mimalloc as the global allocator this sets an option nothing reads.
pub fn return_freed_memory_at_once() {
    // SAFETY: sets one integer option; mimalloc reads options without locks by design.
    unsafe { libmimalloc_sys::mi_option_set(MIMALLOC_PURGE_DELAY, 0) };
}

/// A size as reproject prints it, in the powers of 1024 that `--memory-budget` reads, so that a
/// figure read off an estimate or a report can be given back as a budget: KiB below 1 MiB (a
/// test's budget of 300KiB is not "0 MiB"), GiB from 10 GiB up, MiB between.
pub fn size_text(bytes: u64) -> String {
    const KIB: f64 = 1024.0;
    const MIB: f64 = KIB * KIB;
    const GIB: f64 = MIB * KIB;
    let bytes = bytes as f64;
    if bytes < MIB {
        format!("{:.0} KiB", bytes / KIB)
    } else if bytes < 10.0 * GIB {
        format!("{:.0} MiB", bytes / MIB)
    } else {
        format!("{:.1} GiB", bytes / GIB)
    }
}

/// The peak resident set of process `pid` (this process when None) so far, from /proc's VmHWM;
/// None where /proc is not available or the process is gone.
pub fn peak_rss_bytes(pid: Option<u32>) -> Option<u64> {
    let path = match pid {
        Some(pid) => format!("/proc/{pid}/status"),
        None => "/proc/self/status".to_string(),
    };
    let status = std::fs::read_to_string(path).ok()?;
    let kb = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))?
        .split_whitespace()
        .nth(1)?
        .parse::<u64>()
        .ok()?;
    Some(kb * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::reader::{window_bytes, DUPLICATE_WINDOW};

    const MB: usize = 1 << 20;

    #[test]
    fn a_budget_is_shared_out_after_the_fixed_costs_and_its_shares_fit_in_it() {
        for (budget, partitions, readers) in [
            (256 * MB, 128, 2),
            (192 * MB, 128, 2),
            (1 << 30, 8, 2),
            (160 * MB, 1, 1),
        ] {
            let shares = MemoryShares::of(budget, partitions, readers);
            let in_flight = BATCHES_QUEUED + readers;
            let growing = shares.fold
                + shares.aggregate_index
                + shares.prefetch * QUEUED_RECORD_OVERHEAD
                + shares.batch * in_flight
                + shares.fold_step
                + window_bytes(shares.duplicate_window) * partitions;
            assert!(
                MemoryShares::fixed_bytes(partitions) + growing <= budget,
                "{shares:?} in {budget}"
            );
            assert!(shares.fold >= (budget - MemoryShares::fixed_bytes(partitions)) / 3);
        }
        // A large budget keeps the whole duplicate window.
        assert_eq!(
            MemoryShares::of(1 << 30, 8, 2).duplicate_window,
            DUPLICATE_WINDOW
        );
    }

    #[test]
    fn a_large_budget_prefetches_no_more_than_no_budget_does() {
        let small = MemoryShares::of(256 * MB, 128, 2);
        assert!(small.prefetch < crate::source::PREFETCH_BYTES, "{small:?}");
        let large = MemoryShares::of(64 << 30, 128, 2);
        assert_eq!(large.prefetch, crate::source::PREFETCH_BYTES);
        assert!(large.fold > small.fold, "the rest still goes to the fold");
    }

    #[test]
    fn below_the_smallest_budget_the_shares_stay_those_of_the_least_share() {
        let smallest = MemoryShares::smallest_budget(128);
        assert_eq!(
            smallest,
            MemoryShares::fixed_bytes(128) + LEAST_GROWING_BYTES
        );
        let at_smallest = MemoryShares::of(smallest, 128, 2);
        assert_eq!(MemoryShares::of(79 * MB, 128, 2), at_smallest);
        assert_eq!(at_smallest.fold, LEAST_GROWING_BYTES / 8 * 3);
        // A budget smaller than even the least share (tests force spills that way) is the fold's.
        let tiny = MemoryShares::of(8 << 10, 1, 1);
        assert_eq!(tiny.fold, (8 << 10) / 8 * 3);
        assert_eq!(tiny.batch, LEAST_BATCH_BYTES);
        assert!(
            tiny.fold_step > 2 * tiny.batch,
            "a step gathers several batches"
        );
    }

    #[test]
    fn freed_memory_goes_back_at_once_once_asked() {
        // SAFETY: reads one integer option.
        let delay = || unsafe { libmimalloc_sys::mi_option_get(MIMALLOC_PURGE_DELAY) };
        // v3's default, 1 s: the option's number is right (its neighbours default to 0).
        assert_eq!(delay(), 1000, "mimalloc's default purge delay");
        return_freed_memory_at_once();
        assert_eq!(delay(), 0);
    }

    #[test]
    fn this_process_has_a_peak_resident_set() {
        let peak = peak_rss_bytes(None).unwrap_or(0);
        assert!(peak > 1 << 20, "{peak}");
        assert_eq!(peak_rss_bytes(Some(u32::MAX)), None);
    }
}
