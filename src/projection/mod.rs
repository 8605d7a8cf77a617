//! The projection interface: code that turns one upcast event into row changes on the tables it
//! declares.
//!
//! A projection never touches the database and never reads the wall clock. It is given the event, its
//! time and its log position, and writes [`Change`]s into a buffer; the engine folds them in memory and
//! decides how they reach PostgreSQL (bulk COPY during a rebuild, batched upserts when following the
//! log). That is what makes a rebuild of the same log give the same tables, byte for byte.
//!
//! Each projection has a name and an integer version. Bumping the version means "this view must be
//! rebuilt"; the version's table SQL lives in `schemas/<name>/v<version>/`.

mod change;
mod fold;
mod table;
mod value;

pub use change::{Change, Changes, Key};
pub use fold::{FoldError, RowStore, TableRows};
pub use table::{Column, TableSpec};
pub use value::{sort_on_prefix, ColumnType, Value, PG_EPOCH_OFFSET_DAYS, PG_EPOCH_OFFSET_MICROS};

/// Where an event sits in the log and what the envelope says about it. Everything a projection may
/// know about time comes from here.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct EventMeta {
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
}

/// A projection ready for the engine: its code, its SQL and which position it holds in a run.
pub type DynProjection<E> = std::sync::Arc<dyn Projection<E>>;
