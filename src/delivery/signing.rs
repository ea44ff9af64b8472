//! Standard Webhooks signatures (standardwebhooks.com): every webhook POST carries
//! `webhook-id` (the record's `request_id`), `webhook-timestamp` (unix seconds, taken
//! per attempt: a retry is signed afresh over the same id and body) and
//! `webhook-signature` (`v1,` + base64 of HMAC-SHA256 over `id.timestamp.body`, keyed
//! with the decoded `whsec_` secret), so a receiver verifies with that spec's library
//! in any language and can refuse forged or replayed records.

use crate::http::error::itoa_u64;
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use hmac::{KeyInit, Mac};
use sha2::Sha256;
use std::time::SystemTime;

type HmacSha256 = hmac::Hmac<Sha256>;

#[derive(Clone)]
pub struct Signer {
    key: Vec<u8>,
}

impl std::fmt::Debug for Signer {
    // The key never reaches a log line.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Signer(<secret>)")
    }
}

impl Signer {
    /// `whsec_` followed by the base64 of the key (what the spec's libraries print).
    pub fn parse(secret: &str) -> Result<Signer, String> {
        let b64 = secret
            .strip_prefix("whsec_")
            .ok_or("expected \"whsec_\" followed by base64 (a Standard Webhooks secret)")?;
        let key = STANDARD
            .decode(b64)
            .map_err(|_| "the part after \"whsec_\" is not valid base64")?;
        if key.len() < 16 {
            return Err("the key is shorter than 16 bytes".into());
        }
        Ok(Signer { key })
    }

    /// `v1,` + the signature of `body` as message `id` sent at `timestamp`.
    pub fn signature(&self, id: &str, timestamp: u64, body: &[u8]) -> String {
        let mut mac = HmacSha256::new_from_slice(&self.key).expect("HMAC takes any key length");
        mac.update(id.as_bytes());
        mac.update(b".");
        mac.update(timestamp.to_string().as_bytes());
        mac.update(b".");
        mac.update(body);
        let mut out = String::with_capacity(48);
        out.push_str("v1,");
        STANDARD.encode_string(mac.finalize().into_bytes(), &mut out);
        out
    }

    /// Whether `header` (space-separated `v1,<base64>` entries) holds a valid
    /// signature of `body` as message `id` at `timestamp`, compared in constant time.
    pub fn verify(&self, id: &str, timestamp: u64, body: &[u8], header: &str) -> bool {
        let want = self.signature(id, timestamp, body);
        header.split(' ').any(|sig| {
            sig.len() == want.len()
                && sig
                    .bytes()
                    .zip(want.bytes())
                    .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                    == 0
        })
    }

    /// The three header lines for one POST of `body` as message `id`, signed now.
    pub fn write_headers(&self, head: &mut crate::http::write::Head<'_>, id: &str, body: &[u8]) {
        let now = unix_now();
        head.header(b"webhook-id", id.as_bytes())
            .header(b"webhook-timestamp", itoa_u64(now).as_bytes())
            .header(
                b"webhook-signature",
                self.signature(id, now, body).as_bytes(),
            );
    }
}

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signs_as_the_specification_s_example() {
        // The Standard Webhooks specification's example (its README and every
        // reference library's tests).
        let s = Signer::parse("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        let body = br#"{"test": 2432232314}"#;
        assert_eq!(
            s.signature("msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body),
            "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
        );
        assert!(s.verify(
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            1614265330,
            body,
            "v1,bm9ldHUjKzFob2VudXRob2VodWUzMjRvdWVvdW9ldQo= v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
        ));
        assert!(!s.verify(
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            1614265331,
            body,
            "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
        ));
    }

    #[test]
    fn secrets_are_checked_and_never_printed() {
        assert!(Signer::parse("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").is_err());
        assert!(Signer::parse("whsec_not base64!").is_err());
        assert!(Signer::parse("whsec_c2hvcnQ=").is_err());
        let s = Signer::parse("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        assert_eq!(format!("{s:?}"), "Signer(<secret>)");
    }
}
