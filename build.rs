//! Compiles proto/ with protox (a pure-Rust protobuf compiler), so that `cargo build` needs no protoc.
//! The file descriptor set is kept too: `replay` uses it to show any stored payload as JSON.

use std::{env, fs, path::PathBuf};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "proto/reproject/envelope.proto",
        "proto/shop/v1/orders.proto",
        "proto/shop/v2/orders.proto",
        "proto/shop/v3/orders.proto",
    ];
    println!("cargo:rerun-if-changed=proto");
    let descriptors = protox::compile(files, ["proto"])?;
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    fs::write(
        out_dir.join("descriptors.bin"),
        prost::Message::encode_to_vec(&descriptors),
    )?;
    prost_build::Config::new().compile_fds(descriptors)?;
    Ok(())
}
