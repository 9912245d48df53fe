//! `invalbus-node`: the command line of an invalbus node (demo, and later the admin node and its client).

use clap::{Parser, Subcommand};

mod demo;

/// An invalbus node and its tools.
#[derive(Parser)]
#[command(name = "invalbus-node", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a local cluster of nodes with a blog workload and check every read for staleness.
    Demo(demo::DemoArgs),
}

fn init_tracing() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn"));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    init_tracing();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Demo(args) => demo::run(args).await,
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("invalbus-node: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
