//! The public handles on a bus: [`Bus`] (a node's caches, its invalidations, its peers) and
//! [`Cache`] (one named cache), with the errors and tickets of their calls.

use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{broadcast, mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::apply::{apply_to, Applied, Applier, CacheEvent, PendingDrops};
use crate::cache::{ApplyOutcome, FillOutcome, Lease, LoadError, Loaded, LocalCache};
use crate::codec::{self, Batch, DecodeError, Invalidation, Target};
use crate::config::{CacheConfig, Limits};
use crate::identity::{Kind, Refusal};
use crate::metrics::{BusStats, CacheStats};
use crate::peers::Peer;
use crate::publisher::BATCH_OVERHEAD;
use crate::receipts::Receipt;
use crate::state::{BusInner, Outgoing, Published};
use crate::transport::{Link, PublishError};

/// Why a bus could not be built.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// A setting is missing or invalid.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The NATS server could not be reached.
    #[error("cannot connect to NATS: {0}")]
    Connect(String),
    /// The NATS server refused the credentials (user/password, token, NKey or credentials
    /// file): fix them, retrying will not help.
    #[error("NATS refused the credentials: {0}")]
    Refused(String),
    /// The subscription could not be set up.
    #[error("cannot subscribe: {0}")]
    Subscribe(String),
    /// NATS or JetStream did not become ready within the startup timeout (a server starting,
    /// a stream leader being elected, the stream's quorum unreachable): retrying may help.
    #[error("NATS or JetStream not ready: {0}")]
    Unavailable(String),
}

impl BuildError {
    /// Whether trying again later may succeed (the servers were not ready), as opposed to a
    /// setting or a credential that must be fixed first.
    pub fn is_transient(&self) -> bool {
        matches!(self, BuildError::Connect(_) | BuildError::Unavailable(_))
    }
}

/// Why an invalidation call failed. The local caches were invalidated in every case but
/// [`InvalidateError::Invalid`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidateError {
    /// The invalidation breaks a limit or a rule; nothing was applied.
    #[error("invalid invalidation: {0}")]
    Invalid(String),
    /// The outbound queue is full: applied locally, but peers will not hear of it.
    #[error("outbound queue full ({0} calls waiting): applied locally, not published")]
    QueueFull(usize),
    /// The bus is shut down: applied locally, not published.
    #[error("the bus is shut down: applied locally, not published")]
    Closed,
    /// A cache of that name exists with another value type.
    #[error("no cache named {0:?} on this bus")]
    UnknownCache(String),
}

/// Why a named cache could not be opened.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CacheError {
    /// A cache of this name exists with another value type.
    #[error("cache {0:?} exists with another value type")]
    TypeMismatch(String),
    /// The name is empty or too long.
    #[error("invalid cache name {0:?}")]
    InvalidName(String),
}

/// A handle on one invalidation's publish. It is already applied locally; await
/// [`Ticket::published`] to learn when it left this node.
#[derive(Debug)]
pub struct Ticket {
    rx: oneshot::Receiver<Result<Published, PublishError>>,
    /// A bulk call's earlier groups, each published in a batch before the last one's (`rx`).
    earlier: Vec<oneshot::Receiver<Result<Published, PublishError>>>,
    local: ApplyOutcome,
    pending: PendingDrops,
}

impl Ticket {
    /// What the invalidation did to this node's caches before the call returned: entries
    /// removed at once (key targets), and whether a cache was flushed. A tag or prefix purge
    /// hid its entries before the call returned too; [`Ticket::pending_drops`] counts them.
    pub fn local(&self) -> ApplyOutcome {
        self.local
    }

    /// The count of the entries a tag or prefix purge hid on this node, which completes when
    /// the background sweep has removed them. Add it to [`Ticket::local`] for this node's
    /// receipt.
    pub fn pending_drops(&self) -> PendingDrops {
        self.pending.clone()
    }

    /// Waits until the batch carrying this invalidation was published: with JetStream, until
    /// the stream acknowledged it (the invalidation is then *accepted*, and the staleness bound
    /// runs from here); with core NATS, until it was handed to the NATS client, which proves
    /// nothing about delivery. For a bulk call ([`Bus::invalidate_many`]), until every batch
    /// carrying its invalidations was: the first error, or the last batch's sequence.
    pub async fn published(self) -> Result<Published, PublishError> {
        let mut first_error = None;
        for rx in self.earlier {
            if let Err(e) = rx.await.unwrap_or(Err(PublishError::Closed)) {
                first_error.get_or_insert(e);
            }
        }
        let last = self.rx.await.unwrap_or(Err(PublishError::Closed));
        match first_error {
            Some(e) => Err(e),
            None => last,
        }
    }
}

/// A message read back (from a stream, for the audit log), with who signed it and whether this
/// bus trusts it.
#[derive(Debug, Clone)]
pub struct Opened<T> {
    /// The message.
    pub message: T,
    /// Its signer's public key.
    pub signer: String,
    /// `Ok` when the signature verifies and the trust policy lets the signer publish it as its
    /// origin (for a receipt: write receipts as its node); otherwise why not.
    pub trusted: Result<(), Refusal>,
}

/// A node's handle on the bus: its caches, its invalidations, and what it knows of its peers.
/// Cloning is cheap; every clone shares the same node.
///
/// ```
/// # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use invalbus::{Bus, CacheConfig, InProcessHub, Loaded};
/// let hub = InProcessHub::new();
/// let a = Bus::builder().in_process(&hub).namespace("doc").node_id("a").build().await?;
/// let b = Bus::builder().in_process(&hub).namespace("doc").node_id("b").build().await?;
/// let ca = a.cache::<String>("articles", CacheConfig::new(1000))?;
/// let cb = b.cache::<String>("articles", CacheConfig::new(1000))?;
/// let v = cb.get_or_load("hello", || async { Ok::<_, std::io::Error>(Loaded::new("v1".to_string()).tag("articles")) }).await?;
/// assert_eq!(v, "v1");
/// ca.invalidate_tag("articles").await?.published().await?;
/// // b applies a's purge within a moment:
/// for _ in 0..500 { if cb.get("hello").await.is_none() { break; } tokio::time::sleep(std::time::Duration::from_millis(10)).await; }
/// assert_eq!(cb.get("hello").await, None);
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Bus {
    pub(crate) inner: Arc<BusInner>,
    pub(crate) tasks: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

impl std::fmt::Debug for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bus")
            .field("node_id", &self.inner.node_id)
            .field("namespace", &self.inner.namespace)
            .field("epoch", &self.inner.epoch)
            .finish()
    }
}

impl Bus {
    /// This node's id.
    pub fn node_id(&self) -> &str {
        &self.inner.node_id
    }

    /// This node's namespace.
    pub fn namespace(&self) -> &str {
        &self.inner.namespace
    }

    /// This process's epoch (random per start).
    pub fn epoch(&self) -> u64 {
        self.inner.epoch
    }

    /// `nats` or `in-process`.
    pub fn transport(&self) -> &'static str {
        self.inner.link.kind()
    }

    /// The limits in force.
    pub fn limits(&self) -> &Limits {
        &self.inner.limits
    }

    /// Opens the named cache, creating it with `config` the first time. Opening it again returns
    /// the same cache (and ignores `config`).
    pub fn cache<V: Clone + Send + Sync + 'static>(
        &self,
        name: &str,
        config: CacheConfig,
    ) -> Result<Cache<V>, CacheError> {
        if name.is_empty() || name.len() > self.inner.limits.max_key_bytes {
            return Err(CacheError::InvalidName(name.to_owned()));
        }
        let mut caches = self.inner.caches.write().unwrap_or_else(|e| e.into_inner());
        let applier = caches
            .entry(name.to_owned())
            .or_insert_with(|| {
                LocalCache::<V>::new(name, config, self.inner.limits.max_tags_per_entry) as Arc<dyn Applier>
            })
            .clone();
        let local = applier
            .as_any()
            .downcast::<LocalCache<V>>()
            .map_err(|_| CacheError::TypeMismatch(name.to_owned()))?;
        Ok(Cache {
            local,
            bus: self.clone(),
        })
    }

    /// Applies an invalidation to the named cache (or every cache) of this node, then queues it
    /// for the peers. Returns once the local caches are invalidated.
    pub async fn invalidate(&self, invalidation: Invalidation) -> Result<Ticket, InvalidateError> {
        self.invalidate_many(vec![invalidation]).await
    }

    /// Applies many invalidations (of any caches and targets) to this node, in order, then queues
    /// them for the peers in as few batches as the limits allow: for bulk work (a migration, a
    /// batch job), much cheaper per invalidation than one call each. The ticket is published
    /// when every batch carrying them is. Nothing is applied if any of them is invalid; on
    /// [`InvalidateError::QueueFull`] all were applied locally and the first groups may have
    /// been queued, not the rest.
    pub async fn invalidate_many(&self, mut invalidations: Vec<Invalidation>) -> Result<Ticket, InvalidateError> {
        if invalidations.is_empty() {
            return Err(InvalidateError::Invalid("no invalidations".into()));
        }
        for inv in &mut invalidations {
            codec::check_invalidation(inv, &self.inner.limits).map_err(InvalidateError::Invalid)?;
            if inv.actor.is_empty() {
                inv.actor = self.inner.actor.clone();
            }
        }
        // Applied here before the call returns: a read on this node after it sees the effect.
        let mut local = ApplyOutcome::default();
        let mut pending = PendingDrops::default();
        // Bulk calls usually name one cache throughout: look it up once per run of the same name.
        let mut resolved_for: Option<Option<&str>> = None;
        let mut caches = Vec::new();
        for inv in &invalidations {
            let name = inv.cache.as_deref();
            if resolved_for != Some(name) {
                caches = self.inner.targets(name);
                resolved_for = Some(name);
                if let (Some(name), true) = (name, caches.is_empty()) {
                    // Peers may hold the cache even if this node does not: still publish.
                    tracing::debug!(cache = %name, "invalidation of a cache this node does not hold");
                }
            }
            for c in &caches {
                let out = apply_to(c, inv.target.borrowed(), inv.version, &mut pending).await;
                local.dropped += out.dropped;
                local.flushed |= out.flushed;
            }
        }
        self.inner
            .event(|| CacheEvent::Invalidated(Arc::from(invalidations.as_slice())));
        self.enqueue(invalidations, local, pending)
    }

    /// Queues invalidations for the publisher in groups that each fit in one batch. Most calls
    /// make one group, which is the caller's `Vec` as it came.
    fn enqueue(
        &self,
        invalidations: Vec<Invalidation>,
        local: ApplyOutcome,
        pending: PendingDrops,
    ) -> Result<Ticket, InvalidateError> {
        let limits = &self.inner.limits;
        let room = limits.max_publish_bytes.saturating_sub(BATCH_OVERHEAD);
        // Every group's receiver but the last, and the last.
        let (mut earlier, mut last) = (Vec::new(), None);
        let mut send = |invalidations: Vec<Invalidation>, bytes: usize| -> Result<(), InvalidateError> {
            let (tx, rx) = oneshot::channel();
            match self.inner.outbox.try_send(Outgoing {
                invalidations,
                bytes,
                done: Some(tx),
            }) {
                Ok(()) => {
                    earlier.extend(last.replace(rx));
                    Ok(())
                }
                Err(mpsc::error::TrySendError::Full(_)) => {
                    self.inner.metrics.publish_queue_full.inc();
                    tracing::warn!(node = %self.inner.node_id, "outbound queue full: invalidation applied locally, not published");
                    Err(InvalidateError::QueueFull(self.inner.outbound_capacity))
                }
                Err(mpsc::error::TrySendError::Closed(_)) => Err(InvalidateError::Closed),
            }
        };
        // The call's size if it is one group (a single invalidation always is); the count stops
        // at the first invalidation past the room.
        let one_group = if invalidations.len() == 1 {
            Some(codec::encoded_len(&invalidations[0]))
        } else if invalidations.len() <= limits.max_batch_invalidations {
            invalidations.iter().try_fold(0, |total, inv| {
                let total = total + codec::encoded_len(inv);
                (total <= room).then_some(total)
            })
        } else {
            None
        };
        if let Some(total) = one_group {
            send(invalidations, total)?;
        } else {
            let mut group = Vec::new();
            let mut bytes = 0;
            for inv in invalidations {
                let len = codec::encoded_len(&inv);
                if !group.is_empty() && (bytes + len > room || group.len() == limits.max_batch_invalidations) {
                    send(std::mem::take(&mut group), bytes)?;
                    bytes = 0;
                }
                bytes += len;
                group.push(inv);
            }
            send(group, bytes)?;
        }
        Ok(Ticket {
            rx: last.ok_or(InvalidateError::Closed)?,
            earlier,
            local,
            pending,
        })
    }

    /// This bus's public key (what a [`crate::TrustPolicy`] lists).
    pub fn public_key(&self) -> &str {
        self.inner.identity.public_key()
    }

    /// Opens a signed batch as stored in the batch stream: the batch, its signer, and whether
    /// this bus trusts it (checked against the policy and the keys this bus has pinned origins
    /// to; nothing is pinned by reading).
    pub fn open_batch(&self, payload: &bytes::Bytes) -> Result<Opened<Batch>, DecodeError> {
        let env = codec::open(payload, &self.inner.limits)?;
        let batch = codec::decode_batch(&env.body, &self.inner.namespace, &self.inner.limits)?;
        let trusted = self.checked(Kind::Batch, &env.body, &env, &batch.origin).map(|_| ());
        Ok(Opened {
            message: batch,
            signer: env.signer,
            trusted,
        })
    }

    /// Opens a signed receipt: the receipt, its signer, and whether this bus trusts the signer
    /// to write receipts as the receipt's node.
    pub fn open_receipt(&self, payload: &bytes::Bytes) -> Result<Opened<Receipt>, DecodeError> {
        let env = codec::open(payload, &self.inner.limits)?;
        let receipt = Receipt::decode(&env.body)?;
        // Signed alone, or in a set whose digests name this body.
        let trusted = match &env.set {
            None => self.checked(Kind::Receipt, &env.body, &env, &receipt.node),
            Some(set) if set.covers(&env.body) => self.checked(Kind::ReceiptSet, &set.digests, &env, &receipt.node),
            Some(_) => Err(Refusal::BadSignature(
                "the receipt is not the one its digest set names".into(),
            )),
        }
        .and_then(|v| {
            if v.scopes.receipts {
                Ok(())
            } else {
                Err(Refusal::NotAllowed {
                    key: env.signer.chars().take(12).collect(),
                    what: "write receipts",
                })
            }
        });
        Ok(Opened {
            message: receipt,
            signer: env.signer,
            trusted,
        })
    }

    fn checked(
        &self,
        kind: Kind,
        signed: &[u8],
        env: &codec::Envelope,
        origin: &str,
    ) -> Result<crate::identity::Verified, Refusal> {
        let inner = &self.inner;
        let verified = inner.trust.check(kind, signed, &env.signer, &env.signature, origin)?;
        let owner = if origin == inner.node_id {
            Some(inner.identity.public_key().to_owned())
        } else {
            inner.trust.pinned(origin)
        };
        match owner {
            Some(k) if k != env.signer => Err(Refusal::WrongOrigin {
                key: env.signer.chars().take(12).collect(),
                origin: origin.to_owned(),
            }),
            Some(_) => Ok(verified),
            None if verified.bound => Ok(verified),
            // Nothing says this key is that node's: not heard from lately, and the policy
            // does not bind keys to names.
            None => Err(Refusal::Untrusted(format!(
                "{} (no live node {origin:?} known with that key)",
                env.signer.chars().take(12).collect::<String>()
            ))),
        }
    }

    /// Figures of the bus.
    pub fn stats(&self) -> BusStats {
        let mut stats = self.inner.metrics.snapshot();
        stats.suspect_us = self.inner.gate.suspect_time().as_micros() as u64;
        stats.serving = self.inner.gate.serving();
        stats.peers = self.inner.peers().len() as u64;
        stats.origins_tracked = self.inner.origins().len() as u64;
        stats
    }

    /// The propagation latency histogram as Prometheus wants it: for each upper bound (µs), how
    /// many samples were at most that; plus the count and the sum (µs).
    pub fn propagation_buckets(&self, bounds_us: &[u64]) -> (u64, u64, Vec<u64>) {
        self.inner.metrics.propagation.cumulative(bounds_us)
    }

    /// Figures of every cache on this node.
    pub fn cache_stats(&self) -> Vec<CacheStats> {
        let caches = self.inner.caches.read().unwrap_or_else(|e| e.into_inner());
        let mut v: Vec<_> = caches.values().map(|c| c.stats()).collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    /// The peers this node has heard from (silent ones expire, see [`BusBuilder::peer_table`]).
    pub fn peers(&self) -> Vec<Peer> {
        let peers = self.inner.peers();
        let origins = self.inner.origins();
        peers.list(|id, epoch| origins.applied_upto(id, epoch))
    }

    /// Whether this node writes a receipt for every batch it applies ([`BusBuilder::receipts`]).
    pub fn writes_receipts(&self) -> bool {
        self.inner.receipts.is_some()
    }

    /// Queues this node's own receipt of a batch it published (it applied the batch before
    /// publishing it, so the receiver reports no [`Applied`] for it): for example an admin
    /// purge's, with what it dropped here. Returns false, and counts it as lagged, when this
    /// node writes no receipts or the queue is full.
    pub fn record_receipt(&self, receipt: Receipt) -> bool {
        let queued = self
            .inner
            .receipts
            .as_ref()
            .is_some_and(|q| q.try_send(receipt).is_ok());
        if !queued && self.inner.receipts.is_some() {
            self.inner.metrics.receipts_lagged.inc();
            tracing::warn!(node = %self.inner.node_id, "receipt queue full: own receipt not written");
        }
        queued
    }

    /// The sequence of the last batch this node published.
    pub fn last_published_seq(&self) -> u64 {
        self.inner.last_seq.load(Ordering::SeqCst)
    }

    /// Whether this node's caches may serve right now (see the crate docs on staleness).
    pub fn serving(&self) -> bool {
        self.inner.gate.serving()
    }

    /// Switches off the staleness gate: caches keep serving while the node cannot vouch for
    /// them. Only for tests that show what the gate prevents.
    #[doc(hidden)]
    pub fn disable_staleness_gate_for_tests(&self) {
        self.inner.gate.disable();
    }

    /// Stalls the receiver for `d` while the NATS client keeps reading (so a small subscription
    /// capacity overflows for sure). Only for fault tests.
    #[doc(hidden)]
    pub fn stall_receiver_for_tests(&self, d: Duration) {
        let until = self.inner.gate.now() + d.as_nanos() as u64;
        self.inner.faults.stall_until_ns.fetch_max(until, Ordering::AcqRel);
    }

    /// Makes the receiver drop the next `n` batches of peers on every path, as if they had
    /// never arrived, without noticing. Only to show that a checker catches a node that never
    /// applied a batch.
    #[doc(hidden)]
    pub fn drop_batches_for_tests(&self, n: u64) {
        self.inner.faults.drop_batches.fetch_add(n, Ordering::AcqRel);
    }

    /// Makes the stream follower's consumer deliver nothing, as one whose pull request the
    /// server dropped without telling the client, until the receiver restarts it. Only for
    /// fault tests.
    #[doc(hidden)]
    pub fn deafen_follower_for_tests(&self) {
        self.inner.faults.deaf_follower.store(true, Ordering::Release);
    }

    /// The bound on staleness this node promises: a read never returns a value older than an
    /// accepted invalidation by more than this (heartbeat interval + max staleness). See the
    /// crate docs for what "accepted" means with and without JetStream.
    pub fn staleness_bound(&self) -> Duration {
        self.inner.window()
    }

    /// Events of this node's caches, for a follower that keeps a copy of them: every
    /// invalidation applied here (own and peers'), repair flushes, and the moments the caches
    /// stop serving. A receiver that lags (`RecvError::Lagged`) has missed some and must drop its
    /// copy. Use with [`Bus::vouched_for`] to know how long the copy may serve.
    ///
    /// ```
    /// # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let hub = invalbus::InProcessHub::new();
    /// let bus = invalbus::Bus::builder().in_process(&hub).build().await?;
    /// let cache = bus.cache::<u8>("c", invalbus::CacheConfig::new(10))?;
    /// let mut events = bus.subscribe_events();
    /// cache.invalidate_key("k").await?;
    /// assert!(matches!(events.recv().await?, invalbus::CacheEvent::Invalidated(_)));
    /// # Ok(()) }
    /// ```
    pub fn subscribe_events(&self) -> broadcast::Receiver<CacheEvent> {
        self.inner.events.subscribe()
    }

    /// How much longer this node's caches stay vouched for without new evidence (`None`: they
    /// do not serve now). A follower that copies them may serve its copy that long.
    pub fn vouched_for(&self) -> Option<Duration> {
        self.inner.gate.vouched_for()
    }

    /// A stream of the peers' batches as this node applies them.
    pub fn subscribe_applied(&self) -> broadcast::Receiver<Applied> {
        self.inner.applied.subscribe()
    }

    /// Publishes what is queued, then stops the bus's tasks. Caches stay readable.
    pub async fn shutdown(&self) {
        let _ = self.inner.shutdown.send(true);
        let tasks = std::mem::take(&mut *self.tasks.lock().unwrap_or_else(|e| e.into_inner()));
        for t in tasks {
            let _ = tokio::time::timeout(Duration::from_secs(10), t).await;
        }
        if let Link::Nats(client) = &self.inner.link {
            let _ = tokio::time::timeout(Duration::from_secs(5), client.drain()).await;
        }
    }
}

/// A named cache on a bus: reads are local; invalidations apply here at once and travel to
/// every peer.
pub struct Cache<V> {
    local: Arc<LocalCache<V>>,
    bus: Bus,
}

impl<V> Clone for Cache<V> {
    fn clone(&self) -> Self {
        Cache {
            local: self.local.clone(),
            bus: self.bus.clone(),
        }
    }
}

impl<V: Clone + Send + Sync + 'static> Cache<V> {
    /// The cache's name.
    pub fn name(&self) -> &str {
        self.local.name()
    }

    /// The bus this cache belongs to.
    pub fn bus(&self) -> &Bus {
        &self.bus
    }

    /// The cached value of `key`, if a valid entry holds it.
    #[inline]
    pub async fn get(&self, key: &str) -> Option<V> {
        if !self.bus.inner.gate.serving() {
            self.local.metrics.bypassed_reads.inc();
            return None;
        }
        self.local.get(key).await
    }

    /// Reads through the cache. On a miss, `loader` runs once for all concurrent callers of the
    /// key; its value is returned to them and cached under its tags and version unless an
    /// invalidation that covers it landed while it ran (then it is returned but not cached).
    pub async fn get_or_load<F, Fut, E>(&self, key: &str, loader: F) -> Result<V, LoadError>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Loaded<V>, E>>,
        E: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        if key.len() > self.bus.inner.limits.max_key_bytes || !self.bus.inner.gate.serving() {
            // While the node cannot vouch for its caches (cut off, or repairing), reads go to
            // the loader and nothing is cached; a key too long to invalidate is never cached.
            if key.len() <= self.bus.inner.limits.max_key_bytes {
                self.local.metrics.bypassed_reads.inc();
            }
            return loader()
                .await
                .map(|l| l.value)
                .map_err(|e| LoadError(Arc::from(e.into())));
        }
        self.local.get_or_load(key, loader).await
    }

    /// Starts a load of `key` outside `get_or_load` (for callers that load elsewhere, such as
    /// the sidecar's clients): fill the reservation when the value is read.
    pub fn reserve(&self, key: &str) -> Reservation<V> {
        let lease = self.local.lease(key);
        Reservation {
            local: self.local.clone(),
            key: key.to_owned(),
            lease: Some(lease),
        }
    }

    /// Invalidates `key` here and on every peer.
    pub async fn invalidate_key(&self, key: &str) -> Result<Ticket, InvalidateError> {
        self.invalidate(Target::Key(key.to_owned()), None).await
    }

    /// Invalidates many keys here and on every peer, in as few batches as the limits allow (see
    /// [`Bus::invalidate_many`]).
    pub async fn invalidate_keys<I>(&self, keys: I) -> Result<Ticket, InvalidateError>
    where
        I: IntoIterator,
        I::Item: AsRef<str>,
    {
        let invalidations = keys
            .into_iter()
            .map(|k| self.invalidation(Target::Key(k.as_ref().to_owned())))
            .collect();
        self.bus.invalidate_many(invalidations).await
    }

    /// Invalidates `key` at `version`: entries of a lower version are dropped, and fills of a
    /// lower version are refused for the cache's version window.
    pub async fn invalidate_version(&self, key: &str, version: u64) -> Result<Ticket, InvalidateError> {
        self.invalidate(Target::Key(key.to_owned()), Some(version)).await
    }

    /// Drops every entry carrying `tag`, here and on every peer.
    pub async fn invalidate_tag(&self, tag: &str) -> Result<Ticket, InvalidateError> {
        self.invalidate(Target::Tag(tag.to_owned()), None).await
    }

    /// Drops every entry whose key starts with `prefix`, here and on every peer.
    pub async fn invalidate_prefix(&self, prefix: &str) -> Result<Ticket, InvalidateError> {
        self.invalidate(Target::Prefix(prefix.to_owned()), None).await
    }

    /// Drops everything in this cache, here and on every peer.
    pub async fn invalidate_all(&self) -> Result<Ticket, InvalidateError> {
        self.invalidate(Target::All, None).await
    }

    async fn invalidate(&self, target: Target, version: Option<u64>) -> Result<Ticket, InvalidateError> {
        let mut inv = self.invalidation(target);
        inv.version = version;
        self.bus.invalidate(inv).await
    }

    /// An invalidation of `target` in this cache by the bus's actor, sharing both names.
    fn invalidation(&self, target: Target) -> Invalidation {
        Invalidation::shared(Some(self.local.name().clone()), self.bus.inner.actor.clone(), target)
    }

    /// Figures of this cache.
    pub fn stats(&self) -> CacheStats {
        self.local.stats()
    }

    /// Entries held (approximate; hidden entries count until swept).
    pub fn entry_count(&self) -> u64 {
        self.local.entry_count()
    }

    /// Runs moka's pending maintenance, so that counts settle.
    pub async fn run_pending_tasks(&self) {
        self.local.run_pending_tasks().await
    }
}

/// A load of one key in progress outside `get_or_load`; dropping it abandons the load.
pub struct Reservation<V: Clone + Send + Sync + 'static> {
    local: Arc<LocalCache<V>>,
    key: String,
    lease: Option<Arc<Lease>>,
}

impl<V: Clone + Send + Sync + 'static> Reservation<V> {
    /// The reserved key.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// Caches the loaded value unless an invalidation covering it landed since the reservation.
    ///
    /// A fill while the node cannot vouch for its caches is safe to keep: reads do not use it
    /// until the node has evidence again, and by then it has applied every invalidation accepted
    /// before, which removes the entry if one covers it.
    pub async fn fill(mut self, loaded: Loaded<V>) -> FillOutcome {
        let Some(lease) = self.lease.take() else {
            return FillOutcome::Refused;
        };
        let outcome = self.local.fill(&self.key, &lease, loaded).await;
        self.local.release(&self.key, &lease);
        outcome
    }
}

impl<V: Clone + Send + Sync + 'static> Drop for Reservation<V> {
    fn drop(&mut self) {
        if let Some(lease) = self.lease.take() {
            self.local.release(&self.key, &lease);
        }
    }
}
