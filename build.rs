//! Compiles reproject's own record framing (`proto/reproject/`) and the protos of every domain built
//! into this crate (`src/domain/<name>/protos/`) with protox, a pure-Rust protobuf compiler, so that
//! `cargo build` needs no protoc. The file descriptor set is kept too: a domain hands it to `replay`
//! to show stored payloads as JSON.

use std::{env, fs, path::Path, path::PathBuf};

/// Every `.proto` file below `dir`, as a path relative to `dir`, sorted.
fn protos_below(dir: &Path) -> std::io::Result<Vec<String>> {
    let mut found = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(current) = pending.pop() {
        for entry in fs::read_dir(&current)? {
            let path = entry?.path();
            if path.is_dir() {
                pending.push(path);
            } else if path.extension().is_some_and(|e| e == "proto") {
                if let Ok(relative) = path.strip_prefix(dir) {
                    found.push(relative.to_string_lossy().replace('\\', "/"));
                }
            }
        }
    }
    found.sort();
    Ok(found)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let mut includes = vec![PathBuf::from("proto")];
    let mut files = protos_below(Path::new("proto"))?;
    for domain in fs::read_dir("src/domain")? {
        let protos = domain?.path().join("protos");
        if protos.is_dir() {
            println!("cargo:rerun-if-changed={}", protos.display());
            files.extend(protos_below(&protos)?);
            includes.push(protos);
        }
    }
    let descriptors = protox::compile(&files, &includes)?;
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    fs::write(
        out_dir.join("descriptors.bin"),
        prost::Message::encode_to_vec(&descriptors),
    )?;
    prost_build::Config::new().compile_fds(descriptors)?;
    Ok(())
}
