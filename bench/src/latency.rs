//! Propagation: invalbus against raw NATS (and Redis tracking) at a steady rate, alternated in
//! rounds, and fan-out to many peers.

use crate::common::*;
use bytes::Bytes;
use futures::StreamExt;
use invalbus::{Cache, CacheConfig};
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// Publish-to-applied-on-all-peers latency, paced at `rate` per second for `secs`.
pub(crate) async fn propagation_invalbus(
    url: &str,
    peers: usize,
    rate: u64,
    secs: u64,
    tag: &str,
    signed: bool,
) -> hdrhistogram::Histogram<u64> {
    let origin = nats_bus_signed(url, &format!("p-{tag}-origin"), signed).await;
    let cache: Cache<Bytes> = origin.cache("prop", CacheConfig::new(1000)).unwrap();
    let mut applied = Vec::new();
    let mut buses = Vec::new();
    for p in 0..peers {
        let b = nats_bus_signed(url, &format!("p-{tag}-{p}"), signed).await;
        let _c: Cache<Bytes> = b.cache("prop", CacheConfig::new(1000)).unwrap();
        applied.push(b.subscribe_applied());
        buses.push(b);
    }
    // Per batch seq: (applications seen, latest applied_us).
    let collector = tokio::spawn(async move {
        let mut seen: HashMap<u64, (usize, u64)> = HashMap::new();
        let mut streams = futures::stream::select_all(applied.into_iter().map(|rx| {
            futures::stream::unfold(rx, |mut rx| async move {
                loop {
                    match rx.recv().await {
                        Ok(a) => return Some((a, rx)),
                        Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                        Err(_) => return None,
                    }
                }
            })
            .boxed()
        }));
        let deadline = tokio::time::sleep(Duration::from_secs(secs + 5));
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                Some(a) = streams.next() => {
                    let e = seen.entry(a.seq).or_insert((0, 0));
                    e.0 += 1;
                    e.1 = e.1.max(a.applied_us);
                }
                _ = &mut deadline => break,
            }
        }
        seen
    });
    let total = rate * secs;
    let mut calls = Vec::with_capacity(total as usize);
    let start = Instant::now();
    for i in 0..total {
        let due = start + Duration::from_nanos(i * 1_000_000_000 / rate);
        let now = Instant::now();
        if due > now + Duration::from_micros(200) {
            tokio::time::sleep(due - now).await;
        }
        let at = now_us();
        if let Ok(t) = cache.invalidate_key(&format!("k{i}")).await {
            calls.push((at, t));
        }
    }
    let mut sent = Vec::with_capacity(calls.len());
    for (at, t) in calls {
        if let Ok(p) = t.published().await {
            sent.push((at, p.seq));
        }
    }
    let seen = collector.await.unwrap_or_default();
    let mut h = histogram();
    let mut missing = 0;
    for (at, seq) in sent {
        match seen.get(&seq) {
            Some((n, done)) if *n == peers => h.saturating_record(done.saturating_sub(at).max(1)),
            _ => missing += 1,
        }
    }
    if missing > 0 {
        println!("  (note: {missing} invalidations were not seen applied on all {peers} peers within the window)");
    }
    origin.shutdown().await;
    for b in buses {
        b.shutdown().await;
    }
    h
}

/// Bytes per invalidation record in the raw twins' messages: its index and send time, and 8
/// bytes standing for the key.
pub(crate) const RAW_RECORD: usize = 24;

/// How the raw twin sends its invalidations.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Twin {
    /// One message per invalidation.
    OnePerMessage,
    /// As the bus batches: the caller's paced invalidations queue for one publishing task, which
    /// sends whatever has queued while it was busy as one message.
    Batching,
    /// Batching as above, each message signed by the publishing task with ed25519-dalek (its
    /// last 64 bytes, over the SHA-256 digest of the rest, as the bus signs) and verified by each
    /// subscriber before it counts it: the bus's batching and cryptography with nothing else of
    /// the bus.
    SignedBatching,
}

/// The same measurement with raw NATS: one publisher, `peers` subscriber connections, messages
/// of `envelope_len` bytes for one invalidation (and [`RAW_RECORD`] more for each further one).
pub(crate) async fn propagation_raw(
    url: &str,
    peers: usize,
    rate: u64,
    secs: u64,
    envelope_len: usize,
    twin: Twin,
) -> hdrhistogram::Histogram<u64> {
    use ed25519_dalek::{Signer as _, Verifier as _};
    use sha2::{Digest as _, Sha256};
    let subject = "bench.raw.prop";
    let publisher = async_nats::connect(url).await.expect("raw publisher");
    let signing = twin == Twin::SignedBatching;
    let key = ed25519_dalek::SigningKey::from_bytes(&[7u8; 32]);
    let verifying = key.verifying_key();
    let sig_len = if signing { ed25519_dalek::SIGNATURE_LENGTH } else { 0 };
    let prefix = envelope_len.saturating_sub(RAW_RECORD + sig_len);
    let mut subs = Vec::new();
    for _ in 0..peers {
        let c = async_nats::connect(url).await.expect("raw subscriber");
        let s = c.subscribe(subject).await.expect("raw subscribe");
        c.flush().await.ok();
        subs.push((c, s));
    }
    let total = rate * secs;
    let mut tasks = Vec::new();
    for (c, mut s) in subs {
        tasks.push(tokio::spawn(async move {
            let mut got: Vec<(u64, u64)> = Vec::with_capacity(total as usize);
            while got.len() < total as usize {
                match tokio::time::timeout(Duration::from_secs(5), s.next()).await {
                    Ok(Some(m)) => {
                        let body = &m.payload[..m.payload.len().saturating_sub(sig_len)];
                        if signing {
                            let sig = m.payload[body.len()..]
                                .try_into()
                                .map(ed25519_dalek::Signature::from_bytes);
                            let digest = Sha256::digest(body);
                            if !sig.is_ok_and(|sig| verifying.verify(&digest, &sig).is_ok()) {
                                continue;
                            }
                        }
                        let at = now_us();
                        for r in body.get(prefix..).unwrap_or_default().chunks_exact(RAW_RECORD) {
                            let i = u64::from_le_bytes(r[..8].try_into().unwrap_or([0; 8]));
                            let sent = u64::from_le_bytes(r[8..16].try_into().unwrap_or([0; 8]));
                            got.push((i, at.saturating_sub(sent)));
                        }
                    }
                    _ => break,
                }
            }
            drop(c);
            got
        }));
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    fn record(p: &mut Vec<u8>, i: u64, at: u64) {
        p.extend_from_slice(&i.to_le_bytes());
        p.extend_from_slice(&at.to_le_bytes());
        p.extend_from_slice(&[0u8; RAW_RECORD - 16]);
    }
    // With batching, the caller queues and one task publishes what queued while it was busy.
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(u64, u64)>();
    let batching = twin != Twin::OnePerMessage;
    let sender = batching.then(|| {
        let publisher = publisher.clone();
        tokio::spawn(async move {
            while let Some((i, at)) = rx.recv().await {
                let mut p = vec![0u8; prefix];
                record(&mut p, i, at);
                while let Ok((i, at)) = rx.try_recv() {
                    record(&mut p, i, at);
                }
                if signing {
                    let sig = key.sign(&Sha256::digest(&p));
                    p.extend_from_slice(&sig.to_bytes());
                }
                let _ = publisher.publish(subject, Bytes::from(p)).await;
            }
        })
    });
    let start = Instant::now();
    for i in 0..total {
        let due = start + Duration::from_nanos(i * 1_000_000_000 / rate);
        let now = Instant::now();
        if due > now + Duration::from_micros(200) {
            tokio::time::sleep(due - now).await;
        }
        if batching {
            let _ = tx.send((i, now_us()));
        } else {
            let mut p = vec![0u8; prefix];
            record(&mut p, i, now_us());
            let _ = publisher.publish(subject, Bytes::from(p)).await;
        }
    }
    drop(tx);
    if let Some(sender) = sender {
        let _ = sender.await;
    }
    publisher.flush().await.ok();
    let mut worst: HashMap<u64, (usize, u64)> = HashMap::new();
    for t in tasks {
        for (i, lat) in t.await.unwrap_or_default() {
            let e = worst.entry(i).or_insert((0, 0));
            e.0 += 1;
            e.1 = e.1.max(lat);
        }
    }
    let mut h = histogram();
    for (_, (n, lat)) in worst {
        if n == peers {
            h.saturating_record(lat.max(1));
        }
    }
    h
}

/// Publish-to-applied latency at 3 peers, at 5,000/s and 50,000/s, beside its raw NATS twin and
/// (at 5,000/s) the bus unsigned, a raw twin that signs and verifies as the bus does, and Redis
/// tracking's, alternated in `rounds` of `secs / rounds` each. The p50 and p99 rows are the
/// median over the rounds of each round's quantile, so that one round in which the machine
/// stalled (on a shared box, a raw p99 of 2 ms beside rounds of 0.5 ms) does not decide a
/// verdict; p99.9, which one round holds too few samples for, is taken from the rounds merged.
/// At 50,000/s the bus batches, so its twin batches the same way, and a second twin without
/// batching shows what batching gains.
pub(crate) async fn propagation(
    url: &str,
    secs: u64,
    rounds: u64,
    redis: &mut Option<crate::redis::Tracking>,
    rows: &mut Vec<Row>,
) {
    let len = single_batch_len();
    let per = (secs / rounds).max(1);
    for rate in [5_000u64, 50_000] {
        let (mut raw, mut ours, mut unsigned) = (Rounds::default(), Rounds::default(), Rounds::default());
        let (mut crypto, mut unbatched, mut tracking) = (Rounds::default(), Rounds::default(), Rounds::default());
        let mut redis_ok = redis.is_some() && rate == 5_000;
        for r in 0..rounds {
            let tag = format!("{rate}-{r}");
            let twin = if rate > 5_000 {
                Twin::Batching
            } else {
                Twin::OnePerMessage
            };
            raw.push(propagation_raw(url, 3, rate, per, len, twin).await);
            ours.push(propagation_invalbus(url, 3, rate, per, &tag, true).await);
            if rate == 5_000 {
                // The same without signatures, in the same run: what signing costs.
                unsigned.push(propagation_invalbus(url, 3, rate, per, &format!("{tag}u"), false).await);
                // And raw NATS batching and signing as the bus does: what the bus adds beyond that.
                crypto.push(propagation_raw(url, 3, rate, per, len, Twin::SignedBatching).await);
                if let Some(h) = redis.as_mut().filter(|_| redis_ok) {
                    match h.latency(rate, per).await {
                        Some(h) => tracking.push(h),
                        None => redis_ok = false,
                    }
                }
            } else {
                unbatched.push(propagation_raw(url, 3, rate, per, len, Twin::OnePerMessage).await);
            }
        }
        let twin = if rate > 5_000 {
            "raw: NATS, batching alike"
        } else {
            "raw: NATS"
        };
        let label = |name: &str| format!("propagation {name}, 3 peers, {rate}/s ({twin})");
        median_and_tail(rows, &ours, &raw, label, "<= 1.25 x raw NATS p99", |q, o, r| {
            (q == "p99").then_some(o <= 1.25 * r)
        });
        let (o, r) = (ours.merged(0.999), raw.merged(0.999));
        rows.push(row(
            format!("propagation p99.9, 3 peers, {rate}/s ({twin}; all rounds merged)"),
            o,
            r,
            "us",
            o / r,
            "-",
            None,
        ));
        if rate == 5_000 {
            let label = |name: &str| format!("propagation {name}, 3 peers, {rate}/s, UNSIGNED (signing's cost)");
            median_and_tail(rows, &unsigned, &raw, label, "-", |_, _, _| None);
            let label = |name: &str| {
                format!("propagation {name}, 3 peers, {rate}/s (raw: NATS batching alike + ed25519-dalek, sign and 3 verifies)")
            };
            median_and_tail(rows, &ours, &crypto, label, "report", |_, _, _| None);
            if redis_ok {
                let label = |name: &str| format!("redis tracking: SET to push at 3 readers {name}, {rate}/s");
                median_and_tail(rows, &ours, &tracking, label, "below Redis tracking", |_, o, t| {
                    Some(o < t)
                });
            }
        } else {
            let (o, u) = (ours.at(0.99), unbatched.at(0.99));
            rows.push(row(
                format!("propagation p99, 3 peers, {rate}/s: batching's gain (raw: 1 msg per inv.)"),
                o,
                u,
                "us",
                o / u,
                "report",
                None,
            ));
        }
    }
}

/// One side's latency histograms, one per alternated round.
#[derive(Default)]
struct Rounds(Vec<hdrhistogram::Histogram<u64>>);

impl Rounds {
    fn push(&mut self, h: hdrhistogram::Histogram<u64>) {
        self.0.push(h);
    }

    /// The median over the rounds of each round's quantile `q` (µs).
    fn at(&self, q: f64) -> f64 {
        median(self.0.iter().map(|h| h.value_at_quantile(q) as f64).collect())
    }

    /// Quantile `q` of all the rounds' samples together (µs).
    fn merged(&self, q: f64) -> f64 {
        let mut all = histogram();
        for h in &self.0 {
            let _ = all.add(h);
        }
        all.value_at_quantile(q) as f64
    }
}

/// Rows of `ours` against `twin` at p50 and p99 (µs, the median of the rounds' own), named by
/// `label` from the quantile's name and judged by `met` from it and the two values; a row
/// without a verdict shows `goal` only if it is "report".
fn median_and_tail(
    rows: &mut Vec<Row>,
    ours: &Rounds,
    twin: &Rounds,
    label: impl Fn(&str) -> String,
    goal: &str,
    met: impl Fn(&str, f64, f64) -> Option<bool>,
) {
    let n = ours.0.len();
    for (q, name) in [(0.5, "p50"), (0.99, "p99")] {
        let (o, t) = (ours.at(q), twin.at(q));
        let met = met(name, o, t);
        let goal = if met.is_some() || goal == "report" { goal } else { "-" };
        let name = label(name);
        let name = match name.strip_suffix(')') {
            Some(open) => format!("{open}; median of {n} rounds)"),
            None => format!("{name} (median of {n} rounds)"),
        };
        rows.push(row(name, o, t, "us", o / t, goal, met));
    }
}

/// Propagation p99 as the number of peers grows, each beside a raw NATS twin with as many
/// subscribers. Every peer checks every batch's signature, and here every peer shares this
/// machine: past `signed_upto` peers the signed rows run at `big_rate` (the CPU of 5,000
/// signature checks per second per peer is more than 2 cores have, see BENCHMARKS.md), and an
/// unsigned row at 5,000/s shows the rest of the path.
pub(crate) async fn fan_out(
    url: &str,
    sizes: &[usize],
    secs: u64,
    signed_upto: usize,
    big_rate: u64,
    rows: &mut Vec<Row>,
) {
    for &peers in sizes {
        let mut runs = vec![(5_000u64, peers <= signed_upto)];
        if peers > signed_upto {
            runs.push((big_rate, true));
        }
        for (rate, signed) in runs {
            let raw = propagation_raw(url, peers, rate, secs, single_batch_len(), Twin::OnePerMessage).await;
            let tag = format!("fan{peers}-{rate}-{signed}");
            let h = propagation_invalbus(url, peers, rate, secs, &tag, signed).await;
            let (p99, r99) = (h.value_at_quantile(0.99) as f64, raw.value_at_quantile(0.99) as f64);
            let (goal, met) = if peers >= 100 && rate == 5_000 {
                ("<= 5 ms", Some(p99 <= 5_000.0))
            } else {
                ("report", None)
            };
            rows.push(row(
                format!(
                    "fan-out: propagation p99, {peers} peers, {rate}/s{}",
                    if signed { "" } else { ", UNSIGNED" }
                ),
                p99,
                r99,
                "us",
                p99 / r99,
                goal,
                met,
            ));
        }
    }
}
