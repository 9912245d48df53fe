//! `invalbus-bench`: measures invalbus next to the raw building blocks (moka, NATS, JetStream) in
//! one run, alternating the two sides so that drift on a shared machine cancels, and prints the
//! ratios.
//!
//! It runs on the system allocator, as a service that embeds the library does unless it picks
//! another; the soak (`--soak`) runs in `invalbus-soak`, on the node binary's jemalloc (see
//! `soak_main.rs`).

use clap::Parser;
use invalbus_tests::NatsServer;

mod common;
mod latency;
mod local;
mod multitier;
mod redis;
mod throughput;

/// Benchmarks of invalbus against raw moka and raw NATS.
#[derive(Parser, Debug)]
struct Args {
    /// A short run (about two minutes) with smaller sizes.
    #[arg(long)]
    quick: bool,
    /// Also write the results as JSON to this file.
    #[arg(long)]
    json: Option<std::path::PathBuf>,
    /// Run only these figures (comma-separated): hit, signing, propagation, throughput, tags,
    /// memory, durable, fanout, peers. Every figure runs without it.
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Internal: measure the memory of one cache in this process and print it.
    #[arg(long, hide = true)]
    memory_probe: Option<String>,
    /// Internal: entries for the memory probe.
    #[arg(long, hide = true, default_value_t = 0)]
    entries: usize,
    /// Run only the soak: 50,000 invalidations/s and reads on 3 nodes, with origins that come
    /// and go, sampled every 10 s, for this many minutes (exits non-zero only on a broken run).
    /// Runs `invalbus-soak`, built beside this binary.
    #[arg(long)]
    soak: Option<u64>,
    /// Where the soak writes soak.csv and soak.svg.
    #[arg(long, default_value = "target/soak")]
    soak_out: std::path::PathBuf,
}

pub(crate) use common::*;
use latency::{fan_out, propagation};
use local::{hit_path, memory, memory_probe, signing, tag_purge};
use throughput::{durable, throughput};

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args = Args::parse();
    if let Some(kind) = &args.memory_probe {
        memory_probe(kind, args.entries).await;
        return;
    }
    if let Some(minutes) = args.soak {
        std::process::exit(run_soak(minutes, &args.soak_out));
    }
    let q = args.quick;
    println!(
        "invalbus-bench ({} run) on {} cores",
        if q { "quick" } else { "full" },
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!(
        "{:<58} {:>14} {:>14} {:<8} {:>7}  {:<36} met",
        "figure", "invalbus", "raw", "unit", "ratio", "goal"
    );
    let mut rows = Vec::new();
    let run = |figure: &str| args.only.is_empty() || args.only.iter().any(|o| o == figure);
    if run("hit") {
        hit_path(if q { 200_000 } else { 1_000_000 }, if q { 3 } else { 5 }, &mut rows).await;
    }
    let server = NatsServer::start().await;
    let url = server.url();
    if run("signing") {
        signing(if q { 3 } else { 5 }, if q { 2_000 } else { 10_000 }, &mut rows).await;
    }
    let mut tracking = if run("propagation") || run("throughput") {
        redis::Tracking::start().await
    } else {
        None
    };
    if run("propagation") {
        propagation(
            &url,
            if q { 2 } else { 10 },
            if q { 1 } else { 5 },
            &mut tracking,
            &mut rows,
        )
        .await;
    }
    // (keys present at the peers, signed): the unsigned run shows what signing costs.
    // `--only throughput-absent` runs the signed absent-key row alone (to profile it).
    let configs: &[(bool, bool)] = if run("throughput") {
        &[(false, true), (false, false), (true, true)]
    } else if args.only.iter().any(|o| o == "throughput-absent") {
        &[(false, true)]
    } else {
        &[]
    };
    if !configs.is_empty() {
        throughput(
            &url,
            if q { 200_000 } else { 1_000_000 },
            if q { 1 } else { 3 },
            configs,
            &mut tracking,
            &mut rows,
        )
        .await;
    }
    drop(tracking);
    if run("peers") {
        multitier::rows(if q { 2 } else { 10 }, if q { 20_000 } else { 100_000 }, &mut rows).await;
    }
    if run("tags") {
        tag_purge(
            &url,
            if q {
                &[10_000, 100_000][..]
            } else {
                &[10_000, 100_000, 1_000_000][..]
            },
            if q { 3 } else { 5 },
            &mut rows,
        )
        .await;
    }
    if run("memory") {
        memory(if q { 200_000 } else { 1_000_000 }, &mut rows).await;
    }
    if run("durable") {
        durable(if q { 20_000 } else { 100_000 }, if q { 1 } else { 3 }, &mut rows).await;
    }
    if run("fanout") {
        fan_out(
            &url,
            if q { &[3, 10][..] } else { &[3, 10, 30, 100][..] },
            if q { 2 } else { 5 },
            30,
            200,
            &mut rows,
        )
        .await;
    }
    if let Some(path) = args.json {
        let body = format!(
            "[\n  {}\n]\n",
            rows.iter().map(Row::json).collect::<Vec<_>>().join(",\n  ")
        );
        if let Err(e) = std::fs::write(&path, body) {
            eprintln!("invalbus-bench: cannot write {}: {e}", path.display());
            std::process::exit(1);
        }
    }
    let missed = rows.iter().filter(|r| r.met == Some(false)).count();
    println!(
        "bench: {} figures, {} goals met, {} missed",
        rows.len(),
        rows.iter().filter(|r| r.met == Some(true)).count(),
        missed
    );
}

/// Runs `invalbus-soak` (the binary beside this one) for `minutes`, and returns its exit code.
fn run_soak(minutes: u64, out: &std::path::Path) -> i32 {
    let soak = std::env::current_exe().map(|exe| exe.with_file_name("invalbus-soak"));
    let status = soak.and_then(|soak| {
        std::process::Command::new(soak)
            .arg("--minutes")
            .arg(minutes.to_string())
            .arg("--out")
            .arg(out)
            .status()
    });
    match status {
        Ok(status) => status.code().unwrap_or(1),
        Err(e) => {
            eprintln!(
                "invalbus-bench: cannot run invalbus-soak beside this binary ({e}); \
                 `cargo run --release --bin invalbus-soak -- --minutes {minutes}` builds and runs it"
            );
            1
        }
    }
}
