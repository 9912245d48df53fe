//! The audit log: the batch stream is the record of every invalidation; each node (every bus,
//! library or node) adds one receipt per batch it applies to a receipts stream. Queries read
//! both, newest first.
//!
//! Subjects (all under `invalbus.<ns>.audit.`, which has more than two tokens after the
//! namespace, so the bus's receiver (`invalbus.<ns>.*.*`) never sees receipts):
//!   `invalbus.<ns>.audit.receipt.<origin>.<epoch>.<seq>.<node>`
//! so the receipts of one batch are one subject filter away.

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::Duration;

use async_nats::jetstream;
use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use invalbus::{Batch, Bus, Invalidation, Limits, Target};
use tokio::sync::{mpsc, watch};

use crate::pb::admin::{AuditFilter, AuditInvalidation, AuditRecord, Receipt};

/// Stream positions read per consumer when paging backwards.
const CHUNK: u64 = 256;
/// Most stream positions one query examines before it returns a page token to continue.
const MAX_SCAN: u64 = 20_000;
/// How long one pull request of a live tail's consumers waits (see `Audit::follow`).
const TAIL_PULL_EXPIRY: Duration = Duration::from_secs(5);
/// Publisher clocks may disagree with ours: a `since` bound stops the scan only this far past it.
const CLOCK_MARGIN_US: u64 = 10 * 60 * 1_000_000;

/// Subjects of the audit log of one namespace.
#[derive(Debug, Clone)]
pub struct AuditSubjects {
    ns: String,
}

impl AuditSubjects {
    /// The subjects of `namespace`.
    pub fn new(namespace: &str) -> Self {
        AuditSubjects {
            ns: namespace.to_owned(),
        }
    }
    /// Every receipt of one batch.
    pub fn receipts_of(&self, origin: &str, epoch: u64, seq: u64) -> String {
        format!("invalbus.{}.audit.receipt.{origin}.{epoch}.{seq}.*", self.ns)
    }
    /// Every receipt of the batches of one origin's epoch.
    pub fn receipts_of_epoch(&self, origin: &str, epoch: u64) -> String {
        format!("invalbus.{}.audit.receipt.{origin}.{epoch}.>", self.ns)
    }
    /// Every receipt.
    pub fn all_receipts(&self) -> String {
        invalbus::all_receipts(&self.ns)
    }
    /// Every batch (the bus's stream subjects).
    pub fn all_batches(&self) -> String {
        format!("invalbus.{}.inv.*", self.ns)
    }
    /// Name of the receipts stream.
    pub fn receipts_stream(&self) -> String {
        invalbus::receipts_stream(&self.ns)
    }
    /// Name of the batch stream (created by the bus).
    pub fn batch_stream(&self) -> String {
        format!("INVALBUS_{}", self.ns)
    }
}

/// Why an audit query failed.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    /// The node runs without JetStream, so there is no durable log.
    #[error("this node runs without JetStream: there is no audit log to query")]
    NoStream,
    /// The stream did not answer.
    #[error("audit stream unavailable: {0}")]
    Unavailable(String),
}

/// A validated filter of the audit log.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Filter {
    pub key: Option<String>,
    pub tag: Option<String>,
    pub prefix: Option<String>,
    pub actor: Option<String>,
    pub origin: Option<String>,
    pub purge_id: Option<String>,
    pub cache: Option<String>,
    pub since_us: u64,
    pub until_us: u64,
}

fn opt(s: &str) -> Option<String> {
    (!s.is_empty()).then(|| s.to_owned())
}

impl Filter {
    /// Validates a filter from the API; the error says what to fix.
    pub fn from_pb(f: Option<&AuditFilter>, limits: &Limits) -> Result<Filter, String> {
        let Some(f) = f else {
            return Ok(Filter::default());
        };
        for (name, v) in [
            ("key", &f.key),
            ("tag", &f.tag),
            ("prefix", &f.prefix),
            ("actor", &f.actor),
            ("origin", &f.origin),
            ("purge_id", &f.purge_id),
            ("cache", &f.cache),
        ] {
            if v.len() > limits.max_key_bytes {
                return Err(format!(
                    "filter.{name} is {} bytes; at most {} are allowed",
                    v.len(),
                    limits.max_key_bytes
                ));
            }
        }
        if !f.origin.is_empty()
            && !f
                .origin
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(format!(
                "filter.origin {:?} is not a node id (letters, digits, '-' and '_')",
                f.origin
            ));
        }
        if f.until_us != 0 && f.since_us > f.until_us {
            return Err(format!(
                "filter.since_us ({}) is after filter.until_us ({}): swap them or drop one",
                f.since_us, f.until_us
            ));
        }
        Ok(Filter {
            key: opt(&f.key),
            tag: opt(&f.tag),
            prefix: opt(&f.prefix),
            actor: opt(&f.actor),
            origin: opt(&f.origin),
            purge_id: opt(&f.purge_id),
            cache: opt(&f.cache),
            since_us: f.since_us,
            until_us: f.until_us,
        })
    }

    fn matches_batch(&self, b: &Batch) -> bool {
        if self.origin.as_ref().is_some_and(|o| *o != b.origin) {
            return false;
        }
        if self.since_us != 0 && b.timestamp_us < self.since_us {
            return false;
        }
        if self.until_us != 0 && b.timestamp_us > self.until_us {
            return false;
        }
        true
    }

    /// Whether one invalidation matches. A key filter matches every invalidation that covered
    /// the key: the key itself, a prefix of it, and "everything".
    fn matches(&self, inv: &Invalidation) -> bool {
        if let Some(k) = &self.key {
            let hit = match &inv.target {
                Target::Key(x) => x == k,
                Target::Prefix(p) => k.starts_with(p.as_str()),
                Target::All => true,
                _ => false,
            };
            if !hit {
                return false;
            }
        }
        if self.tag.as_ref().is_some_and(|t| inv.target != Target::Tag(t.clone())) {
            return false;
        }
        if self
            .prefix
            .as_ref()
            .is_some_and(|p| inv.target != Target::Prefix(p.clone()))
        {
            return false;
        }
        if self.actor.as_ref().is_some_and(|a| **a != *inv.actor) {
            return false;
        }
        if self.purge_id.as_ref().is_some_and(|p| *p != inv.purge_id) {
            return false;
        }
        if let (Some(c), Some(ic)) = (&self.cache, &inv.cache) {
            if **c != **ic {
                return false;
            }
        }
        true
    }

    /// The batch as a record with only its matching invalidations, or `None`.
    pub fn record(&self, b: &Batch, stream_seq: u64) -> Option<AuditRecord> {
        if !self.matches_batch(b) {
            return None;
        }
        let invalidations: Vec<_> = b
            .invalidations
            .iter()
            .filter(|i| self.matches(i))
            .map(audit_invalidation)
            .collect();
        if invalidations.is_empty() {
            return None;
        }
        Some(AuditRecord {
            origin: b.origin.clone(),
            epoch: b.epoch,
            seq: b.seq,
            published_us: b.timestamp_us,
            stream_seq,
            invalidations,
            receipts: Vec::new(),
            batch_size: b.invalidations.len() as u32,
            ..Default::default()
        })
    }
}

fn audit_invalidation(i: &Invalidation) -> AuditInvalidation {
    AuditInvalidation {
        cache: i.cache.as_deref().unwrap_or_default().to_owned(),
        kind: i.target.kind().to_owned(),
        target: i.target.text().to_owned(),
        version: i.version,
        reason: i.reason.clone(),
        actor: i.actor.to_string(),
        purge_id: i.purge_id.clone(),
    }
}

/// A receipt read back from the stream or the live subjects, with its signer and whether this
/// node's bus trusts it, as the admin API shows it.
pub fn opened_receipt(bus: &Bus, payload: &Bytes) -> Option<Receipt> {
    let opened = bus.open_receipt(payload).ok()?;
    let mut r = to_pb(opened.message);
    r.signer = opened.signer;
    r.verified = opened.trusted.is_ok();
    r.unverified = opened.trusted.err().map(|e| e.to_string()).unwrap_or_default();
    Some(r)
}

/// The position a QueryAudit page token names (`s<stream sequence>`; empty: the newest).
pub fn parse_page_token(token: &str) -> Result<Option<u64>, String> {
    if token.is_empty() {
        return Ok(None);
    }
    match token.strip_prefix('s').and_then(|s| s.parse::<u64>().ok()) {
        Some(seq) if seq > 0 => Ok(Some(seq)),
        _ => Err("page_token is malformed: pass the next_page_token of a previous response unchanged".into()),
    }
}

/// A batch read back from the stream, its signer and whether this node's bus trusts it.
fn opened_batch(bus: &Bus, payload: &Bytes) -> Option<(Batch, String, Result<(), invalbus::Refusal>)> {
    let opened = bus.open_batch(payload).ok()?;
    Some((opened.message, opened.signer, opened.trusted))
}

/// Marks a record with its batch's signer.
fn signed(mut r: AuditRecord, signer: String, trusted: Result<(), invalbus::Refusal>) -> AuditRecord {
    r.signer = signer;
    r.verified = trusted.is_ok();
    r.unverified = trusted.err().map(|e| e.to_string()).unwrap_or_default();
    r
}

/// A receipt as the admin API shows it (the same fields as the library's).
pub fn to_pb(r: invalbus::Receipt) -> Receipt {
    Receipt {
        node: r.node,
        origin: r.origin,
        epoch: r.epoch,
        seq: r.seq,
        published_us: r.published_us,
        applied_us: r.applied_us,
        dropped: r.dropped,
        flushed: r.flushed,
        invalidations: r.invalidations,
        purge_ids: r.purge_ids,
        local: r.local,
        ..Default::default()
    }
}

/// The audit log as one node sees it: it answers queries and live tails. (The bus writes the
/// receipts, this node's among them.)
pub struct Audit {
    subjects: AuditSubjects,
    node_id: String,
    client: async_nats::Client,
    js: jetstream::Context,
    durable: bool,
    /// Opens the signed messages and tells whether they are trusted.
    bus: Bus,
}

impl Audit {
    /// The audit log of `bus`'s namespace over `client`; `durable` when the bus keeps its
    /// batches and receipts in JetStream (it creates both streams).
    pub fn new(client: async_nats::Client, bus: Bus, durable: bool) -> Audit {
        Audit {
            subjects: AuditSubjects::new(bus.namespace()),
            node_id: bus.node_id().to_owned(),
            js: jetstream::new(client.clone()),
            client,
            durable,
            bus,
        }
    }

    /// The subjects in use.
    pub fn subjects(&self) -> &AuditSubjects {
        &self.subjects
    }

    /// The NATS connection of the audit log.
    pub fn client(&self) -> &async_nats::Client {
        &self.client
    }

    /// A local receipt of this node's batch `seq`.
    pub fn local_receipt(
        &self,
        epoch: u64,
        seq: u64,
        applied_us: u64,
        invalidations: u32,
        purge_id: &str,
        here: invalbus::ApplyOutcome,
    ) -> invalbus::Receipt {
        invalbus::Receipt {
            node: self.node_id.clone(),
            origin: self.node_id.clone(),
            epoch,
            seq,
            published_us: invalbus::now_us(),
            applied_us,
            dropped: here.dropped,
            flushed: here.flushed,
            invalidations,
            purge_ids: if purge_id.is_empty() {
                vec![]
            } else {
                vec![purge_id.to_owned()]
            },
            local: true,
        }
    }

    /// One page of the records that match `filter`, newest first, with their receipts.
    pub async fn query(
        &self,
        filter: &Filter,
        page_size: usize,
        before: Option<u64>,
    ) -> Result<(Vec<AuditRecord>, Option<u64>, u64), AuditError> {
        if !self.durable {
            return Err(AuditError::NoStream);
        }
        let mut stream = self
            .js
            .get_stream(self.subjects.batch_stream())
            .await
            .map_err(|e| AuditError::Unavailable(e.to_string()))?;
        let info = stream
            .info()
            .await
            .map_err(|e| AuditError::Unavailable(e.to_string()))?;
        let first = info.state.first_sequence.max(1);
        let last = info.state.last_sequence;
        let mut hi = before.unwrap_or(last + 1).min(last + 1);
        let mut records: Vec<AuditRecord> = Vec::new();
        let mut scanned = 0u64;
        let mut next: Option<u64> = None;
        'scan: loop {
            if hi <= first || last == 0 {
                break;
            }
            if scanned >= MAX_SCAN {
                next = Some(hi);
                break;
            }
            let lo = hi.saturating_sub(CHUNK).max(first);
            let chunk = read_range(&stream, self.subjects.all_batches(), lo, hi).await?;
            scanned += hi - lo;
            for (seq, payload) in chunk.into_iter().rev() {
                let Some((batch, signer, trusted)) = opened_batch(&self.bus, &payload) else {
                    continue;
                };
                if filter.since_us != 0 && batch.timestamp_us.saturating_add(CLOCK_MARGIN_US) < filter.since_us {
                    break 'scan;
                }
                if let Some(r) = filter.record(&batch, seq) {
                    records.push(signed(r, signer, trusted));
                    if records.len() >= page_size {
                        next = (seq > first).then_some(seq);
                        break 'scan;
                    }
                }
            }
            hi = lo;
        }
        // A receipt that cannot be read is an error, not "no node applied it".
        let with_receipts: Vec<AuditRecord> = futures::stream::iter(records)
            .map(|mut r| async move {
                r.receipts = self.receipts(&r.origin, r.epoch, r.seq).await?;
                Ok::<_, AuditError>(r)
            })
            .buffered(8)
            .try_collect()
            .await?;
        Ok((with_receipts, next, scanned))
    }

    /// The receipts of one batch, one per node, ordered by node.
    pub async fn receipts(&self, origin: &str, epoch: u64, seq: u64) -> Result<Vec<Receipt>, AuditError> {
        let stream = self
            .js
            .get_stream(self.subjects.receipts_stream())
            .await
            .map_err(|e| AuditError::Unavailable(e.to_string()))?;
        let raw = read_range(&stream, self.subjects.receipts_of(origin, epoch, seq), 1, u64::MAX).await?;
        Ok(merge_receipts(
            raw.iter().filter_map(|(_, p)| opened_receipt(&self.bus, p)),
        ))
    }

    /// Follows batches and receipts as they are written, for a live tail. With JetStream it
    /// reads both streams through consumers that deliver what is stored after they were made,
    /// which the stream leader confirms before this returns: a purge made after the tail opened
    /// is never missed, even when it reaches another server of a NATS cluster. Without
    /// JetStream it subscribes, and confirms the subscriptions with a probe.
    pub async fn watch(
        &self,
        filter: Filter,
        tx: mpsc::Sender<crate::pb::admin::AuditEvent>,
    ) -> Result<(), AuditError> {
        use crate::pb::admin::audit_event::Event;
        let (mut batches, mut receipts) = if self.durable {
            (
                self.follow(self.subjects.batch_stream(), self.subjects.all_batches())
                    .await?,
                self.follow(self.subjects.receipts_stream(), self.subjects.all_receipts())
                    .await?,
            )
        } else {
            self.subscribe_both().await?
        };
        let bus = self.bus.clone();
        tokio::spawn(async move {
            let mut matched: HashSet<(String, u64, u64)> = HashSet::new();
            let mut order: VecDeque<(String, u64, u64)> = VecDeque::new();
            // Receipts that came before their batch (the two streams are read apart): held a
            // while, and sent if the batch matches.
            let mut early: VecDeque<(tokio::time::Instant, Receipt)> = VecDeque::new();
            let everything = filter == Filter::default();
            loop {
                let events: Vec<Event> = tokio::select! {
                    // Batches first: a batch usually comes before its receipts, and taking a
                    // receipt first would leave it waiting in `early`.
                    biased;
                    m = batches.next() => {
                        let Some(m) = m else { return };
                        let Some((b, signer, trusted)) = opened_batch(&bus, &m) else { continue };
                        let Some(r) = filter.record(&b, 0) else { continue };
                        let r = signed(r, signer, trusted);
                        let k = (b.origin.clone(), b.epoch, b.seq);
                        if matched.insert(k.clone()) {
                            order.push_back(k.clone());
                            if order.len() > 10_000 {
                                if let Some(old) = order.pop_front() {
                                    matched.remove(&old);
                                }
                            }
                        }
                        let mut events = vec![Event::Record(r)];
                        let (theirs, rest): (VecDeque<_>, VecDeque<_>) = early
                            .drain(..)
                            .partition(|(_, r)| (r.origin.as_str(), r.epoch, r.seq) == (k.0.as_str(), k.1, k.2));
                        early = rest;
                        events.extend(theirs.into_iter().map(|(_, r)| Event::Receipt(r)));
                        events
                    }
                    m = receipts.next() => {
                        let Some(m) = m else { return };
                        let Some(r) = opened_receipt(&bus, &m) else { continue };
                        let k = (r.origin.clone(), r.epoch, r.seq);
                        let by_purge = filter.purge_id.as_ref().is_some_and(|p| r.purge_ids.contains(p));
                        if !(everything || by_purge || matched.contains(&k)) {
                            let now = tokio::time::Instant::now();
                            while early.front().is_some_and(|(at, _)| now.duration_since(*at) > EARLY_KEPT)
                                || early.len() >= MAX_EARLY
                            {
                                early.pop_front();
                            }
                            early.push_back((now, r));
                            continue;
                        }
                        vec![Event::Receipt(r)]
                    }
                    _ = tx.closed() => return,
                };
                for event in events {
                    if tx
                        .send(crate::pb::admin::AuditEvent { event: Some(event) })
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
            }
        });
        Ok(())
    }

    /// What is stored in `stream` on `filter` from now on.
    async fn follow(&self, stream: String, filter: String) -> Result<Payloads, AuditError> {
        let unavailable = |e: String| AuditError::Unavailable(format!("{stream}: {e}"));
        let consumer = self
            .js
            .get_stream(&stream)
            .await
            .map_err(|e| unavailable(e.to_string()))?
            .create_consumer(jetstream::consumer::pull::OrderedConfig {
                filter_subject: filter,
                deliver_policy: jetstream::consumer::DeliverPolicy::New,
                // nats-server before 2.10 may drop a pull request that expires as a message
                // arrives without telling the client, which recreates its consumer only after
                // two missed idle heartbeats (half the expiry each): with the client's default
                // of 30 s, a tail could stand still for 30 s; with 5 s, for 5 s at most.
                max_expires: TAIL_PULL_EXPIRY,
                ..Default::default()
            })
            .await
            .map_err(|e| unavailable(e.to_string()))?;
        let messages = consumer.messages().await.map_err(|e| unavailable(e.to_string()))?;
        Ok(Box::pin(messages.filter_map(|m| async move {
            match m {
                Ok(m) => Some(m.message.payload),
                Err(e) => {
                    tracing::warn!(error = %e, "audit tail: stream read failed");
                    None
                }
            }
        })))
    }

    /// Subscriptions to batches and receipts, confirmed by the server.
    async fn subscribe_both(&self) -> Result<(Payloads, Payloads), AuditError> {
        let batches = self
            .client
            .subscribe(self.subjects.all_batches())
            .await
            .map_err(|e| AuditError::Unavailable(e.to_string()))?;
        let receipts = self
            .client
            .subscribe(self.subjects.all_receipts())
            .await
            .map_err(|e| AuditError::Unavailable(e.to_string()))?;
        // `subscribe` only queues the SUBs (and `flush` only writes them): a purge made right
        // after the watcher got its stream could reach the server first, and its batch and
        // receipts never reach the tail. The server handles one connection's messages in
        // order, so once a probe published after the SUBs comes back, they are in force.
        // (In a NATS cluster, interest reaches the other servers a moment later still: with
        // JetStream the tail reads the streams instead.)
        let probe_subject = self.client.new_inbox();
        let mut probe = self
            .client
            .subscribe(probe_subject.clone())
            .await
            .map_err(|e| AuditError::Unavailable(e.to_string()))?;
        self.client
            .publish(probe_subject, Bytes::new())
            .await
            .map_err(|e| AuditError::Unavailable(e.to_string()))?;
        match tokio::time::timeout(Duration::from_secs(10), probe.next()).await {
            Ok(Some(_)) => {}
            _ => return Err(AuditError::Unavailable("NATS did not confirm the subscriptions".into())),
        }
        Ok((
            Box::pin(batches.map(|m| m.payload)),
            Box::pin(receipts.map(|m| m.payload)),
        ))
    }
}

/// Message payloads, from a subscription or a stream.
type Payloads = std::pin::Pin<Box<dyn futures::Stream<Item = Bytes> + Send>>;

/// How long, and how many, receipts that came before their batch are held for the tail.
const EARLY_KEPT: Duration = Duration::from_secs(5);
const MAX_EARLY: usize = 10_000;

/// One receipt per node (a node that wrote two for one batch, e.g. two purges in one local
/// batch, has them merged), ordered by node.
pub fn merge_receipts(receipts: impl Iterator<Item = Receipt>) -> Vec<Receipt> {
    let mut by_node: HashMap<String, Receipt> = HashMap::new();
    for r in receipts {
        match by_node.get_mut(&r.node) {
            Some(have) => {
                for p in r.purge_ids {
                    if !have.purge_ids.contains(&p) {
                        have.purge_ids.push(p);
                    }
                }
            }
            None => {
                by_node.insert(r.node.clone(), r);
            }
        }
    }
    let mut v: Vec<_> = by_node.into_values().collect();
    v.sort_by(|a, b| a.node.cmp(&b.node));
    v
}

/// The stream's messages on `filter` with stream sequence in `[start, end)`, in order.
async fn read_range(
    stream: &jetstream::stream::Stream,
    filter: String,
    start: u64,
    end: u64,
) -> Result<Vec<(u64, Bytes)>, AuditError> {
    let work = async {
        let mut consumer = stream
            .create_consumer(jetstream::consumer::pull::OrderedConfig {
                filter_subject: filter,
                deliver_policy: jetstream::consumer::DeliverPolicy::ByStartSequence { start_sequence: start },
                ..Default::default()
            })
            .await
            .map_err(|e| AuditError::Unavailable(e.to_string()))?;
        let pending = consumer
            .info()
            .await
            .map_err(|e| AuditError::Unavailable(e.to_string()))?
            .num_pending;
        let mut out = Vec::new();
        if pending == 0 {
            return Ok(out);
        }
        let mut messages = consumer
            .messages()
            .await
            .map_err(|e| AuditError::Unavailable(e.to_string()))?;
        while let Some(msg) = messages.next().await {
            let msg = msg.map_err(|e| AuditError::Unavailable(e.to_string()))?;
            let Ok(info) = msg.info() else { break };
            let (seq, left) = (info.stream_sequence, info.pending);
            if seq >= end {
                break;
            }
            out.push((seq, msg.payload.clone()));
            if left == 0 {
                break;
            }
        }
        Ok(out)
    };
    tokio::time::timeout(Duration::from_secs(10), work)
        .await
        .unwrap_or_else(|_| Err(AuditError::Unavailable("stream read timed out".into())))
}

/// Resolves once `rx` holds true (or its sender is gone).
pub(crate) async fn stopped(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(invs: Vec<Invalidation>) -> Batch {
        Batch {
            origin: "a".into(),
            epoch: 1,
            seq: 1,
            timestamp_us: 1_000,
            namespace: "ns".into(),
            invalidations: invs,
        }
    }

    #[test]
    fn filters_keep_only_matching_invalidations() {
        let mut tag = Invalidation::new(Some("articles"), Target::Tag("author:42".into()));
        tag.purge_id = "pg-1".into();
        tag.actor = "ops".into();
        let key = Invalidation::new(Some("articles"), Target::Key("post:1".into()));
        let prefix = Invalidation::new(None, Target::Prefix("post:".into()));
        let b = batch(vec![tag, key, prefix]);
        let f = Filter {
            tag: Some("author:42".into()),
            ..Default::default()
        };
        let r = f.record(&b, 7).unwrap();
        assert_eq!(r.invalidations.len(), 1);
        assert_eq!(r.invalidations[0].purge_id, "pg-1");
        assert_eq!(r.batch_size, 3);
        // A key filter finds everything that covered the key.
        let f = Filter {
            key: Some("post:1".into()),
            ..Default::default()
        };
        assert_eq!(f.record(&b, 7).unwrap().invalidations.len(), 2);
        let f = Filter {
            actor: Some("nobody".into()),
            ..Default::default()
        };
        assert!(f.record(&b, 7).is_none());
        let f = Filter {
            since_us: 2_000,
            ..Default::default()
        };
        assert!(f.record(&b, 7).is_none());
    }

    #[test]
    fn malformed_filters_are_refused() {
        let l = Limits::default();
        let bad = AuditFilter {
            since_us: 10,
            until_us: 5,
            ..Default::default()
        };
        assert!(Filter::from_pb(Some(&bad), &l).unwrap_err().contains("swap"));
        let bad = AuditFilter {
            origin: "a.b".into(),
            ..Default::default()
        };
        assert!(Filter::from_pb(Some(&bad), &l).unwrap_err().contains("node id"));
        let bad = AuditFilter {
            key: "k".repeat(2000),
            ..Default::default()
        };
        assert!(Filter::from_pb(Some(&bad), &l).unwrap_err().contains("filter.key"));
    }

    #[test]
    fn receipt_subjects_stay_out_of_the_bus_subscription() {
        let subject = invalbus::receipt_subject("ns", "a", 1, 2, "b");
        // The bus listens on invalbus.ns.*.*: exactly two tokens after the namespace.
        assert!(subject.split('.').count() > 4);
        assert!(subject.starts_with("invalbus.ns.audit.receipt."));
    }
}
