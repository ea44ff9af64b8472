//! The usage record: one per metered request that reached a backend, serialized by
//! hand so the backend's `*_tokens_details` are copied byte for byte.

use super::Usage;
use crate::config::ApiKeyFormat;
use crate::http::error::itoa_u64;
use sha2::{Digest, Sha256};
use std::sync::Arc;
use std::time::SystemTime;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Completed,
    ClientDisconnected,
    BackendError,
    Timeout,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Completed => "completed",
            Outcome::ClientDisconnected => "client_disconnected",
            Outcome::BackendError => "backend_error",
            Outcome::Timeout => "timeout",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UsageSource {
    /// The backend reported it.
    Backend,
    /// The last running usage the backend reported before the stream ended early.
    Partial,
    /// Counted by the proxy (content-bearing deltas).
    Estimated,
    /// Nothing could be known.
    None,
}

impl UsageSource {
    pub fn as_str(self) -> &'static str {
        match self {
            UsageSource::Backend => "backend",
            UsageSource::Partial => "partial",
            UsageSource::Estimated => "estimated",
            UsageSource::None => "none",
        }
    }
}

#[derive(Debug, Clone)]
pub struct UsageRecord {
    /// The proxy's own id, unique per request: the billing key.
    pub request_id: String,
    /// The caller's `X-Request-Id`, kept as a trace id (never the key).
    pub client_request_id: Option<String>,
    pub user_id: String,
    /// Already formatted per `usage_hook.api_key_format`.
    pub api_key: String,
    pub model: String,
    pub usage: Usage,
    pub is_stream: bool,
    /// The route's path (its pattern for paths with an id).
    pub endpoint: std::borrow::Cow<'static, str>,
    pub timestamp: SystemTime,
    pub backend_url: Arc<str>,
    pub status_code: u16,
    pub outcome: Outcome,
    pub usage_source: UsageSource,
    pub duration_ms: u64,
    pub ttft_ms: Option<u64>,
}

impl UsageRecord {
    /// Appends the record as one line of JSON (no trailing newline).
    pub fn write_json(&self, out: &mut Vec<u8>) {
        let u = &self.usage;
        out.extend_from_slice(b"{\"request_id\":");
        push_str(out, &self.request_id);
        out.extend_from_slice(b",\"user_id\":");
        push_str(out, &self.user_id);
        out.extend_from_slice(b",\"api_key\":");
        push_str(out, &self.api_key);
        out.extend_from_slice(b",\"model\":");
        push_str(out, &self.model);
        out.extend_from_slice(b",\"prompt_tokens\":");
        out.extend_from_slice(itoa_u64(u.prompt_tokens).as_bytes());
        out.extend_from_slice(b",\"completion_tokens\":");
        out.extend_from_slice(itoa_u64(u.completion_tokens).as_bytes());
        out.extend_from_slice(b",\"total_tokens\":");
        out.extend_from_slice(itoa_u64(u.total_tokens).as_bytes());
        out.extend_from_slice(b",\"is_stream\":");
        out.extend_from_slice(if self.is_stream { b"true" } else { b"false" });
        out.extend_from_slice(b",\"endpoint\":");
        push_str(out, &self.endpoint);
        out.extend_from_slice(b",\"timestamp\":\"");
        push_rfc3339_millis(out, self.timestamp);
        out.extend_from_slice(b"\",\"backend_url\":");
        push_str(out, &self.backend_url);
        out.extend_from_slice(b",\"status_code\":");
        out.extend_from_slice(itoa_u64(self.status_code as u64).as_bytes());
        out.extend_from_slice(b",\"outcome\":\"");
        out.extend_from_slice(self.outcome.as_str().as_bytes());
        out.extend_from_slice(b"\",\"usage_source\":\"");
        out.extend_from_slice(self.usage_source.as_str().as_bytes());
        out.extend_from_slice(b"\",\"duration_ms\":");
        out.extend_from_slice(itoa_u64(self.duration_ms).as_bytes());
        out.extend_from_slice(b",\"ttft_ms\":");
        match self.ttft_ms {
            Some(t) => out.extend_from_slice(itoa_u64(t).as_bytes()),
            None => out.extend_from_slice(b"null"),
        }
        out.extend_from_slice(b",\"client_request_id\":");
        match &self.client_request_id {
            Some(id) => push_str(out, id),
            None => out.extend_from_slice(b"null"),
        }
        if !u.details.is_empty() {
            out.push(b',');
            out.extend_from_slice(u.details.as_bytes());
        }
        if !u.extra.is_empty() {
            out.extend_from_slice(b",\"usage_details\":{");
            out.extend_from_slice(u.extra.as_bytes());
            out.push(b'}');
        }
        out.push(b'}');
    }

    pub fn to_json(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(512);
        self.write_json(&mut v);
        v
    }
}

/// Appends `s` as a JSON string. Ids, names and keys rarely need escaping: those are
/// copied as they are; anything with a quote, backslash or control byte goes through
/// serde_json.
fn push_str(out: &mut Vec<u8>, s: &str) {
    if crate::scan::json_plain_len(s.as_bytes()) == s.len() {
        out.reserve(s.len() + 2);
        out.push(b'"');
        out.extend_from_slice(s.as_bytes());
        out.push(b'"');
    } else {
        // Writing a &str to a Vec cannot fail.
        let _ = serde_json::to_writer(&mut *out, s);
    }
}

/// Appends `t` as RFC 3339 UTC with milliseconds (`2026-01-14T10:30:00.123Z`), as
/// humantime's `format_rfc3339_millis` does, without the formatting machinery: one
/// record per request goes through here.
fn push_rfc3339_millis(out: &mut Vec<u8>, t: SystemTime) {
    thread_local! {
        /// The last second formatted on this thread (`YYYY-MM-DDTHH:MM:SS`): records
        /// made within one second share it, and the civil date and the digits were
        /// ~200 of a record's ~1,500 instructions.
        static LAST: std::cell::Cell<(u64, [u8; 19])> = const { std::cell::Cell::new((u64::MAX, [0; 19])) };
    }
    let since = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let ms = u64::from(since.subsec_millis());
    let mut millis = *b".000Z";
    millis[1] = b'0' + (ms / 100) as u8;
    millis[2] = b'0' + (ms / 10 % 10) as u8;
    millis[3] = b'0' + (ms % 10) as u8;
    let cached = LAST.try_with(|l| l.get()).ok();
    let second = match cached {
        Some((s, b)) if s == secs => b,
        _ => {
            let b = format_second(secs);
            let _ = LAST.try_with(|l| l.set((secs, b)));
            b
        }
    };
    out.extend_from_slice(&second);
    out.extend_from_slice(&millis);
}

/// `YYYY-MM-DDTHH:MM:SS` for `secs` since the epoch (UTC).
fn format_second(secs: u64) -> [u8; 19] {
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (H. Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let mut b = *b"0000-00-00T00:00:00";
    let two = |b: &mut [u8], v: u64| {
        b[0] = b'0' + (v / 10 % 10) as u8;
        b[1] = b'0' + (v % 10) as u8;
    };
    let year = year.clamp(0, 9999) as u64;
    two(&mut b[0..2], year / 100);
    two(&mut b[2..4], year);
    two(&mut b[5..7], month as u64);
    two(&mut b[8..10], day as u64);
    two(&mut b[11..13], rem / 3600);
    two(&mut b[14..16], rem / 60 % 60);
    two(&mut b[17..19], rem % 60);
    b
}

/// Formats the caller's key for the record (SPEC: `usage_hook.api_key_format`).
pub fn format_api_key(key: &str, format: ApiKeyFormat) -> String {
    match format {
        ApiKeyFormat::Full => key.to_string(),
        ApiKeyFormat::None => String::new(),
        ApiKeyFormat::Sha256 => {
            if key.is_empty() {
                return String::new();
            }
            let digest = Sha256::digest(key.as_bytes());
            let mut s = String::with_capacity(7 + 64);
            s.push_str("sha256:");
            for b in digest {
                s.push(char::from(b"0123456789abcdef"[(b >> 4) as usize]));
                s.push(char::from(b"0123456789abcdef"[(b & 15) as usize]));
            }
            s
        }
        ApiKeyFormat::Masked if key.is_ascii() => match key.len() {
            // Keys are ASCII in practice: slice bytes (one allocation per request).
            0 => String::new(),
            1..16 => "***".to_string(),
            n => {
                let mut s = String::with_capacity(13);
                s.push_str(&key[..6]);
                s.push_str("...");
                s.push_str(&key[n - 4..]);
                s
            }
        },
        ApiKeyFormat::Masked => {
            let chars: Vec<char> = key.chars().collect();
            if chars.is_empty() {
                String::new()
            } else if chars.len() < 16 {
                "***".to_string()
            } else {
                let head: String = chars[..6].iter().collect();
                let tail: String = chars[chars.len() - 4..].iter().collect();
                format!("{head}...{tail}")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> UsageRecord {
        UsageRecord {
            request_id: "req_1".into(),
            client_request_id: None,
            user_id: "user_\"alice\"".into(),
            api_key: "sk-pro...9f2a".into(),
            model: "m".into(),
            usage: Usage {
                prompt_tokens: 15,
                completion_tokens: 42,
                total_tokens: 57,
                details: r#""prompt_tokens_details":{"cached_tokens":8}"#.into(),
                extra: r#""prompt_tokens_details":{"cached_tokens":8}"#.into(),
                ..Usage::default()
            },
            is_stream: true,
            endpoint: "/v1/chat/completions".into(),
            timestamp: SystemTime::UNIX_EPOCH + std::time::Duration::from_millis(1_768_386_600_123),
            backend_url: Arc::from("http://vllm:8000"),
            status_code: 200,
            outcome: Outcome::Completed,
            usage_source: UsageSource::Backend,
            duration_ms: 1834,
            ttft_ms: Some(41),
        }
    }

    proptest::proptest! {
        #[test]
        fn timestamps_close_together_match_humantime(
            base in 0u64..253_402_300_000_000,
            offsets in proptest::collection::vec(0u64..3_000, 1..40),
        ) {
            // Times within a second of each other share the thread's cached second;
            // each must still read exactly as humantime writes it, in any order.
            for o in offsets {
                let t = SystemTime::UNIX_EPOCH + std::time::Duration::from_millis(base + o);
                let mut out = Vec::new();
                push_rfc3339_millis(&mut out, t);
                proptest::prop_assert_eq!(
                    String::from_utf8(out).unwrap(),
                    humantime::format_rfc3339_millis(t).to_string()
                );
            }
        }

        #[test]
        fn timestamps_match_humantime(ms in 0u64..253_402_300_799_999) {
            let t = SystemTime::UNIX_EPOCH + std::time::Duration::from_millis(ms);
            let mut out = Vec::new();
            push_rfc3339_millis(&mut out, t);
            proptest::prop_assert_eq!(
                String::from_utf8(out).unwrap(),
                humantime::format_rfc3339_millis(t).to_string()
            );
        }

        #[test]
        fn strings_are_valid_json(s in "\\PC*|[\"\\\\\u{0}-\u{1f}a-z]{0,12}") {
            let mut out = Vec::new();
            push_str(&mut out, &s);
            let back: String = serde_json::from_slice(&out).unwrap();
            proptest::prop_assert_eq!(back, s);
        }
    }

    #[test]
    fn serializes_every_field() {
        let v: serde_json::Value = serde_json::from_slice(&record().to_json()).unwrap();
        assert_eq!(v["user_id"], "user_\"alice\"");
        assert_eq!(v["timestamp"], "2026-01-14T10:30:00.123Z");
        assert_eq!(v["total_tokens"], 57);
        assert_eq!(v["prompt_tokens_details"]["cached_tokens"], 8);
        assert_eq!(v["ttft_ms"], 41);
        assert_eq!(v["outcome"], "completed");
        assert!(v["client_request_id"].is_null());
        assert_eq!(
            v["usage_details"]["prompt_tokens_details"]["cached_tokens"],
            8
        );
        assert_eq!(v.as_object().unwrap().len(), 19);
        let mut r = record();
        r.ttft_ms = None;
        r.usage.details.clear();
        r.usage.extra.clear();
        r.client_request_id = Some("trace-\"1\"".into());
        let v: serde_json::Value = serde_json::from_slice(&r.to_json()).unwrap();
        assert!(v["ttft_ms"].is_null());
        assert_eq!(v["client_request_id"], "trace-\"1\"");
        assert_eq!(v.as_object().unwrap().len(), 17);
    }

    #[test]
    fn api_key_formats() {
        let k = "sk-proj-abcdefghijkl9f2a";
        assert_eq!(format_api_key(k, ApiKeyFormat::Masked), "sk-pro...9f2a");
        assert_eq!(format_api_key("short-key", ApiKeyFormat::Masked), "***");
        assert_eq!(format_api_key("", ApiKeyFormat::Masked), "");
        assert_eq!(
            format_api_key("0123456789abcde", ApiKeyFormat::Masked),
            "***"
        );
        assert_eq!(
            format_api_key("0123456789abcdef", ApiKeyFormat::Masked),
            "012345...cdef"
        );
        // Not ASCII: counted and cut in characters, never inside one.
        assert_eq!(
            format_api_key("ключ-0123456789ab", ApiKeyFormat::Masked),
            "ключ-0...89ab"
        );
        assert_eq!(format_api_key(k, ApiKeyFormat::Full), k);
        assert_eq!(format_api_key(k, ApiKeyFormat::None), "");
        assert_eq!(
            format_api_key("abc", ApiKeyFormat::Sha256),
            "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
