//! Incremental Server-Sent Events scanner: bytes in, events out, no I/O.
//!
//! State is carried across reads, so a CRLF, a `data:` prefix or a UTF-8 sequence may be
//! split anywhere. The scanner never holds the caller's bytes back: it reports each event
//! when its terminating blank line arrives, with the event's absolute byte range in the
//! stream so the relay can drop an event (the usage-only chunk) without re-framing.
//! Data that lies within one read is handed out as a borrowed slice; only an event that
//! straddles reads is copied, into a buffer that is reused for the next event.

use memchr::{memchr2, memchr3};

/// Data beyond this per event is not kept (the event is reported `truncated`): no
/// backend sends usage in an event this large, and memory per stream stays bounded.
pub const MAX_EVENT_DATA: usize = 8 << 20;

/// One dispatched event. `start..end` is its byte range in the stream, from the first
/// byte of its first line to the end of the blank line that ended it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SseEvent<'a> {
    pub data: &'a [u8],
    pub start: u64,
    pub end: u64,
    pub truncated: bool,
    /// The blank line that ended the event was a CR at the end of the bytes fed: an LF
    /// at `end`, if the next read starts with one, still belongs to this event's line
    /// end (the scanner skips it). A relay that cuts the event must cut that LF too.
    pub lf_may_follow: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Field {
    Data,
    Ignored,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Line {
    /// Nothing of the current line seen yet.
    Start,
    /// Inside a field name (before the colon).
    Name,
    /// Inside a comment line.
    Comment,
    /// Inside a field value; `first` until the optional single space is skipped.
    Value { field: Field, first: bool },
}

const NAME_CAP: usize = 8;

#[derive(Debug)]
pub struct SseScanner {
    /// Absolute offset of the next byte to be fed.
    pos: u64,
    line: Line,
    /// The previous byte was a CR line end: a following LF belongs to it.
    skip_lf: bool,
    event_start: Option<u64>,
    name: [u8; NAME_CAP],
    name_len: usize,
    /// A data field has been seen for the current event.
    has_data: bool,
    data: Vec<u8>,
    /// Data of the current event that still lies in the chunk being fed (zero-copy path).
    pending: Option<(usize, usize)>,
    truncated: bool,
}

impl Default for SseScanner {
    fn default() -> Self {
        Self::new()
    }
}

impl SseScanner {
    pub fn new() -> Self {
        SseScanner {
            pos: 0,
            line: Line::Start,
            skip_lf: false,
            event_start: None,
            name: [0; NAME_CAP],
            name_len: 0,
            has_data: false,
            data: Vec::new(),
            pending: None,
            truncated: false,
        }
    }

    /// Starts a new stream, keeping the data buffer's capacity.
    pub fn reset(&mut self) {
        let mut data = std::mem::take(&mut self.data);
        data.clear();
        *self = SseScanner {
            data,
            ..SseScanner::new()
        };
    }

    /// Absolute offset of the first byte of an event that has begun but not ended.
    pub fn pending_event_start(&self) -> Option<u64> {
        self.event_start
    }

    /// Total bytes fed so far.
    pub fn position(&self) -> u64 {
        self.pos
    }

    /// Scans `chunk`, calling `on_event` for each event completed within it.
    pub fn feed(&mut self, chunk: &[u8], mut on_event: impl FnMut(SseEvent<'_>)) {
        let base = self.pos;
        let mut i = 0;
        while i < chunk.len() {
            if self.skip_lf {
                self.skip_lf = false;
                if chunk[i] == b'\n' {
                    i += 1;
                    continue;
                }
            }
            match self.line {
                Line::Start if self.event_start.is_none() => {
                    if let Some((a, b, next)) = whole_event(&chunk[i..]) {
                        // The common event, whole in this read: no state to carry.
                        on_event(SseEvent {
                            data: &chunk[i + a..i + b],
                            start: base + i as u64,
                            end: base + (i + next) as u64,
                            truncated: false,
                            lf_may_follow: false,
                        });
                        i += next;
                        continue;
                    }
                    self.line_start(chunk, base, &mut i, &mut on_event);
                }
                Line::Start => self.line_start(chunk, base, &mut i, &mut on_event),
                Line::Comment => match memchr2(b'\r', b'\n', &chunk[i..]) {
                    Some(k) => {
                        i += k;
                        self.end_line(chunk, &mut i);
                    }
                    None => i = chunk.len(),
                },
                Line::Name => {
                    let rest = &chunk[i..];
                    let k = memchr3(b':', b'\r', b'\n', rest);
                    let seg = &rest[..k.unwrap_or(rest.len())];
                    self.push_name(seg);
                    i += seg.len();
                    if k.is_some() {
                        let field = self.field();
                        if field == Field::Data {
                            self.begin_data_line(chunk);
                        }
                        if chunk[i] == b':' {
                            self.line = Line::Value { field, first: true };
                            i += 1;
                        } else {
                            // A line with no colon is a field with an empty value.
                            self.end_line(chunk, &mut i);
                        }
                    }
                }
                Line::Value { field, first } => {
                    if first {
                        self.line = Line::Value {
                            field,
                            first: false,
                        };
                        if chunk[i] == b' ' {
                            i += 1;
                        }
                        continue;
                    }
                    let k = memchr2(b'\r', b'\n', &chunk[i..]);
                    let seg_end = k.map_or(chunk.len(), |k| i + k);
                    if field == Field::Data {
                        self.append(chunk, i, seg_end);
                    }
                    i = seg_end;
                    if k.is_some() {
                        self.end_line(chunk, &mut i);
                    }
                }
            }
        }
        if let Some((a, b)) = self.pending.take() {
            self.data.extend_from_slice(&chunk[a..b]);
        }
        self.pos += chunk.len() as u64;
    }

    /// The first byte of a line: a blank line dispatches, anything else begins a field
    /// or a comment.
    fn line_start(
        &mut self,
        chunk: &[u8],
        base: u64,
        i: &mut usize,
        on_event: &mut impl FnMut(SseEvent<'_>),
    ) {
        let b = chunk[*i];
        if b == b'\n' || b == b'\r' {
            self.end_line(chunk, i);
            self.dispatch(chunk, base + *i as u64, on_event);
            return;
        }
        if self.event_start.is_none() {
            self.event_start = Some(base + *i as u64);
        }
        if b == b':' {
            self.line = Line::Comment;
            *i += 1;
        } else {
            self.name_len = 0;
            self.line = Line::Name;
        }
    }

    fn push_name(&mut self, seg: &[u8]) {
        for &b in seg {
            if self.name_len < NAME_CAP {
                self.name[self.name_len] = b;
            }
            self.name_len += 1;
        }
    }

    fn field(&self) -> Field {
        if &self.name[..self.name_len.min(NAME_CAP)] == b"data" && self.name_len == 4 {
            Field::Data
        } else {
            Field::Ignored
        }
    }

    /// Consumes the line end at `chunk[*i]` (CR, LF or CRLF).
    fn end_line(&mut self, chunk: &[u8], i: &mut usize) {
        let b = chunk[*i];
        *i += 1;
        if b == b'\r' {
            if *i < chunk.len() {
                if chunk[*i] == b'\n' {
                    *i += 1;
                }
            } else {
                self.skip_lf = true;
            }
        }
        self.line = Line::Start;
    }

    fn begin_data_line(&mut self, chunk: &[u8]) {
        if self.has_data {
            self.materialize(chunk);
            self.push_data(b"\n");
        }
        self.has_data = true;
    }

    fn materialize(&mut self, chunk: &[u8]) {
        if let Some((a, b)) = self.pending.take() {
            self.push_data(&chunk[a..b]);
        }
    }

    fn push_data(&mut self, bytes: &[u8]) {
        if self.data.len() + bytes.len() > MAX_EVENT_DATA {
            self.truncated = true;
        } else {
            self.data.extend_from_slice(bytes);
        }
    }

    fn append(&mut self, chunk: &[u8], a: usize, b: usize) {
        if a == b {
            return;
        }
        match self.pending {
            Some((pa, pb)) if pb == a => self.pending = Some((pa, b)),
            Some(_) => {
                self.materialize(chunk);
                self.push_data(&chunk[a..b]);
            }
            None if self.data.is_empty() && !self.truncated => {
                if b - a > MAX_EVENT_DATA {
                    self.truncated = true;
                } else {
                    self.pending = Some((a, b));
                }
            }
            None => self.push_data(&chunk[a..b]),
        }
    }

    fn dispatch(&mut self, chunk: &[u8], end: u64, on_event: &mut impl FnMut(SseEvent<'_>)) {
        if self.has_data {
            let data = match self.pending.take() {
                Some((a, b)) => &chunk[a..b],
                None => &self.data[..],
            };
            on_event(SseEvent {
                data,
                start: self.event_start.unwrap_or(end),
                end,
                truncated: self.truncated,
                lf_may_follow: self.skip_lf,
            });
        }
        self.pending = None;
        self.data.clear();
        self.has_data = false;
        self.truncated = false;
        self.event_start = None;
    }
}

/// The event almost every backend writes, whole at the start of `bytes`: an optional
/// `event:` line, one `data: ` line, LF line ends. Returns its data's range and the
/// length of the event with its blank line. Anything else (CR line ends, several data
/// lines, comments, an event cut by the read) is left to the state machine, which reads
/// this shape the same way: the fast path saves its per-field steps, not its meaning.
#[inline]
fn whole_event(bytes: &[u8]) -> Option<(usize, usize, usize)> {
    let mut d = 0;
    if bytes.starts_with(b"event:") {
        d = memchr2(b'\r', b'\n', bytes)?;
        if bytes[d] != b'\n' {
            return None;
        }
        d += 1;
    }
    if !bytes[d..].starts_with(b"data: ") {
        return None;
    }
    d += 6;
    let e = d + memchr2(b'\r', b'\n', &bytes[d..])?;
    (bytes[e] == b'\n' && bytes.get(e + 1) == Some(&b'\n') && e - d <= MAX_EVENT_DATA).then_some((
        d,
        e,
        e + 2,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The SSE spec's algorithm over a whole input, written as plainly as possible.
    fn reference(input: &[u8]) -> Vec<(Vec<u8>, u64)> {
        reference_with_ends(input)
            .into_iter()
            .map(|(d, s, _)| (d, s))
            .collect()
    }

    /// `reference`, with each event's end (after its blank line).
    fn reference_with_ends(input: &[u8]) -> Vec<(Vec<u8>, u64, u64)> {
        let mut out = Vec::new();
        let mut data: Option<Vec<u8>> = None;
        let mut start: Option<u64> = None;
        let mut i = 0;
        while i < input.len() {
            let line_start = i;
            while i < input.len() && input[i] != b'\r' && input[i] != b'\n' {
                i += 1;
            }
            let line = &input[line_start..i];
            if i < input.len() {
                if input[i] == b'\r' && i + 1 < input.len() && input[i + 1] == b'\n' {
                    i += 2;
                } else {
                    i += 1;
                }
            } else {
                break; // an unterminated last line is never processed
            }
            if line.is_empty() {
                if let Some(d) = data.take() {
                    out.push((d, start.unwrap(), i as u64));
                }
                start = None;
                continue;
            }
            start.get_or_insert(line_start as u64);
            if line[0] == b':' {
                continue;
            }
            let (name, value) = match line.iter().position(|&b| b == b':') {
                Some(p) => {
                    let v = &line[p + 1..];
                    (&line[..p], v.strip_prefix(b" ").unwrap_or(v))
                }
                None => (line, &b""[..]),
            };
            if name == b"data" {
                let d = data.get_or_insert_with(Vec::new);
                d.extend_from_slice(value);
                d.push(b'\n');
            }
        }
        out.into_iter()
            .map(|(mut d, s, e)| {
                d.pop();
                (d, s, e)
            })
            .collect()
    }

    fn scan_split(input: &[u8], cuts: &[usize]) -> Vec<(Vec<u8>, u64)> {
        let mut s = SseScanner::new();
        let mut out = Vec::new();
        for piece in crate::testing::pieces(input, cuts) {
            s.feed(piece, |e| out.push((e.data.to_vec(), e.start)));
        }
        out
    }

    const VLLM: &[u8] = b"data: {\"id\":\"c1\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hi\"}}]}\n\ndata: {\"id\":\"c1\",\"choices\":[],\"usage\":{\"prompt_tokens\":5,\"total_tokens\":7,\"completion_tokens\":2}}\n\ndata: [DONE]\n\n";

    #[test]
    fn vllm_stream_at_every_split_point() {
        let want = reference(VLLM);
        assert_eq!(want.len(), 3);
        assert_eq!(want[2].0, b"[DONE]");
        for cut in 0..=VLLM.len() {
            assert_eq!(scan_split(VLLM, &[cut]), want, "split at {cut}");
        }
    }

    #[test]
    fn crlf_comments_multiline_and_ranges() {
        let input =
            b": ping - 2026-01-01\r\n\r\ndata: a\r\ndata:b\r\nid: 3\r\n\r\nevent: x\rdata\r\r";
        let want = vec![(b"a\nb".to_vec(), 23), (b"".to_vec(), 49)];
        assert_eq!(reference(input), want);
        for cut in 0..=input.len() {
            for cut2 in cut..=input.len() {
                assert_eq!(scan_split(input, &[cut, cut2]), want, "cuts {cut} {cut2}");
            }
        }
        let mut s = SseScanner::new();
        let mut ends = Vec::new();
        s.feed(input, |e| ends.push((e.start, e.end)));
        assert_eq!(ends, vec![(23, 49), (49, 64)]);
    }

    #[test]
    fn pending_event_start_tracks_incomplete_event() {
        let mut s = SseScanner::new();
        s.feed(b"data: {\"a\":1}\n\ndata: {\"b\"", |_| {});
        assert_eq!(s.pending_event_start(), Some(15));
        let mut got = Vec::new();
        s.feed(b":2}\n\n", |e| got.push(e.data.to_vec()));
        assert_eq!(got, vec![b"{\"b\":2}".to_vec()]);
        assert_eq!(s.pending_event_start(), None);
    }

    #[test]
    fn oversized_event_is_truncated_not_held() {
        let mut s = SseScanner::new();
        let big = vec![b'x'; MAX_EVENT_DATA + 10];
        s.feed(b"data: ", |_| {});
        s.feed(&big, |_| {});
        let mut got = Vec::new();
        s.feed(b"\n\ndata: ok\n\n", |e| {
            got.push((e.truncated, e.data.len()))
        });
        assert_eq!(got, vec![(true, 0), (false, 2)]);
    }

    fn sse_bytes() -> impl Strategy<Value = Vec<u8>> {
        let piece = prop_oneof![
            Just(b"data: ".to_vec()),
            Just(b"data:".to_vec()),
            Just(b"data".to_vec()),
            Just(b": comment".to_vec()),
            Just(b"event: e".to_vec()),
            Just(b"\n".to_vec()),
            Just(b"\r".to_vec()),
            Just(b"\r\n".to_vec()),
            Just(b"{\"usage\":{\"prompt_tokens\":1}}".to_vec()),
            Just(" é€".as_bytes().to_vec()),
            proptest::collection::vec(any::<u8>(), 0..8),
        ];
        proptest::collection::vec(piece, 0..40).prop_map(|v| v.concat())
    }

    proptest! {
        #[test]
        fn same_events_for_any_split(input in sse_bytes(), cuts in proptest::collection::vec(0usize..400, 0..6)) {
            prop_assert_eq!(scan_split(&input, &cuts), reference(&input));
        }

        /// With LF line ends only (no CR|LF split to report early), each event's range
        /// too, the whole-event fast path's included.
        #[test]
        fn same_event_ranges_for_any_split(input in sse_bytes(), cuts in proptest::collection::vec(0usize..400, 0..6)) {
            let input: Vec<u8> = input.iter().map(|&b| if b == b'\r' { b'\n' } else { b }).collect();
            let mut s = SseScanner::new();
            let mut got = Vec::new();
            for piece in crate::testing::pieces(&input, &cuts) {
                s.feed(piece, |e| got.push((e.data.to_vec(), e.start, e.end)));
            }
            prop_assert_eq!(got, reference_with_ends(&input));
        }
    }
}
