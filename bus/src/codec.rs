//! The domain types of an invalidation and their defensive encoding to and from the wire schema.
//!
//! Everything that arrives from the network passes through [`decode_batch`] or
//! [`decode_heartbeat`], which check sizes and shapes before any cache sees the data.

use bytes::Bytes;
use invalbus_proto::wire;
use prost::Message;

use crate::config::Limits;
use crate::identity::{Identity, Kind};

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
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalidation {
    /// The cache it applies to; `None` means every cache.
    pub cache: Option<String>,
    /// What it removes.
    pub target: Target,
    /// For key targets: the version of the data after the write (see the crate docs).
    pub version: Option<u64>,
    /// Why, for the audit log.
    pub reason: String,
    /// Who, for the audit log.
    pub actor: String,
    /// Purge id given by the admin API (empty for library writes).
    pub purge_id: String,
}

impl Invalidation {
    /// An invalidation of `target` in `cache` (or every cache), with no version, reason or actor.
    pub fn new(cache: Option<&str>, target: Target) -> Self {
        Invalidation {
            cache: cache.map(str::to_owned),
            target,
            version: None,
            reason: String::new(),
            actor: String::new(),
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
    let text = inv.target.text();
    if text.len() > limits.max_key_bytes {
        return Err(format!(
            "{} of {} bytes exceeds the limit of {}",
            inv.target.kind(),
            text.len(),
            limits.max_key_bytes
        ));
    }
    match &inv.target {
        Target::Key(k) if k.is_empty() => return Err("empty key".into()),
        Target::Tag(t) if t.is_empty() => return Err("empty tag".into()),
        Target::Tag(t) if t.contains('\0') => return Err("a tag cannot contain a NUL byte".into()),
        Target::Prefix(p) if p.is_empty() => return Err("empty prefix (use an `all` target to drop everything)".into()),
        _ => {}
    }
    if inv.version.is_some() && !matches!(inv.target, Target::Key(_)) {
        return Err(format!(
            "a version applies to key targets only, not to a {}",
            inv.target.kind()
        ));
    }
    if let Some(c) = &inv.cache {
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
}

/// Wraps `body` (an encoded message of `kind`) in an envelope signed by `identity`.
pub fn seal(identity: &Identity, kind: Kind, body: Bytes) -> Bytes {
    let signature = identity.sign(kind, &body).to_vec();
    let msg = wire::Signed {
        body,
        signer: identity.public_key().to_owned(),
        signature,
    };
    Bytes::from(msg.encode_to_vec())
}

/// Wraps `body` in an envelope without a signature (benchmarks of the signing cost only: see
/// `BusBuilder::unsigned_for_benchmarks`).
pub fn seal_unsigned(body: Bytes) -> Bytes {
    let msg = wire::Signed {
        body,
        signer: String::new(),
        signature: Vec::new(),
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
    Ok(Envelope {
        body: msg.body,
        signer: msg.signer,
        signature: msg.signature,
    })
}

/// Encodes a batch for the wire.
pub fn encode_batch(batch: &Batch) -> Bytes {
    let msg = wire::InvalidationBatch {
        origin: batch.origin.clone(),
        epoch: batch.epoch,
        seq: batch.seq,
        timestamp_us: batch.timestamp_us,
        namespace: batch.namespace.clone(),
        invalidations: batch.invalidations.iter().map(to_wire).collect(),
    };
    Bytes::from(msg.encode_to_vec())
}

/// Size in bytes that `inv` adds to an encoded batch (an upper bound, for batching).
pub fn encoded_len(inv: &Invalidation) -> usize {
    // Field tags and length prefixes: at most 3 bytes each for our size limits.
    let w = to_wire(inv);
    w.encoded_len() + 4
}

fn to_wire(inv: &Invalidation) -> wire::Invalidation {
    use wire::invalidation::Target as W;
    wire::Invalidation {
        cache: inv.cache.clone().unwrap_or_default(),
        target: Some(match &inv.target {
            Target::Key(k) => W::Key(k.clone()),
            Target::Tag(t) => W::Tag(t.clone()),
            Target::Prefix(p) => W::Prefix(p.clone()),
            Target::All => W::All(true),
        }),
        version: inv.version,
        reason: inv.reason.clone(),
        actor: inv.actor.clone(),
        purge_id: inv.purge_id.clone(),
    }
}

/// Decodes and checks a batch that arrived on `namespace`'s subject.
pub fn decode_batch(payload: &[u8], namespace: &str, limits: &Limits) -> Result<Batch, DecodeError> {
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
            cache: if w.cache.is_empty() { None } else { Some(w.cache) },
            target,
            version: w.version,
            reason: w.reason,
            actor: w.actor,
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

    #[test]
    fn round_trip() {
        let b = batch();
        let bytes = encode_batch(&b);
        assert_eq!(decode_batch(&bytes, "ns", &Limits::default()).unwrap(), b);
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
