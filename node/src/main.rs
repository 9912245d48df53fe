//! `invalbus-node`: runs a node (`serve`), the demo, and the admin client (`purge`, `nodes`,
//! `stats`, `audit`).

use clap::{Parser, Subcommand};
use invalbus_node::cli;

mod demo;

/// jemalloc rather than glibc's malloc: under a steady stream of invalidations glibc keeps the
/// memory that batches and purge records free in its per-thread arenas, and RSS climbs in steps
/// while the heap in use stays flat; jemalloc returns it (BENCHMARKS.md, "Soak").
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// An invalbus node and its tools.
#[derive(Parser)]
#[command(name = "invalbus-node", version, about)]
struct Cli {
    /// Log format: `text` or `json` (filter with RUST_LOG).
    #[arg(long, global = true, env = "INVALBUS_LOG_FORMAT", default_value = "text")]
    log_format: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a local cluster of nodes with a blog workload and check every read for staleness.
    Demo(demo::DemoArgs),
    /// Join the bus as a full node and serve the admin API and the sidecar cache over gRPC.
    Serve(invalbus_node::ServeArgs),
    /// Purge keys, tags or prefixes on every node.
    Purge(cli::PurgeArgs),
    /// List the nodes of the cluster as a node sees them.
    Nodes(cli::ClientArgs),
    /// Show a node's figures.
    Stats(cli::ClientArgs),
    /// Query the audit log, or follow it.
    Audit(cli::AuditArgs),
    /// Ask a node's gRPC health service; exits non-zero unless it is serving.
    Health(cli::HealthArgs),
    /// Print the public key of a signing key file (an nkey seed), making the key if the file
    /// does not exist: what a `[[trust.keys]]` entry lists.
    Key(KeyArgs),
}

#[derive(clap::Args)]
struct KeyArgs {
    /// The key file (mode 0600 when made).
    #[arg(long, value_name = "PATH")]
    file: std::path::PathBuf,
}

fn key(args: KeyArgs) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let id = invalbus::Identity::load_or_create(&args.file)?;
    println!("{}", id.public_key());
    Ok(())
}

fn init_tracing(format: &str, default: &str) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    // Colours only on a terminal: a log redirected to a file or a collector stays plain text.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    if format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}

async fn serve(args: invalbus_node::ServeArgs) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let config = invalbus_node::NodeConfig::load(&args)?;
    let node = invalbus_node::Node::start(config).await?;
    eprintln!(
        "invalbus-node: node {} serving on {}",
        node.bus().node_id(),
        node.listen_address()
    );
    wait_for_signal().await;
    node.shutdown().await;
    Ok(())
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let default_level = match cli.command {
        Command::Serve(_) => "info",
        _ => "warn",
    };
    init_tracing(&cli.log_format, default_level);
    let result: Result<(), Box<dyn std::error::Error + Send + Sync>> = match cli.command {
        Command::Demo(args) => demo::run(args).await.map_err(|e| e.to_string().into()),
        Command::Serve(args) => serve(args).await,
        Command::Purge(args) => cli::purge(args).await,
        Command::Nodes(args) => cli::nodes(args).await,
        Command::Stats(args) => cli::stats(args).await,
        Command::Audit(args) => cli::audit(args).await,
        Command::Health(args) => cli::health(args).await,
        Command::Key(args) => key(args),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("invalbus-node: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
