//! [`TcpProxy`]: a TCP proxy between a client and a server (or between two cluster members)
//! whose mode the test switches while connections are live.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

/// What a [`TcpProxy`] does with its connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyMode {
    /// Forward bytes both ways as they come.
    Pass,
    /// Keep every connection open (and accept new ones) but forward nothing: a silent
    /// partition. Bytes already read are held, and flow if the mode returns to `Pass`.
    BlackHole,
    /// Close every connection with a TCP reset and refuse new ones (the listener is closed
    /// and bound again on the same port when the mode changes).
    Reset,
    /// Forward every chunk this long after it was read, in order.
    Delay(Duration),
}

/// A TCP proxy on a free loopback port that forwards to a target, in a [`ProxyMode`] the test
/// changes at any time. Stops (and closes its connections) on drop.
///
/// Every connection it closes is closed with a reset rather than a FIN; NATS clients treat both
/// as a lost connection.
///
/// ```no_run
/// # #[tokio::main] async fn main() {
/// let server = invalbus_tests::NatsServer::start().await;
/// let proxy = invalbus_tests::TcpProxy::start(server.addr()).await;
/// let client = async_nats::connect(proxy.url()).await.unwrap();
/// proxy.set_mode(invalbus_tests::ProxyMode::BlackHole);
/// # drop(client);
/// # }
/// ```
#[derive(Debug)]
pub struct TcpProxy {
    port: u16,
    mode: watch::Sender<ProxyMode>,
    live: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl TcpProxy {
    /// Starts a proxy to `target` in [`ProxyMode::Pass`].
    pub async fn start(target: SocketAddr) -> TcpProxy {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the proxy to 127.0.0.1:0");
        let port = listener.local_addr().expect("proxy's local address").port();
        let (mode, mode_rx) = watch::channel(ProxyMode::Pass);
        let live = Arc::new(AtomicUsize::new(0));
        let task = tokio::spawn(accept_loop(listener, port, target, mode_rx, live.clone()));
        TcpProxy { port, mode, live, task }
    }

    /// The port clients connect to.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The address clients connect to.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// `nats://127.0.0.1:<port>`, for a NATS client going through the proxy.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Switches the mode; live connections follow at once.
    pub fn set_mode(&self, mode: ProxyMode) {
        self.mode.send_replace(mode);
    }

    /// The current mode.
    pub fn mode(&self) -> ProxyMode {
        *self.mode.borrow()
    }

    /// Connections currently open through the proxy.
    pub fn connections(&self) -> usize {
        self.live.load(Ordering::SeqCst)
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        // Resetting first makes every connection task close its sockets and end.
        self.mode.send_replace(ProxyMode::Reset);
        self.task.abort();
    }
}

async fn accept_loop(
    listener: TcpListener,
    port: u16,
    target: SocketAddr,
    mut mode: watch::Receiver<ProxyMode>,
    live: Arc<AtomicUsize>,
) {
    let mut listener = Some(listener);
    loop {
        if *mode.borrow_and_update() == ProxyMode::Reset {
            // Refuse new connections for real: no listener, so the kernel answers with RST.
            listener = None;
            if mode.wait_for(|m| *m != ProxyMode::Reset).await.is_err() {
                return;
            }
            continue;
        }
        let Some(l) = listener.as_ref() else {
            match rebind(port).await {
                Some(l) => listener = Some(l),
                None => return,
            }
            continue;
        };
        tokio::select! {
            accepted = l.accept() => {
                if let Ok((client, _)) = accepted {
                    tokio::spawn(connection(client, target, mode.clone(), live.clone()));
                }
            }
            changed = mode.changed() => if changed.is_err() { return },
        }
    }
}

/// Binds the proxy's port again after a reset (retrying briefly if the old socket lingers).
async fn rebind(port: u16) -> Option<TcpListener> {
    for _ in 0..200 {
        let socket = TcpSocket::new_v4().ok()?;
        let _ = socket.set_reuseaddr(true);
        if socket.bind(SocketAddr::from(([127, 0, 0, 1], port))).is_ok() {
            if let Ok(l) = socket.listen(128) {
                return Some(l);
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tracing::error!(port, "proxy could not bind its port again after a reset");
    None
}

/// One proxied connection: two directions, each a reader and a writer joined by a queue of
/// `(due time, chunk)`, so a delay postpones chunks without reordering them.
async fn connection(
    client: TcpStream,
    target: SocketAddr,
    mut mode: watch::Receiver<ProxyMode>,
    live: Arc<AtomicUsize>,
) {
    let Ok(server) = TcpStream::connect(target).await else {
        return;
    };
    // Zero linger: closing sends a reset, so a `Reset` is seen at once by both ends.
    let _ = client.set_zero_linger();
    let _ = server.set_zero_linger();
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    live.fetch_add(1, Ordering::SeqCst);
    let (cr, cw) = client.into_split();
    let (sr, sw) = server.into_split();
    let up = pump(cr, sw, mode.clone());
    let down = pump(sr, cw, mode.clone());
    tokio::select! {
        _ = up => {}
        _ = down => {}
        _ = until_reset(&mut mode) => {}
    }
    live.fetch_sub(1, Ordering::SeqCst);
}

/// Returns when the mode becomes [`ProxyMode::Reset`] or the proxy is gone.
async fn until_reset(mode: &mut watch::Receiver<ProxyMode>) {
    let _reset = mode.wait_for(|m| *m == ProxyMode::Reset).await.is_ok();
}

async fn pump(mut from: OwnedReadHalf, mut to: OwnedWriteHalf, mode: watch::Receiver<ProxyMode>) {
    let (tx, mut rx) = mpsc::channel::<(tokio::time::Instant, Bytes)>(64);
    let mut read_mode = mode.clone();
    let reader = async move {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let n = match from.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            // Hold the chunk (and stop reading) while black-holed.
            let delay = match read_mode.wait_for(|m| *m != ProxyMode::BlackHole).await {
                Ok(m) => match *m {
                    ProxyMode::Delay(d) => d,
                    _ => Duration::ZERO,
                },
                Err(_) => return,
            };
            if tx
                .send((tokio::time::Instant::now() + delay, Bytes::copy_from_slice(&buf[..n])))
                .await
                .is_err()
            {
                return;
            }
        }
    };
    let mut write_mode = mode;
    let writer = async move {
        while let Some((due, chunk)) = rx.recv().await {
            tokio::time::sleep_until(due).await;
            let open = write_mode.wait_for(|m| *m != ProxyMode::BlackHole).await.is_ok();
            if !open {
                return;
            }
            if to.write_all(&chunk).await.is_err() {
                return;
            }
        }
    };
    // The direction ends when its reader has ended and its writer has sent what was read, or
    // when either fails.
    tokio::join!(reader, writer);
}
