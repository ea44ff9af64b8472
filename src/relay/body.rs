//! What happens to response body bytes between the backend and the caller, as a pure
//! state machine (no I/O): each decoded span is metered and appended to the caller's
//! output buffer, framed as chunks when the caller gets chunked encoding.
//!
//! SSE streams go through the scanner and the stream meter. When events may be cut or
//! rewritten (the usage-only chunk the proxy asked for, per-chunk usage in continuous
//! mode), the bytes of an event that has begun but not ended are held until its blank
//! line arrives — an SSE client cannot act on half an event, so nobody can see the
//! difference — and everything else is appended as it arrives. JSON bodies go through
//! the usage finder. Every buffer is kept across responses: a relay in steady state
//! does not allocate.

use crate::http::body::{LAST_CHUNK, encode_chunk, push_hex};
use crate::json::member_span;
use crate::routes::{StreamShape, UsageAt};
use crate::sse::SseScanner;
use crate::usage::finder::UsageFinder;
use crate::usage::{EventKind, StreamMeter};
use std::ops::Range;
use std::time::Instant;

/// A held (unfinished) event larger than this is forwarded as is: usage-only chunks
/// are a few hundred bytes, so such an event is never one to cut.
const MAX_HOLD: usize = 64 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Not metered: bytes pass through.
    Raw,
    /// A JSON body: the top-level `usage` is read on the way.
    Json,
    Sse(Edits),
}

/// What the relay changes in a stream so that the caller sees what the backend would
/// have sent it without the proxy's own requests (SPEC: "Streaming").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Edits {
    /// The caller did not ask for usage: cut the usage-only chunk, and take `usage`
    /// out of any other event that carries one. A usage-only chunk with members beyond
    /// the standard ones (llama.cpp's `timings`) is forwarded with only `usage` out.
    pub hide_usage_only: bool,
    /// Take `usage` out of chunks with output (continuous usage requested by the
    /// proxy, not the caller)...
    pub strip_chunk_usage: bool,
    /// ...but not the final usage when the caller asked for usage: it reaches the
    /// caller on whatever event the backend put it (a finished choice's usage is that
    /// when no running usage came before it: llama.cpp's completions).
    pub keep_final_usage: bool,
    /// Take llama.cpp's per-token `timings` out of unfinished events (requested by the
    /// proxy, not the caller); the final timings stay.
    pub strip_timings: bool,
}

/// The members of a chunk that every OpenAI-style usage-only chunk may have: a hidden
/// chunk with anything else is forwarded without its `usage` instead of cut.
const STANDARD_MEMBERS: [&str; 7] = [
    "id",
    "object",
    "created",
    "model",
    "choices",
    "usage",
    "system_fingerprint",
];

impl Mode {
    /// The caller may get different bytes than the backend sent (so no Content-Length).
    pub fn rewrites(self) -> bool {
        matches!(self, Mode::Sse(e) if e.hide_usage_only || e.strip_chunk_usage || e.strip_timings)
    }
}

/// An event to replace: bytes `start..end` of the stream become `edit_buf[with]`.
struct Edit {
    start: u64,
    end: u64,
    with: Range<usize>,
}

pub struct BodyRelay {
    mode: Mode,
    usage_at: UsageAt,
    chunked: bool,
    scanner: SseScanner,
    finder: UsageFinder,
    pub meter: StreamMeter,
    /// When the first event with generated output was relayed.
    pub first_output: Option<Instant>,
    hold: Vec<u8>,
    hold_next: Vec<u8>,
    edits: Vec<Edit>,
    edit_buf: Vec<u8>,
    /// A cut event ended on a CR at the end of the last span: an LF at this offset
    /// belongs to its line end and is cut too.
    cut_lf_at: Option<u64>,
}

impl Default for BodyRelay {
    fn default() -> Self {
        BodyRelay {
            mode: Mode::Raw,
            usage_at: UsageAt::Usage,
            chunked: false,
            scanner: SseScanner::new(),
            finder: UsageFinder::new(),
            meter: StreamMeter::new(),
            first_output: None,
            hold: Vec::new(),
            hold_next: Vec::new(),
            edits: Vec::new(),
            edit_buf: Vec::new(),
            cut_lf_at: None,
        }
    }
}

impl BodyRelay {
    /// Starts a new response body, keeping every buffer's capacity. `shape` and
    /// `usage_at` say where the route's responses report usage.
    pub fn start(&mut self, mode: Mode, chunked: bool, shape: StreamShape, usage_at: UsageAt) {
        self.mode = mode;
        self.usage_at = usage_at;
        self.chunked = chunked;
        self.scanner.reset();
        self.finder.reset_for(match usage_at {
            UsageAt::Usage => b"usage",
            UsageAt::CohereMeta => b"meta",
        });
        self.meter.reset(shape);
        self.first_output = None;
        self.hold.clear();
        self.cut_lf_at = None;
    }

    /// Relays one span of decoded body bytes into `out`.
    pub fn on_span(&mut self, span: &[u8], out: &mut Vec<u8>) {
        self.on_chunk(span, None, out);
    }

    /// `on_span`, for a span that is the data of the backend's chunk `whole` (as the
    /// decoder hands it out): a chunked caller gets `whole` as it is when nothing in it
    /// changes, the same bytes framing it again would give.
    pub fn on_chunk(&mut self, span: &[u8], whole: Option<&[u8]>, out: &mut Vec<u8>) {
        let whole = whole.filter(|_| self.chunked);
        match self.mode {
            Mode::Raw => frame_as(out, self.chunked, span, whole),
            Mode::Json => {
                self.finder.feed(span);
                frame_as(out, self.chunked, span, whole);
            }
            Mode::Sse(edits) if !Mode::Sse(edits).rewrites() => {
                let (meter, first) = (&mut self.meter, &mut self.first_output);
                self.scanner.feed(span, |ev| {
                    if meter.observe(ev.data) == EventKind::Output && first.is_none() {
                        *first = Some(Instant::now());
                    }
                });
                frame_as(out, self.chunked, span, whole);
            }
            Mode::Sse(edits) => self.edit_span(span, whole, out, edits),
        }
    }

    fn edit_span(&mut self, span: &[u8], whole: Option<&[u8]>, out: &mut Vec<u8>, edits: Edits) {
        let span_base = self.scanner.position();
        let hold_base = span_base - self.hold.len() as u64;
        self.edits.clear();
        self.edit_buf.clear();
        if self.cut_lf_at.take() == Some(span_base) && span.first() == Some(&b'\n') {
            self.edits.push(Edit {
                start: span_base,
                end: span_base + 1,
                with: 0..0,
            });
        }
        let src = Source {
            hold: &self.hold,
            hold_base,
            span,
            span_base,
        };
        let (meter, first, edits_out, buf, cut_lf_at) = (
            &mut self.meter,
            &mut self.first_output,
            &mut self.edits,
            &mut self.edit_buf,
            &mut self.cut_lf_at,
        );
        self.scanner.feed(span, |ev| {
            let kind = meter.observe(ev.data);
            if kind == EventKind::Output && first.is_none() {
                *first = Some(Instant::now());
            }
            match cut_for(kind, meter, edits, ev.data) {
                Cut::Nothing => {}
                Cut::Event => {
                    edits_out.push(Edit {
                        start: ev.start,
                        end: ev.end,
                        with: 0..0,
                    });
                    if ev.lf_may_follow {
                        *cut_lf_at = Some(ev.end);
                    }
                }
                Cut::Members(members) => {
                    if members.iter().any(|m| member_span(ev.data, m).is_some()) {
                        edits_out.push(without_members(&ev, members, &src, buf));
                    }
                }
            }
        });
        if self.edits.is_empty()
            && self.hold.is_empty()
            && self.scanner.pending_event_start().is_none()
        {
            // Whole events, none to change (most spans of a stream): as they came.
            frame_as(out, self.chunked, span, whole);
            return;
        }
        let span_end = span_base + span.len() as u64;
        let mut cursor = hold_base;
        for edit in &self.edits {
            if edit.start < cursor {
                continue; // began in bytes already forwarded: cannot be changed
            }
            src.emit(out, self.chunked, cursor, edit.start);
            if !edit.with.is_empty() {
                frame(out, self.chunked, &self.edit_buf[edit.with.clone()]);
            }
            cursor = edit.end.min(span_end);
        }
        let mut keep = self
            .scanner
            .pending_event_start()
            .unwrap_or(span_end)
            .max(cursor);
        if span_end - keep > MAX_HOLD as u64 {
            keep = span_end;
        }
        src.emit(out, self.chunked, cursor, keep);
        self.hold_next.clear();
        src.copy(&mut self.hold_next, keep, span_end);
        std::mem::swap(&mut self.hold, &mut self.hold_next);
    }

    /// The body ended as framed: forward anything held and close the chunked body.
    pub fn finish(&mut self, out: &mut Vec<u8>) {
        if !self.hold.is_empty() {
            frame(out, self.chunked, &self.hold);
            self.hold.clear();
        }
        if self.chunked {
            out.extend_from_slice(LAST_CHUNK);
        }
    }

    /// Reads the usage a JSON body carried into the meter.
    pub fn finish_metering(&mut self) {
        if self.mode == Mode::Json
            && let Some(raw) = self.finder.usage()
        {
            match self.usage_at {
                UsageAt::Usage => self.meter.observe_usage(raw),
                UsageAt::CohereMeta => self.meter.observe_cohere_meta(raw),
            }
        }
    }
}

/// What to take out of one event before the caller sees it.
enum Cut {
    Nothing,
    /// The whole event (the usage-only chunk the caller did not ask for).
    Event,
    /// These top-level members.
    Members(&'static [&'static [u8]]),
}

/// What `edits` take out of an event the meter just saw as `kind`.
fn cut_for(kind: EventKind, meter: &StreamMeter, edits: Edits, data: &[u8]) -> Cut {
    let (cut_usage, cut_timings) = if kind == EventKind::UsageOnly {
        if !edits.hide_usage_only {
            (false, false)
        } else if only_standard_members(data) {
            return Cut::Event;
        } else {
            (true, false)
        }
    } else {
        // A caller that did not ask for usage gets none, on whatever event the
        // backend put it (llama.cpp puts a completion's on its last event with
        // choices); one that did keeps the final usage.
        // A backend that sent running usage (it honoured continuous stats,
        // as vLLM does) sends its final usage in a usage-only chunk; one that
        // did not (llama.cpp) puts it on its last event with choices.
        let cut_usage = meter.last_had_usage
            && (edits.hide_usage_only
                || (edits.strip_chunk_usage
                    && !(edits.keep_final_usage
                        && meter.last_usage_final
                        && meter.last_usage_first)));
        let cut_timings = edits.strip_timings && meter.last_had_timings && !meter.last_finished;
        (cut_usage, cut_timings)
    };
    match (cut_usage, cut_timings) {
        (true, true) => Cut::Members(&[b"usage", b"timings"]),
        (true, false) => Cut::Members(&[b"usage"]),
        (false, true) => Cut::Members(&[b"timings"]),
        (false, false) => Cut::Nothing,
    }
}

/// The event re-written into `buf` without `members` (every occurrence: a duplicated
/// key must not slip through), keeping the backend's own line ends (CRLF, LF or CR;
/// an LF still to come passes through on its own, as it would have).
fn without_members(
    ev: &crate::sse::SseEvent<'_>,
    members: &[&[u8]],
    src: &Source<'_>,
    buf: &mut Vec<u8>,
) -> Edit {
    let from = buf.len();
    buf.extend_from_slice(b"data: ");
    let json = buf.len();
    buf.extend_from_slice(ev.data);
    for m in members {
        while let Some(r) = member_span(&buf[json..], m) {
            buf.drain(json + r.start..json + r.end);
        }
    }
    src.copy_line_ends(buf, ev.start, ev.end);
    Edit {
        start: ev.start,
        end: ev.end,
        with: from..buf.len(),
    }
}

/// Whether a usage-only chunk has nothing but the standard members (then it is cut
/// whole; else forwarded without `usage`).
fn only_standard_members(data: &[u8]) -> bool {
    crate::usage::probe::only_members(data, &STANDARD_MEMBERS)
}

/// `frame`, or the backend's own chunk around `data` when there is one.
fn frame_as(out: &mut Vec<u8>, chunked: bool, data: &[u8], whole: Option<&[u8]>) {
    match whole {
        Some(chunk) => out.extend_from_slice(chunk),
        None => frame(out, chunked, data),
    }
}

fn frame(out: &mut Vec<u8>, chunked: bool, data: &[u8]) {
    if chunked {
        encode_chunk(out, data);
    } else {
        out.extend_from_slice(data);
    }
}

/// The stream as held bytes followed by the current span, by absolute offset.
struct Source<'a> {
    hold: &'a [u8],
    hold_base: u64,
    span: &'a [u8],
    span_base: u64,
}

impl Source<'_> {
    fn parts(&self, a: u64, b: u64) -> (&[u8], &[u8]) {
        let h0 = (a.max(self.hold_base) - self.hold_base) as usize;
        let h1 = (b.min(self.span_base).max(self.hold_base) - self.hold_base) as usize;
        let s0 = (a.max(self.span_base) - self.span_base) as usize;
        let s1 = (b.max(self.span_base) - self.span_base) as usize;
        let hold = if h0 < h1 { &self.hold[h0..h1] } else { &[][..] };
        let span = if s0 < s1 {
            &self.span[s0..s1.min(self.span.len())]
        } else {
            &[][..]
        };
        (hold, span)
    }

    fn emit(&self, out: &mut Vec<u8>, chunked: bool, a: u64, b: u64) {
        if b <= a {
            return;
        }
        let (h, s) = self.parts(a, b);
        if chunked {
            push_hex(out, h.len() + s.len());
            out.extend_from_slice(b"\r\n");
            out.extend_from_slice(h);
            out.extend_from_slice(s);
            out.extend_from_slice(b"\r\n");
        } else {
            out.extend_from_slice(h);
            out.extend_from_slice(s);
        }
    }

    /// Appends the line ends that close the event at `a..b`: the run of CR and LF bytes
    /// at its end (at most the four of CRLF CRLF).
    fn copy_line_ends(&self, to: &mut Vec<u8>, a: u64, b: u64) {
        let (h, s) = self.parts(a.max(b.saturating_sub(4)), b);
        let mut tail = [0u8; 4];
        let n = h.len() + s.len();
        tail[..h.len()].copy_from_slice(h);
        tail[h.len()..n].copy_from_slice(s);
        let run = tail[..n]
            .iter()
            .rev()
            .take_while(|&&c| c == b'\r' || c == b'\n')
            .count();
        to.extend_from_slice(&tail[n - run..n]);
    }

    fn copy(&self, to: &mut Vec<u8>, a: u64, b: u64) {
        if b > a {
            let (h, s) = self.parts(a, b);
            to.extend_from_slice(h);
            to.extend_from_slice(s);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::usage::UsageSource;
    use proptest::prelude::*;

    const CHUNK: &str = r#"{"choices":[{"index":0,"delta":{"content":"x"}}],"usage":{"prompt_tokens":3,"total_tokens":4,"completion_tokens":1}}"#;
    const USAGE_ONLY: &str =
        r#"{"choices":[],"usage":{"prompt_tokens":3,"total_tokens":5,"completion_tokens":2}}"#;

    fn stream(eol: &str) -> String {
        [CHUNK, CHUNK, USAGE_ONLY, "[DONE]"]
            .iter()
            .map(|d| format!("data: {d}{eol}{eol}"))
            .collect()
    }

    fn run(input: &[u8], mode: Mode, cuts: &[usize]) -> (Vec<u8>, StreamMeter) {
        let mut r = BodyRelay::default();
        r.start(mode, false, StreamShape::Chat, UsageAt::Usage);
        let mut out = Vec::new();
        for piece in crate::testing::pieces(input, cuts) {
            r.on_span(piece, &mut out);
        }
        r.finish(&mut out);
        (out, std::mem::take(&mut r.meter))
    }

    #[test]
    fn hides_the_usage_only_chunk_at_every_split() {
        let input = stream("\n");
        let want = [STRIPPED, STRIPPED, "[DONE]"]
            .iter()
            .map(|d| format!("data: {d}\n\n"))
            .collect::<String>();
        let mode = Mode::Sse(Edits {
            hide_usage_only: true,
            strip_chunk_usage: false,
            ..Edits::default()
        });
        for cut in 0..=input.len() {
            let (out, meter) = run(input.as_bytes(), mode, &[cut]);
            assert_eq!(String::from_utf8(out).unwrap(), want, "cut {cut}");
            assert_eq!(meter.finish(true).0.completion_tokens, 2);
        }
    }

    const STRIPPED: &str = r#"{"choices":[{"index":0,"delta":{"content":"x"}}]}"#;

    /// What the caller must receive for `stream(eol)` in `mode`: the backend's bytes
    /// with the usage-only event gone (hide) and the usage taken out of output chunks
    /// (strip), every line end as the backend sent it.
    fn expected(eol: &str, hide: bool, strip: bool) -> String {
        [CHUNK, CHUNK, USAGE_ONLY, "[DONE]"]
            .iter()
            .filter(|d| !(hide && **d == USAGE_ONLY))
            .map(|d| {
                // Without usage asked for, none reaches the caller, running usage
                // included.
                let d = if (strip || hide) && *d == CHUNK {
                    STRIPPED
                } else {
                    d
                };
                format!("data: {d}{eol}{eol}")
            })
            .collect()
    }

    #[test]
    fn edits_keep_every_other_byte_for_lf_crlf_and_cr_streams_at_every_split() {
        for eol in ["\n", "\r\n", "\r"] {
            let input = stream(eol);
            for (hide, strip) in [(true, false), (false, true), (true, true)] {
                let mode = Mode::Sse(Edits {
                    hide_usage_only: hide,
                    strip_chunk_usage: strip,
                    ..Edits::default()
                });
                let want = expected(eol, hide, strip);
                for cut in 0..=input.len() {
                    let (out, _) = run(input.as_bytes(), mode, &[cut]);
                    assert_eq!(
                        String::from_utf8(out).unwrap(),
                        want,
                        "eol {eol:?} hide {hide} strip {strip} cut {cut}"
                    );
                }
            }
        }
    }

    #[test]
    fn strips_chunk_usage_and_keeps_the_final_one_when_asked() {
        let input = stream("\r\n");
        let mode = Mode::Sse(Edits {
            hide_usage_only: false,
            strip_chunk_usage: true,
            ..Edits::default()
        });
        let want = format!(
            "data: {STRIPPED}\r\n\r\ndata: {STRIPPED}\r\n\r\ndata: {USAGE_ONLY}\r\n\r\ndata: [DONE]\r\n\r\n"
        );
        for cut in 0..=input.len() {
            let (out, _) = run(input.as_bytes(), mode, &[cut]);
            assert_eq!(String::from_utf8(out).unwrap(), want, "cut {cut}");
        }
    }

    /// A Responses stream and an Anthropic Messages stream as vLLM writes them.
    fn typed_streams() -> [(StreamShape, String, (u64, u64, u64)); 2] {
        let responses = [
            (
                "response.created",
                r#"{"type":"response.created","response":{"id":"r","usage":null}}"#,
            ),
            (
                "response.output_text.delta",
                r#"{"type":"response.output_text.delta","delta":"tok0 "}"#,
            ),
            (
                "response.output_text.delta",
                r#"{"type":"response.output_text.delta","delta":"tok1 "}"#,
            ),
            (
                "response.completed",
                r#"{"type":"response.completed","response":{"id":"r","usage":{"input_tokens":3,"input_tokens_details":{"cached_tokens":1},"output_tokens":2,"total_tokens":5}}}"#,
            ),
        ];
        let messages = [
            (
                "message_start",
                r#"{"type":"message_start","message":{"id":"m","usage":{"input_tokens":4,"output_tokens":0}}}"#,
            ),
            (
                "content_block_delta",
                r#"{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"tok0 "}}"#,
            ),
            (
                "message_delta",
                r#"{"type":"message_delta","delta":{"stop_reason":"end_turn"},"usage":{"output_tokens":7}}"#,
            ),
            ("message_stop", r#"{"type":"message_stop"}"#),
        ];
        let render = |events: &[(&str, &str)], done: bool| {
            let mut s: String = events
                .iter()
                .map(|(e, d)| format!("event: {e}\ndata: {d}\n\n"))
                .collect();
            if done {
                s.push_str("data: [DONE]\n\n");
            }
            s
        };
        [
            (StreamShape::Responses, render(&responses, false), (3, 2, 5)),
            (StreamShape::Messages, render(&messages, true), (4, 7, 11)),
        ]
    }

    #[test]
    fn typed_streams_pass_unchanged_and_are_metered_at_every_split() {
        let mode = Mode::Sse(Edits {
            hide_usage_only: false,
            strip_chunk_usage: false,
            ..Edits::default()
        });
        for (shape, input, want) in typed_streams() {
            for cut in 0..=input.len() {
                let mut r = BodyRelay::default();
                r.start(mode, false, shape, UsageAt::Usage);
                let mut out = Vec::new();
                for piece in crate::testing::pieces(input.as_bytes(), &[cut]) {
                    r.on_span(piece, &mut out);
                }
                r.finish(&mut out);
                assert_eq!(out, input.as_bytes(), "{shape:?} cut {cut}");
                let (u, source) = r.meter.finish(true);
                assert_eq!(
                    (u.prompt_tokens, u.completion_tokens, u.total_tokens),
                    want,
                    "{shape:?} cut {cut}"
                );
                assert_eq!(source, UsageSource::Backend);
                assert!(r.first_output.is_some());
            }
        }
    }

    fn sse(events: &[&str]) -> String {
        events.iter().map(|d| format!("data: {d}\n\n")).collect()
    }

    #[test]
    fn the_final_usage_the_caller_asked_for_reaches_it_on_whatever_event() {
        // llama.cpp's /v1/completions in continuous mode (which it ignores): no running
        // usage, the final usage on the last event that still has choices.
        let first = r#"{"choices":[{"text":"a","index":0,"finish_reason":null}]}"#;
        let last = r#"{"choices":[{"text":"","index":0,"finish_reason":"length"}],"usage":{"prompt_tokens":3,"completion_tokens":2,"total_tokens":5}}"#;
        let input = sse(&[first, last, "[DONE]"]);
        let edits = Edits {
            strip_chunk_usage: true,
            keep_final_usage: true,
            ..Edits::default()
        };
        for cut in 0..=input.len() {
            let (out, meter) = run(input.as_bytes(), Mode::Sse(edits), &[cut]);
            assert_eq!(String::from_utf8(out).unwrap(), input, "cut {cut}");
            assert_eq!(meter.finish(true).0.completion_tokens, 2);
        }
        // vLLM, which honours continuous stats: running usage on every chunk, the
        // finishing one included, then the usage-only chunk. The caller that asked for
        // the final usage gets exactly the usage-only chunk's.
        let running = |text: &str, c: u64, finish: &str| {
            format!(
                r#"{{"choices":[{{"text":"{text}","index":0,"finish_reason":{finish}}}],"usage":{{"prompt_tokens":3,"completion_tokens":{c},"total_tokens":{}}}}}"#,
                3 + c
            )
        };
        let plain = |text: &str, finish: &str| {
            format!(r#"{{"choices":[{{"text":"{text}","index":0,"finish_reason":{finish}}}]}}"#)
        };
        let usage_only =
            r#"{"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":1,"total_tokens":4}}"#;
        let input = sse(&[
            &running("a", 1, "null"),
            &running("", 1, r#""length""#),
            usage_only,
            "[DONE]",
        ]);
        let want = sse(&[
            &plain("a", "null"),
            &plain("", r#""length""#),
            usage_only,
            "[DONE]",
        ]);
        for cut in 0..=input.len() {
            let (out, _) = run(input.as_bytes(), Mode::Sse(edits), &[cut]);
            assert_eq!(String::from_utf8(out).unwrap(), want, "cut {cut}");
        }
        // Not asked for: no usage anywhere.
        let edits = Edits {
            hide_usage_only: true,
            strip_chunk_usage: true,
            ..Edits::default()
        };
        let (out, _) = run(input.as_bytes(), Mode::Sse(edits), &[]);
        assert!(!String::from_utf8(out).unwrap().contains("usage"));
    }

    #[test]
    fn a_hidden_usage_chunk_with_other_members_keeps_them() {
        // llama-server puts `timings` on its last event: the usage-only chunk once the
        // proxy asked for usage. The caller did not ask for usage: it gets the chunk
        // without `usage`, its timings intact.
        let chunk = r#"{"choices":[{"delta":{"content":"x"},"index":0,"finish_reason":null}],"id":"c","object":"chat.completion.chunk"}"#;
        let usage_only = r#"{"choices":[],"created":1,"id":"c","model":"m","system_fingerprint":"b1","object":"chat.completion.chunk","usage":{"completion_tokens":1,"prompt_tokens":4,"total_tokens":5},"timings":{"cache_n":0,"prompt_n":4,"predicted_n":1}}"#;
        let input = sse(&[chunk, usage_only, "[DONE]"]);
        let edits = Edits {
            hide_usage_only: true,
            ..Edits::default()
        };
        let want = sse(&[
            chunk,
            r#"{"choices":[],"created":1,"id":"c","model":"m","system_fingerprint":"b1","object":"chat.completion.chunk","timings":{"cache_n":0,"prompt_n":4,"predicted_n":1}}"#,
            "[DONE]",
        ]);
        for cut in 0..=input.len() {
            let (out, meter) = run(input.as_bytes(), Mode::Sse(edits), &[cut]);
            assert_eq!(String::from_utf8(out).unwrap(), want, "cut {cut}");
            let (u, source) = meter.finish(true);
            assert_eq!(
                (u.prompt_tokens, u.completion_tokens, source),
                (4, 1, UsageSource::Backend)
            );
        }
    }

    #[test]
    fn per_token_timings_bill_a_hang_up_and_are_hidden_unless_final() {
        let ev = |text: &str, n: u64, finish: &str| {
            format!(
                r#"{{"choices":[{{"delta":{{"content":"{text}"}},"index":0,"finish_reason":{finish}}}],"object":"chat.completion.chunk","timings":{{"cache_n":2,"prompt_n":5,"prompt_ms":1.5,"predicted_n":{n},"predicted_ms":0.2}}}}"#
            )
        };
        let plain = |text: &str| {
            format!(
                r#"{{"choices":[{{"delta":{{"content":"{text}"}},"index":0,"finish_reason":null}}],"object":"chat.completion.chunk"}}"#
            )
        };
        let (a, b) = (ev("a", 1, "null"), ev("b", 2, "null"));
        let edits = Edits {
            hide_usage_only: true,
            strip_timings: true,
            ..Edits::default()
        };
        // A caller that hangs up after two events: billed from the server's own counts.
        let input = sse(&[&a, &b]);
        let (out, meter) = run(input.as_bytes(), Mode::Sse(edits), &[40]);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            sse(&[&plain("a"), &plain("b")])
        );
        let (u, source) = meter.finish(false);
        assert_eq!(
            (u.prompt_tokens, u.completion_tokens, u.total_tokens, source),
            (7, 2, 9, UsageSource::Partial)
        );
        // The finished event keeps its timings; the real usage wins over them.
        let fin = ev("", 2, r#""stop""#);
        let usage_only = r#"{"choices":[],"object":"chat.completion.chunk","usage":{"completion_tokens":2,"prompt_tokens":7,"total_tokens":9}}"#;
        let input = sse(&[&a, &fin, usage_only, "[DONE]"]);
        let (out, meter) = run(input.as_bytes(), Mode::Sse(edits), &[]);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            sse(&[&plain("a"), &fin, "[DONE]"])
        );
        assert_eq!(meter.finish(true).1, UsageSource::Backend);
    }

    #[test]
    fn passthrough_modes_forward_every_byte() {
        let input = stream("\n");
        for mode in [
            Mode::Raw,
            Mode::Json,
            Mode::Sse(Edits {
                hide_usage_only: false,
                strip_chunk_usage: false,
                ..Edits::default()
            }),
        ] {
            assert_eq!(run(input.as_bytes(), mode, &[7, 100]).0, input.as_bytes());
        }
    }

    /// What a caller receives of `input` relayed with `edits` in pieces cut at `cuts`,
    /// chunked encoding taken off again (and checked complete) when `chunked`.
    fn relay_decoded(input: &[u8], edits: Edits, cuts: &[usize], chunked: bool) -> Vec<u8> {
        let mut r = BodyRelay::default();
        r.start(Mode::Sse(edits), chunked, StreamShape::Chat, UsageAt::Usage);
        let mut out = Vec::new();
        for piece in crate::testing::pieces(input, cuts) {
            r.on_span(piece, &mut out);
        }
        r.finish(&mut out);
        if !chunked {
            return out;
        }
        let mut dec = crate::http::body::BodyDecoder::new(crate::http::body::Framing::Chunked);
        let mut body = Vec::new();
        dec.decode(&out, |s| body.extend_from_slice(s)).unwrap();
        assert!(dec.is_done());
        body
    }

    /// What a chunked caller receives of the backend's chunked `body` (read in pieces
    /// cut at `cuts`), relayed with `edits`: whole chunks as the relay forwards them
    /// (`on_chunk`), and by framing every span again (`on_span`).
    fn relay_chunked(body: &[u8], edits: Edits, cuts: &[usize]) -> (Vec<u8>, Vec<u8>) {
        let mut outs = [Vec::new(), Vec::new()];
        for (forward, out) in [true, false].into_iter().zip(&mut outs) {
            let mut r = BodyRelay::default();
            r.start(Mode::Sse(edits), true, StreamShape::Chat, UsageAt::Usage);
            let mut dec = crate::http::body::BodyDecoder::new(crate::http::body::Framing::Chunked);
            let mut bounds: Vec<usize> = cuts.iter().map(|&c| c.min(body.len())).collect();
            bounds.sort_unstable();
            bounds.push(body.len());
            let mut consumed = 0;
            for c in bounds {
                let input = &body[consumed.min(c)..c];
                consumed = consumed.min(c)
                    + dec
                        .decode_framed(input, |span, whole| {
                            r.on_chunk(span, whole.filter(|_| forward), out)
                        })
                        .unwrap();
            }
            assert!(dec.is_done());
            r.finish(out);
        }
        let [forwarded, framed] = outs;
        (forwarded, framed)
    }

    proptest! {
        /// Forwarding the backend's whole chunks changes no byte a caller decodes, at
        /// any read boundaries, in every edit mode; a stream with nothing to change
        /// reaches the caller exactly as the backend framed it.
        #[test]
        fn whole_chunks_forwarded_decode_as_framed_again(
            eol in prop_oneof![Just("\n"), Just("\r\n"), Just("\r")],
            hide in any::<bool>(),
            strip in any::<bool>(),
            split_events in any::<bool>(),
            cuts in proptest::collection::vec(0usize..1400, 0..8),
        ) {
            let input = stream(eol);
            // One event a chunk (as vLLM writes), or chunks that cut events anywhere.
            let pieces: Vec<&[u8]> = if split_events {
                input.as_bytes().chunks(37).collect()
            } else {
                input.split_inclusive(&format!("{eol}{eol}")).map(str::as_bytes).collect()
            };
            let mut body = Vec::new();
            for p in &pieces {
                body.extend_from_slice(format!("{:X}\r\n", p.len()).as_bytes());
                body.extend_from_slice(p);
                body.extend_from_slice(b"\r\n");
            }
            body.extend_from_slice(b"0\r\n\r\n");
            let edits = Edits { hide_usage_only: hide, strip_chunk_usage: strip, ..Edits::default() };
            let (forwarded, framed) = relay_chunked(&body, edits, &cuts);
            let decode = |out: &[u8]| {
                let mut dec = crate::http::body::BodyDecoder::new(crate::http::body::Framing::Chunked);
                let mut data = Vec::new();
                dec.decode(out, |s| data.extend_from_slice(s)).unwrap();
                assert!(dec.is_done());
                String::from_utf8(data).unwrap()
            };
            prop_assert_eq!(decode(&forwarded), expected(eol, hide, strip));
            prop_assert_eq!(decode(&framed), expected(eol, hide, strip));
            let (same, _) = relay_chunked(&body, Edits::default(), &cuts);
            if cuts.is_empty() {
                prop_assert_eq!(same, body);
            }
        }

        #[test]
        fn edits_at_any_splits_give_the_expected_bytes(
            eol in prop_oneof![Just("\n"), Just("\r\n"), Just("\r")],
            hide in any::<bool>(),
            strip in any::<bool>(),
            cuts in proptest::collection::vec(0usize..1200, 0..8),
            chunked in any::<bool>(),
        ) {
            let input = stream(eol);
            let edits = Edits { hide_usage_only: hide, strip_chunk_usage: strip, ..Edits::default() };
            let got = relay_decoded(input.as_bytes(), edits, &cuts, chunked);
            prop_assert_eq!(String::from_utf8(got).unwrap(), expected(eol, hide, strip));
        }

        #[test]
        fn hiding_never_loses_other_bytes(
            events in proptest::collection::vec(prop_oneof![Just(CHUNK), Just(USAGE_ONLY), Just("[DONE]"), Just(": ping")], 0..8),
            cuts in proptest::collection::vec(0usize..1200, 0..6),
            chunked in any::<bool>(),
        ) {
            let input: String = events.iter().map(|d| if d.starts_with(':') { format!("{d}\n\n") } else { format!("data: {d}\n\n") }).collect();
            let want: String = events.iter().filter(|d| **d != USAGE_ONLY).map(|d| if d.starts_with(':') { format!("{d}\n\n") } else if *d == CHUNK { format!("data: {STRIPPED}\n\n") } else { format!("data: {d}\n\n") }).collect();
            let edits = Edits { hide_usage_only: true, ..Edits::default() };
            let got = relay_decoded(input.as_bytes(), edits, &cuts, chunked);
            prop_assert_eq!(String::from_utf8(got).unwrap(), want);
        }
    }
}
