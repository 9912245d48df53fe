//! Per-origin sequence tracking: which batches of which `(origin, epoch)` this node has applied,
//! on the live path and on the stream path, and what a new batch or heartbeat shows missing.
//!
//! Pure bookkeeping, no I/O: the receiver asks what to do and acts (apply, skip, flush).
//!
//! Invalidations commute (dropping an entry, raising a version floor and recording a purge give
//! the same result in any order), so a batch may be applied as soon as it arrives, even past a
//! hole: the tracking only has to know what was applied, to skip duplicates, and what is
//! missing for good, to flush. Each epoch keeps a contiguous watermark (`upto`: every batch up
//! to it was applied, or covered by a flush, or predates this node's interest) and the batches
//! applied above it (`ahead`).

use std::collections::{BTreeSet, HashMap, VecDeque};

/// Epochs tracked per origin (a restart makes a new one; older ones may still have batches in
/// flight on the stream).
const EPOCHS_PER_ORIGIN: usize = 4;
/// Batches applied above the watermark kept per epoch; beyond that the oldest are folded into
/// the watermark (they were applied; what lies between them is then treated as missing).
const MAX_AHEAD: usize = 4096;

#[derive(Debug, Default, Clone)]
struct EpochSeqs {
    epoch: u64,
    /// Every batch up to here is applied, covered by a flush, or not this node's concern.
    upto: u64,
    /// Batches applied above `upto`.
    ahead: BTreeSet<u64>,
    /// The last sequence of this epoch the stream delivered (0: none yet).
    streamed: u64,
}

impl EpochSeqs {
    fn new(epoch: u64) -> Self {
        EpochSeqs {
            epoch,
            ..Default::default()
        }
    }

    fn applied(&self, seq: u64) -> bool {
        seq <= self.upto || self.ahead.contains(&seq)
    }

    fn mark(&mut self, seq: u64) {
        if seq <= self.upto {
            return;
        }
        self.ahead.insert(seq);
        self.settle();
        while self.ahead.len() > MAX_AHEAD {
            if let Some(first) = self.ahead.pop_first() {
                self.upto = first;
            }
            self.settle();
        }
    }

    /// Raises the watermark to `seq` (what lies below is applied or covered).
    fn raise(&mut self, seq: u64) {
        self.upto = self.upto.max(seq);
        self.settle();
    }

    fn settle(&mut self) {
        while let Some(&first) = self.ahead.first() {
            if first <= self.upto {
                self.ahead.pop_first();
            } else if Some(first) == self.upto.checked_add(1) {
                self.upto = first;
                self.ahead.pop_first();
            } else {
                break;
            }
        }
    }

    /// Sequences in `from..=to` not applied.
    fn missing(&self, from: u64, to: u64) -> u64 {
        if to < from || to <= self.upto {
            return 0;
        }
        let from = from.max(self.upto.saturating_add(1));
        if from > to {
            return 0;
        }
        let held = self.ahead.range(from..=to).count() as u64;
        (to - from).saturating_add(1).saturating_sub(held)
    }
}

/// What the receiver should do with a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Verdict {
    /// Apply it (false: applied before, skip).
    pub apply: bool,
    /// Earlier batches of its epoch that were not applied and will never come on this path: the
    /// caches must be flushed to cover them (they are then marked covered).
    pub lost: u64,
}

/// Most origins tracked; a new one beyond it makes room by forgetting another (whose next
/// batch is then a first contact: a flush without a stream, a new start with one).
const MAX_ORIGINS: usize = 16_384;

/// Per-origin sequence tracking of one node.
#[derive(Debug, Default)]
pub(crate) struct Origins {
    map: HashMap<String, VecDeque<EpochSeqs>>,
}

impl Origins {
    fn epoch_mut(&mut self, origin: &str, epoch: u64) -> (&mut EpochSeqs, bool) {
        if !self.map.contains_key(origin) && self.map.len() >= MAX_ORIGINS {
            if let Some(other) = self.map.keys().next().cloned() {
                self.map.remove(&other);
            }
        }
        let epochs = self.map.entry(origin.to_owned()).or_default();
        let known = epochs.iter().position(|e| e.epoch == epoch);
        let idx = match known {
            Some(i) => i,
            None => {
                if epochs.len() >= EPOCHS_PER_ORIGIN {
                    epochs.pop_front();
                }
                epochs.push_back(EpochSeqs::new(epoch));
                epochs.len() - 1
            }
        };
        (&mut epochs[idx], known.is_none())
    }

    /// Whether `(origin, epoch)` was seen before.
    #[cfg(test)]
    pub fn knows(&self, origin: &str, epoch: u64) -> bool {
        self.map.get(origin).is_some_and(|v| v.iter().any(|e| e.epoch == epoch))
    }

    /// A batch on the live path when a stream fills whatever it misses: apply it unless it was
    /// applied before; a hole is the stream's to fill, nothing is lost here.
    pub fn live(&mut self, origin: &str, epoch: u64, seq: u64) -> Verdict {
        let (e, _) = self.epoch_mut(origin, epoch);
        let apply = !e.applied(seq);
        e.mark(seq);
        Verdict { apply, lost: 0 }
    }

    /// A batch on the only path there is (core NATS, no stream): a hole is lost for good, and so
    /// is the start of an epoch met past its first batch.
    pub fn only(&mut self, origin: &str, epoch: u64, seq: u64) -> Verdict {
        let (e, new) = self.epoch_mut(origin, epoch);
        let lost = if new {
            seq.saturating_sub(1)
        } else {
            e.missing(e.upto.saturating_add(1), seq.saturating_sub(1))
        };
        let apply = !e.applied(seq);
        e.raise(seq.saturating_sub(1));
        e.mark(seq);
        Verdict { apply, lost }
    }

    /// A batch delivered by the stream, which holds every batch of an origin in order from where
    /// this node started following it. The first batch of an epoch seen there starts its
    /// tracking (earlier ones predate this node's interest); after that, a sequence skipped by
    /// the stream was never stored, and is lost unless the live path applied it.
    pub fn streamed(&mut self, origin: &str, epoch: u64, seq: u64) -> Verdict {
        let (e, _) = self.epoch_mut(origin, epoch);
        if seq <= e.streamed {
            return Verdict { apply: false, lost: 0 };
        }
        let lost = if e.streamed == 0 {
            e.raise(seq.saturating_sub(1));
            0
        } else {
            let lost = e.missing(e.streamed.saturating_add(1), seq.saturating_sub(1));
            e.raise(seq.saturating_sub(1));
            lost
        };
        e.streamed = seq;
        let apply = !e.applied(seq);
        e.mark(seq);
        Verdict { apply, lost }
    }

    /// A heartbeat announcing `last_seq` of `(origin, epoch)`, on the only path (core NATS) or on
    /// the stream (`stream`: everything the origin had published before it is ahead of it there).
    /// Returns how many announced batches were not applied and will not come: flush for them.
    pub fn announced(&mut self, origin: &str, epoch: u64, last_seq: u64, stream: bool) -> u64 {
        let (e, new) = self.epoch_mut(origin, epoch);
        if stream && e.streamed == 0 {
            // First sight of this epoch on the stream: its earlier batches predate our interest.
            e.raise(last_seq);
            e.streamed = last_seq;
            return 0;
        }
        let lost = if new && !stream {
            last_seq
        } else {
            e.missing(e.upto.saturating_add(1), last_seq)
        };
        e.raise(last_seq);
        if stream {
            e.streamed = e.streamed.max(last_seq);
        }
        lost
    }

    /// Marks everything known as covered (after a flush of every cache).
    pub fn cover_all(&mut self) {
        for epochs in self.map.values_mut() {
            for e in epochs.iter_mut() {
                if let Some(&last) = e.ahead.last() {
                    e.raise(last);
                }
            }
        }
    }

    /// The highest sequence applied (or covered) contiguously of `(origin, epoch)`.
    pub fn applied_upto(&self, origin: &str, epoch: u64) -> u64 {
        self.map
            .get(origin)
            .and_then(|v| v.iter().find(|e| e.epoch == epoch))
            .map_or(0, |e| e.upto)
    }

    /// Forgets an origin (it expired from the peer table).
    pub fn forget(&mut self, origin: &str) {
        self.map.remove(origin);
    }

    /// Origins tracked.
    pub fn len(&self) -> usize {
        self.map.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(apply: bool, lost: u64) -> Verdict {
        Verdict { apply, lost }
    }

    #[test]
    fn core_nats_flushes_for_holes_and_late_first_contact() {
        let mut o = Origins::default();
        assert_eq!(o.only("a", 1, 1), v(true, 0));
        assert_eq!(o.only("a", 1, 2), v(true, 0));
        assert_eq!(o.only("a", 1, 2), v(false, 0), "duplicate");
        assert_eq!(o.only("a", 1, 5), v(true, 2), "3 and 4 lost");
        assert_eq!(o.only("a", 1, 4), v(false, 0), "covered by the flush");
        // A new epoch met at its third batch: the first two are lost.
        assert_eq!(o.only("a", 2, 3), v(true, 2));
        // A heartbeat announcing batches never received (tail loss).
        assert_eq!(o.announced("a", 2, 6, false), 3);
        assert_eq!(o.applied_upto("a", 2), 6);
        // First contact through a heartbeat, past batches: lost.
        assert_eq!(o.announced("b", 7, 4, false), 4);
        assert_eq!(o.announced("c", 7, 0, false), 0);
    }

    #[test]
    fn the_stream_fills_what_the_live_path_missed_and_skips_what_it_applied() {
        let mut o = Origins::default();
        // Live path: 10 and 12 arrive, 11 was lost.
        assert_eq!(o.live("a", 1, 10), v(true, 0));
        assert_eq!(o.live("a", 1, 12), v(true, 0));
        // The stream starts following at 10 (earlier ones predate this node).
        assert_eq!(o.streamed("a", 1, 10), v(false, 0));
        assert_eq!(o.streamed("a", 1, 11), v(true, 0), "the stream fills the hole");
        assert_eq!(o.streamed("a", 1, 12), v(false, 0));
        assert_eq!(o.applied_upto("a", 1), 12);
        // The stream skips 13 (never stored) and 14 (stored? no: skipped too); the live path
        // had applied 14.
        assert_eq!(o.live("a", 1, 14), v(true, 0));
        assert_eq!(o.streamed("a", 1, 15), v(true, 1), "13 is lost, 14 was applied");
        assert_eq!(o.live("a", 1, 13), v(false, 0), "covered by the flush");
        // Redelivery by the stream is ignored.
        assert_eq!(o.streamed("a", 1, 15), v(false, 0));
    }

    #[test]
    fn stream_heartbeats_reveal_batches_that_never_reached_the_stream() {
        let mut o = Origins::default();
        // First sight of epoch 3 on the stream is a heartbeat at 5: 1..5 predate us.
        assert_eq!(o.announced("a", 3, 5, true), 0);
        assert_eq!(o.streamed("a", 3, 6), v(true, 0));
        // The next heartbeat says 8, but the stream gave nothing after 6: 7 and 8 were never
        // stored. The live path had applied 8.
        assert_eq!(o.live("a", 3, 8), v(true, 0));
        assert_eq!(o.announced("a", 3, 8, true), 1);
        assert_eq!(o.streamed("a", 3, 7), v(false, 0), "late, covered");
    }

    #[test]
    fn epochs_are_bounded_and_a_forgotten_origin_starts_over() {
        let mut o = Origins::default();
        for epoch in 1..=10 {
            o.live("a", epoch, 1);
        }
        assert!(!o.knows("a", 1));
        assert!(o.knows("a", 10));
        o.forget("a");
        assert_eq!(o.len(), 0);
    }

    #[test]
    fn sequences_at_the_end_of_the_range_do_not_overflow() {
        let mut o = Origins::default();
        assert_eq!(o.only("a", 1, u64::MAX), v(true, u64::MAX - 1));
        assert_eq!(o.only("a", 1, u64::MAX), v(false, 0));
        assert_eq!(o.streamed("b", 1, u64::MAX), v(true, 0));
        assert_eq!(o.announced("b", 1, u64::MAX, true), 0);
        assert_eq!(o.live("c", 1, u64::MAX), v(true, 0));
    }

    #[test]
    fn ahead_is_bounded() {
        let mut o = Origins::default();
        for seq in (2..=2 * MAX_AHEAD as u64 + 2).step_by(2) {
            o.live("a", 1, seq);
        }
        assert!(o.applied_upto("a", 1) > 0, "oldest folded into the watermark");
    }
}
