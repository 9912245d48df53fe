//! The sidecar cache service (`invalbus.cache.v1.Cache`): the node's caches for processes not
//! written in Rust, with the library's stale-fill protection through reservations.
//!
//! # What a write does, and why a stale value is never cached over a newer invalidation
//! Values never travel between nodes; a write (`Set`, `SetMany`, `Add`, `Incr`, `Delete`) is a
//! key invalidation applied here and published to every node, and the value, if any, is then
//! cached on this node only. A value is cached through a library lease ([`Reservation`]), which
//! refuses the fill if an invalidation covering the key landed since the lease was taken. The
//! lease is the caller's *reservation* when it passes one (taken by the `Get` miss after which
//! it read the source of truth), else one taken when the call arrived. A write's own
//! invalidation would refuse its own fill, so [`SidecarService::store`] fills in two steps:
//! 1. through the caller's lease, before its own invalidation: refused if anything covering the
//!    key landed between the caller's read and now (the stale-set race);
//! 2. it applies and publishes its own invalidation (so every other process and node drops its
//!    copy), then fills again through a lease taken after it, refused by anything landing in
//!    between.
//!
//! The value is cached only if both fills are. Not covered: an invalidation of the same key
//! applied in the microseconds between the end of step 1 and the local apply of step 2's own
//! invalidation, or between that apply and step 2's lease (the library has no "publish without
//! applying here", and a lease taken before the write's own invalidation would be refused by
//! it). A concurrent write of the same key through this node is excluded by the per-key lock
//! that every write holds while it fills (not while it waits for NATS). Tested by
//! `test_stale_set_is_refused_after_a_peer_invalidation` in `clients/python/tests/test_client.py`
//! and `test_get_miss_then_set_is_refused_when_a_write_overtook_it` in `test_django.py` (forced
//! interleaving across two nodes, each with a control that caches the stale value without the
//! reservation), and by `sidecar_refuses_a_fill_overtaken_by_an_invalidation_from_another_node`
//! in `tests/tests/node.rs`.
//!
//! Values are stored with a small header ([`Stored`]) that keeps the entry's tags, version and
//! expiry, so that `Incr` and `Touch` can write the entry again without losing what a tag purge
//! or a version floor needs, and `Get` can tell a client's in-process cache the entry's tags.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use invalbus::{FillOutcome, InvalidateError, Invalidation, Loaded, Reservation, Target};
use tonic::{Request, Response, Status};

use crate::auth::Principal;
use crate::config::Role;
use crate::pb::cache::cache_server::Cache;
use crate::pb::cache::*;
use crate::state::NodeState;

/// How long a reservation stays valid.
const RESERVATION_TTL: Duration = Duration::from_secs(30);
/// Most reservations held at once; beyond it the oldest are dropped.
const MAX_RESERVATIONS: usize = 100_000;
/// Largest value accepted.
const MAX_VALUE_BYTES: usize = 4 * 1024 * 1024 - 1024;
/// Most keys in one batched call.
const MAX_BATCH_KEYS: usize = 1024;
/// Per-key locks that serialize this node's writes of one key (striped by hash).
const KEY_LOCKS: usize = 256;
/// How long a write waits for NATS to take its invalidation.
const PUBLISH_WAIT: Duration = Duration::from_secs(30);

/// The sidecar service of one node.
#[derive(Clone)]
pub struct SidecarService {
    state: Arc<NodeState>,
    reservations: Arc<Mutex<Reservations>>,
    key_locks: Arc<[tokio::sync::Mutex<()>]>,
    /// Turns true when the node shuts down: Watch streams end then (the server waits for its
    /// streams to finish before it stops).
    stop: tokio::sync::watch::Receiver<bool>,
}

/// One open reservation.
struct Open {
    at: Instant,
    cache: String,
    reservation: Reservation<Bytes>,
}

/// Open reservations by id, and their ids oldest first (ids already filled are skipped).
#[derive(Default)]
struct Reservations {
    open: HashMap<String, Open>,
    order: VecDeque<(Instant, String)>,
}

impl Reservations {
    fn insert(&mut self, id: String, open: Open) {
        let now = open.at;
        while let Some((at, id)) = self.order.front() {
            let expired = now.duration_since(*at) >= RESERVATION_TTL;
            if !expired && self.open.len() < MAX_RESERVATIONS && self.order.len() < 2 * MAX_RESERVATIONS {
                break;
            }
            self.open.remove(id.as_str());
            self.order.pop_front();
        }
        self.order.push_back((now, id.clone()));
        self.open.insert(id, open);
    }

    fn take(&mut self, id: &str) -> Option<Open> {
        self.open.remove(id).filter(|o| o.at.elapsed() < RESERVATION_TTL)
    }
}

/// A value as the node's cache holds it: the caller's bytes behind a header with the entry's
/// tags, version and expiry (Unix ms). Layout: `1u8, expires_ms u64, has_version u8,
/// version u64, tag count u8, (len u16, tag)*, value`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Stored {
    tags: Vec<String>,
    version: Option<u64>,
    expires_ms: u64,
    value: Bytes,
}

const STORED_FORMAT: u8 = 1;

impl Stored {
    fn encode(&self) -> Bytes {
        let tags: usize = self.tags.iter().map(|t| 2 + t.len()).sum();
        let mut b = BytesMut::with_capacity(19 + tags + self.value.len());
        b.put_u8(STORED_FORMAT);
        b.put_u64_le(self.expires_ms);
        b.put_u8(self.version.is_some() as u8);
        b.put_u64_le(self.version.unwrap_or(0));
        // The tags were checked (at most 32 per entry, at most 1,024 bytes each).
        b.put_u8(self.tags.len() as u8);
        for t in &self.tags {
            b.put_u16_le(t.len() as u16);
            b.put_slice(t.as_bytes());
        }
        b.put_slice(&self.value);
        b.freeze()
    }

    /// Only this module writes the cache's values, so a value that does not decode is a bug;
    /// it is treated as a miss rather than served.
    fn decode(mut raw: Bytes) -> Option<Stored> {
        if raw.len() < 19 || raw.get_u8() != STORED_FORMAT {
            return None;
        }
        let expires_ms = raw.get_u64_le();
        let has_version = raw.get_u8() == 1;
        let version = raw.get_u64_le();
        let n = raw.get_u8();
        let mut tags = Vec::with_capacity(n as usize);
        for _ in 0..n {
            if raw.remaining() < 2 {
                return None;
            }
            let len = raw.get_u16_le() as usize;
            if raw.remaining() < len {
                return None;
            }
            tags.push(String::from_utf8(raw.split_to(len).to_vec()).ok()?);
        }
        Some(Stored {
            tags,
            version: has_version.then_some(version),
            expires_ms,
            value: raw,
        })
    }

    fn ttl_left(&self, now_ms: u64) -> Duration {
        Duration::from_millis(self.expires_ms.saturating_sub(now_ms))
    }

    fn loaded(&self, now_ms: u64) -> Loaded<Bytes> {
        let mut l = Loaded::new(self.encode()).ttl(self.ttl_left(now_ms).max(Duration::from_millis(1)));
        l.tags = self.tags.clone();
        l.version = self.version;
        l
    }

    fn into_get(self, now_ms: u64) -> GetResponse {
        GetResponse {
            found: true,
            ttl_ms: self.expires_ms.saturating_sub(now_ms),
            value: self.value.to_vec(),
            tags: self.tags,
            version: self.version,
            reservation: String::new(),
        }
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// An invalidation applied on this node, not yet confirmed by NATS.
struct Pending {
    ticket: invalbus::Ticket,
    applied_us: u64,
}

/// A checked write of one key.
struct Write {
    key: String,
    stored: Stored,
    /// The lease its value is checked from; None when the caller's reservation was lost (the
    /// write is published, its value is not cached).
    since: Option<Reservation<Bytes>>,
    reason: String,
}

impl SidecarService {
    /// The service over a node's state.
    pub fn new(state: Arc<NodeState>) -> Self {
        SidecarService {
            state,
            reservations: Arc::new(Mutex::new(Reservations::default())),
            key_locks: (0..KEY_LOCKS).map(|_| tokio::sync::Mutex::new(())).collect(),
            stop: tokio::sync::watch::channel(false).1,
        }
    }

    /// Ends the Watch streams when `stop` turns true (the node's shutdown signal).
    pub fn stop_on(mut self, stop: tokio::sync::watch::Receiver<bool>) -> Self {
        self.stop = stop;
        self
    }

    fn cache(&self, method: &str, who: &Principal, name: &str) -> Result<&invalbus::Cache<Bytes>, Status> {
        self.state.caches.get(name).ok_or_else(|| {
            let mut names: Vec<_> = self.state.caches.keys().cloned().collect();
            names.sort();
            self.state.auth.refusals.invalid(
                method,
                who,
                format!("unknown cache {name:?}: this node holds {}", names.join(", ")),
            )
        })
    }

    /// The cache's own time to live.
    fn cache_ttl(&self, name: &str) -> Duration {
        let secs = self
            .state
            .config
            .caches
            .iter()
            .find(|c| c.name == name)
            .map_or(300, |c| c.ttl_secs.max(1));
        Duration::from_secs(secs)
    }

    fn check_key(&self, method: &str, who: &Principal, what: &str, key: &str) -> Result<(), Status> {
        let max = self.state.bus.limits().max_key_bytes;
        if key.is_empty() || key.len() > max {
            return Err(self.state.auth.refusals.invalid(
                method,
                who,
                format!("{what} must be 1 to {max} bytes (got {})", key.len()),
            ));
        }
        Ok(())
    }

    fn check_tag(&self, method: &str, who: &Principal, tag: &str) -> Result<(), Status> {
        self.check_key(method, who, "each tag", tag)?;
        if tag.contains('\0') {
            return Err(self
                .state
                .auth
                .refusals
                .invalid(method, who, "a tag cannot contain a NUL byte".into()));
        }
        Ok(())
    }

    fn check_batch(&self, method: &str, who: &Principal, n: usize) -> Result<(), Status> {
        if n > MAX_BATCH_KEYS {
            return Err(self.state.auth.refusals.invalid(
                method,
                who,
                format!("{n} keys in one call; at most {MAX_BATCH_KEYS}"),
            ));
        }
        Ok(())
    }

    /// Checks a value with its tags, version and time to live, and stamps its expiry.
    #[allow(clippy::too_many_arguments)]
    fn stored(
        &self,
        method: &str,
        who: &Principal,
        cache: &str,
        value: Vec<u8>,
        tags: Vec<String>,
        version: Option<u64>,
        ttl_ms: u64,
    ) -> Result<Stored, Status> {
        let limits = self.state.bus.limits();
        if value.len() > MAX_VALUE_BYTES {
            return Err(self.state.auth.refusals.invalid(
                method,
                who,
                format!("value is {} bytes; at most {MAX_VALUE_BYTES}", value.len()),
            ));
        }
        let max_tags = limits.max_tags_per_entry.min(u8::MAX as usize);
        if tags.len() > max_tags {
            return Err(self.state.auth.refusals.invalid(
                method,
                who,
                format!("{} tags; at most {max_tags} per entry", tags.len()),
            ));
        }
        for t in &tags {
            self.check_tag(method, who, t)?;
        }
        let cache_ttl = self.cache_ttl(cache);
        let ttl = match ttl_ms {
            0 => cache_ttl,
            ms => Duration::from_millis(ms).min(cache_ttl),
        };
        Ok(Stored {
            tags,
            version,
            expires_ms: now_ms().saturating_add(ttl.as_millis() as u64),
            value: Bytes::from(value),
        })
    }

    fn key_lock(&self, cache: &str, key: &str) -> &tokio::sync::Mutex<()> {
        use std::hash::{Hash, Hasher};
        // Fixed keys: the same key maps to the same lock on every call.
        let mut h = std::hash::DefaultHasher::new();
        cache.hash(&mut h);
        key.hash(&mut h);
        &self.key_locks[(h.finish() as usize) % self.key_locks.len()]
    }

    /// The value of `key` if the node holds one (and may serve it).
    async fn read(&self, cache: &invalbus::Cache<Bytes>, key: &str) -> Option<Stored> {
        let raw = cache.get(key).await?;
        let stored = Stored::decode(raw);
        if stored.is_none() {
            tracing::error!(
                cache = cache.name(),
                key,
                "a cached value has no valid header: treated as a miss"
            );
        }
        stored
    }

    /// A reservation taken now, remembered under a new id.
    fn reserve(&self, cache: &invalbus::Cache<Bytes>, key: &str) -> String {
        let id = format!("rs-{:032x}", rand::random::<u128>());
        let reservation = cache.reserve(key);
        let open = Open {
            at: Instant::now(),
            cache: cache.name().to_owned(),
            reservation,
        };
        self.reservations
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id.clone(), open);
        id
    }

    /// The reservation `id` of `key` in `cache`: None if it is unknown, expired or dropped (a
    /// fill through it is refused and counted); INVALID_ARGUMENT if it is another key's.
    fn taken(
        &self,
        method: &str,
        who: &Principal,
        id: &str,
        cache: &str,
        key: Option<&str>,
    ) -> Result<Option<Open>, Status> {
        let taken = self.reservations.lock().unwrap_or_else(|e| e.into_inner()).take(id);
        let Some(open) = taken else {
            self.state
                .counters
                .sidecar_refused_fills
                .fetch_add(1, Ordering::Relaxed);
            tracing::debug!(method, "unknown, expired or dropped reservation: nothing cached");
            return Ok(None);
        };
        if (!cache.is_empty() && open.cache != cache) || key.is_some_and(|k| k != open.reservation.key()) {
            return Err(self.state.auth.refusals.invalid(
                method,
                who,
                format!(
                    "the reservation is for key {:?} of cache {:?}",
                    open.reservation.key(),
                    open.cache
                ),
            ));
        }
        Ok(Some(open))
    }

    /// Applies an invalidation here and queues it for the peers: every read on this node that
    /// starts afterwards misses what it covers. [`SidecarService::confirm`] waits for NATS.
    async fn apply(
        &self,
        method: &str,
        who: &Principal,
        cache: &str,
        target: Target,
        version: Option<u64>,
        reason: String,
    ) -> Result<Pending, Status> {
        if !cache.is_empty() {
            self.cache(method, who, cache)?;
        }
        let mut inv = Invalidation::new((!cache.is_empty()).then_some(cache), target);
        inv.version = version;
        inv.reason = reason;
        inv.actor = who.name.as_str().into();
        let applied_us = invalbus::now_us();
        let ticket = self.state.bus.invalidate(inv).await.map_err(|e| match e {
            InvalidateError::Invalid(m) => self.state.auth.refusals.invalid(method, who, m),
            e => Status::unavailable(e.to_string()),
        })?;
        Ok(Pending { ticket, applied_us })
    }

    /// Waits until NATS has taken an applied invalidation (the stream, with JetStream), and
    /// records this node's receipt. Returns the batch's sequence.
    async fn confirm(&self, pending: Pending) -> Result<u64, Status> {
        let Pending { ticket, applied_us } = pending;
        let mut here = ticket.local();
        let hidden = ticket.pending_drops();
        match tokio::time::timeout(PUBLISH_WAIT, ticket.published()).await {
            Ok(Ok(p)) => {
                here.dropped += hidden.count().await;
                let st = &self.state;
                st.bus
                    .record_receipt(st.audit.local_receipt(st.bus.epoch(), p.seq, applied_us, 1, "", here));
                Ok(p.seq)
            }
            Ok(Err(e)) => Err(Status::unavailable(format!(
                "applied on this node, not confirmed by NATS: {e}"
            ))),
            Err(_) => Err(Status::unavailable(
                "applied on this node, not confirmed by NATS within 30 s",
            )),
        }
    }

    async fn invalidate(
        &self,
        method: &str,
        who: &Principal,
        cache: &str,
        target: Target,
        version: Option<u64>,
        reason: String,
    ) -> Result<u64, Status> {
        let pending = self.apply(method, who, cache, target, version, reason).await?;
        self.confirm(pending).await
    }

    /// A write of one key (the caller holds the key's lock): the two-step fill of the module
    /// docs around the key's invalidation. Returns whether the value was cached, and the
    /// invalidation to [`SidecarService::confirm`] once the lock is released (waiting for NATS
    /// must not hold up this node's other writes of the key).
    async fn store(
        &self,
        method: &str,
        who: &Principal,
        cache: &invalbus::Cache<Bytes>,
        write: Write,
    ) -> Result<(bool, Pending), Status> {
        let before = match write.since {
            Some(lease) => lease.fill(write.stored.loaded(now_ms())).await == FillOutcome::Filled,
            None => false,
        };
        let pending = self
            .apply(
                method,
                who,
                cache.name(),
                Target::Key(write.key.clone()),
                None,
                write.reason,
            )
            .await?;
        // Taken as soon as the own invalidation is applied here: anything applied from now on
        // refuses the second fill.
        let after = if before {
            cache.reserve(&write.key).fill(write.stored.loaded(now_ms())).await == FillOutcome::Filled
        } else {
            false
        };
        if !after {
            self.state
                .counters
                .sidecar_refused_fills
                .fetch_add(1, Ordering::Relaxed);
        }
        Ok((after, pending))
    }

    /// Checks one Set (or one entry of SetMany) and takes its reservation, or a lease as the call
    /// arrives (the write is then checked from here on).
    fn write(
        &self,
        method: &str,
        who: &Principal,
        cache: &invalbus::Cache<Bytes>,
        r: SetRequest,
    ) -> Result<Write, Status> {
        self.check_key(method, who, "key", &r.key)?;
        let stored = self.stored(method, who, cache.name(), r.value, r.tags, r.version, r.ttl_ms)?;
        let since = if r.reservation.is_empty() {
            Some(cache.reserve(&r.key))
        } else {
            self.taken(method, who, &r.reservation, cache.name(), Some(&r.key))?
                .map(|o| o.reservation)
        };
        let reason = if r.reason.is_empty() {
            method.to_lowercase()
        } else {
            r.reason
        };
        Ok(Write {
            key: r.key,
            stored,
            since,
            reason,
        })
    }

    /// Get (one key) or GetMany, for the read socket (`crate::readsock`): the same checks,
    /// answers and reservations as the gRPC calls.
    pub(crate) async fn read_many(
        &self,
        who: &Principal,
        cache: &str,
        keys: &[String],
        reserve: bool,
    ) -> Result<Vec<GetResponse>, Status> {
        let cache = self.cache("ReadSocket", who, cache)?;
        self.check_batch("ReadSocket", who, keys.len())?;
        for k in keys {
            self.check_key("ReadSocket", who, "key", k)?;
        }
        let mut entries = Vec::with_capacity(keys.len());
        for k in keys {
            entries.push(self.get_one(cache, k, reserve).await);
        }
        Ok(entries)
    }

    async fn get_one(&self, cache: &invalbus::Cache<Bytes>, key: &str, reserve: bool) -> GetResponse {
        match self.read(cache, key).await {
            Some(s) => s.into_get(now_ms()),
            None => GetResponse {
                reservation: if reserve {
                    self.reserve(cache, key)
                } else {
                    String::new()
                },
                ..Default::default()
            },
        }
    }
}

#[tonic::async_trait]
impl Cache for SidecarService {
    type WatchStream = crate::watch::WatchStream;

    async fn watch(&self, request: Request<WatchRequest>) -> Result<Response<Self::WatchStream>, Status> {
        let who = self.state.auth.check(&request, "Watch", Role::Cache)?;
        let r = request.into_inner();
        self.cache("Watch", &who, &r.cache)?;
        Ok(Response::new(crate::watch::watch(
            self.state.clone(),
            r.cache,
            self.stop.clone(),
        )))
    }

    async fn get(&self, request: Request<GetRequest>) -> Result<Response<GetResponse>, Status> {
        let who = self.state.auth.check(&request, "Get", Role::Cache)?;
        let r = request.into_inner();
        let cache = self.cache("Get", &who, &r.cache)?;
        self.check_key("Get", &who, "key", &r.key)?;
        Ok(Response::new(self.get_one(cache, &r.key, r.reserve).await))
    }

    async fn get_many(&self, request: Request<GetManyRequest>) -> Result<Response<GetManyResponse>, Status> {
        let who = self.state.auth.check(&request, "GetMany", Role::Cache)?;
        let r = request.into_inner();
        let cache = self.cache("GetMany", &who, &r.cache)?;
        self.check_batch("GetMany", &who, r.keys.len())?;
        for k in &r.keys {
            self.check_key("GetMany", &who, "key", k)?;
        }
        let mut entries = Vec::with_capacity(r.keys.len());
        for k in &r.keys {
            entries.push(self.get_one(cache, k, r.reserve).await);
        }
        Ok(Response::new(GetManyResponse { entries }))
    }

    async fn set(&self, request: Request<SetRequest>) -> Result<Response<SetResponse>, Status> {
        let who = self.state.auth.check(&request, "Set", Role::Cache)?;
        let r = request.into_inner();
        let cache = self.cache("Set", &who, &r.cache)?;
        let w = self.write("Set", &who, cache, r)?;
        let lock = self.key_lock(cache.name(), &w.key).lock().await;
        let (stored, pending) = self.store("Set", &who, cache, w).await?;
        drop(lock);
        let seq = self.confirm(pending).await?;
        Ok(Response::new(SetResponse { stored, seq }))
    }

    async fn set_many(&self, request: Request<SetManyRequest>) -> Result<Response<SetManyResponse>, Status> {
        let who = self.state.auth.check(&request, "SetMany", Role::Cache)?;
        let r = request.into_inner();
        let cache = self.cache("SetMany", &who, &r.cache)?;
        self.check_batch("SetMany", &who, r.entries.len())?;
        let mut writes = Vec::with_capacity(r.entries.len());
        for e in r.entries {
            writes.push(self.write("SetMany", &who, cache, e)?);
        }
        // Concurrently, so that the invalidations travel in one batch; each holds its key's lock.
        let results = futures::future::join_all(writes.into_iter().map(|w| async {
            let lock = self.key_lock(cache.name(), &w.key).lock().await;
            let (stored, pending) = self.store("SetMany", &who, cache, w).await?;
            drop(lock);
            self.confirm(pending).await.map(|seq| (stored, seq))
        }))
        .await;
        let stored = results
            .into_iter()
            .map(|r| r.map(|(s, _)| s))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Response::new(SetManyResponse { stored }))
    }

    async fn add(&self, request: Request<SetRequest>) -> Result<Response<AddResponse>, Status> {
        let who = self.state.auth.check(&request, "Add", Role::Cache)?;
        let r = request.into_inner();
        let cache = self.cache("Add", &who, &r.cache)?;
        let w = self.write("Add", &who, cache, r)?;
        let lock = self.key_lock(cache.name(), &w.key).lock().await;
        if self.read(cache, &w.key).await.is_some() {
            return Ok(Response::new(AddResponse {
                added: false,
                stored: false,
            }));
        }
        let (stored, pending) = self.store("Add", &who, cache, w).await?;
        drop(lock);
        self.confirm(pending).await?;
        Ok(Response::new(AddResponse { added: true, stored }))
    }

    async fn incr(&self, request: Request<IncrRequest>) -> Result<Response<IncrResponse>, Status> {
        let who = self.state.auth.check(&request, "Incr", Role::Cache)?;
        let r = request.into_inner();
        let cache = self.cache("Incr", &who, &r.cache)?;
        self.check_key("Incr", &who, "key", &r.key)?;
        let lock = self.key_lock(cache.name(), &r.key).lock().await;
        // Taken before the read: an invalidation between the read and the write refuses it.
        let lease = cache.reserve(&r.key);
        let Some(mut current) = self.read(cache, &r.key).await else {
            return Err(Status::not_found(format!("no value for key {:?}", r.key)));
        };
        let n: i64 = std::str::from_utf8(&current.value)
            .ok()
            .filter(|s| {
                let digits = s.strip_prefix('-').unwrap_or(s);
                !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit())
            })
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| Status::failed_precondition(format!("the value of {:?} is not an integer", r.key)))?;
        let value = n
            .checked_add(r.delta)
            .ok_or_else(|| Status::out_of_range(format!("{n} + {} overflows a signed 64-bit integer", r.delta)))?;
        current.value = Bytes::from(value.to_string());
        let (stored, pending) = self
            .store(
                "Incr",
                &who,
                cache,
                Write {
                    key: r.key,
                    stored: current,
                    since: Some(lease),
                    reason: "incr".into(),
                },
            )
            .await?;
        drop(lock);
        self.confirm(pending).await?;
        Ok(Response::new(IncrResponse { value, stored }))
    }

    async fn touch(&self, request: Request<TouchRequest>) -> Result<Response<TouchResponse>, Status> {
        let who = self.state.auth.check(&request, "Touch", Role::Cache)?;
        let r = request.into_inner();
        let cache = self.cache("Touch", &who, &r.cache)?;
        self.check_key("Touch", &who, "key", &r.key)?;
        let _lock = self.key_lock(cache.name(), &r.key).lock().await;
        let lease = cache.reserve(&r.key);
        let Some(mut current) = self.read(cache, &r.key).await else {
            return Ok(Response::new(TouchResponse { touched: false }));
        };
        let cache_ttl = self.cache_ttl(&r.cache);
        let ttl = match r.ttl_ms {
            0 => cache_ttl,
            ms => Duration::from_millis(ms).min(cache_ttl),
        };
        let now = now_ms();
        current.expires_ms = now.saturating_add(ttl.as_millis() as u64);
        // Not a write: the value is the same, so nothing is published; the lease refuses the
        // new copy if an invalidation landed since the read.
        let touched = lease.fill(current.loaded(now)).await == FillOutcome::Filled;
        Ok(Response::new(TouchResponse { touched }))
    }

    async fn delete(&self, request: Request<DeleteRequest>) -> Result<Response<DeleteResponse>, Status> {
        let who = self.state.auth.check(&request, "Delete", Role::Cache)?;
        let r = request.into_inner();
        let cache = self.cache("Delete", &who, &r.cache)?;
        self.check_batch("Delete", &who, r.keys.len())?;
        for k in &r.keys {
            self.check_key("Delete", &who, "key", k)?;
        }
        let reason = if r.reason.is_empty() {
            "delete".to_owned()
        } else {
            r.reason
        };
        let results = futures::future::join_all(r.keys.iter().map(|k| async {
            let lock = self.key_lock(cache.name(), k).lock().await;
            let existed = self.read(cache, k).await.is_some();
            let pending = self
                .apply(
                    "Delete",
                    &who,
                    cache.name(),
                    Target::Key(k.clone()),
                    None,
                    reason.clone(),
                )
                .await?;
            drop(lock);
            self.confirm(pending).await.map(|_| existed)
        }))
        .await;
        let existed = results.into_iter().collect::<Result<Vec<_>, _>>()?;
        Ok(Response::new(DeleteResponse { existed }))
    }

    async fn get_or_reserve(&self, request: Request<GetRequest>) -> Result<Response<GetOrReserveResponse>, Status> {
        let who = self.state.auth.check(&request, "GetOrReserve", Role::Cache)?;
        let r = request.into_inner();
        let cache = self.cache("GetOrReserve", &who, &r.cache)?;
        self.check_key("GetOrReserve", &who, "key", &r.key)?;
        let g = self.get_one(cache, &r.key, true).await;
        Ok(Response::new(GetOrReserveResponse {
            found: g.found,
            value: g.value,
            reservation: g.reservation,
            tags: g.tags,
            version: g.version,
            ttl_ms: g.ttl_ms,
        }))
    }

    async fn fill(&self, request: Request<FillRequest>) -> Result<Response<SetResponse>, Status> {
        let who = self.state.auth.check(&request, "Fill", Role::Cache)?;
        let r = request.into_inner();
        let Some(open) = self.taken("Fill", &who, &r.reservation, "", None)? else {
            return Err(Status::failed_precondition(
                "unknown, expired or dropped reservation: nothing was cached (read again)",
            ));
        };
        let stored = self.stored("Fill", &who, &open.cache, r.value, r.tags, r.version, r.ttl_ms)?;
        let filled = open.reservation.fill(stored.loaded(now_ms())).await == FillOutcome::Filled;
        if !filled {
            self.state
                .counters
                .sidecar_refused_fills
                .fetch_add(1, Ordering::Relaxed);
        }
        Ok(Response::new(SetResponse { stored: filled, seq: 0 }))
    }

    async fn invalidate_key(
        &self,
        request: Request<InvalidateKeyRequest>,
    ) -> Result<Response<InvalidateResponse>, Status> {
        let who = self.state.auth.check(&request, "InvalidateKey", Role::Cache)?;
        let r = request.into_inner();
        self.check_key("InvalidateKey", &who, "key", &r.key)?;
        let seq = self
            .invalidate("InvalidateKey", &who, &r.cache, Target::Key(r.key), r.version, r.reason)
            .await?;
        Ok(Response::new(InvalidateResponse { seq }))
    }

    async fn invalidate_tag(
        &self,
        request: Request<InvalidateTagRequest>,
    ) -> Result<Response<InvalidateResponse>, Status> {
        let who = self.state.auth.check(&request, "InvalidateTag", Role::Cache)?;
        let r = request.into_inner();
        self.check_tag("InvalidateTag", &who, &r.tag)?;
        let seq = self
            .invalidate("InvalidateTag", &who, &r.cache, Target::Tag(r.tag), None, r.reason)
            .await?;
        Ok(Response::new(InvalidateResponse { seq }))
    }

    async fn invalidate_prefix(
        &self,
        request: Request<InvalidatePrefixRequest>,
    ) -> Result<Response<InvalidateResponse>, Status> {
        let who = self.state.auth.check(&request, "InvalidatePrefix", Role::Cache)?;
        let r = request.into_inner();
        self.check_key("InvalidatePrefix", &who, "prefix", &r.prefix)?;
        let seq = self
            .invalidate(
                "InvalidatePrefix",
                &who,
                &r.cache,
                Target::Prefix(r.prefix),
                None,
                r.reason,
            )
            .await?;
        Ok(Response::new(InvalidateResponse { seq }))
    }

    async fn invalidate_all(
        &self,
        request: Request<InvalidateAllRequest>,
    ) -> Result<Response<InvalidateResponse>, Status> {
        let who = self.state.auth.check(&request, "InvalidateAll", Role::Cache)?;
        let r = request.into_inner();
        let seq = self
            .invalidate("InvalidateAll", &who, &r.cache, Target::All, None, r.reason)
            .await?;
        Ok(Response::new(InvalidateResponse { seq }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stored_values_round_trip_and_bad_headers_are_misses() {
        let s = Stored {
            tags: vec!["a".into(), "author:42".into()],
            version: Some(7),
            expires_ms: 123,
            value: Bytes::from_static(b"\x80payload"),
        };
        assert_eq!(Stored::decode(s.encode()), Some(s.clone()));
        let bare = Stored {
            tags: vec![],
            version: None,
            ..s
        };
        assert_eq!(Stored::decode(bare.encode()), Some(bare));
        assert_eq!(Stored::decode(Bytes::from_static(b"short")), None);
        assert_eq!(Stored::decode(s_with_tag_len_beyond_end()), None);
    }

    fn s_with_tag_len_beyond_end() -> Bytes {
        let mut b = BytesMut::new();
        b.put_u8(STORED_FORMAT);
        b.put_u64_le(0);
        b.put_u8(0);
        b.put_u64_le(0);
        b.put_u8(1);
        b.put_u16_le(500);
        b.put_slice(b"x");
        b.freeze()
    }

    #[tokio::test]
    async fn reservations_expire_and_the_oldest_go_first() {
        let hub = invalbus::InProcessHub::new();
        let bus = invalbus::Bus::builder().in_process(&hub).build().await.unwrap();
        let cache = bus.cache::<Bytes>("c", invalbus::CacheConfig::new(10)).unwrap();
        let open = |at: Instant, key: &str| Open {
            at,
            cache: "c".into(),
            reservation: cache.reserve(key),
        };
        let mut r = Reservations::default();
        let now = Instant::now();
        r.insert("old".into(), open(now - RESERVATION_TTL * 2, "a"));
        r.insert("taken".into(), open(now - RESERVATION_TTL / 2, "b"));
        assert!(r.take("taken").is_some());
        assert!(r.take("taken").is_none(), "a reservation is taken once");
        r.insert("new".into(), open(now, "c"));
        assert!(!r.open.contains_key("old"), "an expired reservation is dropped");
        assert!(r.take("new").is_some());
        bus.shutdown().await;
    }
}
