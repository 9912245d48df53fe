//! The peer table: the other nodes of the namespace as their heartbeats describe them, bounded
//! in size and in age.

use std::collections::HashMap;
use std::time::Duration;

use crate::codec::Heartbeat;

/// Another node as seen from its heartbeats.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    /// Its node id.
    pub node_id: String,
    /// Its current epoch.
    pub epoch: u64,
    /// Last sequence it says it published.
    pub last_seq: u64,
    /// Last sequence of it applied here (contiguously).
    pub applied_seq: u64,
    /// Its admin address, if it serves one.
    pub address: String,
    /// Its caches and their sizes.
    pub caches: Vec<(String, u64)>,
    /// When this node last heard from it (µs since the Unix epoch, our clock; for display).
    pub last_seen_us: u64,
    /// Whether it writes a receipt for every batch it applies.
    pub writes_receipts: bool,
}

#[derive(Debug, Clone)]
struct Entry {
    peer: Peer,
    /// When it was last heard from, on the gate's monotonic clock (for expiry).
    seen_ns: u64,
}

/// Peers heard from, dropped when silent for longer than `expiry`, at most `max` of them.
#[derive(Debug)]
pub(crate) struct Peers {
    map: HashMap<String, Entry>,
    expiry_ns: u64,
    max: usize,
}

/// What happened when a heartbeat was recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Recorded {
    /// A peer already known (same epoch).
    Known,
    /// A new peer, or a known one with a new epoch.
    New,
    /// The table is full of live peers: not recorded.
    Full,
}

impl Peers {
    pub fn new(expiry: Duration, max: usize) -> Self {
        Peers {
            map: HashMap::new(),
            expiry_ns: expiry.as_nanos() as u64,
            max: max.max(1),
        }
    }

    /// Records a heartbeat heard at `now_ns` (monotonic) / `now_us` (wall clock, for display).
    pub fn heard(&mut self, hb: &Heartbeat, now_ns: u64, now_us: u64) -> Recorded {
        if !self.map.contains_key(&hb.origin) && self.map.len() >= self.max {
            self.expire(now_ns);
            if self.map.len() >= self.max {
                return Recorded::Full;
            }
        }
        let entry = self.map.entry(hb.origin.clone()).or_insert_with(|| Entry {
            peer: Peer {
                node_id: hb.origin.clone(),
                epoch: 0,
                last_seq: 0,
                applied_seq: 0,
                address: String::new(),
                caches: Vec::new(),
                last_seen_us: 0,
                writes_receipts: false,
            },
            seen_ns: now_ns,
        });
        let new = entry.peer.epoch != hb.epoch;
        let p = &mut entry.peer;
        p.epoch = hb.epoch;
        p.last_seq = hb.last_seq;
        p.address = hb.address.clone();
        p.caches = hb.caches.clone();
        p.writes_receipts = hb.writes_receipts;
        p.last_seen_us = now_us;
        entry.seen_ns = now_ns;
        if new {
            Recorded::New
        } else {
            Recorded::Known
        }
    }

    /// Drops peers silent for longer than the expiry; returns their ids.
    pub fn expire(&mut self, now_ns: u64) -> Vec<String> {
        let expiry = self.expiry_ns;
        let mut gone = Vec::new();
        self.map.retain(|id, e| {
            let live = now_ns.saturating_sub(e.seen_ns) <= expiry;
            if !live {
                gone.push(id.clone());
            }
            live
        });
        gone
    }

    /// The peers, sorted by node id, with `applied` giving what was applied of each.
    pub fn list(&self, applied: impl Fn(&str, u64) -> u64) -> Vec<Peer> {
        let mut v: Vec<Peer> = self
            .map
            .values()
            .map(|e| {
                let mut p = e.peer.clone();
                p.applied_seq = applied(&p.node_id, p.epoch);
                p.last_seq = p.last_seq.max(p.applied_seq);
                p
            })
            .collect();
        v.sort_by(|a, b| a.node_id.cmp(&b.node_id));
        v
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hb(origin: &str, epoch: u64) -> Heartbeat {
        Heartbeat {
            origin: origin.into(),
            epoch,
            last_seq: 0,
            timestamp_us: 0,
            address: String::new(),
            namespace: "ns".into(),
            caches: Vec::new(),
            writes_receipts: true,
            beat: 1,
        }
    }

    #[test]
    fn peers_expire_and_the_table_is_bounded() {
        let s = 1_000_000_000;
        let mut p = Peers::new(Duration::from_secs(10), 2);
        assert_eq!(p.heard(&hb("a", 1), s, 0), Recorded::New);
        assert_eq!(p.heard(&hb("a", 1), 2 * s, 0), Recorded::Known);
        assert_eq!(p.heard(&hb("a", 2), 2 * s, 0), Recorded::New);
        assert_eq!(p.heard(&hb("b", 1), 3 * s, 0), Recorded::New);
        assert_eq!(p.heard(&hb("c", 1), 4 * s, 0), Recorded::Full);
        // a was last heard at 2 s: at 13 s it has expired and c takes its place.
        assert_eq!(p.heard(&hb("c", 1), 13 * s, 0), Recorded::New);
        assert_eq!(
            p.list(|_, _| 0).iter().map(|p| p.node_id.as_str()).collect::<Vec<_>>(),
            ["b", "c"]
        );
        let mut gone = p.expire(100 * s);
        gone.sort();
        assert_eq!(gone, ["b", "c"]);
        assert_eq!(p.len(), 0);
    }
}
