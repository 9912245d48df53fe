//! The bus: a node's caches, the publisher that batches its invalidations, and the receiver that
//! applies its peers'.

use std::any::Any;
use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_nats::jetstream;
use futures::future::BoxFuture;
use futures::StreamExt;
use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tracing::Instrument;

use crate::cache::{ApplyOutcome, FillOutcome, Lease, LoadError, Loaded, LocalCache, Step};
use crate::codec::{self, Batch, DecodeError, Heartbeat, Invalidation, Target};
use crate::config::{CacheConfig, JetStreamConfig, Limits};
use crate::metrics::{BusMetrics, BusStats, CacheStats};
use crate::receipts::{self, Receipt, Recorder};
use crate::repair::{self, Admit, Health, Origins, ReplayError};
use crate::transport::{InProcessHub, Link, LinkEvent, PublishError, Subjects};

/// Microseconds since the Unix epoch, by this machine's clock.
pub fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

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
    /// The subscription could not be set up or was not confirmed by the server.
    #[error("cannot subscribe: {0}")]
    Subscribe(String),
}

/// Why an invalidation call failed. The local caches were invalidated in every case but
/// [`InvalidateError::Invalid`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidateError {
    /// The invalidation breaks a limit or a rule; nothing was applied.
    #[error("invalid invalidation: {0}")]
    Invalid(String),
    /// The outbound queue is full: applied locally, but peers will not hear of it.
    #[error("outbound queue full ({0} invalidations waiting): applied locally, not published")]
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

/// Where a batch stood when its publish finished.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Published {
    /// The batch's sequence in this node's epoch.
    pub seq: u64,
}

/// A handle on one invalidation's publish. It is already applied locally; await
/// [`Ticket::published`] to learn when it left this node.
#[derive(Debug)]
pub struct Ticket {
    rx: oneshot::Receiver<Result<Published, PublishError>>,
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

    /// Waits until the batch carrying this invalidation was handed to the transport.
    ///
    /// With core NATS this does not prove that the server received it (a later issue adds
    /// JetStream acknowledgements for that).
    pub async fn published(self) -> Result<Published, PublishError> {
        self.rx.await.unwrap_or(Err(PublishError::Closed))
    }
}

/// A batch from a peer, as applied on this node: what the audit log's receipts are made of.
#[derive(Debug, Clone)]
pub struct Applied {
    /// Node that published the batch.
    pub origin: String,
    /// Its epoch.
    pub epoch: u64,
    /// Its sequence.
    pub seq: u64,
    /// When it was published, by the origin's clock (µs since the Unix epoch).
    pub published_us: u64,
    /// When this node finished applying it, by this node's clock.
    pub applied_us: u64,
    /// Number of invalidations in it.
    pub invalidations: usize,
    /// Entries removed at once.
    pub dropped: u64,
    /// Whether a cache was flushed by it.
    pub flushed: bool,
    /// Purge ids of the admin purges in it.
    pub purge_ids: Vec<String>,
    /// The entries its tag and prefix purges hid, counted as the sweep removes them: add
    /// [`PendingDrops::count`] to `dropped` for the whole.
    pub pending: PendingDrops,
}

/// How long [`PendingDrops::count`] waits for a sweep before it answers with what was counted.
const SWEEP_PATIENCE: Duration = Duration::from_secs(60);

/// The entries that tag and prefix purges hid at once, still being removed (and counted) by the
/// caches' background sweeps. A sweep covers every purge applied before it began, so the count
/// usually completes within milliseconds (about a second for a million entries).
#[derive(Clone, Default)]
pub struct PendingDrops {
    sweeps: Vec<(Arc<dyn Applier>, u64)>,
}

impl PendingDrops {
    /// Whether there is nothing to wait for (no tag or prefix purge, or no cache to purge).
    pub fn is_empty(&self) -> bool {
        self.sweeps.is_empty()
    }

    /// The number of entries these purges hid, once the sweeps have counted them. Each entry is
    /// counted once, for the first purge that hid it. If a sweep is more than a minute late, the
    /// count so far (and a warning in the log).
    pub async fn count(&self) -> u64 {
        let mut n = 0;
        for (cache, gen) in &self.sweeps {
            n += cache.swept(*gen, SWEEP_PATIENCE).await;
        }
        n
    }
}

impl std::fmt::Debug for PendingDrops {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PendingDrops")
            .field("purges", &self.sweeps.len())
            .finish()
    }
}

/// Another node as seen from its heartbeats and batches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    /// Its node id.
    pub node_id: String,
    /// Its current epoch.
    pub epoch: u64,
    /// Last sequence it says it published.
    pub last_seq: u64,
    /// Last sequence of it applied here.
    pub applied_seq: u64,
    /// Its admin address, if it serves one.
    pub address: String,
    /// Its caches and their sizes.
    pub caches: Vec<(String, u64)>,
    /// When this node last heard from it (µs since the Unix epoch, our clock).
    pub last_seen_us: u64,
    /// Whether it writes a receipt for every batch it applies.
    pub writes_receipts: bool,
}

/// Applies one invalidation to one cache; waits (and boxes a future) only when an entry must be
/// removed. A tag or prefix purge adds its count to `pending`.
async fn apply_to(
    cache: &Arc<dyn Applier>,
    target: &Target,
    version: Option<u64>,
    pending: &mut PendingDrops,
) -> ApplyOutcome {
    match cache.apply_now(target, version) {
        Step::Done(outcome) => outcome,
        Step::RemoveKey => match target {
            Target::Key(key) => cache.finish_key(key, version).await,
            _ => ApplyOutcome::default(),
        },
        Step::Hidden(gen) => {
            pending.sweeps.push((cache.clone(), gen));
            ApplyOutcome::default()
        }
    }
}

/// The object-safe face of a `LocalCache<V>` that the receiver applies invalidations to.
trait Applier: Send + Sync {
    fn apply_now(&self, target: &Target, version: Option<u64>) -> Step;
    fn finish_key<'a>(&'a self, key: &'a str, version: Option<u64>) -> BoxFuture<'a, ApplyOutcome>;
    fn flush(&self, cause: &str) -> ApplyOutcome;
    fn swept(&self, gen: u64, patience: Duration) -> BoxFuture<'_, u64>;
    fn stats(&self) -> CacheStats;
    fn entry_count(&self) -> u64;
    fn as_any(self: Arc<Self>) -> Arc<dyn Any + Send + Sync>;
}

impl<V: Clone + Send + Sync + 'static> Applier for LocalCache<V> {
    fn apply_now(&self, target: &Target, version: Option<u64>) -> Step {
        LocalCache::apply_now(self, target, version)
    }
    fn finish_key<'a>(&'a self, key: &'a str, version: Option<u64>) -> BoxFuture<'a, ApplyOutcome> {
        Box::pin(LocalCache::finish_key(self, key, version))
    }
    fn flush(&self, cause: &str) -> ApplyOutcome {
        LocalCache::flush(self, cause)
    }
    fn swept(&self, gen: u64, patience: Duration) -> BoxFuture<'_, u64> {
        Box::pin(LocalCache::swept(self, gen, patience))
    }
    fn stats(&self) -> CacheStats {
        LocalCache::stats(self)
    }
    fn entry_count(&self) -> u64 {
        LocalCache::entry_count(self)
    }
    fn as_any(self: Arc<Self>) -> Arc<dyn Any + Send + Sync> {
        self
    }
}

struct Outgoing {
    invalidation: Invalidation,
    done: Option<oneshot::Sender<Result<Published, PublishError>>>,
}

/// Builds a [`Bus`].
///
/// ```no_run
/// # async fn f() -> Result<(), invalbus::BuildError> {
/// let bus = invalbus::Bus::builder()
///     .nats("nats://127.0.0.1:4222")
///     .namespace("shop")
///     .node_id("web-1")
///     .build()
///     .await?;
/// # Ok(()) }
/// ```
pub struct BusBuilder {
    nats_url: Option<String>,
    nats_options: Option<async_nats::ConnectOptions>,
    hub: Option<InProcessHub>,
    namespace: String,
    node_id: Option<String>,
    limits: Limits,
    outbound_queue: usize,
    heartbeat_interval: Duration,
    ping_interval: Duration,
    address: String,
    actor: String,
    jetstream: Option<JetStreamConfig>,
    max_staleness: Duration,
    receipts: bool,
}

impl Default for BusBuilder {
    fn default() -> Self {
        BusBuilder {
            nats_url: None,
            nats_options: None,
            hub: None,
            namespace: "default".into(),
            node_id: None,
            limits: Limits::default(),
            outbound_queue: 65_536,
            heartbeat_interval: Duration::from_secs(1),
            ping_interval: Duration::from_millis(500),
            address: String::new(),
            actor: String::new(),
            jetstream: None,
            max_staleness: Duration::from_secs(1),
            receipts: true,
        }
    }
}

fn valid_token(s: &str) -> bool {
    !s.is_empty() && s.len() <= 128 && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

impl BusBuilder {
    /// Connects to NATS at `url` (comma-separated for several servers).
    ///
    /// ```
    /// let b = invalbus::Bus::builder().nats("nats://127.0.0.1:4222");
    /// ```
    pub fn nats(mut self, url: impl Into<String>) -> Self {
        self.nats_url = Some(url.into());
        self
    }

    /// Connection options for NATS: credentials (user and password, token, NKey, credentials
    /// file) and TLS. The bus sets the ping interval, the name and the event callback itself.
    ///
    /// ```
    /// let opts = async_nats::ConnectOptions::with_user_and_password("svc".into(), "secret".into());
    /// let b = invalbus::Bus::builder().nats("nats://127.0.0.1:4222").nats_options(opts);
    /// ```
    pub fn nats_options(mut self, options: async_nats::ConnectOptions) -> Self {
        self.nats_options = Some(options);
        self
    }

    /// Uses an in-process hub instead of NATS (one process, no server).
    ///
    /// ```
    /// let hub = invalbus::InProcessHub::new();
    /// let b = invalbus::Bus::builder().in_process(&hub);
    /// ```
    pub fn in_process(mut self, hub: &InProcessHub) -> Self {
        self.hub = Some(hub.clone());
        self
    }

    /// The namespace: nodes see only invalidations of their own namespace. Letters, digits, `-`
    /// and `_`.
    ///
    /// ```
    /// let b = invalbus::Bus::builder().namespace("tenant_a");
    /// ```
    pub fn namespace(mut self, namespace: impl Into<String>) -> Self {
        self.namespace = namespace.into();
        self
    }

    /// This node's id, unique in the namespace (default: random). Letters, digits, `-` and `_`.
    ///
    /// ```
    /// let b = invalbus::Bus::builder().node_id("web-1");
    /// ```
    pub fn node_id(mut self, node_id: impl Into<String>) -> Self {
        self.node_id = Some(node_id.into());
        self
    }

    /// Size limits for everything that enters the bus.
    ///
    /// ```
    /// let b = invalbus::Bus::builder().limits(invalbus::Limits { max_key_bytes: 256, ..Default::default() });
    /// ```
    pub fn limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }

    /// How many invalidations may wait to be published before calls return
    /// [`InvalidateError::QueueFull`] (default 65,536).
    ///
    /// ```
    /// let b = invalbus::Bus::builder().outbound_queue(1024);
    /// ```
    pub fn outbound_queue(mut self, n: usize) -> Self {
        self.outbound_queue = n.max(1);
        self
    }

    /// How often this node publishes its heartbeat (default 1 s).
    ///
    /// ```
    /// let b = invalbus::Bus::builder().heartbeat_interval(std::time::Duration::from_millis(250));
    /// ```
    pub fn heartbeat_interval(mut self, interval: Duration) -> Self {
        self.heartbeat_interval = interval.max(Duration::from_millis(10));
        self
    }

    /// NATS ping interval (default 500 ms: a silent partition is noticed within about three
    /// intervals; the client's own default of 60 s takes about three minutes).
    ///
    /// ```
    /// let b = invalbus::Bus::builder().ping_interval(std::time::Duration::from_secs(1));
    /// ```
    pub fn ping_interval(mut self, interval: Duration) -> Self {
        self.ping_interval = interval;
        self
    }

    /// The admin address this node announces in its heartbeats.
    ///
    /// ```
    /// let b = invalbus::Bus::builder().address("10.0.0.5:7700");
    /// ```
    pub fn address(mut self, address: impl Into<String>) -> Self {
        self.address = address.into();
        self
    }

    /// Whether this node writes a receipt for every batch it applies (default: yes, on NATS).
    /// Receipts are the audit log's answer to "did every node apply it?", and what a purge
    /// made with `--wait` waits for; with JetStream they go to the stream
    /// `INVALBUS_<ns>_RECEIPTS` (same retention and replicas as the batch stream). A node that
    /// writes none says so in its heartbeats, so nobody waits for its receipts.
    ///
    /// ```
    /// let b = invalbus::Bus::builder().receipts(false);
    /// ```
    pub fn receipts(mut self, on: bool) -> Self {
        self.receipts = on;
        self
    }

    /// The actor recorded on this node's invalidations when a call names none (default: the
    /// node id).
    ///
    /// ```
    /// let b = invalbus::Bus::builder().actor("orders-service");
    /// ```
    pub fn actor(mut self, actor: impl Into<String>) -> Self {
        self.actor = actor.into();
        self
    }

    /// Keeps every batch in a JetStream stream, so that a node that missed some replays them
    /// instead of flushing, and so that tickets resolve on the stream's acknowledgement.
    /// Needs a NATS server with JetStream enabled.
    ///
    /// ```
    /// let b = invalbus::Bus::builder().jetstream(invalbus::JetStreamConfig::default());
    /// ```
    pub fn jetstream(mut self, config: JetStreamConfig) -> Self {
        self.jetstream = Some(config);
        self
    }

    /// How long caches keep serving once this node can no longer vouch for them (its own
    /// heartbeat stopped coming back through NATS), on top of one heartbeat interval (default
    /// 1 s). After that, reads go to the loader until the node has reconnected and repaired.
    ///
    /// ```
    /// let b = invalbus::Bus::builder().max_staleness(std::time::Duration::from_millis(500));
    /// ```
    pub fn max_staleness(mut self, max_staleness: Duration) -> Self {
        self.max_staleness = max_staleness;
        self
    }

    /// Connects, subscribes, and waits until the server confirms the subscription (this node's
    /// first heartbeat comes back), so no invalidation published after `build` returns is missed.
    pub async fn build(self) -> Result<Bus, BuildError> {
        if !valid_token(&self.namespace) {
            return Err(BuildError::Config(format!(
                "namespace {:?}: use 1-128 letters, digits, '-' or '_'",
                self.namespace
            )));
        }
        let node_id = self
            .node_id
            .clone()
            .unwrap_or_else(|| format!("node-{:08x}", rand::random::<u32>()));
        if !valid_token(&node_id) {
            return Err(BuildError::Config(format!(
                "node id {node_id:?}: use 1-128 letters, digits, '-' or '_'"
            )));
        }
        let (event_tx, event_rx) = mpsc::channel::<LinkEvent>(1024);
        let link = match (&self.hub, &self.nats_url) {
            (Some(hub), None) => Link::InProcess(hub.clone()),
            (None, Some(url)) => {
                let tx = event_tx.clone();
                let options = self
                    .nats_options
                    .unwrap_or_default()
                    .name(format!("invalbus:{}:{}", self.namespace, node_id))
                    .ping_interval(self.ping_interval)
                    .connection_timeout(Duration::from_secs(2))
                    .event_callback(move |event| {
                        let tx = tx.clone();
                        async move {
                            let ev = match event {
                                async_nats::Event::Connected => Some(LinkEvent::Connected),
                                async_nats::Event::Disconnected => Some(LinkEvent::Disconnected),
                                async_nats::Event::SlowConsumer(_) => Some(LinkEvent::SlowConsumer),
                                other => {
                                    tracing::debug!(event = %other, "nats event");
                                    None
                                }
                            };
                            if let Some(ev) = ev {
                                // A full channel means the receiver already has events to act on.
                                let _ = tx.try_send(ev);
                            }
                        }
                    });
                // Several servers may be given, comma-separated; the client picks one and fails over.
                let servers: Vec<&str> = url.split(',').map(str::trim).filter(|u| !u.is_empty()).collect();
                let client = options.connect(servers).await.map_err(|e| match e.kind() {
                    async_nats::ConnectErrorKind::AuthorizationViolation
                    | async_nats::ConnectErrorKind::Authentication => BuildError::Refused(format!("{url}: {e}")),
                    _ => BuildError::Connect(format!("{url}: {e}")),
                })?;
                Link::Nats(client)
            }
            (Some(_), Some(_)) => {
                return Err(BuildError::Config(
                    "choose either nats(..) or in_process(..), not both".into(),
                ))
            }
            (None, None) => {
                return Err(BuildError::Config(
                    "no transport: call nats(url) or in_process(&hub)".into(),
                ))
            }
        };
        let subjects = Subjects::new(&self.namespace);
        let durable = match (&link, &self.jetstream) {
            (Link::Nats(client), Some(config)) => {
                let js = jetstream::ContextBuilder::new()
                    .timeout(config.ack_timeout)
                    .build(client.clone());
                let stream =
                    repair::ensure_stream(&js, repair::stream_name(&self.namespace), subjects.all_inv(), config)
                        .await
                        .map_err(|e| BuildError::Config(format!("JetStream stream: {e}")))?;
                if self.receipts {
                    repair::ensure_stream(
                        &js,
                        receipts::receipts_stream(&self.namespace),
                        receipts::all_receipts(&self.namespace),
                        config,
                    )
                    .await
                    .map_err(|e| BuildError::Config(format!("JetStream receipts stream: {e}")))?;
                }
                Some(Durable {
                    js,
                    stream,
                    config: config.clone(),
                })
            }
            (Link::InProcess(_), Some(_)) => {
                return Err(BuildError::Config("JetStream needs a NATS transport".into()));
            }
            (_, None) => None,
        };
        let stream = link
            .subscribe(subjects.all(), 65_536)
            .await
            .map_err(BuildError::Subscribe)?;
        let (out_tx, out_rx) = mpsc::channel(self.outbound_queue);
        let (shutdown_tx, shutdown_rx) = watch::channel(false);
        let epoch = loop {
            let e = rand::random::<u64>();
            if e != 0 {
                break e;
            }
        };
        let actor = if self.actor.is_empty() {
            node_id.clone()
        } else {
            self.actor.clone()
        };
        let started_us = now_us();
        // Receipts need NATS: the in-process hub has no audit log.
        let recorder = match (&link, self.receipts) {
            (Link::Nats(client), true) => {
                let (tx, rx) = mpsc::channel(4096);
                Some((tx, rx, client.clone()))
            }
            _ => None,
        };
        let inner = Arc::new(BusInner {
            node_id,
            namespace: self.namespace,
            epoch,
            actor,
            address: self.address,
            limits: self.limits,
            subjects,
            link,
            durable,
            caches: RwLock::new(HashMap::new()),
            outbox: out_tx,
            outbound_capacity: self.outbound_queue,
            last_seq: AtomicU64::new(0),
            metrics: Arc::new(BusMetrics::default()),
            receipts: recorder.as_ref().map(|(tx, _, _)| tx.clone()),
            applied: broadcast::channel(4096).0,
            origins: Mutex::new(Origins::default()),
            shutdown: shutdown_tx,
            self_heartbeat: watch::channel(0).0,
            health: Health::new(started_us),
            heartbeat_interval: self.heartbeat_interval,
            max_staleness: self.max_staleness,
            started_us,
        });
        let mut tasks = Vec::new();
        let span = tracing::info_span!("bus", node = %inner.node_id, ns = %inner.namespace);
        if let Some((_, rx, client)) = recorder {
            // Subscribed before the receiver starts, so it sees every batch applied.
            let recorder = Recorder {
                namespace: inner.namespace.clone(),
                node_id: inner.node_id.clone(),
                client,
                js: inner.durable.as_ref().map(|d| d.js.clone()),
                metrics: inner.metrics.clone(),
            };
            tasks.push(tokio::spawn(
                recorder
                    .run(inner.applied.subscribe(), rx, shutdown_rx.clone())
                    .instrument(span.clone()),
            ));
        }
        tasks.push(tokio::spawn(
            publisher(inner.clone(), out_rx, shutdown_rx.clone()).instrument(span.clone()),
        ));
        tasks.push(tokio::spawn(
            receiver(inner.clone(), stream, event_rx, shutdown_rx.clone()).instrument(span.clone()),
        ));
        tasks.push(tokio::spawn(
            heartbeats(inner.clone(), shutdown_rx.clone()).instrument(span.clone()),
        ));
        tasks.push(tokio::spawn(watchdog(inner.clone(), shutdown_rx).instrument(span)));
        // The first heartbeat coming back proves the server has our subscription.
        let mut seen = inner.self_heartbeat.subscribe();
        let confirmed = tokio::time::timeout(Duration::from_secs(10), seen.wait_for(|n| *n > 0)).await;
        if !matches!(confirmed, Ok(Ok(_))) {
            let _ = inner.shutdown.send(true);
            return Err(BuildError::Subscribe(
                "own heartbeat did not come back within 10 s".into(),
            ));
        }
        tracing::info!(node = %inner.node_id, ns = %inner.namespace, epoch = inner.epoch, transport = inner.link.kind(), "bus up");
        Ok(Bus {
            inner,
            tasks: Arc::new(Mutex::new(tasks)),
        })
    }
}

struct Durable {
    js: jetstream::Context,
    stream: jetstream::stream::Stream,
    config: JetStreamConfig,
}

struct BusInner {
    node_id: String,
    namespace: String,
    epoch: u64,
    actor: String,
    address: String,
    limits: Limits,
    subjects: Subjects,
    link: Link,
    durable: Option<Durable>,
    caches: RwLock<HashMap<String, Arc<dyn Applier>>>,
    outbox: mpsc::Sender<Outgoing>,
    outbound_capacity: usize,
    last_seq: AtomicU64,
    metrics: Arc<BusMetrics>,
    /// The receipt recorder's queue of this node's own receipts (None: it writes no receipts).
    receipts: Option<mpsc::Sender<Receipt>>,
    applied: broadcast::Sender<Applied>,
    origins: Mutex<Origins>,
    shutdown: watch::Sender<bool>,
    self_heartbeat: watch::Sender<u64>,
    health: Health,
    heartbeat_interval: Duration,
    max_staleness: Duration,
    started_us: u64,
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
    inner: Arc<BusInner>,
    tasks: Arc<Mutex<Vec<JoinHandle<()>>>>,
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
    /// A builder with default settings.
    pub fn builder() -> BusBuilder {
        BusBuilder::default()
    }

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
    pub async fn invalidate(&self, mut invalidation: Invalidation) -> Result<Ticket, InvalidateError> {
        codec::check_invalidation(&invalidation, &self.inner.limits).map_err(InvalidateError::Invalid)?;
        if invalidation.actor.is_empty() {
            invalidation.actor = self.inner.actor.clone();
        }
        let caches = self.inner.targets(invalidation.cache.as_deref());
        if let (Some(name), true) = (&invalidation.cache, caches.is_empty()) {
            // Peers may hold the cache even if this node does not: still publish.
            tracing::debug!(cache = %name, "invalidation of a cache this node does not hold");
        }
        // Applied here before the call returns: a read on this node after it sees the effect.
        let mut local = ApplyOutcome::default();
        let mut pending = PendingDrops::default();
        for c in &caches {
            let out = apply_to(c, &invalidation.target, invalidation.version, &mut pending).await;
            local.dropped += out.dropped;
            local.flushed |= out.flushed;
        }
        self.enqueue(invalidation, local, pending)
    }

    fn enqueue(
        &self,
        invalidation: Invalidation,
        local: ApplyOutcome,
        pending: PendingDrops,
    ) -> Result<Ticket, InvalidateError> {
        let (tx, rx) = oneshot::channel();
        match self.inner.outbox.try_send(Outgoing {
            invalidation,
            done: Some(tx),
        }) {
            Ok(()) => Ok(Ticket { rx, local, pending }),
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.inner.metrics.publish_queue_full.inc();
                tracing::warn!(node = %self.inner.node_id, "outbound queue full: invalidation applied locally, not published");
                Err(InvalidateError::QueueFull(self.inner.outbound_capacity))
            }
            Err(mpsc::error::TrySendError::Closed(_)) => Err(InvalidateError::Closed),
        }
    }

    /// Figures of the bus.
    pub fn stats(&self) -> BusStats {
        let mut stats = self.inner.metrics.snapshot();
        let h = &self.inner.health;
        let since = h.suspect_since_us.load(Ordering::Acquire);
        let open = if since > 0 { now_us().saturating_sub(since) } else { 0 };
        stats.suspect_us = h.suspect_total_us.load(Ordering::Relaxed) + open;
        stats.serving = h.serving();
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

    /// The peers this node has heard from.
    pub fn peers(&self) -> Vec<Peer> {
        let origins = self.inner.origins();
        let mut v: Vec<_> = origins
            .map
            .iter()
            .map(|(id, p)| Peer {
                node_id: id.clone(),
                epoch: p.epoch,
                last_seq: p.announced_seq.max(p.applied_seq),
                applied_seq: p.applied_seq,
                address: p.address.clone(),
                caches: p.caches.clone(),
                last_seen_us: p.last_seen_us,
                writes_receipts: p.writes_receipts,
            })
            .collect();
        v.sort_by(|a, b| a.node_id.cmp(&b.node_id));
        v
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
        self.inner.health.serving()
    }

    /// Switches off the disconnect policy: caches keep serving while the node cannot vouch for
    /// them. Only for tests that show what the policy prevents.
    #[doc(hidden)]
    pub fn disable_staleness_gate_for_tests(&self) {
        self.inner.health.gate_disabled.store(true, Ordering::SeqCst);
    }

    /// The bound on staleness this node promises: a read never returns a value older than an
    /// invalidation NATS accepted more than this long ago (heartbeat interval + max staleness,
    /// plus the watchdog's tick).
    pub fn staleness_bound(&self) -> Duration {
        self.inner.heartbeat_interval + self.inner.max_staleness + WATCHDOG_TICK
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

impl BusInner {
    fn origins(&self) -> std::sync::MutexGuard<'_, Origins> {
        self.origins.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn targets(&self, cache: Option<&str>) -> Vec<Arc<dyn Applier>> {
        let caches = self.caches.read().unwrap_or_else(|e| e.into_inner());
        match cache {
            Some(name) => caches.get(name).cloned().into_iter().collect(),
            None => caches.values().cloned().collect(),
        }
    }

    fn flush_all(&self, cause: &str) {
        for c in self.targets(None) {
            c.flush(cause);
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
        if !self.bus.inner.health.serving() {
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
        if key.len() > self.bus.inner.limits.max_key_bytes || !self.bus.inner.health.serving() {
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
        let mut inv = Invalidation::new(Some(self.name()), target);
        inv.version = version;
        self.bus.invalidate(inv).await
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

/// Batches queued invalidations into messages and publishes them, in order.
///
/// Natural batching: it waits for the first invalidation, then takes whatever else is already
/// queued (up to the size limits) and sends at once. An idle link sends each invalidation
/// alone with no added delay; a busy one sends fewer, larger messages, so a burst of writes
/// does not become a storm of messages.
async fn publisher(inner: Arc<BusInner>, mut rx: mpsc::Receiver<Outgoing>, mut shutdown: watch::Receiver<bool>) {
    let subject = inner.subjects.inv(&inner.node_id);
    let max_items = inner.limits.max_batch_invalidations;
    let max_bytes = inner.limits.max_publish_bytes;
    let mut closing = false;
    loop {
        let first = if closing {
            match rx.try_recv() {
                Ok(x) => x,
                Err(_) => return,
            }
        } else {
            tokio::select! {
                x = rx.recv() => match x { Some(x) => x, None => return },
                _ = shutdown.wait_for(|s| *s) => { closing = true; continue; }
            }
        };
        let mut bytes = codec::encoded_len(&first.invalidation) + 64;
        let mut items = vec![first];
        while items.len() < max_items {
            match rx.try_recv() {
                Ok(next) => {
                    let len = codec::encoded_len(&next.invalidation);
                    if bytes + len > max_bytes {
                        // Keep it for the next batch.
                        publish_batch(&inner, &subject, std::mem::take(&mut items)).await;
                        bytes = 64;
                    }
                    bytes += len;
                    items.push(next);
                }
                Err(_) => break,
            }
        }
        if !items.is_empty() {
            publish_batch(&inner, &subject, items).await;
        }
    }
}

async fn publish_batch(inner: &BusInner, subject: &str, items: Vec<Outgoing>) {
    // The sequence is used up whatever becomes of the publish: a batch that failed may still
    // have reached some peers, and reusing its number would make them skip the next one.
    let seq = inner.last_seq.load(Ordering::SeqCst) + 1;
    let (invalidations, done): (Vec<_>, Vec<_>) = items.into_iter().map(|o| (o.invalidation, o.done)).unzip();
    let n = invalidations.len() as u64;
    let batch = Batch {
        origin: inner.node_id.clone(),
        epoch: inner.epoch,
        seq,
        timestamp_us: now_us(),
        namespace: inner.namespace.clone(),
        invalidations,
    };
    let payload = codec::encode_batch(&batch);
    let result = match &inner.durable {
        None => inner.link.publish(subject.to_owned(), payload).await,
        Some(d) => publish_acked(inner, d, subject, payload, seq).await,
    };
    inner.last_seq.store(seq, Ordering::SeqCst);
    match &result {
        Ok(()) => {
            inner.metrics.batches_published.inc();
            inner.metrics.invalidations_published.add(n);
            tracing::trace!(node = %inner.node_id, seq, n, "batch published");
        }
        Err(e) => {
            inner.metrics.publish_errors.inc();
            tracing::warn!(node = %inner.node_id, seq, n, error = %e, "batch not published; peers will find the gap");
        }
    }
    let result = result.map(|()| Published { seq });
    for d in done.into_iter().flatten() {
        let _ = d.send(result.clone());
    }
}

/// Publishes into the stream and waits for its acknowledgement, sending again (same message id,
/// so the stream keeps one copy) until the publish deadline. An ack that timed out means
/// "unknown", not "lost".
async fn publish_acked(
    inner: &BusInner,
    d: &Durable,
    subject: &str,
    payload: bytes::Bytes,
    seq: u64,
) -> Result<(), PublishError> {
    let id = format!("{}.{}.{}", inner.node_id, inner.epoch, seq);
    let started = tokio::time::Instant::now();
    let mut backoff = Duration::from_millis(50);
    let mut attempt = 0u32;
    loop {
        attempt += 1;
        let publish = jetstream::message::PublishMessage::build()
            .payload(payload.clone())
            .message_id(&id);
        let outcome = match d.js.send_publish(subject.to_owned(), publish).await {
            Ok(ack) => match tokio::time::timeout(d.config.ack_timeout, ack).await {
                Ok(Ok(_)) => return Ok(()),
                Ok(Err(e)) => e.to_string(),
                Err(_) => "ack timed out".to_owned(),
            },
            Err(e) => e.to_string(),
        };
        if started.elapsed() >= d.config.publish_deadline {
            return Err(PublishError::TimedOut(d.config.publish_deadline));
        }
        tracing::debug!(seq, attempt, error = %outcome, "stream publish not acknowledged; retrying");
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(1));
    }
}

/// Publishes this node's heartbeat every interval.
async fn heartbeats(inner: Arc<BusInner>, mut shutdown: watch::Receiver<bool>) {
    let subject = inner.subjects.hb(&inner.node_id);
    let mut tick = tokio::time::interval(inner.heartbeat_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.wait_for(|s| *s) => return,
        }
        let hb = Heartbeat {
            origin: inner.node_id.clone(),
            epoch: inner.epoch,
            last_seq: inner.last_seq.load(Ordering::SeqCst),
            timestamp_us: now_us(),
            address: inner.address.clone(),
            namespace: inner.namespace.clone(),
            caches: inner
                .caches
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .iter()
                .map(|(n, c)| (n.clone(), c.entry_count()))
                .collect(),
            writes_receipts: inner.receipts.is_some(),
        };
        if let Err(e) = inner.link.publish(subject.clone(), codec::encode_heartbeat(&hb)).await {
            tracing::debug!(error = %e, "heartbeat not published");
        }
    }
}

/// How often the watchdog re-checks whether caches may serve.
const WATCHDOG_TICK: Duration = Duration::from_millis(10);

/// Keeps `Health::serving` current: caches serve only while this node's own heartbeat keeps
/// coming back and no repair is running.
async fn watchdog(inner: Arc<BusInner>, mut shutdown: watch::Receiver<bool>) {
    let window = inner.heartbeat_interval + inner.max_staleness;
    let mut tick = tokio::time::interval(WATCHDOG_TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.wait_for(|s| *s) => return,
        }
        match inner.health.update(now_us(), window) {
            Some(false) => {
                tracing::warn!(node = %inner.node_id, "caches stop serving: this node cannot vouch for them")
            }
            Some(true) => tracing::info!(node = %inner.node_id, "caches serve again"),
            None => {}
        }
    }
}

/// Receives the namespace's messages and applies peers' batches, in order per origin, repairing
/// whatever it finds missing before it applies anything later.
async fn receiver(
    inner: Arc<BusInner>,
    mut stream: futures::stream::BoxStream<'static, Result<crate::transport::Received, LinkEvent>>,
    mut events: mpsc::Receiver<LinkEvent>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut disconnected_since: Option<u64> = None;
    // Events taken out of the channel while folding slow-consumer events, still to handle.
    let mut deferred: std::collections::VecDeque<LinkEvent> = std::collections::VecDeque::new();
    loop {
        let item = match deferred.pop_front() {
            Some(ev) => Err(ev),
            None => tokio::select! {
                m = stream.next() => match m { Some(m) => m, None => return },
                Some(ev) = events.recv() => Err(ev),
                _ = shutdown.wait_for(|s| *s) => return,
            },
        };
        match item {
            Ok(msg) => on_message(&inner, &msg.subject, &msg.payload).await,
            Err(LinkEvent::SlowConsumer) => {
                // async-nats raises one event per dropped message, so a burst of drops queues
                // hundreds. One repair covers every drop before it starts: fold the queued
                // slow-consumer events into this one (keeping the other events, in order), or
                // the node would repair once per dropped message and not serve for that long.
                while let Ok(ev) = events.try_recv() {
                    if ev != LinkEvent::SlowConsumer {
                        deferred.push_back(ev);
                    }
                }
                inner.metrics.gaps.inc();
                tracing::warn!(node = %inner.node_id, "slow consumer: messages were dropped");
                let since = inner
                    .health
                    .last_vouched_us
                    .load(Ordering::Acquire)
                    .saturating_sub(micros(inner.heartbeat_interval));
                repair_all(&inner, since, "slow consumer").await;
            }
            Err(LinkEvent::Disconnected) => {
                tracing::warn!(node = %inner.node_id, "disconnected from NATS");
                disconnected_since.get_or_insert(inner.health.last_vouched_us.load(Ordering::Acquire));
            }
            Err(LinkEvent::Connected) => {
                if let Some(since) = disconnected_since.take() {
                    tracing::warn!(node = %inner.node_id, "reconnected to NATS; repairing what was missed");
                    inner.metrics.gaps.inc();
                    repair_all(&inner, since, "reconnect").await;
                }
            }
        }
    }
}

fn micros(d: Duration) -> u64 {
    d.as_micros() as u64
}

fn count_refusal(inner: &BusInner, origin: &str, e: &DecodeError) {
    let m = &inner.metrics;
    match e {
        DecodeError::Oversized { .. } => m.oversized.inc(),
        DecodeError::Malformed(_) => m.malformed.inc(),
        DecodeError::Invalid(_) => m.invalid.inc(),
        DecodeError::Foreign(_) => m.foreign.inc(),
    }
    tracing::warn!(node = %inner.node_id, origin, kind = e.kind(), error = %e, "message dropped");
}

async fn on_message(inner: &BusInner, subject: &str, payload: &[u8]) {
    let Some((kind, origin)) = inner.subjects.parse(subject) else {
        inner.metrics.invalid.inc();
        tracing::warn!(node = %inner.node_id, subject, "message on an unknown subject dropped");
        return;
    };
    match kind {
        "inv" => {
            if origin == inner.node_id {
                inner.metrics.echoes_skipped.inc();
                return;
            }
            match codec::decode_batch(payload, &inner.namespace, &inner.limits) {
                Ok(batch) if batch.origin != origin => {
                    let e = DecodeError::Invalid(format!(
                        "origin {:?} published on the subject of {origin:?}",
                        batch.origin
                    ));
                    count_refusal(inner, origin, &e);
                }
                Ok(batch) => on_batch(inner, batch).await,
                Err(e) => count_refusal(inner, origin, &e),
            }
        }
        "hb" => match codec::decode_heartbeat(payload, &inner.namespace, &inner.limits) {
            Ok(hb) if hb.origin == inner.node_id => {
                if hb.epoch == inner.epoch {
                    on_own_heartbeat(inner, hb.timestamp_us).await;
                }
            }
            Ok(hb) if hb.origin != origin => {
                let e = DecodeError::Invalid(format!("heartbeat of {:?} on the subject of {origin:?}", hb.origin));
                count_refusal(inner, origin, &e);
            }
            Ok(hb) => on_heartbeat(inner, hb).await,
            Err(e) => count_refusal(inner, origin, &e),
        },
        _ => {
            inner.metrics.invalid.inc();
            tracing::warn!(node = %inner.node_id, subject, "message on an unknown subject dropped");
        }
    }
}

/// Our own heartbeat came back: NATS delivered everything sent to us before it, up to the
/// moment it was *sent* (its timestamp, by our own clock), which is what vouches for the caches;
/// a link that delivers late therefore vouches late. After a lapse in arrivals (the link was cut,
/// even silently), repair what may have been missed before serving again.
async fn on_own_heartbeat(inner: &BusInner, sent_us: u64) {
    let now = now_us();
    let window = micros(inner.heartbeat_interval + inner.max_staleness);
    let prev_arrival = inner.health.last_arrival_us.swap(now, Ordering::AcqRel);
    let vouched = sent_us.min(now);
    if now.saturating_sub(prev_arrival) > window && inner.self_heartbeat.borrow().to_owned() > 0 {
        let since = inner.health.last_vouched_us.load(Ordering::Acquire);
        inner.health.repairing.store(true, Ordering::SeqCst);
        inner.health.last_vouched_us.fetch_max(vouched, Ordering::AcqRel);
        tracing::warn!(node = %inner.node_id, lapse_ms = (now - prev_arrival) / 1000, "own heartbeat back after a lapse; repairing");
        repair_all(
            inner,
            since.saturating_sub(micros(inner.heartbeat_interval)),
            "heartbeat lapse",
        )
        .await;
    } else {
        inner.health.last_vouched_us.fetch_max(vouched, Ordering::AcqRel);
    }
    inner.self_heartbeat.send_modify(|n| *n += 1);
}

async fn on_heartbeat(inner: &BusInner, hb: Heartbeat) {
    inner.metrics.heartbeats_received.inc();
    let now = now_us();
    let action = {
        let mut origins = inner.origins();
        let known = origins.map.get(&hb.origin).cloned();
        let action = match known {
            None => {
                let o = origins.map.entry(hb.origin.clone()).or_default();
                o.epoch = hb.epoch;
                o.applied_seq = hb.last_seq;
                (hb.last_seq > 0).then_some(Admit::FirstContact)
            }
            Some(o) if o.epoch == hb.epoch => (hb.last_seq > o.applied_seq).then_some(Admit::Gap {
                from: o.applied_seq + 1,
                to: hb.last_seq,
            }),
            Some(o) if o.retired.contains(&hb.epoch) => None,
            Some(_) if hb.last_seq == 0 => {
                // A restart that has not published yet: reset tracking, nothing to repair.
                origins.applied(&hb.origin, hb.epoch, 0, 0, now);
                None
            }
            Some(_) => Some(Admit::Gap {
                from: 1,
                to: hb.last_seq,
            }),
        };
        if let Some(o) = origins.map.get_mut(&hb.origin) {
            o.announced_seq = hb.last_seq;
            o.address = hb.address.clone();
            o.caches = hb.caches.clone();
            o.writes_receipts = hb.writes_receipts;
            o.last_seen_us = now;
        }
        action
    };
    match action {
        Some(Admit::Gap { from, to }) => {
            inner.metrics.gaps.inc();
            tracing::warn!(node = %inner.node_id, origin = %hb.origin, from, to, "heartbeat shows batches never received");
            repair_origin(inner, &hb.origin, hb.epoch, to, "tail loss").await;
        }
        Some(Admit::FirstContact) => catch_up(inner, &hb.origin, hb.epoch, hb.last_seq).await,
        _ => {}
    }
}

/// What to do with `batch`, given what was applied of its origin.
fn admission(inner: &BusInner, batch: &Batch) -> Admit {
    inner.origins().admit(&batch.origin, batch.epoch, batch.seq)
}

/// A batch from a peer's live stream: apply it in sequence, repairing first what it shows missing.
async fn on_batch(inner: &BusInner, batch: Batch) {
    let admit = admission(inner, &batch);
    match admit {
        Admit::Duplicate => {
            inner.metrics.duplicates.inc();
            tracing::debug!(origin = %batch.origin, seq = batch.seq, "duplicate batch ignored");
            return;
        }
        Admit::Gap { from, to } => {
            inner.metrics.gaps.inc();
            tracing::warn!(node = %inner.node_id, origin = %batch.origin, from, to, "gap in the origin's sequence");
            repair_origin(inner, &batch.origin, batch.epoch, to, "gap").await;
            // Repaired or flushed: in either case continue from this batch.
            if admission(inner, &batch) == Admit::Duplicate {
                return;
            }
        }
        Admit::FirstContact => catch_up(inner, &batch.origin, batch.epoch, batch.seq - 1).await,
        Admit::Apply => {}
    }
    apply_batch(inner, batch, false).await;
}

/// Applies a batch to the caches, records it in the origin's tracking, and announces it.
async fn apply_batch(inner: &BusInner, batch: Batch, replayed: bool) {
    let span = tracing::debug_span!("apply", node = %inner.node_id, origin = %batch.origin, epoch = batch.epoch, seq = batch.seq, replayed);
    async {
        let mut dropped = 0;
        let mut flushed = false;
        let mut pending = PendingDrops::default();
        let mut purge_ids = Vec::new();
        // Batches usually name one cache throughout: look it up once per run of the same name.
        let mut resolved_for: Option<Option<&str>> = None;
        let mut caches: Vec<Arc<dyn Applier>> = Vec::new();
        for inv in &batch.invalidations {
            let name = inv.cache.as_deref();
            if resolved_for != Some(name) {
                caches = inner.targets(name);
                resolved_for = Some(name);
            }
            if caches.is_empty() && name.is_some() {
                inner.metrics.unknown_cache.inc();
            }
            for c in &caches {
                let out = apply_to(c, &inv.target, inv.version, &mut pending).await;
                dropped += out.dropped;
                flushed |= out.flushed;
            }
            if !inv.purge_id.is_empty() {
                purge_ids.push(inv.purge_id.clone());
            }
        }
        let applied_us = now_us();
        inner
            .origins()
            .applied(&batch.origin, batch.epoch, batch.seq, batch.timestamp_us, applied_us);
        inner.metrics.batches_received.inc();
        inner
            .metrics
            .invalidations_received
            .add(batch.invalidations.len() as u64);
        if replayed {
            inner.metrics.replayed.inc();
        } else {
            inner
                .metrics
                .propagation
                .record(applied_us.saturating_sub(batch.timestamp_us));
        }
        let _ = inner.applied.send(Applied {
            origin: batch.origin,
            epoch: batch.epoch,
            seq: batch.seq,
            published_us: batch.timestamp_us,
            applied_us,
            invalidations: batch.invalidations.len(),
            dropped,
            flushed,
            purge_ids,
            pending,
        });
    }
    .instrument(span)
    .await
}

/// Marks the node as repairing (reads bypass the caches) for the life of the guard.
struct Repairing<'a>(&'a BusInner);

impl<'a> Repairing<'a> {
    fn start(inner: &'a BusInner) -> Self {
        inner.health.repairing.store(true, Ordering::SeqCst);
        inner
            .health
            .update(now_us(), inner.heartbeat_interval + inner.max_staleness);
        inner.metrics.repairs.inc();
        Repairing(inner)
    }
}

impl Drop for Repairing<'_> {
    fn drop(&mut self) {
        self.0.health.repairing.store(false, Ordering::SeqCst);
    }
}

fn flush_for(inner: &BusInner, cause: &str) {
    inner.metrics.repair_flushes.inc();
    tracing::warn!(node = %inner.node_id, cause, "flushing every cache: what was missed cannot be replayed");
    inner.flush_all(cause);
}

async fn read_stream(inner: &BusInner, filter: String, since_us: u64) -> Result<Vec<Batch>, ReplayError> {
    let Some(d) = &inner.durable else {
        return Err(ReplayError::NoStream);
    };
    let since = since_us.saturating_sub(micros(d.config.replay_margin));
    let mut batches = Vec::new();
    repair::replay(
        &d.stream,
        filter,
        since,
        d.config.replay_timeout,
        &inner.namespace,
        &inner.limits,
        |b| {
            batches.push(b);
            true
        },
    )
    .await?;
    Ok(batches)
}

/// Replays the missing batches of one origin, up to `to` in `epoch`, or flushes.
async fn repair_origin(inner: &BusInner, origin: &str, epoch: u64, to: u64, cause: &str) {
    let _repairing = Repairing::start(inner);
    let since = {
        let origins = inner.origins();
        origins
            .map
            .get(origin)
            .map(|o| {
                if o.epoch == epoch {
                    o.applied_us.min(o.last_seen_us)
                } else {
                    o.last_seen_us
                }
            })
            .filter(|t| *t > 0)
            .unwrap_or(inner.started_us)
    };
    match read_stream(inner, inner.subjects.inv(origin), since).await {
        Ok(batches) => {
            for b in batches {
                if b.origin != origin || b.epoch != epoch || b.seq > to {
                    continue;
                }
                let admit = admission(inner, &b);
                if admit == Admit::Apply {
                    apply_batch(inner, b, true).await;
                }
            }
            let reached = inner
                .origins()
                .map
                .get(origin)
                .is_some_and(|o| o.epoch == epoch && o.applied_seq >= to);
            if reached {
                tracing::info!(node = %inner.node_id, origin, to, cause, "repaired from the stream");
            } else {
                flush_for(
                    inner,
                    &format!("{cause}: batches of {origin} up to {to} are no longer in the stream"),
                );
                inner.origins().applied(origin, epoch, to, 0, now_us());
            }
        }
        Err(e) => {
            flush_for(inner, &format!("{cause}: replay failed: {e}"));
            inner.origins().applied(origin, epoch, to, 0, now_us());
        }
    }
}

/// First contact with an origin (or an epoch) at sequence `upto + 1`: apply whatever of its
/// earlier batches the stream holds since this node started, since some may have been published
/// after this node subscribed and lost. Earlier ones predate this node's caches.
async fn catch_up(inner: &BusInner, origin: &str, epoch: u64, upto: u64) {
    if inner.durable.is_some() {
        let _repairing = Repairing::start(inner);
        match read_stream(inner, inner.subjects.inv(origin), inner.started_us).await {
            Ok(batches) => {
                for b in batches {
                    if b.origin == origin && b.epoch == epoch && b.seq <= upto {
                        let admit = admission(inner, &b);
                        if admit != Admit::Duplicate {
                            apply_batch(inner, b, true).await;
                        }
                    }
                }
            }
            Err(e) => flush_for(inner, &format!("first contact with {origin}: replay failed: {e}")),
        }
    }
    let mut origins = inner.origins();
    let o = origins.map.entry(origin.to_owned()).or_default();
    if o.epoch == epoch && o.applied_seq >= upto {
        return;
    }
    origins.applied(origin, epoch, upto, 0, now_us());
}

/// Replays every origin's batches since `since_us`, or flushes when that is not possible.
async fn repair_all(inner: &BusInner, since_us: u64, cause: &str) {
    let _repairing = Repairing::start(inner);
    match read_stream(inner, inner.subjects.all_inv(), since_us).await {
        Ok(batches) => {
            let mut clipped = false;
            for b in batches {
                if b.origin == inner.node_id {
                    continue;
                }
                let admit = admission(inner, &b);
                match admit {
                    Admit::Duplicate => continue,
                    Admit::Apply | Admit::FirstContact => {}
                    Admit::Gap { .. } => clipped = true,
                }
                apply_batch(inner, b, true).await;
            }
            let behind = inner.origins().map.iter().any(|(_, o)| o.announced_seq > o.applied_seq);
            if clipped || behind {
                flush_for(inner, &format!("{cause}: the stream no longer holds everything missed"));
            } else {
                tracing::info!(node = %inner.node_id, cause, "repaired from the stream");
            }
        }
        Err(e) => flush_for(inner, &format!("{cause}: {e}")),
    }
}
