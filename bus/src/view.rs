//! A batch decoded in place: its names, keys, tags and prefixes are `&str`s into the received
//! message, not one `String` each. The receiver applies batches from these views; a batch is
//! copied into the owned `codec::Batch` only where it is kept (the public decoders, cache events).
//!
//! The decoder reads the schema's `InvalidationBatch` exactly as prost's generated code does
//! (the same fields, the last value of a repeated scalar kept, unknown fields skipped with the
//! same nesting limit, UTF-8 checked), so that it accepts and refuses the same messages:
//! the `batch` fuzz target compares the two on every input.

use prost::encoding::{decode_key, decode_varint, WireType};
use prost::DecodeError;

/// What an invalidation removes, borrowed (see `Target`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TargetRef<'a> {
    /// One key.
    Key(&'a str),
    /// Every entry that carries this tag.
    Tag(&'a str),
    /// Every entry whose key starts with this prefix.
    Prefix(&'a str),
    /// Everything.
    All,
}

impl<'a> TargetRef<'a> {
    /// The key, tag or prefix text (empty for [`TargetRef::All`]).
    pub fn text(self) -> &'a str {
        match self {
            TargetRef::Key(s) | TargetRef::Tag(s) | TargetRef::Prefix(s) => s,
            TargetRef::All => "",
        }
    }

    /// A short name of the kind: `key`, `tag`, `prefix` or `all`.
    pub fn kind(self) -> &'static str {
        match self {
            TargetRef::Key(_) => "key",
            TargetRef::Tag(_) => "tag",
            TargetRef::Prefix(_) => "prefix",
            TargetRef::All => "all",
        }
    }
}

/// One invalidation, borrowed from a received batch (see `Invalidation`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct InvalidationRef<'a> {
    pub cache: Option<&'a str>,
    pub target: TargetRef<'a>,
    pub version: Option<u64>,
    pub reason: &'a str,
    /// Its own actor, or the batch's when it gives none.
    pub actor: &'a str,
    pub purge_id: &'a str,
}

/// A batch, borrowed from the received message (see `Batch`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct BatchRef<'a> {
    pub origin: &'a str,
    pub epoch: u64,
    pub seq: u64,
    pub timestamp_us: u64,
    pub namespace: &'a str,
    pub invalidations: Vec<InvalidationRef<'a>>,
    /// The first invalidation that names no target (none, or `all: false`), which the checks
    /// refuse; its `target` reads `All` meanwhile.
    pub untargeted: Option<usize>,
    /// Invalidations past the first `max_invalidations`, read but not kept (see [`parse_batch`]).
    pub beyond: usize,
}

/// Why a message is not a well-formed `InvalidationBatch`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Malformed {
    /// As prost reports it (a bad varint or key, a length past the end...).
    Wire(prost::DecodeError),
    /// A field with another wire type than the schema's.
    WireType { field: &'static str, found: WireType },
    /// A string field that is not UTF-8.
    NotUtf8(&'static str),
    /// A field's length runs past the end of the message.
    Truncated,
    /// Unknown groups nested deeper than prost's recursion limit.
    TooDeep,
}

impl std::fmt::Display for Malformed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Malformed::Wire(e) => write!(f, "{e}"),
            Malformed::WireType { field, found } => write!(f, "field {field} has wire type {found:?}"),
            Malformed::NotUtf8(field) => write!(f, "field {field} is not valid UTF-8"),
            Malformed::Truncated => f.write_str("a field runs past the end of the message"),
            Malformed::TooDeep => f.write_str("unknown groups nested too deep"),
        }
    }
}

impl From<prost::DecodeError> for Malformed {
    fn from(e: prost::DecodeError) -> Self {
        Malformed::Wire(e)
    }
}

/// prost's recursion limit: a top-level message may skip groups this deep, and each nested
/// message one less.
const RECURSION_LIMIT: u32 = 100;

/// Reads an `InvalidationBatch` without copying its text. Checks only the wire format: what the
/// fields may hold is `codec::decode_batch_ref`'s business. Invalidations past the first
/// `max_invalidations` are read (so that the wire format is checked throughout) and counted in
/// `beyond`, not kept: an oversized batch allocates no more than a full one.
pub(crate) fn parse_batch(msg: &[u8], max_invalidations: usize) -> Result<BatchRef<'_>, Malformed> {
    let mut buf = msg;
    let mut checked = Checked::default();
    let mut b = BatchRef {
        origin: "",
        epoch: 0,
        seq: 0,
        timestamp_us: 0,
        namespace: "",
        invalidations: Vec::new(),
        untargeted: None,
        beyond: 0,
    };
    let mut actor = "";
    // The invalidations that give no actor of their own, by index (the batch's actor may come
    // after them).
    let mut actorless = Vec::new();
    while !buf.is_empty() {
        let before = buf.len();
        let (tag, wt) = key(&mut buf)?;
        match tag {
            1 => b.origin = checked.text(&mut buf, msg.len(), wt, "origin")?,
            2 => b.epoch = varint(&mut buf, wt, "epoch")?,
            3 => b.seq = varint(&mut buf, wt, "seq")?,
            4 => b.timestamp_us = varint(&mut buf, wt, "timestamp_us")?,
            5 => {
                if b.invalidations.is_empty() && b.beyond == 0 {
                    checked = Checked::rest(msg, msg.len() - before);
                }
                let body = delimited(&mut buf, wt, "invalidations")?;
                let body_end = msg.len() - buf.len();
                let (inv, targeted, own_actor) = parse_invalidation(body, body_end, checked)?;
                if b.invalidations.len() == max_invalidations {
                    b.beyond += 1;
                    continue;
                }
                if !targeted && b.untargeted.is_none() {
                    b.untargeted = Some(b.invalidations.len());
                }
                if !own_actor {
                    actorless.push(b.invalidations.len());
                }
                if b.invalidations.is_empty() {
                    // Room for the rest if they are the size of the first (most batches are one
                    // kind of invalidation), so that the `Vec` is not grown ten times for 1,024
                    // keys; no more than a full batch's.
                    let each = before - buf.len();
                    b.invalidations.reserve((1 + buf.len() / each).min(max_invalidations));
                }
                b.invalidations.push(inv);
            }
            6 => b.namespace = checked.text(&mut buf, msg.len(), wt, "namespace")?,
            7 => actor = checked.text(&mut buf, msg.len(), wt, "actor")?,
            _ => skip(&mut buf, tag, wt, RECURSION_LIMIT)?,
        }
    }
    if !actor.is_empty() {
        for i in actorless {
            b.invalidations[i].actor = actor;
        }
    }
    Ok(b)
}

/// One invalidation, whether it names a target, and whether it gives its own actor. `end` is
/// where its body ends in the message.
fn parse_invalidation<'a>(
    mut buf: &'a [u8],
    end: usize,
    checked: Checked<'a>,
) -> Result<(InvalidationRef<'a>, bool, bool), Malformed> {
    let mut own_actor = false;
    let mut cache = "";
    let mut target = None;
    let mut inv = InvalidationRef {
        cache: None,
        target: TargetRef::All,
        version: None,
        reason: "",
        actor: "",
        purge_id: "",
    };
    while !buf.is_empty() {
        let (tag, wt) = key(&mut buf)?;
        match tag {
            1 => cache = checked.text(&mut buf, end, wt, "cache")?,
            2 => target = Some(Some(TargetRef::Key(checked.text(&mut buf, end, wt, "key")?))),
            3 => target = Some(Some(TargetRef::Tag(checked.text(&mut buf, end, wt, "tag")?))),
            4 => target = Some(Some(TargetRef::Prefix(checked.text(&mut buf, end, wt, "prefix")?))),
            // `all: false` names nothing.
            5 => target = Some((varint(&mut buf, wt, "all")? != 0).then_some(TargetRef::All)),
            6 => inv.version = Some(varint(&mut buf, wt, "version")?),
            7 => inv.reason = checked.text(&mut buf, end, wt, "reason")?,
            8 => {
                inv.actor = checked.text(&mut buf, end, wt, "actor")?;
                own_actor = true;
            }
            9 => inv.purge_id = checked.text(&mut buf, end, wt, "purge_id")?,
            _ => skip(&mut buf, tag, wt, RECURSION_LIMIT - 1)?,
        }
    }
    inv.cache = (!cache.is_empty()).then_some(cache);
    let target = target.flatten();
    inv.target = target.unwrap_or(TargetRef::All);
    Ok((inv, target.is_some(), own_actor))
}

fn varint(buf: &mut &[u8], wt: WireType, field: &'static str) -> Result<u64, Malformed> {
    if wt != WireType::Varint {
        return Err(Malformed::WireType { field, found: wt });
    }
    Ok(varint_value(buf)?)
}

fn delimited<'a>(buf: &mut &'a [u8], wt: WireType, field: &'static str) -> Result<&'a [u8], Malformed> {
    if wt != WireType::LengthDelimited {
        return Err(Malformed::WireType { field, found: wt });
    }
    let len = varint_value(buf)?;
    if len > buf.len() as u64 {
        return Err(Malformed::Truncated);
    }
    let (head, tail) = buf.split_at(len as usize);
    *buf = tail;
    Ok(head)
}

/// prost's `decode_key`, with the one-byte case inline: fields 1 to 15 with a valid wire type,
/// every key of a batch the bus encodes. Anything else goes to prost's, errors included, so the
/// two read the same keys. prost's is a call through `Buf` for each key and length; with these
/// two inline (and `Checked::text`), a 1,024-key batch decodes in 16 % fewer instructions
/// (BENCHMARKS.md).
#[inline(always)]
fn key(buf: &mut &[u8]) -> Result<(u32, WireType), DecodeError> {
    if let Some((&byte, rest)) = buf.split_first() {
        // Below 8 the tag is 0, which prost refuses.
        if (8..0x80).contains(&byte) {
            if let Ok(wt) = WireType::try_from(u64::from(byte & 7)) {
                *buf = rest;
                return Ok((u32::from(byte >> 3), wt));
            }
        }
    }
    decode_key(buf)
}

/// prost's `decode_varint`, with the one-byte case inline (every length below 128).
#[inline(always)]
fn varint_value(buf: &mut &[u8]) -> Result<u64, DecodeError> {
    match buf.split_first() {
        Some((&byte, rest)) if byte < 0x80 => {
            *buf = rest;
            Ok(u64::from(byte))
        }
        _ => decode_varint(buf),
    }
}

/// Part of the message already checked for UTF-8: its longest valid run from the first
/// invalidation on, checked in one pass when that invalidation is read. A text field inside it
/// is a `str::get` of it, which checks only the field's two ends; the others are checked alone.
/// A batch's names and keys are mostly ASCII, and so are its tags and lengths below 128, so one
/// pass over a 1,024-key batch replaces some 2,000 short checks; the pass stops at the first
/// byte that is not (a version or length past 127), and the fields after it are checked alone.
#[derive(Debug, Clone, Copy, Default)]
struct Checked<'a> {
    /// Where `text` begins in the message.
    at: usize,
    text: &'a str,
}

impl<'a> Checked<'a> {
    /// The longest valid run of `msg` from `at` on.
    fn rest(msg: &'a [u8], at: usize) -> Self {
        let rest = &msg[at..];
        let text = match std::str::from_utf8(rest) {
            Ok(text) => text,
            // The run up to the error is valid (`Utf8Error::valid_up_to`); it is checked again
            // to make it a `&str` without `unsafe`, at most once per message, and most often a
            // few bytes (up to a version in the first invalidation).
            Err(e) => std::str::from_utf8(&rest[..e.valid_up_to()]).unwrap_or_default(),
        };
        Checked { at, text }
    }

    /// A length-delimited text field, as `delimited` reads it; `end` is where `buf` ends in the
    /// message.
    ///
    /// Inlined into each of its callers: left to the compiler, it was a call each, which cost
    /// what the inline key and length reads saved.
    #[inline(always)]
    fn text(self, buf: &mut &'a [u8], end: usize, wt: WireType, field: &'static str) -> Result<&'a str, Malformed> {
        let bytes = delimited(buf, wt, field)?;
        let start = end - buf.len() - bytes.len();
        let within = start
            .checked_sub(self.at)
            .and_then(|from| self.text.get(from..from + bytes.len()));
        match within {
            Some(text) => {
                debug_assert_eq!(text.as_bytes(), bytes);
                Ok(text)
            }
            None => std::str::from_utf8(bytes).map_err(|_| Malformed::NotUtf8(field)),
        }
    }
}

/// Skips an unknown field as prost's `skip_field` does (groups included, to the same depth).
fn skip(buf: &mut &[u8], tag: u32, wt: WireType, depth: u32) -> Result<(), Malformed> {
    if depth == 0 {
        return Err(Malformed::TooDeep);
    }
    let len = match wt {
        WireType::Varint => {
            varint_value(buf)?;
            0
        }
        WireType::ThirtyTwoBit => 4,
        WireType::SixtyFourBit => 8,
        WireType::LengthDelimited => varint_value(buf)?,
        WireType::StartGroup => loop {
            let (inner, inner_wt) = key(buf)?;
            if inner_wt == WireType::EndGroup {
                if inner != tag {
                    return Err(Malformed::WireType {
                        field: "an unknown group's end",
                        found: inner_wt,
                    });
                }
                break 0;
            }
            skip(buf, inner, inner_wt, depth - 1)?;
        },
        WireType::EndGroup => {
            return Err(Malformed::WireType {
                field: "an unknown field",
                found: wt,
            })
        }
    };
    if len > buf.len() as u64 {
        return Err(Malformed::Truncated);
    }
    *buf = &buf[len as usize..];
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The inline key and length reads agree with prost's on every input of two bytes and a
    /// third (every one-byte key and length, and each first byte of a longer one): the same
    /// value or error, and the same bytes left.
    #[test]
    fn reads_keys_and_lengths_as_prost_does() {
        for first in 0..=255u8 {
            for second in 0..=255u8 {
                let bytes = [first, second, 0x01];
                for len in 0..=bytes.len() {
                    let (mut ours, mut theirs) = (&bytes[..len], &bytes[..len]);
                    assert_eq!(key(&mut ours), decode_key(&mut theirs), "key {:?}", &bytes[..len]);
                    assert_eq!(ours.len(), theirs.len());
                    let (mut ours, mut theirs) = (&bytes[..len], &bytes[..len]);
                    assert_eq!(
                        varint_value(&mut ours),
                        decode_varint(&mut theirs),
                        "varint {:?}",
                        &bytes[..len]
                    );
                    assert_eq!(ours.len(), theirs.len());
                }
            }
        }
    }
}
