//! Request and response heads: parsing with httparse, framing rules (RFC 9112 §6),
//! keep-alive, and the hop-by-hop headers a proxy must not forward.
//!
//! Parsed heads own a copy of their raw bytes and keep header positions as ranges, so
//! their buffers are reused from one request to the next on a connection.

use super::body::Framing;
use std::mem::MaybeUninit;
use std::ops::Range;

/// Headers per message; more is a 431 (requests) or 502 (responses).
pub const MAX_HEADERS: usize = 128;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeadError {
    TooLarge,
    TooManyHeaders,
    Malformed(&'static str),
    /// Well-formed, but a transfer coding the proxy cannot decode (RFC 9112 §6.1: 501).
    Unsupported(&'static str),
}

/// The transfer codings of a message, over every Transfer-Encoding line in order.
#[derive(Debug, Clone, Copy, Default)]
struct Codings {
    count: u32,
    chunked: u32,
    chunked_last: bool,
}

impl Codings {
    /// Chunked alone: the only coding the proxy decodes. Chunked more than once is
    /// forbidden (RFC 9112 §7): a message framed so cannot be trusted.
    fn framing(self) -> Result<Framing, HeadError> {
        match self {
            Codings { chunked: 2.., .. } => {
                Err(HeadError::Malformed("chunked applied more than once"))
            }
            Codings {
                count: 1,
                chunked_last: true,
                ..
            } => Ok(Framing::Chunked),
            _ => Err(HeadError::Unsupported(
                "transfer codings other than chunked are not supported",
            )),
        }
    }
}

/// Headers read on every message, by `Headers::known` and `Headers::values`: where
/// each first occurs, and whether it repeats, is noted in the one pass that fills the
/// list, so a lookup is an index, not a scan of every header's name (the scans were
/// ~1,100 of a keep-alive request's worker instructions for the first five, and ~1,200
/// of a new connection's for the framing four, callgrind).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Known {
    Authorization,
    XApiKey,
    ContentType,
    XRequestId,
    XUserId,
    ContentLength,
    TransferEncoding,
    Connection,
    Expect,
}

/// `Known`'s names, lowercase, in its order.
const KNOWN: [&[u8]; 9] = [
    b"authorization",
    b"x-api-key",
    b"content-type",
    b"x-request-id",
    b"x-user-id",
    b"content-length",
    b"transfer-encoding",
    b"connection",
    b"expect",
];

/// `name`'s place in `KNOWN`, if it is there (ASCII case-insensitive): one comparison
/// at most, chosen by length. Every header name passes here, so the comparison is by
/// words (`eq_lower`), not a byte loop (which made it cost more than the scans it
/// saved).
#[inline]
fn known(name: &[u8]) -> Option<usize> {
    let at = match name.len() {
        13 => 0,
        9 if name[2] | 0x20 == b'a' => 1,
        9 => 4,
        12 if name[0] | 0x20 == b'c' => 2,
        12 => 3,
        14 => 5,
        17 => 6,
        10 => 7,
        6 => 8,
        _ => return None,
    };
    eq_lower(name, KNOWN[at]).then_some(at)
}

/// Whether header name `name` equals `lower` (lowercase letters and `-`, at least 4
/// bytes) ignoring ASCII case, by overlapping 8-byte words (4-byte under 8 bytes).
/// Setting bit 5 lowercases a letter and leaves `-` as it is; the only other byte it
/// turns into a letter or `-` is `\r`, which httparse never lets into a header name (a
/// token).
#[inline]
fn eq_lower(name: &[u8], lower: &[u8]) -> bool {
    let n = name.len();
    if n != lower.len() {
        return false;
    }
    if n < 8 {
        let word = |s: &[u8], at: usize| {
            let mut w = [0u8; 4];
            w.copy_from_slice(&s[at..at + 4]);
            u32::from_le_bytes(w)
        };
        return n >= 4
            && word(name, 0) | 0x2020_2020 == word(lower, 0)
            && word(name, n - 4) | 0x2020_2020 == word(lower, n - 4);
    }
    const BIT5: u64 = 0x2020_2020_2020_2020;
    let word = |s: &[u8], at: usize| {
        let mut w = [0u8; 8];
        w.copy_from_slice(&s[at..at + 8]);
        u64::from_le_bytes(w)
    };
    let mut at = 0;
    while at + 8 < n {
        if word(name, at) | BIT5 != word(lower, at) {
            return false;
        }
        at += 8;
    }
    word(name, n - 8) | BIT5 == word(lower, n - 8)
}

#[derive(Debug, Default)]
pub struct Headers {
    pub buf: Vec<u8>,
    list: Vec<(Range<usize>, Range<usize>)>,
    /// For each of `KNOWN`, 1 + the index in `list` of its first occurrence; 0: absent.
    first: [u16; KNOWN.len()],
    /// Bit k: `KNOWN[k]` occurs more than once.
    repeated: u16,
}

impl Headers {
    pub fn iter(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        self.list
            .iter()
            .map(|(n, v)| (&self.buf[n.clone()], &self.buf[v.clone()]))
    }

    /// Empty, its buffers kept.
    fn clear(&mut self) {
        self.buf.clear();
        self.list.clear();
        self.first = [0; KNOWN.len()];
        self.repeated = 0;
    }

    /// The first value of a `Known` header.
    pub fn known(&self, name: Known) -> Option<&[u8]> {
        let i = usize::from(self.first[name as usize]).checked_sub(1)?;
        let (_, v) = self.list.get(i)?;
        self.buf.get(v.clone())
    }

    pub fn known_str(&self, name: Known) -> Option<&str> {
        self.known(name).and_then(|v| std::str::from_utf8(v).ok())
    }

    /// The first value of header `name` (ASCII case-insensitive), by a scan: what the
    /// proxy reads is `Known`, so this is the tests' reference.
    #[cfg(test)]
    pub fn get(&self, name: &str) -> Option<&[u8]> {
        self.iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name.as_bytes()))
            .map(|(_, v)| v)
    }

    /// Every value of a `Known` header, in order: the noted first alone unless the name
    /// repeats, when the rest of the list is scanned from there.
    pub fn values(&self, name: Known) -> impl Iterator<Item = &[u8]> {
        let k = name as usize;
        let first = usize::from(self.first[k]);
        let end = match first {
            0 => 0,
            _ if self.repeated & (1 << k) != 0 => self.list.len(),
            _ => first,
        };
        self.list
            .get(first.saturating_sub(1)..end)
            .unwrap_or_default()
            .iter()
            .filter(move |(n, _)| known(&self.buf[n.clone()]) == Some(k))
            .map(|(_, v)| &self.buf[v.clone()])
    }

    /// Whether any `name` header lists `token` (comma-separated, case-insensitive).
    pub fn has_token(&self, name: Known, token: &str) -> bool {
        self.values(name).any(|v| {
            v.split(|&b| b == b',')
                .any(|t| t.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
        })
    }

    fn fill(&mut self, data: &[u8], head_len: usize, parsed: &[httparse::Header<'_>]) {
        self.clear();
        self.buf.extend_from_slice(&data[..head_len]);
        // One allocation for a connection's first head, not a doubling every few
        // headers (two per request on a new connection, ~600 instructions).
        self.list.reserve(parsed.len());
        let base = data.as_ptr() as usize;
        for h in parsed {
            if let Some(k) = known(h.name.as_bytes()) {
                if self.first[k] == 0 {
                    // At most MAX_HEADERS (fewer than u16::MAX) headers.
                    self.first[k] = self.list.len() as u16 + 1;
                } else {
                    self.repeated |= 1 << k;
                }
            }
            let n = h.name.as_ptr() as usize - base;
            let v = h.value.as_ptr() as usize - base;
            self.list.push((n..n + h.name.len(), v..v + h.value.len()));
        }
    }

    /// Content-Length and Transfer-Encoding, validated per RFC 9112 §6.
    fn framing(&self) -> Result<(Option<u64>, Option<Codings>), HeadError> {
        let mut length: Option<u64> = None;
        let mut codings = Codings::default();
        for v in self.values(Known::ContentLength) {
            for part in v.split(|&b| b == b',') {
                let part = part.trim_ascii();
                if part.is_empty() || part.len() > 19 {
                    return Err(HeadError::Malformed("invalid Content-Length"));
                }
                // Digits only, at most 19 of them: below u64::MAX, so no overflow.
                let mut n = 0u64;
                for &b in part {
                    if !b.is_ascii_digit() {
                        return Err(HeadError::Malformed("invalid Content-Length"));
                    }
                    n = n * 10 + u64::from(b - b'0');
                }
                if length.is_some_and(|l| l != n) {
                    return Err(HeadError::Malformed("conflicting Content-Length headers"));
                }
                length = Some(n);
            }
        }
        for v in self.values(Known::TransferEncoding) {
            if v.split(|&b| b == b',').all(|p| p.trim_ascii().is_empty()) {
                // Present but empty: some peers would still treat it as framing.
                return Err(HeadError::Malformed("empty Transfer-Encoding"));
            }
            for part in v.split(|&b| b == b',') {
                let part = part.trim_ascii();
                if part.is_empty() {
                    continue;
                }
                let chunked = part.eq_ignore_ascii_case(b"chunked");
                codings.count += 1;
                codings.chunked += u32::from(chunked);
                codings.chunked_last = chunked;
            }
        }
        Ok((length, (codings.count > 0).then_some(codings)))
    }
}

/// Where a head parsed by httparse ends: `Ok(None)` while incomplete and under the
/// size limit.
fn head_end(
    parsed: httparse::Result<usize>,
    have: usize,
    max_bytes: usize,
    malformed: &'static str,
) -> Result<Option<usize>, HeadError> {
    match parsed {
        Ok(httparse::Status::Complete(n)) => Ok(Some(n)),
        Ok(httparse::Status::Partial) if have >= max_bytes => Err(HeadError::TooLarge),
        Ok(httparse::Status::Partial) => Ok(None),
        Err(httparse::Error::TooManyHeaders) => Err(HeadError::TooManyHeaders),
        Err(_) => Err(HeadError::Malformed(malformed)),
    }
}

/// Hop-by-hop headers (RFC 9110 §7.6.1) plus the framing headers we always rewrite.
/// Every forwarded header passes here, so the candidates are chosen by length and
/// compared by words (`eq_lower`; header names are tokens, as it needs).
pub fn is_hop_by_hop(name: &[u8]) -> bool {
    match name.len() {
        2 => name.eq_ignore_ascii_case(b"te"),
        7 => eq_lower(name, b"trailer") || eq_lower(name, b"upgrade"),
        10 => eq_lower(name, b"connection") || eq_lower(name, b"keep-alive"),
        14 => eq_lower(name, b"content-length"),
        16 => eq_lower(name, b"proxy-connection"),
        17 => eq_lower(name, b"transfer-encoding"),
        18 => eq_lower(name, b"proxy-authenticate"),
        19 => eq_lower(name, b"proxy-authorization"),
        _ => false,
    }
}

#[derive(Debug, Default)]
pub struct RequestHead {
    pub headers: Headers,
    method: Range<usize>,
    path: Range<usize>,
    /// Minor version: 0 for HTTP/1.0, 1 for HTTP/1.1.
    pub version: u8,
    pub framing: Option<Framing>,
    pub keep_alive: bool,
    pub expect_continue: bool,
}

impl RequestHead {
    /// An empty head that parses into `headers`' buffers (a closed connection's: a new
    /// connection's first head then allocates nothing). Nothing of theirs is kept.
    pub fn reusing(mut headers: Headers) -> RequestHead {
        headers.clear();
        RequestHead {
            headers,
            ..RequestHead::default()
        }
    }

    pub fn method(&self) -> &str {
        std::str::from_utf8(&self.headers.buf[self.method.clone()]).unwrap_or("")
    }

    pub fn path(&self) -> &str {
        std::str::from_utf8(&self.headers.buf[self.path.clone()]).unwrap_or("")
    }

    /// Path without the query string.
    pub fn route(&self) -> &str {
        let p = self.path();
        p.find('?').map_or(p, |q| &p[..q])
    }

    pub fn framing(&self) -> Framing {
        self.framing.unwrap_or(Framing::Empty)
    }

    /// Parses a request head from the start of `data`. `Ok(None)`: incomplete.
    pub fn parse(&mut self, data: &[u8], max_bytes: usize) -> Result<Option<usize>, HeadError> {
        // Uninitialized header slots: httparse writes only those it fills, rather than
        // this function zeroing 4 KiB of them on every call.
        let mut parsed = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
        let mut req = httparse::Request::new(&mut []);
        let window = &data[..data.len().min(max_bytes)];
        let Some(head_len) = head_end(
            httparse::ParserConfig::default().parse_request_with_uninit_headers(
                &mut req,
                window,
                &mut parsed,
            ),
            data.len(),
            max_bytes,
            "malformed request head",
        )?
        else {
            return Ok(None);
        };
        let base = data.as_ptr() as usize;
        let (Some(method), Some(path), Some(version)) = (req.method, req.path, req.version) else {
            return Err(HeadError::Malformed("malformed request line"));
        };
        let m = method.as_ptr() as usize - base;
        let p = path.as_ptr() as usize - base;
        self.method = m..m + method.len();
        self.path = p..p + path.len();
        self.version = version;
        self.headers.fill(data, head_len, req.headers);

        let (length, te) = self.headers.framing()?;
        self.framing = Some(match (length, te) {
            (Some(_), Some(_)) => {
                return Err(HeadError::Malformed(
                    "both Content-Length and Transfer-Encoding",
                ));
            }
            (None, Some(_)) if version == 0 => {
                return Err(HeadError::Malformed(
                    "Transfer-Encoding in an HTTP/1.0 request",
                ));
            }
            (None, Some(codings)) => codings.framing()?,
            (Some(n), None) => Framing::Length(n),
            (None, None) => Framing::Empty,
        });
        self.keep_alive = if version == 1 {
            !self.headers.has_token(Known::Connection, "close")
        } else {
            self.headers.has_token(Known::Connection, "keep-alive")
        };
        self.expect_continue =
            version == 1 && self.headers.has_token(Known::Expect, "100-continue");
        Ok(Some(head_len))
    }
}

#[derive(Debug, Default)]
pub struct ResponseHead {
    pub headers: Headers,
    pub status: u16,
    reason: Range<usize>,
    pub version: u8,
    /// The upstream connection can be reused after this response.
    pub keep_alive: bool,
}

impl ResponseHead {
    pub fn reason(&self) -> &[u8] {
        &self.headers.buf[self.reason.clone()]
    }

    /// Parses a response head. `Ok(None)`: incomplete.
    pub fn parse(&mut self, data: &[u8], max_bytes: usize) -> Result<Option<usize>, HeadError> {
        let mut parsed = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
        let mut resp = httparse::Response::new(&mut []);
        let window = &data[..data.len().min(max_bytes)];
        let Some(head_len) = head_end(
            httparse::ParserConfig::default().parse_response_with_uninit_headers(
                &mut resp,
                window,
                &mut parsed,
            ),
            data.len(),
            max_bytes,
            "malformed response head",
        )?
        else {
            return Ok(None);
        };
        let (Some(status), Some(version)) = (resp.code, resp.version) else {
            return Err(HeadError::Malformed("malformed status line"));
        };
        let reason = resp.reason.unwrap_or("");
        let r = if reason.is_empty() {
            0..0
        } else {
            let off = reason.as_ptr() as usize - data.as_ptr() as usize;
            off..off + reason.len()
        };
        self.headers.fill(data, head_len, resp.headers);
        self.status = status;
        self.reason = r;
        self.version = version;
        self.keep_alive = if version == 1 {
            !self.headers.has_token(Known::Connection, "close")
        } else {
            self.headers.has_token(Known::Connection, "keep-alive")
        };
        Ok(Some(head_len))
    }

    /// Body framing of this response to a request with `method` (RFC 9112 §6.3).
    pub fn framing(&mut self, method: &str) -> Result<Framing, HeadError> {
        if method == "HEAD"
            || (100..200).contains(&self.status)
            || self.status == 204
            || self.status == 304
        {
            return Ok(Framing::Empty);
        }
        let (length, te) = self.headers.framing()?;
        Ok(match (te, length) {
            // Chunked last and more than once, or under another coding: the body
            // cannot be relayed as the backend meant it.
            (Some(c), _) if c.chunked > 1 || (c.chunked_last && c.count > 1) => {
                return Err(HeadError::Malformed("unsupported Transfer-Encoding"));
            }
            (Some(c), Some(_)) if c.chunked_last => {
                // Both present: chunked wins, and the connection must not be reused.
                self.keep_alive = false;
                Framing::Chunked
            }
            (Some(c), None) if c.chunked_last => Framing::Chunked,
            (Some(_), _) => {
                self.keep_alive = false;
                Framing::UntilClose
            }
            (None, Some(n)) => Framing::Length(n),
            (None, None) => {
                self.keep_alive = false;
                Framing::UntilClose
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(raw: &[u8]) -> Result<Option<usize>, HeadError> {
        RequestHead::default().parse(raw, 64 * 1024)
    }

    proptest::proptest! {
        /// `get` finds the first of a name whatever its case, and a `Known` header's
        /// noted first occurrence is what `get` finds and its `values` are what a scan
        /// finds, whatever the order and repeats.
        #[test]
        fn a_known_header_is_found_as_a_scan_finds_it(
            headers in proptest::collection::vec(
                (
                    proptest::sample::select(vec![
                        "authorization", "Authorization", "x-api-key", "X-Api-Key",
                        "content-type", "CONTENT-TYPE", "x-request-id", "x-user-id",
                        "X-User-Id", "x-user-ix", "content-typo", "authorizatioN",
                        "x-api-keys", "host", "accept", "content-length", "Content-Length",
                        "transfer-encoding", "Transfer-Encoding", "transfer-encodinG",
                        "connection", "CONNECTION", "connectiom", "expect", "Expect",
                        "expecs", "content-lengths",
                    ]),
                    "[a-z0-9]{0,6}",
                ),
                0..12,
            ),
        ) {
            let mut raw = b"GET / HTTP/1.1\r\n".to_vec();
            for (n, v) in &headers {
                raw.extend_from_slice(format!("{n}: {v}\r\n").as_bytes());
            }
            raw.extend_from_slice(b"\r\n");
            let mut parsed = [httparse::EMPTY_HEADER; 16];
            let mut req = httparse::Request::new(&mut parsed);
            let httparse::Status::Complete(len) = req.parse(&raw).unwrap() else {
                panic!("incomplete");
            };
            let mut h = Headers::default();
            h.fill(&raw, len, req.headers);
            for name in [
                "authorization", "AUTHORIZATION", "x-api-key", "content-type",
                "x-request-id", "x-user-id", "X-USER-ID", "host", "x-user-ix",
            ] {
                let scan = headers
                    .iter()
                    .find(|(n, _)| n.eq_ignore_ascii_case(name))
                    .map(|(_, v)| v.as_bytes());
                proptest::prop_assert_eq!(h.get(name), scan, "{}", name);
            }
            for (k, name) in [
                (Known::Authorization, "authorization"),
                (Known::XApiKey, "x-api-key"),
                (Known::ContentType, "content-type"),
                (Known::XRequestId, "x-request-id"),
                (Known::XUserId, "x-user-id"),
                (Known::ContentLength, "content-length"),
                (Known::TransferEncoding, "transfer-encoding"),
                (Known::Connection, "connection"),
                (Known::Expect, "expect"),
            ] {
                proptest::prop_assert_eq!(h.known(k), h.get(name), "{}", name);
                let scan: Vec<&[u8]> = headers
                    .iter()
                    .filter(|(n, _)| n.eq_ignore_ascii_case(name))
                    .map(|(_, v)| v.as_bytes())
                    .collect();
                proptest::prop_assert_eq!(h.values(k).collect::<Vec<_>>(), scan, "{}", name);
            }
            let again = RequestHead::reusing(h);
            proptest::prop_assert!(again.headers.known(Known::Authorization).is_none());
            proptest::prop_assert!(again.headers.values(Known::ContentLength).next().is_none());
            proptest::prop_assert_eq!(again.headers.repeated, 0);
        }
    }

    #[test]
    fn known_names_match_in_any_case_and_nothing_else_does() {
        for (i, name) in KNOWN.iter().enumerate() {
            let name = std::str::from_utf8(name).unwrap();
            assert_eq!(known(name.as_bytes()), Some(i));
            assert_eq!(known(name.to_ascii_uppercase().as_bytes()), Some(i));
            // Each byte changed (or case-flipped where that is no letter) misses.
            for at in 0..name.len() {
                for b in [b'_', b'^', b'~', b'0', b'.', b'!', b'z'] {
                    let mut other = name.as_bytes().to_vec();
                    if other[at] | 0x20 == b | 0x20 {
                        continue;
                    }
                    other[at] = b;
                    assert_eq!(known(&other), None, "{}", String::from_utf8_lossy(&other));
                }
            }
        }
        for other in ["x-api-keys", "content-lengt", "expec", "host", "te", ""] {
            assert_eq!(known(other.as_bytes()), None, "{other}");
        }
    }

    #[test]
    fn hop_by_hop_headers_are_these_ten_in_any_case() {
        const HOP: [&str; 10] = [
            "connection",
            "keep-alive",
            "proxy-connection",
            "proxy-authenticate",
            "proxy-authorization",
            "te",
            "trailer",
            "transfer-encoding",
            "upgrade",
            "content-length",
        ];
        for h in HOP {
            assert!(is_hop_by_hop(h.as_bytes()), "{h}");
            assert!(is_hop_by_hop(h.to_ascii_uppercase().as_bytes()), "{h}");
            let mut other = h.as_bytes().to_vec();
            other[0] = b'x';
            assert!(!is_hop_by_hop(&other), "{h}");
            assert!(!is_hop_by_hop(&h.as_bytes()[1..]), "{h}");
        }
        for h in [
            "host",
            "content-type",
            "x-request-id",
            "tE2",
            "upgrades",
            "",
        ] {
            assert!(!is_hop_by_hop(h.as_bytes()), "{h}");
        }
    }

    #[test]
    fn a_reused_head_keeps_buffers_but_nothing_of_the_last_request() {
        let mut h = RequestHead::default();
        let raw = b"POST /secret HTTP/1.1\r\nAuthorization: Bearer k\r\nContent-Length: 3\r\n\r\n";
        h.parse(raw, 1024).unwrap().unwrap();
        let cap = h.headers.buf.capacity();
        let h = RequestHead::reusing(std::mem::take(&mut h.headers));
        assert_eq!(h.headers.buf.capacity(), cap);
        assert_eq!((h.method(), h.path()), ("", ""));
        assert!(h.headers.get("authorization").is_none());
        assert!(h.framing.is_none() && !h.keep_alive && !h.expect_continue);
    }

    #[test]
    fn parses_request_and_headers() {
        let raw = b"POST /v1/chat/completions?x=1 HTTP/1.1\r\nHost: a\r\nContent-Length: 12\r\nAuthorization: Bearer k\r\n\r\n{body}";
        let mut h = RequestHead::default();
        let n = h.parse(raw, 1024).unwrap().unwrap();
        assert_eq!(&raw[n..], b"{body}");
        assert_eq!(h.method(), "POST");
        assert_eq!(h.route(), "/v1/chat/completions");
        assert_eq!(h.framing(), Framing::Length(12));
        assert_eq!(h.headers.get("authorization"), Some(&b"Bearer k"[..]));
        assert!(h.keep_alive);
    }

    #[test]
    fn partial_and_too_large() {
        assert_eq!(parse(b"GET / HTTP/1.1\r\nHost: a\r\n"), Ok(None));
        let big = [b"GET / HTTP/1.1\r\nX: ".as_slice(), &vec![b'a'; 2000]].concat();
        assert_eq!(
            RequestHead::default().parse(&big, 1024),
            Err(HeadError::TooLarge)
        );
    }

    #[test]
    fn rejects_ambiguous_framing() {
        let cases: &[&[u8]] = &[
            b"POST / HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"POST / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
            b"POST / HTTP/1.1\r\nContent-Length: +5\r\n\r\n",
            b"POST / HTTP/1.1\r\nContent-Length: 5 5\r\n\r\n",
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked, chunked\r\n\r\n",
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"POST / HTTP/1.1\r\nTransfer-Encoding:\r\nContent-Length: 5\r\n\r\n",
            b"POST / HTTP/1.1\r\nTransfer-Encoding: ,\r\n\r\n",
            b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost : a\r\n\r\n",
            b"POST / HTTP/1.1\r\nX: a\r\n b\r\n\r\n",
            b"POST / HTTP/1.1\r\nX\x01: a\r\n\r\n",
        ];
        for c in cases {
            assert!(
                matches!(parse(c), Err(HeadError::Malformed(_))),
                "{:?}: {:?}",
                String::from_utf8_lossy(c),
                parse(c)
            );
        }
        // The largest length taken is 19 digits; leading zeros are digits too.
        let mut h = RequestHead::default();
        let nines = b"POST / HTTP/1.1\r\nContent-Length: 9999999999999999999\r\n\r\n";
        h.parse(nines, 1024).unwrap().unwrap();
        assert_eq!(h.framing(), Framing::Length(9_999_999_999_999_999_999));
        h.parse(
            b"POST / HTTP/1.1\r\nContent-Length:  0012 ,12\r\n\r\n",
            1024,
        )
        .unwrap()
        .unwrap();
        assert_eq!(h.framing(), Framing::Length(12));
        for bad in [
            "18446744073709551616",
            "10000000000000000000",
            "1_0",
            "-1",
            "1.0",
            "",
        ] {
            let raw = format!("POST / HTTP/1.1\r\nContent-Length: {bad}\r\n\r\n");
            assert!(
                matches!(parse(raw.as_bytes()), Err(HeadError::Malformed(_))),
                "{bad}"
            );
        }
        // Repeated identical Content-Length is allowed (RFC 9112 §6.3).
        assert!(
            parse(b"POST / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n").is_ok()
        );
    }

    #[test]
    fn transfer_codings_other_than_chunked_alone_are_not_implemented() {
        let cases: &[&[u8]] = &[
            b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n",
            b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
            b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked, gzip\r\n\r\n",
            b"POST / HTTP/1.1\r\nTransfer-Encoding: identity\r\n\r\n",
        ];
        for c in cases {
            assert!(
                matches!(parse(c), Err(HeadError::Unsupported(_))),
                "{:?}: {:?}",
                String::from_utf8_lossy(c),
                parse(c)
            );
        }
        let chunked = b"POST / HTTP/1.1\r\nTransfer-Encoding: Chunked\r\n\r\n";
        let mut h = RequestHead::default();
        assert!(h.parse(chunked, 1024).unwrap().is_some());
        assert_eq!(h.framing(), Framing::Chunked);
    }

    #[test]
    fn response_framing() {
        let mut r = ResponseHead::default();
        r.parse(
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n",
            1024,
        )
        .unwrap()
        .unwrap();
        assert_eq!(r.framing("POST"), Ok(Framing::Chunked));
        assert!(r.keep_alive);
        r.parse(b"HTTP/1.1 204 No Content\r\n\r\n", 1024)
            .unwrap()
            .unwrap();
        assert_eq!(r.framing("POST"), Ok(Framing::Empty));
        r.parse(b"HTTP/1.0 200 OK\r\n\r\n", 1024).unwrap().unwrap();
        assert_eq!(r.framing("GET"), Ok(Framing::UntilClose));
        assert!(!r.keep_alive);
        r.parse(b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\n", 1024)
            .unwrap()
            .unwrap();
        assert_eq!(r.framing("HEAD"), Ok(Framing::Empty));
        assert_eq!(r.framing("GET"), Ok(Framing::Length(3)));
        for te in ["chunked, chunked", "gzip, chunked"] {
            let raw = format!("HTTP/1.1 200 OK\r\ntransfer-encoding: {te}\r\n\r\n");
            r.parse(raw.as_bytes(), 1024).unwrap().unwrap();
            assert!(matches!(r.framing("GET"), Err(HeadError::Malformed(_))));
        }
    }
}
