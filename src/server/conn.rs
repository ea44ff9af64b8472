//! One client connection: read a request, run it through the phases, answer, repeat
//! while keep-alive holds. The life of a proxied request is `proxy`:
//! authenticate → inspect body → route → rewrite → relay → meter → emit record.

use super::{View, Worker, endpoints};
use crate::access_log::AccessEntry;
use crate::auth;
use crate::config::{Config, UsageMode};
use crate::http::body::{BodyDecoder, Framing};
use crate::http::error::{ProxyError, write_response};
use crate::http::head::{HeadError, Headers, Known, RequestHead, is_hop_by_hop};
use crate::http::multipart::{self, MultipartScanner};
use crate::http::write::{CONTINUE, Head};
use crate::io::{Io, Wait};
use crate::limits;
use crate::relay::body::Edits;
use crate::relay::response::{self, Buffers, End, Spec};
use crate::relay::rewrite::{self, RequestInfo};
use crate::routes::{self, Action, Body, ErrorShape, Metering, Route, StreamShape, UsageAt};
use crate::spares::{self, Spares};
use crate::tick;
use crate::upstream::pool::{ConnectError, Pool};
use crate::upstream::{Backend, Pick};
use crate::usage::{UsageRecord, format_api_key};
use log::warn;
use monoio::net::TcpStream;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

/// Initial read buffer per client connection.
const CLIENT_BUF: usize = 8 * 1024;

struct Conn {
    client: Io,
    head: RequestHead,
    body: Vec<u8>,
    /// The request as sent upstream (kept for one retry on a stale pooled connection).
    up_req: Vec<u8>,
    /// The response path's buffers, boxed: parked between requests (`park`), so
    /// an idle connection's task does not carry them.
    bufs: Option<Box<Buffers>>,
}

pub async fn serve(w: &Worker, stream: TcpStream) {
    if !w.nodelay_inherited {
        let _ = stream.set_nodelay(true);
    }
    let tls = w.view().live.tls.clone();
    let client = match tls {
        None => {
            let mut io = Io::new(stream, CLIENT_BUF);
            // The accept waited for the caller's first bytes (`tune_listener`).
            io.expect_bytes();
            io
        }
        // Boxed: its state would otherwise stay in every connection's task.
        Some(tls) => match Box::pin(accept_tls(w, stream, &tls)).await {
            Some(io) => io,
            None => return,
        },
    };
    let mut c = Conn {
        client,
        head: spare_head(),
        body: Vec::new(),
        up_req: Vec::new(),
        bufs: None,
    };
    let mut first = true;
    while let Some(head_len) = read_head(w, &mut c, first).await {
        first = false;
        w.stats.request_started();
        // A request's state lives in its own allocation while it runs (reused from
        // one request to the next), and its buffers are parked between requests, so
        // an idle connection holds only `Conn` and the wait (docs/performance.md:
        // "Memory per connection").
        c.unpark();
        let keep = super::recycle::Recycled::new(handle(w, &mut c, head_len)).await;
        c.park();
        w.stats.request_done();
        if !keep {
            break;
        }
        // Waiting for the next request holds no read buffer.
        c.client.release();
    }
    c.client.close(std::time::Duration::from_secs(1)).await;
    give_head(std::mem::take(&mut c.head.headers));
}

thread_local! {
    /// Closed connections' request head buffers (two allocations a new connection
    /// otherwise: callgrind churn, ~1.5 % of its worker instructions).
    static HEADS: Spares<Headers> = const { std::cell::RefCell::new(Vec::new()) };
}

/// A new connection's head, with a closed one's buffers if the thread has some.
fn spare_head() -> RequestHead {
    RequestHead::reusing(spares::take(&HEADS).unwrap_or_default())
}

/// Keeps a closed connection's head buffers for the next (at most `PARK_MAX`, none
/// grown past `PARK_CAP`).
fn give_head(headers: Headers) {
    if headers.buf.capacity() > PARK_CAP {
        return;
    }
    spares::keep(&HEADS, headers, PARK_MAX);
}

/// A request's buffers, parked in the worker thread's pool between requests (`PARKED`).
struct Parked {
    body: Vec<u8>,
    up_req: Vec<u8>,
    bufs: Option<Box<Buffers>>,
}

thread_local! {
    /// Parked buffers: a request takes a set that earlier requests grew (no allocation
    /// per request), and an idle or closed connection holds none.
    static PARKED: Spares<Parked> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Sets parked per worker thread; more are freed.
const PARK_MAX: usize = 256;
/// A buffer grown beyond this (a large request or answer) is freed, not parked.
const PARK_CAP: usize = 64 * 1024;

impl Conn {
    /// Takes a parked set of request buffers, if there is one.
    fn unpark(&mut self) {
        if let Some(p) = spares::take(&PARKED) {
            self.body = p.body;
            self.up_req = p.up_req;
            self.bufs = p.bufs;
        }
    }

    /// Parks this request's buffers (cleared; too large ones freed).
    fn park(&mut self) {
        let trim = |v: &mut Vec<u8>| {
            if v.capacity() > PARK_CAP {
                *v = Vec::new();
            }
            v.clear();
        };
        let mut p = Parked {
            body: std::mem::take(&mut self.body),
            up_req: std::mem::take(&mut self.up_req),
            bufs: std::mem::take(&mut self.bufs),
        };
        trim(&mut p.body);
        trim(&mut p.up_req);
        if let Some(b) = p.bufs.as_mut() {
            trim(&mut b.out);
        }
        spares::keep(&PARKED, p, PARK_MAX);
    }
}

/// The TLS handshake, bounded like a request head; one that fails or stalls (a
/// plain-HTTP request, garbage, a slowloris) ends here with a close (`None`).
async fn accept_tls(w: &Worker, stream: TcpStream, tls: &crate::tls::Listener) -> Option<Io> {
    let conn = rustls::ServerConnection::new(tls.config.clone()).ok()?;
    let mut io = Io::with_tls(stream, CLIENT_BUF, conn.into());
    let deadline = tick::now() + w.view().live.config.limits.header_timeout.0;
    match io.handshake(deadline).await {
        Ok(()) => Some(io),
        Err(why) => {
            w.shared
                .metrics
                .tls_handshake_failures
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            // As nginx does: tell a plain-HTTP caller in plain HTTP, then close.
            if let Wait::Error(e) = why
                && e.to_string() == crate::io::PLAIN_HTTP
            {
                let mut io = io.into_plain();
                let mut out = Vec::new();
                ProxyError::BadRequest("This port speaks TLS: use https:// to reach it.")
                    .write_response(&mut out, &new_request_id(), false);
                let _ = io
                    .write_all_within(&mut out, std::time::Duration::from_secs(1))
                    .await;
            }
            None
        }
    }
}

/// Over `limits.max_connections`: a 503 and close.
pub async fn reject(w: &Worker, stream: TcpStream) {
    if w.view().live.tls.is_some() {
        // An answer would cost a handshake, the work being refused: just close.
        return;
    }
    let mut io = Io::new(stream, 0);
    let mut out = Vec::new();
    ProxyError::TooManyConnections.write_response(&mut out, &new_request_id(), false);
    let _ = io.write_all(&mut out).await;
}

/// Reads one request head. `None`: close the connection (any error already answered).
async fn read_head(w: &Worker, c: &mut Conn, first: bool) -> Option<usize> {
    let v = w.view();
    let limits = &v.live.config.limits;
    let max = limits.max_header_bytes.0 as usize;
    let mut started = !c.client.data().is_empty();
    let mut deadline = tick::now()
        + if first || started {
            limits.header_timeout.0
        } else {
            limits.idle_timeout.0
        };
    loop {
        if started {
            let err = match c.head.parse(c.client.data(), max) {
                Ok(Some(n)) => return Some(n),
                Ok(None) => None,
                Err(HeadError::TooLarge | HeadError::TooManyHeaders) => {
                    Some(ProxyError::HeadersTooLarge)
                }
                Err(HeadError::Malformed(m)) => Some(ProxyError::BadRequest(m)),
                Err(HeadError::Unsupported(m)) => Some(ProxyError::NotImplemented(m)),
            };
            if let Some(e) = err {
                // Boxed (rare), so the wait for a request head stays small.
                Box::pin(answer_early(w, c, e)).await;
                return None;
            }
        }
        // At shutdown an idle connection stays open until the worker has drained, so
        // a request sent on it is answered 503 rather than reset; then it closes (the
        // worker wakes every wait when it sets `closing`). The wait is woken only for
        // that and near its deadline, not every tick.
        let idle = !started;
        if idle && w.closing.get() {
            return None;
        }
        match c.client.fill_by(deadline, || idle && w.closing.get()).await {
            Wait::Data => {
                if !started {
                    started = true;
                    deadline = tick::now() + limits.header_timeout.0;
                }
            }
            Wait::TimedOut if started => {
                Box::pin(answer_early(w, c, ProxyError::HeaderTimeout)).await;
                return None;
            }
            _ => return None,
        }
    }
}

/// Answers an error found before a request head could be read; always closes.
async fn answer_early(w: &Worker, c: &mut Conn, e: ProxyError) {
    let out = &mut c.bufs.get_or_insert_with(Box::default).out;
    out.clear();
    e.write_response(out, &new_request_id(), false);
    w.stats
        .count_request(routes::other_label(), false, None, e.status());
    let _ = c.client.write_all(out).await;
}

/// `req_` + a UUIDv7: milliseconds since the epoch, then 74 random bits. The random
/// bits come from a per-thread generator seeded once from the OS, so making an id does
/// not cost a getrandom syscall per request (profiling showed it). Kept over uuid's
/// own `Uuid::now_v7()`: that one takes a process-wide `Mutex` (uuid 1.29,
/// `timestamp.rs`, `CONTEXT_V7`) on every id, a lock all workers would share on the
/// request path; the uuid crate still builds and formats the id.
fn new_request_id() -> String {
    new_request_id_at(SystemTime::now())
}

/// `new_request_id` with the clock already read (one read per request serves the id
/// and the record's timestamp).
fn new_request_id_at(now: SystemTime) -> String {
    thread_local! {
        static RNG: std::cell::Cell<(u64, u64)> = std::cell::Cell::new({
            let seed = uuid::Uuid::new_v4().as_u128();
            ((seed >> 64) as u64 | 1, seed as u64 | 1)
        });
    }
    // xorshift128+
    let random = RNG.with(|r| {
        let (mut a, b) = r.get();
        a ^= a << 23;
        a ^= a >> 17;
        a ^= b ^ (b >> 26);
        r.set((b, a));
        ((a.wrapping_add(b) as u128) << 64) | b.wrapping_mul(0x9E37_79B9_7F4A_7C15) as u128
    });
    let millis = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let bytes = random.to_le_bytes();
    let mut tail = [0u8; 10];
    tail.copy_from_slice(&bytes[..10]);
    let id = uuid::Builder::from_unix_timestamp_millis(millis, &tail).into_uuid();
    // Hex straight into the string: `format!` was 1.3% of the worker.
    let mut hex = [0u8; uuid::fmt::Simple::LENGTH];
    let mut out = String::with_capacity(4 + hex.len());
    out.push_str("req_");
    out.push_str(id.simple().encode_lower(&mut hex));
    out
}

/// A caller's `X-Request-Id` of 1–128 characters from `[A-Za-z0-9._:-]`: a trace id,
/// kept in the record and the access log as `client_request_id`. It is never the
/// request id: a caller that repeated one would make a deduplicating receiver keep one
/// record of many (free inference).
fn client_request_id(head: &RequestHead) -> Option<String> {
    let v = head.headers.known(Known::XRequestId)?;
    let valid = !v.is_empty()
        && v.len() <= 128
        && v.iter()
            .all(|&b| b.is_ascii_alphanumeric() || b"._:-".contains(&b));
    // Checked above: ASCII only.
    valid.then(|| String::from_utf8_lossy(v).into_owned())
}

struct Request {
    /// The proxy's own id: the billing key (record, Idempotency-Key, X-Request-Id).
    id: String,
    /// The caller's valid `X-Request-Id`, a trace id only.
    client_id: Option<String>,
    /// The caller's key as presented (masked wherever it is shown).
    key: Option<String>,
    arrived: Instant,
    timestamp: SystemTime,
    /// The metrics `path` label (`routes::LABELS`).
    path: usize,
    /// The shape of the proxy's own errors on this route.
    errors: ErrorShape,
    /// The key's user, once authenticated (for the access log).
    user: Option<String>,
    /// The key's `x-ratelimit-*` header lines for the response (empty: no limits).
    limit_headers: Vec<u8>,
}

/// Handles one request whose head is parsed. Returns whether to keep the connection.
async fn handle(w: &Worker, c: &mut Conn, head_len: usize) -> bool {
    // One clock read: the wall-clock timestamp is derived from it (see `tick`).
    let arrived = Instant::now();
    let now = tick::wall_time(arrived);
    let v = w.view();
    // Phase: route. The table says what this path is; nothing outside it is forwarded.
    let route = routes::route(c.head.method(), c.head.route(), &v.live.config.routes);
    let mut rq = Request {
        key: auth::presented_key(&c.head.headers).map(str::to_owned),
        id: new_request_id_at(now),
        client_id: client_request_id(&c.head),
        arrived,
        timestamp: now,
        path: route.label,
        errors: route.errors,
        user: None,
        limit_headers: Vec::new(),
    };
    c.client.consume(head_len);

    // Phase: the request body, whole and bounded (requests are small; reading it lets a
    // malformed or oversized body be refused before anything reaches a backend). An
    // audio upload is read up to its file part, which streams later.
    let read = read_request_body(&v, c, &route).await;
    let upload = match read {
        Ok(u) => u,
        Err(Some(e)) => return answer(w, c, &rq, e, false).await,
        Err(None) => return false,
    };
    // The request is read (an upload's rest reads again when it streams): the
    // caller's buffer goes back until it sends more.
    c.client.release();
    if w.shutting_down() {
        return answer(w, c, &rq, ProxyError::ShuttingDown, false).await;
    }
    match route.action {
        Action::Health => {
            let (status, body) = endpoints::health(w);
            reply(w, c, &rq, status, "application/json", body.as_bytes()).await
        }
        Action::Metrics => {
            let body = endpoints::metrics(w);
            reply(w, c, &rq, 200, "text/plain; version=0.0.4", body.as_bytes()).await
        }
        Action::NotFound => answer(w, c, &rq, ProxyError::NotFound, false).await,
        Action::Models | Action::Metered(_) | Action::Recorded => {
            // Phase: authenticate.
            let auth = &v.live.auth;
            let key = if auth.enabled {
                match auth.key(rq.key.as_deref()) {
                    Some(k) => Some(k),
                    None => return answer(w, c, &rq, ProxyError::InvalidApiKey, false).await,
                }
            } else {
                None
            };
            if w.shared.access_log.enabled() {
                rq.user = key.map(|k| k.user_id.clone());
            }
            if route.action == Action::Models {
                let forward = if auth.enabled {
                    None
                } else {
                    c.head
                        .headers
                        .known(Known::Authorization)
                        .map(<[u8]>::to_vec)
                };
                return match endpoints::models(w, forward.as_deref(), &rq.id).await {
                    Ok(body) => reply(w, c, &rq, 200, "application/json", &body).await,
                    Err(e) => answer(w, c, &rq, e, false).await,
                };
            }
            // Phase: the key's limits. A refused request reaches no backend and gets no
            // record; an admitted one holds its in-flight slot until it ends.
            let limited = key.filter(|k| !k.limits.is_empty());
            let _permit = match limited {
                Some(k) => match admit(w, k, &mut rq, v.live.config.limits_fail_closed) {
                    Ok(p) => Some(p),
                    Err(e) => return answer(w, c, &rq, e, false).await,
                },
                None => None,
            };
            proxy(w, &v, c, &rq, &route, upload, key).await
        }
    }
}

/// Step of the limits phase: admits the request under its key's limits (its headers
/// go into `rq.limit_headers`), or the 429 to answer.
fn admit<'a>(
    w: &Worker,
    key: &'a auth::Key,
    rq: &mut Request,
    fail_closed: bool,
) -> Result<limits::Permit<'a>, ProxyError> {
    let store_down = fail_closed
        && w.shared
            .metrics
            .limits_store
            .load(std::sync::atomic::Ordering::Relaxed)
            == 2;
    let (admitted, standing) =
        key.counters
            .admit(&key.limits, &limits::Clock::at(rq.timestamp), store_down);
    match admitted {
        Ok(permit) => {
            limits::write_headers(&mut rq.limit_headers, &standing, None);
            Ok(permit)
        }
        Err(refusal) => {
            w.shared.metrics.rate_limited[refusal.index()]
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            Err(ProxyError::RateLimited(refusal, standing))
        }
    }
}

/// Reads the request body for `route`: whole (bounded by `max_request_body`, or
/// `max_audio_body` on the audio routes), or, for a multipart upload with a length, up
/// to its file part (`Upload`). `Err(None)`: the caller went away.
async fn read_request_body(
    v: &View,
    c: &mut Conn,
    route: &Route,
) -> Result<Option<Upload>, Option<ProxyError>> {
    let limits = &v.live.config.limits;
    let max_body = match route.action {
        Action::Metered(Metering {
            body: Body::Multipart,
            ..
        }) => limits.max_audio_body.0,
        _ => limits.max_request_body.0,
    };
    // A multipart upload (audio) is read only up to its file part: the form fields
    // before it say where it goes, and the file streams on to the backend unread.
    let streams_upload = matches!(
        route.action,
        Action::Metered(Metering {
            body: Body::Multipart,
            ..
        })
    ) && matches!(c.head.framing(), Framing::Length(n) if n <= max_body)
        && c.head
            .headers
            .known(Known::ContentType)
            .is_some_and(|t| multipart::boundary(t).is_ok());
    if streams_upload {
        read_upload_head(v, c).await.map(Some)
    } else {
        read_body(v, c, max_body).await.map(|()| None)
    }
}

/// A multipart upload read up to its file part.
struct Upload {
    boundary: Vec<u8>,
    /// The form fields before the file (all of them when the body came whole).
    fields: Result<multipart::Fields, &'static str>,
    /// Body bytes still to come from the caller, streamed to the backend unread.
    rest: u64,
}

/// Reads a multipart body with a Content-Length up to the start of its first part
/// the scanner skips (the file) once `model` is known, or whole if it ends first. What
/// is read is held in `c.body` (bounded by `max_request_body`); the rest is left to
/// stream. With a rest, the connection closes after this request (its body may not be
/// read to the end if the request is refused).
async fn read_upload_head(v: &View, c: &mut Conn) -> Result<Upload, Option<ProxyError>> {
    c.body.clear();
    let limits = &v.live.config.limits;
    let Framing::Length(total) = c.head.framing() else {
        return Err(Some(ProxyError::BadRequest(
            "multipart body without a length",
        )));
    };
    let ctype = c.head.headers.known(Known::ContentType).unwrap_or(b"");
    let boundary = multipart::boundary(ctype).map_err(|_| Some(ProxyError::FormFieldsTooLate))?;
    let buffered = c.client.data().len() as u64;
    if c.head.expect_continue && buffered < total {
        let mut cont = CONTINUE.to_vec();
        c.client.write_all(&mut cont).await.map_err(|_| None)?;
    }
    let mut scanner = MultipartScanner::new(&boundary);
    let mut left = total;
    loop {
        let take = (c.client.data().len() as u64).min(left) as usize;
        if take > 0 {
            let data = &c.client.data()[..take];
            scanner.feed(data);
            c.body.extend_from_slice(data);
            c.client.consume(take);
            left -= take as u64;
        }
        let settled = scanner.past_fields() && scanner.fields.model.is_some();
        if left == 0 || settled || scanner.error().is_some() {
            break;
        }
        if c.body.len() as u64 >= limits.max_request_body.0 {
            c.head.keep_alive = false;
            return Err(Some(ProxyError::FormFieldsTooLate));
        }
        more_body(c, limits).await?;
    }
    if left > 0 {
        c.head.keep_alive = false;
    }
    let fields = if left == 0 {
        scanner.finish()
    } else {
        scanner.fields_so_far()
    };
    Ok(Upload {
        boundary,
        fields: fields.map_err(|e| e.message()),
        rest: left,
    })
}

/// Streams the `rest` of an upload from the caller to the backend, a read at a time
/// through `buf` (constant memory whatever its size). `Err(true)`: the caller went
/// away or stalled; `Err(false)`: the backend stopped taking it (it may have answered).
async fn stream_upload(
    client: &mut Io,
    up: &mut Io,
    mut rest: u64,
    buf: &mut Vec<u8>,
    stall: Duration,
) -> Result<(), bool> {
    while rest > 0 {
        if client.data().is_empty() {
            match client.fill_by(tick::now() + stall, || false).await {
                Wait::Data => {}
                _ => return Err(true),
            }
        }
        let take = (client.data().len() as u64).min(rest) as usize;
        buf.clear();
        buf.extend_from_slice(&client.data()[..take]);
        client.consume(take);
        rest -= take as u64;
        up.write_all(buf).await.map_err(|_| false)?;
    }
    Ok(())
}

/// Reads the request body (at most `max` bytes) into `c.body`. `Err(None)`: the
/// caller went away.
async fn read_body(v: &View, c: &mut Conn, max: u64) -> Result<(), Option<ProxyError>> {
    c.body.clear();

    let limits = &v.live.config.limits;
    let framing = c.head.framing();
    match framing {
        Framing::Empty | Framing::Length(0) => return Ok(()),
        Framing::Length(n) if n > max => return Err(Some(ProxyError::RequestTooLarge)),
        _ => {}
    }
    let buffered = c.client.data().len() as u64;
    if c.head.expect_continue && !matches!(framing, Framing::Length(n) if n <= buffered) {
        let mut cont = CONTINUE.to_vec();
        c.client.write_all(&mut cont).await.map_err(|_| None)?;
    }
    let mut decoder = BodyDecoder::new(framing);
    loop {
        let mut over = false;
        let body = &mut c.body;
        let n = decoder
            .decode(c.client.data(), |s| {
                if (body.len() + s.len()) as u64 > max {
                    over = true;
                } else {
                    body.extend_from_slice(s);
                }
            })
            .map_err(|e| {
                Some(ProxyError::BadRequest(
                    if e == crate::http::body::BodyError::TrailerTooLarge {
                        "chunked trailer too large"
                    } else {
                        "invalid chunked body"
                    },
                ))
            })?;
        c.client.consume(n);
        if over {
            return Err(Some(ProxyError::RequestTooLarge));
        }
        if decoder.is_done() {
            return Ok(());
        }
        more_body(c, limits).await?;
    }
}

/// Waits for more of a request body, up to `header_timeout` (408 then). `Err(None)`:
/// the caller went away.
async fn more_body(c: &mut Conn, limits: &crate::config::Limits) -> Result<(), Option<ProxyError>> {
    match c
        .client
        .fill_by(tick::now() + limits.header_timeout.0, || false)
        .await
    {
        Wait::Data => Ok(()),
        Wait::TimedOut => Err(Some(ProxyError::HeaderTimeout)),
        _ => Err(None),
    }
}

/// Answers a proxy-made error and logs it; returns whether to keep the connection.
async fn answer(w: &Worker, c: &mut Conn, rq: &Request, e: ProxyError, stream: bool) -> bool {
    log_access(w, c, rq, e.status(), stream, None);
    answer_unlogged(w, c, rq, e, stream).await
}

/// One access log line. `proxied`: the backend and, for metered requests, the record.
fn log_access(
    w: &Worker,
    c: &Conn,
    rq: &Request,
    status: u16,
    stream: bool,
    proxied: Option<(&str, Option<&UsageRecord>)>,
) {
    let log = &w.shared.access_log;
    if !log.enabled() {
        return;
    }
    let rec = proxied.and_then(|p| p.1);
    log.log(AccessEntry {
        timestamp: rq.timestamp,
        request_id: rq.id.clone(),
        client_request_id: rq.client_id.clone(),
        method: c.head.method().to_owned(),
        path: c.head.route().chars().take(256).collect(),
        status,
        stream,
        user_id: rec
            .map(|r| r.user_id.clone())
            .or_else(|| rq.user.clone())
            .unwrap_or_default(),
        api_key: format_api_key(
            rq.key.as_deref().unwrap_or(""),
            crate::config::ApiKeyFormat::Masked,
        ),
        model: rec.map(|r| r.model.clone()).unwrap_or_default(),
        backend: proxied.map(|p| p.0.to_owned()),
        outcome: rec.map(|r| r.outcome),
        usage_source: rec.map(|r| r.usage_source),
        tokens: rec.map_or((0, 0, 0), |r| {
            (
                r.usage.prompt_tokens,
                r.usage.completion_tokens,
                r.usage.total_tokens,
            )
        }),
        duration_us: rq.arrived.elapsed().as_micros() as u64,
        ttft_ms: rec.and_then(|r| r.ttft_ms),
    });
}

async fn answer_unlogged(
    w: &Worker,
    c: &mut Conn,
    rq: &Request,
    e: ProxyError,
    stream: bool,
) -> bool {
    let keep = c.head.keep_alive && !e.must_close() && !w.shutting_down();
    let out = &mut c.bufs.get_or_insert_with(Box::default).out;
    out.clear();
    e.write_response_shaped(out, &rq.id, keep, rq.errors);
    w.stats.count_request(rq.path, stream, None, e.status());
    c.client.write_all(out).await.is_ok() && keep
}

async fn reply(
    w: &Worker,
    c: &mut Conn,
    rq: &Request,
    status: u16,
    ctype: &str,
    body: &[u8],
) -> bool {
    let keep = c.head.keep_alive && !w.shutting_down();
    let out = &mut c.bufs.get_or_insert_with(Box::default).out;
    out.clear();
    let body = if c.head.method() == "HEAD" {
        &[][..]
    } else {
        body
    };
    write_response(out, status, ctype, body, &rq.id, keep, b"");
    w.stats.count_request(rq.path, false, None, status);
    log_access(w, c, rq, status, false, None);
    let out = &mut c.bufs.get_or_insert_with(Box::default).out;
    c.client.write_all(out).await.is_ok() && keep
}

/// The life of a proxied request, phase by phase: inspect the body → route, rewrite,
/// relay (`send`) → settle the connections → meter → record. Each phase is a function
/// below, in that order.
async fn proxy(
    w: &Worker,
    v: &View,
    c: &mut Conn,
    rq: &Request,
    route: &Route,
    upload: Option<Upload>,
    key: Option<&auth::Key>,
) -> bool {
    let user = key.map(|k| k.user_id.clone());
    let limited = key.filter(|k| !k.limits.is_empty());
    let req = match inspect(&v.live.config, route, &c.head, &c.body, upload) {
        Ok(r) => r,
        Err(e) => return answer(w, c, rq, e, false).await,
    };
    let sent = match send(w, v, c, rq, &req).await {
        Ok(s) => s,
        Err(e) => return answer(w, c, rq, e, req.stream()).await,
    };
    let (status, end, keep) = settle(w, c, rq, &req, &sent.o).await;
    meter(
        w,
        rq,
        &req,
        &sent.o,
        status,
        sent.sent_at,
        sent.ended,
        sent.backend.slot,
    );
    let stream = req.stream();
    let record = usage_record(c, rq, route, req, &sent, user, status, end, &v.live.config);
    if let Some(k) = limited {
        // Tokens count against the key when they are known: now.
        let clock = limits::Clock::at(SystemTime::now());
        k.counters
            .charge(&k.limits, &clock, record.usage.total_tokens);
    }
    if sent.o.as_ref().is_some_and(|o| o.upstream_reusable) {
        v.up.pool.put(sent.bi, sent.up);
    }
    log_access(
        w,
        c,
        rq,
        status,
        stream,
        Some((&sent.backend.name, Some(&record))),
    );
    w.records.emit(&record);
    keep
}

/// What the inspect phase read of a request.
struct Inspected {
    /// How the route meters (`None`: forwarded with a zero-usage record).
    metering: Option<Metering>,
    /// The model, stream flags and user the body names (`None`: a recorded route's
    /// body without them).
    info: Option<RequestInfo>,
    /// A multipart form: its boundary and fields.
    form: Option<(Vec<u8>, multipart::Fields)>,
    /// Body bytes of an upload still to come from the caller (streamed unread).
    rest: u64,
}

impl Inspected {
    fn stream(&self) -> bool {
        self.info.as_ref().is_some_and(|i| i.stream)
    }

    fn model(&self) -> Option<&str> {
        self.info
            .as_ref()
            .map(|i| i.model.as_str())
            .filter(|m| !m.is_empty())
    }

    /// The stream carries no usage unless asked for (chat, completions, audio).
    fn inject(&self) -> bool {
        self.metering.is_some_and(|m| m.inject_usage) && self.stream()
    }

    /// Background responses run on after the first answer: nothing to read from it.
    fn unmeterable(&self) -> bool {
        self.info.as_ref().is_some_and(|i| i.background)
    }
}

/// Phase: inspect the body. A metered route needs its model (JSON `model`, or the form
/// field of a multipart upload); a recorded one reads it when it is there.
fn inspect(
    cfg: &crate::config::Config,
    route: &Route,
    head: &RequestHead,
    body: &[u8],
    upload: Option<Upload>,
) -> Result<Inspected, ProxyError> {
    let metering = match route.action {
        Action::Metered(m) => Some(m),
        _ => None,
    };
    let rest = upload.as_ref().map_or(0, |u| u.rest);
    let mut form = None;
    let info = match metering {
        Some(Metering {
            body: Body::Json,
            refuse_background,
            ..
        }) => {
            let i = rewrite::inspect(body, true).map_err(ProxyError::InvalidRequest)?;
            if i.background && refuse_background && !cfg.routes.allow_background {
                let m = "'background: true' is not supported by this proxy: it could not meter a response it does not see finish (an operator can allow it with routes.allow_background).";
                return Err(ProxyError::InvalidRequest(m.into()));
            }
            Some(i)
        }
        Some(Metering {
            body: Body::Multipart,
            ..
        }) => {
            let (boundary, fields) = match upload {
                Some(u) => u.fields.map(|f| (u.boundary, f)),
                None => read_form(head, body),
            }
            .map_err(|m| ProxyError::InvalidRequest(m.into()))?;
            let i = RequestInfo::from_form(fields.clone()).map_err(ProxyError::InvalidRequest)?;
            form = Some((boundary, fields));
            Some(i)
        }
        // Forwarded with a record: the model when the body names one (routing by it).
        None if body.is_empty() => None,
        None => rewrite::inspect(body, false).ok(),
    };
    Ok(Inspected {
        metering,
        info,
        form,
        rest,
    })
}

/// What the send phase ended with.
struct Sent {
    bi: usize,
    backend: std::sync::Arc<crate::upstream::Backend>,
    up: Io,
    /// `None`: the request could not be written.
    o: Option<response::Relayed>,
    /// When the request was written (the arrival until then).
    sent_at: Instant,
    ended: Instant,
}

/// Phases: route, rewrite and relay. Until a backend answers with a first byte, nothing
/// reached a GPU: a backend that refuses the connection is marked down and the request
/// goes back to routing for the next one. A pooled connection that fails before any
/// response byte (its backend restarted or died) gets one fresh connection to the same
/// backend; if that is refused too, back to routing. `Err`: answered by the proxy, no
/// backend reached (no record).
async fn send(
    w: &Worker,
    v: &View,
    c: &mut Conn,
    rq: &Request,
    req: &Inspected,
) -> Result<Sent, ProxyError> {
    let cfg = &v.live.config;
    let mut tried = 0u64;
    let mut sent_at = rq.arrived; // read only once the request was written
    'route: loop {
        let (bi, backend, mut up, mut reused) = connect_next(v, req, &mut tried).await?;
        let in_flight = v.up.start(bi, &w.stats);
        rewrite_for(c, rq, req, &backend, v.live.auth.enabled);
        let spec = relay_spec(w, &c.head, &c.body, rq, req, &backend, cfg);
        loop {
            let (o, written_at) = attempt(
                (
                    &mut c.client,
                    &mut c.up_req,
                    c.bufs.get_or_insert_with(Box::default),
                ),
                &mut up,
                req.rest,
                &spec,
                cfg,
            )
            .await;
            sent_at = written_at.unwrap_or(sent_at);
            // The stale-connection retry: a pooled connection that failed before any
            // response byte gets one fresh connect to the same backend.
            if reused && o.as_ref().is_none_or(|o| o.end == End::NoResponse) {
                reused = false;
                match Pool::connect(&backend, cfg.limits.connect_timeout.0).await {
                    Ok(io) => {
                        up = io;
                        continue;
                    }
                    Err(ConnectError::Unreachable(e)) => {
                        mark_down(&backend, e);
                        drop(in_flight);
                        continue 'route;
                    }
                }
            }
            let ended = Instant::now();
            drop(in_flight);
            return Ok(Sent {
                bi,
                backend,
                up,
                o,
                sent_at,
                ended,
            });
        }
    }
}

/// Step of `send`: the next backend for the request's model and a connection to it
/// (`true`: a pooled one). A backend refusing to connect is marked down and the next
/// one picked. An upload's rest streams from the caller: it cannot be sent twice, so
/// it goes on a fresh connection (a pooled one might turn out closed after the body
/// went).
async fn connect_next(
    v: &View,
    req: &Inspected,
    tried: &mut u64,
) -> Result<(usize, Arc<Backend>, Io, bool), ProxyError> {
    loop {
        let bi = match v.up.pick(req.model(), *tried) {
            Pick::NoModel => {
                return Err(ProxyError::ModelNotFound(
                    req.model().unwrap_or_default().to_owned(),
                ));
            }
            Pick::Exhausted => return Err(ProxyError::BackendUnavailable),
            Pick::Backend(i) => i,
        };
        *tried |= 1 << bi.min(63);
        let backend = v.up.backends[bi].clone();
        if req.rest == 0
            && let Some(io) = v.up.pool.take(bi)
        {
            return Ok((bi, backend, io, true));
        }
        match Pool::connect(&backend, v.live.config.limits.connect_timeout.0).await {
            Ok(io) => return Ok((bi, backend, io, false)),
            Err(ConnectError::Unreachable(e)) => mark_down(&backend, e),
        }
    }
}

/// Step of `send`: writes the request on `up` (and streams an upload's `rest`), then
/// relays the response. `None`: the request could not be written. The time is when
/// it was.
async fn attempt(
    (client, up_req, bufs): (&mut Io, &mut Vec<u8>, &mut Buffers),
    up: &mut Io,
    rest: u64,
    spec: &response::Spec<'_>,
    cfg: &Config,
) -> (Option<response::Relayed>, Option<Instant>) {
    if up.write_keep(up_req).await.is_err() {
        return (None, None);
    }
    // The rest of an upload: the backend may answer before it has all of it (an
    // error), so a backend that stops taking it is still read from.
    let caller_gone = rest > 0
        && stream_upload(client, up, rest, &mut bufs.out, cfg.limits.header_timeout.0).await
            == Err(true);
    let written = Instant::now();
    let o = if caller_gone {
        response::Relayed::ended(End::ClientGone)
    } else {
        response::relay(client, up, spec, bufs).await
    };
    (Some(o), Some(written))
}

/// Phase: rewrite the request for `backend` into `c.up_req` (head and the body held;
/// an upload's rest follows it unread).
fn rewrite_for(
    c: &mut Conn,
    rq: &Request,
    req: &Inspected,
    backend: &crate::upstream::Backend,
    auth_enabled: bool,
) {
    let rewritten = match (&req.info, &req.form) {
        (Some(i), None) if req.inject() => rewrite::rewrite(&c.body, i, backend.usage_mode),
        (Some(_), Some((boundary, fields))) if req.inject() => {
            rewrite_form(&c.body, boundary, fields, backend.usage_mode)
        }
        _ => None,
    };
    let body = rewritten.as_deref().unwrap_or(&c.body);
    c.up_req.clear();
    write_upstream_head(
        &mut c.up_req,
        &c.head,
        backend,
        &rq.id,
        body.len() as u64 + req.rest,
        auth_enabled,
        req.metering.is_some(),
    );
    c.up_req.extend_from_slice(body);
}

/// How the relay treats this request's response: where its usage is, and what the
/// caller must not see of what the proxy asked for.
fn relay_spec<'a>(
    w: &'a Worker,
    head: &'a RequestHead,
    body: &[u8],
    rq: &'a Request,
    req: &Inspected,
    backend: &crate::upstream::Backend,
    cfg: &crate::config::Config,
) -> Spec<'a> {
    let (inject, info) = (req.inject(), req.info.as_ref());
    Spec {
        method: head.method(),
        request_id: &rq.id,
        client_http11: head.version == 1,
        client_keep_alive: head.keep_alive && !w.shutting_down(),
        metered: req.metering.is_some() && !req.unmeterable(),
        shape: req.metering.map_or(StreamShape::Chat, |m| m.stream),
        usage_at: req.metering.map_or(UsageAt::Usage, |m| m.usage_at),
        edits: Edits {
            hide_usage_only: inject && info.is_some_and(|i| !i.caller_wants_usage),
            strip_chunk_usage: inject
                && backend.usage_mode == UsageMode::Continuous
                && info.is_some_and(|i| !i.caller_wants_continuous),
            keep_final_usage: info.is_some_and(|i| i.caller_wants_usage),
            strip_timings: inject
                && backend.usage_mode == UsageMode::LlamacppTimings
                && req.form.is_none()
                && !rewrite::caller_wants_timings(body),
        },
        read_timeout: cfg.limits.first_byte_timeout.0,
        write_stall: cfg.limits.idle_timeout.0,
        cut: &w.cutting,
        extra_headers: &rq.limit_headers,
    }
}

/// Phase: answer what the relay could not (504, 502); the status the caller got, how
/// the relay ended, and whether to keep the caller's connection.
async fn settle(
    w: &Worker,
    c: &mut Conn,
    rq: &Request,
    req: &Inspected,
    o: &Option<response::Relayed>,
) -> (u16, End, bool) {
    let stream = req.stream();
    match o {
        Some(o) if o.status.is_some() => (
            o.status.unwrap_or(502),
            o.end,
            o.client_reusable && !w.shutting_down(),
        ),
        Some(o) if o.end == End::Timeout => {
            let keep = answer_unlogged(w, c, rq, ProxyError::BackendTimeout, stream).await;
            (504, End::Timeout, keep)
        }
        Some(o) if o.end == End::ClientGone => (499, End::ClientGone, false),
        other => {
            let end = other.as_ref().map_or(End::NoResponse, |o| o.end);
            let keep = answer_unlogged(w, c, rq, ProxyError::BackendUnavailable, stream).await;
            (502, end, keep)
        }
    }
}

/// Phase: meter the request (counts, latency, proxy overhead, time to first token).
#[allow(clippy::too_many_arguments)]
fn meter(
    w: &Worker,
    rq: &Request,
    req: &Inspected,
    o: &Option<response::Relayed>,
    status: u16,
    sent_at: Instant,
    ended: Instant,
    slot: usize,
) {
    let m = &w.stats;
    let stream = req.stream();
    if o.as_ref().is_some_and(|o| o.status.is_some()) {
        m.count_request(rq.path, stream, Some(slot), status);
    }
    m.latency_us(ended.duration_since(rq.arrived).as_micros() as u64);
    if let Some(o) = o {
        let mut overhead = sent_at.saturating_duration_since(rq.arrived);
        // A head sent with the whole body has no time of its own: the end stands in.
        let sent = match o.head_sent {
            None if o.end == End::Completed => Some(ended),
            s => s,
        };
        if let (Some(r), Some(s)) = (o.head_received, sent) {
            overhead += s.saturating_duration_since(r);
        }
        m.overhead_us(overhead.as_micros() as u64);
        if stream && let Some(t) = o.first_output {
            m.ttft_us(t.duration_since(rq.arrived).as_micros() as u64);
        }
    }
}

/// Phase: the usage record. Every forwarded request gets one: metered routes with the
/// backend's usage, recorded ones with none.
#[allow(clippy::too_many_arguments)]
fn usage_record(
    c: &Conn,
    rq: &Request,
    route: &Route,
    req: Inspected,
    sent: &Sent,
    user: Option<String>,
    status: u16,
    end: End,
    cfg: &crate::config::Config,
) -> UsageRecord {
    let (meter_ok, first_output, usage) = match &sent.o {
        Some(o) if req.metering.is_some() => (!o.saw_error, o.first_output, o.usage.clone()),
        _ => (
            true,
            None,
            (Default::default(), crate::usage::UsageSource::None),
        ),
    };
    let user_id = match user {
        Some(u) => u,
        None => c
            .head
            .headers
            .known_str(Known::XUserId)
            .map(str::to_owned)
            .or(req.info.as_ref().and_then(|i| i.user.clone()))
            .unwrap_or_default(),
    };
    // The request's model moves into the record (one request, one record).
    let (model, is_stream) = req
        .info
        .map_or((String::new(), false), |i| (i.model, i.stream));
    UsageRecord {
        request_id: rq.id.clone(),
        client_request_id: rq.client_id.clone(),
        user_id,
        api_key: format_api_key(
            rq.key.as_deref().unwrap_or(""),
            cfg.usage_hook.api_key_format,
        ),
        model,
        usage: usage.0,
        is_stream,
        endpoint: route.endpoint.clone(),
        timestamp: rq.timestamp,
        backend_url: sent.backend.url.clone(),
        status_code: status,
        outcome: end.outcome(status, meter_ok),
        usage_source: usage.1,
        duration_ms: ms(sent.ended.duration_since(rq.arrived)),
        ttft_ms: if is_stream {
            first_output.map(|t| ms(t.duration_since(rq.arrived)))
        } else {
            None
        },
    }
}

/// The boundary and form fields of a whole multipart body (the audio routes).
fn read_form(
    head: &RequestHead,
    body: &[u8],
) -> Result<(Vec<u8>, multipart::Fields), &'static str> {
    let ctype = head.headers.known(Known::ContentType).unwrap_or(b"");
    let boundary = multipart::boundary(ctype).map_err(|e| e.message())?;
    let mut scanner = MultipartScanner::new(&boundary);
    scanner.feed(body);
    let fields = scanner.finish().map_err(|e| e.message())?;
    Ok((boundary, fields))
}

/// A streamed transcription asks for the final usage in vLLM's flattened form field
/// (`stream_include_usage`, and `stream_continuous_usage_stats` in continuous mode),
/// put as a first part. A field the caller sent itself is left as it is (its choice
/// then stands, and a stream without usage is billed by estimate, labelled so), as is
/// a body with a preamble (the part could not go first).
fn rewrite_form(
    body: &[u8],
    boundary: &[u8],
    fields: &multipart::Fields,
    mode: UsageMode,
) -> Option<Vec<u8>> {
    if !body.starts_with(b"--") || !body[2..].starts_with(boundary) {
        return None;
    }
    let mut parts = Vec::new();
    if fields.stream_include_usage.is_none() {
        parts.extend(multipart::field_part(
            boundary,
            "stream_include_usage",
            "true",
        ));
    }
    if mode == UsageMode::Continuous && fields.stream_continuous_usage_stats.is_none() {
        parts.extend(multipart::field_part(
            boundary,
            "stream_continuous_usage_stats",
            "true",
        ));
    }
    if parts.is_empty() {
        return None;
    }
    parts.extend_from_slice(body);
    Some(parts)
}

/// A backend that refused a connection: marked down until a health check passes.
fn mark_down(backend: &crate::upstream::Backend, why: String) {
    warn!("backend {} unreachable, marked down: {why}", backend.name);
    backend.set_health(false, Some(why));
}

fn ms(d: Duration) -> u64 {
    d.as_millis() as u64
}

/// The request head sent upstream: the caller's headers minus hop-by-hop ones and,
/// when the proxy authenticates, minus the caller's key.
fn write_upstream_head(
    out: &mut Vec<u8>,
    head: &RequestHead,
    backend: &crate::upstream::Backend,
    request_id: &str,
    body_len: u64,
    auth_enabled: bool,
    metered: bool,
) {
    let mut w = Head::request(
        out,
        head.method().as_bytes(),
        head.path().as_bytes(),
        backend.authority.as_bytes(),
    );
    let strip_key = auth_enabled || backend.authorization.is_some();
    // Most requests have no Connection header (HTTP/1.1 keep-alive): then no header
    // is scanned against its tokens.
    let has_connection = head
        .headers
        .iter()
        .any(|(n, _)| n.eq_ignore_ascii_case(b"connection"));
    let listed_in_connection = |name: &[u8]| {
        has_connection
            && head.headers.iter().any(|(n, v)| {
                n.eq_ignore_ascii_case(b"connection")
                    && v.split(|&b| b == b',')
                        .any(|t| t.trim_ascii().eq_ignore_ascii_case(name))
            })
    };
    for (name, value) in head.headers.iter() {
        let skip = is_hop_by_hop(name)
            || name.eq_ignore_ascii_case(b"host")
            || name.eq_ignore_ascii_case(b"x-request-id")
            || name.eq_ignore_ascii_case(b"expect")
            || (strip_key && (name.eq_ignore_ascii_case(b"authorization") || name.eq_ignore_ascii_case(b"x-api-key")))
            // Usage is read from the body: it must not arrive compressed.
            || (metered && name.eq_ignore_ascii_case(b"accept-encoding"))
            || listed_in_connection(name);
        if !skip {
            w.header(name, value);
        }
    }
    if let Some(k) = &backend.authorization {
        w.header(b"authorization", k.as_bytes());
    }
    w.header(b"x-request-id", request_id.as_bytes());
    if body_len > 0 || matches!(head.method(), "POST" | "PUT" | "PATCH") {
        w.content_length(body_len);
    }
    w.end();
}

#[cfg(test)]
mod tests {
    use super::new_request_id;

    #[test]
    fn request_ids_are_unique_time_ordered_uuid_v7() {
        let ids: Vec<String> = (0..20_000).map(|_| new_request_id()).collect();
        let unique: std::collections::HashSet<&String> = ids.iter().collect();
        assert_eq!(unique.len(), ids.len());
        for id in &ids[..10] {
            let u = uuid::Uuid::parse_str(id.strip_prefix("req_").unwrap()).unwrap();
            assert_eq!(u.get_version_num(), 7);
            assert_eq!(id.len(), 36);
        }
        let first = uuid::Uuid::parse_str(&ids[0][4..])
            .unwrap()
            .get_timestamp()
            .unwrap();
        let last = uuid::Uuid::parse_str(&ids[ids.len() - 1][4..])
            .unwrap()
            .get_timestamp()
            .unwrap();
        assert!(last.to_unix() >= first.to_unix());
    }
}
