//! The read socket: the sidecar's reads (Get, GetMany) in a minimal binary protocol on a Unix
//! domain socket, for clients whose gRPC library costs more per call than the read itself
//! (grpcio from Python spends ~150-200 µs on a unary call on the benchmark machine, where a
//! whole Redis GET takes ~80 µs). Same answers, reservations, token check and counters as the
//! gRPC calls, which it calls into; writes and everything else stay on gRPC.
//!
//! Every message is a little-endian `u32` length, then that many bytes.
//! 1. The client's first message is `IBR1` followed by its token. The node answers `[0]`, or
//!    `[1]` followed by the reason and closes (a refusal is counted and logged as on gRPC).
//! 2. Then requests, each answered in order:
//!    `[1] [reserve u8] [cache_len u8] [cache] [count u16] ([key_len u16] [key])*`, answered by
//!    `[0]` and `count` entries, each `[0] [len u8] [reservation]` (a miss; the reservation is
//!    empty unless asked for) or `[1] [ttl_ms u64] [has_version u8] [version u64] [tags u8]
//!    ([len u16] [tag])* [len u32] [value]` (a hit); or by `[0xFF]` followed by the reason
//!    (bad key, unknown cache): the connection stays usable.
//!
//! A message over [`MAX_REQUEST`] or that does not parse ends the connection (counted, logged).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::{Buf, BufMut, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::watch;
use tonic::Request;

use crate::config::Role;
use crate::pb::cache::GetResponse;
use crate::sidecar::SidecarService;
use crate::state::NodeState;

/// Largest request accepted.
pub const MAX_REQUEST: usize = 1 << 20;
const HELLO: &[u8] = b"IBR1";

/// Binds the socket (removing one a dead node left behind).
pub fn bind(path: &Path) -> std::io::Result<UnixListener> {
    if std::os::unix::net::UnixStream::connect(path).is_err() {
        use std::os::unix::fs::FileTypeExt;
        if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket()) {
            let _ = std::fs::remove_file(path);
        }
    }
    UnixListener::bind(path)
}

/// Serves connections until `stop` turns true; removes the socket file then.
pub async fn serve(
    listener: UnixListener,
    path: PathBuf,
    state: Arc<NodeState>,
    sidecar: SidecarService,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            _ = crate::audit::stopped(&mut stop) => break,
            accepted = listener.accept() => match accepted {
                Ok((conn, _)) => {
                    let (state, sidecar) = (state.clone(), sidecar.clone());
                    tokio::spawn(async move {
                        if let Err(e) = connection(conn, &state, &sidecar).await {
                            state.auth.refusals.invalid_argument.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            tracing::warn!(error = %e, "read socket: connection ended");
                        }
                    });
                }
                Err(e) => {
                    tracing::warn!(error = %e, "read socket: accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            },
        }
    }
    let _ = std::fs::remove_file(path);
}

/// Why a connection was ended.
#[derive(Debug, thiserror::Error)]
enum ConnError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("malformed message: {0}")]
    Malformed(&'static str),
}

async fn read_message(
    r: &mut BufReader<tokio::net::unix::OwnedReadHalf>,
    buf: &mut Vec<u8>,
) -> Result<bool, ConnError> {
    let len = match r.read_u32_le().await {
        Ok(n) => n as usize,
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(false),
        Err(e) => return Err(e.into()),
    };
    if len > MAX_REQUEST {
        return Err(ConnError::Malformed("longer than 1 MiB"));
    }
    buf.resize(len, 0);
    r.read_exact(buf).await?;
    Ok(true)
}

async fn write_message(w: &mut BufWriter<tokio::net::unix::OwnedWriteHalf>, body: &[u8]) -> Result<(), ConnError> {
    w.write_u32_le(body.len() as u32).await?;
    w.write_all(body).await?;
    w.flush().await?;
    Ok(())
}

async fn connection(conn: UnixStream, state: &NodeState, sidecar: &SidecarService) -> Result<(), ConnError> {
    let (r, w) = conn.into_split();
    let (mut r, mut w) = (BufReader::new(r), BufWriter::new(w));
    let mut buf = Vec::new();
    if !read_message(&mut r, &mut buf).await? {
        return Ok(());
    }
    let Some(token) = buf.strip_prefix(HELLO) else {
        return Err(ConnError::Malformed("no IBR1 greeting"));
    };
    let mut request = Request::new(());
    let header = format!("Bearer {}", String::from_utf8_lossy(token));
    if let Ok(v) = header.parse() {
        request.metadata_mut().insert("authorization", v);
    }
    let who = match state.auth.check(&request, "ReadSocket", Role::Cache) {
        Ok(who) => who,
        Err(status) => {
            let mut out = vec![1u8];
            out.extend_from_slice(status.message().as_bytes());
            write_message(&mut w, &out).await?;
            return Ok(());
        }
    };
    write_message(&mut w, &[0]).await?;
    let mut out = BytesMut::new();
    while read_message(&mut r, &mut buf).await? {
        let (cache, keys, reserve) = parse(&buf)?;
        out.clear();
        match sidecar.read_many(&who, &cache, &keys, reserve).await {
            Ok(entries) => {
                out.put_u8(0);
                for e in entries {
                    encode(&mut out, e);
                }
            }
            Err(status) => {
                out.put_u8(0xFF);
                out.put_slice(status.message().as_bytes());
            }
        }
        write_message(&mut w, &out).await?;
    }
    Ok(())
}

type Parsed = (String, Vec<String>, bool);

fn parse(mut b: &[u8]) -> Result<Parsed, ConnError> {
    let bad = ConnError::Malformed;
    if b.remaining() < 5 || b.get_u8() != 1 {
        return Err(bad("not a get request"));
    }
    let reserve = b.get_u8() == 1;
    let n = b.get_u8() as usize;
    if b.remaining() < n + 2 {
        return Err(bad("truncated cache name"));
    }
    let cache = std::str::from_utf8(&b[..n])
        .map_err(|_| bad("cache name is not UTF-8"))?
        .to_owned();
    b.advance(n);
    let count = b.get_u16_le() as usize;
    let mut keys = Vec::with_capacity(count.min(1024));
    for _ in 0..count {
        if b.remaining() < 2 {
            return Err(bad("truncated key"));
        }
        let n = b.get_u16_le() as usize;
        if b.remaining() < n {
            return Err(bad("truncated key"));
        }
        keys.push(
            std::str::from_utf8(&b[..n])
                .map_err(|_| bad("key is not UTF-8"))?
                .to_owned(),
        );
        b.advance(n);
    }
    if b.has_remaining() {
        return Err(bad("trailing bytes"));
    }
    Ok((cache, keys, reserve))
}

fn encode(out: &mut BytesMut, e: GetResponse) {
    if !e.found {
        out.put_u8(0);
        // Reservation ids are `rs-` and 32 hex digits.
        out.put_u8(e.reservation.len() as u8);
        out.put_slice(e.reservation.as_bytes());
        return;
    }
    out.put_u8(1);
    out.put_u64_le(e.ttl_ms);
    out.put_u8(e.version.is_some() as u8);
    out.put_u64_le(e.version.unwrap_or(0));
    out.put_u8(e.tags.len() as u8);
    for t in &e.tags {
        out.put_u16_le(t.len() as u16);
        out.put_slice(t.as_bytes());
    }
    out.put_u32_le(e.value.len() as u32);
    out.put_slice(&e.value);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse_and_bad_ones_are_refused() {
        let mut b = vec![1u8, 1, 7];
        b.extend_from_slice(b"default");
        b.extend_from_slice(&2u16.to_le_bytes());
        for k in ["a", "bc"] {
            b.extend_from_slice(&(k.len() as u16).to_le_bytes());
            b.extend_from_slice(k.as_bytes());
        }
        let (cache, keys, reserve) = parse(&b).unwrap();
        assert_eq!(
            (cache.as_str(), keys, reserve),
            ("default", vec!["a".to_owned(), "bc".to_owned()], true)
        );
        assert!(parse(&b[..b.len() - 1]).is_err(), "truncated");
        let mut trailing = b.clone();
        trailing.push(0);
        assert!(parse(&trailing).is_err(), "trailing bytes");
        assert!(parse(&[2, 0, 0, 0, 0]).is_err(), "unknown op");
        assert!(parse(&[1, 0, 200, 0, 0]).is_err(), "cache name past the end");
    }
}
