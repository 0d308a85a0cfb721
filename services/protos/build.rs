//! Compiles every `.proto` under the workspace's `proto/` with protox (pure
//! Rust, so no system `protoc` is needed) and writes the descriptor set that
//! the services hand to gRPC reflection.

use std::path::PathBuf;

use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Both resolved when the script runs, not when it is compiled: clones of
    // the workspace sharing one target dir share this script's build, and an
    // absolute path would watch (and compile) the protos of whichever clone
    // built it first. A relative rerun-if-changed is resolved per package.
    let proto_root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("../../proto");
    println!("cargo:rerun-if-changed=../../proto");

    let mut files = Vec::new();
    collect_protos(&proto_root, &mut files)?;
    files.sort();
    let fds = protox::compile(&files, [&proto_root])?;

    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out_dir.join("lineguard_descriptor.bin"),
        fds.encode_to_vec(),
    )?;

    let mut config = prost_build::Config::new();
    // Every message knows its fully qualified name: event types are those names.
    config.enable_type_names();
    config.bytes(["."]);
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // A body that does not decode is the caller's error (src/codec.rs).
        .codec_path("crate::codec::Codec")
        .compile_fds_with_config(fds, config)?;
    Ok(())
}

fn collect_protos(dir: &std::path::Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            collect_protos(&path, out)?;
        } else if path.extension().is_some_and(|ext| ext == "proto") {
            out.push(path);
        }
    }
    Ok(())
}
