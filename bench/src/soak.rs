//! The soak (`invalbus-soak`; `invalbus-bench --soak MINUTES` runs it): a steady invalidation
//! load on three nodes with origins that come and go, sampled every 10 s, to show that memory
//! and every table stay bounded and that propagation stays flat.
//!
//! # What runs
//! One nats-server with JetStream and buses built like the durable figure's (JetStream,
//! outbound queue of 4 Mi). Three *nodes* hold the cache `soak` (100,000 entries, time to live
//! 10 s); one task per node reads it through `get_or_load` as fast as the machine lets it, over
//! 100,000 keys, each entry tagged with one of 10,000 tags.
//!
//! *Origins* publish 50,000 invalidations/s in all: a pacer sends what is due every 1 ms tick
//! (50 per tick, in bursts of at most 200 between yields). A late tick is made up for, up to
//! 100 ms of backlog; beyond that the backlog is given up, and the achieved rate says so. The
//! mix: 99.58 % keys, 0.2 % tags the entries carry, 0.2 % tags never used before (deleted
//! authors, say), 0.02 % prefixes (half one of 300 that cover 100 keys each, half never used
//! before): 100 + 100 tag and 10 prefix purges a second. The names never used before are there
//! so that only pruning keeps the purge-record tables small.
//!
//! One origin publishes for the whole run. Every 20 s a new one (`soak-roll-N`, ids never
//! reused) starts, takes 20 % of the load for 30 s, and shuts down: one or two are live at a
//! time, and the nodes' peer tables must expire the ones gone. The peer expiry is set to 10 s
//! (default 30 s) so that a 1-minute soak sees them go; the 10 s time to live makes purge
//! records (kept for the time to live plus 1 s, pruned every 2.5 s) turn over within a minute.
//!
//! Every 10 s a sample: the process's RSS; per node the peer table, the origins tracked, the
//! cache's entries, tag and prefix purge records and flushes; and the propagation p50/p99 of the
//! window. One invalidation in 50 keeps its ticket; its latency runs from the call to the moment
//! the last of the three nodes reports its batch applied ([`invalbus::Bus::subscribe_applied`]).
//! The bench's own bookkeeping forgets batches after 30 s, so it is bounded too, and RSS growth
//! is the library's. Written to `soak.csv` and plotted to `soak.svg` in the output directory.
//!
//! # Verdicts
//! They judge the samples after a warm-up (the first minute; the first 20 s for `--soak 1`),
//! except the table bounds, which must hold at every sample.
//!
//! Hard, a broken run (`run` returns false and the binary exits non-zero): the server or a bus
//! does not start, or an output file cannot be written; a table grows past its bound: a peer
//! table holds more than the other nodes, the steady origin and the rolling origins live or gone
//! for less than the expiry plus 3 s (or holds one gone for longer), the origins tracked exceed
//! the same bound, tag or prefix records exceed the names purged within 14.5 s (a record
//! outlives its last purge by the time to live + 1 s, found by a pruning pass every 2.5 s, + 1 s
//! for the sample; + 2 per part of the mix, see `mix_slot`), or their caps; or a
//! post-warm-up window in which no traced invalidation was seen applied on all three nodes (the
//! bus is stuck).
//!
//! Report only (printed met/MISSED; a 1-minute run on a shared 2-core CI machine is too noisy to
//! fail on them): RSS growth under 5 % (the highest sample of the last third after the warm-up
//! against the highest of the first third; the first and last samples are printed beside it),
//! p99 flat (median of the last third of the windows at most 1.5 x the first third's), the
//! achieved rate, flushes, and traced invalidations never seen applied everywhere.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use invalbus::{Applied, Bus, Cache, CacheConfig, InvalidateError, Invalidation, Loaded, Target, Ticket};
use invalbus_tests::NatsServer;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use tokio::sync::{broadcast, mpsc, oneshot, watch};

use super::{heap_in_use_bytes, median, row, rss_bytes};

/// Invalidations per second, all origins together.
const RATE: u64 = 50_000;
/// Most invalidations sent between two yields of the pacer.
const BURST: u64 = 200;
/// Most invalidations owed before the pacer gives the backlog up (100 ms).
const MAX_BACKLOG: u64 = RATE / 10;
const NODES: usize = 3;
const CACHE: &str = "soak";
const NAMESPACE: &str = "soak";
const SAMPLE_EVERY: Duration = Duration::from_secs(10);
const ROLL_EVERY: Duration = Duration::from_secs(20);
const ROLL_LIFE: Duration = Duration::from_secs(30);
/// The nodes' peer expiry: short, so that a 1-minute soak sees rolling origins expire.
const PEER_EXPIRY: Duration = Duration::from_secs(10);
/// Slack on top of the expiry: the watchdog expires once a second, heartbeats come once a
/// second, and a gone origin is stamped once its shutdown returned.
const EXPIRY_SLACK: Duration = Duration::from_secs(3);
const TTL: Duration = Duration::from_secs(10);
const KEYS: usize = 100_000;
/// Tags the entries carry (10 entries each).
const TAGS: usize = 10_000;
/// Prefixes that match entries (100 keys each).
const PREFIXES: usize = 300;
/// The mix, in parts per 100,000: tags the entries carry, tags never used before, prefixes
/// (half of them never used before). Purges are rare next to keys, as in production; and every
/// purge wakes the cache's sweep, which scans the whole cache, so at a few per second or more
/// each node sweeps back to back whatever their rate.
const MIX_TAG: u32 = 200;
const MIX_FRESH_TAG: u32 = 200;
const MIX_PREFIX: u32 = 20;

/// Which part of the mix the invalidation of this ordinal takes: a Weyl sequence over the
/// 100,000 parts (a stride near the golden ratio, coprime with 100,000), so that every 100,000
/// invalidations hold exactly the mix, and any 14.5 s at the target rate (725,000) the mix's
/// share within 2 (measured over the first 3 M ordinals). Drawn at random instead, the purges
/// in a record's life would vary by about their square root (±12 prefixes of 145), past any
/// bound that is also meant to catch a table that grows.
fn mix_slot(ordinal: u64) -> u32 {
    const STRIDE: u64 = 61_803;
    (ordinal.wrapping_mul(STRIDE) % 100_000) as u32
}

/// Per second, at the target rate.
fn per_second(parts: u32) -> f64 {
    RATE as f64 * f64::from(parts) / 100_000.0
}
/// One invalidation in this many keeps its ticket for the propagation latency.
const TRACE_EVERY: u64 = 50;
/// How long the latency bookkeeping waits for a batch to be applied everywhere.
const TRACE_PATIENCE: Duration = Duration::from_secs(30);
/// The prefix-record cap of `bus/src/cache.rs` (`MAX_PREFIX_RECORDS`, private there).
const MAX_PREFIX_RECORDS: u64 = 1024;

/// How long a purge record can live: time to live + 1 s, found by a pruning pass every
/// `TTL / 4` (clamped to 0.1-5 s, as `bus/src/cache.rs` does), plus 1 s for the sample's timing.
fn record_retention() -> Duration {
    TTL + Duration::from_secs(1)
        + (TTL / 4).clamp(Duration::from_millis(100), Duration::from_secs(5))
        + Duration::from_secs(1)
}

/// How many more invalidations of one part of the mix a retention can hold than the rate gives
/// (see [`mix_slot`]); tag records come from two parts (known and fresh tags), prefix records
/// from one.
const MIX_DISCREPANCY: u64 = 2;

/// The most tag records one cache should hold in steady state.
/// A record outlives its last purge by at most the retention, so the table holds at most the
/// names purged within one retention: of the fixed names no more than exist, plus the fresh ones.
fn tag_bound(cap: usize) -> u64 {
    let r = record_retention().as_secs_f64();
    let fixed = (per_second(MIX_TAG) * r).min(TAGS as f64);
    ((fixed + per_second(MIX_FRESH_TAG) * r).ceil() as u64 + 2 * MIX_DISCREPANCY).min(cap as u64)
}

/// The most prefix records one cache should hold in steady state (half the prefixes are fresh).
fn prefix_bound(cap: usize) -> u64 {
    let r = record_retention().as_secs_f64();
    let half = per_second(MIX_PREFIX) / 2.0;
    let fixed = (half * r).min(PREFIXES as f64);
    ((fixed + half * r).ceil() as u64 + MIX_DISCREPANCY).min(MAX_PREFIX_RECORDS.min(cap as u64))
}

/// A bus that publishes part of the load.
#[derive(Clone)]
struct Origin {
    id: Arc<str>,
    bus: Bus,
}

/// A rolling origin's life, for the peer-table bound.
struct Rolled {
    id: String,
    started: Instant,
    ended: Option<Instant>,
}

impl Rolled {
    /// Whether a peer table may still hold it at `now`.
    fn may_be_listed(&self, now: Instant) -> bool {
        self.started <= now && self.ended.is_none_or(|e| now < e + PEER_EXPIRY + EXPIRY_SLACK)
    }
}

#[derive(Default)]
struct Counts {
    sent: AtomicU64,
    /// Accepted by the steady origin (to compare with what it published: its queue).
    steady_sent: AtomicU64,
    given_up: AtomicU64,
    queue_full: AtomicU64,
    closed: AtomicU64,
    refused: AtomicU64,
    untraced: AtomicU64,
    /// Time spent inside `Bus::invalidate` calls (ns), to tell a slow call from a starved pacer.
    call_ns: AtomicU64,
    publish_errors: AtomicU64,
    reads: AtomicU64,
}

/// A traced invalidation whose batch was published.
struct Sent {
    origin: Arc<str>,
    seq: u64,
    at_us: u64,
}

/// The propagation figures of one window.
struct Window {
    hist: hdrhistogram::Histogram<u64>,
    missing: u64,
    lagged: u64,
}

/// One sample.
struct Sample {
    t_s: f64,
    rss: u64,
    /// What the allocator has handed out and not had back ([`heap_in_use_bytes`]).
    heap: u64,
    sent: u64,
    reads: u64,
    traced: u64,
    p50_us: u64,
    p99_us: u64,
    missing: u64,
    lagged: u64,
    /// Invalidations queued in the steady origin, not yet published.
    steady_queue: u64,
    rolling_live: usize,
    peer_bound: usize,
    /// Peers listed that should have expired (summed over the nodes).
    stale_peers: usize,
    peers: [usize; NODES],
    origins: [u64; NODES],
    entries: [u64; NODES],
    tag_records: [u64; NODES],
    prefix_records: [u64; NODES],
    flushes: [u64; NODES],
}

async fn build_bus(url: &str, id: &str) -> Result<Bus, invalbus::BuildError> {
    Bus::builder()
        .nats(url)
        .namespace(NAMESPACE)
        .node_id(id)
        .outbound_queue(1 << 22)
        .jetstream(invalbus::JetStreamConfig::default())
        .peer_table(PEER_EXPIRY, 4096)
        .build()
        .await
}

/// Runs the soak for `minutes` (at least 1), prints its verdicts, writes `soak.csv` and
/// `soak.svg` to `out_dir`. Returns false when the run is broken (see the module docs: a hard
/// verdict failed); report-only goals never make it false.
pub async fn run(minutes: u64, out_dir: &Path) -> bool {
    let minutes = minutes.max(1);
    let warmup = if minutes == 1 {
        Duration::from_secs(20)
    } else {
        Duration::from_secs(60)
    };
    println!(
        "invalbus-bench soak: {minutes} min, {RATE} invalidations/s target, {NODES} nodes, rolling origins every {}s for {}s, peer expiry {}s, ttl {}s, warm-up {}s",
        ROLL_EVERY.as_secs(),
        ROLL_LIFE.as_secs(),
        PEER_EXPIRY.as_secs(),
        TTL.as_secs(),
        warmup.as_secs()
    );
    // The test fixture panics when nats-server does not start: catch that as a broken run.
    let server = match tokio::spawn(NatsServer::start_jetstream()).await {
        Ok(s) => s,
        Err(e) => {
            println!("soak: broken: nats-server with JetStream did not start ({e})");
            return false;
        }
    };
    let url = server.url();
    let config = CacheConfig::new(KEYS as u64).time_to_live(TTL);
    let purge_cap = config.max_purge_records;
    let mut nodes = Vec::new();
    let mut caches: Vec<Cache<Bytes>> = Vec::new();
    for i in 0..NODES {
        let bus = match build_bus(&url, &format!("soak-node-{i}")).await {
            Ok(b) => b,
            Err(e) => {
                println!("soak: broken: node {i} did not start: {e}");
                return false;
            }
        };
        match bus.cache(CACHE, config.clone()) {
            Ok(c) => caches.push(c),
            Err(e) => {
                println!("soak: broken: cache on node {i}: {e}");
                return false;
            }
        }
        nodes.push(bus);
    }
    let steady = match build_bus(&url, "soak-origin").await {
        Ok(bus) => Origin {
            id: Arc::from("soak-origin"),
            bus,
        },
        Err(e) => {
            println!("soak: broken: the steady origin did not start: {e}");
            return false;
        }
    };

    let counts = Arc::new(Counts::default());
    let broken: Arc<Mutex<Vec<String>>> = Arc::default();
    let rolled: Arc<Mutex<Vec<Rolled>>> = Arc::default();
    let (live_tx, live_rx) = watch::channel(Vec::<Origin>::new());
    let (stop_tx, stop_rx) = watch::channel(false);
    let reading = Arc::new(AtomicBool::new(true));
    let keys: Arc<[String]> = super::keys(KEYS).into();

    // Propagation: traced tickets -> published seqs -> joined with the nodes' applied batches.
    let (traced_tx, traced_rx) = mpsc::channel::<(Arc<str>, u64, Ticket)>(65_536);
    let (sent_tx, sent_rx) = mpsc::unbounded_channel::<Sent>();
    let (ask_tx, ask_rx) = mpsc::channel::<oneshot::Sender<Window>>(1);
    let applied: Vec<_> = nodes.iter().map(Bus::subscribe_applied).collect();
    let joiner = tokio::spawn(join(applied, sent_rx, ask_rx));
    let resolver = tokio::spawn(resolve(traced_rx, sent_tx, counts.clone()));

    // The readers share one OS thread with a runtime of its own: reading "at the machine's pace"
    // then takes what the OS gives one thread, and the buses and the pacer keep the main
    // runtime's two workers (with the readers on those, the pacer fell far behind its rate).
    let readers = {
        let (caches, keys, reading, counts) = (caches.clone(), keys.clone(), reading.clone(), counts.clone());
        std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() else {
                eprintln!("soak: cannot start the readers' runtime");
                return;
            };
            rt.block_on(futures::future::join_all(caches.into_iter().enumerate().map(
                |(i, c)| read(c, keys.clone(), reading.clone(), counts.clone(), i as u64 + 1),
            )));
        })
    };

    let t0 = Instant::now();
    let end = t0 + Duration::from_secs(minutes * 60);
    let roller = tokio::spawn(roll(
        url.clone(),
        live_tx,
        rolled.clone(),
        broken.clone(),
        end,
        stop_rx.clone(),
    ));
    let pacer = tokio::spawn(pace(
        steady.clone(),
        live_rx,
        keys.clone(),
        end,
        counts.clone(),
        traced_tx,
    ));

    let mut samples: Vec<Sample> = Vec::new();
    let (mut last_sent, mut last_reads) = (0, 0);
    let mut k = 1u32;
    while t0 + SAMPLE_EVERY * k <= end {
        tokio::time::sleep_until((t0 + SAMPLE_EVERY * k).into()).await;
        k += 1;
        let now = Instant::now();
        let (tx, rx) = oneshot::channel();
        let window = match ask_tx.send(tx).await {
            Ok(()) => rx.await.ok(),
            Err(_) => None,
        };
        let Some(window) = window else {
            broken.lock().unwrap().push("the latency bookkeeping stopped".into());
            break;
        };
        let (peer_bound, rolling_live, allowed) = {
            let rolled = rolled.lock().unwrap();
            let listed: Vec<&str> = rolled
                .iter()
                .filter(|r| r.may_be_listed(now))
                .map(|r| r.id.as_str())
                .collect();
            let live = rolled.iter().filter(|r| r.ended.is_none()).count();
            let mut allowed: Vec<String> = listed.iter().map(|s| s.to_string()).collect();
            allowed.push(steady.id.to_string());
            allowed.extend(nodes.iter().map(|n| n.node_id().to_string()));
            (NODES - 1 + 1 + listed.len(), live, allowed)
        };
        let sent = counts.sent.load(Ordering::Relaxed);
        let reads = counts.reads.load(Ordering::Relaxed);
        let mut s = Sample {
            t_s: now.duration_since(t0).as_secs_f64(),
            rss: rss_bytes(),
            heap: heap_in_use_bytes(),
            sent: sent - last_sent,
            reads: reads - last_reads,
            traced: window.hist.len(),
            p50_us: window.hist.value_at_quantile(0.5),
            p99_us: window.hist.value_at_quantile(0.99),
            missing: window.missing,
            lagged: window.lagged,
            steady_queue: counts
                .steady_sent
                .load(Ordering::Relaxed)
                .saturating_sub(steady.bus.stats().invalidations_published),
            rolling_live,
            peer_bound,
            stale_peers: 0,
            peers: [0; NODES],
            origins: [0; NODES],
            entries: [0; NODES],
            tag_records: [0; NODES],
            prefix_records: [0; NODES],
            flushes: [0; NODES],
        };
        (last_sent, last_reads) = (sent, reads);
        for i in 0..NODES {
            let peers = nodes[i].peers();
            s.stale_peers += peers.iter().filter(|p| !allowed.contains(&p.node_id)).count();
            s.peers[i] = peers.len();
            s.origins[i] = nodes[i].stats().origins_tracked;
            let cs = caches[i].stats();
            s.entries[i] = cs.entries;
            s.tag_records[i] = cs.tag_records;
            s.prefix_records[i] = cs.prefix_records;
            s.flushes[i] = cs.flushes;
        }
        println!(
            "  t={:>5.0}s rss {:>7.1} MiB  heap {:>7.1} MiB  inv/s {:>6.0} (queued {})  reads/s {:>8.0}  p99 {:>7.1} ms ({} traced)  peers {:?} (bound {})  origins {:?}  tag rec {:?}  prefix rec {:?}  entries {:?}",
            s.t_s,
            mib(s.rss),
            mib(s.heap),
            s.sent as f64 / SAMPLE_EVERY.as_secs_f64(),
            s.steady_queue,
            s.reads as f64 / SAMPLE_EVERY.as_secs_f64(),
            s.p99_us as f64 / 1000.0,
            s.traced,
            s.peers,
            s.peer_bound,
            s.origins,
            s.tag_records,
            s.prefix_records,
            s.entries
        );
        samples.push(s);
    }

    // Stop everything this function started, in order, and wait for it.
    let elapsed = t0.elapsed();
    let _ = stop_tx.send(true);
    reading.store(false, Ordering::Relaxed);
    let _ = pacer.await;
    let _ = roller.await;
    let _ = tokio::task::spawn_blocking(move || readers.join()).await;
    let _ = resolver.await;
    drop(ask_tx);
    let _ = joiner.await;
    steady.bus.shutdown().await;
    for n in &nodes {
        n.shutdown().await;
    }
    drop(server);

    let rolled = std::mem::take(&mut *rolled.lock().unwrap());
    let mut broken = std::mem::take(&mut *broken.lock().unwrap());
    let ok = verdicts(&samples, &counts, &rolled, elapsed, warmup, purge_cap, &mut broken);
    let achieved = counts.sent.load(Ordering::Relaxed) as f64 / elapsed.as_secs_f64();
    if let Err(e) = std::fs::create_dir_all(out_dir) {
        broken.push(format!("cannot create {}: {e}", out_dir.display()));
    } else {
        let csv = out_dir.join("soak.csv");
        if let Err(e) = std::fs::write(&csv, to_csv(&samples)) {
            broken.push(format!("cannot write {}: {e}", csv.display()));
        }
        let svg = out_dir.join("soak.svg");
        match plot(&samples, minutes, achieved, warmup) {
            Ok(body) => {
                if let Err(e) = std::fs::write(&svg, body) {
                    broken.push(format!("cannot write {}: {e}", svg.display()));
                } else {
                    println!("soak: samples in {}, plot in {}", csv.display(), svg.display());
                }
            }
            Err(e) => broken.push(format!("cannot plot {}: {e}", svg.display())),
        }
    }
    if broken.is_empty() && ok {
        println!("soak: not broken (every table bounded, propagation never stuck)");
        true
    } else {
        for b in &broken {
            println!("soak: broken: {b}");
        }
        false
    }
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

/// Prints the verdict rows; returns whether every hard one held.
fn verdicts(
    samples: &[Sample],
    counts: &Counts,
    rolled: &[Rolled],
    elapsed: Duration,
    warmup: Duration,
    purge_cap: usize,
    broken: &mut Vec<String>,
) -> bool {
    println!(
        "{:<58} {:>14} {:>14} {:<8} {:>7}  {:<36} met",
        "figure", "invalbus", "raw", "unit", "ratio", "goal"
    );
    let secs = elapsed.as_secs_f64();
    let sent = counts.sent.load(Ordering::Relaxed);
    let achieved = sent as f64 / secs;
    row(
        "soak: invalidations/s achieved (raw = target)",
        achieved,
        RATE as f64,
        "inv/s",
        RATE as f64 / achieved,
        ">= 95 % of target (report)",
        Some(achieved >= 0.95 * RATE as f64),
    );
    row(
        "soak: reads/s, 3 nodes together",
        counts.reads.load(Ordering::Relaxed) as f64 / secs,
        f64::NAN,
        "reads/s",
        f64::NAN,
        "report",
        None,
    );
    let lost = counts.given_up.load(Ordering::Relaxed)
        + counts.queue_full.load(Ordering::Relaxed)
        + counts.refused.load(Ordering::Relaxed);
    row(
        "soak: invalidations given up (backlog, queue full, refused)",
        lost as f64,
        f64::NAN,
        "inv",
        f64::NAN,
        "0 (report)",
        Some(lost == 0),
    );
    let gone = rolled.iter().filter(|r| r.ended.is_some()).count();
    println!(
        "  (mean invalidate call {:.2} us; {} rolling origins started, {} shut down; {} calls to a shut-down origin, {} traced tickets dropped, {} publish errors)",
        counts.call_ns.load(Ordering::Relaxed) as f64 / 1000.0 / sent.max(1) as f64,
        rolled.len(),
        gone,
        counts.closed.load(Ordering::Relaxed),
        counts.untraced.load(Ordering::Relaxed),
        counts.publish_errors.load(Ordering::Relaxed)
    );
    if samples.is_empty() {
        broken.push("no samples taken".into());
        return false;
    }
    let mut ok = true;

    // Tables, at every sample.
    let max_peers = samples.iter().flat_map(|s| s.peers).max().unwrap_or(0);
    let over = samples.iter().any(|s| s.peers.iter().any(|&p| p > s.peer_bound));
    let stale = samples.iter().map(|s| s.stale_peers).max().unwrap_or(0);
    let bound = samples.iter().map(|s| s.peer_bound).max().unwrap_or(0);
    let held = !over && stale == 0;
    row(
        "soak: peer table, max (raw = max live + expiring bound)",
        max_peers as f64,
        bound as f64,
        "peers",
        max_peers as f64 / bound as f64,
        "<= bound, gone ones expire (hard)",
        Some(held),
    );
    if !held {
        broken.push(format!(
            "a peer table exceeded its bound or kept an origin gone for over {} s",
            (PEER_EXPIRY + EXPIRY_SLACK).as_secs()
        ));
        ok = false;
    }
    let max_origins = samples.iter().flat_map(|s| s.origins).max().unwrap_or(0);
    let held = samples
        .iter()
        .all(|s| s.origins.iter().all(|&o| o <= s.peer_bound as u64));
    row(
        "soak: origins tracked, max (raw = max bound)",
        max_origins as f64,
        bound as f64,
        "origins",
        max_origins as f64 / bound as f64,
        "<= peer bound (hard)",
        Some(held),
    );
    if !held {
        broken.push("the origins tracked exceeded the live + expiring bound".into());
        ok = false;
    }
    let (tb, pb) = (tag_bound(purge_cap), prefix_bound(purge_cap));
    // Purge records per cache must stay within the names purged in a record's life (hard).
    for (kind, max, bound) in [
        ("tag", samples.iter().flat_map(|s| s.tag_records).max().unwrap_or(0), tb),
        (
            "prefix",
            samples.iter().flat_map(|s| s.prefix_records).max().unwrap_or(0),
            pb,
        ),
    ] {
        row(
            format!("soak: {kind} purge records per cache, max (raw = bound)"),
            max as f64,
            bound as f64,
            "records",
            max as f64 / bound as f64,
            "<= names purged in 14.5 s (hard)",
            Some(max <= bound),
        );
        if max > bound {
            broken.push(format!("{kind} purge records grew to {max}, past {bound}"));
            ok = false;
        }
    }
    let max_entries = samples.iter().flat_map(|s| s.entries).max().unwrap_or(0);
    row(
        "soak: cache entries per node, max (raw = capacity)",
        max_entries as f64,
        KEYS as f64,
        "entries",
        max_entries as f64 / KEYS as f64,
        "<= capacity (report)",
        Some(max_entries <= KEYS as u64),
    );

    // The rest, after the warm-up.
    let first_after = warmup.as_secs_f64() + SAMPLE_EVERY.as_secs_f64() - 1.0;
    let post: Vec<&Sample> = samples.iter().filter(|s| s.t_s >= first_after).collect();
    let (Some(first), Some(last)) = (post.first(), post.last()) else {
        println!("  (no sample after the warm-up: RSS and p99 not judged)");
        return ok;
    };
    let flushes: u64 = (0..NODES).map(|i| last.flushes[i] - first.flushes[i]).sum();
    row(
        "soak: cache flushes after warm-up, 3 nodes (overflow, repair)",
        flushes as f64,
        f64::NAN,
        "flushes",
        f64::NAN,
        "0 (report)",
        Some(flushes == 0),
    );
    // RSS follows the heap up and down with the load (by 10 % from one sample to the next here,
    // on an allocator that returns memory), so one sample against another measures where in that
    // swing each fell; growth is the peaks climbing: the highest sample of the last third against
    // the highest of the first, as p99 is judged below by thirds.
    let third = (post.len() / 3).max(1);
    let peak = |part: &[&Sample]| part.iter().map(|s| s.rss).max().unwrap_or(0);
    let (early_peak, late_peak) = (peak(&post[..third]), peak(&post[post.len() - third..]));
    let growth = late_peak as f64 / early_peak.max(1) as f64;
    row(
        "soak: RSS, highest of the last third (raw = of the first third)",
        mib(late_peak),
        mib(early_peak),
        "MiB",
        growth,
        "< 1.05 x first third (report)",
        Some(growth < 1.05),
    );
    row(
        "soak: RSS, last sample (raw = first after warm-up)",
        mib(last.rss),
        mib(first.rss),
        "MiB",
        last.rss as f64 / first.rss as f64,
        "report",
        None,
    );
    row(
        "soak: heap in use (jemalloc), last sample (raw = first after warm-up)",
        mib(last.heap),
        mib(first.heap),
        "MiB",
        last.heap as f64 / first.heap as f64,
        "report (RSS less this: what the allocator keeps)",
        None,
    );
    let stuck: Vec<f64> = post.iter().filter(|s| s.traced == 0).map(|s| s.t_s).collect();
    row(
        "soak: windows with no traced invalidation applied on all 3",
        stuck.len() as f64,
        post.len() as f64,
        "windows",
        f64::NAN,
        "0 (hard)",
        Some(stuck.is_empty()),
    );
    if !stuck.is_empty() {
        broken.push(format!(
            "no invalidation seen applied on all nodes in the windows ending at {stuck:?} s"
        ));
        ok = false;
    }
    let traced: u64 = post.iter().map(|s| s.traced).sum();
    let missing: u64 = post.iter().map(|s| s.missing + s.lagged).sum();
    row(
        "soak: traced invalidations not seen applied on all 3 in 30 s",
        missing as f64,
        (traced + missing) as f64,
        "inv",
        missing as f64 / (traced + missing).max(1) as f64,
        "0 (report)",
        Some(missing == 0),
    );
    let p99: Vec<f64> = post
        .iter()
        .filter(|s| s.traced > 0)
        .map(|s| s.p99_us as f64 / 1000.0)
        .collect();
    if !p99.is_empty() {
        let third = (p99.len() / 3).max(1);
        let (early, late) = (median(p99[..third].to_vec()), median(p99[p99.len() - third..].to_vec()));
        row(
            "soak: propagation p99, last third (raw = first third)",
            late,
            early,
            "ms",
            late / early,
            "<= 1.5 x first third (report)",
            Some(late <= 1.5 * early),
        );
    }
    ok
}

/// The pacer: what is due every tick, spread over the live origins.
async fn pace(
    steady: Origin,
    mut live: watch::Receiver<Vec<Origin>>,
    keys: Arc<[String]>,
    end: Instant,
    counts: Arc<Counts>,
    traced: mpsc::Sender<(Arc<str>, u64, Ticket)>,
) {
    let mut rng = SmallRng::seed_from_u64(7);
    let start = Instant::now();
    // Invalidations sent or given up; the origin and tracing go by this ordinal.
    let mut done = 0u64;
    let mut fresh = 0u64;
    let mut rolling: Vec<Origin> = Vec::new();
    while Instant::now() < end {
        if live.has_changed().unwrap_or(false) {
            rolling = live.borrow_and_update().clone();
        }
        let due = start.elapsed().as_micros() as u64 * RATE / 1_000_000;
        let mut owed = due.saturating_sub(done);
        if owed > MAX_BACKLOG {
            counts.given_up.fetch_add(owed - MAX_BACKLOG, Ordering::Relaxed);
            done += owed - MAX_BACKLOG;
            owed = MAX_BACKLOG;
        }
        if owed == 0 {
            tokio::time::sleep(Duration::from_millis(1)).await;
            continue;
        }
        for _ in 0..owed.min(BURST) {
            // Slots 0 and 1 of every five go to the rolling origins, when there are some.
            let slot = (done % 5) as usize;
            let origin = if slot < 2 { rolling.get(slot) } else { None }.unwrap_or(&steady);
            let r = mix_slot(done);
            let target = if r < MIX_TAG {
                Target::Tag(format!("g{}", rng.random_range(0..TAGS)))
            } else if r < MIX_TAG + MIX_FRESH_TAG {
                fresh += 1;
                Target::Tag(format!("x{fresh}"))
            } else if r < MIX_TAG + MIX_FRESH_TAG + MIX_PREFIX {
                fresh += 1;
                if fresh.is_multiple_of(2) {
                    Target::Prefix(format!("key:000{:03}", rng.random_range(0..PREFIXES)))
                } else {
                    Target::Prefix(format!("z{fresh}"))
                }
            } else {
                Target::Key(keys[rng.random_range(0..keys.len())].clone())
            };
            let at = super::now_us();
            let call = Instant::now();
            let result = origin.bus.invalidate(Invalidation::new(Some(CACHE), target)).await;
            counts
                .call_ns
                .fetch_add(call.elapsed().as_nanos() as u64, Ordering::Relaxed);
            match result {
                Ok(t) => {
                    counts.sent.fetch_add(1, Ordering::Relaxed);
                    if std::ptr::eq(origin, &steady) {
                        counts.steady_sent.fetch_add(1, Ordering::Relaxed);
                    }
                    if done.is_multiple_of(TRACE_EVERY) && traced.try_send((origin.id.clone(), at, t)).is_err() {
                        counts.untraced.fetch_add(1, Ordering::Relaxed);
                    }
                }
                Err(InvalidateError::QueueFull(_)) => {
                    counts.queue_full.fetch_add(1, Ordering::Relaxed);
                }
                // A rolling origin shutting down while this batch of sends still held it.
                Err(InvalidateError::Closed) => {
                    counts.closed.fetch_add(1, Ordering::Relaxed);
                }
                Err(_) => {
                    counts.refused.fetch_add(1, Ordering::Relaxed);
                }
            }
            done += 1;
        }
        tokio::task::yield_now().await;
    }
}

/// Starts a rolling origin every `ROLL_EVERY` until `end`.
async fn roll(
    url: String,
    live: watch::Sender<Vec<Origin>>,
    rolled: Arc<Mutex<Vec<Rolled>>>,
    broken: Arc<Mutex<Vec<String>>>,
    end: Instant,
    mut stop: watch::Receiver<bool>,
) {
    let live = Arc::new(live);
    let start = Instant::now();
    let mut lives = Vec::new();
    for n in 0u32.. {
        let at = start + ROLL_EVERY * n;
        if at >= end {
            break;
        }
        tokio::select! {
            _ = tokio::time::sleep_until(at.into()) => {}
            _ = stop.wait_for(|s| *s) => break,
        }
        lives.push(tokio::spawn(rolling_origin(
            url.clone(),
            format!("soak-roll-{n}"),
            live.clone(),
            rolled.clone(),
            broken.clone(),
            stop.clone(),
        )));
    }
    for l in lives {
        let _ = l.await;
    }
}

/// One rolling origin: starts, publishes its share for `ROLL_LIFE`, shuts down.
async fn rolling_origin(
    url: String,
    id: String,
    live: Arc<watch::Sender<Vec<Origin>>>,
    rolled: Arc<Mutex<Vec<Rolled>>>,
    broken: Arc<Mutex<Vec<String>>>,
    mut stop: watch::Receiver<bool>,
) {
    let index = {
        let mut r = rolled.lock().unwrap();
        r.push(Rolled {
            id: id.clone(),
            started: Instant::now(),
            ended: None,
        });
        r.len() - 1
    };
    match build_bus(&url, &id).await {
        Ok(bus) => {
            let origin = Origin {
                id: Arc::from(id.as_str()),
                bus: bus.clone(),
            };
            live.send_modify(|v| v.push(origin));
            tokio::select! {
                _ = tokio::time::sleep(ROLL_LIFE) => {}
                _ = stop.wait_for(|s| *s) => {}
            }
            live.send_modify(|v| v.retain(|o| *o.id != *id));
            bus.shutdown().await;
        }
        Err(e) => broken
            .lock()
            .unwrap()
            .push(format!("rolling origin {id} did not start: {e}")),
    }
    rolled.lock().unwrap()[index].ended = Some(Instant::now());
}

/// Waits for each traced ticket's publish, in order, and passes its batch's sequence on.
async fn resolve(
    mut traced: mpsc::Receiver<(Arc<str>, u64, Ticket)>,
    sent: mpsc::UnboundedSender<Sent>,
    counts: Arc<Counts>,
) {
    while let Some((origin, at_us, ticket)) = traced.recv().await {
        match ticket.published().await {
            Ok(p) => {
                let _ = sent.send(Sent {
                    origin,
                    seq: p.seq,
                    at_us,
                });
            }
            Err(_) => {
                counts.publish_errors.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// Where one batch has been applied.
struct Seen {
    /// Bit `i`: node `i` applied it.
    nodes: u8,
    last_us: u64,
    first: Instant,
}

const ALL_NODES: u8 = (1u8 << NODES) - 1;

/// Joins the traced invalidations with the nodes' applied batches; answers each ask with the
/// window's latencies and starts a new window. Ends when the asks' sender is dropped.
async fn join(
    applied: Vec<broadcast::Receiver<Applied>>,
    mut sent: mpsc::UnboundedReceiver<Sent>,
    mut asks: mpsc::Receiver<oneshot::Sender<Window>>,
) {
    enum Event {
        Applied(usize, Applied),
        Lagged(u64),
    }
    let mut events = futures::stream::select_all(applied.into_iter().enumerate().map(|(i, rx)| {
        futures::stream::unfold(rx, move |mut rx| async move {
            match rx.recv().await {
                Ok(a) => Some((Event::Applied(i, a), rx)),
                Err(broadcast::error::RecvError::Lagged(n)) => Some((Event::Lagged(n), rx)),
                Err(broadcast::error::RecvError::Closed) => None,
            }
        })
        .boxed()
    }));
    let new_hist = crate::histogram;
    let mut hist = new_hist();
    let (mut missing, mut lagged) = (0u64, 0u64);
    // Batches are kept after they complete, for traced invalidations resolved later (several
    // may share a batch); both maps forget after `TRACE_PATIENCE`.
    let mut seen: HashMap<(String, u64), Seen> = HashMap::new();
    let mut waiting: HashMap<(String, u64), (Vec<u64>, Instant)> = HashMap::new();
    let mut sweep = tokio::time::interval(Duration::from_secs(1));
    let mut sent_open = true;
    loop {
        tokio::select! {
            Some(ev) = events.next() => match ev {
                Event::Applied(i, a) => {
                    let key = (a.origin, a.seq);
                    let s = seen.entry(key.clone()).or_insert(Seen { nodes: 0, last_us: 0, first: Instant::now() });
                    s.nodes |= 1 << i;
                    s.last_us = s.last_us.max(a.applied_us);
                    if s.nodes == ALL_NODES {
                        if let Some((ats, _)) = waiting.remove(&key) {
                            for at in ats {
                                hist.saturating_record(s.last_us.saturating_sub(at).max(1));
                            }
                        }
                    }
                }
                Event::Lagged(n) => lagged += n,
            },
            s = sent.recv(), if sent_open => match s {
                Some(s) => {
                    let key = (s.origin.to_string(), s.seq);
                    match seen.get(&key) {
                        Some(done) if done.nodes == ALL_NODES => {
                            hist.saturating_record(done.last_us.saturating_sub(s.at_us).max(1));
                        }
                        _ => waiting.entry(key).or_insert_with(|| (Vec::new(), Instant::now())).0.push(s.at_us),
                    }
                }
                None => sent_open = false,
            },
            _ = sweep.tick() => {
                seen.retain(|_, s| s.first.elapsed() < TRACE_PATIENCE);
                waiting.retain(|_, (ats, since)| {
                    let keep = since.elapsed() < TRACE_PATIENCE;
                    if !keep {
                        missing += ats.len() as u64;
                    }
                    keep
                });
            }
            ask = asks.recv() => match ask {
                Some(reply) => {
                    let _ = reply.send(Window {
                        hist: std::mem::replace(&mut hist, new_hist()),
                        missing: std::mem::take(&mut missing),
                        lagged: std::mem::take(&mut lagged),
                    });
                }
                None => return,
            },
        }
    }
}

/// One node's reader: `get_or_load` on random keys as fast as it gets to run.
async fn read(cache: Cache<Bytes>, keys: Arc<[String]>, reading: Arc<AtomicBool>, counts: Arc<Counts>, seed: u64) {
    let mut rng = SmallRng::seed_from_u64(seed);
    while reading.load(Ordering::Relaxed) {
        for _ in 0..64 {
            let i = rng.random_range(0..keys.len());
            let _ = cache
                .get_or_load(&keys[i], || async move {
                    Ok::<_, std::io::Error>(Loaded::new(super::value(i)).tag(format!("g{}", i % TAGS)))
                })
                .await;
        }
        counts.reads.fetch_add(64, Ordering::Relaxed);
        // Let the buses' tasks and the pacer run between bursts: two cores for everything.
        tokio::task::yield_now().await;
    }
}

fn to_csv(samples: &[Sample]) -> String {
    let per_node = |name: &str| (0..NODES).map(|i| format!("{name}_n{i}")).collect::<Vec<_>>().join(",");
    let mut out = format!(
        "t_s,rss_bytes,heap_bytes,inv_per_s,reads_per_s,traced,p50_us,p99_us,missing,lagged,steady_queue,rolling_live,peer_bound,stale_peers,{},{},{},{},{},{}\n",
        per_node("peers"),
        per_node("origins"),
        per_node("entries"),
        per_node("tag_records"),
        per_node("prefix_records"),
        per_node("flushes")
    );
    let join = |v: &[u64]| v.iter().map(u64::to_string).collect::<Vec<_>>().join(",");
    for s in samples {
        let peers: Vec<u64> = s.peers.iter().map(|&p| p as u64).collect();
        out.push_str(&format!(
            "{:.1},{},{},{:.0},{:.0},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{}\n",
            s.t_s,
            s.rss,
            s.heap,
            s.sent as f64 / SAMPLE_EVERY.as_secs_f64(),
            s.reads as f64 / SAMPLE_EVERY.as_secs_f64(),
            s.traced,
            s.p50_us,
            s.p99_us,
            s.missing,
            s.lagged,
            s.steady_queue,
            s.rolling_live,
            s.peer_bound,
            s.stale_peers,
            join(&peers),
            join(&s.origins),
            join(&s.entries),
            join(&s.tag_records),
            join(&s.prefix_records),
            join(&s.flushes)
        ));
    }
    out
}

/// The plot: RSS over time above, propagation p50/p99 below, the warm-up's end marked.
fn plot(
    samples: &[Sample],
    minutes: u64,
    achieved: f64,
    warmup: Duration,
) -> Result<String, Box<dyn std::error::Error>> {
    use plotters::prelude::*;
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (1000, 760)).into_drawing_area();
        root.fill(&WHITE)?;
        let root = root.titled(
            &format!(
                "invalbus soak: {minutes} min, {achieved:.0} invalidations/s achieved (target {RATE}), {NODES} nodes"
            ),
            ("sans-serif", 22),
        )?;
        let panels = root.split_evenly((2, 1));
        let x_max = (minutes * 60) as f64;
        let warm = warmup.as_secs_f64();
        // Orange, so that the warm-up's end does not hide behind a grid line.
        let grey = RGBColor(255, 140, 0);

        let rss: Vec<(f64, f64)> = samples.iter().map(|s| (s.t_s, mib(s.rss))).collect();
        let heap: Vec<(f64, f64)> = samples.iter().map(|s| (s.t_s, mib(s.heap))).collect();
        let traced = |ms: fn(&Sample) -> u64| -> Vec<(f64, f64)> {
            samples
                .iter()
                .filter(|s| s.traced > 0)
                .map(|s| (s.t_s, ms(s) as f64 / 1000.0))
                .collect()
        };
        panel(
            &panels[0],
            "process RSS, and the heap in use (jemalloc stats.allocated)",
            "MiB",
            vec![("RSS", rss, BLUE), ("heap in use", heap, MAGENTA)],
            (x_max, warm, grey),
            SeriesLabelPosition::LowerRight,
        )?;
        panel(
            &panels[1],
            "propagation, origin to applied on all 3 nodes, per 10 s window",
            "latency (ms)",
            vec![("p99", traced(|s| s.p99_us), RED), ("p50", traced(|s| s.p50_us), GREEN)],
            (x_max, warm, grey),
            SeriesLabelPosition::UpperRight,
        )?;
        root.present()?;
    }
    Ok(svg)
}

/// A line of a plot panel: its label, its points (seconds, value) and its colour.
type Line<'a> = (&'a str, Vec<(f64, f64)>, plotters::style::RGBColor);

/// One panel of the plot: `lines` over time from 0 to `x_max` seconds, and a vertical line where
/// the warm-up ends.
fn panel(
    area: &plotters::drawing::DrawingArea<plotters::prelude::SVGBackend<'_>, plotters::coord::Shift>,
    caption: &str,
    y_desc: &str,
    lines: Vec<Line<'_>>,
    (x_max, warm, warm_colour): (f64, f64, plotters::style::RGBColor),
    legend: plotters::chart::SeriesLabelPosition,
) -> Result<(), Box<dyn std::error::Error>> {
    use plotters::prelude::*;
    let y_max = lines
        .iter()
        .flat_map(|(_, points, _)| points.iter().map(|p| p.1))
        .fold(1.0, f64::max)
        * 1.15;
    let mut chart = ChartBuilder::on(area)
        .caption(caption, ("sans-serif", 16))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(0f64..x_max, 0f64..y_max)?;
    chart
        .configure_mesh()
        .x_label_formatter(&|x| format!("{x:.0}"))
        .x_desc("time (s)")
        .y_desc(y_desc)
        .draw()?;
    for (label, points, colour) in lines {
        chart
            .draw_series(LineSeries::new(points, colour.stroke_width(2)))?
            .label(label)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], colour));
    }
    chart
        .draw_series(LineSeries::new(vec![(warm, 0.0), (warm, y_max)], warm_colour))?
        .label("end of warm-up")
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], warm_colour));
    chart
        .configure_series_labels()
        .position(legend)
        .border_style(BLACK)
        .background_style(WHITE.mix(0.8))
        .draw()?;
    Ok(())
}
