//! A minimal HTTP endpoint that serves the node's figures at `/metrics` in the Prometheus text
//! format (the same figures as the `Stats` call, with propagation latency as a histogram).

use std::fmt::Write as _;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::state::NodeState;

/// Histogram bucket bounds for propagation latency, in µs.
const BOUNDS_US: &[u64] = &[
    500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000, 1_000_000, 2_500_000, 5_000_000,
    10_000_000,
];

/// Serves `/metrics` on `listener` until `stop` turns true.
pub async fn serve(listener: TcpListener, state: Arc<NodeState>, mut stop: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            a = listener.accept() => {
                if let Ok((conn, _)) = a {
                    let st = state.clone();
                    tokio::spawn(async move {
                        let _ = tokio::time::timeout(Duration::from_secs(5), answer(conn, &st)).await;
                    });
                }
            }
            _ = crate::audit::stopped(&mut stop) => return,
        }
    }
}

async fn answer(mut conn: TcpStream, state: &NodeState) -> std::io::Result<()> {
    let mut buf = vec![0u8; 4096];
    let mut n = 0;
    while n < buf.len() {
        let r = conn.read(&mut buf[n..]).await?;
        if r == 0 {
            break;
        }
        n += r;
        if buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
            break;
        }
    }
    let head = String::from_utf8_lossy(&buf[..n]);
    let path = head.split_whitespace().nth(1).unwrap_or("");
    let (status, body) = if head.starts_with("GET ") && (path == "/metrics" || path.starts_with("/metrics?")) {
        ("200 OK", render(state))
    } else {
        ("404 Not Found", "try /metrics\n".to_owned())
    };
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    conn.write_all(response.as_bytes()).await?;
    conn.shutdown().await
}

/// The figures in the Prometheus text format.
pub fn render(state: &NodeState) -> String {
    let s = state.stats();
    let node = s.node.unwrap_or_default();
    let id = escape(&node.node_id);
    let mut out = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, value: String| {
        let _ = writeln!(out, "# HELP invalbus_{name} {help}\n# TYPE invalbus_{name} {kind}");
        let _ = writeln!(out, "invalbus_{name}{{node=\"{id}\"}} {value}");
    };
    for (name, help, v) in [
        (
            "batches_published_total",
            "Batches this node published.",
            node.batches_published,
        ),
        (
            "invalidations_published_total",
            "Invalidations this node published.",
            node.invalidations_published,
        ),
        (
            "publish_errors_total",
            "Batches not confirmed by NATS.",
            node.publish_errors,
        ),
        (
            "batches_received_total",
            "Batches applied from peers.",
            node.batches_received,
        ),
        (
            "invalidations_received_total",
            "Invalidations applied from peers.",
            node.invalidations_received,
        ),
        ("gaps_total", "Gaps found in peers' sequences.", node.gaps),
        (
            "replayed_total",
            "Batches applied from the stream because NATS did not deliver them first.",
            node.replayed,
        ),
        (
            "repairs_total",
            "Repairs: batches filled from the stream plus flushes.",
            node.repairs,
        ),
        (
            "repair_flushes_total",
            "Repairs that had to flush.",
            node.repair_flushes,
        ),
        ("duplicates_total", "Duplicate batches skipped.", node.duplicates),
        (
            "refused_messages_total",
            "Messages from the network refused.",
            node.refused_messages,
        ),
        (
            "refused_unsigned_total",
            "Messages refused for a missing or bad signature.",
            node.refused_unsigned,
        ),
        (
            "refused_untrusted_total",
            "Messages refused: the trust policy does not let their signer publish as their origin.",
            node.refused_untrusted,
        ),
        (
            "refused_unauthorized_total",
            "Batches refused: invalidations beyond their signer's scopes.",
            node.refused_unauthorized,
        ),
        (
            "contested_batches_total",
            "Batches under an origin name pinned to another key (pinned trust policy): invalidations applied, nothing else.",
            node.contested_batches,
        ),
        (
            "follower_rereads_total",
            "Times the stream follower read again from a hole its consumer skipped.",
            node.follower_rereads,
        ),
        (
            "follower_restarts_total",
            "Times the stream follower was restarted: this node's heartbeat was overdue and it delivered nothing.",
            node.follower_restarts,
        ),
        (
            "duplicate_node_ids_total",
            "Heartbeats of another live process using this node's id.",
            node.duplicate_node_ids,
        ),
        (
            "stream_erasures_total",
            "Messages that erased stored batches of the stream (a Nats-Rollup header on a batch subject).",
            node.stream_erasures,
        ),
        (
            "peers_refused_total",
            "Heartbeats not recorded because the peer table was full.",
            node.peers_refused,
        ),
        (
            "receipts_published_total",
            "Audit receipts written.",
            node.receipts_published,
        ),
        (
            "receipts_failed_total",
            "Audit receipts not written.",
            node.receipts_failed,
        ),
        ("purges_total", "Purges accepted through the admin API.", node.purges),
    ] {
        metric(name, "counter", help, v.to_string());
    }
    metric(
        "serving",
        "gauge",
        "1 while the caches may serve reads.",
        u8::from(node.serving).to_string(),
    );
    metric("peers", "gauge", "Peers in the peer table.", node.peers.to_string());
    let r = &state.auth.refusals;
    let _ = writeln!(
        out,
        "# HELP invalbus_refused_calls_total Admin and sidecar calls refused.\n# TYPE invalbus_refused_calls_total counter"
    );
    for (code, v) in [
        ("unauthenticated", &r.unauthenticated),
        ("permission_denied", &r.permission_denied),
        ("invalid_argument", &r.invalid_argument),
    ] {
        let _ = writeln!(
            out,
            "invalbus_refused_calls_total{{node=\"{id}\",code=\"{code}\"}} {}",
            v.load(Ordering::Relaxed)
        );
    }
    let (count, sum_us, cumulative) = state.bus.propagation_buckets(BOUNDS_US);
    let _ = writeln!(
        out,
        "# HELP invalbus_propagation_seconds From a peer's publish to this node's apply.\n# TYPE invalbus_propagation_seconds histogram"
    );
    for (b, c) in BOUNDS_US.iter().zip(cumulative) {
        let _ = writeln!(
            out,
            "invalbus_propagation_seconds_bucket{{node=\"{id}\",le=\"{}\"}} {c}",
            *b as f64 / 1e6
        );
    }
    let _ = writeln!(
        out,
        "invalbus_propagation_seconds_bucket{{node=\"{id}\",le=\"+Inf\"}} {count}"
    );
    let _ = writeln!(
        out,
        "invalbus_propagation_seconds_sum{{node=\"{id}\"}} {}",
        sum_us as f64 / 1e6
    );
    let _ = writeln!(out, "invalbus_propagation_seconds_count{{node=\"{id}\"}} {count}");
    for (name, kind, help) in [
        ("cache_entries", "gauge", "Entries held."),
        ("cache_hits_total", "counter", "Reads served from the cache."),
        ("cache_misses_total", "counter", "Reads that missed."),
        ("cache_invalidations_applied_total", "counter", "Invalidations applied."),
        (
            "cache_rejected_fills_total",
            "counter",
            "Fills refused because an invalidation overtook them.",
        ),
        ("cache_flushes_total", "counter", "Whole-cache flushes."),
    ] {
        let _ = writeln!(out, "# HELP invalbus_{name} {help}\n# TYPE invalbus_{name} {kind}");
        for c in &s.caches {
            let v = match name {
                "cache_entries" => c.entries,
                "cache_hits_total" => c.hits,
                "cache_misses_total" => c.misses,
                "cache_invalidations_applied_total" => c.invalidations_applied,
                "cache_rejected_fills_total" => c.rejected_fills,
                _ => c.flushes,
            };
            let _ = writeln!(
                out,
                "invalbus_{name}{{node=\"{id}\",cache=\"{}\"}} {v}",
                escape(&c.name)
            );
        }
    }
    out
}

fn escape(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}
