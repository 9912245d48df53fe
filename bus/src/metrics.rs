//! Counters and latency histograms of a bus and its caches, and their snapshots.
//!
//! Hit and miss counters sit on the hit path, which two threads may run at a million reads a
//! second each: a single shared atomic would bounce its cache line between the cores on every
//! read. [`Counter`] therefore spreads increments over padded stripes and sums them on read.

use std::cell::Cell;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;

const STRIPES: usize = 8;

#[repr(align(128))]
#[derive(Default)]
struct Stripe(AtomicU64);

/// A monotonically increasing counter, cheap to bump from many threads.
#[derive(Default)]
pub struct Counter {
    stripes: [Stripe; STRIPES],
}

thread_local! {
    static STRIPE: Cell<usize> = const { Cell::new(usize::MAX) };
}
static NEXT_STRIPE: AtomicUsize = AtomicUsize::new(0);

fn stripe() -> usize {
    STRIPE.with(|s| {
        let v = s.get();
        if v != usize::MAX {
            return v;
        }
        let v = NEXT_STRIPE.fetch_add(1, Ordering::Relaxed) % STRIPES;
        s.set(v);
        v
    })
}

impl Counter {
    /// Adds one.
    #[inline]
    pub fn inc(&self) {
        self.add(1);
    }

    /// Adds `n`.
    #[inline]
    pub fn add(&self, n: u64) {
        self.stripes[stripe()].0.fetch_add(n, Ordering::Relaxed);
    }

    /// The current total.
    pub fn get(&self) -> u64 {
        self.stripes.iter().map(|s| s.0.load(Ordering::Relaxed)).sum()
    }
}

impl std::fmt::Debug for Counter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.get())
    }
}

/// A latency histogram in microseconds (1 µs to 1 h, 3 significant digits).
pub struct Latency {
    hist: Mutex<hdrhistogram::Histogram<u64>>,
}

impl Default for Latency {
    fn default() -> Self {
        // 1 µs .. 1 h with 3 significant figures always constructs.
        let hist = hdrhistogram::Histogram::new_with_bounds(1, 3_600_000_000, 3)
            .unwrap_or_else(|_| hdrhistogram::Histogram::new(3).expect("3 significant figures is valid"));
        Latency { hist: Mutex::new(hist) }
    }
}

impl Latency {
    /// Records one sample.
    pub fn record(&self, micros: u64) {
        if let Ok(mut h) = self.hist.lock() {
            h.saturating_record(micros.max(1));
        }
    }

    /// Count, p50, p99, p99.9 and max, in microseconds.
    pub fn snapshot(&self) -> LatencySnapshot {
        match self.hist.lock() {
            Ok(h) => LatencySnapshot {
                count: h.len(),
                p50_us: h.value_at_quantile(0.5),
                p99_us: h.value_at_quantile(0.99),
                p999_us: h.value_at_quantile(0.999),
                max_us: h.max(),
            },
            Err(_) => LatencySnapshot::default(),
        }
    }

    /// Count and bucket boundaries with cumulative counts, for Prometheus histograms.
    pub fn cumulative(&self, bounds_us: &[u64]) -> (u64, u64, Vec<u64>) {
        match self.hist.lock() {
            Ok(h) => {
                let counts = bounds_us.iter().map(|b| h.count_between(0, *b)).collect();
                let sum = h
                    .iter_recorded()
                    .map(|v| v.value_iterated_to() * v.count_at_value())
                    .sum();
                (h.len(), sum, counts)
            }
            Err(_) => (0, 0, vec![0; bounds_us.len()]),
        }
    }
}

/// Percentiles of a latency histogram, in microseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LatencySnapshot {
    /// Number of samples.
    pub count: u64,
    /// Median.
    pub p50_us: u64,
    /// 99th percentile.
    pub p99_us: u64,
    /// 99.9th percentile.
    pub p999_us: u64,
    /// Largest sample.
    pub max_us: u64,
}

/// Counters of one cache.
#[derive(Default, Debug)]
pub(crate) struct CacheMetrics {
    pub hits: Counter,
    pub misses: Counter,
    pub loads: Counter,
    pub fills: Counter,
    pub rejected_fills: Counter,
    pub bypassed_reads: Counter,
    pub invalidations_applied: Counter,
    pub flushes: Counter,
    pub floor_overflow_refusals: Counter,
}

/// A snapshot of one cache's figures.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CacheStats {
    /// Cache name.
    pub name: String,
    /// Entries held (approximate, as moka counts them).
    pub entries: u64,
    /// Reads that returned a cached value.
    pub hits: u64,
    /// Reads that found nothing valid.
    pub misses: u64,
    /// Loader runs.
    pub loads: u64,
    /// Values inserted.
    pub fills: u64,
    /// Values refused because an invalidation overtook their load (the stale-fill race).
    pub rejected_fills: u64,
    /// Reads sent to the loader because the bus could not vouch for the cache.
    pub bypassed_reads: u64,
    /// Invalidations applied to this cache, local and remote.
    pub invalidations_applied: u64,
    /// Whole-cache flushes, requested or forced by a repair.
    pub flushes: u64,
    /// Fills refused by a version floor that had to leave the exact floor table (see the crate
    /// docs on versions): possibly another key's floor, so possibly a needless miss.
    pub floor_overflow_refusals: u64,
    /// Floors moved out of the exact table because more keys were invalidated by version
    /// within a window than it holds.
    pub floors_overflowed: u64,
    /// Tag purge records kept to refuse fills that a purge overtook (pruned once no live entry
    /// can predate them).
    pub tag_records: u64,
    /// Prefix purge records kept for the same reason (at most 1,024).
    pub prefix_records: u64,
    /// Distinct tag sets interned for the entries held.
    pub tag_sets: u64,
}

impl CacheStats {
    /// hits / (hits + misses), or 0 when there were no reads.
    pub fn hit_ratio(&self) -> f64 {
        let total = self.hits + self.misses;
        if total == 0 {
            0.0
        } else {
            self.hits as f64 / total as f64
        }
    }
}

/// Counters of the bus (transport and bookkeeping).
#[derive(Default)]
pub(crate) struct BusMetrics {
    pub batches_published: Counter,
    pub invalidations_published: Counter,
    pub publish_errors: Counter,
    pub publish_queue_full: Counter,
    pub batches_received: Counter,
    pub invalidations_received: Counter,
    pub echoes_skipped: Counter,
    pub oversized: Counter,
    pub malformed: Counter,
    pub invalid: Counter,
    pub foreign: Counter,
    pub unknown_cache: Counter,
    pub duplicates: Counter,
    pub gaps: Counter,
    pub heartbeats_received: Counter,
    pub replayed: Counter,
    pub repair_flushes: Counter,
    pub receipts_published: Counter,
    pub receipts_failed: Counter,
    pub receipts_lagged: Counter,
    pub slow_consumer_events: Counter,
    pub evidence: Counter,
    pub duplicate_node_ids: Counter,
    pub peers_refused: Counter,
    pub follower_rereads: Counter,
    pub follower_restarts: Counter,
    pub stream_erasures: Counter,
    pub refused_unsigned: Counter,
    pub refused_untrusted: Counter,
    pub refused_unauthorized: Counter,
    pub contested: Counter,
    pub propagation: Latency,
}

/// A snapshot of the bus's figures.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct BusStats {
    /// Batches this node published.
    pub batches_published: u64,
    /// Invalidations this node published.
    pub invalidations_published: u64,
    /// Publishes that failed (counted per batch).
    pub publish_errors: u64,
    /// Invalidations refused because the outbound queue was full.
    pub publish_queue_full: u64,
    /// Batches received from peers and applied.
    pub batches_received: u64,
    /// Invalidations received from peers and applied.
    pub invalidations_received: u64,
    /// Own batches seen on the subject and skipped.
    pub echoes_skipped: u64,
    /// Messages dropped for exceeding the size limit.
    pub oversized: u64,
    /// Messages dropped because they did not decode.
    pub malformed: u64,
    /// Messages dropped because they broke a rule of the protocol.
    pub invalid: u64,
    /// Messages dropped because they came from another namespace.
    pub foreign: u64,
    /// Invalidations naming a cache this node does not have (ignored, not an error).
    pub unknown_cache: u64,
    /// Batches received twice (ignored).
    pub duplicates: u64,
    /// Gaps found in a peer's sequence.
    pub gaps: u64,
    /// Heartbeats received from peers.
    pub heartbeats_received: u64,
    /// Batches applied from the stream path because the live path had not delivered them.
    pub replayed: u64,
    /// Repairs: batches the stream path filled plus flushes (`replayed + repair_flushes`).
    pub repairs: u64,
    /// Flushes of every cache because something was missed that cannot be applied (a batch
    /// never stored, a history the stream no longer holds, or, without a stream, any loss).
    pub repair_flushes: u64,
    /// Slow-consumer drops reported by the NATS client (messages dropped before the bus read
    /// them).
    pub slow_consumer_events: u64,
    /// Pieces of evidence gathered (this node's heartbeat back through the stream, or without
    /// one through NATS).
    pub evidence: u64,
    /// Heartbeats seen from another process using this node's id.
    pub duplicate_node_ids: u64,
    /// Heartbeats not recorded because the peer table was full.
    pub peers_refused: u64,
    /// Times the stream follower read again from a hole (its consumer skipped a stored batch,
    /// or the leader could not say what the hole held).
    pub follower_rereads: u64,
    /// Times the stream follower was restarted from where it stood because this node's own
    /// heartbeat was overdue and the follower delivered nothing (a pull request the server
    /// dropped, a server that went away).
    pub follower_restarts: u64,
    /// Messages in the batch stream that erased stored batches (a `Nats-Rollup` header on a
    /// batch subject, which invalbus never sends): the audit records before them are gone.
    pub stream_erasures: u64,
    /// Messages refused for a missing or bad signature.
    pub refused_unsigned: u64,
    /// Messages refused because the trust policy does not let their signer publish as their
    /// origin (an untrusted key, or an origin another key owns).
    pub refused_untrusted: u64,
    /// Batches refused because their signer may not make some of their invalidations (a key
    /// allowed keys only, purging by tag).
    pub refused_unauthorized: u64,
    /// Batches whose signature verifies but whose origin name another key holds (the `pinned`
    /// trust policy only): their invalidations were applied, and nothing else (no sequence
    /// tracking, receipt or audit claim). See the README's Security model.
    pub contested_batches: u64,
    /// Peers in the peer table.
    pub peers: u64,
    /// Origins whose sequences are tracked.
    pub origins_tracked: u64,
    /// Time spent not serving from cache (cut off or repairing), in microseconds.
    pub suspect_us: u64,
    /// Receipts written (acknowledged by the receipts stream, with JetStream).
    pub receipts_published: u64,
    /// Receipts that failed or were not acknowledged.
    pub receipts_failed: u64,
    /// Applied batches the receipt recorder fell too far behind to see (no receipt written).
    pub receipts_lagged: u64,
    /// Whether the caches serve right now.
    pub serving: bool,
    /// Publish-to-applied latency of peers' batches here (sender's clock to ours).
    pub propagation: LatencySnapshot,
}

impl BusMetrics {
    pub fn snapshot(&self) -> BusStats {
        BusStats {
            batches_published: self.batches_published.get(),
            invalidations_published: self.invalidations_published.get(),
            publish_errors: self.publish_errors.get(),
            publish_queue_full: self.publish_queue_full.get(),
            batches_received: self.batches_received.get(),
            invalidations_received: self.invalidations_received.get(),
            echoes_skipped: self.echoes_skipped.get(),
            oversized: self.oversized.get(),
            malformed: self.malformed.get(),
            invalid: self.invalid.get(),
            foreign: self.foreign.get(),
            unknown_cache: self.unknown_cache.get(),
            duplicates: self.duplicates.get(),
            gaps: self.gaps.get(),
            heartbeats_received: self.heartbeats_received.get(),
            replayed: self.replayed.get(),
            repairs: self.replayed.get() + self.repair_flushes.get(),
            repair_flushes: self.repair_flushes.get(),
            slow_consumer_events: self.slow_consumer_events.get(),
            evidence: self.evidence.get(),
            duplicate_node_ids: self.duplicate_node_ids.get(),
            peers_refused: self.peers_refused.get(),
            follower_rereads: self.follower_rereads.get(),
            follower_restarts: self.follower_restarts.get(),
            stream_erasures: self.stream_erasures.get(),
            refused_unsigned: self.refused_unsigned.get(),
            refused_untrusted: self.refused_untrusted.get(),
            refused_unauthorized: self.refused_unauthorized.get(),
            contested_batches: self.contested.get(),
            peers: 0,
            origins_tracked: 0,
            receipts_published: self.receipts_published.get(),
            receipts_failed: self.receipts_failed.get(),
            receipts_lagged: self.receipts_lagged.get(),
            suspect_us: 0,
            serving: false,
            propagation: self.propagation.snapshot(),
        }
    }
}
