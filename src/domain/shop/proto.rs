//! The shop's messages in their three versions, generated from `protos/shop/` at build time.

#![allow(clippy::all, missing_docs)]

pub mod v1 {
    include!(concat!(env!("OUT_DIR"), "/shop.v1.rs"));
}
pub mod v2 {
    include!(concat!(env!("OUT_DIR"), "/shop.v2.rs"));
}
pub mod v3 {
    include!(concat!(env!("OUT_DIR"), "/shop.v3.rs"));
}

/// The encoded `FileDescriptorSet` of the shop's messages (and reproject's envelope).
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/descriptors.bin"));
