//! reproject replays an event log from Kafka, from offset zero, through versioned Protobuf upcasters
//! into freshly created PostgreSQL projection tables, keeps them current, and swaps a rebuilt view in
//! atomically once it has caught up with the live head of the log.
//!
//! # Layout
//!
//! The modules follow the data's path:
//!
//! ```text
//! source/      Kafka: client settings, partitions, watermarks, reading from stored positions, dev broker
//! envelope/    decoding the stored record and the versioned type of its payload
//! upcast/      the upcaster registry: steps from one message version to the next, checked at start-up
//! projection/  the projection interface, row changes, logical time and the clocks of rows that gather
//!              partitions, and folding changes into rows in memory
//! sink/        PostgreSQL: binary COPY, the catalog, bulk loads and transactional batches with positions,
//!              row clocks beside the tables that need them
//! verify/      comparing two builds table by table in one snapshot, before the new one goes live
//! swap/        the atomic cut-over of the stable views to a new build
//! engine/      a build's life, stage by stage: replay, load, indexes, catch-up, verify, swap, follow;
//!              throttling against the database's health
//! domain/      what a team brings (the `Domain` trait: events, upcasters, projections, SQL, descriptors,
//!              an optional example history), and the example shop the stock binary runs
//! cli/         one file per subcommand
//! ```

// The example shop names reproject's items as a crate of its own would (`reproject::...`), so that it
// can only use the public API.
extern crate self as reproject;

pub mod cli;
pub mod domain;
pub mod engine;
pub mod envelope;
pub mod projection;
pub mod proto;
pub mod sink;
pub mod source;
pub mod swap;
pub mod upcast;
pub mod verify;

/// [`domain::Example::actual_totals`] reads the views through a `sqlx::PgPool`: the same sqlx a
/// domain's crate then uses, whatever version it would name itself.
pub use sqlx;
