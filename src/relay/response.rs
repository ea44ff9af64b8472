//! The response path: read the backend's head, forward it, then forward every body
//! read at once while metering it: SSE streams through the scanner and the stream
//! meter, JSON bodies through the usage finder. Memory is constant per request.
//!
//! When the caller did not ask for usage, the usage-only chunk the proxy requested is
//! cut out. To do that without re-parsing, bytes of an event that has begun but not
//! ended are held until its blank line arrives (an SSE client cannot act on half an
//! event, so this costs nothing visible); everything else is written as it arrives.

use super::body::{BodyRelay, Mode};
use crate::http::body::{BodyDecoder, Framing};
use crate::http::head::{Known, ResponseHead, is_hop_by_hop};
use crate::http::write::Head;
use crate::io::{Io, PeerState, Wait, peek_fd};
use crate::tick;
use crate::usage::{Usage, UsageSource};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

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
    /// Where this route's responses report usage (streamed, and not).
    pub shape: crate::routes::StreamShape,
    pub usage_at: crate::routes::UsageAt,
    /// What a stream's caller must not see of what the proxy asked for.
    pub edits: crate::relay::body::Edits,
    /// Longest wait for the head, and then between body reads.
    pub read_timeout: Duration,
    /// A caller that takes no bytes for this long is cut (`client_disconnected`).
    pub write_stall: Duration,
    /// Set when shutdown_timeout expired: stop relaying (the record says `timeout`).
    pub cut: &'a std::cell::Cell<bool>,
    /// Header lines the proxy adds to the caller's head (the key's `x-ratelimit-*`).
    pub extra_headers: &'a [u8],
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

impl End {
    /// The record's `outcome` for a relay that ended so, the caller having got
    /// `status`; `meter_ok`: no error event in the stream.
    pub fn outcome(self, status: u16, meter_ok: bool) -> crate::usage::Outcome {
        use crate::usage::Outcome;
        match self {
            End::Completed if (200..300).contains(&status) && meter_ok => Outcome::Completed,
            End::Completed | End::BackendBroken | End::NoResponse | End::BadGateway => {
                Outcome::BackendError
            }
            End::ClientGone => Outcome::ClientDisconnected,
            End::Timeout => Outcome::Timeout,
        }
    }
}

/// Buffers reused across the requests of one client connection.
#[derive(Default)]
pub struct Buffers {
    pub out: Vec<u8>,
    head: ResponseHead,
    body: BodyRelay,
}

/// How a relay went: its end, what the caller got, the usage read, and the times the
/// proxy's overhead is measured between. (The record's `Outcome` is derived from it.)
pub struct Relayed {
    pub end: End,
    /// Status the caller received, if a head was sent.
    pub status: Option<u16>,
    pub is_sse: bool,
    /// What the backend reported (or what could be estimated), and where it came from.
    pub usage: (Usage, UsageSource),
    /// The stream carried an error event.
    pub saw_error: bool,
    pub first_output: Option<Instant>,
    pub head_received: Option<Instant>,
    /// When the head reached the caller; `None` when it never went, or went with the
    /// whole body in one write (`end` is then `Completed`: its end time stands in).
    pub head_sent: Option<Instant>,
    pub upstream_reusable: bool,
    pub client_reusable: bool,
}

impl Relayed {
    /// A relay that ended as `end` before any response byte was read.
    pub fn ended(end: End) -> Relayed {
        Relayed {
            end,
            status: None,
            is_sse: false,
            usage: (Usage::default(), UsageSource::None),
            saw_error: false,
            first_output: None,
            head_received: None,
            head_sent: None,
            upstream_reusable: false,
            client_reusable: false,
        }
    }
}

/// The response path as three phases: the backend's head, the caller's head, the
/// body.
pub async fn relay(client: &mut Io, up: &mut Io, spec: &Spec<'_>, bufs: &mut Buffers) -> Relayed {
    let mut o = Relayed::ended(End::NoResponse);
    let mut watch = Watch::new(client.stream.as_raw_fd(), client.is_tls());
    if let Err(end) = read_head(up, spec, &mut bufs.head, &mut watch).await {
        o.end = end;
        return o;
    }
    o.head_received = Some(Instant::now());
    let Some(plan) = Plan::new(&mut bufs.head, spec) else {
        o.end = End::BadGateway;
        return o;
    };
    o.is_sse = plan.is_sse;
    o.status = Some(bufs.head.status);
    bufs.out.clear();
    write_head(&mut bufs.out, &bufs.head, spec, &plan);
    bufs.body
        .start(plan.mode, plan.chunked, spec.shape, spec.usage_at);
    let upstream_keep = bufs.head.keep_alive;
    let (end, decoder_done, client_keep) =
        relay_body(client, up, spec, bufs, &plan, &mut watch, &mut o).await;
    o.end = end;
    o.upstream_reusable =
        end == End::Completed && upstream_keep && up.data().is_empty() && decoder_done;
    o.client_reusable = end == End::Completed && client_keep;
    let body = &mut bufs.body;
    body.finish_metering();
    o.usage = body.meter.finish(end == End::Completed);
    o.saw_error = body.meter.saw_error;
    o.first_output = body.first_output;
    o
}

/// What the relay looks at while it waits for the backend: the shutdown cut, and a
/// caller who hung up.
struct Watch {
    client_fd: std::os::fd::RawFd,
    /// Over TLS, bytes waiting may be the caller's close_notify: look for the end of
    /// its stream behind them instead.
    tls: bool,
    /// Off once a pipelined request is seen (the caller is there).
    watch_client: bool,
    /// Bytes went to the caller since the last tick: a caller who hung up makes the
    /// next write fail, so the tick need not look (one syscall per stream per tick
    /// saved while tokens flow; a silent backend still gets the caller watched).
    wrote: bool,
    cut_hit: bool,
}

impl Watch {
    fn new(client_fd: std::os::fd::RawFd, tls: bool) -> Self {
        Watch {
            client_fd,
            tls,
            watch_client: true,
            wrote: false,
            cut_hit: false,
        }
    }

    /// Called at each tick of a wait: `true` interrupts it.
    fn tick(&mut self, cut: &std::cell::Cell<bool>) -> bool {
        if cut.get() {
            self.cut_hit = true;
            return true;
        }
        if !self.watch_client || std::mem::take(&mut self.wrote) {
            return false;
        }
        match peek_fd(self.client_fd) {
            PeerState::Closed => true,
            PeerState::Data if self.tls => crate::io::peer_shut_write(self.client_fd),
            // A pipelined request: the caller is there; stop looking until next time.
            PeerState::Data => {
                self.watch_client = false;
                false
            }
            PeerState::Quiet => false,
        }
    }

    /// How a wait that `tick` interrupted ends the relay.
    fn interrupted(&self) -> End {
        if self.cut_hit {
            End::Timeout
        } else {
            End::ClientGone
        }
    }
}

/// Phase 1: the backend's response head, skipping interim 1xx responses.
async fn read_head(
    up: &mut Io,
    spec: &Spec<'_>,
    head: &mut ResponseHead,
    watch: &mut Watch,
) -> Result<(), End> {
    let mut received_any = false;
    // The answer is a backend's queue and prefill away: wait for it holding no
    // buffer (the read comes when it is there; see `Io::release`).
    up.release();
    loop {
        // Nothing read yet (the first turn): nothing to parse.
        let parsed = match up.data() {
            [] => Ok(None),
            data => head.parse(data, MAX_RESPONSE_HEAD),
        };
        match parsed {
            Ok(Some(n)) => {
                up.consume(n);
                if (100..200).contains(&head.status) && head.status != 101 {
                    continue;
                }
                return Ok(());
            }
            Ok(None) => {}
            Err(_) => return Err(End::BadGateway),
        }
        let deadline = tick::now() + spec.read_timeout;
        match up.fill_until(deadline, || watch.tick(spec.cut)).await {
            Wait::Data => received_any = true,
            Wait::Eof | Wait::Error(_) if received_any => return Err(End::BadGateway),
            Wait::Eof | Wait::Error(_) => return Err(End::NoResponse),
            Wait::TimedOut => return Err(End::Timeout),
            Wait::Interrupted => return Err(watch.interrupted()),
        }
    }
}

/// Phase 2: how the response goes to the caller, from the backend's head.
struct Plan {
    framing: Framing,
    mode: Mode,
    is_sse: bool,
    /// Re-framed as chunked for the caller.
    chunked: bool,
    /// The backend's Content-Length goes to the caller as it is.
    send_length: bool,
    client_keep: bool,
}

impl Plan {
    /// `None`: the backend's framing is invalid (a bad gateway).
    fn new(head: &mut ResponseHead, spec: &Spec<'_>) -> Option<Plan> {
        let framing = head.framing(spec.method).ok()?;
        let content_type = head.headers.known(Known::ContentType).unwrap_or(b"");
        let is_sse = content_type.len() >= 17
            && content_type[..17].eq_ignore_ascii_case(b"text/event-stream");
        let mode = if !spec.metered {
            Mode::Raw
        } else if is_sse {
            Mode::Sse(spec.edits)
        } else {
            Mode::Json
        };
        let rewrites_body = mode.rewrites();
        let (chunked, client_keep) = match framing {
            Framing::Empty => (false, spec.client_keep_alive),
            Framing::Length(_) if !rewrites_body => (false, spec.client_keep_alive),
            _ if spec.client_http11 => (true, spec.client_keep_alive),
            _ => (false, false),
        };
        let send_length = !chunked
            && match framing {
                Framing::Length(_) => !rewrites_body,
                Framing::Empty => true,
                _ => false,
            };
        Some(Plan {
            framing,
            mode,
            is_sse,
            chunked,
            send_length,
            client_keep,
        })
    }
}

/// Phase 3: the body, forwarded read by read (the caller's head goes with the first
/// write). Returns how it ended, whether the backend's body was complete, and whether
/// the caller's connection stays usable.
async fn relay_body(
    client: &mut Io,
    up: &mut Io,
    spec: &Spec<'_>,
    bufs: &mut Buffers,
    plan: &Plan,
    watch: &mut Watch,
    o: &mut Relayed,
) -> (End, bool, bool) {
    let (out, body) = (&mut bufs.out, &mut bufs.body);
    let mut client_keep = plan.client_keep;
    let mut decoder = BodyDecoder::new(plan.framing);
    let mut first_write = true;
    let end = loop {
        let decoded =
            decoder.decode_framed(up.data(), |span, whole| body.on_chunk(span, whole, out));
        let Ok(consumed) = decoded else {
            // Garbage framing from the backend: what came before it is still forwarded
            // (the head included), then the caller's response ends uncleanly.
            let _ = client.write_all_within(out, spec.write_stall).await;
            if first_write {
                o.head_sent = Some(Instant::now());
            }
            break End::BackendBroken;
        };
        up.consume(consumed);
        let done = decoder.is_done();
        if !done {
            // Between two tokens of a slow stream no read buffer is held (given back
            // before the write to the caller, not after it). A finished body's
            // connection keeps its buffer for the next request's answer.
            up.release_if_drained();
        }
        if done {
            body.finish(out);
        }
        if !out.is_empty() || first_write {
            if client
                .write_all_within(out, spec.write_stall)
                .await
                .is_err()
            {
                break End::ClientGone;
            }
            if first_write {
                // A response whose head and whole body went in this first write
                // needs no clock read here: the caller takes its end time instead.
                if !done {
                    o.head_sent = Some(Instant::now());
                }
                first_write = false;
            }
            watch.wrote = true;
        }
        if done {
            break End::Completed;
        }
        let deadline = tick::now() + spec.read_timeout;
        match up.fill_until(deadline, || watch.tick(spec.cut)).await {
            Wait::Data => {}
            Wait::Eof if decoder.eof_is_clean() => {
                body.finish(out);
                if client
                    .write_all_within(out, spec.write_stall)
                    .await
                    .is_err()
                {
                    break End::ClientGone;
                }
                client_keep = client_keep && plan.chunked;
                break End::Completed;
            }
            Wait::Eof | Wait::Error(_) => break End::BackendBroken,
            Wait::TimedOut => break End::Timeout,
            Wait::Interrupted => break watch.interrupted(),
        }
    };
    (end, decoder.is_done(), client_keep)
}

/// The caller's response head: the backend's headers minus hop-by-hop ones, our
/// request id, and framing for what we will actually send.
fn write_head(out: &mut Vec<u8>, head: &ResponseHead, spec: &Spec<'_>, plan: &Plan) {
    let mut w = Head::response(out, head.status, head.reason());
    for (name, value) in head.headers.iter() {
        // The proxy's own rate-limit headers replace a backend's.
        let theirs_limits = !spec.extra_headers.is_empty()
            && name.len() > 12
            && name[..12].eq_ignore_ascii_case(b"x-ratelimit-");
        if !is_hop_by_hop(name) && !name.eq_ignore_ascii_case(b"x-request-id") && !theirs_limits {
            w.header(name, value);
        }
    }
    w.header(b"x-request-id", spec.request_id.as_bytes());
    w.lines().extend_from_slice(spec.extra_headers);
    if plan.chunked {
        w.header(b"transfer-encoding", b"chunked");
    } else if let Some(len) = head
        .headers
        .known(Known::ContentLength)
        .filter(|_| plan.send_length)
    {
        // Length bodies and HEAD answers keep the backend's length.
        w.header(b"content-length", len);
    }
    w.end_with_connection(plan.client_keep);
}
