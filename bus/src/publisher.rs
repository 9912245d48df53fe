//! This node's side of the wire: the publisher task that batches its invalidations (acknowledged
//! by the stream when there is one), and the heartbeat task.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use tokio::sync::{mpsc, watch};

use crate::codec::{self, Batch, Heartbeat, MAX_ANNOUNCED_CACHES, MAX_ANNOUNCED_NAME_BYTES};
use crate::identity::Kind;
use crate::state::{now_us, BusInner, Durable, Outgoing, Published};
use crate::transport::PublishError;

/// Batches queued invalidations into messages and publishes them, in order.
///
/// Natural batching: it waits for the first invalidation, then takes whatever else is already
/// queued (up to the size limits) and sends at once. An idle link sends each invalidation
/// alone with no added delay; a busy one sends fewer, larger messages, so a burst of writes
/// does not become a storm of messages.
pub(crate) async fn publisher(
    inner: Arc<BusInner>,
    mut rx: mpsc::Receiver<Outgoing>,
    mut shutdown: watch::Receiver<bool>,
) {
    let subject = inner.subjects.inv(&inner.node_id);
    let max_items = inner.limits.max_batch_invalidations;
    let max_bytes = inner.limits.max_publish_bytes;
    let mut closing = false;
    loop {
        let first = if closing {
            match rx.try_recv() {
                Ok(x) => x,
                Err(_) => return,
            }
        } else {
            tokio::select! {
                x = rx.recv() => match x { Some(x) => x, None => return },
                _ = shutdown.wait_for(|s| *s) => { closing = true; continue; }
            }
        };
        // Whole calls go into one batch: a call's invalidations (a bulk call's group) fit in one.
        let mut bytes = first.bytes + BATCH_OVERHEAD;
        let mut count = first.invalidations.len();
        let mut items = vec![first];
        while count < max_items {
            match rx.try_recv() {
                Ok(next) => {
                    if bytes + next.bytes > max_bytes || count + next.invalidations.len() > max_items {
                        // Keep it for the next batch.
                        publish_batch(&inner, &subject, std::mem::take(&mut items)).await;
                        bytes = BATCH_OVERHEAD;
                        count = 0;
                    }
                    bytes += next.bytes;
                    count += next.invalidations.len();
                    items.push(next);
                }
                Err(_) => break,
            }
        }
        if !items.is_empty() {
            publish_batch(&inner, &subject, items).await;
        }
    }
}

/// What a batch holds besides its invalidations (origin, epoch, sequence, time, namespace), at
/// most, for batching: the limits keep room for it.
pub(crate) const BATCH_OVERHEAD: usize = 64;

async fn publish_batch(inner: &BusInner, subject: &str, items: Vec<Outgoing>) {
    // The sequence is used up whatever becomes of the publish: a batch that failed may still
    // have reached some peers, and reusing its number would make them skip the next one.
    let seq = inner.last_seq.load(Ordering::SeqCst) + 1;
    let total: usize = items.iter().map(|o| o.invalidations.len()).sum();
    let mut invalidations = Vec::new();
    let mut done = Vec::with_capacity(items.len());
    for o in items {
        if invalidations.is_empty() {
            // The first call's own `Vec` (often the only one) carries the batch.
            invalidations = o.invalidations;
            invalidations.reserve(total - invalidations.len());
        } else {
            invalidations.extend(o.invalidations);
        }
        done.push(o.done);
    }
    let n = invalidations.len() as u64;
    let batch = Batch {
        origin: inner.node_id.clone(),
        epoch: inner.epoch,
        seq,
        timestamp_us: now_us(),
        namespace: inner.namespace.clone(),
        invalidations,
    };
    let payload = inner.seal(Kind::Batch, codec::encode_batch(&batch));
    let result = match &inner.durable {
        None => inner.link.publish(subject.to_owned(), payload).await,
        Some(d) => publish_acked(inner, d, subject, payload, seq).await,
    };
    // Heartbeats announce it from now on: with a stream, only after it was acknowledged (or
    // given up on), so a heartbeat stored in the stream comes after the batch it announces.
    inner.last_seq.store(seq, Ordering::SeqCst);
    match &result {
        Ok(()) => {
            inner.metrics.batches_published.inc();
            inner.metrics.invalidations_published.add(n);
            tracing::trace!(node = %inner.node_id, seq, n, "batch published");
        }
        Err(e) => {
            inner.metrics.publish_errors.inc();
            tracing::warn!(node = %inner.node_id, seq, n, error = %e, "batch not published; peers will find the gap");
        }
    }
    let result = result.map(|()| Published { seq });
    for d in done.into_iter().flatten() {
        let _ = d.send(result.clone());
    }
}

/// Publishes into the stream and waits for its acknowledgement, sending again (same message id,
/// so the stream keeps one copy) until the publish deadline. An ack that timed out means
/// "unknown", not "lost".
async fn publish_acked(
    inner: &BusInner,
    d: &Durable,
    subject: &str,
    payload: bytes::Bytes,
    seq: u64,
) -> Result<(), PublishError> {
    let id = format!("{}.{}.{}", inner.node_id, inner.epoch, seq);
    let started = tokio::time::Instant::now();
    let mut backoff = Duration::from_millis(50);
    let mut attempt = 0u32;
    loop {
        attempt += 1;
        let publish = jetstream::message::PublishMessage::build()
            .payload(payload.clone())
            .message_id(&id);
        let outcome = match d.js.send_publish(subject.to_owned(), publish).await {
            Ok(ack) => match tokio::time::timeout(d.config.ack_timeout, ack).await {
                Ok(Ok(_)) => return Ok(()),
                Ok(Err(e)) => e.to_string(),
                Err(_) => "ack timed out".to_owned(),
            },
            Err(e) => e.to_string(),
        };
        if started.elapsed() >= d.config.publish_deadline {
            return Err(PublishError::TimedOut(d.config.publish_deadline));
        }
        tracing::debug!(seq, attempt, error = %outcome, "stream publish not acknowledged; retrying");
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(1));
    }
}

/// This node's heartbeat as of now.
fn heartbeat(inner: &BusInner, beat: u64) -> Heartbeat {
    Heartbeat {
        origin: inner.node_id.clone(),
        epoch: inner.epoch,
        last_seq: inner.last_seq.load(Ordering::SeqCst),
        timestamp_us: now_us(),
        address: inner.address.clone(),
        namespace: inner.namespace.clone(),
        caches: {
            let caches = inner.caches.read().unwrap_or_else(|e| e.into_inner());
            let mut v: Vec<(String, u64)> = caches
                .iter()
                .filter(|(n, _)| n.len() <= MAX_ANNOUNCED_NAME_BYTES)
                .map(|(n, c)| (n.clone(), c.entry_count()))
                .collect();
            v.sort();
            v.truncate(MAX_ANNOUNCED_CACHES);
            v
        },
        writes_receipts: inner.receipts.is_some(),
        beat,
    }
}

/// Publishes this node's heartbeat every interval, remembering when each beat left: its return
/// (through the stream, or without one through NATS) is the node's evidence.
///
/// With a stream the heartbeat is also stored in it (the subject is the stream's): the stream
/// then delivers it back in order, behind every batch stored before it. Old ones are trimmed by
/// the nodes (`stream::trim_heartbeats`).
pub(crate) async fn heartbeats(inner: Arc<BusInner>, mut shutdown: watch::Receiver<bool>) {
    let subject = inner.subjects.hb(&inner.node_id);
    let mut tick = tokio::time::interval(inner.heartbeat_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut beat = 0u64;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.wait_for(|s| *s) => return,
        }
        beat += 1;
        let payload = inner.seal(Kind::Heartbeat, codec::encode_heartbeat(&heartbeat(&inner, beat)));
        // Taken before the publish: the evidence may not be later than the moment the
        // heartbeat could first have been stored.
        inner.beats().sent(beat, inner.gate.now());
        let sent = inner.link.publish(subject.clone(), payload).await;
        if let Err(e) = sent {
            tracing::debug!(error = %e, "heartbeat not published");
        }
    }
}
