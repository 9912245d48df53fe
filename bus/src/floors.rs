//! Version floors: after a versioned invalidation of a key at `v`, fills of that key below `v`
//! are refused for a window. Bounded in memory, and never lost silently.
//!
//! Floors are kept exactly, per key, up to a capacity. When a shard is full, a floor is moved
//! out of the exact table into a fixed *overflow sketch* that keeps, per hash bucket, the highest
//! version moved there and until when it holds. A fill is refused if its exact floor or its
//! bucket's floor is above its version: a floor that had to leave the table still refuses every
//! fill it would have refused (and some fills of other keys that share its bucket: a refusal only
//! costs a miss, and [`FloorCheck::Overflow`] counts them). The move happens under the shard's
//! lock, so no check can fall between the table and the sketch
//! (`floors_survive_more_keys_than_the_table_holds` below fails without the sketch).

use std::collections::HashMap;
use std::hash::{BuildHasher, Hash, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

const SHARDS: usize = 16;

#[derive(Debug, Clone, Copy)]
struct Floor {
    version: u64,
    until_ms: u64,
}

struct Shard {
    map: HashMap<Box<str>, Floor>,
    /// When expired floors were last swept out of this shard.
    swept_ms: u64,
}

#[derive(Default)]
struct Bucket {
    version: AtomicU64,
    until_ms: AtomicU64,
}

/// The outcome of checking a fill against the floors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FloorCheck {
    /// No floor refuses it.
    Clear,
    /// The key's own floor is above the fill's version.
    Below,
    /// A floor moved to the overflow sketch refuses it (possibly another key's).
    Overflow,
}

pub(crate) struct Floors {
    shards: Box<[Mutex<Shard>]>,
    per_shard: usize,
    window_ms: u64,
    sketch: Box<[Bucket]>,
    hasher: std::collections::hash_map::RandomState,
    base: Instant,
    /// Floors moved to the sketch.
    pub overflowed: AtomicU64,
}

impl Floors {
    /// Room for about `capacity` exact floors, each holding for `window`.
    pub fn new(capacity: u64, window: Duration) -> Self {
        let capacity = capacity.clamp(1024, 1 << 24) as usize;
        let buckets = capacity.next_power_of_two().clamp(1024, 1 << 16);
        Floors {
            shards: (0..SHARDS)
                .map(|_| {
                    Mutex::new(Shard {
                        map: HashMap::new(),
                        swept_ms: 0,
                    })
                })
                .collect(),
            per_shard: capacity.div_ceil(SHARDS),
            window_ms: window.as_millis().max(1) as u64,
            sketch: (0..buckets).map(|_| Bucket::default()).collect(),
            hasher: std::collections::hash_map::RandomState::new(),
            base: Instant::now(),
            overflowed: AtomicU64::new(0),
        }
    }

    fn now_ms(&self) -> u64 {
        self.base.elapsed().as_millis() as u64 + 1
    }

    fn hash(&self, key: &str) -> u64 {
        let mut h = self.hasher.build_hasher();
        key.hash(&mut h);
        h.finish()
    }

    fn shard(&self, hash: u64) -> std::sync::MutexGuard<'_, Shard> {
        self.shards[(hash as usize) % SHARDS]
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    fn bucket(&self, hash: u64) -> &Bucket {
        &self.sketch[((hash >> 32) as usize) & (self.sketch.len() - 1)]
    }

    /// Raises the floor of `key` to `version` for a window from now.
    pub fn raise(&self, key: &str, version: u64) {
        let hash = self.hash(key);
        let now = self.now_ms();
        let until = now + self.window_ms;
        let mut shard = self.shard(hash);
        match shard.map.get_mut(key) {
            Some(f) => {
                f.version = if f.until_ms < now {
                    version
                } else {
                    f.version.max(version)
                };
                f.until_ms = until;
            }
            None => {
                if shard.map.len() >= self.per_shard {
                    self.make_room(&mut shard, now);
                }
                shard.map.insert(
                    key.into(),
                    Floor {
                        version,
                        until_ms: until,
                    },
                );
            }
        }
    }

    /// Frees one slot of a full shard: expired floors go (at most one sweep a second), else one
    /// floor moves to the sketch.
    fn make_room(&self, shard: &mut Shard, now: u64) {
        if now >= shard.swept_ms + 1000 {
            shard.swept_ms = now;
            shard.map.retain(|_, f| f.until_ms >= now);
            if shard.map.len() < self.per_shard {
                return;
            }
        }
        let Some(key) = shard.map.keys().next().cloned() else {
            return;
        };
        if let Some(f) = shard.map.remove(&key) {
            let b = self.bucket(self.hash(&key));
            if b.until_ms.load(Ordering::Acquire) < now {
                // The bucket's last floor has lapsed: start over from this one.
                b.version.store(f.version, Ordering::Release);
            } else {
                b.version.fetch_max(f.version, Ordering::AcqRel);
            }
            b.until_ms.fetch_max(f.until_ms, Ordering::AcqRel);
            self.overflowed.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Whether a fill of `key` at `version` is below a floor.
    pub fn check(&self, key: &str, version: u64) -> FloorCheck {
        let hash = self.hash(key);
        let now = self.now_ms();
        let shard = self.shard(hash);
        if let Some(f) = shard.map.get(key) {
            if f.until_ms >= now && version < f.version {
                return FloorCheck::Below;
            }
        }
        let b = self.bucket(hash);
        if b.until_ms.load(Ordering::Acquire) >= now && version < b.version.load(Ordering::Acquire) {
            return FloorCheck::Overflow;
        }
        FloorCheck::Clear
    }

    /// Exact floors held.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(|e| e.into_inner()).map.len())
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn floors_refuse_lower_versions_for_their_window() {
        let f = Floors::new(10, Duration::from_millis(50));
        f.raise("k", 5);
        assert_eq!(f.check("k", 4), FloorCheck::Below);
        assert_eq!(f.check("k", 5), FloorCheck::Clear);
        f.raise("k", 3);
        assert_eq!(f.check("k", 4), FloorCheck::Below, "a floor never goes down");
        std::thread::sleep(Duration::from_millis(80));
        assert_eq!(f.check("k", 4), FloorCheck::Clear, "the window passed");
    }

    #[test]
    fn floors_survive_more_keys_than_the_table_holds() {
        // The case found through the sidecar: a cache of 10,000 entries, then versioned
        // invalidations of 60,000 other keys; the first key's floor must still refuse.
        let f = Floors::new(10_000, Duration::from_secs(300));
        f.raise("victim", 5);
        for i in 0..60_000 {
            f.raise(&format!("other-{i}"), 1 + i % 7);
        }
        assert!(f.len() <= 10_000 + SHARDS, "the table is bounded: {}", f.len());
        assert!(f.overflowed.load(Ordering::Relaxed) >= 50_000);
        assert_ne!(f.check("victim", 4), FloorCheck::Clear, "a floor was lost");
        // Every one of the 60,001 floors still refuses a fill below it.
        for i in 0..60_000 {
            assert_ne!(f.check(&format!("other-{i}"), i % 7), FloorCheck::Clear);
        }
    }
}
