//! Configuration values of a bus and of its caches: limits, TTLs, batching and timing.

use std::time::Duration;

/// Size limits applied to everything that enters the bus, local calls and network messages alike.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Largest message accepted from the network, in bytes (NATS's own default is 1 MiB).
    pub max_message_bytes: usize,
    /// Most invalidations in one batch, received or published.
    pub max_batch_invalidations: usize,
    /// Longest key, tag, prefix, cache name, reason or actor, in bytes.
    pub max_key_bytes: usize,
    /// Most tags on one cache entry.
    pub max_tags_per_entry: usize,
    /// Largest batch this node publishes, in bytes; a batch is cut before it grows past this.
    pub max_publish_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_message_bytes: 1024 * 1024,
            max_batch_invalidations: 4096,
            max_key_bytes: 1024,
            max_tags_per_entry: 32,
            max_publish_bytes: 64 * 1024,
        }
    }
}

/// Settings of one named cache.
///
/// ```
/// use std::time::Duration;
/// let config = invalbus::CacheConfig::new(10_000)
///     .time_to_live(Duration::from_secs(60))
///     .time_to_idle(Duration::from_secs(10));
/// assert_eq!(config.max_capacity, 10_000);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheConfig {
    /// Most entries held.
    pub max_capacity: u64,
    /// Every entry expires this long after it was filled (events plus time: a lost event
    /// can never keep data stale for longer than this).
    pub time_to_live: Duration,
    /// Optionally, entries not read for this long expire earlier.
    pub time_to_idle: Option<Duration>,
    /// How long a versioned invalidation keeps refusing fills of lower versions of its key.
    /// Defaults to the time to live.
    pub version_window: Option<Duration>,
    /// Most tag and prefix purge records kept for read-time checks before they are folded
    /// into a flush of the whole cache (which keeps memory bounded).
    pub max_purge_records: usize,
}

impl CacheConfig {
    /// A cache of `max_capacity` entries with a time to live of five minutes.
    pub fn new(max_capacity: u64) -> Self {
        CacheConfig {
            max_capacity,
            time_to_live: Duration::from_secs(300),
            time_to_idle: None,
            version_window: None,
            max_purge_records: 100_000,
        }
    }

    /// Sets the time to live of every entry.
    ///
    /// ```
    /// let c = invalbus::CacheConfig::new(10).time_to_live(std::time::Duration::from_secs(5));
    /// assert_eq!(c.time_to_live.as_secs(), 5);
    /// ```
    pub fn time_to_live(mut self, ttl: Duration) -> Self {
        self.time_to_live = ttl;
        self
    }

    /// Sets a time to idle.
    ///
    /// ```
    /// let c = invalbus::CacheConfig::new(10).time_to_idle(std::time::Duration::from_secs(5));
    /// assert_eq!(c.time_to_idle, Some(std::time::Duration::from_secs(5)));
    /// ```
    pub fn time_to_idle(mut self, tti: Duration) -> Self {
        self.time_to_idle = Some(tti);
        self
    }

    /// Sets how long versioned invalidations refuse older fills.
    ///
    /// ```
    /// let c = invalbus::CacheConfig::new(10).version_window(std::time::Duration::from_secs(30));
    /// assert_eq!(c.version_window, Some(std::time::Duration::from_secs(30)));
    /// ```
    pub fn version_window(mut self, window: Duration) -> Self {
        self.version_window = Some(window);
        self
    }

    /// Sets how many tag and prefix purge records are kept before they fold into a flush.
    ///
    /// ```
    /// let c = invalbus::CacheConfig::new(10).max_purge_records(1000);
    /// assert_eq!(c.max_purge_records, 1000);
    /// ```
    pub fn max_purge_records(mut self, n: usize) -> Self {
        self.max_purge_records = n.max(1);
        self
    }
}

/// How long the streams keep batches and receipts by default: the one source of this default
/// for the library and the node.
pub const DEFAULT_MAX_AGE: Duration = Duration::from_secs(7 * 24 * 3600);

/// Settings of the JetStream stream that keeps every batch for replay (and for the audit log).
///
/// ```
/// use std::time::Duration;
/// let js = invalbus::JetStreamConfig::default().max_age(Duration::from_secs(3600)).replicas(3);
/// assert_eq!(js.replicas, 3);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JetStreamConfig {
    /// How long batches are kept (default 7 days: the audit log's depth). The streams are
    /// created with it; an existing stream keeps its own unless the bus manages the streams.
    pub max_age: Duration,
    /// Most bytes kept (default 1 GiB); the oldest batches go first.
    pub max_bytes: i64,
    /// Copies kept in a NATS cluster (1 or 3 usually; at most the number of servers).
    pub replicas: usize,
    /// How long one publish waits for the stream's acknowledgement before it is sent again
    /// (with the same message id, so the stream stores it once).
    pub ack_timeout: Duration,
    /// How long a batch is retried before its tickets get an error (the invalidation was
    /// applied locally; peers that missed it find the gap and flush).
    pub publish_deadline: Duration,
}

impl Default for JetStreamConfig {
    fn default() -> Self {
        JetStreamConfig {
            max_age: DEFAULT_MAX_AGE,
            max_bytes: 1 << 30,
            replicas: 1,
            ack_timeout: Duration::from_secs(2),
            publish_deadline: Duration::from_secs(30),
        }
    }
}

impl JetStreamConfig {
    /// Sets how long batches are kept.
    ///
    /// ```
    /// let js = invalbus::JetStreamConfig::default().max_age(std::time::Duration::from_secs(60));
    /// assert_eq!(js.max_age.as_secs(), 60);
    /// ```
    pub fn max_age(mut self, max_age: Duration) -> Self {
        self.max_age = max_age;
        self
    }

    /// Sets the number of copies in a NATS cluster.
    ///
    /// ```
    /// assert_eq!(invalbus::JetStreamConfig::default().replicas(3).replicas, 3);
    /// ```
    pub fn replicas(mut self, replicas: usize) -> Self {
        self.replicas = replicas.max(1);
        self
    }

    /// Sets the most bytes kept.
    ///
    /// ```
    /// assert_eq!(invalbus::JetStreamConfig::default().max_bytes(1024).max_bytes, 1024);
    /// ```
    pub fn max_bytes(mut self, max_bytes: i64) -> Self {
        self.max_bytes = max_bytes;
        self
    }

    /// Sets how long a batch is retried before its tickets get an error.
    ///
    /// ```
    /// let js = invalbus::JetStreamConfig::default().publish_deadline(std::time::Duration::from_secs(5));
    /// assert_eq!(js.publish_deadline.as_secs(), 5);
    /// ```
    pub fn publish_deadline(mut self, deadline: Duration) -> Self {
        self.publish_deadline = deadline;
        self
    }
}
