//! The domain types of an invalidation and their defensive encoding to and from the wire schema.
//!
//! Everything that arrives from the network passes through [`decode_batch`] or
//! [`decode_heartbeat`], which check sizes and shapes before any cache sees the data.

use std::sync::Arc;

use bytes::Bytes;
use invalbus_proto::wire;
use prost::encoding::{encode_key, encode_varint, encoded_len_varint, key_len, WireType};
use prost::Message;
use sha2::{Digest, Sha256};

use crate::config::Limits;
use crate::identity::{Identity, Kind};
use crate::view::{self, BatchRef, InvalidationRef, TargetRef};

/// What an invalidation removes from a cache.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Target {
    /// One key.
    Key(String),
    /// Every entry that carries this tag.
    Tag(String),
    /// Every entry whose key starts with this prefix.
    Prefix(String),
    /// Everything.
    All,
}

impl Target {
    /// The key, tag or prefix text (empty for [`Target::All`]).
    pub fn text(&self) -> &str {
        match self {
            Target::Key(s) | Target::Tag(s) | Target::Prefix(s) => s,
            Target::All => "",
        }
    }

    /// A short name of the kind: `key`, `tag`, `prefix` or `all`.
    pub fn kind(&self) -> &'static str {
        match self {
            Target::Key(_) => "key",
            Target::Tag(_) => "tag",
            Target::Prefix(_) => "prefix",
            Target::All => "all",
        }
    }
}

/// One invalidation, as applied locally and published to peers.
///
/// The cache name and the actor are shared strings: a cache handle and a bus hand the same ones
/// to each invalidation they make, so a bulk call allocates only its keys (`"orders".into()`
/// makes one from text).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalidation {
    /// The cache it applies to; `None` means every cache.
    pub cache: Option<Arc<str>>,
    /// What it removes.
    pub target: Target,
    /// For key targets: the version of the data after the write (see the crate docs).
    pub version: Option<u64>,
    /// Why, for the audit log.
    pub reason: String,
    /// Who, for the audit log. Left empty on a call, it becomes the bus's own actor
    /// (`BusBuilder::actor`); empty on a received invalidation, the publisher named none.
    pub actor: Arc<str>,
    /// Purge id given by the admin API (empty for library writes).
    pub purge_id: String,
}

impl Invalidation {
    /// An invalidation of `target` in `cache` (or every cache), with no version, reason or actor.
    pub fn new(cache: Option<&str>, target: Target) -> Self {
        Invalidation::shared(cache.map(Arc::from), Arc::default(), target)
    }

    /// An invalidation of `target` in `cache` (or every cache) by `actor`, sharing their text.
    pub(crate) fn shared(cache: Option<Arc<str>>, actor: Arc<str>, target: Target) -> Self {
        Invalidation {
            cache,
            target,
            version: None,
            reason: String::new(),
            actor,
            purge_id: String::new(),
        }
    }
}

/// A decoded batch: one published message from one origin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    /// Node id of the publisher.
    pub origin: String,
    /// Publisher's process epoch.
    pub epoch: u64,
    /// Per-(origin, epoch) sequence, from 1, without gaps.
    pub seq: u64,
    /// Publisher's clock at publish, microseconds since the Unix epoch.
    pub timestamp_us: u64,
    /// Namespace of the publisher.
    pub namespace: String,
    /// The invalidations, in the order they were made.
    pub invalidations: Vec<Invalidation>,
}

impl Target {
    /// A borrowed view of this target.
    pub fn borrowed(&self) -> TargetRef<'_> {
        match self {
            Target::Key(s) => TargetRef::Key(s),
            Target::Tag(s) => TargetRef::Tag(s),
            Target::Prefix(s) => TargetRef::Prefix(s),
            Target::All => TargetRef::All,
        }
    }
}

impl TargetRef<'_> {
    /// An owned copy.
    pub fn to_target(self) -> Target {
        match self {
            TargetRef::Key(s) => Target::Key(s.to_owned()),
            TargetRef::Tag(s) => Target::Tag(s.to_owned()),
            TargetRef::Prefix(s) => Target::Prefix(s.to_owned()),
            TargetRef::All => Target::All,
        }
    }
}

impl InvalidationRef<'_> {
    pub(crate) fn to_invalidation(self) -> Invalidation {
        Invalidation {
            cache: self.cache.map(Arc::from),
            target: self.target.to_target(),
            version: self.version,
            reason: self.reason.to_owned(),
            actor: Arc::from(self.actor),
            purge_id: self.purge_id.to_owned(),
        }
    }
}

impl Invalidation {
    pub(crate) fn borrowed(&self) -> InvalidationRef<'_> {
        InvalidationRef {
            cache: self.cache.as_deref(),
            target: self.target.borrowed(),
            version: self.version,
            reason: &self.reason,
            actor: &self.actor,
            purge_id: &self.purge_id,
        }
    }
}

impl BatchRef<'_> {
    pub(crate) fn to_batch(&self) -> Batch {
        Batch {
            origin: self.origin.to_owned(),
            epoch: self.epoch,
            seq: self.seq,
            timestamp_us: self.timestamp_us,
            namespace: self.namespace.to_owned(),
            invalidations: self.invalidations.iter().map(|i| i.to_invalidation()).collect(),
        }
    }
}

/// A decoded heartbeat.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Heartbeat {
    /// Node id.
    pub origin: String,
    /// Process epoch.
    pub epoch: u64,
    /// Last batch sequence published in this epoch (0: none yet).
    pub last_seq: u64,
    /// Sender's clock, microseconds since the Unix epoch.
    pub timestamp_us: u64,
    /// Admin address, when the node serves one.
    pub address: String,
    /// Namespace of the sender.
    pub namespace: String,
    /// Cache names and entry counts.
    pub caches: Vec<(String, u64)>,
    /// Whether the sender writes a receipt for every batch it applies.
    pub writes_receipts: bool,
    /// Counts the sender's heartbeats in this epoch, from 1.
    pub beat: u64,
}

/// Why a message from the network was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The payload is larger than [`Limits::max_message_bytes`].
    #[error("message of {size} bytes exceeds the limit of {limit}")]
    Oversized {
        /// Payload size.
        size: usize,
        /// The limit.
        limit: usize,
    },
    /// The payload is not a valid protobuf message of the expected type.
    #[error("not a valid message: {0}")]
    Malformed(String),
    /// The message decodes but breaks a rule (too many entries, a key too long, no target...).
    #[error("invalid message: {0}")]
    Invalid(String),
    /// The message belongs to another namespace.
    #[error("message of namespace {0:?} on this namespace's subject")]
    Foreign(String),
}

impl DecodeError {
    /// A short label for counters and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            DecodeError::Oversized { .. } => "oversized",
            DecodeError::Malformed(_) => "malformed",
            DecodeError::Invalid(_) => "invalid",
            DecodeError::Foreign(_) => "foreign",
        }
    }
}

/// Checks one invalidation against the limits; used for local calls and for decoded messages.
pub fn check_invalidation(inv: &Invalidation, limits: &Limits) -> Result<(), String> {
    check(inv.borrowed(), limits)
}

pub(crate) fn check(inv: InvalidationRef<'_>, limits: &Limits) -> Result<(), String> {
    let text = inv.target.text();
    if text.len() > limits.max_key_bytes {
        return Err(format!(
            "{} of {} bytes exceeds the limit of {}",
            inv.target.kind(),
            text.len(),
            limits.max_key_bytes
        ));
    }
    match inv.target {
        TargetRef::Key("") => return Err("empty key".into()),
        TargetRef::Tag("") => return Err("empty tag".into()),
        TargetRef::Tag(t) if t.contains('\0') => return Err("a tag cannot contain a NUL byte".into()),
        TargetRef::Prefix("") => return Err("empty prefix (use an `all` target to drop everything)".into()),
        _ => {}
    }
    if inv.version.is_some() && !matches!(inv.target, TargetRef::Key(_)) {
        return Err(format!(
            "a version applies to key targets only, not to a {}",
            inv.target.kind()
        ));
    }
    if let Some(c) = inv.cache {
        if c.is_empty() || c.len() > limits.max_key_bytes {
            return Err("cache name must be 1 to max_key_bytes bytes".into());
        }
    }
    if inv.reason.len() > limits.max_key_bytes || inv.actor.len() > limits.max_key_bytes {
        return Err("reason or actor exceeds max_key_bytes".into());
    }
    Ok(())
}

/// A signed envelope, opened but not yet verified: the body and who says they signed it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    /// The encoded message, exactly as signed.
    pub body: Bytes,
    /// The signer's public nkey.
    pub signer: String,
    /// The signature.
    pub signature: Vec<u8>,
    /// For a receipt signed as a set, the set (the signature covers it, not the body).
    pub set: Option<DigestSet>,
}

/// The most receipts one signature covers (`seal_set`).
pub const MAX_SET: usize = 256;

/// Several messages under one signature: the SHA-256 digest of each body, and which one is this
/// envelope's (`wire.proto`, `Signed`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DigestSet {
    /// The digests, 32 bytes each, in order: what the signature covers.
    pub digests: Bytes,
    /// Which digest is this envelope's body's.
    pub index: u32,
}

impl DigestSet {
    /// Whether `body` is the message at this envelope's place in the set.
    pub fn covers(&self, body: &[u8]) -> bool {
        let at = self.index as usize * 32;
        self.digests.get(at..at + 32) == Some(Sha256::digest(body).as_slice())
    }
}

/// Wraps `body` (an encoded message of `kind`) in an envelope signed by `identity`.
pub fn seal(identity: &Identity, kind: Kind, body: Bytes) -> Bytes {
    let signature = identity.sign(kind, &body).to_vec();
    let msg = wire::Signed {
        body,
        signer: identity.public_key().to_owned(),
        signature,
        ..Default::default()
    };
    Bytes::from(msg.encode_to_vec())
}

/// Wraps receipt `bodies` in envelopes under one signature by `identity` (one envelope each, in
/// order): for a node writing many receipts at once. A single body is sealed alone, as [`seal`]
/// does. At most [`MAX_SET`] bodies; more are sealed in several sets.
///
/// ```
/// let id = invalbus::Identity::generate();
/// let bodies: Vec<bytes::Bytes> = (0..3).map(|i| invalbus::Receipt { node: "a".into(), seq: i, ..Default::default() }.encode()).collect();
/// let sealed = invalbus::seal_set(&id, &bodies);
/// let env = invalbus::open(&sealed[1], &invalbus::Limits::default()).unwrap();
/// assert_eq!(env.body, bodies[1]);
/// assert!(env.set.unwrap().covers(&bodies[1]));
/// ```
pub fn seal_set(identity: &Identity, bodies: &[Bytes]) -> Vec<Bytes> {
    if let [body] = bodies {
        return vec![seal(identity, Kind::Receipt, body.clone())];
    }
    let mut sealed = Vec::with_capacity(bodies.len());
    for chunk in bodies.chunks(MAX_SET) {
        let mut digests = Vec::with_capacity(chunk.len() * 32);
        for body in chunk {
            digests.extend_from_slice(&Sha256::digest(body));
        }
        let signature = identity.sign(Kind::ReceiptSet, &digests).to_vec();
        let digests = Bytes::from(digests);
        for (i, body) in chunk.iter().enumerate() {
            let msg = wire::Signed {
                body: body.clone(),
                signer: identity.public_key().to_owned(),
                signature: signature.clone(),
                digests: digests.clone(),
                index: i as u32,
            };
            sealed.push(Bytes::from(msg.encode_to_vec()));
        }
    }
    sealed
}

/// Wraps `body` in an envelope without a signature (benchmarks of the signing cost only: see
/// `BusBuilder::unsigned_for_benchmarks`).
pub fn seal_unsigned(body: Bytes) -> Bytes {
    let msg = wire::Signed {
        body,
        ..Default::default()
    };
    Bytes::from(msg.encode_to_vec())
}

/// Opens an envelope without requiring a signature (benchmarks only).
pub(crate) fn open_unsigned(payload: &Bytes, limits: &Limits) -> Result<Envelope, DecodeError> {
    if payload.len() > limits.max_message_bytes {
        return Err(DecodeError::Oversized {
            size: payload.len(),
            limit: limits.max_message_bytes,
        });
    }
    let msg = wire::Signed::decode(payload.clone()).map_err(|e| DecodeError::Malformed(format!("envelope: {e}")))?;
    Ok(Envelope {
        body: msg.body,
        signer: msg.signer,
        signature: msg.signature,
        set: None,
    })
}

/// Opens an envelope received from the network (checking its size and shape, not yet its
/// signature: see `identity`).
pub fn open(payload: &Bytes, limits: &Limits) -> Result<Envelope, DecodeError> {
    if payload.len() > limits.max_message_bytes {
        return Err(DecodeError::Oversized {
            size: payload.len(),
            limit: limits.max_message_bytes,
        });
    }
    let msg = wire::Signed::decode(payload.clone()).map_err(|e| DecodeError::Malformed(format!("envelope: {e}")))?;
    if msg.signer.is_empty() || msg.signer.len() > 64 || msg.signature.len() != 64 {
        return Err(DecodeError::Invalid(
            "unsigned message (an envelope needs a signer and a 64-byte signature)".into(),
        ));
    }
    let set = if msg.digests.is_empty() {
        if msg.index != 0 {
            return Err(DecodeError::Invalid("an index without a digest set".into()));
        }
        None
    } else {
        let n = msg.digests.len() / 32;
        if msg.digests.len() % 32 != 0 || n > MAX_SET || msg.index as usize >= n {
            return Err(DecodeError::Invalid(format!(
                "digest set of {} bytes with index {} (32 bytes per digest, at most {MAX_SET}, the index within them)",
                msg.digests.len(),
                msg.index
            )));
        }
        Some(DigestSet {
            digests: msg.digests,
            index: msg.index,
        })
    };
    Ok(Envelope {
        body: msg.body,
        signer: msg.signer,
        signature: msg.signature,
        set,
    })
}

/// Encodes a batch for the wire (the bytes prost's generated code writes for the schema's
/// `InvalidationBatch`, written from the batch without copying it into the generated types).
/// The first invalidation's actor becomes the batch's, and is left out of every invalidation
/// that shares it.
pub fn encode_batch(batch: &Batch) -> Bytes {
    let actor = batch_actor(batch);
    let invalidations: usize = batch
        .invalidations
        .iter()
        .map(|inv| {
            let len = invalidation_len(inv, &*inv.actor != actor);
            key_len(5) + encoded_len_varint(len as u64) + len
        })
        .sum();
    let len = str_len(1, &batch.origin)
        + u64_len(2, batch.epoch)
        + u64_len(3, batch.seq)
        + u64_len(4, batch.timestamp_us)
        + invalidations
        + str_len(6, &batch.namespace)
        + str_len(7, actor);
    let mut buf = Vec::with_capacity(len);
    put_str(1, &batch.origin, &mut buf);
    put_u64(2, batch.epoch, &mut buf);
    put_u64(3, batch.seq, &mut buf);
    put_u64(4, batch.timestamp_us, &mut buf);
    for inv in &batch.invalidations {
        let own_actor = &*inv.actor != actor;
        encode_key(5, WireType::LengthDelimited, &mut buf);
        encode_varint(invalidation_len(inv, own_actor) as u64, &mut buf);
        put_str(1, inv.cache.as_deref().unwrap_or_default(), &mut buf);
        match &inv.target {
            Target::Key(k) => put_present_str(2, k, &mut buf),
            Target::Tag(t) => put_present_str(3, t, &mut buf),
            Target::Prefix(p) => put_present_str(4, p, &mut buf),
            Target::All => {
                encode_key(5, WireType::Varint, &mut buf);
                encode_varint(1, &mut buf);
            }
        }
        if let Some(v) = inv.version {
            encode_key(6, WireType::Varint, &mut buf);
            encode_varint(v, &mut buf);
        }
        put_str(7, &inv.reason, &mut buf);
        if own_actor {
            put_present_str(8, &inv.actor, &mut buf);
        }
        put_str(9, &inv.purge_id, &mut buf);
    }
    put_str(6, &batch.namespace, &mut buf);
    put_str(7, actor, &mut buf);
    debug_assert_eq!(buf.len(), len);
    Bytes::from(buf)
}

/// The actor a batch names once: its first invalidation's.
fn batch_actor(batch: &Batch) -> &str {
    batch.invalidations.first().map_or("", |inv| &*inv.actor)
}

/// At most the size in bytes that `inv` adds to an encoded batch (its actor counted, which the
/// batch may name once for all), for batching.
pub fn encoded_len(inv: &Invalidation) -> usize {
    let len = invalidation_len(inv, true);
    key_len(5) + encoded_len_varint(len as u64) + len
}

/// The encoded size of one `Invalidation` message, without its field key and length; with its
/// actor or without.
fn invalidation_len(inv: &Invalidation, own_actor: bool) -> usize {
    let target = match &inv.target {
        Target::Key(s) | Target::Tag(s) | Target::Prefix(s) => present_str_len(2, s),
        Target::All => key_len(5) + 1,
    };
    str_len(1, inv.cache.as_deref().unwrap_or_default())
        + target
        + inv.version.map_or(0, |v| key_len(6) + encoded_len_varint(v))
        + str_len(7, &inv.reason)
        + if own_actor { present_str_len(8, &inv.actor) } else { 0 }
        + str_len(9, &inv.purge_id)
}

/// A proto3 string field: left out when empty.
fn str_len(tag: u32, s: &str) -> usize {
    if s.is_empty() {
        0
    } else {
        present_str_len(tag, s)
    }
}

/// A string in a oneof, or an `optional` one that is given: written even when empty.
fn present_str_len(tag: u32, s: &str) -> usize {
    key_len(tag) + encoded_len_varint(s.len() as u64) + s.len()
}

fn u64_len(tag: u32, v: u64) -> usize {
    if v == 0 {
        0
    } else {
        key_len(tag) + encoded_len_varint(v)
    }
}

fn put_str(tag: u32, s: &str, buf: &mut Vec<u8>) {
    if !s.is_empty() {
        put_present_str(tag, s, buf);
    }
}

fn put_present_str(tag: u32, s: &str, buf: &mut Vec<u8>) {
    encode_key(tag, WireType::LengthDelimited, buf);
    encode_varint(s.len() as u64, buf);
    buf.extend_from_slice(s.as_bytes());
}

fn put_u64(tag: u32, v: u64, buf: &mut Vec<u8>) {
    if v != 0 {
        encode_key(tag, WireType::Varint, buf);
        encode_varint(v, buf);
    }
}

/// Decodes and checks a batch that arrived on `namespace`'s subject.
pub fn decode_batch(payload: &[u8], namespace: &str, limits: &Limits) -> Result<Batch, DecodeError> {
    decode_batch_ref(payload, namespace, limits).map(|b| b.to_batch())
}

/// Decodes and checks a batch without copying its text (see [`crate::view`]).
pub(crate) fn decode_batch_ref<'a>(
    payload: &'a [u8],
    namespace: &str,
    limits: &Limits,
) -> Result<BatchRef<'a>, DecodeError> {
    if payload.len() > limits.max_message_bytes {
        return Err(DecodeError::Oversized {
            size: payload.len(),
            limit: limits.max_message_bytes,
        });
    }
    let b = view::parse_batch(payload, limits.max_batch_invalidations)
        .map_err(|e| DecodeError::Malformed(e.to_string()))?;
    check_batch(&b, namespace, limits)?;
    Ok(b)
}

fn check_batch(b: &BatchRef<'_>, namespace: &str, limits: &Limits) -> Result<(), DecodeError> {
    if b.namespace != namespace {
        return Err(DecodeError::Foreign(b.namespace.to_owned()));
    }
    if b.origin.is_empty() || b.origin.len() > limits.max_key_bytes {
        return Err(DecodeError::Invalid("origin must be 1 to max_key_bytes bytes".into()));
    }
    if b.epoch == 0 || b.seq == 0 {
        return Err(DecodeError::Invalid("epoch and seq must be at least 1".into()));
    }
    if b.invalidations.is_empty() {
        return Err(DecodeError::Invalid("empty batch".into()));
    }
    if b.beyond > 0 {
        return Err(DecodeError::Invalid(format!(
            "{} invalidations exceed the limit of {}",
            b.invalidations.len() + b.beyond,
            limits.max_batch_invalidations
        )));
    }
    for (i, inv) in b.invalidations.iter().enumerate() {
        if b.untargeted == Some(i) {
            return Err(DecodeError::Invalid(format!("invalidation {i} has no target")));
        }
        check(*inv, limits).map_err(|e| DecodeError::Invalid(format!("invalidation {i}: {e}")))?;
    }
    Ok(())
}

/// Decodes a batch with prost's generated code: what [`decode_batch`] must agree with (the
/// fuzz target and the tests compare the two).
#[cfg(any(test, feature = "fuzzing"))]
pub fn decode_batch_with_prost(payload: &[u8], namespace: &str, limits: &Limits) -> Result<Batch, DecodeError> {
    if payload.len() > limits.max_message_bytes {
        return Err(DecodeError::Oversized {
            size: payload.len(),
            limit: limits.max_message_bytes,
        });
    }
    let msg = wire::InvalidationBatch::decode(payload).map_err(|e| DecodeError::Malformed(e.to_string()))?;
    if msg.namespace != namespace {
        return Err(DecodeError::Foreign(msg.namespace));
    }
    if msg.origin.is_empty() || msg.origin.len() > limits.max_key_bytes {
        return Err(DecodeError::Invalid("origin must be 1 to max_key_bytes bytes".into()));
    }
    if msg.epoch == 0 || msg.seq == 0 {
        return Err(DecodeError::Invalid("epoch and seq must be at least 1".into()));
    }
    if msg.invalidations.is_empty() {
        return Err(DecodeError::Invalid("empty batch".into()));
    }
    if msg.invalidations.len() > limits.max_batch_invalidations {
        return Err(DecodeError::Invalid(format!(
            "{} invalidations exceed the limit of {}",
            msg.invalidations.len(),
            limits.max_batch_invalidations
        )));
    }
    let mut invalidations = Vec::with_capacity(msg.invalidations.len());
    for (i, w) in msg.invalidations.into_iter().enumerate() {
        use wire::invalidation::Target as W;
        let target = match w.target {
            Some(W::Key(k)) => Target::Key(k),
            Some(W::Tag(t)) => Target::Tag(t),
            Some(W::Prefix(p)) => Target::Prefix(p),
            Some(W::All(true)) => Target::All,
            Some(W::All(false)) | None => return Err(DecodeError::Invalid(format!("invalidation {i} has no target"))),
        };
        let inv = Invalidation {
            cache: if w.cache.is_empty() { None } else { Some(w.cache.into()) },
            target,
            version: w.version,
            reason: w.reason,
            actor: w.actor.as_deref().unwrap_or(&msg.actor).into(),
            purge_id: w.purge_id,
        };
        check_invalidation(&inv, limits).map_err(|e| DecodeError::Invalid(format!("invalidation {i}: {e}")))?;
        invalidations.push(inv);
    }
    Ok(Batch {
        origin: msg.origin,
        epoch: msg.epoch,
        seq: msg.seq,
        timestamp_us: msg.timestamp_us,
        namespace: msg.namespace,
        invalidations,
    })
}

/// The schema's generated type of a batch, encoded by prost (what [`encode_batch`] must match).
#[cfg(any(test, feature = "fuzzing"))]
pub fn encode_batch_with_prost(batch: &Batch) -> Bytes {
    use wire::invalidation::Target as W;
    let actor = batch_actor(batch);
    let msg = wire::InvalidationBatch {
        actor: actor.to_owned(),
        origin: batch.origin.clone(),
        epoch: batch.epoch,
        seq: batch.seq,
        timestamp_us: batch.timestamp_us,
        namespace: batch.namespace.clone(),
        invalidations: batch
            .invalidations
            .iter()
            .map(|inv| wire::Invalidation {
                cache: inv.cache.as_deref().unwrap_or_default().to_owned(),
                target: Some(match &inv.target {
                    Target::Key(k) => W::Key(k.clone()),
                    Target::Tag(t) => W::Tag(t.clone()),
                    Target::Prefix(p) => W::Prefix(p.clone()),
                    Target::All => W::All(true),
                }),
                version: inv.version,
                reason: inv.reason.clone(),
                actor: (&*inv.actor != actor).then(|| inv.actor.to_string()),
                purge_id: inv.purge_id.clone(),
            })
            .collect(),
    };
    Bytes::from(msg.encode_to_vec())
}

/// Longest admin address a heartbeat may announce.
pub const MAX_ADDRESS_BYTES: usize = 256;
/// Most caches a heartbeat announces (a node with more announces the first ones by name).
pub const MAX_ANNOUNCED_CACHES: usize = 32;
/// Longest cache name a heartbeat announces (longer ones are left out of announcements).
pub const MAX_ANNOUNCED_NAME_BYTES: usize = 128;

/// Encodes a heartbeat.
pub fn encode_heartbeat(hb: &Heartbeat) -> Bytes {
    let msg = wire::Heartbeat {
        origin: hb.origin.clone(),
        epoch: hb.epoch,
        last_seq: hb.last_seq,
        timestamp_us: hb.timestamp_us,
        address: hb.address.clone(),
        namespace: hb.namespace.clone(),
        caches: hb
            .caches
            .iter()
            .map(|(name, entries)| wire::CacheSize {
                name: name.clone(),
                entries: *entries,
            })
            .collect(),
        writes_receipts: hb.writes_receipts,
        beat: hb.beat,
    };
    Bytes::from(msg.encode_to_vec())
}

/// Decodes and checks a heartbeat that arrived on `namespace`'s subject.
pub fn decode_heartbeat(payload: &[u8], namespace: &str, limits: &Limits) -> Result<Heartbeat, DecodeError> {
    if payload.len() > limits.max_message_bytes {
        return Err(DecodeError::Oversized {
            size: payload.len(),
            limit: limits.max_message_bytes,
        });
    }
    let msg = wire::Heartbeat::decode(payload).map_err(|e| DecodeError::Malformed(e.to_string()))?;
    if msg.namespace != namespace {
        return Err(DecodeError::Foreign(msg.namespace));
    }
    if msg.origin.is_empty() || msg.origin.len() > limits.max_key_bytes || msg.epoch == 0 {
        return Err(DecodeError::Invalid("heartbeat needs an origin and an epoch".into()));
    }
    // The peer table keeps these: small limits, so that heartbeats cannot fill memory.
    if msg.address.len() > MAX_ADDRESS_BYTES {
        return Err(DecodeError::Invalid(format!(
            "address of {} bytes exceeds {MAX_ADDRESS_BYTES}",
            msg.address.len()
        )));
    }
    if msg.caches.len() > MAX_ANNOUNCED_CACHES || msg.caches.iter().any(|c| c.name.len() > MAX_ANNOUNCED_NAME_BYTES) {
        return Err(DecodeError::Invalid(format!(
            "a heartbeat announces at most {MAX_ANNOUNCED_CACHES} caches of names up to {MAX_ANNOUNCED_NAME_BYTES} bytes"
        )));
    }
    Ok(Heartbeat {
        origin: msg.origin,
        epoch: msg.epoch,
        last_seq: msg.last_seq,
        timestamp_us: msg.timestamp_us,
        address: msg.address,
        namespace: msg.namespace,
        caches: msg.caches.into_iter().map(|c| (c.name, c.entries)).collect(),
        writes_receipts: msg.writes_receipts,
        beat: msg.beat,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch() -> Batch {
        Batch {
            origin: "a".into(),
            epoch: 7,
            seq: 1,
            timestamp_us: 1,
            namespace: "ns".into(),
            invalidations: vec![
                Invalidation::new(Some("c"), Target::Key("k".into())),
                Invalidation::new(None, Target::All),
            ],
        }
    }

    /// Receipts sealed as a set: each envelope carries its own body, and the signature covers
    /// the set's digests; the set is refused where it is malformed, and its signature is not a
    /// signature of any one body.
    #[test]
    fn a_receipt_set_is_signed_once_and_checked_per_member() {
        use crate::identity::{Trust, TrustPolicy};
        let id = Identity::generate();
        let trust = Trust::new(TrustPolicy::PinOnFirstUse, std::time::Duration::from_secs(2));
        let bodies: Vec<Bytes> = (0..3u8).map(|i| Bytes::from(vec![i; 10])).collect();
        let sealed = seal_set(&id, &bodies);
        assert_eq!(sealed.len(), 3);
        let limits = Limits::default();
        let envs: Vec<Envelope> = sealed.iter().map(|p| open(p, &limits).unwrap()).collect();
        for (i, env) in envs.iter().enumerate() {
            assert_eq!(env.body, bodies[i]);
            let set = env.set.as_ref().expect("sealed as a set");
            assert_eq!(set.index as usize, i);
            assert!(set.covers(&env.body));
            assert!(!set.covers(&bodies[(i + 1) % 3]), "another member's body at this place");
            assert_eq!(env.signature, envs[0].signature, "one signature for the set");
            trust
                .check_signature(Kind::ReceiptSet, &set.digests, &env.signer, &env.signature)
                .unwrap();
            assert!(
                trust
                    .check_signature(Kind::Receipt, &env.body, &env.signer, &env.signature)
                    .is_err(),
                "a set signature is not a signature of one receipt"
            );
        }
        // One body alone is sealed alone.
        let one = open(&seal_set(&id, &bodies[..1])[0], &limits).unwrap();
        assert!(one.set.is_none());
        trust
            .check_signature(Kind::Receipt, &one.body, &one.signer, &one.signature)
            .unwrap();
        // More than MAX_SET bodies make several sets.
        let many: Vec<Bytes> = (0..MAX_SET + 1)
            .map(|i| Bytes::from(i.to_le_bytes().to_vec()))
            .collect();
        let sealed = seal_set(&id, &many);
        let last = open(&sealed[MAX_SET], &limits).unwrap();
        assert_eq!(last.set.as_ref().map(|s| (s.digests.len(), s.index)), Some((32, 0)));
        // Malformed sets are refused when opened.
        let signed = |digests: Vec<u8>, index: u32| {
            let msg = wire::Signed {
                body: bodies[0].clone(),
                signer: id.public_key().to_owned(),
                signature: vec![0; 64],
                digests: Bytes::from(digests),
                index,
            };
            Bytes::from(msg.encode_to_vec())
        };
        for (digests, index, why) in [
            (vec![0u8; 31], 0, "a digest of 31 bytes"),
            (vec![0u8; 64], 2, "an index past the set"),
            (vec![], 1, "an index without a set"),
            (vec![0u8; 32 * (MAX_SET + 1)], 0, "a set over MAX_SET"),
        ] {
            assert!(
                matches!(open(&signed(digests, index), &limits), Err(DecodeError::Invalid(_))),
                "{why} was accepted"
            );
        }
    }

    #[test]
    fn round_trip() {
        let b = batch();
        let bytes = encode_batch(&b);
        assert_eq!(decode_batch(&bytes, "ns", &Limits::default()).unwrap(), b);
    }

    fn varied() -> Batch {
        let mut b = batch();
        let mut full = Invalidation::new(Some("users"), Target::Key("user:ü".into()));
        full.version = Some(u64::MAX);
        full.reason = "profile saved".into();
        full.actor = "svc".into();
        full.purge_id = "p-1".into();
        b.invalidations.push(full);
        b.invalidations.push(Invalidation::new(None, Target::Tag("t".into())));
        b.invalidations
            .push(Invalidation::new(Some("c"), Target::Prefix("a:".into())));
        b.invalidations
            .push(Invalidation::new(Some("c"), Target::Key("k".repeat(300))));
        b.epoch = u64::MAX;
        b.seq = 300;
        b.timestamp_us = 0;
        b
    }

    /// Whether the borrowed decoder and prost's agree on `bytes` (the same batch, or both refuse).
    fn agree(bytes: &[u8], limits: &Limits) -> bool {
        match (
            decode_batch(bytes, "ns", limits),
            decode_batch_with_prost(bytes, "ns", limits),
        ) {
            (Ok(a), Ok(b)) => a == b,
            (Err(_), Err(_)) => true,
            _ => false,
        }
    }

    /// Actors shared, one of them given as empty.
    fn shared_actor() -> Batch {
        let mut b = varied();
        for inv in &mut b.invalidations {
            inv.actor = "svc".into();
        }
        b.invalidations[2].actor = Arc::default();
        b
    }

    #[test]
    fn encodes_as_prost_does() {
        let b = shared_actor();
        assert_eq!(decode_batch(&encode_batch(&b), "ns", &Limits::default()).unwrap(), b);
        // The shared actor is written once, for the batch.
        assert_eq!(encode_batch(&b).windows(3).filter(|w| w == b"svc").count(), 1);
        for b in [batch(), varied(), shared_actor()] {
            assert_eq!(encode_batch(&b), encode_batch_with_prost(&b));
            // An upper bound, for batching: each invalidation's actor counted.
            let lens: usize = b.invalidations.iter().map(encoded_len).sum();
            let mut empty = b.clone();
            empty.invalidations.clear();
            assert!(encode_batch(&b).len() <= encode_batch(&empty).len() + lens + 64);
        }
    }

    #[test]
    fn decodes_as_prost_does() {
        let limits = Limits::default();
        let b = varied();
        let bytes = encode_batch(&b).to_vec();
        assert_eq!(decode_batch(&bytes, "ns", &limits).unwrap(), b);
        let key = |tag: u32, wt: u8| vec![((tag << 3) | u32::from(wt)) as u8];
        let field = |tag: u32, body: &[u8]| [key(tag, 2), vec![body.len() as u8], body.to_vec()].concat();
        let inv = |body: &[u8]| field(5, body);
        let head = [field(1, b"a"), key(2, 0), vec![7], key(3, 0), vec![1], field(6, b"ns")].concat();
        let cases: Vec<Vec<u8>> = vec![
            // A scalar given twice: the last one counts.
            [head.clone(), key(3, 0), vec![9], inv(&field(2, b"k"))].concat(),
            // A oneof given twice: the last one counts, whatever its kind.
            [head.clone(), inv(&[field(2, b"k"), field(3, b"t")].concat())].concat(),
            [head.clone(), inv(&[field(3, b"t"), key(5, 0), vec![1]].concat())].concat(),
            // `all: false`, and no target at all.
            [head.clone(), inv(&[key(5, 0), vec![0]].concat())].concat(),
            [head.clone(), inv(&field(1, b"c"))].concat(),
            // Unknown fields of every wire type, at both levels, and a group.
            [
                head.clone(),
                key(15, 0),
                vec![0x80, 1],
                key(14, 1),
                vec![0; 8],
                key(13, 5),
                vec![0; 4],
                field(12, b"x"),
                inv(&[field(2, b"k"), key(11, 3), key(1, 0), vec![5], key(11, 4)].concat()),
            ]
            .concat(),
            // A group that ends with another tag, an end with no start, groups nested too deep.
            [head.clone(), inv(&field(2, b"k")), key(11, 3), key(12, 4)].concat(),
            [head.clone(), inv(&field(2, b"k")), key(11, 4)].concat(),
            [head.clone(), inv(&field(2, b"k")), vec![0x5b; 101], vec![0x5c; 101]].concat(),
            [
                head.clone(),
                inv(&[field(2, b"k"), vec![0x5b; 99], vec![0x5c; 99]].concat()),
            ]
            .concat(),
            [
                head.clone(),
                inv(&[field(2, b"k"), vec![0x5b; 100], vec![0x5c; 100]].concat()),
            ]
            .concat(),
            // Wrong wire types, bad UTF-8, a length past the end, a varint too long.
            [head.clone(), key(2, 2), vec![0], inv(&field(2, b"k"))].concat(),
            [head.clone(), inv(&[key(2, 0), vec![1]].concat())].concat(),
            [head.clone(), inv(&field(2, b"\xff"))].concat(),
            [head.clone(), key(5, 2), vec![50], field(2, b"k")].concat(),
            [head.clone(), key(2, 0), vec![0xff; 11]].concat(),
            // A tag of 0.
            [head.clone(), vec![0x02, 0]].concat(),
            // The batch's actor, after the invalidations, for those that give none (not for
            // one that gives an empty one).
            [
                head.clone(),
                inv(&field(2, b"k")),
                inv(&[field(2, b"k"), field(8, b"")].concat()),
                field(7, b"ops"),
            ]
            .concat(),
            // UTF-8 is checked in one pass from the first invalidation on, up to the first byte
            // that is not (a version past 127 here); the fields after it are checked alone.
            [
                head.clone(),
                inv(&field(2, "é".as_bytes())),
                inv(&[field(2, b"k"), key(6, 0), vec![0x80, 1]].concat()),
                inv(&field(2, "ü".as_bytes())),
                field(7, b"ops"),
            ]
            .concat(),
            [
                head.clone(),
                inv(&[field(2, b"k"), key(6, 0), vec![0x80, 1]].concat()),
                inv(&field(2, b"\xc3")),
            ]
            .concat(),
            [
                head.clone(),
                inv(&field(2, b"a")),
                inv(&field(2, b"\xe9")),
                inv(&field(2, b"b")),
            ]
            .concat(),
            // A key that ends in the first byte of a character whose second byte is the next
            // field's key (field 16, two bytes): valid UTF-8 in the pass, not as a key.
            [head.clone(), inv(&[field(2, b"\xc3"), vec![0x80, 1, 0]].concat())].concat(),
        ];
        for (i, c) in cases.iter().enumerate() {
            assert!(
                agree(c, &limits),
                "case {i}: {:?} against {:?}",
                decode_batch(c, "ns", &limits),
                decode_batch_with_prost(c, "ns", &limits)
            );
        }
        assert!(decode_batch(&cases[0], "ns", &limits).unwrap().seq == 9);
        assert!(decode_batch(&cases[5], "ns", &limits).is_ok());
        let n = cases.len();
        let keys: Vec<String> = decode_batch(&cases[n - 4], "ns", &limits)
            .unwrap()
            .invalidations
            .into_iter()
            .map(|i| i.target.text().to_owned())
            .collect();
        assert_eq!(keys, ["é", "k", "ü"]);
        for c in &cases[n - 3..] {
            assert!(decode_batch(c, "ns", &limits).is_err());
        }
        let actors: Vec<Arc<str>> = decode_batch(&cases[n - 5], "ns", &limits)
            .unwrap()
            .invalidations
            .into_iter()
            .map(|i| i.actor)
            .collect();
        assert_eq!(actors, [Arc::from("ops"), Arc::from("")]);
        // Every truncation and many byte flips of a real batch (a fixed pseudo-random walk).
        for end in 0..bytes.len() {
            assert!(agree(&bytes[..end], &limits), "truncated at {end}");
        }
        let mut x = 0x2545_f491_4f6c_dd1du64;
        for _ in 0..20_000 {
            let mut m = bytes.clone();
            for _ in 0..3 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let at = (x % m.len() as u64) as usize;
                m[at] = (x >> 32) as u8;
            }
            assert!(agree(&m, &limits), "{m:?}");
        }
        let few = Limits {
            max_batch_invalidations: 2,
            ..Limits::default()
        };
        assert!(agree(&bytes, &few) && decode_batch(&bytes, "ns", &few).is_err());
    }

    #[test]
    fn refuses_bad_input() {
        let limits = Limits::default();
        let bytes = encode_batch(&batch());
        assert_eq!(decode_batch(&bytes, "other", &limits).unwrap_err().kind(), "foreign");
        assert_eq!(
            decode_batch(b"\xff\xff\xff", "ns", &limits).unwrap_err().kind(),
            "malformed"
        );
        let small = Limits {
            max_message_bytes: 4,
            ..Limits::default()
        };
        assert_eq!(decode_batch(&bytes, "ns", &small).unwrap_err().kind(), "oversized");
        let mut b = batch();
        b.invalidations[0].target = Target::Key("x".repeat(limits.max_key_bytes + 1));
        assert_eq!(
            decode_batch(&encode_batch(&b), "ns", &limits).unwrap_err().kind(),
            "invalid"
        );
        let mut b = batch();
        b.invalidations.clear();
        assert_eq!(
            decode_batch(&encode_batch(&b), "ns", &limits).unwrap_err().kind(),
            "invalid"
        );
        let few = Limits {
            max_batch_invalidations: 1,
            ..Limits::default()
        };
        assert_eq!(decode_batch(&bytes, "ns", &few).unwrap_err().kind(), "invalid");
    }
}
