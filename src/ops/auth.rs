//! Bearer tokens of the operations API. A tokens file (YAML) lists each token with a name and a
//! role:
//!
//! ```yaml
//! tokens:
//!   - {name: alice, role: operate, sha256: 9f86d081884c7d65...}   # sha256 of the token, hex
//!   - {name: dashboards, role: read, token_env: PAYSLIP_DASHBOARD_TOKEN}
//!   - {name: bob, role: operate, token: "s3cret"}                 # plain (file readable by root only)
//! ```
//!
//! `operate` may do everything `read` may. Invariants: a token's value is never logged or printed
//! (only its name); comparison is over the SHA-256 digests in constant time; names are unique and
//! become the operator of every command sent with the token.

use std::path::Path;

use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::config::{invalid, ConfigError};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Read,
    Operate,
}

/// Who called, once a token was recognised.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub name: String,
    pub role: Role,
}

/// Why a request was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Denied {
    /// No token, or one that is not in the file: 401.
    Unauthenticated,
    /// A known token whose role is too low: 403.
    Forbidden { name: String, needs: Role },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenFile {
    tokens: Vec<TokenEntry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenEntry {
    name: String,
    role: Role,
    #[serde(default)]
    sha256: Option<String>,
    #[serde(default)]
    token: Option<String>,
    #[serde(default)]
    token_env: Option<String>,
}

struct Known {
    name: String,
    role: Role,
    digest: [u8; 32],
}

/// The tokens the API accepts.
#[derive(Default)]
pub struct Tokens {
    known: Vec<Known>,
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.known.iter().map(|k| (&k.name, k.role))).finish()
    }
}

fn digest(token: &[u8]) -> [u8; 32] {
    Sha256::digest(token).into()
}

impl Tokens {
    /// Reads a tokens file; every problem names the file and what to fix (never a token's value).
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| invalid("api.tokens_file", format!("cannot read {}: {e}", path.display())))?;
        Self::parse(&text).map_err(|m| invalid("api.tokens_file", format!("{}: {m}", path.display())))
    }

    fn parse(text: &str) -> Result<Self, TokensFileError> {
        let file: TokenFile = serde_yaml::from_str(text).map_err(|e| TokensFileError::Format(e.to_string()))?;
        let mut known: Vec<Known> = Vec::new();
        for e in file.tokens {
            if e.name.trim().is_empty() || e.name.chars().any(char::is_control) {
                return Err(TokensFileError::BadName);
            }
            if known.iter().any(|k| k.name == e.name) {
                return Err(TokensFileError::NameTwice(e.name));
            }
            let digest = match (&e.sha256, &e.token, &e.token_env) {
                (Some(h), None, None) => {
                    let bytes = hex::decode(h.trim()).map_err(|_| TokensFileError::Sha256(e.name.clone()))?;
                    bytes.try_into().map_err(|_| TokensFileError::Sha256(e.name.clone()))?
                }
                (None, Some(t), None) => checked(&e.name, t)?,
                (None, None, Some(var)) => checked(&e.name, &std::env::var(var).map_err(|_| TokensFileError::EnvUnset { name: e.name.clone(), var: var.clone() })?)?,
                _ => return Err(TokensFileError::NotOneSource(e.name)),
            };
            if known.iter().any(|k| k.digest == digest) {
                return Err(TokensFileError::SameValue(e.name));
            }
            known.push(Known { name: e.name, role: e.role, digest });
        }
        Ok(Self { known })
    }

    pub fn is_empty(&self) -> bool {
        self.known.is_empty()
    }

    pub fn len(&self) -> usize {
        self.known.len()
    }

    /// Checks an `Authorization` header value against the role an endpoint needs.
    pub fn check(&self, authorization: Option<&str>, needs: Role) -> Result<Caller, Denied> {
        let token = authorization.and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer "))).map(str::trim).filter(|t| !t.is_empty()).ok_or(Denied::Unauthenticated)?;
        let d = digest(token.as_bytes());
        // every entry is compared, each in constant time, so timing says nothing about which matched
        let mut found: Option<&Known> = None;
        for k in &self.known {
            if constant_time_eq(&k.digest, &d) {
                found = Some(k);
            }
        }
        let k = found.ok_or(Denied::Unauthenticated)?;
        if k.role < needs {
            return Err(Denied::Forbidden { name: k.name.clone(), needs });
        }
        Ok(Caller { name: k.name.clone(), role: k.role })
    }
}

fn checked(name: &str, token: &str) -> Result<[u8; 32], TokensFileError> {
    if token.len() < 16 {
        return Err(TokensFileError::Short(name.to_string()));
    }
    Ok(digest(token.as_bytes()))
}

/// What is wrong with a tokens file (start-up stops with it, as `api.tokens_file`).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokensFileError {
    #[error("not a tokens file ({0}); expected `tokens: [{{name, role: read|operate, sha256|token|token_env}}]`")]
    Format(String),
    #[error("a token has an empty name or control characters in it")]
    BadName,
    #[error("token name {0:?} appears twice")]
    NameTwice(String),
    #[error("token {0:?}: sha256 must be 64 hex digits")]
    Sha256(String),
    #[error("token {name:?}: environment variable {var} is not set")]
    EnvUnset { name: String, var: String },
    #[error("token {0:?}: give exactly one of sha256, token, token_env")]
    NotOneSource(String),
    #[error("token {0:?} has the same value as another token")]
    SameValue(String),
    #[error("token {0:?} is shorter than 16 characters")]
    Short(String),
}

fn constant_time_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = "tokens:\n  - {name: alice, role: operate, token: alice-token-0123456789}\n  - {name: grafana, role: read, sha256: 7b4ee1b8a2b3c2e36c1e2b7d4c2f0b3f0f1c58e2b0d2d6d3c2a1b0c9d8e7f6a5}\n";

    #[test]
    fn roles_and_answers() {
        let t = Tokens::parse(FILE).unwrap();
        assert_eq!(t.check(Some("Bearer alice-token-0123456789"), Role::Operate), Ok(Caller { name: "alice".into(), role: Role::Operate }));
        assert_eq!(t.check(Some("Bearer alice-token-0123456789"), Role::Read).unwrap().name, "alice");
        assert_eq!(t.check(None, Role::Read), Err(Denied::Unauthenticated));
        assert_eq!(t.check(Some("Bearer nope-nope-nope-nope"), Role::Read), Err(Denied::Unauthenticated));
        assert_eq!(t.check(Some("Basic alice-token-0123456789"), Role::Read), Err(Denied::Unauthenticated));
    }

    #[test]
    fn a_read_token_cannot_operate_and_hashes_are_accepted() {
        let read = "dashboards-read-token-42";
        let file = format!("tokens:\n  - {{name: grafana, role: read, sha256: {}}}\n", hex::encode(digest(read.as_bytes())));
        let t = Tokens::parse(&file).unwrap();
        assert_eq!(t.check(Some(&format!("Bearer {read}")), Role::Read).unwrap().role, Role::Read);
        assert_eq!(t.check(Some(&format!("Bearer {read}")), Role::Operate), Err(Denied::Forbidden { name: "grafana".into(), needs: Role::Operate }));
    }

    #[test]
    fn bad_files_say_what_is_wrong_without_the_token() {
        let twice = "tokens:\n  - {name: a, role: read, token: aaaaaaaaaaaaaaaaaaaa}\n  - {name: a, role: read, token: bbbbbbbbbbbbbbbbbbbb}\n";
        assert_eq!(Tokens::parse(twice).unwrap_err(), TokensFileError::NameTwice("a".into()));
        let short = "tokens:\n  - {name: a, role: read, token: short}\n";
        let e = Tokens::parse(short).unwrap_err().to_string();
        assert!(e.contains("shorter than 16") && !e.contains("short}"), "{e}");
        let both = "tokens:\n  - {name: a, role: read, token: aaaaaaaaaaaaaaaaaaaa, sha256: ab}\n";
        assert!(matches!(Tokens::parse(both).unwrap_err(), TokensFileError::NotOneSource(_)));
        let role = "tokens:\n  - {name: a, role: admin, token: aaaaaaaaaaaaaaaaaaaa}\n";
        assert!(Tokens::parse(role).unwrap_err().to_string().contains("read|operate"));
        let same = "tokens:\n  - {name: a, role: read, token: aaaaaaaaaaaaaaaaaaaa}\n  - {name: b, role: operate, token: aaaaaaaaaaaaaaaaaaaa}\n";
        assert_eq!(Tokens::parse(same).unwrap_err(), TokensFileError::SameValue("b".into()));
        let dbg = format!("{:?}", Tokens::parse("tokens:\n  - {name: a, role: read, token: aaaaaaaaaaaaaaaaaaaa}\n").unwrap());
        assert!(!dbg.contains("aaaa"), "{dbg}");
    }
}
