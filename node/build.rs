//! Compiles the admin and sidecar gRPC schemas with the vendored `protoc`, and writes the file
//! descriptor set that the reflection service serves.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    std::env::set_var("PROTOC", protoc);
    // The schemas live with the wire schema in the proto crate.
    let dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("../proto/proto");
    let admin = dir.join("admin.proto");
    let cache = dir.join("cache.proto");
    println!("cargo:rerun-if-changed={}", admin.display());
    println!("cargo:rerun-if-changed={}", cache.display());
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out.join("invalbus_descriptor.bin"))
        // For the command line's `--json` output.
        .type_attribute(".invalbus.admin.v1", "#[derive(serde::Serialize)]")
        .compile_protos(&[admin, cache], &[dir])?;
    Ok(())
}
