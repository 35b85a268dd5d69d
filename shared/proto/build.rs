//! Compiles every `.proto` under the workspace's `proto/` folder with protox
//! (pure Rust, no system `protoc`) and generates tonic code from the result.

use std::path::{Path, PathBuf};

use prost::Message;

fn collect_protos(dir: &Path, found: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            collect_protos(&path, found)?;
        } else if path.extension().is_some_and(|ext| ext == "proto") {
            found.push(path);
        }
    }
    Ok(())
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Read at run time, not compile time: a build script binary reused
    // from a copied target directory must still read this checkout's files.
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR")?;
    let proto_root = Path::new(&manifest_dir).join("../../proto");
    let mut files = Vec::new();
    collect_protos(&proto_root.join("agentmesh"), &mut files)?;
    files.sort();
    println!("cargo:rerun-if-changed={}", proto_root.display());
    for file in &files {
        println!("cargo:rerun-if-changed={}", file.display());
    }

    let descriptor_set = protox::compile(&files, [&proto_root])?;
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out_dir.join("agentmesh_descriptor.bin"),
        descriptor_set.encode_to_vec(),
    )?;

    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_fds(descriptor_set)?;
    Ok(())
}
