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

use crate::tick::{self, Either, first_of};
use monoio::buf::{IoBuf, IoBufMut};
use monoio::io::{AsyncReadRent, AsyncWriteRentExt};
use monoio::net::TcpStream;
use std::io;
use std::os::fd::AsRawFd;
use std::time::Instant;

pub struct Io {
    pub stream: TcpStream,
    buf: Vec<u8>,
    /// Bytes before `start` have been consumed.
    start: usize,
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
        Io {
            stream,
            buf: Vec::with_capacity(capacity),
            start: 0,
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
        if out.is_empty() {
            return Ok(());
        }
        let buf = std::mem::take(out);
        let end = buf.len();
        let (res, slice) = AsyncWriteRentExt::write_all(&mut self.stream, buf.slice(0..end)).await;
        *out = slice.into_inner();
        res.map(|_| ())
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
        if out.is_empty() {
            return Ok(());
        }
        let buf = std::mem::take(out);
        let end = buf.len();
        let fd = self.stream.as_raw_fd();
        let deadline = tick::now() + stall;
        let fut = AsyncWriteRentExt::write_all(&mut self.stream, buf.slice(0..end));
        let mut fut = std::pin::pin!(fut);
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
        *out = slice.into_inner();
        out.clear();
        match res {
            Ok(_) => Ok(()),
            Err(_) if timed_out => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "peer stopped reading",
            )),
            Err(e) => Err(e),
        }
    }

    /// Writes all of `out`, then clears it (keeping its capacity).
    pub async fn write_all(&mut self, out: &mut Vec<u8>) -> io::Result<()> {
        let res = self.write_keep(out).await;
        out.clear();
        res
    }

    /// Looks at the socket without consuming or blocking.
    pub fn peek(&self) -> PeerState {
        peek_fd(self.stream.as_raw_fd())
    }
}

/// Reads into the spare capacity after `buf`'s contents (compacting or growing first).
async fn fill_into(
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
    start: &mut usize,
) -> io::Result<usize> {
    if *start > 0 && buf.capacity() - buf.len() < 2048 {
        buf.drain(..*start);
        *start = 0;
    }
    if buf.capacity() - buf.len() < 2048 {
        buf.reserve(buf.capacity().max(4096));
    }
    let owned = std::mem::take(buf);
    let (len, cap) = (owned.len(), owned.capacity());
    let (res, slice) = stream.read(owned.slice_mut(len..cap)).await;
    *buf = slice.into_inner();
    res
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
        self.fill_waking(deadline, 1, on_tick).await
    }

    /// `fill_until` for a wait with nothing to look at between its start and its
    /// deadline but what `tick::wake_all` announces (a shutdown): woken only near the
    /// deadline (up to `WHEEL - 1` ticks at a time) or by `wake_all`, when `on_wake`
    /// may interrupt. An idle keep-alive connection costs no wake-up every tick.
    pub async fn fill_by(&mut self, deadline: Instant, on_wake: impl FnMut() -> bool) -> Wait {
        self.fill_waking(deadline, tick::WHEEL - 1, on_wake).await
    }

    async fn fill_waking(
        &mut self,
        deadline: Instant,
        stride: u64,
        mut on_tick: impl FnMut() -> bool,
    ) -> Wait {
        let fd = self.stream.as_raw_fd();
        let Io { stream, buf, start } = self;
        let fut = fill_into(stream, buf, start);
        let mut fut = std::pin::pin!(fut);
        let mut stopped = None;
        let r = loop {
            let wake = if stride == 1 {
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
