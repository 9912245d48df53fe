//! What every part of one bus shares: its identity and settings, its caches, the links it
//! talks through, the gate, the sequence tracking and the peer table, the channels to its tasks.
//!
//! The public handles ([`crate::Bus`], [`crate::Cache`]) and the tasks (`publisher`,
//! `receiver`, `receipts`) all hold an `Arc<BusInner>`; nothing here imports them.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_nats::jetstream;
use tokio::sync::{broadcast, mpsc, oneshot, watch};

use crate::apply::{Applied, Applier, CacheEvent};
use crate::codec::Invalidation;
use crate::config::{JetStreamConfig, Limits};
use crate::gate::Gate;
use crate::identity::{Identity, Trust};
use crate::metrics::BusMetrics;
use crate::origins::Origins;
use crate::peers::Peers;
use crate::receipts::Receipt;
use crate::transport::{Link, PublishError, Subjects};

/// Microseconds since the Unix epoch, by this machine's clock (for display and the audit log;
/// the gate never uses it).
pub fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// Where a batch stood when its publish finished.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Published {
    /// The batch's sequence in this node's epoch.
    pub seq: u64,
}

/// Invalidations waiting to be published in one batch (one call's, or a group of a bulk call's,
/// within the batch limits), and who waits for them.
pub(crate) struct Outgoing {
    pub invalidations: Vec<Invalidation>,
    /// Their encoded size in a batch (`codec::encoded_len`, summed).
    pub bytes: usize,
    pub done: Option<oneshot::Sender<Result<Published, PublishError>>>,
}

/// The JetStream side of a bus.
pub(crate) struct Durable {
    pub js: jetstream::Context,
    pub config: JetStreamConfig,
}

/// Heartbeats this node sent recently, by beat number, with the clock reading when each was
/// sent: the `t0` of the evidence its return gives.
#[derive(Default)]
pub(crate) struct Beats {
    sent: VecDeque<(u64, u64)>,
}

impl Beats {
    /// How many recent beats are remembered (a beat that comes back later than this many
    /// intervals is too old to vouch for anything anyway).
    const KEPT: usize = 256;

    pub fn sent(&mut self, beat: u64, at_ns: u64) {
        if self.sent.len() >= Self::KEPT {
            self.sent.pop_front();
        }
        self.sent.push_back((beat, at_ns));
    }

    /// When the first beat sent after `t` was sent (the oldest one that cannot have come back
    /// yet if `t` is the freshest evidence).
    pub fn first_after(&self, t: u64) -> Option<u64> {
        self.sent
            .iter()
            .rev()
            .map(|(_, at)| *at)
            .take_while(|at| *at > t)
            .last()
    }

    /// When `beat` was sent, if it is remembered.
    pub fn when(&self, beat: u64) -> Option<u64> {
        self.sent.iter().find(|(b, _)| *b == beat).map(|(_, at)| *at)
    }
}

/// Test hooks that inject faults into a running bus.
#[derive(Default)]
pub(crate) struct Faults {
    /// The receiver stands still until this clock reading (a stalled or paused receiver).
    pub stall_until_ns: AtomicU64,
    /// Batches of peers the receiver drops as if never received, on every path (a node that
    /// never applies some batches, to show a checker can see it).
    pub drop_batches: AtomicU64,
    /// The stream follower's consumer delivers nothing until it is restarted (what a pull
    /// request the server dropped without telling the client looks like).
    pub deaf_follower: AtomicBool,
}

pub(crate) struct BusInner {
    pub node_id: String,
    pub namespace: String,
    pub epoch: u64,
    pub actor: Arc<str>,
    pub address: String,
    pub limits: Limits,
    pub subjects: Subjects,
    pub link: Link,
    pub durable: Option<Durable>,
    /// Whether the receiver follows the batch stream (then the evidence comes from it; else
    /// from this node's own heartbeat through NATS).
    pub follows_stream: bool,
    pub caches: RwLock<HashMap<String, Arc<dyn Applier>>>,
    pub outbox: mpsc::Sender<Outgoing>,
    pub outbound_capacity: usize,
    /// The sequence of the last batch this node published.
    pub last_seq: AtomicU64,
    pub metrics: Arc<BusMetrics>,
    /// The receipt recorder's queue of this node's own receipts (None: it writes no receipts).
    pub receipts: Option<mpsc::Sender<Receipt>>,
    pub applied: broadcast::Sender<Applied>,
    pub events: broadcast::Sender<CacheEvent>,
    pub origins: Mutex<Origins>,
    pub peers: Mutex<Peers>,
    pub beats: Mutex<Beats>,
    pub shutdown: watch::Sender<bool>,
    pub gate: Gate,
    pub heartbeat_interval: Duration,
    pub max_staleness: Duration,
    pub faults: Faults,
    /// This bus's signing key.
    pub identity: Identity,
    /// The namespace's trust policy, the parsed keys and the origins pinned to them.
    pub trust: Trust,
    /// Signatures of recently verified batches, to skip checking the same batch again when the
    /// other path delivers it.
    pub verified: Mutex<VerifiedCache>,
    /// Recently applied contested batches (see `receiver::contested`), so that the second path
    /// neither applies nor counts one again.
    pub contested_seen: Mutex<VerifiedCache>,
    /// When a live process with this node id (another epoch) was last heard (clock ns; 0:
    /// never).
    pub duplicate_seen_ns: AtomicU64,
    /// Signs nothing and checks no signature (`BusBuilder::unsigned_for_benchmarks`).
    pub unsigned: bool,
    /// The stream's heartbeats that a newer one on the same subject superseded, as the follower
    /// read them, for the trim to delete (only on a bus that manages the stream).
    pub superseded: Option<Arc<Mutex<crate::stream::Superseded>>>,
}

/// Recently verified (or contested) batches, by `(origin, epoch, seq)`: the signature and body,
/// the latest [`VerifiedCache::KEPT`] of them within [`VerifiedCache::KEPT_BYTES`] of bodies.
#[derive(Default)]
pub(crate) struct VerifiedCache {
    recent: std::collections::HashMap<(String, u64, u64), (Vec<u8>, bytes::Bytes)>,
    order: VecDeque<(String, u64, u64)>,
    bytes: usize,
}

impl VerifiedCache {
    const KEPT: usize = 4096;
    /// The bodies kept pin the received messages' buffers: a bound on their size, so that a
    /// stream of large batches keeps a few megabytes, not thousands of batches.
    const KEPT_BYTES: usize = 8 << 20;

    /// Whether exactly this body, with exactly this signature, was verified before.
    pub fn seen(&self, id: &(String, u64, u64), signature: &[u8], body: &[u8]) -> bool {
        self.recent
            .get(id)
            .is_some_and(|(sig, b)| sig.as_slice() == signature && b.as_ref() == body)
    }

    pub fn insert(&mut self, id: (String, u64, u64), signature: Vec<u8>, body: bytes::Bytes) {
        let len = body.len();
        match self.recent.insert(id.clone(), (signature, body)) {
            None => self.order.push_back(id),
            Some((_, old)) => self.bytes -= old.len(),
        }
        self.bytes += len;
        while self.order.len() > Self::KEPT || (self.bytes > Self::KEPT_BYTES && self.order.len() > 1) {
            if let Some(old) = self.order.pop_front() {
                if let Some((_, b)) = self.recent.remove(&old) {
                    self.bytes -= b.len();
                }
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl BusInner {
    pub fn origins(&self) -> MutexGuard<'_, Origins> {
        lock(&self.origins)
    }

    pub fn peers(&self) -> MutexGuard<'_, Peers> {
        lock(&self.peers)
    }

    pub fn beats(&self) -> MutexGuard<'_, Beats> {
        lock(&self.beats)
    }

    pub fn verified(&self) -> MutexGuard<'_, VerifiedCache> {
        lock(&self.verified)
    }

    pub fn contested_seen(&self) -> MutexGuard<'_, VerifiedCache> {
        lock(&self.contested_seen)
    }

    /// The caches an invalidation of `cache` (or of every cache) applies to.
    pub fn targets(&self, cache: Option<&str>) -> Vec<Arc<dyn Applier>> {
        let caches = self.caches.read().unwrap_or_else(|e| e.into_inner());
        match cache {
            Some(name) => caches.get(name).cloned().into_iter().collect(),
            None => caches.values().cloned().collect(),
        }
    }

    /// Flushes every cache because something was missed that cannot be applied: whatever was
    /// missed is covered (nothing cached predates the flush), so the sequence tracking marks it.
    pub fn flush_all(&self, cause: &str) {
        let at = Instant::now();
        self.metrics.repair_flushes.inc();
        tracing::warn!(node = %self.node_id, cause, "flushing every cache: what was missed cannot be applied");
        for c in self.targets(None) {
            c.flush(cause);
        }
        self.origins().cover_all();
        self.event(|| CacheEvent::Flushed { cache: None, at });
    }

    /// Sends an event to the followers, if any (building it only then).
    pub fn event(&self, make: impl FnOnce() -> CacheEvent) {
        if self.events.receiver_count() > 0 {
            let _ = self.events.send(make());
        }
    }

    /// Wraps an encoded message for the wire: signed, unless benchmarking the unsigned path.
    pub fn seal(&self, kind: crate::identity::Kind, body: bytes::Bytes) -> bytes::Bytes {
        if self.unsigned {
            crate::codec::seal_unsigned(body)
        } else {
            crate::codec::seal(&self.identity, kind, body)
        }
    }

    /// Records that another live process uses this node id.
    pub fn note_duplicate(&self, other_epoch: u64) {
        self.duplicate_seen_ns
            .store(self.gate.now(), std::sync::atomic::Ordering::Release);
        self.metrics.duplicate_node_ids.inc();
        if self.trust.should_log(
            &format!("{}#{other_epoch}", self.node_id),
            self.gate.now(),
            Duration::from_secs(10),
        ) {
            tracing::error!(node = %self.node_id, epoch = self.epoch, other_epoch,
                "another live process publishes heartbeats with this node id: two nodes share one name; give each its own node id");
        }
    }

    /// The window evidence serves for.
    pub fn window(&self) -> Duration {
        self.heartbeat_interval + self.max_staleness
    }
}
