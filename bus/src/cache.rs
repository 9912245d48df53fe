//! One named local cache: moka entries stamped with a generation, purge records checked on read,
//! and leases that keep a load overtaken by an invalidation from being cached (the stale-fill race).
//!
//! # How an entry stays coherent
//! Every cache has a generation counter. Each invalidation takes the next generation `g`; each
//! load takes a *lease* that remembers the generation `s` when it started. An entry is filled
//! with its lease's stamp `s` and is visible only while no invalidation that covers it has a
//! generation above `s`:
//! - a key invalidation marks the key's open leases and removes the entry from moka;
//! - a versioned key invalidation raises the key's version floor (fills below it are refused for
//!   a window) and removes the entry if its version is lower;
//! - a tag or prefix purge writes a record `(tag or prefix, g)` that reads check, so it takes
//!   effect at once for any number of entries; a background sweep then removes the covered
//!   entries to free space, and counts them for the purge that hid them (each entry for the
//!   oldest record that covers it), which is how a receipt can say how many entries it dropped. Records are kept for one time to live (after which every entry they
//!   could cover has expired) and are folded into a whole-cache flush when there are too many;
//! - a flush of everything raises `all_gen`, which every read checks.
//!
//! A fill is inserted *unsealed* (invisible), checked again against everything above, and only
//! then sealed; a check that fails removes it. So an invalidation that lands at any point of a
//! load, before or after the insert, either refuses the fill or removes it, and no reader ever
//! sees the value in between. moka's own `get_with` does not give this, and its
//! `invalidate_entries_if` leaves matching entries behind; neither is used.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::{Duration, Instant};

use tokio::sync::{watch, Notify};

#[cfg(test)]
use crate::codec::Target;
use crate::config::CacheConfig;
use crate::floors::{FloorCheck, Floors};
use crate::metrics::{CacheMetrics, CacheStats};
use crate::view::TargetRef;

/// A value returned by a loader, with the tags and version it is cached under.
///
/// ```
/// let loaded = invalbus::Loaded::new("hello".to_string()).tag("greetings").version(3);
/// assert_eq!(loaded.tags, vec!["greetings".to_string()]);
/// assert_eq!(loaded.version, Some(3));
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Loaded<V> {
    /// The value.
    pub value: V,
    /// Tags: a purge of any of them drops the entry.
    pub tags: Vec<String>,
    /// The version of the data (for example the row's version column).
    pub version: Option<u64>,
    /// A time to live shorter than the cache's, for this entry only.
    pub ttl: Option<Duration>,
}

impl<V> Loaded<V> {
    /// A value with no tags and no version.
    pub fn new(value: V) -> Self {
        Loaded {
            value,
            tags: Vec::new(),
            version: None,
            ttl: None,
        }
    }

    /// Adds a tag.
    ///
    /// ```
    /// let l = invalbus::Loaded::new(1u8).tag("a").tag("b");
    /// assert_eq!(l.tags.len(), 2);
    /// ```
    pub fn tag(mut self, tag: impl Into<String>) -> Self {
        self.tags.push(tag.into());
        self
    }

    /// Sets the version.
    ///
    /// ```
    /// assert_eq!(invalbus::Loaded::new(1u8).version(9).version, Some(9));
    /// ```
    pub fn version(mut self, version: u64) -> Self {
        self.version = Some(version);
        self
    }

    /// Sets a time to live for this entry (capped by the cache's).
    ///
    /// ```
    /// let l = invalbus::Loaded::new(1u8).ttl(std::time::Duration::from_secs(1));
    /// assert!(l.ttl.is_some());
    /// ```
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = Some(ttl);
        self
    }
}

/// What became of a fill.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FillOutcome {
    /// The value is cached.
    Filled,
    /// The value was not cached because an invalidation overtook its load (or its version is
    /// below the key's floor, or the cache cannot vouch for itself right now).
    Refused,
}

/// How far [`LocalCache::apply_now`] got.
pub(crate) enum Step {
    /// Applied completely.
    Done(ApplyOutcome),
    /// Applied but for removing the key's entry: call `finish_key`.
    RemoveKey,
    /// A tag or prefix purge of generation `gen`: its entries are hidden, and the sweep counts
    /// them as it removes them ([`LocalCache::swept`]).
    Hidden(u64),
}

/// What applying one invalidation did to a cache.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ApplyOutcome {
    /// Entries removed at once (key targets). Tag and prefix purges hide their entries at once
    /// and count them as the background sweep removes them: see [`crate::PendingDrops`].
    pub dropped: u64,
    /// The whole cache was flushed.
    pub flushed: bool,
}

/// One cached value with what coherence needs to know of it. Kept small: on top of the value,
/// 24 bytes (tag set pointer, stamp and flags, version) in one allocation shared by moka's entry
/// and every reader.
pub(crate) struct Slot<V> {
    pub value: V,
    /// The entry's tags, interned: every entry with the same set of tags shares one `TagSet`.
    /// An entry with a time to live of its own has a set of its own that also holds the expiry.
    tags: Option<Arc<TagSet>>,
    /// The generation stamp of the load (low 56 bits) and the flags (top bits).
    stamp_flags: AtomicU64,
    /// Meaningful when `HAS_VERSION` is set.
    version: u64,
}

const SEALED: u64 = 1 << 63;
const HAS_VERSION: u64 = 1 << 62;
const HAS_EXPIRY: u64 = 1 << 61;
const STAMP_MASK: u64 = (1 << 56) - 1;

impl<V> Slot<V> {
    #[inline]
    fn sealed(&self) -> bool {
        self.stamp_flags.load(Ordering::Acquire) & SEALED != 0
    }

    #[inline]
    fn stamp(&self) -> u64 {
        self.stamp_flags.load(Ordering::Relaxed) & STAMP_MASK
    }

    fn version(&self) -> Option<u64> {
        (self.stamp_flags.load(Ordering::Relaxed) & HAS_VERSION != 0).then_some(self.version)
    }

    /// When the entry's own time to live ends, in milliseconds after the cache's `base`.
    #[inline]
    fn expires_ms(&self) -> Option<u64> {
        if self.stamp_flags.load(Ordering::Relaxed) & HAS_EXPIRY == 0 {
            return None;
        }
        self.tags.as_deref().map(|t| t.expires_ms)
    }

    /// The hashes of the entry's tags (see [`TagSet`]).
    #[inline]
    fn tag_hashes(&self) -> &[u64] {
        self.tags.as_deref().map_or(&[], |t| &t.hashes)
    }
}

/// A set of tags, shared by every entry that carries exactly these tags (and no expiry of its
/// own). A tag is kept as its 64-bit hash under the cache's own randomly keyed hasher
/// ([`LocalCache::tag_hash`]), which is also the key of its purge record: a read looks its
/// entry's tags up without hashing or splitting any text, and nothing needs the text back. Two
/// tags of one cache whose hashes collide would be purged together: a purge of one would hide
/// the other's entries too (more misses, never a stale read); with a random key per cache
/// nobody can aim for that.
pub(crate) struct TagSet {
    hashes: Box<[u64]>,
    /// For an entry with a time to live shorter than the cache's: when it ends, in milliseconds
    /// after the cache's `base` instant. Checked on read rather than with moka's per-entry
    /// expiry, which costs a timer-wheel node for every entry. 0 in shared sets.
    expires_ms: u64,
}

/// Most distinct tag sets interned per cache; beyond it, each entry gets its own.
const MAX_INTERNED_TAG_SETS: usize = 1 << 20;

/// A pool entry, looked up by its tags' hashes.
struct Interned(Arc<TagSet>);

impl std::borrow::Borrow<[u64]> for Interned {
    fn borrow(&self) -> &[u64] {
        &self.0.hashes
    }
}

impl PartialEq for Interned {
    fn eq(&self, other: &Self) -> bool {
        self.0.hashes == other.0.hashes
    }
}

impl Eq for Interned {}

impl std::hash::Hash for Interned {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.0.hashes.hash(state)
    }
}

/// A load in progress: the generation it started at, and what invalidations did to it since.
pub(crate) struct Lease {
    stamp: u64,
    invalidated: AtomicBool,
    min_version: AtomicU64,
}

type Shared<V> = Option<Result<V, LoadError>>;

struct Flight<V> {
    lease: Arc<Lease>,
    result: watch::Receiver<Shared<V>>,
}

struct KeyLeases<V> {
    leases: Vec<Arc<Lease>>,
    flight: Option<Flight<V>>,
}

/// The last purge of a tag: the tag's hash, its generation and when it was applied.
struct Record {
    tag: u64,
    gen: u64,
    at: Instant,
}

struct PrefixRecord {
    prefix: String,
    gen: u64,
    at: Instant,
}

/// Why a load failed; shared by every caller that waited on the same load.
/// The counts of entries that tag and prefix purges hid, filled in by the sweeps that remove them.
#[derive(Default)]
struct Tally {
    /// Purges applied since the last sweep began: the next sweep completes their counts.
    waiting: Vec<u64>,
    /// Entries counted so far for each purge whose count is not complete.
    counting: HashMap<u64, u64>,
    /// Complete counts, kept a while ([`DONE_KEPT`], [`MAX_DONE`]) for whoever asks.
    done: BTreeMap<u64, (u64, Instant)>,
}

/// How long a complete count is kept for a receipt that has not asked for it yet (receipts
/// ask within milliseconds), and how many are kept at most.
const DONE_KEPT: Duration = Duration::from_secs(60);
const MAX_DONE: usize = 1 << 16;

#[derive(Debug, Clone, thiserror::Error)]
#[error("loader failed: {0}")]
pub struct LoadError(pub Arc<dyn std::error::Error + Send + Sync>);

/// The local half of a named cache; the bus wraps it in [`crate::Cache`].
pub(crate) struct LocalCache<V> {
    /// Shared with every invalidation a handle of this cache makes.
    name: Arc<str>,
    config: CacheConfig,
    max_tags: usize,
    moka: moka::future::Cache<String, Arc<Slot<V>>>,
    gen: AtomicU64,
    all_gen: AtomicU64,
    horizon: AtomicU64,
    last_tag_gen: AtomicU64,
    last_prefix_gen: AtomicU64,
    /// The last purge of each tag purged within a time to live, found by the tag's hash.
    tags: RwLock<hashbrown::HashTable<Record>>,
    /// Hashes tags, with a key of this cache's own (see [`TagSet`]).
    tag_hasher: RandomState,
    /// Tag sets in use; sets no entry holds any more are dropped by the maintenance task.
    interned: Mutex<std::collections::HashSet<Interned>>,
    /// Reference point of the per-entry expiry times.
    base: Instant,
    open_leases: std::sync::atomic::AtomicUsize,
    prefixes: RwLock<Vec<PrefixRecord>>,
    floors: Floors,
    leases: Mutex<HashMap<String, KeyLeases<V>>>,
    sweep: Notify,
    tally: Mutex<Tally>,
    /// Bumped after each sweep: waiters for a count look again.
    swept_rounds: watch::Sender<u64>,
    pub(crate) metrics: CacheMetrics,
}

/// The most prefix records kept; each read of an old entry scans them.
const MAX_PREFIX_RECORDS: usize = 1024;

impl<V: Clone + Send + Sync + 'static> LocalCache<V> {
    pub fn new(name: &str, config: CacheConfig, max_tags: usize) -> Arc<Self> {
        let mut builder = moka::future::Cache::builder()
            .name(name)
            .max_capacity(config.max_capacity)
            .time_to_live(config.time_to_live);
        if let Some(tti) = config.time_to_idle {
            builder = builder.time_to_idle(tti);
        }
        let window = config.version_window.unwrap_or(config.time_to_live);
        let floors = Floors::new(config.max_capacity, window);
        let cache = Arc::new(LocalCache {
            name: Arc::from(name),
            max_tags,
            moka: builder.build(),
            gen: AtomicU64::new(1),
            all_gen: AtomicU64::new(0),
            horizon: AtomicU64::new(0),
            last_tag_gen: AtomicU64::new(0),
            last_prefix_gen: AtomicU64::new(0),
            tags: RwLock::new(hashbrown::HashTable::new()),
            tag_hasher: RandomState::new(),
            interned: Mutex::new(std::collections::HashSet::new()),
            base: Instant::now(),
            open_leases: std::sync::atomic::AtomicUsize::new(0),
            prefixes: RwLock::new(Vec::new()),
            floors,
            leases: Mutex::new(HashMap::new()),
            sweep: Notify::new(),
            tally: Mutex::new(Tally::default()),
            swept_rounds: watch::Sender::new(0),
            metrics: CacheMetrics::default(),
            config,
        });
        tokio::spawn(maintain(Arc::downgrade(&cache)));
        cache
    }

    pub fn name(&self) -> &Arc<str> {
        &self.name
    }

    /// The value of `key` if a valid entry holds it; counts a hit or a miss.
    #[inline]
    pub async fn get(&self, key: &str) -> Option<V> {
        if let Some(slot) = self.moka.get(key).await {
            if self.visible(&slot, key) {
                self.metrics.hits.inc();
                return Some(slot.value.clone());
            }
        }
        self.metrics.misses.inc();
        None
    }

    #[inline]
    fn visible(&self, slot: &Slot<V>, key: &str) -> bool {
        if !slot.sealed() {
            return false;
        }
        let s = slot.stamp();
        if s < self.all_gen.load(Ordering::Acquire) {
            return false;
        }
        if self.expired(slot) {
            return false;
        }
        if s < self.last_tag_gen.load(Ordering::Acquire)
            && slot.tags.is_some()
            && self.tag_purged_since(slot.tag_hashes(), s)
        {
            return false;
        }
        if s < self.last_prefix_gen.load(Ordering::Acquire) && self.prefix_purged_since(key, s) {
            return false;
        }
        true
    }

    /// Whether the entry's own time to live has ended.
    #[inline]
    fn expired(&self, slot: &Slot<V>) -> bool {
        slot.expires_ms()
            .is_some_and(|at| self.base.elapsed().as_millis() as u64 >= at)
    }

    /// The hash that stands for `tag` in this cache's tag sets and purge records.
    fn tag_hash(&self, tag: &str) -> u64 {
        self.tag_hasher.hash_one(tag)
    }

    fn tag_purged_since(&self, tags: &[u64], stamp: u64) -> bool {
        let records = self.tags.read().unwrap_or_else(|e| e.into_inner());
        tags.iter()
            .any(|&h| records.find(h, |r| r.tag == h).is_some_and(|r| r.gen > stamp))
    }

    fn prefix_purged_since(&self, key: &str, stamp: u64) -> bool {
        let records = self.prefixes.read().unwrap_or_else(|e| e.into_inner());
        records
            .iter()
            .any(|p| p.gen > stamp && key.starts_with(p.prefix.as_str()))
    }

    /// Opens a lease on `key` without joining or starting a shared load.
    pub fn lease(&self, key: &str) -> Arc<Lease> {
        let mut map = self.leases.lock().unwrap_or_else(|e| e.into_inner());
        // Counted before the stamp is read: an invalidation that takes its generation after the
        // read sees the count, takes the lock, and finds the lease in the map to mark it.
        self.open_leases.fetch_add(1, Ordering::SeqCst);
        let lease = Arc::new(Lease {
            stamp: self.gen.load(Ordering::SeqCst),
            invalidated: AtomicBool::new(false),
            min_version: AtomicU64::new(0),
        });
        map.entry(key.to_owned())
            .or_insert_with(|| KeyLeases {
                leases: Vec::new(),
                flight: None,
            })
            .leases
            .push(lease.clone());
        lease
    }

    /// Closes a lease (after its fill, or when its load was abandoned).
    pub fn release(&self, key: &str, lease: &Arc<Lease>) {
        let mut map = self.leases.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(k) = map.get_mut(key) {
            let before = k.leases.len();
            k.leases.retain(|l| !Arc::ptr_eq(l, lease));
            if k.leases.len() < before {
                self.open_leases.fetch_sub(1, Ordering::SeqCst);
            }
            if k.flight.as_ref().is_some_and(|f| Arc::ptr_eq(&f.lease, lease)) {
                k.flight = None;
            }
            if k.leases.is_empty() && k.flight.is_none() {
                map.remove(key);
            }
        }
    }

    /// Reads through the cache: concurrent misses of one key share one load, and a load that an
    /// invalidation overtakes is returned to its callers but not cached.
    pub async fn get_or_load<F, Fut, E>(&self, key: &str, loader: F) -> Result<V, LoadError>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Loaded<V>, E>>,
        E: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        if let Some(v) = self.get(key).await {
            return Ok(v);
        }
        let mut loader = Some(loader);
        loop {
            let role = {
                let mut map = self.leases.lock().unwrap_or_else(|e| e.into_inner());
                let entry = map.entry(key.to_owned()).or_insert_with(|| KeyLeases {
                    leases: Vec::new(),
                    flight: None,
                });
                match &entry.flight {
                    Some(f) => Err(f.result.clone()),
                    None => {
                        self.open_leases.fetch_add(1, Ordering::SeqCst);
                        let lease = Arc::new(Lease {
                            stamp: self.gen.load(Ordering::SeqCst),
                            invalidated: AtomicBool::new(false),
                            min_version: AtomicU64::new(0),
                        });
                        let (tx, rx) = watch::channel(None);
                        entry.leases.push(lease.clone());
                        entry.flight = Some(Flight {
                            lease: lease.clone(),
                            result: rx,
                        });
                        Ok((lease, tx))
                    }
                }
            };
            match role {
                Err(mut rx) => match rx.wait_for(Option::is_some).await {
                    Ok(r) => {
                        if let Some(r) = r.clone() {
                            return r;
                        }
                    }
                    // The leading caller was dropped before it finished: try again.
                    Err(_) => continue,
                },
                Ok((lease, tx)) => {
                    let guard = LeaseGuard {
                        cache: self,
                        key,
                        lease: &lease,
                    };
                    let Some(loader) = loader.take() else {
                        // Unreachable: a caller leads at most once, since leading ends the loop.
                        return Err(LoadError(Arc::from(Box::<dyn std::error::Error + Send + Sync>::from(
                            "loader already used",
                        ))));
                    };
                    self.metrics.loads.inc();
                    let result = match loader().await {
                        Ok(loaded) => {
                            let value = loaded.value.clone();
                            self.fill(key, &lease, loaded).await;
                            Ok(value)
                        }
                        Err(e) => Err(LoadError(Arc::from(e.into()))),
                    };
                    let _ = tx.send(Some(result.clone()));
                    drop(guard);
                    return result;
                }
            }
        }
    }

    fn admissible(&self, key: &str, lease: &Lease, tags: &[u64], version: Option<u64>) -> bool {
        let s = lease.stamp;
        if lease.invalidated.load(Ordering::SeqCst)
            || s < self.all_gen.load(Ordering::SeqCst)
            || s < self.horizon.load(Ordering::SeqCst)
        {
            return false;
        }
        let min = lease.min_version.load(Ordering::SeqCst);
        let below_floor = match version {
            Some(v) => {
                v < min
                    || match self.floors.check(key, v) {
                        FloorCheck::Clear => false,
                        FloorCheck::Below => true,
                        FloorCheck::Overflow => {
                            self.metrics.floor_overflow_refusals.inc();
                            true
                        }
                    }
            }
            // An unversioned value cannot show it is at least the version a write announced.
            None => min > 0,
        };
        if below_floor {
            return false;
        }
        if s < self.last_tag_gen.load(Ordering::SeqCst) && self.tag_purged_since(tags, s) {
            return false;
        }
        if s < self.last_prefix_gen.load(Ordering::SeqCst) && self.prefix_purged_since(key, s) {
            return false;
        }
        true
    }

    /// Inserts a loaded value under `lease` unless an invalidation overtook the load.
    pub async fn fill(&self, key: &str, lease: &Lease, loaded: Loaded<V>) -> FillOutcome {
        let mut tags = loaded.tags;
        // A tag with a NUL byte cannot be purged (purges refuse it): it is not recorded.
        tags.retain(|t| !t.is_empty() && !t.contains('\0'));
        tags.truncate(self.max_tags);
        let tags: Vec<u64> = tags.iter().map(|t| self.tag_hash(t)).collect();
        if !self.admissible(key, lease, &tags, loaded.version) {
            self.metrics.rejected_fills.inc();
            tracing::debug!(cache = %self.name, key, "fill refused: invalidated during load");
            return FillOutcome::Refused;
        }
        let expires_ms = loaded
            .ttl
            .filter(|t| *t < self.config.time_to_live)
            .map_or(0, |t| ((self.base.elapsed() + t).as_millis() as u64).max(1));
        let mut flags = lease.stamp & STAMP_MASK;
        if loaded.version.is_some() {
            flags |= HAS_VERSION;
        }
        let tags = if expires_ms > 0 {
            flags |= HAS_EXPIRY;
            Some(Arc::new(TagSet {
                hashes: tags.into_boxed_slice(),
                expires_ms,
            }))
        } else {
            self.intern(tags)
        };
        let slot = Arc::new(Slot {
            value: loaded.value,
            tags,
            stamp_flags: AtomicU64::new(flags),
            version: loaded.version.unwrap_or(0),
        });
        self.moka.insert(key.to_owned(), slot.clone()).await;
        // Checked again after the insert: an invalidation that ran between the first check and
        // the insert has marked the lease or written a record by now, and one that runs after
        // this check finds the entry in moka and removes it.
        if self.admissible(key, lease, slot.tag_hashes(), slot.version()) {
            slot.stamp_flags.fetch_or(SEALED, Ordering::Release);
            self.metrics.fills.inc();
            FillOutcome::Filled
        } else {
            if self.moka.get(key).await.is_some_and(|cur| Arc::ptr_eq(&cur, &slot)) {
                self.moka.invalidate(key).await;
            }
            self.metrics.rejected_fills.inc();
            tracing::debug!(cache = %self.name, key, "fill refused after insert: invalidated during load");
            FillOutcome::Refused
        }
    }

    fn intern(&self, tags: Vec<u64>) -> Option<Arc<TagSet>> {
        if tags.is_empty() {
            return None;
        }
        let mut pool = self.interned.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(set) = pool.get(tags.as_slice()) {
            return Some(set.0.clone());
        }
        let set = Arc::new(TagSet {
            hashes: tags.into_boxed_slice(),
            expires_ms: 0,
        });
        if pool.len() < MAX_INTERNED_TAG_SETS {
            pool.insert(Interned(set.clone()));
        }
        Some(set)
    }

    /// Forgets tag sets that no entry holds any more.
    fn prune_tag_sets(&self) {
        let mut pool = self.interned.lock().unwrap_or_else(|e| e.into_inner());
        pool.retain(|s| Arc::strong_count(&s.0) > 1);
    }

    fn next_gen(&self) -> u64 {
        self.gen.fetch_add(1, Ordering::SeqCst) + 1
    }

    /// Detaches the shared loads of keys matched by `matches` so that later callers start a
    /// fresh load instead of joining one that an invalidation overtook.
    fn detach_flights(&self, map: &mut HashMap<String, KeyLeases<V>>, matches: impl Fn(&str) -> bool) {
        for (k, entry) in map.iter_mut() {
            if matches(k) {
                entry.flight = None;
            }
        }
    }

    /// Applies one invalidation to this cache (the bus splits this into `apply_now` and
    /// `finish_key` to wait only when it must).
    #[cfg(test)]
    pub async fn apply(&self, target: &Target, version: Option<u64>) -> ApplyOutcome {
        match self.apply_now(target.borrowed(), version) {
            Step::Done(outcome) => outcome,
            Step::RemoveKey => match target {
                Target::Key(key) => self.finish_key(key, version).await,
                _ => ApplyOutcome::default(),
            },
            Step::Hidden(gen) => ApplyOutcome {
                dropped: self.swept(gen, Duration::from_secs(60)).await,
                flushed: false,
            },
        }
    }

    /// Applies what can be applied without waiting: everything but removing an entry that moka
    /// may hold, which [`LocalCache::finish_key`] does. Most invalidations in production name keys
    /// a node does not hold, and finish here.
    pub fn apply_now(&self, target: TargetRef<'_>, version: Option<u64>) -> Step {
        self.metrics.invalidations_applied.inc();
        match target {
            TargetRef::Key(key) => {
                if self.begin_key(key, version) {
                    Step::RemoveKey
                } else {
                    Step::Done(ApplyOutcome::default())
                }
            }
            TargetRef::Tag(tag) => {
                let g = self.next_gen();
                let h = self.tag_hash(tag);
                let overflow = {
                    let mut records = self.tags.write().unwrap_or_else(|e| e.into_inner());
                    let record = Record {
                        tag: h,
                        gen: g,
                        at: Instant::now(),
                    };
                    records.entry(h, |r| r.tag == h, |r| r.tag).insert(record);
                    records.len() > self.config.max_purge_records
                };
                self.last_tag_gen.fetch_max(g, Ordering::SeqCst);
                {
                    let mut map = self.leases.lock().unwrap_or_else(|e| e.into_inner());
                    self.detach_flights(&mut map, |_| true);
                }
                if overflow {
                    return Step::Done(self.flush("purge records overflow"));
                }
                self.count_for(g);
                Step::Hidden(g)
            }
            TargetRef::Prefix(prefix) => {
                let g = self.next_gen();
                let overflow = {
                    let mut records = self.prefixes.write().unwrap_or_else(|e| e.into_inner());
                    records.retain(|p| p.prefix != prefix);
                    records.push(PrefixRecord {
                        prefix: prefix.to_owned(),
                        gen: g,
                        at: Instant::now(),
                    });
                    records.len() > MAX_PREFIX_RECORDS.min(self.config.max_purge_records)
                };
                self.last_prefix_gen.fetch_max(g, Ordering::SeqCst);
                {
                    let mut map = self.leases.lock().unwrap_or_else(|e| e.into_inner());
                    self.detach_flights(&mut map, |k| k.starts_with(prefix));
                }
                if overflow {
                    return Step::Done(self.flush("purge records overflow"));
                }
                self.count_for(g);
                Step::Hidden(g)
            }
            TargetRef::All => Step::Done(self.flush("invalidate all")),
        }
    }

    /// The part of a key invalidation that needs no waiting: takes its generation, marks the
    /// key's open loads, raises its version floor. Returns whether moka may hold the key (then
    /// [`LocalCache::finish_key`] removes the entry).
    ///
    /// Marking comes first: a fill that lands after the `contains_key` below finds its lease
    /// marked (or the floor raised) in its own check after the insert, and removes itself.
    /// Opens the count of purge `gen` and asks for a sweep to fill it in.
    fn count_for(&self, gen: u64) {
        {
            let mut t = self.tally.lock().unwrap_or_else(|e| e.into_inner());
            t.waiting.push(gen);
            t.counting.insert(gen, 0);
        }
        self.sweep.notify_one();
    }

    /// The number of entries purge `gen` hid, once the sweep that removes them has counted them;
    /// after `patience` without that, what was counted so far (and a log line).
    pub async fn swept(&self, gen: u64, patience: Duration) -> u64 {
        let mut rounds = self.swept_rounds.subscribe();
        let wait = async {
            loop {
                {
                    let t = self.tally.lock().unwrap_or_else(|e| e.into_inner());
                    if let Some((n, _)) = t.done.get(&gen) {
                        return *n;
                    }
                    if !t.counting.contains_key(&gen) {
                        // Kept longer than DONE_KEPT without being asked for, or never opened.
                        return 0;
                    }
                }
                if rounds.changed().await.is_err() {
                    return 0;
                }
            }
        };
        match tokio::time::timeout(patience, wait).await {
            Ok(n) => n,
            Err(_) => {
                let t = self.tally.lock().unwrap_or_else(|e| e.into_inner());
                let n = t.counting.get(&gen).copied().unwrap_or(0);
                tracing::warn!(cache = %self.name, gen, counted = n, ?patience, "purge count incomplete: the sweep is late");
                n
            }
        }
    }

    /// The tag or prefix purge that hid `slot` first (its generation), or `None` when a flush or
    /// the entry's own time to live hid it first.
    fn hidden_by(&self, slot: &Slot<V>, key: &str) -> Option<u64> {
        let s = slot.stamp();
        if self.expired(slot) {
            return None;
        }
        let by_tag = if slot.tags.is_some() {
            let records = self.tags.read().unwrap_or_else(|e| e.into_inner());
            slot.tag_hashes()
                .iter()
                .filter_map(|&h| records.find(h, |r| r.tag == h).map(|r| r.gen).filter(|&g| g > s))
                .min()
        } else {
            None
        };
        let by_prefix = {
            let records = self.prefixes.read().unwrap_or_else(|e| e.into_inner());
            records
                .iter()
                .filter(|p| p.gen > s && key.starts_with(p.prefix.as_str()))
                .map(|p| p.gen)
                .min()
        };
        let first = by_tag.into_iter().chain(by_prefix).min()?;
        let all = self.all_gen.load(Ordering::Acquire);
        (s >= all || all > first).then_some(first)
    }

    fn begin_key(&self, key: &str, version: Option<u64>) -> bool {
        let g = self.next_gen();
        // Most invalidations hit keys nobody is loading: skip the lock then.
        if self.open_leases.load(Ordering::SeqCst) > 0 {
            let mut map = self.leases.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(entry) = map.get_mut(key) {
                for lease in &entry.leases {
                    if lease.stamp < g {
                        match version {
                            None => lease.invalidated.store(true, Ordering::SeqCst),
                            Some(v) => {
                                lease.min_version.fetch_max(v, Ordering::SeqCst);
                            }
                        }
                    }
                }
                entry.flight = None;
            }
        }
        if let Some(v) = version {
            self.floors.raise(key, v);
        }
        self.moka.contains_key(key)
    }

    /// Removes the entry of `key` after [`LocalCache::begin_key`] (for a versioned invalidation,
    /// only if the entry's version is lower).
    pub async fn finish_key(&self, key: &str, version: Option<u64>) -> ApplyOutcome {
        let dropped = match version {
            None => self.moka.remove(key).await.is_some(),
            Some(v) => match self.moka.get(key).await {
                Some(slot) if slot.version().is_none_or(|have| have < v) => self.moka.remove(key).await.is_some(),
                _ => false,
            },
        };
        ApplyOutcome {
            dropped: u64::from(dropped),
            flushed: false,
        }
    }

    /// Drops every entry: reads see nothing filled before this call, and loads in flight are
    /// not cached.
    pub fn flush(&self, cause: &str) -> ApplyOutcome {
        let g = self.next_gen();
        self.all_gen.fetch_max(g, Ordering::SeqCst);
        {
            let mut map = self.leases.lock().unwrap_or_else(|e| e.into_inner());
            self.detach_flights(&mut map, |_| true);
        }
        // Every record is now covered by `all_gen`.
        self.tags.write().unwrap_or_else(|e| e.into_inner()).clear();
        self.prefixes.write().unwrap_or_else(|e| e.into_inner()).clear();
        self.moka.invalidate_all();
        // The purges not yet swept keep what was counted of them: the flush dropped the rest.
        self.close_counts(|_| true);
        self.metrics.flushes.inc();
        tracing::info!(cache = %self.name, cause, "cache flushed");
        ApplyOutcome {
            dropped: 0,
            flushed: true,
        }
    }

    pub fn entry_count(&self) -> u64 {
        self.moka.entry_count()
    }

    pub fn stats(&self) -> CacheStats {
        let m = &self.metrics;
        CacheStats {
            name: self.name.to_string(),
            entries: self.moka.entry_count(),
            hits: m.hits.get(),
            misses: m.misses.get(),
            loads: m.loads.get(),
            fills: m.fills.get(),
            rejected_fills: m.rejected_fills.get(),
            bypassed_reads: m.bypassed_reads.get(),
            invalidations_applied: m.invalidations_applied.get(),
            flushes: m.flushes.get(),
            floor_overflow_refusals: m.floor_overflow_refusals.get(),
            floors_overflowed: self.floors.overflowed.load(Ordering::Relaxed),
            tag_records: self.tags.read().unwrap_or_else(|e| e.into_inner()).len() as u64,
            prefix_records: self.prefixes.read().unwrap_or_else(|e| e.into_inner()).len() as u64,
            tag_sets: self.interned.lock().unwrap_or_else(|e| e.into_inner()).len() as u64,
        }
    }

    /// Runs moka's pending maintenance (tests and benchmarks use it to settle counts).
    pub async fn run_pending_tasks(&self) {
        self.moka.run_pending_tasks().await;
    }

    /// Forgets purge records that no live entry can be covered by any more, and raises the
    /// horizon below which fills are refused.
    fn prune_records(&self, now: Instant) {
        let keep = self.config.time_to_live + Duration::from_secs(1);
        let mut max_pruned = 0;
        {
            let mut records = self.tags.write().unwrap_or_else(|e| e.into_inner());
            records.retain(|r| {
                let live = now.duration_since(r.at) < keep;
                if !live {
                    max_pruned = max_pruned.max(r.gen);
                }
                live
            });
        }
        {
            let mut records = self.prefixes.write().unwrap_or_else(|e| e.into_inner());
            records.retain(|r| {
                let live = now.duration_since(r.at) < keep;
                if !live {
                    max_pruned = max_pruned.max(r.gen);
                }
                live
            });
        }
        if max_pruned > 0 {
            self.horizon.fetch_max(max_pruned, Ordering::SeqCst);
        }
    }

    /// Removes entries hidden by purge records, so that they stop taking space.
    /// Moves the counts of the purges `complete` picks from open to done, and wakes their waiters.
    fn close_counts(&self, complete: impl Fn(u64) -> bool) {
        let now = Instant::now();
        {
            let mut guard = self.tally.lock().unwrap_or_else(|e| e.into_inner());
            let t = &mut *guard;
            let closing: Vec<u64> = t.counting.keys().copied().filter(|&g| complete(g)).collect();
            for g in closing {
                let n = t.counting.remove(&g).unwrap_or(0);
                t.done.insert(g, (n, now));
            }
            let counting = &t.counting;
            t.waiting.retain(|g| counting.contains_key(g));
            t.done.retain(|_, (_, at)| now.duration_since(*at) < DONE_KEPT);
            while t.done.len() > MAX_DONE {
                t.done.pop_first();
            }
        }
        self.swept_rounds.send_modify(|r| *r += 1);
    }

    /// Removes the entries that purges hid, counts each for the purge that hid it first, and
    /// completes the counts of the purges applied before it began. Returns how many it removed.
    async fn sweep(self: &Arc<Self>) -> u64 {
        let round: Vec<u64> = std::mem::take(&mut self.tally.lock().unwrap_or_else(|e| e.into_inner()).waiting);
        let this = self.clone();
        let keys = tokio::task::spawn_blocking(move || {
            this.moka
                .iter()
                .filter(|(k, slot)| slot.sealed() && !this.visible(slot, k))
                .map(|(k, _)| k)
                .collect::<Vec<_>>()
        })
        .await
        .unwrap_or_default();
        let mut counted: HashMap<u64, u64> = HashMap::new();
        let mut removed = 0;
        for (i, key) in keys.iter().enumerate() {
            // Removed only if it is still the hidden entry: a fill may have replaced it since.
            let mut by = None;
            let result = self
                .moka
                .entry_by_ref(key.as_str())
                .and_compute_with(|cur| {
                    let op = match cur {
                        Some(e) if e.value().sealed() && !self.visible(e.value(), key) => {
                            by = Some(self.hidden_by(e.value(), key));
                            moka::ops::compute::Op::Remove
                        }
                        _ => moka::ops::compute::Op::Nop,
                    };
                    std::future::ready(op)
                })
                .await;
            if matches!(result, moka::ops::compute::CompResult::Removed(_)) {
                removed += 1;
                if let Some(Some(g)) = by {
                    *counted.entry(g).or_default() += 1;
                }
            }
            if i % 1024 == 1023 {
                tokio::task::yield_now().await;
            }
        }
        {
            let mut t = self.tally.lock().unwrap_or_else(|e| e.into_inner());
            for (g, n) in counted {
                // A purge whose count a flush already closed keeps what it had.
                if let Some(c) = t.counting.get_mut(&g) {
                    *c += n;
                }
            }
        }
        self.close_counts(|g| round.contains(&g));
        removed
    }
}

struct LeaseGuard<'a, V: Clone + Send + Sync + 'static> {
    cache: &'a LocalCache<V>,
    key: &'a str,
    lease: &'a Arc<Lease>,
}

impl<V: Clone + Send + Sync + 'static> Drop for LeaseGuard<'_, V> {
    fn drop(&mut self) {
        self.cache.release(self.key, self.lease);
    }
}

/// Background upkeep of one cache: sweeps after purges, prunes records, while the cache lives.
async fn maintain<V: Clone + Send + Sync + 'static>(cache: Weak<LocalCache<V>>) {
    let period = {
        let Some(c) = cache.upgrade() else { return };
        (c.config.time_to_live / 4).clamp(Duration::from_millis(100), Duration::from_secs(5))
    };
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let notified = {
            let Some(c) = cache.upgrade() else { return };
            // Hold only a weak reference while waiting, so a dropped cache ends this task.
            let c2 = c.clone();
            drop(c);
            tokio::select! {
                _ = c2.sweep.notified() => true,
                _ = tick.tick() => false,
            }
        };
        let Some(c) = cache.upgrade() else { return };
        let mut rest = Duration::ZERO;
        if notified {
            let started = Instant::now();
            let removed = c.sweep().await;
            tracing::debug!(cache = %c.name, removed, "sweep after purge");
            rest = (started.elapsed() * SWEEP_REST_FACTOR).min(MAX_SWEEP_REST);
        }
        c.prune_records(Instant::now());
        c.prune_tag_sets();
        drop(c);
        if !rest.is_zero() {
            // Purges took effect through their records already; a sweep only reclaims memory
            // and completes counts. Steady purges would otherwise keep a scan of the whole cache
            // running: resting this many times the last scan caps sweeping at a tenth of a core
            // per cache. Purges that arrive meanwhile are swept together afterwards.
            tokio::time::sleep(rest).await;
        }
    }
}

/// After a sweep, the maintenance task rests this many times as long as the sweep took.
const SWEEP_REST_FACTOR: u32 = 9;
/// The longest rest after a sweep (so that counts for receipts are never held back long).
const MAX_SWEEP_REST: Duration = Duration::from_secs(2);

#[cfg(test)]
mod tests {
    use super::*;

    type Err = std::io::Error;

    fn cache() -> Arc<LocalCache<u64>> {
        LocalCache::new("t", CacheConfig::new(10_000), 32)
    }

    #[tokio::test]
    async fn stale_fill_is_refused_when_key_invalidated_during_load() {
        let c = cache();
        let lease = c.lease("k");
        c.apply(&Target::Key("k".into()), None).await;
        assert_eq!(c.fill("k", &lease, Loaded::new(1)).await, FillOutcome::Refused);
        c.release("k", &lease);
        assert_eq!(c.get("k").await, None);
        let lease = c.lease("k");
        assert_eq!(c.fill("k", &lease, Loaded::new(2)).await, FillOutcome::Filled);
        assert_eq!(c.get("k").await, Some(2));
    }

    #[tokio::test]
    async fn tag_prefix_and_flush_hide_entries_at_once_and_refuse_older_loads() {
        let c = cache();
        for (k, tag) in [("a:1", "x"), ("a:2", "y"), ("b:1", "x")] {
            let l = c.lease(k);
            c.fill(k, &l, Loaded::new(1).tag(tag)).await;
            c.release(k, &l);
        }
        let old = c.lease("c:1");
        c.apply(&Target::Tag("x".into()), None).await;
        assert_eq!(c.get("a:1").await, None);
        assert_eq!(c.get("b:1").await, None);
        assert_eq!(c.get("a:2").await, Some(1));
        assert_eq!(c.fill("c:1", &old, Loaded::new(5).tag("x")).await, FillOutcome::Refused);
        assert_eq!(c.fill("c:1", &old, Loaded::new(5).tag("z")).await, FillOutcome::Filled);
        c.apply(&Target::Prefix("a:".into()), None).await;
        assert_eq!(c.get("a:2").await, None);
        assert_eq!(c.get("c:1").await, Some(5));
        c.apply(&Target::All, None).await;
        assert_eq!(c.get("c:1").await, None);
    }

    #[tokio::test]
    async fn tags_are_kept_as_hashes_one_set_per_combination_and_purged_through_them() {
        let c = cache();
        put(&c, "k1", &["a", "b"]).await;
        put(&c, "k2", &["a", "b"]).await;
        put(&c, "k3", &["ab"]).await;
        // An entry with a time to live of its own holds a set of its own, outside the pool.
        let l = c.lease("k4");
        let loaded = Loaded::new(1).tag("b").ttl(Duration::from_secs(60));
        assert_eq!(c.fill("k4", &l, loaded).await, FillOutcome::Filled);
        c.release("k4", &l);
        assert_eq!(c.stats().tag_sets, 2);
        c.apply(&Target::Tag("b".into()), None).await;
        for k in ["k1", "k2", "k4"] {
            assert_eq!(c.get(k).await, None, "{k}");
        }
        assert_eq!(c.get("k3").await, Some(1));
        // A fill after the purge is visible; the next purge of the tag replaces its record.
        put(&c, "k1", &["a", "b"]).await;
        assert_eq!(c.get("k1").await, Some(1));
        c.apply(&Target::Tag("b".into()), None).await;
        assert_eq!(c.get("k1").await, None);
        assert_eq!(c.get("k3").await, Some(1));
        assert_eq!(c.stats().tag_records, 1);
    }

    async fn put(c: &LocalCache<u64>, key: &str, tags: &[&str]) {
        let l = c.lease(key);
        let mut loaded = Loaded::new(1);
        for t in tags {
            loaded = loaded.tag(*t);
        }
        assert_eq!(c.fill(key, &l, loaded).await, FillOutcome::Filled, "fill {key}");
        c.release(key, &l);
    }

    const PATIENCE: Duration = Duration::from_secs(30);

    fn hidden(step: Step) -> u64 {
        match step {
            Step::Hidden(gen) => gen,
            _ => panic!("a tag or prefix purge is counted by the sweep"),
        }
    }

    #[tokio::test]
    async fn the_sweep_counts_each_hidden_entry_once_for_the_first_purge_that_hid_it() {
        let c = cache();
        put(&c, "a:1", &["x"]).await;
        put(&c, "a:2", &["x", "y"]).await;
        put(&c, "a:3", &[]).await;
        put(&c, "b:1", &["x"]).await;
        put(&c, "b:2", &["y"]).await;
        put(&c, "b:3", &[]).await;
        // Two purges before the sweep task runs (this runtime has one thread and neither call
        // yields): a:1, a:2 and b:1 are hidden by both or by x alone, and count for x.
        let x = hidden(c.apply_now(TargetRef::Tag("x"), None));
        let a = hidden(c.apply_now(TargetRef::Prefix("a:"), None));
        // An entry filled after the purges is neither removed nor counted.
        put(&c, "a:4", &["x"]).await;
        assert_eq!(c.swept(x, PATIENCE).await, 3);
        assert_eq!(c.swept(a, PATIENCE).await, 1);
        // Asking again gives the same answer.
        assert_eq!(c.swept(x, PATIENCE).await, 3);
        for k in ["a:1", "a:2", "a:3", "b:1"] {
            assert_eq!(c.get(k).await, None, "{k}");
        }
        for k in ["a:4", "b:2", "b:3"] {
            assert_eq!(c.get(k).await, Some(1), "{k}");
        }
        // The entries were removed, not only hidden.
        c.run_pending_tasks().await;
        assert_eq!(c.entry_count(), 3);
        // Nothing left to hide: a purge of y now counts b:2 alone.
        let y = hidden(c.apply_now(TargetRef::Tag("y"), None));
        assert_eq!(c.swept(y, PATIENCE).await, 1);
    }

    #[tokio::test]
    async fn the_sweep_counts_every_entry_of_a_large_purge() {
        let c = LocalCache::new("t", CacheConfig::new(100_000), 32);
        for i in 0..20_000u64 {
            let tag = if i % 2 == 0 { "even" } else { "odd" };
            put(&c, &format!("k{i}"), &[tag]).await;
        }
        let even = hidden(c.apply_now(TargetRef::Tag("even"), None));
        assert_eq!(c.swept(even, PATIENCE).await, 10_000);
        let k = hidden(c.apply_now(TargetRef::Prefix("k1"), None));
        // k1, k10..k19, k100..k199, k1000..k1999, k10000..k19999, the odd ones of them.
        assert_eq!(c.swept(k, PATIENCE).await, 5_556);
        c.run_pending_tasks().await;
        assert_eq!(c.entry_count(), 20_000 - 10_000 - 5_556);
    }

    #[tokio::test]
    async fn a_flush_before_the_sweep_closes_the_count() {
        let c = cache();
        put(&c, "a", &["x"]).await;
        let x = hidden(c.apply_now(TargetRef::Tag("x"), None));
        // The flush dropped the entry before the sweep could count it for x.
        assert!(c.flush("test").flushed);
        assert_eq!(c.swept(x, PATIENCE).await, 0);
        assert_eq!(c.get("a").await, None);
    }

    #[tokio::test]
    async fn versions_never_go_back() {
        let c = cache();
        let l = c.lease("k");
        c.fill("k", &l, Loaded::new(7).version(7)).await;
        c.release("k", &l);
        // An older, late or duplicated invalidation keeps the newer entry.
        c.apply(&Target::Key("k".into()), Some(5)).await;
        assert_eq!(c.get("k").await, Some(7));
        c.apply(&Target::Key("k".into()), Some(9)).await;
        assert_eq!(c.get("k").await, None);
        // A fill of version 8 (read before the write of 9) is refused; 9 is taken.
        let l = c.lease("k");
        assert_eq!(c.fill("k", &l, Loaded::new(8).version(8)).await, FillOutcome::Refused);
        assert_eq!(c.fill("k", &l, Loaded::new(9).version(9)).await, FillOutcome::Filled);
        c.release("k", &l);
        assert_eq!(c.get("k").await, Some(9));
    }

    #[tokio::test]
    async fn get_or_load_runs_one_load_for_concurrent_misses() {
        let c = cache();
        let runs = Arc::new(AtomicU64::new(0));
        let gate = Arc::new(tokio::sync::Notify::new());
        let mut tasks = Vec::new();
        for _ in 0..8 {
            let (c, runs, gate) = (c.clone(), runs.clone(), gate.clone());
            tasks.push(tokio::spawn(async move {
                c.get_or_load("k", || async move {
                    runs.fetch_add(1, Ordering::SeqCst);
                    gate.notified().await;
                    Ok::<_, Err>(Loaded::new(3))
                })
                .await
                .unwrap()
            }));
        }
        while runs.load(Ordering::SeqCst) == 0 {
            tokio::task::yield_now().await;
        }
        for _ in 0..50 {
            tokio::task::yield_now().await;
        }
        gate.notify_one();
        for t in tasks {
            assert_eq!(t.await.unwrap(), 3);
        }
        assert_eq!(runs.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_caller_after_an_invalidation_does_not_join_the_overtaken_load() {
        let c = cache();
        let (started_tx, started_rx) = tokio::sync::oneshot::channel();
        let gate = Arc::new(tokio::sync::Notify::new());
        let g = gate.clone();
        let c1 = c.clone();
        let first = tokio::spawn(async move {
            c1.get_or_load("k", || async move {
                let _ = started_tx.send(());
                g.notified().await;
                Ok::<_, Err>(Loaded::new(1))
            })
            .await
            .unwrap()
        });
        started_rx.await.unwrap();
        c.apply(&Target::Key("k".into()), None).await;
        let second = c
            .get_or_load("k", || async { Ok::<_, Err>(Loaded::new(2)) })
            .await
            .unwrap();
        assert_eq!(second, 2);
        gate.notify_one();
        assert_eq!(first.await.unwrap(), 1);
        assert_eq!(c.get("k").await, Some(2));
        assert_eq!(c.stats().rejected_fills, 1);
    }

    #[tokio::test]
    async fn loader_errors_reach_every_waiter_and_nothing_is_cached() {
        let c = cache();
        let r = c
            .get_or_load("k", || async { Err::<Loaded<u64>, _>(Err::other("db down")) })
            .await;
        assert!(r.unwrap_err().to_string().contains("db down"));
        assert_eq!(c.get("k").await, None);
    }

    #[tokio::test]
    async fn purge_records_fold_into_a_flush_when_too_many() {
        let c = LocalCache::<u64>::new("t", CacheConfig::new(100).max_purge_records(2), 32);
        let l = c.lease("k");
        c.fill("k", &l, Loaded::new(1).tag("keep")).await;
        for t in ["a", "b", "c"] {
            c.apply(&Target::Tag(t.into()), None).await;
        }
        assert_eq!(c.get("k").await, None);
        assert_eq!(c.stats().flushes, 1);
        assert!(c.tags.read().unwrap().is_empty());
    }

    #[tokio::test]
    async fn sweep_removes_purged_entries() {
        let c = cache();
        for i in 0..1000 {
            let k = format!("k{i}");
            let l = c.lease(&k);
            c.fill(&k, &l, Loaded::new(i).tag(if i % 2 == 0 { "even" } else { "odd" }))
                .await;
            c.release(&k, &l);
        }
        c.apply(&Target::Tag("even".into()), None).await;
        // The background task may sweep first; either way the hidden entries go.
        c.sweep().await;
        c.run_pending_tasks().await;
        assert_eq!(c.entry_count(), 500);
        assert_eq!(c.get("k1").await, Some(1));
        assert_eq!(c.get("k2").await, None);
    }
}
