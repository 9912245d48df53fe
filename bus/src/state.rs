//! What every part of one bus shares: its identity and settings, its caches, the links it
//! talks through, the gate, the sequence tracking and the peer table, the channels to its tasks.
//!
//! The public handles ([`crate::Bus`], [`crate::Cache`]) and the tasks (`publisher`,
//! `receiver`, `receipts`) all hold an `Arc<BusInner>`; nothing here imports them.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_nats::jetstream;
use tokio::sync::{broadcast, mpsc, oneshot, watch};

use crate::apply::{Applied, Applier, CacheEvent};
use crate::codec::Invalidation;
use crate::config::{JetStreamConfig, Limits};
use crate::gate::Gate;
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

/// One invalidation waiting to be published, and who waits for it.
pub(crate) struct Outgoing {
    pub invalidation: Invalidation,
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
}

pub(crate) struct BusInner {
    pub node_id: String,
    pub namespace: String,
    pub epoch: u64,
    pub actor: String,
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

    /// The window evidence serves for.
    pub fn window(&self) -> Duration {
        self.heartbeat_interval + self.max_staleness
    }
}
