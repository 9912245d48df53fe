//! invalbus: named in-process caches whose invalidations travel to every replica over NATS.
//!
//! A service embeds a [`Bus`], opens named [`Cache`]s on it, reads through them with
//! [`Cache::get_or_load`], and after each write calls one of the `invalidate_*` methods. The
//! invalidation is applied to this node's caches before the call returns, and is published to
//! every other node of the namespace, which drops its copies.
//!
//! ```
//! # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use invalbus::{Bus, CacheConfig, InProcessHub, Loaded};
//! // Two replicas; in production each would call `.nats("nats://…")` instead of `.in_process`.
//! let hub = InProcessHub::new();
//! let web1 = Bus::builder().in_process(&hub).namespace("blog").node_id("web-1").build().await?;
//! let web2 = Bus::builder().in_process(&hub).namespace("blog").node_id("web-2").build().await?;
//! let articles1 = web1.cache::<String>("articles", CacheConfig::new(10_000))?;
//! let articles2 = web2.cache::<String>("articles", CacheConfig::new(10_000))?;
//!
//! // Read through the cache: the loader runs on a miss, and its value is cached with its tags
//! // and version.
//! let body = articles2
//!     .get_or_load("hello-world", || async {
//!         Ok::<_, std::io::Error>(Loaded::new("v1".to_string()).tag("author:42").version(1))
//!     })
//!     .await?;
//! assert_eq!(body, "v1");
//!
//! // web-1 updates the article to version 2, then invalidates it everywhere.
//! articles1.invalidate_version("hello-world", 2).await?.published().await?;
//! while articles2.get("hello-world").await.is_some() {
//!     tokio::time::sleep(std::time::Duration::from_millis(1)).await;
//! }
//! # Ok(()) }
//! ```
//!
//! # Layout
//! - `codec`: the domain types ([`Invalidation`], [`Target`]) and their defensive encoding to
//!   and from the wire schema of `invalbus-proto`, with the size limits of [`Limits`].
//! - `config`: [`Limits`] and [`CacheConfig`].
//! - `metrics`: striped counters and latency histograms, and their snapshots ([`BusStats`],
//!   [`CacheStats`]).
//! - `cache`: one named local cache: moka entries stamped with a generation, purge records
//!   checked on read, and leases that refuse fills overtaken by an invalidation.
//! - `transport`: the link to peers: a NATS connection, or an [`InProcessHub`] with the same
//!   semantics for single-process use and tests.
//! - `bus`: [`Bus`] and [`Cache`]: the publisher task that batches this node's invalidations,
//!   the receiver task that applies its peers', heartbeats, and the peer table.
//!
//! # Guarantees
//! **When an invalidation call returns** (`invalidate_key`, `_version`, `_tag`, `_prefix`,
//! `_all`, or [`Bus::invalidate`]): every read on this node that starts afterwards misses the
//! invalidated entries, and every load of an invalidated key that was already running when the
//! call started is not cached (its value is returned to its own callers only). This holds for
//! any number of entries under a tag or prefix: purges take effect through records checked on
//! read, not through a scan.
//!
//! **Versions**: a versioned invalidation at version `v` drops the key's entry if its version
//! is below `v` and refuses fills below `v` for the cache's version window (default: its time
//! to live). An invalidation that arrives late, twice, or out of order never brings back an
//! older value.
//!
//! **Peers**: the invalidation is queued for publishing when the call returns; the returned
//! [`Ticket`] tells when its batch was handed to the transport. Each peer applies batches of
//! one origin in sequence order, skips duplicates and its own echoes, and gives the same
//! guarantees as above from the moment it has applied the batch.
//!
//! **Time**: every entry expires after its cache's time to live whatever happens to messages
//! (events plus time).
//!
//! **Not yet guaranteed**: core NATS delivers at most once. A peer that finds a gap in an
//! origin's sequence, is told it was a slow consumer, or reconnects after a disconnect flushes
//! its caches, since it may have missed invalidations. Loss of an origin's *last* message is
//! not detected by sequence alone, and a publish that failed while disconnected is reported to
//! its ticket but not retried. Replay from JetStream and a bounded staleness during outages
//! are the subject of the never-stale work.

mod bus;
mod cache;
mod codec;
mod config;
mod metrics;
mod repair;
mod transport;

pub use bus::{
    now_us, Applied, BuildError, Bus, BusBuilder, Cache, CacheError, InvalidateError, Peer, Published, Reservation,
    Ticket,
};
pub use cache::{ApplyOutcome, FillOutcome, LoadError, Loaded};
pub use codec::{
    decode_batch, decode_heartbeat, encode_batch, encode_heartbeat, Batch, DecodeError, Heartbeat, Invalidation, Target,
};
pub use config::{CacheConfig, JetStreamConfig, Limits};
pub use metrics::{BusStats, CacheStats, LatencySnapshot};
pub use transport::{InProcessHub, PublishError};
