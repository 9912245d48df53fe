//! Only the namespace's own nodes can invalidate: every row of the forgery table of the trust
//! issue, reproduced from an ordinary NATS client, and shown refused, counted, and without effect
//! on genuine invalidations.
//!
//! Each test names what an untrusted publisher tried and asserts what a user would notice: the
//! entry it tried to drop is still cached, the genuine invalidation still lands, no cache was
//! flushed, the counters say why.

use std::time::Duration;

use futures::StreamExt;
use invalbus::{Bus, Cache, CacheConfig, Identity, Invalidation, Loaded, Scopes, Target, TrustPolicy, TrustedKey};
use invalbus_tests::{bus_builder, eventually, init_tracing, NatsServer, RawPeer, DEADLINE};

const NS: &str = "trust";

fn key(k: &str) -> Invalidation {
    Invalidation::new(Some("items"), Target::Key(k.into()))
}

/// A policy trusting each of `ids` for its node id only.
fn policy(ids: &[(&str, &Identity)]) -> TrustPolicy {
    TrustPolicy::Keys(
        ids.iter()
            .map(|(origin, id)| TrustedKey {
                key: id.public_key().to_owned(),
                scopes: Scopes::ALL,
                origins: vec![(*origin).to_owned()],
            })
            .collect(),
    )
}

/// Two nodes `a` and `b` on a JetStream server, each trusting the other's key for its name.
struct Pair {
    a: Bus,
    b: Bus,
    on_b: Cache<String>,
    server: NatsServer,
}

impl Pair {
    async fn start() -> Pair {
        init_tracing();
        let server = NatsServer::start_jetstream().await;
        let (ka, kb) = (Identity::generate(), Identity::generate());
        let trust = policy(&[("a", &ka), ("b", &kb)]);
        let js = invalbus::JetStreamConfig::default();
        let a = bus_builder(&server.url(), NS, "a")
            .identity(ka)
            .trust(trust.clone())
            .jetstream(js.clone())
            .build()
            .await
            .expect("a");
        let b = bus_builder(&server.url(), NS, "b")
            .identity(kb)
            .trust(trust)
            .jetstream(js)
            .build()
            .await
            .expect("b");
        let on_b = b.cache::<String>("items", CacheConfig::new(1000)).expect("cache");
        a.cache::<String>("items", CacheConfig::new(1000)).expect("cache");
        Pair { a, b, on_b, server }
    }

    async fn fill(&self, keys: &[&str]) {
        for k in keys {
            let v = self
                .on_b
                .get_or_load(k, || async { Ok::<_, std::io::Error>(Loaded::new("v".to_string())) })
                .await
                .expect("load");
            assert_eq!(v, "v");
            assert!(self.on_b.get(k).await.is_some(), "{k} not cached");
        }
    }

    /// Waits until `b` counted `n` refusals of untrusted messages.
    async fn refused(&self, n: u64) {
        let ok = eventually(DEADLINE, || async { self.b.stats().refused_untrusted >= n }).await;
        assert!(
            ok,
            "b refused {} messages, expected {n}: {:?}",
            self.b.stats().refused_untrusted,
            self.b.stats()
        );
    }

    /// `key` is still cached on `b` (read while it serves).
    async fn still_cached(&self, k: &str) {
        let serving = eventually(DEADLINE, || async { self.b.serving() }).await;
        assert!(serving, "b does not serve");
        assert_eq!(
            self.on_b.get(k).await.as_deref(),
            Some("v"),
            "{k} was dropped by a forgery"
        );
    }

    /// A genuine invalidation of `k` by `a` reaches `b`.
    async fn genuine(&self, k: &str) {
        self.a
            .invalidate(key(k))
            .await
            .expect("invalidate")
            .published()
            .await
            .expect("accepted");
        let gone = eventually(DEADLINE, || async {
            self.b.serving() && self.on_b.get(k).await.is_none()
        })
        .await;
        assert!(
            gone,
            "a's genuine invalidation of {k} did not reach b: {:?}",
            self.b.stats()
        );
    }
}

/// Rows 1 and 2: a batch as `a` with a new epoch at seq 1, a batch and a heartbeat with `a`'s
/// real epoch and a sequence 1,000 ahead. Before: every peer retired `a`'s real epoch (and then
/// dropped its genuine batches as duplicates), or flushed and dropped the next 999.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_epochs_and_sequences_change_nothing() {
    let p = Pair::start().await;
    p.fill(&["k1", "k2", "k3"]).await;
    // Let a publish once, so that its real epoch and sequence are known to b.
    p.genuine("k0").await;
    let real_epoch = p.a.epoch();
    let real_seq = p.a.last_published_seq();

    let mut new_epoch = RawPeer::connect(&p.server.url(), NS, "a").await;
    new_epoch.send(vec![key("k1")]).await;
    let mut ahead = RawPeer::connect(&p.server.url(), NS, "a")
        .await
        .with_epoch(real_epoch, real_seq + 1000);
    ahead.send(vec![key("k2")]).await;
    ahead.heartbeat(real_seq + 1000).await;
    // Each arrives on both paths (NATS and the stream): at least 3 refusals.
    p.refused(3).await;

    p.still_cached("k1").await;
    p.still_cached("k2").await;
    p.genuine("k3").await;
    let s = p.b.stats();
    assert_eq!(s.repair_flushes, 0, "a forged sequence made b flush: {s:?}");
    assert!(
        p.b.peers()
            .iter()
            .any(|peer| peer.node_id == "a" && peer.epoch == real_epoch),
        "b no longer tracks a's real epoch"
    );
}

/// Row 3: a batch at exactly `a`'s next sequence, with `actor=ops` and a made-up purge id.
/// Before: the genuine batch with that sequence was then dropped as a duplicate, and the audit
/// showed the forgery. Now the genuine one lands and the stored forgery reads as unverified.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_next_batch_does_not_suppress_the_genuine_one() {
    let p = Pair::start().await;
    p.fill(&["k1", "k2"]).await;
    p.genuine("k0").await;
    let mut forged = key("k1");
    forged.actor = "ops".into();
    forged.purge_id = "pg-forged".into();
    let mut mallory = RawPeer::connect(&p.server.url(), NS, "a")
        .await
        .with_epoch(p.a.epoch(), p.a.last_published_seq() + 1);
    mallory.send(vec![forged]).await;
    p.refused(1).await;
    p.genuine("k2").await;
    p.still_cached("k1").await;

    // The forgery is in the stream (anyone may publish on the subject), but the audit reads it
    // as unverified.
    let js = async_nats::jetstream::new(async_nats::connect(p.server.url()).await.expect("client"));
    let stream = js.get_stream(format!("INVALBUS_{NS}")).await.expect("stream");
    let consumer = stream
        .create_consumer(async_nats::jetstream::consumer::pull::OrderedConfig {
            filter_subject: format!("invalbus.{NS}.inv.a"),
            ..Default::default()
        })
        .await
        .expect("consumer");
    let mut messages = consumer.messages().await.expect("messages");
    let (mut forgery, mut genuine) = (None, 0);
    while let Ok(Some(Ok(m))) = tokio::time::timeout(Duration::from_secs(2), messages.next()).await {
        let opened = p.b.open_batch(&m.payload).expect("a signed batch");
        if opened.message.invalidations.iter().any(|i| i.purge_id == "pg-forged") {
            forgery = Some(opened);
        } else {
            assert!(
                opened.trusted.is_ok(),
                "a genuine batch reads as unverified: {opened:?}"
            );
            genuine += 1;
        }
    }
    let forgery = forgery.expect("the forged batch is in the stream");
    assert!(forgery.trusted.is_err(), "the forgery reads as trusted: {forgery:?}");
    assert_eq!(forgery.signer, mallory.identity().public_key());
    assert!(genuine >= 2, "a's genuine batches are in the stream");
}

/// What signatures alone could not stop: a `Nats-Rollup: all` header, from any client that may
/// publish on the namespace, would erase the batch stream if the stream allowed rollups. It
/// does not: the server refuses the message, the stream keeps every batch, and the nodes go on
/// applying genuine invalidations.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollup_cannot_erase_the_stream() {
    let p = Pair::start().await;
    p.fill(&["k0"]).await;
    p.genuine("k0").await;
    let client = async_nats::connect(p.server.url()).await.expect("mallory");
    let js = async_nats::jetstream::new(client.clone());
    let mut stream = js.get_stream(format!("INVALBUS_{NS}")).await.expect("the batch stream");
    let before = stream.info().await.expect("stream info").state.messages;
    assert!(before >= 1, "the stream holds a's batch");
    let mut headers = async_nats::HeaderMap::new();
    headers.insert(async_nats::header::NATS_ROLLUP, "all");
    let ack = js
        .publish_with_headers(format!("invalbus.{NS}.inv.mallory"), headers, "x".into())
        .await
        .expect("publish");
    let refused = ack.await;
    assert!(refused.is_err(), "the stream accepted a rollup: {refused:?}");
    // The same through core NATS (no acknowledgement asked for) is dropped by the server too.
    let mut headers = async_nats::HeaderMap::new();
    headers.insert(async_nats::header::NATS_ROLLUP, "all");
    client
        .publish_with_headers(format!("invalbus.{NS}.hb.mallory"), headers, "x".into())
        .await
        .expect("publish");
    client.flush().await.expect("flush");
    p.fill(&["k2"]).await;
    let before_b = p.b.stats().invalidations_received;
    p.genuine("k2").await;
    assert!(
        p.b.stats().invalidations_received > before_b,
        "b did not apply a's invalidation: {:?}",
        p.b.stats()
    );
    let info = stream.info().await.expect("stream info").state.clone();
    assert_eq!(info.first_sequence, 1, "the stream lost its first messages: {info:?}");
    assert!(info.messages >= 2, "the stream lost batches: {info:?}");
    assert_eq!(p.a.stats().stream_erasures + p.b.stats().stream_erasures, 0);
}

/// Heartbeats are stored in the batch stream (a node's evidence comes back through it), so the
/// node that manages the stream trims them: each node's superseded heartbeats are deleted (those
/// stored before the node followed the stream too), and
/// the other nodes' followers are not disturbed (a purge filtered to the heartbeat subjects
/// moved every consumer of the stream on nats-server before 2.10.11, and followers stalled or
/// skipped): they never read again from a hole, and a service that stops serving after 3 s
/// without evidence never stops.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_managing_node_trims_old_heartbeats() {
    init_tracing();
    let server = NatsServer::start_jetstream().await;
    let js_config = invalbus::JetStreamConfig::default();
    // The service starts first: its heartbeats stored before the node follows the stream are
    // trimmed too.
    let service = bus_builder(&server.url(), NS, "service")
        .jetstream(js_config.clone())
        .max_staleness(Duration::from_secs(3))
        .build()
        .await
        .expect("service");
    let mut events = service.subscribe_events();
    let client = async_nats::connect(server.url()).await.expect("client");
    let js = async_nats::jetstream::new(client);
    let stream = js.get_stream(format!("INVALBUS_{NS}")).await.expect("the batch stream");
    assert!(
        !stream.cached_info().config.allow_rollup,
        "the batch stream allows rollups"
    );
    let counts = || async {
        let mut counts = std::collections::HashMap::new();
        let Ok(mut subjects) = stream.info_with_subjects(format!("invalbus.{NS}.hb.*")).await else {
            return counts;
        };
        while let Some(Ok((subject, n))) = subjects.next().await {
            counts.insert(subject, n);
        }
        counts
    };
    let early = eventually(DEADLINE, || async { counts().await.values().any(|n| *n >= 15) }).await;
    assert!(early, "the service's heartbeats never piled up: {:?}", counts().await);
    let node = bus_builder(&server.url(), NS, "node")
        .jetstream(js_config)
        .manage_streams(true)
        .build()
        .await
        .expect("node");
    // Heartbeats pile up between trims (every 30 intervals: 6 s here)...
    let piled = eventually(DEADLINE, || async { counts().await.len() == 2 }).await;
    assert!(piled, "the node's heartbeats never came: {:?}", counts().await);
    // ...and a trim takes them back to each node's latest: heartbeats only ever add to the
    // stream, so a total lower than one seen before is a trim, whatever the timing.
    let peak = std::sync::atomic::AtomicU64::new(0);
    let trimmed = eventually(Duration::from_secs(40), || async {
        let c = counts().await;
        let total: usize = c.values().sum();
        let before = peak.fetch_max(total as u64, std::sync::atomic::Ordering::Relaxed);
        c.len() == 2 && (total as u64) < before && c.values().all(|n| *n <= 10)
    })
    .await;
    assert!(trimmed, "old heartbeats were not trimmed: {:?}", counts().await);
    let serving = eventually(DEADLINE, || async { node.serving() && service.serving() }).await;
    assert!(serving, "a node stopped serving after the trim");
    let (n, s) = (node.stats(), service.stats());
    assert_eq!((n.repair_flushes, s.repair_flushes), (0, 0));
    assert_eq!(
        (n.follower_rereads, s.follower_rereads),
        (0, 0),
        "a trim disturbed a stream follower"
    );
    while let Ok(e) = events.try_recv() {
        assert!(
            !matches!(e, invalbus::CacheEvent::NotServing),
            "the service stopped serving while heartbeats were trimmed"
        );
    }
}

/// Row 4: two publishers with one origin name. A trusted key bound to another origin is refused
/// as `a`; without a key list, the first key heard for a name keeps it while it is live, and a
/// second live process with that name refuses to start (or, told to take over, is reported by
/// both and refused by the peers).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_publishers_cannot_share_an_origin() {
    init_tracing();
    // With a key list: m's key is trusted, for origin "m" only.
    let server = NatsServer::start().await;
    let (ka, km) = (Identity::generate(), Identity::generate());
    let trust = policy(&[("a", &ka), ("m", &km)]);
    let b = bus_builder(&server.url(), NS, "b")
        .trust(trust.clone())
        .build()
        .await
        .expect("b");
    let on_b = b.cache::<String>("items", CacheConfig::new(100)).expect("cache");
    on_b.get_or_load("k1", || async { Ok::<_, std::io::Error>(Loaded::new("v".to_string())) })
        .await
        .expect("load");
    let mut m_as_a = RawPeer::connect(&server.url(), NS, "a").await.with_identity(km);
    m_as_a.send(vec![key("k1")]).await;
    let ok = eventually(DEADLINE, || async { b.stats().refused_untrusted >= 1 }).await;
    assert!(
        ok,
        "a trusted key claiming another's origin was not refused: {:?}",
        b.stats()
    );
    assert_eq!(on_b.get("k1").await.as_deref(), Some("v"));

    // Pinned on first use: "dup" is held by the first process's key (a watcher without a key
    // list shows it).
    let watcher = bus_builder(&server.url(), NS, "watcher")
        .build()
        .await
        .expect("watcher");
    let on_watcher = watcher.cache::<String>("items", CacheConfig::new(100)).expect("cache");
    on_watcher
        .get_or_load("k1", || async { Ok::<_, std::io::Error>(Loaded::new("v".to_string())) })
        .await
        .expect("load");
    let first = bus_builder(&server.url(), NS, "dup").build().await.expect("first dup");
    let pinned = eventually(DEADLINE, || async {
        watcher.peers().iter().any(|p| p.node_id == "dup")
    })
    .await;
    assert!(pinned, "the watcher never heard the first dup");
    let second = bus_builder(&server.url(), NS, "dup").build().await;
    match second {
        Err(invalbus::BuildError::Config(msg)) => assert!(msg.contains("in use"), "{msg}"),
        other => panic!("a second live process with the node id started: {other:?}"),
    }
    let taken = bus_builder(&server.url(), NS, "dup")
        .take_over(true)
        .build()
        .await
        .expect("take over");
    let reported = eventually(DEADLINE, || async {
        first.stats().duplicate_node_ids > 0 && taken.stats().duplicate_node_ids > 0
    })
    .await;
    assert!(reported, "both processes must report the duplicate");
    // The watcher keeps "dup" pinned to the first key while it is live, and cannot tell which
    // of the two is the name's genuine publisher: the second's batch is contested. Its
    // invalidation is applied (dropping an entry is always safe), nothing else: "dup" keeps the
    // first's epoch and sequence, and the first's next batch applies with no gap or flush.
    let taken_cache = taken.cache::<String>("items", CacheConfig::new(10)).expect("cache");
    taken_cache.invalidate_key("k1").await.expect("invalidate");
    let applied = eventually(DEADLINE, || async {
        watcher.stats().contested_batches >= 1 && on_watcher.get("k1").await.is_none()
    })
    .await;
    assert!(
        applied,
        "a contested batch's invalidation was not applied: {:?}",
        watcher.stats()
    );
    let dup = watcher.peers().into_iter().find(|p| p.node_id == "dup").expect("dup");
    assert_eq!(
        dup.epoch,
        first.epoch(),
        "a contested batch replaced the holder's epoch"
    );
    on_watcher
        .get_or_load("k2", || async { Ok::<_, std::io::Error>(Loaded::new("v".to_string())) })
        .await
        .expect("load");
    let first_cache = first.cache::<String>("items", CacheConfig::new(10)).expect("cache");
    first_cache.invalidate_key("k2").await.expect("invalidate");
    let applied = eventually(DEADLINE, || async { on_watcher.get("k2").await.is_none() }).await;
    assert!(applied, "the name holder's next batch was not applied");
    let s = watcher.stats();
    assert_eq!((s.gaps, s.repair_flushes), (0, 0), "{s:?}");
    drop(trust);
}

/// A forger that claims a node's name while the node is away (pinned on first use) cannot
/// silence it: the node's batches are contested, so the peers still apply its invalidations
/// (and count them) while the claim holds. The node itself sees the claim as a live duplicate
/// of its id and starts only when told to take over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_name_claimed_while_its_node_is_away_does_not_silence_it() {
    init_tracing();
    let server = NatsServer::start_jetstream().await;
    let js = invalbus::JetStreamConfig::default();
    let watcher = bus_builder(&server.url(), NS, "w")
        .jetstream(js.clone())
        .build()
        .await
        .expect("watcher");
    let on_w = watcher.cache::<String>("items", CacheConfig::new(100)).expect("cache");
    for k in ["k1", "k2"] {
        on_w.get_or_load(k, || async { Ok::<_, std::io::Error>(Loaded::new("v".to_string())) })
            .await
            .expect("load");
    }
    // The forger holds "a" by heartbeating as it, faster than the pin expiry.
    let forger = RawPeer::connect(&server.url(), NS, "a").await;
    let claiming = tokio::spawn(async move {
        loop {
            forger.heartbeat(0).await;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    let claimed = eventually(DEADLINE, || async { watcher.peers().iter().any(|p| p.node_id == "a") }).await;
    assert!(claimed, "the watcher never heard the forger's claim");
    let refused = bus_builder(&server.url(), NS, "a").jetstream(js.clone()).build().await;
    assert!(
        matches!(&refused, Err(invalbus::BuildError::Config(m)) if m.contains("in use")),
        "the node started over a live claim of its id without being told to take over: {refused:?}"
    );
    let a = bus_builder(&server.url(), NS, "a")
        .jetstream(js)
        .take_over(true)
        .build()
        .await
        .expect("a, taking over");
    let on_a = a.cache::<String>("items", CacheConfig::new(100)).expect("cache");
    on_a.invalidate_key("k1")
        .await
        .expect("invalidate")
        .published()
        .await
        .expect("accepted");
    let applied = eventually(DEADLINE, || async {
        watcher.serving() && on_w.get("k1").await.is_none()
    })
    .await;
    assert!(
        applied,
        "the genuine node's invalidation was silenced by the claim: {:?}",
        watcher.stats()
    );
    // Both paths deliver the batch (NATS, then the stream, read past it once three of the
    // watcher's own later heartbeats came back through it): applied and counted once.
    let evidence = watcher.stats().evidence;
    let read_past = eventually(DEADLINE, || async { watcher.stats().evidence >= evidence + 3 }).await;
    assert!(read_past, "the watcher's follower stalled: {:?}", watcher.stats());
    assert_eq!(watcher.stats().contested_batches, 1, "{:?}", watcher.stats());
    assert_eq!(
        on_w.get("k2").await.as_deref(),
        Some("v"),
        "more was dropped than invalidated"
    );
    claiming.abort();
}

/// Publishes heartbeats of `n` made-up nodes (`ghost-00000`, ...), each signed by a key of its
/// own and carrying the largest address and cache list a heartbeat may.
async fn publish_ghosts(url: &str, n: u64) {
    let client = async_nats::connect(url).await.expect("ghost client");
    let caches: Vec<(String, u64)> = (0..invalbus::MAX_ANNOUNCED_CACHES)
        .map(|i| (format!("{i:0>128}"), 1))
        .collect();
    for i in 0..n {
        let hb = invalbus::Heartbeat {
            origin: format!("ghost-{i:05}"),
            epoch: i + 1,
            last_seq: 0,
            timestamp_us: invalbus::now_us(),
            address: "x".repeat(invalbus::MAX_ADDRESS_BYTES),
            namespace: NS.into(),
            caches: caches.clone(),
            writes_receipts: true,
            beat: 1,
        };
        let payload = invalbus::seal(
            &Identity::generate(),
            invalbus::Kind::Heartbeat,
            invalbus::encode_heartbeat(&hb),
        );
        client
            .publish(format!("invalbus.{NS}.hb.ghost-{i:05}"), payload)
            .await
            .expect("publish");
    }
    client.flush().await.expect("flush");
}

/// Row 6: heartbeats from 10,000 made-up nodes, with the largest cache lists a heartbeat may
/// carry. With a key list they are refused and the peer table does not move; without one the
/// table stays within its bound and forgets silent peers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ghost_heartbeats_leave_the_peer_table_bounded() {
    init_tracing();
    let server = NatsServer::start().await;
    let ka = Identity::generate();
    let strict = bus_builder(&server.url(), NS, "strict")
        .trust(policy(&[("a", &ka)]))
        .build()
        .await
        .expect("strict");
    let lenient = bus_builder(&server.url(), NS, "lenient")
        .peer_table(Duration::from_secs(2), 100)
        .build()
        .await
        .expect("lenient");
    publish_ghosts(&server.url(), 10_000).await;
    let counted = eventually(Duration::from_secs(60), || async {
        strict.stats().refused_untrusted >= 10_000
            && lenient.stats().heartbeats_received + lenient.stats().peers_refused >= 10_000
    })
    .await;
    assert!(
        counted,
        "not every ghost was seen: strict {:?} lenient {:?}",
        strict.stats(),
        lenient.stats()
    );
    assert!(
        strict.peers().iter().all(|p| !p.node_id.starts_with("ghost")),
        "an untrusted heartbeat reached the peer table"
    );
    let s = lenient.stats();
    assert!(s.peers <= 100, "the peer table grew past its bound: {s:?}");
    // Silent ghosts expire.
    let forgotten = eventually(DEADLINE, || async {
        lenient.peers().iter().all(|p| !p.node_id.starts_with("ghost"))
    })
    .await;
    assert!(forgotten, "silent peers did not expire");
    let s = lenient.stats();
    assert!(s.origins_tracked <= 100, "origins tracked without bound: {s:?}");
}

/// Messages without a signature, or with one that does not verify, are refused and counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsigned_and_tampered_messages_are_refused() {
    init_tracing();
    let server = NatsServer::start().await;
    let b = bus_builder(&server.url(), NS, "b").build().await.expect("b");
    let on_b = b.cache::<String>("items", CacheConfig::new(100)).expect("cache");
    on_b.get_or_load("k1", || async { Ok::<_, std::io::Error>(Loaded::new("v".to_string())) })
        .await
        .expect("load");
    let mut mallory = RawPeer::connect(&server.url(), NS, "m").await;
    let batch = mallory.next_batch(vec![key("k1")]);
    // Unsigned: the bare batch.
    mallory
        .publish_raw(&invalbus_tests::inv_subject(NS, "m"), invalbus::encode_batch(&batch))
        .await;
    // Tampered: signed, then one byte of the body changed.
    let mut sealed = invalbus::seal(
        mallory.identity(),
        invalbus::Kind::Batch,
        invalbus::encode_batch(&batch),
    )
    .to_vec();
    let at = sealed.len() / 3;
    sealed[at] ^= 0x20;
    mallory
        .publish_raw(&invalbus_tests::inv_subject(NS, "m"), sealed.into())
        .await;
    // Signed as a heartbeat, sent as a batch.
    let wrong_kind = invalbus::seal(
        mallory.identity(),
        invalbus::Kind::Heartbeat,
        invalbus::encode_batch(&batch),
    );
    mallory
        .publish_raw(&invalbus_tests::inv_subject(NS, "m"), wrong_kind)
        .await;
    let ok = eventually(DEADLINE, || async {
        let s = b.stats();
        s.refused_unsigned + s.malformed >= 3
    })
    .await;
    assert!(ok, "{:?}", b.stats());
    assert_eq!(on_b.get("k1").await.as_deref(), Some("v"));
    assert_eq!(b.stats().batches_received, 0);
}

mod node {
    use super::*;
    use invalbus_node::pb::admin::admin_client::AdminClient;
    use invalbus_node::pb::admin::{ListNodesRequest, PurgeRequest, StatsRequest};
    use invalbus_node::{config, Node, NodeConfig, ServeArgs};
    use tonic::{Code, Request};

    const OPS: &str = "ops-token-0123456789";
    const FILE: &str = r#"
[[tokens]]
name = "ops"
token = "ops-token-0123456789"
roles = ["read", "purge"]
[[caches]]
name = "items"
"#;

    fn node_config(url: &str, node_id: &str, file: &str, insecure: bool) -> Result<NodeConfig, String> {
        let file = config::parse(file)?;
        let args = ServeArgs {
            nats: Some(url.to_owned()),
            namespace: Some(NS.to_owned()),
            node_id: Some(node_id.to_owned()),
            listen: Some("127.0.0.1:0".into()),
            insecure,
            ..Default::default()
        };
        NodeConfig::resolve(file, &args).map_err(|e| e.to_string())
    }

    fn authed<T>(msg: T, token: &str) -> Request<T> {
        let mut r = Request::new(msg);
        r.metadata_mut().insert("authorization", token.parse().expect("ascii"));
        r
    }

    /// Row 5: a receipt forged for a node that never applied the purge (here it drops the
    /// batch, as a node frozen by SIGSTOP would never apply it). Before: `purge --wait` said
    /// "every live node applied it". Now the forged receipt does not count, and the node is
    /// listed missing.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_forged_receipt_does_not_satisfy_purge_wait() {
        init_tracing();
        let server = NatsServer::start_jetstream().await;
        let n1 = Node::start(node_config(&server.url(), "n1", FILE, false).expect("config"))
            .await
            .expect("n1");
        // The frozen node: alive (it heartbeats, so a waiting purge expects its receipt) but it
        // will never apply the purge.
        let frozen = bus_builder(&server.url(), NS, "frozen")
            .jetstream(invalbus::JetStreamConfig::default())
            .build()
            .await
            .expect("frozen");
        frozen.cache::<String>("items", CacheConfig::new(10)).expect("cache");
        frozen.drop_batches_for_tests(u64::MAX);
        let known = eventually(DEADLINE, || async {
            n1.bus().peers().iter().any(|p| p.node_id == "frozen")
        })
        .await;
        assert!(known, "n1 never heard of the frozen node");

        // Mallory answers for it: a receipt for every batch of n1's next few sequences.
        let mallory = Identity::generate();
        let client = async_nats::connect(server.url()).await.expect("mallory");
        let (epoch, next) = (n1.bus().epoch(), n1.bus().last_published_seq() + 1);
        let forger = tokio::spawn(async move {
            for _ in 0..50 {
                for seq in next..next + 3 {
                    let r = invalbus::Receipt {
                        node: "frozen".into(),
                        origin: "n1".into(),
                        epoch,
                        seq,
                        applied_us: invalbus::now_us(),
                        dropped: 42,
                        invalidations: 1,
                        ..Default::default()
                    };
                    let payload = invalbus::seal(&mallory, invalbus::Kind::Receipt, r.encode());
                    let subject = invalbus::receipt_subject(NS, "n1", epoch, seq, "frozen");
                    let _ = client.publish(subject, payload).await;
                }
                let _ = client.flush().await;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
        let mut admin = AdminClient::connect(format!("http://{}", n1.addr()))
            .await
            .expect("admin");
        let reply = admin
            .purge(authed(
                PurgeRequest {
                    keys: vec!["k1".into()],
                    cache: "items".into(),
                    reason: "forged receipt test".into(),
                    wait: true,
                    wait_timeout_ms: 3_000,
                    ..Default::default()
                },
                &format!("Bearer {OPS}"),
            ))
            .await
            .expect("purge")
            .into_inner();
        forger.abort();
        assert!(
            reply.missing_nodes.contains(&"frozen".to_string()),
            "the forged receipt satisfied purge --wait: {reply:?}"
        );
        assert!(
            reply.receipts.iter().all(|r| r.node != "frozen"),
            "a forged receipt was listed: {reply:?}"
        );
        n1.shutdown().await;
        frozen.shutdown().await;
    }

    /// `insecure` is for a node without tokens: with tokens configured it is a configuration
    /// error (before, a call without a token then got every role).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn insecure_with_tokens_is_refused() {
        let e = node_config("nats://127.0.0.1:1", "x", FILE, true).expect_err("insecure with tokens");
        assert!(e.contains("insecure"), "{e}");
    }

    /// Row 6 through a node: 10,000 ghost heartbeats, each with the largest address and cache
    /// list a heartbeat may carry, against a node with the development policy (any key, pinned):
    /// the peer table stays within its bound, and `nodes` answers in pages that each stay far
    /// below gRPC's 4 MiB (before, one answer of 50 MB failed).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn ghost_heartbeats_leave_nodes_working() {
        init_tracing();
        let server = NatsServer::start().await;
        let mut config = node_config(&server.url(), "host", FILE, false).expect("config");
        config.jetstream.enabled = false;
        let n = Node::start(config).await.expect("node");
        publish_ghosts(&server.url(), 10_000).await;
        let bus = n.bus();
        let seen = eventually(Duration::from_secs(60), || async {
            let s = bus.stats();
            s.heartbeats_received + s.peers_refused >= 10_000
        })
        .await;
        assert!(seen, "not every ghost was seen: {:?}", bus.stats());
        let s = bus.stats();
        assert!(s.peers <= 4096, "the peer table grew past its bound: {s:?}");
        assert!(s.peers_refused > 0, "a full table refused nothing: {s:?}");

        let mut admin = AdminClient::connect(format!("http://{}", n.addr()))
            .await
            .expect("admin");
        // tonic's client refuses answers over 4 MiB, so each page that arrives is under that.
        let (mut listed, mut pages, mut token) = (0usize, 0, String::new());
        loop {
            let reply = admin
                .list_nodes(authed(
                    ListNodesRequest {
                        page_size: 0,
                        page_token: token.clone(),
                    },
                    &format!("Bearer {OPS}"),
                ))
                .await
                .expect("ListNodes")
                .into_inner();
            assert!(reply.nodes.len() <= 500, "a page of {} nodes", reply.nodes.len());
            listed += reply.nodes.len();
            pages += 1;
            if reply.next_page_token.is_empty() {
                break;
            }
            token = reply.next_page_token;
            assert!(pages < 100, "ListNodes pages without end");
        }
        assert!(listed > 1 && listed <= 4097, "listed {listed} nodes");
        assert!(pages > 1, "{listed} nodes in one page");
        n.shutdown().await;
    }

    /// The bearer scheme is case-insensitive (RFC 6750).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_bearer_scheme_is_case_insensitive() {
        init_tracing();
        let server = NatsServer::start_jetstream().await;
        let n = Node::start(node_config(&server.url(), "bearer", FILE, false).expect("config"))
            .await
            .expect("node");
        let mut admin = AdminClient::connect(format!("http://{}", n.addr()))
            .await
            .expect("admin");
        for scheme in ["Bearer", "bearer", "BEARER", "bEaReR"] {
            admin
                .stats(authed(StatsRequest {}, &format!("{scheme} {OPS}")))
                .await
                .unwrap_or_else(|e| panic!("{scheme}: {e}"));
        }
        let e = admin
            .stats(authed(StatsRequest {}, &format!("Basic {OPS}")))
            .await
            .expect_err("another scheme");
        assert_eq!(e.code(), Code::Unauthenticated);
        n.shutdown().await;
    }
}

/// Receipts a node writes together share one signature, over the SHA-256 digests of their
/// bodies: each still opens as trusted on its own; a member moved to another place in its set,
/// or edited, is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receipts_written_together_share_one_signature_and_each_verifies_alone() {
    init_tracing();
    let server = NatsServer::start().await;
    let client = async_nats::connect(server.url()).await.expect("raw client");
    let mut receipts = client.subscribe(invalbus::all_receipts(NS)).await.expect("subscribe");
    // The server handles one connection's messages in order: once the probe is back, the
    // subscription is in force.
    let probe = client.new_inbox();
    let mut echo = client.subscribe(probe.clone()).await.expect("subscribe");
    client.publish(probe, bytes::Bytes::new()).await.expect("probe");
    assert!(
        matches!(tokio::time::timeout(DEADLINE, echo.next()).await, Ok(Some(_))),
        "the subscription was not confirmed"
    );
    let limits = invalbus::Limits {
        max_batch_invalidations: 8,
        ..Default::default()
    };
    let a = bus_builder(&server.url(), NS, "a")
        .limits(limits)
        .build()
        .await
        .unwrap();
    let b = bus_builder(&server.url(), NS, "b").build().await.unwrap();
    let writer: Cache<String> = a.cache("items", CacheConfig::new(1000)).unwrap();
    let _reader: Cache<String> = b.cache("items", CacheConfig::new(1000)).unwrap();
    assert!(
        eventually(DEADLINE, || async { a.peers().iter().any(|p| p.node_id == "b") }).await,
        "a never heard b"
    );
    let keys: Vec<String> = (0..200).map(|i| format!("k{i}")).collect();
    writer.invalidate_keys(&keys).await.unwrap().published().await.unwrap();
    // 200 keys in batches of 8: b writes a receipt for each of the 25.
    let mut got = Vec::new();
    while got.len() < 25 {
        let m = tokio::time::timeout(DEADLINE, receipts.next())
            .await
            .unwrap_or_else(|_| panic!("{} of 25 receipts came", got.len()))
            .expect("subscription open");
        got.push(m.payload);
    }
    let limits = invalbus::Limits::default();
    let mut signatures = std::collections::HashSet::new();
    let mut member = None;
    for p in &got {
        let opened = a.open_receipt(p).unwrap();
        assert_eq!(opened.trusted, Ok(()), "{:?}", opened.message);
        assert_eq!(opened.message.node, "b");
        let env = invalbus::open(p, &limits).unwrap();
        if env.set.as_ref().is_some_and(|s| s.digests.len() >= 64 && s.index == 0) {
            member = Some((p.clone(), opened.message));
        }
        signatures.insert(env.signature);
    }
    assert!(
        signatures.len() < 25,
        "25 receipts written in one burst shared no signature"
    );
    let (payload, receipt) = member.expect("a set of two or more receipts");
    // A later field of the envelope replaces an earlier one: field 5 (index) set to 1 moves
    // the first member's body to the second's place; field 1 (body) replaces the body.
    let mut moved = payload.to_vec();
    moved.extend_from_slice(&[0x28, 1]);
    let mut edited_receipt = receipt.clone();
    edited_receipt.dropped += 1000;
    let body = edited_receipt.encode();
    let mut edited = payload.to_vec();
    edited.push(0x0a);
    edited.push(u8::try_from(body.len()).expect("a short receipt"));
    edited.extend_from_slice(&body);
    for (tampered, what) in [(moved, "moved"), (edited, "edited")] {
        let opened = a.open_receipt(&bytes::Bytes::from(tampered)).unwrap();
        assert!(
            matches!(opened.trusted, Err(invalbus::Refusal::BadSignature(_))),
            "a {what} member was trusted: {:?}",
            opened.trusted
        );
    }
}
