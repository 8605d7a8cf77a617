//! Row changes: what a projection emits for one event. They name a table by its index in the
//! projection's table list and a row by its key; the engine decides how they reach PostgreSQL.

use super::clock::LogicalTime;
use super::value::Value;

/// A row's primary key, in key-column order. Keys of one or two values (most keys) live inline: a
/// projection makes a key for nearly every change, and a heap allocation each, made by a reader and
/// freed by the fold, was a large part of the replay. Build one with [`key!`](crate::key).
pub type Key = smallvec::SmallVec<[Value; 2]>;

/// A row key from its values, in key-column order: `key![Value::text(order_id)]`.
#[macro_export]
macro_rules! key {
    ($($value:expr),* $(,)?) => {
        $crate::projection::Key::from_iter([$($value),*])
    };
}

#[derive(Clone, Debug, PartialEq)]
pub enum Change {
    /// Replace the whole row (key columns included, first).
    Upsert { table: usize, row: Vec<Value> },
    /// Set some columns; a missing row is first created from the table's defaults.
    Set {
        table: usize,
        key: Key,
        columns: Vec<(usize, Value)>,
    },
    /// Add to a bigint, integer or numeric column (the delta has the column's type); a missing row
    /// is first created from the table's defaults.
    Add {
        table: usize,
        key: Key,
        column: usize,
        delta: Value,
    },
    /// Keep the smaller (or larger) of the stored value and this one; NULL counts as absent.
    Min {
        table: usize,
        key: Key,
        column: usize,
        value: Value,
    },
    Max {
        table: usize,
        key: Key,
        column: usize,
        value: Value,
    },
    /// Remove the row.
    Delete { table: usize, key: Key },
}

impl Change {
    /// The key of the row this change touches; `key_len` is its table's (an upsert carries the key
    /// as the first columns of its row).
    pub fn key(&self, key_len: usize) -> &[Value] {
        match self {
            Change::Upsert { row, .. } => &row[..key_len.min(row.len())],
            Change::Set { key, .. }
            | Change::Add { key, .. }
            | Change::Min { key, .. }
            | Change::Max { key, .. }
            | Change::Delete { key, .. } => key,
        }
    }

    /// Bytes the change takes in a batch, its values' heap included, as a memory budget counts them.
    pub fn approx_bytes(&self) -> usize {
        let values = |values: &[Value]| values.iter().map(Value::heap_bytes).sum::<usize>();
        let key = |key: &Key| {
            values(key)
                + if key.spilled() {
                    key.capacity() * size_of::<Value>()
                } else {
                    0
                }
        };
        size_of::<Change>()
            + match self {
                Change::Upsert { row, .. } => row.capacity() * size_of::<Value>() + values(row),
                Change::Set {
                    key: k, columns, ..
                } => {
                    key(k)
                        + columns.capacity() * size_of::<(usize, Value)>()
                        + columns.iter().map(|(_, v)| v.heap_bytes()).sum::<usize>()
                }
                Change::Add {
                    key: k, delta: v, ..
                }
                | Change::Min {
                    key: k, value: v, ..
                }
                | Change::Max {
                    key: k, value: v, ..
                } => key(k) + v.heap_bytes(),
                Change::Delete { key: k, .. } => key(k),
            }
    }

    pub fn table(&self) -> usize {
        match self {
            Change::Upsert { table, .. }
            | Change::Set { table, .. }
            | Change::Add { table, .. }
            | Change::Min { table, .. }
            | Change::Max { table, .. }
            | Change::Delete { table, .. } => *table,
        }
    }
}

/// The buffer a projection writes its changes into. Kept between events so that it allocates once.
#[derive(Default, Debug)]
pub struct Changes {
    changes: Vec<Change>,
    /// Why the projection could not project the event, when it could not (see [`Changes::refuse`]).
    refusal: Option<String>,
}

impl Changes {
    pub fn upsert(&mut self, table: usize, row: Vec<Value>) {
        self.changes.push(Change::Upsert { table, row });
    }

    pub fn set(&mut self, table: usize, key: impl Into<Key>, columns: Vec<(usize, Value)>) {
        self.changes.push(Change::Set {
            table,
            key: key.into(),
            columns,
        });
    }

    /// Add `delta` to a bigint column.
    pub fn add(&mut self, table: usize, key: impl Into<Key>, column: usize, delta: i64) {
        self.add_value(table, key, column, Value::BigInt(delta));
    }

    /// Add `delta` to a column of its type: `Value::Integer` to an integer column,
    /// `Value::Numeric` to a numeric one (exactly). Sums of double precision are refused: a
    /// floating-point sum depends on the order partitions are read in.
    pub fn add_value(&mut self, table: usize, key: impl Into<Key>, column: usize, delta: Value) {
        self.changes.push(Change::Add {
            table,
            key: key.into(),
            column,
            delta,
        });
    }

    pub fn min(&mut self, table: usize, key: impl Into<Key>, column: usize, value: Value) {
        self.changes.push(Change::Min {
            table,
            key: key.into(),
            column,
            value,
        });
    }

    pub fn max(&mut self, table: usize, key: impl Into<Key>, column: usize, value: Value) {
        self.changes.push(Change::Max {
            table,
            key: key.into(),
            column,
            value,
        });
    }

    pub fn delete(&mut self, table: usize, key: impl Into<Key>) {
        self.changes.push(Change::Delete {
            table,
            key: key.into(),
        });
    }

    /// A change built elsewhere (tests that replay generated changes).
    #[cfg(test)]
    pub(crate) fn push(&mut self, change: Change) {
        self.changes.push(change);
    }

    pub fn as_slice(&self) -> &[Change] {
        &self.changes
    }

    pub fn drain(&mut self) -> std::vec::Drain<'_, Change> {
        self.changes.drain(..)
    }

    pub fn len(&self) -> usize {
        self.changes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.changes.is_empty()
    }

    pub fn clear(&mut self) {
        self.changes.clear();
        self.refusal = None;
    }

    /// The projection cannot project this event (a value its code cannot convert): the event
    /// becomes a bad record, a dead letter or the end of the replay as the policy says, and none of
    /// its changes is applied to any projection. Compiled projections rarely need it; a view
    /// defined in a file uses it when an expression fails on one event.
    pub fn refuse(&mut self, reason: impl Into<String>) {
        self.refusal.get_or_insert_with(|| reason.into());
    }

    /// The refusal recorded since the last call, if any; the buffer's changes are dropped with it.
    pub fn take_refusal(&mut self) -> Option<String> {
        let refusal = self.refusal.take();
        if refusal.is_some() {
            self.changes.clear();
        }
        refusal
    }
}

/// The row changes of a run of events, each event's changes marked with its [`LogicalTime`]: what a
/// reader hands the fold and a batch hands the writer. One mark per event rather than per change,
/// since most events emit several.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ChangeLog {
    changes: Vec<Change>,
    /// Per event that emitted changes: its time, and where its changes end in `changes`.
    events: Vec<(LogicalTime, usize)>,
}

impl ChangeLog {
    /// An empty log with room for as many changes and events as `like` holds: batches are sized
    /// like the last one, since growing a large one by doubling costs copies and fresh pages.
    pub fn sized_like(like: &ChangeLog) -> ChangeLog {
        ChangeLog {
            changes: Vec::with_capacity(like.changes.len()),
            events: Vec::with_capacity(like.events.len()),
        }
    }

    /// Move what one event emitted (in `changes`) into the log, at `at`; false when it emitted
    /// nothing (nothing was recorded).
    pub fn record(&mut self, at: LogicalTime, changes: &mut Changes) -> bool {
        if changes.is_empty() {
            return false;
        }
        self.changes.extend(changes.drain());
        self.events.push((at, self.changes.len()));
        true
    }

    /// Bytes the last event recorded takes in the log (see [`Change::approx_bytes`]).
    pub fn last_event_bytes(&self) -> usize {
        let start = match self.events.len() {
            0 | 1 => 0,
            n => self.events[n - 2].1,
        };
        size_of::<(LogicalTime, usize)>()
            + self.changes[start..]
                .iter()
                .map(Change::approx_bytes)
                .sum::<usize>()
    }

    /// Drop the last event recorded and its changes (a later projection refused that event).
    pub fn pop_event(&mut self) {
        self.events.pop();
        let end = self.events.last().map_or(0, |&(_, end)| end);
        self.changes.truncate(end);
    }

    /// Every change with its event's time, in the order the events were read.
    pub fn iter(&self) -> impl Iterator<Item = (LogicalTime, &Change)> {
        let mut start = 0;
        self.events.iter().flat_map(move |&(at, end)| {
            let range = start..end;
            start = end;
            self.changes[range].iter().map(move |c| (at, c))
        })
    }

    /// The changes alone, for what needs only their tables and keys.
    pub fn changes(&self) -> &[Change] {
        &self.changes
    }

    /// How many events emitted the changes.
    pub fn event_count(&self) -> usize {
        self.events.len()
    }

    /// The times of the events that emitted the changes, in the order they were read.
    pub fn times(&self) -> impl Iterator<Item = LogicalTime> + '_ {
        self.events.iter().map(|&(at, _)| at)
    }

    /// Split the log at its `at`-th event, as `Vec::split_off`: this log keeps the events before
    /// it and their changes, the one returned has the rest (a batch written in slices).
    pub fn split_off_events(&mut self, at: usize) -> ChangeLog {
        let at = at.min(self.events.len());
        let start = at
            .checked_sub(1)
            .and_then(|last| self.events.get(last))
            .map_or(0, |&(_, end)| end);
        let changes = self.changes.split_off(start);
        let events = self
            .events
            .split_off(at)
            .into_iter()
            .map(|(time, end)| (time, end - start))
            .collect();
        ChangeLog { changes, events }
    }

    /// [`ChangeLog::append`] each of `later` in turn, with room made for all of them at once:
    /// appended one by one, a log joined from many batches copies what it holds at every doubling,
    /// each time into memory the process touches for the first time (see BENCHMARKS.md).
    pub fn append_all(&mut self, later: Vec<ChangeLog>) {
        self.changes
            .reserve_exact(later.iter().map(|l| l.changes.len()).sum());
        self.events
            .reserve_exact(later.iter().map(|l| l.events.len()).sum());
        for log in later {
            self.append(log);
        }
    }

    /// Put the events of `later` (read after this log's) at its end: the inverse of
    /// [`ChangeLog::split_off_events`].
    pub fn append(&mut self, later: ChangeLog) {
        let base = self.changes.len();
        self.changes.extend(later.changes);
        self.events.extend(
            later
                .events
                .into_iter()
                .map(|(time, end)| (time, end + base)),
        );
    }
}

impl IntoIterator for ChangeLog {
    type Item = (LogicalTime, Change);
    type IntoIter = ChangeLogIntoIter;

    /// Every change with its event's time, in the order the events were read, without cloning.
    fn into_iter(self) -> ChangeLogIntoIter {
        Timed::new(self.changes.into_iter(), self.events.into_iter())
    }
}

impl ChangeLog {
    /// Every change with its event's time, in the order the events were read, moved out; the log
    /// is left empty with its room, to be filled again (see [`Recycled`]).
    pub fn drain(
        &mut self,
    ) -> Timed<std::vec::Drain<'_, Change>, std::vec::Drain<'_, (LogicalTime, usize)>> {
        Timed::new(self.changes.drain(..), self.events.drain(..))
    }
}

/// A log's changes paired with their events' times, by value.
pub type ChangeLogIntoIter =
    Timed<std::vec::IntoIter<Change>, std::vec::IntoIter<(LogicalTime, usize)>>;

/// Changes paired with the time of the event that emitted them (`events` says where each event's
/// changes end).
pub struct Timed<C, T> {
    changes: C,
    events: T,
    current: Option<(LogicalTime, usize)>,
    taken: usize,
}

impl<C, T> Timed<C, T> {
    fn new(changes: C, events: T) -> Self {
        Timed {
            changes,
            events,
            current: None,
            taken: 0,
        }
    }
}

impl<C, T> Iterator for Timed<C, T>
where
    C: Iterator<Item = Change>,
    T: Iterator<Item = (LogicalTime, usize)>,
{
    type Item = (LogicalTime, Change);

    fn next(&mut self) -> Option<(LogicalTime, Change)> {
        loop {
            match self.current {
                Some((at, end)) if self.taken < end => {
                    self.taken += 1;
                    return self.changes.next().map(|change| (at, change));
                }
                _ => self.current = Some(self.events.next()?),
            }
        }
    }
}

/// Change logs the fold has emptied, on their way back to the reader that fills the next batch.
/// A batch of 20,000 events is megabytes of changes: allocated afresh for every batch (and freed
/// on another thread), its pages were faulted in and zeroed again each time, and a batch larger
/// than the one before grew by doubling: together 7% of the replay's CPU.
#[derive(Default)]
pub struct Recycled(std::sync::Mutex<Vec<Vec<ChangeLog>>>);

impl Recycled {
    /// Sets kept at most: the batches in flight between a reader and the fold, and one more.
    const KEPT: usize = 4;

    /// An emptied set of logs (one per target), if one came back.
    pub fn take(&self) -> Option<Vec<ChangeLog>> {
        self.0.lock().ok()?.pop()
    }

    /// Give `logs` back once their changes are moved out (they are cleared here).
    pub fn give_back(&self, mut logs: Vec<ChangeLog>) {
        for log in &mut logs {
            log.changes.clear();
            log.events.clear();
        }
        if let Ok(mut kept) = self.0.lock() {
            if kept.len() < Self::KEPT {
                kept.push(logs);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Offset `offset` of partition 0, at time zero.
    fn at(offset: i64) -> LogicalTime {
        LogicalTime {
            occurred_at_micros: 0,
            partition: 0,
            offset,
        }
    }

    /// A log of `events` events at offsets 0.., the one at offset n emitting n + 1 changes.
    fn log_of(events: i64) -> ChangeLog {
        let mut log = ChangeLog::default();
        let mut changes = Changes::default();
        for offset in 0..events {
            for n in 0..=offset {
                changes.add(0, crate::key![Value::text(format!("k{offset}"))], 1, n);
            }
            assert!(log.record(at(offset), &mut changes));
        }
        log
    }

    #[test]
    fn a_log_split_at_an_event_and_put_back_together_is_the_log_it_was() {
        // Events emit different numbers of changes: the split is by event, not by change.
        let mut log = log_of(4);
        let whole = log.clone();
        let rest = log.split_off_events(2);
        assert_eq!(log.event_count(), 2);
        assert_eq!(log.changes().len(), 1 + 2);
        assert_eq!(rest.event_count(), 2);
        assert_eq!(rest.changes().len(), 3 + 4);
        let offsets: Vec<i64> = rest.times().map(|t| t.offset).collect();
        assert_eq!(offsets, [2, 3]);
        let firsts: Vec<i64> = rest.iter().map(|(t, _)| t.offset).collect();
        assert_eq!(firsts, [2, 2, 2, 3, 3, 3, 3]);
        log.append(rest);
        assert_eq!(log, whole);
        // At either end: nothing, or everything, is split off.
        assert_eq!(log.split_off_events(9).event_count(), 0);
        let all = log.split_off_events(0);
        assert_eq!((log.event_count(), all), (0, whole));
    }

    #[test]
    fn logs_appended_all_at_once_make_the_log_they_were_split_from_with_room_made_once() {
        let whole = log_of(6);
        let mut first = whole.clone();
        let mut second = first.split_off_events(2);
        let third = second.split_off_events(3);
        first.changes.shrink_to_fit();
        first.append_all(vec![second, ChangeLog::default(), third]);
        assert_eq!(first, whole);
        assert_eq!(first.changes.capacity(), whole.changes().len());
    }

    #[test]
    fn popping_an_event_drops_its_changes_and_keeps_the_ones_before() {
        let mut log = ChangeLog::default();
        let mut changes = Changes::default();
        changes.add(0, crate::key![Value::text("a")], 1, 1);
        assert!(log.record(at(0), &mut changes));
        assert!(
            !log.record(at(1), &mut changes),
            "nothing emitted, nothing recorded"
        );
        changes.add(0, crate::key![Value::text("b")], 1, 2);
        changes.delete(0, crate::key![Value::text("c")]);
        assert!(log.record(at(2), &mut changes));
        log.pop_event();
        let kept: Vec<i64> = log.iter().map(|(t, _)| t.offset).collect();
        assert_eq!(kept, [0]);
        assert_eq!(log.changes().len(), 1);
    }

    #[test]
    fn a_drained_log_gives_what_it_held_in_order_and_comes_back_empty_with_its_room() {
        let mut log = log_of(3);
        let mut changes = Changes::default();
        let by_value: Vec<(i64, Change)> = log
            .clone()
            .into_iter()
            .map(|(t, c)| (t.offset, c))
            .collect();
        let room = log.changes.capacity();
        let drained: Vec<(i64, Change)> = log.drain().map(|(t, c)| (t.offset, c)).collect();
        assert_eq!(drained, by_value);
        assert_eq!(
            drained.iter().map(|(o, _)| *o).collect::<Vec<_>>(),
            [0, 1, 1, 2, 2, 2]
        );
        assert_eq!((log.event_count(), log.changes().len()), (0, 0));
        assert_eq!(log.changes.capacity(), room, "drained, not freed");

        let recycled = Recycled::default();
        changes.add(0, crate::key![Value::text("left over")], 1, 1);
        assert!(log.record(at(9), &mut changes));
        for _ in 0..Recycled::KEPT + 2 {
            recycled.give_back(vec![log.clone()]);
        }
        let mut taken = 0;
        while let Some(logs) = recycled.take() {
            assert_eq!(logs[0].event_count(), 0, "given back cleared");
            taken += 1;
        }
        assert_eq!(taken, Recycled::KEPT, "bounded");
        recycled.give_back(vec![log]);
        let back = recycled.take().expect("given back");
        assert_eq!(back[0].changes.capacity(), room, "with its room");
    }
}
