//! The soak's load: the pacer, the rolling origins, and the tasks that trace invalidations to
//! every node and read.

use super::*;

/// The pacer: what is due every tick, spread over the live origins.
pub(super) async fn pace(
    steady: Origin,
    mut live: watch::Receiver<Vec<Origin>>,
    keys: Arc<[String]>,
    end: Instant,
    counts: Arc<Counts>,
    traced: mpsc::Sender<(Arc<str>, u64, Ticket)>,
) {
    let mut rng = SmallRng::seed_from_u64(7);
    let start = Instant::now();
    // Invalidations sent or given up; the origin and tracing go by this ordinal.
    let mut done = 0u64;
    let mut fresh = 0u64;
    let mut rolling: Vec<Origin> = Vec::new();
    while Instant::now() < end {
        if live.has_changed().unwrap_or(false) {
            rolling = live.borrow_and_update().clone();
        }
        let due = start.elapsed().as_micros() as u64 * RATE / 1_000_000;
        let mut owed = due.saturating_sub(done);
        if owed > MAX_BACKLOG {
            counts.given_up.fetch_add(owed - MAX_BACKLOG, Ordering::Relaxed);
            done += owed - MAX_BACKLOG;
            owed = MAX_BACKLOG;
        }
        if owed == 0 {
            tokio::time::sleep(Duration::from_millis(1)).await;
            continue;
        }
        for _ in 0..owed.min(BURST) {
            // Slots 0 and 1 of every five go to the rolling origins, when there are some.
            let slot = (done % 5) as usize;
            let origin = if slot < 2 { rolling.get(slot) } else { None }.unwrap_or(&steady);
            let r = mix_slot(done);
            let target = if r < MIX_TAG {
                Target::Tag(format!("g{}", rng.random_range(0..TAGS)))
            } else if r < MIX_TAG + MIX_FRESH_TAG {
                fresh += 1;
                Target::Tag(format!("x{fresh}"))
            } else if r < MIX_TAG + MIX_FRESH_TAG + MIX_PREFIX {
                fresh += 1;
                if fresh.is_multiple_of(2) {
                    Target::Prefix(format!("key:000{:03}", rng.random_range(0..PREFIXES)))
                } else {
                    Target::Prefix(format!("z{fresh}"))
                }
            } else {
                Target::Key(keys[rng.random_range(0..keys.len())].clone())
            };
            let at = crate::now_us();
            let call = Instant::now();
            let result = origin.bus.invalidate(Invalidation::new(Some(CACHE), target)).await;
            counts
                .call_ns
                .fetch_add(call.elapsed().as_nanos() as u64, Ordering::Relaxed);
            match result {
                Ok(t) => {
                    counts.sent.fetch_add(1, Ordering::Relaxed);
                    if std::ptr::eq(origin, &steady) {
                        counts.steady_sent.fetch_add(1, Ordering::Relaxed);
                    }
                    if done.is_multiple_of(TRACE_EVERY) && traced.try_send((origin.id.clone(), at, t)).is_err() {
                        counts.untraced.fetch_add(1, Ordering::Relaxed);
                    }
                }
                Err(InvalidateError::QueueFull(_)) => {
                    counts.queue_full.fetch_add(1, Ordering::Relaxed);
                }
                // A rolling origin shutting down while this batch of sends still held it.
                Err(InvalidateError::Closed) => {
                    counts.closed.fetch_add(1, Ordering::Relaxed);
                }
                Err(_) => {
                    counts.refused.fetch_add(1, Ordering::Relaxed);
                }
            }
            done += 1;
        }
        tokio::task::yield_now().await;
    }
}

/// Starts a rolling origin every `ROLL_EVERY` until `end`.
pub(super) async fn roll(
    url: String,
    live: watch::Sender<Vec<Origin>>,
    rolled: Arc<Mutex<Vec<Rolled>>>,
    broken: Arc<Mutex<Vec<String>>>,
    end: Instant,
    mut stop: watch::Receiver<bool>,
) {
    let live = Arc::new(live);
    let start = Instant::now();
    let mut lives = Vec::new();
    for n in 0u32.. {
        let at = start + ROLL_EVERY * n;
        if at >= end {
            break;
        }
        tokio::select! {
            _ = tokio::time::sleep_until(at.into()) => {}
            _ = stop.wait_for(|s| *s) => break,
        }
        lives.push(tokio::spawn(rolling_origin(
            url.clone(),
            format!("soak-roll-{n}"),
            live.clone(),
            rolled.clone(),
            broken.clone(),
            stop.clone(),
        )));
    }
    for l in lives {
        let _ = l.await;
    }
}

/// One rolling origin: starts, publishes its share for `ROLL_LIFE`, shuts down.
async fn rolling_origin(
    url: String,
    id: String,
    live: Arc<watch::Sender<Vec<Origin>>>,
    rolled: Arc<Mutex<Vec<Rolled>>>,
    broken: Arc<Mutex<Vec<String>>>,
    mut stop: watch::Receiver<bool>,
) {
    let index = {
        let mut r = rolled.lock().unwrap();
        r.push(Rolled {
            id: id.clone(),
            started: Instant::now(),
            ended: None,
        });
        r.len() - 1
    };
    match build_bus(&url, &id).await {
        Ok(bus) => {
            let origin = Origin {
                id: Arc::from(id.as_str()),
                bus: bus.clone(),
            };
            live.send_modify(|v| v.push(origin));
            tokio::select! {
                _ = tokio::time::sleep(ROLL_LIFE) => {}
                _ = stop.wait_for(|s| *s) => {}
            }
            live.send_modify(|v| v.retain(|o| *o.id != *id));
            bus.shutdown().await;
        }
        Err(e) => broken
            .lock()
            .unwrap()
            .push(format!("rolling origin {id} did not start: {e}")),
    }
    rolled.lock().unwrap()[index].ended = Some(Instant::now());
}

/// Waits for each traced ticket's publish, in order, and passes its batch's sequence on.
pub(super) async fn resolve(
    mut traced: mpsc::Receiver<(Arc<str>, u64, Ticket)>,
    sent: mpsc::UnboundedSender<Sent>,
    counts: Arc<Counts>,
) {
    while let Some((origin, at_us, ticket)) = traced.recv().await {
        match ticket.published().await {
            Ok(p) => {
                let _ = sent.send(Sent {
                    origin,
                    seq: p.seq,
                    at_us,
                });
            }
            Err(_) => {
                counts.publish_errors.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// Where one batch has been applied.
struct Seen {
    /// Bit `i`: node `i` applied it.
    nodes: u8,
    last_us: u64,
    first: Instant,
}

const ALL_NODES: u8 = (1u8 << NODES) - 1;

/// Joins the traced invalidations with the nodes' applied batches; answers each ask with the
/// window's latencies and starts a new window. Ends when the asks' sender is dropped.
pub(super) async fn join(
    applied: Vec<broadcast::Receiver<Applied>>,
    mut sent: mpsc::UnboundedReceiver<Sent>,
    mut asks: mpsc::Receiver<oneshot::Sender<Window>>,
) {
    enum Event {
        Applied(usize, Applied),
        Lagged(u64),
    }
    let mut events = futures::stream::select_all(applied.into_iter().enumerate().map(|(i, rx)| {
        futures::stream::unfold(rx, move |mut rx| async move {
            match rx.recv().await {
                Ok(a) => Some((Event::Applied(i, a), rx)),
                Err(broadcast::error::RecvError::Lagged(n)) => Some((Event::Lagged(n), rx)),
                Err(broadcast::error::RecvError::Closed) => None,
            }
        })
        .boxed()
    }));
    let new_hist = crate::histogram;
    let mut hist = new_hist();
    let (mut missing, mut lagged) = (0u64, 0u64);
    // Batches are kept after they complete, for traced invalidations resolved later (several
    // may share a batch); both maps forget after `TRACE_PATIENCE`.
    let mut seen: HashMap<(String, u64), Seen> = HashMap::new();
    let mut waiting: HashMap<(String, u64), (Vec<u64>, Instant)> = HashMap::new();
    let mut sweep = tokio::time::interval(Duration::from_secs(1));
    let mut sent_open = true;
    loop {
        tokio::select! {
            Some(ev) = events.next() => match ev {
                Event::Applied(i, a) => {
                    let key = (a.origin, a.seq);
                    let s = seen.entry(key.clone()).or_insert(Seen { nodes: 0, last_us: 0, first: Instant::now() });
                    s.nodes |= 1 << i;
                    s.last_us = s.last_us.max(a.applied_us);
                    if s.nodes == ALL_NODES {
                        if let Some((ats, _)) = waiting.remove(&key) {
                            for at in ats {
                                hist.saturating_record(s.last_us.saturating_sub(at).max(1));
                            }
                        }
                    }
                }
                Event::Lagged(n) => lagged += n,
            },
            s = sent.recv(), if sent_open => match s {
                Some(s) => {
                    let key = (s.origin.to_string(), s.seq);
                    match seen.get(&key) {
                        Some(done) if done.nodes == ALL_NODES => {
                            hist.saturating_record(done.last_us.saturating_sub(s.at_us).max(1));
                        }
                        _ => waiting.entry(key).or_insert_with(|| (Vec::new(), Instant::now())).0.push(s.at_us),
                    }
                }
                None => sent_open = false,
            },
            _ = sweep.tick() => {
                seen.retain(|_, s| s.first.elapsed() < TRACE_PATIENCE);
                waiting.retain(|_, (ats, since)| {
                    let keep = since.elapsed() < TRACE_PATIENCE;
                    if !keep {
                        missing += ats.len() as u64;
                    }
                    keep
                });
            }
            ask = asks.recv() => match ask {
                Some(reply) => {
                    let _ = reply.send(Window {
                        hist: std::mem::replace(&mut hist, new_hist()),
                        missing: std::mem::take(&mut missing),
                        lagged: std::mem::take(&mut lagged),
                    });
                }
                None => return,
            },
        }
    }
}

/// One node's reader: `get_or_load` on random keys as fast as it gets to run.
pub(super) async fn read(
    cache: Cache<Bytes>,
    keys: Arc<[String]>,
    reading: Arc<AtomicBool>,
    counts: Arc<Counts>,
    seed: u64,
) {
    let mut rng = SmallRng::seed_from_u64(seed);
    while reading.load(Ordering::Relaxed) {
        for _ in 0..64 {
            let i = rng.random_range(0..keys.len());
            let _ = cache
                .get_or_load(&keys[i], || async move {
                    Ok::<_, std::io::Error>(Loaded::new(crate::value(i)).tag(format!("g{}", i % TAGS)))
                })
                .await;
        }
        counts.reads.fetch_add(64, Ordering::Relaxed);
        // Let the buses' tasks and the pacer run between bursts: two cores for everything.
        tokio::task::yield_now().await;
    }
}
