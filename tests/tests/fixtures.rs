//! Self-tests of the fixtures the other suites rely on: the TCP proxy's modes, a server's kill and restart on the same port and store, a routed 3-server cluster, and `eventually`.

use std::time::{Duration, Instant};

use futures::StreamExt;
use invalbus_tests::{eventually, init_tracing, NatsCluster, NatsServer, ProxyMode, TcpProxy, DEADLINE};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A TCP echo server on a free port.
async fn echo_server() -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    addr
}

async fn round_trip(s: &mut TcpStream, msg: &[u8]) -> Vec<u8> {
    s.write_all(msg).await.unwrap();
    let mut buf = vec![0u8; msg.len()];
    tokio::time::timeout(DEADLINE, s.read_exact(&mut buf))
        .await
        .expect("echo within the deadline")
        .unwrap();
    buf
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_passes_delays_black_holes_and_resets() {
    init_tracing();
    let proxy = TcpProxy::start(echo_server().await).await;

    // Pass.
    let mut s = TcpStream::connect(proxy.addr()).await.unwrap();
    assert_eq!(round_trip(&mut s, b"ping").await, b"ping");
    assert_eq!(proxy.connections(), 1);

    // Delay: each direction waits at least the delay.
    proxy.set_mode(ProxyMode::Delay(Duration::from_millis(300)));
    let started = Instant::now();
    assert_eq!(round_trip(&mut s, b"slow").await, b"slow");
    assert!(
        started.elapsed() >= Duration::from_millis(600),
        "delay not applied: {:?}",
        started.elapsed()
    );

    // Black hole: the connection stays open, nothing comes through, even on a new connection;
    // the held bytes flow once the mode returns to pass.
    proxy.set_mode(ProxyMode::BlackHole);
    s.write_all(b"held").await.unwrap();
    let mut buf = [0u8; 4];
    assert!(
        tokio::time::timeout(Duration::from_millis(500), s.read_exact(&mut buf))
            .await
            .is_err(),
        "bytes crossed a black hole"
    );
    let mut late = TcpStream::connect(proxy.addr())
        .await
        .expect("a black hole still accepts connections");
    late.write_all(b"late").await.unwrap();
    proxy.set_mode(ProxyMode::Pass);
    tokio::time::timeout(DEADLINE, s.read_exact(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&buf, b"held");
    tokio::time::timeout(DEADLINE, late.read_exact(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&buf, b"late");

    // Reset: live connections are closed, new ones refused, until the mode changes.
    proxy.set_mode(ProxyMode::Reset);
    let closed = tokio::time::timeout(DEADLINE, s.read(&mut buf))
        .await
        .expect("a reset connection stays open");
    assert!(matches!(closed, Ok(0) | Err(_)), "read after reset: {closed:?}");
    assert!(eventually(DEADLINE, || async { proxy.connections() == 0 }).await);
    assert!(
        eventually(DEADLINE, || async { TcpStream::connect(proxy.addr()).await.is_err() }).await,
        "connections still accepted during a reset"
    );
    proxy.set_mode(ProxyMode::Pass);
    let until = Instant::now() + DEADLINE;
    let again = loop {
        match TcpStream::connect(proxy.addr()).await {
            Ok(c) => break Some(c),
            Err(_) if Instant::now() < until => tokio::time::sleep(Duration::from_millis(10)).await,
            Err(_) => break None,
        }
    };
    let mut again = again.expect("the proxy does not accept again after a reset");
    assert_eq!(round_trip(&mut again, b"back").await, b"back");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_works_through_the_proxy() {
    init_tracing();
    let server = NatsServer::start().await;
    let proxy = TcpProxy::start(server.addr()).await;
    let client = async_nats::connect(proxy.url()).await.unwrap();
    let mut sub = client.subscribe("t").await.unwrap();
    client.publish("t", "hello".into()).await.unwrap();
    let msg = tokio::time::timeout(DEADLINE, sub.next()).await.unwrap().unwrap();
    assert_eq!(&msg.payload[..], b"hello");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_restarts_on_its_port_with_its_jetstream_store_and_dies_on_drop() {
    use async_nats::jetstream::{self, stream};
    init_tracing();
    let mut server = NatsServer::start_jetstream().await;
    let url = server.url();
    let js = jetstream::new(async_nats::connect(&url).await.unwrap());
    js.create_stream(stream::Config {
        name: "T".into(),
        subjects: vec!["t.>".into()],
        storage: stream::StorageType::File,
        ..Default::default()
    })
    .await
    .unwrap();
    js.publish("t.1", "kept".into()).await.unwrap().await.unwrap();

    server.kill();
    assert!(!server.is_running());
    assert!(
        TcpStream::connect(server.addr()).await.is_err(),
        "a killed server still accepts"
    );
    server.restart().await;
    assert_eq!(server.url(), url, "restart moved the port");
    let js = jetstream::new(async_nats::connect(&url).await.unwrap());
    let ok = eventually(DEADLINE, || async {
        match js.get_stream("T").await {
            Ok(mut s) => s.info().await.is_ok_and(|i| i.state.messages == 1),
            Err(_) => false,
        }
    })
    .await;
    assert!(ok, "the stream or its message did not survive kill -9 and restart");

    let addr = server.addr();
    drop(server);
    assert!(
        TcpStream::connect(addr).await.is_err(),
        "a dropped server still accepts"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_of_three_routes_messages_and_recovers_a_killed_member() {
    init_tracing();
    let mut cluster = NatsCluster::start(3).await;
    assert_eq!(cluster.servers().len(), 3);
    let routed = |cluster: &NatsCluster| {
        let (a, b) = (cluster.servers()[0].url(), cluster.servers()[2].url());
        async move {
            let sub_client = async_nats::connect(b).await.unwrap();
            let mut sub = sub_client.subscribe("routed").await.unwrap();
            sub_client.flush().await.unwrap();
            let pub_client = async_nats::connect(a).await.unwrap();
            // Interest crosses the route a moment after the subscription: publish until it arrives.
            let until = Instant::now() + DEADLINE;
            loop {
                pub_client.publish("routed", "x".into()).await.unwrap();
                pub_client.flush().await.unwrap();
                if tokio::time::timeout(Duration::from_millis(200), sub.next())
                    .await
                    .is_ok()
                {
                    return true;
                }
                if Instant::now() >= until {
                    return false;
                }
            }
        }
    };
    assert!(
        routed(&cluster).await,
        "a message did not cross the route from n0 to n2"
    );

    cluster.server_mut(0).kill();
    cluster.server_mut(0).restart().await;
    cluster.wait_ready().await;
    assert!(routed(&cluster).await, "routes did not come back after n0 restarted");
    assert_eq!(cluster.urls().split(',').count(), 3);
}

#[tokio::test]
async fn eventually_gives_up_after_its_deadline() {
    let started = Instant::now();
    assert!(!eventually(Duration::from_millis(100), || async { false }).await);
    assert!(started.elapsed() >= Duration::from_millis(100));
    assert!(eventually(Duration::from_millis(100), || async { true }).await);
}
