//! `invalbus-soak`: the soak alone (`invalbus-bench --soak MINUTES` runs it; see `soak.rs`).
//!
//! A binary of its own so that it runs on the allocator the node binary ships with, jemalloc,
//! while `invalbus-bench` measures the library on the system allocator: the soak models nodes
//! running for hours, the other figures a service that embeds the library. BENCHMARKS.md
//! ("Soak", "The allocator") has both allocators measured on both.

use clap::Parser;

/// The node binary's allocator (see `node/src/main.rs`).
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

// Shared with `invalbus-bench`, of which the soak uses a part.
#[allow(dead_code)]
mod common;
mod soak;

pub(crate) use common::*;

/// The soak: 3 nodes under 50,000 invalidations/s with origins that come and go.
#[derive(Parser, Debug)]
struct Args {
    /// How long to run, in minutes (the first minute is the warm-up; a 1-minute run's is 20 s).
    #[arg(long, default_value_t = 10)]
    minutes: u64,
    /// Where to write soak.csv and soak.svg.
    #[arg(long, default_value = "target/soak")]
    out: std::path::PathBuf,
}

/// Bytes the allocator has handed out and not had back (jemalloc's `stats.allocated`, refreshed
/// by advancing its epoch), to tell growth of what the process holds from growth of what the
/// allocator keeps; 0 if the statistics cannot be read.
pub(crate) fn heap_in_use_bytes() -> u64 {
    use tikv_jemalloc_ctl::{epoch, stats};
    match (epoch::advance(), stats::allocated::read()) {
        (Ok(_), Ok(bytes)) => bytes as u64,
        _ => 0,
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> std::process::ExitCode {
    let args = Args::parse();
    if soak::run(args.minutes, &args.out).await {
        std::process::ExitCode::SUCCESS
    } else {
        std::process::ExitCode::FAILURE
    }
}
