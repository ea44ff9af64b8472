//! The one HTTP/1.1 head writer, for every head the proxy sends: responses to callers
//! (relayed and its own errors), requests upstream (relayed and the `/v1/models`
//! fan-out), and webhook POSTs. Plain appends into the caller's reused buffer, no
//! allocation and no formatting machinery: the relay writes two heads per request.

use crate::http::error::itoa_u64;

/// The interim answer to `Expect: 100-continue`.
pub const CONTINUE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";

/// A head being written into `out`; `end` finishes it.
pub struct Head<'a> {
    out: &'a mut Vec<u8>,
}

impl<'a> Head<'a> {
    /// `HTTP/1.1 <status> <reason>`.
    #[inline]
    pub fn response(out: &'a mut Vec<u8>, status: u16, reason: &[u8]) -> Self {
        out.extend_from_slice(b"HTTP/1.1 ");
        out.extend_from_slice(itoa_u64(status as u64).as_bytes());
        out.push(b' ');
        out.extend_from_slice(reason);
        out.extend_from_slice(b"\r\n");
        Head { out }
    }

    /// `<method> <target> HTTP/1.1` and the `host` header.
    #[inline]
    pub fn request(out: &'a mut Vec<u8>, method: &[u8], target: &[u8], host: &[u8]) -> Self {
        out.extend_from_slice(method);
        out.push(b' ');
        out.extend_from_slice(target);
        out.extend_from_slice(b" HTTP/1.1\r\nhost: ");
        out.extend_from_slice(host);
        out.extend_from_slice(b"\r\n");
        Head { out }
    }

    /// A head whose first lines are already in `out`: a prefix rendered once and
    /// copied per request (the webhook's POSTs differ only in a few headers).
    #[inline]
    pub fn resume(out: &'a mut Vec<u8>) -> Self {
        Head { out }
    }

    #[inline]
    pub fn header(&mut self, name: &[u8], value: &[u8]) -> &mut Self {
        self.out.extend_from_slice(name);
        self.out.extend_from_slice(b": ");
        self.out.extend_from_slice(value);
        self.out.extend_from_slice(b"\r\n");
        self
    }

    #[inline]
    pub fn content_length(&mut self, n: u64) -> &mut Self {
        self.header(b"content-length", itoa_u64(n).as_bytes())
    }

    /// Header lines already formatted (each ending in CRLF), e.g. configured extras.
    #[inline]
    pub fn lines(&mut self) -> &mut Vec<u8> {
        self.out
    }

    /// `connection: keep-alive` or `close` (responses say which), then the blank line.
    #[inline]
    pub fn end_with_connection(self, keep_alive: bool) {
        self.out.extend_from_slice(if keep_alive {
            b"connection: keep-alive\r\n\r\n".as_slice()
        } else {
            b"connection: close\r\n\r\n".as_slice()
        });
    }

    /// The blank line.
    #[inline]
    pub fn end(self) {
        self.out.extend_from_slice(b"\r\n");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heads_parse_back() {
        let mut out = Vec::new();
        let mut h = Head::response(&mut out, 429, b"Too Many Requests");
        h.header(b"x-a", b"1").content_length(12);
        h.end_with_connection(false);
        assert_eq!(
            out,
            b"HTTP/1.1 429 Too Many Requests\r\nx-a: 1\r\ncontent-length: 12\r\nconnection: close\r\n\r\n"
        );
        let mut out = Vec::new();
        let mut h = Head::request(&mut out, b"POST", b"/v1/x?y=1", b"[::1]:80");
        h.content_length(0);
        h.lines().extend_from_slice(b"x-b: 2\r\n");
        h.end();
        let mut headers = [httparse::EMPTY_HEADER; 4];
        let mut req = httparse::Request::new(&mut headers);
        assert!(req.parse(&out).unwrap().is_complete());
        assert_eq!((req.method, req.path), (Some("POST"), Some("/v1/x?y=1")));
        assert_eq!(req.headers.len(), 3);
    }
}
