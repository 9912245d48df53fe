//! The node against a real nats-server: purges through the admin API reach every node and are
//! audited with receipts that survive a restart; tokens, roles and bad input are refused.

use std::collections::{BTreeMap, BTreeSet};

use bytes::Bytes;
use invalbus::{CacheConfig, Loaded};
use invalbus_node::pb::admin::admin_client::AdminClient;
use invalbus_node::pb::admin::*;
use invalbus_node::pb::cache::cache_client::CacheClient;
use invalbus_node::pb::cache::{FillRequest, GetRequest, InvalidateKeyRequest, SetRequest};
use invalbus_node::{config, Node, NodeConfig, ServeArgs};
use invalbus_tests::{bus_builder, eventually, init_tracing, NatsServer, DEADLINE};
use tonic::transport::Channel;
use tonic::{Code, Request};

const OPS: &str = "ops-token-0123456789";
const READER: &str = "reader-token-0123456789";
const SIDECAR: &str = "sidecar-token-0123456789";

const TOKENS: &str = r#"
[[tokens]]
name = "ops"
token = "ops-token-0123456789"
roles = ["read", "purge"]
[[tokens]]
name = "reader"
token = "reader-token-0123456789"
roles = ["read"]
[[tokens]]
name = "sidecar"
token = "sidecar-token-0123456789"
roles = ["cache"]
[[caches]]
name = "articles"
max_entries = 1000
"#;

fn node_config(url: &str, ns: &str, node_id: &str, file: &str, insecure: bool) -> NodeConfig {
    let file = config::parse(file).expect("test config parses");
    let args = ServeArgs {
        nats: Some(url.to_owned()),
        namespace: Some(ns.to_owned()),
        node_id: Some(node_id.to_owned()),
        listen: Some("127.0.0.1:0".into()),
        insecure,
        ..Default::default()
    };
    NodeConfig::resolve(file, &args).expect("test config resolves")
}

async fn start(url: &str, ns: &str, node_id: &str) -> Node {
    Node::start(node_config(url, ns, node_id, TOKENS, false))
        .await
        .unwrap_or_else(|e| panic!("node {node_id}: {e}"))
}

async fn admin(node: &Node) -> AdminClient<Channel> {
    AdminClient::connect(format!("http://{}", node.addr()))
        .await
        .expect("connect to the admin API")
}

async fn channel(node: &Node) -> Channel {
    Channel::from_shared(format!("http://{}", node.addr()))
        .unwrap()
        .connect()
        .await
        .expect("connect to the node")
}

fn authed<T>(msg: T, token: Option<&str>) -> Request<T> {
    let mut r = Request::new(msg);
    if let Some(t) = token {
        r.metadata_mut()
            .insert("authorization", format!("Bearer {t}").parse().unwrap());
    }
    r
}

async fn fill(node: &Node, key: &str, tag: &str) {
    let cache = node.cache("articles").expect("articles cache");
    let outcome = cache
        .reserve(key)
        .fill(Loaded::new(Bytes::from(format!("body of {key}"))).tag(tag))
        .await;
    assert_eq!(
        outcome,
        invalbus::FillOutcome::Filled,
        "fill {key} on {}",
        node.bus().node_id()
    );
}

/// Purges as `ops` and waits up to 15 s for the receipts of every node that writes them.
async fn purge_and_wait(client: &mut AdminClient<Channel>, request: PurgeRequest) -> PurgeResponse {
    let request = PurgeRequest {
        wait: true,
        wait_timeout_ms: 15_000,
        ..request
    };
    client
        .purge(authed(request, Some(OPS)))
        .await
        .expect("purge")
        .into_inner()
}

async fn query_by_purge(client: &mut AdminClient<Channel>, purge_id: &str) -> QueryAuditResponse {
    client
        .query_audit(authed(
            QueryAuditRequest {
                filter: Some(AuditFilter {
                    purge_id: purge_id.to_owned(),
                    ..Default::default()
                }),
                page_size: 10,
                page_token: String::new(),
            },
            Some(READER),
        ))
        .await
        .expect("QueryAudit")
        .into_inner()
}

fn dropped_by_node(receipts: &[Receipt]) -> BTreeMap<String, u64> {
    receipts.iter().map(|r| (r.node.clone(), r.dropped)).collect()
}

fn receipt_nodes(r: &AuditRecord) -> BTreeSet<String> {
    r.receipts.iter().map(|r| r.node.clone()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purge_by_tag_reaches_every_node_and_its_audit_survives_a_restart() {
    init_tracing();
    let server = NatsServer::start_jetstream().await;
    let url = server.url();
    let ids = ["n1", "n2", "n3"];
    let mut nodes = Vec::new();
    for id in ids {
        nodes.push(start(&url, "audit", id).await);
    }
    for n in &nodes {
        let seen = eventually(DEADLINE, || async { n.bus().peers().len() == 2 }).await;
        assert!(seen, "{} never heard of both peers", n.bus().node_id());
    }
    // Each node holds post:1..3 and a number of its own entries by author 42, so each receipt
    // has its own count: n1 drops 2, n2 3, n3 4.
    let mut want_dropped = BTreeMap::new();
    for (i, n) in nodes.iter().enumerate() {
        fill(n, "post:1", "author:42").await;
        fill(n, "post:2", "author:42").await;
        fill(n, "post:3", "author:7").await;
        for j in 0..i {
            fill(n, &format!("draft:{j}"), "author:42").await;
        }
        want_dropped.insert(n.bus().node_id().to_owned(), 2 + i as u64);
    }

    let mut client = admin(&nodes[0]).await;
    let resp = purge_and_wait(
        &mut client,
        PurgeRequest {
            tags: vec!["author:42".into()],
            reason: "byline was wrong".into(),
            ..Default::default()
        },
    )
    .await;
    assert!(resp.purge_id.starts_with("pg-"));
    assert!(
        resp.missing_nodes.is_empty(),
        "nodes without receipt: {:?}",
        resp.missing_nodes
    );
    let applied: BTreeSet<_> = resp.receipts.iter().map(|r| r.node.clone()).collect();
    assert_eq!(applied, ids.iter().map(|s| s.to_string()).collect());
    // The tag purge hid the entries at once; each receipt says how many the node dropped.
    assert_eq!(dropped_by_node(&resp.receipts), want_dropped, "response: {resp:?}");

    // Every node applied it (its receipt says so): the tagged entries are gone, the others stay.
    for n in &nodes {
        let c = n.cache("articles").unwrap();
        assert_eq!(
            c.get("post:1").await,
            None,
            "post:1 still cached on {}",
            n.bus().node_id()
        );
        assert_eq!(
            c.get("post:2").await,
            None,
            "post:2 still cached on {}",
            n.bus().node_id()
        );
        assert!(c.get("post:3").await.is_some(), "post:3 lost on {}", n.bus().node_id());
    }

    // The audit log holds the purge, who did it and why, and a receipt from each node.
    let want: BTreeSet<String> = ids.iter().map(|s| s.to_string()).collect();
    let until = std::time::Instant::now() + DEADLINE;
    let mut last = query_by_purge(&mut client, &resp.purge_id).await;
    let complete = loop {
        if last.records.len() == 1 && receipt_nodes(&last.records[0]) == want {
            break true;
        }
        if std::time::Instant::now() > until {
            break false;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        last = query_by_purge(&mut client, &resp.purge_id).await;
    };
    assert!(complete, "audit never showed three receipts: {last:?}");
    let rec = &last.records[0];
    assert_eq!(dropped_by_node(&rec.receipts), want_dropped, "record: {rec:?}");
    assert_eq!(rec.origin, "n1");
    assert_eq!(rec.invalidations.len(), 1);
    let inv = &rec.invalidations[0];
    assert_eq!((inv.kind.as_str(), inv.target.as_str()), ("tag", "author:42"));
    assert_eq!(inv.actor, "ops");
    assert_eq!(inv.reason, "byline was wrong");

    // The other filters find it too; a filter it does not match does not.
    let by = |f: AuditFilter| QueryAuditRequest {
        filter: Some(f),
        page_size: 10,
        page_token: String::new(),
    };
    for (f, hits) in [
        (
            AuditFilter {
                tag: "author:42".into(),
                ..Default::default()
            },
            1,
        ),
        (
            AuditFilter {
                actor: "ops".into(),
                ..Default::default()
            },
            1,
        ),
        (
            AuditFilter {
                origin: "n1".into(),
                ..Default::default()
            },
            1,
        ),
        (
            AuditFilter {
                origin: "n2".into(),
                ..Default::default()
            },
            0,
        ),
        (
            AuditFilter {
                tag: "author:7".into(),
                ..Default::default()
            },
            0,
        ),
        (
            AuditFilter {
                since_us: invalbus::now_us() + 3_600_000_000,
                ..Default::default()
            },
            0,
        ),
    ] {
        let got = client
            .query_audit(authed(by(f.clone()), Some(READER)))
            .await
            .expect("QueryAudit")
            .into_inner();
        assert_eq!(got.records.len(), hits, "filter {f:?}");
    }

    // Restart the node that answered: the audit is in JetStream, not in the node.
    let first = nodes.remove(0);
    first.shutdown().await;
    let restarted = start(&url, "audit", "n1").await;
    let mut client = admin(&restarted).await;
    let after = query_by_purge(&mut client, &resp.purge_id).await;
    assert_eq!(after.records.len(), 1, "audit lost across the restart: {after:?}");
    assert_eq!(receipt_nodes(&after.records[0]), want);
    assert_eq!(dropped_by_node(&after.records[0].receipts), want_dropped);

    // A prefix purge counts too: n2 and n3 still hold post:3; the restarted n1 holds nothing.
    let seen = eventually(DEADLINE, || async { restarted.bus().peers().len() == 2 }).await;
    assert!(seen, "the restarted n1 never heard of both peers");
    for n in &nodes {
        fill(n, "page:1", "author:7").await;
    }
    let resp = purge_and_wait(
        &mut client,
        PurgeRequest {
            prefixes: vec!["post:".into()],
            reason: "posts moved".into(),
            ..Default::default()
        },
    )
    .await;
    assert!(resp.missing_nodes.is_empty(), "response: {resp:?}");
    let want_dropped = BTreeMap::from([("n1".to_owned(), 0), ("n2".to_owned(), 1), ("n3".to_owned(), 1)]);
    assert_eq!(dropped_by_node(&resp.receipts), want_dropped, "response: {resp:?}");
    for n in &nodes {
        let c = n.cache("articles").unwrap();
        assert_eq!(
            c.get("post:3").await,
            None,
            "post:3 still cached on {}",
            n.bus().node_id()
        );
        assert!(c.get("page:1").await.is_some(), "page:1 lost on {}", n.bus().node_id());
    }

    restarted.shutdown().await;
    for n in nodes {
        n.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_pages_newest_first() {
    init_tracing();
    let server = NatsServer::start_jetstream().await;
    let node = start(&server.url(), "paging", "p1").await;
    let mut client = admin(&node).await;
    for i in 0..5 {
        client
            .purge(authed(
                PurgeRequest {
                    keys: vec![format!("k{i}")],
                    reason: format!("purge {i}"),
                    ..Default::default()
                },
                Some(OPS),
            ))
            .await
            .expect("purge");
    }
    let mut seen = Vec::new();
    let mut token = String::new();
    loop {
        let page = client
            .query_audit(authed(
                QueryAuditRequest {
                    filter: None,
                    page_size: 2,
                    page_token: token.clone(),
                },
                Some(READER),
            ))
            .await
            .expect("QueryAudit")
            .into_inner();
        assert!(page.records.len() <= 2);
        seen.extend(page.records.iter().map(|r| r.invalidations[0].target.clone()));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(seen, vec!["k4", "k3", "k2", "k1", "k0"]);
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_roles_and_bad_input_are_refused_before_the_bus() {
    init_tracing();
    let server = NatsServer::start_jetstream().await;
    let node = start(&server.url(), "refusals", "r1").await;
    let mut client = admin(&node).await;

    // Health and reflection need no token.
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel(&node).await);
    let h = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "invalbus.admin.v1.Admin".into(),
        })
        .await
        .expect("health check")
        .into_inner();
    assert_eq!(
        h.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
    assert!(list_services_v1(&node)
        .await
        .contains(&"invalbus.admin.v1.Admin".to_string()));
    assert!(list_services_v1alpha(&node)
        .await
        .contains(&"invalbus.cache.v1.Cache".to_string()));

    // Unauthenticated: no token, an unknown token.
    for token in [None, Some("not-a-token-at-all")] {
        let e = client.stats(authed(StatsRequest {}, token)).await.unwrap_err();
        assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    }
    // Permission denied: a reader cannot purge, a purge token cannot use the sidecar, the sidecar
    // token cannot read the audit.
    let purge = PurgeRequest {
        tags: vec!["t".into()],
        reason: "r".into(),
        ..Default::default()
    };
    let e = client.purge(authed(purge.clone(), Some(READER))).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    let e = client
        .query_audit(authed(QueryAuditRequest::default(), Some(SIDECAR)))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    let mut sidecar = CacheClient::connect(format!("http://{}", node.addr())).await.unwrap();
    let get = GetRequest {
        cache: "articles".into(),
        key: "k".into(),
        ..Default::default()
    };
    let e = sidecar.get(authed(get.clone(), Some(OPS))).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");

    // Bad purges: each says what to fix.
    let long = "x".repeat(2000);
    let cases: Vec<(PurgeRequest, &str)> = vec![
        (
            PurgeRequest {
                reason: "r".into(),
                ..Default::default()
            },
            "empty purge",
        ),
        (
            PurgeRequest {
                tags: vec!["t".into()],
                ..Default::default()
            },
            "reason is required",
        ),
        (
            PurgeRequest {
                tags: (0..257).map(|i| format!("t{i}")).collect(),
                reason: "r".into(),
                ..Default::default()
            },
            "at most 256",
        ),
        (
            PurgeRequest {
                keys: vec![long.clone()],
                reason: "r".into(),
                ..Default::default()
            },
            "at most 1024",
        ),
        (
            PurgeRequest {
                keys: vec![String::new()],
                reason: "r".into(),
                ..Default::default()
            },
            "empty key",
        ),
        (
            PurgeRequest {
                tags: vec!["t".into()],
                cache: "nosuch".into(),
                reason: "r".into(),
                ..Default::default()
            },
            "unknown cache \"nosuch\"",
        ),
        (
            PurgeRequest {
                all: true,
                tags: vec!["t".into()],
                reason: "r".into(),
                ..Default::default()
            },
            "do not also give",
        ),
        (
            PurgeRequest {
                tags: vec!["t".into()],
                reason: "r".into(),
                wait: true,
                wait_timeout_ms: 3_600_000,
                ..Default::default()
            },
            "wait_timeout_ms",
        ),
    ];
    for (req, hint) in cases {
        let e = client.purge(authed(req, Some(OPS))).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
        assert!(e.message().contains(hint), "message {:?} lacks {hint:?}", e.message());
    }
    // Bad audit queries.
    let q = |f: AuditFilter, page_size: u32, page_token: &str| QueryAuditRequest {
        filter: Some(f),
        page_size,
        page_token: page_token.into(),
    };
    let cases = vec![
        (
            q(
                AuditFilter {
                    since_us: 10,
                    until_us: 5,
                    ..Default::default()
                },
                0,
                "",
            ),
            "swap",
        ),
        (
            q(
                AuditFilter {
                    origin: "a.b".into(),
                    ..Default::default()
                },
                0,
                "",
            ),
            "node id",
        ),
        (
            q(
                AuditFilter {
                    key: long.clone(),
                    ..Default::default()
                },
                0,
                "",
            ),
            "filter.key",
        ),
        (q(AuditFilter::default(), 100_000, ""), "page_size"),
        (q(AuditFilter::default(), 0, "garbage"), "page_token"),
    ];
    for (req, hint) in cases {
        let e = client.query_audit(authed(req, Some(READER))).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
        assert!(e.message().contains(hint), "message {:?} lacks {hint:?}", e.message());
    }
    let e = client
        .watch_audit(authed(
            WatchAuditRequest {
                filter: Some(AuditFilter {
                    since_us: 10,
                    until_us: 5,
                    ..Default::default()
                }),
            },
            Some(READER),
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    // Bad sidecar calls.
    let e = sidecar
        .get(authed(
            GetRequest {
                cache: "nosuch".into(),
                key: "k".into(),
                ..Default::default()
            },
            Some(SIDECAR),
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("unknown cache"));

    // None of it reached the bus; all of it was counted.
    assert_eq!(node.bus().stats().batches_published, 0, "a refused purge was published");
    let stats = client
        .stats(authed(StatsRequest {}, Some(READER)))
        .await
        .unwrap()
        .into_inner();
    let n = stats.node.unwrap();
    assert_eq!(n.purges, 0);
    assert_eq!(n.refused_calls, 2 + 3 + 8 + 5 + 1 + 1);
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_tokens_calls_are_refused_unless_insecure() {
    init_tracing();
    let server = NatsServer::start_jetstream().await;
    let closed = Node::start(node_config(&server.url(), "open", "c1", "", false))
        .await
        .unwrap();
    let e = admin(&closed)
        .await
        .stats(Request::new(StatsRequest {}))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    assert!(e.message().contains("--insecure"), "{}", e.message());
    closed.shutdown().await;
    let open = Node::start(node_config(&server.url(), "open", "o1", "", true))
        .await
        .unwrap();
    admin(&open)
        .await
        .stats(Request::new(StatsRequest {}))
        .await
        .expect("an insecure node serves without a token");
    open.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecar_refuses_a_fill_overtaken_by_an_invalidation_from_another_node() {
    init_tracing();
    let server = NatsServer::start_jetstream().await;
    let a = start(&server.url(), "sidecar", "s1").await;
    let b = start(&server.url(), "sidecar", "s2").await;
    assert!(
        eventually(DEADLINE, || async {
            a.bus().peers().len() == 1 && b.bus().peers().len() == 1
        })
        .await
    );
    let mut ca = CacheClient::connect(format!("http://{}", a.addr())).await.unwrap();
    let mut cb = CacheClient::connect(format!("http://{}", b.addr())).await.unwrap();
    let get = |key: &str| GetRequest {
        cache: "articles".into(),
        key: key.into(),
        ..Default::default()
    };
    // Set and read back.
    let stored = ca
        .set(authed(
            SetRequest {
                cache: "articles".into(),
                key: "k1".into(),
                value: b"v1".to_vec(),
                tags: vec!["t".into()],
                version: Some(1),
                ttl_ms: 0,
                ..Default::default()
            },
            Some(SIDECAR),
        ))
        .await
        .unwrap()
        .into_inner()
        .stored;
    assert!(stored);
    let got = ca.get(authed(get("k1"), Some(SIDECAR))).await.unwrap().into_inner();
    assert_eq!((got.found, got.value), (true, b"v1".to_vec()));
    // A miss reserves; a write on the other node invalidates the key; the stale fill is refused.
    let r = ca
        .get_or_reserve(authed(get("k2"), Some(SIDECAR)))
        .await
        .unwrap()
        .into_inner();
    assert!(!r.found && !r.reservation.is_empty());
    cb.invalidate_key(authed(
        InvalidateKeyRequest {
            cache: "articles".into(),
            key: "k2".into(),
            version: Some(2),
            reason: "write".into(),
        },
        Some(SIDECAR),
    ))
    .await
    .unwrap();
    let applied = eventually(DEADLINE, || async { a.bus().stats().batches_received >= 1 }).await;
    assert!(applied);
    let filled = ca
        .fill(authed(
            FillRequest {
                reservation: r.reservation,
                value: b"old".to_vec(),
                tags: vec![],
                version: Some(1),
                ttl_ms: 0,
            },
            Some(SIDECAR),
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(!filled.stored, "a fill overtaken by an invalidation was stored");
    let got = ca.get(authed(get("k2"), Some(SIDECAR))).await.unwrap().into_inner();
    assert!(!got.found);
    a.shutdown().await;
    b.shutdown().await;
}

async fn list_services_v1(node: &Node) -> Vec<String> {
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    let mut c = ServerReflectionClient::new(channel(node).await);
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut resp = c
        .server_reflection_info(futures::stream::iter(vec![req]))
        .await
        .expect("reflection v1")
        .into_inner();
    match resp.message().await.unwrap().and_then(|m| m.message_response) {
        Some(MessageResponse::ListServicesResponse(l)) => l.service.into_iter().map(|s| s.name).collect(),
        other => panic!("unexpected reflection answer {other:?}"),
    }
}

async fn list_services_v1alpha(node: &Node) -> Vec<String> {
    use tonic_reflection::pb::v1alpha::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1alpha::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1alpha::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1alpha::ServerReflectionRequest;
    let mut c = ServerReflectionClient::new(channel(node).await);
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut resp = c
        .server_reflection_info(futures::stream::iter(vec![req]))
        .await
        .expect("reflection v1alpha")
        .into_inner();
    match resp.message().await.unwrap().and_then(|m| m.message_response) {
        Some(MessageResponse::ListServicesResponse(l)) => l.service.into_iter().map(|s| s.name).collect(),
        other => panic!("unexpected reflection answer {other:?}"),
    }
}

/// Replicas that embed the library, with no node binary, write receipts too: a waiting purge
/// through a node waits for them, and the audit log says what each dropped. A replica built
/// without receipts says so in its heartbeats, and nobody waits for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_that_embed_the_library_write_receipts() {
    init_tracing();
    let server = NatsServer::start_jetstream().await;
    let url = server.url();
    let node = start(&url, "replicas", "n1").await;
    let replica = |id: &'static str, receipts: bool| {
        let url = url.clone();
        async move {
            bus_builder(&url, "replicas", id)
                .jetstream(invalbus::JetStreamConfig::default())
                .receipts(receipts)
                .build()
                .await
                .unwrap_or_else(|e| panic!("replica {id}: {e}"))
        }
    };
    let web1 = replica("web-1", true).await;
    let web2 = replica("web-2", false).await;
    assert!(web1.writes_receipts() && !web2.writes_receipts());
    let c1 = web1.cache::<String>("articles", CacheConfig::new(1000)).unwrap();
    let c2 = web2.cache::<String>("articles", CacheConfig::new(1000)).unwrap();
    for (key, tag) in [
        ("post:1", "author:42"),
        ("post:2", "author:42"),
        ("post:3", "author:42"),
        ("post:4", "author:7"),
    ] {
        let filled = c1.reserve(key).fill(Loaded::new(key.to_owned()).tag(tag)).await;
        assert_eq!(filled, invalbus::FillOutcome::Filled, "{key} on web-1");
    }
    let filled = c2
        .reserve("post:1")
        .fill(Loaded::new("post:1".to_owned()).tag("author:42"))
        .await;
    assert_eq!(filled, invalbus::FillOutcome::Filled, "post:1 on web-2");
    let seen = eventually(DEADLINE, || async {
        let peers = node.bus().peers();
        peers.iter().any(|p| p.node_id == "web-1" && p.writes_receipts)
            && peers.iter().any(|p| p.node_id == "web-2" && !p.writes_receipts)
    })
    .await;
    assert!(seen, "n1 never heard both replicas: {:?}", node.bus().peers());

    let mut client = admin(&node).await;
    let resp = purge_and_wait(
        &mut client,
        PurgeRequest {
            tags: vec!["author:42".into()],
            reason: "byline was wrong".into(),
            ..Default::default()
        },
    )
    .await;
    assert!(resp.missing_nodes.is_empty(), "response: {resp:?}");
    let want = BTreeMap::from([("n1".to_owned(), 0), ("web-1".to_owned(), 3)]);
    assert_eq!(dropped_by_node(&resp.receipts), want, "response: {resp:?}");
    assert_eq!(c1.get("post:1").await, None);
    assert!(c1.get("post:4").await.is_some(), "post:4 lost on web-1");
    // web-2 writes no receipt, but applies the purge all the same.
    let gone = eventually(DEADLINE, || async { c2.get("post:1").await.is_none() }).await;
    assert!(gone, "post:1 still cached on web-2");

    // The audit log holds web-1's receipt, durable like the node's.
    let until = std::time::Instant::now() + DEADLINE;
    let mut last = query_by_purge(&mut client, &resp.purge_id).await;
    while !(last.records.len() == 1 && dropped_by_node(&last.records[0].receipts) == want) {
        assert!(
            std::time::Instant::now() < until,
            "audit never showed both receipts: {last:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        last = query_by_purge(&mut client, &resp.purge_id).await;
    }
    assert!(web1.stats().receipts_published >= 1);
    assert_eq!(web2.stats().receipts_published, 0);

    web1.shutdown().await;
    web2.shutdown().await;
    node.shutdown().await;
}
