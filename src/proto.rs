//! reproject's own record framing, generated from `proto/reproject/` at build time (see `build.rs`).

#![allow(clippy::all, missing_docs)]

pub mod reproject {
    pub mod v1 {
        include!(concat!(env!("OUT_DIR"), "/reproject.v1.rs"));
    }
}
