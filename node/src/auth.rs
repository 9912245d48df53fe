//! Bearer tokens and roles: who may call what. Every refusal is logged and counted.

use std::sync::atomic::{AtomicU64, Ordering};

use tonic::{Request, Status};

use crate::config::{Role, TokenConfig};

/// The authenticated caller of one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// The token's name (or `insecure` when the node runs without tokens).
    pub name: String,
}

/// Counts of refused calls, by cause.
#[derive(Debug, Default)]
pub struct Refusals {
    /// Missing or unknown token.
    pub unauthenticated: AtomicU64,
    /// A valid token without the role.
    pub permission_denied: AtomicU64,
    /// A bad request.
    pub invalid_argument: AtomicU64,
}

impl Refusals {
    /// All refusals.
    pub fn total(&self) -> u64 {
        self.unauthenticated.load(Ordering::Relaxed)
            + self.permission_denied.load(Ordering::Relaxed)
            + self.invalid_argument.load(Ordering::Relaxed)
    }

    /// Counts and logs a bad request, and returns its status.
    pub fn invalid(&self, method: &str, who: &Principal, message: String) -> Status {
        self.invalid_argument.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(method, principal = %who.name, reason = %message, "call refused: invalid argument");
        Status::invalid_argument(message)
    }
}

/// The token table of a node.
#[derive(Debug)]
pub struct Auth {
    tokens: Vec<TokenConfig>,
    insecure: bool,
    /// What was refused so far.
    pub refusals: Refusals,
}

impl Auth {
    /// A table of `tokens`; with `insecure` and no tokens, every call is allowed.
    pub fn new(tokens: Vec<TokenConfig>, insecure: bool) -> Self {
        Auth {
            tokens,
            insecure,
            refusals: Refusals::default(),
        }
    }

    /// Checks the request's bearer token for `role`.
    pub fn check<T>(&self, request: &Request<T>, method: &str, role: Role) -> Result<Principal, Status> {
        let header = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .map(str::trim);
        // The scheme is case-insensitive (RFC 6750 after RFC 7235): `Bearer`, `bearer`, `BEARER`.
        let presented = header.and_then(|h| {
            let (scheme, token) = h.split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then_some(token)
        });
        if self.tokens.is_empty() {
            if self.insecure {
                return Ok(Principal {
                    name: "insecure".into(),
                });
            }
            return Err(self.unauthenticated(
                method,
                "this node has no tokens configured: add [[tokens]] to its configuration file \
                 (or start it with --insecure for local development)",
            ));
        }
        // With tokens configured, `insecure` has no effect (the configuration refuses the pair):
        // a call without a token is refused.
        let Some(presented) = presented.map(str::trim) else {
            return Err(self.unauthenticated(method, "missing token: send `authorization: Bearer <token>` metadata"));
        };
        // Compare against every token in constant time, so timing does not reveal a prefix.
        let found = self.tokens.iter().fold(None, |acc, t| {
            if ct_eq(t.token.as_bytes(), presented.as_bytes()) {
                Some(t)
            } else {
                acc
            }
        });
        let Some(token) = found else {
            return Err(self.unauthenticated(method, "unknown token"));
        };
        if !token.roles.contains(&role) {
            self.refusals.permission_denied.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(method, principal = %token.name, role = role.name(), "call refused: role missing");
            return Err(Status::permission_denied(format!(
                "token {:?} lacks the {:?} role needed for {method}",
                token.name,
                role.name()
            )));
        }
        Ok(Principal {
            name: token.name.clone(),
        })
    }

    fn unauthenticated(&self, method: &str, message: &str) -> Status {
        self.refusals.unauthenticated.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(method, reason = message, "call refused: unauthenticated");
        Status::unauthenticated(message.to_owned())
    }
}

fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(token: Option<&str>) -> Request<()> {
        let mut r = Request::new(());
        if let Some(t) = token {
            r.metadata_mut()
                .insert("authorization", format!("Bearer {t}").parse().unwrap());
        }
        r
    }

    #[test]
    fn tokens_map_to_roles() {
        let auth = Auth::new(
            vec![TokenConfig {
                name: "ops".into(),
                token: "0123456789abcdef".into(),
                roles: vec![Role::Read],
            }],
            false,
        );
        assert_eq!(
            auth.check(&req(Some("0123456789abcdef")), "Stats", Role::Read)
                .unwrap()
                .name,
            "ops"
        );
        let e = auth
            .check(&req(Some("0123456789abcdef")), "Purge", Role::Purge)
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::PermissionDenied);
        assert_eq!(
            auth.check(&req(Some("wrong")), "Stats", Role::Read).unwrap_err().code(),
            tonic::Code::Unauthenticated
        );
        assert_eq!(
            auth.check(&req(None), "Stats", Role::Read).unwrap_err().code(),
            tonic::Code::Unauthenticated
        );
        assert_eq!(auth.refusals.total(), 3);
    }

    #[test]
    fn secure_by_default() {
        let closed = Auth::new(vec![], false);
        assert_eq!(
            closed.check(&req(None), "Stats", Role::Read).unwrap_err().code(),
            tonic::Code::Unauthenticated
        );
        let open = Auth::new(vec![], true);
        assert!(open.check(&req(None), "Purge", Role::Purge).is_ok());
    }
}
