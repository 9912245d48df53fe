//! What every figure shares: the table's rows, histograms, keys and values, buses to measure.

use bytes::Bytes;
use invalbus::{Bus, Cache, InProcessHub, Loaded};
use std::sync::Arc;
use std::time::Instant;

/// One figure: invalbus's value next to the raw building block's.
pub(crate) struct Row {
    pub(crate) name: String,
    pub(crate) invalbus: f64,
    pub(crate) raw: f64,
    pub(crate) unit: &'static str,
    /// invalbus / raw (or raw / invalbus for rates, so that above 1 always means "invalbus costs more").
    pub(crate) ratio: f64,
    pub(crate) goal: String,
    pub(crate) met: Option<bool>,
}

impl Row {
    pub(crate) fn json(&self) -> String {
        let num = |v: f64| {
            if v.is_finite() {
                format!("{v:.3}")
            } else {
                "null".into()
            }
        };
        format!(
            "{{\"name\":{:?},\"invalbus\":{},\"raw\":{},\"unit\":{:?},\"ratio\":{},\"goal\":{:?},\"met\":{}}}",
            self.name,
            num(self.invalbus),
            num(self.raw),
            self.unit,
            num(self.ratio),
            self.goal,
            self.met.map_or("null".to_string(), |m| m.to_string())
        )
    }
}

pub(crate) fn row(
    name: impl Into<String>,
    invalbus: f64,
    raw: f64,
    unit: &'static str,
    ratio: f64,
    goal: &str,
    met: Option<bool>,
) -> Row {
    let r = Row {
        name: name.into(),
        invalbus,
        raw,
        unit,
        ratio,
        goal: goal.into(),
        met,
    };
    println!(
        "{:<58} {:>14.3} {:>14.3} {:<8} {:>7.3}  {:<36} {}",
        r.name,
        r.invalbus,
        r.raw,
        r.unit,
        r.ratio,
        r.goal,
        match r.met {
            Some(true) => "met",
            Some(false) => "MISSED",
            None => "-",
        }
    );
    r
}

/// A latency histogram from 1 to an hour's worth of nanoseconds, 3 significant digits. The bounds
/// are explicit: `Histogram::new` starts with a high of 2 and `saturating_record` clamps to it
/// rather than growing, which once capped every figure here at about 2 ms.
pub(crate) fn histogram() -> hdrhistogram::Histogram<u64> {
    hdrhistogram::Histogram::new_with_bounds(1, 3_600_000_000_000, 3).expect("valid bounds")
}

pub(crate) fn now_us() -> u64 {
    invalbus::now_us()
}

pub(crate) fn value(i: usize) -> Bytes {
    let mut v = vec![0u8; 100];
    v[..8].copy_from_slice(&(i as u64).to_le_bytes());
    Bytes::from(v)
}

pub(crate) fn keys(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("key:{i:08}")).collect()
}

pub(crate) fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

pub(crate) async fn in_process_bus(hub: &InProcessHub, id: &str) -> Bus {
    Bus::builder()
        .in_process(hub)
        .namespace("bench")
        .node_id(id)
        .build()
        .await
        .expect("in-process bus")
}

pub(crate) async fn nats_bus(url: &str, id: &str) -> Bus {
    nats_bus_signed(url, id, true).await
}

/// A bus that signs its messages and checks its peers' (as every bus does), or, to measure
/// what that costs, one that does neither (its namespace must hold only such buses).
pub(crate) async fn nats_bus_signed(url: &str, id: &str, signed: bool) -> Bus {
    let b = Bus::builder()
        .nats(url)
        .namespace(if signed { "bench" } else { "bench-unsigned" })
        .node_id(id)
        .outbound_queue(1 << 22);
    let b = if signed { b } else { b.unsigned_for_benchmarks() };
    b.build().await.expect("bus on the bench's nats-server")
}

pub(crate) async fn fill(cache: &Cache<Bytes>, keys: &[String], tags: impl Fn(usize) -> Vec<String>) {
    for (i, k) in keys.iter().enumerate() {
        let mut loaded = Loaded::new(value(i));
        loaded.tags = tags(i);
        cache.reserve(k).fill(loaded).await;
    }
    cache.run_pending_tasks().await;
}

/// Time per `get` over `keys`, split across `threads` OS threads, each running one async loop.
pub(crate) fn time_gets<F, Fut>(keys: &Arc<Vec<String>>, threads: usize, get: F) -> f64
where
    F: Fn(String) -> Fut + Send + Sync + Clone + 'static,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    let hits: usize = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let keys = keys.clone();
                let get = get.clone();
                s.spawn(move || {
                    futures::executor::block_on(async move {
                        let mut hits = 0usize;
                        for k in keys.iter().skip(t).step_by(threads) {
                            hits += usize::from(get(k.clone()).await);
                        }
                        hits
                    })
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap_or(0)).sum()
    });
    let elapsed = start.elapsed();
    assert_eq!(hits, keys.len(), "every read of a warm cache must hit");
    elapsed.as_nanos() as f64 / keys.len() as f64
}

pub(crate) fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1).and_then(|v| v.parse::<u64>().ok()))
        .map(|pages| pages * 4096)
        .unwrap_or(0)
}

pub(crate) fn single_batch_len() -> usize {
    let b = invalbus::Batch {
        origin: "p-5000-origin".into(),
        epoch: u64::MAX,
        seq: 1_000,
        timestamp_us: now_us(),
        namespace: "bench".into(),
        invalidations: vec![invalbus::Invalidation::new(
            Some("prop"),
            invalbus::Target::Key("k100000".into()),
        )],
    };
    // The bytes on the wire: the batch in its signed envelope.
    invalbus::seal(
        &invalbus::Identity::generate(),
        invalbus::Kind::Batch,
        invalbus::encode_batch(&b),
    )
    .len()
}
