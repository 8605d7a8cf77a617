//! Types generated from `proto/` at build time (see `build.rs`), and the descriptor set that lets
//! `replay` render any stored payload as JSON.

#![allow(clippy::all, missing_docs)]

pub mod reproject {
    pub mod v1 {
        include!(concat!(env!("OUT_DIR"), "/reproject.v1.rs"));
    }
}

pub mod shop {
    pub mod v1 {
        include!(concat!(env!("OUT_DIR"), "/shop.v1.rs"));
    }
    pub mod v2 {
        include!(concat!(env!("OUT_DIR"), "/shop.v2.rs"));
    }
    pub mod v3 {
        include!(concat!(env!("OUT_DIR"), "/shop.v3.rs"));
    }
}

/// The encoded `FileDescriptorSet` of every message in `proto/`.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/descriptors.bin"));
