//! Peers' side of the wire: the receiver task that applies their batches and gathers the
//! evidence the gate serves on, and the watchdog that reports the gate's changes.
//!
//! # Two paths, one evidence
//! With a JetStream stream the receiver reads two paths in one task:
//! - the **live path**, a core NATS subscription to the namespace: the fast way batches arrive
//!   (one hop from the publisher's server), applied as soon as they come;
//! - the **stream path**, an ordered consumer of the batch stream from the moment the node
//!   started: every batch the stream stored, in stream order, applied if the live path missed
//!   it (deduplicated by origin, epoch and sequence), and every node's latest heartbeat.
//!
//! The evidence is the node's **own heartbeat coming back through the stream path**. The
//! heartbeat is sent at `t0` (monotonic clock) and stored in the stream; the stream delivers in
//! stream order, and the receiver applies everything before it, so when it arrives the node has
//! applied every batch stored before the heartbeat. An invalidation *accepted* before `t0` was
//! acknowledged by the stream before `t0`, hence stored before the heartbeat was: it is among
//! them. So the node may serve until `t0 + window` (`gate`).
//!
//! Why it holds in a cluster, and what it assumes: a JetStream stream acknowledges a message and
//! delivers it to consumers only once its Raft group has committed it (a quorum of its
//! replicas), and commits in one order, the stream sequence. A node cut off from the quorum, in
//! whatever way (its own link, a route between two servers, a stream leader on the other side
//! of a partition), cannot have its heartbeat committed, so gets no evidence and stops serving
//! within the window; a replica or a consumer on the node's side that lags the leader delivers
//! the heartbeat only after the batches committed before it, so it cannot vouch early. No
//! clock is compared across machines. The fault suite's `route_partition_*` scenarios fail
//! without it (`gate_from_own_echo_is_fooled_by_a_route_partition`).
//!
//! Alternatives weighed: a peer's heartbeats as evidence cannot tell a dead peer from a cut-off
//! one, and say nothing about publishers that do not heartbeat (a Python publisher); the stream's
//! last sequence asked of its leader costs a request per check and is answered by a deposed
//! leader until it notices (a stale view, confidently); the heartbeat through the stream costs
//! one stored message per node per interval, trimmed to one per node, and nothing per batch
//! on the live path, so propagation keeps its one hop.
//!
//! Without a stream, the only path is the core subscription and the evidence is the node's own
//! heartbeat coming back through NATS. It proves the node's own link works, not that every
//! accepted invalidation reached it: a route partition inside a NATS cluster, or a publish the
//! server never received, is not seen until a later batch or heartbeat of the same origin shows
//! the hole. Every loss the receiver can see (a hole in an origin's sequence, an origin met past
//! its first batch, a heartbeat announcing batches never received, a slow-consumer drop, a
//! reconnect, a lapse of its own heartbeat) flushes every cache.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::stream::BoxStream;
use futures::StreamExt;
use tokio::sync::{mpsc, watch};
use tracing::Instrument;

use crate::apply::{apply_to, Applied, CacheEvent, PendingDrops};
use crate::codec::{self, DecodeError, Heartbeat};
use crate::identity::{self, Kind, Refusal};
use crate::state::{now_us, BusInner};
use crate::stream::{Follower, Hole};
use crate::transport::{LinkEvent, Received};
use crate::view::{BatchRef, TargetRef};

/// Which path a message came by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Path {
    /// The core NATS subscription.
    Live,
    /// The stream's ordered consumer.
    Stream,
}

/// When this node's own heartbeat last came back on the live path (for lapses, without a stream).
#[derive(Default)]
struct Echo {
    last_arrival_ns: u64,
}

/// Receives the namespace's messages on both paths and applies peers' batches; gathers the
/// evidence from this node's own heartbeat.
pub(crate) async fn receiver(
    inner: Arc<BusInner>,
    mut live: BoxStream<'static, Result<Received, LinkEvent>>,
    mut follower: Option<Follower>,
    mut events: mpsc::Receiver<LinkEvent>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut echo = Echo::default();
    let mut disconnected = false;
    // Restarts a follower that went quiet while this node's heartbeat is overdue.
    let mut watch = FollowerWatch::new(&inner);
    let mut watch_tick = tokio::time::interval(watch.grace / 4);
    watch_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Events taken out of the channel while folding slow-consumer events, still to handle.
    let mut deferred: std::collections::VecDeque<LinkEvent> = std::collections::VecDeque::new();
    loop {
        stall(&inner).await;
        if let Some(ev) = deferred.pop_front() {
            on_link_event(&inner, ev, &mut events, &mut deferred, &mut disconnected);
            continue;
        }
        tokio::select! {
            m = live.next() => match m {
                Some(Ok(msg)) => on_live(&inner, &msg.subject, msg.payload, &mut echo).await,
                Some(Err(ev)) => on_link_event(&inner, ev, &mut events, &mut deferred, &mut disconnected),
                None => return,
            },
            m = next_streamed(&mut follower, &inner.faults.deaf_follower) => match m {
                Some(Ok(msg)) => {
                    watch.delivered(&inner);
                    if let Some(f) = follower.as_mut() {
                        on_streamed(&inner, f, msg).await;
                    }
                }
                Some(Err(e)) => {
                    tracing::debug!(node = %inner.node_id, error = %e, "stream follower");
                }
                None => {
                    tracing::warn!(node = %inner.node_id, "the stream follower ended; starting it again");
                    if let Some(f) = follower.as_mut() {
                        f.reread();
                    }
                }
            },
            _ = watch_tick.tick(), if follower.is_some() => {
                if let Some(f) = follower.as_mut() {
                    watch.check(&inner, f);
                }
            }
            Some(ev) = events.recv() => on_link_event(&inner, ev, &mut events, &mut deferred, &mut disconnected),
            () = stopped(&mut shutdown) => return,
        }
    }
}

/// Restarts the stream follower when it is stuck without knowing it.
///
/// This node stores a heartbeat in the stream every interval, and the follower delivers it
/// back within milliseconds. Seen here: on nats-server before 2.10, a pull request that expires
/// just as a message arrives is dropped without the `408` that tells the client to pull again,
/// and the ordered consumer then waits for two missed idle heartbeats (2 s) before it recreates
/// itself, as long as the default staleness bound, so the caches stopped serving for a moment.
/// So when a heartbeat of this node has been out for `grace` (half of `max_staleness`, at
/// least a quarter interval) without coming back, and the follower has delivered nothing for as
/// long, its consumer is recreated from where it stands, and the heartbeat comes back before
/// the gate closes. Checked every quarter of `grace`; counted in `follower_restarts`. Restarts
/// that bring no evidence back (the stream cannot store this node's heartbeats) back off, up to
/// 16 times `grace` apart.
struct FollowerWatch {
    grace: Duration,
    /// When the follower last delivered anything, or was last restarted (gate clock).
    last_ns: u64,
    /// Restarts since evidence last came in, and the evidence as of the last restart.
    restarts: u32,
    evidence_at_restart: u64,
}

impl FollowerWatch {
    fn new(inner: &BusInner) -> Self {
        FollowerWatch {
            grace: (inner.max_staleness / 2).max(inner.heartbeat_interval / 4),
            last_ns: inner.gate.now(),
            restarts: 0,
            evidence_at_restart: 0,
        }
    }

    fn delivered(&mut self, inner: &BusInner) {
        self.last_ns = inner.gate.now();
    }

    fn check(&mut self, inner: &BusInner, f: &mut Follower) {
        let now = inner.gate.now();
        let evidence = inner.gate.evidence_at();
        if evidence > self.evidence_at_restart {
            self.restarts = 0;
        }
        let quiet = self.grace.as_nanos() as u64 * (1u64 << self.restarts.min(4));
        let Some(sent) = inner.beats().first_after(evidence) else {
            return;
        };
        let overdue = now.saturating_sub(sent) > quiet;
        if !overdue || now.saturating_sub(self.last_ns) <= quiet || !f.is_following() {
            return;
        }
        self.last_ns = now;
        self.restarts += 1;
        self.evidence_at_restart = evidence;
        inner.metrics.follower_restarts.inc();
        tracing::info!(node = %inner.node_id, overdue_ms = (now - sent) / 1_000_000, from = f.next,
            "this node's heartbeat has not come back through the stream and the follower delivers nothing: restarting its consumer from where it stands");
        f.restart();
        inner.faults.deaf_follower.store(false, Ordering::Release);
    }
}

/// Resolves once `rx` holds true (or its sender is gone), holding no guard.
async fn stopped(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}

async fn next_streamed(
    f: &mut Option<Follower>,
    deaf: &AtomicBool,
) -> Option<Result<async_nats::jetstream::Message, async_nats::jetstream::consumer::pull::OrderedError>> {
    match f {
        Some(f) if !deaf.load(Ordering::Acquire) => f.recv().await,
        _ => std::future::pending().await,
    }
}

/// The test hook that stalls the receiver (the NATS client keeps reading meanwhile).
async fn stall(inner: &BusInner) {
    let until = inner.faults.stall_until_ns.load(Ordering::Acquire);
    let now = inner.gate.now();
    if until > now {
        tokio::time::sleep(Duration::from_nanos(until - now)).await;
    }
}

fn on_link_event(
    inner: &BusInner,
    ev: LinkEvent,
    events: &mut mpsc::Receiver<LinkEvent>,
    deferred: &mut std::collections::VecDeque<LinkEvent>,
    disconnected: &mut bool,
) {
    let stream = inner.follows_stream;
    match ev {
        LinkEvent::SlowConsumer => {
            // async-nats raises one event per dropped message, so a burst of drops queues
            // hundreds: fold them into one (keeping the other events, in order).
            let mut n = 1;
            while let Ok(ev) = events.try_recv() {
                if ev == LinkEvent::SlowConsumer {
                    n += 1;
                } else {
                    deferred.push_back(ev);
                }
            }
            inner.metrics.slow_consumer_events.add(n);
            inner.metrics.gaps.inc();
            if stream {
                tracing::warn!(node = %inner.node_id, dropped = n, "slow consumer: the live path dropped messages; the stream path fills them");
            } else {
                inner.flush_all("slow consumer: messages were dropped");
            }
        }
        LinkEvent::Disconnected => {
            tracing::warn!(node = %inner.node_id, "disconnected from NATS");
            *disconnected = true;
        }
        LinkEvent::Connected => {
            if std::mem::take(disconnected) {
                inner.metrics.gaps.inc();
                if stream {
                    tracing::warn!(node = %inner.node_id, "reconnected to NATS; the stream path fills what the live path missed");
                } else {
                    inner.flush_all("reconnect: what was published meanwhile is lost");
                }
            }
        }
    }
}

/// How often a refusal is logged per origin (the counters count every one).
const REFUSAL_LOG_INTERVAL: Duration = Duration::from_secs(10);

fn count_refusal(inner: &BusInner, origin: &str, e: &DecodeError) {
    let m = &inner.metrics;
    match e {
        DecodeError::Oversized { .. } => m.oversized.inc(),
        DecodeError::Malformed(_) => m.malformed.inc(),
        DecodeError::Invalid(_) => m.invalid.inc(),
        DecodeError::Foreign(_) => m.foreign.inc(),
    }
    if inner.trust.should_log(origin, inner.gate.now(), REFUSAL_LOG_INTERVAL) {
        tracing::warn!(node = %inner.node_id, origin, kind = e.kind(), error = %e, "message dropped");
    }
}

fn count_untrusted(inner: &BusInner, origin: &str, what: &str, r: &Refusal) {
    let m = &inner.metrics;
    match r {
        Refusal::BadSignature(_) => m.refused_unsigned.inc(),
        Refusal::Untrusted(_) | Refusal::WrongOrigin { .. } => m.refused_untrusted.inc(),
        Refusal::NotAllowed { .. } => m.refused_unauthorized.inc(),
    }
    if inner.trust.should_log(origin, inner.gate.now(), REFUSAL_LOG_INTERVAL) {
        tracing::warn!(node = %inner.node_id, origin, what, refusal = %r, "message refused: not signed by a key the namespace trusts for it (logged once per origin every 10 s; see refused_* in the stats)");
    }
}

/// A decoded message of the namespace, its signature checked. A batch borrows its text from
/// the envelope it came in.
enum Message<'a> {
    Batch(BatchRef<'a>),
    /// A batch whose origin name another key holds ([`contested`]).
    Contested(BatchRef<'a>),
    Heartbeat(Heartbeat),
}

/// A message's envelope, opened: what kind of message its subject says it holds, and whose.
struct Opened<'s> {
    kind: &'s str,
    origin: &'s str,
    env: codec::Envelope,
}

/// Opens a message's envelope (see [`decode`]).
fn open<'s>(inner: &BusInner, subject: &'s str, payload: &Bytes) -> Option<Opened<'s>> {
    let Some((kind, origin)) = inner.subjects.parse(subject) else {
        inner.metrics.invalid.inc();
        tracing::warn!(node = %inner.node_id, subject, "message on an unknown subject dropped");
        return None;
    };
    if kind != "inv" && kind != "hb" {
        inner.metrics.invalid.inc();
        if inner.trust.should_log(subject, inner.gate.now(), REFUSAL_LOG_INTERVAL) {
            tracing::warn!(node = %inner.node_id, subject, "message on an unknown subject dropped");
        }
        return None;
    }
    let opened = if inner.unsigned {
        codec::open_unsigned(payload, &inner.limits)
    } else {
        codec::open(payload, &inner.limits)
    };
    match opened {
        Ok(env) => Some(Opened { kind, origin, env }),
        Err(DecodeError::Invalid(why)) => {
            count_untrusted(inner, origin, kind, &Refusal::BadSignature(why));
            None
        }
        Err(e) => {
            count_refusal(inner, origin, &e);
            None
        }
    }
}

/// Decodes an opened message, checks that it was published on its origin's subject, and checks
/// its signature and the trust policy, before anything else looks at it.
fn decode<'a>(inner: &BusInner, opened: &'a Opened<'_>) -> Option<Message<'a>> {
    let Opened { kind, origin, env } = opened;
    let (kind, origin) = (*kind, *origin);
    let now = inner.gate.now();
    if kind == "inv" {
        let b = match codec::decode_batch_ref(&env.body, &inner.namespace, &inner.limits) {
            Ok(b) if b.origin == origin => b,
            Ok(b) => {
                let e = DecodeError::Invalid(format!("batch of {:?} on the subject of {origin:?}", b.origin));
                count_refusal(inner, origin, &e);
                return None;
            }
            Err(e) => {
                count_refusal(inner, origin, &e);
                return None;
            }
        };
        if inner.unsigned {
            return Some(Message::Batch(b));
        }
        // With a stream, a batch comes by both paths: its signature is checked on the first.
        let dedup = inner.follows_stream;
        let id = (b.origin.to_owned(), b.epoch, b.seq);
        if dedup && inner.verified().seen(&id, &env.signature, &env.body) {
            return Some(Message::Batch(b));
        }
        let verdict = if own(inner, b.origin, b.epoch) {
            // This bus's own batch coming back is skipped as an echo whatever it holds, so only
            // its signer is checked (a batch in this node's name from another key is counted):
            // checking the signature would cost a hash pass and a verification per batch this
            // node publishes, for nothing.
            own_signer(inner, env)
        } else {
            inner
                .trust
                .verify(Kind::Batch, &env.body, &env.signer, &env.signature, b.origin, now)
                .and_then(|signer| authorized(&signer, &b))
        };
        if let Err(r) = verdict {
            if contested(inner, &b, &r) {
                // Applied once, counted once: the other path delivers the same message again.
                let mut seen = inner.contested_seen();
                if seen.seen(&id, &env.signature, &env.body) {
                    return None;
                }
                seen.insert(id, env.signature.clone(), env.body.clone());
                drop(seen);
                count_contested(inner, &b, &r);
                return Some(Message::Contested(b));
            }
            count_untrusted(inner, origin, "batch", &r);
            return None;
        }
        if dedup {
            inner.verified().insert(id, env.signature.clone(), env.body.clone());
        }
        return Some(Message::Batch(b));
    }
    let h = match codec::decode_heartbeat(&env.body, &inner.namespace, &inner.limits) {
        Ok(h) if h.origin == origin => h,
        Ok(h) => {
            let e = DecodeError::Invalid(format!("heartbeat of {:?} on the subject of {origin:?}", h.origin));
            count_refusal(inner, origin, &e);
            return None;
        }
        Err(e) => {
            count_refusal(inner, origin, &e);
            return None;
        }
    };
    let verdict = if inner.unsigned {
        Ok(())
    } else if h.origin == inner.node_id {
        if h.epoch == inner.epoch {
            own_signature(inner, Kind::Heartbeat, env)
        } else {
            // Another process with this node id: trusted by the policy (never by a pin: this
            // node's name is its own), it is a live duplicate to report.
            let checked = inner
                .trust
                .check(Kind::Heartbeat, &env.body, &env.signer, &env.signature, &h.origin);
            if checked.is_ok() {
                inner.note_duplicate(h.epoch);
            }
            checked.map(|_| ())
        }
    } else {
        inner
            .trust
            .verify(Kind::Heartbeat, &env.body, &env.signer, &env.signature, &h.origin, now)
            .map(|_| ())
    };
    if let Err(r) = verdict {
        count_untrusted(inner, origin, "heartbeat", &r);
        return None;
    }
    Some(Message::Heartbeat(h))
}

/// Whether a refused batch is contested: its signature verifies, but under the `pinned` policy
/// another key holds its origin's name. Which of the two is the name's genuine publisher cannot be
/// told (the holder may be a forger who claimed it while the node was away), so its
/// invalidations are applied: dropping entries is always safe, and under this policy any key may
/// invalidate anything under a name of its own anyway. Nothing else is: it touches no sequence
/// tracking, receipt or applied record, and the name stays with its holder. Applied and counted
/// (`contested_batches`) once whichever paths deliver it, and logged once per origin and interval.
fn contested(inner: &BusInner, b: &BatchRef<'_>, r: &Refusal) -> bool {
    matches!(r, Refusal::WrongOrigin { .. }) && inner.trust.pins_on_first_use() && !own(inner, b.origin, b.epoch)
}

fn count_contested(inner: &BusInner, b: &BatchRef<'_>, r: &Refusal) {
    inner.metrics.contested.inc();
    if inner.trust.should_log(b.origin, inner.gate.now(), REFUSAL_LOG_INTERVAL) {
        tracing::warn!(node = %inner.node_id, origin = %b.origin, refusal = %r,
            "contested batch: signed by a key other than the one this origin name is pinned to; its invalidations are applied, its sequence is not tracked (logged once per origin every 10 s; see contested_batches in the stats; the `keys` trust policy says which key is whose)");
    }
}

/// Checks that a message in this process's own name was signed by this process's key (a forged
/// heartbeat of ours would otherwise be evidence).
fn own_signature(inner: &BusInner, kind: Kind, env: &codec::Envelope) -> Result<(), Refusal> {
    own_signer(inner, env)?;
    inner
        .trust
        .check_signature(kind, &env.body, &env.signer, &env.signature)
}

/// Checks that a message in this process's own name names this process's key as its signer.
fn own_signer(inner: &BusInner, env: &codec::Envelope) -> Result<(), Refusal> {
    if env.signer != inner.identity.public_key() {
        return Err(Refusal::WrongOrigin {
            key: env.signer.chars().take(12).collect(),
            origin: inner.node_id.clone(),
        });
    }
    Ok(())
}

/// Whether the signer may make every invalidation of the batch.
fn authorized(signer: &identity::Verified, b: &BatchRef<'_>) -> Result<(), Refusal> {
    for inv in &b.invalidations {
        let (allowed, what) = match inv.target {
            TargetRef::Key(_) => (signer.scopes.keys, "invalidate keys"),
            _ => (signer.scopes.purge, "purge by tag, prefix or everything"),
        };
        if !allowed {
            return Err(Refusal::NotAllowed {
                key: signer.key.chars().take(12).collect(),
                what,
            });
        }
    }
    Ok(())
}

/// Whether a message is this process's own (an echo).
fn own(inner: &BusInner, origin: &str, epoch: u64) -> bool {
    origin == inner.node_id && epoch == inner.epoch
}

/// A message on the live path.
async fn on_live(inner: &BusInner, subject: &str, payload: Bytes, echo: &mut Echo) {
    let stream = inner.follows_stream;
    let Some(opened) = open(inner, subject, &payload) else {
        return;
    };
    match decode(inner, &opened) {
        Some(Message::Batch(batch)) => {
            if own(inner, batch.origin, batch.epoch) {
                inner.metrics.echoes_skipped.inc();
                return;
            }
            let verdict = {
                let mut origins = inner.origins();
                if stream {
                    origins.live(batch.origin, batch.epoch, batch.seq)
                } else {
                    origins.only(batch.origin, batch.epoch, batch.seq)
                }
            };
            if verdict.lost > 0 {
                inner.metrics.gaps.inc();
                inner.flush_all(&format!(
                    "{} batches of {} before #{} were never received",
                    verdict.lost, batch.origin, batch.seq
                ));
            }
            if verdict.apply && !dropped_by_test_hook(inner) {
                apply_batch(inner, &batch, Path::Live, Tracking::Tracked).await;
            } else if !verdict.apply {
                inner.metrics.duplicates.inc();
            }
        }
        Some(Message::Contested(batch)) => apply_batch(inner, &batch, Path::Live, Tracking::ApplyOnly).await,
        Some(Message::Heartbeat(hb)) => {
            if own(inner, &hb.origin, hb.epoch) {
                if !stream {
                    on_own_echo(inner, hb.beat, echo);
                }
                return;
            }
            if heard(inner, &hb) && !stream {
                let lost = inner.origins().announced(&hb.origin, hb.epoch, hb.last_seq, false);
                if lost > 0 {
                    inner.metrics.gaps.inc();
                    inner.flush_all(&format!(
                        "{} announces batches up to #{}, {lost} of them never received",
                        hb.origin, hb.last_seq
                    ));
                }
            }
        }
        None => {}
    }
}

/// The live path's handling of one message, for the fuzz targets.
#[cfg(feature = "fuzzing")]
pub(crate) async fn receive_for_fuzzing(inner: &BusInner, subject: &str, payload: Bytes) {
    on_live(inner, subject, payload, &mut Echo::default()).await;
}

/// Records a peer's heartbeat in the peer table; false when the table had no room for it.
fn heard(inner: &BusInner, hb: &Heartbeat) -> bool {
    inner.metrics.heartbeats_received.inc();
    if hb.origin == inner.node_id {
        // Another process with this node id (reported when it was decoded): its batches are
        // applied as a peer's, but it is not a peer.
        return false;
    }
    let recorded = inner.peers().heard(hb, inner.gate.now(), now_us());
    if recorded == crate::peers::Recorded::Full {
        inner.metrics.peers_refused.inc();
        tracing::warn!(node = %inner.node_id, origin = %hb.origin, "peer table full: heartbeat not recorded");
        return false;
    }
    true
}

/// Without a stream: this node's own heartbeat came back through NATS. After a lapse in
/// arrivals (the link was cut, even silently, or the process was paused), whatever was
/// published meanwhile may be lost: flush before vouching again.
fn on_own_echo(inner: &BusInner, beat: u64, echo: &mut Echo) {
    let Some(t0) = inner.beats().when(beat) else {
        return;
    };
    let now = inner.gate.now();
    let window = inner.window().as_nanos() as u64;
    let prev = std::mem::replace(&mut echo.last_arrival_ns, now);
    if prev > 0 && now.saturating_sub(prev) > window {
        inner.metrics.gaps.inc();
        inner.flush_all(&format!(
            "own heartbeat back after a lapse of {} ms",
            (now - prev) / 1_000_000
        ));
    }
    inner.metrics.evidence.inc();
    inner.gate.evidence(t0);
}

/// A message on the stream path, in stream order.
async fn on_streamed(inner: &BusInner, f: &mut Follower, msg: async_nats::jetstream::Message) {
    let Ok(info) = msg.info() else {
        return;
    };
    let seq = info.stream_sequence;
    if seq < f.next {
        // Behind where the node stands: read before, or before it started following.
        return;
    }
    if !hole_checked(inner, f, seq).await {
        return;
    }
    f.next = seq.saturating_add(1);
    erasure(inner, &msg, seq);
    if let Some(superseded) = &inner.superseded {
        if let Some(("hb", origin)) = inner.subjects.parse(msg.subject.as_str()) {
            superseded
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .heartbeat(origin, seq);
        }
    }
    let Some(opened) = open(inner, msg.subject.as_str(), &msg.payload) else {
        return;
    };
    match decode(inner, &opened) {
        Some(Message::Batch(batch)) => {
            if own(inner, batch.origin, batch.epoch) {
                return;
            }
            let verdict = inner.origins().streamed(batch.origin, batch.epoch, batch.seq);
            if verdict.lost > 0 {
                inner.metrics.gaps.inc();
                inner.flush_all(&format!(
                    "{} batches of {} before #{} were never stored in the stream",
                    verdict.lost, batch.origin, batch.seq
                ));
            }
            if verdict.apply && !dropped_by_test_hook(inner) {
                inner.metrics.replayed.inc();
                apply_batch(inner, &batch, Path::Stream, Tracking::Tracked).await;
            }
        }
        Some(Message::Contested(batch)) => apply_batch(inner, &batch, Path::Stream, Tracking::ApplyOnly).await,
        Some(Message::Heartbeat(hb)) => {
            if own(inner, &hb.origin, hb.epoch) {
                // The evidence: everything stored before this heartbeat has been applied.
                if let Some(t0) = inner.beats().when(hb.beat) {
                    inner.metrics.evidence.inc();
                    inner.gate.evidence(t0);
                }
                return;
            }
            if hb.origin == inner.node_id {
                return;
            }
            let lost = inner.origins().announced(&hb.origin, hb.epoch, hb.last_seq, true);
            if lost > 0 {
                inner.metrics.gaps.inc();
                inner.flush_all(&format!(
                    "{} announces batches up to #{}; {lost} of them were never stored in the stream",
                    hb.origin, hb.last_seq
                ));
            }
        }
        None => {}
    }
}

/// Reports a message that erased stored batches: a `Nats-Rollup` header anywhere but on a
/// heartbeat subject (where older invalbus nodes sent `sub`). invalbus never sends one and the
/// stream refuses them, so this is seen only on a stream made by an older invalbus that no node
/// of this version has updated yet, where the server honours one from any client that may
/// publish on the stream's subjects. This node had applied what was erased (the follower reads
/// in order), so its caches are sound; the audit log's records are what is lost.
fn erasure(inner: &BusInner, msg: &async_nats::jetstream::Message, seq: u64) {
    let Some(rollup) = msg
        .headers
        .as_ref()
        .and_then(|h| h.get(async_nats::header::NATS_ROLLUP))
    else {
        return;
    };
    if matches!(inner.subjects.parse(msg.subject.as_str()), Some(("hb", _))) && rollup.as_str() == "sub" {
        return;
    }
    inner.metrics.stream_erasures.inc();
    tracing::error!(node = %inner.node_id, subject = %msg.subject, seq, rollup = rollup.as_str(),
        "a message with a Nats-Rollup header erased stored batches of the stream: audit records before it are gone (give publish rights on the namespace only to trusted processes)");
}

/// Whether the follower may go on to `seq` from where it stands. Sequences it skipped must be
/// heartbeats trimmed since (harmless), or gone from the stream (flush); a batch skipped, or
/// a leader that cannot say, makes it read again from the hole, and nothing after the hole is
/// taken (so no evidence either) until then.
async fn hole_checked(inner: &BusInner, f: &mut Follower, seq: u64) -> bool {
    let Some(d) = &inner.durable else {
        return true;
    };
    let mut from = f.next;
    while seq > from {
        match f.check_hole(from, seq, d.config.ack_timeout).await {
            Hole::Harmless => break,
            Hole::Clipped { first } => {
                inner.metrics.gaps.inc();
                inner.flush_all(&format!(
                    "the stream no longer holds #{from}..#{} (it starts at #{first}): retention passed before this node read them",
                    first.min(seq) - 1
                ));
                from = first.min(seq);
            }
            Hole::Skipped { batch } => {
                inner.metrics.follower_rereads.inc();
                tracing::warn!(node = %inner.node_id, from, to = seq, batch, "the stream consumer skipped a stored batch; reading again from the hole");
                f.next = from;
                f.reread();
                return false;
            }
            Hole::Unknown(e) => {
                inner.metrics.follower_rereads.inc();
                tracing::warn!(node = %inner.node_id, from, to = seq, error = %e, "cannot check what the stream consumer skipped; reading again from the hole");
                f.next = from;
                f.reread();
                return false;
            }
        }
    }
    true
}

/// The test hook that makes this node never apply some peers' batches.
fn dropped_by_test_hook(inner: &BusInner) -> bool {
    inner
        .faults
        .drop_batches
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
        .is_ok()
}

/// Whether a batch is tracked (its sequence, receipts, the applied record) or only applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tracking {
    /// A trusted batch: applied, announced to the receipts and followers.
    Tracked,
    /// A contested batch ([`contested`]): its invalidations are applied and followers hear of
    /// them, nothing else.
    ApplyOnly,
}

/// Applies a peer's batch to the caches and, unless it is contested, announces it (receipts,
/// the applied record); followers of the cache events hear of it either way.
async fn apply_batch(inner: &BusInner, batch: &BatchRef<'_>, path: Path, tracking: Tracking) {
    let span = tracing::debug_span!("apply", node = %inner.node_id, origin = %batch.origin, epoch = batch.epoch, seq = batch.seq, ?path);
    async {
        let mut dropped = 0;
        let mut flushed = false;
        let mut pending = PendingDrops::default();
        let mut purge_ids = Vec::new();
        // Batches usually name one cache throughout: look it up once per run of the same name.
        let mut resolved_for: Option<Option<&str>> = None;
        let mut caches = Vec::new();
        for inv in &batch.invalidations {
            let name = inv.cache;
            if resolved_for != Some(name) {
                caches = inner.targets(name);
                resolved_for = Some(name);
            }
            if caches.is_empty() && name.is_some() {
                inner.metrics.unknown_cache.inc();
            }
            for c in &caches {
                let out = apply_to(c, inv.target, inv.version, &mut pending).await;
                dropped += out.dropped;
                flushed |= out.flushed;
            }
            if !inv.purge_id.is_empty() {
                purge_ids.push(inv.purge_id.to_owned());
            }
        }
        inner.event(|| CacheEvent::Invalidated(batch.invalidations.iter().map(|i| i.to_invalidation()).collect()));
        if tracking == Tracking::ApplyOnly {
            return;
        }
        let applied_us = now_us();
        inner.metrics.batches_received.inc();
        inner
            .metrics
            .invalidations_received
            .add(batch.invalidations.len() as u64);
        // Publish to applied here, by whichever path came first.
        inner
            .metrics
            .propagation
            .record(applied_us.saturating_sub(batch.timestamp_us));
        let _ = inner.applied.send(Applied {
            origin: batch.origin.to_owned(),
            epoch: batch.epoch,
            seq: batch.seq,
            published_us: batch.timestamp_us,
            applied_us,
            invalidations: batch.invalidations.len(),
            dropped,
            flushed,
            purge_ids,
            pending,
        });
    }
    .instrument(span)
    .await
}

/// How often the watchdog looks at the gate and the peer table.
const WATCHDOG_TICK: Duration = Duration::from_millis(10);

/// Reports the gate's changes (log, [`CacheEvent::NotServing`]) and expires silent peers. The
/// gate itself needs no watchdog: every read checks the clock.
pub(crate) async fn watchdog(inner: Arc<BusInner>, mut shutdown: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(WATCHDOG_TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut next_expiry = 0u64;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.wait_for(|s| *s) => return,
        }
        match inner.gate.poll() {
            Some(false) => {
                inner.event(|| CacheEvent::NotServing);
                tracing::warn!(node = %inner.node_id, "caches stop serving: no fresh evidence that this node has applied every accepted invalidation")
            }
            Some(true) => tracing::info!(node = %inner.node_id, "caches serve"),
            None => {}
        }
        let now = inner.gate.now();
        if now >= next_expiry {
            next_expiry = now + 1_000_000_000;
            let gone = inner.peers().expire(now);
            if !gone.is_empty() {
                let mut origins = inner.origins();
                for id in &gone {
                    origins.forget(id);
                }
                drop(origins);
                tracing::info!(node = %inner.node_id, peers = ?gone, "peers silent for too long forgotten");
            }
        }
    }
}
