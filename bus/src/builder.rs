//! Building a bus: its settings, the connection, the streams, the tasks, and the wait for its
//! first evidence.

use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use async_nats::jetstream;
use tokio::sync::{broadcast, mpsc, watch};
use tracing::Instrument;

use crate::bus::{BuildError, Bus};
use crate::config::{JetStreamConfig, Limits};
use crate::gate::{Gate, Monotonic};
use crate::identity::{Identity, Trust, TrustPolicy};
use crate::metrics::BusMetrics;
use crate::origins::Origins;
use crate::peers::Peers;
use crate::publisher::{heartbeats, publisher};
use crate::receipts::{self, Recorder};
use crate::receiver::{receiver, watchdog};
use crate::state::{Beats, BusInner, Durable, Faults, VerifiedCache};
use crate::stream::{self, Ownership, SetupError, StreamSpec};
use crate::transport::{InProcessHub, Link, LinkEvent, Subjects};

impl Bus {
    /// A builder with default settings.
    pub fn builder() -> BusBuilder {
        BusBuilder::default()
    }
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
    manage_streams: bool,
    startup_timeout: Duration,
    peer_expiry: Duration,
    max_peers: usize,
    echo_evidence: bool,
    identity: Option<Identity>,
    trust: TrustPolicy,
    take_over: bool,
    unsigned: bool,
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
            manage_streams: false,
            startup_timeout: Duration::from_secs(30),
            peer_expiry: Duration::from_secs(30),
            max_peers: 4096,
            echo_evidence: false,
            identity: None,
            trust: TrustPolicy::default(),
            take_over: false,
            unsigned: false,
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

    /// How many calls' invalidations may wait to be published before calls return
    /// [`InvalidateError::QueueFull`] (default 65,536; a bulk call takes one place per batch it
    /// fills, see [`crate::Bus::invalidate_many`]).
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

    /// Keeps every batch in a JetStream stream: tickets resolve on the stream's
    /// acknowledgement, every node follows the stream (so it applies whatever NATS did not
    /// deliver to it directly), and a node serves only on evidence from the stream (see the
    /// crate docs). Needs a NATS server with JetStream enabled.
    ///
    /// The streams are created with these settings if they do not exist; an existing stream is
    /// never changed unless [`BusBuilder::manage_streams`] is set.
    ///
    /// ```
    /// let b = invalbus::Bus::builder().jetstream(invalbus::JetStreamConfig::default());
    /// ```
    pub fn jetstream(mut self, config: JetStreamConfig) -> Self {
        self.jetstream = Some(config);
        self
    }

    /// How long caches keep serving without fresh evidence, on top of one heartbeat interval
    /// (default 1 s): the staleness bound is their sum ([`Bus::staleness_bound`]). After that,
    /// reads go to the loader until evidence comes again.
    ///
    /// ```
    /// let b = invalbus::Bus::builder().max_staleness(std::time::Duration::from_millis(500));
    /// ```
    pub fn max_staleness(mut self, max_staleness: Duration) -> Self {
        self.max_staleness = max_staleness;
        self
    }

    /// Lets this bus bring existing streams to its settings (retention, replicas, subjects),
    /// instead of only creating missing ones. Nodes do this; a service replica should not (its
    /// defaults would overrule the retention the operators chose), so the default is off.
    ///
    /// ```
    /// let b = invalbus::Bus::builder().manage_streams(true);
    /// ```
    pub fn manage_streams(mut self, on: bool) -> Self {
        self.manage_streams = on;
        self
    }

    /// How long [`BusBuilder::build`] waits for NATS, the streams and the first evidence before
    /// it gives up with [`BuildError::Unavailable`] (default 30 s).
    ///
    /// ```
    /// let b = invalbus::Bus::builder().startup_timeout(std::time::Duration::from_secs(5));
    /// ```
    pub fn startup_timeout(mut self, timeout: Duration) -> Self {
        self.startup_timeout = timeout;
        self
    }

    /// How long a silent peer stays in the peer table (default 30 s), and how many peers it
    /// holds at most (default 4,096).
    ///
    /// ```
    /// let b = invalbus::Bus::builder().peer_table(std::time::Duration::from_secs(10), 100);
    /// ```
    pub fn peer_table(mut self, expiry: Duration, max_peers: usize) -> Self {
        self.peer_expiry = expiry;
        self.max_peers = max_peers.max(1);
        self
    }

    /// The key this bus signs its batches, heartbeats and receipts with (default: a new random
    /// key per process; peers then know this node by it, see [`TrustPolicy`]). Give a key that
    /// lasts ([`Identity::load_or_create`]) to a node that keeps its node id across restarts.
    ///
    /// ```
    /// let b = invalbus::Bus::builder().identity(invalbus::Identity::generate());
    /// ```
    pub fn identity(mut self, identity: Identity) -> Self {
        self.identity = Some(identity);
        self
    }

    /// Which signers this bus accepts messages from (default:
    /// [`TrustPolicy::PinOnFirstUse`], for development). Every node of a namespace should have
    /// the same policy.
    ///
    /// ```
    /// let me = invalbus::Identity::generate();
    /// let policy = invalbus::TrustPolicy::Keys(vec![invalbus::TrustedKey {
    ///     key: me.public_key().to_owned(),
    ///     scopes: invalbus::Scopes::ALL,
    ///     origins: vec!["web-1".into()],
    /// }]);
    /// let b = invalbus::Bus::builder().identity(me).trust(policy);
    /// ```
    pub fn trust(mut self, policy: TrustPolicy) -> Self {
        self.trust = policy;
        self
    }

    /// Starts even if another live process uses this node id (by default the bus refuses to
    /// start, with [`BuildError::Config`], when it hears one while starting). Both report the
    /// duplicate loudly for as long as it lasts.
    ///
    /// ```
    /// let b = invalbus::Bus::builder().take_over(true);
    /// ```
    pub fn take_over(mut self, on: bool) -> Self {
        self.take_over = on;
        self
    }

    /// Signs nothing and checks no signature: every bus of the namespace must be built so, and
    /// anyone who can publish on it can then invalidate, replay and forge. Only for the
    /// benchmark that measures what signing costs.
    #[doc(hidden)]
    pub fn unsigned_for_benchmarks(mut self) -> Self {
        self.unsigned = true;
        self
    }

    /// With JetStream, takes the evidence from this node's own heartbeat coming back through
    /// NATS (as without a stream) and does not follow the stream: the gate as it was before the
    /// stream gave evidence. Only for tests that show what the stream's evidence prevents.
    #[doc(hidden)]
    pub fn evidence_from_own_echo_for_tests(mut self) -> Self {
        self.echo_evidence = true;
        self
    }

    /// Connects, subscribes, sets up the streams, starts the tasks, and waits for the first
    /// evidence that the caches may serve (this node's heartbeat back through the stream, or
    /// without one through NATS): from then on no invalidation published is missed.
    ///
    /// NATS or JetStream that is not ready (a server starting, a stream leader being elected)
    /// is retried with backoff until [`BusBuilder::startup_timeout`], then reported as
    /// [`BuildError::Unavailable`]; a setting that cannot work is [`BuildError::Config`] at once.
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
        let deadline = tokio::time::Instant::now() + self.startup_timeout;
        let (event_tx, event_rx) = mpsc::channel::<LinkEvent>(1024);
        let link = match (&self.hub, &self.nats_url) {
            (Some(hub), None) => Link::InProcess(hub.clone()),
            (None, Some(url)) => Link::Nats(
                connect(
                    url,
                    self.nats_options,
                    &self.namespace,
                    &node_id,
                    self.ping_interval,
                    event_tx,
                )
                .await?,
            ),
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
        // The live path first: nothing published from now on is missed on it.
        let live = link
            .subscribe(subjects.all(), 65_536)
            .await
            .map_err(BuildError::Subscribe)?;
        let ownership = if self.manage_streams {
            Ownership::Manage
        } else {
            Ownership::CreateOnly
        };
        let (durable, follower, trimmed) = match (&link, &self.jetstream) {
            (Link::Nats(client), Some(config)) => {
                let js = jetstream::ContextBuilder::new()
                    .timeout(config.ack_timeout)
                    .build(client.clone());
                let spec = StreamSpec {
                    name: stream::stream_name(&self.namespace),
                    subjects: vec![subjects.all_inv(), subjects.all_hb()],
                    rollup: false,
                    config,
                };
                let s = stream::ensure_patiently(&js, &spec, ownership, deadline)
                    .await
                    .map_err(setup_error)?;
                if self.receipts {
                    let spec = StreamSpec {
                        name: receipts::receipts_stream(&self.namespace),
                        subjects: vec![receipts::all_receipts(&self.namespace)],
                        rollup: false,
                        config,
                    };
                    stream::ensure_patiently(&js, &spec, ownership, deadline)
                        .await
                        .map_err(setup_error)?;
                }
                let follower = if self.echo_evidence {
                    None
                } else {
                    Some(
                        follow_patiently(&s, subjects.all_inv(), deadline)
                            .await
                            .map_err(setup_error)?,
                    )
                };
                (
                    Some(Durable {
                        js,
                        config: config.clone(),
                    }),
                    follower,
                    // The nodes that manage the stream keep its heartbeats trimmed.
                    (ownership == Ownership::Manage).then_some(s),
                )
            }
            (Link::InProcess(_), Some(_)) => {
                return Err(BuildError::Config("JetStream needs a NATS transport".into()));
            }
            (_, None) => (None, None, None),
        };
        let (out_tx, out_rx) = mpsc::channel(self.outbound_queue);
        let (shutdown_tx, shutdown_rx) = watch::channel(false);
        let epoch = loop {
            let e = rand::random::<u64>();
            if e != 0 {
                break e;
            }
        };
        let actor: Arc<str> = Arc::from(if self.actor.is_empty() {
            node_id.as_str()
        } else {
            self.actor.as_str()
        });
        // Receipts need NATS: the in-process hub has no audit log.
        let recorder = match (&link, self.receipts) {
            (Link::Nats(client), true) => {
                let (tx, rx) = mpsc::channel(4096);
                Some((tx, rx, client.clone()))
            }
            _ => None,
        };
        let window = self.heartbeat_interval + self.max_staleness;
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
            follows_stream: follower.is_some(),
            caches: RwLock::new(HashMap::new()),
            outbox: out_tx,
            outbound_capacity: self.outbound_queue,
            last_seq: AtomicU64::new(0),
            metrics: Arc::new(BusMetrics::default()),
            receipts: recorder.as_ref().map(|(tx, _, _)| tx.clone()),
            applied: broadcast::channel(4096).0,
            events: broadcast::channel(65_536).0,
            origins: Mutex::new(Origins::default()),
            peers: Mutex::new(Peers::new(self.peer_expiry, self.max_peers)),
            beats: Mutex::new(Beats::default()),
            shutdown: shutdown_tx,
            gate: Gate::new(Monotonic::new(), window),
            heartbeat_interval: self.heartbeat_interval,
            max_staleness: self.max_staleness,
            faults: Faults::default(),
            identity: self.identity.clone().unwrap_or_else(Identity::generate),
            // An origin keeps its key while heard within two heartbeat intervals.
            trust: Trust::new(self.trust.clone(), self.heartbeat_interval * 2),
            verified: Mutex::new(VerifiedCache::default()),
            contested_seen: Mutex::new(VerifiedCache::default()),
            duplicate_seen_ns: AtomicU64::new(0),
            unsigned: self.unsigned,
            superseded: trimmed.is_some().then(|| Arc::new(Mutex::default())),
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
                identity: inner.identity.clone(),
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
        // Where the follower starts: the heartbeats stored before it are the trim's backlog.
        let followed_from = follower.as_ref().map_or(0, |f| f.next);
        tasks.push(tokio::spawn(
            receiver(inner.clone(), live, follower, event_rx, shutdown_rx.clone()).instrument(span.clone()),
        ));
        tasks.push(tokio::spawn(
            heartbeats(inner.clone(), shutdown_rx.clone()).instrument(span.clone()),
        ));
        if let (Some(stream), Some(superseded)) = (trimmed, inner.superseded.clone()) {
            tasks.push(tokio::spawn(
                stream::trim_heartbeats(
                    superseded,
                    inner.subjects.clone(),
                    stream,
                    followed_from,
                    inner.heartbeat_interval * stream::TRIM_EVERY_BEATS,
                    shutdown_rx.clone(),
                )
                .instrument(span.clone()),
            ));
        }
        tasks.push(tokio::spawn(watchdog(inner.clone(), shutdown_rx).instrument(span)));
        let bus = Bus {
            inner,
            tasks: Arc::new(Mutex::new(tasks)),
        };
        // The first evidence: this node's heartbeat came back (through the stream, behind
        // everything it stored before; without one, through NATS, which proves the
        // subscription is in place). And two heartbeat intervals, to hear another live process
        // using this node id, if there is one (a live node heartbeats within that time); it also
        // lets the peers' pin of this name to a previous process's key lapse.
        // (In one process, on an in-process hub, there is no one else to hear.)
        let watch_until = match &bus.inner.link {
            Link::InProcess(_) => tokio::time::Instant::now(),
            Link::Nats(_) => tokio::time::Instant::now() + self.heartbeat_interval * 2,
        };
        loop {
            let duplicate = bus.inner.duplicate_seen_ns.load(std::sync::atomic::Ordering::Acquire) != 0;
            if duplicate && !self.take_over {
                bus.shutdown().await;
                return Err(BuildError::Config(format!(
                    "node id {:?} is in use by another live process in namespace {:?}; give this one \
                     another node id, or stop the other (or start with take_over)",
                    bus.inner.node_id, bus.inner.namespace
                )));
            }
            if bus.inner.gate.serving() && tokio::time::Instant::now() >= watch_until {
                break;
            }
            if tokio::time::Instant::now() >= deadline {
                bus.shutdown().await;
                return Err(BuildError::Unavailable(format!(
                    "this node's heartbeat did not come back {} within {:?}",
                    if bus.inner.follows_stream {
                        "through the stream"
                    } else {
                        "through NATS"
                    },
                    self.startup_timeout
                )));
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        if !bus.inner.trust.lists(bus.inner.identity.public_key()) {
            tracing::warn!(node = %bus.inner.node_id, key = %bus.inner.identity.public_key(),
                "this bus's key is not in its trust policy: peers with the same policy refuse its batches, heartbeats and receipts");
        }
        tracing::info!(node = %bus.inner.node_id, ns = %bus.inner.namespace, epoch = bus.inner.epoch, transport = bus.inner.link.kind(), jetstream = bus.inner.durable.is_some(), key = %bus.inner.identity.public_key(), "bus up");
        Ok(bus)
    }
}

fn setup_error(e: SetupError) -> BuildError {
    match e {
        SetupError::Unavailable(why) => BuildError::Unavailable(why),
        SetupError::Config(why) => BuildError::Config(why),
    }
}

/// Starts following the stream, retrying while JetStream is not ready.
async fn follow_patiently(
    s: &jetstream::stream::Stream,
    batches: String,
    deadline: tokio::time::Instant,
) -> Result<stream::Follower, SetupError> {
    let mut backoff = Duration::from_millis(100);
    loop {
        match stream::Follower::start(s, batches.clone()).await {
            Ok(f) => return Ok(f),
            Err(SetupError::Unavailable(why)) if tokio::time::Instant::now() + backoff < deadline => {
                tracing::warn!(error = %why, retry_in_ms = backoff.as_millis() as u64, "cannot follow the stream yet; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
            Err(e) => return Err(e),
        }
    }
}

/// Connects to NATS with the bus's ping interval and event callback.
async fn connect(
    url: &str,
    options: Option<async_nats::ConnectOptions>,
    namespace: &str,
    node_id: &str,
    ping_interval: Duration,
    events: mpsc::Sender<LinkEvent>,
) -> Result<async_nats::Client, BuildError> {
    let options = options
        .unwrap_or_default()
        .name(format!("invalbus:{namespace}:{node_id}"))
        .ping_interval(ping_interval)
        .connection_timeout(Duration::from_secs(2))
        .event_callback(move |event| {
            let tx = events.clone();
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
    options.connect(servers).await.map_err(|e| match e.kind() {
        // Credentials or certificates the server will not take: retrying will not help.
        async_nats::ConnectErrorKind::AuthorizationViolation
        | async_nats::ConnectErrorKind::Authentication
        | async_nats::ConnectErrorKind::Tls => BuildError::Refused(format!("{url}: {e}")),
        async_nats::ConnectErrorKind::ServerParse => BuildError::Config(format!("{url}: {e}")),
        _ if tls_refused(&e) => BuildError::Refused(format!("{url}: {e}")),
        _ => BuildError::Connect(format!("{url}: {e}")),
    })
}

/// Whether the TLS handshake failed on something retrying will not change (a certificate the
/// server rejects or that does not verify), which async-nats reports as an I/O error.
fn tls_refused(e: &async_nats::ConnectError) -> bool {
    use async_nats::rustls;
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(s) = source {
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            if let Some(tls) = io.get_ref().and_then(|inner| inner.downcast_ref::<rustls::Error>()) {
                return matches!(
                    tls,
                    rustls::Error::AlertReceived(_)
                        | rustls::Error::InvalidCertificate(_)
                        | rustls::Error::NoCertificatesPresented
                );
            }
        }
        source = s.source();
    }
    false
}
