//! `invalbus-example-blog`: runs the blog service (see the crate docs) on `BLOG_LISTEN`
//! (default 127.0.0.1:8080), configured by the `BLOG_*` variables of `blog::Settings`.

use std::sync::Arc;

use blog::{Blog, NewArticle, Settings};

#[tokio::main]
async fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    match run().await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("invalbus-example-blog: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run() -> Result<(), Box<dyn std::error::Error>> {
    let settings = Settings::from_env()?;
    let listen = std::env::var("BLOG_LISTEN").unwrap_or_else(|_| "127.0.0.1:8080".into());
    let blog = Arc::new(Blog::start(&settings).await?);
    // A first article, so that there is something to read (a conflict means it exists).
    let _ = blog
        .create(&NewArticle {
            slug: "hello-world".into(),
            author_id: 42,
            title: "Hello, world".into(),
            body: "The first article.".into(),
        })
        .await;
    let listener = tokio::net::TcpListener::bind(&listen).await?;
    tracing::info!(node = %blog.bus().node_id(), addr = %listener.local_addr()?, "blog serving");
    axum::serve(listener, blog::router(blog.clone()))
        .with_graceful_shutdown(signal())
        .await?;
    blog.shutdown().await;
    Ok(())
}

async fn signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}
