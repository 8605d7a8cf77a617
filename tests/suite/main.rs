//! The end-to-end tests, against a real PostgreSQL and the in-process broker, as one test binary.
//!
//! Why one binary and not a file per topic: in a release build every test binary that drives the
//! engine compiles the whole engine for the shop again (generic code is instantiated in each crate
//! that uses it) and links it again; with a binary per file that was most of CI's half-hour. The
//! modules below are what were those files; `cargo test --release --test suite rebuild::` runs one.
//!
//! Kept apart, each in its own binary: `tests/throttle.rs` and `tests/throttle_production.rs`, whose
//! verdicts depend on what else loads the server (here every module's tests run side by side), and
//! `tests/fuzz.rs`, the property tests that a long run runs alone (`REPROJECT_FUZZ_CASES`).

#[path = "../common/mod.rs"]
mod common;

mod bad_records;
mod cli;
mod column_types;
mod crash;
mod estimate;
mod faults;
mod file_views;
mod follow;
mod framings;
mod health;
mod lifecycle;
mod logical_order;
mod outages;
mod privileges;
mod rebuild;
mod replay;
mod scale_out;
mod swap;
mod verify;
