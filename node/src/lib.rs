//! The invalbus node as a library: `invalbus-node serve` joins the bus as a full node and
//! serves the admin API, the sidecar cache, health and reflection over gRPC; tests run it
//! in-process through [`Node`].
//!
//! # Layout
//! - `config`: the TOML file, environment variables and flags, resolved into [`NodeConfig`].
//! - `auth`: bearer tokens, roles, and the counted refusals.
//! - `audit`: the audit log: receipts written per applied batch, queries over the batch and
//!   receipt streams, and the live tail.
//! - `state`: what the services share (bus, caches, tokens, audit, counters).
//! - `admin`: the `invalbus.admin.v1.Admin` service.
//! - `sidecar`: the `invalbus.cache.v1.Cache` service.
//! - `watch`: the sidecar's `Watch` stream (the events of a cache, with keepalives), which keeps
//!   a client's in-process cache coherent.
//! - `readsock`: the sidecar's reads on a Unix socket in a minimal binary protocol (for clients
//!   whose gRPC costs more than the read).
//! - `prometheus`: the `/metrics` endpoint.
//! - `server`: [`Node`]: start everything, and shut it down in order.
//! - `cli`: the client subcommands (`purge`, `nodes`, `stats`, `audit`).

pub mod admin;
pub mod audit;
pub mod auth;
pub mod cli;
pub mod config;
pub mod prometheus;
pub mod readsock;
pub mod server;
pub mod sidecar;
pub mod state;
pub mod watch;

pub use config::{NodeConfig, Role, ServeArgs};
pub use server::{Node, NodeError};

/// Generated code of the gRPC schemas.
pub mod pb {
    /// `invalbus.admin.v1`.
    #[allow(missing_docs, clippy::all)]
    pub mod admin {
        tonic::include_proto!("invalbus.admin.v1");
    }
    /// `invalbus.cache.v1`.
    #[allow(missing_docs, clippy::all)]
    pub mod cache {
        tonic::include_proto!("invalbus.cache.v1");
    }
    /// The file descriptor set of both, for reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("invalbus_descriptor");
}
