//! `invalbus-bench`: measures invalbus next to the raw building blocks (moka, NATS, JetStream) in
//! one run, alternating the two sides so that drift on a shared machine cancels, and prints the
//! ratios.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::Parser;
use futures::StreamExt;
use invalbus::{Bus, Cache, CacheConfig, InProcessHub, Loaded};
use invalbus_tests::NatsServer;
use rand::seq::SliceRandom;

mod redis;

/// Benchmarks of invalbus against raw moka and raw NATS.
#[derive(Parser, Debug)]
struct Args {
    /// A short run (about two minutes) with smaller sizes.
    #[arg(long)]
    quick: bool,
    /// Also write the results as JSON to this file.
    #[arg(long)]
    json: Option<std::path::PathBuf>,
    /// Internal: measure the memory of one cache in this process and print it.
    #[arg(long, hide = true)]
    memory_probe: Option<String>,
    /// Internal: entries for the memory probe.
    #[arg(long, hide = true, default_value_t = 0)]
    entries: usize,
}

/// One figure: invalbus's value next to the raw building block's.
struct Row {
    name: String,
    invalbus: f64,
    raw: f64,
    unit: &'static str,
    /// invalbus / raw (or raw / invalbus for rates, so that above 1 always means "invalbus costs more").
    ratio: f64,
    goal: String,
    met: Option<bool>,
}

impl Row {
    fn json(&self) -> String {
        let num = |v: f64| {
            if v.is_finite() {
                format!("{v:.3}")
            } else {
                "null".into()
            }
        };
        format!(
            "{{\"name\":{:?},\"invalbus\":{},\"raw\":{},\"unit\":{:?},\"ratio\":{},\"goal\":{:?},\"met\":{}}}",
            self.name,
            num(self.invalbus),
            num(self.raw),
            self.unit,
            num(self.ratio),
            self.goal,
            self.met.map_or("null".to_string(), |m| m.to_string())
        )
    }
}

fn row(
    name: impl Into<String>,
    invalbus: f64,
    raw: f64,
    unit: &'static str,
    ratio: f64,
    goal: &str,
    met: Option<bool>,
) -> Row {
    let r = Row {
        name: name.into(),
        invalbus,
        raw,
        unit,
        ratio,
        goal: goal.into(),
        met,
    };
    println!(
        "{:<58} {:>14.3} {:>14.3} {:<8} {:>7.3}  {:<36} {}",
        r.name,
        r.invalbus,
        r.raw,
        r.unit,
        r.ratio,
        r.goal,
        match r.met {
            Some(true) => "met",
            Some(false) => "MISSED",
            None => "-",
        }
    );
    r
}

fn now_us() -> u64 {
    invalbus::now_us()
}

fn value(i: usize) -> Bytes {
    let mut v = vec![0u8; 100];
    v[..8].copy_from_slice(&(i as u64).to_le_bytes());
    Bytes::from(v)
}

fn keys(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("key:{i:08}")).collect()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

async fn in_process_bus(hub: &InProcessHub, id: &str) -> Bus {
    Bus::builder()
        .in_process(hub)
        .namespace("bench")
        .node_id(id)
        .build()
        .await
        .expect("in-process bus")
}

async fn nats_bus(url: &str, id: &str) -> Bus {
    nats_bus_signed(url, id, true).await
}

/// A bus that signs its messages and checks its peers' (as every bus does), or, to measure
/// what that costs, one that does neither (its namespace must hold only such buses).
async fn nats_bus_signed(url: &str, id: &str, signed: bool) -> Bus {
    let b = Bus::builder()
        .nats(url)
        .namespace(if signed { "bench" } else { "bench-unsigned" })
        .node_id(id)
        .outbound_queue(1 << 22);
    let b = if signed { b } else { b.unsigned_for_benchmarks() };
    b.build().await.expect("bus on the bench's nats-server")
}

async fn fill(cache: &Cache<Bytes>, keys: &[String], tags: impl Fn(usize) -> Vec<String>) {
    for (i, k) in keys.iter().enumerate() {
        let mut loaded = Loaded::new(value(i));
        loaded.tags = tags(i);
        cache.reserve(k).fill(loaded).await;
    }
    cache.run_pending_tasks().await;
}

/// Time per `get` over `keys`, split across `threads` OS threads, each running one async loop.
fn time_gets<F, Fut>(keys: &Arc<Vec<String>>, threads: usize, get: F) -> f64
where
    F: Fn(String) -> Fut + Send + Sync + Clone + 'static,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    let hits: usize = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let keys = keys.clone();
                let get = get.clone();
                s.spawn(move || {
                    futures::executor::block_on(async move {
                        let mut hits = 0usize;
                        for k in keys.iter().skip(t).step_by(threads) {
                            hits += usize::from(get(k.clone()).await);
                        }
                        hits
                    })
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap_or(0)).sum()
    });
    let elapsed = start.elapsed();
    assert_eq!(hits, keys.len(), "every read of a warm cache must hit");
    elapsed.as_nanos() as f64 / keys.len() as f64
}

async fn hit_path(n: usize, rounds: usize, rows: &mut Vec<Row>) {
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
        "<= 1.15 x raw moka",
        Some(o / t <= 1.15),
    ));
}

/// Publish-to-applied-on-all-peers latency, paced at `rate` per second for `secs`.
async fn propagation_invalbus(
    url: &str,
    peers: usize,
    rate: u64,
    secs: u64,
    tag: &str,
    signed: bool,
) -> hdrhistogram::Histogram<u64> {
    let origin = nats_bus_signed(url, &format!("p-{tag}-origin"), signed).await;
    let cache: Cache<Bytes> = origin.cache("prop", CacheConfig::new(1000)).unwrap();
    let mut applied = Vec::new();
    let mut buses = Vec::new();
    for p in 0..peers {
        let b = nats_bus_signed(url, &format!("p-{tag}-{p}"), signed).await;
        let _c: Cache<Bytes> = b.cache("prop", CacheConfig::new(1000)).unwrap();
        applied.push(b.subscribe_applied());
        buses.push(b);
    }
    // Per batch seq: (applications seen, latest applied_us).
    let collector = tokio::spawn(async move {
        let mut seen: HashMap<u64, (usize, u64)> = HashMap::new();
        let mut streams = futures::stream::select_all(applied.into_iter().map(|rx| {
            futures::stream::unfold(rx, |mut rx| async move {
                loop {
                    match rx.recv().await {
                        Ok(a) => return Some((a, rx)),
                        Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                        Err(_) => return None,
                    }
                }
            })
            .boxed()
        }));
        let deadline = tokio::time::sleep(Duration::from_secs(secs + 5));
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                Some(a) = streams.next() => {
                    let e = seen.entry(a.seq).or_insert((0, 0));
                    e.0 += 1;
                    e.1 = e.1.max(a.applied_us);
                }
                _ = &mut deadline => break,
            }
        }
        seen
    });
    let total = rate * secs;
    let mut calls = Vec::with_capacity(total as usize);
    let start = Instant::now();
    for i in 0..total {
        let due = start + Duration::from_nanos(i * 1_000_000_000 / rate);
        let now = Instant::now();
        if due > now + Duration::from_micros(200) {
            tokio::time::sleep(due - now).await;
        }
        let at = now_us();
        if let Ok(t) = cache.invalidate_key(&format!("k{i}")).await {
            calls.push((at, t));
        }
    }
    let mut sent = Vec::with_capacity(calls.len());
    for (at, t) in calls {
        if let Ok(p) = t.published().await {
            sent.push((at, p.seq));
        }
    }
    let seen = collector.await.unwrap_or_default();
    let mut h = hdrhistogram::Histogram::<u64>::new(3).unwrap();
    let mut missing = 0;
    for (at, seq) in sent {
        match seen.get(&seq) {
            Some((n, done)) if *n == peers => h.saturating_record(done.saturating_sub(at).max(1)),
            _ => missing += 1,
        }
    }
    if missing > 0 {
        println!("  (note: {missing} invalidations were not seen applied on all {peers} peers within the window)");
    }
    origin.shutdown().await;
    for b in buses {
        b.shutdown().await;
    }
    h
}

/// The same measurement with raw NATS: one publisher, `peers` subscriber connections.
async fn propagation_raw(
    url: &str,
    peers: usize,
    rate: u64,
    secs: u64,
    payload_len: usize,
) -> hdrhistogram::Histogram<u64> {
    let subject = "bench.raw.prop";
    let publisher = async_nats::connect(url).await.expect("raw publisher");
    let mut subs = Vec::new();
    for _ in 0..peers {
        let c = async_nats::connect(url).await.expect("raw subscriber");
        let s = c.subscribe(subject).await.expect("raw subscribe");
        c.flush().await.ok();
        subs.push((c, s));
    }
    let total = rate * secs;
    let mut tasks = Vec::new();
    for (c, mut s) in subs {
        tasks.push(tokio::spawn(async move {
            let mut got: Vec<(u64, u64)> = Vec::with_capacity(total as usize);
            while got.len() < total as usize {
                match tokio::time::timeout(Duration::from_secs(5), s.next()).await {
                    Ok(Some(m)) => {
                        let at = now_us();
                        let i = u64::from_le_bytes(m.payload[..8].try_into().unwrap_or([0; 8]));
                        let sent = u64::from_le_bytes(m.payload[8..16].try_into().unwrap_or([0; 8]));
                        got.push((i, at.saturating_sub(sent)));
                    }
                    _ => break,
                }
            }
            drop(c);
            got
        }));
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let start = Instant::now();
    for i in 0..total {
        let due = start + Duration::from_nanos(i * 1_000_000_000 / rate);
        let now = Instant::now();
        if due > now + Duration::from_micros(200) {
            tokio::time::sleep(due - now).await;
        }
        let mut p = vec![0u8; payload_len.max(16)];
        p[..8].copy_from_slice(&i.to_le_bytes());
        p[8..16].copy_from_slice(&now_us().to_le_bytes());
        let _ = publisher.publish(subject, Bytes::from(p)).await;
    }
    publisher.flush().await.ok();
    let mut worst: HashMap<u64, (usize, u64)> = HashMap::new();
    for t in tasks {
        for (i, lat) in t.await.unwrap_or_default() {
            let e = worst.entry(i).or_insert((0, 0));
            e.0 += 1;
            e.1 = e.1.max(lat);
        }
    }
    let mut h = hdrhistogram::Histogram::<u64>::new(3).unwrap();
    for (_, (n, lat)) in worst {
        if n == peers {
            h.saturating_record(lat.max(1));
        }
    }
    h
}

fn single_batch_len() -> usize {
    let b = invalbus::Batch {
        origin: "p-5000-origin".into(),
        epoch: u64::MAX,
        seq: 1_000,
        timestamp_us: now_us(),
        namespace: "bench".into(),
        invalidations: vec![invalbus::Invalidation::new(
            Some("prop"),
            invalbus::Target::Key("k100000".into()),
        )],
    };
    // The bytes on the wire: the batch in its signed envelope.
    invalbus::seal(
        &invalbus::Identity::generate(),
        invalbus::Kind::Batch,
        invalbus::encode_batch(&b),
    )
    .len()
}

/// The cost of signing one single-invalidation batch and of checking it, against ed25519-dalek
/// signing and verifying the same bytes; alternated in rounds, the median kept.
async fn signing(rounds: usize, n: usize, rows: &mut Vec<Row>) {
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
    let per_batch = seal + 3.0 * open + 3.0 * seal;
    rows.push(row(
        "signing: CPU per batch, origin + 3 peers in one process",
        per_batch,
        f64::NAN,
        "us",
        f64::NAN,
        "report (1 seal, 3 checks, 3 receipts)",
        None,
    ));
    bus.shutdown().await;
}

async fn propagation(url: &str, secs: u64, rows: &mut Vec<Row>) {
    let len = single_batch_len();
    for rate in [5_000u64, 50_000] {
        let raw = propagation_raw(url, 3, rate, secs, len).await;
        let ours = propagation_invalbus(url, 3, rate, secs, &rate.to_string(), true).await;
        if rate == 5_000 {
            // The same without signatures, in the same run: what signing costs.
            let unsigned = propagation_invalbus(url, 3, rate, secs, "5000u", false).await;
            for (q, name) in [(0.5, "p50"), (0.99, "p99")] {
                let (u, r) = (unsigned.value_at_quantile(q) as f64, raw.value_at_quantile(q) as f64);
                rows.push(row(
                    format!("propagation {name}, 3 peers, {rate}/s, UNSIGNED (signing's cost)"),
                    u,
                    r,
                    "us",
                    u / r,
                    "-",
                    None,
                ));
            }
        }
        for (q, name) in [(0.5, "p50"), (0.99, "p99"), (0.999, "p99.9")] {
            let (o, r) = (ours.value_at_quantile(q) as f64, raw.value_at_quantile(q) as f64);
            let (goal, met) = if name == "p99" {
                ("<= 1.25 x raw NATS p99", Some(o <= 1.25 * r))
            } else {
                ("-", None)
            };
            rows.push(row(
                format!("propagation {name}, 3 peers, {rate}/s"),
                o,
                r,
                "us",
                o / r,
                goal,
                met,
            ));
        }
    }
}

/// Invalidations per second applied at each of 3 peers, keys absent or present there.
async fn throughput(url: &str, n: usize, rows: &mut Vec<Row>) {
    let ks = keys(n);
    // (keys present at the peers, signed): the unsigned run shows what signing costs.
    for (present, signed) in [(false, true), (false, false), (true, true)] {
        let origin = nats_bus_signed(url, &format!("t-origin-{present}-{signed}"), signed).await;
        let cache: Cache<Bytes> = origin.cache("tp", CacheConfig::new(2 * n as u64)).unwrap();
        let mut peers = Vec::new();
        for p in 0..3 {
            let b = nats_bus_signed(url, &format!("t-{present}-{signed}-{p}"), signed).await;
            let c: Cache<Bytes> = b.cache("tp", CacheConfig::new(2 * n as u64)).unwrap();
            if present {
                fill(&c, &ks, |_| Vec::new()).await;
            }
            peers.push((b, c));
        }
        let start = Instant::now();
        for k in &ks {
            while cache.invalidate_key(k).await.is_err() {
                tokio::task::yield_now().await;
            }
        }
        let mut rates = Vec::new();
        for (b, _) in &peers {
            let deadline = Instant::now() + Duration::from_secs(120);
            while b.stats().invalidations_received < n as u64 && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            rates.push(n as f64 / start.elapsed().as_secs_f64());
        }
        let batches = origin.stats().batches_published.max(1);
        let ours = rates.iter().cloned().fold(f64::INFINITY, f64::min);
        if present {
            for (_, c) in &peers {
                c.run_pending_tasks().await;
                let left = futures::future::join_all(ks.iter().take(1000).map(|k| c.get(k)))
                    .await
                    .iter()
                    .filter(|v| v.is_some())
                    .count();
                assert_eq!(left, 0, "present keys must be gone after their invalidation");
            }
            // Raw moka's own invalidate rate on the same keys, in the same conditions: three
            // caches invalidating at once in this process, as the three peers do.
            let mut raws = Vec::new();
            for _ in 0..3 {
                let raw: moka::future::Cache<String, Bytes> = moka::future::Cache::builder()
                    .max_capacity(2 * n as u64)
                    .time_to_live(Duration::from_secs(300))
                    .build();
                for (i, k) in ks.iter().enumerate() {
                    raw.insert(k.clone(), value(i)).await;
                }
                raw.run_pending_tasks().await;
                raws.push(raw);
            }
            let t = Instant::now();
            let tasks: Vec<_> = raws
                .into_iter()
                .map(|raw| {
                    let ks = ks.clone();
                    tokio::spawn(async move {
                        for k in &ks {
                            raw.invalidate(k).await;
                        }
                        Instant::now()
                    })
                })
                .collect();
            let mut moka_rate = f64::INFINITY;
            for task in tasks {
                if let Ok(end) = task.await {
                    moka_rate = moka_rate.min(n as f64 / end.duration_since(t).as_secs_f64());
                }
            }
            rows.push(row(
                "throughput: present keys, keys/s at each of 3 peers",
                ours,
                moka_rate,
                "keys/s",
                moka_rate / ours,
                ">= 0.9 x raw moka invalidate",
                Some(ours >= 0.9 * moka_rate),
            ));
        } else {
            // Raw NATS carrying the same bytes in the same number of messages.
            let bytes_per_msg = (n * 40 / batches as usize).max(16);
            let raw_rate = raw_throughput(url, batches as usize, bytes_per_msg).await * (n as f64 / batches as f64);
            rows.push(row(
                format!(
                    "throughput: absent keys, keys/s at each of 3 peers ({batches} batches){}",
                    if signed { "" } else { ", UNSIGNED (signing's cost)" }
                ),
                ours,
                raw_rate,
                "keys/s",
                raw_rate / ours,
                if signed { ">= 1M/s per peer" } else { "-" },
                signed.then_some(ours >= 1_000_000.0),
            ));
        }
        origin.shutdown().await;
        for (b, _) in peers {
            b.shutdown().await;
        }
    }
}

/// Messages per second delivered to each of 3 raw subscribers.
async fn raw_throughput(url: &str, messages: usize, len: usize) -> f64 {
    let subject = "bench.raw.tp";
    let publisher = async_nats::connect(url).await.expect("raw publisher");
    let mut tasks = Vec::new();
    for _ in 0..3 {
        let c = async_nats::ConnectOptions::new()
            .subscription_capacity(1 << 20)
            .connect(url)
            .await
            .expect("raw subscriber");
        let mut s = c.subscribe(subject).await.expect("raw subscribe");
        c.flush().await.ok();
        tasks.push(tokio::spawn(async move {
            let mut n = 0;
            let mut first = None;
            while n < messages {
                match tokio::time::timeout(Duration::from_secs(5), s.next()).await {
                    Ok(Some(_)) => {
                        first.get_or_insert_with(Instant::now);
                        n += 1;
                    }
                    _ => break,
                }
            }
            drop(c);
            (n, Instant::now())
        }));
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let payload = Bytes::from(vec![7u8; len]);
    let start = Instant::now();
    for _ in 0..messages {
        let _ = publisher.publish(subject, payload.clone()).await;
    }
    publisher.flush().await.ok();
    let mut worst = f64::INFINITY;
    for t in tasks {
        if let Ok((n, end)) = t.await {
            worst = worst.min(n as f64 / end.duration_since(start).as_secs_f64());
        }
    }
    worst
}

/// Time until a tag purge from one node hides a tag of `m` entries on a peer, entries left
/// behind, and get latency on other keys during the purge.
async fn tag_purge(url: &str, sizes: &[usize], rows: &mut Vec<Row>) {
    for &m in sizes {
        let origin = nats_bus(url, &format!("tag-origin-{m}")).await;
        let peer = nats_bus(url, &format!("tag-peer-{m}")).await;
        let oc: Cache<Bytes> = origin.cache("tags", CacheConfig::new(4 * m as u64)).unwrap();
        let pc: Cache<Bytes> = peer.cache("tags", CacheConfig::new(4 * m as u64)).unwrap();
        let tagged = keys(m);
        fill(&pc, &tagged, |i| vec!["purge-me".into(), format!("g{}", i % 100)]).await;
        let others: Vec<String> = (0..10_000).map(|i| format!("other:{i}")).collect();
        fill(&pc, &others, |_| vec!["keep".into()]).await;
        let sample = |c: Cache<Bytes>, others: Vec<String>, dur: Duration| async move {
            let mut h = hdrhistogram::Histogram::<u64>::new(3).unwrap();
            let end = Instant::now() + dur;
            let mut i = 0;
            while Instant::now() < end {
                let t = Instant::now();
                let _ = c.get(&others[i % others.len()]).await;
                h.saturating_record(t.elapsed().as_nanos() as u64);
                i += 1;
                if i % 256 == 0 {
                    tokio::task::yield_now().await;
                }
            }
            h
        };
        let idle = sample(pc.clone(), others.clone(), Duration::from_millis(300)).await;
        let mut applied = peer.subscribe_applied();
        let reader = tokio::spawn(sample(pc.clone(), others.clone(), Duration::from_millis(800)));
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
        let visible_ms = applied_us.saturating_sub(at) as f64 / 1000.0;
        let mut left = 0;
        for k in &tagged {
            if pc.get(k).await.is_some() {
                left += 1;
            }
        }
        let (p_idle, p_busy) = (idle.value_at_quantile(0.99) as f64, busy.value_at_quantile(0.99) as f64);
        rows.push(row(
            format!("tag purge {m} entries: invisible on peer after"),
            visible_ms,
            f64::NAN,
            "ms",
            f64::NAN,
            "<= 5 ms",
            Some(visible_ms <= 5.0),
        ));
        rows.push(row(
            format!("tag purge {m} entries: entries left visible"),
            left as f64,
            f64::NAN,
            "entries",
            f64::NAN,
            "0",
            Some(left == 0),
        ));
        rows.push(row(
            format!("tag purge {m} entries: p99 get on other keys (vs idle)"),
            p_busy,
            p_idle,
            "ns",
            p_busy / p_idle,
            "<= 2 x idle",
            Some(p_busy <= 2.0 * p_idle),
        ));
        origin.shutdown().await;
        peer.shutdown().await;
    }
}

fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1).and_then(|v| v.parse::<u64>().ok()))
        .map(|pages| pages * 4096)
        .unwrap_or(0)
}

/// Runs in a child process: resident bytes added by `n` entries in one cache kind.
async fn memory_probe(kind: &str, n: usize) {
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

async fn memory(n: usize, rows: &mut Vec<Row>) {
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
    for (kind, what) in [
        ("shared", "2 tags of 1,000 sets"),
        ("unique", "2 tags, one unique per entry"),
    ] {
        let ours = probe(kind) / n as f64;
        rows.push(row(
            format!("memory: bytes per entry, {n} entries, {what}"),
            ours,
            raw,
            "B/entry",
            ours / raw,
            "<= raw + 64 B",
            Some(ours <= raw + 64.0),
        ));
    }
}

/// Invalidations per second with the JetStream acknowledgement, vs raw JetStream publishes with
/// a window of 256 acks in flight.
async fn durable(n: usize, rows: &mut Vec<Row>) {
    let server = NatsServer::start_jetstream().await;
    let url = server.url();
    let bus = Bus::builder()
        .nats(url.as_str())
        .namespace("benchjs")
        .node_id("durable")
        .outbound_queue(1 << 22)
        .jetstream(invalbus::JetStreamConfig::default())
        .build()
        .await
        .expect("durable bus");
    let cache: Cache<Bytes> = bus.cache("d", CacheConfig::new(1000)).unwrap();
    let start = Instant::now();
    let mut tickets = Vec::with_capacity(n);
    for i in 0..n {
        if let Ok(t) = cache.invalidate_key(&format!("k{i}")).await {
            tickets.push(t);
        }
    }
    let mut ok = 0;
    for t in tickets {
        if t.published().await.is_ok() {
            ok += 1;
        }
    }
    let ours = ok as f64 / start.elapsed().as_secs_f64();
    bus.shutdown().await;
    let client = async_nats::connect(url.as_str()).await.expect("raw js client");
    let js = async_nats::jetstream::new(client);
    js.get_or_create_stream(async_nats::jetstream::stream::Config {
        name: "RAWBENCH".into(),
        subjects: vec!["rawbench.>".into()],
        ..Default::default()
    })
    .await
    .expect("raw stream");
    let payload = Bytes::from(vec![1u8; single_batch_len()]);
    let start = Instant::now();
    let mut window = std::collections::VecDeque::new();
    let mut acked = 0;
    for _ in 0..n {
        if let Ok(f) = js.publish("rawbench.x", payload.clone()).await {
            window.push_back(f);
        }
        if window.len() >= 256 {
            if let Some(f) = window.pop_front() {
                acked += usize::from(f.await.is_ok());
            }
        }
    }
    for f in window {
        acked += usize::from(f.await.is_ok());
    }
    let raw = acked as f64 / start.elapsed().as_secs_f64();
    rows.push(row(
        "durable publish: invalidations/s acknowledged by JetStream",
        ours,
        raw,
        "inv/s",
        raw / ours,
        "report",
        None,
    ));
}

async fn fan_out(url: &str, sizes: &[usize], secs: u64, rows: &mut Vec<Row>) {
    let mut base = f64::NAN;
    for &peers in sizes {
        let h = propagation_invalbus(url, peers, 5_000, secs, &format!("fan{peers}"), true).await;
        let p99 = h.value_at_quantile(0.99) as f64;
        if base.is_nan() {
            base = p99;
        }
        rows.push(row(
            format!("fan-out: propagation p99, {peers} peers, 5000/s"),
            p99,
            base,
            "us",
            p99 / base,
            "report (raw = 3 peers)",
            None,
        ));
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args = Args::parse();
    if let Some(kind) = &args.memory_probe {
        memory_probe(kind, args.entries).await;
        return;
    }
    let q = args.quick;
    println!(
        "invalbus-bench ({} run) on {} cores",
        if q { "quick" } else { "full" },
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!(
        "{:<58} {:>14} {:>14} {:<8} {:>7}  {:<36} met",
        "figure", "invalbus", "raw", "unit", "ratio", "goal"
    );
    let mut rows = Vec::new();
    hit_path(if q { 200_000 } else { 1_000_000 }, if q { 3 } else { 5 }, &mut rows).await;
    let server = NatsServer::start().await;
    let url = server.url();
    signing(if q { 3 } else { 5 }, if q { 2_000 } else { 10_000 }, &mut rows).await;
    propagation(&url, if q { 2 } else { 10 }, &mut rows).await;
    throughput(&url, if q { 200_000 } else { 1_000_000 }, &mut rows).await;
    tag_purge(
        &url,
        if q {
            &[10_000, 100_000][..]
        } else {
            &[10_000, 100_000, 1_000_000][..]
        },
        &mut rows,
    )
    .await;
    memory(if q { 200_000 } else { 1_000_000 }, &mut rows).await;
    durable(if q { 20_000 } else { 100_000 }, &mut rows).await;
    fan_out(
        &url,
        if q { &[3, 10][..] } else { &[3, 10, 30][..] },
        if q { 2 } else { 5 },
        &mut rows,
    )
    .await;
    redis::tracking(if q { 2 } else { 10 }, if q { 200_000 } else { 1_000_000 }, &mut rows).await;
    if let Some(path) = args.json {
        let body = format!(
            "[\n  {}\n]\n",
            rows.iter().map(Row::json).collect::<Vec<_>>().join(",\n  ")
        );
        if let Err(e) = std::fs::write(&path, body) {
            eprintln!("invalbus-bench: cannot write {}: {e}", path.display());
            std::process::exit(1);
        }
    }
    let missed = rows.iter().filter(|r| r.met == Some(false)).count();
    println!(
        "bench: {} figures, {} goals met, {} missed",
        rows.len(),
        rows.iter().filter(|r| r.met == Some(true)).count(),
        missed
    );
}
