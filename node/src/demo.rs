//! The demo: a local cluster of nodes running a blog workload, with a staleness checker.

/// Options of `invalbus-node demo`.
#[derive(clap::Args, Debug)]
pub struct DemoArgs {
    /// Number of nodes.
    #[arg(long, default_value_t = 3)]
    pub nodes: usize,
    /// How long to run the workload, in seconds.
    #[arg(long, default_value_t = 10)]
    pub seconds: u64,
}

pub async fn run(_args: DemoArgs) -> Result<(), Box<dyn std::error::Error>> {
    Err("demo not written yet".into())
}
