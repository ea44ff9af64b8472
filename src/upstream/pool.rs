//! Per-worker keep-alive connections to the backends. An idle connection is checked
//! before reuse (a backend's keep-alive timeout may have closed it), so a request is
//! never written into a socket the backend has already given up on.

use super::Backend;
use crate::io::{Io, PeerState};
use monoio::net::TcpStream;
use std::cell::RefCell;
use std::time::Duration;

/// Idle connections kept per backend per worker.
const MAX_IDLE_PER_BACKEND: usize = 128;
/// Read buffer per upstream connection; grows only for larger heads.
const UPSTREAM_BUF: usize = 16 * 1024;

pub struct Pool {
    idle: RefCell<Vec<Vec<Io>>>,
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
        while let Some(io) = list.pop() {
            if io.peek() == PeerState::Quiet && io.data().is_empty() {
                return Some(io);
            }
        }
        None
    }

    /// Takes every idle connection to backend `i` (a reload moves them to a new view).
    pub fn drain(&self, i: usize) -> Vec<Io> {
        self.idle
            .borrow_mut()
            .get_mut(i)
            .map(std::mem::take)
            .unwrap_or_default()
    }

    pub fn put(&self, i: usize, io: Io) {
        let mut idle = self.idle.borrow_mut();
        if let Some(list) = idle.get_mut(i)
            && list.len() < MAX_IDLE_PER_BACKEND
        {
            list.push(io);
        }
    }

    pub async fn connect(backend: &Backend, timeout: Duration) -> Result<Io, ConnectError> {
        let mut last = String::from("no address");
        for addr in &backend.addrs {
            match monoio::time::timeout(timeout, TcpStream::connect_addr(*addr)).await {
                Ok(Ok(stream)) => {
                    let _ = stream.set_nodelay(true);
                    return Ok(Io::new(stream, UPSTREAM_BUF));
                }
                Ok(Err(e)) => last = format!("connect {addr}: {e}"),
                Err(_) => last = format!("connect {addr}: timed out after {timeout:?}"),
            }
        }
        Err(ConnectError::Unreachable(last))
    }
}
