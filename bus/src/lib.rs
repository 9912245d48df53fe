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
//! Bottom to top; each module imports only modules above it in this list.
//! - `config`: [`Limits`], [`CacheConfig`] and [`JetStreamConfig`].
//! - `identity`: signing keys ([`Identity`]), what exactly is signed, and the trust policy
//!   receivers check before anything else ([`TrustPolicy`]).
//! - `codec`: the domain types ([`Invalidation`], [`Target`]), their defensive encoding to and
//!   from the wire schema of `invalbus-proto` with the size limits of [`Limits`], and the signed
//!   envelope ([`seal`], [`open`]).
//! - `view`: a received batch decoded in place (its text borrowed from the message, not one
//!   `String` per key), read exactly as prost's generated code reads the schema; [`TargetRef`].
//! - `metrics`: striped counters and latency histograms, and their snapshots ([`BusStats`],
//!   [`CacheStats`]).
//! - `floors`: version floors, bounded, with an overflow sketch that never loses one.
//! - `cache`: one named local cache: moka entries stamped with a generation, purge records
//!   checked on read, version floors, and leases that refuse fills overtaken by an invalidation.
//! - `apply`: the object-safe face of a cache that invalidations are applied through, and what
//!   an application leaves behind ([`Applied`], [`PendingDrops`], [`CacheEvent`]).
//! - `transport`: the link to peers: a NATS connection, or an [`InProcessHub`] with the same
//!   semantics for single-process use and tests.
//! - `gate`: whether the caches may serve, from the freshest evidence, on a monotonic clock.
//! - `origins`: per-origin sequence tracking on both paths (what was applied, what is lost).
//! - `peers`: the peer table, bounded in size and age ([`Peer`]).
//! - `stream`: the JetStream streams (created once, changed only by a node that manages them),
//!   the follower that reads the batch stream in order, and the check of what it still holds.
//! - `receipts`: the recorder that writes a [`Receipt`] for every batch this node applies (the
//!   audit log's "who applied it, when, and what it dropped"), to JetStream when configured.
//! - `state`: what the tasks and handles of one bus share.
//! - `publisher`: the task that batches this node's invalidations and publishes them
//!   (acknowledged by the stream when there is one), and the heartbeats.
//! - `receiver`: the task that applies peers' batches from the live path and the stream path,
//!   gathers the gate's evidence, and flushes for what is lost; the watchdog.
//! - `bus`: the public handles [`Bus`] and [`Cache`]; `builder`: [`BusBuilder`].
//!
//! # Guarantees
//! **When an invalidation call returns** (`invalidate_key`, `_version`, `_tag`, `_prefix`,
//! `_all`, `invalidate_keys`, [`Bus::invalidate`] or [`Bus::invalidate_many`]): every read on this node that starts afterwards misses the
//! invalidated entries, and every load of an invalidated key that was already running when the
//! call started is not cached (its value is returned to its own callers only). This holds for
//! any number of entries under a tag or prefix: purges take effect through records checked on
//! read, not through a scan.
//!
//! **Versions**: a versioned invalidation at version `v` drops the key's entry if its version
//! is below `v` and refuses fills below `v` for the cache's version window (default: its time
//! to live). An invalidation that arrives late, twice, or out of order never brings back an
//! older value. Floors are kept per key while the cache has room for them; when it must drop
//! some, it keeps their maximum per hash bucket instead, so a dropped floor still refuses the
//! fills it would have refused (and some others: [`CacheStats::floor_overflow_refusals`]).
//!
//! **Time**: every entry expires after its cache's time to live whatever happens to messages
//! (events plus time).
//!
//! **The staleness bound, with JetStream** ([`BusBuilder::jetstream`]). An invalidation is
//! *accepted* when its [`Ticket`] resolves `Ok`: the stream has acknowledged it (an
//! acknowledgement that timed out is retried with the same message id, so it is stored once; a
//! timeout means "unknown", never "lost"). Then **no read on any node of the namespace returns
//! data older than that invalidation by more than [`Bus::staleness_bound`]** (`heartbeat_interval
//! + max_staleness`, 2 s with the defaults), whatever NATS does in between: partitions of a
//! node's link or of the routes between servers, resets, slow consumers, restarts, stream leader
//! changes. The argument, which an SRE can check against `receiver` and `gate`:
//! 1. A node serves from its caches at time `t` only if it holds evidence, gathered at some
//!    `t0 >= t - bound` on its monotonic clock, that it had applied every invalidation accepted
//!    before `t0`. Reads check this on the clock, each time.
//! 2. The evidence is the node's own heartbeat, sent at `t0` and stored in the batch stream,
//!    coming back to it through its ordered consumer of that stream. The stream stores and
//!    delivers messages in one order, and only once a quorum of its replicas committed them; the
//!    node applies every batch the consumer delivers before the heartbeat.
//! 3. An invalidation accepted before `t0` was committed before the heartbeat was sent, so the
//!    stream delivers it before the heartbeat, and the node applied it (from the stream, or
//!    earlier from NATS directly). A node that cannot reach the stream's quorum gets no evidence
//!    and stops serving within the bound.
//!
//! What it assumes: JetStream's commit order (Raft), and that no node's process is paused
//! between a read's gate check and its return for longer than the rest of its window. What it
//! costs: every node also reads every batch from the stream (deduplicated, applied only when
//! NATS did not deliver it first); each node stores its heartbeat in the stream (the nodes that
//! manage the stream trim each node's to its latest every 30 intervals); and caches stop serving (reads go to the loader, nothing is cached)
//! while the stream's quorum is unreachable from the node, for example during a leader election.
//!
//! A batch the stream never stored (its publish failed, so it was never accepted), a history
//! the stream no longer holds (retention passed while a node lagged), or a heartbeat announcing
//! batches the stream does not have: the node flushes every cache and counts why
//! ([`BusStats::repair_flushes`]).
//!
//! **Without JetStream** nothing shows that an invalidation was accepted by anyone: a ticket
//! resolves when the batch is handed to the NATS client. The node's evidence is its own heartbeat
//! coming back through NATS, which proves its own link works, not that every invalidation
//! reached it. Guaranteed: every loss the node can see makes it flush every cache: a hole in an
//! origin's sequence, an origin met past its first batch, a heartbeat announcing batches it never
//! got, a slow-consumer drop, a reconnect, a lapse of its own heartbeat (a cut link, even silent,
//! or a paused process stops serving within the bound). Not guaranteed: a route partition
//! inside a NATS cluster (a node keeps hearing itself while another server's messages do not
//! reach it) keeps stale data until the next batch or heartbeat of the cut-off origin arrives, or
//! until the entries' time to live. Use JetStream where that matters.
//!
//! **Publishing during an outage**: invalidations queue (bounded by
//! [`BusBuilder::outbound_queue`]); a full queue makes the call return
//! [`InvalidateError::QueueFull`] after the local invalidation; a batch not acknowledged within
//! [`JetStreamConfig::publish_deadline`] resolves its tickets with an error. Its sequence number
//! is used up, so peers that missed it flush.
//!
//! **Restarts**: a restarted node has a new epoch; peers track it from its first batch.
//!
//! # Trust
//! Every batch, heartbeat and receipt travels signed ([`seal`]) with its bus's Ed25519 key
//! ([`BusBuilder::identity`]; NATS nkey format). A receiver checks the signature and the
//! namespace's [`TrustPolicy`] ([`BusBuilder::trust`]: listed keys, each with its origins and
//! scopes, or any key pinned to its origin name on first use) before the message touches
//! sequence tracking, the peer table, the caches or the audit: a refused message changes no
//! state and is counted ([`BusStats::refused_untrusted`] and its neighbours). So an origin's
//! epoch and sequence can only move with messages signed by the key that holds the origin, and
//! a forged receipt never counts ([`Bus::open_receipt`]). Under the pinned policy, a batch that
//! verifies but whose origin name another key holds is *contested*: its invalidations are
//! applied (dropping entries is always safe), nothing else ([`BusStats::contested_batches`]),
//! so a name claimed while its node was away cannot silence the node. Two live processes with one node id
//! are detected from each other's heartbeats; the later one refuses to start unless told to
//! take over ([`BusBuilder::take_over`]). The peer table is bounded in size and age
//! ([`BusBuilder::peer_table`]).

mod apply;
mod builder;
mod bus;
mod cache;
mod codec;
mod config;
mod floors;
mod gate;
mod identity;
mod metrics;
mod origins;
mod peers;
mod publisher;
mod receipts;
mod receiver;
mod state;
mod stream;
mod transport;
mod view;

#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing;

pub use apply::{Applied, CacheEvent, PendingDrops};
pub use builder::BusBuilder;
pub use bus::{BuildError, Bus, Cache, CacheError, InvalidateError, Opened, Reservation, Ticket};
pub use cache::{ApplyOutcome, FillOutcome, LoadError, Loaded};
pub use codec::{
    decode_batch, decode_heartbeat, encode_batch, encode_heartbeat, open, seal, seal_set, Batch, DecodeError,
    DigestSet, Envelope, Heartbeat, Invalidation, Target, MAX_ADDRESS_BYTES, MAX_ANNOUNCED_CACHES,
    MAX_ANNOUNCED_NAME_BYTES, MAX_SET,
};
pub use config::{CacheConfig, JetStreamConfig, Limits, DEFAULT_MAX_AGE};
pub use identity::{Identity, KeyError, Kind, Refusal, Scopes, TrustPolicy, TrustedKey};
pub use metrics::{BusStats, CacheStats, LatencySnapshot};
pub use peers::Peer;
pub use receipts::{all_receipts, receipt_subject, receipts_stream, Receipt};
pub use state::{now_us, Published};
pub use transport::{InProcessHub, PublishError};
pub use view::TargetRef;

// The README's usage example is compiled and run as a doctest too.
#[cfg(doctest)]
#[doc = include_str!("../../README.md")]
struct ReadmeDoctests;
