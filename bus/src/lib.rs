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
//! - `config`: [`Limits`], [`CacheConfig`] and [`JetStreamConfig`].
//! - `metrics`: striped counters and latency histograms, and their snapshots ([`BusStats`],
//!   [`CacheStats`]).
//! - `cache`: one named local cache: moka entries stamped with a generation, purge records
//!   checked on read, and leases that refuse fills overtaken by an invalidation.
//! - `transport`: the link to peers: a NATS connection, or an [`InProcessHub`] with the same
//!   semantics for single-process use and tests.
//! - `repair`: what keeps the caches honest after loss: the health gate that decides whether
//!   caches may serve, per-origin sequence tracking (gaps, epochs), and replay of missed batches
//!   from the JetStream stream, with detection of a history the stream no longer holds.
//! - `bus`: [`Bus`] and [`Cache`]: the publisher task that batches this node's invalidations
//!   (acknowledged by the stream when one is configured), the receiver task that applies its
//!   peers' and repairs what it finds missing, heartbeats, the watchdog, and the peer table.
//! - `receipts`: the recorder that writes a [`Receipt`] for every batch this node applies (the
//!   audit log's "who applied it, when, and what it dropped"), to JetStream when configured.
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
//! **Loss and outages: the staleness bound.** With a JetStream stream configured
//! ([`BusBuilder::jetstream`]), an invalidation is *accepted* when its [`Ticket`] resolves
//! `Ok`: the stream has acknowledged it (an acknowledgement that timed out is retried with the
//! same message id, so it is stored once; it means "unknown", never "lost"). From then on, no
//! read on any node of the namespace returns data older than that invalidation for longer than
//! [`Bus::staleness_bound`] = `heartbeat_interval + max_staleness` (+ 10 ms of watchdog tick;
//! 2 s with the defaults of 1 s and 1 s), whatever NATS does in between: a node serves from its
//! caches only while its own heartbeat keeps coming back through NATS within
//! `heartbeat_interval + max_staleness`, so a node that is cut off, even silently, stops serving
//! (reads go to the loader, nothing is cached) within that bound. Every batch carries
//! `(origin, epoch, seq)`; a node that sees a gap, a peer's heartbeat announcing a batch it never
//! got (tail loss), a slow-consumer event, a reconnect or a lapse of its own heartbeat stops
//! serving at once, replays exactly what it missed from the stream, and serves again; when the
//! stream no longer holds it (retention passed, stream unreachable, replay timeout), it flushes
//! the caches instead and counts why ([`BusStats::repair_flushes`]). Zero misses are tolerated.
//!
//! Without JetStream the same detection runs, but every repair is a flush, and tickets resolve
//! when the batch is handed to the NATS client, which proves nothing about delivery.
//!
//! **Publishing during an outage**: invalidations queue (bounded by
//! [`BusBuilder::outbound_queue`]); a full queue makes the call return
//! [`InvalidateError::QueueFull`] after the local invalidation; a batch not acknowledged within
//! [`JetStreamConfig::publish_deadline`] resolves its tickets with an error. Its sequence number
//! is used up, so peers see the gap and flush if they cannot replay it.
//!
//! **Restarts**: a restarted node has a new epoch; peers reset their tracking of it without
//! flushing.

mod bus;
mod cache;
mod codec;
mod config;
mod metrics;
mod receipts;
mod repair;
mod transport;

pub use bus::{
    now_us, Applied, BuildError, Bus, BusBuilder, Cache, CacheError, InvalidateError, Peer, PendingDrops, Published,
    Reservation, Ticket,
};
pub use cache::{ApplyOutcome, FillOutcome, LoadError, Loaded};
pub use codec::{
    decode_batch, decode_heartbeat, encode_batch, encode_heartbeat, Batch, DecodeError, Heartbeat, Invalidation, Target,
};
pub use config::{CacheConfig, JetStreamConfig, Limits};
pub use metrics::{BusStats, CacheStats, LatencySnapshot};
pub use receipts::{all_receipts, receipt_subject, receipts_stream, Receipt};
pub use transport::{InProcessHub, PublishError};

// The README's usage example is compiled and run as a doctest too.
#[cfg(doctest)]
#[doc = include_str!("../../README.md")]
struct ReadmeDoctests;
