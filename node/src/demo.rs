//! The demo: a local cluster of nodes running a blog workload, with a staleness checker.
//!
//! # What runs
//! - A transport: a `nats-server` started on a free loopback port (or one given with `--nats`),
//!   else the in-process hub, which the demo says.
//! - N nodes in this process, each with its own [`Bus`] (its own NATS connection) and two caches:
//!   `articles` (key: slug; tags `articles` and `author:<id>`; version: the article's version) and
//!   `lists` (key `all`, the recently edited articles, tag `articles`; key `author:<id>`, one
//!   author's articles, tag `author:<id>`; version: the list's version).
//! - A source of truth ([`Blog`]), what a database would hold: every change bumps the version of
//!   each article and list it changes.
//! - Writers: change the source of truth, then invalidate through a random node (the article's
//!   key at its new version, and the tags of the lists that show it).
//! - Readers on every node: read random articles and lists with `get_or_load` (whose loader reads
//!   the source of truth, sometimes slowly, so that invalidations land during loads) and check
//!   every read (see [`Checker`] for what counts as stale).
//!
//! It prints progress every second and ends with one summary line; the exit code is non-zero
//! if any read was stale.

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use invalbus::{Applied, Bus, Cache, CacheConfig, InProcessHub, Invalidation, JetStreamConfig, Loaded, Target, Ticket};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use tokio::sync::{broadcast, watch};
use tokio::task::JoinHandle;

/// Articles in the blog.
const ARTICLES: usize = 500;
/// Authors; article `i` is written by author `i % AUTHORS`.
const AUTHORS: usize = 20;
/// Most reads and writes go to these first articles, so that reads and writes of one key meet.
const HOT_ARTICLES: usize = 25;
/// Reader tasks per node.
const READERS_PER_NODE: usize = 2;
/// Reads a reader makes between pauses of 1 ms (keeps the readers from starving the transport
/// on a small machine).
const READ_BURST: usize = 50;
/// Writer tasks.
const WRITERS: usize = 2;
/// Pause of a writer between writes.
const WRITE_PAUSE: Duration = Duration::from_millis(4);
/// One write in this many renames an author instead of editing an article.
const RENAME_ONE_IN: u32 = 100;
/// One load in this many takes a millisecond (a slow database), long enough for invalidations
/// to land while it runs: the stale-fill race the caches must win.
const SLOW_LOAD_ONE_IN: u32 = 4;
/// Time to live of the demo's caches: longer than a typical run, so that staleness is not
/// hidden by expiry (events must do the work, not time).
const CACHE_TTL: Duration = Duration::from_secs(120);
/// Stale reads printed in full (the rest are only counted).
const STALE_REPORTS: u64 = 10;

/// Options of `invalbus-node demo`.
#[derive(clap::Args, Debug)]
pub struct DemoArgs {
    /// Number of nodes.
    #[arg(long, default_value_t = 3)]
    pub nodes: usize,
    /// How long to run the workload, in seconds.
    #[arg(long, default_value_t = 10)]
    pub seconds: u64,
    /// Use the NATS server at this URL instead of starting one.
    #[arg(long, value_name = "URL", conflicts_with = "in_process")]
    pub nats: Option<String>,
    /// Use the in-process transport even if nats-server is available.
    #[arg(long)]
    pub in_process: bool,
    /// Keep every batch in a JetStream stream (tickets resolve on the stream's acknowledgement);
    /// the started nats-server gets JetStream, a server given with `--nats` must have it.
    #[arg(long, conflicts_with = "in_process")]
    pub jetstream: bool,
    /// The nats-server binary to start (default: `nats-server` on PATH, else /usr/sbin/nats-server).
    #[arg(long, env = "NATS_SERVER_BIN", value_name = "PATH")]
    pub nats_server_bin: Option<PathBuf>,
    /// Inject a fault: a third of the way through, kill the started nats-server with SIGKILL and
    /// restart it two seconds later on the same port and store. Implies `--jetstream`; the nodes
    /// stop serving from cache while cut off, replay what they missed, and the run must still
    /// end with `stale_reads=0`.
    #[arg(long, conflicts_with_all = ["in_process", "nats"])]
    pub chaos: bool,
    /// Tests the checker: writers invalidate a wrong key instead of the article's, so the demo
    /// must report stale reads (and fail).
    #[arg(long, hide = true)]
    pub miss_article_invalidations: bool,
    /// Tests the checker: one second in, node-1 silently drops this many of its peers' batches
    /// (never applies them, on any path, and does not notice), so the demo must report stale
    /// reads and batches never applied (and fail).
    #[arg(long, hide = true, value_name = "N")]
    pub drop_peer_batches: Option<u64>,
}

pub async fn run(mut args: DemoArgs) -> Result<(), Box<dyn std::error::Error>> {
    if args.chaos {
        args.jetstream = true;
    }
    if args.nodes == 0 || args.nodes > 64 {
        return Err(format!("--nodes {}: use 1 to 64", args.nodes).into());
    }
    if args.seconds == 0 || args.seconds > 3600 {
        return Err(format!("--seconds {}: use 1 to 3600", args.seconds).into());
    }
    let mut server = None;
    let transport = if let Some(url) = &args.nats {
        println!("using the NATS server at {url}");
        Transport::Nats(url.clone())
    } else if args.in_process {
        println!("using the in-process transport (--in-process)");
        Transport::InProcess(InProcessHub::new())
    } else {
        match find_nats_server(args.nats_server_bin.as_deref())? {
            Some(bin) => {
                let s = NatsServer::start(&bin, args.jetstream).await?;
                println!(
                    "started {} at {} (pid {})",
                    bin.display(),
                    s.url,
                    s.child.id().unwrap_or(0)
                );
                let t = Transport::Nats(s.url.clone());
                server = Some(s);
                t
            }
            None => {
                println!(
                    "nats-server not found (not on PATH, not /usr/sbin/nats-server, NATS_SERVER_BIN unset): \
                     using the in-process transport"
                );
                Transport::InProcess(InProcessHub::new())
            }
        }
    };
    if args.chaos && server.is_none() {
        return Err("--chaos needs a nats-server that the demo starts itself (none was found)".into());
    }
    let server = Arc::new(tokio::sync::Mutex::new(server));
    // The fault comes a third of the way into the workload, once every node has joined (a node
    // still joining when its server dies would fail to start, which is not what is tested).
    let workload = Arc::new(tokio::sync::Notify::new());
    let chaos = args.chaos.then(|| {
        tokio::spawn(chaos(
            server.clone(),
            workload.clone(),
            Duration::from_secs(args.seconds) / 3,
        ))
    });
    // The server is killed on every way out: normal end, error, or a signal.
    let outcome = tokio::select! {
        r = demo(&args, &transport, &workload) => r,
        _ = interrupted() => Err("interrupted".into()),
    };
    if let Some(c) = chaos {
        c.abort();
    }
    if let Some(s) = server.lock().await.take() {
        s.stop().await;
    }
    let summary = outcome?;
    println!("{summary}");
    if summary.stale_reads > 0 {
        return Err(format!("{} stale reads", summary.stale_reads).into());
    }
    if summary.errors > 0 {
        return Err(format!("{} errors (see above)", summary.errors).into());
    }
    Ok(())
}

enum Transport {
    Nats(String),
    InProcess(InProcessHub),
}

/// What the summary line reports.
struct Summary {
    transport: &'static str,
    nodes: usize,
    reads: u64,
    writes: u64,
    invalidations: u64,
    p50_us: u64,
    p99_us: u64,
    stale_reads: u64,
    errors: u64,
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "demo: transport={} nodes={} reads={} writes={} invalidations={} p50_us={} p99_us={} stale_reads={}",
            self.transport,
            self.nodes,
            self.reads,
            self.writes,
            self.invalidations,
            self.p50_us,
            self.p99_us,
            self.stale_reads
        )
    }
}

async fn demo(
    args: &DemoArgs,
    transport: &Transport,
    workload: &tokio::sync::Notify,
) -> Result<Summary, Box<dyn std::error::Error>> {
    let n = args.nodes;
    // A namespace of its own, so that a shared server (`--nats`) can carry other traffic.
    let namespace = format!("demo-{:08x}", rand::random::<u32>());
    let mut nodes = Vec::with_capacity(n);
    for i in 0..n {
        let builder = Bus::builder()
            .namespace(namespace.as_str())
            .node_id(format!("node-{i}"));
        let builder = match transport {
            Transport::Nats(url) => builder.nats(url.as_str()),
            Transport::InProcess(hub) => builder.in_process(hub),
        };
        let builder = if args.jetstream {
            builder.jetstream(JetStreamConfig::default())
        } else {
            builder
        };
        let bus = builder.build().await?;
        let articles = bus.cache("articles", CacheConfig::new(10_000).time_to_live(CACHE_TTL))?;
        let lists = bus.cache("lists", CacheConfig::new(1_000).time_to_live(CACHE_TTL))?;
        nodes.push(Node { bus, articles, lists });
    }
    let transport_name = nodes[0].bus.transport();
    let stream = if args.jetstream { ", JetStream" } else { "" };
    println!(
        "{n} nodes up ({transport_name}{stream}, namespace {namespace}); running for {} s",
        args.seconds
    );

    let ctx = Arc::new(Ctx {
        blog: Mutex::new(Blog::new()),
        checker: Checker::new(n, ITEMS, nodes[0].bus.staleness_bound()),
        nodes,
        counters: Counters::default(),
        miss_article_invalidations: args.miss_article_invalidations,
    });
    let (stop_tx, stop_rx) = watch::channel(false);
    // Watchers first: no batch may be applied before someone listens for it.
    let watchers: Vec<JoinHandle<()>> = (0..n)
        .map(|i| {
            tokio::spawn(watch_applied(
                ctx.clone(),
                i,
                ctx.nodes[i].bus.subscribe_applied(),
                stop_rx.clone(),
            ))
        })
        .collect();

    let started = Instant::now();
    let deadline = started + Duration::from_secs(args.seconds);
    workload.notify_one();
    let mut workers = Vec::new();
    for w in 0..WRITERS {
        workers.push(tokio::spawn(writer(ctx.clone(), deadline, w as u64)));
    }
    for node in 0..n {
        for r in 0..READERS_PER_NODE {
            workers.push(tokio::spawn(reader(
                ctx.clone(),
                node,
                deadline,
                (node * READERS_PER_NODE + r) as u64,
            )));
        }
    }
    if let (Some(drop), true) = (args.drop_peer_batches, n > 1) {
        let ctx = ctx.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(1)).await;
            println!("fault: node-1 silently drops the next {drop} batches of its peers");
            ctx.nodes[1].bus.drop_batches_for_tests(drop);
        });
    }
    let progress = tokio::spawn(progress(ctx.clone(), started, deadline));
    for w in workers {
        w.await?;
    }
    let _ = progress.await;

    // Let the last batches reach every peer, so that propagation covers every batch.
    let drain_deadline = Instant::now() + Duration::from_secs(3);
    let mut unapplied = ctx.unapplied_batches();
    while unapplied > 0 && Instant::now() < drain_deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
        unapplied = ctx.unapplied_batches();
    }
    if unapplied > 0 {
        // A node that flushed its caches covered what it did not apply; one that did not has
        // lost batches without noticing.
        let unflushed: Vec<String> = ctx
            .nodes
            .iter()
            .filter(|n| n.bus.stats().repair_flushes == 0)
            .map(|n| n.bus.node_id().to_owned())
            .collect();
        println!("warning: {unapplied} batches were not applied on every peer within 3 s of the end");
        if ctx
            .checker
            .unapplied_on_unflushed(&ctx.published(), &ctx.nodes, &unflushed)
            > 0
        {
            ctx.error(format_args!(
                "batches accepted but never applied by a node that did not flush either: {unflushed:?}"
            ));
        }
    }
    let _ = stop_tx.send(true);
    for w in watchers {
        let _ = w.await;
    }
    for node in &ctx.nodes {
        node.bus.shutdown().await;
    }

    let (mut loads, mut rejected, mut hits, mut misses, mut bypassed) = (0, 0, 0, 0, 0);
    for node in &ctx.nodes {
        for s in node.bus.cache_stats() {
            loads += s.loads;
            rejected += s.rejected_fills;
            hits += s.hits;
            misses += s.misses;
            bypassed += s.bypassed_reads;
        }
    }
    let hit_ratio = if hits + misses == 0 {
        0.0
    } else {
        hits as f64 / (hits + misses) as f64
    };
    println!(
        "caches: hit_ratio={hit_ratio:.3} loads={loads} rejected_fills={rejected} (loads overtaken by an \
         invalidation: returned to their callers, not cached) bypassed_reads={bypassed} (while a node \
         could not vouch for its caches)"
    );
    let c = &ctx.counters;
    let (p50_us, p99_us, measured) = ctx.checker.propagation();
    let published: u64 = ctx.nodes.iter().map(|n| n.bus.last_published_seq()).sum();
    println!("propagation: {measured} of {published} batches measured (publish to applied on the last peer)");
    let errors = c.errors.load(Ordering::Relaxed);
    if errors > 0 {
        println!(
            "errors: {errors} (failed loads, failed invalidations or publishes, impossible versions, lost events)"
        );
    }
    Ok(Summary {
        transport: transport_name,
        nodes: n,
        reads: c.reads.load(Ordering::Relaxed),
        writes: c.writes.load(Ordering::Relaxed),
        invalidations: c.invalidations.load(Ordering::Relaxed),
        p50_us,
        p99_us,
        stale_reads: c.stale_reads.load(Ordering::Relaxed),
        errors,
    })
}

/// One node of the demo cluster.
struct Node {
    bus: Bus,
    articles: Cache<Arc<Article>>,
    lists: Cache<Arc<ListPage>>,
}

/// What every task of the demo shares.
struct Ctx {
    blog: Mutex<Blog>,
    checker: Checker,
    nodes: Vec<Node>,
    counters: Counters,
    /// See [`DemoArgs::miss_article_invalidations`].
    miss_article_invalidations: bool,
}

#[derive(Default)]
struct Counters {
    reads: AtomicU64,
    writes: AtomicU64,
    invalidations: AtomicU64,
    stale_reads: AtomicU64,
    errors: AtomicU64,
}

impl Ctx {
    /// The last sequence each node published.
    fn published(&self) -> Vec<u64> {
        self.nodes.iter().map(|n| n.bus.last_published_seq()).collect()
    }

    /// Batches some peer has not applied yet (by the applied events seen so far).
    fn unapplied_batches(&self) -> u64 {
        let published = self.published();
        self.checker.unapplied(&published)
    }

    fn error(&self, what: std::fmt::Arguments<'_>) {
        if self.counters.errors.fetch_add(1, Ordering::Relaxed) < STALE_REPORTS {
            println!("error: {what}");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The source of truth
// ---------------------------------------------------------------------------------------------

/// An article as stored and cached.
#[derive(Debug)]
struct Article {
    slug: String,
    author: usize,
    author_name: String,
    version: u64,
    title: String,
}

/// A list of articles (the recent list, or one author's) as stored and cached.
#[derive(Debug)]
struct ListPage {
    version: u64,
    heading: String,
    slugs: Vec<String>,
}

/// What the demo's checker knows by: every article and list, indexed as an [`Item`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Item {
    Article(usize),
    Recent,
    AuthorList(usize),
}

/// Number of items: articles, the recent list, and the author lists.
const ITEMS: usize = ARTICLES + 1 + AUTHORS;

impl Item {
    fn index(self) -> usize {
        match self {
            Item::Article(i) => i,
            Item::Recent => ARTICLES,
            Item::AuthorList(a) => ARTICLES + 1 + a,
        }
    }

    fn key(self) -> String {
        match self {
            Item::Article(i) => slug(i),
            Item::Recent => "all".to_owned(),
            Item::AuthorList(a) => author_tag(a),
        }
    }
}

fn slug(i: usize) -> String {
    format!("article-{i}")
}

fn author_tag(a: usize) -> String {
    format!("author:{a}")
}

/// The blog as a database holds it. Values are shared (`Arc`), so a load is a cheap clone.
struct Blog {
    articles: Vec<Arc<Article>>,
    recent: Arc<ListPage>,
    author_lists: Vec<Arc<ListPage>>,
}

/// Versions a write produced, as `(item, version)`.
type Covers = Vec<(Item, u64)>;

impl Blog {
    fn new() -> Self {
        let author_name = |a: usize| format!("Author {a}");
        let articles: Vec<_> = (0..ARTICLES)
            .map(|i| {
                Arc::new(Article {
                    slug: slug(i),
                    author: i % AUTHORS,
                    author_name: author_name(i % AUTHORS),
                    version: 1,
                    title: format!("Article {i}"),
                })
            })
            .collect();
        let author_lists = (0..AUTHORS)
            .map(|a| {
                Arc::new(ListPage {
                    version: 1,
                    heading: author_name(a),
                    slugs: (a..ARTICLES).step_by(AUTHORS).map(slug).collect(),
                })
            })
            .collect();
        let recent = Arc::new(ListPage {
            version: 1,
            heading: "Recent".into(),
            slugs: Vec::new(),
        });
        Blog {
            articles,
            recent,
            author_lists,
        }
    }

    fn version(&self, item: Item) -> u64 {
        match item {
            Item::Article(i) => self.articles[i].version,
            Item::Recent => self.recent.version,
            Item::AuthorList(a) => self.author_lists[a].version,
        }
    }

    /// Edits article `i`: a new version of it, of the recent list (it moves to the top) and of
    /// its author's list (which shows when each article last changed).
    fn edit(&mut self, i: usize) -> Covers {
        let old = &self.articles[i];
        let article = Arc::new(Article {
            slug: old.slug.clone(),
            author: old.author,
            author_name: old.author_name.clone(),
            version: old.version + 1,
            title: format!("Article {i} (revision {})", old.version + 1),
        });
        let a = article.author;
        let mut slugs = vec![article.slug.clone()];
        slugs.extend(
            self.recent
                .slugs
                .iter()
                .filter(|s| **s != article.slug)
                .take(9)
                .cloned(),
        );
        self.recent = Arc::new(ListPage {
            version: self.recent.version + 1,
            heading: "Recent".into(),
            slugs,
        });
        let list = &self.author_lists[a];
        self.author_lists[a] = Arc::new(ListPage {
            version: list.version + 1,
            heading: list.heading.clone(),
            slugs: list.slugs.clone(),
        });
        let covers = vec![
            (Item::Article(i), article.version),
            (Item::Recent, self.recent.version),
            (Item::AuthorList(a), self.author_lists[a].version),
        ];
        self.articles[i] = article;
        covers
    }

    /// Renames author `a`: a new version of each of their articles (which show the name) and of
    /// their list.
    fn rename(&mut self, a: usize) -> Covers {
        let mut covers = Vec::new();
        let list = &self.author_lists[a];
        let name = format!("Author {a} (renamed at version {})", list.version + 1);
        self.author_lists[a] = Arc::new(ListPage {
            version: list.version + 1,
            heading: name.clone(),
            slugs: list.slugs.clone(),
        });
        covers.push((Item::AuthorList(a), self.author_lists[a].version));
        for i in (a..ARTICLES).step_by(AUTHORS) {
            let old = &self.articles[i];
            let article = Arc::new(Article {
                slug: old.slug.clone(),
                author: a,
                author_name: name.clone(),
                version: old.version + 1,
                title: old.title.clone(),
            });
            covers.push((Item::Article(i), article.version));
            self.articles[i] = article;
        }
        covers
    }
}

// ---------------------------------------------------------------------------------------------
// The staleness checker
// ---------------------------------------------------------------------------------------------

/// Decides which reads are stale, and measures propagation.
///
/// # Stale read
/// For each node `n` and item `x`, the *floor* `F(n, x)` is the highest version `v` of `x` such
/// that an invalidation issued after the source of truth reached `v` is known to have been
/// applied on `n`. It becomes known:
/// - on the writer's own node, when the invalidate call returns (the bus applies it locally
///   before returning);
/// - on a peer, when that peer's [`Bus::subscribe_applied`] reports the batch carrying it (the
///   writer learns the batch's sequence from its [`Ticket`]; a peer applies each origin's
///   batches in order, so a report of sequence `s` covers every batch up to `s`).
///
/// A reader on `n` samples `F(n, x)` *before* it calls `get_or_load`, and the read is **stale if
/// it returns a version below that sample**. So a load that was already running when an
/// invalidation landed may still hand the old value to a caller whose read started before the
/// invalidation was applied (that is allowed); but a read that started after it must never see
/// an older version, whether from the cache, from a load that started earlier, or from a fill
/// the invalidation should have refused.
///
/// The floor only ever trails the real apply (we learn of an apply after it happened), so every
/// read counted stale really broke the guarantee; reads that race with the apply itself are not
/// judged.
///
/// That rule alone cannot see a batch a peer never applied. So a second rule holds every node
/// to the staleness bound: a read that starts at `t0` is also **stale if it returns a version
/// below one whose invalidation was accepted (its ticket resolved) before `t0 - bound`**,
/// whether or not the reading node reported applying it.
struct Checker {
    /// `floors[node][item]`: the floor; read without a lock on every read.
    floors: Vec<Vec<AtomicU64>>,
    /// `accepted[item]`: `(version, when its invalidation was accepted)`, oldest first.
    accepted: Vec<Mutex<std::collections::VecDeque<(u64, Instant)>>>,
    /// The nodes' staleness bound.
    bound: Duration,
    ledger: Mutex<Ledger>,
}

/// The sequences of one origin a node applied.
#[derive(Default, Clone)]
struct Seqs {
    /// Every sequence up to here was applied.
    upto: u64,
    /// Applied above `upto`.
    above: std::collections::BTreeSet<u64>,
}

impl Seqs {
    fn insert(&mut self, seq: u64) {
        if seq > self.upto {
            self.above.insert(seq);
        }
        while self.above.first() == Some(&(self.upto + 1)) {
            self.upto += 1;
            self.above.pop_first();
        }
    }

    fn contains(&self, seq: u64) -> bool {
        seq <= self.upto || self.above.contains(&seq)
    }

    /// Sequences `1..=last` not applied.
    fn missing(&self, last: u64) -> u64 {
        last.saturating_sub(self.upto) - self.above.range(..=last).count() as u64
    }
}

/// What the watchers and the writers exchange about batches.
struct Ledger {
    /// `applied[node][origin]`: the sequences of `origin` applied on `node` (a node applies
    /// each batch once, but not always in order: the stream fills what NATS did not deliver).
    applied: Vec<Vec<Seqs>>,
    /// `pending[node][origin]`: batches the writers published that `node` has not applied
    /// yet, by sequence, with the versions they cover.
    pending: Vec<Vec<BTreeMap<u64, Covers>>>,
    /// Batches not yet applied on every peer: `(origin, seq)` to (published at, latest applied
    /// at, peers that applied it).
    in_flight: HashMap<(usize, u64), (u64, u64, usize)>,
    /// Propagation times of the batches every peer applied, in µs.
    propagation_us: Vec<u64>,
}

impl Checker {
    fn new(nodes: usize, items: usize, bound: Duration) -> Self {
        Checker {
            floors: (0..nodes)
                .map(|_| (0..items).map(|_| AtomicU64::new(0)).collect())
                .collect(),
            accepted: (0..items)
                .map(|_| Mutex::new(std::collections::VecDeque::new()))
                .collect(),
            bound,
            ledger: Mutex::new(Ledger {
                applied: vec![vec![Seqs::default(); nodes]; nodes],
                pending: (0..nodes)
                    .map(|_| (0..nodes).map(|_| BTreeMap::new()).collect())
                    .collect(),
                in_flight: HashMap::new(),
                propagation_us: Vec::new(),
            }),
        }
    }

    fn floor(&self, node: usize, item: Item) -> u64 {
        self.floors[node][item.index()].load(Ordering::SeqCst)
    }

    /// The highest version of `item` whose invalidation was accepted before `t0 - bound`.
    fn bound_floor(&self, item: Item, t0: Instant) -> u64 {
        let Some(before) = t0.checked_sub(self.bound) else {
            return 0;
        };
        let mut accepted = self.accepted[item.index()].lock().unwrap_or_else(|e| e.into_inner());
        // Keep the newest entry old enough to count, and everything after it.
        while accepted.len() > 1 && accepted[1].1 <= before {
            accepted.pop_front();
        }
        match accepted.front() {
            Some(&(v, at)) if at <= before => v,
            _ => 0,
        }
    }

    /// The invalidations of `covers` were accepted now.
    fn accepted(&self, covers: &[(Item, u64)]) {
        let now = Instant::now();
        for &(item, version) in covers {
            let mut accepted = self.accepted[item.index()].lock().unwrap_or_else(|e| e.into_inner());
            if accepted.back().is_none_or(|(v, _)| *v < version) {
                accepted.push_back((version, now));
            }
        }
    }

    fn raise(&self, node: usize, covers: &[(Item, u64)]) {
        for &(item, version) in covers {
            self.floors[node][item.index()].fetch_max(version, Ordering::SeqCst);
        }
    }

    fn ledger(&self) -> std::sync::MutexGuard<'_, Ledger> {
        self.ledger.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The writer learnt that batch `seq` of `origin` carries `covers`.
    fn published(&self, origin: usize, seq: u64, covers: &[(Item, u64)]) {
        let mut ledger = self.ledger();
        for node in (0..self.floors.len()).filter(|&n| n != origin) {
            if ledger.applied[node][origin].contains(seq) {
                // Its applied event came first.
                self.raise(node, covers);
            } else {
                ledger.pending[node][origin]
                    .entry(seq)
                    .or_default()
                    .extend_from_slice(covers);
            }
        }
    }

    /// `node` reports that it applied batch `a`.
    fn applied(&self, node: usize, origin: usize, a: &Applied) {
        let peers = self.floors.len() - 1;
        let mut ledger = self.ledger();
        ledger.applied[node][origin].insert(a.seq);
        if let Some(covers) = ledger.pending[node][origin].remove(&a.seq) {
            self.raise(node, &covers);
        }
        let entry = ledger
            .in_flight
            .entry((origin, a.seq))
            .or_insert((a.published_us, 0, 0));
        entry.1 = entry.1.max(a.applied_us);
        entry.2 += 1;
        if entry.2 == peers {
            let (published, applied, _) = *entry;
            ledger.in_flight.remove(&(origin, a.seq));
            ledger.propagation_us.push(applied.saturating_sub(published));
        }
    }

    /// Batches of `published[origin]` that some peer has not reported applied.
    fn unapplied(&self, published: &[u64]) -> u64 {
        let ledger = self.ledger();
        let mut missing = 0;
        for (node, applied) in ledger.applied.iter().enumerate() {
            for (origin, &last) in published.iter().enumerate() {
                if origin != node {
                    missing += applied[origin].missing(last);
                }
            }
        }
        missing
    }

    /// Batches of `published[origin]` not applied by the nodes named in `unflushed`.
    fn unapplied_on_unflushed(&self, published: &[u64], nodes: &[Node], unflushed: &[String]) -> u64 {
        let ledger = self.ledger();
        let mut missing = 0;
        for (node, applied) in ledger.applied.iter().enumerate() {
            if !unflushed.iter().any(|id| id == nodes[node].bus.node_id()) {
                continue;
            }
            for (origin, &last) in published.iter().enumerate() {
                if origin != node {
                    missing += applied[origin].missing(last);
                }
            }
        }
        missing
    }

    /// (p50, p99, count) of the propagation times from publish to applied on every peer.
    fn propagation(&self) -> (u64, u64, usize) {
        let mut v = std::mem::take(&mut self.ledger().propagation_us);
        v.sort_unstable();
        let pct = |p: f64| {
            if v.is_empty() {
                0
            } else {
                v[((p * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1]
            }
        };
        (pct(0.50), pct(0.99), v.len())
    }
}

/// Feeds node `node`'s applied batches to the checker until told to stop.
async fn watch_applied(
    ctx: Arc<Ctx>,
    node: usize,
    mut rx: broadcast::Receiver<Applied>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let event = tokio::select! {
            e = rx.recv() => e,
            _ = stop.wait_for(|s| *s) => return,
        };
        match event {
            Ok(a) => match a.origin.strip_prefix("node-").and_then(|i| i.parse::<usize>().ok()) {
                Some(origin) if origin < ctx.nodes.len() && a.epoch == ctx.nodes[origin].bus.epoch() => {
                    ctx.checker.applied(node, origin, &a)
                }
                _ => ctx.error(format_args!(
                    "node-{node} applied a batch of an unknown origin {:?}",
                    a.origin
                )),
            },
            // Not a staleness problem (floors only rise later than they could), but the
            // propagation figures would miss batches: say so.
            Err(broadcast::error::RecvError::Lagged(n)) => {
                ctx.error(format_args!("node-{node}: the checker missed {n} applied events"))
            }
            Err(broadcast::error::RecvError::Closed) => return,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The workload
// ---------------------------------------------------------------------------------------------

/// Picks an article, mostly among the hot ones.
fn pick_article(rng: &mut SmallRng) -> usize {
    if rng.random_ratio(4, 5) {
        rng.random_range(0..HOT_ARTICLES)
    } else {
        rng.random_range(0..ARTICLES)
    }
}

/// Writes until the deadline: changes the source of truth, then invalidates through a random node.
async fn writer(ctx: Arc<Ctx>, deadline: Instant, seed: u64) {
    let mut rng = SmallRng::seed_from_u64(rand::random::<u64>() ^ seed);
    while Instant::now() < deadline {
        let node = rng.random_range(0..ctx.nodes.len());
        let mut sent = Vec::new();
        if rng.random_ratio(1, RENAME_ONE_IN) {
            let a = rng.random_range(0..AUTHORS);
            let covers = ctx.blog.lock().unwrap_or_else(|e| e.into_inner()).rename(a);
            // The name shows in every article of the author and in their list: purge their tag
            // in every cache.
            sent.push(invalidate(&ctx, node, Invalidation::new(None, Target::Tag(author_tag(a))), covers).await);
        } else {
            let i = pick_article(&mut rng);
            let covers = ctx.blog.lock().unwrap_or_else(|e| e.into_inner()).edit(i);
            let (article, recent, author_list) = (covers[0], covers[1], covers[2]);
            let target = if ctx.miss_article_invalidations {
                format!("{}-typo", slug(i))
            } else {
                slug(i)
            };
            let mut key = Invalidation::new(Some("articles"), Target::Key(target));
            key.version = Some(article.1);
            sent.push(invalidate(&ctx, node, key, vec![article]).await);
            // Only the lists cache: purging `articles` in the articles cache would drop every
            // article on each write; the article itself is covered by its versioned key.
            let recent_tag = Invalidation::new(Some("lists"), Target::Tag("articles".into()));
            sent.push(invalidate(&ctx, node, recent_tag, vec![recent]).await);
            let a = i % AUTHORS;
            let author = Invalidation::new(Some("lists"), Target::Tag(author_tag(a)));
            sent.push(invalidate(&ctx, node, author, vec![author_list]).await);
        }
        ctx.counters.writes.fetch_add(1, Ordering::Relaxed);
        // Then learn which batches carried them, for the peers' floors.
        for (ticket, covers) in sent.into_iter().flatten() {
            match ticket.published().await {
                Ok(p) => {
                    ctx.checker.accepted(&covers);
                    ctx.checker.published(node, p.seq, &covers)
                }
                Err(e) => ctx.error(format_args!("node-{node}: publish failed: {e}")),
            }
        }
        tokio::time::sleep(WRITE_PAUSE).await;
    }
}

/// Invalidates through `node`; once the call returns, the invalidation is applied there.
async fn invalidate(ctx: &Ctx, node: usize, inv: Invalidation, covers: Covers) -> Option<(Ticket, Covers)> {
    let result = ctx.nodes[node].bus.invalidate(inv).await;
    ctx.counters.invalidations.fetch_add(1, Ordering::Relaxed);
    match result {
        Ok(ticket) => {
            ctx.checker.raise(node, &covers);
            Some((ticket, covers))
        }
        Err(e) => {
            ctx.error(format_args!("node-{node}: invalidation failed: {e}"));
            None
        }
    }
}

/// Reads random articles and lists through `node` until the deadline, checking each read.
async fn reader(ctx: Arc<Ctx>, node: usize, deadline: Instant, seed: u64) {
    let mut rng = SmallRng::seed_from_u64(rand::random::<u64>() ^ seed);
    while Instant::now() < deadline {
        for _ in 0..READ_BURST {
            let item = match rng.random_range(0..10) {
                0 => Item::Recent,
                1 => Item::AuthorList(rng.random_range(0..AUTHORS)),
                _ => Item::Article(pick_article(&mut rng)),
            };
            let slow = rng.random_ratio(1, SLOW_LOAD_ONE_IN);
            read(&ctx, node, item, slow).await;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// One checked read of `item` through `node`.
async fn read(ctx: &Ctx, node: usize, item: Item, slow_load: bool) {
    // Before the read starts: the version every read from now on must reach (see `Checker`).
    let t0 = Instant::now();
    let applied_floor = ctx.checker.floor(node, item);
    let bound_floor = ctx.checker.bound_floor(item, t0);
    let floor = applied_floor.max(bound_floor);
    let n = &ctx.nodes[node];
    let key = item.key();
    let got = match item {
        Item::Article(i) => n
            .articles
            .get_or_load(&key, || load_article(ctx, i, slow_load))
            .await
            .map(|a| a.version),
        Item::Recent | Item::AuthorList(_) => n
            .lists
            .get_or_load(&key, || load_list(ctx, item, slow_load))
            .await
            .map(|l| l.version),
    };
    ctx.counters.reads.fetch_add(1, Ordering::Relaxed);
    let version = match got {
        Ok(v) => v,
        Err(e) => return ctx.error(format_args!("node-{node}: read of {key} failed: {e}")),
    };
    if version < floor {
        let count = ctx.counters.stale_reads.fetch_add(1, Ordering::Relaxed) + 1;
        if count <= STALE_REPORTS {
            if version < applied_floor {
                println!(
                    "STALE: node-{node} read {key} at version {version}, but version {applied_floor} was invalidated there before the read"
                );
            } else {
                println!(
                    "STALE: node-{node} read {key} at version {version}, but version {bound_floor} was accepted more than {:?} before the read",
                    ctx.checker.bound
                );
            }
        }
    }
    let current = ctx.blog.lock().unwrap_or_else(|e| e.into_inner()).version(item);
    if version > current {
        ctx.error(format_args!(
            "node-{node}: read {key} at version {version}, newer than the source of truth's {current}"
        ));
    }
}

/// A simulated database round trip: usually quick, sometimes a millisecond.
async fn db_latency(slow: bool) {
    if slow {
        tokio::time::sleep(Duration::from_millis(1)).await;
    } else {
        tokio::task::yield_now().await;
    }
}

/// The loader of an article: reads it from the source of truth (and returns it after the round
/// trip, by which time it may have changed: that is the race the cache must handle).
async fn load_article(ctx: &Ctx, i: usize, slow: bool) -> Result<Loaded<Arc<Article>>, Infallible> {
    let article = ctx.blog.lock().unwrap_or_else(|e| e.into_inner()).articles[i].clone();
    db_latency(slow).await;
    let (version, tag) = (article.version, author_tag(article.author));
    Ok(Loaded::new(article).tag("articles").tag(tag).version(version))
}

/// The loader of a list.
async fn load_list(ctx: &Ctx, item: Item, slow: bool) -> Result<Loaded<Arc<ListPage>>, Infallible> {
    let (page, tag) = {
        let blog = ctx.blog.lock().unwrap_or_else(|e| e.into_inner());
        match item {
            Item::AuthorList(a) => (blog.author_lists[a].clone(), author_tag(a)),
            _ => (blog.recent.clone(), "articles".to_owned()),
        }
    };
    db_latency(slow).await;
    let version = page.version;
    Ok(Loaded::new(page).tag(tag).version(version))
}

/// Prints the counters once a second until the deadline.
async fn progress(ctx: Arc<Ctx>, started: Instant, deadline: Instant) {
    let first = tokio::time::Instant::from_std(started + Duration::from_secs(1));
    let mut tick = tokio::time::interval_at(first, Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let at = tick.tick().await.into_std();
        if at > deadline {
            return;
        }
        let c = &ctx.counters;
        let rejected: u64 = ctx
            .nodes
            .iter()
            .flat_map(|n| n.bus.cache_stats())
            .map(|s| s.rejected_fills)
            .sum();
        println!(
            "[{:>4}s] reads={} writes={} invalidations={} stale={} rejected_fills={}",
            (at - started).as_secs(),
            c.reads.load(Ordering::Relaxed),
            c.writes.load(Ordering::Relaxed),
            c.invalidations.load(Ordering::Relaxed),
            c.stale_reads.load(Ordering::Relaxed),
            rejected
        );
    }
}

// ---------------------------------------------------------------------------------------------
// The transport
// ---------------------------------------------------------------------------------------------

/// The nats-server to start: `explicit` (from `--nats-server-bin` or `NATS_SERVER_BIN`), else
/// `nats-server` on PATH, else /usr/sbin/nats-server (where Debian's package puts it, often
/// outside a user's PATH).
fn find_nats_server(explicit: Option<&Path>) -> Result<Option<PathBuf>, String> {
    if let Some(p) = explicit {
        return if p.is_file() {
            Ok(Some(p.to_owned()))
        } else {
            Err(format!("nats-server {} not found", p.display()))
        };
    }
    let on_path = std::env::var_os("PATH")
        .map(|paths| {
            std::env::split_paths(&paths)
                .map(|d| d.join("nats-server"))
                .find(|p| p.is_file())
        })
        .unwrap_or_default();
    Ok(on_path.or_else(|| Some(PathBuf::from("/usr/sbin/nats-server")).filter(|p| p.is_file())))
}

/// A nats-server child process on a loopback port, killed when stopped or dropped.
struct NatsServer {
    child: tokio::process::Child,
    url: String,
    bin: PathBuf,
    port: u16,
    /// JetStream's store, removed when stopped.
    store: Option<PathBuf>,
}

impl NatsServer {
    async fn start(bin: &Path, jetstream: bool) -> Result<Self, String> {
        // The port is free when we look; another process may take it before the server binds
        // it, so try a few.
        for _ in 0..3 {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .map_err(|e| format!("no free port: {e}"))?
                .port();
            let store = jetstream
                .then(|| std::env::temp_dir().join(format!("invalbus-demo-{port}-{:08x}", rand::random::<u32>())));
            let mut child = Self::spawn(bin, port, store.as_deref())?;
            if Self::wait_ready(&mut child, port).await {
                return Ok(NatsServer {
                    child,
                    url: format!("nats://127.0.0.1:{port}"),
                    bin: bin.to_owned(),
                    port,
                    store,
                });
            }
            let _ = child.kill().await;
            if let Some(dir) = store {
                let _ = std::fs::remove_dir_all(dir);
            }
        }
        Err(format!("{} did not start listening on a loopback port", bin.display()))
    }

    fn spawn(bin: &Path, port: u16, store: Option<&Path>) -> Result<tokio::process::Child, String> {
        let mut command = tokio::process::Command::new(bin);
        command.args(["-a", "127.0.0.1", "-p", &port.to_string()]);
        if let Some(dir) = store {
            command.arg("-js").arg("-sd").arg(dir);
        }
        command
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", bin.display()))
    }

    /// Waits until the server accepts connections; false if it exited or took over 5 s.
    async fn wait_ready(child: &mut tokio::process::Child, port: u16) -> bool {
        let ready_by = Instant::now() + Duration::from_secs(5);
        while Instant::now() < ready_by {
            if let Ok(Some(_)) = child.try_wait() {
                return false; // it exited: probably the port was taken
            }
            if tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        false
    }

    /// Starts the server again on the same port and store (after a kill).
    async fn restart(&mut self) -> Result<(), String> {
        let _ = self.child.kill().await;
        self.child = Self::spawn(&self.bin, self.port, self.store.as_deref())?;
        if Self::wait_ready(&mut self.child, self.port).await {
            Ok(())
        } else {
            Err(format!(
                "{} did not listen again on port {}",
                self.bin.display(),
                self.port
            ))
        }
    }

    async fn stop(mut self) {
        let _ = self.child.kill().await;
        if let Some(dir) = self.store.take() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// The fault of `--chaos`: SIGKILL the server `after` into the workload, restart it two seconds
/// later.
async fn chaos(
    server: Arc<tokio::sync::Mutex<Option<NatsServer>>>,
    workload: Arc<tokio::sync::Notify>,
    after: Duration,
) {
    workload.notified().await;
    tokio::time::sleep(after).await;
    if let Some(s) = server.lock().await.as_mut() {
        let _ = s.child.kill().await;
        println!("chaos: nats-server killed with SIGKILL; restarting it in 2 s");
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    if let Some(s) = server.lock().await.as_mut() {
        match s.restart().await {
            Ok(()) => println!("chaos: nats-server restarted on the same port and store"),
            Err(e) => println!("chaos: restart failed: {e}"),
        }
    }
}

/// Resolves on Ctrl-C or SIGTERM; never if neither can be listened for.
async fn interrupted() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => tokio::select! {
                _ = ctrl_c => {}
                _ = term.recv() => {}
            },
            Err(_) => ctrl_c.await,
        }
    }
    #[cfg(not(unix))]
    ctrl_c.await;
}
