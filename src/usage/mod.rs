//! Usage: reading the backend's token counts (streamed and not) and the usage record
//! that billing receives.

pub mod json;
pub mod probe;
pub mod record;
pub mod stream;

pub use record::{Outcome, UsageRecord, UsageSource, format_api_key};
pub use stream::{EventKind, StreamMeter};

use serde::de::{self, Deserializer, IgnoredAny, MapAccess, Visitor};
use serde_json::value::RawValue;
use std::borrow::Cow;
use std::fmt;

/// Token counts exactly as the backend reported them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub total_tokens: u64,
    /// The `*_tokens_details` members, verbatim: `"prompt_tokens_details":{...},...`.
    pub details: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Parsed {
    /// Real counts.
    Valid,
    /// All zeros: a placeholder some servers put on every chunk (Ollama); not final.
    Zero,
    /// Null, not an object, or counts that are not non-negative integers.
    Invalid,
}

impl Usage {
    /// Parses a `usage` JSON value into `self`, reusing its buffers. On anything but
    /// `Valid` the contents of `self` are unspecified.
    pub fn parse_into(&mut self, raw: &[u8]) -> Parsed {
        let mut de = serde_json::Deserializer::from_slice(raw);
        match de.deserialize_any(UsageVisitor(self)) {
            Ok(true) if de.end().is_ok() => {}
            _ => return Parsed::Invalid,
        }
        if self.prompt_tokens == 0 && self.completion_tokens == 0 && self.total_tokens == 0 {
            Parsed::Zero
        } else {
            Parsed::Valid
        }
    }
}

/// A map key that borrows when it can.
struct Key<'de>(Cow<'de, str>);

impl<'de> de::Deserialize<'de> for Key<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Key<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(v.to_string())))
            }
        }
        d.deserialize_str(V)
    }
}

struct UsageVisitor<'u>(&'u mut Usage);

impl<'de> Visitor<'de> for UsageVisitor<'_> {
    type Value = bool;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a usage object")
    }

    fn visit_unit<E: de::Error>(self) -> Result<bool, E> {
        Ok(false)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<bool, A::Error> {
        let u = self.0;
        u.details.clear();
        let (mut prompt, mut completion, mut total) = (None, None, None);
        while let Some(Key(key)) = map.next_key::<Key<'de>>()? {
            match key.as_ref() {
                "prompt_tokens" => prompt = map.next_value::<Option<u64>>()?,
                "completion_tokens" => completion = map.next_value::<Option<u64>>()?,
                "total_tokens" => total = map.next_value::<Option<u64>>()?,
                k if k.ends_with("_tokens_details") => {
                    let raw: &'de RawValue = map.next_value()?;
                    if raw.get() != "null" {
                        if !u.details.is_empty() {
                            u.details.push(',');
                        }
                        // Keys ending in _tokens_details need no escaping.
                        u.details.push('"');
                        u.details.push_str(k);
                        u.details.push_str("\":");
                        u.details.push_str(raw.get());
                    }
                }
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        u.prompt_tokens = prompt.unwrap_or(0);
        u.completion_tokens = completion.unwrap_or(0);
        // Copied when present; only a backend that omits it gets the sum.
        u.total_tokens = total.unwrap_or(u.prompt_tokens.saturating_add(u.completion_tokens));
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> (Parsed, Usage) {
        let mut u = Usage::default();
        let p = u.parse_into(s.as_bytes());
        (p, u)
    }

    #[test]
    fn copies_counts_and_details_verbatim() {
        let (p, u) = parse(
            r#"{"prompt_tokens":15,"total_tokens":60,"completion_tokens":42,"prompt_tokens_details":{"cached_tokens":8},"completion_tokens_details":{"reasoning_tokens":3}}"#,
        );
        assert_eq!(p, Parsed::Valid);
        assert_eq!(
            (u.prompt_tokens, u.completion_tokens, u.total_tokens),
            (15, 42, 60)
        );
        assert_eq!(
            u.details,
            r#""prompt_tokens_details":{"cached_tokens":8},"completion_tokens_details":{"reasoning_tokens":3}"#
        );
    }

    #[test]
    fn sglang_nulls_and_extra_fields() {
        let (p, u) = parse(
            r#"{"prompt_tokens":3,"completion_tokens":4,"total_tokens":7,"prompt_tokens_details":null,"reasoning_tokens":0}"#,
        );
        assert_eq!(p, Parsed::Valid);
        assert_eq!(u.details, "");
        assert_eq!(u.total_tokens, 7);
    }

    #[test]
    fn placeholders_and_garbage() {
        assert_eq!(
            parse(r#"{"prompt_tokens":0,"completion_tokens":0,"total_tokens":0}"#).0,
            Parsed::Zero
        );
        assert_eq!(parse("null").0, Parsed::Invalid);
        assert_eq!(parse(r#"{"prompt_tokens":-1}"#).0, Parsed::Invalid);
        assert_eq!(parse(r#"{"prompt_tokens":1.5}"#).0, Parsed::Invalid);
        assert_eq!(parse(r#"[1,2]"#).0, Parsed::Invalid);
        assert_eq!(parse(r#"{"prompt_tokens":1"#).0, Parsed::Invalid);
        assert_eq!(parse(r#"{"prompt_tokens":1} x"#).0, Parsed::Invalid);
    }
}
