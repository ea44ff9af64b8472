//! The one JSON lexer. Everything the proxy reads from JSON without serde goes
//! through here: the request scan (`relay::rewrite`), the per-event chunk probe
//! (`usage::probe`), the member cut of the relay's edits (`member_span`), and the
//! streaming usage finder (`usage::finder`), which is the incremental form of the
//! same lexing over the same byte classes.
//!
//! Two strengths of one `Cursor`:
//! - **lenient** (`value`, `string`, `object`): skips values a SIMD search at a time,
//!   following only quotes and brackets, without validating what it skips or
//!   unescaping strings. For backend output read on the relay: it never panics and
//!   gives `None` on what it cannot walk.
//! - **strict** (`value_strict`, `string_strict`, `object_strict`): JSON's grammar,
//!   for a caller's request body, giving up (`None`) on anything it does not take for
//!   sure so that serde decides.
//!
//! Hand-written on purpose: these run per request and per streamed event, where a
//! serde parse cost several times as much (`benches/core.rs`: probe, request scan).

use crate::scan::{find_any, json_plain_len};
use std::ops::Range;

/// A position in a JSON document.
pub struct Cursor<'a> {
    pub d: &'a [u8],
    pub i: usize,
}

impl<'a> Cursor<'a> {
    pub fn new(d: &'a [u8]) -> Self {
        Cursor { d, i: 0 }
    }

    #[inline]
    pub fn ws(&mut self) {
        while self.i < self.d.len() && matches!(self.d[self.i], b' ' | b'\t' | b'\r' | b'\n') {
            self.i += 1;
        }
    }

    #[inline]
    pub fn peek(&self) -> Option<u8> {
        self.d.get(self.i).copied()
    }

    #[inline]
    pub fn bump(&mut self) -> Option<u8> {
        let c = self.peek()?;
        self.i += 1;
        Some(c)
    }

    #[inline]
    pub fn eat(&mut self, c: u8) -> Option<()> {
        (self.bump()? == c).then_some(())
    }

    /// Only whitespace is left.
    pub fn at_end(&mut self) -> bool {
        self.ws();
        self.i == self.d.len()
    }

    /// Lenient: a string at the cursor; the range of its raw contents (inside the
    /// quotes, escapes left as they are and not checked).
    pub fn string(&mut self) -> Option<Range<usize>> {
        if self.peek()? != b'"' {
            return None;
        }
        let start = self.i + 1;
        let mut j = start;
        loop {
            let k = find_any(&self.d[j..], [b'"', b'\\']);
            if j + k == self.d.len() {
                return None;
            }
            if self.d[j + k] == b'\\' {
                j += k + 2;
                if j > self.d.len() {
                    return None;
                }
            } else {
                self.i = j + k + 1;
                return Some(start..j + k);
            }
        }
    }

    /// Lenient: skips one value (after whitespace); returns it, quotes or brackets
    /// included. Inside an array or object only quotes and brackets are followed.
    pub fn value(&mut self) -> Option<&'a [u8]> {
        self.ws();
        let start = self.i;
        match self.peek()? {
            b'"' => {
                self.string()?;
            }
            b'{' | b'[' => {
                let mut depth = 0usize;
                loop {
                    self.i += find_any(&self.d[self.i..], [b'"', b'{', b'}', b'[', b']']);
                    match self.peek()? {
                        b'"' => {
                            self.string()?;
                            continue;
                        }
                        b'{' | b'[' => depth += 1,
                        b'}' | b']' => {
                            depth -= 1;
                            if depth == 0 {
                                self.i += 1;
                                break;
                            }
                        }
                        _ => {}
                    }
                    self.i += 1;
                }
            }
            _ => {
                while self.i < self.d.len()
                    && !matches!(
                        self.d[self.i],
                        b',' | b'}' | b']' | b' ' | b'\t' | b'\r' | b'\n'
                    )
                {
                    self.i += 1;
                }
                if self.i == start {
                    return None;
                }
            }
        }
        Some(&self.d[start..self.i])
    }

    /// Walks an object's members (after whitespace): `f(name, cursor)` is called
    /// with the name's raw contents and the cursor at the value, which `f` must
    /// consume. `STRICT` reads names by JSON's grammar.
    #[inline]
    fn members<const STRICT: bool>(
        &mut self,
        mut f: impl FnMut(Range<usize>, &mut Self) -> Option<()>,
    ) -> Option<()> {
        self.ws();
        self.eat(b'{')?;
        self.ws();
        if self.peek()? == b'}' {
            self.i += 1;
            return Some(());
        }
        loop {
            self.ws();
            let name = if STRICT {
                self.string_strict()?
            } else {
                self.string()?
            };
            self.ws();
            self.eat(b':')?;
            self.ws();
            f(name, self)?;
            self.ws();
            match self.bump()? {
                b',' => {}
                b'}' => return Some(()),
                _ => return None,
            }
        }
    }

    /// Lenient: walks an object; `f(name, cursor)` gets each member's raw name and
    /// must consume its value (`value()` or a closer look).
    #[inline]
    pub fn object(&mut self, mut f: impl FnMut(&'a [u8], &mut Self) -> Option<()>) -> Option<()> {
        let d = self.d;
        self.members::<false>(|name, c| f(&d[name], c))
    }

    /// Strict: a string's contents (inside the quotes). Escapes other than `\u` are
    /// taken; a `\u` escape or a control byte gives up.
    pub fn string_strict(&mut self) -> Option<Range<usize>> {
        self.eat(b'"')?;
        let start = self.i;
        loop {
            self.i += json_plain_len(&self.d[self.i..]);
            match self.bump()? {
                b'"' => return Some(start..self.i - 1),
                b'\\' => match self.bump()? {
                    b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => {}
                    _ => return None,
                },
                _ => return None, // a control byte
            }
        }
    }

    /// Strict: an object at nesting `depth`; `member(name, value)` gets the ranges of
    /// each member's name contents and whole value, and may give up.
    pub fn object_strict(
        &mut self,
        depth: u32,
        mut member: impl FnMut(Range<usize>, Range<usize>) -> Option<()>,
    ) -> Option<()> {
        self.members::<true>(|name, c| {
            let start = c.i;
            c.value_strict(depth + 1)?;
            member(name, start..c.i)
        })
    }

    /// Strict: one value at the cursor (no leading whitespace); nesting deeper than 64
    /// gives up.
    pub fn value_strict(&mut self, depth: u32) -> Option<()> {
        if depth > 64 {
            return None;
        }
        match self.peek()? {
            b'"' => self.string_strict().map(drop),
            b'{' => self.object_strict(depth, |_, _| Some(())),
            b'[' => {
                self.i += 1;
                self.ws();
                if self.peek()? == b']' {
                    self.i += 1;
                    return Some(());
                }
                loop {
                    self.ws();
                    self.value_strict(depth + 1)?;
                    self.ws();
                    match self.bump()? {
                        b',' => {}
                        b']' => return Some(()),
                        _ => return None,
                    }
                }
            }
            b't' => self.literal(b"true"),
            b'f' => self.literal(b"false"),
            b'n' => self.literal(b"null"),
            b'-' | b'0'..=b'9' => self.number(),
            _ => None,
        }
    }

    fn literal(&mut self, word: &[u8]) -> Option<()> {
        let end = self.i + word.len();
        (self.d.get(self.i..end)? == word).then(|| self.i = end)
    }

    /// `-? (0 | [1-9][0-9]*) (. [0-9]+)? ([eE] [+-]? [0-9]+)?`
    fn number(&mut self) -> Option<()> {
        if self.peek() == Some(b'-') {
            self.i += 1;
        }
        match self.bump()? {
            b'0' => {}
            b'1'..=b'9' => self.digits(),
            _ => return None,
        }
        if self.peek() == Some(b'.') {
            self.i += 1;
            self.digit()?;
            self.digits();
        }
        if matches!(self.peek(), Some(b'e' | b'E')) {
            self.i += 1;
            if matches!(self.peek(), Some(b'+' | b'-')) {
                self.i += 1;
            }
            self.digit()?;
            self.digits();
        }
        Some(())
    }

    fn digit(&mut self) -> Option<()> {
        self.bump()?.is_ascii_digit().then_some(())
    }

    fn digits(&mut self) {
        while self.peek().is_some_and(|c| c.is_ascii_digit()) {
            self.i += 1;
        }
    }
}

/// The bytes to remove to drop top-level member `key` from the JSON object `json`
/// (with one adjacent comma: the one before it, else the one after), or `None` when
/// it has no such member or the object cannot be walked that far. Lenient. Used to
/// take the per-chunk `usage` out of a stream for callers who did not ask for it.
pub fn member_span(json: &[u8], key: &[u8]) -> Option<Range<usize>> {
    let mut c = Cursor::new(json);
    c.ws();
    c.eat(b'{')?;
    let mut comma = None;
    loop {
        c.ws();
        let from = c.i;
        let name = c.string()?;
        c.ws();
        c.eat(b':')?;
        c.value()?;
        c.ws();
        let end = c.i;
        let after = c.bump()?;
        if &json[name] == key {
            return Some(match comma {
                Some(at) => at..end,
                None if after == b',' => from..end + 1,
                None => from..end,
            });
        }
        match after {
            b',' => comma = Some(end),
            _ => return None,
        }
    }
}

/// Bit `k` set where byte `k` of a 64-byte block is a quote, a backslash, an opening
/// or a closing bracket (the streaming finder's block step).
pub struct Masks {
    pub quote: u64,
    pub backslash: u64,
    pub open: u64,
    pub close: u64,
}

impl Masks {
    #[inline]
    pub fn of(block: &[u8]) -> Masks {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::x86_64::{
                __m128i, _mm_cmpeq_epi8, _mm_loadu_si128, _mm_movemask_epi8, _mm_or_si128,
                _mm_set1_epi8,
            };
            assert!(block.len() >= 64);
            // SAFETY: SSE2 is part of the x86_64 baseline; the four unaligned 16-byte
            // loads are within `block`, whose length is checked above.
            unsafe {
                let set = |b: u8| _mm_set1_epi8(b as i8);
                let (q, bs, lb, ls, rb, rs) = (
                    set(b'"'),
                    set(b'\\'),
                    set(b'{'),
                    set(b'['),
                    set(b'}'),
                    set(b']'),
                );
                let mut m = Masks {
                    quote: 0,
                    backslash: 0,
                    open: 0,
                    close: 0,
                };
                for k in 0..4 {
                    let v = _mm_loadu_si128(block.as_ptr().add(16 * k).cast::<__m128i>());
                    let bits = |x| u64::from(_mm_movemask_epi8(x) as u16) << (16 * k);
                    m.quote |= bits(_mm_cmpeq_epi8(v, q));
                    m.backslash |= bits(_mm_cmpeq_epi8(v, bs));
                    m.open |= bits(_mm_or_si128(_mm_cmpeq_epi8(v, lb), _mm_cmpeq_epi8(v, ls)));
                    m.close |= bits(_mm_or_si128(_mm_cmpeq_epi8(v, rb), _mm_cmpeq_epi8(v, rs)));
                }
                m
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let mut m = Masks {
                quote: 0,
                backslash: 0,
                open: 0,
                close: 0,
            };
            for (k, &b) in block[..64].iter().enumerate() {
                let bit = 1u64 << k;
                match b {
                    b'"' => m.quote |= bit,
                    b'\\' => m.backslash |= bit,
                    b'{' | b'[' => m.open |= bit,
                    b'}' | b']' => m.close |= bit,
                    _ => {}
                }
            }
            m
        }
    }
}

/// Bit `k` of the result is the XOR of bits `0..=k` of `x`: over a block's quote bits
/// (no escapes), set from an opening quote up to, not including, its closing one.
#[inline]
pub fn prefix_xor(mut x: u64) -> u64 {
    x ^= x << 1;
    x ^= x << 2;
    x ^= x << 4;
    x ^= x << 8;
    x ^= x << 16;
    x ^= x << 32;
    x
}

/// How many leading bytes of `bytes` are none of `"`, `[`, `]`, `{`, `}`.
pub fn skip_plain(bytes: &[u8]) -> usize {
    find_any(bytes, [b'"', b'[', b']', b'{', b'}'])
}

/// Where the first `"` or `\\` in `bytes` is (`bytes.len()` if none).
pub fn find_quote_or_backslash(bytes: &[u8]) -> usize {
    find_any(bytes, [b'"', b'\\'])
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn strip(json: &str) -> String {
        match member_span(json.as_bytes(), b"usage") {
            Some(r) => format!("{}{}", &json[..r.start], &json[r.end..]),
            None => json.to_string(),
        }
    }

    #[test]
    fn skip_plain_stops_at_structure() {
        for (s, n) in [
            ("0.1,2.5e-3,", 11),
            ("0.1,2.5e-3,]x", 11),
            ("01234567{", 8),
            ("0123456\"", 7),
            ("", 0),
            ("[", 0),
            ("abcdefghijklmnop}", 16),
        ] {
            assert_eq!(skip_plain(s.as_bytes()), n, "{s}");
        }
        for b in 0..=255u8 {
            let v = [b'1', b'2', b'3', b'4', b'5', b'6', b'7', b'8', b, b'0'];
            let want = if matches!(b, b'"' | b'[' | b']' | b'{' | b'}') {
                8
            } else {
                10
            };
            assert_eq!(skip_plain(&v), want, "byte {b}");
        }
    }

    #[test]
    fn strips_usage_member_anywhere() {
        assert_eq!(
            strip(r#"{"choices":[1],"usage":{"a":1}}"#),
            r#"{"choices":[1]}"#
        );
        assert_eq!(
            strip(r#"{"usage":{"a":[1,{"b":"}"}]}, "x":2}"#),
            r#"{ "x":2}"#
        );
        assert_eq!(strip(r#"{"usage":null}"#), r#"{}"#);
        assert_eq!(
            strip(r#"{"a":{"usage":1},"b":"usage"}"#),
            r#"{"a":{"usage":1},"b":"usage"}"#
        );
        assert_eq!(
            strip(r#"{"a":1 , "usage" : {} , "c":3}"#),
            r#"{"a":1 , "c":3}"#
        );
    }

    proptest! {
        #[test]
        fn stripping_leaves_the_rest(keys in proptest::collection::btree_map("[a-z\\\"]{1,6}", any::<i32>(), 0..5), with_usage in any::<bool>(), pos in 0usize..6) {
            let mut pairs: Vec<(String, serde_json::Value)> = keys.iter().map(|(k, v)| (k.clone(), serde_json::json!(v))).filter(|(k, _)| k != "usage").collect();
            let want: serde_json::Map<String, serde_json::Value> = pairs.iter().cloned().collect();
            if with_usage {
                pairs.insert(pos.min(pairs.len()), ("usage".into(), serde_json::json!({"prompt_tokens": 1, "x": [1, "}"]})));
            }
            let body = format!("{{{}}}", pairs.iter().map(|(k, v)| format!("{}:{}", serde_json::to_string(k).unwrap(), v)).collect::<Vec<_>>().join(","));
            let out: serde_json::Map<String, serde_json::Value> = serde_json::from_str(&strip(&body)).unwrap();
            prop_assert_eq!(out, want);
        }
    }

    #[test]
    fn prefix_xor_marks_strings() {
        // Quotes at 1, 4 and 7: inside from 1 to 3, and from 7 on.
        assert_eq!(prefix_xor(0b1001_0010), (u64::MAX << 7) | 0b1110);
    }

    #[test]
    fn strict_and_lenient_strings() {
        let mut c = Cursor::new(br#""a\"b" "#);
        assert_eq!(c.string(), Some(1..5));
        let mut c = Cursor::new(br#""a\"b" "#);
        assert_eq!(c.string_strict(), Some(1..5));
        let mut c = Cursor::new(br#""\u0041""#);
        assert!(c.string().is_some());
        let mut c = Cursor::new(br#""\u0041""#);
        assert_eq!(c.string_strict(), None, "a \\u escape is left to serde");
        let mut c = Cursor::new(b"\"a\x01\"");
        assert_eq!(c.string_strict(), None, "a control byte");
    }

    proptest! {
        #[test]
        fn strict_values_are_what_serde_takes(doc in "[\\[\\]{}\",:0-9.eE+ntrufals -]{0,24}") {
            let mut c = Cursor::new(doc.as_bytes());
            c.ws();
            let strict = c.value_strict(0).is_some() && c.at_end();
            if strict {
                prop_assert!(serde_json::from_str::<serde_json::Value>(&doc).is_ok(), "{}", doc);
            }
        }

        #[test]
        fn lenient_walk_of_valid_objects_sees_every_member(m in proptest::collection::btree_map("[a-z\\\"]{0,5}", "[0-9]{1,3}|\"[a-z{}\\[\\]]{0,4}\"|\\[1,\\{\"a\":2\\}\\]|null", 0..6)) {
            let body = format!("{{{}}}", m.iter().map(|(k, v)| format!("{} : {v}", serde_json::to_string(k).unwrap())).collect::<Vec<_>>().join(" , "));
            let mut c = Cursor::new(body.as_bytes());
            let mut seen = Vec::new();
            let walked = c.object(|name, c| {
                seen.push((name.to_vec(), c.value()?.to_vec()));
                Some(())
            });
            prop_assert!(walked.is_some());
            prop_assert!(c.at_end());
            let want: Vec<(Vec<u8>, Vec<u8>)> = m.iter().map(|(k, v)| {
                let q = serde_json::to_string(k).unwrap();
                (q.as_bytes()[1..q.len() - 1].to_vec(), v.as_bytes().to_vec())
            }).collect();
            prop_assert_eq!(seen, want);
        }
    }
}
