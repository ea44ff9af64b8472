//! A monoio TCP stream with its read buffer. monoio takes buffers by value for each
//! operation (io_uring owns them while the kernel works), so the buffer is moved in and
//! out around every read and write; its capacity is kept, so a connection allocates
//! once and then reuses.

use monoio::buf::{IoBuf, IoBufMut};
use monoio::io::{AsyncReadRent, AsyncWriteRentExt};
use monoio::net::TcpStream;
use std::io;
use std::os::fd::AsRawFd;

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

    /// Reads more bytes after the buffered ones. `Ok(0)` is end of stream.
    pub async fn fill(&mut self) -> io::Result<usize> {
        if self.start > 0 && self.buf.capacity() - self.buf.len() < 2048 {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        if self.buf.capacity() - self.buf.len() < 2048 {
            self.buf.reserve(self.buf.capacity().max(4096));
        }
        let buf = std::mem::take(&mut self.buf);
        let (len, cap) = (buf.len(), buf.capacity());
        let (res, slice) = self.stream.read(buf.slice_mut(len..cap)).await;
        self.buf = slice.into_inner();
        res
    }

    /// Writes all of `out`, keeping its contents.
    pub async fn write_keep(&mut self, out: &mut Vec<u8>) -> io::Result<()> {
        if out.is_empty() {
            return Ok(());
        }
        let buf = std::mem::take(out);
        let end = buf.len();
        let (res, slice) = self.stream.write_all(buf.slice(0..end)).await;
        *out = slice.into_inner();
        res.map(|_| ())
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

/// How often a wait looks up from the socket: to notice a caller that hung up while
/// the backend is thinking, or a shutdown. Also the hang-up detection latency.
pub const TICK: std::time::Duration = std::time::Duration::from_millis(100);

impl Io {
    /// Waits for more bytes until `deadline`. Every `TICK`, `on_tick` may interrupt.
    /// The read stays in flight across ticks, so no byte is ever lost to a timer.
    pub async fn fill_until(
        &mut self,
        deadline: std::time::Instant,
        mut on_tick: impl FnMut() -> bool,
    ) -> Wait {
        let fut = self.fill();
        let mut fut = std::pin::pin!(fut);
        loop {
            monoio::select! {
                r = &mut fut => {
                    return match r {
                        Ok(0) => Wait::Eof,
                        Ok(_) => Wait::Data,
                        Err(e) => Wait::Error(e),
                    };
                }
                _ = monoio::time::sleep(TICK) => {
                    if on_tick() {
                        return Wait::Interrupted;
                    }
                    if std::time::Instant::now() >= deadline {
                        return Wait::TimedOut;
                    }
                }
            }
        }
    }
}
