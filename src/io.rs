//! A monoio TCP stream with its read buffer. monoio takes buffers by value for each
//! operation (io_uring owns them while the kernel works), so the buffer is moved in and
//! out around every read and write; its capacity is kept, so a connection allocates
//! once and then reuses.
//!
//! A read or write given up on (timeout, hang-up, shutdown) is not dropped: a dropped
//! io_uring operation keeps its buffer and the socket until the kernel finishes it
//! (never, for a read from a silent peer). Instead that direction of the socket is
//! shut down, which completes the operation at once, and it is awaited, so the buffer
//! comes back. Every wait given up on ends the connection (or, for a read, leaves only
//! an answer to write), so nothing is lost by shutting it. This costs nothing per
//! operation, where monoio's `Canceller` costs a hash-set insert and removal on every
//! read and write.
//!
//! A connection with nothing to do but wait (an idle keep-alive caller, a slow stream
//! between two tokens) gives its read buffer back (`release`) to a pool of its
//! worker's thread and waits for readiness first (an io_uring poll, which holds no
//! buffer); then it takes a buffer from the pool and reads. Only connections with
//! bytes in flight hold a buffer, so memory follows the traffic, not the connection
//! count (docs/performance.md: "Memory per connection").
//!
//! Over TLS the same methods carry plaintext: a `rustls::Connection` sits beside the
//! socket, ciphertext goes through two buffers of the connection's own (reused like
//! the read buffer), and the handshake is driven by the first reads (`handshake`).

use crate::tick::{self, Either, first_of};
use monoio::buf::{IoBuf, IoBufMut};
use monoio::io::{
    AsyncReadRent, AsyncWriteRentExt, CancelHandle, CancelableAsyncReadRent, Canceller,
};
use monoio::net::TcpStream;
use std::io;
use std::os::fd::AsRawFd;
use std::time::Instant;

pub struct Io {
    pub stream: TcpStream,
    buf: Vec<u8>,
    /// Bytes before `start` have been consumed.
    start: usize,
    tls: Option<Box<Tls>>,
    /// How much to read at a time; the buffer taken after a `release`.
    size: usize,
    /// The next read waits for readiness first (the buffer was released).
    poll_first: bool,
    /// The last read took less than it was offered: the socket had no more.
    drained: bool,
    /// The next read tries a non-blocking `recv` before it waits (`expect_bytes`).
    try_now: bool,
    /// Cancels a lean wait's read (`fill_by`); made on the first one.
    canceller: Option<Canceller>,
}

/// A TLS connection's state beside its socket.
struct Tls {
    conn: rustls::Connection,
    /// Ciphertext read from the socket; bytes before `cin_start` were given to rustls.
    cin: Vec<u8>,
    cin_start: usize,
    /// Ciphertext on its way out.
    cout: Vec<u8>,
}

/// Ciphertext read per socket read: one full TLS record and its header.
const TLS_READ: usize = 16 * 1024 + 325;

fn tls_error(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

/// What a non-blocking peek at a socket found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerState {
    /// Nothing to read: the peer is there and quiet.
    Quiet,
    /// Bytes are waiting.
    Data,
    /// The peer closed or reset the connection.
    Closed,
}

impl Io {
    pub fn new(stream: TcpStream, capacity: usize) -> Self {
        // The buffer is taken at the first read (from the thread's pool), not here:
        // connecting and writing a request hold none.
        Io {
            stream,
            buf: Vec::new(),
            start: 0,
            tls: None,
            size: capacity,
            poll_first: false,
            drained: false,
            try_now: false,
            canceller: None,
        }
    }

    /// The next read tries a non-blocking `recv` before it submits a read and waits:
    /// for an accepted connection, whose listener defers the accept until the caller's
    /// first bytes have come (`TCP_DEFER_ACCEPT`). Plain TCP only; a caller silent
    /// past the deferral finds nothing and waits as any read does.
    pub fn expect_bytes(&mut self) {
        self.try_now = true;
    }

    /// Gives the read buffer back to the worker's pool when nothing in it is left to
    /// consume; the next read then waits for readiness before it takes one again. For
    /// waits that may be long: an idle keep-alive caller, a stream between tokens.
    /// (Over TLS, only when no ciphertext waits for rustls: a poll would not see it.)
    pub fn release(&mut self) {
        if self.start < self.buf.len()
            || self.tls.as_ref().is_some_and(|t| t.cin_start < t.cin.len())
        {
            return;
        }
        pool::give(std::mem::take(&mut self.buf));
        self.start = 0;
        self.poll_first = true;
    }

    /// `release` when the last read found the socket drained (it took less than it
    /// was offered): the next bytes are a wait away. After a full read more is likely
    /// waiting, and the buffer is kept for it.
    pub fn release_if_drained(&mut self) {
        if self.drained {
            self.release();
        }
    }

    /// A connection that speaks TLS over `stream` (as a server or a client): call
    /// `handshake` before anything else.
    pub fn with_tls(stream: TcpStream, capacity: usize, mut conn: rustls::Connection) -> Self {
        // Each write is encrypted and sent at once: the relay's own buffers bound it.
        conn.set_buffer_limit(None);
        let mut io = Io::new(stream, capacity);
        io.tls = Some(Box::new(Tls {
            conn,
            cin: Vec::new(),
            cin_start: 0,
            cout: Vec::new(),
        }));
        io
    }

    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// Drops the TLS layer to answer in plain text (to a plain-HTTP request on a TLS
    /// port, before any handshake).
    pub fn into_plain(mut self) -> Io {
        self.tls = None;
        self
    }

    /// Completes a TLS handshake by `deadline` (a stalled one is given up like a
    /// stalled request head). Plaintext that came with the last flight is kept.
    pub async fn handshake(&mut self, deadline: Instant) -> Result<(), Wait> {
        while self.tls.as_ref().is_some_and(|t| t.conn.is_handshaking()) {
            match self.fill_until(deadline, || false).await {
                Wait::Data => {}
                other => return Err(other),
            }
        }
        Ok(())
    }

    /// The ALPN protocol and TLS version agreed, for tests and logs.
    pub fn tls_version(&self) -> Option<rustls::ProtocolVersion> {
        self.tls.as_ref()?.conn.protocol_version()
    }

    /// Over TLS: says goodbye (close_notify) before the connection is dropped, so a
    /// caller reading to the end sees a clean end. Best effort, bounded by `stall`.
    pub async fn close(&mut self, stall: std::time::Duration) {
        if let Some(t) = self.tls.as_mut() {
            t.conn.send_close_notify();
            let mut none = Vec::new();
            let _ = self.write_within(&mut none, Some(stall)).await;
        }
    }

    /// Buffered bytes not yet consumed.
    pub fn data(&self) -> &[u8] {
        &self.buf[self.start..]
    }

    pub fn consume(&mut self, n: usize) {
        self.start = (self.start + n).min(self.buf.len());
        if self.start == self.buf.len() {
            self.buf.clear();
            self.start = 0;
        }
    }

    /// Writes all of `out`, keeping its contents.
    pub async fn write_keep(&mut self, out: &mut Vec<u8>) -> io::Result<()> {
        self.write_within(out, None).await
    }

    /// Writes `out` (encrypted first over TLS), keeping its contents; with `stall`,
    /// gives up when the peer takes nothing for that long.
    async fn write_within(
        &mut self,
        out: &mut Vec<u8>,
        stall: Option<std::time::Duration>,
    ) -> io::Result<()> {
        // One `send` await for both paths: this future is part of every relay's.
        let buf = match self.tls.as_mut() {
            None => std::mem::take(out),
            Some(t) => {
                if !out.is_empty() {
                    std::io::Write::write_all(&mut t.conn.writer(), out)?;
                }
                t.sealed()?
            }
        };
        let (res, buf) = send(&mut self.stream, buf, stall).await;
        match self.tls.as_mut() {
            None => *out = buf,
            Some(t) => t.keep(buf),
        }
        res
    }

    /// Writes all of `out` (then clears it) unless the peer takes nothing for `stall`:
    /// then the write is cancelled and `TimedOut` returned. A caller that stops reading
    /// cannot hold a request forever. (The stall is measured in ticks of the worker's
    /// clock, so it holds to within one `TICK`.)
    pub async fn write_all_within(
        &mut self,
        out: &mut Vec<u8>,
        stall: std::time::Duration,
    ) -> io::Result<()> {
        let res = self.write_within(out, Some(stall)).await;
        out.clear();
        res
    }

    /// Writes all of `out`, then clears it (keeping its capacity).
    pub async fn write_all(&mut self, out: &mut Vec<u8>) -> io::Result<()> {
        let res = self.write_keep(out).await;
        out.clear();
        res
    }

    /// Looks at the socket without consuming or blocking. Over TLS, ciphertext not
    /// yet decrypted counts as data.
    pub fn peek(&self) -> PeerState {
        match &self.tls {
            Some(t) if t.cin_start < t.cin.len() => PeerState::Data,
            _ => peek_fd(self.stream.as_raw_fd()),
        }
    }
}

/// Writes all of `buf` to the socket (its contents kept): with `stall`, gives up when
/// the peer takes nothing for that long (to within one `TICK`).
async fn send(
    stream: &mut TcpStream,
    buf: Vec<u8>,
    stall: Option<std::time::Duration>,
) -> (io::Result<()>, Vec<u8>) {
    if buf.is_empty() {
        return (Ok(()), buf);
    }
    let end = buf.len();
    let fd = stream.as_raw_fd();
    // One write future for both paths (two would each take room in this future's
    // state, which every connection task carries).
    let mut fut = std::pin::pin!(AsyncWriteRentExt::write_all(stream, buf.slice(0..end)));
    let Some(stall) = stall else {
        let (res, slice) = fut.await;
        return (res.map(|_| ()), slice.into_inner());
    };
    let deadline = tick::now() + stall;
    let mut timed_out = false;
    let (res, slice) = loop {
        match first_of(fut.as_mut(), tick::next_tick()).await {
            Either::Done(r) => break r,
            Either::Tick if tick::now() < deadline => {}
            Either::Tick => {
                // The connection is given up: both directions end, the write fails.
                shutdown(fd, libc::SHUT_RDWR);
                timed_out = true;
                break fut.as_mut().await;
            }
        }
    };
    let res = match res {
        Ok(_) => Ok(()),
        Err(_) if timed_out => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "peer stopped reading",
        )),
        Err(e) => Err(e),
    };
    (res, slice.into_inner())
}

/// Sends what rustls has queued (records, alerts, handshake messages).
async fn flush(
    stream: &mut TcpStream,
    t: &mut Tls,
    stall: Option<std::time::Duration>,
) -> io::Result<()> {
    let out = t.sealed()?;
    let (res, out) = send(stream, out, stall).await;
    t.keep(out);
    res
}

impl Tls {
    /// What rustls has queued, as ciphertext in the connection's reused out buffer
    /// (lent to the write; `keep` takes it back).
    fn sealed(&mut self) -> io::Result<Vec<u8>> {
        let mut out = std::mem::take(&mut self.cout);
        out.clear();
        while self.conn.wants_write() {
            self.conn.write_tls(&mut out)?;
        }
        Ok(out)
    }

    fn keep(&mut self, mut out: Vec<u8>) {
        out.clear();
        self.cout = out;
    }
}

/// Reads into the spare capacity after `buf`'s contents (compacting or growing first).
/// Over TLS: plaintext, reading and decrypting records until some comes; a positive
/// count with no bytes means the handshake just completed.
async fn fill_into(io: &mut Io, cancel: Option<CancelHandle>) -> io::Result<usize> {
    let Io {
        stream,
        buf,
        start,
        tls,
        size,
        poll_first,
        drained,
        try_now,
        canceller: _,
    } = io;
    let polled = std::mem::take(poll_first);
    let try_now = std::mem::take(try_now) || polled;
    if polled {
        // No buffer is held while waiting; a dropped or shut-down poll loses nothing.
        stream.readable(true).await?;
    }
    if buf.capacity() == 0 {
        *buf = pool::take(*size);
    }
    if *start > 0 && buf.capacity() - buf.len() < 2048 {
        buf.drain(..*start);
        *start = 0;
    }
    if let Some(t) = tls {
        return fill_tls(stream, buf, t).await;
    }
    if buf.capacity() - buf.len() < 2048 {
        buf.reserve(buf.capacity().max(4096));
    }
    if try_now {
        // Ready (polled, or an accepted connection's first bytes, which the listener
        // waited for): read at once, with no await between taking the buffer and
        // giving it back (a caller releases it as soon as it has consumed the bytes),
        // so a burst of streams woken together (an engine step's tokens) holds one
        // buffer, not one each, as epoll servers read.
        let spare = buf.capacity() - buf.len();
        if let Some(res) = recv_now(stream.as_raw_fd(), buf) {
            *drained = res.as_ref().is_ok_and(|&n| n < spare);
            return res;
        }
    }
    let owned = std::mem::take(buf);
    let (len, cap) = (owned.len(), owned.capacity());
    let (res, slice) = match cancel {
        Some(c) => stream.cancelable_read(owned.slice_mut(len..cap), c).await,
        None => stream.read(owned.slice_mut(len..cap)).await,
    };
    *buf = slice.into_inner();
    *drained = res.as_ref().is_ok_and(|&n| n < cap - len);
    res
}

/// A non-blocking `recv` into `buf`'s spare capacity. `None`: nothing to read after
/// all (a spurious readiness).
fn recv_now(fd: i32, buf: &mut Vec<u8>) -> Option<io::Result<usize>> {
    let spare = buf.spare_capacity_mut();
    // SAFETY: recv writes at most `spare.len()` bytes into the vector's spare capacity,
    // which is valid for writes; MSG_DONTWAIT never blocks the worker.
    let n = unsafe {
        libc::recv(
            fd,
            spare.as_mut_ptr().cast(),
            spare.len(),
            libc::MSG_DONTWAIT,
        )
    };
    if n < 0 {
        let e = io::Error::last_os_error();
        return match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => None,
            _ => Some(Err(e)),
        };
    }
    let n = n as usize;
    // SAFETY: the kernel initialised the first `n` spare bytes.
    unsafe { buf.set_len(buf.len() + n) };
    Some(Ok(n))
}

/// What `handshake` fails with when the peer spoke plain HTTP to a TLS port.
pub const PLAIN_HTTP: &str = "a plain HTTP request on a TLS port";

async fn fill_tls(stream: &mut TcpStream, buf: &mut Vec<u8>, t: &mut Tls) -> io::Result<usize> {
    loop {
        // A TLS record starts with its type (0x14..=0x18); a request line with a
        // method's capital letter. Caught before rustls answers it with an alert.
        if t.conn.is_handshaking() && t.cin.get(t.cin_start).is_some_and(u8::is_ascii_uppercase) {
            return Err(io::Error::new(io::ErrorKind::InvalidData, PLAIN_HTTP));
        }
        let was_handshaking = t.conn.is_handshaking();
        let state = match t.conn.process_new_packets() {
            Ok(s) => s,
            Err(e) => {
                // rustls queued an alert saying why: send it, then end. (Boxed, as
                // below: rare, and inline it would grow every read's future.)
                let _ = Box::pin(flush(stream, t, Some(std::time::Duration::from_secs(1)))).await;
                return Err(tls_error(e));
            }
        };
        let n = state.plaintext_bytes_to_read();
        let closed = state.peer_has_closed();
        if t.conn.wants_write() {
            // Handshake messages, key updates, alerts: not per record.
            Box::pin(flush(stream, t, None)).await?;
        }
        if n > 0 {
            let len = buf.len();
            buf.resize(len + n, 0);
            std::io::Read::read_exact(&mut t.conn.reader(), &mut buf[len..])?;
            return Ok(n);
        }
        if closed {
            return Ok(0);
        }
        if was_handshaking && !t.conn.is_handshaking() {
            return Ok(1);
        }
        if t.cin_start < t.cin.len() {
            let mut rest = &t.cin[t.cin_start..];
            let used = t.conn.read_tls(&mut rest)?;
            t.cin_start += used;
            if t.cin_start == t.cin.len() {
                t.cin.clear();
                t.cin_start = 0;
            }
            continue;
        }
        let mut owned = std::mem::take(&mut t.cin);
        owned.clear();
        owned.reserve(TLS_READ);
        let cap = owned.capacity();
        let (res, slice) = stream.read(owned.slice_mut(0..cap)).await;
        t.cin = slice.into_inner();
        t.cin_start = 0;
        if res? == 0 {
            return Ok(0);
        }
    }
}

/// Ends one or both directions of a socket; an io_uring read or write pending on that
/// direction completes at once (end of stream, or an error).
fn shutdown(fd: i32, how: i32) {
    // SAFETY: shutdown(2) on a socket fd this connection owns; it changes no memory.
    unsafe { libc::shutdown(fd, how) };
}

pub fn peek_fd(fd: i32) -> PeerState {
    let mut b = [0u8; 1];
    // SAFETY: recv into a valid one-byte buffer on a socket fd we own; MSG_PEEK leaves
    // the data in place and MSG_DONTWAIT never blocks the worker.
    let n = unsafe {
        libc::recv(
            fd,
            b.as_mut_ptr().cast(),
            1,
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    match n {
        0 => PeerState::Closed,
        n if n > 0 => PeerState::Data,
        _ => match io::Error::last_os_error().kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => PeerState::Quiet,
            _ => PeerState::Closed,
        },
    }
}

/// Whether the peer has shut its side (FIN received), even with bytes still unread
/// before it (POLLRDHUP): a TLS caller's close_notify and FIN.
pub fn peer_shut_write(fd: i32) -> bool {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLRDHUP,
        revents: 0,
    };
    // SAFETY: poll(2) on one valid pollfd with a zero timeout never blocks.
    let n = unsafe { libc::poll(&mut p, 1, 0) };
    n > 0 && p.revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0
}

/// Why waiting for bytes ended.
#[derive(Debug)]
pub enum Wait {
    /// New bytes are buffered.
    Data,
    Eof,
    Error(io::Error),
    TimedOut,
    /// `on_tick` asked to stop waiting.
    Interrupted,
}

impl Io {
    /// Waits for more bytes until `deadline` (to within one `TICK`: compute it from
    /// `tick::now()`). Every `TICK`, `on_tick` may interrupt. The read stays in flight
    /// across ticks, so no byte is ever lost to a timer.
    pub async fn fill_until(&mut self, deadline: Instant, on_tick: impl FnMut() -> bool) -> Wait {
        self.fill_waking(deadline, 1, false, on_tick).await
    }

    /// `fill_until` for a wait with nothing to look at between its start and its
    /// deadline but what `tick::wake_all` announces (a shutdown): woken only near the
    /// deadline (up to `WHEEL - 1` ticks at a time) or by `wake_all`, when `on_wake`
    /// may interrupt. An idle keep-alive connection costs no wake-up every tick.
    /// Lean: a caller's bytes may take long to come, so a read still waiting at the
    /// next tick is cancelled and the rest of the wait holds no buffer (see `release`).
    pub async fn fill_by(&mut self, deadline: Instant, on_wake: impl FnMut() -> bool) -> Wait {
        self.fill_waking(deadline, tick::WHEEL - 1, true, on_wake)
            .await
    }

    /// A lean wait (plain TCP with a buffer in hand) reads with a cancel handle, and
    /// the first tick cancels it: a read that raced the cancel returns its bytes; a
    /// cancelled one gives the buffer back and the wait goes on polling. Monoio's
    /// canceller costs a hash-set insert and removal on the read, which is why only
    /// waits that may be long are lean.
    async fn fill_waking(
        &mut self,
        deadline: Instant,
        stride: u64,
        lean: bool,
        mut on_tick: impl FnMut() -> bool,
    ) -> Wait {
        let fd = self.stream.as_raw_fd();
        let lean = lean && self.tls.is_none() && !self.poll_first;
        // Taken out of `self` while the read borrows it; put back after.
        let mut canceller = lean.then(|| {
            self.canceller
                .take()
                .or_else(pool::take_canceller)
                .unwrap_or_default()
        });
        let (r, stopped) = loop {
            let (r, stopped, cancelled) = {
                let handle = canceller.as_ref().map(Canceller::handle);
                let fut = fill_into(self, handle);
                let mut fut = std::pin::pin!(fut);
                let mut stopped = None;
                let mut cancelled = false;
                let r = loop {
                    let wake = if stride == 1 || canceller.is_some() {
                        tick::next_tick()
                    } else {
                        tick::after(tick::ticks_until(deadline).min(stride))
                    };
                    match first_of(fut.as_mut(), wake).await {
                        Either::Done(r) => break r,
                        Either::Tick => {
                            let why = if on_tick() {
                                Wait::Interrupted
                            } else if tick::now() >= deadline {
                                Wait::TimedOut
                            } else if let Some(c) = canceller.take() {
                                // Still nothing: this read's buffer goes back.
                                canceller = Some(c.cancel());
                                cancelled = true;
                                break fut.as_mut().await;
                            } else {
                                continue;
                            };
                            // Reading is given up; writing stays open for an answer (a
                            // 408, a 504) where there is one to give.
                            shutdown(fd, libc::SHUT_RD);
                            stopped = Some(why);
                            break fut.as_mut().await;
                        }
                    }
                };
                (r, stopped, cancelled)
            };
            if cancelled
                && let Err(e) = &r
                && e.raw_os_error() == Some(libc::ECANCELED)
            {
                self.release();
                // The rest of the wait polls: no canceller needed.
                if let Some(c) = canceller.take() {
                    self.canceller = Some(c);
                }
                continue;
            }
            break (r, stopped);
        };
        if let Some(c) = canceller {
            self.canceller = Some(c);
        }
        match (r, stopped) {
            // Given up is given up, even if bytes raced in before the read ended: the
            // read side is shut, so the connection has no future but an answer.
            (_, Some(why)) => why,
            (Ok(n), None) if n > 0 => Wait::Data,
            (Ok(_), None) => Wait::Eof,
            (Err(e), None) => Wait::Error(e),
        }
    }
}

impl Drop for Io {
    /// A closed connection's read buffer and canceller are the next one's: with a new
    /// connection per request, allocating and freeing them was ~1,000 of a request's
    /// ~35,000 instructions (`benches/callgrind.sh churn`). No operation holds either
    /// here (an operation borrows the `Io`, or owns the buffer it took).
    fn drop(&mut self) {
        pool::give(std::mem::take(&mut self.buf));
        if let Some(c) = self.canceller.take() {
            pool::give_canceller(c);
        }
    }
}

/// The worker thread's spare read buffers: a connection that stops waiting for bytes
/// gives its buffer here (`Io::release`, or when it ends) and the next read anywhere on
/// the thread takes one, so buffers are reused without an allocation per wait.
/// Thread-local: each worker has its own, with no lock. Bounded in count and in size
/// per buffer (a grown buffer is freed, not kept), so what it holds is at most
/// `KEEP * MAX_KEPT`. Lean waits' cancellers (never cancelled ones: `cancel` makes a
/// new one) are kept the same way.
mod pool {
    use crate::spares::{self, Spares};
    use monoio::io::Canceller;
    use std::cell::RefCell;

    /// Buffers kept per thread.
    const KEEP: usize = 64;
    /// A buffer larger than this is freed rather than kept.
    const MAX_KEPT: usize = 64 * 1024;

    thread_local! {
        static SPARE: Spares<Vec<u8>> = const { RefCell::new(Vec::new()) };
        static CANCELLERS: Spares<Canceller> = const { RefCell::new(Vec::new()) };
    }

    pub fn take_canceller() -> Option<Canceller> {
        spares::take(&CANCELLERS)
    }

    pub fn give_canceller(c: Canceller) {
        spares::keep(&CANCELLERS, c, KEEP);
    }

    /// An empty buffer with room for at least `size` bytes.
    pub fn take(size: usize) -> Vec<u8> {
        if size == 0 {
            return Vec::new();
        }
        let mut buf = spares::take(&SPARE).unwrap_or_default();
        buf.reserve(size);
        buf
    }

    pub fn give(mut buf: Vec<u8>) {
        if buf.capacity() == 0 || buf.capacity() > MAX_KEPT {
            return;
        }
        buf.clear();
        spares::keep(&SPARE, buf, KEEP);
    }

    #[cfg(test)]
    mod tests {
        #[test]
        fn buffers_are_reused_bounded_and_sized() {
            let a = super::take(8192);
            assert!(a.capacity() >= 8192);
            let ptr = a.as_ptr();
            super::give(a);
            let b = super::take(4096);
            assert_eq!(b.as_ptr(), ptr, "the spare buffer is taken again");
            assert!(b.is_empty() && b.capacity() >= 8192);
            // A smaller spare grows to what is asked.
            super::give(Vec::with_capacity(1024));
            assert!(super::take(16 * 1024).capacity() >= 16 * 1024);
            // Grown buffers are not kept; the count is bounded.
            super::give(Vec::with_capacity(super::MAX_KEPT + 1));
            assert_eq!(super::SPARE.with(|s| s.borrow().len()), 0);
            for _ in 0..super::KEEP + 10 {
                super::give(Vec::with_capacity(4096));
            }
            assert_eq!(super::SPARE.with(|s| s.borrow().len()), super::KEEP);
            assert!(super::take(0).capacity() == 0);
        }

        #[test]
        fn cancellers_are_kept_bounded() {
            assert!(super::take_canceller().is_none());
            for _ in 0..super::KEEP + 10 {
                super::give_canceller(Default::default());
            }
            assert_eq!(super::CANCELLERS.with(|s| s.borrow().len()), super::KEEP);
            assert!(super::take_canceller().is_some());
            assert_eq!(
                super::CANCELLERS.with(|s| s.borrow().len()),
                super::KEEP - 1
            );
        }
    }
}
