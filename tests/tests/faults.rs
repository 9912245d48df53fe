//! The fault-injection suite: real nats-server processes, faults injected by killing servers,
//! cutting one node's connection or one route between two servers through TCP proxies, stalling
//! or crashing a node, and letting the stream's retention pass, with a consistency checker
//! reading on every node throughout. Writers invalidate by versioned key, tag, prefix and
//! `all` (see `invalbus_tests::checker`).
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
//! smear one scenario's timings into another's. Each first checks that its fault really
//! happened (a node cut off stopped serving, a slow consumer dropped messages, a route carried
//! nothing), then asserts on the bus.

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

/// Lets the load run after the heal, stops the writers, waits for their tickets, then waits for
/// convergence and delivery and checks them and the staleness bound, and prints the scenario's
/// line.
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
    // A node's caches may have converged (by a flush, or because nothing it held was touched)
    // while the last accepted batches are still on their way to it: its applying them is waited
    // for like convergence, and one never applied still fails the scenario.
    let waited = Instant::now();
    eventually(CONVERGE.saturating_sub(heal.elapsed()).max(WARM), || async move {
        checker.undelivered(nodes).is_empty()
    })
    .await;
    let delivery_waited = waited.elapsed();
    let undelivered = checker.undelivered(nodes);
    let report = checker.report();
    let bound = nodes[0].bus.staleness_bound();
    let summaries: Vec<String> = nodes.iter().map(|n| n.summary()).collect();
    println!(
        "{} converged_in={}ms delivered_after={}ms {} {extra}",
        report.line(name, bound, ""),
        converged_in.as_millis(),
        delivery_waited.as_millis(),
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
    Checker::new(KEYS, checker::HEARTBEAT + checker::MAX_STALENESS)
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
            n.stats().suspect_us > 0,
            "{} kept serving while its only server was down for longer than the bound",
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
    // c only reads: its own invalidations, applied locally while it is cut off, would empty
    // its cache now and then and hide what it missed.
    let (r, _) = cut_scenario(
        "gate_off(expect stale)",
        ProxyMode::BlackHole,
        Duration::from_millis(2500),
        true,
        |c| {
            c.gate_off = true;
            c.writer = false;
        },
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

/// A stalled node becomes a slow consumer: `c` (a subscription capacity of 256 messages, a
/// legitimate client setting) stops reading for 1.5 s, as a node whose receiver is starved or
/// descheduled would, while its NATS client keeps reading the socket, its peers write and a
/// noisy publisher floods the namespace with 20,000 messages. The client's queue overflows and
/// it drops messages (`SlowConsumer`), batches among them: the bus must not serve what it
/// cached before the stall beyond the bound, and must apply what it dropped (from the stream).
///
/// The stall is the bus's test hook rather than a paused thread: with the whole node paused,
/// its client does not read either, so whether the queue overflows on resume depends on
/// scheduling (a test that failed when it did not).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_node_becomes_slow_consumer() {
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
    let replayed_before = c.stats().replayed;
    c.stall_receiver(Duration::from_millis(1500));
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
    // The fault happened: the client dropped messages it could not queue.
    let dropped = eventually(Duration::from_secs(10), || async { c.stats().slow_consumer_events > 0 }).await;
    assert!(dropped, "the flood did not overflow c's queue: {:?}", c.stats());
    finish(
        "stalled_slow_consumer",
        &checker,
        &[&a, &b, &c],
        heal,
        "stall=1500ms flood=20000",
    )
    .await;
    let s = c.stats();
    assert!(
        s.suspect_us > 0,
        "c kept serving through a 1.5 s stall (its evidence is 0.5 s): {s:?}"
    );
    assert!(
        s.replayed > replayed_before,
        "c dropped batches of its peers and must have applied them from the stream: {s:?}"
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
    assert!(
        s.suspect_us > 0,
        "c must have stopped serving while its server was down: {s:?}"
    );
}

/// Moves the batch stream's leader to member `want` of `cluster` (asking the current leader
/// to step down until the election lands there).
async fn place_stream_leader(cluster: &NatsCluster, want: usize) {
    let client = async_nats::connect(cluster.servers()[want].url())
        .await
        .expect("leader client");
    let js = async_nats::jetstream::new(client.clone());
    let name = "INVALBUS_faults";
    let want_name = cluster.servers()[want].name().to_owned();
    for attempt in 0..30 {
        let leader = match js.get_stream(name).await {
            Ok(s) => s.cached_info().cluster.as_ref().and_then(|c| c.leader.clone()),
            Err(_) => None,
        };
        if leader.as_deref() == Some(want_name.as_str()) {
            return;
        }
        if leader.is_some() {
            let _ = client
                .request(format!("$JS.API.STREAM.LEADER.STEPDOWN.{name}"), bytes::Bytes::new())
                .await;
        }
        tokio::time::sleep(Duration::from_millis(300 + 100 * attempt)).await;
    }
    panic!("the stream leader never landed on {want_name}");
}

/// Checks that the route between members `a` and `b` really carries nothing while one between
/// `a` and `c` does: a message published on `a` reaches a subscriber on `c` and not one on `b`.
async fn check_route_cut(cluster: &NatsCluster, a: usize, b: usize, c: usize) {
    use futures::StreamExt;
    let subject = format!("faults.probe.{:08x}", rand::random::<u32>());
    let on_b = async_nats::connect(cluster.servers()[b].url())
        .await
        .expect("probe client b");
    let on_c = async_nats::connect(cluster.servers()[c].url())
        .await
        .expect("probe client c");
    let mut sub_b = on_b.subscribe(subject.clone()).await.expect("subscribe on b");
    let mut sub_c = on_c.subscribe(subject.clone()).await.expect("subscribe on c");
    on_b.flush().await.expect("flush b");
    on_c.flush().await.expect("flush c");
    let from_a = async_nats::connect(cluster.servers()[a].url())
        .await
        .expect("probe client a");
    // Interest of c has to reach a before a's publish: publish until c hears one.
    let heard_on_c = async {
        loop {
            from_a
                .publish(subject.clone(), "probe".into())
                .await
                .expect("probe publish");
            from_a.flush().await.expect("probe flush");
            if let Ok(Some(_)) = tokio::time::timeout(Duration::from_millis(200), sub_c.next()).await {
                return;
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(20), heard_on_c)
        .await
        .expect("a message published on a never reached c: the cluster is broken, not partitioned");
    let on_b_too = tokio::time::timeout(Duration::from_millis(500), sub_b.next()).await;
    assert!(
        on_b_too.is_err(),
        "a message published on member {a} reached member {b}: the route is not cut"
    );
}

/// A route partition inside a 3-server cluster (streams at 3 replicas): the route between the
/// writers' server A and the reader's server B is black-holed for 6 s while every client stays
/// connected. NATS does not relay A's messages to B through C; B's node keeps hearing its own
/// heartbeat. The stream leader sits on `leader`.
async fn route_partition(name: &str, leader: usize, echo_evidence: bool) -> (Report, Vec<Node>) {
    let cluster = NatsCluster::start_with_proxied_routes(3).await;
    let checker = bound_checker();
    let r3 = js().replicas(3);
    let mut nodes = Vec::new();
    // a writes on A; b and c only read, on B and C (the invalidations b still gets would empty
    // its cache now and then, and hide from the control what it misses).
    for (id, server, writer) in [("a", 0, true), ("b", 1, false), ("c", 2, false)] {
        let mut s = spec(id, &cluster.servers()[server].url(), Some(r3.clone()));
        s.writer = writer;
        s.echo_evidence = echo_evidence && id == "b";
        nodes.push(Node::start(&checker, &s).await);
    }
    place_stream_leader(&cluster, leader).await;
    tokio::time::sleep(WARM).await;
    cluster.cut_route(0, 1, ProxyMode::BlackHole);
    check_route_cut(&cluster, 0, 1, 2).await;
    tokio::time::sleep(Duration::from_secs(6)).await;
    cluster.cut_route(0, 1, ProxyMode::Pass);
    let heal = Instant::now();
    let refs: Vec<&Node> = nodes.iter().collect();
    let report = if echo_evidence {
        tokio::time::sleep(WARM).await;
        let r = checker.report();
        println!("{} {}", r.line(name, checker.bound(), ""), nodes[1].summary());
        r
    } else {
        finish(name, &checker, &refs, heal, &format!("leader=n{leader} cut=A-B 6000ms")).await
    };
    (report, nodes)
}

/// The stream leader on the writers' side (A): B's node cannot get its heartbeat committed, so
/// it stops serving until the route heals, then catches up from the stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn route_partition_leader_with_the_writers() {
    let _serial = SERIAL.lock().await;
    invalbus_tests::init_tracing();
    let (r, nodes) = route_partition("route_partition_leader_A", 0, false).await;
    assert!(r.accepted > 0, "no write was accepted during the scenario: {r:?}");
    let b = nodes[1].stats();
    assert!(
        b.suspect_us > 0,
        "b cannot reach the stream leader across the cut route and must have stopped serving: {b:?}"
    );
}

/// The stream leader on the third server (C): B's node still reaches the stream's quorum
/// through C, so it keeps its evidence, and gets A's batches from the stream (they never come
/// to it directly).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn route_partition_leader_on_the_third_server() {
    let _serial = SERIAL.lock().await;
    invalbus_tests::init_tracing();
    let (r, nodes) = route_partition("route_partition_leader_C", 2, false).await;
    assert!(r.accepted > 0, "no write was accepted during the scenario: {r:?}");
    let b = nodes[1].stats();
    // The partition must have reached b: it got a's batches from the stream alone, or (when
    // the stream's leadership moved during the cut, as seen on a loaded machine) it stopped
    // serving for the length of the cut.
    assert!(
        b.replayed > 0 || b.suspect_us >= 5_000_000,
        "b must have applied a's batches from the stream, which alone carried them, or stopped serving: {b:?}"
    );
}

/// The control: with its evidence taken from its own heartbeat through NATS (the gate before
/// the stream gave evidence), B's node keeps hearing itself across the route partition and
/// serves stale reads beyond the bound. The checker must see them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gate_from_own_echo_is_fooled_by_a_route_partition() {
    let _serial = SERIAL.lock().await;
    invalbus_tests::init_tracing();
    let (r, _) = route_partition("route_partition_echo_gate(expect stale)", 0, true).await;
    assert!(
        r.beyond_bound > 0 && r.worst > bound_checker().bound() + SLACK,
        "with the evidence from its own echo, b must serve stale reads beyond the bound: {r:?}"
    );
}

/// A node started before its NATS cluster (and so before JetStream and its meta leader): it
/// answers gRPC health with NOT_SERVING, keeps trying, and comes up by itself once the servers
/// do, without anyone restarting it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_started_before_its_cluster_comes_up_by_itself() {
    let _serial = SERIAL.lock().await;
    invalbus_tests::init_tracing();
    let plan = NatsCluster::plan(3);
    let listen = format!("127.0.0.1:{}", invalbus_tests::free_port());
    let args = invalbus_node::ServeArgs {
        nats: Some(plan.url(0)),
        namespace: Some("startup".into()),
        node_id: Some("early".into()),
        listen: Some(listen.clone()),
        insecure: true,
        ..Default::default()
    };
    let file = invalbus_node::config::parse("[jetstream]\nreplicas = 3\n").expect("config parses");
    let config = invalbus_node::NodeConfig::resolve(file, &args).expect("config resolves");
    let starting = tokio::spawn(invalbus_node::Node::start(config));
    // Not up, but answering: NOT_SERVING.
    let not_serving = eventually(invalbus_tests::DEADLINE, || {
        let listen = listen.clone();
        async move { health(&listen).await == Some(NOT_SERVING) }
    })
    .await;
    assert!(not_serving, "a starting node must answer health with NOT_SERVING");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        !starting.is_finished(),
        "the node gave up (or claims to be up) without servers"
    );
    let cluster = plan.start().await;
    let node = tokio::time::timeout(Duration::from_secs(120), starting)
        .await
        .expect("the node did not come up within 120 s of its servers")
        .expect("node task")
        .expect("the node failed instead of waiting for JetStream");
    assert!(node.bus().serving());
    assert_eq!(health(&listen).await, Some(SERVING));
    node.shutdown().await;
    drop(cluster);
}

const SERVING: i32 = 1;
const NOT_SERVING: i32 = 2;

/// The overall gRPC health status a node at `addr` reports, if it answers.
async fn health(addr: &str) -> Option<i32> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .ok()?
        .connect_timeout(Duration::from_secs(1))
        .connect()
        .await
        .ok()?;
    let mut client = tonic_health::pb::health_client::HealthClient::new(channel);
    let reply = tokio::time::timeout(
        Duration::from_secs(2),
        client.check(tonic_health::pb::HealthCheckRequest { service: String::new() }),
    )
    .await
    .ok()?
    .ok()?;
    Some(reply.into_inner().status)
}

/// A follower whose consumer delivers nothing without knowing it (nats-server before 2.10 drops
/// a pull request that expires just as a message arrives, without the `408` that makes the
/// client pull again; the client notices only after two missed idle heartbeats): the receiver
/// sees this node's heartbeat overdue and restarts the consumer, and the node keeps serving.
/// Without the restart the deaf follower never brings evidence again and the gate closes
/// within the bound (4.5 s here), which the 9 s watch below would catch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_gone_deaf_is_restarted_before_the_gate_closes() {
    let _serial = SERIAL.lock().await;
    invalbus_tests::init_tracing();
    let server = NatsServer::start_jetstream().await;
    let build = |id: &str| {
        invalbus_tests::bus_builder(&server.url(), "deaf", id)
            .heartbeat_interval(Duration::from_millis(500))
            .max_staleness(Duration::from_secs(6))
            .jetstream(js())
    };
    let a = build("a").build().await.expect("bus a");
    let b = build("b").build().await.expect("bus b");
    let on_a = a
        .cache::<u32>("c", invalbus::CacheConfig::new(100))
        .expect("cache on a");
    let on_b = b
        .cache::<u32>("c", invalbus::CacheConfig::new(100))
        .expect("cache on b");
    assert!(
        eventually(invalbus_tests::DEADLINE, || async { a.serving() }).await,
        "a never served"
    );
    on_a.get_or_load("k", || async { Ok::<_, std::io::Error>(invalbus::Loaded::new(1)) })
        .await
        .expect("load k on a");
    a.deafen_follower_for_tests();
    let deafened = Instant::now();
    let evidence_before = a.stats().evidence;
    let mut invalidated = false;
    while deafened.elapsed() < Duration::from_secs(9) {
        assert!(
            a.serving(),
            "a stopped serving {:?} after its follower went deaf: {:?}",
            deafened.elapsed(),
            a.stats()
        );
        if !invalidated && deafened.elapsed() > Duration::from_secs(1) {
            on_b.invalidate_key("k").await.expect("invalidate on b");
            invalidated = true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let s = a.stats();
    assert!(s.follower_restarts >= 1, "the deaf follower was never restarted: {s:?}");
    // What b invalidated meanwhile reached a, and the restarted follower brought evidence again
    // (a serves 9 s after it went deaf, beyond the 6.5 s bound, so on evidence gathered since).
    assert_eq!(on_a.get("k").await, None, "{s:?}");
    assert!(s.evidence > evidence_before, "{s:?}");
}
