//! Reads usage and output from the events of a streamed response.
//!
//! Chat and text completions: each event's JSON is probed with borrowed,
//! allocation-free visitors: how many choices it has, whether any carries generated
//! output, whether any finished, and its `usage`. Responses and Anthropic Messages
//! streams name their events (`type`); those are read with serde (`typed`). Either
//! way a later valid usage overwrites an earlier one field by field (running totals
//! are never summed); all-zero placeholders are ignored.

use super::probe::{Choices, probe};
use super::{Parsed, Usage, UsageSource};
use crate::routes::StreamShape;
use crate::scan::find_any;
use serde::Deserialize;
use serde_json::value::RawValue;
use std::borrow::Cow;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    /// `"choices": []` with a usage: the chunk the proxy hides from callers who did not
    /// ask for usage.
    UsageOnly,
    /// Carries generated output (content, text, reasoning or a tool call).
    Output,
    Other,
}

#[derive(Debug, Default)]
pub struct StreamMeter {
    shape: StreamShape,
    usage: Usage,
    scratch: Usage,
    has_usage: bool,
    /// The last usage came from a final chunk (no choices, or a finished choice).
    usage_final: bool,
    /// Content-bearing deltas seen, for the `estimated` fallback.
    pub output_deltas: u64,
    pub saw_done: bool,
    pub saw_error: bool,
    /// Events whose data was not JSON (other than `[DONE]`).
    pub unparsed: u64,
    /// The event last observed carried a non-null `usage`.
    pub last_had_usage: bool,
    /// ... a usage that is final (no choices, or a finished choice).
    pub last_usage_final: bool,
    /// ... the first usage of the stream (no running usage came before it).
    pub last_usage_first: bool,
    /// Events that carried a usage so far.
    usage_events: u64,
    /// ... llama.cpp's `timings`.
    pub last_had_timings: bool,
    /// ... a finished choice.
    pub last_finished: bool,
    /// A real `usage` was read: `timings` no longer count.
    real_usage: bool,
    template: Template,
}

/// The last fully probed event of the usual shape (one choice, generated text in a
/// string, no usage, no error), kept to recognise the events after it: a backend's
/// chunks differ only in that string, and an event that is byte for byte the template
/// around it, with text holding no quote or backslash, probes the same but for whether
/// the text is empty. Checking that costs two compares instead of a parse.
#[derive(Debug, Default)]
struct Template {
    valid: bool,
    /// The template event's bytes; the text was `bytes[prefix..bytes.len() - suffix]`.
    bytes: Vec<u8>,
    prefix: usize,
    suffix: usize,
    choices: Choices,
    other_output: bool,
}

impl Template {
    /// The probe of `data` if it is the template with other text.
    fn matches(&self, data: &[u8]) -> Option<Choices> {
        let (p, sfx) = (self.prefix, self.suffix);
        if !self.valid
            || data.len() < p + sfx
            || data[..p] != self.bytes[..p]
            || data[data.len() - sfx..] != self.bytes[self.bytes.len() - sfx..]
        {
            return None;
        }
        let text = &data[p..data.len() - sfx];
        if find_any(text, [b'"', b'\\']) != text.len() {
            return None;
        }
        let output = self.other_output || !text.is_empty();
        Some(Choices {
            with_output: output as u64,
            ..self.choices
        })
    }
}

impl StreamMeter {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn observe(&mut self, data: &[u8]) -> EventKind {
        self.last_had_usage = false;
        self.last_usage_final = false;
        self.last_usage_first = false;
        self.last_had_timings = false;
        self.last_finished = false;
        if data == b"[DONE]" {
            self.saw_done = true;
            return EventKind::Other;
        }
        if self.shape != StreamShape::Chat {
            return self.observe_typed(data);
        }
        if let Some(choices) = self.template.matches(data) {
            self.output_deltas += choices.with_output;
            return if choices.with_output > 0 {
                EventKind::Output
            } else {
                EventKind::Other
            };
        }
        let Some(probe) = probe(data) else {
            self.unparsed += 1;
            return EventKind::Other;
        };
        let t = &mut self.template;
        t.valid = false;
        if let (Some(slot), Some(choices), None, None, false) = (
            &probe.text,
            probe.choices,
            probe.usage,
            probe.timings,
            probe.error,
        ) {
            t.bytes.clear();
            t.bytes.extend_from_slice(data);
            t.prefix = slot.span.start;
            t.suffix = data.len() - slot.span.end;
            t.choices = choices;
            t.other_output = slot.other_output;
            t.valid = true;
        }
        if probe.error {
            self.saw_error = true;
        }
        let choices = probe.choices.unwrap_or_default();
        self.last_had_usage = probe.usage.is_some();
        self.last_usage_first = self.last_had_usage && self.usage_events == 0;
        self.usage_events += u64::from(self.last_had_usage);
        self.last_finished = choices.finished;
        self.last_usage_final = choices.count == 0 || choices.finished;
        if let Some(raw) = probe.timings {
            self.last_had_timings = true;
            // llama.cpp's running counts: what a hang-up is billed from until (and
            // unless) the real usage comes; never over it.
            if !self.real_usage && self.scratch.parse_timings(raw) == Parsed::Valid {
                self.usage.merge(&self.scratch);
                self.has_usage = true;
                self.usage_final = false;
            }
        }
        if let Some(raw) = probe.usage
            && self.scratch.parse_into(raw) == Parsed::Valid
        {
            self.usage.merge(&self.scratch);
            self.has_usage = true;
            self.real_usage = true;
            self.usage_final = self.last_usage_final;
        }
        self.output_deltas += choices.with_output;
        if choices.with_output > 0 {
            EventKind::Output
        } else if choices.count == 0 && probe.usage.is_some() && probe.choices.is_some() {
            EventKind::UsageOnly
        } else {
            EventKind::Other
        }
    }

    /// An event of a Responses or Messages stream (see `StreamShape`).
    fn observe_typed(&mut self, data: &[u8]) -> EventKind {
        let Ok(ev) = serde_json::from_slice::<TypedEvent<'_>>(data) else {
            self.unparsed += 1;
            return EventKind::Other;
        };
        let kind = ev.kind.as_deref().unwrap_or("");
        let (usage, is_final) = match (self.shape, kind) {
            (
                StreamShape::Responses,
                "response.completed" | "response.incomplete" | "response.failed",
            ) => (ev.response.and_then(|r| r.usage), true),
            (StreamShape::Messages, "message_start") => (ev.message.and_then(|m| m.usage), false),
            (StreamShape::Messages, "message_delta") => (ev.usage, true),
            _ => (None, false),
        };
        if kind == "error"
            || kind == "response.failed"
            || ev.error.is_some_and(|e| e.get() != "null")
        {
            self.saw_error = true;
        }
        if let Some(raw) = usage.filter(|u| u.get() != "null") {
            self.last_had_usage = true;
            if self.scratch.parse_into(raw.get().as_bytes()) == Parsed::Valid {
                self.usage.merge(&self.scratch);
                self.has_usage = true;
                self.usage_final = is_final;
            }
        }
        let output = match (self.shape, kind, ev.delta) {
            // `response.output_text.delta`, `.reasoning_text.delta`,
            // `.function_call_arguments.delta`, `.refusal.delta`: a string.
            (StreamShape::Responses, k, Some(d)) if k.ends_with(".delta") => {
                d.get().starts_with('"') && d.get() != "\"\""
            }
            (StreamShape::Messages, "content_block_delta", Some(d)) => {
                serde_json::from_str::<MessagesDelta<'_>>(d.get()).is_ok_and(|d| {
                    [d.text, d.thinking, d.partial_json]
                        .iter()
                        .any(|t| t.as_ref().is_some_and(|t| !t.is_empty()))
                })
            }
            _ => false,
        };
        if output {
            self.output_deltas += 1;
            EventKind::Output
        } else {
            EventKind::Other
        }
    }

    /// Feeds a usage read from somewhere else (a non-streamed body). A usage with no
    /// token count at all (audio seconds) is still the backend's report.
    pub fn observe_usage(&mut self, raw: &[u8]) {
        if matches!(self.scratch.parse_into(raw), Parsed::Valid | Parsed::Zero) {
            self.usage.merge(&self.scratch);
            self.has_usage = true;
            self.usage_final = true;
        }
    }

    /// Reads a usage from Cohere's `meta` member (`billed_units`) of a non-streamed body.
    pub fn observe_cohere_meta(&mut self, meta: &[u8]) {
        #[derive(Deserialize)]
        struct Meta<'a> {
            #[serde(default, borrow)]
            billed_units: Option<&'a RawValue>,
        }
        if let Ok(Meta {
            billed_units: Some(units),
        }) = serde_json::from_slice::<Meta<'_>>(meta)
        {
            self.observe_usage(units.get().as_bytes());
        }
    }

    /// Starts a new response of `shape`, keeping buffer capacity.
    pub fn reset(&mut self, shape: StreamShape) {
        let (mut usage, scratch, mut template) = (
            std::mem::take(&mut self.usage),
            std::mem::take(&mut self.scratch),
            std::mem::take(&mut self.template),
        );
        template.valid = false;
        usage.clear();
        *self = StreamMeter {
            shape,
            usage,
            scratch,
            template,
            ..StreamMeter::default()
        };
    }

    /// The usage to bill and where it came from. `ended_cleanly`: the response reached
    /// its end as the backend framed it.
    pub fn finish(&self, ended_cleanly: bool) -> (Usage, UsageSource) {
        let complete = self.usage_final || ended_cleanly;
        if self.has_usage && !complete && self.output_deltas > self.usage.completion_tokens {
            // A running usage that lags the output forwarded (Anthropic's
            // `message_start` reports the input and no output): the input is the
            // backend's, the output counted from the deltas, and the record says so.
            let mut usage = self.usage.clone();
            usage.completion_tokens = self.output_deltas;
            usage.total_tokens = usage.prompt_tokens.saturating_add(self.output_deltas);
            (usage, UsageSource::Estimated)
        } else if self.has_usage {
            let source = if complete {
                UsageSource::Backend
            } else {
                UsageSource::Partial
            };
            (self.usage.clone(), source)
        } else if self.output_deltas > 0 {
            let n = self.output_deltas;
            (
                Usage {
                    prompt_tokens: 0,
                    completion_tokens: n,
                    total_tokens: n,
                    ..Usage::default()
                },
                UsageSource::Estimated,
            )
        } else {
            (Usage::default(), UsageSource::None)
        }
    }
}

/// What the meter reads of a Responses or Messages event.
#[derive(Deserialize)]
struct TypedEvent<'a> {
    #[serde(default, borrow, rename = "type")]
    kind: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    usage: Option<&'a RawValue>,
    /// Responses: the response object of `response.completed` and the like.
    #[serde(default, borrow)]
    response: Option<WithUsage<'a>>,
    /// Messages: the message of `message_start`.
    #[serde(default, borrow)]
    message: Option<WithUsage<'a>>,
    #[serde(default, borrow)]
    delta: Option<&'a RawValue>,
    #[serde(default, borrow)]
    error: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct WithUsage<'a> {
    #[serde(default, borrow)]
    usage: Option<&'a RawValue>,
}

/// A `content_block_delta`'s delta: text, thinking, or a tool call's JSON.
#[derive(Deserialize)]
struct MessagesDelta<'a> {
    #[serde(default, borrow)]
    text: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    thinking: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    partial_json: Option<Cow<'a, str>>,
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use serde::Deserialize;
    use serde::de::{self, Deserializer, IgnoredAny, SeqAccess, Visitor};
    use serde_json::value::RawValue;
    use std::fmt;

    // The serde-derived probe the hand-written one replaced: the reference it is
    // checked against.
    pub(super) type Probed = Option<(
        Option<(u64, u64, bool)>,
        Option<Vec<u8>>,
        Option<Vec<u8>>,
        bool,
    )>;

    pub(super) fn reference(data: &[u8]) -> Probed {
        let p: ChunkProbe<'_> = serde_json::from_slice(data).ok()?;
        let raw = |v: Option<&RawValue>| {
            v.filter(|v| v.get() != "null")
                .map(|v| v.get().as_bytes().to_vec())
        };
        Some((
            p.choices.map(|c| (c.count, c.with_output, c.finished)),
            raw(p.usage),
            raw(p.timings),
            p.error.is_some() || p.object.is_some_and(|o| o.0),
        ))
    }

    #[derive(Deserialize)]
    struct ChunkProbe<'a> {
        #[serde(default)]
        choices: Option<Choices>,
        #[serde(default, borrow)]
        usage: Option<&'a RawValue>,
        #[serde(default, borrow)]
        timings: Option<&'a RawValue>,
        #[serde(default)]
        error: Option<IgnoredAny>,
        #[serde(default)]
        object: Option<IsError>,
    }

    /// `"object": "error"` (older vLLM error shape).
    struct IsError(bool);

    impl<'de> Deserialize<'de> for IsError {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct V;
            impl Visitor<'_> for V {
                type Value = IsError;
                fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                    f.write_str("a string")
                }
                fn visit_str<E: de::Error>(self, v: &str) -> Result<IsError, E> {
                    Ok(IsError(v == "error"))
                }
            }
            d.deserialize_str(V)
        }
    }

    #[derive(Default, Clone, Copy, Debug)]
    struct Choices {
        count: u64,
        with_output: u64,
        finished: bool,
    }

    impl<'de> Deserialize<'de> for Choices {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct V;
            impl<'de> Visitor<'de> for V {
                type Value = Choices;
                fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                    f.write_str("a list of choices")
                }
                fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Choices, A::Error> {
                    let mut c = Choices::default();
                    while let Some(choice) = seq.next_element::<Choice<'de>>()? {
                        c.count += 1;
                        let d = choice.delta.unwrap_or_default();
                        let output = non_empty(choice.text)
                            || non_empty(d.content)
                            || non_empty(d.reasoning_content)
                            || non_empty(d.reasoning)
                            || non_empty(d.tool_calls)
                            || non_empty(d.function_call);
                        if output {
                            c.with_output += 1;
                        }
                        c.finished |= choice.finish_reason.is_some();
                    }
                    Ok(c)
                }
            }
            d.deserialize_seq(V)
        }
    }

    #[derive(Deserialize, Default)]
    struct Choice<'a> {
        #[serde(default, borrow)]
        delta: Option<Delta<'a>>,
        #[serde(default, borrow)]
        text: Option<&'a RawValue>,
        #[serde(default)]
        finish_reason: Option<IgnoredAny>,
    }

    /// Delta members are taken raw (borrowed, never unescaped), so probing a chunk whose
    /// text has escapes allocates nothing.
    #[derive(Deserialize, Default)]
    struct Delta<'a> {
        #[serde(default, borrow)]
        content: Option<&'a RawValue>,
        #[serde(default, borrow)]
        reasoning_content: Option<&'a RawValue>,
        #[serde(default, borrow)]
        reasoning: Option<&'a RawValue>,
        #[serde(default, borrow)]
        tool_calls: Option<&'a RawValue>,
        #[serde(default, borrow)]
        function_call: Option<&'a RawValue>,
    }

    /// A non-empty string, array or object (`null`, numbers and booleans are not output).
    fn non_empty(v: Option<&RawValue>) -> bool {
        let Some(v) = v else { return false };
        let t = v.get().trim().as_bytes();
        match t.first() {
            Some(b'"') => t.len() > 2,
            Some(b'[' | b'{') => {
                t.len() > 2 && !t[1..t.len() - 1].iter().all(u8::is_ascii_whitespace)
            }
            _ => false,
        }
    }

    fn run(events: &[&str]) -> (StreamMeter, Vec<EventKind>) {
        let mut m = StreamMeter::new();
        let kinds = events.iter().map(|e| m.observe(e.as_bytes())).collect();
        (m, kinds)
    }

    #[test]
    fn vllm_final_usage_chunk() {
        let (m, kinds) = run(&[
            r#"{"id":"c","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null}]}"#,
            r#"{"id":"c","choices":[{"index":0,"delta":{"content":"Hi"},"finish_reason":null}]}"#,
            r#"{"id":"c","choices":[{"index":0,"delta":{"content":""},"finish_reason":"stop"}]}"#,
            r#"{"id":"c","choices":[],"usage":{"prompt_tokens":5,"total_tokens":8,"completion_tokens":3}}"#,
            "[DONE]",
        ]);
        assert_eq!(
            kinds,
            vec![
                EventKind::Other,
                EventKind::Output,
                EventKind::Other,
                EventKind::UsageOnly,
                EventKind::Other
            ]
        );
        let (u, src) = m.finish(true);
        assert_eq!(
            (u.prompt_tokens, u.completion_tokens, u.total_tokens, src),
            (5, 3, 8, UsageSource::Backend)
        );
        assert!(m.saw_done);
        // Hung up after the final usage: still the backend's own numbers.
        assert_eq!(m.finish(false).1, UsageSource::Backend);
    }

    #[test]
    fn vllm_continuous_usage_takes_last_never_sums() {
        let (m, _) = run(&[
            r#"{"choices":[{"index":0,"delta":{"content":"a"}}],"usage":{"prompt_tokens":5,"total_tokens":6,"completion_tokens":1}}"#,
            r#"{"choices":[{"index":0,"delta":{"content":"b"}}],"usage":{"prompt_tokens":5,"total_tokens":7,"completion_tokens":2}}"#,
        ]);
        let (u, src) = m.finish(false);
        assert_eq!(
            (u.completion_tokens, u.total_tokens, src),
            (2, 7, UsageSource::Partial)
        );
        assert_eq!(m.finish(true).1, UsageSource::Backend);
    }

    #[test]
    fn vllm_error_event_both_shapes() {
        let (m, _) = run(&[
            r#"{"error":{"message":"boom","type":"InternalServerError","param":null,"code":500}}"#,
            "[DONE]",
        ]);
        assert!(m.saw_error);
        assert_eq!(m.finish(true).1, UsageSource::None);
        let (m, _) = run(&[r#"{"object":"error","message":"boom","type":"x","code":500}"#]);
        assert!(m.saw_error);
    }

    #[test]
    fn tgi_completions_usage_on_last_choice_chunk() {
        let (m, kinds) = run(&[
            r#"{"choices":[{"index":0,"text":"x","finish_reason":null}],"usage":null}"#,
            r#"{"choices":[{"index":0,"text":"y","finish_reason":"length"}],"usage":{"prompt_tokens":2,"completion_tokens":2,"total_tokens":4}}"#,
        ]);
        assert_eq!(kinds, vec![EventKind::Output, EventKind::Output]);
        let (u, source) = m.finish(false);
        assert_eq!(
            (u.prompt_tokens, u.completion_tokens, u.total_tokens, source),
            (2, 2, 4, UsageSource::Backend)
        );
    }

    #[test]
    fn tgi_chat_usage_chunk_with_empty_id() {
        let (_, kinds) = run(&[
            r#"{"id":"","choices":[],"usage":{"prompt_tokens":2,"completion_tokens":2,"total_tokens":4}}"#,
        ]);
        assert_eq!(kinds, vec![EventKind::UsageOnly]);
    }

    #[test]
    fn ollama_zero_placeholders_are_not_final() {
        let (m, _) = run(&[
            r#"{"choices":[{"index":0,"text":"a","finish_reason":null}],"usage":{"prompt_tokens":0,"completion_tokens":0,"total_tokens":0}}"#,
            r#"{"choices":[{"index":0,"text":"","finish_reason":"stop"}],"usage":{"prompt_tokens":9,"completion_tokens":1,"total_tokens":10}}"#,
            r#"{"choices":[{"index":0,"text":"","finish_reason":"stop"}],"usage":{"prompt_tokens":0,"completion_tokens":0,"total_tokens":0}}"#,
        ]);
        assert_eq!(m.finish(true).0.total_tokens, 10);
    }

    #[test]
    fn sglang_null_fields_and_reasoning_tokens() {
        let (m, kinds) = run(&[
            r#"{"choices":[{"index":0,"delta":{"reasoning_content":"hmm","content":null}}],"usage":null}"#,
            r#"{"choices":[],"usage":{"prompt_tokens":4,"completion_tokens":6,"total_tokens":10,"prompt_tokens_details":null,"reasoning_tokens":2}}"#,
        ]);
        assert_eq!(kinds, vec![EventKind::Output, EventKind::UsageOnly]);
        let (u, _) = m.finish(true);
        assert_eq!((u.total_tokens, u.details.as_str()), (10, ""));
    }

    #[test]
    fn llama_cpp_timings_and_reasoning_total() {
        let (m, _) = run(&[
            r#"{"choices":[],"usage":{"completion_tokens":5,"prompt_tokens":3,"total_tokens":20,"completion_tokens_details":{"reasoning_tokens":12}},"timings":{"prompt_n":3}}"#,
        ]);
        let (u, _) = m.finish(true);
        assert_eq!(u.total_tokens, 20);
        assert_eq!(
            u.details,
            r#""completion_tokens_details":{"reasoning_tokens":12}"#
        );
    }

    #[test]
    fn tool_calls_count_as_output_and_estimate() {
        let (m, kinds) = run(&[
            r#"{"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"arguments":"{"}}]}}]}"#,
            r#"{"choices":[{"index":0,"delta":{"content":"\n\"x\""}}]}"#,
            "not json",
        ]);
        assert_eq!(kinds[..2], [EventKind::Output, EventKind::Output]);
        let (u, src) = m.finish(false);
        assert_eq!(
            (u.prompt_tokens, u.completion_tokens, src),
            (0, 2, UsageSource::Estimated)
        );
        assert_eq!(m.unparsed, 1);
    }
}

#[cfg(test)]
mod differential {
    use super::tests::reference;
    use proptest::prelude::*;

    fn chunk() -> impl Strategy<Value = String> {
        let text = prop_oneof![Just(String::new()), "[a-z \\\\\"\\n{}\\[\\]é]{0,12}"];
        let value = prop_oneof![
            Just("null".to_string()),
            text.clone()
                .prop_map(|t| serde_json::to_string(&t).unwrap()),
            Just("[]".to_string()),
            Just("[{\"index\":0,\"function\":{\"arguments\":\"{\"}}]".to_string()),
            Just("{}".to_string()),
            Just("7".to_string()),
        ];
        let delta = proptest::collection::vec(
            (
                prop_oneof![
                    Just("content"),
                    Just("reasoning_content"),
                    Just("role"),
                    Just("tool_calls")
                ],
                value.clone(),
            ),
            0..3,
        )
        .prop_map(|mut kv| {
            // Unique keys: serde's derive refuses duplicates, which real chunks never have.
            let mut seen = std::collections::HashSet::new();
            kv.retain(|(k, _)| seen.insert(*k));
            format!(
                "{{{}}}",
                kv.iter()
                    .map(|(k, v)| format!("\"{k}\":{v}"))
                    .collect::<Vec<_>>()
                    .join(",")
            )
        });
        let choice = (
            delta,
            value.clone(),
            prop_oneof![Just("null"), Just("\"stop\"")],
            any::<bool>(),
        )
            .prop_map(|(d, t, f, chat)| {
                if chat {
                    format!("{{\"index\":0,\"delta\":{d},\"logprobs\":null,\"finish_reason\":{f}}}")
                } else {
                    format!("{{\"index\":0,\"text\":{t},\"finish_reason\":{f}}}")
                }
            });
        let choices = prop_oneof![
            Just("null".to_string()),
            proptest::collection::vec(choice, 0..3).prop_map(|c| format!("[{}]", c.join(",")))
        ];
        let usage = prop_oneof![Just("null".to_string()), Just("{\"prompt_tokens\":3,\"total_tokens\":5,\"completion_tokens\":2,\"prompt_tokens_details\":{\"cached_tokens\":1}}".to_string())];
        (choices, usage, any::<bool>(), any::<bool>(), any::<bool>(), any::<bool>()).prop_map(
            |(c, u, with_usage, error, spaced, timings)| {
                let mut members = vec![format!("\"id\":\"x\""), format!("\"choices\":{c}")];
                if with_usage {
                    members.push(format!("\"usage\":{u}"));
                }
                if timings {
                    members.push("\"timings\":{\"cache_n\":2,\"prompt_n\":5,\"prompt_ms\":1.5,\"predicted_n\":3}".into());
                }
                if error {
                    members.push("\"error\":{\"message\":\"boom\",\"code\":500}".into());
                }
                let sep = if spaced { " , " } else { "," };
                format!("{{{}}}", members.join(sep))
            },
        )
    }

    proptest! {
        #[test]
        fn hand_written_probe_agrees_with_serde(json in chunk()) {
            let fast = super::probe(json.as_bytes()).map(|p| (p.choices.map(|c| (c.count, c.with_output, c.finished)), p.usage.map(<[u8]>::to_vec), p.timings.map(<[u8]>::to_vec), p.error));
            prop_assert_eq!(fast, reference(json.as_bytes()), "{}", json);
        }

        #[test]
        fn recognised_events_meter_as_a_full_probe_would(
            events in proptest::collection::vec(
                (0usize..6, "[a-z \"\\\\é]{0,6}"),
                1..40,
            ),
        ) {
            // Events of a few shapes in any order, their text anything (quotes and
            // backslashes escaped as a backend would): the meter, which recognises
            // repeats of the last event's shape, counts and classifies exactly as a
            // full probe of each event does.
            let mut meter = crate::usage::StreamMeter::new();
            let mut want_deltas = 0;
            for (shape, text) in &events {
                let t = serde_json::to_string(text).unwrap();
                let data = match shape {
                    0 => format!(r#"{{"id":"c","choices":[{{"index":0,"delta":{{"content":{t}}},"finish_reason":null}}]}}"#),
                    1 => format!(r#"{{"id":"c","choices":[{{"index":0,"delta":{{"role":"assistant","content":{t}}}}}]}}"#),
                    2 => format!(r#"{{"id":"c","choices":[{{"index":0,"text":{t},"finish_reason":"stop"}}]}}"#),
                    3 => format!(r#"{{"id":"c","choices":[{{"index":0,"delta":{{"content":{t},"tool_calls":[{{"id":"t"}}]}}}}]}}"#),
                    4 => format!(r#"{{"id":"c","choices":[],"usage":{{"prompt_tokens":1,"total_tokens":{},"completion_tokens":1}}}}"#, text.len() + 2),
                    _ => format!(r#"{{"id":"c","choices":[{{"index":0,"delta":{{"content":{t}}}}},{{"index":1,"delta":{{"content":""}}}}]}}"#),
                };
                let mut fresh = crate::usage::StreamMeter::new();
                let want = fresh.observe(data.as_bytes());
                want_deltas += fresh.output_deltas;
                prop_assert_eq!(meter.observe(data.as_bytes()), want, "{}", data);
            }
            prop_assert_eq!(meter.output_deltas, want_deltas);
        }

        #[test]
        fn probe_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64), json in chunk(), cut in 0usize..200) {
            let _ = super::probe(&bytes);
            let cut = cut.min(json.len());
            let _ = super::probe(&json.as_bytes()[..cut]);
        }
    }
}
