//! Repair after loss: the health gate that decides whether caches may serve, per-origin sequence
//! tracking, and replay of missed batches from the JetStream stream.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use async_nats::jetstream;
use futures::StreamExt;

use crate::codec::{self, Batch};
use crate::config::Limits;

/// Whether this node's caches may serve reads.
///
/// Reads check one atomic flag. A watchdog task recomputes it from the facts below every few
/// milliseconds: the node serves only while it is not repairing and its own heartbeat came back
/// through NATS within `heartbeat_interval + max_staleness` (a node cut off from NATS, even
/// silently, stops serving within that bound).
pub(crate) struct Health {
    pub serving: AtomicBool,
    pub repairing: AtomicBool,
    /// When our own heartbeat last came back (µs since the Unix epoch).
    pub last_vouched_us: AtomicU64,
    /// When our own heartbeat last arrived (µs since the Unix epoch), to see lapses.
    pub last_arrival_us: AtomicU64,
    /// Since when the node has not been serving (0 while serving).
    pub suspect_since_us: AtomicU64,
    /// Total microseconds spent not serving.
    pub suspect_total_us: AtomicU64,
    /// Bypass is switched off (for tests that show what it prevents).
    pub gate_disabled: AtomicBool,
    /// The vouching window in microseconds, as last given to [`Health::update`] (0: not yet).
    pub window_us: AtomicU64,
}

impl Health {
    pub fn new(now_us: u64) -> Self {
        Health {
            serving: AtomicBool::new(true),
            repairing: AtomicBool::new(false),
            last_vouched_us: AtomicU64::new(now_us),
            last_arrival_us: AtomicU64::new(now_us),
            suspect_since_us: AtomicU64::new(0),
            suspect_total_us: AtomicU64::new(0),
            gate_disabled: AtomicBool::new(false),
            window_us: AtomicU64::new(0),
        }
    }

    /// Whether caches may serve now.
    ///
    /// The flag alone is not enough: the watchdog that lowers it is a task like any other, and
    /// a node whose threads were paused (a stopped process, a long GC pause, a starved runtime)
    /// resumes with the flag still up and its readers running before the watchdog does. So
    /// each read also checks the clock against the last vouching: a few tens of nanoseconds
    /// that keep the bound without relying on the watchdog's timeliness.
    #[inline]
    pub fn serving(&self) -> bool {
        if !self.serving.load(Ordering::Acquire) {
            return false;
        }
        let window = self.window_us.load(Ordering::Relaxed);
        if window == 0 || self.gate_disabled.load(Ordering::Relaxed) {
            return true;
        }
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_micros() as u64)
            .unwrap_or(0);
        now.saturating_sub(self.last_vouched_us.load(Ordering::Acquire)) <= window
    }

    /// Recomputes `serving`; returns `Some(new)` when it changed.
    pub fn update(&self, now_us: u64, window: Duration) -> Option<bool> {
        self.window_us.store(window.as_micros() as u64, Ordering::Relaxed);
        let vouched = now_us.saturating_sub(self.last_vouched_us.load(Ordering::Acquire)) <= window.as_micros() as u64;
        let ok = self.gate_disabled.load(Ordering::Relaxed) || (vouched && !self.repairing.load(Ordering::Acquire));
        let was = self.serving.swap(ok, Ordering::AcqRel);
        if was == ok {
            return None;
        }
        if ok {
            let since = self.suspect_since_us.swap(0, Ordering::AcqRel);
            if since > 0 {
                self.suspect_total_us
                    .fetch_add(now_us.saturating_sub(since), Ordering::Relaxed);
            }
        } else {
            self.suspect_since_us.store(now_us, Ordering::Release);
        }
        Some(ok)
    }
}

/// What the receiver knows of one origin's sequence.
#[derive(Debug, Clone, Default)]
pub(crate) struct OriginState {
    pub epoch: u64,
    pub applied_seq: u64,
    /// Publish time of the last batch applied (origin's clock).
    pub applied_us: u64,
    /// Last sequence the origin announced in a heartbeat.
    pub announced_seq: u64,
    /// Epochs of the origin that ended (their late batches are ignored).
    pub retired: Vec<u64>,
    pub address: String,
    pub caches: Vec<(String, u64)>,
    pub last_seen_us: u64,
    pub writes_receipts: bool,
}

/// What to do with a batch, given what was applied before.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Admit {
    /// Next in sequence (or the first of a new epoch): apply it.
    Apply,
    /// Seen before, or of an ended epoch: skip it.
    Duplicate,
    /// Batches `from..=to` of the origin's current epoch were missed.
    Gap { from: u64, to: u64 },
    /// First contact with this origin (or epoch) at a sequence above 1: earlier batches may have
    /// been published before this node listened, or lost since.
    FirstContact,
}

/// Per-origin sequence tracking.
#[derive(Default)]
pub(crate) struct Origins {
    pub map: HashMap<String, OriginState>,
}

impl Origins {
    pub fn admit(&self, origin: &str, epoch: u64, seq: u64) -> Admit {
        match self.map.get(origin) {
            None => {
                if seq == 1 {
                    Admit::Apply
                } else {
                    Admit::FirstContact
                }
            }
            Some(o) if o.epoch == epoch => {
                if seq <= o.applied_seq {
                    Admit::Duplicate
                } else if seq == o.applied_seq + 1 {
                    Admit::Apply
                } else {
                    Admit::Gap {
                        from: o.applied_seq + 1,
                        to: seq - 1,
                    }
                }
            }
            Some(o) if o.retired.contains(&epoch) => Admit::Duplicate,
            Some(_) => {
                if seq == 1 {
                    Admit::Apply
                } else {
                    Admit::Gap { from: 1, to: seq - 1 }
                }
            }
        }
    }

    /// Records that `seq` of `epoch` was applied (switching to a new epoch when needed).
    pub fn applied(&mut self, origin: &str, epoch: u64, seq: u64, published_us: u64, now_us: u64) {
        let o = self.map.entry(origin.to_owned()).or_default();
        if o.epoch != epoch {
            if o.epoch != 0 {
                o.retired.push(o.epoch);
                if o.retired.len() > 8 {
                    o.retired.remove(0);
                }
            }
            o.epoch = epoch;
            o.applied_seq = 0;
            o.announced_seq = 0;
        }
        o.applied_seq = o.applied_seq.max(seq);
        o.applied_us = o.applied_us.max(published_us);
        o.last_seen_us = now_us;
    }
}

/// Why a replay could not cover what was missed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum ReplayError {
    #[error("no JetStream stream is configured")]
    NoStream,
    #[error("stream unreachable: {0}")]
    Unreachable(String),
    #[error("the stream no longer holds batches from the start of the replay (its first is #{first_sequence})")]
    Clipped { first_sequence: u64 },
    #[error("replay timed out after {0:?}")]
    TimedOut(Duration),
}

/// The stream that keeps every batch of a namespace.
pub(crate) fn stream_name(namespace: &str) -> String {
    format!("INVALBUS_{namespace}")
}

/// Creates a stream of the namespace (its batches, or its receipts), or updates its limits if it
/// exists.
pub(crate) async fn ensure_stream(
    js: &jetstream::Context,
    name: String,
    subjects: String,
    config: &crate::config::JetStreamConfig,
) -> Result<jetstream::stream::Stream, String> {
    let cfg = jetstream::stream::Config {
        name,
        subjects: vec![subjects],
        max_age: config.max_age,
        max_bytes: config.max_bytes,
        num_replicas: config.replicas,
        // The server refuses a duplicate window longer than the stream's max age.
        duplicate_window: Duration::from_secs(120).min(config.max_age),
        storage: jetstream::stream::StorageType::File,
        discard: jetstream::stream::DiscardPolicy::Old,
        ..Default::default()
    };
    match js.get_stream(&cfg.name).await {
        Ok(mut s) => {
            let info = s.info().await.map_err(|e| e.to_string())?;
            let c = &info.config;
            if c.max_age != cfg.max_age || c.max_bytes != cfg.max_bytes || c.num_replicas != cfg.num_replicas {
                js.update_stream(cfg).await.map_err(|e| e.to_string())?;
            }
            Ok(s)
        }
        Err(_) => js.get_or_create_stream(cfg).await.map_err(|e| e.to_string()),
    }
}

/// Reads the stream's batches on `filter` stored since `since_us` (server time), in order, and
/// hands each decoded batch to `apply`, until the stream has no more or `apply` says stop.
/// Returns the number of batches read.
pub(crate) async fn replay(
    stream: &jetstream::stream::Stream,
    filter: String,
    since_us: u64,
    timeout: Duration,
    namespace: &str,
    limits: &Limits,
    mut apply: impl FnMut(Batch) -> bool,
) -> Result<u64, ReplayError> {
    let start_time = async_nats::datetime::from_nanos(i128::from(since_us) * 1000)
        .map_err(|e| ReplayError::Unreachable(format!("bad start time: {e}")))?;
    let work = async {
        // JetStream starts a consumer at the first message it still holds, silently, when the
        // requested start is older: check the stream's retention against our start first.
        let info = stream
            .clone()
            .info()
            .await
            .map_err(|e| ReplayError::Unreachable(e.to_string()))?
            .clone();
        let st = &info.state;
        let since_ns = i128::from(since_us) * 1000;
        let removed_after_since = if st.messages == 0 {
            st.last_timestamp.unix_timestamp_nanos() > since_ns
        } else {
            st.first_timestamp.unix_timestamp_nanos() > since_ns
        };
        if st.first_sequence > 1 && removed_after_since {
            return Err(ReplayError::Clipped {
                first_sequence: st.first_sequence,
            });
        }
        let consumer = stream
            .create_consumer(jetstream::consumer::pull::OrderedConfig {
                filter_subject: filter,
                deliver_policy: jetstream::consumer::DeliverPolicy::ByStartTime { start_time },
                ..Default::default()
            })
            .await
            .map_err(|e| ReplayError::Unreachable(e.to_string()))?;
        let mut consumer = consumer;
        let pending = consumer
            .info()
            .await
            .map_err(|e| ReplayError::Unreachable(e.to_string()))?
            .num_pending;
        if pending == 0 {
            return Ok(0);
        }
        let mut messages = consumer
            .messages()
            .await
            .map_err(|e| ReplayError::Unreachable(e.to_string()))?;
        let mut read = 0;
        while let Some(msg) = messages.next().await {
            let msg = msg.map_err(|e| ReplayError::Unreachable(e.to_string()))?;
            read += 1;
            let left = msg.info().map(|i| i.pending).unwrap_or(0);
            match codec::decode_batch(&msg.payload, namespace, limits) {
                Ok(batch) => {
                    if !apply(batch) {
                        break;
                    }
                }
                Err(e) => tracing::warn!(kind = e.kind(), error = %e, "undecodable batch in the stream skipped"),
            }
            if left == 0 {
                break;
            }
        }
        Ok(read)
    };
    tokio::time::timeout(timeout, work)
        .await
        .unwrap_or(Err(ReplayError::TimedOut(timeout)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admit_tracks_sequences_epochs_and_gaps() {
        let mut o = Origins::default();
        assert_eq!(o.admit("a", 1, 1), Admit::Apply);
        assert_eq!(o.admit("a", 1, 5), Admit::FirstContact);
        o.applied("a", 1, 1, 0, 0);
        assert_eq!(o.admit("a", 1, 1), Admit::Duplicate);
        assert_eq!(o.admit("a", 1, 2), Admit::Apply);
        assert_eq!(o.admit("a", 1, 5), Admit::Gap { from: 2, to: 4 });
        // A restart: a new epoch from 1 applies without a gap; the old epoch is then retired.
        assert_eq!(o.admit("a", 2, 1), Admit::Apply);
        o.applied("a", 2, 1, 0, 0);
        assert_eq!(o.admit("a", 1, 9), Admit::Duplicate);
        assert_eq!(o.admit("a", 3, 4), Admit::Gap { from: 1, to: 3 });
    }

    #[test]
    fn health_stops_serving_without_vouching_and_while_repairing() {
        let h = Health::new(1_000_000);
        let w = Duration::from_millis(500);
        assert_eq!(h.update(1_400_000, w), None);
        assert_eq!(h.update(1_600_000, w), Some(false));
        h.last_vouched_us.store(1_700_000, Ordering::SeqCst);
        assert_eq!(h.update(1_700_000, w), Some(true));
        h.repairing.store(true, Ordering::SeqCst);
        assert_eq!(h.update(1_700_001, w), Some(false));
    }

    #[test]
    fn health_checks_the_clock_on_read_even_if_the_watchdog_is_late() {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_micros() as u64;
        let h = Health::new(now);
        h.update(now, Duration::from_millis(500));
        assert!(h.serving());
        // The node was paused: its last vouching is 2 s old and the watchdog has not run since.
        h.last_vouched_us.store(now - 2_000_000, Ordering::SeqCst);
        assert!(!h.serving());
        h.gate_disabled.store(true, Ordering::SeqCst);
        assert!(h.serving());
    }
}
