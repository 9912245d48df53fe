//! Figure 8: Redis server-assisted client-side caching (RESP3 `CLIENT TRACKING on BCAST`), the peer
//! users would pick instead of invalbus, measured on this machine with a hand-written RESP3 client.
//!
//! The bench starts its own `redis-server` on a free loopback port (never a Redis that happens to
//! run on 6379), one writer connection and three tracking reader connections, and measures:
//! - a writer's `SET` to the `invalidate` push at all three readers, paced like the invalbus
//!   propagation figure (same rate, same duration), and
//! - keys per second delivered to each reader while the writer pipelines `SET`s as fast as it can.
//!
//! Both run in the same rounds as the invalbus figures they stand beside, alternating with them,
//! so that drift on a shared machine touches both sides alike.
//!
//! The RESP3 client is ours rather than a crate's: the bench needs only the handful of frame types
//! that `HELLO 3`, `CLIENT TRACKING`, `SET` and invalidation pushes use, and a client crate would
//! put its own buffering and dispatch between the socket and the timestamp we take.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;

use super::now_us;

/// Tracking readers, as many as the invalbus propagation figure has peers.
const READERS: usize = 3;
/// Every key the writer sets starts with this; the readers track it with `BCAST PREFIX`.
const PREFIX: &str = "k";
/// A reader or the writer that hears nothing for this long gives up (a lost push, a dead server).
const IDLE: Duration = Duration::from_secs(5);

/// The bench's own `redis-server` with tracking readers, measured in the same alternation as the
/// invalbus rows it stands beside (see `propagation` in latency.rs and `throughput` in throughput.rs).
pub struct Tracking {
    server: RedisServer,
    /// Set once a measurement failed: the rows then say so rather than mix in a partial figure.
    failed: bool,
}

impl Tracking {
    /// Starts the server, or prints why this peer is skipped and returns `None`.
    pub async fn start() -> Option<Tracking> {
        let Some(bin) = redis_server_bin() else {
            println!("  (redis tracking: skipped this peer, no redis-server on PATH or at /usr/bin/redis-server)");
            return None;
        };
        match RedisServer::start(&bin).await {
            Ok(server) => Some(Tracking { server, failed: false }),
            Err(e) => {
                println!(
                    "  (redis tracking: skipped this peer, {} did not start: {e})",
                    bin.display()
                );
                None
            }
        }
    }

    /// A writer's `SET` to the `invalidate` push at all readers, paced at `rate` for `secs`.
    pub async fn latency(&mut self, rate: u64, secs: u64) -> Option<hdrhistogram::Histogram<u64>> {
        if self.failed {
            return None;
        }
        match latency(self.server.port, rate, secs).await {
            Ok(h) => Some(h),
            Err(e) => {
                println!("  (redis tracking: latency measurement failed: {e})");
                self.failed = true;
                None
            }
        }
    }

    /// Keys per second delivered to the slowest reader while a writer pipelines `n` `SET`s.
    pub async fn flood(&mut self, n: usize) -> Option<f64> {
        if self.failed {
            return None;
        }
        match flood(self.server.port, n).await {
            Ok(rate) => Some(rate),
            Err(e) => {
                println!("  (redis tracking: flood measurement failed: {e})");
                self.failed = true;
                None
            }
        }
    }
}

/// `redis-server` on PATH, else Debian's `/usr/bin/redis-server`.
pub(crate) fn redis_server_bin() -> Option<PathBuf> {
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|dir| dir.join("redis-server"))
        .chain([PathBuf::from("/usr/bin/redis-server")])
        .find(|p| p.is_file())
}

/// A `redis-server` child process on a loopback port, without persistence, killed and reaped on
/// drop so that no server outlives the bench.
pub(crate) struct RedisServer {
    child: Child,
    pub(crate) port: u16,
}

impl RedisServer {
    /// Starts `bin` on a free port and waits until it answers `PING`; retries on a fresh port when
    /// another process took the port between our probe and the server's bind.
    pub(crate) async fn start(bin: &Path) -> Result<RedisServer, RespError> {
        let mut last = RespError::Protocol("not started".into());
        for _ in 0..3 {
            let port = invalbus_tests::free_port();
            let child = Command::new(bin)
                .args(["--port", &port.to_string(), "--save", "", "--appendonly", "no"])
                .args(["--bind", "127.0.0.1"])
                // Nothing is persisted, but a relative `dir` must not point into the repository.
                .current_dir(std::env::temp_dir())
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()?;
            let mut server = RedisServer { child, port };
            match server.wait_ready(Duration::from_secs(5)).await {
                Ok(()) => return Ok(server),
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    async fn wait_ready(&mut self, deadline: Duration) -> Result<(), RespError> {
        let end = Instant::now() + deadline;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(RespError::Protocol(format!("redis-server exited: {status}")));
            }
            if let Ok(mut c) = Connection::open(self.port).await {
                if let Ok(Frame::Simple(pong)) = c.call(&[b"PING"]).await {
                    if pong == "PONG" {
                        return Ok(());
                    }
                }
            }
            if Instant::now() >= end {
                return Err(RespError::Timeout("redis-server answering PING"));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        // SIGKILL: nothing is persisted, so there is nothing for a graceful shutdown to save.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Latency from a writer's `SET` to the invalidation push at every reader, paced at `rate`.
async fn latency(port: u16, rate: u64, secs: u64) -> Result<hdrhistogram::Histogram<u64>, RespError> {
    let total = (rate * secs) as usize;
    let mut readers = Vec::new();
    for _ in 0..READERS {
        let mut r = Connection::tracking_reader(port).await?;
        readers.push(tokio::spawn(async move {
            // arrived[i]: when the push for key i arrived (0 = not yet).
            let mut arrived = vec![0u64; total];
            let mut seen = 0;
            while seen < total {
                let keys = r.next_invalidation().await?;
                let at = now_us();
                for i in keys.into_iter().filter_map(key_index) {
                    if let Some(slot) = arrived.get_mut(i).filter(|s| **s == 0) {
                        *slot = at;
                        seen += 1;
                    }
                }
            }
            Ok::<_, RespError>(arrived)
        }));
    }
    let (writer, replies) = Connection::open(port).await?.into_writer();
    let drain = tokio::spawn(replies.drain_ok(total));
    let mut writer = writer;
    let mut sent = Vec::with_capacity(total);
    let mut cmd = Vec::with_capacity(64);
    // The same pacing as the invalbus and raw NATS propagation figures: sleep only when more than
    // 200 us ahead of schedule, since a timer sleep is no finer than about a millisecond.
    let start = Instant::now();
    for i in 0..total as u64 {
        let due = start + Duration::from_nanos(i * 1_000_000_000 / rate);
        let now = Instant::now();
        if due > now + Duration::from_micros(200) {
            tokio::time::sleep(due - now).await;
        }
        cmd.clear();
        encode(&mut cmd, &[b"SET", format!("{PREFIX}{i}").as_bytes(), b"1"]);
        sent.push(now_us());
        writer.write_all(&cmd).await?;
    }
    join(drain).await?;
    let mut worst = vec![0u64; total];
    let mut complete = vec![0usize; total];
    for r in readers {
        for (i, at) in join(r).await?.into_iter().enumerate() {
            if at != 0 {
                worst[i] = worst[i].max(at.saturating_sub(sent[i]));
                complete[i] += 1;
            }
        }
    }
    let mut h = super::histogram();
    for (lat, n) in worst.into_iter().zip(complete) {
        if n == READERS {
            h.saturating_record(lat.max(1));
        }
    }
    Ok(h)
}

/// Keys per second delivered to the slowest of the readers while one writer pipelines `n` `SET`s.
async fn flood(port: u16, n: usize) -> Result<f64, RespError> {
    let mut readers = Vec::new();
    for _ in 0..READERS {
        let mut r = Connection::tracking_reader(port).await?;
        readers.push(tokio::spawn(async move {
            let mut seen = 0;
            while seen < n {
                seen += r.next_invalidation().await?.len();
            }
            Ok::<_, RespError>(Instant::now())
        }));
    }
    let (mut writer, replies) = Connection::open(port).await?.into_writer();
    let drain = tokio::spawn(replies.drain_ok(n));
    let start = Instant::now();
    let mut cmd = Vec::with_capacity(32 * 1024);
    for first in (0..n).step_by(1000) {
        cmd.clear();
        for i in first..(first + 1000).min(n) {
            encode(&mut cmd, &[b"SET", format!("{PREFIX}{i}").as_bytes(), b"1"]);
        }
        writer.write_all(&cmd).await?;
    }
    join(drain).await?;
    let mut slowest = f64::INFINITY;
    for r in readers {
        let end = join(r).await?;
        slowest = slowest.min(n as f64 / end.duration_since(start).as_secs_f64());
    }
    Ok(slowest)
}

async fn join<T>(task: tokio::task::JoinHandle<Result<T, RespError>>) -> Result<T, RespError> {
    task.await
        .map_err(|e| RespError::Protocol(format!("task failed: {e}")))?
}

/// The number in a key `k<number>`, as the writer names them.
fn key_index(key: Vec<u8>) -> Option<usize> {
    std::str::from_utf8(key.strip_prefix(PREFIX.as_bytes())?)
        .ok()?
        .parse()
        .ok()
}

/// Appends one command as a RESP array of bulk strings.
fn encode(out: &mut Vec<u8>, args: &[&[u8]]) {
    out.extend_from_slice(format!("*{}\r\n", args.len()).as_bytes());
    for a in args {
        out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        out.extend_from_slice(a);
        out.extend_from_slice(b"\r\n");
    }
}

/// One RESP3 value, as far as this bench needs them (no attributes, doubles, booleans, big
/// numbers or verbatim strings: nothing it sends is answered with those).
#[derive(Debug, PartialEq)]
enum Frame {
    Simple(String),
    Error(String),
    Integer(i64),
    Bulk(Vec<u8>),
    /// RESP3 `_`, and RESP2's null bulk string and null array.
    Null,
    /// `*` arrays and `~` sets.
    Array(Vec<Frame>),
    /// `>`: out-of-band data such as invalidations, interleaved with replies.
    Push(Vec<Frame>),
    Map(Vec<(Frame, Frame)>),
}

/// What went wrong talking to the bench's Redis.
#[derive(Debug)]
pub(crate) enum RespError {
    Io(std::io::Error),
    /// Bytes that are not RESP3, or a reply this bench did not expect.
    Protocol(String),
    /// An error reply (`-ERR ...`).
    Server(String),
    Closed,
    Timeout(&'static str),
}

impl std::fmt::Display for RespError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RespError::Io(e) => write!(f, "i/o: {e}"),
            RespError::Protocol(m) => write!(f, "protocol: {m}"),
            RespError::Server(m) => write!(f, "server replied: {m}"),
            RespError::Closed => write!(f, "connection closed"),
            RespError::Timeout(what) => write!(f, "timed out waiting for {what}"),
        }
    }
}

impl From<std::io::Error> for RespError {
    fn from(e: std::io::Error) -> Self {
        RespError::Io(e)
    }
}

/// Parses one frame at the start of `buf`: `Ok(None)` when `buf` holds only part of it, else the
/// frame and how many bytes it took.
fn parse(buf: &[u8]) -> Result<Option<(Frame, usize)>, RespError> {
    let mut pos = 0;
    Ok(parse_at(buf, &mut pos)?.map(|f| (f, pos)))
}

fn parse_at(buf: &[u8], pos: &mut usize) -> Result<Option<Frame>, RespError> {
    let Some(&kind) = buf.get(*pos) else {
        return Ok(None);
    };
    *pos += 1;
    let Some(line) = line(buf, pos) else {
        return Ok(None);
    };
    let text = || String::from_utf8_lossy(line).into_owned();
    let frame = match kind {
        b'+' => Frame::Simple(text()),
        b'-' => Frame::Error(text()),
        b':' => Frame::Integer(number(line)?),
        b'_' => Frame::Null,
        b'$' => match number(line)? {
            -1 => Frame::Null,
            len => {
                let len = usize::try_from(len).map_err(|_| RespError::Protocol(format!("bulk length {len}")))?;
                let Some(body) = buf.get(*pos..*pos + len + 2) else {
                    return Ok(None);
                };
                if &body[len..] != b"\r\n" {
                    return Err(RespError::Protocol("bulk string not followed by CRLF".into()));
                }
                *pos += len + 2;
                Frame::Bulk(body[..len].to_vec())
            }
        },
        b'*' | b'~' | b'>' | b'%' => {
            let n = number(line)?;
            if n == -1 {
                return Ok(Some(Frame::Null));
            }
            let n = usize::try_from(n).map_err(|_| RespError::Protocol(format!("aggregate length {n}")))?;
            // A peer's length is not trusted for an allocation up front; the elements arrive anyway.
            let mut items = Vec::with_capacity(n.min(1024));
            let elements = if kind == b'%' { 2 * n } else { n };
            for _ in 0..elements {
                match parse_at(buf, pos)? {
                    Some(f) => items.push(f),
                    None => return Ok(None),
                }
            }
            match kind {
                b'>' => Frame::Push(items),
                b'%' => {
                    let mut pairs = Vec::with_capacity(n.min(1024));
                    let mut it = items.into_iter();
                    while let (Some(k), Some(v)) = (it.next(), it.next()) {
                        pairs.push((k, v));
                    }
                    Frame::Map(pairs)
                }
                _ => Frame::Array(items),
            }
        }
        other => {
            return Err(RespError::Protocol(format!(
                "unsupported frame type {:?}",
                other as char
            )))
        }
    };
    Ok(Some(frame))
}

/// The bytes up to the next CRLF, moving `pos` past it; `None` when no CRLF has arrived yet.
fn line<'a>(buf: &'a [u8], pos: &mut usize) -> Option<&'a [u8]> {
    let start = *pos;
    let end = start + buf.get(start..)?.windows(2).position(|w| w == b"\r\n")?;
    *pos = end + 2;
    Some(&buf[start..end])
}

fn number(line: &[u8]) -> Result<i64, RespError> {
    std::str::from_utf8(line)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| RespError::Protocol(format!("not a number: {:?}", String::from_utf8_lossy(line))))
}

/// The keys of an `invalidate` push (empty for a flush-everything push, whose key list is null);
/// `None` for replies and other pushes.
fn invalidated_keys(frame: Frame) -> Option<Vec<Vec<u8>>> {
    let Frame::Push(items) = frame else {
        return None;
    };
    let mut items = items.into_iter();
    match items.next()? {
        Frame::Bulk(kind) if kind == b"invalidate" => {}
        Frame::Simple(kind) if kind == "invalidate" => {}
        _ => return None,
    }
    Some(match items.next() {
        Some(Frame::Array(keys)) => keys
            .into_iter()
            .filter_map(|k| match k {
                Frame::Bulk(k) => Some(k),
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    })
}

/// Reads whole frames from the read half of a connection.
struct FrameReader {
    half: OwnedReadHalf,
    buf: BytesMut,
}

impl FrameReader {
    /// The next frame, waiting at most [`IDLE`] for more bytes.
    async fn next(&mut self) -> Result<Frame, RespError> {
        loop {
            if let Some((frame, used)) = parse(&self.buf)? {
                self.buf.advance(used);
                return Ok(frame);
            }
            self.buf.reserve(64 * 1024);
            let read = tokio::time::timeout(IDLE, self.half.read_buf(&mut self.buf))
                .await
                .map_err(|_| RespError::Timeout("a frame from redis-server"))??;
            if read == 0 {
                return Err(RespError::Closed);
            }
        }
    }

    /// Reads `n` `+OK` replies; an error reply ends it with that error.
    async fn drain_ok(mut self, n: usize) -> Result<(), RespError> {
        for _ in 0..n {
            match self.next().await? {
                Frame::Simple(_) => {}
                Frame::Error(e) => return Err(RespError::Server(e)),
                other => return Err(RespError::Protocol(format!("unexpected reply {other:?}"))),
            }
        }
        Ok(())
    }
}

/// One connection to the bench's Redis, used request-reply until it is split.
struct Connection {
    reader: FrameReader,
    writer: OwnedWriteHalf,
    /// Pushes that arrived while waiting for a reply, in order.
    pushes: VecDeque<Frame>,
}

impl Connection {
    async fn open(port: u16) -> Result<Connection, RespError> {
        let stream = TcpStream::connect(("127.0.0.1", port)).await?;
        // Each SET is one small write; Nagle would hold it back until the previous one is acked.
        stream.set_nodelay(true)?;
        let (read, writer) = stream.into_split();
        Ok(Connection {
            reader: FrameReader {
                half: read,
                buf: BytesMut::with_capacity(64 * 1024),
            },
            writer,
            pushes: VecDeque::new(),
        })
    }

    /// A RESP3 connection in broadcasting tracking mode for keys under [`PREFIX`].
    ///
    /// The whole connection is kept, write half included: dropping the write half would send a FIN,
    /// and Redis closes a connection whose client has shut down its side.
    async fn tracking_reader(port: u16) -> Result<Connection, RespError> {
        let mut c = Connection::open(port).await?;
        match c.call(&[b"HELLO", b"3"]).await? {
            Frame::Map(_) => {}
            other => return Err(RespError::Protocol(format!("HELLO 3 answered {other:?}"))),
        }
        let reply = c
            .call(&[b"CLIENT", b"TRACKING", b"on", b"BCAST", b"PREFIX", PREFIX.as_bytes()])
            .await?;
        if reply != Frame::Simple("OK".into()) {
            return Err(RespError::Protocol(format!("CLIENT TRACKING answered {reply:?}")));
        }
        Ok(c)
    }

    /// The keys of the next `invalidate` push, after any that arrived while waiting for a reply.
    async fn next_invalidation(&mut self) -> Result<Vec<Vec<u8>>, RespError> {
        loop {
            let frame = match self.pushes.pop_front() {
                Some(push) => push,
                None => self.reader.next().await?,
            };
            if let Some(keys) = invalidated_keys(frame) {
                return Ok(keys);
            }
        }
    }

    /// Sends one command and returns its reply, keeping pushes that arrive meanwhile.
    async fn call(&mut self, args: &[&[u8]]) -> Result<Frame, RespError> {
        let mut cmd = Vec::new();
        encode(&mut cmd, args);
        self.writer.write_all(&cmd).await?;
        loop {
            match self.reader.next().await? {
                Frame::Error(e) => return Err(RespError::Server(e)),
                push @ Frame::Push(_) => self.pushes.push_back(push),
                reply => return Ok(reply),
            }
        }
    }

    /// Splits into a write half for pipelined commands and a reader of their replies.
    fn into_writer(self) -> (OwnedWriteHalf, FrameReader) {
        (self.writer, self.reader)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_an_invalidation_push_split_anywhere() {
        let wire = b">2\r\n$10\r\ninvalidate\r\n*2\r\n$2\r\nk7\r\n$3\r\nk42\r\n";
        for cut in 0..wire.len() {
            assert!(parse(&wire[..cut]).unwrap().is_none(), "incomplete at {cut}");
        }
        let (frame, used) = parse(wire).unwrap().unwrap();
        assert_eq!(used, wire.len());
        let want = Frame::Push(vec![
            Frame::Bulk(b"invalidate".to_vec()),
            Frame::Array(vec![Frame::Bulk(b"k7".to_vec()), Frame::Bulk(b"k42".to_vec())]),
        ]);
        assert_eq!(frame, want);
    }

    #[test]
    fn parses_hello_map_null_and_errors() {
        let (f, _) = parse(b"%2\r\n$5\r\nproto\r\n:3\r\n$4\r\nmode\r\n_\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(
            f,
            Frame::Map(vec![
                (Frame::Bulk(b"proto".to_vec()), Frame::Integer(3)),
                (Frame::Bulk(b"mode".to_vec()), Frame::Null),
            ])
        );
        assert_eq!(parse(b"$-1\r\n").unwrap().unwrap().0, Frame::Null);
        assert_eq!(parse(b"-ERR no\r\n").unwrap().unwrap().0, Frame::Error("ERR no".into()));
        assert!(parse(b"!3\r\nbad\r\n").is_err());
        assert!(parse(b"$3\r\nabcXY").is_err());
    }

    /// Both measurements against a real `redis-server`, small; skipped where none is installed.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn measures_a_real_redis_server() {
        let Some(bin) = redis_server_bin() else {
            eprintln!("no redis-server: skipped");
            return;
        };
        let server = RedisServer::start(&bin).await.unwrap();
        let h = latency(server.port, 2_000, 1).await.unwrap();
        assert_eq!(h.len(), 2_000, "every SET reached all {READERS} readers");
        assert!(h.value_at_quantile(0.5) > 0);
        let rate = flood(server.port, 20_000).await.unwrap();
        assert!(rate.is_finite() && rate > 0.0, "{rate}");
    }

    #[test]
    fn encodes_commands_as_bulk_arrays() {
        let mut out = Vec::new();
        encode(&mut out, &[b"SET", b"k1", b"1"]);
        assert_eq!(out, b"*3\r\n$3\r\nSET\r\n$2\r\nk1\r\n$1\r\n1\r\n");
        assert_eq!(key_index(b"k123".to_vec()), Some(123));
        assert_eq!(key_index(b"x123".to_vec()), None);
    }
}
