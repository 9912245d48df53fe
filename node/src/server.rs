//! Runs a node: joins the bus (which writes its receipts), serves gRPC (admin, sidecar, health,
//! reflection) and Prometheus metrics, and shuts all of it down in order.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use invalbus::{Bus, CacheConfig};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tonic::transport::{Identity, Server, ServerTlsConfig};

use crate::admin::AdminService;
use crate::audit::Audit;
use crate::auth::Auth;
use crate::config::NodeConfig;
use crate::pb::admin::admin_server::AdminServer;
use crate::pb::cache::cache_server::CacheServer;
use crate::sidecar::SidecarService;
use crate::state::{NodeCounters, NodeState};

/// Why a node could not start.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// The configuration is wrong.
    #[error("configuration: {0}")]
    Config(String),
    /// A listen address could not be bound.
    #[error("cannot listen on {0}: {1}")]
    Listen(String, std::io::Error),
    /// The bus could not start.
    #[error(transparent)]
    Bus(#[from] invalbus::BuildError),
    /// NATS or JetStream did not cooperate.
    #[error("NATS: {0}")]
    Nats(String),
}

/// Joins the bus, retrying with backoff for as long as NATS or JetStream is not ready.
async fn join_bus(
    config: &NodeConfig,
    advertise: &str,
    js_config: Option<&invalbus::JetStreamConfig>,
) -> Result<Bus, NodeError> {
    let mut backoff = Duration::from_millis(500);
    let mut attempt = 0u32;
    loop {
        attempt += 1;
        let options = config.nats_options().await.map_err(|e| NodeError::Config(e.0))?;
        let mut builder = Bus::builder()
            .nats(config.nats_url())
            .nats_options(options)
            .namespace(config.namespace.clone())
            .address(advertise.to_owned())
            .heartbeat_interval(config.heartbeat_interval)
            .max_staleness(config.max_staleness)
            // The node is where stream settings come from: it creates the streams and brings
            // them to its retention (service replicas only create missing ones).
            .manage_streams(true)
            .startup_timeout(Duration::from_secs(30))
            .trust(config.trust.clone())
            .take_over(config.take_over);
        if let Some(path) = &config.key_file {
            let identity = invalbus::Identity::load_or_create(path).map_err(|e| NodeError::Config(e.to_string()))?;
            builder = builder.identity(identity);
        }
        if let Some(id) = &config.node_id {
            builder = builder.node_id(id.clone());
        }
        if let Some(js) = js_config {
            builder = builder.jetstream(js.clone());
        }
        match builder.build().await {
            Ok(bus) => {
                if attempt > 1 {
                    tracing::info!(attempt, "joined the bus");
                }
                return Ok(bus);
            }
            Err(e) if e.is_transient() => {
                tracing::warn!(error = %e, attempt, retry_in_ms = backoff.as_millis() as u64,
                    "cannot join the bus yet (NATS or JetStream not ready); health reports NOT_SERVING until it can");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(10));
            }
            Err(e) => return Err(NodeError::Bus(e)),
        }
    }
}

/// The gRPC server with the node's TLS settings.
fn server_builder(config: &NodeConfig) -> Result<Server, NodeError> {
    let mut server = Server::builder();
    if let Some(tls) = &config.tls {
        let cert = std::fs::read(&tls.cert_file)
            .map_err(|e| NodeError::Config(format!("tls.cert_file {}: {e}", tls.cert_file.display())))?;
        let key = std::fs::read(&tls.key_file)
            .map_err(|e| NodeError::Config(format!("tls.key_file {}: {e}", tls.key_file.display())))?;
        server = server
            .tls_config(ServerTlsConfig::new().identity(Identity::from_pem(cert, key)))
            .map_err(|e| NodeError::Config(format!("tls: {e}")))?;
    }
    Ok(server)
}

/// The connections accepted on a listener shared by the starting server and the full one.
fn incoming(
    listener: Arc<TcpListener>,
) -> impl futures::Stream<Item = std::io::Result<tokio::net::TcpStream>> + Send + 'static {
    futures::stream::unfold(listener, |l| async move {
        let conn = l.accept().await.map(|(s, _)| {
            // Without it, Nagle's algorithm holds a small answer back until the client ACKs the
            // previous frame (up to 40 ms with delayed ACKs) whenever a stream on the same
            // connection (Watch) has just sent one.
            let _ = s.set_nodelay(true);
            s
        });
        Some((conn, l))
    })
}

/// [`incoming`] for a Unix domain socket.
fn incoming_unix(
    listener: Arc<UnixListener>,
) -> impl futures::Stream<Item = std::io::Result<tokio::net::UnixStream>> + Send + 'static {
    futures::stream::unfold(listener, |l| async move {
        let conn = l.accept().await.map(|(s, _)| s);
        Some((conn, l))
    })
}

/// The gRPC port: TCP (`host:port`) or a Unix domain socket (`unix:/path`).
#[derive(Clone)]
enum GrpcListener {
    Tcp(Arc<TcpListener>),
    Unix(Arc<UnixListener>, PathBuf),
}

impl GrpcListener {
    async fn bind(listen: &str) -> Result<GrpcListener, NodeError> {
        let err = |e| NodeError::Listen(listen.to_owned(), e);
        let Some(path) = listen.strip_prefix("unix:") else {
            return Ok(GrpcListener::Tcp(Arc::new(
                TcpListener::bind(listen).await.map_err(err)?,
            )));
        };
        let path = PathBuf::from(path);
        if path.as_os_str().is_empty() {
            return Err(NodeError::Config(
                "listen = \"unix:\" needs a path, as in unix:/run/invalbus.sock".into(),
            ));
        }
        // A socket file left by a node that died is removed; one that a live node answers on is
        // not (binding then fails with "address in use").
        if std::os::unix::net::UnixStream::connect(&path).is_err() {
            use std::os::unix::fs::FileTypeExt;
            if std::fs::symlink_metadata(&path).is_ok_and(|m| m.file_type().is_socket()) {
                let _ = std::fs::remove_file(&path);
            }
        }
        Ok(GrpcListener::Unix(
            Arc::new(UnixListener::bind(&path).map_err(err)?),
            path,
        ))
    }

    /// Serves `router` on this listener until `stop` turns true.
    fn serve(
        &self,
        router: tonic::transport::server::Router,
        mut stop: watch::Receiver<bool>,
    ) -> JoinHandle<Result<(), tonic::transport::Error>> {
        let until = async move { crate::audit::stopped(&mut stop).await };
        match self {
            GrpcListener::Tcp(l) => tokio::spawn(router.serve_with_incoming_shutdown(incoming(l.clone()), until)),
            GrpcListener::Unix(l, _) => {
                tokio::spawn(router.serve_with_incoming_shutdown(incoming_unix(l.clone()), until))
            }
        }
    }
}

/// A running node. Dropping it without [`Node::shutdown`] leaves its tasks running until the
/// runtime ends.
pub struct Node {
    state: Arc<NodeState>,
    addr: SocketAddr,
    /// The socket file, when it listens on a Unix domain socket (removed at shutdown).
    socket: Option<PathBuf>,
    metrics_addr: Option<SocketAddr>,
    stop_serving: watch::Sender<bool>,
    server: JoinHandle<Result<(), tonic::transport::Error>>,
    metrics: Option<JoinHandle<()>>,
    reads: Option<JoinHandle<()>>,
    health: tonic_health::server::HealthReporter,
}

impl Node {
    /// Starts a node with `config`: binds its ports, joins the bus, and serves.
    ///
    /// While NATS or JetStream is not ready (servers starting, a stream leader being elected,
    /// the stream's quorum unreachable), the node keeps trying with backoff, logs why, and
    /// answers gRPC health with NOT_SERVING on its port; it returns an error only for what
    /// retrying cannot fix (a bad setting, refused credentials, a stream it cannot use).
    pub async fn start(config: NodeConfig) -> Result<Node, NodeError> {
        if let invalbus::TrustPolicy::PinOnFirstUse = config.trust {
            tracing::warn!("trust policy: any key, each node id pinned to the first key heard for it (development); list the nodes' keys in [trust] for production");
        }
        if config.tokens.is_empty() {
            if config.insecure {
                tracing::warn!("--insecure: admin and sidecar calls are served WITHOUT tokens; use this for local development only");
            } else {
                tracing::warn!("no tokens configured: every admin and sidecar call will be refused (configure [[tokens]] or pass --insecure for local development)");
            }
        }
        let listener = GrpcListener::bind(&config.listen).await?;
        let (addr, socket) = match &listener {
            GrpcListener::Tcp(l) => (
                l.local_addr()
                    .map_err(|e| NodeError::Listen(config.listen.clone(), e))?,
                None,
            ),
            GrpcListener::Unix(_, path) => (SocketAddr::from(([0, 0, 0, 0], 0)), Some(path.clone())),
        };
        let read_listener = match &config.read_listen {
            Some(path) => Some(
                crate::readsock::bind(path).map_err(|e| NodeError::Listen(format!("unix:{}", path.display()), e))?,
            ),
            None => None,
        };
        let metrics_listener = match &config.metrics_listen {
            Some(a) => Some(
                TcpListener::bind(a)
                    .await
                    .map_err(|e| NodeError::Listen(a.clone(), e))?,
            ),
            None => None,
        };
        let advertise = config.advertise.clone().unwrap_or_else(|| match &socket {
            Some(path) => format!("unix:{}", path.display()),
            None => addr.to_string(),
        });
        let js_config = config.jetstream.enabled.then(|| config.jetstream_config());
        let (health, health_service) = tonic_health::server::health_reporter();
        health.set_not_serving::<AdminServer<AdminService>>().await;
        health.set_not_serving::<CacheServer<SidecarService>>().await;
        health
            .set_service_status("", tonic_health::ServingStatus::NotServing)
            .await;
        // Until the bus is up, the port answers health only (NOT_SERVING), so orchestrators and
        // `invalbus-node health` see a node that is starting, not a dead one.
        let (stop_pending, pending) = watch::channel(false);
        let mut starting_server = server_builder(&config)?;
        let starting = listener.serve(starting_server.add_service(health_service.clone()), pending);
        let bus = join_bus(&config, &advertise, js_config.as_ref()).await;
        let _ = stop_pending.send(true);
        let _ = tokio::time::timeout(Duration::from_secs(5), starting).await;
        let bus = bus?;
        let mut caches = HashMap::new();
        for c in &config.caches {
            let cache = bus
                .cache::<Bytes>(
                    &c.name,
                    CacheConfig::new(c.max_entries).time_to_live(Duration::from_secs(c.ttl_secs.max(1))),
                )
                .map_err(|e| NodeError::Config(format!("cache {:?}: {e}", c.name)))?;
            caches.insert(c.name.clone(), cache);
        }
        let client = config
            .nats_options()
            .await
            .map_err(|e| NodeError::Config(e.0))?
            .name(format!("invalbus-audit:{}:{}", config.namespace, bus.node_id()))
            .connect(config.nats_url())
            .await
            .map_err(|e| NodeError::Nats(e.to_string()))?;
        let audit = Audit::new(client, bus.clone(), js_config.is_some());
        let state = Arc::new(NodeState {
            auth: Auth::new(config.tokens.clone(), config.insecure),
            bus,
            caches,
            config: config.clone(),
            audit,
            advertise,
            counters: NodeCounters::default(),
        });

        health.set_serving::<AdminServer<AdminService>>().await;
        health.set_serving::<CacheServer<SidecarService>>().await;
        health
            .set_service_status("", tonic_health::ServingStatus::Serving)
            .await;
        let reflection = || {
            tonic_reflection::server::Builder::configure()
                .register_encoded_file_descriptor_set(crate::pb::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        };
        let reflection_v1 = reflection().build_v1().map_err(|e| NodeError::Config(e.to_string()))?;
        let reflection_v1alpha = reflection()
            .build_v1alpha()
            .map_err(|e| NodeError::Config(e.to_string()))?;
        let mut server = server_builder(&config)?;
        let (stop_serving, serving) = watch::channel(false);
        let sidecar = SidecarService::new(state.clone()).stop_on(serving.clone());
        let router = server
            .add_service(health_service)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha)
            .add_service(AdminServer::new(AdminService::new(state.clone())))
            .add_service(CacheServer::new(sidecar.clone()));
        let server = listener.serve(router, serving.clone());
        let reads = match (read_listener, &config.read_listen) {
            (Some(l), Some(path)) => Some(tokio::spawn(crate::readsock::serve(
                l,
                path.clone(),
                state.clone(),
                sidecar.clone(),
                serving.clone(),
            ))),
            _ => None,
        };
        let (metrics_addr, metrics) = match metrics_listener {
            Some(l) => (
                l.local_addr().ok(),
                Some(tokio::spawn(crate::prometheus::serve(l, state.clone(), serving))),
            ),
            None => (None, None),
        };
        tracing::info!(node = %state.bus.node_id(), ns = %config.namespace, listen = %config.listen, tls = config.tls.is_some(), jetstream = js_config.is_some(), "node serving");
        Ok(Node {
            state,
            addr,
            socket,
            metrics_addr,
            stop_serving,
            server,
            metrics,
            reads,
            health,
        })
    }

    /// The TCP address it serves gRPC on (`0.0.0.0:0` when it listens on a Unix socket).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Where it serves gRPC: `host:port`, or `unix:/path` for a Unix domain socket.
    pub fn listen_address(&self) -> String {
        match &self.socket {
            Some(path) => format!("unix:{}", path.display()),
            None => self.addr.to_string(),
        }
    }

    /// The Prometheus address, if it serves one.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// Its bus.
    pub fn bus(&self) -> &Bus {
        &self.state.bus
    }

    /// One of its caches.
    pub fn cache(&self, name: &str) -> Option<&invalbus::Cache<Bytes>> {
        self.state.caches.get(name)
    }

    /// Stops in order: health reports not serving, no new calls are accepted and running calls
    /// finish, queued invalidations are published, receipts are written, NATS is drained.
    pub async fn shutdown(self) {
        let node = self.state.bus.node_id().to_owned();
        tracing::info!(node = %node, "shutting down");
        self.health.set_not_serving::<AdminServer<AdminService>>().await;
        self.health.set_not_serving::<CacheServer<SidecarService>>().await;
        let _ = self.stop_serving.send(true);
        let _ = tokio::time::timeout(Duration::from_secs(15), self.server).await;
        if let Some(m) = self.metrics {
            m.abort();
        }
        if let Some(r) = self.reads {
            let _ = tokio::time::timeout(Duration::from_secs(5), r).await;
        }
        // The bus publishes what is queued and writes the receipts still pending.
        self.state.bus.shutdown().await;
        let _ = tokio::time::timeout(Duration::from_secs(5), self.state.audit.client().drain()).await;
        if let Some(path) = &self.socket {
            let _ = std::fs::remove_file(path);
        }
        tracing::info!(node = %node, "stopped");
    }
}
