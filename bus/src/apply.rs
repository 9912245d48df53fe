//! Applying invalidations to this node's caches: the object-safe face of a cache that the
//! receiver and the publisher apply through, and what an application leaves behind (the
//! [`Applied`] record receipts are made of, the sweeps' pending counts, the [`CacheEvent`]s
//! followers read).

use std::any::Any;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;

use crate::cache::{ApplyOutcome, LocalCache, Step};
use crate::codec::Invalidation;
use crate::metrics::CacheStats;
use crate::view::TargetRef;

/// A batch from a peer, as applied on this node: what the audit log's receipts are made of.
#[derive(Debug, Clone)]
pub struct Applied {
    /// Node that published the batch.
    pub origin: String,
    /// Its epoch.
    pub epoch: u64,
    /// Its sequence.
    pub seq: u64,
    /// When it was published, by the origin's clock (µs since the Unix epoch).
    pub published_us: u64,
    /// When this node finished applying it, by this node's clock.
    pub applied_us: u64,
    /// Number of invalidations in it.
    pub invalidations: usize,
    /// Entries removed at once.
    pub dropped: u64,
    /// Whether a cache was flushed by it.
    pub flushed: bool,
    /// Purge ids of the admin purges in it.
    pub purge_ids: Vec<String>,
    /// The entries its tag and prefix purges hid, counted as the sweep removes them: add
    /// [`PendingDrops::count`] to `dropped` for the whole.
    pub pending: PendingDrops,
}

/// How long [`PendingDrops::count`] waits for a sweep before it answers with what was counted.
const SWEEP_PATIENCE: Duration = Duration::from_secs(60);

/// The entries that tag and prefix purges hid at once, still being removed (and counted) by the
/// caches' background sweeps. A sweep covers every purge applied before it began, so the count
/// usually completes within milliseconds (about a second for a million entries).
#[derive(Clone, Default)]
pub struct PendingDrops {
    pub(crate) sweeps: Vec<(Arc<dyn Applier>, u64)>,
}

impl PendingDrops {
    /// Whether there is nothing to wait for (no tag or prefix purge, or no cache to purge).
    pub fn is_empty(&self) -> bool {
        self.sweeps.is_empty()
    }

    /// The number of entries these purges hid, once the sweeps have counted them. Each entry is
    /// counted once, for the first purge that hid it. If a sweep is more than a minute late, the
    /// count so far (and a warning in the log).
    pub async fn count(&self) -> u64 {
        let mut n = 0;
        for (cache, gen) in &self.sweeps {
            n += cache.swept(*gen, SWEEP_PATIENCE).await;
        }
        n
    }
}

impl std::fmt::Debug for PendingDrops {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PendingDrops")
            .field("purges", &self.sweeps.len())
            .finish()
    }
}

/// What happened to this node's caches, in the order it happened: for followers that keep a
/// copy of them (the sidecar's clients' in-process layers) and for tests.
#[derive(Debug, Clone)]
pub enum CacheEvent {
    /// Invalidations applied to this node's caches (this node's own and its peers'), in the
    /// order applied, sent after they took effect here.
    Invalidated(Arc<[Invalidation]>),
    /// One cache (`Some(name)`) or every cache (`None`) was flushed by a repair.
    Flushed {
        /// The cache, or `None` for every cache.
        cache: Option<String>,
        /// When, taken just before the flush: it covers every invalidation accepted before.
        at: std::time::Instant,
    },
    /// The node's caches stopped serving (cut off, repairing, no fresh evidence).
    NotServing,
}

/// Applies one invalidation to one cache; waits (and boxes a future) only when an entry must be
/// removed. A tag or prefix purge adds its count to `pending`.
pub(crate) async fn apply_to(
    cache: &Arc<dyn Applier>,
    target: TargetRef<'_>,
    version: Option<u64>,
    pending: &mut PendingDrops,
) -> ApplyOutcome {
    match cache.apply_now(target, version) {
        Step::Done(outcome) => outcome,
        Step::RemoveKey => match target {
            TargetRef::Key(key) => cache.finish_key(key, version).await,
            _ => ApplyOutcome::default(),
        },
        Step::Hidden(gen) => {
            pending.sweeps.push((cache.clone(), gen));
            ApplyOutcome::default()
        }
    }
}

/// The object-safe face of a `LocalCache<V>` that the receiver applies invalidations to.
pub(crate) trait Applier: Send + Sync {
    fn apply_now(&self, target: TargetRef<'_>, version: Option<u64>) -> Step;
    fn finish_key<'a>(&'a self, key: &'a str, version: Option<u64>) -> BoxFuture<'a, ApplyOutcome>;
    fn flush(&self, cause: &str) -> ApplyOutcome;
    fn swept(&self, gen: u64, patience: Duration) -> BoxFuture<'_, u64>;
    fn stats(&self) -> CacheStats;
    fn entry_count(&self) -> u64;
    fn as_any(self: Arc<Self>) -> Arc<dyn Any + Send + Sync>;
}

impl<V: Clone + Send + Sync + 'static> Applier for LocalCache<V> {
    fn apply_now(&self, target: TargetRef<'_>, version: Option<u64>) -> Step {
        LocalCache::apply_now(self, target, version)
    }
    fn finish_key<'a>(&'a self, key: &'a str, version: Option<u64>) -> BoxFuture<'a, ApplyOutcome> {
        Box::pin(LocalCache::finish_key(self, key, version))
    }
    fn flush(&self, cause: &str) -> ApplyOutcome {
        LocalCache::flush(self, cause)
    }
    fn swept(&self, gen: u64, patience: Duration) -> BoxFuture<'_, u64> {
        Box::pin(LocalCache::swept(self, gen, patience))
    }
    fn stats(&self) -> CacheStats {
        LocalCache::stats(self)
    }
    fn entry_count(&self) -> u64 {
        LocalCache::entry_count(self)
    }
    fn as_any(self: Arc<Self>) -> Arc<dyn Any + Send + Sync> {
        self
    }
}
