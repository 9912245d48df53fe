//! Receipts: every node's record of the batches it applied, the half of the audit log that says
//! "who applied it, when, and what it dropped".
//!
//! Each bus on NATS writes one receipt per batch it applies from a peer, on
//! `invalbus.<ns>.audit.receipt.<origin>.<epoch>.<seq>.<node>` (outside the `invalbus.<ns>.*.*`
//! the receivers listen to), so the receipts of one batch are one subject filter away. With
//! JetStream they go to the stream `INVALBUS_<ns>_RECEIPTS` and are acknowledged; without it
//! they are published for whoever listens (a purge waiting for them, a live tail).
//!
//! The recorder never makes the bus wait: it reads the applied batches from a broadcast channel
//! and counts what it falls too far behind to see. A batch with tag or prefix purges waits for the
//! sweeps to count what they hid before its receipt is written.
//!
//! Ready receipts are signed together (`codec::seal_set`): one Ed25519 signature over the SHA-256
//! digests of their bodies, each receipt still on its own subject in its own envelope, and each
//! checked alone by whoever reads it. After a quiet spell a receipt waits at most a millisecond
//! for others; a node writing receipts steadily signs one set per 10 ms, or sooner once 64 are
//! ready, so a node applying thousands of batches a second signs about a hundred sets a second
//! instead of a receipt each.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use bytes::Bytes;
use futures::stream::FuturesUnordered;
use futures::StreamExt;
use invalbus_proto::wire;
use prost::Message;
use tokio::sync::{broadcast, mpsc, watch};

use crate::apply::Applied;
use crate::codec;
use crate::codec::DecodeError;
use crate::identity::Identity;
use crate::metrics::BusMetrics;

/// Most receipts waiting for an acknowledgement, and most waiting for a sweep's count, at once;
/// beyond that the recorder waits (never the bus).
const MAX_PENDING: usize = 4096;

/// How long a ready receipt waits for others to share its signature, how far apart two sets are
/// signed at least, and how many receipts share one at most. After a quiet spell a receipt is
/// written within `GATHER` of its batch being applied (or its sweeps counted); a node writing
/// receipts steadily signs one set per `SPACING`, or sooner once `MAX_GATHERED` are ready, and a
/// receipt waits at most that long. Measured with `invalbus-bench --only propagation` (an origin
/// and 3 peers on 2 cores): one signature per receipt took about a third of the propagation p99
/// of every batch, and sets gathered for 1 ms still held one or two receipts each, since the bus
/// batched the bench's 5,000 invalidations a second into about 900 batches (see BENCHMARKS.md).
const GATHER: Duration = Duration::from_millis(1);
const SPACING: Duration = Duration::from_millis(10);
const MAX_GATHERED: usize = 64;

/// One node's application of one batch.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Receipt {
    /// Node that applied the batch.
    pub node: String,
    /// Node that published it.
    pub origin: String,
    /// The origin's epoch.
    pub epoch: u64,
    /// The batch's sequence in that epoch.
    pub seq: u64,
    /// When the origin published it (its clock, µs since the Unix epoch).
    pub published_us: u64,
    /// When this node applied it (this node's clock).
    pub applied_us: u64,
    /// Entries it dropped here: key targets at once, tag and prefix purges as counted by the
    /// sweep that removed what they hid.
    pub dropped: u64,
    /// Whether a whole cache was flushed.
    pub flushed: bool,
    /// Invalidations in the batch.
    pub invalidations: u32,
    /// Purge ids of the admin purges in it.
    pub purge_ids: Vec<String>,
    /// The origin's own receipt (it applied the batch before publishing it).
    pub local: bool,
}

impl Receipt {
    /// The receipt `node` writes for a peer's batch it applied (the sweeps' count not included).
    pub fn of(node: &str, a: &Applied) -> Receipt {
        Receipt {
            node: node.to_owned(),
            origin: a.origin.clone(),
            epoch: a.epoch,
            seq: a.seq,
            published_us: a.published_us,
            applied_us: a.applied_us,
            dropped: a.dropped,
            flushed: a.flushed,
            invalidations: a.invalidations as u32,
            purge_ids: a.purge_ids.clone(),
            local: false,
        }
    }

    /// The wire form (`invalbus.wire.v1.Receipt`).
    pub fn encode(&self) -> Bytes {
        let msg = wire::Receipt {
            node: self.node.clone(),
            origin: self.origin.clone(),
            epoch: self.epoch,
            seq: self.seq,
            published_us: self.published_us,
            applied_us: self.applied_us,
            dropped: self.dropped,
            flushed: self.flushed,
            invalidations: self.invalidations,
            purge_ids: self.purge_ids.clone(),
            local: self.local,
        };
        Bytes::from(msg.encode_to_vec())
    }

    /// Reads the wire form.
    ///
    /// ```
    /// let r = invalbus::Receipt { node: "a".into(), origin: "b".into(), epoch: 1, seq: 2, ..Default::default() };
    /// assert_eq!(invalbus::Receipt::decode(&r.encode()).unwrap(), r);
    /// assert!(invalbus::Receipt::decode(b"\xff").is_err());
    /// ```
    pub fn decode(payload: &[u8]) -> Result<Receipt, DecodeError> {
        let m = wire::Receipt::decode(payload).map_err(|e| DecodeError::Malformed(e.to_string()))?;
        Ok(Receipt {
            node: m.node,
            origin: m.origin,
            epoch: m.epoch,
            seq: m.seq,
            published_us: m.published_us,
            applied_us: m.applied_us,
            dropped: m.dropped,
            flushed: m.flushed,
            invalidations: m.invalidations,
            purge_ids: m.purge_ids,
            local: m.local,
        })
    }

    /// The id that makes a receipt written twice (a retry, a replayed batch) count once.
    fn msg_id(&self) -> String {
        format!(
            "{}.{}.{}.{}.{}",
            self.node,
            self.origin,
            self.epoch,
            self.seq,
            self.purge_ids.first().map(String::as_str).unwrap_or("")
        )
    }
}

/// The subject `node` writes its receipt of batch `(origin, epoch, seq)` of `namespace` on.
pub fn receipt_subject(namespace: &str, origin: &str, epoch: u64, seq: u64, node: &str) -> String {
    format!("invalbus.{namespace}.audit.receipt.{origin}.{epoch}.{seq}.{node}")
}

/// The subjects of every receipt of `namespace` (what the receipts stream keeps).
pub fn all_receipts(namespace: &str) -> String {
    format!("invalbus.{namespace}.audit.receipt.>")
}

/// The name of the receipts stream of `namespace`.
pub fn receipts_stream(namespace: &str) -> String {
    format!("INVALBUS_{namespace}_RECEIPTS")
}

type AckFuture = futures::future::BoxFuture<'static, bool>;
type CountFuture = futures::future::BoxFuture<'static, Receipt>;

/// Writes receipts: one per applied batch, and the ones handed to it (the origin's own).
pub(crate) struct Recorder {
    pub namespace: String,
    pub node_id: String,
    pub client: async_nats::Client,
    /// With JetStream: receipts are acknowledged by the receipts stream.
    pub js: Option<jetstream::Context>,
    pub metrics: Arc<BusMetrics>,
    /// Signs every receipt: whoever reads the audit log can tell who wrote it.
    pub identity: Identity,
}

impl Recorder {
    pub(crate) async fn run(
        self,
        mut applied: broadcast::Receiver<Applied>,
        mut local: mpsc::Receiver<Receipt>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let mut acks: FuturesUnordered<AckFuture> = FuturesUnordered::new();
        // Receipts of batches with tag or prefix purges, waiting for the sweeps to count the
        // entries those hid.
        let mut counting: FuturesUnordered<CountFuture> = FuturesUnordered::new();
        let mut ready = Gathered::default();
        loop {
            if acks.len() >= MAX_PENDING {
                if let Some(ok) = acks.next().await {
                    self.count(ok);
                }
                continue;
            }
            if ready.receipts.len() >= MAX_GATHERED {
                self.write(ready.take(), &mut acks).await;
                continue;
            }
            tokio::select! {
                a = applied.recv(), if counting.len() < MAX_PENDING => match a {
                    Ok(a) => {
                        if let Some(r) = self.receipt(a, &counting) {
                            ready.push(r);
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        self.metrics.receipts_lagged.add(n);
                        tracing::warn!(node = %self.node_id, missed = n, "receipt recorder fell behind; receipts not written");
                    }
                    Err(broadcast::error::RecvError::Closed) => break,
                },
                Some(r) = counting.next(), if !counting.is_empty() => ready.push(r),
                Some(r) = local.recv() => ready.push(r),
                Some(ok) = acks.next(), if !acks.is_empty() => self.count(ok),
                () = sleep_until(ready.due) => self.write(ready.take(), &mut acks).await,
                _ = stopped(&mut shutdown) => break,
            }
        }
        // Write what is ready and queued, then wait a bounded time for the counts and
        // acknowledgements.
        while let Ok(a) = applied.try_recv() {
            if let Some(r) = self.receipt(a, &counting) {
                ready.push(r);
            }
        }
        local.close();
        while let Some(r) = local.recv().await {
            ready.push(r);
        }
        self.write(ready.take(), &mut acks).await;
        let drain = async {
            while let Some(r) = counting.next().await {
                self.write(vec![r], &mut acks).await;
            }
            while let Some(ok) = acks.next().await {
                self.count(ok);
            }
        };
        let _ = tokio::time::timeout(Duration::from_secs(5), drain).await;
    }

    /// The receipt of `a`, or `None` when it waits in `counting` for the sweeps to count what
    /// its tag and prefix purges hid.
    fn receipt(&self, a: Applied, counting: &FuturesUnordered<CountFuture>) -> Option<Receipt> {
        if a.pending.is_empty() {
            return Some(Receipt::of(&self.node_id, &a));
        }
        let node = self.node_id.clone();
        counting.push(Box::pin(async move {
            let mut r = Receipt::of(&node, &a);
            r.dropped += a.pending.count().await;
            r
        }));
        None
    }

    fn count(&self, ok: bool) {
        if ok {
            self.metrics.receipts_published.inc();
        } else {
            self.metrics.receipts_failed.inc();
        }
    }

    /// Signs `receipts` together (one signature for the set) and sends each on its subject.
    async fn write(&self, receipts: Vec<Receipt>, acks: &mut FuturesUnordered<AckFuture>) {
        if receipts.is_empty() {
            return;
        }
        let bodies: Vec<Bytes> = receipts.iter().map(Receipt::encode).collect();
        let sealed = codec::seal_set(&self.identity, &bodies);
        for (r, payload) in receipts.iter().zip(sealed) {
            if let Some(f) = self.publish(r, payload).await {
                acks.push(f);
            }
        }
    }

    /// Sends one sealed receipt; with JetStream, returns the future of its acknowledgement.
    async fn publish(&self, r: &Receipt, payload: Bytes) -> Option<AckFuture> {
        let subject = receipt_subject(&self.namespace, &r.origin, r.epoch, r.seq, &r.node);
        let Some(js) = &self.js else {
            let ok = self.client.publish(subject, payload).await.is_ok();
            self.count(ok);
            return None;
        };
        let msg = jetstream::message::PublishMessage::build()
            .payload(payload)
            .message_id(r.msg_id());
        match js.send_publish(subject, msg).await {
            Ok(ack) => Some(Box::pin(async move { ack.await.is_ok() })),
            Err(e) => {
                tracing::warn!(node = %self.node_id, error = %e, "receipt not written");
                self.count(false);
                None
            }
        }
    }
}

/// Receipts ready to write, held until `due` for others to share their signature: `GATHER`
/// after the first, and no sooner than `SPACING` after the last set was taken.
#[derive(Default)]
struct Gathered {
    receipts: Vec<Receipt>,
    due: Option<tokio::time::Instant>,
    last_taken: Option<tokio::time::Instant>,
}

impl Gathered {
    fn push(&mut self, r: Receipt) {
        if self.receipts.is_empty() {
            let gathered = tokio::time::Instant::now() + GATHER;
            let spaced = self.last_taken.map(|at| at + SPACING);
            self.due = Some(spaced.map_or(gathered, |s| s.max(gathered)));
        }
        self.receipts.push(r);
    }

    fn take(&mut self) -> Vec<Receipt> {
        self.due = None;
        self.last_taken = Some(tokio::time::Instant::now());
        std::mem::take(&mut self.receipts)
    }
}

/// Resolves at `due`, or never without one.
async fn sleep_until(due: Option<tokio::time::Instant>) {
    match due {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Resolves once `rx` holds true (or its sender is gone).
async fn stopped(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_set_after_a_quiet_spell_waits_gather_and_steady_sets_are_spaced() {
        let mut g = Gathered::default();
        let start = tokio::time::Instant::now();
        g.push(Receipt::default());
        assert_eq!(g.due, Some(start + GATHER), "the first receipt waits only GATHER");
        g.push(Receipt::default());
        assert_eq!(g.due, Some(start + GATHER), "later receipts join the same set");

        tokio::time::advance(GATHER).await;
        let taken_at = tokio::time::Instant::now();
        assert_eq!(g.take().len(), 2);
        assert_eq!(g.due, None);

        // Under steady load the next set is signed no sooner than SPACING after the last.
        tokio::time::advance(GATHER).await;
        g.push(Receipt::default());
        assert_eq!(g.due, Some(taken_at + SPACING));
        tokio::time::advance(SPACING).await;
        assert_eq!(g.take().len(), 1);

        // After a quiet spell longer than SPACING, GATHER again.
        tokio::time::advance(SPACING * 2).await;
        let now = tokio::time::Instant::now();
        g.push(Receipt::default());
        assert_eq!(g.due, Some(now + GATHER));
    }
}
