//! Per-worker keep-alive connections to the backends. A connection idle for longer
//! than `FRESH` is checked before reuse (a backend's keep-alive timeout may have
//! closed it), so a request is not written into a socket the backend gave up on. One
//! idle for less is reused without the check (a syscall per request): backends keep
//! idle connections for seconds (uvicorn and so vLLM: 5 s), and one that closed
//! sooner (a restart) fails before any response byte, which the proxy answers by
//! sending the request once more on a fresh connection.

use super::Backend;
use crate::io::{Io, PeerState};
use monoio::net::TcpStream;
use std::cell::RefCell;
use std::time::{Duration, Instant};

/// Idle connections kept per backend per worker.
const MAX_IDLE_PER_BACKEND: usize = 128;
/// Read buffer per upstream connection; grows only for larger heads.
const UPSTREAM_BUF: usize = 16 * 1024;
/// An idle connection younger than this is reused without looking at its socket.
const FRESH: Duration = Duration::from_millis(500);

pub struct Pool {
    /// Per backend: idle connections and when each went idle, newest last.
    idle: RefCell<Vec<Vec<(Io, Instant)>>>,
}

#[derive(Debug)]
pub enum ConnectError {
    /// Nothing was sent: safe to try another backend (refused, unreachable, timed out).
    Unreachable(String),
}

impl Pool {
    pub fn new(backends: usize) -> Self {
        Pool {
            idle: RefCell::new((0..backends).map(|_| Vec::new()).collect()),
        }
    }

    /// A live idle connection to backend `i`, if one is pooled.
    pub fn take(&self, i: usize) -> Option<Io> {
        let mut idle = self.idle.borrow_mut();
        let list = idle.get_mut(i)?;
        let now = crate::tick::now();
        while let Some((io, since)) = list.pop() {
            if io.data().is_empty()
                && (now.saturating_duration_since(since) < FRESH || io.peek() == PeerState::Quiet)
            {
                return Some(io);
            }
        }
        None
    }

    /// Takes every idle connection to backend `i` (a reload moves them to a new view).
    pub fn drain(&self, i: usize) -> Vec<(Io, Instant)> {
        self.idle
            .borrow_mut()
            .get_mut(i)
            .map(std::mem::take)
            .unwrap_or_default()
    }

    /// Keeps `io`, idle since `since`, for reuse.
    pub fn put_idle(&self, i: usize, io: Io, since: Instant) {
        let mut idle = self.idle.borrow_mut();
        if let Some(list) = idle.get_mut(i)
            && list.len() < MAX_IDLE_PER_BACKEND
        {
            list.push((io, since));
        }
    }

    /// Keeps `io`, idle from now (to within a tick), for reuse.
    pub fn put(&self, i: usize, io: Io) {
        self.put_idle(i, io, crate::tick::now());
    }

    pub async fn connect(backend: &Backend, timeout: Duration) -> Result<Io, ConnectError> {
        let mut last = String::from("no address");
        for addr in &backend.addrs {
            match monoio::time::timeout(timeout, TcpStream::connect_addr(*addr)).await {
                Ok(Ok(stream)) => {
                    let _ = stream.set_nodelay(true);
                    let Some(tls) = &backend.tls else {
                        return Ok(Io::new(stream, UPSTREAM_BUF));
                    };
                    // The handshake is part of connecting: within the same timeout,
                    // and a failure is "unreachable" (nothing was sent).
                    let conn = rustls::ClientConnection::new(tls.config.clone(), tls.name.clone())
                        .map_err(|e| ConnectError::Unreachable(format!("tls {addr}: {e}")))?;
                    let mut io = Io::with_tls(stream, UPSTREAM_BUF, conn.into());
                    match io.handshake(crate::tick::now() + timeout).await {
                        Ok(()) => return Ok(io),
                        Err(w) => last = format!("tls handshake with {addr}: {w:?}"),
                    }
                }
                Ok(Err(e)) => last = format!("connect {addr}: {e}"),
                Err(_) => last = format!("connect {addr}: timed out after {timeout:?}"),
            }
        }
        Err(ConnectError::Unreachable(last))
    }
}
