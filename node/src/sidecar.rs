//! The sidecar cache service (`invalbus.cache.v1.Cache`): the node's caches for processes not
//! written in Rust, with the library's stale-fill protection through reservations.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use invalbus::{FillOutcome, InvalidateError, Invalidation, Loaded, Reservation, Target};
use tonic::{Request, Response, Status};

use crate::auth::Principal;
use crate::config::Role;
use crate::pb::cache::cache_server::Cache;
use crate::pb::cache::*;
use crate::state::NodeState;

/// How long a reservation stays valid.
const RESERVATION_TTL: Duration = Duration::from_secs(30);
/// Most reservations held at once.
const MAX_RESERVATIONS: usize = 100_000;
/// Largest value accepted.
const MAX_VALUE_BYTES: usize = 4 * 1024 * 1024 - 1024;

/// The sidecar service of one node.
#[derive(Clone)]
pub struct SidecarService {
    state: Arc<NodeState>,
    reservations: Arc<Mutex<Reservations>>,
}

/// Open reservations by id, with when they were made.
type Reservations = HashMap<String, (Instant, Reservation<Bytes>)>;

impl SidecarService {
    /// The service over a node's state.
    pub fn new(state: Arc<NodeState>) -> Self {
        SidecarService {
            state,
            reservations: Arc::new(Mutex::new(HashMap::new())),
        }
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

    fn loaded(
        &self,
        method: &str,
        who: &Principal,
        value: Bytes,
        tags: Vec<String>,
        version: Option<u64>,
        ttl_ms: u64,
    ) -> Result<Loaded<Bytes>, Status> {
        let limits = self.state.bus.limits();
        if value.len() > MAX_VALUE_BYTES {
            return Err(self.state.auth.refusals.invalid(
                method,
                who,
                format!("value is {} bytes; at most {MAX_VALUE_BYTES}", value.len()),
            ));
        }
        if tags.len() > limits.max_tags_per_entry {
            return Err(self.state.auth.refusals.invalid(
                method,
                who,
                format!("{} tags; at most {} per entry", tags.len(), limits.max_tags_per_entry),
            ));
        }
        let mut l = Loaded::new(value);
        for t in tags {
            self.check_key(method, who, "each tag", &t)?;
            l = l.tag(t);
        }
        if let Some(v) = version {
            l = l.version(v);
        }
        if ttl_ms > 0 {
            l = l.ttl(Duration::from_millis(ttl_ms));
        }
        Ok(l)
    }

    async fn invalidate(
        &self,
        method: &str,
        who: &Principal,
        cache: &str,
        target: Target,
        version: Option<u64>,
        reason: String,
    ) -> Result<Response<InvalidateResponse>, Status> {
        if !cache.is_empty() {
            self.cache(method, who, cache)?;
        }
        let mut inv = Invalidation::new((!cache.is_empty()).then_some(cache), target);
        inv.version = version;
        inv.reason = reason;
        inv.actor = who.name.clone();
        let applied_us = invalbus::now_us();
        let ticket = self.state.bus.invalidate(inv).await.map_err(|e| match e {
            InvalidateError::Invalid(m) => self.state.auth.refusals.invalid(method, who, m),
            e => Status::unavailable(e.to_string()),
        })?;
        let mut here = ticket.local();
        let hidden = ticket.pending_drops();
        match tokio::time::timeout(Duration::from_secs(30), ticket.published()).await {
            Ok(Ok(p)) => {
                here.dropped += hidden.count().await;
                let st = &self.state;
                st.bus
                    .record_receipt(st.audit.local_receipt(st.bus.epoch(), p.seq, applied_us, 1, "", here));
                Ok(Response::new(InvalidateResponse { seq: p.seq }))
            }
            Ok(Err(e)) => Err(Status::unavailable(format!(
                "applied on this node, not confirmed by NATS: {e}"
            ))),
            Err(_) => Err(Status::unavailable(
                "applied on this node, not confirmed by NATS within 30 s",
            )),
        }
    }
}

#[tonic::async_trait]
impl Cache for SidecarService {
    async fn get(&self, request: Request<GetRequest>) -> Result<Response<GetResponse>, Status> {
        let who = self.state.auth.check(&request, "Get", Role::Cache)?;
        let r = request.into_inner();
        let cache = self.cache("Get", &who, &r.cache)?;
        self.check_key("Get", &who, "key", &r.key)?;
        Ok(Response::new(match cache.get(&r.key).await {
            Some(v) => GetResponse {
                found: true,
                value: v.to_vec(),
            },
            None => GetResponse::default(),
        }))
    }

    async fn set(&self, request: Request<SetRequest>) -> Result<Response<SetResponse>, Status> {
        let who = self.state.auth.check(&request, "Set", Role::Cache)?;
        let r = request.into_inner();
        let cache = self.cache("Set", &who, &r.cache)?;
        self.check_key("Set", &who, "key", &r.key)?;
        let loaded = self.loaded("Set", &who, Bytes::from(r.value), r.tags, r.version, r.ttl_ms)?;
        let stored = cache.reserve(&r.key).fill(loaded).await == FillOutcome::Filled;
        Ok(Response::new(SetResponse { stored }))
    }

    async fn get_or_reserve(&self, request: Request<GetRequest>) -> Result<Response<GetOrReserveResponse>, Status> {
        let who = self.state.auth.check(&request, "GetOrReserve", Role::Cache)?;
        let r = request.into_inner();
        let cache = self.cache("GetOrReserve", &who, &r.cache)?;
        self.check_key("GetOrReserve", &who, "key", &r.key)?;
        if let Some(v) = cache.get(&r.key).await {
            return Ok(Response::new(GetOrReserveResponse {
                found: true,
                value: v.to_vec(),
                reservation: String::new(),
            }));
        }
        let id = format!("rs-{:032x}", rand::random::<u128>());
        let reservation = cache.reserve(&r.key);
        let mut map = self.reservations.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        map.retain(|_, (at, _)| now.duration_since(*at) < RESERVATION_TTL);
        if map.len() >= MAX_RESERVATIONS {
            return Err(Status::resource_exhausted(
                "too many open reservations: fill or drop some",
            ));
        }
        map.insert(id.clone(), (now, reservation));
        Ok(Response::new(GetOrReserveResponse {
            found: false,
            value: Vec::new(),
            reservation: id,
        }))
    }

    async fn fill(&self, request: Request<FillRequest>) -> Result<Response<SetResponse>, Status> {
        let who = self.state.auth.check(&request, "Fill", Role::Cache)?;
        let r = request.into_inner();
        let taken = self
            .reservations
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&r.reservation);
        let Some((at, reservation)) = taken.filter(|(at, _)| at.elapsed() < RESERVATION_TTL) else {
            return Err(self.state.auth.refusals.invalid(
                "Fill",
                &who,
                "unknown or expired reservation: call GetOrReserve again".into(),
            ));
        };
        let _ = at;
        let loaded = self.loaded("Fill", &who, Bytes::from(r.value), r.tags, r.version, 0)?;
        let stored = reservation.fill(loaded).await == FillOutcome::Filled;
        if !stored {
            self.state
                .counters
                .sidecar_refused_fills
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        Ok(Response::new(SetResponse { stored }))
    }

    async fn invalidate_key(
        &self,
        request: Request<InvalidateKeyRequest>,
    ) -> Result<Response<InvalidateResponse>, Status> {
        let who = self.state.auth.check(&request, "InvalidateKey", Role::Cache)?;
        let r = request.into_inner();
        self.check_key("InvalidateKey", &who, "key", &r.key)?;
        self.invalidate("InvalidateKey", &who, &r.cache, Target::Key(r.key), r.version, r.reason)
            .await
    }

    async fn invalidate_tag(
        &self,
        request: Request<InvalidateTagRequest>,
    ) -> Result<Response<InvalidateResponse>, Status> {
        let who = self.state.auth.check(&request, "InvalidateTag", Role::Cache)?;
        let r = request.into_inner();
        self.check_key("InvalidateTag", &who, "tag", &r.tag)?;
        self.invalidate("InvalidateTag", &who, &r.cache, Target::Tag(r.tag), None, r.reason)
            .await
    }

    async fn invalidate_prefix(
        &self,
        request: Request<InvalidatePrefixRequest>,
    ) -> Result<Response<InvalidateResponse>, Status> {
        let who = self.state.auth.check(&request, "InvalidatePrefix", Role::Cache)?;
        let r = request.into_inner();
        self.check_key("InvalidatePrefix", &who, "prefix", &r.prefix)?;
        self.invalidate(
            "InvalidatePrefix",
            &who,
            &r.cache,
            Target::Prefix(r.prefix),
            None,
            r.reason,
        )
        .await
    }

    async fn invalidate_all(
        &self,
        request: Request<InvalidateAllRequest>,
    ) -> Result<Response<InvalidateResponse>, Status> {
        let who = self.state.auth.check(&request, "InvalidateAll", Role::Cache)?;
        let r = request.into_inner();
        self.invalidate("InvalidateAll", &who, &r.cache, Target::All, None, r.reason)
            .await
    }
}
