//! Figures of one process: the hit path against raw moka, signing and checking a batch, tag
//! purges, and memory per entry.

use crate::common::*;
use bytes::Bytes;
use invalbus::{Bus, Cache, CacheConfig, InProcessHub, Loaded};
use rand::seq::SliceRandom;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub(crate) async fn hit_path(n: usize, rounds: usize, rows: &mut Vec<Row>) {
    let hub = InProcessHub::new();
    let bus = in_process_bus(&hub, "hit").await;
    let ks = keys(n);
    let cache: Cache<Bytes> = bus.cache("hit", CacheConfig::new(2 * n as u64)).unwrap();
    fill(&cache, &ks, |i| vec![format!("a{}", i % 64), format!("b{}", i % 1000)]).await;
    let raw: moka::future::Cache<String, Bytes> = moka::future::Cache::builder()
        .max_capacity(2 * n as u64)
        .time_to_live(Duration::from_secs(300))
        .build();
    for (i, k) in ks.iter().enumerate() {
        raw.insert(k.clone(), value(i)).await;
    }
    raw.run_pending_tasks().await;
    let mut order = ks.clone();
    order.shuffle(&mut rand::rng());
    let order = Arc::new(order);
    for threads in [1usize, 2] {
        let (mut ours, mut theirs) = (Vec::new(), Vec::new());
        for _ in 0..rounds {
            let c = cache.clone();
            ours.push(time_gets(&order, threads, move |k| {
                let c = c.clone();
                async move { c.get(&k).await.is_some() }
            }));
            let r = raw.clone();
            theirs.push(time_gets(&order, threads, move |k| {
                let r = r.clone();
                async move { r.get(&k).await.is_some() }
            }));
        }
        let (o, t) = (median(ours), median(theirs));
        rows.push(row(
            format!("hit path: get, {n} keys random, {threads} thread(s)"),
            o,
            t,
            "ns/get",
            o / t,
            "<= 1.15 x raw moka",
            Some(o / t <= 1.15),
        ));
    }
    // Reads of entries with two tags while tag purges of other tags run.
    let stop = Arc::new(AtomicBool::new(false));
    let purger = {
        let (cache, stop) = (cache.clone(), stop.clone());
        tokio::spawn(async move {
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let _ = cache.invalidate_tag(&format!("unrelated-{i}")).await;
                i += 1;
                tokio::time::sleep(Duration::from_micros(200)).await;
            }
            i
        })
    };
    let (mut ours, mut theirs) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        let c = cache.clone();
        ours.push(time_gets(&order, 1, move |k| {
            let c = c.clone();
            async move { c.get(&k).await.is_some() }
        }));
        let r = raw.clone();
        theirs.push(time_gets(&order, 1, move |k| {
            let r = r.clone();
            async move { r.get(&k).await.is_some() }
        }));
    }
    stop.store(true, Ordering::Relaxed);
    let purges = purger.await.unwrap_or(0);
    let (o, t) = (median(ours), median(theirs));
    rows.push(row(
        format!("hit path: get, two tags, during {purges} tag purges"),
        o,
        t,
        "ns/get",
        o / t,
        "<= 1.10 x raw moka",
        Some(o / t <= 1.10),
    ));
}

/// The cost of signing one single-invalidation batch and of checking it, against ed25519-dalek
/// signing and verifying the same bytes; alternated in rounds, the median kept.
pub(crate) async fn signing(rounds: usize, n: usize, rows: &mut Vec<Row>) {
    use ed25519_dalek::{Signer as _, Verifier as _};
    let id = invalbus::Identity::generate();
    // A receiver whose policy lists the signer for its name, as a production namespace does.
    let hub = InProcessHub::new();
    let bus = Bus::builder()
        .in_process(&hub)
        .namespace("bench")
        .node_id("sig")
        .trust(invalbus::TrustPolicy::Keys(vec![invalbus::TrustedKey {
            key: id.public_key().to_owned(),
            scopes: invalbus::Scopes::ALL,
            origins: vec!["sig-origin".into()],
        }]))
        .build()
        .await
        .expect("in-process bus");
    let b = invalbus::Batch {
        origin: "sig-origin".into(),
        epoch: 1,
        seq: 1,
        timestamp_us: now_us(),
        namespace: "bench".into(),
        invalidations: vec![invalbus::Invalidation::new(
            Some("prop"),
            invalbus::Target::Key("k100000".into()),
        )],
    };
    let body = invalbus::encode_batch(&b);
    let sealed = invalbus::seal(&id, invalbus::Kind::Batch, body.clone());
    let sk = ed25519_dalek::SigningKey::from_bytes(&rand::random::<[u8; 32]>());
    let vk = sk.verifying_key();
    let sig = sk.sign(&body);
    let per = |t: Instant| t.elapsed().as_nanos() as f64 / n as f64 / 1000.0;
    let (mut seal, mut sign, mut open, mut verify) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for _ in 0..rounds {
        let t = Instant::now();
        for _ in 0..n {
            std::hint::black_box(invalbus::seal(&id, invalbus::Kind::Batch, body.clone()));
        }
        seal.push(per(t));
        let t = Instant::now();
        for _ in 0..n {
            std::hint::black_box(sk.sign(&body));
        }
        sign.push(per(t));
        let t = Instant::now();
        for _ in 0..n {
            let o = bus.open_batch(&sealed).expect("a sealed batch opens");
            assert!(o.trusted.is_ok(), "a signed batch must check: {:?}", o.trusted);
        }
        open.push(per(t));
        let t = Instant::now();
        for _ in 0..n {
            vk.verify(&body, &sig).expect("verifies");
        }
        verify.push(per(t));
    }
    let (seal, sign, open, verify) = (median(seal), median(sign), median(open), median(verify));
    rows.push(row(
        "signing: seal one batch (sign)",
        seal,
        sign,
        "us",
        seal / sign,
        "report (raw = ed25519 sign)",
        None,
    ));
    rows.push(row(
        "signing: open and check one batch (verify)",
        open,
        verify,
        "us",
        open / verify,
        "report (raw = ed25519 verify)",
        None,
    ));
    // What one batch costs the machine when origin and peers share it, as in the propagation
    // rows: the origin signs it, each of 3 peers checks it and signs its receipt.
    // Receipts one signature each here: the upper bound (sets of them share one).
    let per_batch = seal + 3.0 * open + 3.0 * seal;
    let raw_per_batch = sign + 3.0 * verify + 3.0 * sign;
    rows.push(row(
        "signing: CPU per batch, origin + 3 peers in one process (raw: the same signatures)",
        per_batch,
        raw_per_batch,
        "us",
        per_batch / raw_per_batch,
        "report (1 seal, 3 checks, 3 receipts)",
        None,
    ));
    // The sizes the scale model in BENCHMARKS.md uses: a signed single-key batch and a signed
    // heartbeat of a node with two caches and an admin address, as they go on the wire.
    let hb = invalbus::Heartbeat {
        origin: "node-0042".into(),
        epoch: u64::MAX,
        last_seq: 1_000_000,
        timestamp_us: now_us(),
        address: "10.0.12.34:7600".into(),
        namespace: "bench".into(),
        caches: vec![("articles".into(), 100_000), ("users".into(), 10_000)],
        writes_receipts: true,
        beat: 100_000,
    };
    let hb_len = invalbus::seal(&id, invalbus::Kind::Heartbeat, invalbus::encode_heartbeat(&hb)).len();
    println!(
        "  (wire sizes: a signed single-key batch is {} bytes, a signed heartbeat {hb_len} bytes)",
        single_batch_len()
    );
    bus.shutdown().await;
}

/// Time until a tag purge from one node hides a tag of `m` entries on a peer, entries left
/// behind, and get latency on other keys during the purge; each size is purged `samples` times
/// (the tagged entries filled again in between) and the medians kept.
///
/// The twin does the same with the raw building blocks, in the same rounds: the tag's name goes
/// over raw NATS to a subscriber that hands moka `invalidate_entries_if` a predicate on the tags
/// each value carries (moka's own way to drop entries by what they hold; gets hide matching
/// entries from then on while its maintenance scans them out). Its entries left visible are
/// counted once that scan has ended.
pub(crate) async fn tag_purge(url: &str, sizes: &[usize], samples: usize, rows: &mut Vec<Row>) {
    for &m in sizes {
        let origin = nats_bus(url, &format!("tag-origin-{m}")).await;
        let peer = nats_bus(url, &format!("tag-peer-{m}")).await;
        let oc: Cache<Bytes> = origin.cache("tags", CacheConfig::new(4 * m as u64)).unwrap();
        let pc: Cache<Bytes> = peer.cache("tags", CacheConfig::new(4 * m as u64)).unwrap();
        let mut raw = RawTagged::start(url, 4 * m as u64).await;
        let tagged = keys(m);
        let others: Vec<String> = (0..10_000).map(|i| format!("other:{i}")).collect();
        fill(&pc, &others, |_| vec!["keep".into()]).await;
        raw.fill(&others, |_| vec!["keep".into()]).await;
        let mut ours = TagPurgeSamples::default();
        let mut twin = TagPurgeSamples::default();
        for _ in 0..samples.max(1) {
            fill(&pc, &tagged, |i| vec!["purge-me".into(), format!("g{}", i % 100)]).await;
            let idle = sample_gets(pc.clone(), others.clone(), Duration::from_millis(300)).await;
            let mut applied = peer.subscribe_applied();
            let reader = tokio::spawn(sample_gets(pc.clone(), others.clone(), Duration::from_millis(800)));
            let at = now_us();
            let t = oc.invalidate_tag("purge-me").await.expect("purge");
            let _ = t.published().await;
            let applied_us = loop {
                match tokio::time::timeout(Duration::from_secs(30), applied.recv()).await {
                    Ok(Ok(a)) if a.origin == origin.node_id() => break a.applied_us,
                    Ok(Ok(_)) => continue,
                    _ => break u64::MAX,
                }
            };
            let busy = reader.await.expect("reader");
            let mut left = 0;
            for k in &tagged {
                if pc.get(k).await.is_some() {
                    left += 1;
                }
            }
            ours.push(applied_us.saturating_sub(at), left, &idle, &busy);

            // The twin, the same steps.
            raw.fill(&tagged, |i| vec!["purge-me".into(), format!("g{}", i % 100)])
                .await;
            let r = raw.cache.clone();
            let get = move |k: String| {
                let r = r.clone();
                async move { r.get(&k).await.is_some() }
            };
            let idle = sample_with(get.clone(), others.clone(), Duration::from_millis(300)).await;
            let reader = tokio::spawn(sample_with(get, others.clone(), Duration::from_millis(800)));
            let applied_us = raw.purge("purge-me").await;
            let busy = reader.await.expect("raw reader");
            raw.settle().await;
            let mut left = 0;
            for k in &tagged {
                if raw.cache.get(k).await.is_some() {
                    left += 1;
                }
            }
            twin.push(applied_us, left, &idle, &busy);
        }
        let n = samples.max(1);
        let (ours, twin) = (ours.summary(), twin.summary());
        rows.push(row(
            format!("tag purge {m} entries: invisible on peer after (median of {n}; raw: NATS + moka invalidate_entries_if)"),
            ours.visible_ms,
            twin.visible_ms,
            "ms",
            ours.visible_ms / twin.visible_ms,
            "<= 5 ms",
            Some(ours.visible_ms <= 5.0),
        ));
        rows.push(row(
            format!("tag purge {m} entries: entries left visible (worst of {n}; raw: after moka's scan)"),
            ours.worst_left,
            twin.worst_left,
            "entries",
            f64::NAN,
            "0",
            Some(ours.worst_left == 0.0),
        ));
        rows.push(row(
            format!("tag purge {m} entries: p99 get on other keys (vs idle; median of {n})"),
            ours.busy_p99,
            ours.idle_p99,
            "ns",
            ours.busy_ratio,
            "<= 2 x idle",
            Some(ours.busy_ratio <= 2.0),
        ));
        rows.push(row(
            format!("tag purge {m} entries: p99 get on other keys during it (raw: moka during its scan)"),
            ours.busy_p99,
            twin.busy_p99,
            "ns",
            ours.busy_p99 / twin.busy_p99,
            "report",
            None,
        ));
        origin.shutdown().await;
        peer.shutdown().await;
    }
}

/// Per-sample figures of one side of the tag purge rows.
#[derive(Default)]
struct TagPurgeSamples {
    visible_ms: Vec<f64>,
    left: Vec<f64>,
    idle_p99: Vec<f64>,
    busy_p99: Vec<f64>,
    busy_ratio: Vec<f64>,
}

struct TagPurgeSummary {
    visible_ms: f64,
    worst_left: f64,
    idle_p99: f64,
    busy_p99: f64,
    busy_ratio: f64,
}

impl TagPurgeSamples {
    fn push(
        &mut self,
        visible_us: u64,
        left: usize,
        idle: &hdrhistogram::Histogram<u64>,
        busy: &hdrhistogram::Histogram<u64>,
    ) {
        self.visible_ms.push(visible_us as f64 / 1000.0);
        self.left.push(left as f64);
        let (i, b) = (idle.value_at_quantile(0.99) as f64, busy.value_at_quantile(0.99) as f64);
        self.idle_p99.push(i);
        self.busy_p99.push(b);
        self.busy_ratio.push(b / i);
    }

    fn summary(self) -> TagPurgeSummary {
        TagPurgeSummary {
            visible_ms: median(self.visible_ms),
            worst_left: self.left.iter().cloned().fold(0.0, f64::max),
            idle_p99: median(self.idle_p99),
            busy_p99: median(self.busy_p99),
            busy_ratio: median(self.busy_ratio),
        }
    }
}

/// Latency of each `get` of `keys` in turn for `dur`, yielding every 256 gets.
async fn sample_gets(c: Cache<Bytes>, keys: Vec<String>, dur: Duration) -> hdrhistogram::Histogram<u64> {
    sample_with(
        move |k: String| {
            let c = c.clone();
            async move { c.get(&k).await.is_some() }
        },
        keys,
        dur,
    )
    .await
}

async fn sample_with<F, Fut>(get: F, keys: Vec<String>, dur: Duration) -> hdrhistogram::Histogram<u64>
where
    F: Fn(String) -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let mut h = histogram();
    let end = Instant::now() + dur;
    let mut i = 0;
    while Instant::now() < end {
        let k = keys[i % keys.len()].clone();
        let t = Instant::now();
        let _ = get(k).await;
        h.saturating_record(t.elapsed().as_nanos() as u64);
        i += 1;
        if i % 256 == 0 {
            tokio::task::yield_now().await;
        }
    }
    h
}

/// A value of the tag purge twin: what it holds and its tags.
struct RawValue {
    _value: Bytes,
    tags: Vec<String>,
}

/// The tag purge twin: raw moka holding tagged values, and a raw NATS subscriber that drops by
/// tag with `invalidate_entries_if` when a tag's name arrives.
struct RawTagged {
    cache: moka::future::Cache<String, Arc<RawValue>>,
    publisher: async_nats::Client,
    applied: tokio::sync::mpsc::UnboundedReceiver<u64>,
    subscriber: tokio::task::JoinHandle<()>,
}

const RAW_TAG_SUBJECT: &str = "bench.raw.tag";

impl RawTagged {
    async fn start(url: &str, capacity: u64) -> RawTagged {
        let cache: moka::future::Cache<String, Arc<RawValue>> = moka::future::Cache::builder()
            .max_capacity(capacity)
            .time_to_live(Duration::from_secs(300))
            .support_invalidation_closures()
            .build();
        let publisher = async_nats::connect(url).await.expect("raw publisher");
        let client = async_nats::connect(url).await.expect("raw subscriber");
        let mut sub = client.subscribe(RAW_TAG_SUBJECT).await.expect("raw subscribe");
        client.flush().await.ok();
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let c = cache.clone();
        let subscriber = tokio::spawn(async move {
            use futures::StreamExt;
            let _client = client;
            while let Some(msg) = sub.next().await {
                let tag = String::from_utf8_lossy(&msg.payload).into_owned();
                // Gets hide what the predicate matches from here on.
                let _ = c.invalidate_entries_if(move |_, v| v.tags.contains(&tag));
                let _ = tx.send(now_us());
            }
        });
        RawTagged {
            cache,
            publisher,
            applied: rx,
            subscriber,
        }
    }

    async fn fill(&self, keys: &[String], tags: impl Fn(usize) -> Vec<String>) {
        for (i, k) in keys.iter().enumerate() {
            let v = RawValue {
                _value: value(i),
                tags: tags(i),
            };
            self.cache.insert(k.clone(), Arc::new(v)).await;
        }
        self.cache.run_pending_tasks().await;
    }

    /// Publishes a purge of `tag` and returns how long it took to reach moka (µs).
    async fn purge(&mut self, tag: &str) -> u64 {
        let at = now_us();
        let _ = self
            .publisher
            .publish(RAW_TAG_SUBJECT, Bytes::from(tag.to_owned()))
            .await;
        match tokio::time::timeout(Duration::from_secs(30), self.applied.recv()).await {
            Ok(Some(done)) => done.saturating_sub(at),
            _ => u64::MAX,
        }
    }

    /// Runs moka's maintenance until the entry count stops changing (its scan of the
    /// predicates has ended), for at most a minute.
    async fn settle(&self) {
        let end = Instant::now() + Duration::from_secs(60);
        let (mut last, mut still) = (u64::MAX, 0);
        while still < 50 && Instant::now() < end {
            self.cache.run_pending_tasks().await;
            let e = self.cache.entry_count();
            if e == last {
                still += 1;
            } else {
                (last, still) = (e, 0);
            }
        }
    }
}

impl Drop for RawTagged {
    fn drop(&mut self) {
        self.subscriber.abort();
    }
}

/// Runs in a child process: resident bytes added by `n` entries in one cache kind.
pub(crate) async fn memory_probe(kind: &str, n: usize) {
    let ks = keys(n);
    let values: Vec<Bytes> = (0..n).map(value).collect();
    let before = rss_bytes();
    let hub = InProcessHub::new();
    let bus = in_process_bus(&hub, "mem").await;
    let raw: moka::future::Cache<String, Bytes> = moka::future::Cache::builder()
        .max_capacity(2 * n as u64)
        .time_to_live(Duration::from_secs(300))
        .build();
    let ours: Cache<Bytes> = bus.cache("mem", CacheConfig::new(2 * n as u64)).unwrap();
    let before = before.max(rss_bytes());
    for (i, k) in ks.iter().enumerate() {
        if kind == "raw" {
            raw.insert(k.clone(), values[i].clone()).await;
        } else {
            // Tag sets are interned, so their cost depends on how many distinct sets there are:
            // "shared" is a blog's (every article tagged `articles` and one of 1,000 authors),
            // "unique" the worst case (a tag of its own on every entry).
            let second = if kind == "unique" {
                format!("item:{i}")
            } else {
                format!("author:{}", i % 1000)
            };
            let l = Loaded {
                value: values[i].clone(),
                tags: vec!["articles".to_string(), second],
                version: None,
                ttl: None,
            };
            ours.reserve(k).fill(l).await;
        }
    }
    raw.run_pending_tasks().await;
    ours.run_pending_tasks().await;
    let after = rss_bytes();
    println!("{}", after.saturating_sub(before));
}

pub(crate) async fn memory(n: usize, rows: &mut Vec<Row>) {
    let exe = std::env::current_exe().expect("own path");
    let probe = |kind: &str| -> f64 {
        let out = std::process::Command::new(&exe)
            .args(["--memory-probe", kind, "--entries", &n.to_string()])
            .output()
            .expect("memory probe");
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse::<f64>()
            .unwrap_or(f64::NAN)
    };
    let raw = probe("raw") / n as f64;
    for (kind, what, budget) in [
        ("shared", "2 tags of 1,000 sets", 32.0),
        ("unique", "2 tags, one unique per entry", 64.0),
    ] {
        let ours = probe(kind) / n as f64;
        rows.push(row(
            format!("memory: bytes per entry, {n} entries, {what}"),
            ours,
            raw,
            "B/entry",
            ours / raw,
            if budget == 32.0 {
                "<= raw + 32 B"
            } else {
                "<= raw + 64 B"
            },
            Some(ours <= raw + budget),
        ));
    }
}
