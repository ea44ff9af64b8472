//! The request body rewrite: read `model`, `stream`, `user` and `stream_options`, and for
//! a stream make sure the backend is asked for usage, merged into whatever options the
//! caller sent. The body is validated as JSON by one borrowed pass; only the
//! `stream_options` value is re-serialized, everything else is copied byte for byte.

use crate::config::UsageMode;
use crate::json::member_span;
use serde::Deserialize;
use serde_json::value::RawValue;
use std::ops::Range;

#[derive(Debug, Clone, PartialEq)]
pub struct RequestInfo {
    pub model: String,
    pub stream: bool,
    /// `background: true` (Responses API).
    pub background: bool,
    /// The body's `user` field, when it is a string.
    pub user: Option<String>,
    /// The caller itself asked for `stream_options.include_usage`.
    pub caller_wants_usage: bool,
    /// The caller itself asked for `stream_options.continuous_usage_stats`.
    pub caller_wants_continuous: bool,
    /// Where the caller's `stream_options` value (possibly `null`) lies in the body.
    options_span: Option<Range<usize>>,
    options: Option<serde_json::Map<String, serde_json::Value>>,
}

#[derive(Deserialize)]
struct Probe<'a> {
    #[serde(default, borrow)]
    model: Option<&'a RawValue>,
    #[serde(default)]
    stream: Option<bool>,
    #[serde(default, borrow)]
    user: Option<&'a RawValue>,
    #[serde(default, borrow, deserialize_with = "raw_even_null")]
    stream_options: Option<&'a RawValue>,
    #[serde(default)]
    background: Option<bool>,
}

/// Keeps `"stream_options": null` as a raw value so it can be replaced in place.
fn raw_even_null<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<&'de RawValue>, D::Error> {
    <&RawValue>::deserialize(d).map(Some)
}

/// A raw JSON value as a string: a plain one (no escapes) is taken as it is, anything
/// else goes through serde (which also refuses what is not a string).
fn string_value(raw: &str) -> Result<String, serde_json::Error> {
    match raw.strip_prefix('"').and_then(|r| r.strip_suffix('"')) {
        Some(inner) if !inner.contains(['"', '\\']) => Ok(inner.to_owned()),
        _ => serde_json::from_str::<String>(raw),
    }
}

/// Where the members the proxy reads lie in a body (ranges of their raw values).
#[derive(Debug, Default, PartialEq)]
struct Found {
    model: Option<Range<usize>>,
    stream: Option<bool>,
    user: Option<Range<usize>>,
    stream_options: Option<Range<usize>>,
    /// Responses API: `background` (a response the proxy would not see finish).
    background: Option<bool>,
}

/// Reads what the proxy needs from a request body. `Err` carries the message for a
/// 400 `invalid_request`.
pub fn inspect(body: &[u8], require_model: bool) -> Result<RequestInfo, String> {
    let first = body.iter().find(|b| !b.is_ascii_whitespace());
    if first != Some(&b'{') {
        return Err("Request body must be a JSON object.".into());
    }
    // JSON is UTF-8 (RFC 8259), and serde does not check the strings it skips. Checked
    // once here; the scan and serde then read the `str` without checking it again.
    let text =
        std::str::from_utf8(body).map_err(|e| format!("Request body is not valid UTF-8: {e}"))?;
    let found = match scan::request(text.as_bytes()) {
        Some(f) => f,
        None => serde_found(text)?,
    };
    let raw = |r: &Option<Range<usize>>| r.clone().map(|r| &text[r]);
    let model = match raw(&found.model).map(string_value) {
        Some(Ok(m)) if !m.is_empty() => m,
        _ if !require_model => String::new(),
        Some(_) => return Err("'model' must be a non-empty string.".into()),
        None => return Err("'model' is required.".into()),
    };
    let user = raw(&found.user).and_then(|r| string_value(r).ok());
    let options = match raw(&found.stream_options) {
        Some(r) if r != "null" => Some(
            serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(r)
                .map_err(|_| "'stream_options' must be an object.".to_string())?,
        ),
        _ => None,
    };
    let flag = |k: &str| {
        options
            .as_ref()
            .and_then(|o| o.get(k))
            .and_then(|v| v.as_bool())
            .unwrap_or(false)
    };
    Ok(RequestInfo {
        model,
        stream: found.stream.unwrap_or(false),
        background: found.background.unwrap_or(false),
        user,
        caller_wants_usage: flag("include_usage"),
        caller_wants_continuous: flag("continuous_usage_stats"),
        options_span: found.stream_options,
        options,
    })
}

impl RequestInfo {
    /// What a multipart form says (audio): the model, `stream`, and vLLM's flattened
    /// stream options (`stream_include_usage`, `stream_continuous_usage_stats`).
    pub fn from_form(f: crate::http::multipart::Fields) -> Result<RequestInfo, String> {
        use crate::http::multipart::Fields;
        let model = match f.model {
            Some(m) if !m.trim().is_empty() => m,
            _ => return Err("'model' is required (a form field).".into()),
        };
        Ok(RequestInfo {
            model,
            stream: Fields::flag(&f.stream),
            background: false,
            user: f.user,
            caller_wants_usage: Fields::flag(&f.stream_include_usage),
            caller_wants_continuous: Fields::flag(&f.stream_continuous_usage_stats),
            options_span: None,
            options: None,
        })
    }
}

/// For the fuzzer: panics if the scan takes a body that serde reads differently (or
/// refuses).
#[doc(hidden)]
pub fn check_scan_against_serde(body: &[u8]) {
    let Ok(text) = std::str::from_utf8(body) else {
        return;
    };
    if let Some(found) = scan::request(body) {
        assert_eq!(Ok(found), serde_found(text), "scan and serde differ");
    }
}

/// `Found` by serde, for any body the scan did not take; its error is the 400's text.
fn serde_found(text: &str) -> Result<Found, String> {
    let probe: Probe<'_> =
        serde_json::from_str(text).map_err(|e| format!("Request body is not valid JSON: {e}"))?;
    // A raw value borrows from `text`: its offset is where it lies.
    let span = |r: Option<&RawValue>| {
        r.map(|r| {
            let start = r.get().as_ptr() as usize - text.as_ptr() as usize;
            start..start + r.get().len()
        })
    };
    Ok(Found {
        model: span(probe.model),
        stream: probe.stream,
        user: span(probe.user),
        stream_options: span(probe.stream_options),
        background: probe.background,
    })
}

/// A strict scan of a whole request body that finds its top-level `model`, `stream`,
/// `user` and `stream_options` without serde (the serde probe was ~3 % of a worker
/// relaying short requests). It never refuses a body: on anything it does not take
/// for sure (a `\\u` escape, a control byte, a duplicate member the probe would
/// refuse, `stream` not a boolean or null, nesting deeper than 64, any byte outside
/// JSON's grammar) it gives up and serde reads the body, so what is accepted, and
/// every error message, stays serde's. Property-tested against serde.
mod scan {
    use super::Found;
    use crate::json::Cursor;

    /// A boolean member as serde reads an `Option<bool>`: `None` for anything else
    /// (then serde decides, and refuses it).
    fn bool_or_null(v: &[u8]) -> Option<Option<bool>> {
        match v {
            b"true" => Some(Some(true)),
            b"false" => Some(Some(false)),
            b"null" => Some(None),
            _ => None,
        }
    }

    pub(super) fn request(b: &[u8]) -> Option<Found> {
        let mut s = Cursor::new(b);
        let mut f = Found::default();
        let mut stream_seen = false;
        let mut background_seen = false;
        let mut seen = [false; 3];
        s.object_strict(0, |key, v| {
            // Each member once (the probe refuses a duplicate); `model` and `user` null
            // are absent, as serde reads an `Option` (`stream_options` null is kept: it
            // is replaced in place).
            let null = &b[v.clone()] == b"null";
            let once = |seen: &mut bool, slot: &mut Option<std::ops::Range<usize>>, keep_null| {
                (!std::mem::replace(seen, true))
                    .then(|| *slot = (keep_null || !null).then(|| v.clone()))
            };
            match &b[key] {
                b"model" => once(&mut seen[0], &mut f.model, false),
                b"user" => once(&mut seen[1], &mut f.user, false),
                b"stream_options" => once(&mut seen[2], &mut f.stream_options, true),
                b"stream" if !stream_seen => {
                    stream_seen = true;
                    f.stream = bool_or_null(&b[v])?;
                    Some(())
                }
                b"stream" => None,
                b"background" if !background_seen => {
                    background_seen = true;
                    f.background = bool_or_null(&b[v])?;
                    Some(())
                }
                b"background" => None,
                // A member name with an escape may be one of those: serde decides.
                k if k.contains(&b'\\') => None,
                _ => Some(()),
            }
        })?;
        s.at_end().then_some(f)
    }
}

/// The body to send upstream for a stream, asking the backend for usage (and, in
/// continuous mode, running usage on every chunk); `None` when it already does or the
/// request does not stream (vLLM answers 400 to `stream_options` without `stream`).
pub fn rewrite(body: &[u8], info: &RequestInfo, mode: UsageMode) -> Option<Vec<u8>> {
    if !info.stream {
        return None;
    }
    let options = rewrite_options(body, info, mode);
    if mode != UsageMode::LlamacppTimings || member_span(body, b"timings_per_token").is_some() {
        return options;
    }
    // llama.cpp: per-event counts, asked for at the top level (a caller's own
    // `timings_per_token`, either way, is left as it is).
    let body = options.as_deref().unwrap_or(body);
    let brace = body.iter().position(|&b| b == b'{')?;
    let mut out = Vec::with_capacity(body.len() + 26);
    out.extend_from_slice(&body[..=brace]);
    out.extend_from_slice(b"\"timings_per_token\":true,");
    out.extend_from_slice(&body[brace + 1..]);
    Some(out)
}

/// Whether the caller set `timings_per_token` itself (then its timings are its own).
pub fn caller_wants_timings(body: &[u8]) -> bool {
    member_span(body, b"timings_per_token").is_some()
}

/// The body with `stream_options` asking for usage, or `None` when it already does.
fn rewrite_options(body: &[u8], info: &RequestInfo, mode: UsageMode) -> Option<Vec<u8>> {
    let continuous = mode == UsageMode::Continuous;
    if info.caller_wants_usage && (!continuous || info.caller_wants_continuous) {
        return None;
    }
    let keys: &[&str] = if continuous {
        &["include_usage", "continuous_usage_stats"]
    } else {
        &["include_usage"]
    };
    let new_opts = match &info.options_span {
        Some(span) if info.options.is_some() => set_true(&body[span.clone()], keys, info),
        _ => format!(
            "{{{}}}",
            keys.iter()
                .map(|k| format!("\"{k}\":true"))
                .collect::<Vec<_>>()
                .join(",")
        )
        .into_bytes(),
    };
    let mut out = Vec::with_capacity(body.len() + 64);
    match &info.options_span {
        Some(span) => {
            out.extend_from_slice(&body[..span.start]);
            out.extend_from_slice(&new_opts);
            out.extend_from_slice(&body[span.end..]);
        }
        None => {
            let brace = body.iter().position(|&b| b == b'{').unwrap_or(0);
            out.extend_from_slice(&body[..=brace]);
            out.extend_from_slice(b"\"stream_options\":");
            out.extend_from_slice(&new_opts);
            out.push(b',');
            out.extend_from_slice(&body[brace + 1..]);
        }
    }
    Some(out)
}

/// The caller's `stream_options` object with `keys` set to `true`, every other byte
/// kept as the caller wrote it (re-serializing would change how numbers are written).
fn set_true(obj: &[u8], keys: &[&str], info: &RequestInfo) -> Vec<u8> {
    let mut v = obj.to_vec();
    for k in keys {
        while let Some(r) = member_span(&v, k.as_bytes()) {
            v.drain(r);
        }
    }
    // A key written with escapes (`include\u005fusage`) is not found by its bytes: if
    // one is still there, rebuild the object from its parsed form so that the caller's
    // value cannot win.
    let still_there = serde_json::from_slice::<serde_json::Map<String, serde_json::Value>>(&v)
        .map_or(true, |m| keys.iter().any(|k| m.contains_key(*k)));
    if still_there {
        let mut opts = info.options.clone().unwrap_or_default();
        for k in keys {
            opts.insert((*k).into(), true.into());
        }
        return serde_json::Value::Object(opts).to_string().into_bytes();
    }
    let brace = v.iter().position(|&b| b == b'{').unwrap_or(0);
    let empty = v[brace + 1..].iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'}');
    let mut insert = keys
        .iter()
        .map(|k| format!("\"{k}\":true"))
        .collect::<Vec<_>>()
        .join(",");
    if !empty {
        insert.push(',');
    }
    v.splice(brace + 1..brace + 1, insert.bytes());
    v
}

/// `inspect` then `rewrite`, for tests and benches.
pub fn inspect_and_rewrite(
    body: &[u8],
    require_model: bool,
    mode: Option<UsageMode>,
) -> Result<(RequestInfo, Option<Vec<u8>>), String> {
    let info = inspect(body, require_model)?;
    let out = mode.and_then(|m| rewrite(body, &info, m));
    Ok((info, out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::{Value, json};

    fn rewrite(body: &Value, mode: UsageMode) -> (RequestInfo, Value) {
        let bytes = serde_json::to_vec(body).unwrap();
        let (info, out) = inspect_and_rewrite(&bytes, true, Some(mode)).unwrap();
        let v = out.map_or(body.clone(), |o| serde_json::from_slice(&o).unwrap());
        (info, v)
    }

    #[test]
    fn llamacpp_timings_mode_asks_for_per_token_timings_unless_the_caller_chose() {
        let body = json!({"model":"m","messages":[],"stream":true});
        let (_, out) = rewrite(&body, UsageMode::LlamacppTimings);
        assert_eq!(out["timings_per_token"], true);
        assert_eq!(out["stream_options"], json!({"include_usage": true}));
        let body = json!({"model":"m","messages":[],"stream":true,"timings_per_token":false,"stream_options":{"include_usage":true}});
        let (_, out) = rewrite(&body, UsageMode::LlamacppTimings);
        assert_eq!(out, body, "the caller's own choice stands");
        let body = json!({"model":"m","messages":[]});
        assert_eq!(rewrite(&body, UsageMode::LlamacppTimings).1, body);
    }

    #[test]
    fn injects_include_usage_for_streams_only() {
        let body = json!({"model":"m","messages":[{"role":"user","content":"hi"}],"stream":true});
        let (info, out) = rewrite(&body, UsageMode::Final);
        assert!(!info.caller_wants_usage);
        let mut want = body.clone();
        want["stream_options"] = json!({"include_usage": true});
        assert_eq!(out, want);
        let body = json!({"model":"m","stream":false});
        assert_eq!(rewrite(&body, UsageMode::Final).1, body);
    }

    #[test]
    fn merges_into_caller_options() {
        let body =
            json!({"model":"m","stream":true,"stream_options":{"include_usage":false,"x":1}});
        let (_, out) = rewrite(&body, UsageMode::Continuous);
        assert_eq!(
            out["stream_options"],
            json!({"include_usage":true,"x":1,"continuous_usage_stats":true})
        );
        let body = json!({"model":"m","stream":true,"stream_options":null});
        assert_eq!(
            rewrite(&body, UsageMode::Final).1["stream_options"],
            json!({"include_usage":true})
        );
        let body = json!({"model":"m","stream":true,"stream_options":{"include_usage":true}});
        let (info, out) = rewrite(&body, UsageMode::Final);
        assert!(info.caller_wants_usage);
        assert_eq!(out, body);
    }

    #[test]
    fn keeps_the_callers_bytes_in_stream_options() {
        let body = br#"{"model":"m","stream":true,"stream_options":{"x":60000000000000004014263453644838226,"include_usage":false}}"#;
        let (_, out) = inspect_and_rewrite(body, true, Some(UsageMode::Final)).unwrap();
        assert_eq!(
            String::from_utf8(out.unwrap()).unwrap(),
            r#"{"model":"m","stream":true,"stream_options":{"include_usage":true,"x":60000000000000004014263453644838226}}"#
        );
        let escaped =
            br#"{"model":"m","stream":true,"stream_options":{"include\u005fusage":false}}"#;
        let (_, out) = inspect_and_rewrite(escaped, true, Some(UsageMode::Final)).unwrap();
        let v: Value = serde_json::from_slice(&out.unwrap()).unwrap();
        assert_eq!(v["stream_options"]["include_usage"], true);
    }

    #[test]
    fn rejects_bad_bodies() {
        for bad in [
            &b"not json"[..],
            b"[1]",
            b"{\"model\":1}",
            b"{\"messages\":[]}",
            b"{\"model\":\"m\"",
            b"{\"model\":\"m\",\"model\":\"n\"}",
            b"{\"model\":\"m\",\"stream\":\"yes\"}",
            b"{\"model\":\"m\",\"stream\":true,\"stream_options\":5}",
        ] {
            assert!(
                inspect_and_rewrite(bad, true, Some(UsageMode::Final)).is_err(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        assert!(inspect_and_rewrite(b"{}", false, None).is_ok());
    }

    #[test]
    fn reads_user_and_model() {
        let (info, _) =
            inspect_and_rewrite(br#" {"model":"m\u00e9","user":"u1"}"#, true, None).unwrap();
        assert_eq!(
            (info.model.as_str(), info.user.as_deref()),
            ("mé", Some("u1"))
        );
    }

    fn any_json() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            any::<f64>()
                .prop_filter("finite", |f| f.is_finite())
                .prop_map(Value::from),
            "[a-z\"\\\\/\n\t\u{1}\u{e9} ]{0,12}".prop_map(Value::String),
        ];
        leaf.prop_recursive(3, 16, 4, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                proptest::collection::vec(("[a-z]{1,6}", inner), 0..4)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest! {
        /// Whatever the scan takes, serde takes too, finding the same members; and the
        /// usual request is taken by the scan.
        #[test]
        fn the_scan_takes_only_what_serde_takes_and_finds_the_same(
            members in proptest::collection::vec((0usize..8, any_json()), 0..7),
            pretty in any::<bool>(),
            edit in proptest::option::of((0usize..400, any::<u8>())),
            cut in proptest::option::of(0usize..400),
            tail in proptest::sample::select(vec!["", " \n", "x", "}", ","]),
        ) {
            const NAMES: [&str; 8] = ["model", "stream", "user", "stream_options", "messages",
                "max_tokens", "mod\\u0065l", "stream\\n"];
            let mut text = String::from("{");
            for (k, (name, v)) in members.iter().enumerate() {
                if k > 0 {
                    text.push_str(if pretty { ",\n  " } else { "," });
                }
                let v = if pretty { serde_json::to_string_pretty(v).unwrap() } else { v.to_string() };
                text.push_str(&format!("\"{}\":{}{v}", NAMES[*name], if pretty { " " } else { "" }));
            }
            text.push('}');
            text.push_str(tail);
            let mut bytes = text.into_bytes();
            if let Some((at, b)) = edit && !bytes.is_empty() {
                let at = at % bytes.len();
                bytes[at] = b;
            }
            if let Some(c) = cut {
                bytes.truncate(c.min(bytes.len()));
            }
            let Ok(text) = std::str::from_utf8(&bytes) else { return Ok(()) };
            if let Some(found) = scan::request(text.as_bytes()) {
                prop_assert_eq!(Ok(found), serde_found(text));
            }
        }
    }

    #[test]
    fn the_usual_request_is_taken_by_the_scan() {
        let body = r#"{"model":"m","messages":[{"role":"user","content":"say \"hi\"\n"}],"max_tokens":64,"temperature":0.7,"stream":true,"stream_options":{"include_usage":false},"user":"u1"}"#;
        let found = scan::request(body.as_bytes()).expect("taken by the scan");
        assert_eq!(Ok(found), serde_found(body));
        // Refusals stay serde's: the scan gives up, it never refuses.
        for bad in [
            r#"{"model":"m",}"#,
            r#"{"model":"m","model":"n"}"#,
            r#"{"stream":1}"#,
            r#"{"a":01}"#,
            "{\"model\":\"a\u{1}b\"}",
            r#"{"model":"\u0041"}"#,
            r#"{"a":[1,]}"#,
            r#"{"a":1.}"#,
            r#"{"a":tru}"#,
        ] {
            assert!(scan::request(bad.as_bytes()).is_none(), "{bad}");
        }
    }

    proptest! {
        /// `model` and `user` read as serde reads them, escapes and all; a value that
        /// is not a string is refused (model) or ignored (user).
        #[test]
        fn model_and_user_read_as_serde_does(
            model in prop_oneof![
                "[a-zA-Z0-9/._:-]{1,20}".prop_map(Value::String),
                "[a-z\"\\\\\u{e9}\u{1F600}\n\t ]{1,12}".prop_map(Value::String),
                any::<i32>().prop_map(Value::from),
                Just(Value::Null),
            ],
            user in prop_oneof![
                "[a-z\"\\\\ ]{0,10}".prop_map(Value::String),
                Just(json!(["u"])),
            ],
        ) {
            let body = json!({"model": model, "messages": [], "user": user}).to_string();
            let got = inspect(body.as_bytes(), true);
            match model.as_str() {
                Some(m) if !m.is_empty() => {
                    let info = got.unwrap();
                    prop_assert_eq!(info.model.as_str(), m);
                    prop_assert_eq!(info.user.as_deref(), user.as_str());
                }
                _ => prop_assert!(got.is_err()),
            }
        }
    }

    proptest! {
        #[test]
        fn output_is_input_plus_option(
            model in "[a-zA-Z0-9/\\-\"\\\\ é]{1,20}",
            content in ".{0,50}",
            extra in proptest::option::of(proptest::collection::btree_map("[a-z_]{1,8}", any::<i32>(), 0..3)),
            stream in any::<bool>(),
            spaced in any::<bool>(),
        ) {
            let mut body = json!({"model": model, "messages": [{"role": "user", "content": content}], "stream": stream});
            if let Some(extra) = &extra { body["stream_options"] = json!(extra); }
            let bytes = if spaced { serde_json::to_vec_pretty(&body).unwrap() } else { serde_json::to_vec(&body).unwrap() };
            let (info, out) = inspect_and_rewrite(&bytes, true, Some(UsageMode::Final)).unwrap();
            prop_assert_eq!(&info.model, &model);
            let got: Value = match out { Some(o) => serde_json::from_slice(&o).unwrap(), None => body.clone() };
            let mut want = body.clone();
            if stream {
                let mut opts = extra.map(|e| json!(e)).unwrap_or(json!({}));
                opts["include_usage"] = json!(true);
                want["stream_options"] = opts;
            }
            prop_assert_eq!(got, want);
        }
    }
}
