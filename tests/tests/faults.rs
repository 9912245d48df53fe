//! The fault-injection suite: real nats-server processes, faults injected by killing servers,
//! cutting one node's connection through a TCP proxy, pausing or crashing a node, and letting
//! the stream's retention pass, with a consistency checker reading on every node throughout.
//!
//! Run with `cargo test -p invalbus-tests --release --test faults -- --nocapture` to see one
//! line per scenario: reads checked, stale reads, worst staleness, consistency in nines.
//!
//! Every scenario asserts:
//! 1. after the fault heals, every live node serves again with no entry older than the last
//!    accepted write of its key, within [`CONVERGE`] of the heal;
//! 2. no read, during or after the fault, was stale by more than `Bus::staleness_bound()` plus
//!    [`SLACK`];
//! 3. every accepted invalidation was applied by every node that was up when it was issued, or
//!    that node's cache was flushed after it was issued.
//!
//! Scenarios run one at a time (a lock), so that the 2-core machine's scheduling does not
//! smear one scenario's timings into another's.

use std::sync::Arc;
use std::time::{Duration, Instant};

use invalbus::JetStreamConfig;
use invalbus_tests::checker::{self, Checker, Node, NodeSpec, Report};
use invalbus_tests::{eventually, NatsCluster, NatsServer, ProxyMode, TcpProxy};

/// Bound on convergence after a heal: a reconnect (the client's backoff reaches 4 s, its
/// connection timeout is 2 s), one replay (well under its 10 s timeout here), plus the second
/// of load the harness keeps running after the heal and the wait for pending tickets.
const CONVERGE: Duration = Duration::from_secs(20);

/// Scheduling slack on top of `staleness_bound()`. Each node runs on one worker thread shared by
/// its receiver, watchdog, reader and writer, and the machine has 2 cores for about ten busy
/// threads: a watchdog tick or a reader can be held up by tens of milliseconds. Acceptance
/// times are taken when the writer sees its acknowledgement, after the server accepted, so
/// they make ages shorter, never longer.
const SLACK: Duration = Duration::from_millis(150);

/// Keys in the source of truth: few enough that entries stay cached between writes.
const KEYS: usize = 16;

/// How long a scenario runs before and after its fault (load, not assertions).
const WARM: Duration = Duration::from_millis(1000);

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn js() -> JetStreamConfig {
    JetStreamConfig::default().publish_deadline(Duration::from_secs(30))
}

fn spec(id: &str, url: &str, jetstream: Option<JetStreamConfig>) -> NodeSpec {
    let mut s = NodeSpec::new(id, url);
    s.jetstream = jetstream;
    s
}

/// Lets the load run after the heal, stops the writers, waits for their tickets, then checks
/// convergence, delivery and the staleness bound, and prints the scenario's line.
async fn finish(name: &str, checker: &Checker, nodes: &[&Node], heal: Instant, extra: &str) -> Report {
    tokio::time::sleep(WARM).await;
    checker.stop_writers();
    let resolved = eventually(Duration::from_secs(40), || async move {
        nodes.iter().all(|n| n.pending() == 0)
    })
    .await;
    assert!(resolved, "{name}: tickets of live writers did not resolve");
    let last = std::sync::Mutex::new(Vec::new());
    let last_ref = &last;
    let converged = eventually(CONVERGE.saturating_sub(heal.elapsed()), move || async move {
        let mut stale = Vec::new();
        for n in nodes {
            stale.extend(checker.stale_entries(n).await);
        }
        let done = stale.is_empty();
        *last_ref.lock().unwrap() = stale;
        done
    })
    .await;
    let converged_in = heal.elapsed();
    let undelivered = checker.undelivered(nodes);
    let report = checker.report();
    let bound = nodes[0].bus.staleness_bound();
    let summaries: Vec<String> = nodes.iter().map(|n| n.summary()).collect();
    println!(
        "{} converged_in={}ms {} {extra}",
        report.line(name, bound, ""),
        converged_in.as_millis(),
        summaries.join(" ")
    );
    assert!(
        converged,
        "{name}: not converged within {CONVERGE:?} of the heal: {:?}",
        last.lock().unwrap()
    );
    assert!(undelivered.is_empty(), "{name}: {undelivered:?}");
    assert!(
        report.worst <= bound + SLACK,
        "{name}: a read was {:?} stale (at {:?}), beyond the bound {bound:?} + {SLACK:?}",
        report.worst,
        report.worst_at
    );
    report
}

/// Three nodes on one JetStream server: `a` and `b` direct, `c` through a proxy.
async fn three_nodes(
    checker: &Arc<Checker>,
    server: &NatsServer,
    proxy: &TcpProxy,
    js: Option<JetStreamConfig>,
) -> [Node; 3] {
    let a = Node::start(checker, &spec("a", &server.url(), js.clone())).await;
    let b = Node::start(checker, &spec("b", &server.url(), js.clone())).await;
    let c = Node::start(checker, &spec("c", &proxy.url(), js)).await;
    [a, b, c]
}

fn bound_checker() -> Arc<Checker> {
    // Every node of the suite has the same settings, so the same bound.
    Checker::new(
        KEYS,
        checker::HEARTBEAT + checker::MAX_STALENESS + Duration::from_millis(10),
    )
}

/// Cuts `c`'s connection in `mode` for `cut`, then heals; returns the report.
async fn cut_scenario(
    name: &str,
    mode: ProxyMode,
    cut: Duration,
    jetstream: bool,
    tweak: impl FnOnce(&mut NodeSpec),
) -> (Report, [Node; 3]) {
    let server = if jetstream {
        NatsServer::start_jetstream().await
    } else {
        NatsServer::start().await
    };
    let proxy = TcpProxy::start(server.addr()).await;
    let checker = bound_checker();
    let js = jetstream.then(js);
    let a = Node::start(&checker, &spec("a", &server.url(), js.clone())).await;
    let b = Node::start(&checker, &spec("b", &server.url(), js.clone())).await;
    let mut sc = spec("c", &proxy.url(), js);
    tweak(&mut sc);
    let gate_off = sc.gate_off;
    let c = Node::start(&checker, &sc).await;
    tokio::time::sleep(WARM).await;
    proxy.set_mode(mode);
    tokio::time::sleep(cut).await;
    proxy.set_mode(ProxyMode::Pass);
    let heal = Instant::now();
    let report = if gate_off {
        // Only the measurement: the assertions are the caller's.
        tokio::time::sleep(WARM).await;
        let r = checker.report();
        println!("{} {}", r.line(name, checker.bound(), ""), c.summary());
        r
    } else {
        finish(
            name,
            &checker,
            &[&a, &b, &c],
            heal,
            &format!("cut={}ms", cut.as_millis()),
        )
        .await
    };
    (report, [a, b, c])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_kill9_and_restart() {
    let _serial = SERIAL.lock().await;
    invalbus_tests::init_tracing();
    let mut server = NatsServer::start_jetstream().await;
    let checker = bound_checker();
    let proxy = TcpProxy::start(server.addr()).await; // unused fault, keeps `three_nodes` uniform
    let [a, b, c] = three_nodes(&checker, &server, &proxy, Some(js())).await;
    tokio::time::sleep(WARM).await;
    server.kill();
    tokio::time::sleep(Duration::from_secs(2)).await;
    server.restart().await;
    let heal = Instant::now();
    finish("server_kill9_restart", &checker, &[&a, &b, &c], heal, "down=2000ms").await;
    for n in [&a, &b, &c] {
        assert!(
            n.stats().repairs > 0,
            "{} never repaired after the server restart",
            n.id
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cut_reset() {
    let _serial = SERIAL.lock().await;
    invalbus_tests::init_tracing();
    let (_, [_a, _b, c]) = cut_scenario("cut_reset", ProxyMode::Reset, Duration::from_millis(2500), true, |_| {}).await;
    let s = c.stats();
    assert!(
        s.repairs > 0 && s.replayed > 0,
        "c should have replayed what it missed: {s:?}"
    );
    assert_eq!(s.repair_flushes, 0, "the stream covers a 2.5 s cut: no flush expected");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cut_blackhole() {
    let _serial = SERIAL.lock().await;
    invalbus_tests::init_tracing();
    let (_, [_a, _b, c]) = cut_scenario(
        "cut_blackhole",
        ProxyMode::BlackHole,
        Duration::from_millis(2500),
        true,
        |_| {},
    )
    .await;
    let s = c.stats();
    assert!(
        s.repairs > 0 && s.replayed > 0,
        "c should have replayed what it missed: {s:?}"
    );
    assert_eq!(s.repair_flushes, 0, "the stream covers a 2.5 s cut: no flush expected");
    assert!(s.suspect_us > 0, "c must have stopped serving while cut off");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cut_delay() {
    let _serial = SERIAL.lock().await;
    invalbus_tests::init_tracing();
    // 600 ms each way: longer than the staleness bound (510 ms), so a node that kept serving on
    // a link this slow would serve reads older than the bound. With the bus's default ping
    // interval (500 ms: a PONG may take up to ~1.5 s) the connection survives a 1.2 s round
    // trip, so this is a slow link, not a disconnect.
    let (_, [_a, _b, c]) = cut_scenario(
        "cut_delay",
        ProxyMode::Delay(Duration::from_millis(600)),
        Duration::from_millis(3000),
        true,
        |c| c.ping = Duration::from_millis(500),
    )
    .await;
    assert!(
        c.stats().suspect_us > 0,
        "c must have stopped serving on a link slower than the bound"
    );
}

/// The checker can fail: with the staleness gate off, a cut-off node serves what it cached
/// while its peers write, and the checker sees reads older than the bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gate_off_is_caught() {
    let _serial = SERIAL.lock().await;
    invalbus_tests::init_tracing();
    let (r, _) = cut_scenario(
        "gate_off(expect stale)",
        ProxyMode::BlackHole,
        Duration::from_millis(2500),
        true,
        |c| c.gate_off = true,
    )
    .await;
    assert!(
        r.beyond_bound > 0 && r.worst > bound_checker().bound() + SLACK,
        "with the gate off the checker must see stale reads beyond the bound: {r:?}"
    );
}

/// Without JetStream there is nothing to replay: a cut-off node must flush.
///
/// `c` only reads here: with core NATS a ticket resolves when the client takes the message, not
/// when the server accepts it, and a disconnected client takes messages into its own queue, so
/// a cut-off writer's "published" writes are not accepted writes the checker may hold readers to.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cut_without_jetstream_flushes() {
    let _serial = SERIAL.lock().await;
    invalbus_tests::init_tracing();
    let (_, [_a, _b, c]) = cut_scenario(
        "cut_reset_core_nats",
        ProxyMode::Reset,
        Duration::from_millis(2500),
        false,
        |c| c.writer = false,
    )
    .await;
    let s = c.stats();
    assert!(s.repair_flushes > 0, "without a stream c must flush: {s:?}");
    assert_eq!(s.replayed, 0);
}

/// A paused node becomes a slow consumer: `c` (a subscription capacity of 256 messages, a
/// legitimate client setting) stands still for 1.5 s, as a process stopped by the scheduler or
/// a long GC pause would, while its peers write and a noisy publisher floods the namespace with
/// 20,000 messages. When `c` resumes, its client reads the backlog faster than the bus applies
/// it and drops messages (`SlowConsumer`): the bus must notice and repair, and must not serve
/// what it cached before the pause.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paused_node_becomes_slow_consumer() {
    let _serial = SERIAL.lock().await;
    invalbus_tests::init_tracing();
    let server = NatsServer::start_jetstream().await;
    let checker = bound_checker();
    let a = Node::start(&checker, &spec("a", &server.url(), Some(js()))).await;
    let b = Node::start(&checker, &spec("b", &server.url(), Some(js()))).await;
    let mut sc = spec("c", &server.url(), Some(js()));
    sc.nats_options = Some(|| async_nats::ConnectOptions::new().subscription_capacity(256));
    let c = Node::start(&checker, &sc).await;
    let flood = async_nats::connect(server.url()).await.expect("flood client");
    tokio::time::sleep(WARM).await;
    c.pause(Duration::from_millis(1500));
    let payload = bytes::Bytes::from(vec![b'x'; 512]);
    for _ in 0..20_000 {
        flood
            .publish("invalbus.faults.x.flood", payload.clone())
            .await
            .expect("flood publish");
    }
    flood.flush().await.expect("flood flush");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let heal = Instant::now();
    finish(
        "paused_slow_consumer",
        &checker,
        &[&a, &b, &c],
        heal,
        "pause=1500ms flood=20000",
    )
    .await;
    let s = c.stats();
    assert!(
        s.gaps > 0 && s.repairs > 0,
        "c must have noticed what it dropped: {s:?}"
    );
}

/// A node crashes in the middle of a burst of writes (its runtime, NATS connection and pending
/// tickets die at once) and comes back with the same node id, hence a new epoch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_crash_mid_batch_and_restart() {
    let _serial = SERIAL.lock().await;
    invalbus_tests::init_tracing();
    let server = NatsServer::start_jetstream().await;
    let checker = bound_checker();
    let a = Node::start(&checker, &spec("a", &server.url(), Some(js()))).await;
    let b = Node::start(&checker, &spec("b", &server.url(), Some(js()))).await;
    let mut sc = spec("c", &server.url(), Some(js()));
    sc.write_every = Duration::from_millis(1);
    let c = Node::start(&checker, &sc).await;
    tokio::time::sleep(WARM).await;
    // Crash only while c has writes in flight: the middle of a batch.
    let in_flight = eventually(Duration::from_secs(10), || async { c.pending() > 0 }).await;
    assert!(in_flight, "c never had a write in flight");
    let old_epoch = c.bus.epoch();
    let lost = c.pending();
    c.kill();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let c = Node::start(&checker, &sc).await;
    let heal = Instant::now();
    assert_ne!(c.bus.epoch(), old_epoch, "a restart must start a new epoch");
    let report = finish(
        "node_crash_restart",
        &checker,
        &[&a, &b, &c],
        heal,
        &format!("in_flight_at_crash={lost}"),
    )
    .await;
    for n in [&a, &b] {
        let knows = eventually(Duration::from_secs(5), || async {
            n.bus
                .peers()
                .iter()
                .any(|p| p.node_id == "c" && p.epoch == c.bus.epoch())
        })
        .await;
        assert!(knows, "{} does not track c's new epoch", n.id);
    }
    assert!(report.accepted > 0);
}

/// The stream's retention (2 s here) passes while `c` is cut off: what it missed is gone from
/// the stream, so it must flush rather than replay a clipped history. The writers stop 4 s
/// before the heal, so no later batch reveals the loss: only the repair itself can.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_passes_while_cut_off() {
    let _serial = SERIAL.lock().await;
    invalbus_tests::init_tracing();
    let server = NatsServer::start_jetstream().await;
    let proxy = TcpProxy::start(server.addr()).await;
    let checker = bound_checker();
    let short = js().max_age(Duration::from_secs(2));
    let [a, b, c] = three_nodes(&checker, &server, &proxy, Some(short)).await;
    tokio::time::sleep(WARM).await;
    proxy.set_mode(ProxyMode::BlackHole);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    checker.stop_writers();
    tokio::time::sleep(Duration::from_secs(4)).await;
    checker.resume_writers();
    proxy.set_mode(ProxyMode::Pass);
    let heal = Instant::now();
    finish(
        "retention_passed",
        &checker,
        &[&a, &b, &c],
        heal,
        "max_age=2s cut=5500ms",
    )
    .await;
    let s = c.stats();
    assert!(
        s.repair_flushes > 0,
        "c must flush when the stream no longer holds what it missed: {s:?}"
    );
}

/// Failover inside a 3-server cluster (routes, JetStream, stream replicas 3): the server `c` is
/// connected to is killed with SIGKILL; `c` reconnects to another member and repairs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_failover() {
    let _serial = SERIAL.lock().await;
    invalbus_tests::init_tracing();
    let mut cluster = NatsCluster::start(3).await;
    let checker = bound_checker();
    let r3 = js().replicas(3);
    let mut nodes = Vec::new();
    // Each node is given one member; the client learns the others from the server's INFO
    // (`connect_urls`) and fails over to them, as NATS clients do in production. (A
    // comma-separated list is not accepted by `BusBuilder::nats`: async-nats parses a `&str` as
    // one address.)
    for (id, server) in [("a", 0), ("b", 2), ("c", 1)] {
        let s = spec(id, &cluster.servers()[server].url(), Some(r3.clone()));
        nodes.push(Node::start(&checker, &s).await);
    }
    tokio::time::sleep(WARM).await;
    cluster.server_mut(1).kill();
    tokio::time::sleep(Duration::from_secs(3)).await;
    cluster.server_mut(1).restart().await;
    cluster.wait_ready().await;
    let heal = Instant::now();
    let refs: Vec<&Node> = nodes.iter().collect();
    finish("cluster_failover", &checker, &refs, heal, "killed=n1 down=3000ms").await;
    let s = nodes[2].stats();
    assert!(s.repairs > 0, "c must have repaired after failing over: {s:?}");
}
