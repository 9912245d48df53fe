//! A consistency checker in the spirit of Meta's Polaris: a versioned source of truth, writers
//! that update it and invalidate, readers on every node that compare each read with it.
//!
//! # Model
//! - The source of truth holds one version per key. A write bumps the version, then
//!   invalidates on the writing node with one of the four kinds of invalidation, at random: the
//!   key at its new version ([`invalbus::Cache::invalidate_version`]), the key's tag, a prefix of
//!   its name, or everything. Keys fall in [`GROUPS`] groups: key `i` is named `g<i % GROUPS>:k<i>`
//!   and tagged `g<i % GROUPS>`, so a tag or prefix purge covers the written key and its group.
//!   A loader returns the current version, cached at that version with the key's tag.
//! - A write is **accepted** when its ticket resolves `Ok` (with JetStream: the stream's
//!   acknowledgement). Only then may the checker hold a reader to it: an invalidation still
//!   queued at a cut-off writer is *writer delay*, reported on its own, not staleness.
//! - A read that started at `t0` is **stale** when it returns a version below a write accepted
//!   before `t0`; its age is `t0` minus the acceptance of the oldest such write.
//! - Every node ([`Node`]) runs in its own single-threaded tokio runtime, with its own NATS
//!   connection: killing the runtime is a crash of that node (its tasks, connection and pending
//!   tickets die at once), blocking its thread is a paused process.
//!
//! The checker also records, per node incarnation, every batch applied
//! ([`invalbus::Bus::subscribe_applied`]) and every repair flush with the instant the bus took it
//! ([`invalbus::CacheEvent::Flushed`]), to check that each accepted invalidation reached every
//! live node or was covered by a flush that came after it.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use invalbus::{Bus, BusBuilder, BusStats, Cache, CacheConfig, CacheEvent, Loaded};
use tokio::runtime::Runtime;

/// The name of the one cache every node opens.
pub const CACHE: &str = "items";

/// Heartbeat interval used by the fault suite (short, so detection bounds stay small).
pub const HEARTBEAT: Duration = Duration::from_millis(100);
/// `max_staleness` used by the fault suite.
pub const MAX_STALENESS: Duration = Duration::from_millis(400);
/// NATS ping interval used by the fault suite.
pub const PING: Duration = Duration::from_millis(200);

/// Groups of keys sharing a tag and a name prefix (see the module docs).
pub const GROUPS: usize = 4;

/// How a write invalidates the key it changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Version,
    Tag,
    Prefix,
    All,
}

impl Kind {
    /// Mostly versioned keys, as services do; tags and prefixes often enough to meet every
    /// fault; `all` rarely, since each one empties every cache it reaches (which would hide
    /// staleness from the checker more often than it tests anything).
    fn pick() -> Kind {
        match rand::random_range(0..200) {
            0..160 => Kind::Version,
            160..180 => Kind::Tag,
            180..199 => Kind::Prefix,
            _ => Kind::All,
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// One key of the source of truth.
#[derive(Default)]
struct KeyTruth {
    version: u64,
    /// `(version, acceptance)` of every accepted write of the key.
    accepted: Vec<(u64, Instant)>,
}

/// An accepted invalidation, as its writer saw it.
#[derive(Debug, Clone)]
struct AcceptedBatch {
    origin: String,
    epoch: u64,
    seq: u64,
    issued: Instant,
}

#[derive(Default)]
struct ReadStats {
    reads: u64,
    stale: u64,
    worst: Duration,
    worst_at: Option<(String, String)>,
    beyond_bound: u64,
}

/// The source of truth, the readers' verdicts and the writers' figures of one scenario.
pub struct Checker {
    keys: Vec<Mutex<KeyTruth>>,
    bound: Duration,
    reads: Mutex<ReadStats>,
    batches: Mutex<Vec<AcceptedBatch>>,
    writing: AtomicBool,
    issued: AtomicU64,
    accepted: AtomicU64,
    failed: AtomicU64,
    worst_writer_delay_us: AtomicU64,
}

/// What a scenario measured, for its report line and its assertions.
#[derive(Debug, Clone)]
pub struct Report {
    /// Reads checked.
    pub reads: u64,
    /// Stale reads (older than an accepted invalidation when they started).
    pub stale: u64,
    /// Age of the worst stale read.
    pub worst: Duration,
    /// Which node and key it was.
    pub worst_at: Option<(String, String)>,
    /// Stale reads older than the bound the checker was given.
    pub beyond_bound: u64,
    /// Writes issued, accepted, failed (ticket error), and still unresolved.
    pub writes: u64,
    /// Writes whose invalidation NATS accepted.
    pub accepted: u64,
    /// Writes whose ticket returned an error.
    pub failed: u64,
    /// Longest wait from a write's invalidation call to its acceptance.
    pub worst_writer_delay: Duration,
}

impl Report {
    /// `-log10(stale / reads)`; with no stale read, the best this sample can show
    /// (`log10(reads)`), printed with a `>=`.
    pub fn nines(&self) -> (f64, bool) {
        if self.reads == 0 {
            return (0.0, false);
        }
        if self.stale == 0 {
            return ((self.reads as f64).log10(), true);
        }
        (-((self.stale as f64) / (self.reads as f64)).log10(), false)
    }

    /// The one line a scenario prints.
    pub fn line(&self, scenario: &str, bound: Duration, extra: &str) -> String {
        let (nines, at_least) = self.nines();
        format!(
            "faults[{scenario}] reads={} stale={} worst_stale={}ms (bound {}ms, beyond={}) nines={}{:.2} \
             writes={} accepted={} failed={} unresolved={} writer_delay_max={}ms {extra}",
            self.reads,
            self.stale,
            self.worst.as_millis(),
            bound.as_millis(),
            self.beyond_bound,
            if at_least { ">=" } else { "" },
            nines,
            self.writes,
            self.accepted,
            self.failed,
            self.writes.saturating_sub(self.accepted + self.failed),
            self.worst_writer_delay.as_millis(),
        )
    }
}

impl Checker {
    /// A source of truth of `keys` keys at version 0; stale reads older than `bound` are
    /// counted apart.
    pub fn new(keys: usize, bound: Duration) -> Arc<Checker> {
        Arc::new(Checker {
            keys: (0..keys).map(|_| Mutex::new(KeyTruth::default())).collect(),
            bound,
            reads: Mutex::new(ReadStats::default()),
            batches: Mutex::new(Vec::new()),
            writing: AtomicBool::new(true),
            issued: AtomicU64::new(0),
            accepted: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            worst_writer_delay_us: AtomicU64::new(0),
        })
    }

    fn key(i: usize) -> String {
        format!("g{}:k{i}", i % GROUPS)
    }

    fn tag(i: usize) -> String {
        format!("g{}", i % GROUPS)
    }

    fn prefix(i: usize) -> String {
        format!("g{}:", i % GROUPS)
    }

    /// The bound given at creation.
    pub fn bound(&self) -> Duration {
        self.bound
    }

    /// The current version of key `i` in the source of truth.
    fn current(&self, i: usize) -> u64 {
        lock(&self.keys[i]).version
    }

    /// The highest accepted version of key `i`.
    fn accepted_version(&self, i: usize) -> u64 {
        lock(&self.keys[i]).accepted.iter().map(|(v, _)| *v).max().unwrap_or(0)
    }

    /// Judges a read of key `i` that started at `t0` and returned `version`.
    fn judge(&self, node: &str, i: usize, version: u64, t0: Instant) {
        let oldest_newer = lock(&self.keys[i])
            .accepted
            .iter()
            .filter(|(v, at)| *v > version && *at < t0)
            .map(|(_, at)| *at)
            .min();
        let mut r = lock(&self.reads);
        r.reads += 1;
        if let Some(at) = oldest_newer {
            let age = t0 - at;
            r.stale += 1;
            if age > self.bound {
                r.beyond_bound += 1;
            }
            if age > r.worst {
                r.worst = age;
                r.worst_at = Some((node.to_owned(), Self::key(i)));
            }
        }
    }

    /// Stops every writer (the ones already waiting for their tickets go on waiting).
    pub fn stop_writers(&self) {
        self.writing.store(false, Ordering::SeqCst);
    }

    /// Starts writers again after [`Checker::stop_writers`].
    pub fn resume_writers(&self) {
        self.writing.store(true, Ordering::SeqCst);
    }

    /// Writes issued whose tickets have not resolved yet.
    pub fn unresolved(&self) -> u64 {
        self.issued
            .load(Ordering::SeqCst)
            .saturating_sub(self.accepted.load(Ordering::SeqCst) + self.failed.load(Ordering::SeqCst))
    }

    /// What was measured so far.
    pub fn report(&self) -> Report {
        let r = lock(&self.reads);
        Report {
            reads: r.reads,
            stale: r.stale,
            worst: r.worst,
            worst_at: r.worst_at.clone(),
            beyond_bound: r.beyond_bound,
            writes: self.issued.load(Ordering::SeqCst),
            accepted: self.accepted.load(Ordering::SeqCst),
            failed: self.failed.load(Ordering::SeqCst),
            worst_writer_delay: Duration::from_micros(self.worst_writer_delay_us.load(Ordering::SeqCst)),
        }
    }

    /// Keys whose cached value on `node` is below the highest accepted version (or `"not
    /// serving"` if the node does not serve yet). Empty when the node has converged.
    pub async fn stale_entries(&self, node: &Node) -> Vec<String> {
        let mut out = Vec::new();
        if !node.bus.serving() {
            out.push(format!("{} not serving", node.id));
            return out;
        }
        for i in 0..self.keys.len() {
            let want = self.accepted_version(i);
            if let Some(v) = node.cache.get(&Self::key(i)).await {
                if v < want {
                    out.push(format!("{}:{}={v}<{want}", node.id, Self::key(i)));
                }
            }
        }
        out
    }

    /// Checks that every accepted invalidation of another node was applied by each of `nodes`
    /// that was up when it was issued, or that the node's cache was flushed after it was
    /// issued. Returns the violations. The last batches may still be on their way when the
    /// writers' tickets have resolved: wait for this to come back empty, with a deadline.
    pub fn undelivered(&self, nodes: &[&Node]) -> Vec<String> {
        let batches = lock(&self.batches).clone();
        let mut out = Vec::new();
        for node in nodes {
            let applied = lock(&node.record.applied);
            let flushes = lock(&node.record.flushes);
            let mut missing = 0;
            let mut example = None;
            let mut seen = HashSet::new();
            for b in &batches {
                if b.origin == node.id || node.started > b.issued || !seen.insert((&b.origin, b.epoch, b.seq)) {
                    continue;
                }
                let delivered = applied.contains(&(b.origin.clone(), b.epoch, b.seq));
                let flushed = flushes.iter().any(|t| *t >= b.issued);
                if !delivered && !flushed {
                    missing += 1;
                    example.get_or_insert_with(|| {
                        let last_flush = flushes
                            .last()
                            .map(|t| format!("{} ms after its last flush", (b.issued - *t).as_millis()));
                        let upto = node
                            .bus
                            .peers()
                            .into_iter()
                            .find(|p| p.node_id == b.origin && p.epoch == b.epoch)
                            .map(|p| p.applied_seq);
                        format!(
                            "{}/{}/{}, issued {}; the node applied that epoch up to {upto:?}",
                            b.origin,
                            b.epoch,
                            b.seq,
                            last_flush.unwrap_or_else(|| "with no flush before".into())
                        )
                    });
                }
            }
            if node.record.lagged.load(Ordering::SeqCst) {
                out.push(format!("{}: applied stream lagged, cannot check", node.id));
            }
            if missing > 0 {
                out.push(format!(
                    "{}: {missing} accepted batches neither applied nor covered by a flush (e.g. {})",
                    node.id,
                    example.unwrap_or_default()
                ));
            }
        }
        out
    }
}

/// What a node incarnation saw: the batches it applied and when its cache was found flushed.
#[derive(Default)]
struct Record {
    applied: Mutex<HashSet<(String, u64, u64)>>,
    flushes: Mutex<Vec<Instant>>,
    lagged: AtomicBool,
}

/// How a node connects and behaves.
pub struct NodeSpec {
    /// Node id (kept across restarts).
    pub id: String,
    /// NATS URL(s), comma-separated.
    pub url: String,
    /// JetStream settings, or core NATS only.
    pub jetstream: Option<invalbus::JetStreamConfig>,
    /// Extra connection options (e.g. a subscription capacity, a server order).
    pub nats_options: Option<fn() -> async_nats::ConnectOptions>,
    /// Whether this node writes.
    pub writer: bool,
    /// Pause between two writes of this node.
    pub write_every: Duration,
    /// Switch the staleness gate off (to show what it prevents).
    pub gate_off: bool,
    /// With JetStream, take the evidence from the node's own heartbeat through NATS instead of
    /// from the stream (to show what the stream's evidence prevents).
    pub echo_evidence: bool,
    /// NATS ping interval.
    pub ping: Duration,
}

impl NodeSpec {
    /// A reading and writing node on `url`, core NATS only, gate on.
    pub fn new(id: &str, url: &str) -> NodeSpec {
        NodeSpec {
            id: id.to_owned(),
            url: url.to_owned(),
            jetstream: None,
            nats_options: None,
            writer: true,
            write_every: Duration::from_millis(25),
            gate_off: false,
            echo_evidence: false,
            ping: PING,
        }
    }

    fn builder(&self) -> BusBuilder {
        let mut b = Bus::builder()
            .nats(self.url.clone())
            .namespace("faults")
            .node_id(self.id.clone())
            .heartbeat_interval(HEARTBEAT)
            .max_staleness(MAX_STALENESS)
            .ping_interval(self.ping);
        if let Some(js) = &self.jetstream {
            b = b.jetstream(js.clone());
        }
        if let Some(opts) = self.nats_options {
            b = b.nats_options(opts());
        }
        if self.echo_evidence {
            b = b.evidence_from_own_echo_for_tests();
        }
        b
    }
}

/// One node: a bus in its own runtime, its cache, a reader and (optionally) a writer.
pub struct Node {
    /// Node id.
    pub id: String,
    /// Its bus.
    pub bus: Bus,
    /// Its cache of versions.
    pub cache: Cache<u64>,
    /// When this incarnation was up.
    pub started: Instant,
    record: Arc<Record>,
    running: Arc<AtomicBool>,
    /// This incarnation's writes whose tickets have not resolved.
    pending: Arc<AtomicU64>,
    rt: Option<Runtime>,
}

impl Node {
    /// Starts a node in a runtime of its own (one worker thread: a process of its own, as far
    /// as scheduling goes), its reader, its writer, and the recorders of what it applies.
    pub async fn start(checker: &Arc<Checker>, spec: &NodeSpec) -> Node {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name(format!("node-{}", spec.id))
            .enable_all()
            .build()
            .expect("build a node runtime");
        let builder = spec.builder();
        let id = spec.id.clone();
        let bus = rt
            .spawn(async move { builder.build().await })
            .await
            .expect("bus build task")
            .unwrap_or_else(|e| panic!("bus {id}: {e}"));
        if spec.gate_off {
            bus.disable_staleness_gate_for_tests();
        }
        let cache = bus
            .cache::<u64>(CACHE, CacheConfig::new(10_000))
            .expect("open the cache");
        let record = Arc::new(Record::default());
        let running = Arc::new(AtomicBool::new(true));
        // Recorders first, so that `started` is after they listen.
        let mut applied = bus.subscribe_applied();
        let rec = record.clone();
        rt.spawn(async move {
            loop {
                match applied.recv().await {
                    Ok(a) => {
                        lock(&rec.applied).insert((a.origin, a.epoch, a.seq));
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                        rec.lagged.store(true, Ordering::SeqCst)
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                }
            }
        });
        // Repair flushes, timed by the bus itself (just before it flushed).
        let mut events = bus.subscribe_events();
        let rec = record.clone();
        rt.spawn(async move {
            loop {
                match events.recv().await {
                    Ok(CacheEvent::Flushed { at, .. }) => lock(&rec.flushes).push(at),
                    Ok(_) => {}
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                        rec.lagged.store(true, Ordering::SeqCst)
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                }
            }
        });
        let started = Instant::now();
        let node = Node {
            id: spec.id.clone(),
            bus,
            cache,
            started,
            record,
            running,
            pending: Arc::new(AtomicU64::new(0)),
            rt: Some(rt),
        };
        node.spawn_reader(checker.clone());
        if spec.writer {
            node.spawn_writer(checker.clone(), spec.write_every);
        }
        node
    }

    fn handle(&self) -> &tokio::runtime::Handle {
        self.rt.as_ref().expect("node runtime is up").handle()
    }

    fn spawn_reader(&self, checker: Arc<Checker>) {
        let (cache, run, id) = (self.cache.clone(), self.running.clone(), self.id.clone());
        self.handle().spawn(async move {
            let n = checker.keys.len();
            while run.load(Ordering::SeqCst) {
                let i = rand::random_range(0..n);
                let t0 = Instant::now();
                let ch = checker.clone();
                let got = cache
                    .get_or_load(&Checker::key(i), || async move {
                        let v = ch.current(i);
                        Ok::<_, std::io::Error>(Loaded::new(v).version(v).tag(Checker::tag(i)))
                    })
                    .await;
                if let Ok(v) = got {
                    checker.judge(&id, i, v, t0);
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        });
    }

    fn spawn_writer(&self, checker: Arc<Checker>, every: Duration) {
        let (cache, run, bus) = (self.cache.clone(), self.running.clone(), self.bus.clone());
        let pending = self.pending.clone();
        let handle = self.handle().clone();
        self.handle().spawn(async move {
            let n = checker.keys.len();
            while run.load(Ordering::SeqCst) {
                tokio::time::sleep(every).await;
                if !checker.writing.load(Ordering::SeqCst) {
                    continue;
                }
                let i = rand::random_range(0..n);
                let version = {
                    let mut k = lock(&checker.keys[i]);
                    k.version += 1;
                    k.version
                };
                let issued = Instant::now();
                checker.issued.fetch_add(1, Ordering::SeqCst);
                pending.fetch_add(1, Ordering::SeqCst);
                let invalidated = match Kind::pick() {
                    Kind::Version => cache.invalidate_version(&Checker::key(i), version).await,
                    Kind::Tag => cache.invalidate_tag(&Checker::tag(i)).await,
                    Kind::Prefix => cache.invalidate_prefix(&Checker::prefix(i)).await,
                    Kind::All => cache.invalidate_all().await,
                };
                let ticket = match invalidated {
                    Ok(t) => t,
                    Err(e) => {
                        pending.fetch_sub(1, Ordering::SeqCst);
                        tracing::warn!(error = %e, "invalidation refused");
                        checker.failed.fetch_add(1, Ordering::SeqCst);
                        continue;
                    }
                };
                let (ch, origin, epoch) = (checker.clone(), bus.node_id().to_owned(), bus.epoch());
                let pending = pending.clone();
                handle.spawn(async move {
                    let outcome = ticket.published().await;
                    pending.fetch_sub(1, Ordering::SeqCst);
                    match outcome {
                        Ok(p) => {
                            let at = Instant::now();
                            lock(&ch.keys[i]).accepted.push((version, at));
                            lock(&ch.batches).push(AcceptedBatch {
                                origin,
                                epoch,
                                seq: p.seq,
                                issued,
                            });
                            ch.worst_writer_delay_us
                                .fetch_max((at - issued).as_micros() as u64, Ordering::SeqCst);
                            ch.accepted.fetch_add(1, Ordering::SeqCst);
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "invalidation not accepted");
                            ch.failed.fetch_add(1, Ordering::SeqCst);
                        }
                    }
                });
            }
        });
    }

    /// Blocks this node's only worker thread for `d`: the whole node (bus, reader, writer,
    /// NATS connection) stands still, as a paused process would.
    pub fn pause(&self, d: Duration) {
        self.handle().spawn(async move { std::thread::sleep(d) });
    }

    /// Stalls this node's receiver for `d` while its NATS client keeps reading, so that a small
    /// subscription capacity overflows for sure (a slow consumer).
    pub fn stall_receiver(&self, d: Duration) {
        self.bus.stall_receiver_for_tests(d);
    }

    /// Kills the node at once: its runtime stops with every task (bus, NATS connection,
    /// pending tickets) where it stood, as a crash would.
    pub fn kill(mut self) {
        self.running.store(false, Ordering::SeqCst);
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }

    /// This incarnation's writes whose tickets have not resolved yet.
    pub fn pending(&self) -> u64 {
        self.pending.load(Ordering::SeqCst)
    }

    /// One line of this node's repair figures.
    pub fn summary(&self) -> String {
        let s = self.bus.stats();
        format!(
            "{}:gaps={},repairs={},replayed={},repair_flushes={},suspect={}ms",
            self.id,
            s.gaps,
            s.repairs,
            s.replayed,
            s.repair_flushes,
            s.suspect_us / 1000
        )
    }

    /// The bus's figures.
    pub fn stats(&self) -> BusStats {
        self.bus.stats()
    }

    /// Stops the reader and writer, then the bus.
    pub async fn stop(mut self) {
        self.running.store(false, Ordering::SeqCst);
        let bus = self.bus.clone();
        if let Some(rt) = self.rt.take() {
            let _ = tokio::time::timeout(Duration::from_secs(5), rt.spawn(async move { bus.shutdown().await })).await;
            rt.shutdown_background();
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.running.store(false, Ordering::SeqCst);
        if let Some(rt) = self.rt.take() {
            // `shutdown_background` may be called from async code; dropping a runtime may not.
            rt.shutdown_background();
        }
    }
}
