//! The node's `[nats]` section against nats-servers that demand credentials: a token, an NKey,
//! a credentials file (operator mode: operator, account and user JWTs) and TLS client
//! certificates. For each, two nodes with the right credentials share invalidations, and a node
//! with wrong credentials fails to start with an error rather than hanging.

use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use bytes::Bytes;
use invalbus::{BuildError, FillOutcome, Loaded};
use invalbus_node::{config, Node, NodeConfig, NodeError, ServeArgs};
use invalbus_tests::{eventually, init_tracing, NatsServer, DEADLINE};
use nkeys::KeyPair;
use serde_json::{json, Value};
use tempfile::TempDir;

/// The cache every node has when its configuration names none.
const CACHE: &str = "default";

/// A node on `url` in namespace `ns` as `node_id`, whose configuration file has the `[nats]`
/// section `nats` (TOML lines), as an operator would write it.
fn node_config(url: &str, ns: &str, node_id: &str, nats: &str) -> NodeConfig {
    let file = config::parse(&format!("[nats]\n{nats}\n")).expect("test config parses");
    let args = ServeArgs {
        nats: Some(url.to_owned()),
        namespace: Some(ns.to_owned()),
        node_id: Some(node_id.to_owned()),
        listen: Some("127.0.0.1:0".into()),
        ..Default::default()
    };
    NodeConfig::resolve(file, &args).expect("test config resolves")
}

/// `key = "path"`, a TOML line naming a file.
fn path_line(key: &str, path: &Path) -> String {
    format!("{key} = {:?}\n", path.display().to_string())
}

async fn start(url: &str, ns: &str, node_id: &str, nats: &str) -> Node {
    Node::start(node_config(url, ns, node_id, nats))
        .await
        .unwrap_or_else(|e| panic!("node {node_id} with [nats] {nats:?}: {e}"))
}

/// Starts nodes `a` and `b` with the `[nats]` section `nats`, fills a key on b, invalidates it
/// through a's bus, and waits until b has applied a's batch and no longer returns the key.
async fn invalidation_crosses(url: &str, ns: &str, nats: &str) {
    let a = start(url, ns, "a", nats).await;
    let b = start(url, ns, "b", nats).await;
    let on_b = b.cache(CACHE).expect("default cache");
    // A fill is refused while b cannot vouch for its cache (a heartbeat that has not come back
    // yet on a busy machine): try until one holds.
    let filled = eventually(DEADLINE, || async {
        let outcome = on_b.reserve("post:1").fill(Loaded::new(Bytes::from("body"))).await;
        outcome == FillOutcome::Filled && on_b.get("post:1").await.is_some()
    })
    .await;
    assert!(filled, "b never held post:1");

    let mut applied = b.bus().subscribe_applied();
    let ticket = a
        .cache(CACHE)
        .expect("default cache")
        .invalidate_key("post:1")
        .await
        .expect("invalidate on a");
    let seq = ticket.published().await.expect("a publishes the batch").seq;
    // b's cache may also drop the key if b stops vouching for it (a lapsed heartbeat), so the
    // proof that the invalidation crossed NATS is b's receipt of a's batch.
    let receipt = tokio::time::timeout(DEADLINE, async {
        loop {
            match applied.recv().await {
                Ok(batch) if batch.origin == "a" && batch.seq == seq => return batch,
                Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                Err(e) => panic!("b's applied stream ended: {e}"),
            }
        }
    })
    .await;
    assert!(receipt.is_ok(), "b never applied a's batch {seq} within {DEADLINE:?}");
    let gone = eventually(DEADLINE, || async { on_b.get("post:1").await.is_none() }).await;
    assert!(gone, "b still returns post:1 after applying its invalidation");
    a.shutdown().await;
    b.shutdown().await;
}

/// Starts a node with `nats`, which the server must refuse, and returns the error's message.
/// Fails the test if the start succeeds or does not return within the deadline.
async fn refused(url: &str, ns: &str, nats: &str) -> NodeError {
    let outcome = tokio::time::timeout(DEADLINE, Node::start(node_config(url, ns, "refused", nats))).await;
    match outcome {
        Err(_) => panic!("Node::start with refused credentials did not return within {DEADLINE:?}"),
        Ok(Ok(node)) => {
            node.shutdown().await;
            panic!("a node started with credentials the server should refuse: [nats] {nats:?}");
        }
        Ok(Err(e)) => {
            println!("refused as expected: {e}");
            e
        }
    }
}

// ---- Token ------------------------------------------------------------------------------------

const TOKEN: &str = "s3cr3t-token-0123456789";

async fn token_server() -> NatsServer {
    NatsServer::start_jetstream_with_config(&format!("authorization {{ token: {TOKEN:?} }}")).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_with_the_token_share_invalidations() {
    init_tracing();
    let server = token_server().await;
    invalidation_crosses(&server.url(), "token", &format!("token = {TOKEN:?}")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_with_a_wrong_token_fails_to_start() {
    init_tracing();
    let server = token_server().await;
    let e = refused(&server.url(), "token", "token = \"not-the-token-0123456789\"").await;
    assert!(matches!(e, NodeError::Bus(BuildError::Refused(_))), "{e:?}");
    assert!(e.to_string().contains("authorization violation"), "{e}");
}

// ---- NKey -------------------------------------------------------------------------------------

/// Writes `key`'s seed into `dir` and returns the `[nats]` line that names the file.
fn nkey_file_line(dir: &Path, key: &KeyPair) -> String {
    let path = dir.join(format!("{}.nk", &key.public_key()[..8]));
    std::fs::write(&path, format!("{}\n", key.seed().expect("user seed"))).expect("write the seed file");
    path_line("nkey_file", &path)
}

async fn nkey_server(user: &KeyPair) -> NatsServer {
    let config = format!("authorization {{ users = [ {{ nkey: {:?} }} ] }}", user.public_key());
    NatsServer::start_jetstream_with_config(&config).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_with_the_nkey_share_invalidations() {
    init_tracing();
    let dir = TempDir::new().expect("temporary directory");
    let user = KeyPair::new_user();
    let server = nkey_server(&user).await;
    invalidation_crosses(&server.url(), "nkey", &nkey_file_line(dir.path(), &user)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_with_an_unknown_nkey_fails_to_start() {
    init_tracing();
    let dir = TempDir::new().expect("temporary directory");
    let server = nkey_server(&KeyPair::new_user()).await;
    let stranger = KeyPair::new_user();
    let e = refused(&server.url(), "nkey", &nkey_file_line(dir.path(), &stranger)).await;
    assert!(matches!(e, NodeError::Bus(BuildError::Refused(_))), "{e:?}");
    assert!(e.to_string().contains("authorization violation"), "{e}");
}

// ---- Credentials file (operator mode) ---------------------------------------------------------

/// A NATS JWT (v2): header, claims and an ed25519 signature by `signer` over
/// `header.claims`, each base64url without padding.
fn encode_jwt(claims: &Value, signer: &KeyPair) -> String {
    let header = URL_SAFE_NO_PAD.encode(json!({ "typ": "JWT", "alg": "ed25519-nkey" }).to_string());
    let body = URL_SAFE_NO_PAD.encode(claims.to_string());
    let signed = format!("{header}.{body}");
    let signature = signer.sign(signed.as_bytes()).expect("sign the JWT");
    format!("{signed}.{}", URL_SAFE_NO_PAD.encode(signature))
}

/// The claims of a JWT that `issuer` issues about `subject`, with the `nats` section `nats`
/// (which names the claim's type).
fn claims(issuer: &KeyPair, subject: &str, name: &str, nats: Value) -> Value {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs();
    json!({
        // A unique id. nats-jwt uses a hash of the claims; the server does not check it.
        "jti": format!("{:032X}", rand::random::<u128>()),
        "iat": now,
        "iss": issuer.public_key(),
        "sub": subject,
        "name": name,
        "nats": nats,
    })
}

/// An operator, a system account and one account for the nodes, as a nats-server in operator
/// mode trusts them.
struct Operator {
    /// The server's configuration: the operator JWT, and both account JWTs preloaded in a memory
    /// resolver.
    server_config: String,
    account: KeyPair,
}

impl Operator {
    /// Makes the operator and the accounts, writing the operator's JWT into `dir`.
    fn new(dir: &Path) -> Operator {
        let operator = KeyPair::new_operator();
        // JetStream in operator mode needs a system account ("system account not setup").
        let system = KeyPair::new_account();
        let operator_jwt = encode_jwt(
            &claims(
                &operator,
                &operator.public_key(),
                "invalbus-test-operator",
                json!({ "system_account": system.public_key(), "type": "operator", "version": 2 }),
            ),
            &operator,
        );
        let system_jwt = encode_jwt(
            &claims(
                &operator,
                &system.public_key(),
                "SYS",
                json!({ "type": "account", "version": 2 }),
            ),
            &operator,
        );
        let account = KeyPair::new_account();
        // No limit on anything (-1), JetStream included: an account whose JetStream limits are
        // 0 has no JetStream, and the node's stream could not be made.
        let limits = json!({
            "subs": -1, "data": -1, "payload": -1,
            "imports": -1, "exports": -1, "wildcards": true, "conn": -1, "leaf": -1,
            "mem_storage": -1, "disk_storage": -1, "streams": -1, "consumer": -1,
        });
        let account_jwt = encode_jwt(
            &claims(
                &operator,
                &account.public_key(),
                "invalbus",
                json!({ "limits": limits, "type": "account", "version": 2 }),
            ),
            &operator,
        );
        let operator_path = dir.join("operator.jwt");
        std::fs::write(&operator_path, &operator_jwt).expect("write the operator JWT");
        let server_config = format!(
            "operator: {:?}\nresolver: MEMORY\nresolver_preload {{\n  {}: {:?}\n  {}: {:?}\n}}\n",
            operator_path.display().to_string(),
            system.public_key(),
            system_jwt,
            account.public_key(),
            account_jwt
        );
        Operator { server_config, account }
    }
}

/// A credentials file for a new user that `account` signs, written into `dir`; returns the
/// `[nats]` line that names it.
fn credentials_line(dir: &Path, account: &KeyPair, name: &str) -> String {
    let user = KeyPair::new_user();
    // No permissions listed: the user may publish and subscribe to anything in its account.
    let nats = json!({
        "pub": {}, "sub": {}, "subs": -1, "data": -1, "payload": -1,
        "type": "user", "version": 2,
    });
    let jwt = encode_jwt(&claims(account, &user.public_key(), name, nats), account);
    let seed = user.seed().expect("user seed");
    let creds = format!(
        "-----BEGIN NATS USER JWT-----\n{jwt}\n------END NATS USER JWT------\n\n\
         ************************* IMPORTANT *************************\n\
         NKEY Seed printed below can be used to sign and prove identity.\n\
         NKEYs are sensitive and should be treated as secrets.\n\n\
         -----BEGIN USER NKEY SEED-----\n{seed}\n------END USER NKEY SEED------\n"
    );
    let path = dir.join(format!("{name}.creds"));
    std::fs::write(&path, creds).expect("write the credentials file");
    path_line("credentials_file", &path)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_with_a_credentials_file_share_invalidations() {
    init_tracing();
    let dir = TempDir::new().expect("temporary directory");
    let operator = Operator::new(dir.path());
    let server = NatsServer::start_jetstream_with_config(&operator.server_config).await;
    let creds = credentials_line(dir.path(), &operator.account, "node");
    invalidation_crosses(&server.url(), "creds", &creds).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_with_credentials_of_an_unknown_account_fails_to_start() {
    init_tracing();
    let dir = TempDir::new().expect("temporary directory");
    let operator = Operator::new(dir.path());
    let server = NatsServer::start_jetstream_with_config(&operator.server_config).await;
    // A well-formed user JWT, signed by an account the server's operator never signed.
    let creds = credentials_line(dir.path(), &KeyPair::new_account(), "stranger");
    let e = refused(&server.url(), "creds", &creds).await;
    assert!(matches!(e, NodeError::Bus(BuildError::Refused(_))), "{e:?}");
    assert!(e.to_string().contains("authorization violation"), "{e}");
}

// ---- TLS with client certificates -------------------------------------------------------------

/// A throwaway CA, a server certificate it signed for `127.0.0.1` and `localhost`, and a client
/// certificate it signed, as PEM files in a temporary directory.
struct Pki {
    dir: TempDir,
}

impl Pki {
    fn new() -> Pki {
        use rcgen::{
            BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
            KeyUsagePurpose,
        };
        let dir = TempDir::new().expect("temporary directory");
        let mut ca = CertificateParams::new(Vec::<String>::new()).expect("CA parameters");
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name.push(DnType::CommonName, "invalbus test CA");
        ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca_key = KeyPair::generate().expect("CA key");
        let ca_pem = ca.self_signed(&ca_key).expect("self-sign the CA").pem();
        std::fs::write(dir.path().join("ca.pem"), ca_pem).expect("write the CA");
        let issuer = Issuer::new(ca, ca_key);
        let leaves = [
            (
                "server",
                vec!["127.0.0.1".to_owned(), "localhost".to_owned()],
                ExtendedKeyUsagePurpose::ServerAuth,
            ),
            ("client", Vec::new(), ExtendedKeyUsagePurpose::ClientAuth),
        ];
        for (name, names, usage) in leaves {
            let mut leaf = CertificateParams::new(names).expect("certificate parameters");
            leaf.distinguished_name
                .push(DnType::CommonName, format!("invalbus {name}"));
            leaf.extended_key_usages = vec![usage];
            leaf.use_authority_key_identifier_extension = true;
            let key = KeyPair::generate().expect("leaf key");
            let cert = leaf.signed_by(&key, &issuer).expect("sign the certificate");
            std::fs::write(dir.path().join(format!("{name}.pem")), cert.pem()).expect("write the certificate");
            std::fs::write(dir.path().join(format!("{name}.key")), key.serialize_pem()).expect("write the key");
        }
        Pki { dir }
    }

    fn path(&self, file: &str) -> std::path::PathBuf {
        self.dir.path().join(file)
    }

    /// A server that speaks only TLS and requires a client certificate signed by the CA.
    async fn server(&self) -> NatsServer {
        let config = format!(
            // A generous handshake timeout: the default (under a second) is short for a busy
            // 2-core machine.
            "tls {{\n  cert_file: {:?}\n  key_file: {:?}\n  ca_file: {:?}\n  verify: true\n  timeout: 10\n}}\n",
            self.path("server.pem").display().to_string(),
            self.path("server.key").display().to_string(),
            self.path("ca.pem").display().to_string(),
        );
        NatsServer::start_jetstream_with_config(&config).await
    }

    /// The `[nats]` lines of a node that trusts the CA, with the client certificate if
    /// `with_client_certificate`.
    fn nats_section(&self, with_client_certificate: bool) -> String {
        let mut lines = path_line("tls_ca_file", &self.path("ca.pem"));
        if with_client_certificate {
            lines += &path_line("tls_cert_file", &self.path("client.pem"));
            lines += &path_line("tls_key_file", &self.path("client.key"));
        }
        lines + "require_tls = true\n"
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_with_a_client_certificate_share_invalidations_over_tls() {
    init_tracing();
    let pki = Pki::new();
    let server = pki.server().await;
    invalidation_crosses(&server.url(), "tls", &pki.nats_section(true)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_without_a_client_certificate_fails_to_start() {
    init_tracing();
    let pki = Pki::new();
    let server = pki.server().await;
    let message = refused(&server.url(), "tls", &pki.nats_section(false))
        .await
        .to_string();
    // The server's TLS alert, as rustls names it (e.g. "received fatal alert: BadCertificate").
    assert!(message.to_lowercase().contains("certificate"), "{message}");
}
