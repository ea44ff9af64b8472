//! Usage: reading the backend's token counts (streamed and not) and the usage record
//! that billing receives.

pub mod finder;
pub mod probe;
pub mod record;
pub mod stream;

pub use record::{Outcome, UsageRecord, UsageSource, format_api_key};
pub use stream::{EventKind, StreamMeter};

use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde_json::value::RawValue;
use std::borrow::Cow;
use std::fmt;

/// Token counts exactly as the backend reported them. The input count is
/// `prompt_tokens` (OpenAI) or `input_tokens` (Responses, Anthropic, Cohere), the
/// output count `completion_tokens` or `output_tokens`; `total_tokens` is copied when
/// given, else the sum.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub total_tokens: u64,
    /// The `*_tokens_details` members, verbatim: `"prompt_tokens_details":{...},...`
    /// (kept at the record's top level, as the original did).
    pub details: String,
    /// Every other non-null member, verbatim: `"cache_read_input_tokens":8,...` (the
    /// record's `usage_details`), so a biller can price what the proxy does not know.
    pub extra: String,
    /// Which counts the backend gave (`PROMPT`, `COMPLETION`, `TOTAL`): a later usage
    /// overwrites an earlier one only in those (Anthropic's `message_delta`).
    present: u8,
}

const PROMPT: u8 = 1;
const COMPLETION: u8 = 2;
const TOTAL: u8 = 4;

/// What a usage member's name is: one of the three counts, or anything else.
fn count_of(key: &[u8]) -> Option<u8> {
    match key {
        b"prompt_tokens" | b"input_tokens" => Some(PROMPT),
        b"completion_tokens" | b"output_tokens" => Some(COMPLETION),
        b"total_tokens" => Some(TOTAL),
        _ => None,
    }
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
        if self.parse_flat(raw).is_none() {
            return self.parse_serde(raw);
        }
        self.classify()
    }

    /// `parse_into` through serde alone (every shape JSON allows).
    fn parse_serde(&mut self, raw: &[u8]) -> Parsed {
        let mut de = serde_json::Deserializer::from_slice(raw);
        match de.deserialize_any(UsageVisitor(self)) {
            Ok(true) if de.end().is_ok() => self.classify(),
            _ => Parsed::Invalid,
        }
    }

    /// The shape backends send, compact with plain names and integer or null values
    /// (`{"prompt_tokens":5,"total_tokens":69,"completion_tokens":64,
    /// "prompt_tokens_details":null}`), read without serde: it was ~1.5% of a worker
    /// relaying short responses. `None` on anything else (whitespace, escapes, nested
    /// values, other numbers), which then goes through serde from the start; the two
    /// agree on every input (property-tested).
    fn parse_flat(&mut self, raw: &[u8]) -> Option<()> {
        let b = raw;
        if b.first() != Some(&b'{') {
            return None;
        }
        self.details.clear();
        self.extra.clear();
        let (mut prompt, mut completion, mut total) = (None, None, None);
        let mut i = 1;
        if b.get(i) == Some(&b'}') {
            i += 1;
        } else {
            loop {
                if b.get(i) != Some(&b'"') {
                    return None;
                }
                let ks = i + 1;
                let ke = ks + b.get(ks..)?.iter().position(|&c| c == b'"')?;
                let key = &b[ks..ke];
                if !key.iter().all(|&c| (0x20..0x7f).contains(&c) && c != b'\\') {
                    return None;
                }
                i = ke + 1;
                if b.get(i) != Some(&b':') {
                    return None;
                }
                i += 1;
                let vs = i;
                let value = match *b.get(i)? {
                    b'n' if b.get(i..i + 4) == Some(b"null") => {
                        i += 4;
                        None
                    }
                    b'0'..=b'9' => {
                        let digits = b[i..].iter().take_while(|c| c.is_ascii_digit()).count();
                        if digits > 19 || (digits > 1 && b[i] == b'0') {
                            return None;
                        }
                        let mut n = 0u64;
                        for &d in &b[i..i + digits] {
                            n = n.checked_mul(10)?.checked_add(u64::from(d - b'0'))?;
                        }
                        i += digits;
                        Some(n)
                    }
                    _ => return None,
                };
                match count_of(key) {
                    Some(PROMPT) => prompt = value,
                    Some(COMPLETION) => completion = value,
                    Some(_) => total = value,
                    None if value.is_some() => {
                        // Checked above: printable ASCII, so valid UTF-8.
                        let k = std::str::from_utf8(key).ok()?;
                        let v = std::str::from_utf8(&b[vs..i]).ok()?;
                        push_member(&mut self.extra, k, v);
                        if k.ends_with("_tokens_details") {
                            push_member(&mut self.details, k, v);
                        }
                    }
                    None => {}
                }
                match b.get(i) {
                    Some(b',') => i += 1,
                    Some(b'}') => {
                        i += 1;
                        break;
                    }
                    _ => return None,
                }
            }
        }
        if i != b.len() {
            return None;
        }
        self.set_counts(prompt, completion, total);
        Some(())
    }

    /// Reads llama.cpp's `timings` (`prompt_n` + `cache_n` tokens in, `predicted_n`
    /// out) as a running usage, its other members ignored (they are timings, not
    /// usage).
    pub fn parse_timings(&mut self, raw: &[u8]) -> Parsed {
        #[derive(serde::Deserialize)]
        struct Timings {
            prompt_n: Option<u64>,
            cache_n: Option<u64>,
            predicted_n: Option<u64>,
        }
        let Ok(t) = serde_json::from_slice::<Timings>(raw) else {
            return Parsed::Invalid;
        };
        if t.prompt_n.is_none() && t.predicted_n.is_none() {
            return Parsed::Invalid;
        }
        self.details.clear();
        self.extra.clear();
        let prompt = t
            .prompt_n
            .unwrap_or(0)
            .saturating_add(t.cache_n.unwrap_or(0));
        self.set_counts(Some(prompt), t.predicted_n, None);
        self.classify()
    }

    /// Back to no usage at all, keeping the buffers' capacity.
    pub fn clear(&mut self) {
        self.prompt_tokens = 0;
        self.completion_tokens = 0;
        self.total_tokens = 0;
        self.details.clear();
        self.extra.clear();
        self.present = 0;
    }

    fn set_counts(&mut self, prompt: Option<u64>, completion: Option<u64>, total: Option<u64>) {
        let bit = |given: bool, b: u8| if given { b } else { 0 };
        self.present = bit(prompt.is_some(), PROMPT)
            | bit(completion.is_some(), COMPLETION)
            | bit(total.is_some(), TOTAL);
        self.prompt_tokens = prompt.unwrap_or(0);
        self.completion_tokens = completion.unwrap_or(0);
        // Copied when present; only a backend that omits it gets the sum.
        self.total_tokens =
            total.unwrap_or(self.prompt_tokens.saturating_add(self.completion_tokens));
    }

    /// Takes `later`'s counts where it gave them, keeping the others (a running usage
    /// that reports only the output so far keeps the input reported before), and its
    /// other members when it has any. A total is copied when given, else the sum.
    pub fn merge(&mut self, later: &Usage) {
        if later.present & PROMPT != 0 {
            self.prompt_tokens = later.prompt_tokens;
        }
        if later.present & COMPLETION != 0 {
            self.completion_tokens = later.completion_tokens;
        }
        if later.present & TOTAL != 0 {
            self.total_tokens = later.total_tokens;
        } else if later.present != 0 {
            self.total_tokens = self.prompt_tokens.saturating_add(self.completion_tokens);
        }
        self.present |= later.present;
        if !later.details.is_empty() {
            self.details.clone_from(&later.details);
        }
        if !later.extra.is_empty() {
            self.extra.clone_from(&later.extra);
        }
    }

    fn classify(&self) -> Parsed {
        if self.prompt_tokens == 0 && self.completion_tokens == 0 && self.total_tokens == 0 {
            Parsed::Zero
        } else {
            Parsed::Valid
        }
    }
}

/// Appends `"key":value` (a plain key) to a member list.
fn push_member(list: &mut String, key: &str, value: &str) {
    if !list.is_empty() {
        list.push(',');
    }
    list.push('"');
    list.push_str(key);
    list.push_str("\":");
    list.push_str(value);
}

/// Appends `"key":value` to a member list, `key` (as serde read it, unescaped)
/// written as JSON again: as it is when it needs no escape (no allocation: this runs
/// for every usage a stream carries), else through serde_json.
fn push_named_member(list: &mut String, key: &str, value: &str) {
    if crate::scan::json_plain_len(key.as_bytes()) == key.len() {
        push_member(list, key, value);
        return;
    }
    if !list.is_empty() {
        list.push(',');
    }
    // Writing a &str as JSON into bytes cannot fail, and gives valid UTF-8.
    let mut bytes = std::mem::take(list).into_bytes();
    let _ = serde_json::to_writer(&mut bytes, key);
    *list = String::from_utf8(bytes).unwrap_or_default();
    list.push(':');
    list.push_str(value);
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
        u.extra.clear();
        let (mut prompt, mut completion, mut total) = (None, None, None);
        while let Some(Key(key)) = map.next_key::<Key<'de>>()? {
            match count_of(key.as_bytes()) {
                Some(PROMPT) => prompt = map.next_value::<Option<u64>>()?,
                Some(COMPLETION) => completion = map.next_value::<Option<u64>>()?,
                Some(_) => total = map.next_value::<Option<u64>>()?,
                None => {
                    let raw: &'de RawValue = map.next_value()?;
                    if raw.get() != "null" {
                        push_named_member(&mut u.extra, &key, raw.get());
                        if key.ends_with("_tokens_details") {
                            push_named_member(&mut u.details, &key, raw.get());
                        }
                    }
                }
            }
        }
        u.set_counts(prompt, completion, total);
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
        assert_eq!(u.extra, r#""reasoning_tokens":0"#);
        assert_eq!(u.total_tokens, 7);
    }

    #[test]
    fn responses_anthropic_and_cohere_names_map_onto_the_counts() {
        // OpenAI Responses (vLLM's ResponseUsage).
        let (p, u) = parse(
            r#"{"input_tokens":12,"input_tokens_details":{"cached_tokens":4},"output_tokens":30,"output_tokens_details":{"reasoning_tokens":9},"total_tokens":42}"#,
        );
        assert_eq!(p, Parsed::Valid);
        assert_eq!(
            (u.prompt_tokens, u.completion_tokens, u.total_tokens),
            (12, 30, 42)
        );
        assert_eq!(
            u.extra,
            r#""input_tokens_details":{"cached_tokens":4},"output_tokens_details":{"reasoning_tokens":9}"#
        );
        // Anthropic: no total (the sum), cache counts passed through.
        let (_, u) = parse(
            r#"{"input_tokens":7,"output_tokens":3,"cache_creation_input_tokens":null,"cache_read_input_tokens":5}"#,
        );
        assert_eq!(
            (u.prompt_tokens, u.completion_tokens, u.total_tokens),
            (7, 3, 10)
        );
        assert_eq!(u.extra, r#""cache_read_input_tokens":5"#);
        // Audio seconds: no token count at all, the seconds passed through.
        let (p, u) = parse(r#"{"type":"duration","seconds":61}"#);
        assert_eq!(p, Parsed::Zero);
        assert_eq!(u.extra, r#""type":"duration","seconds":61"#);
    }

    #[test]
    fn a_later_usage_overwrites_field_by_field() {
        let (_, mut u) = parse(r#"{"input_tokens":9,"output_tokens":1}"#);
        let (_, later) = parse(r#"{"output_tokens":25}"#);
        u.merge(&later);
        assert_eq!(
            (u.prompt_tokens, u.completion_tokens, u.total_tokens),
            (9, 25, 34)
        );
        // vLLM repeats input_tokens in message_delta: the same numbers.
        let (_, later) = parse(r#"{"input_tokens":9,"output_tokens":30}"#);
        u.merge(&later);
        assert_eq!(
            (u.prompt_tokens, u.completion_tokens, u.total_tokens),
            (9, 30, 39)
        );
        // A complete usage replaces everything, its total copied.
        let (_, later) = parse(r#"{"prompt_tokens":5,"completion_tokens":6,"total_tokens":99}"#);
        u.merge(&later);
        assert_eq!(
            (u.prompt_tokens, u.completion_tokens, u.total_tokens),
            (5, 6, 99)
        );
    }

    fn fields(u: &Usage) -> (u64, u64, u64, &str, &str) {
        (
            u.prompt_tokens,
            u.completion_tokens,
            u.total_tokens,
            &u.details,
            &u.extra,
        )
    }

    proptest::proptest! {
        /// The hand-read shape and serde agree on every usage-like value: counts,
        /// details, and the verdict (valid, zero, invalid).
        #[test]
        fn the_flat_reader_agrees_with_serde(
            members in proptest::collection::vec((0usize..9, 0usize..16), 0..6),
            spaced in proptest::bool::ANY,
            cut in proptest::option::of(0usize..120),
            tail in proptest::sample::select(vec!["", " ", "x", ",", "}"]),
        ) {
            const KEYS: [&str; 9] = ["prompt_tokens", "completion_tokens", "total_tokens",
                "prompt_tokens_details", "completion_tokens_details", "other",
                "pro\\u006dpt_tokens", "x_tokens_details", ""];
            const VALUES: [&str; 16] = ["0", "7", "15", "18446744073709551615",
                "18446744073709551616", "01", "-1", "1.5", "1e3", "null", "nul",
                "{\"cached_tokens\":8}", "\"s\"", "true", "[1]", "99999999999999999999"];
            let sep = if spaced { ", " } else { "," };
            let body: Vec<String> = members
                .iter()
                .map(|&(k, v)| format!("\"{}\":{}", KEYS[k], VALUES[v]))
                .collect();
            let mut raw = format!("{{{}}}{tail}", body.join(sep)).into_bytes();
            if let Some(c) = cut {
                raw.truncate(c.min(raw.len()));
            }
            let (mut a, mut b) = (Usage::default(), Usage::default());
            let pa = a.parse_into(&raw);
            let pb = b.parse_serde(&raw);
            proptest::prop_assert_eq!(pa, pb);
            if pa != Parsed::Invalid {
                proptest::prop_assert_eq!(fields(&a), fields(&b));
            }
        }
    }

    #[test]
    fn the_usual_shape_is_read_without_serde() {
        let mut u = Usage::default();
        let raw = br#"{"completion_tokens":64,"prompt_tokens":5,"total_tokens":69,"prompt_tokens_details":null}"#;
        assert_eq!(u.parse_flat(raw), Some(()));
        assert_eq!(fields(&u), (5, 64, 69, "", ""));
        assert_eq!(u.parse_flat(br#"{"prompt_tokens": 5}"#), None);
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
