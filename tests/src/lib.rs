//! Fixtures for cross-process tests of invalbus: real `nats-server` processes (single or clustered), a TCP proxy that injects faults, raw publishers, and a polling helper.
//!
//! # Layout
//! - [`NatsServer`] and [`NatsCluster`]: `nats-server` child processes on free loopback ports,
//!   optionally with JetStream or a configuration file (authorization, TLS, operator mode), that
//!   can be killed with SIGKILL and restarted on the same port and store. They are killed and
//!   reaped on drop.
//! - [`TcpProxy`]: sits between a client and a server; the test switches it between
//!   [`ProxyMode::Pass`], [`ProxyMode::BlackHole`], [`ProxyMode::Reset`] and
//!   [`ProxyMode::Delay`] while connections are live.
//! - [`RawPeer`]: a plain NATS connection that publishes hand-made batches on a namespace's
//!   subjects, to play a peer that misbehaves (old versions, duplicates, garbage).
//! - [`eventually`]: polls a condition until a generous deadline, so tests assert what
//!   happens rather than how fast it happens on a busy machine.
//!
//! The fixtures panic with a descriptive message when the environment is broken (no
//! `nats-server`, a server that does not come up): that is a failed test, not a result.

pub mod checker;
mod proxy;

pub use proxy::{ProxyMode, TcpProxy};

use std::future::Future;
use std::net::{SocketAddr, TcpListener as StdTcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use invalbus::{Batch, Bus, BusBuilder, Heartbeat, Identity, Invalidation, Kind};
use tempfile::TempDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// How long a test waits for something that should happen. Generous on purpose: the suite runs
/// on a shared 2-core machine, and a deadline is a bound on a hang, not a performance target.
pub const DEADLINE: Duration = Duration::from_secs(20);

/// How long a fixture waits for a `nats-server` to accept connections.
const SERVER_START_DEADLINE: Duration = Duration::from_secs(30);

/// Polls `cond` every 10 ms until it returns true (then `true`) or `deadline` passes (then
/// `false`, after one last check).
///
/// ```
/// # #[tokio::main] async fn main() {
/// let start = std::time::Instant::now();
/// let ok = invalbus_tests::eventually(std::time::Duration::from_secs(5), || async move {
///     start.elapsed() > std::time::Duration::from_millis(30)
/// })
/// .await;
/// assert!(ok);
/// # }
/// ```
pub async fn eventually<F, Fut>(deadline: Duration, mut cond: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let until = Instant::now() + deadline;
    loop {
        if cond().await {
            return true;
        }
        if Instant::now() >= until {
            return cond().await;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Installs a `tracing` subscriber that writes through the test harness (shown only for failing
/// tests), filtered by `RUST_LOG` (default `warn`). Safe to call from every test.
pub fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_test_writer()
        .try_init();
}

/// The `nats-server` binary: `$NATS_SERVER_BIN`, else `nats-server` found on `PATH`, else
/// `/usr/sbin/nats-server` (where Debian's package puts it).
pub fn nats_server_bin() -> PathBuf {
    if let Some(bin) = std::env::var_os("NATS_SERVER_BIN").filter(|b| !b.is_empty()) {
        return PathBuf::from(bin);
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            let candidate = dir.join("nats-server");
            if candidate.is_file() {
                return candidate;
            }
        }
    }
    PathBuf::from("/usr/sbin/nats-server")
}

/// A loopback port that was free a moment ago (bound, then released).
///
/// Ports are taken below the kernel's ephemeral range (`net.ipv4.ip_local_port_range`), from a
/// random point and then in turn, so that neither `bind(0)` nor the outgoing connections of
/// tests running beside it (proxies, clients: their local ports come from that range) can be
/// handed the same port before the caller binds it. Another process that picks ports the same
/// way may still take it: [`NatsServer::start`] retries on a fresh port when that happens.
pub fn free_port() -> u16 {
    bind_free()
        .local_addr()
        .expect("local address of a bound listener")
        .port()
}

/// A listener on a free loopback port outside the ephemeral range (see [`free_port`]).
fn bind_free() -> StdTcpListener {
    static CURSOR: std::sync::OnceLock<AtomicUsize> = std::sync::OnceLock::new();
    let range = port_range();
    let span = usize::from(range.end - range.start);
    if span > 0 {
        let cursor = CURSOR.get_or_init(|| AtomicUsize::new(rand::random::<u32>() as usize % span));
        for _ in 0..span {
            let port = range.start + (cursor.fetch_add(1, Ordering::Relaxed) % span) as u16;
            if let Ok(listener) = StdTcpListener::bind(("127.0.0.1", port)) {
                return listener;
            }
        }
    }
    StdTcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0")
}

/// The ports [`free_port`] picks from: the widest stretch above 10,000 outside the ephemeral
/// range (10,000..32,768 with Linux's default range).
fn port_range() -> std::ops::Range<u16> {
    let (low, high) = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| {
            let mut it = s.split_whitespace().map(|p| p.parse::<u16>().ok());
            Some((it.next()??, it.next()??))
        })
        .unwrap_or((32_768, 60_999));
    let below = 10_000..low.max(10_000);
    let above = high.saturating_add(1).max(10_000)..u16::MAX;
    if below.len() >= above.len() {
        below
    } else {
        above
    }
}

/// How a server joins its cluster.
#[derive(Debug, Clone)]
struct ClusterSpec {
    name: String,
    /// Its own cluster port.
    port: u16,
    /// Where it connects its routes (other members' cluster ports, or proxies in front of them).
    routes: Vec<u16>,
    /// The cluster address it announces to the others, when not its own (an address nothing
    /// listens on keeps the members from routing around proxies).
    advertise: Option<u16>,
}

/// How one server process is started; kept so that a restart uses the same ports and store.
#[derive(Debug, Clone)]
struct ServerSpec {
    name: String,
    port: u16,
    http_port: Option<u16>,
    jetstream: bool,
    cluster: Option<ClusterSpec>,
    /// The text of a configuration file (`-c`); the flags above win over what it says.
    config: Option<String>,
}

impl ServerSpec {
    fn args(&self, store: &Path, config_file: &Path) -> Vec<String> {
        let mut args = Vec::new();
        if self.config.is_some() {
            args.extend(["-c".to_owned(), config_file.display().to_string()]);
        }
        args.extend([
            "-a".to_owned(),
            "127.0.0.1".to_owned(),
            "-p".to_owned(),
            self.port.to_string(),
            "--server_name".to_owned(),
            self.name.clone(),
        ]);
        if let Some(http) = self.http_port {
            args.extend(["-m".to_owned(), http.to_string()]);
        }
        if self.jetstream {
            args.extend(["-js".to_owned(), "-sd".to_owned(), store.display().to_string()]);
        }
        if let Some(c) = &self.cluster {
            let routes: Vec<String> = c.routes.iter().map(|p| format!("nats://127.0.0.1:{p}")).collect();
            args.extend([
                "--cluster".to_owned(),
                format!("nats://127.0.0.1:{}", c.port),
                "--cluster_name".to_owned(),
                c.name.clone(),
                "--routes".to_owned(),
                routes.join(","),
            ]);
            if let Some(adv) = c.advertise {
                args.extend(["--cluster_advertise".to_owned(), format!("127.0.0.1:{adv}")]);
            }
        }
        args
    }
}

/// A `nats-server` child process on a loopback port, killed and reaped on drop.
///
/// JetStream storage and the server's log live in a temporary directory that survives
/// [`NatsServer::kill`] and [`NatsServer::restart`] and is removed on drop.
///
/// ```no_run
/// # #[tokio::main] async fn main() {
/// let mut server = invalbus_tests::NatsServer::start_jetstream().await;
/// let client = async_nats::connect(server.url()).await.unwrap();
/// server.kill(); // SIGKILL, as a crash would
/// server.restart().await; // same port, same JetStream store
/// # drop(client);
/// # }
/// ```
#[derive(Debug)]
pub struct NatsServer {
    spec: ServerSpec,
    child: Option<Child>,
    dir: TempDir,
}

impl NatsServer {
    /// Starts a core NATS server (no JetStream) on a free port and waits until it accepts
    /// clients.
    pub async fn start() -> NatsServer {
        Self::start_with(false).await
    }

    /// Starts a server with JetStream (file storage in a temporary directory) on a free port and
    /// waits until it accepts clients.
    pub async fn start_jetstream() -> NatsServer {
        Self::start_with(true).await
    }

    /// Starts a core NATS server (no JetStream) configured by `config`, the text of a
    /// `nats-server` configuration file (authorization, TLS, operator mode...), on a free port,
    /// and waits until it accepts connections. The fixture sets the host, port and server name
    /// on the command line, which wins over the file; files the text names (certificates, JWTs)
    /// must outlive the server.
    ///
    /// ```no_run
    /// # #[tokio::main] async fn main() {
    /// let server = invalbus_tests::NatsServer::start_with_config("authorization { token: s3cr3t }").await;
    /// let client = async_nats::ConnectOptions::with_token("s3cr3t".into()).connect(server.url()).await.unwrap();
    /// # drop(client);
    /// # }
    /// ```
    pub async fn start_with_config(config: &str) -> NatsServer {
        Self::start_spec(false, Some(config)).await
    }

    /// Like [`NatsServer::start_with_config`], with JetStream (file storage in a temporary
    /// directory) as well.
    pub async fn start_jetstream_with_config(config: &str) -> NatsServer {
        Self::start_spec(true, Some(config)).await
    }

    async fn start_with(jetstream: bool) -> NatsServer {
        Self::start_spec(jetstream, None).await
    }

    async fn start_spec(jetstream: bool, config: Option<&str>) -> NatsServer {
        // A free port can be taken between our probe and the server's bind: retry on a new one.
        let mut last_error = String::new();
        for _ in 0..5 {
            let spec = ServerSpec {
                name: "invalbus-test".into(),
                port: free_port(),
                http_port: None,
                jetstream,
                cluster: None,
                config: config.map(str::to_owned),
            };
            let mut server = NatsServer::spawn(spec);
            match server.wait_ready(SERVER_START_DEADLINE).await {
                Ok(()) => return server,
                Err(e) => last_error = e,
            }
        }
        panic!("nats-server did not start after 5 attempts: {last_error}");
    }

    /// Spawns the process without waiting for it to accept clients.
    fn spawn(spec: ServerSpec) -> NatsServer {
        let dir = tempfile::Builder::new()
            .prefix("invalbus-nats-")
            .tempdir()
            .expect("create a temporary directory");
        let mut server = NatsServer { spec, child: None, dir };
        server.launch();
        server
    }

    fn store_dir(&self) -> PathBuf {
        self.dir.path().join("jetstream")
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("server.log")
    }

    fn config_path(&self) -> PathBuf {
        self.dir.path().join("server.conf")
    }

    fn launch(&mut self) {
        assert!(
            self.child.is_none(),
            "nats-server {} is already running",
            self.spec.name
        );
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("open the nats-server log file");
        let log_err = log.try_clone().expect("clone the log file handle");
        if let Some(config) = &self.spec.config {
            std::fs::write(self.config_path(), config).expect("write the nats-server configuration file");
        }
        let bin = nats_server_bin();
        let child = Command::new(&bin)
            .args(self.spec.args(&self.store_dir(), &self.config_path()))
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot run {} ({e}); install nats-server (apt-get install nats-server) or set NATS_SERVER_BIN",
                    bin.display()
                )
            });
        self.child = Some(child);
    }

    /// Waits until the server sends its INFO line on a fresh connection; fails early if the
    /// process exits (a port taken by someone else, a bad flag).
    async fn wait_ready(&mut self, deadline: Duration) -> Result<(), String> {
        let until = Instant::now() + deadline;
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    self.child = None;
                    return Err(format!(
                        "nats-server {} exited with {status}; log:\n{}",
                        self.spec.name,
                        self.log_tail()
                    ));
                }
            }
            if nats_info(self.spec.port).await {
                return Ok(());
            }
            if Instant::now() >= until {
                return Err(format!(
                    "nats-server {} did not accept clients on port {} within {deadline:?}; log:\n{}",
                    self.spec.name,
                    self.spec.port,
                    self.log_tail()
                ));
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// The last lines of the server's log, for failure messages.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(self.log_path()).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// `nats://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.spec.port)
    }

    /// The client port.
    pub fn port(&self) -> u16 {
        self.spec.port
    }

    /// The client address.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.spec.port))
    }

    /// The server's name (`--server_name`).
    pub fn name(&self) -> &str {
        &self.spec.name
    }

    /// Whether the process is running (not killed, not exited).
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Kills the server with SIGKILL, as a crash would, and reaps it. Does nothing if it is not
    /// running.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            // `Child::kill` sends SIGKILL on Unix; `wait` reaps it so no zombie is left.
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port with the same JetStream store (killing it first
    /// if it still runs), and waits until it accepts clients.
    pub async fn restart(&mut self) {
        self.kill();
        self.launch();
        if let Err(e) = self.wait_ready(SERVER_START_DEADLINE).await {
            panic!("restart failed: {e}");
        }
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Whether a NATS server answers on `port` with its INFO line.
async fn nats_info(port: u16) -> bool {
    let attempt = async {
        let mut stream = TcpStream::connect(("127.0.0.1", port)).await.ok()?;
        let mut buf = [0u8; 5];
        stream.read_exact(&mut buf).await.ok()?;
        Some(&buf == b"INFO ")
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(2), attempt).await,
        Ok(Some(true))
    )
}

/// A cluster of `nats-server` processes joined by routes (full mesh), each with JetStream and
/// a monitoring port. Members are killed and reaped on drop.
///
/// ```no_run
/// # #[tokio::main] async fn main() {
/// let mut cluster = invalbus_tests::NatsCluster::start(3).await;
/// let bus_url = cluster.urls(); // every member, comma-separated, for failover
/// cluster.server_mut(0).kill();
/// cluster.server_mut(0).restart().await;
/// cluster.wait_ready().await;
/// # drop(bus_url);
/// # }
/// ```
#[derive(Debug)]
pub struct NatsCluster {
    servers: Vec<NatsServer>,
    /// With routes through proxies: `(from, to, proxy)` for every ordered pair of members.
    routes: Vec<(usize, usize, TcpProxy)>,
}

impl NatsCluster {
    /// Starts `n` servers (at least 1) with routes to each other and JetStream, and waits until
    /// every route is up and JetStream answers on every member.
    pub async fn start(n: usize) -> NatsCluster {
        NatsCluster::plan(n).start().await
    }

    /// Picks the ports of a cluster of `n` servers without starting it, so that a test can
    /// point a client at it first (a node that starts before its servers).
    ///
    /// ```no_run
    /// # #[tokio::main] async fn main() {
    /// let plan = invalbus_tests::NatsCluster::plan(3);
    /// let url = plan.url(0); // nothing listens there yet
    /// let cluster = plan.start().await;
    /// # drop((url, cluster));
    /// # }
    /// ```
    pub fn plan(n: usize) -> PlannedCluster {
        assert!(n >= 1, "a cluster needs at least one server");
        let cluster_name = format!("invalbus-test-{:08x}", rand::random::<u32>());
        // Cluster, client and monitoring ports, all distinct.
        let ports = distinct_free_ports(3 * n);
        let (cluster_ports, rest) = ports.split_at(n);
        let (client_ports, http_ports) = rest.split_at(n);
        let specs = (0..n)
            .map(|i| ServerSpec {
                name: format!("n{i}"),
                port: client_ports[i],
                http_port: Some(http_ports[i]),
                jetstream: true,
                cluster: Some(ClusterSpec {
                    name: cluster_name.clone(),
                    port: cluster_ports[i],
                    routes: cluster_ports
                        .iter()
                        .copied()
                        .filter(|p| *p != cluster_ports[i])
                        .collect(),
                    advertise: None,
                }),
                config: None,
            })
            .collect();
        PlannedCluster { specs }
    }

    /// Starts `n` servers like [`NatsCluster::start`], but every route goes through a
    /// [`TcpProxy`] the test controls ([`NatsCluster::cut_route`]), and each server announces a
    /// cluster address nothing listens on, so that the members cannot route around the proxies.
    ///
    /// ```no_run
    /// # #[tokio::main] async fn main() {
    /// let cluster = invalbus_tests::NatsCluster::start_with_proxied_routes(3).await;
    /// cluster.cut_route(0, 1, invalbus_tests::ProxyMode::BlackHole); // A and B no longer talk
    /// cluster.cut_route(0, 1, invalbus_tests::ProxyMode::Pass);
    /// # }
    /// ```
    pub async fn start_with_proxied_routes(n: usize) -> NatsCluster {
        assert!(n >= 2, "a cluster with routes needs two servers");
        let cluster_name = format!("invalbus-test-{:08x}", rand::random::<u32>());
        let ports = distinct_free_ports(4 * n);
        let (cluster_ports, rest) = ports.split_at(n);
        let (client_ports, rest) = rest.split_at(n);
        let (http_ports, dead_ports) = rest.split_at(n);
        let mut routes = Vec::new();
        for from in 0..n {
            for to in (0..n).filter(|&to| to != from) {
                let proxy = TcpProxy::start(SocketAddr::from(([127, 0, 0, 1], cluster_ports[to]))).await;
                routes.push((from, to, proxy));
            }
        }
        let servers = (0..n)
            .map(|i| {
                NatsServer::spawn(ServerSpec {
                    name: format!("n{i}"),
                    port: client_ports[i],
                    http_port: Some(http_ports[i]),
                    jetstream: true,
                    cluster: Some(ClusterSpec {
                        name: cluster_name.clone(),
                        port: cluster_ports[i],
                        routes: routes
                            .iter()
                            .filter(|(from, _, _)| *from == i)
                            .map(|(_, _, p)| p.port())
                            .collect(),
                        advertise: Some(dead_ports[i]),
                    }),
                    config: None,
                })
            })
            .collect();
        let mut cluster = NatsCluster { servers, routes };
        for s in &mut cluster.servers {
            if let Err(e) = s.wait_ready(SERVER_START_DEADLINE).await {
                panic!("cluster member did not start: {e}");
            }
        }
        cluster.wait_ready().await;
        cluster
    }

    /// Sets the proxies of the route between members `a` and `b` (both directions) to `mode`.
    /// Panics on a cluster started without proxied routes.
    pub fn cut_route(&self, a: usize, b: usize, mode: ProxyMode) {
        let mut found = 0;
        for (from, to, proxy) in &self.routes {
            if (*from, *to) == (a, b) || (*from, *to) == (b, a) {
                proxy.set_mode(mode);
                found += 1;
            }
        }
        assert_eq!(found, 2, "no proxied route between members {a} and {b}");
    }

    /// Waits until every running member has routes to every other running member and
    /// JetStream answers through it (a meta leader is elected). Panics after a generous
    /// deadline.
    pub async fn wait_ready(&mut self) {
        let until = Instant::now() + Duration::from_secs(60);
        let running: Vec<usize> = (0..self.servers.len())
            .filter(|&i| self.servers[i].is_running())
            .collect();
        for &i in &running {
            let server = &self.servers[i];
            let want = running.len() - 1;
            loop {
                let (routes, leader) = match server.spec.http_port {
                    Some(http) => (num_routes(http).await, jetstream_ready(http).await),
                    None => (None, false),
                };
                if routes.is_some_and(|r| r >= want) && leader {
                    break;
                }
                if Instant::now() >= until {
                    panic!(
                        "cluster member {} not ready (routes: {routes:?}, want {want}; meta leader known: {leader}); log:\n{}",
                        server.name(),
                        server.log_tail()
                    );
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }

    /// The members, in start order.
    pub fn servers(&self) -> &[NatsServer] {
        &self.servers
    }

    /// One member, to kill or restart it.
    pub fn server_mut(&mut self, i: usize) -> &mut NatsServer {
        &mut self.servers[i]
    }

    /// Every member's URL, comma-separated (what a client given several servers takes).
    pub fn urls(&self) -> String {
        self.servers.iter().map(NatsServer::url).collect::<Vec<_>>().join(",")
    }
}

/// A cluster whose ports are chosen but whose servers do not run yet ([`NatsCluster::plan`]).
#[derive(Debug)]
pub struct PlannedCluster {
    specs: Vec<ServerSpec>,
}

impl PlannedCluster {
    /// The client URL member `i` will listen on.
    pub fn url(&self, i: usize) -> String {
        format!("nats://127.0.0.1:{}", self.specs[i].port)
    }

    /// Starts every member and waits until routes are up and JetStream answers on each.
    pub async fn start(self) -> NatsCluster {
        let servers = self.specs.into_iter().map(NatsServer::spawn).collect();
        let mut cluster = NatsCluster {
            servers,
            routes: Vec::new(),
        };
        for s in &mut cluster.servers {
            if let Err(e) = s.wait_ready(SERVER_START_DEADLINE).await {
                panic!("cluster member did not start: {e}");
            }
        }
        cluster.wait_ready().await;
        cluster
    }
}

/// `n` distinct loopback ports that were free a moment ago (see [`free_port`]).
fn distinct_free_ports(n: usize) -> Vec<u16> {
    // Hold every listener until all are picked, so that no port is handed out twice.
    let listeners: Vec<StdTcpListener> = (0..n).map(|_| bind_free()).collect();
    listeners
        .iter()
        .map(|l| l.local_addr().expect("local address").port())
        .collect()
}

/// The number of routes a server reports on its monitoring port, or `None` if it does not
/// answer.
async fn num_routes(http_port: u16) -> Option<usize> {
    let body = http_get(http_port, "/routez").await?;
    let at = body.find("\"num_routes\":")? + "\"num_routes\":".len();
    let digits: String = body[at..]
        .trim_start()
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}

/// Whether the server on `http_port` knows its JetStream meta leader (its `/jsz` names one).
///
/// Not `jetstream::Context::query_account`: async-nats 0.51 fails to parse nats-server
/// 2.9.10's account reply ("data did not match any variant of untagged enum Response").
async fn jetstream_ready(http_port: u16) -> bool {
    let Some(body) = http_get(http_port, "/jsz").await else {
        return false;
    };
    let Some(at) = body.find("\"meta_cluster\"") else {
        return false;
    };
    let meta = &body[at..];
    let Some(l) = meta.find("\"leader\":") else {
        return false;
    };
    let value = meta[l + "\"leader\":".len()..].trim_start();
    value.starts_with('"') && !value.starts_with("\"\"")
}

/// The body of `GET path` on a server's monitoring port, or `None` if it does not answer.
async fn http_get(http_port: u16, path: &str) -> Option<String> {
    let attempt = async {
        let mut stream = TcpStream::connect(("127.0.0.1", http_port)).await.ok()?;
        let request = format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n");
        stream.write_all(request.as_bytes()).await.ok()?;
        let mut body = String::new();
        stream.read_to_string(&mut body).await.ok()?;
        Some(body)
    };
    tokio::time::timeout(Duration::from_secs(2), attempt)
        .await
        .ok()
        .flatten()
}

/// The subject on which `origin` publishes its batches in `namespace`.
pub fn inv_subject(namespace: &str, origin: &str) -> String {
    format!("invalbus.{namespace}.inv.{origin}")
}

/// The subject on which `origin` publishes its heartbeats in `namespace`.
pub fn hb_subject(namespace: &str, origin: &str) -> String {
    format!("invalbus.{namespace}.hb.{origin}")
}

/// A plain NATS connection playing a peer: it publishes hand-made batches (with a fake origin,
/// chosen epochs and sequences) or arbitrary bytes on a namespace's subjects.
///
/// Messages published through one `RawPeer` reach each subscriber in publish order, so a valid
/// batch published after a bad one is a barrier: once a bus has applied it, it has also
/// handled everything published before it.
#[derive(Debug)]
pub struct RawPeer {
    client: async_nats::Client,
    namespace: String,
    origin: String,
    epoch: u64,
    next_seq: u64,
    identity: Identity,
}

impl RawPeer {
    /// Connects to `url` as origin `origin` of `namespace`, with a random epoch; its first batch
    /// will have sequence 1.
    pub async fn connect(url: &str, namespace: &str, origin: &str) -> RawPeer {
        let client = async_nats::connect(url)
            .await
            .unwrap_or_else(|e| panic!("raw peer cannot connect to {url}: {e}"));
        RawPeer {
            client,
            namespace: namespace.to_owned(),
            origin: origin.to_owned(),
            epoch: rand::random::<u64>() | 1,
            next_seq: 1,
            identity: Identity::generate(),
        }
    }

    /// Signs with `identity` from now on (by default a key of its own, made at connect).
    pub fn with_identity(mut self, identity: Identity) -> RawPeer {
        self.identity = identity;
        self
    }

    /// Claims epoch `epoch` from now on, with the next batch at `next_seq`.
    pub fn with_epoch(mut self, epoch: u64, next_seq: u64) -> RawPeer {
        self.epoch = epoch;
        self.next_seq = next_seq;
        self
    }

    /// The key it signs with.
    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    /// The origin (node id) this peer claims.
    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// Its epoch.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// The NATS connection, for publishing anything else.
    pub fn client(&self) -> &async_nats::Client {
        &self.client
    }

    /// A batch of `invalidations` with the next sequence number (which it consumes).
    pub fn next_batch(&mut self, invalidations: Vec<Invalidation>) -> Batch {
        let seq = self.next_seq;
        self.next_seq += 1;
        Batch {
            origin: self.origin.clone(),
            epoch: self.epoch,
            seq,
            timestamp_us: invalbus::now_us(),
            namespace: self.namespace.clone(),
            invalidations,
        }
    }

    /// Encodes `batch` with [`invalbus::encode_batch`], signs it with this peer's key and
    /// publishes it on this origin's batch subject, then flushes.
    pub async fn publish_batch(&self, batch: &Batch) {
        let subject = inv_subject(&self.namespace, &self.origin);
        let body = invalbus::encode_batch(batch);
        self.publish_raw(&subject, invalbus::seal(&self.identity, Kind::Batch, body))
            .await;
    }

    /// Publishes the next batch of `invalidations`; returns its sequence.
    pub async fn send(&mut self, invalidations: Vec<Invalidation>) -> u64 {
        let batch = self.next_batch(invalidations);
        self.publish_batch(&batch).await;
        batch.seq
    }

    /// Publishes a heartbeat announcing `last_seq` as this origin's last batch.
    pub async fn heartbeat(&self, last_seq: u64) {
        let hb = Heartbeat {
            origin: self.origin.clone(),
            epoch: self.epoch,
            last_seq,
            timestamp_us: invalbus::now_us(),
            address: String::new(),
            namespace: self.namespace.clone(),
            caches: Vec::new(),
            writes_receipts: false,
            beat: 0,
        };
        let subject = hb_subject(&self.namespace, &self.origin);
        let body = invalbus::encode_heartbeat(&hb);
        self.publish_raw(&subject, invalbus::seal(&self.identity, Kind::Heartbeat, body))
            .await;
    }

    /// Publishes `payload` as is on `subject`, then flushes.
    pub async fn publish_raw(&self, subject: &str, payload: Bytes) {
        self.client
            .publish(subject.to_owned(), payload)
            .await
            .expect("raw publish");
        self.client.flush().await.expect("raw flush");
    }
}

/// A builder for a bus on `url` in `namespace` as `node_id`, set for a busy test machine.
///
/// `max_staleness` is raised to 30 s: with the default of 1 s, a test process starved of CPU
/// for about 2 s would see its own heartbeat lapse, stop serving and flush, which tests of
/// other behaviour would mistake for a bug. Tests of the staleness gate set it themselves.
pub fn bus_builder(url: &str, namespace: &str, node_id: &str) -> BusBuilder {
    Bus::builder()
        .nats(url)
        .namespace(namespace)
        .node_id(node_id)
        .heartbeat_interval(Duration::from_millis(200))
        .max_staleness(Duration::from_secs(30))
}

/// Builds a bus with [`bus_builder`]'s settings; panics if it cannot.
pub async fn bus(url: &str, namespace: &str, node_id: &str) -> Bus {
    bus_builder(url, namespace, node_id)
        .build()
        .await
        .unwrap_or_else(|e| panic!("bus {node_id} on {url}: {e}"))
}
