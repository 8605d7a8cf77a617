//! Logical time, and what a row fed by several partitions remembers of it.
//!
//! Kafka orders a partition, not a topic: the order in which a fold sees events of different
//! partitions depends on reader threads, fetch sizes, batches and restarts. Sums, counts, minimums
//! and maximums commute, so for them that order does not matter. A `set`, an upsert or a delete does
//! not commute, so in a table whose rows gather several partitions (not
//! [`per_aggregate`](super::TableSpec::per_aggregate)) each of them resolves by the event's
//! [`LogicalTime`] instead: its `occurred_at`, then its partition, then its offset. The last writer in
//! that order wins, column by column, whichever arrives first. When a build reads several topics the
//! partition is its id among them (`source::Topics`), so a tie between topics goes by topic name,
//! then partition number: rows fed by several topics resolve exactly like rows fed by several
//! partitions.
//!
//! To do that across batches, spills and restarts, each such row keeps a [`RowClock`]: when each
//! set column was last written, when the row was last deleted, and which columns accumulate. It is
//! stored beside the row (see `sink::writer`), never in the projection's own table.
//!
//! Three mixtures have no answer that is the same for every read order, and are refused with a
//! [`ClockConflict`], whatever order the events arrive in: a column that is both set and accumulated,
//! a column accumulated two ways (an add and a max do not commute), and a row that both accumulates
//! and is deleted (after a delete, a counter restarts from the events that follow it in time; which
//! contributions those are cannot be told apart once summed).
//!
//! Because a clock says how every column of its row was written, two partial folds of the same row
//! from disjoint sets of partitions can be joined into the fold of all of them
//! ([`RowClock::merge`], and `TableRows::merge` for the row's values): what lets several processes
//! replay different partitions into one build.

use std::fmt;

use smallvec::SmallVec;

use super::EventMeta;

/// Where an event sits in logical time: when it happened, then where it sits in the log. Ordered by
/// those fields in that order; two events never share one.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct LogicalTime {
    /// The event's `occurred_at`, microseconds since the Unix epoch, UTC.
    pub occurred_at_micros: i64,
    /// The partition's id among the build's topics (see `source::Topics`): with one topic, the
    /// partition number.
    pub partition: i32,
    pub offset: i64,
}

impl LogicalTime {
    pub fn of(meta: &EventMeta) -> LogicalTime {
        LogicalTime {
            occurred_at_micros: meta.occurred_at_micros,
            partition: meta.partition,
            offset: meta.offset,
        }
    }

    const ENCODED_LEN: usize = 20;

    fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.occurred_at_micros.to_be_bytes());
        out.extend_from_slice(&self.partition.to_be_bytes());
        out.extend_from_slice(&self.offset.to_be_bytes());
    }

    fn decode(bytes: &mut &[u8]) -> Result<LogicalTime, String> {
        let (head, rest) = bytes
            .split_at_checked(Self::ENCODED_LEN)
            .ok_or("truncated logical time")?;
        *bytes = rest;
        let i64_at = |i: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&head[i..i + 8]);
            i64::from_be_bytes(b)
        };
        let mut p = [0u8; 4];
        p.copy_from_slice(&head[8..12]);
        Ok(LogicalTime {
            occurred_at_micros: i64_at(0),
            partition: i32::from_be_bytes(p),
            offset: i64_at(12),
        })
    }
}

impl fmt::Display for LogicalTime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let at = super::Value::Timestamp(self.occurred_at_micros);
        write!(
            f,
            "{at} (partition {}, offset {})",
            self.partition, self.offset
        )
    }
}

/// A mixture of changes on one row that no read order can resolve the same way; see the module docs.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ClockConflict {
    #[error("column {column} is both set and accumulated (add, min or max); in a table whose rows gather several partitions a column must be one or the other, since a set does not commute with a sum. Split it into two columns, or declare the table per_aggregate if each row really comes from one aggregate")]
    SetAndAccumulated { column: String },
    #[error("the row both accumulates (add, min or max into {column}) and is deleted; in a table whose rows gather several partitions the contributions before and after a delete cannot be told apart once summed. Keep deletable rows to set columns, or make the key include what distinguishes one life of the row from the next")]
    DeletedAndAccumulated { column: String },
    #[error("column {column} is accumulated two ways ({first} and {then}); in a table whose rows gather several partitions an add, a min and a max do not commute with one another. Keep each column to one of them")]
    AccumulatedTwoWays {
        column: String,
        first: Accumulation,
        then: Accumulation,
    },
}

/// How a column of a row that gathers partitions accumulates: what merging two partial folds of
/// it means.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Accumulation {
    Add,
    Min,
    Max,
    /// Read from a clock stored before the kind was recorded (format 1): taken to be whatever the
    /// next change says.
    Unrecorded,
}

impl Accumulation {
    fn code(self) -> u8 {
        match self {
            Accumulation::Unrecorded => 0,
            Accumulation::Add => 1,
            Accumulation::Min => 2,
            Accumulation::Max => 3,
        }
    }

    fn from_code(code: u8) -> Result<Accumulation, String> {
        Ok(match code {
            0 => Accumulation::Unrecorded,
            1 => Accumulation::Add,
            2 => Accumulation::Min,
            3 => Accumulation::Max,
            other => return Err(format!("accumulation kind {other}")),
        })
    }

    /// The kind two records of one column agree on, if they do.
    fn agree(self, other: Accumulation) -> Option<Accumulation> {
        match (self, other) {
            (a, b) if a == b => Some(a),
            (Accumulation::Unrecorded, b) => Some(b),
            (a, Accumulation::Unrecorded) => Some(a),
            _ => None,
        }
    }
}

impl fmt::Display for Accumulation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Accumulation::Add => "add",
            Accumulation::Min => "min",
            Accumulation::Max => "max",
            Accumulation::Unrecorded => "unrecorded",
        })
    }
}

/// What a row of a table fed by several partitions remembers of the logical times that wrote it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RowClock {
    /// The latest delete applied to the row.
    deleted_at: Option<LogicalTime>,
    /// The latest change other than a delete that was applied (not ignored as older).
    touched_at: Option<LogicalTime>,
    /// Columns written by add, min or max, in ascending column order, each with how.
    accumulated: SmallVec<[(u16, Accumulation); 4]>,
    /// Per set column, the logical time of the value it holds, in ascending column order.
    set_at: SmallVec<[(u16, LogicalTime); 2]>,
}

/// What a delete did to a row, as its clock decided.
#[derive(Debug, PartialEq, Eq)]
pub struct Deleted {
    /// Set columns whose values the delete clears: written at or before it.
    pub cleared: SmallVec<[usize; 4]>,
    /// Whether the row still exists: a change later in time already wrote it again.
    pub live: bool,
}

/// What to do with a change, as its row's clock decides.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    Apply,
    /// Older than what the row already holds: leave the row as it is.
    Ignore,
}

impl RowClock {
    /// Whether the row exists as of its clock: touched after its latest delete. `touched_at ==
    /// deleted_at` means one event deleted the row and then wrote it again.
    fn live_after_delete(&self, at: LogicalTime) -> bool {
        self.touched_at.is_some_and(|t| t > at)
    }

    /// Refuse a set of `column` when the row accumulates into it. Checked before anything else, so
    /// that the refusal does not depend on the order changes arrive in.
    pub fn check_settable(
        &self,
        column: usize,
        name: impl Fn() -> String,
    ) -> Result<(), ClockConflict> {
        if self.accumulation(column).is_some() {
            return Err(ClockConflict::SetAndAccumulated { column: name() });
        }
        Ok(())
    }

    /// How `column` accumulates, if it does.
    pub fn accumulation(&self, column: usize) -> Option<Accumulation> {
        let column = column_id(column);
        self.accumulated
            .binary_search_by_key(&column, |(c, _)| *c)
            .ok()
            .map(|i| self.accumulated[i].1)
    }

    /// The latest change other than a delete that the row took.
    pub fn written_at(&self) -> Option<LogicalTime> {
        self.touched_at
    }

    /// The logical time of the value set column `column` holds, if it holds a set value.
    pub fn set_at(&self, column: usize) -> Option<LogicalTime> {
        let column = column_id(column);
        self.set_at
            .binary_search_by_key(&column, |(c, _)| *c)
            .ok()
            .map(|i| self.set_at[i].1)
    }

    /// The set columns with the logical time of the value each holds, in column order.
    pub fn set_columns(&self) -> impl Iterator<Item = (usize, LogicalTime)> + '_ {
        self.set_at.iter().map(|(c, at)| (usize::from(*c), *at))
    }

    /// The accumulated columns with how each accumulates, in column order.
    pub fn accumulated_columns(&self) -> impl Iterator<Item = (usize, Accumulation)> + '_ {
        self.accumulated
            .iter()
            .map(|(c, how)| (usize::from(*c), *how))
    }

    /// Whether the row exists as of this clock, when its existence is decided by the clock alone:
    /// Some(true) when written after its latest delete, Some(false) when never written after it.
    /// None when its latest write and delete are the same event: then the order of that event's
    /// changes decided, and only the row itself knows.
    pub fn exists(&self) -> Option<bool> {
        match (self.touched_at, self.deleted_at) {
            (None, _) => Some(false),
            (Some(_), None) => Some(true),
            (Some(t), Some(d)) if t == d => None,
            (Some(t), Some(d)) => Some(t > d),
        }
    }

    /// Join this clock with `other`'s, the clock of the same row folded from other partitions:
    /// the clock a fold of both partitions' events would have. Refuses what the fold would refuse
    /// in either order. Set columns written before the joined delete are dropped, as a delete clears
    /// them.
    pub fn merge(
        &mut self,
        other: &RowClock,
        name: impl Fn(usize) -> String,
    ) -> Result<(), ClockConflict> {
        self.deleted_at = self.deleted_at.max(other.deleted_at);
        self.touched_at = self.touched_at.max(other.touched_at);
        for &(column, how) in &other.accumulated {
            match self.accumulated.binary_search_by_key(&column, |(c, _)| *c) {
                Ok(i) => {
                    let mine = self.accumulated[i].1;
                    self.accumulated[i].1 =
                        mine.agree(how)
                            .ok_or_else(|| ClockConflict::AccumulatedTwoWays {
                                column: name(usize::from(column)),
                                first: mine,
                                then: how,
                            })?;
                }
                Err(i) => self.accumulated.insert(i, (column, how)),
            }
        }
        for &(column, at) in &other.set_at {
            match self.set_at.binary_search_by_key(&column, |(c, _)| *c) {
                Ok(i) => self.set_at[i].1 = self.set_at[i].1.max(at),
                Err(i) => self.set_at.insert(i, (column, at)),
            }
        }
        if let Some(&(column, _)) = self.set_at.iter().find(|(c, _)| {
            self.accumulated
                .binary_search_by_key(c, |(a, _)| *a)
                .is_ok()
        }) {
            return Err(ClockConflict::SetAndAccumulated {
                column: name(usize::from(column)),
            });
        }
        if let Some(deleted) = self.deleted_at {
            if let Some(&(column, _)) = self.accumulated.first() {
                return Err(ClockConflict::DeletedAndAccumulated {
                    column: name(usize::from(column)),
                });
            }
            // Written at the delete's own time: the same event set the column after deleting
            // the row (a set before it in that event was cleared by that fold already).
            self.set_at.retain(|(_, written)| *written >= deleted);
        }
        Ok(())
    }

    /// A set or upsert at `at` reaches the row: ignored when the row was deleted later, else the
    /// row exists from here on.
    pub fn touch(&mut self, at: LogicalTime) -> Verdict {
        if self.deleted_at.is_some_and(|d| at < d) {
            return Verdict::Ignore;
        }
        self.touched_at = self.touched_at.max(Some(at));
        Verdict::Apply
    }

    /// After [`touch`](Self::touch): whether a set of `column` at `at` wins over the value the
    /// column holds (a later change of the same event wins too).
    pub fn set_column(&mut self, column: usize, at: LogicalTime) -> bool {
        let column = column_id(column);
        match self.set_at.binary_search_by_key(&column, |(c, _)| *c) {
            Ok(i) if self.set_at[i].1 > at => false,
            Ok(i) => {
                self.set_at[i].1 = at;
                true
            }
            Err(i) => {
                self.set_at.insert(i, (column, at));
                true
            }
        }
    }

    /// An add, min or max into `column` at `at`: always applied (they commute), once the mixtures
    /// that cannot be resolved are ruled out.
    pub fn accumulate(
        &mut self,
        column: usize,
        how: Accumulation,
        at: LogicalTime,
        name: impl Fn() -> String,
    ) -> Result<(), ClockConflict> {
        let column = column_id(column);
        if self.deleted_at.is_some() {
            return Err(ClockConflict::DeletedAndAccumulated { column: name() });
        }
        if self
            .set_at
            .binary_search_by_key(&column, |(c, _)| *c)
            .is_ok()
        {
            return Err(ClockConflict::SetAndAccumulated { column: name() });
        }
        match self.accumulated.binary_search_by_key(&column, |(c, _)| *c) {
            Ok(i) => {
                let first = self.accumulated[i].1;
                self.accumulated[i].1 =
                    first
                        .agree(how)
                        .ok_or_else(|| ClockConflict::AccumulatedTwoWays {
                            column: name(),
                            first,
                            then: how,
                        })?;
            }
            Err(i) => self.accumulated.insert(i, (column, how)),
        }
        self.touched_at = self.touched_at.max(Some(at));
        Ok(())
    }

    /// A delete at `at` (a change "at" it came earlier in the same event). None when a later delete
    /// was already applied.
    pub fn delete(
        &mut self,
        at: LogicalTime,
        name: impl Fn(usize) -> String,
    ) -> Result<Option<Deleted>, ClockConflict> {
        if let Some(&(column, _)) = self.accumulated.first() {
            return Err(ClockConflict::DeletedAndAccumulated {
                column: name(usize::from(column)),
            });
        }
        if self.deleted_at.is_some_and(|d| d > at) {
            return Ok(None);
        }
        self.deleted_at = Some(at);
        let mut cleared = SmallVec::new();
        self.set_at.retain(|(column, written)| {
            let keep = *written > at;
            if !keep {
                cleared.push(usize::from(*column));
            }
            keep
        });
        Ok(Some(Deleted {
            cleared,
            live: self.live_after_delete(at),
        }))
    }

    /// The clock as stored beside the row: a version byte, then the fields. Compact because a row
    /// of a busy table carries one.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(
            4 + 2 * LogicalTime::ENCODED_LEN
                + 3 * self.accumulated.len()
                + (2 + LogicalTime::ENCODED_LEN) * self.set_at.len(),
        );
        out.push(CLOCK_FORMAT);
        out.push(u8::from(self.deleted_at.is_some()) | u8::from(self.touched_at.is_some()) << 1);
        for time in self.deleted_at.iter().chain(self.touched_at.iter()) {
            time.encode(&mut out);
        }
        out.extend_from_slice(&(self.accumulated.len() as u16).to_be_bytes());
        for (column, how) in &self.accumulated {
            out.extend_from_slice(&column.to_be_bytes());
            out.push(how.code());
        }
        out.extend_from_slice(&(self.set_at.len() as u16).to_be_bytes());
        for (column, at) in &self.set_at {
            out.extend_from_slice(&column.to_be_bytes());
            at.encode(&mut out);
        }
        out
    }

    pub fn decode(mut bytes: &[u8]) -> Result<RowClock, String> {
        let b = &mut bytes;
        let take_u16 = |b: &mut &[u8]| -> Result<u16, String> {
            let (head, rest) = b.split_first_chunk::<2>().ok_or("truncated")?;
            *b = rest;
            Ok(u16::from_be_bytes(*head))
        };
        let ([format, flags], rest) = b.split_first_chunk::<2>().ok_or("truncated header")?;
        let (format, flags) = (*format, *flags);
        *b = rest;
        // Format 1 did not record how a column accumulates.
        if format != CLOCK_FORMAT && format != 1 {
            return Err(format!(
                "clock format {format}, this binary reads 1 and {CLOCK_FORMAT}"
            ));
        }
        let mut clock = RowClock::default();
        if flags & 1 != 0 {
            clock.deleted_at = Some(LogicalTime::decode(b)?);
        }
        if flags & 2 != 0 {
            clock.touched_at = Some(LogicalTime::decode(b)?);
        }
        for _ in 0..take_u16(b)? {
            let column = take_u16(b)?;
            let how = if format == 1 {
                Accumulation::Unrecorded
            } else {
                let (code, rest) = b.split_first().ok_or("truncated accumulation")?;
                *b = rest;
                Accumulation::from_code(*code)?
            };
            clock.accumulated.push((column, how));
        }
        for _ in 0..take_u16(b)? {
            let column = take_u16(b)?;
            clock.set_at.push((column, LogicalTime::decode(b)?));
        }
        if !b.is_empty() {
            return Err(format!("{} bytes left over", b.len()));
        }
        // Lookups binary-search both lists: bytes from the database that are out of order are a
        // broken clock, not one to act on.
        if !ascending(clock.accumulated.iter().map(|(c, _)| *c))
            || !ascending(clock.set_at.iter().map(|(c, _)| *c))
        {
            return Err("columns out of order".into());
        }
        Ok(clock)
    }
}

/// Format 2 records how each accumulated column accumulates (format 1 did not).
const CLOCK_FORMAT: u8 = 2;

fn ascending(mut columns: impl Iterator<Item = u16>) -> bool {
    let Some(mut previous) = columns.next() else {
        return true;
    };
    columns.all(|column| {
        let ordered = previous < column;
        previous = column;
        ordered
    })
}

fn column_id(column: usize) -> u16 {
    // Tables have far fewer than 65,536 columns (PostgreSQL allows 1,600).
    u16::try_from(column).unwrap_or(u16::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(micros: i64, partition: i32, offset: i64) -> LogicalTime {
        LogicalTime {
            occurred_at_micros: micros,
            partition,
            offset,
        }
    }

    #[test]
    fn logical_time_orders_by_time_then_partition_then_offset() {
        assert!(at(1, 9, 9) < at(2, 0, 0));
        assert!(at(2, 0, 9) < at(2, 1, 0));
        assert!(at(2, 1, 0) < at(2, 1, 1));
    }

    #[test]
    fn a_clock_survives_its_encoding() {
        let mut clock = RowClock::default();
        let name = || "c".to_string();
        clock.touch(at(9, 2, 2));
        assert!(clock.set_column(3, at(5, 1, 7)));
        assert!(clock.set_column(1, at(-5, 0, 0)));
        let mut other = RowClock::default();
        other
            .accumulate(2, Accumulation::Add, at(4, 0, 1), name)
            .expect("accumulates");
        other
            .accumulate(0, Accumulation::Max, at(3, 0, 1), name)
            .expect("accumulates");
        let mut deleted = RowClock::default();
        deleted.touch(at(1, 0, 0));
        deleted.set_column(1, at(1, 0, 0));
        deleted
            .delete(at(2, 0, 1), |_| "c".into())
            .expect("deletes");
        for clock in [clock, other, deleted, RowClock::default()] {
            let bytes = clock.encode();
            assert_eq!(RowClock::decode(&bytes), Ok(clock.clone()));
            for cut in 0..bytes.len() {
                assert!(RowClock::decode(&bytes[..cut]).is_err(), "cut at {cut}");
            }
        }
        // Two set columns stored out of order.
        let mut swapped = RowClock::default();
        swapped.set_column(1, at(1, 0, 0));
        swapped.set_column(3, at(1, 0, 0));
        let mut bytes = swapped.encode();
        let first = bytes.len() - 2 * (2 + LogicalTime::ENCODED_LEN);
        bytes[first..].rotate_left(2 + LogicalTime::ENCODED_LEN);
        assert!(RowClock::decode(&bytes).is_err());
    }

    #[test]
    fn an_older_set_arriving_later_is_ignored() {
        let mut clock = RowClock::default();
        assert!(clock.set_column(1, at(20, 1, 0)));
        assert!(!clock.set_column(1, at(10, 0, 5)));
        assert!(clock.set_column(1, at(20, 1, 1)));
        clock.delete(at(30, 0, 6), |_| "c".into()).expect("deletes");
        assert_eq!(clock.touch(at(25, 1, 2)), Verdict::Ignore);
        assert_eq!(clock.touch(at(31, 1, 2)), Verdict::Apply);
    }

    #[test]
    fn the_mixtures_no_order_resolves_are_refused_in_either_order() {
        let name = || "n".to_string();
        let mut set_first = RowClock::default();
        set_first.touch(at(1, 0, 0));
        set_first.set_column(2, at(1, 0, 0));
        assert!(set_first
            .accumulate(2, Accumulation::Add, at(2, 1, 0), name)
            .is_err());
        let mut added_first = RowClock::default();
        added_first
            .accumulate(2, Accumulation::Add, at(2, 1, 0), name)
            .expect("adds");
        assert!(added_first.check_settable(2, name).is_err());

        let mut deleted_first = RowClock::default();
        deleted_first
            .delete(at(1, 0, 0), |_| "n".into())
            .expect("deletes");
        assert!(deleted_first
            .accumulate(2, Accumulation::Add, at(2, 1, 0), name)
            .is_err());
        let mut added_then_deleted = RowClock::default();
        added_then_deleted
            .accumulate(2, Accumulation::Add, at(2, 1, 0), name)
            .expect("adds");
        assert!(added_then_deleted
            .delete(at(1, 0, 0), |_| "n".into())
            .is_err());
    }
}
