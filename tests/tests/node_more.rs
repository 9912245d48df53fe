//! More of the node against real nats-server processes: TLS on the gRPC port, a waiting purge
//! when a node has died, the live audit tail, and the Prometheus endpoint.

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use invalbus::Loaded;
use invalbus_node::pb::admin::admin_client::AdminClient;
use invalbus_node::pb::admin::audit_event::Event;
use invalbus_node::pb::admin::*;
use invalbus_node::{config, Node, NodeConfig, ServeArgs};
use invalbus_tests::{eventually, init_tracing, NatsCluster, NatsServer, DEADLINE};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::transport::{Certificate, Channel, ClientTlsConfig};
use tonic::Request;

const OPS: &str = "ops-token-0123456789";
const READER: &str = "reader-token-0123456789";

const TOKENS: &str = r#"
[[tokens]]
name = "ops"
token = "ops-token-0123456789"
roles = ["read", "purge"]
[[tokens]]
name = "reader"
token = "reader-token-0123456789"
roles = ["read"]
[[caches]]
name = "articles"
max_entries = 1000
[[caches]]
name = "sessions"
max_entries = 1000
"#;

fn node_config(url: &str, ns: &str, node_id: &str, file: &str) -> NodeConfig {
    let file = config::parse(file).expect("test config parses");
    let args = ServeArgs {
        nats: Some(url.to_owned()),
        namespace: Some(ns.to_owned()),
        node_id: Some(node_id.to_owned()),
        listen: Some("127.0.0.1:0".into()),
        metrics_listen: Some("127.0.0.1:0".into()),
        ..Default::default()
    };
    NodeConfig::resolve(file, &args).expect("test config resolves")
}

async fn start(url: &str, ns: &str, node_id: &str) -> Node {
    Node::start(node_config(url, ns, node_id, TOKENS))
        .await
        .unwrap_or_else(|e| panic!("node {node_id}: {e}"))
}

async fn admin(node: &Node) -> AdminClient<Channel> {
    AdminClient::connect(format!("http://{}", node.addr()))
        .await
        .expect("connect to the admin API")
}

fn authed<T>(msg: T, token: &str) -> Request<T> {
    let mut r = Request::new(msg);
    r.metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    r
}

async fn fill(node: &Node, cache: &str, key: &str, tag: &str) {
    let c = node.cache(cache).expect("cache configured");
    let outcome = c
        .reserve(key)
        .fill(Loaded::new(Bytes::from(format!("body of {key}"))).tag(tag))
        .await;
    assert_eq!(
        outcome,
        invalbus::FillOutcome::Filled,
        "fill {cache}/{key} on {}",
        node.bus().node_id()
    );
}

fn purge_tag(tag: &str, reason: &str) -> PurgeRequest {
    PurgeRequest {
        tags: vec![tag.into()],
        reason: reason.into(),
        ..Default::default()
    }
}

/// Waits until every node has heard the heartbeats of all the others.
async fn meet(nodes: &[&Node]) {
    let n = nodes.len() - 1;
    for node in nodes {
        let seen = eventually(DEADLINE, || async { node.bus().peers().len() == n }).await;
        assert!(seen, "{} never heard of its {n} peers", node.bus().node_id());
    }
}

/// A throwaway CA, and a certificate it signed for `localhost` and `127.0.0.1`, written as PEM
/// files into `dir`. Returns the CA's PEM.
fn make_certs(dir: &std::path::Path) -> String {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
    let mut ca = CertificateParams::new(Vec::<String>::new()).expect("CA parameters");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name.push(DnType::CommonName, "invalbus test CA");
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_key = KeyPair::generate().expect("CA key");
    let ca_pem = ca.self_signed(&ca_key).expect("self-sign the CA").pem();
    let issuer = Issuer::new(ca, ca_key);
    let mut leaf = CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()]).expect("names");
    leaf.distinguished_name.push(DnType::CommonName, "localhost");
    leaf.use_authority_key_identifier_extension = true;
    let leaf_key = KeyPair::generate().expect("server key");
    let cert = leaf.signed_by(&leaf_key, &issuer).expect("sign the server certificate");
    std::fs::write(dir.join("server.pem"), cert.pem()).unwrap();
    std::fs::write(dir.join("server.key"), leaf_key.serialize_pem()).unwrap();
    std::fs::write(dir.join("ca.pem"), &ca_pem).unwrap();
    ca_pem
}

async fn tls_channel(addr: SocketAddr, ca_pem: &str) -> Result<Channel, tonic::transport::Error> {
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca_pem))
        .domain_name("localhost");
    Channel::from_shared(format!("https://{addr}"))
        .unwrap()
        .tls_config(tls)?
        .connect_timeout(Duration::from_secs(10))
        .timeout(Duration::from_secs(10))
        .connect()
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_port_with_tls_serves_clients_that_trust_its_ca_and_refuses_plaintext() {
    init_tracing();
    let server = NatsServer::start_jetstream().await;
    let dir = tempfile::tempdir().expect("temporary directory");
    let ca_pem = make_certs(dir.path());
    let file = format!(
        "{TOKENS}\n[tls]\ncert_file = {:?}\nkey_file = {:?}\n",
        dir.path().join("server.pem").display().to_string(),
        dir.path().join("server.key").display().to_string()
    );
    let node = Node::start(node_config(&server.url(), "tls", "t1", &file))
        .await
        .expect("node with TLS starts");

    // A client that trusts the CA calls Stats over TLS.
    let channel = tls_channel(node.addr(), &ca_pem).await.expect("TLS connect");
    let stats = AdminClient::new(channel)
        .stats(authed(StatsRequest {}, READER))
        .await
        .expect("Stats over TLS")
        .into_inner();
    assert_eq!(stats.node.expect("node figures").node_id, "t1");

    // A plaintext client gets nowhere: the port speaks only TLS.
    let plain = async {
        let channel = Channel::from_shared(format!("http://{}", node.addr()))
            .unwrap()
            .connect_timeout(Duration::from_secs(10))
            .timeout(Duration::from_secs(10))
            .connect()
            .await
            .map_err(|e| e.to_string())?;
        AdminClient::new(channel)
            .stats(authed(StatsRequest {}, READER))
            .await
            .map_err(|e| e.to_string())
    };
    let refused = plain.await;
    assert!(refused.is_err(), "a plaintext client was served: {refused:?}");

    // A client that trusts another CA refuses the node's certificate.
    let other = tempfile::tempdir().expect("temporary directory");
    let other_ca = make_certs(other.path());
    let untrusted = match tls_channel(node.addr(), &other_ca).await {
        Err(e) => Err(e.to_string()),
        Ok(ch) => AdminClient::new(ch)
            .stats(authed(StatsRequest {}, READER))
            .await
            .map(|_| ())
            .map_err(|e| e.to_string()),
    };
    assert!(untrusted.is_err(), "a certificate from an unknown CA was accepted");
    node.shutdown().await;
}

/// A node in a runtime of its own, so the test can crash it: shutting the runtime down stops
/// every task of the node (bus, audit recorder, NATS connections) where it stands.
struct Doomed {
    rt: tokio::runtime::Runtime,
    node: Node,
}

impl Doomed {
    async fn start(config: NodeConfig) -> Doomed {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("a runtime for the doomed node");
        let node = rt
            .spawn(Node::start(config))
            .await
            .expect("start task")
            .expect("doomed node starts");
        Doomed { rt, node }
    }

    fn kill(self) {
        self.rt.shutdown_background();
        // Its handle refers to tasks that no longer exist; dropping it could try to reach them.
        std::mem::forget(self.node);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_purge_names_a_dead_node_missing_within_its_deadline() {
    init_tracing();
    let server = NatsServer::start_jetstream().await;
    let url = server.url();
    let n1 = start(&url, "dead", "n1").await;
    let n2 = start(&url, "dead", "n2").await;
    let n3 = Doomed::start(node_config(&url, "dead", "n3", TOKENS)).await;
    meet(&[&n1, &n2, &n3.node]).await;
    for n in [&n1, &n2] {
        fill(n, "articles", "post:1", "author:42").await;
    }
    // n3 was seen alive a moment ago; it dies before the purge, so it never applies it.
    n3.kill();

    let mut client = admin(&n1).await;
    let wait_ms = 3_000;
    let began = Instant::now();
    let resp = client
        .purge(authed(
            // Each live node holds post:1, so each receipt says it dropped one entry.
            PurgeRequest {
                keys: vec!["post:1".into()],
                reason: "n3 died".into(),
                wait: true,
                wait_timeout_ms: wait_ms,
                ..Default::default()
            },
            OPS,
        ))
        .await
        .expect("purge")
        .into_inner();
    let took = began.elapsed();

    assert_eq!(resp.missing_nodes, vec!["n3".to_owned()], "response: {resp:?}");
    let applied: BTreeSet<_> = resp.receipts.iter().map(|r| r.node.as_str()).collect();
    assert_eq!(applied, BTreeSet::from(["n1", "n2"]), "response: {resp:?}");
    for r in &resp.receipts {
        assert_eq!(r.dropped, 1, "receipt of {} says it dropped {}", r.node, r.dropped);
        assert!(r.purge_ids.contains(&resp.purge_id), "receipt {r:?}");
    }
    // It waited for n3 until the deadline, and not much longer (the stream lookup before calling
    // n3 missing is bounded too). The slack is generous for a busy 2-core machine.
    let wait = Duration::from_millis(u64::from(wait_ms));
    assert!(took >= wait, "answered after {took:?}, before the {wait:?} deadline");
    assert!(
        took <= wait + Duration::from_secs(8),
        "answered after {took:?}, long past the {wait:?} deadline"
    );
    // The live nodes really dropped the entry.
    for n in [&n1, &n2] {
        assert_eq!(
            n.cache("articles").unwrap().get("post:1").await,
            None,
            "post:1 still cached on {}",
            n.bus().node_id()
        );
    }
    drop(client);
    n1.shutdown().await;
    n2.shutdown().await;
}

fn mentions(e: &AuditEvent, purge_id: &str) -> bool {
    match &e.event {
        Some(Event::Record(r)) => r.invalidations.iter().any(|i| i.purge_id == purge_id),
        Some(Event::Receipt(r)) => r.purge_ids.iter().any(|p| p == purge_id),
        None => false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_tail_streams_matching_purges_with_every_receipt_and_skips_others() {
    init_tracing();
    let server = NatsServer::start_jetstream().await;
    let url = server.url();
    let ids = ["w1", "w2", "w3"];
    let mut nodes = Vec::new();
    for id in ids {
        nodes.push(start(&url, "watch", id).await);
    }
    meet(&nodes.iter().collect::<Vec<_>>()).await;

    // Tail the audit on w2; purge through w1.
    let mut watcher = admin(&nodes[1]).await;
    let mut tail = watcher
        .watch_audit(authed(
            WatchAuditRequest {
                filter: Some(AuditFilter {
                    tag: "author:42".into(),
                    ..Default::default()
                }),
            },
            READER,
        ))
        .await
        .expect("WatchAudit")
        .into_inner();
    let client = admin(&nodes[0]).await;
    let purge = |req: PurgeRequest| {
        let mut c = client.clone();
        async move { c.purge(authed(req, OPS)).await.expect("purge").into_inner() }
    };
    let mut next = async |waiting_for: &str| -> AuditEvent {
        match tokio::time::timeout(DEADLINE, tail.message()).await {
            Ok(Ok(Some(e))) => e,
            other => panic!("audit tail ended or stalled ({other:?}) waiting for {waiting_for}"),
        }
    };

    // A matching purge arrives as a record, followed by the receipt of every node.
    let first = purge(purge_tag("author:42", "first")).await;
    let mut record = None;
    let mut receipts = BTreeSet::new();
    while record.is_none() || receipts.len() < ids.len() {
        let e = next(&format!(
            "the first purge's record ({}) or receipts (have {receipts:?})",
            record.is_some()
        ))
        .await;
        assert!(mentions(&e, &first.purge_id), "unexpected event {e:?}");
        match e.event {
            Some(Event::Record(r)) => record = Some(r),
            Some(Event::Receipt(r)) => {
                receipts.insert(r.node.clone());
            }
            None => panic!("empty event"),
        }
    }
    let record = record.unwrap();
    assert_eq!(record.origin, "w1");
    assert_eq!(record.invalidations.len(), 1);
    let inv = &record.invalidations[0];
    assert_eq!((inv.kind.as_str(), inv.target.as_str()), ("tag", "author:42"));
    assert_eq!((inv.actor.as_str(), inv.reason.as_str()), ("ops", "first"));
    assert_eq!(receipts, ids.iter().map(|s| s.to_string()).collect());

    // A purge of another tag is not shown; a later matching one is. Batches of one origin arrive
    // in order, so once the later one is here, the other would have been too.
    let other = purge(purge_tag("author:7", "other")).await;
    let later = purge(purge_tag("author:42", "later")).await;
    loop {
        let e = next("the later purge's record").await;
        assert!(
            !mentions(&e, &other.purge_id),
            "a non-matching purge was streamed: {e:?}"
        );
        if matches!(&e.event, Some(Event::Record(_))) && mentions(&e, &later.purge_id) {
            break;
        }
    }
    drop((tail, watcher, client));
    for n in nodes {
        n.shutdown().await;
    }
}

/// In a NATS cluster, a tail opened through a node on one server sees a purge made through a
/// node on another server right after the tail opened: the tail reads the streams, whose leader
/// confirmed its consumers before WatchAudit answered (subscription interest, by contrast,
/// reaches the other servers a moment later).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_tail_in_a_nats_cluster_sees_a_purge_made_right_after_it_opened() {
    init_tracing();
    let mut cluster = NatsCluster::start(3).await;
    let a = start(&cluster.server_mut(0).url(), "cwatch", "c1").await;
    let b = start(&cluster.server_mut(1).url(), "cwatch", "c2").await;
    meet(&[&a, &b]).await;
    let mut watcher = admin(&a).await;
    let mut client = admin(&b).await;
    for round in 0..5 {
        let tag = format!("round:{round}");
        let mut tail = watcher
            .watch_audit(authed(
                WatchAuditRequest {
                    filter: Some(AuditFilter {
                        tag: tag.clone(),
                        ..Default::default()
                    }),
                },
                READER,
            ))
            .await
            .expect("WatchAudit")
            .into_inner();
        let p = client
            .purge(authed(purge_tag(&tag, "right after the tail opened"), OPS))
            .await
            .expect("purge")
            .into_inner();
        loop {
            match tokio::time::timeout(DEADLINE, tail.message()).await {
                Ok(Ok(Some(e))) => {
                    if matches!(&e.event, Some(Event::Record(_))) && mentions(&e, &p.purge_id) {
                        break;
                    }
                }
                other => panic!("round {round}: the purge never reached the tail ({other:?})"),
            }
        }
    }
    drop((watcher, client));
    a.shutdown().await;
    b.shutdown().await;
}

/// `GET /metrics` written by hand; returns the status line and the body.
async fn scrape(addr: SocketAddr, path: &str) -> (String, String) {
    let mut conn = tokio::net::TcpStream::connect(addr).await.expect("connect to /metrics");
    conn.write_all(format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut raw = Vec::new();
    tokio::time::timeout(DEADLINE, conn.read_to_end(&mut raw))
        .await
        .expect("metrics answer in time")
        .expect("read the metrics answer");
    let text = String::from_utf8(raw).expect("metrics are text");
    let (head, body) = text.split_once("\r\n\r\n").expect("an HTTP answer");
    (head.lines().next().unwrap_or("").to_owned(), body.to_owned())
}

/// Samples of the Prometheus text format: `name{labels}` to value.
fn samples(body: &str) -> HashMap<String, f64> {
    body.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            Some((k.to_owned(), v.parse().ok()?))
        })
        .collect()
}

async fn metrics(node: &Node) -> HashMap<String, f64> {
    let (status, body) = scrape(node.metrics_addr().expect("metrics served"), "/metrics").await;
    assert_eq!(status, "HTTP/1.1 200 OK");
    samples(&body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_endpoint_counts_cache_traffic_invalidations_and_propagation() {
    init_tracing();
    let server = NatsServer::start_jetstream().await;
    let url = server.url();
    let m1 = start(&url, "metrics", "m1").await;
    let m2 = start(&url, "metrics", "m2").await;
    meet(&[&m1, &m2]).await;

    // Traffic on m2: two hits and a miss on articles, three misses on sessions.
    fill(&m2, "articles", "post:1", "author:42").await;
    let articles = m2.cache("articles").unwrap();
    let sessions = m2.cache("sessions").unwrap();
    assert!(articles.get("post:1").await.is_some());
    assert!(articles.get("post:1").await.is_some());
    assert!(articles.get("post:2").await.is_none());
    for s in ["s1", "s2", "s3"] {
        assert!(sessions.get(s).await.is_none());
    }
    // A purge through m1, which m2 applies.
    let resp = admin(&m1)
        .await
        .purge(authed(
            PurgeRequest {
                wait: true,
                wait_timeout_ms: 15_000,
                ..purge_tag("author:42", "metrics")
            },
            OPS,
        ))
        .await
        .expect("purge")
        .into_inner();
    assert!(resp.missing_nodes.is_empty(), "{resp:?}");

    // The receipt came from m2, but its histogram may be updated a moment later: poll.
    let until = Instant::now() + DEADLINE;
    let m = loop {
        let m = metrics(&m2).await;
        let counted = m
            .get("invalbus_propagation_seconds_count{node=\"m2\"}")
            .copied()
            .unwrap_or(0.0);
        if counted >= 1.0 {
            break m;
        }
        assert!(
            Instant::now() < until,
            "m2's propagation histogram never counted the purge: {m:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };

    let get = |k: &str| *m.get(k).unwrap_or_else(|| panic!("no sample {k} in {m:?}"));
    assert_eq!(get("invalbus_cache_hits_total{node=\"m2\",cache=\"articles\"}"), 2.0);
    assert_eq!(get("invalbus_cache_misses_total{node=\"m2\",cache=\"articles\"}"), 1.0);
    assert_eq!(get("invalbus_cache_hits_total{node=\"m2\",cache=\"sessions\"}"), 0.0);
    assert_eq!(get("invalbus_cache_misses_total{node=\"m2\",cache=\"sessions\"}"), 3.0);
    assert_eq!(get("invalbus_invalidations_received_total{node=\"m2\"}"), 1.0);
    assert_eq!(get("invalbus_invalidations_published_total{node=\"m2\"}"), 0.0);
    assert!(get("invalbus_cache_invalidations_applied_total{node=\"m2\",cache=\"articles\"}") >= 1.0);
    assert_eq!(get("invalbus_cache_entries{node=\"m2\",cache=\"articles\"}"), 0.0);

    // The histogram: cumulative buckets ending in +Inf = count, and a positive sum.
    let count = get("invalbus_propagation_seconds_count{node=\"m2\"}");
    assert_eq!(count, 1.0, "one batch from a peer");
    assert!(get("invalbus_propagation_seconds_sum{node=\"m2\"}") > 0.0);
    assert_eq!(
        get("invalbus_propagation_seconds_bucket{node=\"m2\",le=\"+Inf\"}"),
        count
    );
    let mut buckets: Vec<(f64, f64)> = m
        .iter()
        .filter_map(|(k, v)| {
            let le = k
                .strip_prefix("invalbus_propagation_seconds_bucket{node=\"m2\",le=\"")?
                .strip_suffix("\"}")?;
            Some((le.parse::<f64>().ok()?, *v))
        })
        .collect();
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    assert!(buckets.len() >= 5, "few buckets: {buckets:?}");
    assert!(
        buckets.windows(2).all(|w| w[0].1 <= w[1].1),
        "buckets not cumulative: {buckets:?}"
    );

    // The publishing side counts what it published; the figures match Stats.
    let m1m = metrics(&m1).await;
    assert_eq!(
        m1m.get("invalbus_invalidations_published_total{node=\"m1\"}"),
        Some(&1.0)
    );
    assert_eq!(m1m.get("invalbus_purges_total{node=\"m1\"}"), Some(&1.0));
    let stats = admin(&m2)
        .await
        .stats(authed(StatsRequest {}, READER))
        .await
        .expect("Stats")
        .into_inner();
    let a = stats
        .caches
        .iter()
        .find(|c| c.name == "articles")
        .expect("articles stats");
    assert_eq!((a.hits, a.misses), (2, 1));

    // Anything but /metrics is a 404.
    let (status, _) = scrape(m2.metrics_addr().unwrap(), "/other").await;
    assert_eq!(status, "HTTP/1.1 404 Not Found");
    m1.shutdown().await;
    m2.shutdown().await;
}
