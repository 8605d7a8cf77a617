//! The projection interface: code that turns one upcast event into row changes on the tables it
//! declares.
//!
//! A projection never touches the database and never reads the wall clock. It is given the event, its
//! time and its log position, and writes [`Change`]s into a buffer; the engine folds them in memory and
//! decides how they reach PostgreSQL (bulk COPY during a rebuild, batched upserts when following the
//! log). That is what makes a rebuild of the same log give the same tables, byte for byte.
//!
//! # Same log, same tables, whatever the read order
//!
//! Kafka orders a partition, not a topic, so the fold sees events of different partitions in
//! whatever order reader threads, fetches, batches and restarts interleave them. The rule:
//!
//! - A row of a table declared [`per_aggregate`](TableSpec::per_aggregate) comes from one
//!   aggregate, hence one partition: its changes apply in offset order, as the projection emits them.
//! - A row of any other table may gather several partitions. Adds, minimums and maximums commute.
//!   A set, an upsert (a set of every non-key column) and a delete resolve by the event's
//!   [`LogicalTime`]: its `occurred_at`, then its partition, then its offset. The latest writer in
//!   that order wins, per column; a delete clears the columns set before it and hides the row until
//!   a later change writes it again. Each such row keeps a [`RowClock`] beside it, so the same holds
//!   across batches, spills, restarts, catch-up, `run`, dead-letter retries and `replay`.
//! - Three mixtures have no order-independent answer and stop the build with an error naming the
//!   table, row and column, whichever order the events come in: a column both set and accumulated,
//!   a column accumulated two ways (add and max, say), and a row both accumulated and deleted.
//! - So folds of disjoint sets of partitions join into the fold of all of them
//!   ([`RowStore::merge`]): what several processes replaying one build need.
//!
//! Clock skew: logical time trusts `occurred_at`. If a partition's producer clock runs backwards, a
//! set written later in that partition but stamped earlier loses to the earlier-written one, even
//! though both come from one partition: rows that gather partitions follow the events' times, not
//! the log's order. Declare a table per-aggregate when each row really comes from one aggregate.
//!
//! Each projection has a name and an integer version. Bumping the version means "this view must be
//! rebuilt"; the version's table SQL lives in `schemas/<name>/v<version>/`.

mod change;
mod clock;
mod fold;
mod merge;
mod sharded;
mod table;
mod value;

pub use change::{Change, ChangeLog, ChangeLogIntoIter, Changes, Key, Recycled};
pub use clock::{Accumulation, ClockConflict, LogicalTime, RowClock};
pub use fold::{approx_size, FoldError, RowStore, TableRows, CLOCK_BYTES};
pub use sharded::{ShardBuckets, ShardedStore};
pub use table::{Column, TableSpec};
pub use value::{
    sort_on_prefix, ColumnType, Decimal, Double, Uuid, Value, PG_EPOCH_OFFSET_DAYS,
    PG_EPOCH_OFFSET_MICROS,
};

/// Where an event sits in the log and what the envelope says about it. Everything a projection may
/// know about time comes from here.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct EventMeta {
    /// The partition's id among the topics the build reads (see `source::Topics`): with one topic,
    /// the Kafka partition number; with several, ordered by topic name, then partition.
    pub partition: i32,
    pub offset: i64,
    pub event_id: [u8; 16],
    pub aggregate_type: String,
    pub aggregate_id: String,
    pub sequence: u64,
    /// When the event happened, microseconds since the Unix epoch, UTC.
    pub occurred_at_micros: i64,
}

/// An upcast event as a projection sees it.
pub struct Event<'a, E> {
    pub meta: &'a EventMeta,
    pub payload: &'a E,
}

/// The SQL that creates one version of a projection's tables. `tables` runs first, in an empty schema
/// that is on the `search_path`, so it names tables without a schema; `indexes` runs after the bulk
/// load and adds the primary keys and secondary indexes (building them afterwards is 2-3x faster than
/// loading into indexed tables).
#[derive(Clone, Debug)]
pub struct SchemaSql {
    pub tables: String,
    pub indexes: String,
}

pub trait Projection<E>: Send + Sync {
    /// Lowercase, `[a-z][a-z0-9_]*`: it names schemas and views.
    fn name(&self) -> &'static str;
    fn version(&self) -> u32;
    fn tables(&self) -> &[TableSpec];
    fn apply(&self, event: &Event<'_, E>, out: &mut Changes);

    /// Whether it changes anything for events of this type (a latest message's full name), when it
    /// can say without an event: `check --sample` names the event types no view reads. `None`: it
    /// cannot tell (compiled code decides per event).
    fn handles(&self, _event_type: &str) -> Option<bool> {
        None
    }
}

/// A projection ready for the engine: its code, its SQL and which position it holds in a run.
pub type DynProjection<E> = std::sync::Arc<dyn Projection<E>>;
