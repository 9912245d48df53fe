//! Figure 10 (peers): `multi-tier-cache` (moka L1 in front of Redis L2, invalidation over Redis pub/sub), the
//! closest Rust peer of invalbus, measured on the bench's own `redis-server` with the crate's own
//! cross-instance invalidation.
//!
//! Four `CacheManager`s built with `CacheManager::new_with_invalidation` share one `redis-server`:
//! one writer and three peers, as the invalbus propagation figure has one origin and three peers.
//! `CacheManager::invalidate` removes the key from the writer's own tiers, then `PUBLISH`es a JSON
//! `Remove` envelope; each peer's subscriber task (the crate's `InvalidationSubscriber`) reads it,
//! bumps its `removes_received` counter and runs the crate's handler, which removes the key from
//! the peer's L1 (moka) and then `DEL`s it from L2 (Redis), one message after the other.
//!
//! The crate offers no callback or event for "this peer applied an invalidation", so the two
//! figures are taken at the closest points it lets a user observe:
//! - latency: the key disappearing from the peer's L1, seen by polling that L1 (the `L1Cache`
//!   handed to the crate, read with `CacheBackend::get`, which touches neither L2 nor the peer's
//!   counters of hits) from one thread; see [`poll_l1`] for how the polling error is bounded, and
//! - throughput: the peer's `removes_received` counter, which the subscriber bumps just before it
//!   runs the handler for that message.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use multi_tier_cache::{CacheBackend, CacheError, CacheManager, InvalidationConfig, L1Cache, L2Cache, MokaCacheConfig};

use super::{now_us, row, Row};
use crate::redis::{redis_server_bin, RedisServer};

/// The paced rate of the latency measurement; the invalbus rows it is compared with use the same.
const RATE: u64 = 5_000;
/// Peers that receive every invalidation, as many as the invalbus propagation figure has.
const PEERS: usize = 3;
/// A peer that applies nothing for this long is taken to have lost the rest.
const IDLE: Duration = Duration::from_secs(5);
/// How long the L1 poller sleeps after a round that saw no key go; the real gap is longer (timer
/// slack) and is measured, see [`poll_l1`].
const POLL_PAUSE: Duration = Duration::from_micros(20);
/// `invalidate` calls in flight at once in the throughput phase. Each call waits for a `DEL` and a
/// `PUBLISH` reply; one at a time would measure the writer's round trips, not the peers.
const IN_FLIGHT: usize = 64;

/// Adds the multi-tier-cache rows next to the invalbus rows already in `rows` (propagation p50/p99
/// at 5,000/s and absent-key throughput), or prints why it skipped this peer and adds none.
///
/// The latency phase runs for `secs` at 5,000/s; the throughput phase invalidates `n` keys.
pub async fn rows(secs: u64, n: usize, rows: &mut Vec<Row>) {
    let Some(bin) = redis_server_bin() else {
        println!("  (multi-tier-cache: skipped this peer, no redis-server on PATH or at /usr/bin/redis-server)");
        return;
    };
    let server = match RedisServer::start(&bin).await {
        Ok(s) => s,
        Err(e) => {
            println!(
                "  (multi-tier-cache: skipped this peer, {} did not start: {e})",
                bin.display()
            );
            return;
        }
    };
    let url = format!("redis://127.0.0.1:{}/", server.port);
    let measured = measure(&url, secs, n).await;
    // The instances are gone (their subscriber tasks told to stop) before the server they talk to.
    drop(server);
    let m = match measured {
        Ok(m) => m,
        Err(e) => {
            println!("  (multi-tier-cache: skipped this peer, measurement failed: {e})");
            return;
        }
    };
    let l = &m.latency;
    println!(
        "  (multi-tier-cache: writer reached {:.0}/s of {RATE}/s; each removal bracketed by L1 polls within {} us at p50, \
         {} us at p99; latency = the bracket's midpoint)",
        l.rate,
        l.bracket.value_at_quantile(0.5),
        l.bracket.value_at_quantile(0.99)
    );
    for (q, name) in [(0.5, "p50"), (0.99, "p99")] {
        let ours = invalbus_value(rows, &format!("propagation {name}, {PEERS} peers, {RATE}/s"));
        let peer = m.latency.slowest.value_at_quantile(q) as f64;
        rows.push(row(
            format!("peer multi-tier-cache: propagation {name}, {PEERS} peers, {RATE}/s"),
            ours,
            peer,
            "us",
            ours / peer,
            "below multi-tier-cache",
            comparable(ours, peer).then_some(ours < peer),
        ));
    }
    let ours = invalbus_value(
        rows,
        &format!("throughput: absent keys, keys/s at each of {PEERS} peers"),
    );
    rows.push(row(
        format!("peer multi-tier-cache: throughput, absent keys, keys/s at each of {PEERS} peers"),
        ours,
        m.rate,
        "keys/s",
        m.rate / ours,
        "above multi-tier-cache",
        comparable(ours, m.rate).then_some(ours > m.rate),
    ));
}

/// What the two phases measured.
struct Measured {
    /// See [`latency`].
    latency: Latency,
    /// Keys per second applied at the slowest peer; see [`throughput`].
    rate: f64,
}

async fn measure(url: &str, secs: u64, n: usize) -> Result<Measured, MeasureError> {
    let keys = (RATE * secs) as usize;
    // Room for every key of the latency phase, so that none leaves a peer's L1 by eviction.
    let capacity = (keys as u64 + 1_000).max(10_000);
    let writer = Instance::start(url, capacity).await?;
    let mut peers = Vec::with_capacity(PEERS);
    for _ in 0..PEERS {
        peers.push(Instance::start(url, capacity).await?);
    }
    subscribed(&writer, &peers).await?;
    let latency = latency(&writer, &peers, RATE, secs).await?;
    let rate = throughput(&writer, &peers, n).await?;
    Ok(Measured { latency, rate })
}

/// One `multi-tier-cache` instance, as one application process would build it.
struct Instance {
    manager: CacheManager,
    /// The L1 the manager reads first, kept to observe it without going through the manager.
    l1: Arc<L1Cache>,
}

impl Instance {
    async fn start(url: &str, capacity: u64) -> Result<Instance, MeasureError> {
        let l1 = Arc::new(L1Cache::new(MokaCacheConfig {
            max_capacity: capacity,
            time_to_live: Duration::from_secs(3600),
            time_to_idle: Duration::from_secs(3600),
        })?);
        let l2 = Arc::new(L2Cache::with_url(url).await?);
        // The default channel, `cache:invalidate`: every instance of this bench shares it.
        let manager =
            CacheManager::new_with_invalidation(Arc::clone(&l1), l2, url, InvalidationConfig::default()).await?;
        Ok(Instance { manager, l1 })
    }

    /// `Remove` messages this instance's subscriber has taken off the channel.
    fn removes(&self) -> u64 {
        self.manager.invalidation_stats().map_or(0, |s| s.removes_received)
    }
}

/// Waits until every peer's subscriber is on the channel: the crate subscribes in a background task
/// after `new_with_invalidation` returns, so a warm-up key is invalidated until each peer has seen
/// one. The counters are cumulative; the phases below count from their own baseline.
async fn subscribed(writer: &Instance, peers: &[Instance]) -> Result<(), MeasureError> {
    let end = Instant::now() + IDLE;
    while peers.iter().any(|p| p.removes() == 0) {
        if Instant::now() >= end {
            return Err(MeasureError::Stalled(
                "a peer's subscription to the invalidation channel",
            ));
        }
        writer.manager.invalidate("warm-up").await?;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// Propagation latency: from just before the writer's `invalidate("k<i>")` call to the moment the
/// key is gone from the L1 of the last of the three peers, for keys present in every peer's L1,
/// with the writer paced at `rate` for `secs` (the same pacing as the invalbus and raw NATS
/// propagation figures). It includes the writer's own L1 removal and L2 `DEL` that `invalidate`
/// performs before it publishes.
///
/// The writer cannot always keep the pace: each `invalidate` waits for a `DEL` and then a `PUBLISH`
/// reply, and when that takes longer than the 200 us between two keys the loop falls behind and
/// sends the next key at once, as the other propagation figures would. The rate it reached is
/// returned beside the histogram.
async fn latency(writer: &Instance, peers: &[Instance], rate: u64, secs: u64) -> Result<Latency, MeasureError> {
    let total = (rate * secs) as usize;
    let keys: Arc<Vec<String>> = Arc::new((0..total).map(|i| format!("k{i}")).collect());
    let value = Bytes::from_static(b"v");
    for p in peers {
        for k in keys.iter() {
            p.l1.set_with_ttl(k, value.clone(), Duration::from_secs(3600)).await?;
        }
    }
    let l1s: Vec<Arc<L1Cache>> = peers.iter().map(|p| Arc::clone(&p.l1)).collect();
    let stop = Arc::new(AtomicBool::new(false));
    let watching = Arc::new(AtomicBool::new(false));
    let poller = {
        let (keys, stop, watching) = (Arc::clone(&keys), Arc::clone(&stop), Arc::clone(&watching));
        tokio::task::spawn_blocking(move || poll_l1(&l1s, &keys, &stop, &watching))
    };
    // Every removal must fall after the poller's first look, or it would have no lower bound.
    let end = Instant::now() + IDLE;
    while !watching.load(Ordering::Acquire) {
        if Instant::now() >= end {
            stop.store(true, Ordering::Relaxed);
            return Err(MeasureError::Stalled("the L1 poller to start"));
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let mut sent = Vec::with_capacity(total);
    let start = Instant::now();
    let mut failed = None;
    for (i, k) in keys.iter().enumerate() {
        let due = start + Duration::from_nanos(i as u64 * 1_000_000_000 / rate);
        let now = Instant::now();
        if due > now + Duration::from_micros(200) {
            tokio::time::sleep(due - now).await;
        }
        sent.push(now_us());
        if let Err(e) = writer.manager.invalidate(k).await {
            failed = Some(e);
            break;
        }
    }
    if let Some(e) = failed {
        stop.store(true, Ordering::Relaxed);
        let _ = poller.await;
        return Err(e.into());
    }
    let reached = total as f64 / start.elapsed().as_secs_f64();
    let seen = poller.await.map_err(|e| MeasureError::Task(e.to_string()))?;
    let (mut slowest, mut bracket) = (crate::histogram(), crate::histogram());
    for (i, sent) in sent.iter().enumerate() {
        let mut worst = 0;
        for peer in &seen {
            let Some(&(lower, upper)) = peer.get(i).filter(|(_, upper)| *upper != 0) else {
                return Err(MeasureError::Lost {
                    applied: peer.iter().filter(|(_, upper)| *upper != 0).count(),
                    sent: total,
                });
            };
            // The removal cannot come before the call that caused it: when the poller saw several
            // keys go at once, the previous key's lower bound is older than this key's send.
            let lower = lower.max(*sent).min(upper);
            bracket.saturating_record(upper - lower);
            worst = worst.max(lower.midpoint(upper).saturating_sub(*sent));
        }
        slowest.saturating_record(worst.max(1));
    }
    Ok(Latency {
        slowest,
        bracket,
        rate: reached,
    })
}

/// The propagation latency of multi-tier-cache and how well it could be observed.
struct Latency {
    /// Per invalidation, microseconds until the slowest of the three peers had removed the key.
    slowest: hdrhistogram::Histogram<u64>,
    /// Per invalidation and peer, the width in microseconds of the interval the poller bracketed
    /// the removal in: the error of each value in `slowest` is at most half of it.
    bracket: hdrhistogram::Histogram<u64>,
    /// Invalidations per second the writer reached (the target is [`RATE`]).
    rate: f64,
}

/// Watches each peer's L1 for `keys` to disappear, in order, until all are gone from all L1s, `stop`
/// is set, or nothing disappears for [`IDLE`]. Runs on a thread of its own, so that polling does not
/// take turns with the peers' subscriber tasks on the runtime's two workers.
///
/// For peer `p` and key `i` it returns `(lower, upper)` in [`now_us`] time: the key was still in the
/// L1 at some instant after `lower` and gone at some instant before `upper`, so the removal happened
/// inside that bracket (`upper` is 0 when it never went). The caller takes the midpoint, which is off
/// by at most half the bracket either way, and reports the bracket widths. A bracket is as wide as
/// a polling round (about 80 us: the pause below is stretched by timer slack) unless the OS leaves
/// this thread off the CPU, as a loaded 2-core machine does now and then: the polled figure's tail
/// carries that error, which is why the widths are printed beside it.
///
/// Only the next key of each peer is polled: a peer removes keys in the order they were published,
/// because the writer waits for each `PUBLISH` reply before it starts the next `invalidate`, Redis
/// delivers one channel's messages in order on each connection, and the crate's subscriber handles
/// one message at a time. For the same reason a key's lower bound is at least the previous key's.
///
/// `watching` is set once every peer's first key has been seen present.
fn poll_l1(l1s: &[Arc<L1Cache>], keys: &[String], stop: &AtomicBool, watching: &AtomicBool) -> Vec<Vec<(u64, u64)>> {
    let mut seen = vec![vec![(0u64, 0u64); keys.len()]; l1s.len()];
    let mut next = vec![0usize; l1s.len()];
    let mut lower = vec![0u64; l1s.len()];
    let mut progress = Instant::now();
    while next.iter().any(|&i| i < keys.len()) && !stop.load(Ordering::Relaxed) && progress.elapsed() < IDLE {
        let mut went = false;
        for (p, l1) in l1s.iter().enumerate() {
            while let Some(key) = keys.get(next[p]) {
                let before = now_us();
                // The L1 is moka's future cache, which needs no runtime: blocking on it is only
                // waiting for a lookup.
                let present = futures::executor::block_on(l1.get(key)).is_some();
                let after = now_us();
                if present {
                    lower[p] = before;
                    break;
                }
                seen[p][next[p]] = (lower[p].min(after), after);
                next[p] += 1;
                went = true;
            }
        }
        watching.store(true, Ordering::Release);
        if went {
            progress = Instant::now();
        } else {
            std::thread::sleep(POLL_PAUSE);
        }
    }
    seen
}

/// Invalidations applied per second at each peer: the writer invalidates `n` keys that no peer
/// holds, [`IN_FLIGHT`] calls at a time, as fast as it can; the rate is `n` over the time from the
/// first call until the slowest peer's subscriber has taken the `n`-th `Remove` off the channel
/// (its counter is polled every millisecond, as the invalbus throughput figure polls its own).
async fn throughput(writer: &Instance, peers: &[Instance], n: usize) -> Result<f64, MeasureError> {
    let base: Vec<u64> = peers.iter().map(Instance::removes).collect();
    let keys: Vec<String> = (0..n).map(|i| format!("t{i}")).collect();
    let start = Instant::now();
    let mut calls =
        futures::stream::iter(keys.iter().map(|k| writer.manager.invalidate(k))).buffer_unordered(IN_FLIGHT);
    while let Some(done) = calls.next().await {
        done?;
    }
    let mut slowest = f64::INFINITY;
    for (p, base) in peers.iter().zip(base) {
        let mut last = (0, Instant::now());
        loop {
            let applied = p.removes() - base;
            if applied >= n as u64 {
                break;
            }
            if applied != last.0 {
                last = (applied, Instant::now());
            } else if last.1.elapsed() >= IDLE {
                return Err(MeasureError::Lost {
                    applied: applied as usize,
                    sent: n,
                });
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        slowest = slowest.min(n as f64 / start.elapsed().as_secs_f64());
    }
    Ok(slowest)
}

/// The invalbus value of the first signed row whose name starts with `prefix`, or NaN when that
/// figure did not run (the peer's row then shows a NaN ratio and no verdict).
fn invalbus_value(rows: &[Row], prefix: &str) -> f64 {
    rows.iter()
        .find(|r| r.name.starts_with(prefix) && !r.name.contains("UNSIGNED"))
        .map_or(f64::NAN, |r| r.invalbus)
}

fn comparable(a: f64, b: f64) -> bool {
    a.is_finite() && b.is_finite()
}

/// Why the multi-tier-cache figure could not be measured.
#[derive(Debug)]
enum MeasureError {
    /// The crate reported an error (connecting, publishing, building an instance).
    Cache(CacheError),
    /// A peer stopped applying invalidations before it had applied all of them.
    Lost {
        applied: usize,
        sent: usize,
    },
    Stalled(&'static str),
    /// A task of the bench panicked or could not be joined.
    Task(String),
}

impl std::fmt::Display for MeasureError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MeasureError::Cache(e) => write!(f, "multi-tier-cache: {e}"),
            MeasureError::Lost { applied, sent } => {
                write!(
                    f,
                    "a peer applied {applied} of {sent} invalidations, then nothing for {IDLE:?}"
                )
            }
            MeasureError::Stalled(what) => write!(f, "timed out waiting for {what}"),
            MeasureError::Task(e) => write!(f, "bench task failed: {e}"),
        }
    }
}

impl From<CacheError> for MeasureError {
    fn from(e: CacheError) -> Self {
        MeasureError::Cache(e)
    }
}
