//! Usage extraction: the usage parser (and field-by-field merging), the per-event
//! probe, the stream meter for each stream shape (chat, Responses, Anthropic
//! Messages), the JSON usage finder for `usage` and Cohere's `meta` (same result at any
//! split) and the continuous-mode member strip (what remains is still valid JSON
//! without the member): never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;
use llmproxy::json::member_span;
use llmproxy::usage::finder::UsageFinder;
use llmproxy::usage::probe::probe;
use llmproxy::routes::StreamShape;
use llmproxy::usage::{StreamMeter, Usage};

fuzz_target!(|data: &[u8]| {
    let mut u = Usage::default();
    let _ = u.parse_into(data);
    let mut merged = Usage::default();
    let _ = merged.parse_into(br#"{"input_tokens":3,"output_tokens":1}"#);
    let given = u.prompt_tokens;
    let parsed = merged.clone();
    merged.merge(&u);
    // Counts the later usage did not give are kept.
    if !data.windows(13).any(|w| w == b"prompt_tokens") && !data.windows(12).any(|w| w == b"input_tokens") {
        assert_eq!(merged.prompt_tokens, parsed.prompt_tokens, "{given}");
    }
    let _ = probe(data);
    for shape in [StreamShape::Chat, StreamShape::Responses, StreamShape::Messages] {
        let mut m = StreamMeter::new();
        m.reset(shape);
        let _ = m.observe(data);
        let _ = m.observe(data);
        let (usage, source) = m.finish(false);
        // An estimate bills exactly the output deltas forwarded.
        if source == llmproxy::usage::UsageSource::Estimated {
            assert_eq!(usage.completion_tokens, m.output_deltas);
        }
        let mut meta = StreamMeter::new();
        meta.observe_cohere_meta(data);
        let _ = meta.finish(true);
    }

    // Two events in a row: the meter may recognise the second by the first's shape;
    // it must classify and count it exactly as a fresh probe does.
    let cut2 = data.last().map_or(0, |&b| b as usize).min(data.len());
    let (a, b) = data.split_at(cut2);
    let mut seq = StreamMeter::new();
    let _ = seq.observe(a);
    let before = seq.output_deltas;
    let mut fresh = StreamMeter::new();
    assert_eq!(seq.observe(b), fresh.observe(b));
    assert_eq!(seq.output_deltas - before, fresh.output_deltas);

    for target in [&b"usage"[..], b"meta"] {
        let mut whole = UsageFinder::new();
        whole.reset_for(target);
        whole.feed(data);
        let cut = data.first().map_or(0, |&b| b as usize).min(data.len());
        let mut split = UsageFinder::new();
        split.reset_for(target);
        split.feed(&data[..cut]);
        split.feed(&data[cut..]);
        assert_eq!(whole.usage(), split.usage());
    }

    if let Some(r) = member_span(data, b"usage") {
        assert!(r.start <= r.end && r.end <= data.len());
        // As the relay does: take out every `usage` member.
        let mut rest = data.to_vec();
        while let Some(r) = member_span(&rest, b"usage") {
            rest.drain(r);
        }
        if let Ok(serde_json::Value::Object(before)) = serde_json::from_slice::<serde_json::Value>(data) {
            let after: serde_json::Value = serde_json::from_slice(&rest).expect("strip left invalid JSON");
            let mut want = before.clone();
            want.remove("usage");
            // Keys are compared as raw bytes: an escaped `us\u0061ge` is another key to
            // the proxy, so inputs with escapes are only checked for validity.
            if !data.contains(&b'\\') {
                assert_eq!(after, serde_json::Value::Object(want));
            }
        }
    }
});
