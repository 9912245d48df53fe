//! Who publishes: each bus's Ed25519 key (in the NATS nkey format operators already use), the
//! signed envelope every message travels in, and the namespace's trust policy that receivers
//! check before anything else.
//!
//! # What is signed
//! Every batch, heartbeat and receipt travels as a `Signed` envelope (`wire.proto`): the exact
//! bytes of the encoded message (`body`), the signer's public nkey, and an Ed25519 signature
//! over `"invalbus.v2:" + kind + ":" + SHA-256(body)`, with `kind` one of `batch`, `heartbeat`,
//! `receipt`. The kind in the signed bytes keeps a signature of one kind from passing as
//! another; the body names its namespace and origin, so a signature cannot be replayed into
//! another namespace or for another node. Receipts may also be signed as a set: the signature
//! then covers `"invalbus.v2:receipt-set:"` + SHA-256 of the SHA-256 digests of the set's
//! bodies, and a reader checks that the body's digest is the one at its envelope's index
//! (`Bus::open_receipt`).
//!
//! Why a digest of the body and not the body itself: Ed25519 hashes what it signs with SHA-512,
//! twice to sign and once to check, while SHA-256 runs on the CPU's SHA extensions where it has
//! them (`openssl speed` on the bench machine: 2.3 × SHA-512's speed). Every byte of a batch is
//! hashed once by its signer and once by each receiver, with the faster hash, instead of twice
//! and once. A signature then holds as long as Ed25519 holds and no one can find two bodies
//! with the same SHA-256 digest.
//! Signatures over the previous version's bytes (`"invalbus.v1:" + kind + ":" + body`) are
//! still accepted, so that messages stored before an upgrade (the audit log) stay verified.
//!
//! # Why a forgery changes nothing
//! Receivers open the envelope, check the signature and the policy ([`TrustPolicy`]: is the key
//! trusted, may it speak for this origin, may it make these invalidations) before the message
//! touches sequence tracking, the peer table, the caches or the audit log. A message that fails
//! is counted ([`crate::BusStats::refused_unsigned`], `refused_untrusted`), logged once per origin
//! and interval, and dropped. An origin is bound to one key (by the policy, or pinned on first
//! use), so another key cannot replace its epoch, skip its sequence numbers, or write its
//! receipts. The tests named `forged_*` in `tests/tests/trust.rs` fail without it.
//!
//! What it assumes: private keys stay private (a key file is created mode 0600), and
//! Ed25519 (`ed25519-dalek`) holds.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

use ed25519_dalek::{Signature, Signer as _, SigningKey, Verifier as _, VerifyingKey};
use sha2::{Digest as _, Sha256};

/// The kinds of signed messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// An `InvalidationBatch`.
    Batch,
    /// A `Heartbeat`.
    Heartbeat,
    /// A `Receipt`.
    Receipt,
    /// The SHA-256 digests of several receipts' bodies, signed once for them all (`seal_set`).
    ReceiptSet,
}

impl Kind {
    fn label(self) -> &'static [u8] {
        match self {
            Kind::Batch => b"batch",
            Kind::Heartbeat => b"heartbeat",
            Kind::Receipt => b"receipt",
            Kind::ReceiptSet => b"receipt-set",
        }
    }
}

/// The bytes a signature covers: the domain, the kind, and the SHA-256 digest of the body.
fn signed_bytes(kind: Kind, body: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(64);
    v.extend_from_slice(b"invalbus.v2:");
    v.extend_from_slice(kind.label());
    v.push(b':');
    v.extend_from_slice(&Sha256::digest(body));
    v
}

/// The bytes a signature covered before `invalbus.v2`: the body itself instead of its digest.
/// Still accepted by [`Trust::check_signature`], never made.
fn signed_bytes_v1(kind: Kind, body: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(body.len() + 24);
    v.extend_from_slice(b"invalbus.v1:");
    v.extend_from_slice(kind.label());
    v.push(b':');
    v.extend_from_slice(body);
    v
}

/// Why a key could not be read or made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// The text is not an nkey seed (or public key) of an Ed25519 key.
    #[error("not a valid nkey: {0}")]
    Invalid(String),
    /// The key file could not be read or written.
    #[error("key file {path}: {error}")]
    File {
        /// The file.
        path: String,
        /// What went wrong.
        error: String,
    },
}

/// A bus's signing key: an Ed25519 key pair, written and read as a NATS nkey seed (`SU...`).
///
/// ```
/// let id = invalbus::Identity::generate();
/// assert!(id.public_key().starts_with('U'));
/// let again = invalbus::Identity::from_seed(&id.seed()).unwrap();
/// assert_eq!(again.public_key(), id.public_key());
/// ```
#[derive(Clone)]
pub struct Identity {
    signing: SigningKey,
    public: String,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity").field("public_key", &self.public).finish()
    }
}

impl Identity {
    /// A new random key.
    pub fn generate() -> Identity {
        let kp = nkeys::KeyPair::new_user();
        // A freshly made user key pair always has a seed.
        Identity::from_seed(&kp.seed().unwrap_or_default()).unwrap_or_else(|_| Identity::from_raw(rand::random()))
    }

    fn from_raw(raw: [u8; 32]) -> Identity {
        let signing = SigningKey::from_bytes(&raw);
        let public = nkeys::KeyPair::new_from_raw(nkeys::KeyPairType::User, raw)
            .map(|k| k.public_key())
            .unwrap_or_default();
        Identity { signing, public }
    }

    /// The key of an nkey seed (`SU...`, as `nsc` or `nk -gen user` make them).
    pub fn from_seed(seed: &str) -> Result<Identity, KeyError> {
        let (_, raw) = nkeys::decode_seed(seed.trim()).map_err(|e| KeyError::Invalid(e.to_string()))?;
        let id = Identity::from_raw(raw);
        if id.public.is_empty() {
            return Err(KeyError::Invalid("cannot encode the public key".into()));
        }
        Ok(id)
    }

    /// Reads the seed in `path`, or makes a new key and writes it there (mode 0600) if the file
    /// does not exist.
    pub fn load_or_create(path: &Path) -> Result<Identity, KeyError> {
        let file_error = |e: std::io::Error| KeyError::File {
            path: path.display().to_string(),
            error: e.to_string(),
        };
        match std::fs::read_to_string(path) {
            Ok(text) => Identity::from_seed(&text),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let id = Identity::generate();
                if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                    std::fs::create_dir_all(dir).map_err(file_error)?;
                }
                let mut options = std::fs::OpenOptions::new();
                options.write(true).create_new(true);
                #[cfg(unix)]
                std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
                let mut f = options.open(path).map_err(file_error)?;
                std::io::Write::write_all(&mut f, format!("{}\n", id.seed()).as_bytes()).map_err(file_error)?;
                tracing::info!(path = %path.display(), key = %id.public, "made a new signing key");
                Ok(id)
            }
            Err(e) => Err(file_error(e)),
        }
    }

    /// Checks that `key` is a public user nkey (`U...`).
    ///
    /// ```
    /// let id = invalbus::Identity::generate();
    /// assert!(invalbus::Identity::check_public_key(id.public_key()).is_ok());
    /// assert!(invalbus::Identity::check_public_key("Uxyz").is_err());
    /// ```
    pub fn check_public_key(key: &str) -> Result<(), KeyError> {
        nkeys::from_public_key(key)
            .map(|_| ())
            .map_err(|e| KeyError::Invalid(e.to_string()))
    }

    /// The public key, as an nkey (`U...`): what a trust policy lists.
    pub fn public_key(&self) -> &str {
        &self.public
    }

    /// The seed, as an nkey (`SU...`): keep it secret.
    pub fn seed(&self) -> String {
        nkeys::KeyPair::new_from_raw(nkeys::KeyPairType::User, self.signing.to_bytes())
            .ok()
            .and_then(|k| k.seed().ok())
            .unwrap_or_default()
    }

    /// Signs `body` as a message of `kind`.
    pub fn sign(&self, kind: Kind, body: &[u8]) -> [u8; 64] {
        self.signing.sign(&signed_bytes(kind, body)).to_bytes()
    }
}

/// What a trusted key may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Scopes {
    /// Invalidate keys (with or without a version).
    pub keys: bool,
    /// Purge by tag, prefix, or everything.
    pub purge: bool,
    /// Write receipts (nodes and replicas that apply batches).
    pub receipts: bool,
}

impl Scopes {
    /// Everything: what a node or a service replica needs.
    pub const ALL: Scopes = Scopes {
        keys: true,
        purge: true,
        receipts: true,
    };
}

/// One key a namespace trusts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrustedKey {
    /// Its public nkey (`U...`).
    pub key: String,
    /// What it may do.
    pub scopes: Scopes,
    /// The origins (node ids) it may publish as; empty: any, each pinned to it on first use.
    pub origins: Vec<String>,
}

/// Which signers a namespace accepts.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum TrustPolicy {
    /// Any key, pinned to each origin name on first use: a name another key has used (and used
    /// recently) is refused. For development: anyone who can publish on the namespace can still
    /// invalidate under a new name.
    #[default]
    PinOnFirstUse,
    /// Only these keys.
    Keys(Vec<TrustedKey>),
}

/// Why a signed message was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// No envelope, or a signature that does not verify.
    #[error("bad signature: {0}")]
    BadSignature(String),
    /// A key the policy does not trust.
    #[error("untrusted key {0}")]
    Untrusted(String),
    /// The key may not speak for this origin (another key owns it, or the policy binds the key
    /// to other origins).
    #[error("key {key} may not publish as {origin:?}")]
    WrongOrigin {
        /// The signer.
        key: String,
        /// The origin it claimed.
        origin: String,
    },
    /// The key may not make this kind of invalidation, or write receipts.
    #[error("key {key} may not {what}")]
    NotAllowed {
        /// The signer.
        key: String,
        /// What it tried.
        what: &'static str,
    },
}

/// How many verifying keys, origin pins and refusal log entries a receiver keeps at most.
///
/// An origin's pin lapses when its key has not been heard for the pin expiry (two heartbeat
/// intervals): a live node heartbeats within it, so no other key can take its name; a node that
/// restarted with a new key gets its name back once the old one has been silent that long (its
/// bus takes at least that long to start, watching for a live duplicate of itself).
const MAX_KEYS: usize = 8192;

/// A receiver's side of trust: the policy, the verifying keys it has parsed, and the origins
/// pinned to their keys.
pub(crate) struct Trust {
    policy: TrustPolicy,
    by_key: HashMap<String, usize>,
    state: Mutex<VerifierState>,
    pin_expiry_ns: u64,
}

#[derive(Default)]
struct VerifierState {
    keys: HashMap<String, VerifyingKey>,
    /// origin → (key, last time the origin was heard through that key, clock ns).
    pins: HashMap<String, (String, u64)>,
    /// When a refusal was last logged, per origin (clock ns).
    logged: HashMap<String, u64>,
}

/// A verified message's signer and what it may do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Verified {
    pub key: String,
    pub scopes: Scopes,
    /// The policy itself binds the key to the origin (not only a pin).
    pub bound: bool,
}

impl Trust {
    pub fn new(policy: TrustPolicy, pin_expiry: Duration) -> Self {
        let by_key = match &policy {
            TrustPolicy::Keys(keys) => keys.iter().enumerate().map(|(i, k)| (k.key.clone(), i)).collect(),
            TrustPolicy::PinOnFirstUse => HashMap::new(),
        };
        Trust {
            policy,
            by_key,
            state: Mutex::new(VerifierState::default()),
            pin_expiry_ns: pin_expiry.as_nanos() as u64,
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, VerifierState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Checks the signature of `body` (a message of `kind` from `origin`) and that the policy lets
    /// `signer` publish as `origin`, then pins `origin` to `signer` (refused if another key holds
    /// it and was heard from within the pin expiry). `now_ns` is the gate's clock.
    pub fn verify(
        &self,
        kind: Kind,
        body: &[u8],
        signer: &str,
        signature: &[u8],
        origin: &str,
        now_ns: u64,
    ) -> Result<Verified, Refusal> {
        let verified = self.check(kind, body, signer, signature, origin)?;
        self.pin(origin, signer, now_ns)?;
        Ok(verified)
    }

    /// Checks the signature only (for this bus's own messages: its key is its own, whatever the
    /// policy lists).
    pub fn check_signature(&self, kind: Kind, body: &[u8], signer: &str, signature: &[u8]) -> Result<(), Refusal> {
        let signature: [u8; 64] = signature
            .try_into()
            .map_err(|_| Refusal::BadSignature(format!("{} bytes, not 64", signature.len())))?;
        let key = self.verifying_key(signer)?;
        let signature = Signature::from_bytes(&signature);
        // A signature that does not cover this version's bytes may cover the previous version's,
        // so that audit records written before an upgrade stay verified: a genuine message pays
        // one check, a refused one two.
        if key.verify(&signed_bytes(kind, body), &signature).is_ok()
            || key.verify(&signed_bytes_v1(kind, body), &signature).is_ok()
        {
            return Ok(());
        }
        Err(Refusal::BadSignature(format!("does not verify with {}", short(signer))))
    }

    /// Whether origin names are pinned to the first key heard (the `pinned` policy): then a
    /// [`Refusal::WrongOrigin`] from [`Trust::verify`] means another key holds the name now.
    pub fn pins_on_first_use(&self) -> bool {
        matches!(self.policy, TrustPolicy::PinOnFirstUse)
    }

    /// Whether the policy lists `key` (always true when keys are pinned on first use).
    pub fn lists(&self, key: &str) -> bool {
        match &self.policy {
            TrustPolicy::PinOnFirstUse => true,
            TrustPolicy::Keys(_) => self.by_key.contains_key(key),
        }
    }

    /// Checks the signature and the policy (not the pins; changes nothing).
    pub fn check(
        &self,
        kind: Kind,
        body: &[u8],
        signer: &str,
        signature: &[u8],
        origin: &str,
    ) -> Result<Verified, Refusal> {
        let trusted = match &self.policy {
            TrustPolicy::PinOnFirstUse => None,
            TrustPolicy::Keys(keys) => match self.by_key.get(signer) {
                Some(&i) => Some(&keys[i]),
                None => return Err(Refusal::Untrusted(short(signer))),
            },
        };
        self.check_signature(kind, body, signer, signature)?;
        if let Some(t) = trusted {
            if !t.origins.is_empty() && !t.origins.iter().any(|o| o == origin) {
                return Err(Refusal::WrongOrigin {
                    key: short(signer),
                    origin: origin.to_owned(),
                });
            }
        }
        Ok(Verified {
            key: signer.to_owned(),
            scopes: trusted.map_or(Scopes::ALL, |t| t.scopes),
            bound: trusted.is_some_and(|t| t.origins.iter().any(|o| o == origin)),
        })
    }

    fn verifying_key(&self, signer: &str) -> Result<VerifyingKey, Refusal> {
        if let Some(k) = self.state().keys.get(signer) {
            return Ok(*k);
        }
        let (prefix, raw) = nkeys::from_public_key(signer)
            .map_err(|e| Refusal::BadSignature(format!("signer {}: {e}", short(signer))))?;
        let _ = prefix;
        let key = VerifyingKey::from_bytes(&raw)
            .map_err(|e| Refusal::BadSignature(format!("signer {}: {e}", short(signer))))?;
        let mut state = self.state();
        if state.keys.len() >= MAX_KEYS {
            state.keys.clear();
        }
        state.keys.insert(signer.to_owned(), key);
        Ok(key)
    }

    /// Binds `origin` to `signer` unless another key holds it and was heard from within the pin
    /// expiry.
    fn pin(&self, origin: &str, signer: &str, now_ns: u64) -> Result<(), Refusal> {
        let mut state = self.state();
        match state.pins.get_mut(origin) {
            Some((key, seen)) if key == signer => {
                *seen = now_ns;
                Ok(())
            }
            Some((_, seen)) if now_ns.saturating_sub(*seen) <= self.pin_expiry_ns => Err(Refusal::WrongOrigin {
                key: short(signer),
                origin: origin.to_owned(),
            }),
            _ => {
                if state.pins.len() >= MAX_KEYS {
                    let expiry = self.pin_expiry_ns;
                    state.pins.retain(|_, (_, seen)| now_ns.saturating_sub(*seen) <= expiry);
                    if state.pins.len() >= MAX_KEYS {
                        return Err(Refusal::Untrusted(format!(
                            "{} (too many origins pinned)",
                            short(signer)
                        )));
                    }
                }
                state.pins.insert(origin.to_owned(), (signer.to_owned(), now_ns));
                Ok(())
            }
        }
    }

    /// The key `origin` is pinned to, if any.
    pub fn pinned(&self, origin: &str) -> Option<String> {
        self.state().pins.get(origin).map(|(k, _)| k.clone())
    }

    /// Whether a refusal from `origin` should be logged now (once per origin and `interval`).
    pub fn should_log(&self, origin: &str, now_ns: u64, interval: Duration) -> bool {
        let mut state = self.state();
        if state.logged.len() >= MAX_KEYS {
            state.logged.clear();
        }
        let last = state.logged.entry(origin.to_owned()).or_insert(0);
        if *last == 0 || now_ns.saturating_sub(*last) >= interval.as_nanos() as u64 {
            *last = now_ns.max(1);
            true
        } else {
            false
        }
    }
}

/// The first characters of a key, for logs.
fn short(key: &str) -> String {
    key.chars().take(12).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The signed bytes are what `wire.proto` documents, since publishers in other languages
    /// build them by hand; the previous version's are still accepted, and neither passes for
    /// another kind.
    #[test]
    fn a_signature_covers_the_documented_bytes_and_the_previous_version_still_verifies() {
        let id = Identity::generate();
        let body = b"an encoded batch".as_slice();
        let trust = Trust::new(TrustPolicy::PinOnFirstUse, Duration::from_secs(10));
        let signer = id.public_key();

        let mut documented = b"invalbus.v2:batch:".to_vec();
        documented.extend_from_slice(&Sha256::digest(body));
        let made = id.sign(Kind::Batch, body);
        let raw = id.signing.verifying_key();
        assert!(raw.verify(&documented, &Signature::from_bytes(&made)).is_ok());
        assert_eq!(trust.check_signature(Kind::Batch, body, signer, &made), Ok(()));

        let v1 = id.signing.sign(b"invalbus.v1:batch:an encoded batch").to_bytes();
        assert_eq!(trust.check_signature(Kind::Batch, body, signer, &v1), Ok(()));

        for sig in [made, v1] {
            assert!(matches!(
                trust.check_signature(Kind::Heartbeat, body, signer, &sig),
                Err(Refusal::BadSignature(_))
            ));
            assert!(matches!(
                trust.check_signature(Kind::Batch, b"another batch", signer, &sig),
                Err(Refusal::BadSignature(_))
            ));
        }
    }
}
