//! Compiles the wire schema with the vendored `protoc`, so a fresh machine needs only Rust.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    std::env::set_var("PROTOC", protoc);
    println!("cargo:rerun-if-changed=proto");
    prost_build::Config::new()
        // The signed body (and a receipt set's digests) are sliced out of the received message,
        // not copied.
        .bytes([".invalbus.wire.v1.Signed.body", ".invalbus.wire.v1.Signed.digests"])
        .compile_protos(&["proto/wire.proto"], &["proto"])?;
    Ok(())
}
