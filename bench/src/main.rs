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

mod multitier;
mod redis;
mod soak;

/// Benchmarks of invalbus against raw moka and raw NATS.
#[derive(Parser, Debug)]
struct Args {
    /// A short run (about two minutes) with smaller sizes.
    #[arg(long)]
    quick: bool,
    /// Also write the results as JSON to this file.
    #[arg(long)]
    json: Option<std::path::PathBuf>,
    /// Run only these figures (comma-separated): hit, signing, propagation, throughput, tags,
    /// memory, durable, fanout, peers. Every figure runs without it.
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Internal: measure the memory of one cache in this process and print it.
    #[arg(long, hide = true)]
    memory_probe: Option<String>,
    /// Internal: entries for the memory probe.
    #[arg(long, hide = true, default_value_t = 0)]
    entries: usize,
    /// Run only the soak: 50,000 invalidations/s and reads on 3 nodes, with origins that come
    /// and go, sampled every 10 s, for this many minutes (exits non-zero only on a broken run).
    #[arg(long)]
    soak: Option<u64>,
    /// Where the soak writes soak.csv and soak.svg.
    #[arg(long, default_value = "target/soak")]
    soak_out: std::path::PathBuf,
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

/// A latency histogram from 1 to an hour's worth of nanoseconds, 3 significant digits. The bounds
/// are explicit: `Histogram::new` starts with a high of 2 and `saturating_record` clamps to it
/// rather than growing, which once capped every figure here at about 2 ms.
pub(crate) fn histogram() -> hdrhistogram::Histogram<u64> {
    hdrhistogram::Histogram::new_with_bounds(1, 3_600_000_000_000, 3).expect("valid bounds")
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
        "<= 1.10 x raw moka",
        Some(o / t <= 1.10),
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
    let mut h = histogram();
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

/// Bytes per invalidation record in the raw twins' messages: its index and send time, and 8
/// bytes standing for the key.
const RAW_RECORD: usize = 24;

/// The same measurement with raw NATS: one publisher, `peers` subscriber connections, messages
/// of `envelope_len` bytes for one invalidation (and [`RAW_RECORD`] more for each further one).
/// Without `batching`, each invalidation is one message. With it, the twin batches as the bus
/// does: the caller's paced invalidations queue for one publishing task, which sends whatever
/// has queued while it was busy as one message.
async fn propagation_raw(
    url: &str,
    peers: usize,
    rate: u64,
    secs: u64,
    envelope_len: usize,
    batching: bool,
) -> hdrhistogram::Histogram<u64> {
    let subject = "bench.raw.prop";
    let publisher = async_nats::connect(url).await.expect("raw publisher");
    let prefix = envelope_len.saturating_sub(RAW_RECORD);
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
                        for r in m.payload.get(prefix..).unwrap_or_default().chunks_exact(RAW_RECORD) {
                            let i = u64::from_le_bytes(r[..8].try_into().unwrap_or([0; 8]));
                            let sent = u64::from_le_bytes(r[8..16].try_into().unwrap_or([0; 8]));
                            got.push((i, at.saturating_sub(sent)));
                        }
                    }
                    _ => break,
                }
            }
            drop(c);
            got
        }));
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    fn record(p: &mut Vec<u8>, i: u64, at: u64) {
        p.extend_from_slice(&i.to_le_bytes());
        p.extend_from_slice(&at.to_le_bytes());
        p.extend_from_slice(&[0u8; RAW_RECORD - 16]);
    }
    // With batching, the caller queues and one task publishes what queued while it was busy.
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(u64, u64)>();
    let sender = batching.then(|| {
        let publisher = publisher.clone();
        tokio::spawn(async move {
            while let Some((i, at)) = rx.recv().await {
                let mut p = vec![0u8; prefix];
                record(&mut p, i, at);
                while let Ok((i, at)) = rx.try_recv() {
                    record(&mut p, i, at);
                }
                let _ = publisher.publish(subject, Bytes::from(p)).await;
            }
        })
    });
    let start = Instant::now();
    for i in 0..total {
        let due = start + Duration::from_nanos(i * 1_000_000_000 / rate);
        let now = Instant::now();
        if due > now + Duration::from_micros(200) {
            tokio::time::sleep(due - now).await;
        }
        if batching {
            let _ = tx.send((i, now_us()));
        } else {
            let mut p = vec![0u8; prefix];
            record(&mut p, i, now_us());
            let _ = publisher.publish(subject, Bytes::from(p)).await;
        }
    }
    drop(tx);
    if let Some(sender) = sender {
        let _ = sender.await;
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
    let mut h = histogram();
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

/// Publish-to-applied latency at 3 peers, at 5,000/s and 50,000/s, beside its raw NATS twin and
/// (at 5,000/s) Redis tracking's, alternated in `rounds` of `secs / rounds` each; the rounds'
/// histograms are merged. At 50,000/s the bus batches, so its twin batches the same way, and a
/// second twin without batching shows what batching gains.
async fn propagation(url: &str, secs: u64, rounds: u64, redis: &mut Option<redis::Tracking>, rows: &mut Vec<Row>) {
    let len = single_batch_len();
    let per = (secs / rounds).max(1);
    let new = || histogram();
    for rate in [5_000u64, 50_000] {
        let (mut raw, mut ours, mut unsigned, mut unbatched, mut tracking) = (new(), new(), new(), new(), new());
        let mut redis_ok = redis.is_some() && rate == 5_000;
        for r in 0..rounds {
            let tag = format!("{rate}-{r}");
            let _ = raw.add(propagation_raw(url, 3, rate, per, len, rate > 5_000).await);
            let _ = ours.add(propagation_invalbus(url, 3, rate, per, &tag, true).await);
            if rate == 5_000 {
                // The same without signatures, in the same run: what signing costs.
                let _ = unsigned.add(propagation_invalbus(url, 3, rate, per, &format!("{tag}u"), false).await);
                if let Some(h) = redis.as_mut().filter(|_| redis_ok) {
                    match h.latency(rate, per).await {
                        Some(h) => {
                            let _ = tracking.add(h);
                        }
                        None => redis_ok = false,
                    }
                }
            } else {
                let _ = unbatched.add(propagation_raw(url, 3, rate, per, len, false).await);
            }
        }
        let twin = if rate > 5_000 {
            "raw: NATS, batching alike"
        } else {
            "raw: NATS"
        };
        for (q, name) in [(0.5, "p50"), (0.99, "p99"), (0.999, "p99.9")] {
            let (o, r) = (ours.value_at_quantile(q) as f64, raw.value_at_quantile(q) as f64);
            let (goal, met) = if name == "p99" {
                ("<= 1.25 x raw NATS p99", Some(o <= 1.25 * r))
            } else {
                ("-", None)
            };
            rows.push(row(
                format!("propagation {name}, 3 peers, {rate}/s ({twin})"),
                o,
                r,
                "us",
                o / r,
                goal,
                met,
            ));
        }
        if rate == 5_000 {
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
            if redis_ok {
                for (q, name) in [(0.5, "p50"), (0.99, "p99")] {
                    let (o, t) = (ours.value_at_quantile(q) as f64, tracking.value_at_quantile(q) as f64);
                    rows.push(row(
                        format!("redis tracking: SET to push at 3 readers {name}, {rate}/s"),
                        o,
                        t,
                        "us",
                        o / t,
                        "below Redis tracking",
                        Some(o < t),
                    ));
                }
            }
        } else {
            let (o, u) = (
                ours.value_at_quantile(0.99) as f64,
                unbatched.value_at_quantile(0.99) as f64,
            );
            rows.push(row(
                format!("propagation p99, 3 peers, {rate}/s: batching's gain (raw: 1 msg per inv.)"),
                o,
                u,
                "us",
                o / u,
                "report",
                None,
            ));
        }
    }
}

/// Invalidations per second applied at each of 3 peers, keys absent or present there, against
/// a raw twin doing the same work under the same scheduling: raw NATS carrying the same keys in
/// the same number of messages to 3 subscribers, each of which invalidates every key of a
/// message in its own raw moka cache (filled alike) and yields between messages, as a bus's
/// receiver does. The two sides alternate in `rounds`; the median of each is kept. With keys
/// present, Redis tracking joins the rounds: a Redis writer invalidates only by writing, so its
/// `SET`s (stored on the server) stand beside the bus's invalidations of keys the peers hold.
async fn throughput(
    url: &str,
    n: usize,
    rounds: usize,
    configs: &[(bool, bool)],
    redis: &mut Option<redis::Tracking>,
    rows: &mut Vec<Row>,
) {
    for (present, signed) in configs.iter().copied() {
        // Present keys cost a removal each on both sides: a fifth as many keep the run short.
        let n = if present { n / 5 } else { n };
        let ks = Arc::new(keys(n));
        let origin = nats_bus_signed(url, &format!("t-origin-{present}-{signed}"), signed).await;
        let cache: Cache<Bytes> = origin.cache("tp", CacheConfig::new(2 * n as u64)).unwrap();
        let mut peers = Vec::new();
        for p in 0..3 {
            let b = nats_bus_signed(url, &format!("t-{present}-{signed}-{p}"), signed).await;
            let c: Cache<Bytes> = b.cache("tp", CacheConfig::new(2 * n as u64)).unwrap();
            peers.push((b, c));
        }
        let (mut ours, mut theirs, mut messages, mut tracking) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for _ in 0..rounds {
            if present {
                for (_, c) in &peers {
                    fill(c, &ks, |_| Vec::new()).await;
                }
            }
            let received: Vec<u64> = peers.iter().map(|(b, _)| b.stats().invalidations_received).collect();
            let published = origin.stats().batches_published;
            let start = Instant::now();
            for k in ks.iter() {
                while cache.invalidate_key(k).await.is_err() {
                    tokio::task::yield_now().await;
                }
            }
            let mut rate = f64::INFINITY;
            for ((b, _), before) in peers.iter().zip(received) {
                let deadline = Instant::now() + Duration::from_secs(120);
                while b.stats().invalidations_received < before + n as u64 && Instant::now() < deadline {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                rate = rate.min(n as f64 / start.elapsed().as_secs_f64());
            }
            if present {
                // Every peer must really have dropped every key, or the rate means nothing.
                for (_, c) in &peers {
                    c.run_pending_tasks().await;
                    assert_eq!(c.entry_count(), 0, "a peer kept keys that were invalidated");
                }
            }
            let batches = (origin.stats().batches_published - published).max(1) as usize;
            ours.push(rate);
            messages.push(batches);
            theirs.push(raw_apply_throughput(url, &ks, batches, present).await);
            if let Some(rate) = match redis.as_mut() {
                Some(r) if present => r.flood(n).await,
                _ => None,
            } {
                tracking.push(rate);
            }
        }
        let (o, r) = (median(ours), median(theirs));
        let batches = messages[messages.len() / 2];
        let twin = "raw: NATS + moka, same messages";
        if present {
            rows.push(row(
                format!("throughput: present keys, keys/s at each of 3 peers ({twin})"),
                o,
                r,
                "keys/s",
                r / o,
                ">= 0.9 x raw",
                Some(o >= 0.9 * r),
            ));
            if tracking.len() == rounds {
                let t = median(tracking);
                rows.push(row(
                    "redis tracking: keys/s per reader, 3 readers (invalbus: present keys)",
                    o,
                    t,
                    "keys/s",
                    t / o,
                    "report",
                    None,
                ));
            }
        } else {
            rows.push(row(
                format!(
                    "throughput: absent keys, keys/s at each of 3 peers (~{batches} batches; {twin}){}",
                    if signed { "" } else { ", UNSIGNED (signing's cost)" }
                ),
                o,
                r,
                "keys/s",
                r / o,
                if signed {
                    ">= 2M/s per peer (issue 11: 1M/s)"
                } else {
                    "-"
                },
                signed.then_some(o >= 2_000_000.0),
            ));
        }
        origin.shutdown().await;
        for (b, _) in peers {
            b.shutdown().await;
        }
    }
}

/// The raw twin of [`throughput`]: `keys` sent in `messages` NATS messages (newline-separated)
/// to 3 subscribers; each invalidates every key of a message in its own moka cache (holding
/// every key when `present`) and yields once per message. Keys/s at the slowest subscriber.
async fn raw_apply_throughput(url: &str, keys: &Arc<Vec<String>>, messages: usize, present: bool) -> f64 {
    let subject = "bench.raw.tp";
    let publisher = async_nats::connect(url).await.expect("raw publisher");
    let per = keys.len().div_ceil(messages.max(1));
    let payloads: Vec<Bytes> = keys.chunks(per).map(|c| Bytes::from(c.join("\n"))).collect();
    let mut tasks = Vec::new();
    for _ in 0..3 {
        let raw: moka::future::Cache<String, Bytes> = moka::future::Cache::builder()
            .max_capacity(2 * keys.len() as u64)
            .time_to_live(Duration::from_secs(300))
            .build();
        if present {
            for (i, k) in keys.iter().enumerate() {
                raw.insert(k.clone(), value(i)).await;
            }
            raw.run_pending_tasks().await;
        }
        let c = async_nats::ConnectOptions::new()
            .subscription_capacity(1 << 20)
            .connect(url)
            .await
            .expect("raw subscriber");
        let mut s = c.subscribe(subject).await.expect("raw subscribe");
        c.flush().await.ok();
        let expected = payloads.len();
        tasks.push(tokio::spawn(async move {
            let mut n = 0;
            while n < expected {
                match tokio::time::timeout(Duration::from_secs(5), s.next()).await {
                    Ok(Some(m)) => {
                        for k in m.payload.split(|b| *b == b'\n') {
                            raw.invalidate(std::str::from_utf8(k).unwrap_or_default()).await;
                        }
                        n += 1;
                        tokio::task::yield_now().await;
                    }
                    _ => break,
                }
            }
            raw.run_pending_tasks().await;
            let kept = if present { raw.entry_count() } else { 0 };
            drop(c);
            (n, kept, Instant::now())
        }));
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let start = Instant::now();
    for p in &payloads {
        let _ = publisher.publish(subject, p.clone()).await;
    }
    publisher.flush().await.ok();
    let mut worst = f64::INFINITY;
    for t in tasks {
        match t.await {
            Ok((n, 0, end)) if n == payloads.len() => {
                worst = worst.min(keys.len() as f64 / end.duration_since(start).as_secs_f64());
            }
            Ok((n, kept, _)) => {
                // A twin that lost messages would look faster than it is: no figure then.
                println!(
                    "  (raw twin: a subscriber got {n} of {} messages and kept {kept} keys; no raw figure this round)",
                    payloads.len()
                );
                worst = f64::NAN;
            }
            Err(_) => worst = f64::NAN,
        }
    }
    worst
}

/// Time until a tag purge from one node hides a tag of `m` entries on a peer, entries left
/// behind, and get latency on other keys during the purge; each size is purged `samples` times
/// (the tagged entries filled again in between) and the medians kept.
async fn tag_purge(url: &str, sizes: &[usize], samples: usize, rows: &mut Vec<Row>) {
    for &m in sizes {
        let origin = nats_bus(url, &format!("tag-origin-{m}")).await;
        let peer = nats_bus(url, &format!("tag-peer-{m}")).await;
        let oc: Cache<Bytes> = origin.cache("tags", CacheConfig::new(4 * m as u64)).unwrap();
        let pc: Cache<Bytes> = peer.cache("tags", CacheConfig::new(4 * m as u64)).unwrap();
        let tagged = keys(m);
        let others: Vec<String> = (0..10_000).map(|i| format!("other:{i}")).collect();
        fill(&pc, &others, |_| vec!["keep".into()]).await;
        let sample = |c: Cache<Bytes>, others: Vec<String>, dur: Duration| async move {
            let mut h = histogram();
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
        let (mut visible, mut left, mut busy_ratio, mut busy_p99, mut idle_p99) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for _ in 0..samples.max(1) {
            fill(&pc, &tagged, |i| vec!["purge-me".into(), format!("g{}", i % 100)]).await;
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
            visible.push(applied_us.saturating_sub(at) as f64 / 1000.0);
            let mut l = 0;
            for k in &tagged {
                if pc.get(k).await.is_some() {
                    l += 1;
                }
            }
            left.push(l as f64);
            let (i, b) = (idle.value_at_quantile(0.99) as f64, busy.value_at_quantile(0.99) as f64);
            idle_p99.push(i);
            busy_p99.push(b);
            busy_ratio.push(b / i);
        }
        let visible_ms = median(visible);
        let worst_left = left.iter().cloned().fold(0.0, f64::max);
        let (p_busy, p_idle) = (median(busy_p99), median(idle_p99));
        let n = samples.max(1);
        let busy_ratio = median(busy_ratio);
        rows.push(row(
            format!("tag purge {m} entries: invisible on peer after (median of {n})"),
            visible_ms,
            f64::NAN,
            "ms",
            f64::NAN,
            "<= 5 ms",
            Some(visible_ms <= 5.0),
        ));
        rows.push(row(
            format!("tag purge {m} entries: entries left visible (worst of {n})"),
            worst_left,
            f64::NAN,
            "entries",
            f64::NAN,
            "0",
            Some(worst_left == 0.0),
        ));
        rows.push(row(
            format!("tag purge {m} entries: p99 get on other keys (vs idle; median of {n})"),
            p_busy,
            p_idle,
            "ns",
            busy_ratio,
            "<= 2 x idle",
            Some(busy_ratio <= 2.0),
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

/// Invalidations per second acknowledged by JetStream, against two raw twins publishing with a
/// window of 256 acknowledgements in flight: one that sends the same keys in the same number of
/// messages as the bus did (the fair twin), and one that sends one message per invalidation (the
/// row that shows what batching gains). Alternated in `rounds`, the median of each kept.
async fn durable(n: usize, rounds: usize, rows: &mut Vec<Row>) {
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
    let client = async_nats::connect(url.as_str()).await.expect("raw js client");
    let js = async_nats::jetstream::new(client);
    js.get_or_create_stream(async_nats::jetstream::stream::Config {
        name: "RAWBENCH".into(),
        subjects: vec!["rawbench.>".into()],
        ..Default::default()
    })
    .await
    .expect("raw stream");
    let ks = keys(n);
    let single = Bytes::from(vec![1u8; single_batch_len()]);
    let (mut ours, mut batched, mut single_rate, mut messages) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for _ in 0..rounds {
        let published = bus.stats().batches_published;
        let start = Instant::now();
        let mut tickets = Vec::with_capacity(n);
        for k in &ks {
            if let Ok(t) = cache.invalidate_key(k).await {
                tickets.push(t);
            }
        }
        let mut ok = 0;
        for t in tickets {
            if t.published().await.is_ok() {
                ok += 1;
            }
        }
        ours.push(ok as f64 / start.elapsed().as_secs_f64());
        let batches = (bus.stats().batches_published - published).max(1) as usize;
        messages.push(batches);
        // The twin builds its messages inside the timing too, as the bus does.
        let start = Instant::now();
        let per = n.div_ceil(batches);
        let payloads: Vec<Bytes> = ks.chunks(per).map(|c| Bytes::from(c.join("\n"))).collect();
        let acked = raw_js_publish(&js, &payloads).await;
        batched.push((acked * per).min(n) as f64 / start.elapsed().as_secs_f64());
        let start = Instant::now();
        let payloads = vec![single.clone(); n];
        single_rate.push(raw_js_publish(&js, &payloads).await as f64 / start.elapsed().as_secs_f64());
    }
    bus.shutdown().await;
    let (o, b, s) = (median(ours), median(batched), median(single_rate));
    let batches = messages[messages.len() / 2];
    rows.push(row(
        format!("durable publish: inv/s acked by JetStream (~{batches} msgs; raw: same msgs)"),
        o,
        b,
        "inv/s",
        b / o,
        "report",
        None,
    ));
    rows.push(row(
        "durable publish: batching's gain (raw: 1 msg per invalidation)",
        o,
        s,
        "inv/s",
        s / o,
        "report",
        None,
    ));
}

/// Messages that JetStream acknowledged, published with 256 acknowledgements in flight.
async fn raw_js_publish(js: &async_nats::jetstream::Context, payloads: &[Bytes]) -> usize {
    let mut window = std::collections::VecDeque::new();
    let mut acked = 0;
    for p in payloads {
        if let Ok(f) = js.publish("rawbench.x", p.clone()).await {
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
    acked
}

/// Propagation p99 as the number of peers grows, each beside a raw NATS twin with as many
/// subscribers. Every peer checks every batch's signature, and here every peer shares this
/// machine: past `signed_upto` peers the signed rows run at `big_rate` (the CPU of 5,000
/// signature checks per second per peer is more than 2 cores have, see BENCHMARKS.md), and an
/// unsigned row at 5,000/s shows the rest of the path.
async fn fan_out(url: &str, sizes: &[usize], secs: u64, signed_upto: usize, big_rate: u64, rows: &mut Vec<Row>) {
    for &peers in sizes {
        let mut runs = vec![(5_000u64, peers <= signed_upto)];
        if peers > signed_upto {
            runs.push((big_rate, true));
        }
        for (rate, signed) in runs {
            let raw = propagation_raw(url, peers, rate, secs, single_batch_len(), false).await;
            let tag = format!("fan{peers}-{rate}-{signed}");
            let h = propagation_invalbus(url, peers, rate, secs, &tag, signed).await;
            let (p99, r99) = (h.value_at_quantile(0.99) as f64, raw.value_at_quantile(0.99) as f64);
            let (goal, met) = if peers >= 100 && rate == 5_000 {
                ("<= 5 ms", Some(p99 <= 5_000.0))
            } else {
                ("report", None)
            };
            rows.push(row(
                format!(
                    "fan-out: propagation p99, {peers} peers, {rate}/s{}",
                    if signed { "" } else { ", UNSIGNED" }
                ),
                p99,
                r99,
                "us",
                p99 / r99,
                goal,
                met,
            ));
        }
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args = Args::parse();
    if let Some(kind) = &args.memory_probe {
        memory_probe(kind, args.entries).await;
        return;
    }
    if let Some(m) = args.soak {
        let ok = soak::run(m, &args.soak_out).await;
        if !ok {
            std::process::exit(1);
        }
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
    let run = |figure: &str| args.only.is_empty() || args.only.iter().any(|o| o == figure);
    if run("hit") {
        hit_path(if q { 200_000 } else { 1_000_000 }, if q { 3 } else { 5 }, &mut rows).await;
    }
    let server = NatsServer::start().await;
    let url = server.url();
    if run("signing") {
        signing(if q { 3 } else { 5 }, if q { 2_000 } else { 10_000 }, &mut rows).await;
    }
    let mut tracking = if run("propagation") || run("throughput") {
        redis::Tracking::start().await
    } else {
        None
    };
    if run("propagation") {
        propagation(
            &url,
            if q { 2 } else { 10 },
            if q { 1 } else { 5 },
            &mut tracking,
            &mut rows,
        )
        .await;
    }
    // (keys present at the peers, signed): the unsigned run shows what signing costs.
    // `--only throughput-absent` runs the signed absent-key row alone (to profile it).
    let configs: &[(bool, bool)] = if run("throughput") {
        &[(false, true), (false, false), (true, true)]
    } else if args.only.iter().any(|o| o == "throughput-absent") {
        &[(false, true)]
    } else {
        &[]
    };
    if !configs.is_empty() {
        throughput(
            &url,
            if q { 200_000 } else { 1_000_000 },
            if q { 1 } else { 3 },
            configs,
            &mut tracking,
            &mut rows,
        )
        .await;
    }
    drop(tracking);
    if run("peers") {
        multitier::rows(if q { 2 } else { 10 }, if q { 20_000 } else { 100_000 }, &mut rows).await;
    }
    if run("tags") {
        tag_purge(
            &url,
            if q {
                &[10_000, 100_000][..]
            } else {
                &[10_000, 100_000, 1_000_000][..]
            },
            if q { 3 } else { 5 },
            &mut rows,
        )
        .await;
    }
    if run("memory") {
        memory(if q { 200_000 } else { 1_000_000 }, &mut rows).await;
    }
    if run("durable") {
        durable(if q { 20_000 } else { 100_000 }, if q { 1 } else { 3 }, &mut rows).await;
    }
    if run("fanout") {
        fan_out(
            &url,
            if q { &[3, 10][..] } else { &[3, 10, 30, 100][..] },
            if q { 2 } else { 5 },
            30,
            200,
            &mut rows,
        )
        .await;
    }
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
