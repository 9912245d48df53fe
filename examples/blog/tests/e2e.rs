//! Three replicas of the blog over one PostgreSQL and one nats-server with JetStream, each with
//! its own bus and HTTP port: under a concurrent read load through all of them, updates through
//! one replica are never read stale through any replica once its invalidation was applied there.
//!
//! Needs PostgreSQL at 127.0.0.1:5432 (trust auth, database `test`; `BLOG_TEST_DATABASE_URL`
//! overrides). Without one the test is skipped, unless `CI` is set: then it fails.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use blog::{Article, Blog, NewArticle, Settings, Summary, Update, Written};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use invalbus_tests::{eventually, init_tracing, NatsServer, DEADLINE};
use rand::Rng;

const ARTICLES: usize = 8;
const UPDATES: usize = 60;
const READERS_PER_REPLICA: usize = 2;

fn database_url() -> String {
    std::env::var("BLOG_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "host=127.0.0.1 port=5432 user=postgres dbname=test".into())
}

/// Whether PostgreSQL answers; `None` means skip (not in CI).
async fn postgres_or_skip() -> Option<()> {
    let url = database_url();
    let attempt = tokio::time::timeout(
        Duration::from_secs(10),
        tokio_postgres::connect(&url, tokio_postgres::NoTls),
    )
    .await;
    match attempt {
        Ok(Ok((_client, _conn))) => Some(()),
        other => {
            let why = match other {
                Ok(Err(e)) => e.to_string(),
                Err(_) => "no answer in 10 s".into(),
                Ok(Ok(_)) => unreachable!(),
            };
            assert!(
                std::env::var_os("CI").is_none(),
                "PostgreSQL at {url:?} is unreachable ({why}) and CI is set: .ci/run must start it"
            );
            eprintln!("SKIPPED: PostgreSQL at {url:?} is unreachable ({why}); set BLOG_TEST_DATABASE_URL or start it");
            None
        }
    }
}

/// Drops the test's schema when the test ends, passed or failed.
struct DropSchema(String);

impl Drop for DropSchema {
    fn drop(&mut self) {
        let schema = self.0.clone();
        // A fresh runtime on a plain thread: Drop cannot await, and may run outside any runtime.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .ok()?;
            rt.block_on(async {
                let (client, conn) = tokio_postgres::connect(&database_url(), tokio_postgres::NoTls)
                    .await
                    .ok()?;
                tokio::spawn(conn);
                client
                    .batch_execute(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"))
                    .await
                    .ok()
            })
        })
        .join();
    }
}

struct Replica {
    blog: Arc<Blog>,
    addr: std::net::SocketAddr,
}

async fn start_replica(nats: &str, namespace: &str, schema: &str, id: &str) -> Replica {
    let settings = Settings {
        database_url: database_url(),
        schema: schema.to_owned(),
        nats_url: Some(nats.to_owned()),
        nats_user: None,
        nats_password: None,
        namespace: namespace.to_owned(),
        node_id: Some(id.to_owned()),
        jetstream_replicas: 1,
    };
    let blog = Arc::new(
        Blog::start(&settings)
            .await
            .unwrap_or_else(|e| panic!("replica {id}: {e}")),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("local addr");
    let router = blog::router(blog.clone());
    tokio::spawn(async move { axum::serve(listener, router).await });
    Replica { blog, addr }
}

/// One keep-alive HTTP/1.1 connection.
struct Http {
    sender: SendRequest<Full<Bytes>>,
    addr: std::net::SocketAddr,
}

impl Http {
    async fn connect(addr: std::net::SocketAddr) -> Http {
        let stream = tokio::net::TcpStream::connect(addr)
            .await
            .expect("connect to a replica");
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .expect("HTTP handshake");
        tokio::spawn(conn);
        Http { sender, addr }
    }

    async fn call(&mut self, method: &str, path: &str, body: Option<String>) -> (u16, Bytes) {
        let mut req = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header("host", self.addr.to_string());
        if body.is_some() {
            req = req.header("content-type", "application/json");
        }
        let req = req
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .expect("request");
        self.sender.ready().await.expect("HTTP connection ready");
        let resp = self.sender.send_request(req).await.expect("HTTP request");
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await.expect("HTTP body").to_bytes();
        (status, body)
    }

    async fn get<T: serde::de::DeserializeOwned>(&mut self, path: &str) -> T {
        let (status, body) = self.call("GET", path, None).await;
        assert_eq!(status, 200, "GET {path}: {}", String::from_utf8_lossy(&body));
        serde_json::from_slice(&body).expect("JSON")
    }
}

/// A read through a replica that its bus had already applied the writer's batches up to
/// `applied_seq` when it started.
struct Read {
    replica: usize,
    slug: String,
    applied_seq: u64,
    version: i64,
}

/// Reads that returned a version older than one whose invalidation had been applied on their
/// replica when they started. `writes` are `(batch_seq, slug, version)`.
fn stale_reads<'a>(reads: &'a [Read], writes: &[(u64, String, i64)]) -> Vec<(&'a Read, i64)> {
    reads
        .iter()
        .filter_map(|r| {
            let required = writes
                .iter()
                .filter(|(seq, slug, _)| *seq <= r.applied_seq && *slug == r.slug)
                .map(|(_, _, v)| *v)
                .max()
                .unwrap_or(0);
            (r.version < required).then_some((r, required))
        })
        .collect()
}

#[test]
fn the_checker_flags_a_stale_read() {
    let writes = vec![(3, "a".to_owned(), 2), (5, "a".to_owned(), 3), (4, "b".to_owned(), 2)];
    let read = |slug: &str, applied_seq, version| Read {
        replica: 1,
        slug: slug.into(),
        applied_seq,
        version,
    };
    let reads = vec![read("a", 4, 2), read("a", 5, 2), read("a", 2, 1), read("b", 9, 2)];
    let stale = stale_reads(&reads, &writes);
    assert_eq!(stale.len(), 1);
    assert_eq!((stale[0].0.applied_seq, stale[0].1), (5, 3));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn updates_through_one_replica_are_never_read_stale_through_any() {
    init_tracing();
    if postgres_or_skip().await.is_none() {
        return;
    }
    let suffix = format!("{:08x}", rand::random::<u32>());
    let schema = format!("blog_e2e_{suffix}");
    let _drop = DropSchema(schema.clone());
    let namespace = format!("blog-e2e-{suffix}");
    let nats = NatsServer::start_jetstream().await;

    let mut replicas = Vec::new();
    for id in ["web-1", "web-2", "web-3"] {
        replicas.push(start_replica(&nats.url(), &namespace, &schema, id).await);
    }
    for r in &replicas {
        let b = r.blog.bus();
        assert!(
            eventually(DEADLINE, || async { b.peers().len() == 2 }).await,
            "{} never heard of both peers",
            b.node_id()
        );
    }
    let writer = &replicas[0];
    let slugs: Vec<String> = (0..ARTICLES).map(|i| format!("article-{i}")).collect();
    for (i, slug) in slugs.iter().enumerate() {
        writer
            .blog
            .create(&NewArticle {
                slug: slug.clone(),
                author_id: (i % 3) as i64 + 1,
                title: format!("Title {i}"),
                body: "v1".into(),
            })
            .await
            .expect("create");
    }

    // What each replica has applied of the writer's batches (the writer applies its own before
    // the PUT answers, so for it the PUT's answer is the mark).
    let writer_id = writer.blog.bus().node_id().to_owned();
    let writer_epoch = writer.blog.bus().epoch();
    let applied: Vec<Arc<AtomicU64>> = (0..replicas.len()).map(|_| Arc::new(AtomicU64::new(0))).collect();
    for (i, r) in replicas.iter().enumerate().skip(1) {
        let mut rx = r.blog.bus().subscribe_applied();
        let mark = applied[i].clone();
        let origin = writer_id.clone();
        tokio::spawn(async move {
            loop {
                match rx.recv().await {
                    Ok(a) if a.origin == origin && a.epoch == writer_epoch => {
                        mark.fetch_max(a.seq, Ordering::SeqCst);
                    }
                    Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                }
            }
        });
    }
    let committed: Arc<HashMap<String, AtomicI64>> =
        Arc::new(slugs.iter().map(|s| (s.clone(), AtomicI64::new(1))).collect());
    let writes: Arc<Mutex<Vec<(u64, String, i64)>>> = Arc::new(Mutex::new(Vec::new()));
    let reads: Arc<Mutex<Vec<Read>>> = Arc::new(Mutex::new(Vec::new()));
    let writer_stale: Arc<Mutex<Vec<String>>> = Arc::new(Mutex::new(Vec::new()));
    let stop = Arc::new(AtomicBool::new(false));

    let mut readers = Vec::new();
    for (i, r) in replicas.iter().enumerate() {
        for _ in 0..READERS_PER_REPLICA {
            let (addr, slugs, stop) = (r.addr, slugs.clone(), stop.clone());
            let (mark, committed, reads, writer_stale) = (
                applied[i].clone(),
                committed.clone(),
                reads.clone(),
                writer_stale.clone(),
            );
            readers.push(tokio::spawn(async move {
                let mut http = Http::connect(addr).await;
                let mut n = 0u64;
                while !stop.load(Ordering::SeqCst) {
                    let slug = slugs[rand::rng().random_range(0..slugs.len())].clone();
                    let (applied_seq, must) = (mark.load(Ordering::SeqCst), committed[&slug].load(Ordering::SeqCst));
                    let a: Article = http.get(&format!("/articles/{slug}")).await;
                    assert_eq!(a.slug, slug);
                    if i == 0 {
                        if a.version < must {
                            writer_stale.lock().unwrap().push(format!(
                                "{slug}: read version {} after the PUT of version {must} had answered",
                                a.version
                            ));
                        }
                    } else {
                        reads.lock().unwrap().push(Read {
                            replica: i,
                            slug,
                            applied_seq,
                            version: a.version,
                        });
                    }
                    n += 1;
                    if n.is_multiple_of(50) {
                        // Lists too, so their caches and purges are under load as well.
                        let _: Vec<Summary> = http.get("/articles").await;
                    }
                }
                n
            }));
        }
    }

    let started = Instant::now();
    let mut http = Http::connect(writer.addr).await;
    for u in 0..UPDATES {
        let slug = &slugs[u % slugs.len()];
        let update = Update {
            title: format!("Title, edit {u}"),
            body: format!("edit {u}"),
        };
        let (status, body) = http
            .call(
                "PUT",
                &format!("/articles/{slug}"),
                Some(serde_json::to_string(&update).unwrap()),
            )
            .await;
        assert_eq!(status, 200, "PUT {slug}: {}", String::from_utf8_lossy(&body));
        let w: Written = serde_json::from_slice(&body).expect("JSON");
        writes.lock().unwrap().push((w.batch_seq, slug.clone(), w.version));
        committed[slug].fetch_max(w.version, Ordering::SeqCst);
        // Let reads through the others fill their caches between updates of the same article.
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Reads go on a moment after the last update, while it propagates.
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::SeqCst);
    let mut total = 0;
    for r in readers {
        total += r.await.expect("reader task");
    }
    let elapsed = started.elapsed();

    let writes = writes.lock().unwrap().clone();
    let reads = std::mem::take(&mut *reads.lock().unwrap());
    let writer_stale = writer_stale.lock().unwrap().clone();
    assert!(
        writer_stale.is_empty(),
        "{} stale reads on the writer, e.g. {:#?}",
        writer_stale.len(),
        &writer_stale[..writer_stale.len().min(10)]
    );
    let stale = stale_reads(&reads, &writes);
    let report: Vec<String> = stale
        .iter()
        .take(10)
        .map(|(r, required)| {
            format!(
                "replica {} read {} at version {} after applying the invalidation of version {required}",
                r.replica, r.slug, r.version
            )
        })
        .collect();
    assert!(stale.is_empty(), "{} stale reads, e.g. {report:#?}", stale.len());

    // The check had something to check: reads after applied invalidations, served from caches.
    let constrained = reads
        .iter()
        .filter(|r| {
            writes
                .iter()
                .any(|(seq, slug, v)| *seq <= r.applied_seq && *slug == r.slug && *v > 1)
        })
        .count();
    let hits: u64 = replicas.iter().map(|r| r.blog.articles().stats().hits).sum();
    eprintln!(
        "{total} reads ({} checked against applied invalidations, {hits} cache hits), {UPDATES} updates in {elapsed:?}",
        constrained
    );
    assert!(
        constrained > 100,
        "too few reads after applied invalidations: {constrained}"
    );
    assert!(hits > 100, "the caches were hardly used: {hits} hits");

    // And every replica ends on the last version of every article, in lists too.
    let want: HashMap<String, i64> = committed
        .iter()
        .map(|(s, v)| (s.clone(), v.load(Ordering::SeqCst)))
        .collect();
    for (i, r) in replicas.iter().enumerate() {
        let converged = eventually(DEADLINE, || async {
            let mut http = Http::connect(r.addr).await;
            for slug in &slugs {
                let a: Article = http.get(&format!("/articles/{slug}")).await;
                if a.version != want[slug] {
                    return false;
                }
            }
            for author in 1..=3i64 {
                let list: Vec<Summary> = http.get(&format!("/authors/{author}/articles")).await;
                let expected = (0..ARTICLES).filter(|i| (i % 3) as i64 + 1 == author).count();
                if list.len() != expected || list.iter().any(|s| s.version != want[&s.slug]) {
                    return false;
                }
            }
            let all: Vec<Summary> = http.get("/articles").await;
            all.len() == ARTICLES && all.iter().all(|s| s.version == want[&s.slug])
        })
        .await;
        assert!(converged, "replica {i} never showed the last versions");
    }
    for r in &replicas {
        r.blog.shutdown().await;
    }
}
