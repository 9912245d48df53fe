//! The node's configuration: a TOML file, overridden by environment variables, overridden by
//! flags (clap resolves flag over env; both override the file).

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// Flags of `invalbus-node serve`. Each also reads an environment variable.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct ServeArgs {
    /// TOML configuration file (see the README for a complete example).
    #[arg(long, env = "INVALBUS_CONFIG")]
    pub config: Option<PathBuf>,
    /// NATS server URL(s), comma-separated.
    #[arg(long, env = "INVALBUS_NATS")]
    pub nats: Option<String>,
    /// Namespace: nodes see only invalidations of their own namespace.
    #[arg(long, env = "INVALBUS_NAMESPACE")]
    pub namespace: Option<String>,
    /// This node's id, unique in the namespace (default: random).
    #[arg(long, env = "INVALBUS_NODE_ID")]
    pub node_id: Option<String>,
    /// gRPC listen address (admin API, sidecar cache, health, reflection): `host:port`, or
    /// `unix:/path/to.sock` for a Unix domain socket.
    #[arg(long, env = "INVALBUS_LISTEN")]
    pub listen: Option<String>,
    /// The read socket (`unix:/path`): the sidecar's reads in a minimal binary protocol, for
    /// clients whose gRPC costs more than the read (off unless set).
    #[arg(long, env = "INVALBUS_READ_LISTEN")]
    pub read_listen: Option<String>,
    /// Address announced to peers in heartbeats (default: the listen address).
    #[arg(long, env = "INVALBUS_ADVERTISE")]
    pub advertise: Option<String>,
    /// Prometheus `/metrics` listen address (off unless set).
    #[arg(long, env = "INVALBUS_METRICS_LISTEN")]
    pub metrics_listen: Option<String>,
    /// Serve admin and sidecar calls without tokens. Local development only.
    #[arg(long, env = "INVALBUS_INSECURE")]
    pub insecure: bool,
    /// Run on core NATS only: no stream, so no replay and no audit log.
    #[arg(long, env = "INVALBUS_NO_JETSTREAM")]
    pub no_jetstream: bool,
    /// This node's signing key: an nkey seed file, made if missing ([identity] key_file).
    #[arg(long, env = "INVALBUS_KEY_FILE")]
    pub key_file: Option<PathBuf>,
    /// Start even if another live process uses this node id.
    #[arg(long, env = "INVALBUS_TAKE_OVER")]
    pub take_over: bool,
    /// Extra cache, as `name` or `name=max_entries` (repeatable).
    #[arg(long = "cache", value_name = "NAME[=MAX_ENTRIES]")]
    pub caches: Vec<String>,
}

/// The trust policy of a `[trust]` section.
fn trust_policy(t: &TrustSection) -> Result<invalbus::TrustPolicy, ConfigError> {
    match t.mode.as_deref().unwrap_or("pinned") {
        "pinned" => {
            if !t.keys.is_empty() {
                return Err(ConfigError(
                    "[trust] lists keys but mode is \"pinned\" (any key): set mode = \"keys\"".into(),
                ));
            }
            Ok(invalbus::TrustPolicy::PinOnFirstUse)
        }
        "keys" => {
            if t.keys.is_empty() {
                return Err(ConfigError("[trust] mode = \"keys\" needs [[trust.keys]]".into()));
            }
            let mut keys = Vec::new();
            for k in &t.keys {
                if !k.key.starts_with('U') || invalbus::Identity::check_public_key(&k.key).is_err() {
                    return Err(ConfigError(format!(
                        "[[trust.keys]] key {:?}: not a public user nkey (U..., 56 characters)",
                        k.key
                    )));
                }
                let mut scopes = invalbus::Scopes::ALL;
                if let Some(list) = &k.scopes {
                    scopes = invalbus::Scopes {
                        keys: false,
                        purge: false,
                        receipts: false,
                    };
                    for s in list {
                        match s.as_str() {
                            "keys" => scopes.keys = true,
                            "purge" => scopes.purge = true,
                            "receipts" => scopes.receipts = true,
                            other => {
                                return Err(ConfigError(format!(
                                    "[[trust.keys]] {}: unknown scope {other:?} (keys, purge, receipts)",
                                    k.key
                                )))
                            }
                        }
                    }
                }
                keys.push(invalbus::TrustedKey {
                    key: k.key.clone(),
                    scopes,
                    origins: k.origins.clone(),
                });
            }
            Ok(invalbus::TrustPolicy::Keys(keys))
        }
        other => Err(ConfigError(format!(
            "[trust] mode {other:?}: use \"pinned\" or \"keys\""
        ))),
    }
}

/// Errors in the configuration. The message says what to fix.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

/// A role a token grants.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// ListNodes, Stats, QueryAudit, WatchAudit.
    Read,
    /// Purge.
    Purge,
    /// The sidecar cache service.
    Cache,
}

impl Role {
    /// The role's name as in the configuration file.
    pub fn name(self) -> &'static str {
        match self {
            Role::Read => "read",
            Role::Purge => "purge",
            Role::Cache => "cache",
        }
    }
}

/// One API token.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenConfig {
    /// Who holds it: recorded as the actor of its purges.
    pub name: String,
    /// The secret, sent as `authorization: Bearer <token>`.
    pub token: String,
    /// What it may do.
    pub roles: Vec<Role>,
}

/// One cache this node holds (and serves through the sidecar).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CacheEntryConfig {
    pub name: String,
    #[serde(default = "default_capacity")]
    pub max_entries: u64,
    #[serde(default = "default_ttl")]
    pub ttl_secs: u64,
}

fn default_capacity() -> u64 {
    100_000
}
fn default_ttl() -> u64 {
    300
}

/// How to reach NATS.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NatsConfig {
    pub url: Option<String>,
    pub user: Option<String>,
    pub password: Option<String>,
    pub token: Option<String>,
    /// NKey seed file.
    pub nkey_file: Option<PathBuf>,
    /// Credentials file (JWT + NKey seed).
    pub credentials_file: Option<PathBuf>,
    /// CA certificate(s) to verify the server.
    pub tls_ca_file: Option<PathBuf>,
    /// Client certificate and key for mutual TLS.
    pub tls_cert_file: Option<PathBuf>,
    pub tls_key_file: Option<PathBuf>,
    /// Require TLS even if the server does not ask for it.
    #[serde(default)]
    pub require_tls: bool,
}

/// The streams that hold batches (replay and audit) and receipts.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JetStreamSection {
    #[serde(default = "yes")]
    pub enabled: bool,
    /// How long batches and receipts are kept.
    #[serde(default = "default_max_age")]
    pub max_age_secs: u64,
    /// Most bytes kept by each stream.
    #[serde(default = "default_max_bytes")]
    pub max_bytes: i64,
    /// Copies in a NATS cluster.
    #[serde(default = "one")]
    pub replicas: usize,
}

impl Default for JetStreamSection {
    fn default() -> Self {
        JetStreamSection {
            enabled: true,
            max_age_secs: default_max_age(),
            max_bytes: default_max_bytes(),
            replicas: 1,
        }
    }
}

fn yes() -> bool {
    true
}
fn one() -> usize {
    1
}
fn default_max_age() -> u64 {
    invalbus::DEFAULT_MAX_AGE.as_secs()
}
fn default_max_bytes() -> i64 {
    1 << 30
}

/// TLS for the gRPC port.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSection {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
}

/// The file, as written.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub node_id: Option<String>,
    pub namespace: Option<String>,
    pub listen: Option<String>,
    pub read_listen: Option<String>,
    pub advertise: Option<String>,
    pub metrics_listen: Option<String>,
    #[serde(default)]
    pub insecure: bool,
    #[serde(default)]
    pub nats: NatsConfig,
    #[serde(default)]
    pub jetstream: JetStreamSection,
    pub tls: Option<TlsSection>,
    #[serde(default)]
    pub tokens: Vec<TokenConfig>,
    #[serde(default)]
    pub caches: Vec<CacheEntryConfig>,
    /// Most targets in one purge (default 256).
    pub max_purge_targets: Option<usize>,
    /// How long the caches keep serving past a heartbeat interval without fresh evidence
    /// (default 1000; the staleness bound is the heartbeat interval plus this).
    pub max_staleness_ms: Option<u64>,
    #[serde(default)]
    pub identity: IdentitySection,
    #[serde(default)]
    pub trust: TrustSection,
}

/// This node's signing key.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdentitySection {
    /// An nkey seed file (`SU...`); made (mode 0600) if it does not exist. Without it the node
    /// makes a new key at each start, which a `keys` trust policy cannot list.
    pub key_file: Option<PathBuf>,
}

/// Which signers the namespace accepts (every node of a namespace should have the same).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrustSection {
    /// `pinned` (default, for development: any key, each origin pinned to the first key heard
    /// for it) or `keys` (only the keys listed).
    pub mode: Option<String>,
    #[serde(default)]
    pub keys: Vec<TrustedKeyConfig>,
}

/// One trusted key.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrustedKeyConfig {
    /// Its public nkey (`U...`, as `invalbus-node key` prints it).
    pub key: String,
    /// What it may do: `keys` (invalidate keys), `purge` (tags, prefixes, everything),
    /// `receipts` (write receipts). Default: all three.
    pub scopes: Option<Vec<String>>,
    /// The node ids it may publish as (default: any, each pinned to it on first use).
    #[serde(default)]
    pub origins: Vec<String>,
}

/// The resolved configuration a node runs with.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub node_id: Option<String>,
    pub namespace: String,
    pub listen: String,
    /// The read socket's path (`read_listen = "unix:/path"`).
    pub read_listen: Option<std::path::PathBuf>,
    pub advertise: Option<String>,
    pub metrics_listen: Option<String>,
    pub insecure: bool,
    pub nats: NatsConfig,
    pub jetstream: JetStreamSection,
    pub tls: Option<TlsSection>,
    pub tokens: Vec<TokenConfig>,
    pub caches: Vec<CacheEntryConfig>,
    pub max_purge_targets: usize,
    /// Heartbeat interval of the bus.
    pub heartbeat_interval: Duration,
    /// Serving without fresh evidence past a heartbeat interval.
    pub max_staleness: Duration,
    /// The signing key's file, if any.
    pub key_file: Option<PathBuf>,
    /// The namespace's trust policy.
    pub trust: invalbus::TrustPolicy,
    /// Start even if another live process has this node id.
    pub take_over: bool,
}

impl Default for NodeConfig {
    fn default() -> Self {
        NodeConfig::resolve(FileConfig::default(), &ServeArgs::default()).expect("defaults are valid")
    }
}

impl NodeConfig {
    /// Reads the file named by `args.config` (if any) and applies the flags over it.
    pub fn load(args: &ServeArgs) -> Result<NodeConfig, ConfigError> {
        let file = match &args.config {
            Some(path) => read_file(path)?,
            None => FileConfig::default(),
        };
        NodeConfig::resolve(file, args)
    }

    /// Applies `args` (flags and environment) over `file`.
    pub fn resolve(file: FileConfig, args: &ServeArgs) -> Result<NodeConfig, ConfigError> {
        let mut nats = file.nats;
        if let Some(url) = &args.nats {
            nats.url = Some(url.clone());
        }
        let mut jetstream = file.jetstream;
        if args.no_jetstream {
            jetstream.enabled = false;
        }
        let mut caches = file.caches;
        for spec in &args.caches {
            let (name, cap) = match spec.split_once('=') {
                Some((n, c)) => (
                    n,
                    c.parse::<u64>()
                        .map_err(|_| ConfigError(format!("--cache {spec}: MAX_ENTRIES must be a number")))?,
                ),
                None => (spec.as_str(), default_capacity()),
            };
            caches.retain(|c| c.name != name);
            caches.push(CacheEntryConfig {
                name: name.to_owned(),
                max_entries: cap,
                ttl_secs: default_ttl(),
            });
        }
        if caches.is_empty() {
            caches.push(CacheEntryConfig {
                name: "default".into(),
                max_entries: default_capacity(),
                ttl_secs: default_ttl(),
            });
        }
        let insecure = args.insecure || file.insecure;
        if insecure && !file.tokens.is_empty() {
            return Err(ConfigError(
                "insecure means \"no tokens, local development\": this configuration has [[tokens]], so a call \
                 without a token would get every role. Remove insecure (or the tokens)"
                    .into(),
            ));
        }
        let trust = trust_policy(&file.trust)?;
        for t in &file.tokens {
            if t.token.len() < 16 {
                return Err(ConfigError(format!(
                    "token {:?}: use at least 16 characters (e.g. `openssl rand -hex 24`)",
                    t.name
                )));
            }
            if t.roles.is_empty() {
                return Err(ConfigError(format!(
                    "token {:?}: give it roles (read, purge, cache)",
                    t.name
                )));
            }
        }
        let config = NodeConfig {
            node_id: args.node_id.clone().or(file.node_id),
            namespace: args
                .namespace
                .clone()
                .or(file.namespace)
                .unwrap_or_else(|| "default".into()),
            listen: args
                .listen
                .clone()
                .or(file.listen)
                .unwrap_or_else(|| "127.0.0.1:7700".into()),
            read_listen: match args.read_listen.clone().or(file.read_listen) {
                None => None,
                Some(l) => match l.strip_prefix("unix:") {
                    Some(path) if !path.is_empty() => Some(PathBuf::from(path)),
                    _ => {
                        return Err(ConfigError(format!(
                            "read_listen {l:?}: the read socket is a Unix socket, as in unix:/run/invalbus-read.sock"
                        )))
                    }
                },
            },
            advertise: args.advertise.clone().or(file.advertise),
            metrics_listen: args.metrics_listen.clone().or(file.metrics_listen),
            insecure,
            nats,
            jetstream,
            tls: file.tls,
            tokens: file.tokens,
            caches,
            max_purge_targets: file.max_purge_targets.unwrap_or(256).max(1),
            heartbeat_interval: Duration::from_secs(1),
            max_staleness: Duration::from_millis(file.max_staleness_ms.unwrap_or(1000).clamp(100, 60_000)),
            key_file: args.key_file.clone().or(file.identity.key_file),
            trust,
            take_over: args.take_over,
        };
        if matches!(config.trust, invalbus::TrustPolicy::Keys(_)) && config.key_file.is_none() {
            // A key made at each start is in nobody's list: every peer would refuse this node.
            return Err(ConfigError(
                "[trust] mode = \"keys\" needs [identity] key_file (or --key-file): a key made at each start cannot be listed".into(),
            ));
        }
        Ok(config)
    }

    /// The NATS URL (default `nats://127.0.0.1:4222`).
    pub fn nats_url(&self) -> String {
        self.nats.url.clone().unwrap_or_else(|| "nats://127.0.0.1:4222".into())
    }

    /// Connection options for NATS from the `[nats]` section (built anew for each connection,
    /// since the options are consumed).
    pub async fn nats_options(&self) -> Result<async_nats::ConnectOptions, ConfigError> {
        let n = &self.nats;
        let mut o = async_nats::ConnectOptions::new();
        if let Some(path) = &n.credentials_file {
            o = async_nats::ConnectOptions::with_credentials_file(path.clone())
                .await
                .map_err(|e| ConfigError(format!("nats.credentials_file {}: {e}", path.display())))?;
        } else if let Some(path) = &n.nkey_file {
            let seed = std::fs::read_to_string(path)
                .map_err(|e| ConfigError(format!("nats.nkey_file {}: {e}", path.display())))?;
            o = async_nats::ConnectOptions::with_nkey(seed.trim().to_owned());
        } else if let (Some(u), Some(p)) = (&n.user, &n.password) {
            o = async_nats::ConnectOptions::with_user_and_password(u.clone(), p.clone());
        } else if let Some(t) = &n.token {
            o = async_nats::ConnectOptions::with_token(t.clone());
        }
        if let Some(ca) = &n.tls_ca_file {
            o = o.add_root_certificates(ca.clone());
        }
        if let (Some(cert), Some(key)) = (&n.tls_cert_file, &n.tls_key_file) {
            o = o.add_client_certificate(cert.clone(), key.clone());
        }
        if n.require_tls {
            o = o.require_tls(true);
        }
        Ok(o)
    }

    /// The stream settings for the bus.
    pub fn jetstream_config(&self) -> invalbus::JetStreamConfig {
        invalbus::JetStreamConfig::default()
            .max_age(Duration::from_secs(self.jetstream.max_age_secs))
            .max_bytes(self.jetstream.max_bytes)
            .replicas(self.jetstream.replicas)
    }
}

fn read_file(path: &Path) -> Result<FileConfig, ConfigError> {
    let text =
        std::fs::read_to_string(path).map_err(|e| ConfigError(format!("cannot read {}: {e}", path.display())))?;
    parse(&text).map_err(|e| ConfigError(format!("{}: {e}", path.display())))
}

/// Parses the text of a configuration file.
pub fn parse(text: &str) -> Result<FileConfig, String> {
    toml::from_str(text).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_win_over_the_file() {
        let file = parse(
            r#"
            node_id = "from-file"
            namespace = "blog"
            listen = "127.0.0.1:1"
            [nats]
            url = "nats://file:4222"
            [[tokens]]
            name = "ops"
            token = "0123456789abcdef0123"
            roles = ["read", "purge"]
            [[caches]]
            name = "articles"
            max_entries = 10
            "#,
        )
        .unwrap();
        let args = ServeArgs {
            node_id: Some("from-flag".into()),
            nats: Some("nats://flag:4222".into()),
            ..Default::default()
        };
        let c = NodeConfig::resolve(file, &args).unwrap();
        assert_eq!(c.node_id.as_deref(), Some("from-flag"));
        assert_eq!(c.nats_url(), "nats://flag:4222");
        assert_eq!(c.namespace, "blog");
        assert_eq!(c.listen, "127.0.0.1:1");
        assert_eq!(c.tokens[0].roles, vec![Role::Read, Role::Purge]);
        assert_eq!(c.caches[0].max_entries, 10);
        assert!(c.jetstream.enabled);
    }

    #[test]
    fn bad_files_say_what_to_fix() {
        assert!(parse("nodeid = 1").unwrap_err().contains("unknown field"));
        let file = parse("[[tokens]]\nname = \"x\"\ntoken = \"short\"\nroles = [\"read\"]").unwrap();
        let e = NodeConfig::resolve(file, &ServeArgs::default()).unwrap_err();
        assert!(e.0.contains("at least 16"), "{e}");
        assert!(parse("[[tokens]]\nname = \"x\"\ntoken = \"0123456789abcdef\"\nroles = [\"root\"]").is_err());
    }

    #[test]
    fn a_key_list_needs_a_key_file_and_insecure_no_tokens() {
        let key = invalbus::Identity::generate().public_key().to_owned();
        let keyed = format!("[trust]\nmode = \"keys\"\n[[trust.keys]]\nkey = \"{key}\"\n");
        let e = NodeConfig::resolve(parse(&keyed).unwrap(), &ServeArgs::default()).unwrap_err();
        assert!(e.0.contains("key_file"), "{e}");
        let args = ServeArgs {
            key_file: Some("/tmp/invalbus-test.nk".into()),
            ..Default::default()
        };
        let c = NodeConfig::resolve(parse(&keyed).unwrap(), &args).unwrap();
        assert!(matches!(c.trust, invalbus::TrustPolicy::Keys(ref k) if k.len() == 1));
        let tokens = "insecure = true\n[[tokens]]\nname = \"x\"\ntoken = \"0123456789abcdef\"\nroles = [\"read\"]";
        let e = NodeConfig::resolve(parse(tokens).unwrap(), &ServeArgs::default()).unwrap_err();
        assert!(e.0.contains("insecure"), "{e}");
    }
}
