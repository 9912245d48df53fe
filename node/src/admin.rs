//! The admin service (`invalbus.admin.v1.Admin`): purges, the cluster view, figures and the
//! audit log, each behind a token role.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use futures::{Stream, StreamExt};
use invalbus::{InvalidateError, Invalidation, Target};
use tokio::sync::mpsc;
use tonic::{Request, Response, Status};

use crate::audit::{merge_receipts, AuditError, Filter};
use crate::config::Role;
use crate::pb::admin::admin_server::Admin;
use crate::pb::admin::*;
use crate::state::NodeState;

/// Longest a purge may wait for receipts.
const MAX_WAIT_MS: u32 = 60_000;
/// Default wait for receipts.
const DEFAULT_WAIT_MS: u32 = 5_000;
/// Largest page of QueryAudit.
const MAX_PAGE: u32 = 500;

/// The admin service of one node.
#[derive(Clone)]
pub struct AdminService {
    state: Arc<NodeState>,
}

/// Most nodes in one ListNodes answer (a reply stays well under gRPC's 4 MiB).
const MAX_NODES_PAGE: usize = 500;

impl AdminService {
    /// The service over a node's state.
    pub fn new(state: Arc<NodeState>) -> Self {
        AdminService { state }
    }
}

fn audit_status(e: AuditError) -> Status {
    match e {
        AuditError::NoStream => Status::failed_precondition(e.to_string()),
        AuditError::Unavailable(_) => Status::unavailable(e.to_string()),
    }
}

/// Checks a purge request; the error says what to fix.
fn check_purge(st: &NodeState, r: &PurgeRequest) -> Result<(), String> {
    let max_key = st.bus.limits().max_key_bytes;
    let n = r.keys.len() + r.tags.len() + r.prefixes.len();
    if r.reason.trim().is_empty() {
        return Err("reason is required: say why you purge (it is recorded in the audit log)".into());
    }
    if r.reason.len() > max_key {
        return Err(format!(
            "reason is {} bytes; at most {max_key} are allowed",
            r.reason.len()
        ));
    }
    if r.all && n > 0 {
        return Err("all=true purges everything: do not also give keys, tags or prefixes".into());
    }
    if !r.all && n == 0 {
        return Err("empty purge: give keys, tags or prefixes, or all=true".into());
    }
    if n > st.config.max_purge_targets {
        return Err(format!(
            "{n} targets in one purge; at most {} are allowed: split it into several purges",
            st.config.max_purge_targets
        ));
    }
    for (kind, list) in [("key", &r.keys), ("tag", &r.tags), ("prefix", &r.prefixes)] {
        for t in list.iter() {
            if t.is_empty() {
                return Err(format!("empty {kind}: every {kind} needs at least one character"));
            }
            if t.len() > max_key {
                return Err(format!(
                    "{kind} {:?}… is {} bytes; at most {max_key} are allowed",
                    t.chars().take(32).collect::<String>(),
                    t.len()
                ));
            }
        }
    }
    if !r.cache.is_empty() {
        let known = st.known_caches();
        if !known.contains(&r.cache) {
            let mut names: Vec<_> = known.into_iter().collect();
            names.sort();
            return Err(format!(
                "unknown cache {:?}: the cluster holds {}; leave cache empty to purge every cache",
                r.cache,
                if names.is_empty() {
                    "none".to_owned()
                } else {
                    names.join(", ")
                }
            ));
        }
    }
    if r.wait_timeout_ms > MAX_WAIT_MS {
        return Err(format!(
            "wait_timeout_ms {} is too long; at most {MAX_WAIT_MS}",
            r.wait_timeout_ms
        ));
    }
    Ok(())
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn purge(&self, request: Request<PurgeRequest>) -> Result<Response<PurgeResponse>, Status> {
        let st = &self.state;
        let who = st.auth.check(&request, "Purge", Role::Purge)?;
        let r = request.into_inner();
        check_purge(st, &r).map_err(|m| st.auth.refusals.invalid("Purge", &who, m))?;
        let purge_id = format!("pg-{:016x}", rand::random::<u64>());
        let cache = (!r.cache.is_empty()).then_some(r.cache.as_str());
        let mut targets: Vec<Target> = Vec::new();
        if r.all {
            targets.push(Target::All);
        }
        targets.extend(r.keys.iter().cloned().map(Target::Key));
        targets.extend(r.tags.iter().cloned().map(Target::Tag));
        targets.extend(r.prefixes.iter().cloned().map(Target::Prefix));
        let node = st.bus.node_id().to_owned();
        let epoch = st.bus.epoch();
        // Listen for receipts before publishing, so none is missed.
        let mut sub = if r.wait {
            let s = st
                .audit
                .client()
                .subscribe(st.audit.subjects().receipts_of_epoch(&node, epoch))
                .await
                .map_err(|e| Status::unavailable(format!("cannot listen for receipts: {e}")))?;
            Some(s)
        } else {
            None
        };
        let applied_us = invalbus::now_us();
        let mut tickets = Vec::with_capacity(targets.len());
        // Every target's invalidation shares the cache's name and the actor.
        let template = Invalidation {
            reason: r.reason.clone(),
            actor: who.name.as_str().into(),
            purge_id: purge_id.clone(),
            ..Invalidation::new(cache, Target::All)
        };
        for t in targets {
            let inv = Invalidation {
                target: t,
                ..template.clone()
            };
            match st.bus.invalidate(inv).await {
                Ok(ticket) => tickets.push(ticket),
                Err(InvalidateError::Invalid(m)) => return Err(st.auth.refusals.invalid("Purge", &who, m)),
                Err(e) => {
                    return Err(Status::unavailable(format!(
                        "purge {purge_id}: {e} ({} of its targets were published)",
                        tickets.len()
                    )))
                }
            }
        }
        let n = tickets.len() as u32;
        let mut seqs = BTreeSet::new();
        // What the purge did here, per batch: this node's own receipt.
        let mut local: HashMap<u64, invalbus::ApplyOutcome> = HashMap::new();
        for t in tickets {
            let here = t.local();
            let hidden = t.pending_drops();
            match tokio::time::timeout(Duration::from_secs(60), t.published()).await {
                Ok(Ok(p)) => {
                    seqs.insert(p.seq);
                    // Entries a tag or prefix purge hid are counted by the sweep that removes
                    // them, which has usually finished by the time NATS confirmed the batch.
                    let swept = hidden.count().await;
                    let e = local.entry(p.seq).or_default();
                    e.dropped += here.dropped + swept;
                    e.flushed |= here.flushed;
                }
                Ok(Err(e)) => {
                    return Err(Status::unavailable(format!(
                        "purge {purge_id} was applied on this node but not confirmed by NATS: {e}"
                    )))
                }
                Err(_) => {
                    return Err(Status::unavailable(format!(
                        "purge {purge_id} was applied on this node but not confirmed by NATS within 60 s"
                    )))
                }
            }
        }
        st.counters.purges.fetch_add(1, Ordering::Relaxed);
        tracing::info!(node = %node, purge_id = %purge_id, principal = %who.name, targets = n, batches = seqs.len(), reason = %r.reason, "purge published");
        let mut receipts = Vec::new();
        for &seq in &seqs {
            let here = local.get(&seq).copied().unwrap_or_default();
            let rc = st.audit.local_receipt(epoch, seq, applied_us, n, &purge_id, here);
            st.bus.record_receipt(rc.clone());
            receipts.push(crate::audit::to_pb(rc));
        }
        let mut missing = Vec::new();
        if let Some(sub) = sub.as_mut() {
            let wait = Duration::from_millis(u64::from(if r.wait_timeout_ms == 0 {
                DEFAULT_WAIT_MS
            } else {
                r.wait_timeout_ms
            }));
            let expected = st.receipt_writers();
            let mut covered: HashMap<String, HashSet<u64>> = HashMap::new();
            covered.insert(node.clone(), seqs.iter().copied().collect());
            let done = |c: &HashMap<String, HashSet<u64>>| {
                expected
                    .iter()
                    .all(|n| c.get(n).is_some_and(|s| seqs.iter().all(|q| s.contains(q))))
            };
            let deadline = tokio::time::Instant::now() + wait;
            while !done(&covered) {
                let m = match tokio::time::timeout_at(deadline, sub.next()).await {
                    Ok(Some(m)) => m,
                    _ => break,
                };
                // Only a receipt signed by a key trusted to write receipts as its node counts:
                // a forged one must not make a purge look applied.
                let Some(rc) = crate::audit::opened_receipt(&st.bus, &m.payload).filter(|r| r.verified) else {
                    continue;
                };
                if rc.node == node || !seqs.contains(&rc.seq) || rc.epoch != epoch {
                    continue;
                }
                if covered.entry(rc.node.clone()).or_default().insert(rc.seq) {
                    receipts.push(rc);
                }
            }
            // In a NATS cluster our subscription reaches the other servers a moment after the
            // purge was published, so a fast node's receipt can go by unheard: it is in the
            // receipts stream, so look there before calling a node missing.
            if !done(&covered) {
                for &seq in &seqs {
                    if let Ok(stored) = st.audit.receipts(&node, epoch, seq).await {
                        for rc in stored.into_iter().filter(|r| r.verified) {
                            if rc.node != node && covered.entry(rc.node.clone()).or_default().insert(rc.seq) {
                                receipts.push(rc);
                            }
                        }
                    }
                }
            }
            missing = expected
                .iter()
                .filter(|n| !covered.get(*n).is_some_and(|s| seqs.iter().all(|q| s.contains(q))))
                .cloned()
                .collect();
            missing.sort();
        }
        receipts.sort_by(|a, b| (&a.node, a.seq).cmp(&(&b.node, b.seq)));
        Ok(Response::new(PurgeResponse {
            purge_id,
            invalidations: n,
            receipts,
            missing_nodes: missing,
            origin: node,
        }))
    }

    async fn list_nodes(&self, request: Request<ListNodesRequest>) -> Result<Response<ListNodesResponse>, Status> {
        let st = &self.state;
        st.auth.check(&request, "ListNodes", Role::Read)?;
        let bus = &st.bus;
        let mut nodes = vec![NodeInfo {
            node_id: bus.node_id().to_owned(),
            epoch: bus.epoch(),
            address: st.advertise.clone(),
            last_seq: bus.last_published_seq(),
            lag: 0,
            caches: bus
                .cache_stats()
                .into_iter()
                .map(|c| CacheSize {
                    name: c.name,
                    entries: c.entries,
                })
                .collect(),
            last_seen_us: invalbus::now_us(),
            is_self: true,
        }];
        let r = request.into_inner();
        let page_size = match r.page_size {
            0 => MAX_NODES_PAGE,
            n => (n as usize).min(MAX_NODES_PAGE),
        };
        // Nodes come sorted by id; a page token is the last id of the previous page.
        let after = r.page_token;
        if !after.is_empty() {
            nodes.clear();
        }
        let peers: Vec<_> = bus.peers().into_iter().filter(|p| p.node_id > after).collect();
        let room = page_size.saturating_sub(nodes.len());
        let more = peers.len() > room;
        for p in peers.into_iter().take(room) {
            nodes.push(NodeInfo {
                node_id: p.node_id,
                epoch: p.epoch,
                address: p.address,
                last_seq: p.last_seq,
                lag: p.last_seq.saturating_sub(p.applied_seq),
                caches: p
                    .caches
                    .into_iter()
                    .map(|(name, entries)| CacheSize { name, entries })
                    .collect(),
                last_seen_us: p.last_seen_us,
                is_self: false,
            });
        }
        let next_page_token = if more {
            nodes.last().map(|n| n.node_id.clone()).unwrap_or_default()
        } else {
            String::new()
        };
        Ok(Response::new(ListNodesResponse { nodes, next_page_token }))
    }

    async fn stats(&self, request: Request<StatsRequest>) -> Result<Response<StatsResponse>, Status> {
        let st = &self.state;
        st.auth.check(&request, "Stats", Role::Read)?;
        Ok(Response::new(st.stats()))
    }

    async fn query_audit(&self, request: Request<QueryAuditRequest>) -> Result<Response<QueryAuditResponse>, Status> {
        let st = &self.state;
        let who = st.auth.check(&request, "QueryAudit", Role::Read)?;
        let r = request.into_inner();
        let filter = Filter::from_pb(r.filter.as_ref(), st.bus.limits())
            .map_err(|m| st.auth.refusals.invalid("QueryAudit", &who, m))?;
        if r.page_size > MAX_PAGE {
            return Err(st.auth.refusals.invalid(
                "QueryAudit",
                &who,
                format!("page_size {} is too large; at most {MAX_PAGE}", r.page_size),
            ));
        }
        let page_size = if r.page_size == 0 { 20 } else { r.page_size as usize };
        let before = match crate::audit::parse_page_token(&r.page_token) {
            Ok(before) => before,
            Err(why) => return Err(st.auth.refusals.invalid("QueryAudit", &who, why)),
        };
        let (records, next, scanned) = st.audit.query(&filter, page_size, before).await.map_err(audit_status)?;
        let records = records
            .into_iter()
            .map(|mut r| {
                r.receipts = merge_receipts(r.receipts.into_iter());
                r
            })
            .collect();
        Ok(Response::new(QueryAuditResponse {
            records,
            next_page_token: next.map(|s| format!("s{s}")).unwrap_or_default(),
            scanned,
        }))
    }

    type WatchAuditStream = Pin<Box<dyn Stream<Item = Result<AuditEvent, Status>> + Send>>;

    async fn watch_audit(
        &self,
        request: Request<WatchAuditRequest>,
    ) -> Result<Response<Self::WatchAuditStream>, Status> {
        let st = &self.state;
        let who = st.auth.check(&request, "WatchAudit", Role::Read)?;
        let r = request.into_inner();
        let filter = Filter::from_pb(r.filter.as_ref(), st.bus.limits())
            .map_err(|m| st.auth.refusals.invalid("WatchAudit", &who, m))?;
        let (tx, rx) = mpsc::channel(1024);
        st.audit.watch(filter, tx).await.map_err(audit_status)?;
        let stream = tokio_stream::wrappers::ReceiverStream::new(rx).map(Ok);
        Ok(Response::new(Box::pin(stream)))
    }
}
