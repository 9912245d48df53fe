//! Throughput: invalidations applied per second against raw NATS + moka doing the same work,
//! and durable publishing against a raw JetStream twin that batches alike.

use crate::common::*;
use bytes::Bytes;
use futures::StreamExt;
use invalbus::{Bus, Cache, CacheConfig};
use invalbus_tests::NatsServer;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Invalidations per second applied at each of 3 peers, keys absent or present there, against
/// a raw twin doing the same work under the same scheduling: raw NATS carrying the same keys in
/// the same number of messages to 3 subscribers, each of which invalidates every key of a
/// message in its own raw moka cache (filled alike) and yields between messages, as a bus's
/// receiver does. The origin publishes in bulk calls of [`BULK`] keys (the twin's messages are
/// built before its clock starts); with signatures on, a second row has it make one
/// `invalidate_key` call per key, its own cost on the same 2 cores included. The two sides alternate in `rounds`; the median of each is kept. With keys
/// present, Redis tracking joins the rounds: a Redis writer invalidates only by writing, so its
/// `SET`s (stored on the server) stand beside the bus's invalidations of keys the peers hold.
pub(crate) async fn throughput(
    url: &str,
    n: usize,
    rounds: usize,
    configs: &[(bool, bool)],
    redis: &mut Option<crate::redis::Tracking>,
    rows: &mut Vec<Row>,
) {
    for (present, signed) in configs.iter().copied() {
        // Present keys cost a removal each on both sides: a fifth as many keep the run short.
        let n = if present { n / 5 } else { n };
        let ks = Arc::new(keys(n));
        let origin = nats_bus_signed(url, &format!("t-origin-{present}-{signed}"), signed).await;
        let cache: Cache<Bytes> = origin.cache("tp", CacheConfig::new(2 * n as u64)).unwrap();
        let mut peers = Vec::new();
        for p in 0..3 {
            let b = nats_bus_signed(url, &format!("t-{present}-{signed}-{p}"), signed).await;
            let c: Cache<Bytes> = b.cache("tp", CacheConfig::new(2 * n as u64)).unwrap();
            peers.push((b, c));
        }
        let (mut ours, mut theirs, mut messages, mut tracking) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let mut single_calls = Vec::new();
        for _ in 0..rounds {
            // The apply path's figure: the origin publishes in bulk calls, so that its own cost
            // (one call per key, on the same 2 cores) does not stand in for the peers'.
            let (rate, batches) = apply_rate(&origin, &cache, &peers, &ks, present, Publish::Bulk).await;
            ours.push(rate);
            messages.push(batches);
            theirs.push(raw_apply_throughput(url, &ks, batches, present).await);
            if !present && signed {
                single_calls.push(
                    apply_rate(&origin, &cache, &peers, &ks, present, Publish::OneCallPerKey)
                        .await
                        .0,
                );
            }
            if let Some(rate) = match redis.as_mut() {
                Some(r) if present => r.flood(n).await,
                _ => None,
            } {
                tracking.push(rate);
            }
        }
        let (o, r) = (median(ours), median(theirs));
        let batches = messages[messages.len() / 2];
        let twin = "raw: NATS + moka, same messages";
        if present {
            rows.push(row(
                format!("throughput: present keys, keys/s at each of 3 peers ({twin})"),
                o,
                r,
                "keys/s",
                r / o,
                ">= 0.9 x raw",
                Some(o >= 0.9 * r),
            ));
            if tracking.len() == rounds {
                let t = median(tracking);
                rows.push(row(
                    "redis tracking: keys/s per reader, 3 readers (invalbus: present keys)",
                    o,
                    t,
                    "keys/s",
                    t / o,
                    "report",
                    None,
                ));
            }
        } else {
            if !single_calls.is_empty() {
                let t = median(single_calls);
                rows.push(row(
                    "throughput: absent keys, one invalidate_key call per key (the origin's cost included)",
                    t,
                    r,
                    "keys/s",
                    r / t,
                    "report",
                    None,
                ));
            }
            rows.push(row(
                format!(
                    "throughput: absent keys, keys/s at each of 3 peers (~{batches} batches; {twin}){}",
                    if signed { "" } else { ", UNSIGNED (signing's cost)" }
                ),
                o,
                r,
                "keys/s",
                r / o,
                if signed {
                    ">= 2M/s per peer (issue 11: 1M/s)"
                } else {
                    "-"
                },
                signed.then_some(o >= 2_000_000.0),
            ));
        }
        origin.shutdown().await;
        for (b, _) in peers {
            b.shutdown().await;
        }
    }
}

/// How the origin publishes in [`apply_rate`].
#[derive(Clone, Copy, PartialEq, Eq)]
enum Publish {
    /// `Cache::invalidate_keys` with [`BULK`] keys a call.
    Bulk,
    /// `Cache::invalidate_key` once per key.
    OneCallPerKey,
}

/// Keys per bulk call.
const BULK: usize = 1024;

/// One round: `keys` invalidated at the origin (filled first at the peers when `present`);
/// keys/s applied at the slowest peer, and the number of batches the origin published.
async fn apply_rate(
    origin: &Bus,
    cache: &Cache<Bytes>,
    peers: &[(Bus, Cache<Bytes>)],
    keys: &Arc<Vec<String>>,
    present: bool,
    publish: Publish,
) -> (f64, usize) {
    let n = keys.len();
    if present {
        for (_, c) in peers {
            fill(c, keys, |_| Vec::new()).await;
        }
    }
    let received: Vec<u64> = peers.iter().map(|(b, _)| b.stats().invalidations_received).collect();
    let published = origin.stats().batches_published;
    let start = Instant::now();
    match publish {
        Publish::Bulk => {
            for chunk in keys.chunks(BULK) {
                while cache.invalidate_keys(chunk).await.is_err() {
                    tokio::task::yield_now().await;
                }
            }
        }
        Publish::OneCallPerKey => {
            for k in keys.iter() {
                while cache.invalidate_key(k).await.is_err() {
                    tokio::task::yield_now().await;
                }
            }
        }
    }
    let mut rate = f64::INFINITY;
    for ((b, _), before) in peers.iter().zip(received) {
        let deadline = Instant::now() + Duration::from_secs(120);
        while b.stats().invalidations_received < before + n as u64 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        rate = rate.min(n as f64 / start.elapsed().as_secs_f64());
    }
    if present {
        // Every peer must really have dropped every key, or the rate means nothing.
        for (_, c) in peers {
            c.run_pending_tasks().await;
            assert_eq!(c.entry_count(), 0, "a peer kept keys that were invalidated");
        }
    }
    let batches = (origin.stats().batches_published - published).max(1) as usize;
    (rate, batches)
}

/// The raw twin of [`throughput`]: `keys` sent in `messages` NATS messages (newline-separated)
/// to 3 subscribers; each invalidates every key of a message in its own moka cache (holding
/// every key when `present`) and yields once per message. Keys/s at the slowest subscriber.
pub(crate) async fn raw_apply_throughput(url: &str, keys: &Arc<Vec<String>>, messages: usize, present: bool) -> f64 {
    let subject = "bench.raw.tp";
    let publisher = async_nats::connect(url).await.expect("raw publisher");
    let per = keys.len().div_ceil(messages.max(1));
    let payloads: Vec<Bytes> = keys.chunks(per).map(|c| Bytes::from(c.join("\n"))).collect();
    let mut tasks = Vec::new();
    for _ in 0..3 {
        let raw: moka::future::Cache<String, Bytes> = moka::future::Cache::builder()
            .max_capacity(2 * keys.len() as u64)
            .time_to_live(Duration::from_secs(300))
            .build();
        if present {
            for (i, k) in keys.iter().enumerate() {
                raw.insert(k.clone(), value(i)).await;
            }
            raw.run_pending_tasks().await;
        }
        let c = async_nats::ConnectOptions::new()
            .subscription_capacity(1 << 20)
            .connect(url)
            .await
            .expect("raw subscriber");
        let mut s = c.subscribe(subject).await.expect("raw subscribe");
        c.flush().await.ok();
        let expected = payloads.len();
        tasks.push(tokio::spawn(async move {
            let mut n = 0;
            while n < expected {
                match tokio::time::timeout(Duration::from_secs(5), s.next()).await {
                    Ok(Some(m)) => {
                        for k in m.payload.split(|b| *b == b'\n') {
                            raw.invalidate(std::str::from_utf8(k).unwrap_or_default()).await;
                        }
                        n += 1;
                        tokio::task::yield_now().await;
                    }
                    _ => break,
                }
            }
            raw.run_pending_tasks().await;
            let kept = if present { raw.entry_count() } else { 0 };
            drop(c);
            (n, kept, Instant::now())
        }));
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let start = Instant::now();
    for p in &payloads {
        let _ = publisher.publish(subject, p.clone()).await;
    }
    publisher.flush().await.ok();
    let mut worst = f64::INFINITY;
    for t in tasks {
        match t.await {
            Ok((n, 0, end)) if n == payloads.len() => {
                worst = worst.min(keys.len() as f64 / end.duration_since(start).as_secs_f64());
            }
            Ok((n, kept, _)) => {
                // A twin that lost messages would look faster than it is: no figure then.
                println!(
                    "  (raw twin: a subscriber got {n} of {} messages and kept {kept} keys; no raw figure this round)",
                    payloads.len()
                );
                worst = f64::NAN;
            }
            Err(_) => worst = f64::NAN,
        }
    }
    worst
}

/// Invalidations per second acknowledged by JetStream, against two raw twins publishing with a
/// window of 256 acknowledgements in flight: one that sends the same keys in the same number of
/// messages as the bus did (the fair twin), and one that sends one message per invalidation (the
/// row that shows what batching gains). Alternated in `rounds`, the median of each kept.
pub(crate) async fn durable(n: usize, rounds: usize, rows: &mut Vec<Row>) {
    let server = NatsServer::start_jetstream().await;
    let url = server.url();
    let bus = Bus::builder()
        .nats(url.as_str())
        .namespace("benchjs")
        .node_id("durable")
        .outbound_queue(1 << 22)
        .jetstream(invalbus::JetStreamConfig::default())
        .build()
        .await
        .expect("durable bus");
    let cache: Cache<Bytes> = bus.cache("d", CacheConfig::new(1000)).unwrap();
    let client = async_nats::connect(url.as_str()).await.expect("raw js client");
    let js = async_nats::jetstream::new(client);
    js.get_or_create_stream(async_nats::jetstream::stream::Config {
        name: "RAWBENCH".into(),
        subjects: vec!["rawbench.>".into()],
        ..Default::default()
    })
    .await
    .expect("raw stream");
    let ks = keys(n);
    let single = Bytes::from(vec![1u8; single_batch_len()]);
    let (mut ours, mut batched, mut single_rate, mut messages) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for _ in 0..rounds {
        let published = bus.stats().batches_published;
        let start = Instant::now();
        let mut tickets = Vec::with_capacity(n);
        for k in &ks {
            if let Ok(t) = cache.invalidate_key(k).await {
                tickets.push(t);
            }
        }
        let mut ok = 0;
        for t in tickets {
            if t.published().await.is_ok() {
                ok += 1;
            }
        }
        ours.push(ok as f64 / start.elapsed().as_secs_f64());
        let batches = (bus.stats().batches_published - published).max(1) as usize;
        messages.push(batches);
        // The twin builds its messages inside the timing too, as the bus does.
        let start = Instant::now();
        let per = n.div_ceil(batches);
        let payloads: Vec<Bytes> = ks.chunks(per).map(|c| Bytes::from(c.join("\n"))).collect();
        let acked = raw_js_publish(&js, &payloads).await;
        batched.push((acked * per).min(n) as f64 / start.elapsed().as_secs_f64());
        let start = Instant::now();
        let payloads = vec![single.clone(); n];
        single_rate.push(raw_js_publish(&js, &payloads).await as f64 / start.elapsed().as_secs_f64());
    }
    bus.shutdown().await;
    let (o, b, s) = (median(ours), median(batched), median(single_rate));
    let batches = messages[messages.len() / 2];
    rows.push(row(
        format!("durable publish: inv/s acked by JetStream (~{batches} msgs; raw: same msgs)"),
        o,
        b,
        "inv/s",
        b / o,
        "report",
        None,
    ));
    rows.push(row(
        "durable publish: batching's gain (raw: 1 msg per invalidation)",
        o,
        s,
        "inv/s",
        s / o,
        "report",
        None,
    ));
}

/// Messages that JetStream acknowledged, published with 256 acknowledgements in flight.
pub(crate) async fn raw_js_publish(js: &async_nats::jetstream::Context, payloads: &[Bytes]) -> usize {
    let mut window = std::collections::VecDeque::new();
    let mut acked = 0;
    for p in payloads {
        if let Ok(f) = js.publish("rawbench.x", p.clone()).await {
            window.push_back(f);
        }
        if window.len() >= 256 {
            if let Some(f) = window.pop_front() {
                acked += usize::from(f.await.is_ok());
            }
        }
    }
    for f in window {
        acked += usize::from(f.await.is_ok());
    }
    acked
}
