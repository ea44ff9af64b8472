//! The per-event probe of a streamed chunk: one pass over the JSON bytes that finds
//! what metering needs — how many choices, whether any carries output or finished,
//! the raw `usage` value, an error — without unescaping strings or validating what it
//! skips. This runs for every event of every stream, so it is hand-written: it costs a
//! fraction of a serde parse. It walks with the lenient `json::Cursor`. The `usage` value it finds is still parsed strictly.
//! Malformed JSON gives `None`; it never panics (property-tested against a serde
//! reference in `stream.rs`).

use crate::json::Cursor;

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Choices {
    pub count: u64,
    pub with_output: u64,
    pub finished: bool,
}

#[derive(Debug, Default, PartialEq, Eq)]
pub struct Probe<'a> {
    /// `None` when absent or `null`.
    pub choices: Option<Choices>,
    /// The raw `usage` value, when present and not `null`.
    pub usage: Option<&'a [u8]>,
    /// The raw `timings` value (llama.cpp's counts: `prompt_n`, `cache_n`,
    /// `predicted_n`), when present and not `null`.
    pub timings: Option<&'a [u8]>,
    /// A non-null `error`, or `"object": "error"`.
    pub error: bool,
    /// With exactly one choice whose generated text (`delta.content` or `text`) is a
    /// string: where that string's contents are in the event. Lets the meter recognise
    /// the next events of the stream, which differ only there.
    pub text: Option<TextSlot>,
}

/// The generated-text string of a one-choice event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TextSlot {
    /// The string's contents (inside the quotes).
    pub span: std::ops::Range<usize>,
    /// The choice has output besides this string (reasoning, a tool call).
    pub other_output: bool,
}

/// Where the contents of string value `v` (a slice of `d`, quotes included) are in `d`.
fn inner(d: &[u8], v: &[u8]) -> std::ops::Range<usize> {
    let at = v.as_ptr() as usize - d.as_ptr() as usize;
    at + 1..at + v.len() - 1
}

fn is_null(v: &[u8]) -> bool {
    v == b"null"
}

/// A non-empty string, array or object (`null`, numbers and booleans are not output).
fn non_empty(v: &[u8]) -> bool {
    match v.first() {
        Some(b'"') => v.len() > 2,
        Some(b'[' | b'{') => v.len() > 2 && !v[1..v.len() - 1].iter().all(u8::is_ascii_whitespace),
        _ => false,
    }
}

fn choices(c: &mut Cursor<'_>, text: &mut Option<TextSlot>) -> Option<Choices> {
    let mut out = Choices::default();
    let mut slot: Option<TextSlot>;
    c.ws();
    c.eat(b'[')?;
    c.ws();
    if c.peek()? == b']' {
        c.i += 1;
        return Some(out);
    }
    loop {
        c.ws();
        if c.peek()? != b'{' {
            return None;
        }
        let mut output = false;
        let mut other = false;
        let mut text_span = None;
        // Both a `text` and a `delta.content` string: no single slot.
        let mut strings = 0;
        c.object(|key, c| {
            match key {
                b"delta" => {
                    c.ws();
                    if c.peek()? == b'{' {
                        c.object(|k, c| {
                            let v = c.value()?;
                            match k {
                                b"content" => {
                                    output |= non_empty(v);
                                    if v.first() == Some(&b'"') {
                                        text_span = Some(inner(c.d, v));
                                        strings += 1;
                                    }
                                }
                                b"reasoning_content" | b"reasoning" | b"tool_calls"
                                | b"function_call" => {
                                    output |= non_empty(v);
                                    other |= non_empty(v);
                                }
                                _ => {}
                            }
                            Some(())
                        })?;
                    } else {
                        c.value()?;
                    }
                }
                b"text" => {
                    let v = c.value()?;
                    output |= non_empty(v);
                    if v.first() == Some(&b'"') {
                        text_span = Some(inner(c.d, v));
                        strings += 1;
                    }
                }
                b"finish_reason" => out.finished |= !is_null(c.value()?),
                _ => {
                    c.value()?;
                }
            }
            Some(())
        })?;
        out.count += 1;
        out.with_output += output as u64;
        slot = text_span.filter(|_| strings == 1).map(|span| TextSlot {
            span,
            other_output: other,
        });
        c.ws();
        match c.peek()? {
            b',' => c.i += 1,
            b']' => {
                c.i += 1;
                *text = if out.count == 1 { slot } else { None };
                return Some(out);
            }
            _ => return None,
        }
    }
}

/// Whether every top-level member name of the JSON object `data` is one of `allowed`
/// (a name written with an escape never is; malformed JSON never is). The cursor skips
/// values a SIMD search at a time: it runs on the relay, once a stream.
pub fn only_members(data: &[u8], allowed: &[&str]) -> bool {
    let mut c = Cursor::new(data);
    let mut all = true;
    let parsed = c.object(|key, c| {
        all &= allowed.iter().any(|a| a.as_bytes() == key);
        c.value().map(|_| ())
    });
    parsed.is_some() && all
}

/// Probes one event's data. `None`: not a JSON object.
pub fn probe(data: &[u8]) -> Option<Probe<'_>> {
    let mut c = Cursor::new(data);
    let mut p = Probe::default();
    c.object(|key, c| {
        match key {
            b"choices" => {
                c.ws();
                if c.peek()? == b'[' {
                    p.choices = Some(choices(c, &mut p.text)?);
                } else if !is_null(c.value()?) {
                    return None;
                }
            }
            b"usage" => {
                let v = c.value()?;
                p.usage = (!is_null(v)).then_some(v);
            }
            b"timings" => {
                let v = c.value()?;
                p.timings = (!is_null(v)).then_some(v);
            }
            b"error" => p.error |= !is_null(c.value()?),
            b"object" => p.error |= c.value()? == b"\"error\"",
            _ => {
                c.value()?;
            }
        }
        Some(())
    })?;
    c.at_end().then_some(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_members_reads_top_level_names() {
        let std = ["id", "choices", "usage"];
        assert!(only_members(
            br#"{"id":"x","choices":[{"timings":1}],"usage":{"a":{"b":2}}}"#,
            &std
        ));
        assert!(!only_members(
            br#"{"id":"x","timings":{"prompt_n":1}}"#,
            &std
        ));
        assert!(!only_members(br#"{"i\u0064":"x"}"#, &std));
        assert!(only_members(br#"{"id":"a,\"timings\":1"}"#, &std));
        assert!(only_members(b"{}", &std));
        assert!(!only_members(b"{\"id\":", &std));
    }

    #[test]
    fn vllm_chunks() {
        let p = probe(br#"{"id":"c","choices":[{"index":0,"delta":{"content":"a\"}\\"},"finish_reason":null}],"usage":{"prompt_tokens":1}}"#).unwrap();
        assert_eq!(
            p.choices,
            Some(Choices {
                count: 1,
                with_output: 1,
                finished: false
            })
        );
        assert_eq!(p.usage, Some(&br#"{"prompt_tokens":1}"#[..]));
        let p = probe(br#" { "choices" : [ ] , "usage" : null } "#).unwrap();
        assert_eq!((p.choices, p.usage), (Some(Choices::default()), None));
        assert!(
            probe(br#"{"error":{"message":"x","code":500}}"#)
                .unwrap()
                .error
        );
        assert!(probe(br#"{"object":"error","message":"x"}"#).unwrap().error);
    }

    #[test]
    fn malformed_is_none_never_a_panic() {
        for bad in [
            &b""[..],
            b"{",
            b"{\"a\"",
            b"{\"a\":",
            b"{\"a\":1",
            b"{\"a\":1,}",
            b"[1]",
            b"{\"a\":\"\\",
            b"{\"choices\":[{]}",
            b"{\"choices\":5}",
            b"{} x",
        ] {
            assert_eq!(probe(bad), None, "{}", String::from_utf8_lossy(bad));
        }
    }
}
