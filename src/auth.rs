//! API keys: which header carries the caller's key, and which user it belongs to.
//!
//! Keys are compared as SHA-256 digests in constant time against every configured key,
//! so response timing says nothing about how much of a guessed key was right.

use crate::config::AuthConfig;
use crate::http::head::Headers;
use sha2::{Digest, Sha256};

pub struct Auth {
    pub enabled: bool,
    keys: Vec<([u8; 32], String)>,
}

impl Auth {
    pub fn new(cfg: &AuthConfig) -> Self {
        Auth {
            enabled: cfg.enabled,
            keys: cfg
                .keys
                .iter()
                .map(|k| (Sha256::digest(k.key.as_bytes()).into(), k.user_id.clone()))
                .collect(),
        }
    }

    /// The user id for `key`, or `None` when the key is missing or unknown.
    pub fn user_for(&self, key: Option<&str>) -> Option<&str> {
        let key = key?;
        let digest: [u8; 32] = Sha256::digest(key.as_bytes()).into();
        let mut found = None;
        for (k, user) in &self.keys {
            if ct_eq(k, &digest) {
                found = Some(user.as_str());
            }
        }
        found
    }
}

fn ct_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    let mut diff = 0u8;
    for i in 0..32 {
        diff |= a[i] ^ b[i];
    }
    std::hint::black_box(diff) == 0
}

/// The caller's key: `Authorization: Bearer KEY`, else `x-api-key: KEY`.
pub fn presented_key(headers: &Headers) -> Option<&str> {
    if let Some(v) = headers.get_str("authorization") {
        let v = v.trim();
        if v.len() > 7 && v[..7].eq_ignore_ascii_case("bearer ") {
            let key = v[7..].trim();
            if !key.is_empty() {
                return Some(key);
            }
        }
    }
    headers
        .get_str("x-api-key")
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
        let auth = Auth::new(&AuthConfig {
            enabled: true,
            keys: vec![
                KeyConfig {
                    key: "sk-alice".into(),
                    user_id: "alice".into(),
                },
                KeyConfig {
                    key: "sk-bob".into(),
                    user_id: "bob".into(),
                },
            ],
        });
        assert_eq!(auth.user_for(Some("sk-bob")), Some("bob"));
        assert_eq!(auth.user_for(Some("sk-bo")), None);
        assert_eq!(auth.user_for(None), None);
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
