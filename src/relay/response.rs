//! The response path: read the backend's head, forward it, then forward every body
//! read at once while metering it: SSE streams through the scanner and the stream
//! meter, JSON bodies through the usage finder. Memory is constant per request.
//!
//! When the caller did not ask for usage, the usage-only chunk the proxy requested is
//! cut out. To do that without re-parsing, bytes of an event that has begun but not
//! ended are held until its blank line arrives (an SSE client cannot act on half an
//! event, so this costs nothing visible); everything else is written as it arrives.

use crate::http::body::{BodyDecoder, Framing, LAST_CHUNK, encode_chunk, push_hex};
use crate::http::error::itoa_u64;
use crate::http::head::{ResponseHead, is_hop_by_hop};
use crate::io::{Io, PeerState, Wait, peek_fd};
use crate::sse::SseScanner;
use crate::usage::json::{UsageFinder, member_span};
use crate::usage::{EventKind, StreamMeter};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

/// A held (incomplete) event larger than this is forwarded as is: usage-only chunks
/// are a few hundred bytes, so such an event is never one to cut.
const MAX_HOLD: usize = 64 * 1024;
/// Response heads from a backend larger than this are a bad gateway.
const MAX_RESPONSE_HEAD: usize = 64 * 1024;

/// What the caller asked for, as far as the response path is concerned.
pub struct Spec<'a> {
    pub method: &'a str,
    pub request_id: &'a str,
    /// The caller speaks HTTP/1.1 (chunked is available).
    pub client_http11: bool,
    pub client_keep_alive: bool,
    /// Read usage from the response.
    pub metered: bool,
    /// Cut the usage-only chunk (the caller did not ask for usage).
    pub hide_usage_only: bool,
    /// Take `usage` out of every chunk that carries output (continuous usage was
    /// requested by the proxy, not the caller).
    pub strip_chunk_usage: bool,
    /// Longest wait for the head, and then between body reads.
    pub read_timeout: Duration,
    /// Set when shutdown_timeout expired: stop relaying (the record says `timeout`).
    pub cut: &'a std::cell::Cell<bool>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// The body reached its end as the backend framed it.
    Completed,
    /// The backend closed, reset or sent garbage mid-body.
    BackendBroken,
    ClientGone,
    /// No byte within `read_timeout` (before the head, or mid-body).
    Timeout,
    /// Closed or failed before any response byte: nothing was sent to the caller.
    NoResponse,
    /// An invalid response head: nothing was sent to the caller.
    BadGateway,
}

/// Buffers reused across the requests of one client connection.
#[derive(Default)]
pub struct Buffers {
    pub out: Vec<u8>,
    head: ResponseHead,
    hold: Vec<u8>,
    hold_next: Vec<u8>,
    edits: Vec<Edit>,
    edit_buf: Vec<u8>,
    scanner: Option<SseScanner>,
    finder: Option<UsageFinder>,
}

pub struct Outcome {
    pub end: End,
    /// Status the caller received, if a head was sent.
    pub status: Option<u16>,
    pub is_sse: bool,
    pub meter: StreamMeter,
    pub first_output: Option<Instant>,
    pub head_received: Option<Instant>,
    pub head_sent: Option<Instant>,
    pub upstream_reusable: bool,
    pub client_reusable: bool,
}

enum Body {
    Raw,
    Json(UsageFinder),
    /// `edit`: events may be cut or rewritten, so unfinished ones are held.
    Sse {
        scanner: SseScanner,
        edit: bool,
    },
}

pub async fn relay(client: &mut Io, up: &mut Io, spec: &Spec<'_>, bufs: &mut Buffers) -> Outcome {
    let mut o = Outcome {
        end: End::NoResponse,
        status: None,
        is_sse: false,
        meter: StreamMeter::new(),
        first_output: None,
        head_received: None,
        head_sent: None,
        upstream_reusable: false,
        client_reusable: false,
    };
    let client_fd = client.stream.as_raw_fd();
    let mut watch_client = true;
    let cut_hit = std::cell::Cell::new(false);
    let mut on_tick = || {
        if spec.cut.get() {
            cut_hit.set(true);
            return true;
        }
        if !watch_client {
            return false;
        }
        match peek_fd(client_fd) {
            PeerState::Closed => true,
            // A pipelined request: the caller is there; stop looking until next time.
            PeerState::Data => {
                watch_client = false;
                false
            }
            PeerState::Quiet => false,
        }
    };

    // Phase 1: the response head (skipping interim 1xx responses).
    let head = &mut bufs.head;
    let mut received_any = false;
    loop {
        match head.parse(up.data(), MAX_RESPONSE_HEAD) {
            Ok(Some(n)) => {
                up.consume(n);
                if (100..200).contains(&head.status) && head.status != 101 {
                    continue;
                }
                break;
            }
            Ok(None) => {}
            Err(_) => {
                o.end = End::BadGateway;
                return o;
            }
        }
        match up
            .fill_until(Instant::now() + spec.read_timeout, &mut on_tick)
            .await
        {
            Wait::Data => received_any = true,
            Wait::Eof | Wait::Error(_) => {
                o.end = if received_any {
                    End::BadGateway
                } else {
                    End::NoResponse
                };
                return o;
            }
            Wait::TimedOut => {
                o.end = End::Timeout;
                return o;
            }
            Wait::Interrupted => {
                o.end = if cut_hit.get() {
                    End::Timeout
                } else {
                    End::ClientGone
                };
                return o;
            }
        }
    }
    o.head_received = Some(Instant::now());
    let Ok(framing) = head.framing(spec.method) else {
        o.end = End::BadGateway;
        return o;
    };
    let content_type = head.headers.get("content-type").unwrap_or(b"");
    o.is_sse =
        content_type.len() >= 17 && content_type[..17].eq_ignore_ascii_case(b"text/event-stream");
    let mut body = if !spec.metered {
        Body::Raw
    } else if o.is_sse {
        Body::Sse {
            scanner: bufs.scanner.take().unwrap_or_default(),
            edit: spec.hide_usage_only || spec.strip_chunk_usage,
        }
    } else {
        Body::Json(bufs.finder.take().unwrap_or_default())
    };
    match &mut body {
        Body::Sse { scanner, .. } => scanner.reset(),
        Body::Json(finder) => finder.reset(),
        Body::Raw => {}
    }
    bufs.hold.clear();

    // Phase 2: the head to the caller, framed for what we will send.
    let rewrites_body = matches!(body, Body::Sse { edit: true, .. });
    let (chunked, mut client_keep) = match framing {
        Framing::Empty => (false, spec.client_keep_alive),
        Framing::Length(_) if !rewrites_body => (false, spec.client_keep_alive),
        _ if spec.client_http11 => (true, spec.client_keep_alive),
        _ => (false, false),
    };
    let out = &mut bufs.out;
    out.clear();
    let send_length = !chunked
        && match framing {
            Framing::Length(_) => !rewrites_body,
            Framing::Empty => true,
            _ => false,
        };
    write_head(
        out,
        head,
        spec.request_id,
        chunked,
        send_length,
        client_keep,
    );
    o.status = Some(head.status);
    let upstream_keep = head.keep_alive;

    // Phase 3: the body, forwarded read by read.
    let mut decoder = BodyDecoder::new(framing);
    let mut first_write = true;
    let end = loop {
        let data = up.data();
        let mut edit_state = EditState {
            hold: &mut bufs.hold,
            hold_next: &mut bufs.hold_next,
            edits: &mut bufs.edits,
            buf: &mut bufs.edit_buf,
            hide_usage_only: spec.hide_usage_only,
            strip_chunk_usage: spec.strip_chunk_usage,
        };
        let decoded = decoder.decode(data, |span| {
            on_body(
                &mut body,
                span,
                out,
                chunked,
                &mut o.meter,
                &mut o.first_output,
                &mut edit_state,
            )
        });
        let Ok(consumed) = decoded else {
            break End::BackendBroken;
        };
        up.consume(consumed);
        let done = decoder.is_done();
        if done {
            flush_hold(&mut bufs.hold, out, chunked);
            if chunked {
                out.extend_from_slice(LAST_CHUNK);
            }
        }
        if !out.is_empty() || first_write {
            if client.write_all(out).await.is_err() {
                break End::ClientGone;
            }
            if first_write {
                o.head_sent = Some(Instant::now());
                first_write = false;
            }
        }
        if done {
            break End::Completed;
        }
        match up
            .fill_until(Instant::now() + spec.read_timeout, &mut on_tick)
            .await
        {
            Wait::Data => {}
            Wait::Eof if decoder.eof_is_clean() => {
                flush_hold(&mut bufs.hold, out, chunked);
                if chunked {
                    out.extend_from_slice(LAST_CHUNK);
                }
                if client.write_all(out).await.is_err() {
                    break End::ClientGone;
                }
                client_keep = client_keep && chunked;
                break End::Completed;
            }
            Wait::Eof | Wait::Error(_) => break End::BackendBroken,
            Wait::TimedOut => break End::Timeout,
            Wait::Interrupted if cut_hit.get() => break End::Timeout,
            Wait::Interrupted => break End::ClientGone,
        }
    };
    o.end = end;
    o.upstream_reusable =
        end == End::Completed && upstream_keep && up.data().is_empty() && decoder.is_done();
    o.client_reusable = end == End::Completed && client_keep;
    match body {
        Body::Json(finder) => {
            if let Some(raw) = finder.usage() {
                o.meter.observe_usage(raw);
            }
            bufs.finder = Some(finder);
        }
        Body::Sse { scanner, .. } => bufs.scanner = Some(scanner),
        Body::Raw => {}
    }
    o
}

/// An event to replace: bytes `start..end` of the stream become `edit_buf[with]`.
struct Edit {
    start: u64,
    end: u64,
    with: std::ops::Range<usize>,
}

struct EditState<'a> {
    hold: &'a mut Vec<u8>,
    hold_next: &'a mut Vec<u8>,
    edits: &'a mut Vec<Edit>,
    buf: &'a mut Vec<u8>,
    hide_usage_only: bool,
    strip_chunk_usage: bool,
}

fn frame(out: &mut Vec<u8>, chunked: bool, data: &[u8]) {
    if chunked {
        encode_chunk(out, data);
    } else {
        out.extend_from_slice(data);
    }
}

fn flush_hold(hold: &mut Vec<u8>, out: &mut Vec<u8>, chunked: bool) {
    if !hold.is_empty() {
        frame(out, chunked, hold);
        hold.clear();
    }
}

fn on_body(
    body: &mut Body,
    span: &[u8],
    out: &mut Vec<u8>,
    chunked: bool,
    meter: &mut StreamMeter,
    first_output: &mut Option<Instant>,
    hs: &mut EditState<'_>,
) {
    match body {
        Body::Raw => frame(out, chunked, span),
        Body::Json(finder) => {
            finder.feed(span);
            frame(out, chunked, span);
        }
        Body::Sse {
            scanner,
            edit: false,
        } => {
            scanner.feed(span, |ev| {
                if meter.observe(ev.data) == EventKind::Output && first_output.is_none() {
                    *first_output = Some(Instant::now());
                }
            });
            frame(out, chunked, span);
        }
        Body::Sse {
            scanner,
            edit: true,
        } => {
            let span_base = scanner.position();
            let hold_base = span_base - hs.hold.len() as u64;
            hs.edits.clear();
            hs.buf.clear();
            let (edits, buf) = (&mut *hs.edits, &mut *hs.buf);
            let (hide, strip) = (hs.hide_usage_only, hs.strip_chunk_usage);
            scanner.feed(span, |ev| {
                let kind = meter.observe(ev.data);
                if kind == EventKind::Output && first_output.is_none() {
                    *first_output = Some(Instant::now());
                }
                if kind == EventKind::UsageOnly {
                    if hide {
                        edits.push(Edit {
                            start: ev.start,
                            end: ev.end,
                            with: 0..0,
                        });
                    }
                } else if strip
                    && meter.last_had_usage
                    && let Some(r) = member_span(ev.data, b"usage")
                {
                    let from = buf.len();
                    buf.extend_from_slice(b"data: ");
                    buf.extend_from_slice(&ev.data[..r.start]);
                    buf.extend_from_slice(&ev.data[r.end..]);
                    buf.extend_from_slice(b"\n\n");
                    edits.push(Edit {
                        start: ev.start,
                        end: ev.end,
                        with: from..buf.len(),
                    });
                }
            });
            let span_end = span_base + span.len() as u64;
            let src = Source {
                hold: hs.hold,
                hold_base,
                span,
                span_base,
            };
            let mut cursor = hold_base;
            for edit in hs.edits.iter() {
                if edit.start < cursor {
                    continue; // began in bytes already forwarded: cannot be changed
                }
                src.emit(out, chunked, cursor, edit.start);
                if !edit.with.is_empty() {
                    frame(out, chunked, &hs.buf[edit.with.clone()]);
                }
                cursor = edit.end.min(span_end);
            }
            let mut keep = scanner
                .pending_event_start()
                .unwrap_or(span_end)
                .max(cursor);
            if span_end - keep > MAX_HOLD as u64 {
                keep = span_end;
            }
            src.emit(out, chunked, cursor, keep);
            hs.hold_next.clear();
            src.copy(hs.hold_next, keep, span_end);
            std::mem::swap(hs.hold, hs.hold_next);
        }
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

    fn copy(&self, to: &mut Vec<u8>, a: u64, b: u64) {
        if b > a {
            let (h, s) = self.parts(a, b);
            to.extend_from_slice(h);
            to.extend_from_slice(s);
        }
    }
}

/// The caller's response head: the backend's headers minus hop-by-hop ones, our
/// request id, and framing for what we will actually send.
fn write_head(
    out: &mut Vec<u8>,
    head: &ResponseHead,
    request_id: &str,
    chunked: bool,
    send_length: bool,
    keep_alive: bool,
) {
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(itoa_u64(head.status as u64).as_bytes());
    out.push(b' ');
    out.extend_from_slice(head.reason());
    out.extend_from_slice(b"\r\n");
    for (name, value) in head.headers.iter() {
        if is_hop_by_hop(name) || name.eq_ignore_ascii_case(b"x-request-id") {
            continue;
        }
        out.extend_from_slice(name);
        out.extend_from_slice(b": ");
        out.extend_from_slice(value);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"x-request-id: ");
    out.extend_from_slice(request_id.as_bytes());
    out.extend_from_slice(b"\r\n");
    if chunked {
        out.extend_from_slice(b"transfer-encoding: chunked\r\n");
    } else if let Some(len) = head.headers.get("content-length").filter(|_| send_length) {
        // Length bodies and HEAD answers keep the backend's length.
        out.extend_from_slice(b"content-length: ");
        out.extend_from_slice(len);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(if keep_alive {
        b"connection: keep-alive\r\n\r\n".as_slice()
    } else {
        b"connection: close\r\n\r\n".as_slice()
    });
}
