//! API keys: which header carries the caller's key, which user it belongs to, and
//! its limits with their counters.
//!
//! Keys are looked up by their SHA-256 digest in a hash map: the lookup's timing
//! depends on the digest of what the caller sent, which says nothing about how much
//! of a configured key a guess got right (a guess cannot aim at a digest's prefix),
//! and a 10,000-key config costs one lookup, not 10,000 comparisons.

use crate::config::{AuthConfig, LimitsConfig};
use crate::http::head::{Headers, Known};
use crate::limits::Counters;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::sync::Arc;

/// A configured key.
pub struct Key {
    pub user_id: String,
    /// Its limits (its own, else `auth.default_limits`); empty when unlimited.
    pub limits: LimitsConfig,
    /// Shared by every worker; kept across a reload while the key stays.
    pub counters: Arc<Counters>,
}

pub struct Auth {
    pub enabled: bool,
    keys: HashMap<[u8; 32], Key>,
}

impl Auth {
    /// The keys of `cfg`; those also in `old` keep their counters (a reload does not
    /// reset a customer's minute or budget).
    pub fn new(cfg: &AuthConfig, old: Option<&Auth>) -> Self {
        let mut keys = HashMap::with_capacity(cfg.keys.len());
        for k in &cfg.keys {
            let digest: [u8; 32] = Sha256::digest(k.key.as_bytes()).into();
            let counters = old
                .and_then(|o| o.keys.get(&digest))
                .map_or_else(Arc::default, |o| o.counters.clone());
            keys.insert(
                digest,
                Key {
                    user_id: k.user_id.clone(),
                    limits: k.limits(&cfg.default_limits),
                    counters,
                },
            );
        }
        Auth {
            enabled: cfg.enabled,
            keys,
        }
    }

    /// The configured key `key`, or `None` when it is missing or unknown.
    pub fn key(&self, key: Option<&str>) -> Option<&Key> {
        let digest: [u8; 32] = Sha256::digest(key?.as_bytes()).into();
        self.keys.get(&digest)
    }

    /// The user id for `key`, or `None` when the key is missing or unknown.
    pub fn user_for(&self, key: Option<&str>) -> Option<&str> {
        self.key(key).map(|k| k.user_id.as_str())
    }

    /// Every key, by its SHA-256 digest.
    pub fn keys(&self) -> impl Iterator<Item = (&[u8; 32], &Key)> {
        self.keys.iter()
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

/// The caller's key: `Authorization: Bearer KEY`, else `x-api-key: KEY`.
pub fn presented_key(headers: &Headers) -> Option<&str> {
    if let Some(v) = headers.known_str(Known::Authorization) {
        let v = v.trim();
        if v.len() > 7 && v[..7].eq_ignore_ascii_case("bearer ") {
            let key = v[7..].trim();
            if !key.is_empty() {
                return Some(key);
            }
        }
    }
    headers
        .known_str(Known::XApiKey)
        .map(str::trim)
        .filter(|k| !k.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::KeyConfig;
    use crate::http::head::RequestHead;

    #[test]
    fn maps_keys_to_users() {
        let key = |k: &str, u: &str| KeyConfig {
            key: k.into(),
            user_id: u.into(),
            rpm: None,
            tpm: None,
            max_concurrent: None,
            budget: None,
        };
        let cfg = AuthConfig {
            enabled: true,
            keys: vec![key("sk-alice", "alice"), key("sk-bob", "bob")],
            default_limits: LimitsConfig {
                rpm: Some(5),
                ..LimitsConfig::default()
            },
        };
        let auth = Auth::new(&cfg, None);
        assert_eq!(auth.user_for(Some("sk-bob")), Some("bob"));
        assert_eq!(auth.user_for(Some("sk-bo")), None);
        assert_eq!(auth.user_for(None), None);
        // A reload keeps the counters of the keys that stay.
        let bob = auth.key(Some("sk-bob")).unwrap().counters.clone();
        let mut cfg2 = cfg.clone();
        cfg2.keys.remove(0);
        let again = Auth::new(&cfg2, Some(&auth));
        assert!(Arc::ptr_eq(
            &again.key(Some("sk-bob")).unwrap().counters,
            &bob
        ));
        assert_eq!(again.key(Some("sk-bob")).unwrap().limits.rpm, Some(5));
        assert!(again.key(Some("sk-alice")).is_none());
    }

    #[test]
    fn reads_bearer_or_x_api_key() {
        let mut h = RequestHead::default();
        h.parse(
            b"GET / HTTP/1.1\r\nAuthorization: bearer  k1 \r\n\r\n",
            4096,
        )
        .unwrap();
        assert_eq!(presented_key(&h.headers), Some("k1"));
        h.parse(b"GET / HTTP/1.1\r\nX-Api-Key: k2\r\n\r\n", 4096)
            .unwrap();
        assert_eq!(presented_key(&h.headers), Some("k2"));
        h.parse(b"GET / HTTP/1.1\r\nAuthorization: Basic abc\r\n\r\n", 4096)
            .unwrap();
        assert_eq!(presented_key(&h.headers), None);
    }
}
