//! Compiles the ledger's protos with protox (pure Rust, no protoc) into prost types, and keeps the
//! descriptor set so that `reproject-ledger replay` shows payloads as JSON.

use std::{env, fs, path::PathBuf};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "proto/ledger/v1/ledger.proto",
        "proto/ledger/v2/ledger.proto",
    ];
    println!("cargo:rerun-if-changed=proto");
    let descriptors = protox::compile(files, ["proto"])?;
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    fs::write(
        out_dir.join("ledger_descriptors.bin"),
        prost::Message::encode_to_vec(&descriptors),
    )?;
    prost_build::Config::new().compile_fds(descriptors)?;
    Ok(())
}
