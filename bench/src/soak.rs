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

mod load;
mod report;

use load::{join, pace, read, resolve, roll};
use report::{mib, plot, to_csv, verdicts};

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
        "invalbus-soak: {minutes} min, {RATE} invalidations/s target, {NODES} nodes, rolling origins every {}s for {}s, peer expiry {}s, ttl {}s, warm-up {}s",
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
