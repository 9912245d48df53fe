//! What the services of one node share: the bus and its caches, the token table, the audit log
//! and the node's own counters.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use invalbus::Bus;

use crate::audit::Audit;
use crate::auth::Auth;
use crate::config::NodeConfig;
use crate::pb::admin::{CacheStats, Latency, NodeStats, StatsResponse};

/// Counters of the node (the bus keeps its own).
#[derive(Debug, Default)]
pub struct NodeCounters {
    /// Purges accepted.
    pub purges: AtomicU64,
    /// Sidecar fills refused because an invalidation overtook them.
    pub sidecar_refused_fills: AtomicU64,
    /// Watch streams opened (clients' in-process caches).
    pub watch_streams: AtomicU64,
    /// Watch streams ended because they fell behind the node's events.
    pub watch_lagged: AtomicU64,
}

/// The shared state of a node's services.
pub struct NodeState {
    /// The bus this node runs.
    pub bus: Bus,
    /// Its caches, by name (values are opaque bytes, as the sidecar stores them).
    pub caches: HashMap<String, invalbus::Cache<Bytes>>,
    /// The configuration it runs with.
    pub config: NodeConfig,
    /// Tokens and refusals.
    pub auth: Auth,
    /// The audit log.
    pub audit: Audit,
    /// Address announced to peers.
    pub advertise: String,
    /// Counters.
    pub counters: NodeCounters,
}

impl NodeState {
    /// Names of the caches this node or any peer holds.
    pub fn known_caches(&self) -> HashSet<String> {
        let mut names: HashSet<String> = self.caches.keys().cloned().collect();
        for p in self.bus.peers() {
            names.extend(p.caches.into_iter().map(|(n, _)| n));
        }
        names
    }

    /// The nodes a waiting purge expects receipts from: this node and the peers that write
    /// receipts and were heard from within three heartbeat intervals (plus a second).
    pub fn receipt_writers(&self) -> Vec<String> {
        let window = (self.config.heartbeat_interval * 3).as_micros() as u64 + 1_000_000;
        let now = invalbus::now_us();
        let mut v = vec![self.bus.node_id().to_owned()];
        v.extend(
            self.bus
                .peers()
                .into_iter()
                .filter(|p| p.writes_receipts && now.saturating_sub(p.last_seen_us) <= window)
                .map(|p| p.node_id),
        );
        v
    }

    /// The figures of the node and of each cache.
    pub fn stats(&self) -> StatsResponse {
        let s = self.bus.stats();
        let node = NodeStats {
            node_id: self.bus.node_id().to_owned(),
            batches_published: s.batches_published,
            invalidations_published: s.invalidations_published,
            publish_errors: s.publish_errors,
            batches_received: s.batches_received,
            invalidations_received: s.invalidations_received,
            gaps: s.gaps,
            replayed: s.replayed,
            repairs: s.repairs,
            repair_flushes: s.repair_flushes,
            duplicates: s.duplicates,
            refused_messages: s.oversized
                + s.malformed
                + s.invalid
                + s.foreign
                + s.refused_unsigned
                + s.refused_untrusted
                + s.refused_unauthorized,
            refused_unsigned: s.refused_unsigned,
            refused_untrusted: s.refused_untrusted,
            refused_unauthorized: s.refused_unauthorized,
            duplicate_node_ids: s.duplicate_node_ids,
            peers: s.peers,
            peers_refused: s.peers_refused,
            stream_erasures: s.stream_erasures,
            contested_batches: s.contested_batches,
            follower_rereads: s.follower_rereads,
            follower_restarts: s.follower_restarts,
            serving: s.serving,
            propagation: Some(Latency {
                count: s.propagation.count,
                p50_us: s.propagation.p50_us,
                p99_us: s.propagation.p99_us,
                p999_us: s.propagation.p999_us,
                max_us: s.propagation.max_us,
            }),
            receipts_published: s.receipts_published,
            receipts_failed: s.receipts_failed + s.receipts_lagged,
            refused_calls: self.auth.refusals.total(),
            purges: self.counters.purges.load(Ordering::Relaxed),
        };
        let caches = self
            .bus
            .cache_stats()
            .into_iter()
            .map(|c| CacheStats {
                hit_ratio: c.hit_ratio(),
                name: c.name,
                entries: c.entries,
                hits: c.hits,
                misses: c.misses,
                invalidations_applied: c.invalidations_applied,
                rejected_fills: c.rejected_fills,
                flushes: c.flushes,
                fills: c.fills,
                bypassed_reads: c.bypassed_reads,
            })
            .collect();
        StatsResponse {
            node: Some(node),
            caches,
        }
    }
}
