//! The sidecar's `Watch` stream: what this node's caches apply, as they apply it, for a client's
//! in-process cache (L1), with keepalives that say how long the node vouches for its caches.
//!
//! # Why a client's copy stays within the node's bound
//! The stream subscribes to the bus's events before it sends anything, so every invalidation
//! applied after the first keepalive is on it, in the order applied, after it took effect here.
//! A keepalive goes out every [`KEEPALIVE`] with `Bus::vouched_for`: a client serves its copy
//! until `received + vouched_for`, which is never later than the node itself would stop serving
//! plus the keepalive's delivery. When the node stops serving (cut off, repairing) the stream
//! says `not_serving` at once and on every tick until it serves again; a flush says `flushed`;
//! a stream that falls behind the bus's event queue is ended with DATA_LOSS (the client drops
//! its copy and reconnects), never continued with a hole. Tested from Python by
//! `clients/python/tests/test_local.py` and the coherence checker (`test_coherence.py`).

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use invalbus::{CacheEvent, Target};
use tokio::sync::{broadcast, mpsc, watch};
use tonic::Status;

use crate::pb::cache::{invalidated, watch_event, Invalidated, Invalidations, Keepalive, WatchEvent};
use crate::state::NodeState;

/// How often a keepalive goes out.
pub const KEEPALIVE: Duration = Duration::from_millis(100);
/// Events buffered for one slow client before it falls behind the bus and is cut off.
const BUFFER: usize = 1024;

/// The stream type of `Watch`.
pub type WatchStream = Pin<Box<dyn Stream<Item = Result<WatchEvent, Status>> + Send>>;

fn event(e: watch_event::Event) -> Result<WatchEvent, Status> {
    Ok(WatchEvent { event: Some(e) })
}

/// The events of `cache` on this node, until the client goes away or falls behind, or `stop`
/// turns true (the node shuts down).
pub fn watch(state: Arc<NodeState>, cache: String, mut stop: watch::Receiver<bool>) -> WatchStream {
    // Subscribed before the task starts: nothing applied after this call is missed.
    let mut events = state.bus.subscribe_events();
    let (tx, rx) = mpsc::channel(BUFFER);
    state
        .counters
        .watch_streams
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(KEEPALIVE);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let out = tokio::select! {
                // The keepalive before events: under a steady flow of events it would otherwise
                // never go out, and the client would stop serving. A keepalive may overtake an
                // event already applied and queued here by the few microseconds it takes to
                // send both (the "stream delivery" of the bound).
                biased;
                _ = tx.closed() => break,
                _ = crate::audit::stopped(&mut stop) => {
                    let _ = tx.send(Err(Status::unavailable("the node is shutting down"))).await;
                    break;
                }
                _ = tick.tick() => match state.bus.vouched_for() {
                    Some(d) => event(watch_event::Event::Keepalive(Keepalive {
                        vouched_for_ms: d.as_millis() as u64,
                    })),
                    None => event(watch_event::Event::NotServing(true)),
                },
                ev = events.recv() => match ev {
                    Ok(CacheEvent::Invalidated(invs)) => {
                        let items: Vec<Invalidated> = invs
                            .iter()
                            .filter(|i| i.cache.as_deref().is_none_or(|c| c == cache))
                            .map(|i| Invalidated {
                                target: Some(match &i.target {
                                    Target::Key(k) => invalidated::Target::Key(k.clone()),
                                    Target::Tag(t) => invalidated::Target::Tag(t.clone()),
                                    Target::Prefix(p) => invalidated::Target::Prefix(p.clone()),
                                    Target::All => invalidated::Target::All(true),
                                }),
                                version: i.version,
                            })
                            .collect();
                        if items.is_empty() {
                            continue;
                        }
                        event(watch_event::Event::Invalidated(Invalidations { items }))
                    }
                    Ok(CacheEvent::Flushed { cache: c, .. }) => {
                        if c.as_deref().is_some_and(|c| c != cache) {
                            continue;
                        }
                        event(watch_event::Event::Flushed(true))
                    }
                    Ok(CacheEvent::NotServing) => event(watch_event::Event::NotServing(true)),
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        state.counters.watch_lagged.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        tracing::warn!(cache = %cache, missed = n, "a Watch stream fell behind the node's events: ended");
                        let _ = tx
                            .send(Err(Status::data_loss(format!(
                                "the stream fell {n} events behind: drop the copy and watch again"
                            ))))
                            .await;
                        break;
                    }
                    Err(broadcast::error::RecvError::Closed) => {
                        let _ = tx.send(Err(Status::unavailable("the node is shutting down"))).await;
                        break;
                    }
                },
            };
            if tx.send(out).await.is_err() {
                break;
            }
        }
    });
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
}
