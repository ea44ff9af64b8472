//! Finds the top-level `"usage"` member of a JSON body as it streams past, in constant
//! memory: a 50 MB embeddings response is scanned, never held. Only the usage value
//! itself is copied (bounded by `MAX_USAGE_BYTES`).

use crate::json::{Masks, find_quote_or_backslash, prefix_xor, skip_plain};

/// A usage object larger than this is not usage.
pub const MAX_USAGE_BYTES: usize = 64 * 1024;
const KEY_CAP: usize = 8;

#[derive(Debug, Default)]
pub struct UsageFinder {
    /// The top-level member looked for: `usage`, or Cohere's `meta`.
    target: &'static [u8],
    depth: u32,
    root_is_object: bool,
    in_str: bool,
    escape: bool,
    /// At depth 1, the next string is a member name.
    expect_key: bool,
    /// The current string is a member name at depth 1.
    in_key: bool,
    key: [u8; KEY_CAP],
    key_len: usize,
    /// A member name ended; waiting for its colon.
    after_key: bool,
    capturing: bool,
    capture: Vec<u8>,
    /// The last complete capture (reused buffer); `has_found` says whether it is valid.
    found: Vec<u8>,
    has_found: bool,
}

impl UsageFinder {
    pub fn new() -> Self {
        UsageFinder {
            target: b"usage",
            ..Self::default()
        }
    }

    /// Starts a new body, keeping the capture buffer's capacity.
    pub fn reset(&mut self) {
        self.reset_for(b"usage");
    }

    /// Starts a new body whose top-level member `target` is captured.
    pub fn reset_for(&mut self, target: &'static [u8]) {
        debug_assert!(target.len() <= KEY_CAP);
        let mut capture = std::mem::take(&mut self.capture);
        let mut found = std::mem::take(&mut self.found);
        capture.clear();
        found.clear();
        *self = UsageFinder {
            target,
            capture,
            found,
            ..UsageFinder::default()
        };
    }

    /// The raw bytes of the last complete top-level `usage` value seen.
    pub fn usage(&self) -> Option<&[u8]> {
        self.has_found.then_some(&self.found[..])
    }

    pub fn feed(&mut self, chunk: &[u8]) {
        // While capturing, the value is the span of `chunk` from `from`: copied in one
        // piece when it ends or the chunk does.
        let mut from = 0;
        let mut i = 0;
        while i < chunk.len() {
            if self.in_str {
                i = self.string_run(chunk, i);
                continue;
            }
            if self.depth >= 2 {
                // Inside nested values only quotes and brackets matter: whole blocks
                // go by sixty-four bytes at a time, and the rest (the numbers of an
                // embedding) sixteen at a time.
                i = self.skip_nested(chunk, i);
                if self.in_str || self.depth < 2 {
                    continue;
                }
                i += skip_plain(&chunk[i..]);
                if i == chunk.len() {
                    break;
                }
            }
            let b = chunk[i];
            if self.capturing && self.depth == 1 && (b == b',' || b == b'}') {
                self.capture_bytes(&chunk[from..i]);
                if self.capturing {
                    self.capturing = false;
                    let trimmed = self.capture.trim_ascii();
                    if !trimmed.is_empty() {
                        self.found.clear();
                        self.found.extend_from_slice(trimmed);
                        self.has_found = true;
                    }
                }
                self.capture.clear();
            }
            match b {
                b'"' => {
                    self.in_str = true;
                    if self.depth == 1 && self.root_is_object && self.expect_key {
                        self.in_key = true;
                        self.expect_key = false;
                        self.key_len = 0;
                    }
                }
                b'{' | b'[' => {
                    if self.depth == 0 && b == b'{' {
                        self.root_is_object = true;
                        self.expect_key = true;
                    }
                    self.depth += 1;
                }
                b'}' | b']' => self.depth = self.depth.saturating_sub(1),
                b',' if self.depth == 1 => self.expect_key = true,
                b':' if self.depth == 1 && self.after_key => {
                    self.after_key = false;
                    if self.key_len == self.target.len()
                        && &self.key[..self.key_len.min(KEY_CAP)] == self.target
                    {
                        self.capturing = true;
                        self.capture.clear();
                        from = i + 1;
                    }
                }
                _ => {}
            }
            i += 1;
        }
        if self.capturing {
            self.capture_bytes(&chunk[from.min(chunk.len())..]);
        }
    }

    /// Outside a string at depth 2 or more, from `chunk[i]`: goes through
    /// whole 64-byte blocks without a backslash, finding every string in a block at
    /// once (a prefix XOR of its quotes) and following only the brackets outside them.
    /// Stops after the bracket that brings the depth back to 1, at a block with a
    /// backslash or at the chunk's last partial block (the byte machine takes those),
    /// or after a block that ends inside a string (then `in_str` is set).
    fn skip_nested(&mut self, chunk: &[u8], mut i: usize) -> usize {
        while i + 64 <= chunk.len() {
            // A block of numbers (an embedding) has nothing to follow.
            if skip_plain(&chunk[i..i + 64]) == 64 {
                i += 64;
                continue;
            }
            let m = Masks::of(&chunk[i..i + 64]);
            if m.backslash != 0 {
                return i;
            }
            let inside = prefix_xor(m.quote);
            let (opens, closes) = (m.open & !inside, m.close & !inside);
            let mut brackets = opens | closes;
            while brackets != 0 {
                let bit = brackets & brackets.wrapping_neg();
                if opens & bit != 0 {
                    self.depth += 1;
                } else {
                    self.depth -= 1;
                    if self.depth < 2 {
                        return i + bit.trailing_zeros() as usize + 1;
                    }
                }
                brackets &= brackets - 1;
            }
            i += 64;
            if inside >> 63 != 0 {
                self.in_str = true;
                return i;
            }
        }
        i
    }

    /// Inside a string from `chunk[i]`: takes the run up to the next quote or
    /// backslash in one step (kept as the member name if it is one),
    /// then that byte. Returns where scanning goes on.
    fn string_run(&mut self, chunk: &[u8], mut i: usize) -> usize {
        if self.escape {
            self.escape = false;
            return i + 1;
        }
        let rest = &chunk[i..];
        let k = find_quote_or_backslash(rest);
        let run = &rest[..k];
        if self.in_key {
            let room = KEY_CAP.saturating_sub(self.key_len).min(run.len());
            self.key[self.key_len.min(KEY_CAP)..][..room].copy_from_slice(&run[..room]);
            self.key_len = self.key_len.saturating_add(run.len());
        }
        i += k;
        let Some(&b) = chunk.get(i) else {
            return i;
        };
        if b == b'\\' {
            self.escape = true;
            if self.in_key {
                self.key_len = KEY_CAP + 1; // escaped names never match "usage"
            }
        } else {
            self.in_str = false;
            if self.in_key {
                self.in_key = false;
                self.after_key = true;
            }
        }
        i + 1
    }

    fn capture_bytes(&mut self, bytes: &[u8]) {
        if self.capture.len() + bytes.len() > MAX_USAGE_BYTES {
            self.capturing = false;
            self.capture.clear();
        } else {
            self.capture.extend_from_slice(bytes);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn finds_coheres_meta_at_every_split() {
        let body = br#"{"embeddings":{"float":[[0.1,0.2]]},"id":"e","meta":{"api_version":{"version":"2"},"billed_units":{"input_tokens":7}},"texts":["a \"meta\": b"],"usage":{"prompt_tokens":1}}"#;
        let want = &br#"{"api_version":{"version":"2"},"billed_units":{"input_tokens":7}}"#[..];
        for cut in 0..=body.len() {
            let mut f = UsageFinder::new();
            f.reset_for(b"meta");
            f.feed(&body[..cut]);
            f.feed(&body[cut..]);
            assert_eq!(f.usage(), Some(want), "cut {cut}");
            let mut m = crate::usage::StreamMeter::new();
            m.observe_cohere_meta(want);
            let (u, _) = m.finish(true);
            assert_eq!((u.prompt_tokens, u.total_tokens), (7, 7));
        }
    }

    fn find_split(input: &[u8], cuts: &[usize]) -> Option<Vec<u8>> {
        let mut f = UsageFinder::new();
        for piece in crate::testing::pieces(input, cuts) {
            f.feed(piece);
        }
        f.usage().map(<[u8]>::to_vec)
    }

    const BODY: &str = r#"{"id":"x","object":"chat.completion","choices":[{"message":{"content":"say \"usage\": {}","usage":1}}],"usage": {"prompt_tokens":9,"total_tokens":12,"completion_tokens":3} ,"z":[1]}"#;

    #[test]
    fn finds_top_level_usage_at_every_split() {
        let want = br#"{"prompt_tokens":9,"total_tokens":12,"completion_tokens":3}"#.to_vec();
        for cut in 0..=BODY.len() {
            assert_eq!(
                find_split(BODY.as_bytes(), &[cut]),
                Some(want.clone()),
                "cut {cut}"
            );
        }
    }

    #[test]
    fn ignores_nested_and_non_object_roots() {
        assert_eq!(find_split(br#"{"data":[{"usage":{"a":1}}]}"#, &[]), None);
        assert_eq!(find_split(br#"["usage",{"usage":1}]"#, &[]), None);
        assert_eq!(
            find_split(br#"{"usage":null}"#, &[]),
            Some(b"null".to_vec())
        );
        assert_eq!(find_split(br#"{"usag\u0065":{"a":1}}"#, &[]), None);
    }

    #[test]
    fn large_embedding_body_in_constant_memory() {
        let mut f = UsageFinder::new();
        f.feed(br#"{"object":"list","data":[{"embedding":["#);
        let floats = b"0.0123456,-0.98765,".repeat(1000);
        for _ in 0..200 {
            f.feed(&floats);
        }
        f.feed(br#"1.0]}],"usage":{"prompt_tokens":7,"total_tokens":7}}"#);
        assert_eq!(
            f.usage(),
            Some(&br#"{"prompt_tokens":7,"total_tokens":7}"#[..])
        );
        assert!(f.capture.capacity() <= 1024);
    }

    #[test]
    fn names_near_usage_and_long_escaped_strings() {
        let long = "x".repeat(40);
        let body = format!(
            r#"{{"usagex":1,"usa":2,"{long}\"usage":3,"s":"{long}\\\"{long}","usage":{{"t":"{long}\"}}"}},"usages":4}}"#
        );
        let whole = find_split(body.as_bytes(), &[]);
        assert_eq!(whole, Some(format!(r#"{{"t":"{long}\"}}"}}"#).into_bytes()));
        for cut in 0..=body.len() {
            assert_eq!(find_split(body.as_bytes(), &[cut]), whole, "cut {cut}");
        }
    }

    fn json_value() -> impl Strategy<Value = serde_json::Value> {
        use serde_json::Value;
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            "[a-z\"\\\\{}\\[\\],: ]{0,24}".prop_map(Value::String),
        ];
        leaf.prop_recursive(3, 24, 4, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                proptest::collection::vec(
                    (prop_oneof![Just("usage".to_string()), "[a-z]{1,7}"], inner),
                    0..4
                )
                .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest! {
        #[test]
        fn agrees_with_serde_on_any_document_and_split(
            doc in json_value(),
            cuts in proptest::collection::vec(0usize..400, 0..5),
        ) {
            let body = doc.to_string();
            let want = doc.as_object().and_then(|o| o.get("usage")).cloned();
            let got = find_split(body.as_bytes(), &cuts)
                .map(|raw| serde_json::from_slice::<serde_json::Value>(&raw).unwrap());
            prop_assert_eq!(got, want);
        }
    }

    proptest! {
        /// Documents long enough for whole 64-byte blocks at every depth, strings with
        /// and without escapes across block edges.
        #[test]
        fn agrees_with_serde_on_long_documents(
            docs in proptest::collection::vec(json_value(), 1..6),
            pad in "[a-z \"\\\\{}\\[\\]]{0,90}",
            cuts in proptest::collection::vec(0usize..1200, 0..5),
        ) {
            let doc = serde_json::json!({
                "id": pad,
                "choices": [{"message": {"content": pad, "parts": docs}}, [pad, [pad]]],
                "usage": docs[0],
                "tail": docs,
            });
            let body = doc.to_string();
            let got = find_split(body.as_bytes(), &cuts)
                .map(|raw| serde_json::from_slice::<serde_json::Value>(&raw).unwrap());
            prop_assert_eq!(got, Some(docs[0].clone()));
        }
    }

    proptest! {
        #[test]
        fn same_result_for_any_split(
            prompt in 0u64..1_000_000, completion in 0u64..1_000_000,
            filler in "[a-z\"\\\\{}\\[\\],: ]{0,40}",
            cuts in proptest::collection::vec(0usize..300, 0..6),
        ) {
            let body = serde_json::json!({
                "id": filler, "choices": [{"text": filler}],
                "usage": {"prompt_tokens": prompt, "completion_tokens": completion},
                "tail": {"usage": 0},
            }).to_string();
            let whole = find_split(body.as_bytes(), &[]);
            let v: serde_json::Value = serde_json::from_slice(whole.as_ref().unwrap()).unwrap();
            prop_assert_eq!(v["prompt_tokens"].as_u64(), Some(prompt));
            prop_assert_eq!(find_split(body.as_bytes(), &cuts), whole);
        }
    }
}
