//! Wire schemas of invalbus, generated from `proto/*.proto` with prost.
//!
//! `wire` holds the messages nodes publish to each other over NATS. The admin and
//! sidecar gRPC services live in the node crate, which compiles them from this
//! crate's `proto/` folder.

/// Messages published on the bus (`invalbus.wire.v1`).
pub mod wire {
    include!(concat!(env!("OUT_DIR"), "/invalbus.wire.v1.rs"));
}

/// Path of the folder that holds the `.proto` files, for build scripts of other crates.
pub const PROTO_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/proto");
