//! The core guarantees of invalbus across processes, each test against its own `nats-server`: propagation of every invalidation kind, the stale-fill race, versions, echoes, TTL, hostile messages, namespaces, and connection errors.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use invalbus::{BuildError, Bus, BusStats, Cache, CacheConfig, Invalidation, Kind, Limits, Loaded, Target};
use invalbus_tests::{
    bus, bus_builder, eventually, free_port, init_tracing, inv_subject, NatsServer, ProxyMode, RawPeer, TcpProxy,
    DEADLINE,
};
use tokio::sync::Notify;

const NS: &str = "core";

fn config() -> CacheConfig {
    CacheConfig::new(10_000)
}

/// Reads `key` through `cache` with a loader that returns `loaded`; returns what the caller got.
async fn load(cache: &Cache<String>, key: &str, loaded: Loaded<String>) -> String {
    cache
        .get_or_load(key, || async move { Ok::<_, std::io::Error>(loaded) })
        .await
        .expect("loader does not fail")
}

/// Loads `key` into `cache` and checks that it is now cached.
async fn fill(cache: &Cache<String>, key: &str, loaded: Loaded<String>) {
    let want = loaded.value.clone();
    assert_eq!(load(cache, key, loaded).await, want);
    assert_eq!(
        cache.get(key).await,
        Some(want),
        "{key} should be cached after its load"
    );
}

/// Waits until `bus` has applied at least `n` invalidations from peers.
async fn applied_at_least(bus: &Bus, n: u64) {
    let ok = eventually(DEADLINE, || async { bus.stats().invalidations_received >= n }).await;
    assert!(
        ok,
        "{} applied {} invalidations, expected {n}: {:?}",
        bus.node_id(),
        bus.stats().invalidations_received,
        bus.stats()
    );
}

/// Waits until `key` is gone from `cache`, judged on reads made while its node serves (a read
/// while the node does not serve returns `None` whatever the cache holds, and proves nothing).
async fn gone(cache: &Cache<String>, key: &str) {
    let bus = cache.bus();
    let ok = eventually(DEADLINE, || async {
        bus.serving() && cache.get(key).await.is_none() && bus.serving()
    })
    .await;
    assert!(
        ok,
        "{key} still cached on {} after {DEADLINE:?} (serving: {})",
        bus.node_id(),
        bus.serving()
    );
}

/// Asserts that `key` is not cached in `cache`, on a read made while its node serves.
async fn absent(cache: &Cache<String>, key: &str, why: &str) {
    let bus = cache.bus();
    let serving = eventually(DEADLINE, || async { bus.serving() }).await;
    assert!(serving, "{} does not serve, so a read proves nothing", bus.node_id());
    let got = cache.get(key).await;
    assert!(bus.serving(), "{} stopped serving during the read", bus.node_id());
    assert_eq!(got, None, "{why}");
}

/// One server and three nodes, each on its own NATS connection, with the cache `articles`.
struct Trio {
    writer: Cache<String>,
    peers: [Cache<String>; 2],
    // Last, so it is dropped after the nodes.
    _server: NatsServer,
}

impl Trio {
    async fn start() -> Trio {
        init_tracing();
        let server = NatsServer::start().await;
        let a = bus(&server.url(), NS, "a").await;
        let b = bus(&server.url(), NS, "b").await;
        let c = bus(&server.url(), NS, "c").await;
        Trio {
            writer: a.cache("articles", config()).unwrap(),
            peers: [
                b.cache("articles", config()).unwrap(),
                c.cache("articles", config()).unwrap(),
            ],
            _server: server,
        }
    }

    fn all(&self) -> [&Cache<String>; 3] {
        [&self.writer, &self.peers[0], &self.peers[1]]
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_invalidation_reaches_both_peers_and_spares_other_keys() {
    let t = Trio::start().await;
    for c in t.all() {
        fill(c, "article:1", Loaded::new("v1".into())).await;
        fill(c, "article:2", Loaded::new("v1".into())).await;
    }
    t.writer
        .invalidate_key("article:1")
        .await
        .unwrap()
        .published()
        .await
        .unwrap();
    absent(&t.writer, "article:1", "read-your-writes on the writer").await;
    for p in &t.peers {
        gone(p, "article:1").await;
        assert_eq!(
            p.get("article:2").await.as_deref(),
            Some("v1"),
            "a key invalidation dropped another key"
        );
        assert_eq!(
            load(p, "article:1", Loaded::new("v2".into())).await,
            "v2",
            "the next read loads fresh"
        );
        assert_eq!(p.get("article:1").await.as_deref(), Some("v2"));
    }
}

/// A bulk call: every invalidation applied on the writer before it returns and on both peers,
/// in as many batches as the writer's batch limit makes, one ticket for them all; the bus's actor
/// and an invalidation's own actor arrive as given; an invalid one refuses the whole call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bulk_invalidation_reaches_both_peers_in_batches_under_one_ticket() {
    init_tracing();
    let server = NatsServer::start().await;
    let limits = Limits {
        max_batch_invalidations: 64,
        ..Limits::default()
    };
    let a = bus_builder(&server.url(), NS, "a")
        .limits(limits)
        .actor("migration")
        .build()
        .await
        .unwrap();
    let writer: Cache<String> = a.cache("articles", config()).unwrap();
    let mut peers = Vec::new();
    for id in ["b", "c"] {
        let b = bus(&server.url(), NS, id).await;
        peers.push(b.cache::<String>("articles", config()).unwrap());
    }
    let keys: Vec<String> = (0..200).map(|i| format!("article:{i}")).collect();
    for c in std::iter::once(&writer).chain(&peers) {
        for k in &keys {
            fill(c, k, Loaded::new("v1".into())).await;
        }
        fill(c, "spared", Loaded::new("v1".into())).await;
    }
    let mut events = peers[0].bus().subscribe_events();
    let before = a.stats().batches_published;
    let ticket = writer.invalidate_keys(&keys).await.unwrap();
    assert_eq!(
        ticket.local().dropped,
        200,
        "applied on the writer before the call returned"
    );
    let published = ticket.published().await.unwrap();
    assert_eq!(
        a.stats().batches_published - before,
        4,
        "200 invalidations in batches of 64"
    );
    assert_eq!(
        published.seq,
        a.last_published_seq(),
        "the ticket waits for the last batch"
    );
    for p in &peers {
        applied_at_least(p.bus(), 200).await;
        for k in &keys {
            absent(p, k, "a key of the bulk call survived on a peer").await;
        }
        assert_eq!(
            p.get("spared").await.as_deref(),
            Some("v1"),
            "a bulk call dropped another key"
        );
    }
    let mut actors = std::collections::BTreeSet::new();
    let mut seen = 0;
    while seen < 200 {
        match tokio::time::timeout(DEADLINE, events.recv()).await {
            Ok(Ok(invalbus::CacheEvent::Invalidated(invs))) => {
                seen += invs.len();
                actors.extend(invs.iter().map(|i| i.actor.clone()));
            }
            Ok(Ok(_)) => {}
            other => panic!("b's events ended after {seen} invalidations: {other:?}"),
        }
    }
    assert_eq!(
        actors,
        [std::sync::Arc::from("migration")].into(),
        "every invalidation names the bus's actor"
    );

    // Mixed targets and caches, one of them with an actor of its own.
    let mut own = Invalidation::new(Some("articles"), Target::Key("spared".into()));
    own.actor = "ops".into();
    let mut many = vec![Invalidation::new(Some("articles"), Target::Tag("t".into())), own];
    many.push(Invalidation::new(Some("other"), Target::Prefix("x".into())));
    let mut events = peers[1].bus().subscribe_events();
    a.invalidate_many(many).await.unwrap().published().await.unwrap();
    let got = loop {
        match tokio::time::timeout(DEADLINE, events.recv()).await {
            Ok(Ok(invalbus::CacheEvent::Invalidated(invs))) if invs.len() == 3 => break invs,
            Ok(Ok(_)) => continue,
            other => panic!("the mixed bulk call did not reach c: {other:?}"),
        }
    };
    let actors: Vec<&str> = got.iter().map(|i| &*i.actor).collect();
    assert_eq!(actors, ["migration", "ops", "migration"]);
    gone(&peers[1], "spared").await;

    // One invalid invalidation: nothing applied, nothing published.
    fill(&writer, "kept", Loaded::new("v1".into())).await;
    let published = a.stats().batches_published;
    let bad = vec![
        Invalidation::new(Some("articles"), Target::Key("kept".into())),
        Invalidation::new(Some("articles"), Target::Key(String::new())),
    ];
    assert!(matches!(
        a.invalidate_many(bad).await,
        Err(invalbus::InvalidateError::Invalid(_))
    ));
    assert!(matches!(
        a.invalidate_many(Vec::new()).await,
        Err(invalbus::InvalidateError::Invalid(_))
    ));
    assert_eq!(
        writer.get("kept").await.as_deref(),
        Some("v1"),
        "a refused bulk call applied some of it"
    );
    assert_eq!(a.stats().batches_published, published);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn versioned_invalidation_reaches_both_peers_and_refuses_older_fills() {
    let t = Trio::start().await;
    for c in t.all() {
        fill(c, "article:1", Loaded::new("v3".into()).version(3)).await;
        fill(c, "article:2", Loaded::new("v7".into()).version(7)).await;
    }
    t.writer
        .invalidate_version("article:1", 4)
        .await
        .unwrap()
        .published()
        .await
        .unwrap();
    // Version 5 is older than the cached 7: peers must keep their entry.
    t.writer
        .invalidate_version("article:2", 5)
        .await
        .unwrap()
        .published()
        .await
        .unwrap();
    for p in &t.peers {
        gone(p, "article:1").await;
        applied_at_least(p.bus(), 2).await;
        assert_eq!(
            p.get("article:2").await.as_deref(),
            Some("v7"),
            "an older version dropped a newer entry"
        );
        // A replica that still returns version 3 must not put it back in the cache.
        assert_eq!(load(p, "article:1", Loaded::new("v3".into()).version(3)).await, "v3");
        absent(p, "article:1", "a fill below the invalidated version was cached").await;
        fill(p, "article:1", Loaded::new("v4".into()).version(4)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tag_invalidation_reaches_both_peers_and_spares_untagged_entries() {
    let t = Trio::start().await;
    for c in t.all() {
        fill(c, "article:1", Loaded::new("a1".into()).tag("author:1").tag("articles")).await;
        fill(c, "list:author:1", Loaded::new("l1".into()).tag("author:1")).await;
        fill(c, "article:2", Loaded::new("a2".into()).tag("author:2").tag("articles")).await;
    }
    t.writer
        .invalidate_tag("author:1")
        .await
        .unwrap()
        .published()
        .await
        .unwrap();
    absent(&t.writer, "list:author:1", "read-your-writes on the writer").await;
    for p in &t.peers {
        gone(p, "article:1").await;
        gone(p, "list:author:1").await;
        assert_eq!(
            p.get("article:2").await.as_deref(),
            Some("a2"),
            "a tag purge dropped an entry without the tag"
        );
        assert_eq!(
            load(p, "list:author:1", Loaded::new("l2".into()).tag("author:1")).await,
            "l2"
        );
        assert_eq!(
            p.get("list:author:1").await.as_deref(),
            Some("l2"),
            "entries filled after the purge are cached"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefix_invalidation_reaches_both_peers_and_spares_other_keys() {
    let t = Trio::start().await;
    for c in t.all() {
        for key in ["list:author:1:p1", "list:author:1:p2", "list:author:2:p1", "article:1"] {
            fill(c, key, Loaded::new(key.to_uppercase())).await;
        }
    }
    t.writer
        .invalidate_prefix("list:author:1:")
        .await
        .unwrap()
        .published()
        .await
        .unwrap();
    for p in &t.peers {
        gone(p, "list:author:1:p1").await;
        gone(p, "list:author:1:p2").await;
        for key in ["list:author:2:p1", "article:1"] {
            assert_eq!(
                p.get(key).await,
                Some(key.to_uppercase()),
                "a prefix purge dropped {key}"
            );
        }
        fill(p, "list:author:1:p1", Loaded::new("fresh".into())).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flush_of_one_cache_and_of_every_cache_reach_both_peers() {
    let t = Trio::start().await;
    let authors: Vec<Cache<String>> = t
        .all()
        .iter()
        .map(|c| c.bus().cache("authors", config()).unwrap())
        .collect();
    for (articles, authors) in t.all().into_iter().zip(&authors) {
        fill(articles, "article:1", Loaded::new("a1".into())).await;
        fill(articles, "article:2", Loaded::new("a2".into()).tag("x")).await;
        fill(authors, "author:1", Loaded::new("ada".into())).await;
    }
    // Flush of the `articles` cache only.
    t.writer.invalidate_all().await.unwrap().published().await.unwrap();
    for (p, authors) in t.peers.iter().zip(&authors[1..]) {
        gone(p, "article:1").await;
        gone(p, "article:2").await;
        assert_eq!(
            authors.get("author:1").await.as_deref(),
            Some("ada"),
            "flushing `articles` flushed `authors`"
        );
    }
    // Flush of every cache.
    t.writer
        .bus()
        .invalidate(Invalidation::new(None, Target::All))
        .await
        .unwrap()
        .published()
        .await
        .unwrap();
    for authors in &authors[1..] {
        gone(authors, "author:1").await;
    }
}

/// A peer's load of `article:1` (tagged `author:1`) is held while the writer invalidates it
/// with `target` over NATS. The held load returns its value to its caller but must not be
/// cached; a read that starts after the invalidation loads fresh, without waiting for it.
async fn held_load_overtaken_by_peer_invalidation(target: Target) {
    init_tracing();
    let server = NatsServer::start().await;
    let writer: Cache<String> = bus(&server.url(), NS, "writer")
        .await
        .cache("articles", config())
        .unwrap();
    let reader: Cache<String> = bus(&server.url(), NS, "reader")
        .await
        .cache("articles", config())
        .unwrap();

    let started = Arc::new(Notify::new());
    let go = Arc::new(Notify::new());
    let held = tokio::spawn({
        let (reader, started, go) = (reader.clone(), started.clone(), go.clone());
        async move {
            reader
                .get_or_load("article:1", || async move {
                    // The old row has been read from the database; the write and its
                    // invalidation happen now, before the value reaches the cache.
                    started.notify_one();
                    go.notified().await;
                    Ok::<_, std::io::Error>(Loaded::new("old".to_string()).tag("author:1"))
                })
                .await
        }
    });
    started.notified().await;

    let mut inv = Invalidation::new(Some("articles"), target.clone());
    inv.reason = "row updated".into();
    writer.bus().invalidate(inv).await.unwrap().published().await.unwrap();
    applied_at_least(reader.bus(), 1).await;

    // A read that starts now must not join the overtaken load: it loads fresh at once.
    let fresh = tokio::time::timeout(
        DEADLINE,
        load(&reader, "article:1", Loaded::new("new".into()).tag("author:1")),
    )
    .await
    .expect("a read after the invalidation waited on the overtaken load");
    assert_eq!(
        fresh, "new",
        "{target:?}: a read after the invalidation joined the overtaken load"
    );

    go.notify_one();
    let old = held.await.unwrap().unwrap();
    assert_eq!(old, "old", "the held load's caller gets its own value");
    assert_eq!(
        reader.get("article:1").await.as_deref(),
        Some("new"),
        "{target:?}: the overtaken load replaced the fresh value"
    );
    assert!(
        reader.stats().rejected_fills >= 1,
        "{target:?}: the overtaken fill was not refused: {:?}",
        reader.stats()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_load_is_not_cached_after_a_peer_invalidates_its_key() {
    held_load_overtaken_by_peer_invalidation(Target::Key("article:1".into())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_load_is_not_cached_after_a_peer_purges_its_tag() {
    held_load_overtaken_by_peer_invalidation(Target::Tag("author:1".into())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_load_is_not_cached_after_a_peer_purges_its_prefix() {
    held_load_overtaken_by_peer_invalidation(Target::Prefix("article:".into())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_load_is_not_cached_after_a_peer_flushes_the_cache() {
    held_load_overtaken_by_peer_invalidation(Target::All).await;
}

/// The same race without a second reader: once the held load finishes, nothing is cached, and
/// the next read loads the new value.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_load_leaves_nothing_cached_and_the_next_read_loads_fresh() {
    init_tracing();
    let server = NatsServer::start().await;
    let writer: Cache<String> = bus(&server.url(), NS, "writer")
        .await
        .cache("articles", config())
        .unwrap();
    let reader: Cache<String> = bus(&server.url(), NS, "reader")
        .await
        .cache("articles", config())
        .unwrap();
    let started = Arc::new(Notify::new());
    let go = Arc::new(Notify::new());
    let held = tokio::spawn({
        let (reader, started, go) = (reader.clone(), started.clone(), go.clone());
        async move {
            reader
                .get_or_load("article:9", || async move {
                    started.notify_one();
                    go.notified().await;
                    Ok::<_, std::io::Error>(Loaded::new("old".to_string()).tag("author:9"))
                })
                .await
        }
    });
    started.notified().await;
    writer
        .invalidate_tag("author:9")
        .await
        .unwrap()
        .published()
        .await
        .unwrap();
    applied_at_least(reader.bus(), 1).await;
    go.notify_one();
    assert_eq!(held.await.unwrap().unwrap(), "old");
    absent(&reader, "article:9", "the overtaken load was cached").await;
    assert_eq!(load(&reader, "article:9", Loaded::new("new".into())).await, "new");
}

/// Counters to wait on after hand-made batches.
fn received(stats: &BusStats) -> (u64, u64) {
    (stats.batches_received, stats.duplicates)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn versions_out_of_order_and_duplicated_never_bring_back_old_data() {
    init_tracing();
    let server = NatsServer::start().await;
    let node = bus(&server.url(), NS, "reader").await;
    let rows: Cache<String> = node.cache("rows", config()).unwrap();
    let mut writer = RawPeer::connect(&server.url(), NS, "db-writer").await;
    let at = |key: &str, v: u64| {
        let mut inv = Invalidation::new(Some("rows"), Target::Key(key.into()));
        inv.version = Some(v);
        inv
    };

    fill(&rows, "row:1", Loaded::new("v9".into()).version(9)).await;
    fill(&rows, "row:2", Loaded::new("v5".into()).version(5)).await;

    // Version 9, then a late version 5, then version 9 again; then exact replays of batches.
    let b1 = writer.next_batch(vec![at("row:1", 9), at("row:2", 6), at("row:3", 9)]);
    let b2 = writer.next_batch(vec![at("row:1", 5), at("row:2", 5), at("row:3", 5)]);
    let b3 = writer.next_batch(vec![at("row:1", 9), at("row:3", 9)]);
    for b in [&b1, &b2, &b3, &b3, &b2, &b1] {
        writer.publish_batch(b).await;
    }
    writer.heartbeat(b3.seq).await;
    let ok = eventually(DEADLINE, || async { received(&node.stats()) == (3, 3) }).await;
    assert!(ok, "expected 3 batches applied and 3 duplicates: {:?}", node.stats());

    assert_eq!(
        rows.get("row:1").await.as_deref(),
        Some("v9"),
        "an invalidation at or below v9 dropped the v9 entry"
    );
    absent(&rows, "row:2", "v6 must drop the v5 entry").await;
    // The late v5 must not lower row:2's floor from 6, nor row:3's from 9.
    assert_eq!(load(&rows, "row:2", Loaded::new("v5".into()).version(5)).await, "v5");
    absent(&rows, "row:2", "a v5 fill was cached after v6 was invalidated").await;
    assert_eq!(load(&rows, "row:3", Loaded::new("v7".into()).version(7)).await, "v7");
    absent(&rows, "row:3", "a v7 fill was cached after v9 was invalidated").await;
    assert!(rows.stats().rejected_fills >= 2, "{:?}", rows.stats());
    // The versions the invalidations announced are accepted.
    fill(&rows, "row:2", Loaded::new("v6".into()).version(6)).await;
    fill(&rows, "row:3", Loaded::new("v9".into()).version(9)).await;
    assert_eq!(
        node.stats().gaps,
        0,
        "in-order sequences must not look like a gap: {:?}",
        node.stats()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn own_echoes_are_skipped_and_do_not_drop_entries_filled_after_the_invalidation() {
    init_tracing();
    let server = NatsServer::start().await;
    // The writer's link is slowed so that its echo surely arrives after the refill below.
    let proxy = TcpProxy::start(server.addr()).await;
    proxy.set_mode(ProxyMode::Delay(Duration::from_millis(250)));
    let writer_bus = bus_builder(&proxy.url(), NS, "writer")
        .ping_interval(Duration::from_secs(5))
        .build()
        .await
        .unwrap();
    let writer: Cache<String> = writer_bus.cache("articles", config()).unwrap();
    let peer: Cache<String> = bus(&server.url(), NS, "peer")
        .await
        .cache("articles", config())
        .unwrap();
    fill(&writer, "article:1", Loaded::new("v1".into())).await;
    fill(&peer, "article:1", Loaded::new("v1".into())).await;

    let ticket = writer.invalidate_key("article:1").await.unwrap();
    // The write's own read-back, before its invalidation has even left this node.
    fill(&writer, "article:1", Loaded::new("v2".into())).await;
    ticket.published().await.unwrap();

    gone(&peer, "article:1").await;
    let ok = eventually(DEADLINE, || async { writer_bus.stats().echoes_skipped >= 1 }).await;
    assert!(
        ok,
        "the writer never saw its own batch come back: {:?}",
        writer_bus.stats()
    );
    assert_eq!(
        writer.get("article:1").await.as_deref(),
        Some("v2"),
        "the writer's echo dropped its fresh entry"
    );
    let stats = writer_bus.stats();
    assert_eq!(
        (stats.batches_received, stats.invalidations_received),
        (0, 0),
        "the writer applied its own batch: {stats:?}"
    );
    assert_eq!(
        writer.stats().invalidations_applied,
        1,
        "applied locally once, never again from the echo"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_expire_after_their_time_to_live_without_any_event() {
    init_tracing();
    let server = NatsServer::start().await;
    let node = bus(&server.url(), NS, "node").await;
    let _peer = bus(&server.url(), NS, "peer").await;
    let short: Cache<String> = node
        .cache("short", CacheConfig::new(100).time_to_live(Duration::from_secs(2)))
        .unwrap();
    let long: Cache<String> = node.cache("long", config()).unwrap();
    fill(&short, "k", Loaded::new("v".into())).await;
    fill(&long, "per-entry", Loaded::new("v".into()).ttl(Duration::from_secs(1))).await;
    fill(&long, "forever", Loaded::new("v".into())).await;
    gone(&short, "k").await;
    gone(&long, "per-entry").await;
    assert_eq!(
        long.get("forever").await.as_deref(),
        Some("v"),
        "an entry without a short TTL expired"
    );
    let stats = node.stats();
    assert_eq!(
        stats.batches_received, 0,
        "an event arrived, so this is not expiry: {stats:?}"
    );
    for c in node.cache_stats() {
        assert_eq!((c.invalidations_applied, c.flushes), (0, 0), "{c:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_oversized_foreign_and_invalid_messages_are_dropped_and_counted() {
    init_tracing();
    let server = NatsServer::start().await;
    let limits = Limits {
        max_message_bytes: 4096,
        ..Limits::default()
    };
    let node = bus_builder(&server.url(), NS, "node")
        .limits(limits)
        .build()
        .await
        .unwrap();
    let cache: Cache<String> = node.cache("articles", config()).unwrap();
    let writer: Cache<String> = bus(&server.url(), NS, "writer")
        .await
        .cache("articles", config())
        .unwrap();
    let keys = ["k-foreign", "k-epoch0", "k-spoof", "k-oversized", "k-valid", "k-after"];
    for k in keys {
        fill(&cache, k, Loaded::new("v".into())).await;
    }
    let key = |k: &str| Invalidation::new(Some("articles"), Target::Key(k.into()));
    let mut mallory = RawPeer::connect(&server.url(), NS, "mallory").await;
    let inv = inv_subject(NS, "mallory");

    // Not protobuf at all, on the batch and on the heartbeat subject.
    mallory
        .publish_raw(&inv, Bytes::from_static(b"\xff\xff\xff\xff garbage"))
        .await;
    mallory
        .publish_raw(
            &invalbus_tests::hb_subject(NS, "mallory"),
            Bytes::from_static(b"\xff\xff"),
        )
        .await;
    // Larger than the node's limit (a valid batch padded with a long reason).
    let mut big = mallory.next_batch(vec![key("k-oversized")]);
    big.invalidations[0].reason = "x".repeat(1000);
    big.invalidations = vec![big.invalidations[0].clone(); 8];
    let sealed = invalbus::seal(mallory.identity(), Kind::Batch, invalbus::encode_batch(&big));
    mallory.publish_raw(&inv, sealed).await;
    // Another namespace's batch on our subject.
    let mut foreign = mallory.next_batch(vec![key("k-foreign")]);
    foreign.namespace = "other".into();
    mallory.publish_batch(&foreign).await;
    // Rule breakers: epoch 0, and a batch claiming another origin than its subject.
    let mut epoch0 = mallory.next_batch(vec![key("k-epoch0")]);
    epoch0.epoch = 0;
    mallory.publish_batch(&epoch0).await;
    let mut spoof = mallory.next_batch(vec![key("k-spoof")]);
    spoof.origin = "writer".into();
    mallory.publish_batch(&spoof).await;
    // A subject of the namespace that is neither `inv` nor `hb`.
    mallory
        .publish_raw(&format!("invalbus.{NS}.zzz.mallory"), Bytes::from_static(b"?"))
        .await;

    // Then a valid batch from a fresh origin on the same connection: once it is applied, all of
    // the above has been handled.
    let mut honest = RawPeer::connect(&server.url(), NS, "honest").await;
    let valid = honest.next_batch(vec![key("k-valid")]);
    let sealed = invalbus::seal(honest.identity(), Kind::Batch, invalbus::encode_batch(&valid));
    mallory.publish_raw(&inv_subject(NS, "honest"), sealed).await;
    gone(&cache, "k-valid").await;

    let s = node.stats();
    assert_eq!(s.malformed, 2, "{s:?}");
    assert_eq!(s.oversized, 1, "{s:?}");
    assert_eq!(s.foreign, 1, "{s:?}");
    assert_eq!(s.invalid, 3, "epoch 0, spoofed origin, unknown subject kind: {s:?}");
    assert_eq!(s.batches_received, 1, "only the valid batch is applied: {s:?}");
    for k in ["k-foreign", "k-epoch0", "k-spoof", "k-oversized"] {
        assert_eq!(
            cache.get(k).await.as_deref(),
            Some("v"),
            "a dropped message still invalidated {k}"
        );
    }
    // Real peers keep getting through as well.
    writer
        .invalidate_key("k-after")
        .await
        .unwrap()
        .published()
        .await
        .unwrap();
    gone(&cache, "k-after").await;
    let _ = honest.send(vec![key("k-foreign")]).await;
    gone(&cache, "k-foreign").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_namespaces_on_one_server_do_not_see_each_other() {
    init_tracing();
    let server = NatsServer::start().await;
    // The same node ids in both namespaces.
    let alpha1 = bus(&server.url(), "alpha", "n1").await;
    let alpha2 = bus(&server.url(), "alpha", "n2").await;
    let beta1 = bus(&server.url(), "beta", "n1").await;
    let beta2 = bus(&server.url(), "beta", "n2").await;
    let a1: Cache<String> = alpha1.cache("articles", config()).unwrap();
    let a2: Cache<String> = alpha2.cache("articles", config()).unwrap();
    let b1: Cache<String> = beta1.cache("articles", config()).unwrap();
    let b2: Cache<String> = beta2.cache("articles", config()).unwrap();
    for c in [&a2, &b2] {
        fill(c, "article:1", Loaded::new("v1".into()).tag("articles")).await;
        fill(c, "barrier", Loaded::new("v1".into())).await;
    }

    a1.invalidate_key("article:1").await.unwrap().published().await.unwrap();
    a1.invalidate_tag("articles").await.unwrap().published().await.unwrap();
    a1.bus()
        .invalidate(Invalidation::new(None, Target::All))
        .await
        .unwrap()
        .published()
        .await
        .unwrap();
    gone(&a2, "article:1").await;
    gone(&a2, "barrier").await;
    // The server has routed alpha's batches (alpha2 got them) before beta1 publishes, so beta2
    // would have received them before this barrier.
    b1.invalidate_key("barrier").await.unwrap().published().await.unwrap();
    gone(&b2, "barrier").await;

    assert_eq!(
        b2.get("article:1").await.as_deref(),
        Some("v1"),
        "alpha's invalidations reached beta"
    );
    let s = beta2.stats();
    assert_eq!(
        (s.batches_received, s.foreign),
        (1, 0),
        "beta2 saw alpha's traffic: {s:?}"
    );
    let peers = beta2.peers();
    assert!(
        peers.iter().all(|p| p.node_id == "n1" && p.epoch == beta1.epoch()),
        "beta2 knows a node that is not beta1: {peers:?}"
    );
    assert_eq!(alpha2.stats().foreign, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn building_against_a_port_without_a_server_is_a_connect_error() {
    init_tracing();
    let url = format!("nats://127.0.0.1:{}", free_port());
    let built = tokio::time::timeout(DEADLINE, bus_builder(&url, NS, "lonely").build())
        .await
        .expect("build hung instead of failing");
    match built {
        Err(BuildError::Connect(msg)) => assert!(msg.contains(&url), "the error should name the URL: {msg}"),
        other => panic!("expected BuildError::Connect, got {other:?}"),
    }
}

/// Zero tolerated misses, on core NATS (no stream to replay from): a batch lost in the middle of
/// an origin's sequence, and a lost *last* batch that only the origin's heartbeat reveals, each
/// make the node flush what it may hold stale. Without gap detection the stale entries would
/// stay until their time to live.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_batch_or_a_lost_last_batch_makes_the_node_flush() {
    init_tracing();
    let server = NatsServer::start().await;
    let node = bus(&server.url(), NS, "reader").await;
    let rows: Cache<String> = node.cache("rows", config()).unwrap();
    let mut writer = RawPeer::connect(&server.url(), NS, "lossy-writer").await;
    let key = |k: &str| Invalidation::new(Some("rows"), Target::Key(k.into()));

    fill(&rows, "row:1", Loaded::new("old".into())).await;
    fill(&rows, "row:2", Loaded::new("old".into())).await;
    let b1 = writer.next_batch(vec![key("row:9")]);
    writer.publish_batch(&b1).await;
    let ok = eventually(DEADLINE, || async { node.stats().batches_received == 1 }).await;
    assert!(ok, "the first batch was not applied: {:?}", node.stats());
    assert_eq!(
        rows.get("row:1").await.as_deref(),
        Some("old"),
        "row:1 was not invalidated yet"
    );

    // Batch 2 (which invalidated row:1) is "lost": only batch 3 arrives.
    let _lost = writer.next_batch(vec![key("row:1")]);
    let b3 = writer.next_batch(vec![key("row:8")]);
    writer.publish_batch(&b3).await;
    // While it repairs, the node serves nothing from cache: wait until it serves again, so that
    // the reads below see the cache, not the bypass.
    let repaired = |flushes: u64| {
        let node = node.clone();
        move || {
            let node = node.clone();
            async move { node.stats().repair_flushes >= flushes && node.serving() }
        }
    };
    let ok = eventually(DEADLINE, repaired(1)).await;
    assert!(ok, "a gap must be found and the caches flushed: {:?}", node.stats());
    assert!(node.stats().gaps >= 1, "{:?}", node.stats());
    absent(&rows, "row:1", "row:1 was served stale after the gap").await;

    // The last batch (which invalidated row:2) is lost; the heartbeat announcing it reveals it.
    fill(&rows, "row:2", Loaded::new("old".into())).await;
    let before = node.stats();
    let last = writer.next_batch(vec![key("row:2")]);
    writer.heartbeat(last.seq).await;
    let ok = eventually(DEADLINE, repaired(before.repair_flushes + 1)).await;
    assert!(ok, "tail loss must be found and the caches flushed: {:?}", node.stats());
    assert!(node.stats().gaps > before.gaps, "{:?}", node.stats());
    absent(&rows, "row:2", "row:2 was served stale after its last batch was lost").await;
}
